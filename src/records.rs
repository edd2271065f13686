//! The records switchyard writes: CloudEvents whose `data` has the shapes below (Avro schemas of the
//! same names live in `schemas/`), and the [`Emitter`] that encodes them for their topic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec::{self, CONTENT_TYPE_HEADER};
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::Output;
use crate::schema::SchemaRegistry;
use crate::topics::TopicCatalog;

/// Event types of switchyard's own records.
pub mod types {
    pub const TASK: &str = "switchyard.task";
    pub const PROPOSAL: &str = "switchyard.proposal";
    /// On the proposals topic, with a [`super::ProposalData`] whose `edit_of` names the approval: a
    /// person approved its action, which resolve now sends (`resolve::apply::release`).
    pub const RELEASE: &str = "switchyard.approval.release";
    pub const RESULT: &str = "switchyard.result";
    pub const ACTION: &str = "switchyard.action";
    pub const APPROVAL: &str = "switchyard.approval";
    pub const AUDIT: &str = "switchyard.audit";
}

// ---- What agents answer (the JSON body HTTP and Kafka agents send back, too) ----

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
    /// Another resource the action is for: one of the task's related resources (the agent's
    /// `related:`); its proposal goes to that resource's partition and is resolved there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Set by switchyard, not the agent, for a proposal on a related resource: the version of
    /// that resource's context the agent was given and when (kept with the proposal, so a
    /// workflow merge that sends it later checks staleness against what its agent saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<String>,
    /// How sure the agent is, from 0 to 1 (approval rules with `max_confidence` use it). Anything
    /// else (out of range, not a number) makes the answer malformed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "confidence"
    )]
    pub confidence: Option<f64>,
}

/// Checks a stated confidence: absent or null, or a number from 0 to 1.
pub fn check_confidence(v: &Value) -> Result<Option<f64>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(c) if (0.0..=1.0).contains(&c) => Ok(Some(c)),
            _ => Err(format!("confidence must be a number from 0 to 1, not {n}")),
        },
        other => Err(format!(
            "confidence must be a number from 0 to 1, not {}",
            match other {
                Value::String(_) => "a string",
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "an array",
                _ => "an object",
            }
        )),
    }
}

fn confidence<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    check_confidence(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// What an agent returns (also the JSON body HTTP and Kafka agents send back).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentResponse {
    #[serde(default)]
    pub findings: Vec<Finding>,
    #[serde(default)]
    pub proposals: Vec<ProposalSpec>,
    /// A workflow supervisor's sub-tasks (`[{agent, instructions}]`); see README, "Workflows".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegate: Vec<Delegation>,
    /// What the work cost beyond the agent's `cost_per_call` (an LLM agent: its model calls), in
    /// the budgets' currency; counted on its scorecard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The model that did the work (an LLM agent: the last model that answered); scorecards count
    /// per model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

// ---- Records on switchyard's topics ----

/// `data` of a `switchyard.task` event: one agent's assignment for one routed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskData {
    pub task_id: String,
    pub workflow_id: String,
    pub agent: String,
    pub route: String,
    pub priority: i32,
    pub resource: String,
    pub tenant: String,
    /// The input event (structured JSON; a JSON string when the topic is Avro-encoded).
    #[serde(deserialize_with = "json_or_text")]
    pub event: Value,
    /// Set when the task is a step of a workflow run.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "step_json_or_text"
    )]
    pub step: Option<StepRef>,
}

/// What a workflow step's task carries about its run (`task.step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRef {
    pub run_id: String,
    pub workflow: String,
    pub step: String,
    /// 1, or 2 for the fallback agent.
    #[serde(default = "one")]
    pub attempt: u32,
    /// Its proposals are held for a merge step (not sent to resolve).
    #[serde(default)]
    pub hold: bool,
    /// The results of the steps it runs after: `{step: {status, agent, findings, proposals}}`.
    #[serde(default)]
    pub inputs: Value,
    /// When the run started (RFC 3339).
    pub run_started_at: String,
    /// A supervisor's round (0 first; each delegation starts another).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u32,
    /// Agents this task may delegate to (`delegate` in its answer); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegates: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Work a supervisor step hands to another agent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Delegation {
    pub agent: String,
    #[serde(default)]
    pub instructions: String,
}

