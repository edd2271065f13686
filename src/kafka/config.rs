//! The `kafka:` config section and the librdkafka settings every client gets.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`). Overridden by `SWITCHYARD_KAFKA_BROKERS`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer groups are `<group_prefix>.<stage>`.
    #[serde(default = "default_group_prefix")]
    pub group_prefix: String,
    /// `client.id` reported to the broker.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// librdkafka settings every client gets — consumers, producers, admin — passed through
    /// verbatim: how to reach the cluster (`security.protocol: SASL_SSL`, `ssl.ca.location`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`…). Secret-looking values are redacted by
    /// `config show`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client: BTreeMap<String, String>,
    /// librdkafka settings that are secrets, kept out of the config file: each a value, `{env:
    /// VAR}` or `{file: PATH}` (e.g. `ssl.key.password: {env: KAFKA_KEY_PASSWORD}`,
    /// `sasl.oauthbearer.client.secret: {file: /run/secrets/kafka}`), read at load and given to
    /// every client after `client:`. Shown redacted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_secrets: BTreeMap<String, crate::secret::SecretRef>,
    /// `client_secrets` as read at load (never serialised).
    #[serde(skip)]
    pub resolved_secrets: BTreeMap<String, crate::secret::Secret>,
    /// Extra librdkafka settings for consumers, passed through verbatim (e.g. `session.timeout.ms`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka settings for producers, passed through verbatim (e.g. `linger.ms`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// Records with a larger payload go to the dead-letter topic with reason `too_large`.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// The largest record a consumer can fetch (it sets librdkafka's `receive.message.max.bytes`).
    /// Keep it at least the brokers' largest record (`message.max.bytes`): a larger record can never
    /// be fetched, so its partition stalls (and `/readyz` says so) instead of dead-lettering it.
    /// Only a prefix of a record over `max_record_bytes` is kept in memory.
    #[serde(default = "default_fetch_max_record_bytes")]
    pub fetch_max_record_bytes: usize,
    /// Records a stage holds in flight at once; when reached, consumption pauses (back-pressure)
    /// until half of them are done.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// The most records (heads of different lanes) a stage processes as one batch, sharing its
    /// Redis round trips.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// On partition revoke and on shutdown, how long to wait for in-flight records before committing
    /// what is done.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// How often (seconds) `switchyard run` reads its topics' `max.message.bytes` again (0: only at
    /// start), so a record larger than a limit lowered while it runs — or than one the brokers did
    /// not answer at start — is dead-lettered (`output_too_large`) instead of refused by the broker.
    #[serde(default = "default_topic_limits_refresh_seconds")]
    pub topic_limits_refresh_seconds: u64,
}

impl KafkaConfig {
    /// Settings that weaken the connection's security (accepted — a test cluster may need them —
    /// but said loudly at start): certificate or host name checks off, a password in clear text.
    pub fn insecure(&self) -> Vec<String> {
        let mut out = Vec::new();
        let all = || {
            self.client
                .iter()
                .chain(&self.consumer)
                .chain(&self.producer)
        };
        let get = |k: &str| {
            all()
                .filter(|(key, _)| key.as_str() == k)
                .map(|(_, v)| v.to_ascii_lowercase())
                .next_back()
        };
        if get("enable.ssl.certificate.verification").as_deref() == Some("false") {
            out.push("kafka: enable.ssl.certificate.verification is false: the brokers' certificates are not checked".into());
        }
        if get("ssl.endpoint.identification.algorithm").as_deref() == Some("none") {
            out.push("kafka: ssl.endpoint.identification.algorithm is none: the brokers' host names are not checked".into());
        }
        if get("security.protocol").as_deref() == Some("sasl_plaintext")
            && get("sasl.mechanism").is_none_or(|m| m == "plain")
        {
            out.push("kafka: SASL_PLAINTEXT with PLAIN sends the password in clear text".into());
        }
        out
    }

