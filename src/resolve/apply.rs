//! The state change a decision makes, computed without I/O: given a proposal, the resource's state,
//! what [`super::rules::decide`] said and what governance said ([`Gate`]), the record of the decision
//! ([`Decided`]) and the new state to write ([`Change`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rules::{
    params_hash, ActiveAction, ActiveStatus, Decision, RejectReason, ResourceState, Rule,
};
use crate::pattern::stable_id;
use crate::records::{ActionData, ApprovalData, ProposalData};

/// How a proposal's decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A new action went to the actions topic.
    Accepted,
    /// A new action waits for a person.
    ApprovalRequested,
    Rejected,
    /// Identical to an active action: merged into it (provenance only).
    Deduplicated,
    /// Combined into an active action of a mergeable type.
    Merged,
    /// An action a person approved went to the actions topic ([`release`]).
    Released,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Accepted,
        Verdict::ApprovalRequested,
        Verdict::Rejected,
        Verdict::Deduplicated,
        Verdict::Merged,
        Verdict::Released,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::ApprovalRequested => "approval_requested",
            Verdict::Rejected => "rejected",
            Verdict::Deduplicated => "deduplicated",
            Verdict::Merged => "merged",
            Verdict::Released => "released",
        }
    }
}

/// What was decided for one proposal; stored so a redelivery emits the same records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub outcome: Verdict,
    #[serde(default)]
    pub reason: Option<String>,
    /// The rule that decided: a resolution rule, `access`, `budget`, or `approvals.<rule name>`
    /// (`approvals.rules[i]` for an unnamed rule).
    #[serde(default)]
    pub rule: Option<String>,
    pub detail: String,
    /// The action sent to `switchyard.actions` (accepted, or merged and sent again).
    #[serde(default)]
    pub action: Option<ActionData>,
    /// Approval records to send: a new request, superseded requests.
    #[serde(default)]
    pub approvals: Vec<ApprovalData>,
    /// The existing action a duplicate or merge went into.
    #[serde(default)]
    pub into_action: Option<String>,
    #[serde(default)]
    pub superseded: Vec<String>,
    /// When it was decided (RFC 3339): the `time` of every record it causes, so a re-emission is
    /// byte-identical.
    #[serde(default)]
    pub at: String,
}

impl Decided {
    fn new(outcome: Verdict, rule: Option<&str>, detail: String) -> Self {
        Decided {
            outcome,
            reason: None,
            rule: rule.map(str::to_string),
            detail,
            action: None,
            approvals: Vec::new(),
            into_action: None,
            superseded: Vec::new(),
            at: String::new(),
        }
    }

    fn rejected(reason: RejectReason, rule: &str, detail: String) -> Self {
        Decided {
            reason: Some(reason.as_str().into()),
            ..Decided::new(Verdict::Rejected, Some(rule), detail)
        }
    }

    /// The approval requests among the records (not superseded ones).
    pub fn pending_approvals(&self) -> impl Iterator<Item = &ApprovalData> {
        self.approvals.iter().filter(|a| a.status == "pending")
    }
}

/// An approval as stored with its resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredApproval {
    pub approval: ApprovalData,
    /// The action that goes out when approved (token assigned then).
    pub action: ActionData,
    #[serde(default)]
    pub escalated: bool,
    /// When its current status was decided (RFC 3339): the time of the records it causes, so they
    /// are byte-identical when produced again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decided_at: String,
    /// The trace context of the decision that asked for it (the wait's span hangs under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The resource as the proposal saw it (the inbox warns when it moved since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<Seen>,
    /// A person's answer other than yes or no (edit and approve, respond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amend: Option<Amend>,
    /// Approved: the accepted actions it superseded then (see `ActiveAction::supersedes`), named
    /// in its decision's audit record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<String>,
    /// Approved by a build that leaves sending the action to resolve: the decision's records carry
    /// a release (also when produced again after resolve sent the action), never the action.
    /// False for approvals approved by an earlier build, whose records hold the action itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_release: bool,
}

impl StoredApproval {
    /// Whether nobody has decided it yet (pending, or escalated and pending again).
    pub fn is_open(&self) -> bool {
        matches!(self.approval.status.as_str(), "pending" | "escalated")
    }
}

