//! Governance on every action: access policy, budgets, and the approval gate.
//!
//! - this module: the `governance:` config, access rules and approval rules (pure), and
//!   [`GovernanceConfig::gate`], the check a new action passes before it is applied;
//! - [`budgets`]: spend per agent, workflow or tenant, reserved atomically in a store;
//! - [`approvals`]: people deciding on pending actions (and the sweeper that expires them);
//! - [`escalation`]: escalation paths of approver groups, and who may decide an approval;
//! - [`notify`]: webhooks told when an approval is requested, escalated or expires.

pub mod amend;
pub mod approvals;
pub mod budgets;
pub mod escalation;

use escalation::OnDeadline;
pub mod notify;

use serde::{Deserialize, Serialize};

use crate::records::{ApprovalData, Impact, ProposalData};
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

/// What needs a person: an action matching `actions` with at least `min_impact` or `min_cost`,
/// or with a stated confidence below `max_confidence`. The first matching rule decides who
/// approves (its `escalation` path) and who is told (`notify`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// The rule's name, recorded on its approvals (`rule`); default `rules[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub min_impact: Option<Impact>,
    #[serde(default)]
    pub min_cost: Option<f64>,
    /// A proposal whose stated confidence is below this (0 to 1) needs a person. A proposal that
    /// states no confidence counts as low: it matches too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_confidence: Option<f64>,
    /// Approver groups in order, each with its time to decide: the approval starts with the
    /// first; when a group's time passes it moves to the next (`escalated`); the last one's
    /// timeout rejects it (`expired`). Empty: any approver decides, within
    /// `approvals.timeout_seconds` (and `on_timeout` applies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalation: Vec<escalation::EscalationLevel>,
    /// A webhook told when an approval of this rule is requested, escalated or expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<notify::NotifySpec>,
}

impl ApprovalRule {
    /// The rule's name: its own, or `rules[<index>]`.
    pub fn name_at(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("rules[{index}]"))
    }

    /// Whether an action with these traits needs a person under this rule.
    pub fn matches(
        &self,
        action: &str,
        impact: Impact,
        cost: Option<f64>,
        confidence: Option<f64>,
    ) -> bool {
        any_match(&self.actions, action)
            && self.min_impact.is_none_or(|m| impact >= m)
            && self.min_cost.is_none_or(|m| cost.unwrap_or(0.0) >= m)
            // Unknown confidence counts as low.
            && self
                .max_confidence
                .is_none_or(|m| confidence.is_none_or(|c| c < m))
    }
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
    /// A decided approval stays in its resource's record (and `GET /v1/approvals/{id}` shows it)
    /// this long after its decision; the resource's next write drops it, and the sweeper then its
    /// entry in the id index. Deciding it again after that answers 404 instead of 409.
    #[serde(default = "default_keep_decided")]
    pub keep_decided_seconds: u64,
    /// Base URL people open switchyard at (e.g. `https://switchyard.example.com`): notifications
    /// link to `<public_url>/inbox/approvals/<id>`. Without it they carry no link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

fn default_redeliver_after() -> u64 {
    30
}

fn default_keep_decided() -> u64 {
    7 * 86400
}

/// The shortest `keep_decided_seconds` allowed: a day.
const KEEP_DECIDED_FLOOR: u64 = 86400;

fn default_approval_timeout() -> u64 {
    900
}

impl ApprovalsConfig {
    /// What happens to `a` (open, past its deadline): the next level of its rule's escalation path,
    /// or expiry after the last; without a path, the legacy `on_timeout` (escalate once, with
    /// `timeout_seconds` again, then expire). A rule no longer in the config counts as without a path.
    pub fn on_deadline(&self, a: &ApprovalData, escalated: bool) -> OnDeadline {
        let config = self;
        let path = a
            .rule
            .as_deref()
            .and_then(|r| config.rule(r))
            .map(|r| r.escalation.as_slice())
            .unwrap_or_default();
        if path.is_empty() {
            return if config.on_timeout == OnTimeout::Escalate && !escalated {
                OnDeadline::Escalate {
                    level: a.level + 1,
                    group: None,
                    timeout_seconds: config.timeout_seconds,
                }
            } else {
                OnDeadline::Expire
            };
        }
        let next = a.level as usize + 1;
        match path.get(next) {
            Some(l) => OnDeadline::Escalate {
                level: next as u32,
                group: Some(l.group.clone()),
                timeout_seconds: l.timeout_seconds,
            },
            None => OnDeadline::Expire,
        }
    }

