//! The incident-response team of the shipped example workflow (README, "Workflows"): three
//! specialists that run in parallel with the root-cause analysis, and the commander that
//! supervises them and alone proposes.
//!
//! - `business-impact`: how bad the breach is for the business (severity, points below the
//!   objective, revenue at risk from `params.revenue_per_minute`);
//! - `related-incidents`: earlier SLA and deployment events of the resource (its recent events);
//! - `stakeholder-writer`: drafts a status message, from the event or from a supervisor's
//!   instructions;
//! - `incident-commander`: reads every branch's result (`task.step.inputs`), delegates the final
//!   stakeholder message to the writer with the root cause and impact, then proposes the rollback
//!   (when a branch suspected the deployment), the page and the status update.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::input::{data, ready, str_field};
use super::sla_responder::severity;
use crate::agents::model::{Agent, AgentError, AgentRequest};
use crate::records::{AgentResponse, Delegation, Finding, Impact, ProposalSpec};

type Answer<'a> = BoxFuture<'a, Result<AgentResponse, AgentError>>;

fn finding(key: &str, value: Value) -> Finding {
    Finding {
        key: key.into(),
        value,
    }
}

fn gap(d: &Value) -> Option<f64> {
    Some((d.get("objective")?.as_f64()? - d.get("observed")?.as_f64()?).abs())
}

/// Points below the objective and money at risk.
pub struct BusinessImpact {
    pub revenue_per_minute: f64,
}

pub fn business_impact(
    p: &std::collections::BTreeMap<String, Value>,
) -> Result<Arc<dyn Agent>, String> {
    let revenue_per_minute = match p.get("revenue_per_minute") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|x| *x >= 0.0)
            .ok_or("params.revenue_per_minute must be a non-negative number")?,
    };
    Ok(Arc::new(BusinessImpact { revenue_per_minute }))
}

impl Agent for BusinessImpact {
    fn call<'a>(&'a self, req: &'a AgentRequest) -> Answer<'a> {
        let d = data(req);
        let sev = severity(d);
        // Share of requests failing ~ the points below the objective.
        let points = gap(d).unwrap_or(0.0);
        let at_risk = self.revenue_per_minute * 60.0 * points / 100.0;
        ready(AgentResponse {
            findings: vec![finding(
                "incident.impact",
                json!({"severity": sev, "slo": str_field(d, "slo"), "points_below_objective": (points * 100.0).round() / 100.0,
                       "revenue_at_risk_per_hour": at_risk.round(), "owner": str_field(d, "owner")}),
            )],
            ..Default::default()
        })
    }
}

/// Earlier SLA and deployment events of the resource.
pub struct RelatedIncidents;

impl Agent for RelatedIncidents {
    fn call<'a>(&'a self, req: &'a AgentRequest) -> Answer<'a> {
        let related: Vec<Value> = req
            .context
            .get("recent_events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e["id"] != json!(req.event.id))
            .filter(|e| {
                e["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("sla.") || t.starts_with("deployment."))
            })
            .take(5)
            .map(|e| json!({"id": e["id"], "type": e["type"], "time": e["time"]}))
            .collect();
        ready(AgentResponse {
            findings: vec![finding(
                "incident.related",
                json!({"count": related.len(), "events": related}),
            )],
            ..Default::default()
        })
    }
}

/// Drafts a status message.
pub struct StakeholderWriter;

impl Agent for StakeholderWriter {
    fn call<'a>(&'a self, req: &'a AgentRequest) -> Answer<'a> {
        let d = data(req);
        let instructions = req
            .task
            .step
            .as_ref()
            .and_then(|s| s.inputs.get("instructions"))
            .and_then(Value::as_str);
        let text = match instructions {
            Some(i) => format!("Status update for {}: {i}", req.task.resource),
            None => format!(
                "We are investigating degraded {} of {} ({} against an objective of {}).",
                str_field(d, "slo").unwrap_or("service"),
                req.task.resource,
                d.get("observed").unwrap_or(&Value::Null),
                d.get("objective").unwrap_or(&Value::Null)
            ),
        };
        ready(AgentResponse {
            findings: vec![finding("incident.message", json!(text))],
            ..Default::default()
        })
    }
}

/// Supervises the branches and alone proposes.
pub struct IncidentCommander;

/// Every proposal of every branch in `inputs` (`{step: {proposals: [{agent, proposal}]}}`).
fn branch_proposals(inputs: &Value) -> Vec<&Value> {
    inputs
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|s| s["proposals"].as_array().into_iter().flatten())
        .map(|p| p.get("proposal").unwrap_or(p))
        .collect()
}

/// A finding some branch wrote.
fn branch_finding<'a>(inputs: &'a Value, key: &str) -> Option<&'a Value> {
    inputs
        .as_object()?
        .values()
        .flat_map(|s| s["findings"].as_array().into_iter().flatten())
        .find(|f| f["key"] == key)
        .map(|f| &f["value"])
}