fn one() -> u32 {
    1
}

fn step_json_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StepRef>, D::Error> {
    match json_or_text(d)? {
        Value::Null => Ok(None),
        v => serde_json::from_value(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// `data` of a `switchyard.proposal` event: an action an agent wants on a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalData {
    /// Deterministic: task id, action and position, so a replayed task yields the same id.
    pub proposal_id: String,
    pub task_id: String,
    pub workflow_id: String,
    pub agent: String,
    pub action: String,
    pub resource: String,
    pub tenant: String,
    #[serde(deserialize_with = "json_or_text")]
    pub parameters: Value,
    pub priority: i32,
    pub impact: Impact,
    /// Version of the resource's shared context the agent saw.
    pub context_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Estimated cost of carrying the action out (approval rules may use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// When the agent read its context (cross-resource staleness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<String>,
    /// A proposal a person edited and approved in the inbox: who. It needs no second approval
    /// when the approval it replaces ([`ProposalData::edit_of`]) holds exactly this edit by this
    /// person; everything else (conflicts, access, budgets) is checked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// The approval an edited proposal replaces; on a [`types::RELEASE`] record, the approval
    /// whose action is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_of: Option<String>,
    /// The agent's stated confidence, 0 to 1 (approval rules with `max_confidence` use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

/// `data` of a `switchyard.action` event: an accepted, governed action for executors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionData {
    pub action_id: String,
    pub action: String,
    pub resource: String,
    pub tenant: String,
    pub workflow_id: String,
    #[serde(deserialize_with = "json_or_text")]
    pub parameters: Value,
    /// Increases with every action emitted for the resource: an executor refuses an action whose token
    /// is lower than one it already applied for that resource.
    pub fencing_token: u64,
    /// Provenance: the proposals behind this action.
    #[serde(deserialize_with = "json_or_text")]
    pub proposals: Value,
    /// The agents behind it. This, `priority` and `impact` default when absent: Avro action
    /// records written with schema action.v1 lack them.
    #[serde(default, deserialize_with = "json_or_text")]
    pub agents: Value,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub impact: Impact,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `data` of a `switchyard.approval` event: a request for, or a decision on, human approval.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ApprovalData {
    pub approval_id: String,
    pub action_id: String,
    pub action: String,
    pub resource: String,
    pub tenant: String,
    /// `pending`, `escalated`, `approved`, `rejected`, `expired` or `superseded`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// Seconds since the epoch. Both times read as 0 when absent or null (schemas approval.v1 and
    /// v2 had no `requested_at` and a nullable text `expires_at`).
    #[serde(default, deserialize_with = "zero_if_null")]
    pub requested_at: i64,
    #[serde(default, deserialize_with = "zero_if_null")]
    pub expires_at: i64,
    /// The action that goes out when approved (its fencing token is assigned then).
    #[serde(deserialize_with = "json_or_text")]
    pub action_record: Value,
    /// The name of the approval rule that required approval (`rules[i]` when unnamed); none for
    /// approvals no rule asked for (a model call over its budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The proposal's stated confidence, when its agent stated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// Escalation level: 0 until the first escalation, then 1, 2, ...
    #[serde(default)]
    pub level: u32,
    /// The approver group that may decide at this level (rules with an escalation path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `data` of a `switchyard.result` event: the outcome of one agent task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultData {
    pub task_id: String,
    pub workflow_id: String,
    pub agent: String,
    pub resource: String,
    pub tenant: String,
    /// `succeeded`, `failed` or `timed_out`.
    pub status: String,
    pub duration_ms: u64,
    pub attempts: u32,
    /// Findings written to the shared context.
    #[serde(deserialize_with = "json_or_text")]
    pub findings: Value,
    /// Ids of the proposals emitted.
    #[serde(deserialize_with = "json_or_text")]
    pub proposals: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Id of the input event the task was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The agent's answer beyond its findings (which are in `findings`): its proposals as it
    /// specified them, delegations, cost and model — what `switchyard replay` serves instead of
    /// calling the agent again.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_json_or_text"
    )]
    pub answer: Option<Value>,
    /// The digest of what decided the answer ([`crate::agents::answer_digest`]), when the task's
    /// own agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_digest: Option<String>,
    /// The agent that answered instead (the task's agent's circuit was open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<String>,
    /// What became of the agent's proposals as far as the agent stage knows when it writes this
    /// result (none when it proposed nothing); resolve decides the rest (`switchyard trace`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "counts_json_or_text"
    )]
    pub proposal_counts: Option<ProposalCounts>,
    /// What an operator should know about this result, as sentences: proposals that can never
    /// become actions, and why.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strings_json_or_text"
    )]
    pub warnings: Vec<String>,
}

