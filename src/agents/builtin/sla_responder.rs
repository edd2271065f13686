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
            // Candidates: this resource's last deployment, and those of the resources it relates
            // to (its `related:` facts, e.g. what it depends_on); the latest within the window
            // before the breach is the suspect.
            let in_window = |dep: &Value| {
                dep.get("at")
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .filter(|t| {
                        *t <= at + chrono::Duration::seconds(5)
                            && at - *t <= self.correlation_window
                    })
            };
            let mut candidates: Vec<(Option<String>, Option<&str>, &Value)> = req
                .context
                .get("last_completed_deployment")
                .map(|d| (None, None, d))
                .into_iter()
                .collect();
            for (relation, resources) in req.context.related().as_object().into_iter().flatten() {
                for (r, x) in resources.as_object().into_iter().flatten() {
                    if let Some(dep) = x["facts"]["last_completed_deployment"].get("value") {
                        candidates.push((Some(r.clone()), Some(relation.as_str()), dep));
                    }
                }
            }
            let suspect = candidates
                .into_iter()
                .filter_map(|(r, rel, dep)| in_window(dep).map(|t| (t, r, rel, dep)))
                // The latest; on a tie, the resource's own deployment.
                .max_by_key(|(t, r, ..)| (*t, r.is_none()));
            if let Some((_, other, relation, dep)) = suspect {
                out.findings.push(Finding {
                    key: "suspect_deployment".into(),
                    value: json!({
                        "resource": other.as_deref().unwrap_or(&req.task.resource),
                        "relation": relation,
                        "version": dep.get("version"),
                        "previous_version": dep.get("previous_version"),
                        "completed_at": dep.get("at"),
                        "deployment_event": dep.get("event_id"),
                        "breach_event": req.event.id,
                    }),
                });
                if let Some(prev) = dep.get("previous_version").and_then(Value::as_str) {
                    let whose = match (&other, relation) {
                        (Some(o), Some(rel)) => {
                            format!(" of {o} ({} {rel} {o})", req.task.resource)
                        }
                        _ => String::new(),
                    };
                    out.proposals.push(ProposalSpec {
                        action: "rollback".into(),
                        parameters: json!({
                            "to_version": prev,
                            "from_version": dep.get("version"),
                            "deployment_event": dep.get("event_id"),
                            "breach_of": req.task.resource,
                        }),
                        priority: 100,
                        impact: Impact::High,
                        cost: None,
                        resource: other.clone(),
                        seen_version: None,
                        seen_at: None,
                        confidence: None,
                        reason: Some(format!(
                            "SLO {} of {} breached within {} min of deployment {}{whose}",
                            str_field(d, "slo").unwrap_or("?"),
                            req.task.resource,
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
            resource: None,
            seen_version: None,
            seen_at: None,
            confidence: None,
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