    /// Every problem of this section, as (path, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut add = |item: &str, m: String| p.push((item.to_string(), m));
        if self.brokers.trim().is_empty() {
            add("kafka.brokers", "must name at least one broker".into());
        }
        for b in self.brokers.split(',').filter(|b| !b.trim().is_empty()) {
            if !b.trim().contains(':') {
                add("kafka.brokers", format!("{b:?} has no port (host:port)"));
            }
        }
        if self.group_prefix.is_empty() {
            add("kafka.group_prefix", "must not be empty".into());
        }
        if self.max_in_flight == 0 {
            add("kafka.max_in_flight", "must be at least 1".into());
        }
        if self.max_batch == 0 {
            add("kafka.max_batch", "must be at least 1".into());
        }
        if self.max_record_bytes < 1024 {
            add("kafka.max_record_bytes", "must be at least 1024".into());
        }
        // librdkafka refuses receive.message.max.bytes above 2^31 - 1; one MiB is kept for the
        // response's framing.
        let ceiling = i32::MAX as usize - FETCH_OVERHEAD;
        if self.fetch_max_record_bytes < self.max_record_bytes
            || self.fetch_max_record_bytes > ceiling
        {
            add(
                "kafka.fetch_max_record_bytes",
                format!(
                    "must be between max_record_bytes ({}) and {ceiling}",
                    self.max_record_bytes
                ),
            );
        }
        for (section, map) in [
            ("client", &self.client),
            ("consumer", &self.consumer),
            ("producer", &self.producer),
        ] {
            for (k, v) in map {
                if k.trim().is_empty() || v.is_empty() {
                    add(
                        &format!("kafka.{section}"),
                        format!("setting {k:?} has an empty name or value"),
                    );
                }
            }
        }
        for k in self.client_secrets.keys() {
            if k.trim().is_empty() {
                add("kafka.client_secrets", "a setting has an empty name".into());
                continue;
            }
            for (section, map) in [
                ("client", &self.client),
                ("consumer", &self.consumer),
                ("producer", &self.producer),
            ] {
                if map.contains_key(k) {
                    add(
                        &format!("kafka.client_secrets.{k}"),
                        format!("is also set under kafka.{section}: set it in one place"),
                    );
                }
            }
            // A name librdkafka does not know would be refused when a client is made, and
            // rdkafka's error quotes the value: checked here, with a stand-in value.
            if let Err(rdkafka::error::KafkaError::ClientConfig(
                rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                ..,
            )) = ClientConfig::new().set(k, "x").create_native_config()
            {
                add(
                    &format!("kafka.client_secrets.{k}"),
                    "is not a librdkafka setting".into(),
                );
            }
        }
        if self.client.contains_key("bootstrap.servers") {
            add(
                "kafka.client.bootstrap.servers",
                "set kafka.brokers (or SWITCHYARD_KAFKA_BROKERS) instead".into(),
            );
        }
        for reserved in ["enable.auto.offset.store", "group.id"] {
            for (section, map) in [("consumer", &self.consumer), ("client", &self.client)] {
                if !map.contains_key(reserved) {
                    continue;
                }
                add(
                    &format!("kafka.{section}.{reserved}"),
                    "is set by switchyard itself (at-least-once depends on it) and cannot be overridden".into(),
                );
            }
        }
        // What the in-order, nothing-lost guarantees rest on: an idempotent producer (retries
        // never reorder or duplicate a partition's records) that counts a record delivered only
        // once every in-sync replica has it.
        // (librdkafka's aliases and spellings of true count alike.)
        for (keys, safe) in [
            (&["enable.idempotence"][..], &["true", "t", "1"][..]),
            (&["acks", "request.required.acks"][..], &["all", "-1"][..]),
        ] {
            for (section, map) in [("producer", &self.producer), ("client", &self.client)] {
                for key in keys {
                    match map.get(*key) {
                        Some(v) if !safe.contains(&v.trim().to_ascii_lowercase().as_str()) => add(
                            &format!("kafka.{section}.{key}"),
                            format!(
                                "{v:?} would let retries reorder or lose records (per-resource \
                                 order and at-least-once depend on {}={}); remove it",
                                keys[0], safe[0]
                            ),
                        ),
                        _ => {}
                    }
                }
            }
            for key in keys {
                if self.client_secrets.contains_key(*key) {
                    add(
                        &format!("kafka.client_secrets.{key}"),
                        "is no secret; per-resource order and at-least-once depend on it: remove it"
                            .into(),
                    );
                }
            }
        }
        if self.consumer.contains_key("receive.message.max.bytes") {
            add(
                "kafka.consumer.receive.message.max.bytes",
                "is derived from kafka.fetch_max_record_bytes; set that instead".into(),
            );
        }
        p
    }
}

impl KafkaConfig {
    /// Reads `client_secrets` (at load): a problem per secret that cannot be read, naming its
    /// source, never a value.
    pub fn resolve_secrets(&mut self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        self.resolved_secrets.clear();
        for (k, r) in &self.client_secrets {
            match r.resolve() {
                Ok(s) => {
                    self.resolved_secrets.insert(k.clone(), s);
                }
                Err(e) => problems.push((format!("kafka.client_secrets.{k}"), e)),
            }
        }
        problems
    }

    /// Gives a client the secrets of `client_secrets` (after every other setting).
    fn set_secrets(&self, c: &mut ClientConfig) {
        for (k, v) in &self.resolved_secrets {
            c.set(k, v.expose());
        }
    }

