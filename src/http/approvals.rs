//! The approvals API: `GET /v1/approvals`, `POST /v1/approvals/{id}/approve|reject` (bearer token).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::governance::approvals::{ApprovalError, Approvals, Verdict};
use crate::kafka::Producer;
use crate::secret::Secret;

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
    pub token: Option<Secret>,
}

/// The error response when the request lacks the right bearer token.
fn unauthorized(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let Some(want) = api.token.as_ref().filter(|t| !t.is_empty()) else {
        return Some((StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "approvals API disabled: set governance.approvals.token or SWITCHYARD_APPROVAL_TOKEN"}))).into_response());
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !got.is_some_and(|g| want.matches(g)) {
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
