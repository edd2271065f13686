//! Configuration: one YAML file, environment overrides, and validation that reports every problem.
//!
//! Every section has defaults, so an empty file is a valid (if useless) config. Relative paths
//! (`topics.dir`, `schemas_dir`) are resolved against the directory of the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::agents::AgentSpec;
use crate::governance::GovernanceConfig;
use crate::resolve::ResolveConfig;
use crate::route::{RouteSpec, Router};
use crate::schema::SchemaRegistry;
use crate::topics::TopicCatalog;

/// Environment variable overriding `kafka.brokers`.
pub const ENV_BROKERS: &str = "SWITCHYARD_KAFKA_BROKERS";
/// Environment variable overriding `redis.url`.
pub const ENV_REDIS_URL: &str = "SWITCHYARD_REDIS_URL";
/// Environment variable overriding `http.listen`.
pub const ENV_HTTP_LISTEN: &str = "SWITCHYARD_HTTP_LISTEN";
/// Environment variable overriding `governance.approvals.token`.
pub const ENV_APPROVAL_TOKEN: &str = "SWITCHYARD_APPROVAL_TOKEN";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection, consumer-group and client settings.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Redis connection (shared context, state of stages).
    #[serde(default)]
    pub redis: RedisConfig,
    /// The HTTP endpoint serving metrics and health.
    #[serde(default)]
    pub http: HttpConfig,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// Topic names and where their definitions live.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Directory of Avro schemas (`*.avsc`).
    #[serde(default = "default_schemas_dir")]
    pub schemas_dir: PathBuf,
    /// Which stages `switchyard run` starts.
    #[serde(default)]
    pub stages: StagesConfig,
    /// Routing rules: events to agents.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Agents by name.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentSpec>,
    /// What the shared context keeps.
    #[serde(default)]
    pub context: ContextConfig,
    /// Conflict-resolution rules per action type.
    #[serde(default)]
    pub resolve: ResolveConfig,
    /// Access policy, budgets and the approval gate.
    #[serde(default)]
    pub governance: GovernanceConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    /// A resource's facts expire this long after its last write.
    #[serde(default = "default_week")]
    pub ttl_seconds: u64,
    /// Recent events kept per resource.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// How long a task's outcome is kept; a redelivery within this window does not call the agent again.
    #[serde(default = "default_week")]
    pub outcome_ttl_seconds: u64,
}

impl ContextConfig {
    pub fn retention(&self) -> crate::context::Retention {
        crate::context::Retention {
            ttl_seconds: self.ttl_seconds,
            max_events: self.max_events,
            outcome_ttl_seconds: self.outcome_ttl_seconds,
        }
    }
}

fn default_week() -> u64 {
    7 * 24 * 3600
}
fn default_max_events() -> usize {
    50
}