/// What the resource looked like when an approval was asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// The resource's fencing token then: a higher one now means actions went out since.
    pub token: u64,
    /// The version of the resource's shared context the agent saw.
    pub context_version: u64,
}

/// A person's answer to an approval other than approve or reject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Amend {
    /// Approved with other parameters: the approval is superseded by a new proposal with them,
    /// which resolve and governance check again (it needs no second approval).
    Edit {
        parameters: Value,
        proposal_id: String,
        /// The version of the resource's context the person saw when editing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context_version: Option<u64>,
        /// What resolve decided for the edited proposal (`accepted`, `rejected: …`), set in the
        /// same compare-and-set that decided it: the edit is used once, and the inbox shows it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<String>,
    },
    /// Sent back to the proposing agent with a comment, as a new task, so it can plan again.
    Respond {
        comment: String,
        agent: String,
        task_id: String,
    },
}

/// Governance's answer for a new action, decided before [`apply`] runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// The action may go out now.
    Allow,
    /// A person must approve it first: `rule` names the approval rule that says so, the first
    /// level's approver `group` (rules with an escalation path) has `timeout_seconds` to decide.
    NeedsApproval {
        rule: String,
        timeout_seconds: u64,
        group: Option<String>,
    },
    /// Governance refuses it.
    Refuse {
        reason: RejectReason,
        rule: &'static str,
        detail: String,
    },
}

/// The resource's state after a decision: written by compare-and-set on the revision read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Change {
    pub state: ResourceState,
    pub token: u64,
    /// Approvals created or changed by the decision.
    pub approvals: Vec<StoredApproval>,
    /// Approvals to drop from the resource: decided longer ago than
    /// `governance.approvals.keep_decided_seconds` ([`decided_before`]).
    pub forget_approvals: Vec<String>,
}

impl Change {
    /// Drops the approvals `ids` from the resource with this write ([`decided_before`]), and the
    /// state's entry of any of them approved and never sent (its release refused or lost): an
    /// action awaiting its release is in force ([`ActiveStatus::Approved`]); without this it would
    /// stay so for good.
    pub fn forget(&mut self, ids: Vec<String>) {
        self.state.active.retain(|a| {
            a.status != ActiveStatus::Approved
                || a.approval_id.as_ref().is_none_or(|id| !ids.contains(id))
        });
        self.forget_approvals = ids;
    }
}

