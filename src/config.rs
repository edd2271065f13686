//! Configuration: one YAML file (or the shipped default compiled into the binary), environment and
//! command-line overrides, and validation that reports every problem, each naming its path.
//!
//! This module only composes: every section is owned by the module it configures (`kafka:` by
//! [`crate::kafka`], `agents:` by [`crate::agents`], ...). Every section has defaults, so an empty
//! file is a valid (if useless) config. Relative paths (`topics.dir`, `schemas_dir`) are resolved
//! against the directory of the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::agents::{AgentSpec, COMMON_FIELDS};
use crate::context::ContextConfig;
use crate::governance::GovernanceConfig;
use crate::http::HttpConfig;
use crate::kafka::KafkaConfig;
use crate::resolve::ResolveConfig;
use crate::route::{RouteSpec, Router};
use crate::schema::SchemaRegistry;
use crate::secret::Secret;
use crate::store::RedisConfig;
use crate::telemetry::LogConfig;
use crate::topics::{TopicCatalog, TopicsConfig};

/// Environment variable overriding `kafka.brokers` (the `-b/--brokers` flag wins over it).
pub const ENV_BROKERS: &str = "SWITCHYARD_KAFKA_BROKERS";
/// Environment variable setting `kafka.client."sasl.password"` (a Kafka password kept out of the
/// config file: a Kubernetes secret as an environment variable).
pub const ENV_KAFKA_SASL_PASSWORD: &str = "SWITCHYARD_KAFKA_SASL_PASSWORD";
/// Environment variable overriding `redis.url` (the `--redis` flag wins over it).
pub const ENV_REDIS_URL: &str = "SWITCHYARD_REDIS_URL";
/// Environment variable overriding `http.listen`.
pub const ENV_HTTP_LISTEN: &str = "SWITCHYARD_HTTP_LISTEN";
/// Environment variable setting `http.admin_listen`.
pub const ENV_HTTP_ADMIN_LISTEN: &str = "SWITCHYARD_HTTP_ADMIN_LISTEN";
/// Environment variable overriding `governance.approvals.token`.
pub const ENV_APPROVAL_TOKEN: &str = "SWITCHYARD_APPROVAL_TOKEN";
/// Environment variable overriding `http.metrics_token`.
pub const ENV_METRICS_TOKEN: &str = "SWITCHYARD_METRICS_TOKEN";
/// Environment variable overriding `http.ingest.token` (the default ingest token).
pub const ENV_INGEST_TOKEN: &str = "SWITCHYARD_INGEST_TOKEN";
/// When set, the token of a user `admin` (role admin, every tenant) added to `http.users`: for
/// local use and the demo (the inbox's sign-in); declare real users in `http.users`.
pub const ENV_ADMIN_TOKEN: &str = "SWITCHYARD_ADMIN_TOKEN";
/// Turns trace export on, to this OTLP/HTTP endpoint.
pub const ENV_OTLP_ENDPOINT: &str = "SWITCHYARD_OTLP_ENDPOINT";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection, consumer-group and client settings.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Redis connection (shared context, state of stages).
    #[serde(default)]
    pub redis: RedisConfig,
    /// The HTTP endpoint serving metrics, health and the approvals API.
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
    /// Which stages `switchyard run` starts: `<stage>: {enabled: false}` switches one off.
    #[serde(default)]
    pub stages: BTreeMap<String, StageToggle>,
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
    /// The AI gateway: model providers, aliases, rate limits, prices, served keys.
    #[serde(default)]
    pub gateway: crate::gateway::GatewayConfig,
    /// External tools LLM agents may use: HTTP endpoints and MCP servers.
    #[serde(default)]
    pub tools: BTreeMap<String, crate::tools::ToolSpec>,
    /// Workflows: graphs of steps a route can start.
    #[serde(default)]
    pub workflows: BTreeMap<String, crate::workflow::WorkflowSpec>,
    /// OpenTelemetry trace export (off by default).
    #[serde(default)]
    pub tracing: crate::spans::TracingConfig,
    /// The audit trail: keys its seals are signed with.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `audit`: how the trail is protected beyond its hashes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// HMAC keys seals are signed with (the first signs; `audit verify` accepts all): records
    /// inserted by whoever can write to the audit topic are then found. None: seals are unsigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<crate::audit::signing::KeySpec>,
}

