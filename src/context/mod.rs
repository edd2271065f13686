//! Shared context: per-resource facts and findings, a version per resource, a capped list of recent
//! events, and each task's recorded outcome, behind [`ContextStore`].
//!
//! [`redis::RedisStore`] is the real store; [`memory::MemoryStore`] serves unit tests. One contract
//! suite ([`contract`]) runs against both. Keys are namespaced by tenant and carry a `{tenant/resource}`
//! hash tag, so everything of one resource lives in one Redis Cluster slot and can change atomically.

pub mod contract;
pub mod fact;
pub mod graph;
pub mod memory;
pub mod redis;
pub mod view;

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::records::AgentResponse;
pub use crate::store::{ResourceKey, StoreError};

pub use fact::Fact;

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
    /// Per input partition (`<topic>:<partition>`), the highest offset of a task committed to
    /// this resource: a task at or below it with no outcome kept is finished ([`Prior::at`]).
    pub applied: BTreeMap<String, i64>,
    /// The topic id each of those offsets is of ([`crate::kafka::topic_id`]), where known: an
    /// offset of another incarnation of the topic fences nothing.
    pub applied_in: BTreeMap<String, String>,
}

/// The largest outcome a store keeps in a memo slot (the Redis commit script names the same
/// figure): every read of a resource's context reads its slots.
pub const MAX_SLOT_OUTCOME_BYTES: usize = 4096;

impl Snapshot {
    /// Whether the resource's tasks of `place`'s partition were applied up to its offset or later.
    pub fn applied_covers(&self, place: &crate::store::Place) -> bool {
        self.applied
            .get(&place.partition)
            .is_some_and(|a| place.offset <= *a)
            && crate::kafka::topic_id::same_incarnation(
                self.applied_in.get(&place.partition).map(String::as_str),
                &place.topic_id,
            )
    }

    /// Notes `place`'s task as applied: its partition's offset is raised to it (set, when the
    /// offset noted was of another incarnation of the topic).
    pub fn apply(&mut self, place: &crate::store::Place) {
        let same = crate::kafka::topic_id::same_incarnation(
            self.applied_in.get(&place.partition).map(String::as_str),
            &place.topic_id,
        );
        let a = self
            .applied
            .entry(place.partition.clone())
            .or_insert(place.offset);
        *a = if same {
            (*a).max(place.offset)
        } else {
            place.offset
        };
        // A writer that does not know the id keeps the note: dropping it would let a later
        // incarnation's first records be taken for ones done (lost), keeping it at worst runs a
        // task again.
        if !place.topic_id.is_empty() {
            self.applied_in
                .insert(place.partition.clone(), place.topic_id.clone());
        }
    }

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The agent that ran the task when it was not the task's own (its circuit was open and its
    /// fallback ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<String>,
    /// When the agent's context was read (RFC 3339): cross-resource staleness compares related
    /// facts' write times with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seen_at: String,
    /// `resource/key` of the related resources' facts the agent was given (audited).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related_reads: Vec<String>,
    /// The context version of each related resource the agent was given: a proposal for one of
    /// them is checked for staleness against it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub related_versions: BTreeMap<String, u64>,
    /// The digest of what decided the answer ([`crate::agents::answer_digest`]) of the task's own
    /// agent when it answered (none when a fallback did): kept with the answer, so a re-emitted
    /// result names the declaration that answered, not today's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_digest: Option<String>,
}

/// What the store knows of a task before it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// Never finished: run it.
    New,
    /// Finished and its input is not yet known to be committed (a redelivery): emit its records
    /// again from the recorded outcome.
    Recorded(Box<Outcome>),
    /// Finished, its records delivered and its input committed (the outcome was forgotten): a copy
    /// of the task further down the topic (an upstream redelivery) is skipped.
    Finished,
    /// Finished, its outcome kept in a memo slot of the resource ([`crate::store::Place`]) for the
    /// input at `input` (`<topic>:<partition>:<offset>`): [`Prior::at`] says which of the two
    /// above it is for a given record.
    Kept {
        outcome: Box<Outcome>,
        input: String,
    },
}

