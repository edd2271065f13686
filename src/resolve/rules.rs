//! Conflict-resolution rules: the `resolve:` config section and pure code (no I/O) deciding what
//! happens to one proposal given the resource's current state.
//!
//! Per action type (config `resolve.actions`): a priority, the action types it conflicts with, whether
//! proposals of it merge, a cooldown, and the context keys whose change makes a proposal of it stale.
//! The resolve stage feeds proposals of one resource through [`decide`] strictly in order.
//!
//! Adding a rule: a field on [`ActionRule`] (config), a [`Rule`] variant (its name in audit records
//! and the metric label), and its check in [`decide`] — all in this file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pattern::stable_id;
use crate::records::Impact;

/// Rules for one action type.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// Overrides the proposal's own priority when set.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Action types that cannot be active on the same resource at the same time as this one.
    #[serde(default)]
    pub conflicts_with: Vec<String>,
    /// Proposals of this type within `merge_window_seconds` are combined into one action.
    #[serde(default)]
    pub merge: bool,
    /// After an action of this type is accepted, another (with different parameters) is rejected as
    /// `cooldown` for this long.
    #[serde(default)]
    pub cooldown_seconds: u64,
    /// Context keys whose change after the proposal's context version makes it `stale`; a
    /// `<relation>:<key>` entry names a key of the resources this one relates to (`depends_on:
    /// deployment`), changed after the agent read its context.
    #[serde(default)]
    pub invalidated_by: Vec<String>,
}

/// The `resolve:` config section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveConfig {
    /// The same action (type and parameters) on a resource within this window is merged into one.
    #[serde(default = "default_dedupe")]
    pub dedupe_window_seconds: u64,
    /// Mergeable actions combine within this window.
    #[serde(default = "default_merge")]
    pub merge_window_seconds: u64,
    /// How long an accepted action counts as active for conflicts.
    #[serde(default = "default_conflict")]
    pub conflict_window_seconds: u64,
    /// Rules by action type; types not listed have no conflicts, no merge, no cooldown.
    #[serde(default)]
    pub actions: BTreeMap<String, ActionRule>,
}

fn default_dedupe() -> u64 {
    300
}
fn default_merge() -> u64 {
    120
}
fn default_conflict() -> u64 {
    1800
}

impl Default for ResolveConfig {
    fn default() -> Self {
        ResolveConfig {
            dedupe_window_seconds: default_dedupe(),
            merge_window_seconds: default_merge(),
            conflict_window_seconds: default_conflict(),
            actions: BTreeMap::new(),
        }
    }
}

impl ResolveConfig {
    fn rule(&self, action: &str) -> Option<&ActionRule> {
        self.actions.get(action)
    }

    /// Conflicts are symmetric: declaring one side is enough.
    pub fn conflicts(&self, a: &str, b: &str) -> bool {
        self.rule(a)
            .is_some_and(|r| r.conflicts_with.iter().any(|x| x == b))
            || self
                .rule(b)
                .is_some_and(|r| r.conflicts_with.iter().any(|x| x == a))
    }

    pub fn priority(&self, action: &str, proposed: i32) -> i32 {
        self.rule(action)
            .and_then(|r| r.priority)
            .unwrap_or(proposed)
    }

    /// Every problem of this section, as (path, message). `actions` are the action types some agent
    /// may propose and `keys` the context keys some agent may write (patterns): a rule about
    /// anything else can never apply, which is almost always a typo.
    pub fn problems(&self, actions: &[&str], keys: &[&str]) -> Vec<(String, String)> {
        use crate::pattern::{matches_any, pattern_problem, reference_problem};
        let mut p = Vec::new();
        let action = "an action any agent declares";
        for (name, rule) in &self.actions {
            let path = format!("resolve.actions.{name}");
            if let Some(m) = reference_problem(name, actions, action) {
                p.push((path.clone(), m));
            }
            if rule.merge && name.starts_with("tool.") {
                // A merged action goes out again under its action id, which a tool executor takes
                // as carried out already: the merged parameters would never be sent.
                p.push((
                    format!("{path}.merge"),
                    "tool actions cannot merge: the tools stage carries out an action id once, so a merged one would never be sent".into(),
                ));
            }
            for (i, other) in rule.conflicts_with.iter().enumerate() {
                if let Some(m) = reference_problem(other, actions, action) {
                    p.push((format!("{path}.conflicts_with[{i}]"), m));
                }
            }
            let writers: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            for (i, entry) in rule.invalidated_by.iter().enumerate() {
                let item = format!("{path}.invalidated_by[{i}]");
                // `<relation>:<key>`: the key of a related resource (cross-resource staleness).
                let key = entry.split_once(':').map_or(entry.as_str(), |(_, k)| k);
                if let Some(m) = pattern_problem(key) {
                    p.push((item, m));
                } else if !matches_any(&writers, key) {
                    p.push((
                        item,
                        format!(
                            "context key {key:?} is not one any agent writes, so it never changes"
                        ),
                    ));
                }
            }
        }
        p
    }

