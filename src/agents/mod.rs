//! Agents: what turns a task into findings (facts shared into context) and proposals (actions wanted
//! on a resource).
//!
//! An agent is declared under `agents:` with a `kind` ([`AgentKind`]: one enum arm per kind, each
//! with its own fields and its own `build`) and the settings every kind shares ([`AgentSpec`]).
//! Adding a kind touches two files: its module here and its arm in [`AgentKind`]. Adding a built-in
//! agent touches two files: its module under `builtin/` and one line of [`builtin::BUILTINS`].

pub mod builtin;
pub mod circuit;
pub mod http;
pub mod kafka;
pub mod llm;
pub mod model;
pub mod select;
pub mod stats;

pub use model::{allowed, Agent, AgentError, AgentRequest, BuildDeps, ScopedContext, Scopes};

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How an agent is run, with the settings only that kind has (`kind:` in the config).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentKind {
    /// Rust code in this binary.
    Builtin(builtin::Spec),
    /// The task is POSTed as JSON to a URL.
    Http(http::Spec),
    /// An external service on its own request/reply topics.
    Kafka(kafka::Spec),
    /// A model through the AI gateway, in a tool-calling loop.
    Llm(llm::Spec),
}

impl AgentKind {
    /// The kind's name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            AgentKind::Builtin(_) => "builtin",
            AgentKind::Http(_) => "http",
            AgentKind::Kafka(_) => "kafka",
            AgentKind::Llm(_) => "llm",
        }
    }

    /// Problems of the kind's own settings, as sentences. `name` is the agent's name.
    pub fn problems(&self, name: &str) -> Vec<String> {
        match self {
            AgentKind::Builtin(s) => s.problems(name),
            AgentKind::Http(s) => s.problems(),
            AgentKind::Kafka(s) => s.problems(),
            AgentKind::Llm(s) => s.problems(),
        }
    }

    /// Topics this agent needs (created by `topics apply`, checked by `validate`).
    pub fn topics(&self) -> Vec<&str> {
        match self {
            AgentKind::Kafka(s) => vec![s.request_topic.as_str(), s.reply_topic.as_str()],
            _ => Vec::new(),
        }
    }

    /// Creates a built-in agent without the process's clients (tests, tools).
    pub fn build_builtin(&self, name: &str) -> Result<Arc<dyn Agent>, String> {
        match self {
            AgentKind::Builtin(s) => s.build(name),
            other => Err(format!(
                "{name} is a {} agent, not a built-in",
                other.name()
            )),
        }
    }

    /// Creates the agent.
    pub async fn build(
        &self,
        name: &str,
        spec: &AgentSpec,
        deps: &BuildDeps,
    ) -> Result<Arc<dyn Agent>, String> {
        match self {
            AgentKind::Builtin(s) => s.build(name),
            AgentKind::Http(s) => s.build(spec.timeout()),
            AgentKind::Kafka(s) => s.build(deps).await,
            AgentKind::Llm(s) => s.build(name, spec.scopes(), deps),
        }
    }
}

/// An agent as declared in the config file: its kind and the settings every kind shares.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AgentSpec {
    #[serde(flatten)]
    pub kind: AgentKind,
    /// Context keys the agent may read (`*` wildcards). Facts outside this list are not shown to it.
    #[serde(default)]
    pub reads: Vec<String>,
    /// Context keys the agent may write. A finding outside this list is refused and audited.
    #[serde(default)]
    pub writes: Vec<String>,
    /// Action types the agent may propose. Any other proposal is refused and audited.
    #[serde(default)]
    pub actions: Vec<String>,
    /// One attempt's time limit (an LLM agent's whole tool loop); default 5 s, 120 s for `llm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts after the first, on timeout or retryable failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Backoff before the first retry; doubles each retry.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Calls of this agent running at once in one process.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Cost of one call (currency units); counted against budgets.
    #[serde(default)]
    pub cost_per_call: f64,
    /// A circuit breaker shared by every instance: skip the agent while it keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<circuit::CircuitSpec>,
    /// The agent that runs a task instead while this one's circuit is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Facts of related resources the agent is given (`[{relation: depends_on, depth: 1,
    /// reads: [deployment]}]`); it may also propose actions on those resources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<crate::context::graph::RelatedSpec>,
}

/// A digest of what decides an agent's answers: its kind with that kind's settings (prompt, model
/// alias, URL…), its scopes and related context, and for an LLM agent the gateway's aliases and the
/// tools (another model or tool gives other answers). Operational settings (retries, concurrency,
/// timeouts, cost, circuit, fallback) are left out. A recorded answer carries it; `replay` serves the
/// answer only while the config it replays gives the same digest.
pub fn answer_digest(
    spec: &AgentSpec,
    gateway: &crate::gateway::GatewayConfig,
    tools: &std::collections::BTreeMap<String, crate::tools::ToolSpec>,
) -> String {
    use sha2::Digest;
    let llm = matches!(spec.kind, AgentKind::Llm(_));
    let v = serde_json::json!({
        "kind": spec.kind, "reads": spec.reads, "writes": spec.writes, "actions": spec.actions,
        "related": spec.related,
        "aliases": llm.then(|| serde_json::to_value(&gateway.aliases).ok()),
        "tools": llm.then(|| serde_json::to_value(tools).ok()),
    });
    hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..12])
}

/// Settings every agent has, whatever its kind (for "unknown field" messages).
pub const COMMON_FIELDS: &[&str] = &[
    "kind",
    "reads",
    "writes",
    "actions",
    "timeout_ms",
    "retries",
    "backoff_ms",
    "max_concurrency",
    "cost_per_call",
    "circuit",
    "fallback",
    "related",
];

fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_concurrency() -> usize {
    32
}

impl AgentSpec {
    /// What the agent may read, write and propose.
    pub fn scopes(&self) -> Scopes {
        Scopes {
            reads: self.reads.clone(),
            writes: self.writes.clone(),
            actions: self.actions.clone(),
        }
    }

    pub fn timeout(&self) -> Duration {
        let default = match self.kind {
            AgentKind::Llm(_) => 120_000,
            _ => 5_000,
        };
        Duration::from_millis(self.timeout_ms.unwrap_or(default))
    }

    /// Every problem with this declaration, as sentences.
    pub fn problems(&self, name: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.timeout_ms == Some(0) {
            p.push("timeout_ms must be at least 1".into());
        }
        if self.max_concurrency == 0 {
            p.push("max_concurrency must be at least 1".into());
        }
        if self.cost_per_call < 0.0 || !self.cost_per_call.is_finite() {
            p.push("cost_per_call must be a non-negative number".into());
        }
        if let Some(c) = &self.circuit {
            p.extend(c.problems());
        }
        for r in &self.related {
            p.extend(r.problems());
        }
        if self.fallback.as_deref() == Some(name) {
            p.push("fallback must be another agent".into());
        }
        p.extend(self.kind.problems(name));
        p
    }
}
