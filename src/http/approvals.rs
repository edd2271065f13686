//! The approvals API (bearer token of an `http.users` user; see [`super::auth`]):
//!
//! - `GET /v1/approvals[?tenant=T][&limit=N][&after=CURSOR]`: open approvals of the caller's
//!   tenants, soonest expiry first, `limit` (default 100, at most 1000) per page; `next` is the
//!   cursor of the following page;
//! - `GET /v1/approvals/{id}`: one approval with the action it would send;
//! - `POST /v1/approvals/{id}/approve|reject` with `{"why": "..."}` (and `"by"` only for the
//!   shared legacy token): decide (approver role; at a level of an escalation path, only members of
//!   that level's group or admins: [`crate::governance::approvals::may_decide`], else 403). An
//!   approval of a tenant the caller does not see is not found;
//! - `POST /v1/approvals/{id}/edit` with `{"parameters": {...}, "why": "..."}`: approve with other
//!   parameters, checked again by resolve and governance ([`crate::governance::amend`]);
//! - `POST /v1/approvals/{id}/respond` with `{"comment": "..."}`: send it back to the agent.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{Auth, Identity, Role};
use crate::governance::amend::Answer;
use crate::governance::approvals::{may_decide, ApprovalError, Approvals, Decision};
use crate::kafka::Producer;

/// Body of `POST /v1/approvals/{id}/approve|reject` and of a decisions-topic record's `data`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct DecisionRequest {
    /// Who decides: only read for the shared legacy token (a user's own name is recorded
    /// otherwise).
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub why: String,
    /// `/edit`: the action's new parameters (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// `/respond`: the comment sent back to the agent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

/// The approvals API state.
#[derive(Clone)]
pub struct Api {
    pub approvals: Arc<Approvals>,
    pub producer: Producer,
    pub auth: Arc<Auth>,
    /// The address people use (`governance.approvals.public_url`): a browser's `Origin` must match.
    pub public_url: Option<String>,
}

use super::auth::error;

/// The caller, when authenticated and allowed `role`.
#[allow(clippy::result_large_err)]
fn caller(api: &Api, headers: &HeaderMap, role: Role) -> Result<Identity, Response> {
    super::auth::authorize(&api.auth, headers, role)
}

fn error_response(e: ApprovalError) -> Response {
    let code = match e {
        ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
        ApprovalError::Invalid(_) | ApprovalError::TooLarge(_) => StatusCode::BAD_REQUEST,
        ApprovalError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApprovalError::Store(_) => return super::auth::store_unavailable("the approvals API", e),
        ApprovalError::Contention => return super::auth::unavailable(e.to_string()),
        ApprovalError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, e.to_string())
}

