//! `deploy-guard`: keeps deployments in context and holds deployments during an SLA breach.

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::input::{data, event_time, ready, str_field};
use crate::agents::model::{Agent, AgentError, AgentRequest};
use crate::records::{AgentResponse, Finding, Impact, ProposalSpec};

/// Records deployments in context; proposes `deployment.hold` when a deployment starts during an
/// active SLA breach.
pub struct DeployGuard;

impl Agent for DeployGuard {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        let d = data(req);
        let at = event_time(req).to_rfc3339();
        let status = req
            .event
            .ty
            .strip_prefix("deployment.")
            .unwrap_or(&req.event.ty);
        let record = json!({
            "version": str_field(d, "version"),
            "previous_version": str_field(d, "previous_version"),
            "environment": str_field(d, "environment"),
            "status": status,
            "at": at,
            "event_id": req.event.id,
        });
        let mut out = AgentResponse::default();
        out.findings.push(Finding {
            key: "deployment".into(),
            value: record.clone(),
        });
        if status == "completed" {
            out.findings.push(Finding {
                key: "last_completed_deployment".into(),
                value: record,
            });
        }
        let breach_active = req
            .context
            .get("sla")
            .and_then(|s| s.get("active"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if status == "started" && breach_active {
            out.proposals.push(ProposalSpec {
                action: "deployment.hold".into(),
                parameters: json!({"version": str_field(d, "version"), "deployment_event": req.event.id}),
                priority: 80,
                impact: Impact::Medium,
                cost: None,
                resource: None,
                seen_version: None,
                seen_at: None,
                confidence: None,
                reason: Some("deployment started while the service breaches its SLA".into()),
            });
        }
        ready(out)
    }
}
