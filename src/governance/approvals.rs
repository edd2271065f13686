//! Human approval: decisions through the HTTP API (`/v1/approvals`) or the decisions topic, and a
//! sweeper that expires (or escalates) requests nobody decided in time.
//!
//! A pending approval lives in its resource's Redis hash; nothing waits on a thread or a partition.
//! Every transition is a compare-and-set on the resource, so two people (or two instances) deciding
//! at once produce one decision. Deciding again returns the same records, so a caller that crashed
//! before producing them can simply retry.
//!
//! Nothing moves before every record a decision implies can be written: free text is bounded
//! ([`MAX_BY_BYTES`], [`MAX_WHY_BYTES`]) and each record's size is checked against the producer's
//! limit first. Decisions made outside Kafka's redelivery (the HTTP API, the CLI, the expiry
//! sweeper) go through an outbox: noted before the state moves, cleared once every record is
//! produced; the sweeper produces what a crash left in between.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::escalation::OnDeadline;
pub use super::escalation::{may_decide, Decider};
use super::notify::Notifier;
use super::ApprovalsConfig;
use crate::audit::Sealer;
use crate::error::ProcessError;
use crate::event::{now_rfc3339, now_secs, CloudEvent};
use crate::kafka::{Output, Producer};
use crate::records::{
    audit_event, record_event, types, ActionData, ApprovalData, AuditData, Emitter, ProposalData,
};
use crate::resolve::apply::{Change, StoredApproval};
use crate::resolve::rules::ActiveStatus;
use crate::resolve::store::{ResourceStore, Write};
use crate::spans::{self, Span};
use crate::store::StoreError;
use crate::telemetry::METRICS;

/// Source attribute of approval records (approvals are part of resolve + govern).
pub const SOURCE: &str = "switchyard/resolve";

/// A person's (or a timer's) verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approve,
    Reject,
}

/// The longest name of who decided, in bytes.
pub const MAX_BY_BYTES: usize = 256;
/// The longest reason given with a decision, in bytes.
pub const MAX_WHY_BYTES: usize = 4096;
/// Room each record keeps for what sealing adds to an audit record (seq, prev_hash, hash).
const SEAL_MARGIN: usize = 1024;

/// Checks the free text of a decision: who (required, one line) and why, both bounded.
pub fn check_text(by: &str, why: &str) -> Result<(), String> {
    if by.trim().is_empty() {
        return Err("by must name who decides".into());
    }
    if by.len() > MAX_BY_BYTES {
        return Err(format!("by is {} bytes; at most {MAX_BY_BYTES}", by.len()));
    }
    if by.chars().any(char::is_control) {
        return Err("by must be one line without control characters".into());
    }
    if why.len() > MAX_WHY_BYTES {
        return Err(format!(
            "why is {} bytes; at most {MAX_WHY_BYTES}",
            why.len()
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Encode(String),
    #[error("resource state kept changing; try again")]
    Contention,
    /// The request itself is wrong (text too long, ...): nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// A record the decision implies would be larger than the producer can write: nothing was
    /// changed.
    #[error("{0}")]
    TooLarge(String),
    /// The caller may not decide this approval now (see [`may_decide`]): nothing was changed.
    #[error("{0}")]
    Forbidden(String),
}

/// A page of open approvals.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub approvals: Vec<ApprovalData>,
    /// Where the next page starts (`expires_at:approval_id`), when there is one.
    pub next: Option<String>,
}

/// What a decision did, with the records to produce.
#[derive(Debug, Clone)]
pub struct Decision {
    pub approval: ApprovalData,
    /// False when the approval had already been decided (the records are the same as then).
    pub fresh: bool,
    pub action: Option<ActionData>,
    pub outputs: Vec<Output>,
}

pub struct Approvals {
    pub store: Arc<dyn ResourceStore>,
    pub emitter: Emitter,
    pub config: ApprovalsConfig,
    pub actions_topic: String,
    pub approvals_topic: String,
    /// Where an edited approval's new proposal goes (see [`super::amend`]).
    pub proposals_topic: String,
    /// Where a response's new task for the agent goes.
    pub tasks_topic: String,
    /// Seals approval decisions into their resource's audit chain.
    pub sealer: Arc<Sealer>,
    /// Tenants that had pending approvals (their gauge is kept, at 0 when none are pending).
    pub tenants: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Tenants named in the config: the only `tenant` label values (others count as `other`).
    pub known_tenants: Vec<String>,
    /// Approvals the sweeper could not move on (their records too large for a lowered topic limit,
    /// their stored value unreadable): logged as an error once each, then at debug.
    pub stuck: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The largest record the producer writes (`message.max.bytes`).
    pub max_output_bytes: usize,
    /// How long the producer may take to deliver a record (`message.timeout.ms`, in seconds): a
    /// request's records still unsent after longer than that are the sweeper's to produce.
    pub delivery_timeout_seconds: u64,
    /// And what each topic takes (its `max.message.bytes`, when read at start).
    pub topic_limits: crate::kafka::TopicLimits,
    /// Scorecards: people's verdicts count for or against the proposing agents. The CLI, which
    /// has no flusher, flushes after deciding.
    pub stats: Option<Arc<crate::agents::stats::AgentStats>>,
    /// Tells rules' webhooks about escalations and expiries (none: no rule has `notify:`).
    pub notifier: Option<Arc<Notifier>>,
    /// Where this process's decisions are counted in the metrics: here (a running switchyard), or
    /// handed through the store to a running one's sweeper (the CLI, which serves no metrics).
    pub counts: Counts,
}

/// Where decisions are counted (see [`Approvals::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Counts {
    /// In this process's metrics.
    #[default]
    Here,
    /// Left in the store for a running switchyard to count ([`ResourceStore::tally_add`]).
    Relay,
}

/// What one decision adds to the metrics: `switchyard_approvals_total{kind}`, and for a verdict
/// (not an escalation) `switchyard_approval_wait_seconds{kind}` and
/// `switchyard_agent_proposals_total{agent, outcome}` of the proposing agents. Counted once,
/// by the process that made the decision, or — made by the CLI — by the running switchyard
/// that takes it from the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub kind: String,
    /// Seconds from the request to the decision (none for an escalation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<f64>,
    /// `approved` or `declined`, on each agent's scorecard counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fate: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// The agents whose accepted actions an approved action superseded (one entry per action's
    /// agent): `switchyard_agent_actions_undone_total`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<String>,
}

