//! Built-in agents (Rust). Each is a small struct implementing [`Agent`]; [`create`] is the registry.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::{
    Agent, AgentError, AgentRequest, AgentResponse, AgentSpec, Finding, Impact, ProposalSpec,
};

/// Names of the built-in agents this build has.
pub const NAMES: &[&str] = &["deploy-guard", "sla-responder", "cost-guard"];

/// Creates the built-in agent `name` with its settings.
pub fn create(name: &str, spec: &AgentSpec) -> Option<Arc<dyn Agent>> {
    Some(match name {
        "deploy-guard" => Arc::new(DeployGuard),
        "sla-responder" => Arc::new(SlaResponder {
            correlation_window: chrono::Duration::minutes(
                spec.params
                    .get("correlation_window_minutes")
                    .and_then(Value::as_i64)
                    .unwrap_or(30),
            ),
        }),
        "cost-guard" => Arc::new(CostGuard),
        _ => return None,
    })
}

fn event_time(req: &AgentRequest) -> DateTime<Utc> {
    req.event
        .time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
}

fn data(req: &AgentRequest) -> &Value {
    req.event.data.as_ref().unwrap_or(&Value::Null)
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn ready(r: AgentResponse) -> BoxFuture<'static, Result<AgentResponse, AgentError>> {
    Box::pin(std::future::ready(Ok(r)))
}

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
                reason: Some("deployment started while the service breaches its SLA".into()),
            });
        }
        ready(out)
    }
}

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
                reason: Some(format!(
                    "spend {spend:.2} exceeds budget {budget:.2} {currency}"
                )),
            }],
        };
        ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::ScopedContext;
    use crate::event::CloudEvent;
    use crate::records::TaskData;
    use std::collections::BTreeMap;

    fn req(ty: &str, data: Value, facts: BTreeMap<String, Value>) -> AgentRequest {
        let ev = CloudEvent::new("e", "t", ty)
            .with_subject("svc")
            .with_data(data)
            .with_time_now();
        AgentRequest {
            agent: "x".into(),
            task: TaskData {
                task_id: "t".into(),
                workflow_id: "w".into(),
                agent: "x".into(),
                route: "r".into(),
                priority: 0,
                resource: "svc".into(),
                tenant: "default".into(),
                event: Value::Null,
            },
            event: ev,
            context: ScopedContext::new(3, facts, &["*".to_string()]),
            attempt: 1,
        }
    }

    #[test]
    fn severity_from_gap() {
        assert_eq!(
            severity(&json!({"objective": 99.9, "observed": 97.0})),
            "critical"
        );
        assert_eq!(
            severity(&json!({"objective": 99.9, "observed": 99.5})),
            "major"
        );
        assert_eq!(
            severity(&json!({"objective": 99.9, "observed": 99.85})),
            "minor"
        );
        assert_eq!(severity(&json!({"severity": "sev1"})), "sev1");
    }

    #[tokio::test]
    async fn sla_responder_ignores_old_deployments() {
        let old = (Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
        let facts = BTreeMap::from([(
            "last_completed_deployment".to_string(),
            json!({"version": "v2", "previous_version": "v1", "at": old}),
        )]);
        let agent = SlaResponder {
            correlation_window: chrono::Duration::minutes(30),
        };
        let r = req("sla.breached", json!({"slo": "a"}), facts);
        let out = agent.call(&r).await.unwrap();
        let actions: Vec<_> = out.proposals.iter().map(|p| p.action.as_str()).collect();
        assert_eq!(actions, ["page"]);
    }

    #[tokio::test]
    async fn deploy_guard_holds_during_breach_only() {
        let facts = BTreeMap::from([("sla".to_string(), json!({"active": true}))]);
        let out = DeployGuard
            .call(&req("deployment.started", json!({"version": "v3"}), facts))
            .await
            .unwrap();
        assert_eq!(out.proposals[0].action, "deployment.hold");
        let out = DeployGuard
            .call(&req(
                "deployment.started",
                json!({"version": "v3"}),
                BTreeMap::new(),
            ))
            .await
            .unwrap();
        assert!(out.proposals.is_empty());
    }
}