#[derive(Deserialize)]
struct ListQuery {
    tenant: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list(State(api): State<Api>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    let who = match caller(&api, &headers, Role::Viewer) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let sees = |t: &str| who.sees(t);
    match api
        .approvals
        .list(&sees, q.tenant.as_deref(), q.after.as_deref(), limit)
        .await
    {
        Ok(page) => Json(json!({"approvals": page.approvals, "next": page.next})).into_response(),
        Err(e) => error_response(e),
    }
}

async fn one(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let who = match caller(&api, &headers, Role::Viewer) {
        Ok(w) => w,
        Err(r) => return r,
    };
    match api.approvals.get(&id).await {
        Ok(Some(s)) if who.sees(&s.approval.tenant) => {
            Json(json!({"approval": s.approval, "action": s.action})).into_response()
        }
        Ok(_) => error_response(ApprovalError::NotFound(id)),
        Err(e) => error_response(e),
    }
}

async fn act(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    body: Option<Json<DecisionRequest>>,
) -> Response {
    let who = match caller(&api, &headers, Role::Approver) {
        Ok(w) => w,
        Err(r) => return r,
    };
    // A caller a proxy signed in is a browser, whose cookies a foreign page can use: the decision
    // must be JSON (a cross-site form or no-cors fetch cannot send it without a preflight) and come
    // from this site.
    if api.auth.proxy_user(&headers).is_some() {
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.trim_start().starts_with("application/json"));
        if !json || !super::auth::same_origin(&headers, api.public_url.as_deref()) {
            return error(
                StatusCode::FORBIDDEN,
                "send the decision as application/json from this site",
            );
        }
    }
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let answer = match answer_of(&verb, &req) {
        Ok(a) => a,
        Err((code, m)) => return error(code, m),
    };
    let by = if who.shared {
        if req.by.trim().is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "body must be JSON {\"by\": \"who\", \"why\": \"reason\"} (a shared token cannot tell who decides)",
            );
        }
        req.by.clone()
    } else {
        who.name.clone()
    };
    // Another tenant's approval does not exist for this caller.
    match api.approvals.get(&id).await {
        Ok(Some(s)) if who.sees(&s.approval.tenant) => {}
        Ok(_) => return error_response(ApprovalError::NotFound(id)),
        Err(e) => return error_response(e),
    }
    // At a level of an escalation path, only that level's group (or an admin) decides: checked
    // against the approval as it stands when the decision is made (an already decided one is
    // answered with its decision, 409, whoever asks).
    let allowed = |a: &crate::records::ApprovalData| may_decide(&who.decider(), a);
    let d = api.approvals.answer(&id, &by, answer, &allowed).await;
    let d = match d {
        Ok(d) => d,
        Err(e) => return error_response(e),
    };
    if let Err(m) = publish(&api.approvals, &api.producer, &id, &d).await {
        return super::auth::unavailable(m);
    }
    let code = if d.fresh {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (code, Json(json!({
        "approval_id": d.approval.approval_id, "status": d.approval.status, "action_id": d.approval.action_id,
        "decided_by": d.approval.decided_by,
        "already_decided": !d.fresh,
    }))).into_response()
}

/// The answer `POST /v1/approvals/{id}/{verb}` with `req` asks for, or the status and message it
/// is refused with. Pure, so it is fuzzed (`fuzz/`).
pub fn answer_of(verb: &str, req: &DecisionRequest) -> Result<Answer, (StatusCode, &'static str)> {
    Ok(match verb {
        "approve" => Answer::Approve {
            why: req.why.clone(),
        },
        "reject" => Answer::Reject {
            why: req.why.clone(),
        },
        "edit" => match req.parameters.clone() {
            Some(parameters) => Answer::Edit {
                parameters,
                why: req.why.clone(),
                context_version: None,
            },
            None => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "edit needs {\"parameters\": {...}} (the action's new parameters)",
                ))
            }
        },
        "respond" => Answer::Respond {
            comment: req.comment.clone(),
        },
        _ => {
            return Err((
                StatusCode::NOT_FOUND,
                "use /approve, /reject, /edit or /respond",
            ))
        }
    })
}

/// Produces a decision's records, then clears its outbox entry; the error says what to do when
/// producing failed (the sweeper produces them later in any case).
pub async fn publish(
    approvals: &Approvals,
    producer: &Producer,
    id: &str,
    d: &Decision,
) -> Result<(), String> {
    for o in &d.outputs {
        if let Err(e) = producer.send(o).await {
            approvals.sealer.distrust(&approvals.sealer.own_chain);
            tracing::warn!(approval_id = %id, topic = %o.topic, error = %e, "Producing an approval decision failed; the outbox sweeper produces it.");
            return Err(format!("decision recorded but producing failed ({e}); it is produced within a minute, or repeat the request"));
        }
    }
    if let Err(e) = approvals.sent(id).await {
        tracing::warn!(approval_id = %id, error = %e, "Clearing the approvals outbox failed; the records may be produced once more.");
    }
    Ok(())
}

/// The approvals API routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}", get(one))
        .route("/v1/approvals/{id}/{verb}", post(act))
        .with_state(api)
}