impl Tally {
    /// The tally of a committed verdict on `s` of `kind` (its fate for the agents: `fate`).
    pub(crate) fn verdict(s: &StoredApproval, kind: &str, fate: &str, now: i64) -> Tally {
        Tally {
            kind: kind.into(),
            wait_seconds: Some((now - s.approval.requested_at).max(0) as f64),
            fate: Some(fate.into()),
            agents: s
                .action
                .agents
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_string)
                .collect(),
            undone: Vec::new(),
        }
    }

    /// Adds it to this process's metrics.
    pub fn count(&self) {
        METRICS.approvals.with_label_values(&[&self.kind]).inc();
        if let Some(w) = self.wait_seconds {
            METRICS
                .approval_wait
                .with_label_values(&[&self.kind])
                .observe(w);
        }
        if let Some(fate) = &self.fate {
            for a in &self.agents {
                METRICS
                    .agent_proposals
                    .with_label_values(&[crate::telemetry::agent_label(a), fate])
                    .inc();
            }
        }
        for a in &self.undone {
            METRICS
                .agent_actions_undone
                .with_label_values(&[crate::telemetry::agent_label(a)])
                .inc();
        }
    }
}

fn enc(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Encode(e.to_string())
}

impl Approvals {
    /// Applies a verdict (or an expiry when `expire` is set). Idempotent: an already decided approval
    /// yields its decision's records again — with `outbox`, only while they are not all produced
    /// ([`Approvals::answered_before`]). With `outbox`, the decision is noted in the outbox before
    /// the state moves; the caller clears it with [`Approvals::sent`] once every record is
    /// produced.
    pub async fn decide(
        &self,
        approval_id: &str,
        verdict: Verdict,
        by: &str,
        why: &str,
        expire: bool,
        outbox: bool,
    ) -> Result<Decision, ApprovalError> {
        self.decide_if(approval_id, verdict, by, why, expire, outbox, &|_| Ok(()))
            .await
    }

