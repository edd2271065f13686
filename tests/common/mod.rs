//! Shared harness for integration tests: the real broker and Redis from `deploy/local/stack.sh`,
//! random topic and group names per test, and helpers to produce and read records.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

use switchyard::config::{Config, Loaded};
use switchyard::event::CloudEvent;
use switchyard::kafka::{admin_config, producer_config, Input, Output, Producer};
use switchyard::topics;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Broker and Redis addresses: from the environment, or by starting the local stack.
pub fn stack() -> &'static (String, String) {
    static STACK: OnceLock<(String, String)> = OnceLock::new();
    STACK.get_or_init(|| {
        if let (Ok(b), Ok(r)) = (
            std::env::var("SWITCHYARD_KAFKA_BROKERS"),
            std::env::var("SWITCHYARD_REDIS_URL"),
        ) {
            return (b, r);
        }
        let status = std::process::Command::new(root().join("deploy/local/stack.sh"))
            .arg("up")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("deploy/local/stack.sh runs");
        assert!(status.success(), "deploy/local/stack.sh up failed");
        let env =
            std::fs::read_to_string(root().join(".stack/env")).expect(".stack/env exists after up");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")).map(str::to_string))
                .unwrap_or_else(|| panic!("{k} missing in .stack/env"))
        };
        (get("SWITCHYARD_KAFKA_BROKERS"), get("SWITCHYARD_REDIS_URL"))
    })
}

/// The local stack's directory (`SWITCHYARD_STACK_DIR`, else `.stack`).
pub fn stack_dir() -> PathBuf {
    std::env::var("SWITCHYARD_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".stack"))
}

/// A variable of the stack's env file (`deploy/local/stack.sh up`): from the environment, or the file.
fn stack_var(k: &str) -> String {
    if let Ok(u) = std::env::var(k) {
        if !u.is_empty() {
            return u;
        }
    }
    let _ = stack();
    let env = std::fs::read_to_string(stack_dir().join("env")).expect("the stack's env file");
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {k}=")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{k} in the stack's env file (deploy/local/stack.sh up)"))
}

/// The LLM stand-in's base URL (`http://host:port/v1`).
pub fn llm_base() -> String {
    stack_var("SWITCHYARD_LLM_BASE_URL")
}

/// The stack's Redis over TLS (`rediss://host:port/`).
pub fn redis_tls_url() -> String {
    stack_var("SWITCHYARD_REDIS_TLS_URL")
}

/// A plain Redis connection of the test's own (to look at or arrange keys behind the stores' back).
pub async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// The stack's test CA directory: `ca.crt`, and `server.crt`/`server.key` for 127.0.0.1.
/// A memo slot of a resource's hash (`fields` as read): (the id it holds, its input) for
/// `id_field`/`input_field` (`_mt1`/`_mp1`, `_dt2`/`_dp2`, ...), and whether the memo of that id
/// also has a key of its own (`<hash>:<apart>:<id>`).
pub async fn memo_slot(
    url: &str,
    hash: &str,
    (id_field, input_field, apart): (&str, &str, &str),
) -> (String, String, bool) {
    let mut r = redis_connection(url).await;
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(hash)
        .query_async(&mut r)
        .await
        .expect("HGETALL");
    let id = fields.get(id_field).cloned().unwrap_or_default();
    let input = fields.get(input_field).cloned().unwrap_or_default();
    let kept_apart: bool = redis::cmd("EXISTS")
        .arg(format!("{hash}:{apart}:{id}"))
        .query_async(&mut r)
        .await
        .expect("EXISTS");
    (id, input, kept_apart)
}

pub fn test_ca_dir() -> PathBuf {
    PathBuf::from(stack_var("SWITCHYARD_TEST_CA_DIR"))
}

