//! Decisions stage: approval decisions arriving on the decisions topic from other systems
//! (`{"approval_id", "decision": "approve|reject", "by", "why"}`, as a CloudEvent's data or plain
//! JSON). It also runs the sweeper that expires (or escalates) approvals nobody decided in time.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;

use super::services::{runner, Runner, Services};
use crate::error::ProcessError;
use crate::governance::approvals::{run_sweeper, ApprovalError, Approvals, Verdict};
use crate::kafka::runtime::{each, Done, Processor};
use crate::kafka::{Input, Output};
use crate::telemetry::METRICS;
use crate::topics::TopicsConfig;

/// The decisions stage consumes the decisions topic.
pub fn inputs(t: &TopicsConfig) -> Vec<String> {
    vec![t.decisions.clone()]
}

/// Builds the stage and starts the approvals sweeper.
pub fn build(s: &Services) -> BoxFuture<'_, Result<Runner, String>> {
    Box::pin(async move {
        // Dashboards and alerts see the series before the first sweep.
        METRICS
            .approvals_pending
            .with_label_values(&["default"])
            .set(0);
        s.tracker.spawn(run_sweeper(
            s.approvals.clone(),
            s.producer.clone(),
            s.approvals.config.sweep_interval(),
            s.stop.clone(),
        ));
        Ok(runner(DecisionsStage {
            approvals: s.approvals.clone(),
        }))
    })
}

pub struct DecisionsStage {
    pub approvals: Arc<Approvals>,
}

#[derive(Deserialize)]
struct DecisionRecord {
    approval_id: String,
    decision: Verdict,
    by: String,
    #[serde(default)]
    why: String,
}

impl Processor for DecisionsStage {
    fn stage(&self) -> &'static str {
        "decisions"
    }

    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        each(recs, |rec| self.decide(rec))
    }
}

impl DecisionsStage {
    async fn decide(&self, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
        crate::codec::check_json_depth(&rec.payload, crate::codec::MAX_DEPTH)?;
        let v: Value = serde_json::from_slice(&rec.payload)
            .map_err(|e| ProcessError::poison("malformed_json", e.to_string()))?;
        let body = if v.get("specversion").is_some() {
            v.get("data").cloned().unwrap_or(Value::Null)
        } else {
            v
        };
        let d: DecisionRecord = serde_json::from_value(body)
            .map_err(|e| ProcessError::poison("malformed_decision", e.to_string()))?;
        match self
            .approvals
            .decide(&d.approval_id, d.decision, &d.by, &d.why, false, false)
            .await
        {
            Ok(x) => Ok(x.outputs),
            Err(ApprovalError::NotFound(id)) => Err(ProcessError::Poison {
                reason: "unknown_approval",
                detail: format!("approval {id} not found"),
            }),
            Err(ApprovalError::Invalid(m)) => Err(ProcessError::poison("invalid_decision", m)),
            Err(ApprovalError::TooLarge(m)) => Err(ProcessError::poison("output_too_large", m)),
            Err(ApprovalError::Forbidden(m)) => Err(ProcessError::poison("forbidden_decision", m)),
            Err(e @ ApprovalError::Encode(_)) => Err(ProcessError::Fatal(e.to_string())),
            // Unreadable state never becomes readable by waiting: dead-lettered (`corrupt_state`),
            // so one bad record does not hold up every decision after it on the partition.
            Err(ApprovalError::Store(e)) => Err(ProcessError::from(e)),
            Err(e) => Err(ProcessError::Transient(e.to_string())),
        }
    }
}
