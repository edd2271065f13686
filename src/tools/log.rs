//! Where tool calls are written: a `tool_call` audit record (without arguments or result) sealed
//! into the process's own chain, and the whole call on the tool-calls topic, keyed by task id
//! (action id for an executed action).

use serde::Serialize;
use serde_json::{json, Value};

use super::model::CallCtx;
use crate::records::AuditData;

/// Where tool calls are written: the audit recorder and the tool-calls topic.
#[derive(Clone)]
pub struct ToolCallLog {
    pub audit: crate::audit::Recorder,
    pub topic: String,
}

impl ToolCallLog {
    /// Records one tool call: a `tool_call` audit record (arguments and result left out) and the
    /// full call on the tool-calls topic, keyed by task id. Written in the background (best
    /// effort: a call inside an LLM agent's loop); the tools stage writes its calls itself, with
    /// its commit ([`Self::records`]).
    pub fn write(&self, ctx: &CallCtx, call: &ToolCallRecord) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let id = format!("tool-{}", uuid::Uuid::new_v4().simple());
        let (audit, ev) = self.records(ctx, call, id, &now);
        self.audit
            .record("tools", "tool_call", audit, Some((self.topic.clone(), ev)));
    }

    /// The `tool_call` audit data and the tool-calls record (event `id`, stamped `time`) of one call.
    pub fn records(
        &self,
        ctx: &CallCtx,
        call: &ToolCallRecord,
        id: String,
        time: &str,
    ) -> (AuditData, crate::event::CloudEvent) {
        let audit = AuditData {
            decision: "tool_call".into(),
            // The tools stage carries out actions; an agent calls read-only tools in its loop.
            stage: if ctx.action_id.is_some() {
                "tools"
            } else {
                "agents"
            }
            .into(),
            resource: ctx.resource.clone(),
            tenant: ctx.tenant.clone(),
            event_id: (!ctx.event_id.is_empty()).then(|| ctx.event_id.clone()),
            task_id: (!ctx.task_id.is_empty()).then(|| ctx.task_id.clone()),
            workflow_id: None,
            trace_id: None,
            reason: call.error.clone(),
            detail: json!({"agent": ctx.agent, "tool": call.tool, "effect": call.effect,
                           "outcome": call.outcome, "iteration": call.iteration,
                           "duration_ms": call.duration_ms, "action_id": ctx.action_id}),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let key = ctx.action_id.clone().unwrap_or_else(|| ctx.task_id.clone());
        let ev = crate::event::CloudEvent::new(id, "switchyard/tools", "switchyard.tool_call")
            .with_subject(key)
            .with_time(time)
            .with_data(json!({
                "task_id": ctx.task_id, "action_id": ctx.action_id, "agent": ctx.agent,
                "tenant": ctx.tenant, "resource": ctx.resource, "call": call,
            }));
        (audit, ev)
    }
}

/// One tool call as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallRecord {
    pub tool: String,
    pub effect: &'static str,
    pub iteration: u32,
    pub arguments: Value,
    /// `ok`, `error`, `refused`, `proposed`, `executed`.
    pub outcome: &'static str,
    pub result: Value,
    pub error: Option<String>,
    pub duration_ms: u64,
}