/// A free loopback port (bound and released; good enough for a test's own servers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Kills the child process when the test ends, pass or fail.
pub struct Reaper(pub std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Redis of the test's own on `port` (so stopping it disturbs no other test), keeping its data in
/// `dir`: with `aof`, every write is in its append-only file first (a kill loses nothing);
/// without, a restart comes back empty.
pub fn start_redis(port: u16, dir: &Path, aof: bool) -> Reaper {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(if aof {
            ["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            ["--appendonly", "no", "--appendfsync", "no"]
        })
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Reaper(child)
}

/// Stages running in this test process (`switchyard::app::run`), stopped with [`Running::stop`].
pub struct Running {
    token: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), switchyard::app::AppError>>,
}

impl Running {
    /// Starts `stages` of `loaded` in this process.
    pub fn start(loaded: Loaded, stages: &[&str]) -> Running {
        let token = tokio_util::sync::CancellationToken::new();
        let stages = stages.iter().map(|s| s.to_string()).collect();
        let handle = tokio::spawn(switchyard::app::run(loaded, stages, token.clone()));
        Running { token, handle }
    }

    /// Stops the stages (drain and commit) and asserts they stopped cleanly.
    pub async fn stop(self) {
        self.token.cancel();
        self.handle
            .await
            .expect("join")
            .expect("stages stop cleanly");
    }

    /// How the stages ended, once they have (waits for it).
    pub async fn outcome(self) -> Result<(), switchyard::app::AppError> {
        self.handle.await.expect("join")
    }

    /// Whether the stages are still running (a stage error ends them).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }
}

pub fn suffix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A test environment: its own topics (prefixed), group prefix, and config file.
pub struct TestEnv {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub loaded: Loaded,
}

pub const LOGICAL_TOPICS: &[&str] = &[
    "events.deployments",
    "events.sla-breaches",
    "events.cost-thresholds",
    "switchyard.tasks",
    "switchyard.proposals",
    "switchyard.actions",
    "switchyard.approvals",
    "switchyard.results",
    "switchyard.audit",
    "switchyard.dlq",
    "switchyard.approval-decisions",
    "switchyard.llm-calls",
    "switchyard.tool-calls",
    "switchyard.workflows",
];

impl TestEnv {
    /// Creates topics `<prefix>.<name>` with `partitions` each, and a config routing the defaults.
    /// `extra_yaml` is appended to the config (extra sections, e.g. `routes:`), replacing the default
    /// routes when it defines `routes`.
    pub async fn new(partitions: i32, extra_yaml: &str) -> TestEnv {
        Self::with(partitions, "", extra_yaml).await
    }

    /// Like [`TestEnv::new`], with extra lines for the `kafka:` section (indented by two spaces).
    pub async fn with(partitions: i32, kafka_extra: &str, extra_yaml: &str) -> TestEnv {
        Self::build(partitions, kafka_extra, extra_yaml, false, &[]).await
    }

    /// Like [`TestEnv::with`], with topic settings (`config:` of its definition, which `topics
    /// apply` creates it with) for some logical topics: `(logical topic, setting, value)`.
    pub async fn with_topic_config(
        partitions: i32,
        extra_yaml: &str,
        topic_config: &[(&str, &str, &str)],
    ) -> TestEnv {
        Self::build(partitions, "", extra_yaml, false, topic_config).await
    }

    /// Like [`TestEnv::new`], with every topic switchyard writes that has a schema (tasks, results,
    /// proposals, actions, approvals, audit) in Avro; read them back with [`TestEnv::decode`].
    pub async fn avro(partitions: i32, extra_yaml: &str) -> TestEnv {
        Self::build(partitions, "", extra_yaml, true, &[]).await
    }

    async fn build(
        partitions: i32,
        kafka_extra: &str,
        extra_yaml: &str,
        avro: bool,
        topic_config: &[(&str, &str, &str)],
    ) -> TestEnv {
        switchyard::telemetry::init_logging(switchyard::telemetry::LogFormat::Human, "warn");
        let (brokers, redis) = stack().clone();
        let prefix = suffix();
        let dir = tempfile::tempdir().expect("tempdir");
        let topics_dir = dir.path().join("topics");
        std::fs::create_dir_all(&topics_dir).expect("mkdir");
        let catalog = switchyard::topics::TopicCatalog::load_dir(&root().join("topics"))
            .expect("repo topics load");
        for name in LOGICAL_TOPICS {
            let def = catalog.get(name).expect("default topic defined");
            let settings: String = topic_config
                .iter()
                .filter(|(t, _, _)| t == name)
                .map(|(_, k, v)| format!("  {k}: {v:?}\n"))
                .collect();
            let text = format!(
                "name: {prefix}.{name}\npartitions: {partitions}\nkey: {:?}\nencoding: {}\n{}{}",
                def.key,
                if def.encoding == switchyard::codec::Encoding::Avro
                    || (avro && name.starts_with("switchyard.") && def.schema.is_some())
                {
                    "avro"
                } else {
                    "json"
                },
                def.schema
                    .as_ref()
                    .map(|s| format!("schema: {s}\n"))
                    .unwrap_or_default(),
                if settings.is_empty() {
                    String::new()
                } else {
                    format!("config:\n{settings}")
                }
            );
            std::fs::write(topics_dir.join(format!("{name}.yaml")), text).expect("write topic");
        }
        // Kafka agents' own topics get definitions too (`topics apply` creates every topic the
        // config refers to).
        if let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(extra_yaml) {
            if let Some(agents) = v.get("agents").and_then(|a| a.as_mapping()) {
                for spec in agents.values() {
                    for field in ["request_topic", "reply_topic"] {
                        if let Some(t) = spec.get(field).and_then(|t| t.as_str()) {
                            std::fs::write(
                                topics_dir.join(format!("{t}.yaml")),
                                format!("name: {t}\npartitions: {partitions}\nkey: \"resource id\"\nencoding: json\n"),
                            )
                            .expect("write agent topic");
                        }
                    }
                }
            }
        }
        let mut routes = if extra_yaml.contains("routes:") {
            String::new()
        } else {
            default_routes(&prefix)
        };
        if !extra_yaml.contains("agents:") {
            routes.push_str(DEFAULT_AGENTS);
        }
        let yaml = format!(
            r#"
kafka:
  brokers: {brokers}
  group_prefix: {prefix}
  drain_timeout_ms: 5000
{kafka_extra}
  consumer:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
    fetch.wait.max.ms: "20"
redis:
  url: {redis}
  key_prefix: {prefix}
{http}
topics:
  dir: topics
  inputs: [{prefix}.events.deployments, {prefix}.events.sla-breaches, {prefix}.events.cost-thresholds]
  tasks: {prefix}.switchyard.tasks
  proposals: {prefix}.switchyard.proposals
  actions: {prefix}.switchyard.actions
  approvals: {prefix}.switchyard.approvals
  results: {prefix}.switchyard.results
  audit: {prefix}.switchyard.audit
  dlq: {prefix}.switchyard.dlq
  decisions: {prefix}.switchyard.approval-decisions
  llm_calls: {prefix}.switchyard.llm-calls
  tool_calls: {prefix}.switchyard.tool-calls
  workflows: {prefix}.switchyard.workflows
schemas_dir: {schemas}
{routes}
{extra_yaml}
"#,
            schemas = root().join("schemas").display(),
            http = if extra_yaml.contains("\nhttp:") {
                ""
            } else {
                "http:\n  enabled: false"
            },
        );
        let config_path = dir.path().join("switchyard.yaml");
        std::fs::write(&config_path, &yaml).expect("write config");
        let loaded =
            Config::load(&config_path).unwrap_or_else(|p| panic!("test config invalid: {p}"));
        let names = loaded.config.referenced_topics();
        let defs: Vec<_> = names.iter().filter_map(|n| loaded.topics.get(n)).collect();
        topics::apply(
            &admin_config(&loaded.config.kafka),
            &defs,
            Duration::from_secs(15),
        )
        .await
        .expect("topics apply");
        TestEnv {
            prefix,
            dir,
            config_path,
            loaded,
        }
    }

    /// Decodes a record as switchyard's readers do (JSON or Avro, by its schema fingerprint).
    pub fn decode(&self, rec: &Input) -> CloudEvent {
        switchyard::codec::decode(rec.view(), &self.loaded.schemas)
            .unwrap_or_else(|e| panic!("{}@{}: does not decode: {e}", rec.partition, rec.offset))
    }

    pub fn topic(&self, logical: &str) -> String {
        format!("{}.{logical}", self.prefix)
    }

    /// Sets a config of one of this environment's topics on the broker while it is in use, as an
    /// operator would (IncrementalAlterConfigs, through the stack venv's confluent-kafka: the Rust
    /// client here only speaks the older AlterConfigs, which tansu does not take).
    pub fn alter_topic_config(&self, logical: &str, key: &str, value: &str) {
        let script = r#"
import sys
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigEntry, AlterConfigOpType
brokers, topic, key, value = sys.argv[1:5]
admin = AdminClient({"bootstrap.servers": brokers})
entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
for f in admin.incremental_alter_configs([ConfigResource("topic", topic, incremental_configs=[entry])]).values():
    f.result(15)
"#;
        let out = std::process::Command::new(stack_dir().join("venv/bin/python"))
            .args(["-c", script])
            .args([
                self.loaded.config.kafka.brokers.as_str(),
                &self.topic(logical),
                key,
                value,
            ])
            .output()
            .expect("the stack venv's python runs");
        assert!(
            out.status.success(),
            "altering {logical}'s {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn producer(&self) -> Producer {
        Producer::new(&producer_config(&self.loaded.config.kafka)).expect("producer")
    }

    /// Starts `stages` of this environment's config in this process.
    pub fn start(&self, stages: &[&str]) -> Running {
        Running::start(self.loaded.clone(), stages)
    }

    /// Sends one structured JSON event keyed by its subject.
    pub async fn publish_one(&self, logical: &str, id: &str, ty: &str, subject: &str, data: Value) {
        self.publish(logical, &[event(id, ty, subject, data)]).await
    }

    /// The steps every end-to-end story starts with: `resource` completes deployment `d1` (v41 →
    /// v42), then breaches its availability SLO (`s1`, observed 97.0 of 99.9, owner team-pay).
    /// Each waits for its result, as the real systems would be seconds apart (events on different
    /// topics have no order between them); `results_before` counts results already written.
    pub async fn deployment_then_breach(&self, resource: &str, results_before: usize) {
        self.publish_one(
            "events.deployments",
            "d1",
            "deployment.completed",
            resource,
            serde_json::json!({"service": resource, "version": "v42", "previous_version": "v41",
                               "environment": "production"}),
        )
        .await;
        self.read(
            "switchyard.results",
            results_before + 1,
            Duration::from_secs(40),
        )
        .await;
        self.publish_one(
            "events.sla-breaches",
            "s1",
            "sla.breached",
            resource,
            serde_json::json!({"service": resource, "slo": "availability", "objective": 99.9,
                               "observed": 97.0, "owner": "team-pay"}),
        )
        .await;
        self.read(
            "switchyard.results",
            results_before + 2,
            Duration::from_secs(40),
        )
        .await;
    }

    /// Sends structured JSON events keyed by subject.
    pub async fn publish(&self, logical: &str, events: &[CloudEvent]) {
        let p = self.producer();
        for ev in events {
            let out = switchyard::cmd::publish::record_for(
                &self.loaded,
                &self.topic(logical),
                ev,
                switchyard::cmd::publish::Mode::Structured,
            )
            .expect("encode");
            p.send(&out).await.expect("send");
        }
    }

    pub async fn send_raw(
        &self,
        logical: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut out = Output::new(self.topic(logical), key, payload.to_vec());
        for (k, v) in headers {
            out = out.header(*k, *v);
        }
        self.producer().send(&out).await.expect("send raw");
    }

    /// Writes `ev` (structured JSON) with the Kafka timestamp `timestamp_ms`: a record written
    /// long ago, as a consumer reading the topic from its start meets it.
    pub async fn publish_at(&self, logical: &str, ev: &CloudEvent, timestamp_ms: i64) {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = producer_config(&self.loaded.config.kafka)
            .create()
            .expect("producer");
        let topic = self.topic(logical);
        let payload = serde_json::to_vec(ev).expect("json");
        let key = ev.subject.clone().unwrap_or_default();
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .timestamp(timestamp_ms),
                Duration::from_secs(30),
            )
            .await
            .expect("send at");
    }

    /// Writes a record with one header whose name is raw bytes (librdkafka's C API takes any:
    /// a non-Java producer can write a name that is not UTF-8, which rdkafka's Rust API cannot).
    pub fn send_with_raw_header_name(
        &self,
        logical: &str,
        key: &str,
        payload: &[u8],
        name: &[u8],
        value: &[u8],
    ) {
        use rdkafka::bindings as rd;
        use rdkafka::producer::{BaseProducer, Producer as _};
        let producer: BaseProducer = producer_config(&self.loaded.config.kafka)
            .create()
            .expect("producer");
        let topic = std::ffi::CString::new(self.topic(logical)).expect("topic");
        let name = std::ffi::CString::new(name).expect("a name without NUL");
        let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
        let mem = |b: &[u8]| rd::rd_kafka_vu_s__bindgen_ty_1 {
            mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: b.as_ptr() as *mut std::os::raw::c_void,
                size: b.len(),
            },
        };
        let vus = [
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    cstr: topic.as_ptr(),
                },
            ),
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY,
                mem(key.as_bytes()),
            ),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE, mem(payload)),
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    i: rd::RD_KAFKA_MSG_F_COPY as std::os::raw::c_int,
                },
            ),
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                        name: name.as_ptr(),
                        val: value.as_ptr() as *const std::os::raw::c_void,
                        size: value.len() as isize,
                    },
                },
            ),
        ];
        // SAFETY: every pointer is to memory that outlives the call (the record is copied:
        // RD_KAFKA_MSG_F_COPY, headers are always copied); the producer is live.
        let err = unsafe {
            rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len())
        };
        assert!(err.is_null(), "produceva refused the record");
        producer
            .flush(Duration::from_secs(10))
            .expect("the record is written");
    }

    /// Reads records of a topic from the beginning until `n` arrived or `timeout` passed.
    pub async fn read(&self, logical: &str, n: usize, timeout: Duration) -> Vec<Input> {
        read_topic(
            &self.loaded.config.kafka.brokers,
            &self.topic(logical),
            n,
            timeout,
        )
        .await
    }

    /// Reads the audit topic from the beginning until `n` decision records (not the batches' seals)
    /// arrived or `timeout` passed; returns the decision records.
    pub async fn audit(&self, n: usize, timeout: Duration) -> Vec<Input> {
        read_topic_matching(
            &self.loaded.config.kafka.brokers,
            &self.topic("switchyard.audit"),
            n,
            timeout,
            |r| !is_seal(r),
        )
        .await
    }

    /// Reads the whole audit topic until at least `n` decision records arrived and every one of
    /// them is listed by a seal that arrived too (or `timeout` passed); returns the verification
    /// of everything read.
    pub async fn verified_audit(
        &self,
        n: usize,
        timeout: Duration,
    ) -> switchyard::audit::Verification {
        let recs = read_topic_until(
            &self.loaded.config.kafka.brokers,
            &self.topic("switchyard.audit"),
            timeout,
            move |got: &[Input]| {
                // Seals follow their entries: only a seal just read can complete the picture.
                if !got.last().is_some_and(is_seal) {
                    return false;
                }
                let v = switchyard::audit::verify(&audit_records(got));
                v.records >= n && v.problems.is_empty()
            },
        )
        .await;
        switchyard::audit::verify(&audit_records(&recs))
    }

    /// Committed offsets of a stage's consumer group, per partition of a topic.
    pub async fn committed(
        &self,
        stage: &str,
        logical: &str,
        partitions: i32,
    ) -> BTreeMap<i32, i64> {
        let brokers = self.loaded.config.kafka.brokers.clone();
        let group = format!("{}.{stage}", self.prefix);
        let topic = self.topic(logical);
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let got = c
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            got.elements()
                .iter()
                .map(|e| {
                    (
                        e.partition(),
                        if let Offset::Offset(o) = e.offset() {
                            o
                        } else {
                            -1
                        },
                    )
                })
                .collect()
        })
        .await
        .expect("join")
    }
}

