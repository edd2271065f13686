//! A person's answers to an approval besides approve and reject (the inbox's other buttons):
//!
//! - **edit and approve**: the approval is closed as `superseded` and a new proposal with the
//!   edited parameters goes to the proposals topic, where resolve and governance check it again
//!   (conflicts, access, budgets, staleness); it needs no second approval because the closed
//!   approval holds exactly this edit by this person (see `stages::resolve`);
//! - **respond**: the approval is closed as `rejected` and the comment goes back to the proposing
//!   agent as a new task (event type [`RESPONSE_TYPE`]), so it can plan again.
//!
//! Both are one compare-and-set on the resource, like a decision, and go through the outbox: the
//! new proposal or task is one of the decision's records, produced again by the sweeper when a
//! crash left it unsent, with the same id, so it is decided or run once.

use serde_json::{json, Value};

use super::approvals::{first_agent, ApprovalError, Approvals, Decision, Verdict, SOURCE};
use crate::event::{now_rfc3339, now_secs, CloudEvent};
use crate::kafka::Output;
use crate::records::{record_event, types, ProposalData, TaskData};
use crate::resolve::apply::{Amend, Change, StoredApproval};
use crate::resolve::store::Write;

/// Whether the caller may decide an approval as it stands (see [`super::approvals::may_decide`]).
pub type Allowed<'a> = dyn Fn(&crate::records::ApprovalData) -> Result<(), String> + Sync + 'a;

/// A person's answer to an approval, as every front door (the approvals API, the inbox) takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Approve {
        why: String,
    },
    Reject {
        why: String,
    },
    /// Approve with these parameters instead ([`Approvals::edit`]); `context_version`: the version
    /// of the resource's context the person saw.
    Edit {
        parameters: Value,
        why: String,
        context_version: Option<u64>,
    },
    /// Send it back to the agent ([`Approvals::respond`]).
    Respond {
        comment: String,
    },
}

/// Event type of the task a response sends back to the proposing agent.
pub const RESPONSE_TYPE: &str = "switchyard.inbox.response";
/// The largest edited parameters, in bytes of JSON.
pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;

/// Whether edited parameters may replace the proposed ones: a JSON object of at most
/// [`MAX_PARAMETERS_BYTES`]. Pure, so it is fuzzed (`fuzz/`).
pub fn check_parameters(parameters: &Value) -> Result<(), ApprovalError> {
    if !parameters.is_object() {
        return Err(ApprovalError::Invalid(
            "the edited parameters must be a JSON object".into(),
        ));
    }
    let size = parameters.to_string().len();
    if size > MAX_PARAMETERS_BYTES {
        return Err(ApprovalError::Invalid(format!(
            "the edited parameters are {size} bytes; at most {MAX_PARAMETERS_BYTES}"
        )));
    }
    Ok(())
}

impl Approvals {
    /// Applies a person's answer `by` them, when `allowed` accepts the approval as it stands.
    pub async fn answer(
        &self,
        approval_id: &str,
        by: &str,
        answer: Answer,
        allowed: &Allowed<'_>,
    ) -> Result<Decision, ApprovalError> {
        let (id, outbox) = (approval_id, true);
        match answer {
            Answer::Approve { why } => {
                self.decide_if(id, Verdict::Approve, by, &why, false, outbox, allowed)
                    .await
            }
            Answer::Reject { why } => {
                self.decide_if(id, Verdict::Reject, by, &why, false, outbox, allowed)
                    .await
            }
            Answer::Edit {
                parameters,
                why,
                context_version,
            } => {
                self.edit(id, by, &why, parameters, context_version, allowed)
                    .await
            }
            Answer::Respond { comment } => self.respond(id, by, &comment, allowed).await,
        }
    }

    /// Approves the action with `parameters` instead of the proposed ones: closes the approval as
    /// superseded and resubmits the edit as a proposal. `context_version` is the version of the
    /// resource's context the person saw (the proposal's own when not given).
    pub async fn edit(
        &self,
        approval_id: &str,
        by: &str,
        why: &str,
        parameters: Value,
        context_version: Option<u64>,
        allowed: &Allowed<'_>,
    ) -> Result<Decision, ApprovalError> {
        check_parameters(&parameters)?;
        let proposal_id = format!(
            "edit-{}",
            crate::pattern::stable_id(&[approval_id, &parameters.to_string()])
        );
        let why = if why.trim().is_empty() {
            "edited and approved".to_string()
        } else {
            why.to_string()
        };
        self.amend(
            approval_id,
            by,
            &why,
            "superseded",
            Amend::Edit {
                parameters,
                proposal_id,
                context_version,
                outcome: None,
            },
            allowed,
        )
        .await
    }

    /// Sends the approval back to its agent with `comment`: closes it as rejected and gives the
    /// agent a new task carrying the proposal and the comment.
    pub async fn respond(
        &self,
        approval_id: &str,
        by: &str,
        comment: &str,
        allowed: &Allowed<'_>,
    ) -> Result<Decision, ApprovalError> {
        if comment.trim().is_empty() {
            return Err(ApprovalError::Invalid(
                "a response needs a comment for the agent".into(),
            ));
        }
        let agent = match self.get(approval_id).await? {
            Some(s) => first_agent(&s),
            None => return Err(ApprovalError::NotFound(approval_id.into())),
        };
        let why = format!("returned to {agent}: {comment}");
        let task_id = format!("respond-{approval_id}");
        self.amend(
            approval_id,
            by,
            &why,
            "rejected",
            Amend::Respond {
                comment: comment.to_string(),
                agent,
                task_id,
            },
            allowed,
        )
        .await
    }