    /// [`Approvals::decide`], when `allowed` accepts the open approval as it stands when the
    /// decision is made (read in the same compare-and-set, so an escalation in between is seen);
    /// else [`ApprovalError::Forbidden`] and nothing moves. The approvals API passes
    /// [`may_decide`] for its caller.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide_if(
        &self,
        approval_id: &str,
        verdict: Verdict,
        by: &str,
        why: &str,
        expire: bool,
        outbox: bool,
        allowed: &(dyn Fn(&ApprovalData) -> Result<(), String> + Sync),
    ) -> Result<Decision, ApprovalError> {
        if !expire {
            check_text(by, why).map_err(ApprovalError::Invalid)?;
        }
        let key = self.key_of(approval_id).await?;
        for _ in 0..20 {
            let (loaded, stored) = self.load_approval(&key, approval_id).await?;
            if !stored.is_open() && outbox {
                return self.answered_before(stored).await;
            }
            if !stored.is_open() {
                return self.decided_before(stored).await;
            }
            if expire && stored.approval.expires_at > now_secs() {
                // Not due (any more): another sweeper escalated it after this one read the
                // index. Its new deadline stands; it stays indexed under it.
                self.store.index_open(&[&stored.approval]).await?;
                return Ok(Decision {
                    approval: stored.approval,
                    fresh: false,
                    action: None,
                    outputs: Vec::new(),
                });
            }
            allowed(&stored.approval).map_err(ApprovalError::Forbidden)?;
            let now = now_secs();
            let mut s = stored.clone();
            s.decided_at = now_rfc3339();
            let mut state = loaded.state.clone();
            let mut undone: Vec<String> = Vec::new();
            let deadline =
                expire.then(|| self.config.on_deadline(&stored.approval, stored.escalated));
            let escalate = matches!(deadline, Some(OnDeadline::Escalate { .. }));
            if let Some(OnDeadline::Escalate {
                level,
                group,
                timeout_seconds,
            }) = deadline
            {
                s.escalated = true;
                s.approval.status = "escalated".into();
                s.approval.expires_at = now + timeout_seconds as i64;
                s.approval.why = Some(match &group {
                    Some(g) => format!("not decided in time; escalated to group {g}"),
                    None => "not decided in time; escalated".into(),
                });
                s.approval.level = level;
                s.approval.group = group;
            } else if expire {
                s.approval.status = "expired".into();
                s.approval.decided_by = Some("switchyard".into());
                s.approval.why = Some("not decided in time".into());
                state
                    .active
                    .retain(|a| a.approval_id.as_deref() != Some(approval_id));
            } else {
                s.approval.decided_by = Some(by.to_string());
                s.approval.why = Some(why.to_string());
                match verdict {
                    Verdict::Approve => {
                        // No fencing token here: resolve takes it when it releases the action
                        // (the release record among this decision's records), so the resource's
                        // tokens have one writer and rise along the actions topic.
                        // Until then its entry in the resource's state is `Approved`: in force,
                        // but nothing merges into an action that has not gone out.
                        s.approval.status = "approved".into();
                        s.action.approved_by = Some(by.to_string());
                        s.by_release = true;
                        let mut supersedes = Vec::new();
                        for a in state
                            .active
                            .iter_mut()
                            .filter(|a| a.approval_id.as_deref() == Some(approval_id))
                        {
                            a.status = ActiveStatus::Approved;
                            a.at = now;
                            supersedes.append(&mut a.supersedes);
                        }
                        // The accepted actions it was to supersede leave now (see
                        // `ActiveAction::supersedes`): named in its audit record, undone on their
                        // agents' scorecards.
                        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.active)
                            .into_iter()
                            .partition(|a| {
                                a.status.in_force() && supersedes.contains(&a.action_id)
                            });
                        state.active = kept;
                        s.superseded = gone.iter().map(|a| a.action_id.clone()).collect();
                        undone = gone.into_iter().flat_map(|a| a.agents).collect();
                    }
                    Verdict::Reject => {
                        s.approval.status = "rejected".into();
                        state
                            .active
                            .retain(|a| a.approval_id.as_deref() != Some(approval_id));
                    }
                }
            }
            s.approval.action_record = serde_json::to_value(&s.action).map_err(enc)?;
            let action = (s.approval.status == "approved").then(|| s.action.clone());
            self.check_sizes(&s, action.as_ref())?;
            if outbox {
                self.store.outbox_add(approval_id, now).await?;
            }
            let mut change = Change {
                state,
                token: loaded.token,
                approvals: vec![s.clone()],
                forget_approvals: Vec::new(),
            };
            change.forget(self.forgettable(&loaded.approvals, now, approval_id));
            let write = Write {
                change: &change,
                applied: None,
                decision: None,
                place: None,
            };
            if self.store.commit(&key, loaded.rev, write).await? {
                if escalate {
                    self.store.index_open(&[&s.approval]).await?;
                    self.tally(Tally {
                        kind: "escalated".into(),
                        wait_seconds: None,
                        fate: None,
                        agents: Vec::new(),
                        undone: Vec::new(),
                    })
                    .await;
                } else {
                    self.store.index_close(approval_id).await?;
                    let kind = s.approval.status.as_str();
                    let fate = if kind == "approved" {
                        "approved"
                    } else {
                        "declined"
                    };
                    let tally = Tally {
                        undone,
                        ..Tally::verdict(&s, kind, fate, now)
                    };
                    if let Some(stats) = &self.stats {
                        for a in &tally.agents {
                            stats.score(a, fate);
                        }
                        for a in &tally.undone {
                            stats.score(a, "undone");
                        }
                    }
                    self.tally(tally).await;
                    wait_span(&s);
                }
                let outputs = self.outputs(&s, action.as_ref()).await?;
                if let Some(n) = &self.notifier {
                    n.notify(&s.approval);
                }
                return Ok(Decision {
                    approval: s.approval,
                    fresh: true,
                    action,
                    outputs,
                });
            }
        }
        Err(ApprovalError::Contention)
    }

    /// Counts a committed decision once: here, or (the CLI) through the store for a running
    /// switchyard's sweeper. The decision stands either way; a tally the store could not take is
    /// only missing from the metrics, which a warning says.
    pub(crate) async fn tally(&self, t: Tally) {
        match self.counts {
            Counts::Here => t.count(),
            Counts::Relay => {
                let text = serde_json::to_string(&t).unwrap_or_default();
                if let Err(e) = self.store.tally_add(&text).await {
                    tracing::warn!(error = %e, kind = %t.kind, "The decision is made, but a running switchyard will not count it in its metrics.");
                }
            }
        }
    }

    /// Counts the decisions the CLI left in the store (see [`Counts::Relay`]); each is taken by
    /// one instance.
    async fn count_relayed(&self) -> Result<usize, ApprovalError> {
        let taken = self.store.tallies_take(1000).await?;
        for text in &taken {
            match serde_json::from_str::<Tally>(text) {
                Ok(t) => t.count(),
                Err(e) => {
                    tracing::warn!(error = %e, "A decision's tally in the store is unreadable; it is not counted.")
                }
            }
        }
        Ok(taken.len())
    }

    /// The resource an approval belongs to.
    pub(crate) async fn key_of(
        &self,
        approval_id: &str,
    ) -> Result<crate::store::ResourceKey, ApprovalError> {
        self.confirmed(|| async { Ok(self.store.locate(approval_id).await?) })
            .await?
            .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))
    }

    /// What `find` finds; its `None` is believed only once the store confirms it still holds its
    /// state. A Redis that came back empty (every approval missing) answers [`StoreError::Lost`],
    /// so a decision arriving then waits for `switchyard recover` rather than being dead-lettered
    /// as unknown. After the confirmation `find` runs once more: a recovery may have finished
    /// between the two reads.
    async fn confirmed<T, F, Fut>(&self, find: F) -> Result<Option<T>, ApprovalError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, ApprovalError>>,
    {
        if let Some(found) = find().await? {
            return Ok(Some(found));
        }
        self.store.confirm_state().await?;
        find().await
    }

    /// The resource's record as it stands, and the approval in it.
    pub(crate) async fn load_approval(
        &self,
        key: &crate::store::ResourceKey,
        approval_id: &str,
    ) -> Result<(crate::resolve::store::ResourceRecord, StoredApproval), ApprovalError> {
        self.confirmed(|| async {
            let record = self.store.load(key, &[], None).await?.record;
            Ok(record
                .approvals
                .get(approval_id)
                .cloned()
                .map(|stored| (record, stored)))
        })
        .await?
        .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))
    }

    /// An approval decided before: its decision's records again (the same as then), not fresh.
    /// An approval decided before, asked again through the API, the CLI or the expiry sweeper: its
    /// decision, with its records only while they are not all produced (its outbox entry is
    /// still there: the first answer's producing failed or was cut short). Once they were,
    /// answering again (409) produces nothing more — however often a client retries.
    pub(crate) async fn answered_before(
        &self,
        stored: StoredApproval,
    ) -> Result<Decision, ApprovalError> {
        if self.store.outbox_has(&stored.approval.approval_id).await? {
            return self.decided_before(stored).await;
        }
        let action = (stored.approval.status == "approved").then(|| stored.action.clone());
        Ok(Decision {
            approval: stored.approval,
            fresh: false,
            action,
            outputs: Vec::new(),
        })
    }

    pub(crate) async fn decided_before(
        &self,
        stored: StoredApproval,
    ) -> Result<Decision, ApprovalError> {
        let action = (stored.approval.status == "approved").then(|| stored.action.clone());
        let outputs = self.outputs(&stored, action.as_ref()).await?;
        Ok(Decision {
            approval: stored.approval,
            fresh: false,
            action,
            outputs,
        })
    }

    /// [`ApprovalsConfig::decided_long_ago`] but `except`: dropped by this write, as resolve's
    /// writes drop them — the gateway's approvals live in records resolve never writes
    /// (`{tenant/gateway}`), which otherwise kept every one for ever.
    fn forgettable(
        &self,
        approvals: &std::collections::BTreeMap<String, StoredApproval>,
        now: i64,
        except: &str,
    ) -> Vec<String> {
        self.config
            .decided_long_ago(approvals, now)
            .into_iter()
            .filter(|id| id != except)
            .collect()
    }

    /// Asks a person to approve `action` on the resource `key`, outside conflict resolution (a model
    /// call over its budget): the approval is stored with the resource, indexed, and announced.
    /// Idempotent per action id: asking again returns the approval as it stands, and no records
    /// once the first request's were produced ([`Approvals::sent`]) — until then (producing failed,
    /// the process died) the same records again.
    /// Returns the approval and the records to produce (the request and its sealed audit record).
    pub async fn request(
        &self,
        key: &crate::store::ResourceKey,
        action: ActionData,
    ) -> Result<(ApprovalData, Vec<Output>), ApprovalError> {
        let approval_id = format!("apr-{}", crate::pattern::stable_id(&[&action.action_id]));
        for _ in 0..20 {
            let loaded = self.store.load(key, &[], None).await?.record;
            if let Some(s) = loaded.approvals.get(&approval_id) {
                // Indexed again (idempotent): a first request whose commit went through and whose
                // indexing failed (Redis, a crash) left it where the API, the inbox, the decisions
                // topic and the sweeper cannot find it.
                if s.is_open() {
                    self.store.index_open(&[&s.approval]).await?;
                }
                let unsent = s.is_open()
                    && !s.escalated
                    && self.store.outbox_has(&request_entry(&approval_id)).await?;
                let outputs = if unsent {
                    self.outputs(s, None).await?
                } else {
                    Vec::new()
                };
                return Ok((s.approval.clone(), outputs));
            }
            let now = now_secs();
            let approval = ApprovalData {
                approval_id: approval_id.clone(),
                action_id: action.action_id.clone(),
                action: action.action.clone(),
                resource: action.resource.clone(),
                tenant: action.tenant.clone(),
                status: "pending".into(),
                decided_by: None,
                why: None,
                requested_at: now,
                expires_at: now + self.config.timeout_seconds as i64,
                action_record: serde_json::to_value(&action).map_err(enc)?,
                ..Default::default()
            };
            let s = StoredApproval {
                approval,
                action: action.clone(),
                escalated: false,
                decided_at: now_rfc3339(),
                traceparent: None,
                seen: None,
                amend: None,
                superseded: Vec::new(),
                by_release: false,
            };
            self.check_sizes(&s, None)?;
            // Until its records are produced, a request asked again produces them again (and
            // the sweeper does, once its producer would have given up on them).
            self.store
                .outbox_add(&request_entry(&approval_id), now)
                .await?;
            let mut change = Change {
                state: loaded.state.clone(),
                token: loaded.token,
                approvals: vec![s.clone()],
                forget_approvals: Vec::new(),
            };
            change.forget(self.forgettable(&loaded.approvals, now, &approval_id));
            let write = Write {
                change: &change,
                applied: None,
                decision: None,
                place: None,
            };
            if self.store.commit(key, loaded.rev, write).await? {
                self.store.index_open(&[&s.approval]).await?;
                self.tally(Tally {
                    kind: "requested".into(),
                    wait_seconds: None,
                    fate: None,
                    agents: Vec::new(),
                    undone: Vec::new(),
                })
                .await;
                let outputs = self.outputs(&s, None).await?;
                return Ok((s.approval, outputs));
            }
        }
        Err(ApprovalError::Contention)
    }

    /// Records for an approval's current status: the approval record, the action when approved,
    /// and the (unsealed) audit record.
    fn records(
        &self,
        stored: &StoredApproval,
        action: Option<&ActionData>,
    ) -> Result<(Vec<Output>, CloudEvent), ApprovalError> {
        let (a, time) = (&stored.approval, stored.decided_at.as_str());
        let pe = |e: ProcessError| ApprovalError::Encode(e.to_string());
        // Under the approval wait's span (see `decide`).
        let tp = spans::propagate(stored.traceparent.as_deref(), "approval", &a.approval_id);
        let tp = tp.as_deref();
        let mut out = Vec::new();
        match action {
            // Approved: resolve sends it (see `resolve::apply::release`) — also when these records
            // are produced again after it did (a copy of the release sends nothing more).
            Some(act) if stored.by_release || act.fencing_token == 0 => {
                let ev = record_event(
                    format!("release-{}", a.approval_id),
                    SOURCE,
                    types::RELEASE,
                    &act.resource,
                    &act.tenant,
                    tp,
                    time,
                    &release_proposal(stored),
                )
                .map_err(pe)?;
                out.push(self.emitter.emit(&self.proposals_topic, &ev).map_err(pe)?);
            }
            // Approved by an earlier build, which sent the action itself (with its token): its
            // records produced again from the outbox hold the action as then.
            Some(act) => {
                let ev = record_event(
                    format!("{}-{}", act.action_id, act.fencing_token),
                    SOURCE,
                    types::ACTION,
                    &act.resource,
                    &act.tenant,
                    tp,
                    time,
                    act,
                )
                .map_err(pe)?;
                out.push(self.emitter.emit(&self.actions_topic, &ev).map_err(pe)?);
            }
            None => {}
        }
        out.extend(self.amend_record(stored, tp).map_err(pe)?);
        out.push(approval_output(&self.emitter, &self.approvals_topic, a, tp, time).map_err(pe)?);
        let decision = match a.status.as_str() {
            "pending" => "approval_requested",
            "expired" => "approval_expired",
            "escalated" => "approval_escalated",
            _ => "approval_decided",
        };
        let mut audit = AuditData {
            decision: decision.into(),
            stage: "approvals".into(),
            resource: a.resource.clone(),
            tenant: a.tenant.clone(),
            event_id: None,
            task_id: None,
            workflow_id: action.map(|x| x.workflow_id.clone()),
            trace_id: crate::records::trace_id(tp),
            reason: Some(a.status.clone()),
            detail: json!({"approval_id": a.approval_id, "action_id": a.action_id, "action": a.action, "status": a.status,
                           "decided_by": a.decided_by, "why": a.why,
                           "fencing_token": action.filter(|_| !stored.by_release).map(|x| x.fencing_token),
                           "rule": a.rule, "level": a.level, "group": a.group, "amend": stored.amend}),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        if !stored.superseded.is_empty() {
            // Only where there is something (the records of other decisions stay as they were).
            audit.detail["superseded"] = json!(stored.superseded);
        }
        let tag = status_tag(a);
        let mut id_parts = vec![decision, a.approval_id.as_str()];
        id_parts.extend(tag.iter().map(String::as_str));
        let ev = audit_event(SOURCE, &id_parts, &audit, tp, time).map_err(pe)?;
        Ok((out, ev))
    }

    /// Refuses a decision any of whose records the producer could not write, before anything moves.
    pub(crate) fn check_sizes(
        &self,
        stored: &StoredApproval,
        action: Option<&ActionData>,
    ) -> Result<(), ApprovalError> {
        let (out, audit) = self.records(stored, action)?;
        let audit = self
            .emitter
            .emit(&self.sealer.topic, &audit)
            .map_err(|e| ApprovalError::Encode(e.to_string()))?;
        for (o, margin) in out.iter().map(|o| (o, 0)).chain([(&audit, SEAL_MARGIN)]) {
            let size = o.payload.len() + margin;
            if size > self.max_output_bytes
                || self
                    .topic_limits
                    .of(&o.topic)
                    .is_some_and(|max| crate::kafka::record_size(o) + margin > max)
            {
                return Err(ApprovalError::TooLarge(format!(
                    "the decision's record for {} would be {size} bytes, more than the {} the producer writes (or its topic takes); nothing was changed",
                    o.topic, self.max_output_bytes
                )));
            }
        }
        Ok(())
    }

    /// The records of a decision, its audit record sealed into the resource's chain.
    pub(crate) async fn outputs(
        &self,
        stored: &StoredApproval,
        action: Option<&ActionData>,
    ) -> Result<Vec<Output>, ApprovalError> {
        let (mut out, audit) = self.records(stored, action)?;
        let (records, sealed) = self
            .sealer
            .seal("approvals", &self.sealer.own_chain, &self.emitter, &[audit])
            .await
            .map_err(|e| match e {
                // Redis unreachable: retryable, like the rest of a decision.
                ProcessError::Transient(m) => ApprovalError::Store(StoreError::Redis(m)),
                e => ApprovalError::Encode(e.to_string()),
            })?;
        out.extend(records);
        // The watch settles here (dropped): this process's own chain is never taken over by
        // another, so its seals need not wait for earlier ones' delivery (a decision whose records
        // a crash lost is produced again from the outbox, sealed into the next process's chain).
        out.extend(sealed.seals);
        Ok(out)
    }

    /// Every record of an outbox entry was produced: clear it. The entry is an approval's id (its
    /// decision) or what [`Approvals::sweep`] names (`req:<id>` for a request).
    pub async fn sent(&self, entry: &str) -> Result<(), ApprovalError> {
        Ok(self.store.outbox_done(entry).await?)
    }

    /// Every record of this approval's request ([`Approvals::request`]) was produced: clear its
    /// entry — not its decision's, whose records may still be on their way.
    pub async fn sent_request(&self, approval_id: &str) -> Result<(), ApprovalError> {
        Ok(self.store.outbox_done(&request_entry(approval_id)).await?)
    }

    /// An approval with its action, by id; `None` only once the store confirmed it holds its state
    /// (see [`Approvals::confirmed`]).
    pub async fn get(&self, approval_id: &str) -> Result<Option<StoredApproval>, ApprovalError> {
        self.confirmed(|| async {
            let Some(key) = self.store.locate(approval_id).await? else {
                return Ok(None);
            };
            Ok(self
                .store
                .load(&key, &[], None)
                .await?
                .record
                .approvals
                .remove(approval_id))
        })
        .await
    }

    /// Open approvals (pending or escalated) of the tenants `sees` accepts (and of `tenant` when
    /// given), soonest expiry first, at most `limit` after the cursor `after`.
    pub async fn list(
        &self,
        sees: &(dyn Fn(&str) -> bool + Sync),
        tenant: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, ApprovalError> {
        let after: Option<(i64, &str)> = after.and_then(|c| {
            let (e, id) = c.split_once(':')?;
            Some((e.parse().ok()?, id))
        });
        let open: Vec<(String, i64)> = self
            .store
            .open()
            .await?
            .into_iter()
            .filter(|(id, e)| after.is_none_or(|(ae, aid)| (*e, id.as_str()) > (ae, aid)))
            .collect();
        let ids: Vec<String> = open.iter().map(|(id, _)| id.clone()).collect();
        let keys = self.store.locate_many(&ids).await?;
        let mut page = Page::default();
        for ((id, expires), key) in open.iter().zip(keys) {
            let Some(key) = key else { continue };
            if !sees(&key.tenant) || tenant.is_some_and(|t| t != key.tenant) {
                continue;
            }
            if page.approvals.len() == limit {
                page.next = page
                    .approvals
                    .last()
                    .map(|a| format!("{}:{}", a.expires_at, a.approval_id));
                break;
            }
            let record = self.store.load(&key, &[], None).await?.record;
            if let Some(s) = record.approvals.get(id) {
                if s.is_open() {
                    let mut a = s.approval.clone();
                    a.expires_at = *expires;
                    page.approvals.push(a);
                }
            }
        }
        Ok(page)
    }

    /// Every open approval (pending or escalated), soonest expiry first.
    pub async fn list_open(&self) -> Result<Vec<ApprovalData>, ApprovalError> {
        Ok(self
            .list(&|_| true, None, None, usize::MAX)
            .await?
            .approvals)
    }

    /// The `tenant` label of a tenant: itself when the config names it, else `other`.
    fn tenant_label<'a>(&self, tenant: &'a str) -> &'a str {
        if tenant == "default" || self.known_tenants.iter().any(|t| t == tenant) {
            tenant
        } else {
            "other"
        }
    }

    /// A sweep's failure on one approval: the store out of reach (or its state lost) fails the
    /// sweep; anything else is this approval's own (its records too large for its topic's limit, its
    /// stored value unreadable, contention) — logged, as an error the first time, and the sweep
    /// goes on with the others (the approval is tried again on the next).
    fn stuck_on(&self, id: &str, e: ApprovalError) -> Result<(), ApprovalError> {
        if matches!(
            e,
            ApprovalError::Store(StoreError::Redis(_) | StoreError::Lost)
        ) {
            return Err(e);
        }
        let mut stuck = self.stuck.lock().unwrap_or_else(|e| e.into_inner());
        if stuck.len() >= 4096 {
            stuck.clear();
        }
        if stuck.insert(id.to_string()) {
            tracing::error!(approval_id = %id, error = %e, "The approvals sweeper cannot move this approval on; it goes on with the others and tries this one again on every sweep.");
        } else {
            tracing::debug!(approval_id = %id, error = %e, "Approval still stuck.");
        }
        Ok(())
    }

    /// Expires (or escalates) every approval past its deadline, and takes up decisions a crash left
    /// in the outbox; returns each outbox entry's records to produce (then [`Approvals::sent`] of
    /// that entry: an approval's id, or `req:<id>` for a request).
    pub async fn sweep(&self) -> Result<Vec<(String, Vec<Output>)>, ApprovalError> {
        if self.counts == Counts::Here {
            // Counting is no reason to stop expiring approvals.
            if let Err(e) = self.count_relayed().await {
                tracing::warn!(error = %e, "Could not take the CLI's decisions to count; the next sweep tries again.");
            }
        }
        let now = now_secs();
        let mut out = Vec::new();
        // Younger entries belong to a decision still producing them.
        let grace = self.config.redeliver_after_seconds as i64;
        let decisions = self.store.outbox_due(now - grace).await?;
        // A request's records are produced by its caller, whose producer may try for up to its
        // delivery timeout: a request still unsent after that (the caller gave up, or died) is
        // produced here — the caller asking again finds it produced.
        let request_grace = grace.max(self.delivery_timeout_seconds as i64 + 30);
        for (id, at) in self.store.outbox_due(now - request_grace).await? {
            let Some(id) = id.strip_prefix(REQUEST_ENTRY) else {
                continue;
            };
            let redo = async {
                match self.get(id).await? {
                    Some(s) if s.is_open() && !s.escalated => {
                        tracing::info!(approval_id = %id, "Producing an approval request its caller left unsent.");
                        return Ok(Some(self.outputs(&s, None).await?));
                    }
                    // Gone, or moved on (its later records announce it): nothing to produce.
                    _ => self.store.outbox_done_at(&request_entry(id), at).await?,
                }
                Ok(None)
            };
            match redo.await {
                Ok(Some(outputs)) => out.push((request_entry(id), outputs)),
                Ok(None) => {}
                Err(e) => self.stuck_on(id, e)?,
            }
        }
        for (id, at) in decisions {
            if id.starts_with(REQUEST_ENTRY) {
                continue;
            }
            let redo = async {
                match self.get(&id).await? {
                    // Gone, or still pending (the state never moved): nothing to produce — unless
                    // a decision made since added the entry again (then it is no longer at `at`,
                    // and stays for that decision). An escalation did move it: its records go out
                    // like a decision's.
                    None => self.store.outbox_done_at(&id, at).await?,
                    Some(s) if s.is_open() && !s.escalated => {
                        self.store.outbox_done_at(&id, at).await?
                    }
                    Some(s) => {
                        tracing::info!(approval_id = %id, status = %s.approval.status, "Producing a decision a crash left unsent.");
                        return Ok(Some(self.decided_before(s).await?.outputs));
                    }
                }
                Ok(None)
            };
            match redo.await {
                Ok(Some(outputs)) => out.push((id, outputs)),
                Ok(None) => {}
                Err(e) => self.stuck_on(&id, e)?,
            }
        }
        let open = self.store.open().await?;
        let ids: Vec<String> = open.iter().map(|(id, _)| id.clone()).collect();
        let keys = self.store.locate_many(&ids).await?;
        let mut pending_by_tenant: std::collections::BTreeMap<String, i64> = Default::default();
        for ((id, expires_at), key) in open.iter().zip(keys) {
            if *expires_at <= now {
                match self
                    .decide(id, Verdict::Reject, "switchyard", "timeout", true, true)
                    .await
                {
                    Ok(d) if d.fresh => out.push((id.clone(), d.outputs)),
                    // Escalated meanwhile by another sweeper: open, under its new deadline.
                    Ok(d) if matches!(d.approval.status.as_str(), "pending" | "escalated") => {}
                    Ok(_) | Err(ApprovalError::NotFound(_)) => self.store.index_close(id).await?,
                    // One approval that cannot move on holds up no other.
                    Err(e) => self.stuck_on(id, e)?,
                }
            } else if let Some(k) = key {
                *pending_by_tenant
                    .entry(self.tenant_label(&k.tenant).to_string())
                    .or_default() += 1;
            }
        }
        // The id index lets go of approvals their resources dropped, a slice per sweep.
        match self.store.prune_index(INDEX_SLICE).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                removed = n,
                "Removed approvals no longer kept from the id index."
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Could not prune the approvals' id index; the next sweep tries again.")
            }
        }
        // Tenants seen before keep a series (at 0 when nothing is pending).
        let mut known = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        known.insert("default".to_string());
        known.extend(pending_by_tenant.keys().cloned());
        for t in known.iter() {
            METRICS
                .approvals_pending
                .with_label_values(&[t])
                .set(pending_by_tenant.get(t).copied().unwrap_or(0));
        }
        Ok(out)
    }
}