impl Prior {
    /// What is known of the task whose record is at `place`, given the resource's `snap`: a
    /// [`Prior::Kept`] outcome is finished when its own input is a delivered record of the same
    /// partition (this is a copy), else to emit again (a redelivery, or an input this instance
    /// does not know to be delivered); a task with nothing kept whose offset is at or below the
    /// highest its partition applied to the resource is finished (a memo goes only once its input
    /// is delivered, so its records are). Other priors are returned as they are.
    pub fn at(self, place: Option<&crate::store::Place>, snap: &Snapshot) -> Prior {
        let Some(p) = place else { return self };
        match self {
            Prior::Kept { input, .. } if p.delivered_tag(&input) => Prior::Finished,
            Prior::New if snap.applied_covers(p) => Prior::Finished,
            other => other,
        }
    }
}

/// What [`ContextStore::commit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitResult {
    /// This call recorded the outcome and applied the writes; the resource is now at `version`.
    /// `kept`: the outcome is in a memo slot of the resource, not a key to forget once committed.
    Applied { version: u64, kept: bool },
    /// The task already had an outcome (a redelivery raced us); nothing changed.
    AlreadyRecorded(Box<Outcome>),
    /// The task finished and its outcome was forgotten already (a zombie, or an upstream copy
    /// racing the original); nothing changed.
    Finished,
}

/// The most findings one task may write; the rest are refused (one `write` refusal says how
/// many). A resource's facts are read whole by every task on it, and written in one script.
pub const MAX_FINDINGS_PER_TASK: usize = 256;
/// The largest value a finding may hold (its JSON); a larger one is refused.
pub const MAX_FACT_BYTES: usize = 64 * 1024;

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
    /// Finished task ids remembered per resource after their outcome is forgotten (once their
    /// input is committed): a copy of a task within this many later tasks of the resource is
    /// skipped instead of calling the agent again.
    #[serde(default = "default_remember_tasks")]
    pub remember_tasks: usize,
    /// No longer used (outcomes are kept until their input is committed); accepted so that older
    /// configs still load.
    #[serde(default, skip_serializing)]
    pub outcome_ttl_seconds: Option<u64>,
    /// Relations between resources (README, "Context across resources").
    #[serde(default)]
    pub relations: graph::RelationsConfig,
    /// Fact keys indexed for `switchyard context query` (who has an active `sla`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<String>,
}

fn default_remember_tasks() -> usize {
    64
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
            remember_tasks: default_remember_tasks(),
            outcome_ttl_seconds: None,
            relations: Default::default(),
            index: Vec::new(),
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

    /// What is known of a task, and the resource's context now, in one round trip (two when the
    /// task may have finished before: see the store).
    fn read(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> impl Future<Output = Result<(Prior, Snapshot), StoreError>> + Send;

    /// [`ContextStore::read`] for many tasks, in one round trip where the store allows.
    fn read_many(
        &self,
        asks: &[(ResourceKey, String)],
    ) -> impl Future<Output = Vec<Result<(Prior, Snapshot), StoreError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(asks.len());
            for (k, t) in asks {
                out.push(self.read(k, t).await);
            }
            out
        }
    }

    /// Atomically: unless the task already has an outcome, write `facts` (bumping the version when
    /// there are any), remember `event` in the recent-events list, record `outcome` and remember the
    /// task as finished. With the `place` of the task's input record the outcome may be kept in the
    /// resource's memo slots ([`crate::store::Place`]); without one it is kept apart.
    fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
        place: Option<&crate::store::Place>,
    ) -> impl Future<Output = Result<CommitResult, StoreError>> + Send;

    /// Forgets the recorded outcomes of tasks whose input offsets are committed (their records
    /// were delivered); they stay remembered as finished.
    fn forget(
        &self,
        tasks: &[(ResourceKey, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
