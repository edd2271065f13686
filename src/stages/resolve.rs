//! Resolve + govern stage: `switchyard.proposals` → actions, approval requests, audit.
//!
//! `switchyard.proposals` is keyed by resource, so one consumer owns each resource: the partition is
//! its lock. Proposals of one resource are decided strictly in order (lane = resource): load the
//! resource ([`crate::resolve::store`]), decide ([`crate::resolve::rules::decide`]), pass a new
//! action through governance ([`crate::governance::GovernanceConfig::gate`]), apply
//! ([`crate::resolve::apply::apply`]), and write by compare-and-set on the resource's revision,
//! recording the proposal's offset: a zombie owner after a rebalance, or a redelivered proposal,
//! cannot apply anything twice. Each decision is stored by proposal id, so a redelivery emits the
//! same records again instead of deciding again.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::json;

use futures::{Stream, StreamExt};

use super::batch::{sealed_jobs, Decided as Batch};
use super::services::{runner, Runner, Services};
use crate::audit::Sealer;
use crate::codec;
use crate::error::ProcessError;
use crate::governance::approvals::approval_output;
use crate::governance::budgets::{Budgets, Spender, SpentView};
use crate::governance::GovernanceConfig;
use crate::kafka::runtime::{Done, Processor};
use crate::kafka::Input;
use crate::records::{
    audit_event, record_event, trace_id, types, ApprovalData, AuditData, Emitter, ProposalData,
};
use crate::resolve::apply::{
    apply, release, token_floor, Amend, Current, Decided, Gate, NoRelease, Verdict,
};
use crate::resolve::rules::{
    decide, decide_with, prune, Candidate, Decision, RejectReason, ResolveConfig, Rule,
};
use crate::resolve::store::{ResourceStore, Write};
use crate::spans::Span;
use crate::store::{Place, ResourceKey};
use crate::telemetry::METRICS;
use crate::topics::TopicsConfig;

/// Source attribute of records the resolve stage writes.
pub const SOURCE: &str = "switchyard/resolve";

/// The resolve stage consumes the proposals topic.
pub fn inputs(t: &TopicsConfig) -> Vec<String> {
    vec![t.proposals.clone()]
}

pub fn build(s: &Services) -> BoxFuture<'_, Result<Runner, String>> {
    Box::pin(async move {
        let cfg = s.config();
        init_metrics();
        let _ = ACTION_LABELS.set(
            cfg.declared_actions()
                .into_iter()
                .chain(cfg.resolve.actions.keys().map(String::as_str))
                .filter(|a| !a.contains('*'))
                .map(str::to_string)
                .collect(),
        );
        Ok(runner(ResolveStage {
            rules: cfg.resolve.clone(),
            governance: Arc::new(cfg.governance.clone()),
            budgets: s.budgets.clone(),
            store: s.resources.clone(),
            emitter: s.emitter.clone(),
            actions_topic: cfg.topics.actions.clone(),
            approvals_topic: cfg.topics.approvals.clone(),
            sealer: s.sealer.clone(),
            stats: Some(s.stats.clone()),
            graph: Some(s.graph.clone()),
            clock: Default::default(),
            notifier: s.approvals.notifier.clone(),
            max_output_bytes: cfg.kafka.max_output_bytes(),
            topic_limits: s.producer.limits(),
        }))
    })
}

/// What the stage counts a proposal as: a decision's verdict, or one of these.
const REPLAYED: &str = "replayed";
const FENCED: &str = "fenced";
const SKIPPED: &str = "skipped";

/// Creates the stage's series at zero, so dashboards and alerts see them before the first proposal.
fn init_metrics() {
    for v in Verdict::ALL {
        METRICS.proposals.with_label_values(&[v.as_str()]).inc_by(0);
    }
    for o in [REPLAYED, FENCED, SKIPPED] {
        METRICS.proposals.with_label_values(&[o]).inc_by(0);
    }
    for r in RejectReason::ALL {
        METRICS
            .actions_rejected
            .with_label_values(&[r.as_str()])
            .inc_by(0);
    }
    for r in Rule::ALL {
        METRICS.conflicts.with_label_values(&[r.as_str()]).inc_by(0);
    }
    for kind in ["requested", "approved", "rejected", "expired", "escalated"] {
        METRICS.approvals.with_label_values(&[kind]).inc_by(0);
    }
}

pub struct ResolveStage {
    pub rules: ResolveConfig,
    pub governance: Arc<GovernanceConfig>,
    pub budgets: Arc<Budgets>,
    pub store: Arc<dyn ResourceStore>,
    pub emitter: Emitter,
    pub actions_topic: String,
    pub approvals_topic: String,
    /// Seals each decision into its resource's audit chain.
    pub sealer: Arc<Sealer>,
    /// Scorecards: each decision counts for or against the proposing agent (none in unit tests).
    pub stats: Option<Arc<crate::agents::stats::AgentStats>>,
    /// Related resources' facts for `<relation>:<key>` staleness rules (read, never locked).
    pub graph: Option<Arc<crate::context::graph::Graph>>,
    /// The time decisions are made at (seconds since the epoch) when not now: `replay` decides
    /// each proposal at its recorded time, so cooldowns and windows see what they saw.
    pub clock: crate::event::Clock,
    /// Tells approval rules' webhooks about new requests (none in replay and unit tests).
    pub notifier: Option<Arc<crate::governance::notify::Notifier>>,
    /// The largest record the producer writes (`kafka.max_output_bytes`): a decision whose records
    /// would be larger is refused before anything is committed.
    pub max_output_bytes: usize,
    /// And what each topic takes (its `max.message.bytes`, when read at start).
    pub topic_limits: crate::kafka::TopicLimits,
}

/// A record of the proposals topic as read: an agent's proposal, or the release of an approved
/// action ([`types::RELEASE`]: `release_of` names the approval).
pub struct Proposed {
    pub proposal: ProposalData,
    pub traceparent: Option<String>,
    pub release_of: Option<String>,
}

