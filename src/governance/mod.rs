//! Governance on every action: access policy, budgets, and the approval gate.
//!
//! - this module: the `governance:` config, access rules and approval rules (pure), and
//!   [`GovernanceConfig::gate`], the check a new action passes before it is applied;
//! - [`budgets`]: spend per agent, workflow or tenant, reserved atomically in a store;
//! - [`approvals`]: people deciding on pending actions (and the sweeper that expires them).

pub mod amend;
pub mod approvals;
pub mod budgets;

use serde::{Deserialize, Serialize};

use crate::records::{Impact, ProposalData};
use crate::resolve::apply::Gate;
use crate::resolve::rules::RejectReason;
use crate::secret::Secret;

use crate::pattern::matches_any_or_empty as any_match;

/// One access rule: these agents may cause these actions on these resources of these tenants.
/// Empty lists mean "any"; entries are `*` patterns.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

/// What needs a person: an action matching `actions` with at least `min_impact` or `min_cost`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub min_impact: Option<Impact>,
    #[serde(default)]
    pub min_cost: Option<f64>,
}

/// What happens when nobody decides in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Reject,
    /// Re-announce the request as `escalated` once, with a second timeout, then reject.
    Escalate,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Bearer token the approvals API requires. `SWITCHYARD_APPROVAL_TOKEN` overrides. Without a token
    /// the API refuses every request.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A request not decided within this time is expired (rejected or escalated).
    #[serde(default = "default_approval_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    #[serde(default)]
    pub rules: Vec<ApprovalRule>,
    /// A decision made through the HTTP API or the CLI whose records were not all produced this long
    /// after it was made (the process died in between) is produced by the sweeper.
    #[serde(default = "default_redeliver_after")]
    pub redeliver_after_seconds: u64,
}

fn default_redeliver_after() -> u64 {
    30
}

fn default_approval_timeout() -> u64 {
    900
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            token: None,
            timeout_seconds: default_approval_timeout(),
            on_timeout: OnTimeout::Reject,
            rules: Vec::new(),
            redeliver_after_seconds: default_redeliver_after(),
        }
    }
}

/// The `governance:` config section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Tenants served by name. Any tenant works; only these (and `default`) are metric label
    /// values, the rest count as `other`, so a flood of tenant ids cannot grow the series without
    /// bound.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Access rules; when empty every agent may cause every declared action.
    #[serde(default)]
    pub access: Vec<AccessRule>,
    #[serde(default)]
    pub budgets: Vec<budgets::BudgetSpec>,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
}