/// The agent that proposed the action (the first of them, when several agreed).
pub(super) fn first_agent(s: &StoredApproval) -> String {
    s.action
        .agents
        .as_array()
        .and_then(|a| a.first())
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// The data of an approved action's release record ([`types::RELEASE`], on the proposals topic):
/// the action as approved, `edit_of` naming the approval, `approved_by` the person. Resolve reads
/// only the approval id and the resource (the record's key); the rest is for people and tools
/// reading the topic.
fn release_proposal(s: &StoredApproval) -> ProposalData {
    let (a, act) = (&s.approval, &s.action);
    ProposalData {
        proposal_id: format!("release-{}", a.approval_id),
        task_id: format!("approval-{}", a.approval_id),
        workflow_id: act.workflow_id.clone(),
        agent: first_agent(s),
        action: act.action.clone(),
        resource: act.resource.clone(),
        tenant: act.tenant.clone(),
        parameters: act.parameters.clone(),
        priority: act.priority,
        impact: act.impact,
        context_version: 0,
        reason: Some(format!(
            "approved by {}",
            a.decided_by.as_deref().unwrap_or("?")
        )),
        event_id: None,
        cost: None,
        seen_at: None,
        approved_by: a.decided_by.clone(),
        edit_of: Some(a.approval_id.clone()),
        confidence: None,
    }
}

/// An approval request's outbox entry (beside its decision's, which is the approval id itself).
const REQUEST_ENTRY: &str = "req:";

fn request_entry(approval_id: &str) -> String {
    format!("{REQUEST_ENTRY}{approval_id}")
}

/// Entries of the approvals' id index a sweep checks (and removes when their approval is gone).
const INDEX_SLICE: usize = 256;

/// Runs the sweeper until `stop`: every `interval`, expire what is due and produce the records.
pub async fn run_sweeper(
    approvals: Arc<Approvals>,
    producer: Producer,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        match approvals.sweep().await {
            Ok(groups) => {
                'groups: for (id, outputs) in groups {
                    for o in &outputs {
                        if let Err(e) = producer.send(o).await {
                            approvals.sealer.distrust(&approvals.sealer.own_chain);
                            if crate::kafka::is_too_large(&e) {
                                // Never writable (its topic takes less): retrying every sweep
                                // changes nothing. Said loudly, and let go.
                                tracing::error!(approval_id = %id, topic = %o.topic, error = %e, "An approval's record is larger than its topic takes and can never be written; its outbox entry is cleared.");
                                let _ = approvals.sent(&id).await;
                                continue 'groups;
                            }
                            tracing::warn!(approval_id = %id, error = %e, "Producing an approval's records failed; the next sweep retries.");
                            continue 'groups;
                        }
                    }
                    if let Err(e) = approvals.sent(&id).await {
                        tracing::warn!(approval_id = %id, error = %e, "Clearing the outbox failed; the records may be produced once more.");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "Approval sweep failed; retrying."),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The span of an approval's wait, from the request to its decision (or expiry), under the
/// decision that asked for it.
fn wait_span(s: &StoredApproval) {
    let a = &s.approval;
    let requested =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(a.requested_at.max(0) as u64);
    let mut span = Span::child(
        format!("approval wait {}", a.action),
        s.traceparent.as_deref(),
        "approval",
        &a.approval_id,
    )
    .started_at(requested);
    span.attr("switchyard.approval.id", a.approval_id.clone())
        .attr("switchyard.action", a.action.clone())
        .attr("switchyard.resource", a.resource.clone())
        .attr("switchyard.approval.status", a.status.clone())
        .attr(
            "switchyard.approval.decided_by",
            a.decided_by.clone().unwrap_or_default(),
        )
        .attr("switchyard.approval.escalated", s.escalated);
    span.end();
}

/// The status as record ids name it: a second escalation is another record, so from level 2 on
/// the level is part of it (level 1 keeps the id it always had).
fn status_tag(a: &ApprovalData) -> Vec<String> {
    match a.level {
        0 | 1 => vec![a.status.clone()],
        l => vec![a.status.clone(), l.to_string()],
    }
}

/// The `switchyard.approvals` record for an approval's current status. `time` (RFC 3339) is the
/// decision's time, so a re-emission is byte-identical.
pub fn approval_output(
    emitter: &Emitter,
    topic: &str,
    a: &ApprovalData,
    tp: Option<&str>,
    time: &str,
) -> Result<Output, ProcessError> {
    let ev = record_event(
        format!("{}-{}", a.approval_id, status_tag(a).join("-")),
        SOURCE,
        types::APPROVAL,
        &a.resource,
        &a.tenant,
        tp,
        time,
        a,
    )?;
    emitter.emit(topic, &ev)
}