/// Reads a record of the proposals topic.
pub fn decode_proposal(rec: &Input, emitter: &Emitter) -> Result<Proposed, ProcessError> {
    let (ev, p) = codec::decode_typed::<ProposalData>(rec.view(), &emitter.schemas)?;
    if ev.ty != types::PROPOSAL && ev.ty != types::RELEASE {
        return Err(ProcessError::poison(
            "not_a_proposal",
            format!(
                "record type is {:?}, expected {} or {}",
                ev.ty,
                types::PROPOSAL,
                types::RELEASE
            ),
        ));
    }
    let traceparent = ev.traceparent().map(str::to_string);
    let proposal = p.map_err(|e| ProcessError::poison("malformed_proposal", e))?;
    let release_of = match ev.ty == types::RELEASE {
        false => None,
        true => Some(proposal.edit_of.clone().ok_or_else(|| {
            ProcessError::poison(
                "malformed_proposal",
                "a release names no approval (edit_of)",
            )
        })?),
    };
    Ok(Proposed {
        proposal,
        traceparent,
        release_of,
    })
}

impl ResolveStage {
    /// Cross-resource staleness: for each `<relation>:<key>` of the action's `invalidated_by`, a
    /// related resource whose `key` changed after the agent read its context makes the proposal
    /// stale; the reason names it. The related facts are read, never locked.
    async fn related_staleness(
        &self,
        key: &ResourceKey,
        p: &ProposalData,
        inval: &[String],
    ) -> Result<Option<String>, ProcessError> {
        let (Some(g), Some(seen)) = (&self.graph, p.seen_at.as_deref()) else {
            return Ok(None);
        };
        let Ok(seen_t) = chrono::DateTime::parse_from_rfc3339(seen) else {
            return Ok(None);
        };
        for entry in inval {
            let Some((relation, fact)) = crate::context::graph::relational(entry) else {
                continue;
            };
            let changed = g
                .related_fact(key, relation, fact)
                .await
                .map_err(|e| ProcessError::from(e).context("related facts"))?;
            for (other, f) in changed {
                let Ok(at) = chrono::DateTime::parse_from_rfc3339(&f.at) else {
                    continue;
                };
                if at > seen_t {
                    return Ok(Some(format!(
                        "{fact} of {other} ({} {relation} {other}) changed at {} by {}, after the agent read its context at {seen}",
                        key.resource, f.at, f.by
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Refuses (dead-letters the proposal, `output_too_large`) a decision whose records the
    /// producer could not write (counted as the producer counts them: key, payload, headers, and a
    /// margin for the record's overhead). The action and approval records carry the proposal's
    /// parameters (an approval twice: its action record too); the audit record names the decision,
    /// not the parameters, and its attributes are bounded, so it is not encoded an extra time to be
    /// measured.
    fn check_sizes(&self, batch: &Batch) -> Result<(), ProcessError> {
        const OVERHEAD: usize = 1024;
        match self
            .topic_limits
            .first_too_large(&batch.outputs, self.max_output_bytes, OVERHEAD)
        {
            Some((o, limit)) => Err(ProcessError::poison(
                "output_too_large",
                format!(
                    "the decision's record for {} would be {} bytes, more than the {limit} the producer writes (or its topic takes); nothing was decided",
                    o.topic,
                    crate::kafka::record_size(o) + OVERHEAD,
                ),
            )),
            None => Ok(()),
        }
    }

    /// The records a decision causes, and its (unsealed) audit record.
    fn outputs(
        &self,
        p: &ProposalData,
        d: &Decided,
        tp: Option<&str>,
    ) -> Result<Batch, ProcessError> {
        let mut out = Vec::new();
        if let Some(a) = &d.action {
            let ev = record_event(
                format!("{}-{}", a.action_id, a.fencing_token),
                SOURCE,
                types::ACTION,
                &a.resource,
                &a.tenant,
                tp,
                &d.at,
                a,
            )?;
            out.push(self.emitter.emit(&self.actions_topic, &ev)?);
        }
        for a in &d.approvals {
            out.push(approval_output(
                &self.emitter,
                &self.approvals_topic,
                a,
                tp,
                &d.at,
            )?);
        }
        let audit = AuditData {
            decision: d.outcome.as_str().into(),
            stage: "resolve".into(),
            resource: p.resource.clone(),
            tenant: p.tenant.clone(),
            event_id: p.event_id.clone(),
            task_id: Some(p.task_id.clone()),
            workflow_id: Some(p.workflow_id.clone()),
            trace_id: trace_id(tp),
            reason: d.reason.clone(),
            detail: json!({
                "proposal_id": p.proposal_id, "agent": p.agent, "action": p.action, "rule": d.rule, "detail": d.detail,
                "action_id": d.action.as_ref().map(|a| &a.action_id).or(d.into_action.as_ref()),
                "fencing_token": d.action.as_ref().map(|a| a.fencing_token),
                "approval_id": d.pending_approvals().next().map(|a| &a.approval_id)
                    .or(p.edit_of.as_ref().filter(|_| d.outcome == Verdict::Released)),
                "superseded": d.superseded,
            }),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let ev = audit_event(
            SOURCE,
            &[d.outcome.as_str(), &p.proposal_id],
            &audit,
            tp,
            &d.at,
        )?;
        Ok(Batch {
            outputs: out,
            audits: vec![ev],
            cleanup: Vec::new(),
        })
    }

    /// Indexes the approvals a decision opened or closed (idempotent; repeated on redelivery).
    async fn index(&self, d: &Decided) -> Result<(), ProcessError> {
        let open: Vec<&ApprovalData> = d.pending_approvals().collect();
        self.store.index_open(&open).await?;
        for a in d.approvals.iter().filter(|a| a.status != "pending") {
            self.store.index_close(&a.approval_id).await?;
        }
        Ok(())
    }
}

/// The action names `switchyard_actions_accepted_total` labels by: those the config names
/// literally (agents' `actions`, resolution rules); any other (an agent allowed a pattern such as
/// `scale_*`, and a model inventing names under it) counts as `other`, so the series stay bounded.
static ACTION_LABELS: std::sync::OnceLock<std::collections::BTreeSet<String>> =
    std::sync::OnceLock::new();

fn action_label(action: &str) -> &str {
    match ACTION_LABELS.get() {
        Some(known) if !known.contains(action) => "other",
        _ => action,
    }
}

/// Counts a decision by its verdict, reason and rule.
fn count(decision_rule: Option<Rule>, d: &Decided, p: &ProposalData) {
    METRICS
        .proposals
        .with_label_values(&[d.outcome.as_str()])
        .inc();
    if let Some(r) = &d.reason {
        METRICS.actions_rejected.with_label_values(&[r]).inc();
    }
    if let Some(rule) = decision_rule {
        METRICS.conflicts.with_label_values(&[rule.as_str()]).inc();
    }
    match d.outcome {
        Verdict::Accepted => METRICS
            .actions_accepted
            .with_label_values(&[action_label(&p.action)])
            .inc(),
        Verdict::ApprovalRequested => METRICS.approvals.with_label_values(&["requested"]).inc(),
        _ => {}
    }
}

impl Processor for ResolveStage {
    fn stage(&self) -> &'static str {
        "resolve"
    }

    /// One lane per resource: its proposals are decided strictly in order.
    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    /// A batch's proposals (each of a different resource) are decided concurrently, with one read
    /// of the budgets they may spend against, and their audit records sealed together.
    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        futures::stream::once(self.prepare(recs)).flat_map(move |(jobs, view)| {
            let jobs = jobs
                .into_iter()
                .map(|(rec, decoded)| {
                    let chain = Sealer::chain("resolve", &rec.topic, rec.partition);
                    let view = view.clone();
                    (chain, async move {
                        let proposed = decoded?;
                        let view = view?;
                        self.decide_one(&rec, proposed, &view).await
                    })
                })
                .collect();
            sealed_jobs("resolve", &self.sealer, &self.emitter, jobs)
        })
    }

    /// Forgets the stored decisions of committed proposals (one pipeline per commit).
    async fn cleanup(&self, keys: Vec<String>) {
        let decided: Vec<(ResourceKey, String)> = keys
            .iter()
            .filter_map(|k| serde_json::from_str::<(String, String, String)>(k).ok())
            .map(|(tenant, resource, id)| (ResourceKey::new(tenant, resource), id))
            .collect();
        if let Err(e) = self.store.forget(&decided).await {
            // They stay until the resource's record expires; nothing is wrong meanwhile.
            tracing::warn!(error = %e, proposals = decided.len(), "Could not forget committed proposals' decisions.");
        }
    }
}

/// A record whose partition was revoked, and whose drain gave up waiting, takes no token: taken
/// now, it would reach the topic only when the next owner gets here — after tokens the next owner
/// took meanwhile. Nothing is taken; the next owner decides.
fn revoked(rec: &Input) -> ProcessError {
    ProcessError::Transient(format!(
        "partition {} was revoked; its next owner decides",
        rec.partition
    ))
}

/// What a committed proposal leaves for [`Processor::cleanup`]: its decision to forget.
fn forget_token(key: &ResourceKey, proposal_id: &str) -> String {
    json!([key.tenant, key.resource, proposal_id]).to_string()
}

/// A batch's proposals as decoded, and the budget spend they are checked against.
type Prepared = (
    Vec<(Arc<Input>, Result<Proposed, ProcessError>)>,
    Result<Arc<SpentView>, ProcessError>,
);

impl ResolveStage {
    /// Decodes a batch's proposals and reads the spend of every budget they count against (one
    /// round trip, none when no budget applies).
    async fn prepare(&self, recs: Vec<Arc<Input>>) -> Prepared {
        let decoded: Vec<_> = recs
            .into_iter()
            .map(|rec| {
                let d = decode_proposal(&rec, &self.emitter);
                (rec, d)
            })
            .collect();
        let spenders: Vec<Spender<'_>> = decoded
            .iter()
            .filter_map(|(_, d)| d.as_ref().ok())
            .filter(|d| d.release_of.is_none())
            .map(|d| Spender {
                agent: &d.proposal.agent,
                workflow: &d.proposal.workflow_id,
                tenant: &d.proposal.tenant,
                model: "",
            })
            .collect();
        let view = self
            .budgets
            .view(&spenders)
            .await
            .map(Arc::new)
            .map_err(|e| ProcessError::from(e).context("budget spend"));
        drop(spenders);
        (decoded, view)
    }

    /// Decides one proposal, or releases an approved action (or replays its stored decision).
    async fn decide_one(
        &self,
        rec: &Input,
        proposed: Proposed,
        view: &SpentView,
    ) -> Result<Batch, ProcessError> {
        let Proposed {
            proposal: p,
            traceparent: tp,
            release_of,
        } = proposed;
        let key = ResourceKey::new(p.tenant.clone(), p.resource.clone());
        // The decision's span; the records it causes carry its trace context.
        let parent = tp;
        let tp = crate::spans::propagate(parent.as_deref(), "resolve", &p.proposal_id);
        let verb = match release_of {
            Some(_) => "release",
            None => "resolve",
        };
        let mut span = Span::child(
            format!("{verb} {}", p.action),
            parent.as_deref(),
            "resolve",
            &p.proposal_id,
        );
        let inval = self
            .rules
            .actions
            .get(&p.action)
            .map(|r| r.invalidated_by.clone())
            .unwrap_or_default();
        // A decision stored for this proposal (a redelivery), and the state: at most one round
        // trip, two when the proposal may have been decided before. The state may be this
        // instance's copy, out of date: then the commit below refuses and the loop loads again.
        let mut loaded = self.store.load(&key, &inval, Some(&p.proposal_id)).await?;
        let forget = vec![forget_token(&key, &p.proposal_id)];
        let place = Place::of(rec);
        // A person's edit from the inbox needs no second approval, but only when the approval it
        // replaces holds exactly this edit by this person; anything else is an ordinary proposal.
        let mut p = p;
        let claimed = p.approved_by.clone();
        let related_stale = self.related_staleness(&key, &p, &inval).await?;
        // A release's refusal was confirmed against the store, not a copy.
        let mut fresh = false;
        for attempt in 0..20 {
            if attempt > 0 {
                loaded = self.store.load(&key, &inval, Some(&p.proposal_id)).await?;
            }
            // A decision kept in the memo slot for a delivered record of this partition: this is
            // a copy further down the topic.
            if loaded
                .decided_at
                .as_deref()
                .is_some_and(|at| place.as_ref().is_some_and(|p| p.delivered_tag(at)))
            {
                loaded.decided = None;
                loaded.finished = true;
            }
            // Asked on every attempt: a state that was out of date may have hidden it.
            if let Some(d) = loaded.decided.take() {
                METRICS.proposals.with_label_values(&[REPLAYED]).inc();
                self.index(&d).await?;
                return Ok(self.outputs(&p, &d, tp.as_deref())?.forgetting(forget));
            }
            if loaded.finished {
                // Decided and committed before; this is a copy further down the topic.
                METRICS.proposals.with_label_values(&[SKIPPED]).inc();
                tracing::info!(proposal_id = %p.proposal_id, "Proposal decided and committed before; skipping this copy.");
                return Ok(Batch::default());
            }
            let record = &loaded.record;
            // Checked against each attempt's state: the edit may have been recorded, or used by a
            // decision committed, meanwhile.
            p.approved_by = claimed.clone();
            let edited = edited_in_inbox(&p, &record.approvals);
            if !edited {
                p.approved_by = None;
            }
            let source = crate::kafka::topic_id::source(&rec.topic, rec.topic_id.as_deref());
            if record.applied_past(rec.partition, rec.offset, &source) {
                // A newer owner already went past this record: we are a zombie (or it was redelivered
                // after its decision expired). Apply nothing.
                METRICS.proposals.with_label_values(&[FENCED]).inc();
                tracing::warn!(
                    partition = rec.partition,
                    offset = rec.offset,
                    "Proposal fenced: state is already past this offset."
                );
                return Ok(Batch::default());
            }
            if let Some(approval_id) = release_of.as_deref() {
                let current = Current {
                    state: record.state.clone(),
                    token: record.token,
                    approvals: &record.approvals,
                    token_floor: token_floor(rec.offset),
                };
                let now = self.clock.secs();
                let (mut decided, change) = match release(current, approval_id, now) {
                    Ok(released) => released,
                    Err(_) if !fresh => {
                        // The state may be this instance's copy, older than the approval's
                        // decision: asked again of the store before anything is skipped.
                        fresh = true;
                        self.store.forget_copy(&key);
                        continue;
                    }
                    Err(no) => {
                        METRICS.proposals.with_label_values(&[SKIPPED]).inc();
                        match no {
                            NoRelease::Done(why) => {
                                tracing::info!(approval_id, %why, "Release seen before; skipping this copy.")
                            }
                            NoRelease::Refused(why) => {
                                tracing::warn!(approval_id, %why, "Release refused: nothing approved waits for it.")
                            }
                        }
                        return Ok(Batch::default());
                    }
                };
                decided.at = self.clock.stamp(now);
                let batch = self.outputs(&p, &decided, tp.as_deref())?;
                self.check_sizes(&batch)?;
                let write = Write {
                    change: &change,
                    applied: Some((rec.partition, rec.offset, &source)),
                    decision: Some((&p.proposal_id, &decided)),
                    place: place.as_ref(),
                };
                if rec.is_revoked() {
                    return Err(revoked(rec));
                }
                if self.store.commit(&key, record.rev, write).await? {
                    span.attr("switchyard.approval.id", approval_id.to_string())
                        .attr("switchyard.action", p.action.clone())
                        .attr("switchyard.resource", p.resource.clone())
                        .attr("switchyard.tenant", p.tenant.clone())
                        .attr("switchyard.decision", decided.outcome.as_str());
                    span.end();
                    count(None, &decided, &p);
                    return Ok(batch.forgetting(forget));
                }
                continue;
            }
            let now = self.clock.secs();
            let mut state = record.state.clone();
            state.key_versions = std::mem::take(&mut loaded.key_versions);
            prune(&mut state, &self.rules, now);
            let cand = Candidate {
                proposal_id: p.proposal_id.clone(),
                agent: p.agent.clone(),
                action: p.action.clone(),
                parameters: p.parameters.clone(),
                priority: p.priority,
                impact: p.impact,
                context_version: p.context_version,
            };
            // Staleness comes first, as in `decide`: a stale proposal merges into nothing either.
            let mut decision = match &related_stale {
                Some(detail) => Decision::Rejected {
                    reason: RejectReason::Stale,
                    detail: detail.clone(),
                    rule: Rule::Staleness,
                },
                None => decide(&self.rules, &state, &cand, now),
            };
            // Governance looks at every proposal that sends an action: a new one, and one merged
            // into an action that went out (its parameters go out again, under this proposal).
            let gate_of = |decision: &Decision| match decision {
                Decision::New { .. } | Decision::Merged { .. } => {
                    let spender = Spender {
                        agent: &p.agent,
                        workflow: &p.workflow_id,
                        tenant: &p.tenant,
                        model: "",
                    };
                    let budget = self.budgets.check_in(view, &spender);
                    match self.governance.gate(&p, budget) {
                        Gate::NeedsApproval { .. } if edited => Gate::Allow,
                        g => g,
                    }
                }
                _ => Gate::Allow,
            };
            let mut gate = gate_of(&decision);
            if matches!(decision, Decision::Merged { .. })
                && matches!(gate, Gate::NeedsApproval { .. })
            {
                // A person must see these parameters before they go out: judged as an action of
                // its own, not merged into one nobody approved them for.
                decision = decide_with(&self.rules, &state, &cand, now, false);
                gate = gate_of(&decision);
            }
            let rule = decision.rule();
            // Accepted actions this one supersedes: undone, on their agents' scorecards.
            // (Awaiting approval, it supersedes no accepted action yet: `ActiveAction::supersedes`.)
            let undone: Vec<String> = match &decision {
                Decision::New { superseded, .. } if matches!(gate, Gate::Allow) => state
                    .active
                    .iter()
                    .filter(|a| a.status.in_force() && superseded.contains(&a.action_id))
                    .flat_map(|a| a.agents.iter().cloned())
                    .collect(),
                _ => Vec::new(),
            };
            let current = Current {
                state,
                token: record.token,
                approvals: &record.approvals,
                token_floor: token_floor(rec.offset),
            };
            let (mut decided, mut change) = apply(&p, current, decision, gate, now)?;
            // Approvals decided long enough ago leave the resource with this write.
            let forgotten = self
                .governance
                .approvals
                .decided_long_ago(&record.approvals, now)
                .into_iter()
                .filter(|id| {
                    !change
                        .approvals
                        .iter()
                        .any(|a| a.approval.approval_id == *id)
                })
                .collect();
            change.forget(forgotten);
            // A new approval remembers this decision's trace: its wait's span hangs under it.
            for a in change
                .approvals
                .iter_mut()
                .filter(|a| a.approval.status == "pending" && a.traceparent.is_none())
            {
                a.traceparent = tp.clone();
            }
            decided.at = self.clock.stamp(now);
            // A superseded approval was decided now (what `keep_decided_seconds` counts from).
            for a in change
                .approvals
                .iter_mut()
                .filter(|a| a.approval.status == "superseded" && a.decided_at.is_empty())
            {
                a.decided_at = decided.at.clone();
            }
            if edited {
                // The edit is used once: a copy of this proposal later needs a person like any.
                if let Some(mut s) = p
                    .edit_of
                    .as_ref()
                    .and_then(|id| record.approvals.get(id))
                    .cloned()
                {
                    if let Some(Amend::Edit { outcome, .. }) = s.amend.as_mut() {
                        *outcome = Some(match &decided.reason {
                            Some(r) => {
                                format!("{}: {r} ({})", decided.outcome.as_str(), decided.detail)
                            }
                            None => decided.outcome.as_str().to_string(),
                        });
                    }
                    change.approvals.push(s);
                }
            }
            // The decision's records, built and measured before anything is committed: one too
            // large to write would be skipped after the state took it (an accepted action that
            // never went out, a pending approval nobody could decide).
            let batch = self.outputs(&p, &decided, tp.as_deref())?;
            self.check_sizes(&batch)?;
            let write = Write {
                change: &change,
                applied: Some((rec.partition, rec.offset, &source)),
                decision: Some((&p.proposal_id, &decided)),
                place: place.as_ref(),
            };
            if rec.is_revoked() {
                return Err(revoked(rec));
            }
            if self.store.commit(&key, record.rev, write).await? {
                if claimed.is_some() && !edited {
                    tracing::warn!(proposal_id = %p.proposal_id, "Proposal claims an approval no inbox edit recorded (or one already used); treated as unapproved.");
                }
                self.index(&decided).await?;
                if let Some(n) = &self.notifier {
                    for a in decided.pending_approvals() {
                        n.notify(a);
                    }
                }
                span.attr("switchyard.proposal.id", p.proposal_id.clone())
                    .attr("switchyard.action", p.action.clone())
                    .attr("gen_ai.agent.name", p.agent.clone())
                    .attr("switchyard.resource", p.resource.clone())
                    .attr("switchyard.tenant", p.tenant.clone())
                    .attr("switchyard.decision", decided.outcome.as_str())
                    .attr("switchyard.rule", decided.rule.clone().unwrap_or_default())
                    .attr(
                        "switchyard.reason",
                        decided.reason.clone().unwrap_or_default(),
                    )
                    .attr("switchyard.detail", decided.detail.clone());
                span.end();
                count(rule, &decided, &p);
                if let Some(stats) = &self.stats {
                    let fate = match decided.outcome {
                        Verdict::Rejected => "rejected",
                        Verdict::ApprovalRequested => "approval_requested",
                        _ => "accepted",
                    };
                    stats.proposal(&p.agent, fate);
                    if decided.outcome != Verdict::Rejected {
                        for a in &undone {
                            stats.proposal(a, "undone");
                        }
                    }
                }
                return Ok(batch.forgetting(forget));
            }
            // Someone (an approval decision) changed the resource meanwhile: decide again.
        }
        Err(ProcessError::Transient(
            "resource state kept changing; retrying".into(),
        ))
    }
}

/// The stage's logic against the in-memory twins of its stores: no broker, no Redis.
/// Whether `p` is the proposal a person made by editing and approving an approval in the inbox:
/// the approval it names holds this very edit (parameters and proposal id), decided by the person
/// the proposal names.
fn edited_in_inbox(
    p: &ProposalData,
    approvals: &std::collections::BTreeMap<String, crate::resolve::apply::StoredApproval>,
) -> bool {
    let Some(s) = p.edit_of.as_ref().and_then(|id| approvals.get(id)) else {
        return false;
    };
    let a = &s.action;
    p.approved_by.is_some()
        && s.approval.decided_by == p.approved_by
        && s.approval.status == "superseded"
        && (
            p.action.as_str(),
            p.resource.as_str(),
            p.tenant.as_str(),
            p.workflow_id.as_str(),
        ) == (
            a.action.as_str(),
            a.resource.as_str(),
            a.tenant.as_str(),
            a.workflow_id.as_str(),
        )
        && (p.impact, p.priority) == (a.impact, a.priority)
        && a.agents
            .as_array()
            .and_then(|x| x.first())
            .and_then(|x| x.as_str())
            == Some(p.agent.as_str())
        && matches!(&s.amend, Some(Amend::Edit { parameters, proposal_id, outcome: None, .. })
            if *parameters == p.parameters && *proposal_id == p.proposal_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemoryChainStore;
    use crate::event::CloudEvent;
    use crate::governance::budgets::MemoryBudgetStore;
    use crate::kafka::runtime::process_one;
    use crate::kafka::Output;
    use crate::records::{ActionData, Impact};
    use crate::resolve::store::MemoryResourceStore;

    fn stage(governance: GovernanceConfig) -> ResolveStage {
        ResolveStage {
            rules: serde_yaml::from_str(
                "actions: {rollback: {priority: 100, conflicts_with: [scale_down]}, scale_down: {priority: 10}}",
            )
            .unwrap(),
            governance: Arc::new(governance),
            budgets: Arc::new(Budgets::new(
                Arc::new(MemoryBudgetStore::default()),
                "t",
                vec![],
            )),
            store: Arc::new(MemoryResourceStore::default()),
            emitter: Emitter::new(Default::default(), Default::default()),
            actions_topic: "actions".into(),
            approvals_topic: "approvals".into(),
            sealer: Arc::new(Sealer::new(Arc::new(MemoryChainStore::default()), "audit")),
            stats: None,
            graph: None,
            clock: Default::default(),
            notifier: None,
            max_output_bytes: 1_000_000,
            topic_limits: Default::default(),
        }
    }

    fn input(id: &str, action: &str, offset: i64) -> Arc<Input> {
        input_with(id, action, offset, json!({"id": id}))
    }

    fn input_with(
        id: &str,
        action: &str,
        offset: i64,
        parameters: serde_json::Value,
    ) -> Arc<Input> {
        let p = ProposalData {
            proposal_id: id.into(),
            task_id: format!("task-{id}"),
            workflow_id: "wf".into(),
            agent: "a".into(),
            action: action.into(),
            resource: "svc".into(),
            tenant: "default".into(),
            parameters,
            priority: 0,
            impact: Impact::High,
            context_version: 0,
            reason: None,
            event_id: None,
            cost: None,
            seen_at: None,
            approved_by: None,
            edit_of: None,
            confidence: None,
        };
        let ev = CloudEvent::new(id, "t", types::PROPOSAL)
            .with_subject("svc")
            .with_data(serde_json::to_value(p).unwrap());
        Arc::new(Input::new(
            "proposals",
            0,
            offset,
            Some(b"svc"),
            serde_json::to_vec(&ev).unwrap(),
        ))
    }

    fn actions(out: &[Output]) -> Vec<ActionData> {
        out.iter()
            .filter(|o| o.topic == "actions")
            .map(|o| {
                let ev: CloudEvent = serde_json::from_slice(&o.payload).unwrap();
                serde_json::from_value(ev.data.unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn only_the_recorded_edit_by_its_person_skips_the_second_approval() {
        use crate::resolve::apply::StoredApproval;
        let ev: CloudEvent =
            serde_json::from_slice(&input("edit-1", "rollback", 0).payload).unwrap();
        let mut p: ProposalData = serde_json::from_value(ev.data.unwrap()).unwrap();
        p.approved_by = Some("alice".into());
        p.edit_of = Some("apr-1".into());
        let action: ActionData = serde_json::from_value(json!({
            "action_id": "a", "action": "rollback", "resource": "svc", "tenant": "default",
            "workflow_id": "wf", "parameters": {}, "fencing_token": 0, "proposals": ["p"],
            "agents": ["a"], "priority": 0, "impact": "high"}))
        .unwrap();
        let stored = StoredApproval {
            approval: serde_json::from_value(json!({
                "approval_id": "apr-1", "action_id": "a", "action": "rollback", "resource": "svc",
                "tenant": "default", "status": "superseded", "decided_by": "alice",
                "requested_at": 0, "expires_at": 0, "action_record": {}}))
            .unwrap(),
            action,
            escalated: false,
            decided_at: String::new(),
            traceparent: None,
            seen: None,
            amend: Some(Amend::Edit {
                parameters: p.parameters.clone(),
                proposal_id: "edit-1".into(),
                context_version: None,
                outcome: None,
            }),
            superseded: Vec::new(),
            by_release: false,
        };
        let mut used = stored.clone();
        if let Some(Amend::Edit { outcome, .. }) = used.amend.as_mut() {
            *outcome = Some("accepted".into());
        }
        let approvals = std::collections::BTreeMap::from([("apr-1".to_string(), stored)]);
        assert!(edited_in_inbox(&p, &approvals));
        let once = std::collections::BTreeMap::from([("apr-1".to_string(), used)]);
        assert!(!edited_in_inbox(&p, &once), "an edit is used once");
        let mut other = p.clone();
        other.action = "delete_service".into();
        assert!(!edited_in_inbox(&other, &approvals), "another action");
        let mut other = p.clone();
        other.agent = "b".into();
        assert!(!edited_in_inbox(&other, &approvals), "another agent");
        let mut other = p.clone();
        other.parameters = json!({"id": "something else"});
        assert!(!edited_in_inbox(&other, &approvals), "other parameters");
        let mut other = p.clone();
        other.approved_by = Some("mallory".into());
        assert!(!edited_in_inbox(&other, &approvals), "another person");
        let mut other = p.clone();
        other.proposal_id = "edit-2".into();
        assert!(!edited_in_inbox(&other, &approvals), "another proposal");
        let mut other = p.clone();
        other.edit_of = Some("apr-2".into());
        assert!(
            !edited_in_inbox(&other, &approvals),
            "an approval not on this resource"
        );
    }

    #[tokio::test]
    async fn decides_fences_and_replays_without_a_broker() {
        let s = stage(GovernanceConfig::default());
        let first = process_one(&s, input("p1", "scale_down", 10))
            .await
            .unwrap();
        assert_eq!(actions(&first).len(), 1);
        assert!(
            first.iter().any(|o| o.topic == "audit"),
            "the decision is audited"
        );
        // A higher-priority conflicting action supersedes it, with a higher fencing token.
        let second = process_one(&s, input("p2", "rollback", 11)).await.unwrap();
        let (a1, a2) = (&actions(&first)[0], &actions(&second)[0]);
        assert!(a2.fencing_token > a1.fencing_token);
        // A redelivery re-emits the same records (sealed again); an older offset (a zombie)
        // applies nothing.
        let again = process_one(&s, input("p2", "rollback", 11)).await.unwrap();
        assert_eq!(again[..again.len() - 1], second[..second.len() - 1]);
        assert!(process_one(&s, input("p0", "rollback", 9))
            .await
            .unwrap()
            .is_empty());
        // A lower-priority conflicting proposal is rejected: no action.
        let third = process_one(&s, input("p3", "scale_down", 12))
            .await
            .unwrap();
        assert!(actions(&third).is_empty());
    }

    /// An approval's decision writes a release, not the action; resolve sends the action when it
    /// reads the release, with the resource's next token (above one taken between decision and
    /// release), once; a release of an approval that is not approved sends nothing.
    #[tokio::test]
    async fn an_approved_action_goes_out_when_resolve_reads_its_release() {
        use crate::governance::approvals::{Approvals, Verdict as Answer};
        let g: GovernanceConfig =
            serde_yaml::from_str("approvals: {rules: [{actions: [rollback]}]}").unwrap();
        let mut s = stage(g.clone());
        s.rules = serde_yaml::from_str(
            "actions: {rollback: {priority: 100}, failover: {priority: 200, conflicts_with: [rollback]}}",
        )
        .unwrap();
        let approvals = Approvals {
            store: s.store.clone(),
            emitter: s.emitter.clone(),
            config: g.approvals.clone(),
            actions_topic: "actions".into(),
            approvals_topic: "approvals".into(),
            proposals_topic: "proposals".into(),
            tasks_topic: "tasks".into(),
            sealer: s.sealer.clone(),
            tenants: Default::default(),
            known_tenants: Vec::new(),
            stuck: Default::default(),
            max_output_bytes: 1_000_000,
            delivery_timeout_seconds: 30,
            topic_limits: Default::default(),
            stats: None,
            notifier: None,
            counts: Default::default(),
        };
        let asked = process_one(&s, input("p1", "rollback", 10)).await.unwrap();
        assert!(actions(&asked).is_empty(), "it waits for a person");
        let id = asked
            .iter()
            .filter(|o| o.topic == "approvals")
            .map(|o| serde_json::from_slice::<CloudEvent>(&o.payload).unwrap())
            .find_map(|ev| {
                ev.data
                    .and_then(|d| d["approval_id"].as_str().map(String::from))
            })
            .expect("the approval");
        let d = approvals
            .decide(&id, Answer::Approve, "alice", "ok", false, false)
            .await
            .unwrap();
        assert!(d.outputs.iter().all(|o| o.topic != "actions"));
        let release = d
            .outputs
            .iter()
            .find(|o| o.topic == "proposals")
            .expect("a release");
        let at = |offset| {
            Arc::new(Input::new(
                "proposals",
                0,
                offset,
                Some(b"svc"),
                release.payload.clone(),
            ))
        };
        // A proposal of the resource read between the decision and the release goes out first.
        let between = process_one(&s, input("p2", "restart", 11)).await.unwrap();
        let released = process_one(&s, at(13)).await.unwrap();
        let (first, sent) = (&actions(&between)[0], &actions(&released)[0]);
        assert_eq!(
            (sent.action.as_str(), sent.approved_by.as_deref()),
            ("rollback", Some("alice"))
        );
        assert!(sent.fencing_token > first.fencing_token);
        assert_eq!(
            approvals
                .get(&id)
                .await
                .unwrap()
                .unwrap()
                .action
                .fencing_token,
            sent.fencing_token,
            "the approval shows the token it went out with"
        );
        // Redelivered: the same action again; a copy further down, its decision forgotten: nothing.
        let again = process_one(&s, at(13)).await.unwrap();
        assert_eq!(actions(&again), actions(&released));
        let key = ResourceKey::new("default", "svc");
        s.store
            .forget(&[(key, format!("release-{id}"))])
            .await
            .unwrap();
        assert!(actions(&process_one(&s, at(14)).await.unwrap()).is_empty());
        // The decision's records produced again after resolve sent the action (the outbox, a
        // second decision on the decisions topic): the same release and approval records, never
        // the action itself.
        let unsealed = |out: &[Output]| -> Vec<Output> {
            out.iter().filter(|o| o.topic != "audit").cloned().collect()
        };
        let audit_of = |out: &[Output]| -> Vec<serde_json::Value> {
            out.iter()
                .filter(|o| o.topic == "audit")
                .filter_map(|o| serde_json::from_slice::<CloudEvent>(&o.payload).ok()?.data)
                .collect()
        };
        let later = approvals
            .decide(&id, Answer::Approve, "bob", "me too", false, false)
            .await
            .unwrap();
        assert!(!later.fresh);
        assert_eq!(unsealed(&later.outputs), unsealed(&d.outputs));
        assert_eq!(
            audit_of(&later.outputs)
                .iter()
                .find(|a| a["decision"] == "approval_decided"),
            audit_of(&d.outputs)
                .iter()
                .find(|a| a["decision"] == "approval_decided"),
            "its audit record as first produced"
        );
        // A release naming an approval that is not approved (someone else wrote it) sends nothing.
        let asked = process_one(&s, input("p3", "rollback", 15)).await.unwrap();
        assert!(actions(&asked).is_empty());
        let mut forged: CloudEvent = serde_json::from_slice(&release.payload).unwrap();
        let pending = asked
            .iter()
            .filter(|o| o.topic == "approvals")
            .map(|o| serde_json::from_slice::<CloudEvent>(&o.payload).unwrap())
            .find_map(|ev| {
                ev.data
                    .and_then(|d| d["approval_id"].as_str().map(String::from))
            })
            .expect("a second approval");
        assert_ne!(pending, id);
        if let Some(data) = forged.data.as_mut() {
            data["edit_of"] = json!(pending);
        }
        let forged = Arc::new(Input::new(
            "proposals",
            0,
            16,
            Some(b"svc"),
            serde_json::to_vec(&forged).unwrap(),
        ));
        assert!(actions(&process_one(&s, forged).await.unwrap()).is_empty());
        // Approved, and superseded by a later action before its release: not sent.
        let d = approvals
            .decide(&pending, Answer::Approve, "alice", "ok", false, false)
            .await
            .unwrap();
        let release = d
            .outputs
            .iter()
            .find(|o| o.topic == "proposals")
            .expect("a release")
            .payload
            .clone();
        let failover = process_one(&s, input("p4", "failover", 17)).await.unwrap();
        assert_eq!(actions(&failover).len(), 1);
        let late = Arc::new(Input::new("proposals", 0, 18, Some(b"svc"), release));
        assert!(actions(&process_one(&s, late).await.unwrap()).is_empty());
        let superseded = approvals.get(&pending).await.unwrap().unwrap();
        assert_eq!(superseded.approval.status, "superseded");
    }

    #[test]
    fn accepted_actions_are_counted_under_names_the_config_gives() {
        let known = ACTION_LABELS.get_or_init(|| ["rollback".to_string()].into());
        assert_eq!(action_label("rollback"), "rollback");
        if !known.contains("scale_invented_42") {
            assert_eq!(action_label("scale_invented_42"), "other");
        }
    }

    #[tokio::test]
    async fn a_decision_too_large_to_write_is_refused_before_anything_is_committed() {
        let mut s = stage(GovernanceConfig::default());
        s.max_output_bytes = 8_000;
        let err = process_one(
            &s,
            input_with("big", "scale_down", 10, json!({"blob": "x".repeat(9_000)})),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                &err,
                ProcessError::Poison {
                    reason: "output_too_large",
                    ..
                }
            ),
            "{err:?}"
        );
        // Nothing was committed: the next proposal's action is not taken for a duplicate or a
        // conflict, and no state names the refused one.
        let next = process_one(&s, input("small", "scale_down", 11))
            .await
            .unwrap();
        assert_eq!(actions(&next).len(), 1);
        let key = ResourceKey::new("default", "svc");
        let loaded = s.store.load(&key, &[], None).await.unwrap().record;
        assert!(
            loaded
                .state
                .active
                .iter()
                .all(|a| a.proposals.iter().all(|p| p != "big")),
            "{:?}",
            loaded.state.active
        );
    }

    /// Once a proposal's offset is committed its decision is forgotten: a copy further down the
    /// topic (agents re-emitting after a crash) is skipped, not decided again.
    #[tokio::test]
    async fn a_committed_proposal_is_forgotten_and_its_copy_skipped() {
        use futures::StreamExt;
        let s = stage(GovernanceConfig::default());
        let (_, done) = std::pin::pin!(s.process_batch(vec![input("p1", "scale_down", 10)]))
            .next()
            .await
            .unwrap();
        let done = done.unwrap();
        assert_eq!(done.cleanup.len(), 1);
        s.cleanup(done.cleanup).await;
        let copy = process_one(&s, input("p1", "scale_down", 20))
            .await
            .unwrap();
        assert!(copy.is_empty(), "nothing decided twice: {copy:?}");
    }

    /// The approvals stored with the test proposals' resource.
    async fn stored_approvals(
        s: &ResolveStage,
    ) -> std::collections::BTreeMap<String, crate::resolve::apply::StoredApproval> {
        let key = ResourceKey::new("default", "svc");
        s.store
            .load(&key, &[], None)
            .await
            .unwrap()
            .record
            .approvals
    }

    /// A resource's decided approvals leave it with its first write after
    /// `keep_decided_seconds`; open ones and recently decided ones stay.
    #[tokio::test]
    async fn approvals_decided_long_ago_leave_the_resource_with_its_next_write() {
        use crate::resolve::apply::{Change, StoredApproval};
        let s = stage(GovernanceConfig::default());
        let key = ResourceKey::new("default", "svc");
        let action: ActionData = serde_json::from_value(json!({
            "action_id": "a", "action": "rollback", "resource": "svc", "tenant": "default",
            "workflow_id": "wf", "parameters": {}, "fencing_token": 0, "proposals": ["p"],
            "agents": ["a"], "priority": 0, "impact": "high"}))
        .unwrap();
        let approval = |id: &str, status: &str, decided_at: String| StoredApproval {
            approval: serde_json::from_value(json!({
                "approval_id": id, "action_id": "a", "action": "rollback", "resource": "svc",
                "tenant": "default", "status": status, "requested_at": 0, "expires_at": 0,
                "action_record": {}}))
            .unwrap(),
            action: action.clone(),
            escalated: false,
            decided_at,
            traceparent: None,
            seen: None,
            amend: None,
            superseded: Vec::new(),
            by_release: false,
        };
        let long_ago = "2020-01-01T00:00:00Z".to_string();
        let change = Change {
            approvals: vec![
                approval("apr-old", "approved", long_ago.clone()),
                approval("apr-open", "pending", long_ago),
                approval("apr-new", "rejected", crate::event::now_rfc3339()),
            ],
            ..Change::default()
        };
        let w = Write {
            change: &change,
            applied: None,
            decision: None,
            place: None,
        };
        assert!(s.store.commit(&key, 0, w).await.unwrap());
        process_one(&s, input("p1", "scale_down", 1)).await.unwrap();
        let kept = stored_approvals(&s).await;
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            ["apr-new", "apr-open"],
            "the one decided in 2020 is dropped"
        );
    }

    /// A superseded approval is decided when superseded: `keep_decided_seconds` counts from then.
    #[tokio::test]
    async fn a_superseded_approval_is_decided_at_the_decision_that_supersedes_it() {
        let g: GovernanceConfig =
            serde_yaml::from_str("approvals: {rules: [{actions: [scale_down]}]}").unwrap();
        let s = stage(g);
        process_one(&s, input("p1", "scale_down", 1)).await.unwrap();
        let pending = stored_approvals(&s).await;
        assert_eq!(pending.len(), 1);
        assert!(pending.values().all(|a| a.approval.status == "pending"));
        process_one(&s, input("p2", "rollback", 2)).await.unwrap();
        let after = stored_approvals(&s).await;
        let a = after.values().next().unwrap();
        assert_eq!(a.approval.status, "superseded");
        assert!(
            chrono::DateTime::parse_from_rfc3339(&a.decided_at).is_ok(),
            "{:?}",
            a.decided_at
        );
    }

    #[tokio::test]
    async fn governance_gate_runs_before_apply() {
        let g: GovernanceConfig =
            serde_yaml::from_str("access: [{agents: [other], actions: [rollback]}]").unwrap();
        let out = process_one(&stage(g), input("p1", "rollback", 1))
            .await
            .unwrap();
        assert!(
            actions(&out).is_empty(),
            "no access rule lets agent a roll back"
        );
        let audit: CloudEvent =
            serde_json::from_slice(&out.iter().find(|o| o.topic == "audit").unwrap().payload)
                .unwrap();
        assert_eq!(audit.data.unwrap()["reason"], "access");
    }
}
