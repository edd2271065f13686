//! `sla-responder`: keeps the breach state, names a suspect deployment, proposes rollback and page.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::input::{data, event_time, ready, str_field};
use crate::agents::model::{Agent, AgentError, AgentRequest};
use crate::records::{AgentResponse, Finding, Impact, ProposalSpec};

/// Keeps the breach state; on a breach shortly after a completed deployment names the suspect and
/// proposes a rollback; always pages the owner.
pub struct SlaResponder {
    pub correlation_window: chrono::Duration,
}

/// Severity from the breach: the event's own `severity`, else from how far the observed value misses the
/// objective (in percentage points).
pub fn severity(d: &Value) -> &str {
    if let Some(s) = str_field(d, "severity") {
        return s;
    }
    let gap = match (
        d.get("objective").and_then(Value::as_f64),
        d.get("observed").and_then(Value::as_f64),
    ) {
        (Some(o), Some(x)) => (o - x).abs(),
        _ => return "major",
    };
    if gap >= 1.0 {
        "critical"
    } else if gap >= 0.1 {
        "major"
    } else {
        "minor"
    }
}

impl Agent for SlaResponder {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        let d = data(req);
        let at = event_time(req);
        let breached = req.event.ty == "sla.breached";
        let sev = if breached { severity(d) } else { "resolved" };
        let mut out = AgentResponse::default();
        out.findings.push(Finding {
            key: "sla".into(),
            value: json!({
                "active": breached,
                "slo": str_field(d, "slo"),
                "severity": sev,
                "since": at.to_rfc3339(),
                "event_id": req.event.id,
            }),
        });
        if breached {
            let suspect = req.context.get("last_completed_deployment").filter(|dep| {
                dep.get("at")
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| {
                        let t = t.with_timezone(&Utc);
                        t <= at + chrono::Duration::seconds(5) && at - t <= self.correlation_window
                    })
            });
            if let Some(dep) = suspect {
                out.findings.push(Finding {
                    key: "suspect_deployment".into(),
                    value: json!({
                        "version": dep.get("version"),
                        "previous_version": dep.get("previous_version"),
                        "completed_at": dep.get("at"),
                        "deployment_event": dep.get("event_id"),
                        "breach_event": req.event.id,
                    }),
                });
                if let Some(prev) = dep.get("previous_version").and_then(Value::as_str) {
                    out.proposals.push(ProposalSpec {
                        action: "rollback".into(),
                        parameters: json!({
                            "to_version": prev,
                            "from_version": dep.get("version"),
                            "deployment_event": dep.get("event_id"),
                        }),
                        priority: 100,
                        impact: Impact::High,
                        cost: None,
                        reason: Some(format!(
                            "SLO {} breached within {} min of deployment {}",
                            str_field(d, "slo").unwrap_or("?"),
                            self.correlation_window.num_minutes(),
                            dep.get("version").and_then(Value::as_str).unwrap_or("?")
                        )),
                    });
                }
            }
        }
        out.proposals.push(ProposalSpec {
            action: "page".into(),
            parameters: json!({
                "owner": str_field(d, "owner").unwrap_or("unknown"),
                "severity": sev,
                "slo": str_field(d, "slo"),
                "service": req.task.resource,
            }),
            priority: 50,
            impact: Impact::Low,
            cost: None,
            reason: Some(if breached {
                "SLO breached".into()
            } else {
                "SLO recovered".into()
            }),
        });
        ready(out)
    }
}

/// Built from the agent's `params`: `correlation_window_minutes` (default 30).
pub fn build(
    params: &std::collections::BTreeMap<String, Value>,
) -> Result<std::sync::Arc<dyn Agent>, String> {
    let minutes = match params.get("correlation_window_minutes") {
        None => 30,
        Some(v) => v.as_i64().filter(|m| *m > 0).ok_or_else(|| {
            format!("params.correlation_window_minutes must be a positive whole number, not {v}")
        })?,
    };
    Ok(std::sync::Arc::new(SlaResponder {
        correlation_window: chrono::Duration::minutes(minutes),
    }))
}