/// Whether a stage runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageToggle {
    /// Whether `switchyard run` starts this stage (the `--stages` flag overrides).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}
fn default_schemas_dir() -> PathBuf {
    "schemas".into()
}

/// The sections of the file, for "unknown section" messages.
const SECTIONS: &[&str] = &[
    "kafka",
    "redis",
    "http",
    "log",
    "topics",
    "schemas_dir",
    "stages",
    "routes",
    "agents",
    "context",
    "resolve",
    "governance",
    "gateway",
    "tools",
    "workflows",
    "tracing",
    "audit",
];

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

/// Where a config came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A file (relative paths in it are resolved against its directory).
    File(PathBuf),
    /// The shipped default compiled into the binary, with its topic definitions and schemas.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => write!(f, "the embedded default config"),
        }
    }
}

/// The embedded schemas and topic definitions, parsed once per process (they never change; the
/// fuzzer and the tests load the embedded config many times). Errors as problem texts.
#[allow(clippy::type_complexity)]
fn embedded_parts() -> &'static (
    Result<SchemaRegistry, Vec<String>>,
    Result<TopicCatalog, Vec<(String, String)>>,
) {
    static PARTS: std::sync::OnceLock<(
        Result<SchemaRegistry, Vec<String>>,
        Result<TopicCatalog, Vec<(String, String)>>,
    )> = std::sync::OnceLock::new();
    PARTS.get_or_init(|| {
        let schemas = SchemaRegistry::from_texts(
            crate::embedded::SCHEMAS
                .iter()
                .map(|(n, t)| (*n, format!("embedded schema {n}"), *t)),
        )
        .map_err(|errs| errs.iter().map(ToString::to_string).collect());
        let catalog = TopicCatalog::from_texts(
            crate::embedded::TOPICS
                .iter()
                .map(|(n, t)| (format!("embedded topic file {n}"), *t)),
        );
        (schemas, catalog)
    })
}

/// A config with everything it refers to loaded and checked.
#[derive(Clone)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
    /// Directory the relative paths were resolved against.
    pub base_dir: PathBuf,
    pub schemas: SchemaRegistry,
    pub topics: TopicCatalog,
}

/// Overrides that win over the file: flags first, then the environment.
pub trait Overrides {
    fn get(&self, var: &str) -> Option<String>;
}

/// The process environment only.
pub struct Env;