    /// The notifier of the rules with `notify:`; none when no rule has one.
    pub fn notifier(&self) -> Result<Option<std::sync::Arc<notify::Notifier>>, String> {
        notify::Notifier::from_specs(
            self.rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.notify.as_ref().map(|n| (i, r.name_at(i), n)))
                .collect(),
            self.public_url.as_deref(),
        )
    }

    /// The rule named `name` (see [`ApprovalRule::name_at`]).
    pub fn rule(&self, name: &str) -> Option<&ApprovalRule> {
        self.rules
            .iter()
            .enumerate()
            .find(|(i, r)| r.name_at(*i) == name)
            .map(|(_, r)| r)
    }

    /// The approvals of a resource's record decided longer than `keep_decided_seconds` before
    /// `now`: what its next write drops.
    pub fn decided_long_ago(
        &self,
        approvals: &std::collections::BTreeMap<String, crate::resolve::apply::StoredApproval>,
        now: i64,
    ) -> Vec<String> {
        let keep = i64::try_from(self.keep_decided_seconds).unwrap_or(i64::MAX);
        crate::resolve::apply::decided_before(approvals, now.saturating_sub(keep))
    }

    /// How long a resource's record must outlive its last write so that what it holds of
    /// approvals is not lost with it: an open approval waits at most its longest level (each level
    /// change writes the record), a decided one stays `keep_decided_seconds`. The store renews a
    /// record's TTL only once a sixteenth of it passed, so a write may leave 15/16 of it: the TTL
    /// is at least 16/15 of both (plus an hour). `other` is what the record's other readers need.
    pub fn record_ttl_seconds(&self, other: u64) -> u64 {
        let longest_level = self
            .rules
            .iter()
            .flat_map(|r| r.escalation.iter().map(|l| l.timeout_seconds))
            .chain([self.timeout_seconds])
            .max()
            .unwrap_or(0);
        let needed = longest_level
            .max(self.keep_decided_seconds)
            .saturating_mul(16)
            / 15;
        (other.max(longest_level).saturating_mul(4))
            .max(needed.saturating_add(3600))
            .max(86400)
    }

    /// How often the sweeper looks for approvals past their deadline: every 2 seconds, more
    /// often when a timeout is shorter (half the shortest, at least every 250 ms), so a 2-second
    /// level moves on close to its deadline.
    pub fn sweep_interval(&self) -> std::time::Duration {
        let shortest = self
            .rules
            .iter()
            .flat_map(|r| r.escalation.iter().map(|l| l.timeout_seconds))
            .chain([self.timeout_seconds])
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(4);
        std::time::Duration::from_millis((shortest * 500).clamp(250, 2000))
    }
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            token: None,
            timeout_seconds: default_approval_timeout(),
            on_timeout: OnTimeout::Reject,
            rules: Vec::new(),
            redeliver_after_seconds: default_redeliver_after(),
            keep_decided_seconds: default_keep_decided(),
            public_url: None,
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
            if r.max_confidence.is_some_and(|c| !(0.0..=1.0).contains(&c)) {
                p.push((
                    format!("{path}.max_confidence"),
                    "must be a number from 0 to 1".into(),
                ));
            }
            if let Some(n) = &r.name {
                if n.trim().is_empty() || n.chars().any(char::is_control) {
                    p.push((
                        format!("{path}.name"),
                        "must be a non-empty single line".into(),
                    ));
                }
            }
            let name = r.name_at(i);
            if self.approvals.rules[..i]
                .iter()
                .enumerate()
                .any(|(j, o)| o.name_at(j) == name)
            {
                p.push((
                    format!("{path}.name"),
                    format!("{name:?} is used by an earlier rule"),
                ));
            }
            for (j, l) in r.escalation.iter().enumerate() {
                let at = format!("{path}.escalation[{j}]");
                if l.group.trim().is_empty() {
                    p.push((format!("{at}.group"), "must not be empty".into()));
                }
                if l.timeout_seconds == 0 {
                    p.push((format!("{at}.timeout_seconds"), "must be at least 1".into()));
                }
            }
            if let Some(n) = &r.notify {
                p.extend(n.problems(&format!("{path}.notify")));
            }
        }
        if let Some(u) = &self.approvals.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                p.push((
                    "governance.approvals.public_url".into(),
                    "must be an http:// or https:// URL".into(),
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
        // A decision whose records a crash left unsent is produced from the record: by the outbox
        // sweeper after `redeliver_after_seconds`, or by the decisions topic's redelivery once its
        // stage runs again. It must still be there.
        let keep_floor = self
            .approvals
            .redeliver_after_seconds
            .saturating_mul(10)
            .max(KEEP_DECIDED_FLOOR);
        if self.approvals.keep_decided_seconds < keep_floor {
            p.push((
                "governance.approvals.keep_decided_seconds".into(),
                format!(
                    "must be at least {keep_floor} (a day, and ten times redeliver_after_seconds): a decision whose records a crash left unsent is produced again from the kept approval"
                ),
            ));
        }
        p
    }

    /// Warnings about escalation groups: a group no user (`http.users`, given as (name, groups))
    /// belongs to can never decide, so its approvals only wait for its timeout (or an admin).
    pub fn group_warnings(&self, users: &[(&str, &[String])]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, r) in self.approvals.rules.iter().enumerate() {
            for (j, l) in r.escalation.iter().enumerate() {
                if !l.group.trim().is_empty() && !users.iter().any(|(_, g)| g.contains(&l.group)) {
                    out.push((
                        format!("governance.approvals.rules[{i}].escalation[{j}].group"),
                        format!("no user of http.users is in group {:?}: only admins can decide its approvals; add it to a user's groups", l.group),
                    ));
                }
            }
        }
        out
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
        match self.needs_approval(&p.action, p.impact, p.cost, p.confidence) {
            Some(i) => {
                let r = &self.approvals.rules[i];
                Gate::NeedsApproval {
                    rule: r.name_at(i),
                    timeout_seconds: r
                        .escalation
                        .first()
                        .map_or(self.approvals.timeout_seconds, |l| l.timeout_seconds),
                    group: r.escalation.first().map(|l| l.group.clone()),
                }
            }
            None => Gate::Allow,
        }
    }

    /// Whether an action needs a person, and the index of the first rule that says so.
    pub fn needs_approval(
        &self,
        action: &str,
        impact: Impact,
        cost: Option<f64>,
        confidence: Option<f64>,
    ) -> Option<usize> {
        self.approvals
            .rules
            .iter()
            .position(|r| r.matches(action, impact, cost, confidence))
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
    fn resource_records_outlive_approval_waits_and_keeps() {
        let mut a = ApprovalsConfig::default();
        // Defaults: a decided approval is kept 7 days, so its record lives longer than that even
        // when its TTL was last renewed a sixteenth of it ago.
        let ttl = a.record_ttl_seconds(1800);
        assert!(ttl * 15 / 16 >= 7 * 86400, "{ttl}");
        // An escalation level of 10 days (each level's change writes the record).
        a.rules.push(ApprovalRule {
            escalation: vec![escalation::EscalationLevel {
                group: "sre".into(),
                timeout_seconds: 10 * 86400,
            }],
            ..Default::default()
        });
        let ttl = a.record_ttl_seconds(1800);
        assert!(ttl * 15 / 16 >= 10 * 86400, "{ttl}");
        // A resolve window longer than all: four times it, as before.
        assert_eq!(a.record_ttl_seconds(30 * 86400), 4 * 30 * 86400);
    }

    #[test]
    fn approval_rules() {
        let mut g = GovernanceConfig::default();
        g.approvals.rules.push(ApprovalRule {
            actions: vec!["rollback".into()],
            min_impact: Some(Impact::High),
            ..Default::default()
        });
        g.approvals.rules.push(ApprovalRule {
            min_cost: Some(100.0),
            ..Default::default()
        });
        assert_eq!(
            g.needs_approval("rollback", Impact::High, None, None),
            Some(0)
        );
        assert_eq!(
            g.needs_approval("rollback", Impact::Medium, None, None),
            None
        );
        assert_eq!(
            g.needs_approval("page", Impact::Low, Some(150.0), None),
            Some(1)
        );
        assert_eq!(
            g.needs_approval("page", Impact::Low, Some(10.0), None),
            None
        );
    }

    #[test]
    fn confidence_rules_names_and_escalation_config() {
        let g: GovernanceConfig = serde_yaml::from_str(
            "approvals:
               rules:
                 - name: unsure-scaling
                   actions: [scale_down]
                   max_confidence: 0.7
                   escalation: [{group: sre-oncall, timeout_seconds: 300}, {group: sre-leads, timeout_seconds: 900}]
                 - actions: [rollback]",
        )
        .unwrap();
        let n = |c| g.needs_approval("scale_down", Impact::Low, None, c);
        assert_eq!(
            n(Some(0.5)),
            Some(0),
            "below the threshold: a person reviews"
        );
        assert_eq!(n(Some(0.7)), None, "at the threshold: through");
        assert_eq!(n(Some(0.95)), None);
        assert_eq!(n(None), Some(0), "unknown confidence counts as low");
        assert_eq!(
            g.needs_approval("rollback", Impact::Low, None, Some(1.0)),
            Some(1),
            "a rule without max_confidence ignores confidence"
        );
        assert_eq!(g.approvals.rules[1].name_at(1), "rules[1]");
        assert!(
            g.approvals.rule("unsure-scaling").is_some() && g.approvals.rule("rules[1]").is_some()
        );
        // The gate names the rule and starts at the first group, with its timeout.
        let p: ProposalData = serde_json::from_value(serde_json::json!({
            "proposal_id": "p", "task_id": "t", "workflow_id": "w", "agent": "a", "action": "scale_down",
            "resource": "r", "tenant": "default", "parameters": {}, "priority": 0, "impact": "low",
            "context_version": 0, "confidence": 0.2})).unwrap();
        assert_eq!(
            g.gate(&p, budgets::BudgetCheck::Ok),
            Gate::NeedsApproval {
                rule: "unsure-scaling".into(),
                timeout_seconds: 300,
                group: Some("sre-oncall".into())
            }
        );
        assert_eq!(
            g.approvals.sweep_interval(),
            std::time::Duration::from_secs(2)
        );
        // Problems: thresholds out of range, empty groups, zero timeouts, duplicate names.
        let bad: GovernanceConfig = serde_yaml::from_str(
            "approvals:
               keep_decided_seconds: 3600
               rules:
                 - {name: x, max_confidence: 1.5, escalation: [{group: '', timeout_seconds: 0}]}
                 - {name: x}",
        )
        .unwrap();
        let items: Vec<String> = bad.problems(&[], &[]).into_iter().map(|(i, _)| i).collect();
        assert_eq!(
            items,
            [
                "governance.approvals.rules[0].max_confidence",
                "governance.approvals.rules[0].escalation[0].group",
                "governance.approvals.rules[0].escalation[0].timeout_seconds",
                "governance.approvals.rules[1].name",
                "governance.approvals.keep_decided_seconds",
            ]
        );
        // A group nobody is in is a warning.
        let w = g.group_warnings(&[("ann", &["sre-oncall".to_string()][..])]);
        assert_eq!(w.len(), 1);
        assert!(w[0].1.contains("\"sre-leads\""), "{w:?}");
    }
}