impl Agent for IncidentCommander {
    fn call<'a>(&'a self, req: &'a AgentRequest) -> Answer<'a> {
        let d = data(req);
        let step = req.task.step.as_ref();
        let inputs = step.map(|s| &s.inputs).unwrap_or(&Value::Null);
        let proposals = branch_proposals(inputs);
        let rollback = proposals.iter().find(|p| p["action"] == "rollback");
        let impact = branch_finding(inputs, "incident.impact");
        let cause = match rollback {
            Some(r) => format!(
                "suspected cause: the last deployment of {} (rollback to {} proposed)",
                r["resource"].as_str().unwrap_or(&req.task.resource),
                r["parameters"]["to_version"]
                    .as_str()
                    .unwrap_or("the previous version")
            ),
            None => "cause under investigation".to_string(),
        };
        let severity = impact
            .and_then(|i| i["severity"].as_str())
            .unwrap_or("major");
        let delegated = inputs.get("delegated");
        if delegated.is_none() && step.is_some_and(|s| !s.delegates.is_empty()) {
            // Round 0: the branches are in; have the message written with what they found.
            return ready(AgentResponse {
                delegate: vec![Delegation {
                    agent: "stakeholder-writer".into(),
                    instructions: format!(
                        "{} is degraded ({severity}; {} points below its {} objective); {cause}. Next update in 30 minutes.",
                        req.task.resource,
                        impact.map_or(json!(null), |i| i["points_below_objective"].clone()),
                        str_field(d, "slo").unwrap_or("service"),
                    ),
                }],
                ..Default::default()
            });
        }
        let message = delegated
            .and_then(|x| branch_finding(x, "incident.message"))
            .or_else(|| branch_finding(inputs, "incident.message"))
            .cloned()
            .unwrap_or_else(|| json!(format!("{} is degraded; {cause}.", req.task.resource)));
        let owner = str_field(d, "owner").unwrap_or("on-call");
        let mut out = AgentResponse {
            findings: vec![finding(
                "incident.decision",
                json!({"severity": severity, "cause": cause, "branches": inputs.as_object().map_or(0, |m| m.len()),
                       "proposals_seen": proposals.len()}),
            )],
            ..Default::default()
        };
        if let Some(r) = rollback {
            out.proposals.push(ProposalSpec {
                action: "rollback".into(),
                parameters: r["parameters"].clone(),
                priority: 100,
                impact: Impact::High,
                cost: None,
                // A branch may have suspected a dependency's deployment.
                resource: r["resource"].as_str().map(str::to_string),
                seen_version: None,
                seen_at: None,
                confidence: None,
                reason: Some(format!("incident commander: {cause}")),
            });
        }
        out.proposals.push(ProposalSpec {
            action: "page".into(),
            parameters: json!({"team": owner, "severity": severity}),
            priority: 50,
            impact: Impact::Medium,
            cost: None,
            resource: None,
            seen_version: None,
            seen_at: None,
            confidence: None,
            reason: Some(format!("{} breach, {severity}", req.task.resource)),
        });
        out.proposals.push(ProposalSpec {
            action: "status_update".into(),
            parameters: json!({"message": message}),
            priority: 10,
            impact: Impact::Low,
            cost: None,
            resource: None,
            seen_version: None,
            seen_at: None,
            confidence: None,
            reason: Some("keep stakeholders informed".into()),
        });
        ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::ScopedContext;
    use crate::event::CloudEvent;
    use crate::records::{StepRef, TaskData};

    fn req(inputs: Value, delegates: Vec<String>) -> AgentRequest {
        let data = json!({"slo": "availability", "objective": 99.9, "observed": 97.2, "owner": "team-payments"});
        AgentRequest {
            agent: "incident-commander".into(),
            task: TaskData {
                task_id: "t".into(),
                workflow_id: "w".into(),
                agent: "incident-commander".into(),
                route: "sla".into(),
                priority: 0,
                resource: "checkout".into(),
                tenant: "default".into(),
                event: Value::Null,
                step: Some(StepRef {
                    run_id: "run".into(),
                    workflow: "incident-response".into(),
                    step: "commander".into(),
                    attempt: 1,
                    hold: true,
                    inputs,
                    run_started_at: "t".into(),
                    round: 0,
                    delegates,
                }),
            },
            event: CloudEvent::new("e", "m", "sla.breached")
                .with_subject("checkout")
                .with_data(data),
            context: ScopedContext::new(1, Default::default(), &["*".to_string()]),
            attempt: 1,
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn the_commander_delegates_the_message_then_alone_proposes() {
        let branches = json!({
            "root-cause": {"status": "succeeded", "findings": [], "proposals": [
                {"agent": "sla-responder", "proposal": {"action": "rollback", "parameters": {"to_version": "v41"}}},
                {"agent": "sla-responder", "proposal": {"action": "page", "parameters": {}}}]},
            "impact": {"status": "succeeded", "proposals": [], "findings": [
                {"key": "incident.impact", "value": {"severity": "critical", "points_below_objective": 2.7}}]}
        });
        let first = IncidentCommander
            .call(&req(branches.clone(), vec!["stakeholder-writer".into()]))
            .await
            .expect("round 0");
        assert!(first.proposals.is_empty());
        assert_eq!(first.delegate.len(), 1);
        assert!(first.delegate[0].instructions.contains("v41"), "{first:?}");
        let mut later = branches;
        later["delegated"] = json!({"commander#r0#0": {"findings": [
            {"key": "incident.message", "value": "Status update for checkout: rolled back"}]}});
        let last = IncidentCommander
            .call(&req(later, vec![]))
            .await
            .expect("round 1");
        let actions: Vec<&str> = last.proposals.iter().map(|p| p.action.as_str()).collect();
        assert_eq!(actions, ["rollback", "page", "status_update"]);
        assert_eq!(last.proposals[0].parameters["to_version"], "v41");
        assert_eq!(
            last.proposals[2].parameters["message"],
            "Status update for checkout: rolled back"
        );
    }
}