impl Overrides for Env {
    fn get(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Overrides for F {
    fn get(&self, var: &str) -> Option<String> {
        self(var)
    }
}

impl Config {
    /// Every agent named in a `best_of` group (of a route or a workflow step): the scoreboard
    /// keeps their scores and loads fresh.
    pub fn best_of_agents(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .routes
            .iter()
            .filter_map(|r| r.select.as_ref())
            .chain(
                self.workflows
                    .values()
                    .flat_map(|w| w.steps.values().filter_map(|s| s.select.as_ref())),
            )
            .flat_map(|s| s.best_of.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every topic the config refers to: switchyard's own and input topics, then each Kafka
    /// agent's request and reply topics (what `topics apply` creates and `validate` checks).
    pub fn referenced_topics(&self) -> Vec<&str> {
        let mut v = self.topics.all();
        for a in self.agents.values() {
            for t in a.kind.topics() {
                if !v.contains(&t) {
                    v.push(t);
                }
            }
        }
        v
    }

    /// Reads, overrides from the environment, and validates a config file; collects every problem.
    pub fn load(path: &Path) -> Result<Loaded, Problems> {
        Self::load_with(path, &Env)
    }

    /// [`Config::load`] with explicit overrides.
    pub fn load_with(path: &Path, env: &dyn Overrides) -> Result<Loaded, Problems> {
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
        Self::parse(&text, Source::File(path.to_path_buf()), &base_dir, env)
            .map_err(|problems| Problems { file, problems })
    }

    /// The shipped default compiled into the binary (`deploy/switchyard.yaml`, `topics/`,
    /// `schemas/`), with overrides.
    pub fn load_embedded(env: &dyn Overrides) -> Result<Loaded, Problems> {
        Self::parse(
            crate::embedded::CONFIG,
            Source::Embedded,
            Path::new("."),
            env,
        )
        .map_err(|problems| Problems {
            file: Source::Embedded.to_string(),
            problems,
        })
    }

    /// Parses and validates YAML text. `env` supplies overrides (injected for tests).
    pub fn from_yaml(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Loaded, Vec<Problem>> {
        Self::parse(
            text,
            Source::File(base_dir.join("config.yaml")),
            base_dir,
            &env,
        )
    }

    /// [`Config::from_yaml`] checked against the embedded topic definitions and schemas instead
    /// of files next to it: the loader without any file I/O (for the fuzzer, `fuzz/`).
    #[doc(hidden)]
    pub fn from_yaml_embedded(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Loaded, Vec<Problem>> {
        Self::parse(text, Source::Embedded, Path::new("."), &env)
    }

    fn parse(
        text: &str,
        source: Source,
        base_dir: &Path,
        env: &dyn Overrides,
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
        // Agents whose declaration does not parse still exist (routes naming them are not wrong),
        // and what they declare to propose and write is read leniently, so references to those
        // are not reported as unknown too.
        let mut broken_agents = Vec::new();
        let mut broken_declares: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
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
                "gateway" => section(&key, v, &mut problems, &mut config.gateway),
                "tools" => section(&key, v, &mut problems, &mut config.tools),
                "workflows" => section(&key, v, &mut problems, &mut config.workflows),
                "tracing" => section(&key, v, &mut problems, &mut config.tracing),
                "audit" => section(&key, v, &mut problems, &mut config.audit),
                "agents" => match v {
                    serde_yaml::Value::Mapping(items) => {
                        for (name, item) in items {
                            let name = name.as_str().unwrap_or("?").to_string();
                            let list = |k: &str| -> Vec<String> {
                                item.get(k)
                                    .and_then(|v| serde_yaml::from_value(v.clone()).ok())
                                    .unwrap_or_default()
                            };
                            let declares = (name.clone(), list("actions"), list("writes"));
                            match parse_all::<AgentSpec>(&format!("agents.{name}"), item, &["kind"])
                            {
                                Ok(a) => {
                                    config.agents.insert(name, a);
                                }
                                Err(ps) => {
                                    problems.extend(ps.into_iter().map(|mut p| {
                                        p.message = agent_message(&p.message);
                                        p
                                    }));
                                    broken_agents.push(name);
                                    broken_declares.push(declares);
                                }
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
                            match parse_all::<RouteSpec>(&format!("routes[{i}]{name}"), item, &[]) {
                                Ok(r) => config.routes.push(r),
                                Err(mut ps) => problems.append(&mut ps),
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
                    message: format!("unknown section (expected one of {})", SECTIONS.join(", ")),
                }),
            }
        }
        if let Some(b) = env.get(ENV_BROKERS).filter(|s| !s.is_empty()) {
            config.kafka.brokers = b;
        }
        if let Some(p) = env.get(ENV_KAFKA_SASL_PASSWORD).filter(|s| !s.is_empty()) {
            // The environment wins over the file, wherever the file put it.
            config.kafka.client_secrets.remove("sasl.password");
            config.kafka.client.insert("sasl.password".into(), p);
        }
        for (item, message) in config.kafka.resolve_secrets() {
            problems.push(Problem { item, message });
        }
        if let Some(u) = env.get(ENV_REDIS_URL).filter(|s| !s.is_empty()) {
            config.redis.url = u;
        }
        if let Some(l) = env.get(ENV_HTTP_LISTEN).filter(|s| !s.is_empty()) {
            config.http.listen = l;
        }
        if let Some(l) = env.get(ENV_HTTP_ADMIN_LISTEN).filter(|s| !s.is_empty()) {
            config.http.admin_listen = Some(l);
        }
        if let Some(t) = env.get(ENV_APPROVAL_TOKEN).filter(|s| !s.is_empty()) {
            config.governance.approvals.token = Some(Secret::new(t));
        }
        if let Some(e) = env.get(ENV_OTLP_ENDPOINT).filter(|s| !s.is_empty()) {
            config.tracing.enabled = true;
            config.tracing.endpoint = e;
        }
        if let Some(t) = env.get(ENV_METRICS_TOKEN).filter(|s| !s.is_empty()) {
            config.http.metrics_token = Some(Secret::new(t));
        }
        if let Some(t) = env.get(ENV_INGEST_TOKEN).filter(|s| !s.is_empty()) {
            config.http.ingest.token = Some(Secret::new(t));
        }
        if let Some(t) = env.get(ENV_ADMIN_TOKEN).filter(|s| !s.is_empty()) {
            config.http.users.retain(|u| u.name != "admin");
            config.http.users.push(crate::http::auth::UserSpec {
                name: "admin".into(),
                token: Some(Secret::new(t)),
                token_sha256: None,
                roles: vec![crate::http::auth::Role::Admin],
                tenants: vec!["*".into()],
                groups: Vec::new(),
            });
        }
        let loaded = config.check(source, base_dir, &broken_declares, &mut problems);
        if problems.is_empty() {
            loaded.ok_or_else(Vec::new)
        } else {
            Err(problems)
        }
    }

    /// Every action type some agent may propose.
    pub fn declared_actions(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .agents
            .values()
            .flat_map(|a| a.actions.iter().map(String::as_str))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Semantic checks across sections; returns the loaded config when the referenced files load.
    fn check(
        self,
        source: Source,
        base_dir: &Path,
        broken: &[(String, Vec<String>, Vec<String>)],
        problems: &mut Vec<Problem>,
    ) -> Option<Loaded> {
        let mut p = |item: &str, message: String| {
            problems.push(Problem {
                item: item.to_string(),
                message,
            })
        };
        for (item, m) in self.kafka.problems() {
            p(&item, m);
        }
        for (item, m) in self.tracing.problems() {
            p(&item, m);
        }
        for m in crate::audit::signing::check(&self.audit.keys) {
            p("audit.keys", m);
        }
        for (item, m) in self.redis.problems() {
            p(&item, m);
        }
        if self.context.ttl_seconds == 0 {
            p(
                "context.ttl_seconds",
                "must be at least 1 (facts expire this long after their resource's last write)"
                    .into(),
            );
        }
        match url_scheme(&self.redis.url) {
            Some("redis" | "rediss" | "unix" | "redis+unix") => {}
            _ => p(
                "redis.url",
                "is not a redis:// URL (redis://host:port/db or rediss:// for TLS)".into(),
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
        if let Some(a) = &self.http.admin_listen {
            if a.parse::<SocketAddr>().is_err() {
                p(
                    "http.admin_listen",
                    format!("{a:?} is not an address like 0.0.0.0:9465"),
                );
            } else if *a == self.http.listen {
                p(
                    "http.admin_listen",
                    "is http.listen itself: name another port".into(),
                );
            }
        }
        if self.http.max_connections == 0 {
            p("http.max_connections", "must be at least 1".into());
        }
        for (item, v) in [
            ("http.header_timeout_ms", self.http.header_timeout_ms),
            ("http.body_timeout_ms", self.http.body_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                p(item, format!("{v} is outside 100 ..= 3600000"));
            }
        }
        for (i, u) in self.http.users.iter().enumerate() {
            for (item, m) in u.problems(
                &format!("http.users[{i}]"),
                self.http.proxy_user_header.is_some(),
            ) {
                p(&item, m);
            }
            if self.http.users[..i].iter().any(|o| o.name == u.name) {
                p(
                    &format!("http.users[{i}].name"),
                    format!("{:?} is used by an earlier user", u.name),
                );
            }
        }
        for (item, m) in self.http.ingest.problems(&self.topics.inputs) {
            p(&item, m);
        }
        if crate::telemetry::log_filter(&self.log.level).is_none() {
            p(
                "log.level",
                format!(
                    "{:?} is not a valid filter (e.g. info, or switchyard=debug,rdkafka=warn; ASCII only)",
                    self.log.level
                ),
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
        let mut actions = self.declared_actions();
        actions.extend(
            broken
                .iter()
                .flat_map(|(_, a, _)| a.iter().map(String::as_str)),
        );
        let agents: Vec<&str> = self
            .agents
            .keys()
            .chain(broken.iter().map(|(n, _, _)| n))
            .map(String::as_str)
            .collect();
        let writes: Vec<&str> = self
            .agents
            .values()
            .flat_map(|a| a.writes.iter().map(String::as_str))
            .chain(
                broken
                    .iter()
                    .flat_map(|(_, _, w)| w.iter().map(String::as_str)),
            )
            .collect();
        for (item, m) in self.gateway.clone().effective().problems() {
            p(&item, m);
        }
        for (i, k) in self.gateway.keys.iter().enumerate() {
            if self.agents.contains_key(&k.name) {
                // Budgets and limits `per: agent` would be shared with the agent of that name.
                p(
                    &format!("gateway.keys[{i}].name"),
                    format!("{:?} is an agent's name: a served key's calls are accounted to its name, so it would share that agent's budgets and limits", k.name),
                );
            }
        }
        for (item, m) in crate::tools::problems(&self.tools) {
            p(&item, m);
        }
        for (item, m) in self.context.relations.problems() {
            p(&item, m);
        }
        for (item, m) in crate::workflow::problems(&self.workflows, &agents) {
            p(&item, m);
        }
        // Access rules may also grant delegations (`delegate:<agent>`, see workflows' supervise).
        let delegations: Vec<String> = agents.iter().map(|a| format!("delegate:{a}")).collect();
        let mut granted = actions.clone();
        granted.extend(delegations.iter().map(String::as_str));
        for (item, m) in self.governance.problems(&agents, &granted) {
            p(&item, m);
        }
        for (item, m) in self.resolve.problems(&actions, &writes) {
            p(&item, m);
        }
        for (name, a) in &self.agents {
            for m in a.problems(name) {
                p(&format!("agents.{name}"), m);
            }
            if let Some(f) = &a.fallback {
                if !self.agents.contains_key(f) {
                    p(
                        &format!("agents.{name}.fallback"),
                        format!("{f:?} is not an agent declared under agents"),
                    );
                }
            }
            if let crate::agents::AgentKind::Llm(l) = &a.kind {
                for m in l.config_problems(&a.scopes(), &self.tools) {
                    p(&format!("agents.{name}"), m);
                }
            }
            for (field, list) in [
                ("reads", &a.reads),
                ("writes", &a.writes),
                ("actions", &a.actions),
            ] {
                for (i, x) in list.iter().enumerate() {
                    if let Some(m) = crate::pattern::pattern_problem(x) {
                        p(&format!("agents.{name}.{field}[{i}]"), m);
                    }
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            for m in r.select.iter().flat_map(|s| s.problems(&agents)) {
                p(&format!("routes[{i}] ({})", r.name), m);
            }
            for a in &r.agents {
                if !agents.contains(&a.as_str()) {
                    p(
                        &format!("routes[{i}] ({})", r.name),
                        format!("agent {a:?} is not declared under agents"),
                    );
                }
            }
            for w in &r.workflows {
                if !self.workflows.contains_key(w) {
                    p(
                        &format!("routes[{i}] ({})", r.name),
                        format!("workflow {w:?} is not declared under workflows"),
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
        let (schemas, catalog) = match &source {
            Source::Embedded => {
                let (schemas, catalog) = embedded_parts();
                let schemas = schemas
                    .as_ref()
                    .map_err(|errs| {
                        for e in errs {
                            p("schemas_dir", e.clone());
                        }
                    })
                    .ok()
                    .cloned();
                let catalog = catalog
                    .as_ref()
                    .map_err(|errs| {
                        for (item, message) in errs {
                            p(item, message.clone());
                        }
                    })
                    .ok()
                    .cloned();
                (schemas, catalog)
            }
            Source::File(_) => {
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
                (schemas, catalog)
            }
        };
        let topics_dir = match &source {
            Source::Embedded => "the embedded topic definitions".to_string(),
            Source::File(_) => base_dir.join(&self.topics.dir).display().to_string(),
        };
        if let (Some(schemas), Some(catalog)) = (&schemas, &catalog) {
            for name in self.referenced_topics() {
                match catalog.get(name) {
                    None => p(
                        "topics",
                        format!("topic {name:?} has no definition in {topics_dir}"),
                    ),
                    Some(def) => {
                        if let Some(s) = &def.schema {
                            if schemas.get(s).is_none() {
                                p(
                                    &format!("topic {name}"),
                                    format!("schema {s:?} is not among the schemas"),
                                );
                            }
                        }
                        // Its batches' seal records have a schema of their own.
                        let seal = crate::audit::SEAL_SCHEMA;
                        let avro_audit = name == self.topics.audit.as_str()
                            && def.encoding == crate::codec::Encoding::Avro;
                        match schemas.get(seal) {
                            None if avro_audit => p(
                                &format!("topic {name}"),
                                format!(
                                    "an Avro audit topic needs schema {seal:?} for its seal \
                                     records, which is not among the schemas"
                                ),
                            ),
                            // An older schema would drop the signature without a word.
                            Some(s)
                                if avro_audit
                                    && !self.audit.keys.is_empty()
                                    && !s.schema.canonical_form().contains("\"name\":\"mac\"") =>
                            {
                                p(
                                    &format!("topic {name}"),
                                    format!(
                                        "audit.keys signs seals, but schema {seal:?} has no field \
                                         `mac` (an older copy in schemas_dir?): take the current \
                                         schemas/audit_seal.avsc"
                                    ),
                                )
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        Some(Loaded {
            config: self,
            source,
            base_dir: base_dir.to_path_buf(),
            schemas: schemas?,
            topics: catalog?,
        })
    }
}

/// Adds what every agent takes to serde's "unknown field" message, which lists only the kind's.
fn agent_message(m: &str) -> String {
    if m.starts_with("unknown field") {
        format!("{m} (every agent also takes {})", COMMON_FIELDS.join(", "))
    } else {
        m.to_string()
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
    match parse_all(key, v, &[]) {
        Ok(t) => *out = t,
        Err(mut p) => problems.append(&mut p),
    }
}

/// Whether the setting at `item` may hold a secret (a password, a token, a URL with credentials):
/// its problems never quote the value.
fn may_hold_secret(item: &str) -> bool {
    item.starts_with("redis")
        || item.split('.').any(|seg| {
            crate::secret::is_secret_name(seg) || seg.contains("url") || seg == "headers"
        })
}

/// serde's `invalid type: string "hunter2", expected …` without the value: `invalid type:
/// string, expected …` (the same for `invalid value` and `integer `…``).
fn without_value(message: &str) -> String {
    for head in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(head) {
            let kind = rest.split([' ', ',']).next().unwrap_or("");
            if let Some(at) = rest.find(", expected") {
                return format!("{head}{kind}{}", &rest[at..]);
            }
            return format!("{head}{kind}");
        }
    }
    message.to_string()
}

/// Parses `v` as a `T`, reporting every bad field (not only the first), each with its path. A
/// mapping that does not parse is parsed again one key at a time (with the `keep` keys, such as an
/// agent's `kind`, in every attempt), so each bad key shows up on its own.
pub fn parse_all<T: DeserializeOwned>(
    path: &str,
    v: serde_yaml::Value,
    keep: &[&str],
) -> Result<T, Vec<Problem>> {
    let problem = |e: serde_path_to_error::Error<serde_yaml::Error>| {
        let inner = e.path().to_string();
        let item = if inner == "." || inner.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{inner}")
        };
        let message = e.into_inner().to_string();
        Problem {
            message: if may_hold_secret(&item) {
                without_value(&message)
            } else {
                message
            },
            item,
        }
    };
    let whole = match serde_path_to_error::deserialize::<_, T>(v.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => problem(e),
    };
    let serde_yaml::Value::Mapping(map) = v else {
        return Err(vec![whole]);
    };
    let mut found = Vec::new();
    for (k, val) in &map {
        if k.as_str().is_some_and(|k| keep.contains(&k)) {
            continue;
        }
        let mut one = serde_yaml::Mapping::new();
        for (kk, vv) in &map {
            if kk.as_str().is_some_and(|kk| keep.contains(&kk)) {
                one.insert(kk.clone(), vv.clone());
            }
        }
        one.insert(k.clone(), val.clone());
        if let Err(e) = serde_path_to_error::deserialize::<_, T>(serde_yaml::Value::Mapping(one)) {
            let p = problem(e);
            // Fields the single-key attempt lacks are reported once, from the whole.
            if !p.message.starts_with("missing field") {
                found.push(p);
            }
        }
    }
    if found.is_empty() || whole.message.starts_with("missing field") {
        found.insert(0, whole);
    }
    found.dedup();
    Err(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config problem never repeats a secret: a value of the wrong type under a secret-looking
    /// key or in the `redis` section, a cluster seed's password, a URL that is not http(s).
    #[test]
    fn config_problems_guard_secrets_and_names() {
        for text in [
            "kafka: {client: {sasl.password: 20240611}}",
            "redis: 'rediss://:Hunter2pw@h:6380'",
            "redis: {cluster: true, url: 'redis://:Hunter2pw@10.0.0.1:7000/1'}",
            "http: {users: [{name: a, token: 20240611}]}",
            "agents: {a: {kind: http, url: 'ftp://u:Hunter2pw@h/x', reads: ['*']}}",
        ] {
            let problems = Config::from_yaml_embedded(text, |_| None)
                .err()
                .unwrap_or_default();
            let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
            assert!(!shown.is_empty(), "{text}: no problem found");
            for p in &shown {
                assert!(
                    !p.contains("20240611") && !p.contains("Hunter2pw"),
                    "{text}: {p}"
                );
            }
        }
        // Served keys: one name each, none an agent's.
        let problems = Config::from_yaml_embedded(
            "agents: {triage: {kind: builtin, reads: ['*']}}\ngateway: {keys: [{name: triage, key_sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}, {name: triage, tenant: acme, key_sha256: 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'}]}",
            |_| None,
        )
        .err()
        .unwrap_or_default();
        let items: Vec<&str> = problems.iter().map(|p| p.item.as_str()).collect();
        assert!(items.contains(&"gateway.keys[0].name"), "{problems:?}");
        assert!(items.contains(&"gateway.keys[1].name"), "{problems:?}");
        // The Kafka password from the environment, kept out of the file (and out of config show).
        let loaded = Config::from_yaml_embedded("kafka: {client: {sasl.username: u}}", |k| {
            (k == ENV_KAFKA_SASL_PASSWORD).then(|| "Env5ecret".to_string())
        })
        .expect("valid");
        assert_eq!(
            loaded
                .config
                .kafka
                .client
                .get("sasl.password")
                .map(String::as_str),
            Some("Env5ecret")
        );
        assert_eq!(
            without_value("invalid type: integer `20240611`, expected a string"),
            "invalid type: integer, expected a string"
        );
    }
}