/// What became of a task's proposals, as the agent stage sees it when it writes the result:
/// `proposed = refused + rejected + to_resolve + held`. Access rules are pure and static, so the
/// proposals none lets the agent cause are known to be rejected at once; conflicts, budgets and
/// approvals are decided later by resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProposalCounts {
    /// Every proposal in the agent's answer.
    pub proposed: u32,
    /// Refused by the agent stage and never sent: an action the agent does not declare, or a
    /// resource it was not given.
    #[serde(default)]
    pub refused: u32,
    /// Sent to resolve, where no `governance.access` rule lets the agent cause them: they are
    /// rejected (reason `access`).
    #[serde(default)]
    pub rejected: u32,
    /// Sent to resolve, which decides them (conflicts, staleness, budgets, approvals).
    #[serde(default)]
    pub to_resolve: u32,
    /// Held for the workflow run's merge step (not sent to resolve by this task).
    #[serde(default)]
    pub held: u32,
}

impl ProposalCounts {
    /// One phrase for `tail` and `trace`: `3 proposed: 1 refused (scope), 2 rejected (access)`,
    /// naming only what is not zero besides `proposed`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.refused, "refused (scope)"),
            (self.rejected, "rejected (access)"),
            (self.to_resolve, "to resolve"),
            (self.held, "held for the merge"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        format!("{} proposed: {}", self.proposed, parts.join(", "))
    }
}

fn counts_json_or_text<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ProposalCounts>, D::Error> {
    match json_or_text(d)? {
        Value::Null => Ok(None),
        v => serde_json::from_value(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn strings_json_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match json_or_text(d)? {
        Value::Null => Ok(Vec::new()),
        v => serde_json::from_value(v).map_err(serde::de::Error::custom),
    }
}

fn opt_json_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(match json_or_text(d)? {
        Value::Null => None,
        v => Some(v),
    })
}

fn zero_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Ok(Option::<i64>::deserialize(d)?.unwrap_or(0))
}

/// An audit decision's `data` as switchyard built it: on an Avro audit topic `detail` travels as JSON
/// text (its schema cannot type it), and readers that look inside it (`story`, `trace`, `tail`, the
/// inbox's history) get it back as JSON here. Data read from JSON is returned unchanged.
pub fn audit_detail_as_json(mut data: Value) -> Value {
    if let Some(Value::String(text)) = data.get("detail") {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            data["detail"] = v;
        }
    }
    data
}

/// `data` of a `switchyard.audit` event: one decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditData {
    pub decision: String,
    pub stage: String,
    pub resource: String,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(deserialize_with = "json_or_text")]
    pub detail: Value,
    /// Position in the resource's audit chain (1, 2, ...), set when sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Accepts a JSON value, or JSON text (how Avro-encoded topics carry free-form fields).
fn json_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(match v {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        other => other,
    })
}