    /// How long an accepted action of type `action` can still change a decision: the longest
    /// window of a rule that looks at it — dedupe always; merge, cooldown and conflicts where its
    /// type has them. [`prune`] drops it after that (an action that only dedupes is kept
    /// `dedupe_window_seconds`, not the longest window of any type).
    pub fn relevance_seconds(&self, action: &str) -> u64 {
        let mut keep = self.dedupe_window_seconds;
        if let Some(r) = self.rule(action) {
            if r.merge {
                keep = keep.max(self.merge_window_seconds);
            }
            keep = keep.max(r.cooldown_seconds);
        }
        let conflicts = self.actions.iter().any(|(name, r)| {
            (name == action && !r.conflicts_with.is_empty())
                || r.conflicts_with.iter().any(|x| x == action)
        });
        if conflicts {
            keep = keep.max(self.conflict_window_seconds);
        }
        keep
    }

    /// Longest window state must be kept for.
    pub fn retention_seconds(&self) -> u64 {
        let cooldown = self
            .actions
            .values()
            .map(|r| r.cooldown_seconds)
            .max()
            .unwrap_or(0);
        self.dedupe_window_seconds
            .max(self.merge_window_seconds)
            .max(self.conflict_window_seconds)
            .max(cooldown)
    }
}

/// Status of an action the resolve stage knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveStatus {
    /// On `switchyard.actions`.
    Accepted,
    /// Waiting for a person.
    PendingApproval,
    /// Approved by a person, not yet on `switchyard.actions`: resolve sends it when it reads the
    /// approval's release (`resolve::apply::release`). In force like an accepted action (conflicts,
    /// cooldowns, supersession), but nothing merges into it: it has not gone out.
    Approved,
}

impl ActiveStatus {
    /// Accepted, or approved and about to go out: what conflicts and cooldowns count.
    pub fn in_force(self) -> bool {
        matches!(self, ActiveStatus::Accepted | ActiveStatus::Approved)
    }
}

/// An action recently accepted or awaiting approval on a resource.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ActiveAction {
    pub action_id: String,
    pub action: String,
    pub priority: i32,
    pub status: ActiveStatus,
    /// Seconds since the epoch when it was accepted (or requested).
    pub at: i64,
    /// Hash of the parameters, for dedupe.
    pub params_hash: String,
    pub parameters: Value,
    /// Proposal ids merged into this action (provenance).
    pub proposals: Vec<String>,
    /// Agents behind those proposals.
    pub agents: Vec<String>,
    #[serde(default)]
    pub approval_id: Option<String>,
    /// Awaiting approval: the accepted actions it supersedes once approved. They stay in force
    /// (and keep blocking what conflicts with them) until then; a rejected or expired approval
    /// leaves them be.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<String>,
}

/// What the resolve stage keeps per resource.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ResourceState {
    pub active: Vec<ActiveAction>,
    /// Last context version at which each context key changed (from the shared context).
    #[serde(default)]
    pub key_versions: BTreeMap<String, u64>,
}

/// A proposal as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub proposal_id: String,
    pub agent: String,
    pub action: String,
    pub parameters: Value,
    pub priority: i32,
    pub impact: Impact,
    pub context_version: u64,
}

/// Why a proposal was not turned into a new action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    Conflict,
    Stale,
    Cooldown,
    PendingApproval,
    Access,
    Budget,
}