    async fn amend(
        &self,
        approval_id: &str,
        by: &str,
        why: &str,
        status: &str,
        amend: Amend,
        allowed: &Allowed<'_>,
    ) -> Result<Decision, ApprovalError> {
        super::approvals::check_text(by, why).map_err(ApprovalError::Invalid)?;
        let key = self.key_of(approval_id).await?;
        for _ in 0..20 {
            let (loaded, stored) = self.load_approval(&key, approval_id).await?;
            if !stored.is_open() {
                return self.answered_before(stored).await;
            }
            allowed(&stored.approval).map_err(ApprovalError::Forbidden)?;
            if !amendable(&stored) {
                return Err(ApprovalError::Invalid(format!(
                    "{} was not proposed by an agent (it is {}): approve or reject it",
                    approval_id, stored.approval.action
                )));
            }
            let now = now_secs();
            let mut s = stored.clone();
            s.decided_at = now_rfc3339();
            s.approval.status = status.into();
            s.approval.decided_by = Some(by.to_string());
            s.approval.why = Some(why.to_string());
            s.amend = Some(amend.clone());
            let mut state = loaded.state.clone();
            state
                .active
                .retain(|a| a.approval_id.as_deref() != Some(approval_id));
            self.check_sizes(&s, None)?;
            self.store.outbox_add(approval_id, now).await?;
            let change = Change {
                state,
                token: loaded.token,
                approvals: vec![s.clone()],
                forget_approvals: Vec::new(),
            };
            let write = Write {
                change: &change,
                applied: None,
                decision: None,
                place: None,
            };
            if self.store.commit(&key, loaded.rev, write).await? {
                self.store.index_close(approval_id).await?;
                let kind = match amend {
                    Amend::Edit { .. } => "edited",
                    Amend::Respond { .. } => "responded",
                };
                // People's answers count on the proposing agents' scorecards like a decision.
                let fate = match amend {
                    Amend::Edit { .. } => "approved",
                    Amend::Respond { .. } => "declined",
                };
                let tally = super::approvals::Tally::verdict(&s, kind, fate, now);
                if let Some(stats) = &self.stats {
                    for a in &tally.agents {
                        stats.score(a, fate);
                    }
                }
                self.tally(tally).await;
                let outputs = self.outputs(&s, None).await?;
                return Ok(Decision {
                    approval: s.approval,
                    fresh: true,
                    action: None,
                    outputs,
                });
            }
        }
        Err(ApprovalError::Contention)
    }

    /// The record an amended approval sends on: the edited proposal or the agent's new task.
    pub(crate) fn amend_record(
        &self,
        s: &StoredApproval,
        tp: Option<&str>,
    ) -> Result<Option<Output>, crate::error::ProcessError> {
        let (a, act) = (&s.approval, &s.action);
        let time = s.decided_at.as_str();
        match &s.amend {
            None => Ok(None),
            Some(Amend::Edit {
                parameters,
                proposal_id,
                context_version,
                ..
            }) => {
                let p = ProposalData {
                    proposal_id: proposal_id.clone(),
                    task_id: format!("inbox-{}", a.approval_id),
                    workflow_id: act.workflow_id.clone(),
                    agent: first_agent(s),
                    action: act.action.clone(),
                    resource: act.resource.clone(),
                    tenant: act.tenant.clone(),
                    parameters: parameters.clone(),
                    priority: act.priority,
                    impact: act.impact,
                    context_version: context_version
                        .or(s.seen.as_ref().map(|v| v.context_version))
                        .unwrap_or(0),
                    reason: Some(match &a.why {
                        Some(w) => {
                            format!("edited by {}: {w}", a.decided_by.as_deref().unwrap_or("?"))
                        }
                        None => "edited in the inbox".into(),
                    }),
                    event_id: None,
                    cost: None,
                    seen_at: None,
                    confidence: None,
                    approved_by: a.decided_by.clone(),
                    edit_of: Some(a.approval_id.clone()),
                };
                let ev = record_event(
                    proposal_id.clone(),
                    SOURCE,
                    types::PROPOSAL,
                    &act.resource,
                    &act.tenant,
                    tp,
                    time,
                    &p,
                )?;
                Ok(Some(self.emitter.emit(&self.proposals_topic, &ev)?))
            }
            Some(Amend::Respond {
                comment,
                agent,
                task_id,
            }) => {
                let event = CloudEvent::new(format!("{}-response", a.approval_id), SOURCE, RESPONSE_TYPE)
                    .with_subject(act.resource.clone())
                    .with_time(time)
                    .with_extension("tenant", act.tenant.clone())
                    .with_data(json!({
                        "approval_id": a.approval_id, "action": act.action, "parameters": act.parameters,
                        "reason": act.reason, "comment": comment, "by": a.decided_by,
                    }));
                let task = TaskData {
                    task_id: task_id.clone(),
                    workflow_id: act.workflow_id.clone(),
                    agent: agent.clone(),
                    route: "inbox".into(),
                    priority: act.priority,
                    resource: act.resource.clone(),
                    tenant: act.tenant.clone(),
                    event: serde_json::to_value(&event)
                        .map_err(|e| crate::error::ProcessError::Fatal(e.to_string()))?,
                    step: None,
                };
                let ev = record_event(
                    task_id.clone(),
                    SOURCE,
                    types::TASK,
                    &act.resource,
                    &act.tenant,
                    tp,
                    time,
                    &task,
                )?;
                Ok(Some(self.emitter.emit(&self.tasks_topic, &ev)?))
            }
        }
    }
}

/// Whether an approval came from an agent's proposal, so it can be edited or sent back (a model
/// call over its budget can only be approved or rejected).
pub fn amendable(s: &StoredApproval) -> bool {
    s.action.proposals.as_array().is_some_and(|p| !p.is_empty())
}
