//! Human approval: decisions through the HTTP API (`/v1/approvals`) or the decisions topic, and a
//! sweeper that expires (or escalates) requests nobody decided in time.
//!
//! A pending approval lives in its resource's Redis hash; nothing waits on a thread or a partition.
//! Every transition is a compare-and-set on the resource, so two people (or two instances) deciding
//! at once produce one decision. Deciding again returns the same records, so a caller that crashed
//! before producing them can simply retry.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{ApprovalsConfig, OnTimeout};
use crate::audit::Sealer;
use crate::error::ProcessError;
use crate::event::{now_rfc3339, now_secs};
use crate::kafka::{Output, Producer};
use crate::records::{
    audit_event, record_event, types, ActionData, ApprovalData, AuditData, Emitter,
};
use crate::resolve::apply::{Change, StoredApproval};
use crate::resolve::rules::ActiveStatus;
use crate::resolve::store::{ResourceStore, Write};
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
    /// Seals approval decisions into their resource's audit chain.
    pub sealer: Arc<Sealer>,
    /// Tenants that had pending approvals (their gauge is kept, at 0 when none are pending).
    pub tenants: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

fn enc(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Encode(e.to_string())
}

impl Approvals {
    /// Applies a verdict (or an expiry when `expire` is set). Idempotent: an already decided approval
    /// yields its decision's records again.
    pub async fn decide(
        &self,
        approval_id: &str,
        verdict: Verdict,
        by: &str,
        why: &str,
        expire: bool,
    ) -> Result<Decision, ApprovalError> {
        let key = self
            .store
            .locate(approval_id)
            .await?
            .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))?;
        for _ in 0..20 {
            let loaded = self.store.load(&key, &[], None).await?.record;
            let stored = loaded
                .approvals
                .get(approval_id)
                .cloned()
                .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))?;
            let open = matches!(stored.approval.status.as_str(), "pending" | "escalated");
            if !open {
                let action = (stored.approval.status == "approved").then(|| stored.action.clone());
                let outputs = self.outputs(&stored, action.as_ref()).await?;
                return Ok(Decision {
                    approval: stored.approval,
                    fresh: false,
                    action,
                    outputs,
                });
            }
            let now = now_secs();
            let mut s = stored.clone();
            s.decided_at = now_rfc3339();
            let mut state = loaded.state.clone();
            let mut token = loaded.token;
            let escalate =
                expire && self.config.on_timeout == OnTimeout::Escalate && !stored.escalated;
            if escalate {
                s.escalated = true;
                s.approval.status = "escalated".into();
                s.approval.expires_at = now + self.config.timeout_seconds as i64;
                s.approval.why = Some("not decided in time; escalated".into());
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
                        token += 1;
                        s.approval.status = "approved".into();
                        s.action.fencing_token = token;
                        s.action.approved_by = Some(by.to_string());
                        for a in state
                            .active
                            .iter_mut()
                            .filter(|a| a.approval_id.as_deref() == Some(approval_id))
                        {
                            a.status = ActiveStatus::Accepted;
                            a.at = now;
                        }
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
            let change = Change {
                state,
                token,
                approvals: vec![s.clone()],
            };
            let write = Write {
                change: &change,
                applied: None,
                decision: None,
            };
            if self.store.commit(&key, loaded.rev, write).await? {
                if escalate {
                    self.store.index_open(&[&s.approval]).await?;
                    METRICS.approvals.with_label_values(&["escalated"]).inc();
                } else {
                    self.store.index_close(approval_id).await?;
                    let kind = s.approval.status.as_str();
                    METRICS.approvals.with_label_values(&[kind]).inc();
                    METRICS
                        .approval_wait
                        .with_label_values(&[kind])
                        .observe((now - s.approval.requested_at).max(0) as f64);
                }
                let action = (s.approval.status == "approved").then(|| s.action.clone());
                let outputs = self.outputs(&s, action.as_ref()).await?;
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

    /// Records for an approval's current status: the approval record, the action when approved, and
    /// an audit record.
    async fn outputs(
        &self,
        stored: &StoredApproval,
        action: Option<&ActionData>,
    ) -> Result<Vec<Output>, ApprovalError> {
        let (a, time) = (&stored.approval, stored.decided_at.as_str());
        let pe = |e: ProcessError| ApprovalError::Encode(e.to_string());
        let mut out = Vec::new();
        if let Some(act) = action {
            let ev = record_event(
                format!("{}-{}", act.action_id, act.fencing_token),
                SOURCE,
                types::ACTION,
                &act.resource,
                &act.tenant,
                None,
                time,
                act,
            )
            .map_err(pe)?;
            out.push(self.emitter.emit(&self.actions_topic, &ev).map_err(pe)?);
        }
        out.push(approval_output(&self.emitter, &self.approvals_topic, a, None, time).map_err(pe)?);
        let decision = match a.status.as_str() {
            "expired" => "approval_expired",
            "escalated" => "approval_escalated",
            _ => "approval_decided",
        };
        let audit = AuditData {
            decision: decision.into(),
            stage: "approvals".into(),
            resource: a.resource.clone(),
            tenant: a.tenant.clone(),
            event_id: None,
            task_id: None,
            workflow_id: action.map(|x| x.workflow_id.clone()),
            trace_id: None,
            reason: Some(a.status.clone()),
            detail: json!({"approval_id": a.approval_id, "action_id": a.action_id, "action": a.action, "status": a.status,
                           "decided_by": a.decided_by, "why": a.why, "fencing_token": action.map(|x| x.fencing_token)}),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let ev = audit_event(
            SOURCE,
            &[decision, &a.approval_id, &a.status],
            &audit,
            None,
            time,
        )
        .map_err(pe)?;
        out.extend(
            self.sealer
                .outputs("approvals", &self.emitter, vec![ev])
                .await
                .map_err(|e| match e {
                    // Redis unreachable: retryable, like the rest of a decision.
                    ProcessError::Transient(m) => ApprovalError::Store(StoreError::Redis(m)),
                    e => pe(e),
                })?,
        );
        Ok(out)
    }

    /// Open approvals (pending or escalated), soonest expiry first.
    pub async fn list_open(&self) -> Result<Vec<ApprovalData>, ApprovalError> {
        let mut out = Vec::new();
        for (id, _) in self.store.open().await? {
            if let Some(key) = self.store.locate(&id).await? {
                let loaded = self.store.load(&key, &[], None).await?.record;
                if let Some(s) = loaded.approvals.get(&id) {
                    if matches!(s.approval.status.as_str(), "pending" | "escalated") {
                        out.push(s.approval.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Expires (or escalates) every approval past its deadline; returns the records to produce.
    pub async fn sweep(&self) -> Result<Vec<Output>, ApprovalError> {
        let now = now_secs();
        let mut out = Vec::new();
        let open = self.store.open().await?;
        let mut pending_by_tenant: std::collections::BTreeMap<String, i64> = Default::default();
        for (id, expires_at) in &open {
            if *expires_at <= now {
                match self
                    .decide(id, Verdict::Reject, "switchyard", "timeout", true)
                    .await
                {
                    Ok(d) if d.fresh => out.extend(d.outputs),
                    Ok(_) | Err(ApprovalError::NotFound(_)) => self.store.index_close(id).await?,
                    Err(e) => return Err(e),
                }
            } else if let Some(k) = self.store.locate(id).await? {
                *pending_by_tenant.entry(k.tenant).or_default() += 1;
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

/// Runs the sweeper until `stop`: every `interval`, expire what is due and produce the records.
pub async fn run_sweeper(
    approvals: Arc<Approvals>,
    producer: Producer,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        match approvals.sweep().await {
            Ok(outputs) => {
                for o in outputs {
                    if let Err(e) = producer.send(&o).await {
                        tracing::warn!(error = %e, "Producing an approval expiry failed; the next sweep retries.");
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
        format!("{}-{}", a.approval_id, a.status),
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
