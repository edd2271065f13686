//! Human approval: decisions through the HTTP API (`/v1/approvals`) or the decisions topic, and a
//! sweeper that expires (or escalates) requests nobody decided in time.
//!
//! A pending approval lives in its resource's Redis hash; nothing waits on a thread or a partition.
//! Every transition is a compare-and-set on the resource, so two people (or two instances) deciding
//! at once produce one decision. Deciding again returns the same records, so a caller that crashed
//! before producing them can simply retry.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::context::StoreError;
use crate::governance::{now_secs, ApprovalsConfig, OnTimeout};
use crate::kafka::runtime::{ProcessError, Processor};
use crate::kafka::{Input, Output, Producer};
use crate::records::{
    audit_event, record_event, types, ActionData, ApprovalData, AuditData, Emitter,
};
use crate::resolve::ActiveStatus;
use crate::stages::resolve::{approval_output, ResourceStore, SOURCE};
use crate::telemetry::METRICS;

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
    pub store: Arc<ResourceStore>,
    pub emitter: Emitter,
    pub config: ApprovalsConfig,
    pub actions_topic: String,
    pub approvals_topic: String,
    /// Seals approval decisions into their resource's audit chain.
    pub sealer: Arc<crate::audit::Sealer>,
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
            .where_is(approval_id)
            .await?
            .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))?;
        for _ in 0..20 {
            let (loaded, _) = self.store.load(&key, &[]).await?;
            let stored = loaded
                .approvals
                .get(approval_id)
                .cloned()
                .ok_or_else(|| ApprovalError::NotFound(approval_id.into()))?;
            let open = matches!(stored.approval.status.as_str(), "pending" | "escalated");
            if !open {
                let action = (stored.approval.status == "approved").then(|| stored.action.clone());
                let outputs = self.outputs(&stored.approval, action.as_ref()).await?;
                return Ok(Decision {
                    approval: stored.approval,
                    fresh: false,
                    action,
                    outputs,
                });
            }
            let now = now_secs();
            let mut s = stored.clone();
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
            let fields = vec![
                (
                    format!("approval:{approval_id}"),
                    serde_json::to_string(&s).map_err(enc)?,
                ),
                (
                    "state".to_string(),
                    serde_json::to_string(&state).map_err(enc)?,
                ),
                ("token".to_string(), token.to_string()),
            ];
            if self.store.cas(&key, loaded.rev, &fields, None).await? {
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
                let outputs = self.outputs(&s.approval, action.as_ref()).await?;
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
        a: &ApprovalData,
        action: Option<&ActionData>,
    ) -> Result<Vec<Output>, ApprovalError> {
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
                act,
            )
            .map_err(pe)?;
            out.push(self.emitter.emit(&self.actions_topic, &ev).map_err(pe)?);
        }
        out.push(approval_output(&self.emitter, &self.approvals_topic, a, None, None).map_err(pe)?);
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
        let ev = audit_event(SOURCE, &[decision, &a.approval_id, &a.status], &audit, None)
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
            if let Some(key) = self.store.where_is(&id).await? {
                let (loaded, _) = self.store.load(&key, &[]).await?;
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
            } else if let Some(k) = self.store.where_is(id).await? {
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

/// Body of `POST /v1/approvals/{id}/approve|reject` and of a decisions-topic record's `data`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DecisionRequest {
    /// Who decides (required).
    pub by: String,
    #[serde(default)]
    pub why: String,
}

/// The approvals API state.
#[derive(Clone)]
pub struct Api {
    pub approvals: Arc<Approvals>,
    pub producer: Producer,
    pub token: Option<String>,
}

/// The error response when the request lacks the right bearer token.
fn unauthorized(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let Some(want) = api.token.as_deref().filter(|t| !t.is_empty()) else {
        return Some((StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "approvals API disabled: set governance.approvals.token or SWITCHYARD_APPROVAL_TOKEN"}))).into_response());
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if got != Some(want) {
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response(),
        );
    }
    None
}

fn error_response(e: ApprovalError) -> Response {
    let code = match e {
        ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
        ApprovalError::Store(_) | ApprovalError::Contention => StatusCode::SERVICE_UNAVAILABLE,
        ApprovalError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(json!({"error": e.to_string()}))).into_response()
}

async fn list(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    match api.approvals.list_open().await {
        Ok(v) => Json(json!({"approvals": v})).into_response(),
        Err(e) => error_response(e),
    }
}

async fn act(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    body: Option<Json<DecisionRequest>>,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let verdict = match verb.as_str() {
        "approve" => Verdict::Approve,
        "reject" => Verdict::Reject,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "use /approve or /reject"})),
            )
                .into_response()
        }
    };
    let Some(Json(req)) = body.filter(|b| !b.by.trim().is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body must be JSON {\"by\": \"who\", \"why\": \"reason\"}"})),
        )
            .into_response();
    };
    let d = match api
        .approvals
        .decide(&id, verdict, &req.by, &req.why, false)
        .await
    {
        Ok(d) => d,
        Err(e) => return error_response(e),
    };
    for o in &d.outputs {
        if let Err(e) = api.producer.send(o).await {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": format!("decision recorded but producing failed ({e}); repeat the request")}))).into_response();
        }
    }
    let code = if d.fresh {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (code, Json(json!({
        "approval_id": d.approval.approval_id, "status": d.approval.status, "action_id": d.approval.action_id,
        "fencing_token": d.action.as_ref().map(|a| a.fencing_token), "decided_by": d.approval.decided_by,
        "already_decided": !d.fresh,
    }))).into_response()
}

/// `GET /v1/approvals`, `POST /v1/approvals/{id}/approve|reject` (bearer token).
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}/{verb}", post(act))
        .with_state(api)
}

/// Decisions topic stage: records `{"approval_id", "decision": "approve|reject", "by", "why"}` (as a
/// CloudEvent's data, or plain JSON).
pub struct DecisionsStage {
    pub approvals: Arc<Approvals>,
}

#[derive(Deserialize)]
struct DecisionRecord {
    approval_id: String,
    decision: Verdict,
    by: String,
    #[serde(default)]
    why: String,
}

impl Processor for DecisionsStage {
    fn stage(&self) -> &'static str {
        "decisions"
    }

    async fn process(&self, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
        let v: Value = serde_json::from_slice(&rec.payload).map_err(|e| ProcessError::Poison {
            reason: "malformed_json",
            detail: e.to_string(),
        })?;
        let body = if v.get("specversion").is_some() {
            v.get("data").cloned().unwrap_or(Value::Null)
        } else {
            v
        };
        let d: DecisionRecord = serde_json::from_value(body).map_err(|e| ProcessError::Poison {
            reason: "malformed_decision",
            detail: e.to_string(),
        })?;
        match self
            .approvals
            .decide(&d.approval_id, d.decision, &d.by, &d.why, false)
            .await
        {
            Ok(x) => Ok(x.outputs),
            Err(ApprovalError::NotFound(id)) => Err(ProcessError::Poison {
                reason: "unknown_approval",
                detail: format!("approval {id} not found"),
            }),
            Err(e @ ApprovalError::Encode(_)) => Err(ProcessError::Fatal(e.to_string())),
            Err(e) => Err(ProcessError::Transient(e.to_string())),
        }
    }
}
