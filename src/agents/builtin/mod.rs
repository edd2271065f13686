//! Built-in agents (Rust), one file each, and [`BUILTINS`], the table naming them.
//!
//! Adding one: a file here with a type implementing [`Agent`], its `mod` line and one line of
//! [`BUILTINS`].

mod cost_guard;
mod deploy_guard;
mod incident_team;
mod input;
mod sla_responder;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::Agent;

/// How a built-in agent is made from its `params`.
pub type Build = fn(&BTreeMap<String, Value>) -> Result<Arc<dyn Agent>, String>;

/// A built-in agent: its name and how it is made from its `params`.
pub struct Builtin {
    pub name: &'static str,
    pub about: &'static str,
    pub build: Build,
}

/// Every built-in agent of this build.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "deploy-guard",
        about: "records deployments; holds a deployment that starts during an SLA breach",
        build: |_| Ok(Arc::new(deploy_guard::DeployGuard)),
    },
    Builtin {
        name: "sla-responder",
        about: "keeps the breach state; suspects a recent deployment, proposes rollback and page",
        build: sla_responder::build,
    },
    Builtin {
        name: "cost-guard",
        about: "proposes scale_down when spend passes its budget",
        build: |_| Ok(Arc::new(cost_guard::CostGuard)),
    },
    Builtin {
        name: "business-impact",
        about: "how bad a breach is for the business: severity, points below objective, revenue at risk",
        build: incident_team::business_impact,
    },
    Builtin {
        name: "related-incidents",
        about: "earlier SLA and deployment events of the resource",
        build: |_| Ok(Arc::new(incident_team::RelatedIncidents)),
    },
    Builtin {
        name: "stakeholder-writer",
        about: "drafts a status message (from the event, or a supervisor's instructions)",
        build: |_| Ok(Arc::new(incident_team::StakeholderWriter)),
    },
    Builtin {
        name: "incident-commander",
        about: "supervises an incident's branches, delegates the message, proposes rollback, page, status_update",
        build: |_| Ok(Arc::new(incident_team::IncidentCommander)),
    },
];

/// Settings of `kind: builtin`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Which built-in agent (default: the agent's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Agent-specific settings (e.g. `correlation_window_minutes` for `sla-responder`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Value>,
}

impl Spec {
    fn which<'a>(&'a self, name: &'a str) -> &'a str {
        self.builtin.as_deref().unwrap_or(name)
    }

    pub fn problems(&self, name: &str) -> Vec<String> {
        let which = self.which(name);
        match BUILTINS.iter().find(|b| b.name == which) {
            None => vec![format!(
                "builtin {which:?} does not exist (this build has {})",
                BUILTINS
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
            Some(b) => (b.build)(&self.params).err().into_iter().collect(),
        }
    }

    pub fn build(&self, name: &str) -> Result<Arc<dyn Agent>, String> {
        let which = self.which(name);
        let b = BUILTINS
            .iter()
            .find(|b| b.name == which)
            .ok_or_else(|| format!("no builtin {which:?}"))?;
        (b.build)(&self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::{AgentRequest, ScopedContext};
    use crate::event::CloudEvent;
    use crate::records::TaskData;
    use chrono::Utc;
    use deploy_guard::DeployGuard;
    use serde_json::json;
    use sla_responder::severity;
    use sla_responder::SlaResponder;
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
                step: None,
            },
            event: ev,
            context: ScopedContext::new(3, facts, &["*".to_string()]),
            attempt: 1,
            traceparent: None,
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