pub async fn read_topic(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Input> {
    read_topic_matching(brokers, topic, n, timeout, |_| true).await
}

/// Whether a record of the audit topic is a batch's seal (not a decision).
pub fn is_seal(rec: &Input) -> bool {
    event_of(rec).ty == switchyard::audit::SEAL_TYPE
}

/// Reads a topic from the beginning until `n` records for which `keep` holds arrived, or `timeout`
/// passed; returns those records.
pub async fn read_topic_matching(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
    keep: fn(&Input) -> bool,
) -> Vec<Input> {
    let mut kept = 0;
    let all = read_topic_until(brokers, topic, timeout, move |got: &[Input]| {
        kept += got.last().is_some_and(keep) as usize;
        kept >= n
    })
    .await;
    all.into_iter().filter(keep).collect()
}

/// Reads a topic from the beginning until `done` holds for everything read so far, or `timeout`
/// passed; returns every record read. `done` is asked once before the first record and then after
/// each record.
pub async fn read_topic_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Input]) -> bool + Send + 'static,
) -> Vec<Input> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .create()
            .expect("consumer");
        let md = c
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)
                    .expect("tpl");
            }
        }
        c.assign(&tpl).expect("assign");
        let name: Arc<str> = Arc::from(topic.as_str());
        let start = Instant::now();
        let mut out = Vec::new();
        let mut finished = done(&out);
        while !finished && start.elapsed() < timeout {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                out.push(Input::from_message(&m, name.clone()));
                finished = done(&out);
            }
        }
        out
    })
    .await
    .expect("join")
}

