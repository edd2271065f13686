//! Agents: what turns a task into findings (facts shared into context) and proposals (actions wanted on
//! a resource).
//!
//! Adding a built-in agent touches two files: its module under `agents/` and one line in
//! [`builtin::create`]. HTTP and Kafka agents are configured, not coded.

pub mod builtin;
pub mod http;
pub mod kafka;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::CloudEvent;
use crate::records::TaskData;
use crate::route::TypePattern;

/// How an agent is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// Rust code in this binary (`builtin` names which).
    Builtin,
    /// POST the task as JSON to `url`.
    Http,
    /// An external service on its own request/reply topics.
    Kafka,
}

/// An agent as declared in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub kind: AgentKind,
    /// For `builtin`: which built-in agent (default: the agent's name).
    #[serde(default)]
    pub builtin: Option<String>,
    /// Context keys the agent may read (`*` wildcards). Facts outside this list are not shown to it.
    #[serde(default)]
    pub reads: Vec<String>,
    /// Context keys the agent may write. A finding outside this list is refused and audited.
    #[serde(default)]
    pub writes: Vec<String>,
    /// Action types the agent may propose. Any other proposal is refused and audited.
    #[serde(default)]
    pub actions: Vec<String>,
    /// One attempt's time limit.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
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
    /// For `http`: the endpoint.
    #[serde(default)]
    pub url: Option<String>,
    /// For `kafka`: the topic requests are written to.
    #[serde(default)]
    pub request_topic: Option<String>,
    /// For `kafka`: the topic replies arrive on.
    #[serde(default)]
    pub reply_topic: Option<String>,
    /// Agent-specific settings (e.g. `correlation_window_minutes` for `sla-responder`).
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
}

fn default_timeout_ms() -> u64 {
    5_000
}
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
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Every problem with this declaration, as sentences.
    pub fn problems(&self, name: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.timeout_ms == 0 {
            p.push("timeout_ms must be at least 1".into());
        }
        if self.max_concurrency == 0 {
            p.push("max_concurrency must be at least 1".into());
        }
        if self.cost_per_call < 0.0 || !self.cost_per_call.is_finite() {
            p.push("cost_per_call must be a non-negative number".into());
        }
        match self.kind {
            AgentKind::Builtin => {
                let which = self.builtin.as_deref().unwrap_or(name);
                if !builtin::NAMES.contains(&which) {
                    p.push(format!(
                        "builtin {which:?} does not exist (this build has {})",
                        builtin::NAMES.join(", ")
                    ));
                }
            }
            AgentKind::Http => match &self.url {
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
                Some(u) => p.push(format!("url {u:?} is not an http(s) URL")),
                None => p.push("kind http needs a url".into()),
            },
            AgentKind::Kafka => {
                if self.request_topic.is_none() || self.reply_topic.is_none() {
                    p.push("kind kafka needs request_topic and reply_topic".into());
                }
            }
        }
        if self.kind != AgentKind::Http && self.url.is_some() {
            p.push("url is only used by kind http".into());
        }
        p
    }
}

/// Impact of a proposed action; approval rules use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Impact {
    #[default]
    Low,
    Medium,
    High,
}

impl Impact {
    pub fn as_str(self) -> &'static str {
        match self {
            Impact::Low => "low",
            Impact::Medium => "medium",
            Impact::High => "high",
        }
    }
}

/// A fact an agent shares into the resource's context.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Finding {
    /// Context key, e.g. `deployment` or `suspect_deployment`.
    pub key: String,
    pub value: Value,
}

/// An action an agent wants on the task's resource.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ProposalSpec {
    /// Action type, e.g. `rollback`; must be one of the agent's declared `actions`.
    pub action: String,
    #[serde(default)]
    pub parameters: Value,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub impact: Impact,
    #[serde(default)]
    pub reason: Option<String>,
    /// Estimated cost of the action (approval rules with `min_cost` use it).
    #[serde(default)]
    pub cost: Option<f64>,
}

/// What an agent returns (also the JSON body HTTP and Kafka agents send back).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentResponse {
    #[serde(default)]
    pub findings: Vec<Finding>,
    #[serde(default)]
    pub proposals: Vec<ProposalSpec>,
}

/// The slice of a resource's shared context an agent may see.
#[derive(Debug, Default)]
pub struct ScopedContext {
    /// Resource context version the snapshot was taken at.
    pub version: u64,
    facts: BTreeMap<String, Value>,
    reads: Vec<TypePattern>,
    refused: Mutex<Vec<String>>,
}

impl ScopedContext {
    /// Keeps only the facts the agent may read.
    pub fn new(version: u64, facts: BTreeMap<String, Value>, reads: &[String]) -> Self {
        let reads: Vec<TypePattern> = reads.iter().map(|r| TypePattern::new(r)).collect();
        let facts = facts
            .into_iter()
            .filter(|(k, _)| reads.iter().any(|p| p.matches(k)))
            .collect();
        ScopedContext {
            version,
            facts,
            reads,
            refused: Mutex::new(Vec::new()),
        }
    }

    /// A fact, when the agent may read it. Reading outside the scope is refused (recorded, then
    /// audited by the runner) and yields `None`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        if !self.reads.iter().any(|p| p.matches(key)) {
            self.refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(key.to_string());
            return None;
        }
        self.facts.get(key)
    }

    /// Every readable fact (what HTTP and Kafka agents are sent).
    pub fn facts(&self) -> &BTreeMap<String, Value> {
        &self.facts
    }

    /// Keys the agent tried to read outside its scope.
    pub fn take_refused_reads(&self) -> Vec<String> {
        std::mem::take(&mut *self.refused.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Everything an agent gets for one task.
pub struct AgentRequest {
    pub agent: String,
    pub task: TaskData,
    /// The input event the task is for.
    pub event: CloudEvent,
    pub context: ScopedContext,
    /// 1 for the first attempt.
    pub attempt: u32,
}

impl AgentRequest {
    /// The JSON document HTTP and Kafka agents receive (documented in the README).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "agent": self.agent,
            "attempt": self.attempt,
            "task": self.task,
            "event": self.event,
            "context": {"version": self.context.version, "facts": self.context.facts()},
        })
    }
}

/// Why an attempt failed; decides whether to retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Worth another attempt (5xx, connection refused, ...).
    #[error("{0}")]
    Retryable(String),
    /// Another attempt would fail the same way (4xx, malformed response, ...).
    #[error("{0}")]
    Permanent(String),
}

/// An agent implementation.
pub trait Agent: Send + Sync {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>>;
}

/// True when `key` matches one of the patterns.
pub fn allowed(patterns: &[String], key: &str) -> bool {
    patterns.iter().any(|p| TypePattern::new(p).matches(key))
}