/// The approvals of a resource decided before `cutoff` (seconds since the epoch): what a write
/// drops from it, so a busy resource's record does not keep every approval it ever had. Open ones
/// and ones whose decision time cannot be read stay.
pub fn decided_before(approvals: &BTreeMap<String, StoredApproval>, cutoff: i64) -> Vec<String> {
    approvals
        .iter()
        .filter(|(_, s)| !s.is_open())
        .filter(|(_, s)| {
            chrono::DateTime::parse_from_rfc3339(&s.decided_at)
                .is_ok_and(|t| t.timestamp() < cutoff)
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// The resource's state as the rules see it, at the start of a decision.
pub struct Current<'a> {
    pub state: ResourceState,
    pub token: u64,
    pub approvals: &'a BTreeMap<String, StoredApproval>,
    /// The lowest token this decision may hand out: [`token_floor`] of the proposal's offset.
    pub token_floor: u64,
}

/// Bits of a fencing token below the proposal offset: room for this many tokens per proposal
/// (approvals decided between two proposals of a resource take the next ones).
const TOKEN_OFFSET_SHIFT: u32 = 20;

/// The lowest fencing token a decision on the proposal at `offset` hands out. A resource's proposals
/// all sit in one partition and are decided in offset order, so tokens derived from offsets keep
/// rising even when the stored counter is lost (a Redis that restarted empty): an executor never
/// sees a token go backwards.
pub fn token_floor(offset: i64) -> u64 {
    (offset.max(0) as u64 + 1) << TOKEN_OFFSET_SHIFT
}

/// The next fencing token after `last`, at least `floor`.
pub fn next_token(last: u64, floor: u64) -> u64 {
    (last + 1).max(floor)
}

/// An action names at most this many proposals (`proposals` of its record and of the resolve
/// state): the one that created it and the most recent of those merged into it since. Without a
/// bound a busy resource's merged action (a `page` per breach) grew with every proposal, and so did
/// every record of it and every read and write of the resource's state.
pub const PROVENANCE: usize = 32;

/// Adds `p` to an action's provenance: its proposal (within [`PROVENANCE`]) and its agent.
fn note_provenance(a: &mut ActiveAction, p: &ProposalData) {
    if a.proposals.len() >= PROVENANCE {
        a.proposals.remove(1);
    }
    a.proposals.push(p.proposal_id.clone());
    if !a.agents.contains(&p.agent) {
        a.agents.push(p.agent.clone());
    }
}

fn action_of(
    p: &ProposalData,
    action_id: &str,
    priority: i32,
    parameters: &Value,
    proposals: Vec<String>,
    agents: Vec<String>,
    token: u64,
) -> ActionData {
    ActionData {
        action_id: action_id.to_string(),
        action: p.action.clone(),
        resource: p.resource.clone(),
        tenant: p.tenant.clone(),
        workflow_id: p.workflow_id.clone(),
        parameters: parameters.clone(),
        fencing_token: token,
        proposals: json!(proposals),
        agents: json!(agents),
        priority,
        impact: p.impact,
        // Only a verified edit in the inbox carries it (see `stages::resolve`).
        approved_by: p.approved_by.clone(),
        reason: p.reason.clone(),
    }
}

/// Why [`release`] sends nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum NoRelease {
    /// Sent before: this is a copy of its release (the approvals outbox produces one again when
    /// it cannot tell whether the first reached the topic).
    Done(String),
    /// Nothing a person approved is waiting here: an unknown or forgotten approval, or one not
    /// approved (a release record someone else wrote).
    Refused(String),
}

/// Releases the action of approval `approval_id`, which a person approved: stamped with the
/// resource's next fencing token, it is the decision's action (resolve writes it to the actions
/// topic). Approval decisions take no token themselves: resolve, the owner of the resource's
/// partition, is the one writer of its tokens and actions, so along the actions topic a resource's
/// tokens only rise. `Err` says why there is nothing to release: an approval this resource does not
/// hold (never, or forgotten), one not approved, one released before. Pure.
pub fn release(
    current: Current<'_>,
    approval_id: &str,
    now: i64,
) -> Result<(Decided, Change), NoRelease> {
    let Some(stored) = current.approvals.get(approval_id) else {
        return Err(NoRelease::Refused(format!(
            "approval {approval_id} is not among the resource's approvals (never asked for here, or forgotten after keep_decided_seconds)"
        )));
    };
    if stored.approval.status != "approved" {
        return Err(NoRelease::Refused(format!(
            "approval {approval_id} is {}, not approved",
            stored.approval.status
        )));
    }
    if stored.action.fencing_token != 0 {
        return Err(NoRelease::Done(format!(
            "approval {approval_id}'s action went out before, with fencing token {}",
            stored.action.fencing_token
        )));
    }
    // Its entry in the resource's state: gone when a later action superseded it before its release.
    if !current.state.active.iter().any(|a| {
        a.approval_id.as_deref() == Some(approval_id) && a.status == ActiveStatus::Approved
    }) {
        return Err(NoRelease::Refused(format!(
            "approval {approval_id}'s action was superseded before its release; it is not sent"
        )));
    }
    let token = next_token(current.token, current.token_floor);
    let mut s = stored.clone();
    // The approval record stays as decided (its `action_record` without a token), so the
    // decision's records produced again are the same bytes; the stored action has the token.
    s.action.fencing_token = token;
    let rule = s.approval.rule.as_ref().map(|r| format!("approvals.{r}"));
    let decided = Decided {
        action: Some(s.action.clone()),
        ..Decided::new(
            Verdict::Released,
            rule.as_deref(),
            format!(
                "approved by {}",
                s.approval.decided_by.as_deref().unwrap_or("?")
            ),
        )
    };
    // Gone out now: an accepted action from here on (merges may go into it, cooldowns count).
    let mut state = current.state;
    for a in state
        .active
        .iter_mut()
        .filter(|a| a.approval_id.as_deref() == Some(approval_id))
    {
        a.status = ActiveStatus::Accepted;
        a.at = now;
    }
    let change = Change {
        state,
        token,
        approvals: vec![s],
        forget_approvals: Vec::new(),
    };
    Ok((decided, change))
}

/// Applies `decision` (and, for a new action, `gate`) to the resource: the decision's record and the
/// state to write. `now` is seconds since the epoch. Pure.
pub fn apply(
    p: &ProposalData,
    current: Current<'_>,
    decision: Decision,
    gate: Gate,
    now: i64,
) -> Result<(Decided, Change), serde_json::Error> {
    let Current {
        mut state,
        mut token,
        approvals: stored,
        token_floor: floor,
    } = current;
    let mut changed = Vec::new();
    let decided = match decision {
        Decision::Rejected {
            reason,
            detail,
            rule,
        } => Decided::rejected(reason, rule.as_str(), detail),
        Decision::Duplicate { action_id } => {
            if let Some(a) = state.active.iter_mut().find(|a| a.action_id == action_id) {
                note_provenance(a, p);
            }
            Decided {
                into_action: Some(action_id.clone()),
                ..Decided::new(
                    Verdict::Deduplicated,
                    Some(Rule::Dedupe.as_str()),
                    format!("same as {action_id}"),
                )
            }
        }
        Decision::Merged { .. }
            if matches!(gate, Gate::Refuse { .. } | Gate::NeedsApproval { .. }) =>
        {
            // Governance refuses the merging proposal: its parameters do not go out. (One needing
            // approval is judged on its own by the caller, `decide_with`; never merged unseen.)
            match gate {
                Gate::Refuse {
                    reason,
                    rule,
                    detail,
                } => Decided::rejected(reason, rule, detail),
                _ => Decided::rejected(
                    RejectReason::PendingApproval,
                    Rule::PendingApproval.as_str(),
                    "merging needs a person's approval".into(),
                ),
            }
        }
        Decision::Merged {
            action_id,
            parameters,
        } => {
            let mut action = None;
            if let Some(a) = state.active.iter_mut().find(|a| a.action_id == action_id) {
                note_provenance(a, p);
                a.parameters = parameters.clone();
                a.params_hash = params_hash(&parameters);
                if a.status == ActiveStatus::Accepted {
                    token = next_token(token, floor);
                    action = Some(action_of(
                        p,
                        &action_id,
                        a.priority,
                        &parameters,
                        a.proposals.clone(),
                        a.agents.clone(),
                        token,
                    ));
                }
            }
            Decided {
                action,
                into_action: Some(action_id.clone()),
                ..Decided::new(
                    Verdict::Merged,
                    Some(Rule::Merge.as_str()),
                    format!("combined into {action_id}"),
                )
            }
        }
        Decision::New {
            action_id,
            priority,
            superseded,
        } => match gate {
            Gate::Refuse {
                reason,
                rule,
                detail,
            } => Decided::rejected(reason, rule, detail),
            gate => {
                // An action awaiting approval supersedes only what awaits approval too: accepted
                // actions stay in force until it is approved (`supersedes`), so a rejected or
                // expired approval cancels nothing and what conflicts with them stays refused.
                let (superseded, later): (Vec<String>, Vec<String>) =
                    if matches!(gate, Gate::NeedsApproval { .. }) {
                        superseded.into_iter().partition(|id| {
                            state.active.iter().any(|a| {
                                &a.action_id == id && a.status == ActiveStatus::PendingApproval
                            })
                        })
                    } else {
                        (superseded, Vec::new())
                    };
                let mut approvals = Vec::new();
                for id in &superseded {
                    let Some(apr) = state
                        .active
                        .iter()
                        .find(|a| &a.action_id == id)
                        .and_then(|a| a.approval_id.as_ref())
                        .and_then(|x| stored.get(x))
                    else {
                        continue;
                    };
                    let mut s = apr.clone();
                    s.approval.status = "superseded".into();
                    s.approval.why =
                        Some(format!("superseded by {action_id} (priority {priority})"));
                    approvals.push(s.approval.clone());
                    changed.push(s);
                }
                state.active.retain(|a| !superseded.contains(&a.action_id));
                let provenance = vec![p.proposal_id.clone()];
                let agents = vec![p.agent.clone()];
                let mut entry = ActiveAction {
                    action_id: action_id.clone(),
                    action: p.action.clone(),
                    priority,
                    status: ActiveStatus::Accepted,
                    at: now,
                    params_hash: params_hash(&p.parameters),
                    parameters: p.parameters.clone(),
                    proposals: provenance.clone(),
                    agents: agents.clone(),
                    approval_id: None,
                    supersedes: later,
                };
                match gate {
                    Gate::NeedsApproval {
                        rule,
                        timeout_seconds,
                        group,
                    } => {
                        let approval_id = format!("apr-{}", stable_id(&[&action_id]));
                        let action = action_of(
                            p,
                            &action_id,
                            priority,
                            &p.parameters,
                            provenance,
                            agents,
                            0,
                        );
                        let approval = ApprovalData {
                            approval_id: approval_id.clone(),
                            action_id: action_id.clone(),
                            action: p.action.clone(),
                            resource: p.resource.clone(),
                            tenant: p.tenant.clone(),
                            status: "pending".into(),
                            decided_by: None,
                            why: None,
                            requested_at: now,
                            expires_at: now + timeout_seconds as i64,
                            action_record: serde_json::to_value(&action)?,
                            rule: Some(rule.clone()),
                            confidence: p.confidence,
                            level: 0,
                            group,
                        };
                        changed.push(StoredApproval {
                            approval: approval.clone(),
                            action,
                            escalated: false,
                            decided_at: String::new(),
                            traceparent: None,
                            seen: Some(Seen {
                                token,
                                context_version: p.context_version,
                            }),
                            amend: None,
                            superseded: Vec::new(),
                            by_release: false,
                        });
                        entry.status = ActiveStatus::PendingApproval;
                        entry.approval_id = Some(approval_id);
                        state.active.push(entry);
                        approvals.insert(0, approval);
                        Decided {
                            approvals,
                            superseded,
                            ..Decided::new(
                                Verdict::ApprovalRequested,
                                Some(&format!("approvals.{rule}")),
                                format!("{} needs approval", p.action),
                            )
                        }
                    }
                    _ => {
                        token = next_token(token, floor);
                        state.active.push(entry);
                        let action = action_of(
                            p,
                            &action_id,
                            priority,
                            &p.parameters,
                            provenance,
                            agents,
                            token,
                        );
                        Decided {
                            action: Some(action),
                            approvals,
                            superseded,
                            ..Decided::new(
                                Verdict::Accepted,
                                None,
                                format!("accepted with fencing token {token}"),
                            )
                        }
                    }
                }
            }
        },
    };
    state.key_versions.clear();
    Ok((
        decided,
        Change {
            state,
            token,
            approvals: changed,
            forget_approvals: Vec::new(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_names_its_first_proposal_and_the_most_recent_others() {
        let mut a = ActiveAction {
            action_id: "act".into(),
            action: "page".into(),
            priority: 0,
            status: ActiveStatus::Accepted,
            at: 0,
            params_hash: String::new(),
            parameters: json!({}),
            proposals: vec!["p0".into()],
            agents: vec!["x".into()],
            approval_id: None,
            supersedes: Vec::new(),
        };
        for i in 1..=100 {
            let p: ProposalData = serde_json::from_value(json!({
                "proposal_id": format!("p{i}"), "task_id": "t", "workflow_id": "w",
                "agent": if i % 2 == 0 { "x" } else { "y" }, "action": "page", "resource": "r",
                "tenant": "t", "parameters": {}, "priority": 0, "impact": "low",
                "context_version": 0
            }))
            .expect("a proposal");
            note_provenance(&mut a, &p);
        }
        assert_eq!(a.proposals.len(), PROVENANCE);
        assert_eq!(a.proposals[0], "p0", "the proposal that created it");
        assert_eq!(a.proposals[1], format!("p{}", 100 - PROVENANCE + 2));
        assert_eq!(a.proposals.last().map(String::as_str), Some("p100"));
        assert_eq!(a.agents, ["x", "y"]);
    }

    #[test]
    fn tokens_rise_with_offsets_even_from_a_lost_counter() {
        // Normal operation: the counter, at least the proposal's floor.
        let t1 = next_token(0, token_floor(7));
        let t2 = next_token(t1, token_floor(9));
        assert!(t2 > t1);
        // Approvals between proposals take the next tokens.
        let t3 = next_token(t2, 0);
        assert_eq!(t3, t2 + 1);
        // The counter lost (0 again): the next proposal's floor is still above every earlier token.
        let t4 = next_token(0, token_floor(10));
        assert!(t4 > t3);
    }
}