/// The audit topic's records as the verifier takes them.
pub fn audit_records(recs: &[Input]) -> Vec<switchyard::audit::AuditRecord> {
    recs.iter()
        .map(|r| switchyard::audit::AuditRecord::new(r.partition, r.offset, r.payload.to_vec()))
        .collect()
}

/// Decodes a record written by switchyard (structured JSON CloudEvent).
pub fn event_of(rec: &Input) -> CloudEvent {
    serde_json::from_slice(&rec.payload).unwrap_or_else(|e| {
        panic!(
            "not a JSON CloudEvent ({e}): {}",
            String::from_utf8_lossy(&rec.payload)
        )
    })
}

pub fn header<'a>(rec: &'a Input, name: &str) -> Option<&'a str> {
    rec.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The default agents section (built-ins as in deploy/switchyard.yaml).
pub const DEFAULT_AGENTS: &str = r#"
agents:
  deploy-guard:
    kind: builtin
    reads: [sla, deployment, last_completed_deployment]
    writes: [deployment, last_completed_deployment]
    actions: [deployment.hold]
  sla-responder:
    kind: builtin
    reads: [sla, last_completed_deployment, deployment]
    writes: [sla, suspect_deployment]
    actions: [rollback, page]
  cost-guard:
    kind: builtin
    reads: [cost, sla]
    writes: [cost]
    actions: [scale_down]
  # Stands for an external agent whose proposals tests write to the proposals topic directly; no
  # route sends it tasks.
  tester:
    kind: http
    url: http://127.0.0.1:9/unused
    actions: [rollback, page, restart, scale_down, scale_up]