#[derive(Debug, Clone, Deserialize)]
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
    /// Extra librdkafka settings for consumers, passed through verbatim (e.g. `session.timeout.ms`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka settings for producers, passed through verbatim (e.g. `linger.ms`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// Records with a larger payload go to the dead-letter topic with reason `too_large`.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Records a stage holds in flight at once; when reached, consumption pauses (back-pressure).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// On partition revoke and on shutdown, how long to wait for in-flight records before committing
    /// what is done.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Overridden by `SWITCHYARD_REDIS_URL`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key switchyard writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address. Overridden by `SWITCHYARD_HTTP_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `switchyard=debug,rdkafka=warn`. `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Directory of topic definitions (one YAML file per topic).
    #[serde(default = "default_topics_dir")]
    pub dir: PathBuf,
    /// Input topics the route stage consumes.
    #[serde(default = "default_inputs")]
    pub inputs: Vec<String>,
    #[serde(default = "default_tasks")]
    pub tasks: String,
    #[serde(default = "default_proposals")]
    pub proposals: String,
    #[serde(default = "default_actions")]
    pub actions: String,
    #[serde(default = "default_approvals")]
    pub approvals: String,
    #[serde(default = "default_results")]
    pub results: String,
    #[serde(default = "default_audit")]
    pub audit: String,
    #[serde(default = "default_dlq")]
    pub dlq: String,
    /// Approval decisions arriving from other systems (`{"approval_id", "decision", "by", "why"}`).
    #[serde(default = "default_decisions")]
    pub decisions: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageToggle {
    /// Whether `switchyard run` starts this stage (the `--stages` flag overrides).
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for StageToggle {
    fn default() -> Self {
        StageToggle { enabled: true }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StagesConfig {
    /// Input events → tasks.
    #[serde(default)]
    pub route: StageToggle,
    /// Tasks → agents → proposals and results.
    #[serde(default)]
    pub agents: StageToggle,
    /// Proposals → conflict resolution and governance → actions and approval requests; also applies
    /// decisions from the decisions topic and expires approvals.
    #[serde(default)]
    pub resolve: StageToggle,
}

fn yes() -> bool {
    true
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
fn default_max_in_flight() -> usize {
    2000
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_key_prefix() -> String {
    "switchyard".into()
}
fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_topics_dir() -> PathBuf {
    "topics".into()
}
fn default_schemas_dir() -> PathBuf {
    "schemas".into()
}
fn default_inputs() -> Vec<String> {
    [
        "events.deployments",
        "events.sla-breaches",
        "events.cost-thresholds",
    ]
    .map(String::from)
    .to_vec()
}
fn default_tasks() -> String {
    "switchyard.tasks".into()
}
fn default_proposals() -> String {
    "switchyard.proposals".into()
}
fn default_actions() -> String {
    "switchyard.actions".into()
}
fn default_approvals() -> String {
    "switchyard.approvals".into()
}
fn default_results() -> String {
    "switchyard.results".into()
}
fn default_audit() -> String {
    "switchyard.audit".into()
}
fn default_dlq() -> String {
    "switchyard.dlq".into()
}
fn default_decisions() -> String {
    "switchyard.approval-decisions".into()
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_yaml::from_str("{}").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    KafkaConfig,
    RedisConfig,
    HttpConfig,
    LogConfig,
    TopicsConfig,
    ContextConfig
);

/// One problem in a config file, naming the item it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub item: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.item, self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone)]
pub struct Problems {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem{}:",
            self.file,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A config with everything it refers to loaded and checked.
#[derive(Clone)]
pub struct Loaded {
    pub config: Config,
    /// Directory the relative paths were resolved against.
    pub base_dir: PathBuf,
    pub schemas: SchemaRegistry,
    pub topics: TopicCatalog,
}

impl Config {
    /// Reads, overrides from the environment, and validates a config file; collects every problem.
    pub fn load(path: &Path) -> Result<Loaded, Problems> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Problems {
            file: file.clone(),
            problems: vec![Problem {
                item: "file".into(),
                message: format!("cannot be read: {e}"),
            }],
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_yaml(&text, &base_dir, |k| std::env::var(k).ok())
            .map_err(|problems| Problems { file, problems })
    }

    /// Parses and validates YAML text. `env` supplies environment overrides (injected for tests).
    pub fn from_yaml(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Loaded, Vec<Problem>> {
        let mut problems = Vec::new();
        let doc: serde_yaml::Value = match serde_yaml::from_str(text) {
            Ok(serde_yaml::Value::Null) => serde_yaml::Value::Mapping(Default::default()),
            Ok(v) => v,
            Err(e) => {
                return Err(vec![Problem {
                    item: "file".into(),
                    message: format!("is not valid YAML: {e}"),
                }])
            }
        };
        let serde_yaml::Value::Mapping(map) = doc else {
            return Err(vec![Problem {
                item: "file".into(),
                message: "top level must be a mapping of sections".into(),
            }]);
        };
        // Each section is parsed on its own so one bad section does not hide problems in the others.
        let mut config = Config {
            schemas_dir: default_schemas_dir(),
            ..Config::default()
        };
        for (k, v) in map {
            let key = k.as_str().unwrap_or("?").to_string();
            match key.as_str() {
                "kafka" => section(&key, v, &mut problems, &mut config.kafka),
                "redis" => section(&key, v, &mut problems, &mut config.redis),
                "http" => section(&key, v, &mut problems, &mut config.http),
                "log" => section(&key, v, &mut problems, &mut config.log),
                "topics" => section(&key, v, &mut problems, &mut config.topics),
                "schemas_dir" => section(&key, v, &mut problems, &mut config.schemas_dir),
                "stages" => section(&key, v, &mut problems, &mut config.stages),
                "context" => section(&key, v, &mut problems, &mut config.context),
                "resolve" => section(&key, v, &mut problems, &mut config.resolve),
                "governance" => section(&key, v, &mut problems, &mut config.governance),
                "agents" => match v {
                    serde_yaml::Value::Mapping(items) => {
                        for (name, item) in items {
                            let name = name.as_str().unwrap_or("?").to_string();
                            match serde_yaml::from_value::<AgentSpec>(item) {
                                Ok(a) => {
                                    config.agents.insert(name, a);
                                }
                                Err(e) => problems.push(Problem {
                                    item: format!("agents.{name}"),
                                    message: e.to_string(),
                                }),
                            }
                        }
                    }
                    serde_yaml::Value::Null => {}
                    _ => problems.push(Problem {
                        item: "agents".into(),
                        message: "must be a mapping of agent name to agent".into(),
                    }),
                },
                "routes" => match v {
                    serde_yaml::Value::Sequence(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            let name = item
                                .get("name")
                                .and_then(|n| n.as_str())
                                .map(|n| format!(" ({n})"))
                                .unwrap_or_default();
                            match serde_yaml::from_value::<RouteSpec>(item) {
                                Ok(r) => config.routes.push(r),
                                Err(e) => problems.push(Problem {
                                    item: format!("routes[{i}]{name}"),
                                    message: e.to_string(),
                                }),
                            }
                        }
                    }
                    serde_yaml::Value::Null => {}
                    _ => problems.push(Problem {
                        item: "routes".into(),
                        message: "must be a list of routes".into(),
                    }),
                },
                other => problems.push(Problem {
                    item: other.to_string(),
                    message: "unknown section (expected one of kafka, redis, http, log, topics, schemas_dir, stages, routes, agents, context, resolve, governance)".into(),
                }),
            }
        }
        if let Some(b) = env(ENV_BROKERS).filter(|s| !s.is_empty()) {
            config.kafka.brokers = b;
        }
        if let Some(u) = env(ENV_REDIS_URL).filter(|s| !s.is_empty()) {
            config.redis.url = u;
        }
        if let Some(l) = env(ENV_HTTP_LISTEN).filter(|s| !s.is_empty()) {
            config.http.listen = l;
        }
        if let Some(t) = env(ENV_APPROVAL_TOKEN).filter(|s| !s.is_empty()) {
            config.governance.approvals.token = Some(t);
        }
        let loaded = config.check(base_dir, &mut problems);
        if problems.is_empty() {
            loaded.ok_or_else(Vec::new)
        } else {
            Err(problems)
        }
    }

    /// Semantic checks across sections; returns the loaded config when the referenced files load.
    fn check(self, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<Loaded> {
        let mut p = |item: &str, message: String| {
            problems.push(Problem {
                item: item.to_string(),
                message,
            })
        };
        if self.kafka.brokers.trim().is_empty() {
            p("kafka.brokers", "must name at least one broker".into());
        }
        for b in self
            .kafka
            .brokers
            .split(',')
            .filter(|b| !b.trim().is_empty())
        {
            if !b.trim().contains(':') {
                p("kafka.brokers", format!("{b:?} has no port (host:port)"));
            }
        }
        if self.kafka.group_prefix.is_empty() {
            p("kafka.group_prefix", "must not be empty".into());
        }
        if self.kafka.max_in_flight == 0 {
            p("kafka.max_in_flight", "must be at least 1".into());
        }
        if self.kafka.max_record_bytes < 1024 {
            p("kafka.max_record_bytes", "must be at least 1024".into());
        }
        for (k, v) in self.kafka.consumer.iter().chain(&self.kafka.producer) {
            if k.trim().is_empty() || v.is_empty() {
                p(
                    "kafka.consumer/producer",
                    format!("setting {k:?} has an empty name or value"),
                );
            }
        }
        for reserved in ["enable.auto.offset.store", "group.id"] {
            if self.kafka.consumer.contains_key(reserved) {
                p(
                    &format!("kafka.consumer.{reserved}"),
                    "is set by switchyard itself (at-least-once depends on it) and cannot be overridden".into(),
                );
            }
        }
        match url_scheme(&self.redis.url) {
            Some("redis" | "rediss" | "unix" | "redis+unix") => {}
            _ => p(
                "redis.url",
                format!("{:?} is not a redis:// URL", self.redis.url),
            ),
        }
        if self.http.enabled && self.http.listen.parse::<SocketAddr>().is_err() {
            p(
                "http.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9464",
                    self.http.listen
                ),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p(
                "log.level",
                format!("{:?} is not a valid filter", self.log.level),
            );
        }
        if self.topics.inputs.is_empty() {
            p("topics.inputs", "must name at least one input topic".into());
        }
        if let Err(route_problems) = Router::new(&self.routes) {
            for rp in route_problems {
                p(&rp.route, rp.message);
            }
        }
        for (item, m) in self.governance.problems() {
            p(&item, m);
        }
        for (name, a) in &self.agents {
            for m in a.problems(name) {
                p(&format!("agents.{name}"), m);
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            for a in &r.agents {
                if !self.agents.contains_key(a) {
                    p(
                        &format!("routes[{i}] ({})", r.name),
                        format!("agent {a:?} is not declared under agents"),
                    );
                }
            }
            for t in &r.topics {
                if !self.topics.inputs.contains(t) {
                    p(
                        &format!("routes[{i}] ({})", r.name),
                        format!("topic {t:?} is not one of topics.inputs"),
                    );
                }
            }
        }
        let schemas_dir = base_dir.join(&self.schemas_dir);
        let schemas = match SchemaRegistry::load_dir(&schemas_dir) {
            Ok(s) => Some(s),
            Err(errs) => {
                for e in errs {
                    p("schemas_dir", e.to_string());
                }
                None
            }
        };
        let topics_dir = base_dir.join(&self.topics.dir);
        let catalog = match TopicCatalog::load_dir(&topics_dir) {
            Ok(c) => Some(c),
            Err(errs) => {
                for (item, message) in errs {
                    p(&item, message);
                }
                None
            }
        };
        if let (Some(schemas), Some(catalog)) = (&schemas, &catalog) {
            for name in self.topics.all() {
                match catalog.get(name) {
                    None => p(
                        "topics",
                        format!(
                            "topic {name:?} has no definition in {}",
                            topics_dir.display()
                        ),
                    ),
                    Some(def) => {
                        if let Some(s) = &def.schema {
                            if schemas.get(s).is_none() {
                                p(
                                    &format!("topic {name}"),
                                    format!("schema {s:?} is not in {}", schemas_dir.display()),
                                );
                            }
                        }
                    }
                }
            }
        }
        Some(Loaded {
            config: self,
            base_dir: base_dir.to_path_buf(),
            schemas: schemas?,
            topics: catalog?,
        })
    }
}

impl TopicsConfig {
    /// Every topic switchyard reads or writes.
    pub fn all(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.inputs.iter().map(String::as_str).collect();
        v.extend([
            self.tasks.as_str(),
            self.proposals.as_str(),
            self.actions.as_str(),
            self.approvals.as_str(),
            self.results.as_str(),
            self.audit.as_str(),
            self.dlq.as_str(),
            self.decisions.as_str(),
        ]);
        v
    }
}

fn url_scheme(url: &str) -> Option<&str> {
    url.split_once("://").map(|(s, _)| s)
}

fn section<T: DeserializeOwned>(
    key: &str,
    v: serde_yaml::Value,
    problems: &mut Vec<Problem>,
    out: &mut T,
) {
    match serde_yaml::from_value::<T>(v) {
        Ok(t) => *out = t,
        Err(e) => problems.push(Problem {
            item: key.to_string(),
            message: e.to_string(),
        }),
    }
}