/// Trace id from a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: Option<&str>) -> Option<String> {
    let tp = traceparent?;
    let mut parts = tp.split('-');
    let _version = parts.next()?;
    let id = parts.next()?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// Encodes events for their topic (JSON or the topic's Avro schema) as keyed outputs.
#[derive(Clone)]
pub struct Emitter {
    pub schemas: Arc<SchemaRegistry>,
    pub topics: Arc<TopicCatalog>,
}

impl Emitter {
    pub fn new(schemas: SchemaRegistry, topics: TopicCatalog) -> Self {
        Emitter {
            schemas: Arc::new(schemas),
            topics: Arc::new(topics),
        }
    }

    /// The output record for `ev` on `topic`, keyed by the event's subject (the resource id).
    pub fn emit(&self, topic: &str, ev: &CloudEvent) -> Result<Output, ProcessError> {
        self.emit_as(topic, ev, None)
    }

    /// [`Emitter::emit`] with `schema` (when the topic is Avro) instead of the topic's own: a
    /// batch's seal shares the audit topic with the decisions it seals, under a schema of its own.
    pub fn emit_as(
        &self,
        topic: &str,
        ev: &CloudEvent,
        schema: Option<&str>,
    ) -> Result<Output, ProcessError> {
        let (encoding, own) = self.topics.encoding_of(topic);
        let schema = schema.or(own);
        let enc = codec::encode(ev, encoding, schema, &self.schemas).map_err(|e| {
            ProcessError::from(e).context(&format!("cannot encode {} for {topic}", ev.ty))
        })?;
        let key = ev.subject.clone().unwrap_or_default();
        let out =
            Output::new(topic, key, enc.payload).header(CONTENT_TYPE_HEADER, enc.content_type);
        // The trace context as a header too, for consumers that read no CloudEvent extension.
        Ok(match ev.traceparent() {
            Some(tp) => out.header("traceparent", tp),
            None => out,
        })
    }
}

impl Emitter {
    /// Whether `name` is among the schemas records can be written with.
    pub fn knows_schema(&self, name: &str) -> bool {
        self.schemas.get(name).is_some()
    }

    /// An already encoded record for `topic` written again byte for byte (a seal re-emitted by
    /// [`crate::audit::Sealer`]), with the content type of the topic's encoding.
    pub fn encoded(&self, topic: &str, key: &str, payload: Vec<u8>) -> Output {
        let ct = match self.topics.encoding_of(topic).0 {
            codec::Encoding::Json => codec::STRUCTURED_JSON,
            codec::Encoding::Avro => codec::STRUCTURED_AVRO,
        };
        Output::new(topic, key, payload).header(CONTENT_TYPE_HEADER, ct)
    }
}

/// Builds an audit event (id deterministic from `id_parts`) about `resource`. `time` (RFC 3339) is
/// when the decision was made — taken from the input or the recorded outcome, never "now" at
/// emission, so a redelivered input yields byte-identical records.
pub fn audit_event(
    source: &str,
    id_parts: &[&str],
    audit: &AuditData,
    traceparent: Option<&str>,
    time: &str,
) -> Result<CloudEvent, ProcessError> {
    let mut ev = CloudEvent::new(
        format!("audit-{}", crate::pattern::stable_id(id_parts)),
        source,
        types::AUDIT,
    )
    .with_subject(audit.resource.clone())
    .with_time(time)
    .with_typed_data(audit)?
    .with_extension("tenant", audit.tenant.clone());
    if let Some(tp) = traceparent {
        ev = ev.with_extension("traceparent", tp);
    }
    Ok(ev)
}

/// A switchyard record: `ty` event with `data`, about `resource`, keyed by it, stamped with `time`
/// (see [`audit_event`]).
#[allow(clippy::too_many_arguments)]
pub fn record_event<T: Serialize>(
    id: String,
    source: &str,
    ty: &str,
    resource: &str,
    tenant: &str,
    traceparent: Option<&str>,
    time: &str,
    data: &T,
) -> Result<CloudEvent, ProcessError> {
    let mut ev = CloudEvent::new(id, source, ty)
        .with_subject(resource)
        .with_time(time)
        .with_typed_data(data)?
        .with_extension("tenant", tenant);
    if let Some(tp) = traceparent {
        ev = ev.with_extension("traceparent", tp);
    }
    Ok(ev)
}