"#;

pub fn default_routes(_prefix: &str) -> String {
    // Routes without topic filters so they apply to the prefixed input topics.
    r#"
routes:
  - name: deployments
    types: ["deployment.*"]
    agents: [deploy-guard]
    priority: 50
  - name: sla
    types: [sla.breached, sla.recovered]
    agents: [sla-responder]
    priority: 100
  - name: cost
    types: [cost.threshold_exceeded]
    when:
      - { field: data.spend, op: gt, value: 0 }
    agents: [cost-guard]
    priority: 10
"#
    .to_string()
}

pub fn event(id: &str, ty: &str, subject: &str, data: Value) -> CloudEvent {
    CloudEvent::new(id, "test", ty)
        .with_subject(subject)
        .with_data(data)
        .with_time_now()
}

pub fn data_of(ev: &CloudEvent) -> &Value {
    ev.data.as_ref().expect("event has data")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

/// Runs the switchyard binary with the env's config and `args`; asserts it succeeded; its stdout.
pub fn cli(env: &TestEnv, args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(["--config", env.config_path.to_str().expect("path")])
        .args(args)
        .output()
        .expect("switchyard runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

pub fn config_path(env: &TestEnv) -> &Path {
    &env.config_path
}

/// The task a `switchyard.tasks` record carries.
pub fn task_of(rec: &Input) -> switchyard::records::TaskData {
    serde_json::from_value(data_of(&event_of(rec)).clone()).expect("task data")
}

/// Id of the input event a task record was made for.
pub fn task_event_id(rec: &Input) -> String {
    task_of(rec).event["id"]
        .as_str()
        .expect("event id")
        .to_string()
}

/// Events `id_prefix-<n>` for n in `range`, spread over `resources` resources.
pub fn numbered_events(
    id_prefix: &str,
    ty: &str,
    range: std::ops::Range<usize>,
    resources: usize,
) -> Vec<CloudEvent> {
    range
        .map(|n| {
            event(
                &format!("{id_prefix}-{n}"),
                ty,
                &format!("svc-{}", n % resources),
                serde_json::json!({"n": n}),
            )
        })
        .collect()
}

/// Queues llmock behaviours (`POST /_llmock/scenario`). Tests match them by model name, so they
/// share one stand-in.
pub async fn scenario(behaviors: Value) {
    let admin = llm_base().trim_end_matches("/v1").to_string();
    let r = reqwest::Client::new()
        .post(format!("{admin}/_llmock/scenario"))
        .json(&serde_json::json!({ "behaviors": behaviors }))
        .send()
        .await
        .expect("llmock answers");
    assert!(
        r.status().is_success(),
        "scenario refused: {}",
        r.text().await.unwrap_or_default()
    );
}

/// The request bodies llmock received for `model`, oldest first (its request journal).
pub async fn llm_requests(model: &str) -> Vec<Value> {
    let admin = llm_base().trim_end_matches("/v1").to_string();
    let v: Value = reqwest::Client::new()
        .get(format!("{admin}/_llmock/requests"))
        .send()
        .await
        .expect("llmock answers")
        .json()
        .await
        .expect("journal is JSON");
    v["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["model"] == model)
        .map(|r| r["body"].clone())
        .collect()
}

/// A small MCP server (deploy/local/mcp_server.py, the official `mcp` SDK) on a free port; its
/// calls are appended to `calls` as JSON lines. Stopped when dropped.
pub fn start_mcp(calls: &Path) -> (Reaper, u16) {
    start_script("mcp_server.py", &[calls.as_os_str()])
}

/// An OTLP/HTTP trace receiver (deploy/local/otlp_receiver.py, the official `opentelemetry-proto`
/// definitions) on a free port; every span it receives is appended to `spans` as a JSON line.
pub fn start_otlp(spans: &Path) -> (Reaper, u16) {
    start_script("otlp_receiver.py", &[spans.as_os_str()])
}

/// An HTTP agent over HTTPS (deploy/local/https_agent.py), its certificate signed by the stack's
/// test CA; each call appended to `calls` as a JSON line; it answers with one `page` proposal.
pub fn start_https_agent(calls: &Path) -> (Reaper, u16) {
    let tls = test_ca_dir();
    start_script("https_agent.py", &[tls.as_os_str(), calls.as_os_str()])
}

/// A Kafka-compatible broker reached over TLS only (deploy/local/kafka_tls.py: a tansu broker of its
/// own behind a TLS terminator with the stack's test CA); its bootstrap port.
pub fn start_kafka_tls() -> (Reaper, u16) {
    let tls = test_ca_dir();
    start_script("kafka_tls.py", &[tls.as_os_str()])
}

/// A broker that demands SASL over TLS (deploy/local/kafka_sasl.py: PLAIN, SCRAM-SHA-256 and
/// SCRAM-SHA-512 for `users`, "name:password"); its port. Its journal of authentications is
/// `kafka_sasl_journal(port)`.
pub fn start_kafka_sasl(users: &[&str]) -> (Reaper, u16) {
    let tls = test_ca_dir();
    let mut args: Vec<&std::ffi::OsStr> = vec![tls.as_os_str()];
    args.extend(users.iter().map(std::ffi::OsStr::new));
    start_script("kafka_sasl.py", &args)
}

/// What the SASL front of `port` recorded: one line per connection, authenticated or refused.
pub fn kafka_sasl_journal(port: u16) -> String {
    let dir = test_ca_dir();
    let parent = dir.parent().expect("the CA dir has a parent");
    std::fs::read_to_string(parent.join(format!("kafka-sasl-{port}.log"))).unwrap_or_default()
}

/// A local Redis Cluster of three masters (deploy/local/redis_cluster.py), once every slot is
/// served; its seed node's port.
pub fn start_redis_cluster(dir: &Path) -> (Reaper, u16) {
    let (reaper, port) = start_script("redis_cluster.py", &[dir.as_os_str()]);
    // Every node agrees (the seed saying ok is not enough: the others may still be joining).
    for _ in 0..300 {
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "check", &format!("127.0.0.1:{port}")])
            .output();
        if out.is_ok_and(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            o.status.success()
                && text.contains("All 16384 slots covered")
                && text.contains("All nodes agree")
        }) {
            return (reaper, port);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the Redis Cluster on port {port} did not become ready: {}",
        std::fs::read_to_string(dir.join("cluster.log")).unwrap_or_default()
    );
}

/// `deploy/local/<script> PORT ARGS…` in the stack's venv, once it accepts connections.
fn start_script(script: &str, args: &[&std::ffi::OsStr]) -> (Reaper, u16) {
    let port = free_port();
    let python = stack_dir().join("venv/bin/python");
    let child = std::process::Command::new(python)
        .arg(root().join("deploy/local").join(script))
        .arg(port.to_string())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let reaper = Reaper(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (reaper, port);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{script} did not start on port {port}");
}

/// The JSON lines of a file (none when it does not exist).
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A `switchyard run --stages STAGES` process of this build on the stack, its logs at `error`;
/// killed when the returned [`Reaper`] drops.
pub fn spawn_run(config: &Path, stages: &str) -> Reaper {
    let (brokers, redis) = stack().clone();
    Reaper(
        std::process::Command::new(bin())
            .args([
                "--config",
                config.to_str().expect("config path"),
                "run",
                "--stages",
                stages,
            ])
            .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
            .env("SWITCHYARD_REDIS_URL", &redis)
            .env("RUST_LOG", "error")
            .spawn()
            .expect("spawn switchyard"),
    )
}