    /// The largest record the producer writes: its `message.max.bytes` (librdkafka's default,
    /// 1,000,000, unless `kafka.producer` sets it).
    pub fn max_output_bytes(&self) -> usize {
        self.producer
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    }
}

/// Room a topic's `max.message.bytes` keeps for the record batch's framing.
pub const BATCH_FRAMING_BYTES: usize = 512;

impl KafkaConfig {
    /// Lowers the producer's `batch.size` to what the smallest topic it writes takes (its
    /// `max.message.bytes`, less framing), when it is larger: a batch of small records must fit
    /// that topic too. Returns the new batch size when it lowered it. (Each record is checked
    /// against its own topic's limit: [`super::TopicLimits`].)
    pub fn cap_batch_size(&mut self, smallest_max_message_bytes: usize) -> Option<usize> {
        let cap = smallest_max_message_bytes
            .saturating_sub(BATCH_FRAMING_BYTES)
            .max(1000);
        let batch = self
            .producer
            .get("batch.size")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1_000_000);
        if batch <= cap {
            return None;
        }
        self.producer.insert("batch.size".into(), cap.to_string());
        Some(cap)
    }
}

impl KafkaConfig {
    /// The longest a produce can take before its delivery is reported failed: the producer's
    /// `message.timeout.ms` (or `delivery.timeout.ms`) of `kafka.client`/`kafka.producer`, else
    /// librdkafka's default (300,000).
    pub fn delivery_timeout_ms(&self) -> u64 {
        self.client
            .iter()
            .chain(&self.producer)
            .filter(|(k, _)| *k == "message.timeout.ms" || *k == "delivery.timeout.ms")
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .next_back()
            .unwrap_or(300_000)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

fn default_topic_limits_refresh_seconds() -> u64 {
    60
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_group_prefix() -> String {
    "switchyard".into()
}
fn default_client_id() -> String {
    "switchyard".into()
}
fn default_max_record_bytes() -> usize {
    1024 * 1024
}
fn default_fetch_max_record_bytes() -> usize {
    1 << 30
}
fn default_max_batch() -> usize {
    256
}
fn default_max_in_flight() -> usize {
    2000
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

/// Room a fetch response needs beyond its largest record.
const FETCH_OVERHEAD: usize = 1 << 20;

/// A stage's consumer: [`consumer_config`] plus librdkafka statistics every 5 s, which the stage's
/// client context turns into the consumer-lag metric (other consumers — tools, the Kafka agents'
/// reply readers — have no use for them, and librdkafka's default context would log each one, a
/// 6.7 KB line, at INFO).
pub fn stage_consumer_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = consumer_config(cfg, group);
    statistics_unless_set(&mut c, cfg, &cfg.consumer);
    c
}

/// librdkafka statistics every 5 s, unless the client's own section (`own`) or `kafka.client` sets
/// the interval (e.g. "0": none).
fn statistics_unless_set(c: &mut ClientConfig, cfg: &KafkaConfig, own: &BTreeMap<String, String>) {
    let key = "statistics.interval.ms";
    if !own.contains_key(key) && !cfg.client.contains_key(key) {
        c.set(key, "5000");
    }
}

/// Settings every consumer gets; `kafka.consumer` entries are applied after these and win, except the
/// two that at-least-once depends on (refused by config validation).
pub fn consumer_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.partition.eof", "false")
        // Any record the broker holds can be fetched (and dead-lettered when too large): the
        // broker returns a record larger than fetch.max.bytes on its own, so only this bounds it.
        .set(
            "receive.message.max.bytes",
            (cfg.fetch_max_record_bytes + FETCH_OVERHEAD).to_string(),
        );
    for (k, v) in cfg.client.iter().chain(&cfg.consumer) {
        c.set(k, v);
    }
    cfg.set_secrets(&mut c);
    // Offsets are stored by the runtime only once everything a record caused is acknowledged.
    c.set("group.id", group)
        .set("enable.auto.offset.store", "false");
    c
}

/// The producer of `switchyard run`: [`producer_config`] plus librdkafka statistics every 5 s (unless
/// `kafka.producer` or `kafka.client` sets the interval), which its client context turns into the
/// batch metrics (`switchyard_produce_batches_total`, `switchyard_produce_batched_records_total`).
pub fn run_producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = producer_config(cfg);
    statistics_unless_set(&mut c, cfg, &cfg.producer);
    c
}

/// Settings every producer gets; `kafka.producer` entries win.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    for (k, v) in cfg.client.iter().chain(&cfg.producer) {
        c.set(k, v);
    }
    cfg.set_secrets(&mut c);
    c
}

