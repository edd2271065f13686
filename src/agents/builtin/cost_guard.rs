//! `cost-guard`: proposes a low-priority `scale_down` with the overspend.

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::input::{data, ready, str_field};
use crate::agents::model::{Agent, AgentError, AgentRequest};
use crate::records::{AgentResponse, Finding, Impact, ProposalSpec};

/// Proposes a low-priority `scale_down` with the overspend.
pub struct CostGuard;

impl Agent for CostGuard {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        let d = data(req);
        let budget = d.get("budget").and_then(Value::as_f64).unwrap_or(0.0);
        let spend = d.get("spend").and_then(Value::as_f64).unwrap_or(0.0);
        let overspend = (spend - budget).max(0.0);
        let currency = str_field(d, "currency").unwrap_or("USD");
        let out = AgentResponse {
            findings: vec![Finding {
                key: "cost".into(),
                value: json!({"budget": budget, "spend": spend, "overspend": overspend, "currency": currency,
                    "period": str_field(d, "period"), "event_id": req.event.id}),
            }],
            proposals: vec![ProposalSpec {
                action: "scale_down".into(),
                parameters: json!({"overspend": overspend, "currency": currency}),
                priority: 10,
                impact: Impact::Low,
                cost: None,
                resource: None,
                seen_version: None,
                seen_at: None,
                confidence: None,
                reason: Some(format!(
                    "spend {spend:.2} exceeds budget {budget:.2} {currency}"
                )),
            }],
            ..Default::default()
        };
        ready(out)
    }
}
