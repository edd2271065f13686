//! The agent model every kind implements: [`Agent`], what it is given ([`AgentRequest`] with its
//! [`ScopedContext`]) and how an attempt fails ([`AgentError`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::event::CloudEvent;
use crate::kafka::{KafkaConfig, Producer};
use crate::pattern::TypePattern;
use crate::records::{AgentResponse, TaskData};

/// What building an agent may need from the process.
#[derive(Clone)]
pub struct BuildDeps {
    pub kafka: KafkaConfig,
    pub producer: Producer,
    pub stop: CancellationToken,
    /// The AI gateway (LLM agents need it).
    pub gateway: Option<std::sync::Arc<crate::gateway::Gateway>>,
    /// External tools (LLM agents offer the ones their `tools:` allow).
    pub tools: std::sync::Arc<crate::tools::Toolbox>,
    /// Where LLM agents' tool calls are recorded; none in unit tests.
    pub tool_calls: Option<crate::tools::log::ToolCallLog>,
}

/// What an agent may read, write and propose (its declaration's `reads`, `writes`, `actions`).
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    pub actions: Vec<String>,
}

/// The slice of a resource's shared context an agent may see.
#[derive(Debug, Default)]
pub struct ScopedContext {
    /// Resource context version the snapshot was taken at.
    pub version: u64,
    facts: BTreeMap<String, Value>,
    reads: Vec<TypePattern>,
    refused: Mutex<Vec<String>>,
    /// Facts of related resources the agent's `related:` entries name (null when none):
    /// `{relation: {resource: {depth, version, facts: {key: {value, by, at}}}}}`.
    related: Value,
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
            related: Value::Null,
        }
    }

    /// With the facts of related resources.
    pub fn with_related(mut self, related: Value) -> Self {
        self.related = related;
        self
    }

    /// The facts of related resources (null when the agent declares no `related:`).
    pub fn related(&self) -> &Value {
        &self.related
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
    /// The attempt's W3C trace context: sent on as a `traceparent` header (HTTP, Kafka) and the
    /// parent of the model and tool calls' spans.
    pub traceparent: Option<String>,
}

impl AgentRequest {
    /// The JSON document HTTP and Kafka agents receive (documented in the README).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "agent": self.agent,
            "attempt": self.attempt,
            "task": self.task,
            "event": self.event,
            "context": {"version": self.context.version, "facts": self.context.facts(),
                        "related": self.context.related()},
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
    crate::pattern::matches_any(patterns, key)
}
