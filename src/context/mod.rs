//! Shared context: per-resource facts and findings, a version per resource, a capped list of recent
//! events, and each task's recorded outcome, behind [`ContextStore`].
//!
//! [`redis::RedisStore`] is the real store; [`memory::MemoryStore`] serves unit tests. One contract
//! suite ([`contract`]) runs against both. Keys are namespaced by tenant and carry a `{tenant/resource}`
//! hash tag, so everything of one resource lives in one Redis Cluster slot and can change atomically.

pub mod contract;
pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::records::AgentResponse;
pub use crate::store::{ResourceKey, StoreError};

/// A fact as stored: the value plus who wrote it, when, and for which task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub value: Value,
    pub by: String,
    pub task_id: String,
    pub at: String,
}

/// A resource's context at one version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// 0 when nothing was ever written.
    pub version: u64,
    pub facts: BTreeMap<String, Fact>,
    /// Most recent first: `{id, type, time}` of events seen for the resource.
    pub recent_events: Vec<Value>,
    /// The version at which each fact last changed (staleness checks use it).
    pub key_versions: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Fact values by key, plus `recent_events` — what agents see (before scoping).
    pub fn values(&self) -> BTreeMap<String, Value> {
        let mut m: BTreeMap<String, Value> = self
            .facts
            .iter()
            .map(|(k, f)| (k.clone(), f.value.clone()))
            .collect();
        m.insert(
            "recent_events".into(),
            Value::Array(self.recent_events.clone()),
        );
        m
    }
}

/// The recorded outcome of a task: whatever is needed to emit its records again without calling the
/// agent again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: String,
    pub attempts: u32,
    pub duration_ms: u64,
    /// Context version the agent saw.
    pub context_version: u64,
    /// Findings written (accepted ones) and proposals kept, as the agent returned them.
    pub response: AgentResponse,
    #[serde(default)]
    pub error: Option<String>,
    /// Refusals (scope violations), already audited once.
    #[serde(default)]
    pub refusals: Vec<String>,
    /// When the outcome was reached (RFC 3339): the time of every record it causes, so a redelivered
    /// task re-emits byte-identical records.
    #[serde(default)]
    pub at: String,
}

/// What [`ContextStore::commit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitResult {
    /// This call recorded the outcome and applied the writes; the resource is now at `version`.
    Applied { version: u64 },
    /// The task already had an outcome (a redelivery raced us); nothing changed.
    AlreadyRecorded(Box<Outcome>),
}

/// The `context:` config section: what the shared context keeps.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    /// A resource's facts expire this long after its last write.
    #[serde(default = "default_week")]
    pub ttl_seconds: u64,
    /// Recent events kept per resource.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// How long a task's outcome is kept; a redelivery within this window does not call the agent
    /// again.
    #[serde(default = "default_week")]
    pub outcome_ttl_seconds: u64,
}

fn default_week() -> u64 {
    7 * 24 * 3600
}
fn default_max_events() -> usize {
    50
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            ttl_seconds: default_week(),
            max_events: default_max_events(),
            outcome_ttl_seconds: default_week(),
        }
    }
}

/// The shared context store.
pub trait ContextStore: Send + Sync + 'static {
    /// The resource's context now.
    fn snapshot(
        &self,
        key: &ResourceKey,
    ) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// The recorded outcome of a task, if it finished before.
    fn outcome(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> impl Future<Output = Result<Option<Outcome>, StoreError>> + Send;

    /// The recorded outcome of a task and the resource's context now, in one round trip where the
    /// store allows (the agent stage needs both for every task).
    fn outcome_and_snapshot(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> impl Future<Output = Result<(Option<Outcome>, Snapshot), StoreError>> + Send {
        async move {
            let o = self.outcome(key, task_id).await?;
            Ok((o, self.snapshot(key).await?))
        }
    }

    /// Atomically: unless the task already has an outcome, write `facts` (bumping the version when
    /// there are any), remember `event` in the recent-events list, and record `outcome`.
    fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
    ) -> impl Future<Output = Result<CommitResult, StoreError>> + Send;
}