/// Serializes typed data into an event's `data`.
pub fn data_value<T: Serialize>(data: &T) -> Result<Value, ProcessError> {
    Ok(serde_json::to_value(data)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode, encode_single_object, Encoding, RecordView};
    use crate::schema::SchemaRegistry;
    use serde_json::json;

    #[test]
    fn a_stated_confidence_is_a_number_from_0_to_1() {
        let spec = |c: Value| {
            serde_json::from_value::<ProposalSpec>(json!({"action": "a", "confidence": c}))
        };
        assert_eq!(spec(json!(0.4)).unwrap().confidence, Some(0.4));
        assert_eq!(spec(Value::Null).unwrap().confidence, None);
        let e = serde_json::from_value::<AgentResponse>(
            json!({"proposals": [{"action": "a", "confidence": 1.5}]}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("confidence must be a number from 0 to 1, not 1.5"),
            "{e}"
        );
        let e = spec(json!("high")).unwrap_err().to_string();
        assert!(e.contains("not a string"), "{e}");
    }

    /// Approval records written before `rule`, `confidence`, `level` and `group` (approval.v1)
    /// stay readable; the current schema carries them.
    #[test]
    fn approval_records_of_the_previous_schema_stay_readable() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let s = SchemaRegistry::load_dir(&dir).expect("repo schemas load");
        let view = |p: &[u8]| -> CloudEvent {
            let rv = RecordView {
                key: None,
                payload: p,
                headers: &[],
            };
            decode(rv, &s).expect("readable")
        };
        let old = json!({"approval_id": "apr-1", "action_id": "act-1", "action": "rollback", "resource": "r",
            "tenant": "default", "status": "pending", "decided_by": null, "why": null, "expires_at": null,
            "action_record": "{}"});
        let ev = CloudEvent::new("apr-1-pending", "t", types::APPROVAL)
            .with_subject("r")
            .with_data(old);
        let v1 = s.get("approval.v1").expect("the previous version is kept");
        let payload = encode_single_object(serde_json::to_value(&ev).unwrap(), v1).unwrap();
        let back = view(&payload).data.unwrap();
        assert!(back.get("rule").is_none() && back.get("level").is_none());
        let a: ApprovalData = serde_json::from_value(back).expect("a v1 record reads");
        assert_eq!((a.requested_at, a.expires_at), (0, 0));
        // Read as JSON (and as stored in Redis by an older version): the fields take defaults.
        let a: ApprovalData =
            serde_json::from_value(json!({"approval_id": "apr-1", "action_id": "act-1",
            "action": "rollback", "resource": "r", "tenant": "default", "status": "pending",
            "requested_at": 1, "expires_at": 2, "action_record": {}}))
            .unwrap();
        assert_eq!(
            (a.rule, a.confidence, a.level, a.group),
            (None, None, 0, None)
        );
        // What switchyard writes (an ApprovalData, serialised) fits the current schema and reads back.
        let written: ApprovalData = serde_json::from_value(json!({"approval_id": "apr-1",
            "action_id": "act-1", "action": "rollback", "resource": "r", "tenant": "default",
            "status": "escalated", "requested_at": 1_795_843_000, "expires_at": 1_795_843_600,
            "action_record": {"action": "rollback"}, "rule": "prod", "confidence": 0.25, "level": 1,
            "group": "leads"}))
        .unwrap();
        let now = CloudEvent::new("apr-1-escalated", "t", types::APPROVAL)
            .with_subject("r")
            .with_typed_data(&written)
            .unwrap();
        let enc = encode(&now, Encoding::Avro, Some("approval"), &s).unwrap();
        let back = view(&enc.payload).data.unwrap();
        let read: ApprovalData = serde_json::from_value(back.clone()).unwrap();
        assert_eq!(read, written);
        assert_eq!(
            (
                &back["rule"],
                &back["confidence"],
                &back["level"],
                &back["group"]
            ),
            (&json!("prod"), &json!(0.25), &json!(1), &json!("leads"))
        );
    }

    /// Every record switchyard writes to a topic with a schema, with every field set, survives its
    /// topic's current Avro schema unchanged. Avro drops what a schema does not name, so a field added
    /// to a record but not to its schema is lost on Avro topics (actions lost `agents`, `priority` and
    /// `impact` that way, and approvals' epoch-second times did not fit at all).
    #[test]
    fn every_record_round_trips_through_its_avro_schema() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let s = SchemaRegistry::load_dir(&dir).expect("repo schemas load");
        fn check<T>(s: &SchemaRegistry, schema: &str, ty: &str, data: Value)
        where
            T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
        {
            let written: T = serde_json::from_value(data).expect("a record of the type");
            // Every field set: nothing was skipped as empty.
            let full = serde_json::to_value(&written).unwrap();
            let ev = CloudEvent::new("id-1", "switchyard/test", ty)
                .with_subject("r")
                .with_time("2026-11-28T05:00:00Z")
                .with_extension("tenant", "acme")
                .with_extension(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .with_typed_data(&written)
                .unwrap();
            let enc = encode(&ev, Encoding::Avro, Some(schema), s)
                .unwrap_or_else(|e| panic!("{schema}: {e}"));
            // Written directly along the schema, byte for byte what apache_avro's value tree writes.
            let reg = s.get(schema).unwrap();
            let json = serde_json::to_value(&ev).unwrap();
            let mut direct = reg.header.to_vec();
            assert!(
                reg.write_json(&json, &mut direct).is_some(),
                "{schema}: not direct"
            );
            let tree = crate::codec::encode_via_value_tree(json, reg).unwrap();
            assert_eq!(direct, tree, "{schema}");
            assert_eq!(enc.payload, tree, "{schema}");
            let rv = RecordView {
                key: None,
                payload: &enc.payload,
                headers: &[],
            };
            let back = decode(rv, s).unwrap_or_else(|e| panic!("{schema}: {e}"));
            assert_eq!(
                (&back.id, &back.ty, &back.subject, &back.time),
                (&ev.id, &ev.ty, &ev.subject, &ev.time)
            );
            assert_eq!(back.extensions, ev.extensions, "{schema}");
            let read: T = serde_json::from_value(back.data.unwrap())
                .unwrap_or_else(|e| panic!("{schema}: {e}"));
            assert_eq!(read, written, "{schema}: {full}");
        }
        check::<TaskData>(
            &s,
            "task",
            types::TASK,
            json!({"task_id": "t", "workflow_id": "w",
            "agent": "a", "route": "r", "priority": 3, "resource": "r", "tenant": "acme",
            "event": {"id": "e", "data": {"x": [1, 2]}},
            "step": {"run_id": "run", "workflow": "wf", "step": "s", "attempt": 2, "hold": true,
                "inputs": {"k": "v"}, "run_started_at": "2026-11-28T05:00:00Z", "round": 1,
                "delegates": ["b"]}}),
        );
        check::<ResultData>(
            &s,
            "result",
            types::RESULT,
            json!({"task_id": "t", "workflow_id": "w",
            "agent": "a", "resource": "r", "tenant": "acme", "status": "failed", "duration_ms": 12,
            "attempts": 2, "findings": [{"key": "k", "value": 1}], "proposals": [{"action": "page"}],
            "error": "boom", "event_id": "e", "answer": {"text": "hi"}, "agent_digest": "d",
            "ran": "2026-11-28T05:00:00Z", "proposal_counts": {"proposed": 3, "refused": 1,
            "rejected": 1}, "warnings": ["w1"]}),
        );
        check::<ProposalData>(
            &s,
            "proposal",
            types::PROPOSAL,
            json!({"proposal_id": "p",
            "task_id": "t", "workflow_id": "w", "agent": "a", "action": "rollback", "resource": "r",
            "tenant": "acme", "parameters": {"to": "v1"}, "priority": 5, "impact": "high",
            "context_version": 7, "reason": "why", "event_id": "e", "cost": 1.5,
            "seen_at": "2026-11-28T05:00:00Z", "approved_by": "carol", "edit_of": "p0",
            "confidence": 0.75}),
        );
        check::<ActionData>(
            &s,
            "action",
            types::ACTION,
            json!({"action_id": "act",
            "action": "rollback", "resource": "r", "tenant": "acme", "workflow_id": "w",
            "parameters": {"to": "v1"}, "fencing_token": 9, "proposals": ["p1", "p2"],
            "agents": ["a", "b"], "priority": 5, "impact": "medium", "approved_by": "carol",
            "reason": "why"}),
        );
        check::<ApprovalData>(
            &s,
            "approval",
            types::APPROVAL,
            json!({"approval_id": "apr",
            "action_id": "act", "action": "rollback", "resource": "r", "tenant": "acme",
            "status": "approved", "decided_by": "carol", "why": "ok", "requested_at": 1_795_843_000,
            "expires_at": 1_795_843_600, "action_record": {"action": "rollback"}, "rule": "prod",
            "confidence": 0.5, "level": 1, "group": "leads"}),
        );
        check::<AuditData>(
            &s,
            "audit",
            types::AUDIT,
            json!({"decision": "accepted",
            "stage": "resolve", "resource": "r", "tenant": "acme", "event_id": "e", "task_id": "t",
            "workflow_id": "w", "trace_id": "tr", "reason": "why", "detail": {"k": [1]}, "seq": 4,
            "prev_hash": "ab", "hash": "cd"}),
        );
        // And with every optional field left out (JSON omits them; Avro writes null).
        check::<TaskData>(
            &s,
            "task",
            types::TASK,
            json!({"task_id": "t", "workflow_id": "w",
            "agent": "a", "route": "r", "priority": 0, "resource": "r", "tenant": "acme",
            "event": {}}),
        );
        check::<ResultData>(
            &s,
            "result",
            types::RESULT,
            json!({"task_id": "t", "workflow_id": "w",
            "agent": "a", "resource": "r", "tenant": "acme", "status": "ok", "duration_ms": 0,
            "attempts": 1, "findings": [], "proposals": []}),
        );
        check::<ProposalData>(
            &s,
            "proposal",
            types::PROPOSAL,
            json!({"proposal_id": "p",
            "task_id": "t", "workflow_id": "w", "agent": "a", "action": "page", "resource": "r",
            "tenant": "acme", "parameters": {}, "priority": 0, "impact": "low",
            "context_version": 0}),
        );
        check::<ApprovalData>(
            &s,
            "approval",
            types::APPROVAL,
            json!({"approval_id": "apr",
            "action_id": "act", "action": "rollback", "resource": "r", "tenant": "acme",
            "status": "pending", "requested_at": 1, "expires_at": 2, "action_record": {}}),
        );
        check::<AuditData>(
            &s,
            "audit",
            types::AUDIT,
            json!({"decision": "routed",
            "stage": "route", "resource": "r", "tenant": "acme", "detail": {}}),
        );
        check::<crate::audit::SealData>(
            &s,
            crate::audit::SEAL_SCHEMA,
            crate::audit::SEAL_TYPE,
            json!({"version": 2, "chain": "route/t/0", "seq": 1, "root": "cd", "entries": []}),
        );
        check::<crate::audit::SealData>(
            &s,
            crate::audit::SEAL_SCHEMA,
            crate::audit::SEAL_TYPE,
            json!({"version": 2, "chain": "resolve/t/0", "seq": 3, "prev": "ab", "root": "cd",
                "entries": [{"hash": "h1", "id": "i1", "tenant": "acme", "resource": "r"}],
                "mac": "k1:00ff"}),
        );
    }
}