/// Settings for admin and metadata clients.
pub fn admin_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id);
    for (k, v) in &cfg.client {
        c.set(k, v);
    }
    cfg.set_secrets(&mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret setting librdkafka does not know is a problem at load (a client made with it would
    /// fail quoting the value); one also set in another map is refused.
    #[test]
    fn client_secrets_are_checked_by_name_never_quoting_the_value() {
        let k: KafkaConfig = serde_yaml::from_str(
            "client_secrets: {ssl.key.password: s3cret, sasl.pasword: s3cret, linger.ms: '5'}\nproducer: {linger.ms: '5'}",
        )
        .expect("parses");
        let p = k.problems();
        let named = |item: &str| p.iter().find(|(i, _)| i == item).map(|(_, m)| m.clone());
        assert_eq!(
            named("kafka.client_secrets.sasl.pasword").as_deref(),
            Some("is not a librdkafka setting")
        );
        assert!(
            named("kafka.client_secrets.ssl.key.password").is_none(),
            "{p:?}"
        );
        assert!(
            named("kafka.client_secrets.linger.ms").is_some_and(|m| m.contains("kafka.producer"))
        );
        assert!(!format!("{p:?}").contains("s3cret"), "{p:?}");
    }

    /// The producer settings order and delivery rest on cannot be weakened; setting them to
    /// their safe values is allowed.
    #[test]
    fn a_producer_that_could_reorder_or_lose_records_is_refused() {
        let k: KafkaConfig = serde_yaml::from_str(
            "producer: {enable.idempotence: 'false', acks: '1'}\nclient: {acks: all}",
        )
        .expect("parses");
        let items: Vec<String> = k.problems().into_iter().map(|(i, _)| i).collect();
        assert_eq!(
            items,
            ["kafka.producer.enable.idempotence", "kafka.producer.acks"],
            "{items:?}"
        );
        let k: KafkaConfig =
            serde_yaml::from_str("producer: {enable.idempotence: 'TRUE', acks: '-1'}").unwrap();
        assert!(k.problems().is_empty());
        // librdkafka's alias, its other spelling of true, and the secrets map.
        let k: KafkaConfig = serde_yaml::from_str(
            "producer: {request.required.acks: '1', enable.idempotence: '1'}\nclient_secrets: {acks: '0'}",
        )
        .unwrap();
        let items: Vec<String> = k.problems().into_iter().map(|(i, _)| i).collect();
        assert!(
            items.contains(&"kafka.producer.request.required.acks".to_string())
                && items.contains(&"kafka.client_secrets.acks".to_string())
                && !items.contains(&"kafka.producer.enable.idempotence".to_string()),
            "{items:?}"
        );
    }

    #[test]
    fn settings_that_weaken_security_are_named() {
        let mut k = KafkaConfig::default();
        assert!(k.insecure().is_empty());
        k.client
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        k.client.insert("sasl.mechanism".into(), "PLAIN".into());
        k.consumer
            .insert("enable.ssl.certificate.verification".into(), "false".into());
        assert_eq!(k.insecure().len(), 2, "{:?}", k.insecure());
        k.client
            .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        assert_eq!(k.insecure().len(), 1, "{:?}", k.insecure());
    }

    /// A topic taking smaller records than a batch lowers the batch size (with room for framing);
    /// a larger one, or a smaller batch size configured already, changes nothing.
    #[test]
    fn a_topic_s_smaller_limit_caps_the_batch_size() {
        let mut cfg = KafkaConfig::default();
        assert_eq!(cfg.cap_batch_size(1_048_588), None, "Kafka's default");
        assert_eq!(cfg.cap_batch_size(65_536), Some(65_024));
        assert_eq!(cfg.producer["batch.size"], "65024");
        assert_eq!(
            cfg.max_output_bytes(),
            1_000_000,
            "records are checked per topic"
        );
        assert_eq!(cfg.cap_batch_size(100_000), None, "already lower");
    }

    #[test]
    fn only_stage_consumers_and_the_run_producer_ask_for_statistics() {
        let cfg = KafkaConfig::default();
        assert!(consumer_config(&cfg, "g")
            .get("statistics.interval.ms")
            .is_none());
        assert_eq!(
            stage_consumer_config(&cfg, "g").get("statistics.interval.ms"),
            Some("5000")
        );
        assert!(producer_config(&cfg)
            .get("statistics.interval.ms")
            .is_none());
        assert_eq!(
            run_producer_config(&cfg).get("statistics.interval.ms"),
            Some("5000")
        );
        // An interval set for every client (e.g. "0": none) stands.
        let mut cfg = KafkaConfig::default();
        cfg.client
            .insert("statistics.interval.ms".into(), "0".into());
        assert_eq!(
            run_producer_config(&cfg).get("statistics.interval.ms"),
            Some("0")
        );
        assert_eq!(
            stage_consumer_config(&cfg, "g").get("statistics.interval.ms"),
            Some("0")
        );
    }
}