impl RejectReason {
    /// Every reason (metric series are created for each at start).
    pub const ALL: [RejectReason; 6] = [
        RejectReason::Conflict,
        RejectReason::Stale,
        RejectReason::Cooldown,
        RejectReason::PendingApproval,
        RejectReason::Access,
        RejectReason::Budget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Conflict => "conflict",
            RejectReason::Stale => "stale",
            RejectReason::Cooldown => "cooldown",
            RejectReason::PendingApproval => "pending_approval",
            RejectReason::Access => "access",
            RejectReason::Budget => "budget",
        }
    }
}

/// The resolution rule behind a decision: its name in audit records and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Staleness,
    Dedupe,
    Merge,
    PendingApproval,
    Cooldown,
    Priority,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Staleness,
        Rule::Dedupe,
        Rule::Merge,
        Rule::PendingApproval,
        Rule::Cooldown,
        Rule::Priority,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Staleness => "staleness",
            Rule::Dedupe => "dedupe",
            Rule::Merge => "merge",
            Rule::PendingApproval => "pending_approval",
            Rule::Cooldown => "cooldown",
            Rule::Priority => "priority",
        }
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A new action (governance still applies).
    New {
        action_id: String,
        priority: i32,
        superseded: Vec<String>,
    },
    /// Identical to an active action: merged into it (provenance only).
    Duplicate { action_id: String },
    /// A mergeable type: combined into the active action, parameters merged.
    Merged {
        action_id: String,
        parameters: Value,
    },
    Rejected {
        reason: RejectReason,
        detail: String,
        rule: Rule,
    },
}

impl Decision {
    /// The resolution rule that decided, when one did (a new action passed them all).
    pub fn rule(&self) -> Option<Rule> {
        match self {
            Decision::New { .. } => None,
            Decision::Duplicate { .. } => Some(Rule::Dedupe),
            Decision::Merged { .. } => Some(Rule::Merge),
            Decision::Rejected { rule, .. } => Some(*rule),
        }
    }
}

/// Hash of a JSON value (canonical: object keys sorted).
pub fn params_hash(v: &Value) -> String {
    stable_id(&[&v.to_string()])
}

/// Shallow merge of two parameter objects: later keys win; non-objects are replaced.
pub fn merge_params(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut m = a.clone();
            for (k, v) in b {
                m.insert(k.clone(), v.clone());
            }
            Value::Object(m)
        }
        (_, n) => n.clone(),
    }
}

/// Kept past [`ResolveConfig::relevance_seconds`]: the pruned state is written back and the next
/// decision may be made by another instance whose clock is a little behind, so an action must not
/// go the very second its window ends.
pub const PRUNE_MARGIN_SECONDS: i64 = 300;

/// Drops accepted actions no rule can look at any more ([`ResolveConfig::relevance_seconds`] of
/// their type, plus [`PRUNE_MARGIN_SECONDS`]); actions awaiting approval stay. Never changes a
/// decision ([`decide`] looks at no action older than the window of the rule looking), nor one made
/// later by a clock up to the margin behind.
pub fn prune(state: &mut ResourceState, cfg: &ResolveConfig, now: i64) {
    state.active.retain(|a| {
        let window = i64::try_from(cfg.relevance_seconds(&a.action))
            .unwrap_or(i64::MAX)
            .saturating_add(PRUNE_MARGIN_SECONDS);
        a.status != ActiveStatus::Accepted || now.saturating_sub(a.at) <= window
    });
}

/// Decides what happens to `c` on a resource in `state` at time `now` (seconds). Pure.
pub fn decide(cfg: &ResolveConfig, state: &ResourceState, c: &Candidate, now: i64) -> Decision {
    decide_with(cfg, state, c, now, true)
}