impl GovernanceConfig {
    /// Every problem, as (path, message). `agents` and `actions` are the declared agents and the
    /// actions they may propose: every rule must refer to them (a misspelled action in an approval
    /// rule would silently stop that action needing approval).
    pub fn problems(&self, agents: &[&str], actions: &[&str]) -> Vec<(String, String)> {
        use crate::pattern::{pattern_problem, reference_problem};
        let refs = |path: String, list: &[String], known: Option<(&[&str], &str)>| {
            let mut p = Vec::new();
            for (j, r) in list.iter().enumerate() {
                let m = match known {
                    Some((known, what)) => reference_problem(r, known, what),
                    None => pattern_problem(r),
                };
                if let Some(m) = m {
                    p.push((format!("{path}[{j}]"), m));
                }
            }
            p
        };
        let mut p = Vec::new();
        let (agent, action) = (
            "an agent declared under agents",
            "an action any agent declares",
        );
        for (i, r) in self.access.iter().enumerate() {
            let path = format!("governance.access[{i}]");
            p.extend(refs(
                format!("{path}.agents"),
                &r.agents,
                Some((agents, agent)),
            ));
            p.extend(refs(
                format!("{path}.actions"),
                &r.actions,
                Some((actions, action)),
            ));
            p.extend(refs(format!("{path}.tenants"), &r.tenants, None));
            p.extend(refs(format!("{path}.resources"), &r.resources, None));
        }
        for (i, r) in self.approvals.rules.iter().enumerate() {
            let path = format!("governance.approvals.rules[{i}]");
            p.extend(refs(
                format!("{path}.actions"),
                &r.actions,
                Some((actions, action)),
            ));
            if r.min_cost.is_some_and(|c| !c.is_finite() || c < 0.0) {
                p.push((
                    format!("{path}.min_cost"),
                    "must be a non-negative number".into(),
                ));
            }
        }
        for (i, b) in self.budgets.iter().enumerate() {
            let item = format!("governance.budgets[{i}] ({})", b.name);
            if b.max_calls.is_none() && b.max_cost.is_none() {
                p.push((item.clone(), "needs max_calls or max_cost".into()));
            }
            if b.max_cost.is_some_and(|c| !c.is_finite() || c < 0.0) {
                p.push((
                    format!("{item}.max_cost"),
                    "must be a non-negative number".into(),
                ));
            }
            if self.budgets[..i].iter().any(|o| o.name == b.name) {
                p.push((item.clone(), "name is used by an earlier budget".into()));
            }
            let matches = match b.per {
                budgets::BudgetScope::Agent => reference_problem(&b.matches, agents, agent),
                _ => pattern_problem(&b.matches),
            };
            if let Some(m) = matches {
                p.push((format!("{item}.matches"), m));
            }
        }
        if self.approvals.timeout_seconds == 0 {
            p.push((
                "governance.approvals.timeout_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        p
    }

    /// Whether `agent` may cause `action` on `resource` of `tenant`.
    pub fn allows(&self, tenant: &str, agent: &str, action: &str, resource: &str) -> bool {
        self.access.is_empty()
            || self.access.iter().any(|r| {
                any_match(&r.tenants, tenant)
                    && any_match(&r.agents, agent)
                    && any_match(&r.actions, action)
                    && any_match(&r.resources, resource)
            })
    }

    /// Warnings about `(agent, declared actions)`: with access rules in place, an action an agent
    /// declares that no rule lets it cause (for some tenant and resource) is always rejected.
    pub fn unreachable_actions(&self, agents: &[(&str, &[String])]) -> Vec<(String, String)> {
        if self.access.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (agent, actions) in agents {
            for a in actions.iter().filter(|a| !a.contains('*')) {
                let allowed = self
                    .access
                    .iter()
                    .any(|r| any_match(&r.agents, agent) && any_match(&r.actions, a));
                if !allowed {
                    out.push((
                        format!("agents.{agent}"),
                        format!("may propose {a:?}, but no governance.access rule lets {agent} cause it: every such proposal will be rejected (reason access); add a rule such as {{ agents: [{agent}], actions: [{a}] }}"),
                    ));
                }
            }
        }
        out
    }

    /// The check a new action passes before it is applied, in order: access, budgets (already
    /// spent past a limit, as `budget` says), then whether a person must approve it.
    pub fn gate(&self, p: &ProposalData, budget: budgets::BudgetCheck) -> Gate {
        if !self.allows(&p.tenant, &p.agent, &p.action, &p.resource) {
            tracing::info!(agent = %p.agent, action = %p.action, resource = %p.resource, tenant = %p.tenant, proposal_id = %p.proposal_id,
                "Proposal rejected: no governance.access rule lets this agent cause this action.");
            return Gate::Refuse {
                reason: RejectReason::Access,
                rule: "access",
                detail: format!(
                    "no access rule lets {} cause {} on {}",
                    p.agent, p.action, p.resource
                ),
            };
        }
        if let budgets::BudgetCheck::Exhausted { budget } = budget {
            crate::telemetry::METRICS
                .budget_refusals
                .with_label_values(&[&budget])
                .inc();
            return Gate::Refuse {
                reason: RejectReason::Budget,
                rule: "budget",
                detail: format!("budget {budget} is exhausted"),
            };
        }
        match self.needs_approval(&p.action, p.impact, p.cost) {
            Some(rule) => Gate::NeedsApproval {
                rule,
                timeout_seconds: self.approvals.timeout_seconds,
            },
            None => Gate::Allow,
        }
    }

    /// Whether an action needs a person, and the rule that says so.
    pub fn needs_approval(&self, action: &str, impact: Impact, cost: Option<f64>) -> Option<usize> {
        self.approvals.rules.iter().position(|r| {
            any_match(&r.actions, action)
                && r.min_impact.is_none_or(|m| impact >= m)
                && r.min_cost.is_none_or(|m| cost.unwrap_or(0.0) >= m)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules_default_allow_and_patterns() {
        let mut g = GovernanceConfig::default();
        assert!(g.allows("t", "a", "rollback", "svc"));
        g.access.push(AccessRule {
            agents: vec!["sla-*".into()],
            actions: vec!["rollback".into(), "page".into()],
            ..Default::default()
        });
        g.access.push(AccessRule {
            tenants: vec!["acme".into()],
            agents: vec!["cost-guard".into()],
            actions: vec!["scale_*".into()],
            resources: vec!["web-*".into()],
        });
        assert!(g.allows("x", "sla-responder", "rollback", "svc"));
        assert!(!g.allows("x", "sla-responder", "scale_down", "svc"));
        assert!(g.allows("acme", "cost-guard", "scale_down", "web-1"));
        assert!(!g.allows("acme", "cost-guard", "scale_down", "db-1"));
        assert!(!g.allows("other", "cost-guard", "scale_down", "web-1"));
    }

    #[test]
    fn approval_rules() {
        let mut g = GovernanceConfig::default();
        g.approvals.rules.push(ApprovalRule {
            actions: vec!["rollback".into()],
            min_impact: Some(Impact::High),
            min_cost: None,
        });
        g.approvals.rules.push(ApprovalRule {
            actions: vec![],
            min_impact: None,
            min_cost: Some(100.0),
        });
        assert_eq!(g.needs_approval("rollback", Impact::High, None), Some(0));
        assert_eq!(g.needs_approval("rollback", Impact::Medium, None), None);
        assert_eq!(g.needs_approval("page", Impact::Low, Some(150.0)), Some(1));
        assert_eq!(g.needs_approval("page", Impact::Low, Some(10.0)), None);
    }
}