/// [`decide`], with merging left out when `merge` is false: a proposal governance would not let
/// merge unseen (it needs a person's approval) is judged as an action of its own.
pub fn decide_with(
    cfg: &ResolveConfig,
    state: &ResourceState,
    c: &Candidate,
    now: i64,
    merge: bool,
) -> Decision {
    let rule = cfg.rule(&c.action).cloned().unwrap_or_default();
    let priority = cfg.priority(&c.action, c.priority);
    let age = |a: &ActiveAction| now - a.at;
    // Staleness: a key the action depends on changed after the context the agent saw.
    for key in &rule.invalidated_by {
        if let Some(v) = state.key_versions.get(key) {
            if *v > c.context_version {
                return Decision::Rejected {
                    reason: RejectReason::Stale,
                    detail: format!(
                        "context key {key} changed at version {v}, proposal saw version {}",
                        c.context_version
                    ),
                    rule: Rule::Staleness,
                };
            }
        }
    }
    let ph = params_hash(&c.parameters);
    // Dedupe: the same action with the same parameters.
    if let Some(a) = state.active.iter().find(|a| {
        a.action == c.action && a.params_hash == ph && age(a) <= cfg.dedupe_window_seconds as i64
    }) {
        return Decision::Duplicate {
            action_id: a.action_id.clone(),
        };
    }
    // Merge: mergeable types combine — only into an action that went out. One awaiting a person
    // keeps the parameters the person is shown (the pending hold below refuses this one).
    if rule.merge && merge {
        if let Some(a) = state.active.iter().find(|a| {
            a.action == c.action
                && a.status == ActiveStatus::Accepted
                && age(a) <= cfg.merge_window_seconds as i64
        }) {
            return Decision::Merged {
                action_id: a.action_id.clone(),
                parameters: merge_params(&a.parameters, &c.parameters),
            };
        }
    }
    // Same type already waiting for a person.
    if let Some(a) = state
        .active
        .iter()
        .find(|a| a.action == c.action && a.status == ActiveStatus::PendingApproval)
    {
        return Decision::Rejected {
            reason: RejectReason::PendingApproval,
            detail: format!("{} {} awaits approval", a.action, a.action_id),
            rule: Rule::PendingApproval,
        };
    }
    // Cooldown: the same type was accepted recently.
    if rule.cooldown_seconds > 0 {
        if let Some(a) = state.active.iter().find(|a| {
            a.action == c.action && a.status.in_force() && age(a) <= rule.cooldown_seconds as i64
        }) {
            return Decision::Rejected {
                reason: RejectReason::Cooldown,
                detail: format!(
                    "{} {} was accepted {} s ago (cooldown {} s)",
                    a.action,
                    a.action_id,
                    age(a),
                    rule.cooldown_seconds
                ),
                rule: Rule::Cooldown,
            };
        }
    }
    // Priority among conflicting types.
    let mut superseded = Vec::new();
    for a in state.active.iter().filter(|a| {
        cfg.conflicts(&a.action, &c.action)
            && (a.status == ActiveStatus::PendingApproval
                || age(a) <= cfg.conflict_window_seconds as i64)
    }) {
        if a.priority >= priority {
            return Decision::Rejected {
                reason: RejectReason::Conflict,
                detail: format!(
                    "conflicts with {} {} (priority {} >= {priority})",
                    a.action, a.action_id, a.priority
                ),
                rule: Rule::Priority,
            };
        }
        superseded.push(a.action_id.clone());
    }
    Decision::New {
        action_id: format!("act-{}", stable_id(&[&c.proposal_id])),
        priority,
        superseded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cfg() -> ResolveConfig {
        let mut actions = BTreeMap::new();
        actions.insert(
            "rollback".into(),
            ActionRule {
                priority: Some(100),
                conflicts_with: vec!["scale_down".into(), "scale_up".into()],
                cooldown_seconds: 600,
                invalidated_by: vec!["deployment".into()],
                ..Default::default()
            },
        );
        actions.insert(
            "scale_down".into(),
            ActionRule {
                priority: Some(10),
                conflicts_with: vec!["scale_up".into()],
                ..Default::default()
            },
        );
        actions.insert(
            "page".into(),
            ActionRule {
                merge: true,
                ..Default::default()
            },
        );
        ResolveConfig {
            actions,
            ..Default::default()
        }
    }

    fn cand(id: &str, action: &str, params: Value) -> Candidate {
        Candidate {
            proposal_id: id.into(),
            agent: "a".into(),
            action: action.into(),
            parameters: params,
            priority: 0,
            impact: Impact::Low,
            context_version: 5,
        }
    }

    fn active(
        id: &str,
        action: &str,
        prio: i32,
        status: ActiveStatus,
        at: i64,
        params: Value,
    ) -> ActiveAction {
        ActiveAction {
            action_id: id.into(),
            action: action.into(),
            priority: prio,
            status,
            at,
            params_hash: params_hash(&params),
            parameters: params,
            proposals: vec![],
            agents: vec![],
            approval_id: None,
            supersedes: Vec::new(),
        }
    }

    #[test]
    fn conflict_lower_priority_loses_higher_supersedes() {
        let c = cfg();
        let mut s = ResourceState::default();
        s.active.push(active(
            "rb",
            "rollback",
            100,
            ActiveStatus::PendingApproval,
            1000,
            json!({}),
        ));
        let d = decide(&c, &s, &cand("p1", "scale_down", json!({"n": 1})), 1010);
        assert!(
            matches!(
                d,
                Decision::Rejected {
                    reason: RejectReason::Conflict,
                    ..
                }
            ),
            "{d:?}"
        );
        let mut s = ResourceState::default();
        s.active.push(active(
            "sd",
            "scale_down",
            10,
            ActiveStatus::Accepted,
            1000,
            json!({}),
        ));
        match decide(&c, &s, &cand("p2", "rollback", json!({})), 1010) {
            Decision::New {
                priority,
                superseded,
                ..
            } => {
                assert_eq!(priority, 100);
                assert_eq!(superseded, ["sd"]);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn tool_actions_cannot_merge() {
        let mut c = ResolveConfig::default();
        c.actions.insert(
            "tool.ticket".into(),
            ActionRule {
                merge: true,
                ..Default::default()
            },
        );
        let p = c.problems(&["tool.ticket"], &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "resolve.actions.tool.ticket.merge");
    }

    #[test]
    fn dedupe_merge_cooldown_staleness_pending() {
        let c = cfg();
        let mut s = ResourceState::default();
        s.active.push(active(
            "pg",
            "page",
            0,
            ActiveStatus::Accepted,
            1000,
            json!({"sev": "major", "owner": "x"}),
        ));
        assert_eq!(
            decide(
                &c,
                &s,
                &cand("p", "page", json!({"sev": "major", "owner": "x"})),
                1050
            ),
            Decision::Duplicate {
                action_id: "pg".into()
            }
        );
        assert_eq!(
            decide(&c, &s, &cand("p", "page", json!({"sev": "critical"})), 1050),
            Decision::Merged {
                action_id: "pg".into(),
                parameters: json!({"sev": "critical", "owner": "x"})
            }
        );
        // Outside the merge window a page is a new action.
        assert!(matches!(
            decide(
                &c,
                &s,
                &cand("p", "page", json!({"sev": "critical"})),
                1000 + 400
            ),
            Decision::New { .. }
        ));
        s.active.push(active(
            "rb",
            "rollback",
            100,
            ActiveStatus::Accepted,
            1000,
            json!({"to": "v1"}),
        ));
        let d = decide(&c, &s, &cand("p", "rollback", json!({"to": "v0"})), 1100);
        assert!(
            matches!(
                d,
                Decision::Rejected {
                    reason: RejectReason::Cooldown,
                    ..
                }
            ),
            "{d:?}"
        );
        assert!(matches!(
            decide(
                &c,
                &s,
                &cand("p", "rollback", json!({"to": "v0"})),
                1000 + 700
            ),
            Decision::New { .. }
        ));
        let mut s = ResourceState::default();
        s.key_versions.insert("deployment".into(), 6);
        let d = decide(&c, &s, &cand("p", "rollback", json!({})), 1000);
        assert!(
            matches!(
                d,
                Decision::Rejected {
                    reason: RejectReason::Stale,
                    ..
                }
            ),
            "{d:?}"
        );
        s.key_versions.insert("deployment".into(), 5);
        assert!(matches!(
            decide(&c, &s, &cand("p", "rollback", json!({})), 1000),
            Decision::New { .. }
        ));
        s.active.push(active(
            "rb",
            "rollback",
            100,
            ActiveStatus::PendingApproval,
            900,
            json!({"to": "v1"}),
        ));
        let d = decide(&c, &s, &cand("p", "rollback", json!({"to": "v2"})), 1000);
        assert!(
            matches!(
                d,
                Decision::Rejected {
                    reason: RejectReason::PendingApproval,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    fn arb_action() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "rollback",
            "scale_down",
            "scale_up",
            "page",
            "restart",
        ])
        .prop_map(str::to_string)
    }

    #[test]
    fn an_action_is_kept_only_while_a_rule_of_its_type_can_look_at_it() {
        let c = cfg();
        let mut s = ResourceState::default();
        // `restart` has no rule: only dedupe (300 s) looks at it. `scale_down` conflicts
        // (1800 s), `rollback` also has a cooldown (600 s), `page` merges (120 s < dedupe).
        for (id, action) in [("r", "restart"), ("s", "scale_down"), ("p", "page")] {
            s.active
                .push(active(id, action, 1, ActiveStatus::Accepted, 0, json!({})));
        }
        s.active.push(active(
            "w",
            "restart",
            1,
            ActiveStatus::PendingApproval,
            0,
            json!({}),
        ));
        let ids = |s: &ResourceState| {
            s.active
                .iter()
                .map(|a| a.action_id.clone())
                .collect::<Vec<_>>()
        };
        let m = PRUNE_MARGIN_SECONDS;
        prune(&mut s, &c, 300 + m);
        assert_eq!(ids(&s), ["r", "s", "p", "w"]);
        prune(&mut s, &c, 301 + m);
        assert_eq!(ids(&s), ["s", "w"]);
        prune(&mut s, &c, 1801 + m);
        assert_eq!(ids(&s), ["w"], "awaiting approval: kept whatever its age");
        assert_eq!(c.relevance_seconds("rollback"), 1800);
        assert_eq!(
            c.relevance_seconds("scale_up"),
            1800,
            "named by another type's conflicts"
        );
        assert_eq!(c.relevance_seconds("unknown"), 300);
    }

    fn arb_state() -> impl Strategy<Value = ResourceState> {
        let entry = (
            arb_action(),
            0i64..4000,
            any::<u8>(),
            any::<bool>(),
            0i32..200,
        );
        prop::collection::vec(entry, 0..30).prop_map(|entries| ResourceState {
            active: entries
                .into_iter()
                .enumerate()
                .map(|(i, (action, at, p, pending, prio))| {
                    let status = if pending {
                        ActiveStatus::PendingApproval
                    } else {
                        ActiveStatus::Accepted
                    };
                    active(
                        &format!("a{i}"),
                        &action,
                        prio,
                        status,
                        at,
                        json!({"p": p % 3}),
                    )
                })
                .collect(),
            key_versions: BTreeMap::new(),
        })
    }

    proptest! {
        /// Pruning never changes a decision: whatever it drops, no rule would have looked at.
        #[test]
        fn pruning_never_changes_a_decision(state in arb_state(), action in arb_action(), p in any::<u8>(), prio in 0i32..200, now in 0i64..6000) {
            let c = cfg();
            let mut pruned = state.clone();
            prune(&mut pruned, &c, now);
            let mut cand = cand("p", &action, json!({"p": p % 3}));
            cand.priority = prio;
            prop_assert_eq!(decide(&c, &pruned, &cand, now), decide(&c, &state, &cand, now));
        }

        /// Applying accepted decisions in sequence never leaves two conflicting actions both active
        /// unless the later one has strictly higher priority (it supersedes), and ids are deterministic.
        #[test]
        fn no_two_conflicting_actions_without_supersession(seq in prop::collection::vec((arb_action(), 0i64..2000, any::<u8>()), 1..40)) {
            let c = cfg();
            let mut s = ResourceState::default();
            let mut now = 0;
            for (i, (action, dt, p)) in seq.iter().enumerate() {
                now += dt;
                let cand = cand(&format!("p{i}"), action, json!({"p": p % 3}));
                let d = decide(&c, &s, &cand, now);
                prop_assert_eq!(&d, &decide(&c, &s, &cand, now), "decide is deterministic");
                if let Decision::New { action_id, priority, superseded } = d {
                    for a in &s.active {
                        let live = now - a.at <= c.conflict_window_seconds as i64;
                        if live && c.conflicts(&a.action, action) {
                            prop_assert!(priority > a.priority && superseded.contains(&a.action_id));
                        }
                    }
                    s.active.retain(|a| !superseded.contains(&a.action_id));
                    s.active.push(active(&action_id, action, priority, ActiveStatus::Accepted, now, json!({"p": p % 3})));
                    prune(&mut s, &c, now);
                }
            }
        }
    }
}
