//! The gateway served over HTTP, OpenAI-compatible: `POST /v1/chat/completions` (with SSE
//! streaming) and `GET /v1/models`. Agents in any language point their OpenAI SDK here and get
//! the same routing, limits, budgets and accounting as built-in agents.
//!
//! Keys: `gateway.keys` (SHA-256 of each key, the agent name and tenant it accounts to), and
//! `SWITCHYARD_GATEWAY_KEY`, when set, as a key of the `default` tenant (local use and tests).
//! Errors come in OpenAI's format: 401 no or bad key, 404 unknown model, 400 bad request, 429 over
//! budget or rate limited (with `Retry-After`), 502 every provider failed, 503 state unavailable.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{Caller, Gateway, GatewayError};
use crate::secret::constant_time_eq;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

#[derive(Clone)]
struct Served {
    gw: Arc<Gateway>,
    /// `SWITCHYARD_GATEWAY_KEY`'s SHA-256, read once at start.
    env_key: Option<[u8; 32]>,
}

/// The routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let env_key = std::env::var("SWITCHYARD_GATEWAY_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(|k| Sha256::digest(k.as_bytes()).into());
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Served { gw, env_key })
}

fn error(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

fn gateway_error(e: &GatewayError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let (kind, code) = match e {
        GatewayError::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
        GatewayError::BadRequest(_) => ("invalid_request_error", "bad_request"),
        GatewayError::BudgetExhausted { .. } => ("insufficient_quota", "budget_exhausted"),
        GatewayError::RateLimited { .. } => ("rate_limit_error", "rate_limited"),
        GatewayError::ProviderFailed(_) => ("api_error", "provider_failed"),
        GatewayError::Unavailable(_) => ("api_error", "unavailable"),
        GatewayError::CallerGone => ("api_error", "caller_gone"),
    };
    let message = match e {
        // Its store's failure (Redis's address, keys, errors) goes to the log under a reference,
        // not to the caller.
        GatewayError::Unavailable(why) => {
            let reference = crate::http::auth::logged("the AI gateway", why);
            format!("the AI gateway's state is unavailable (reference {reference} in switchyard's log); retry")
        }
        _ => e.to_string(),
    };
    let mut r = error(status, kind, code, message);
    let after = match e {
        GatewayError::RateLimited { retry_after } => Some(retry_after.as_secs_f64().ceil() as u64),
        GatewayError::BudgetExhausted { .. } => Some(60),
        // Its state (Redis) out of reach: worth repeating shortly.
        GatewayError::Unavailable(_) => Some(1),
        _ => None,
    };
    if let Some(s) = after {
        if let Ok(v) = HeaderValue::from_str(&s.max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn unauthorized(m: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        m,
    )
}

/// The caller a bearer key stands for, or why there is none.
fn authenticate(s: &Served, headers: &HeaderMap) -> Result<Caller, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err("send one Authorization: Bearer <key> header");
    };
    let v = v.to_str().unwrap_or_default();
    let key = match v.split_once(' ') {
        Some((scheme, k)) if scheme.eq_ignore_ascii_case("bearer") => k.trim(),
        _ => return Err("send one Authorization: Bearer <key> header"),
    };
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect::<String>()
    };
    let (task, resource) = (header("x-switchyard-task"), header("x-switchyard-resource"));
    let workflow = header("x-switchyard-workflow");
    let traceparent = Some(header("traceparent")).filter(|t| crate::spans::Ctx::parse(t).is_some());
    let mut found = None;
    for k in s.gw.keys() {
        let want = hex::decode(&k.key_sha256).unwrap_or_default();
        // Every key is compared, so the time does not tell which one matched.
        if constant_time_eq(&want, &digest) && found.is_none() {
            found = Some(Caller {
                tenant: k.tenant.clone(),
                agent: k.name.clone(),
                workflow: workflow.clone(),
                task: task.clone(),
                resource: resource.clone(),
                traceparent: traceparent.clone(),
            });
        }
    }
    if found.is_none() && s.env_key.is_some_and(|e| constant_time_eq(&e, &digest)) {
        found = Some(Caller {
            tenant: "default".into(),
            agent: "gateway-key".into(),
            workflow,
            task,
            resource,
            traceparent,
        });
    }
    found.ok_or("the API key is not valid")
}

async fn models(State(s): State<Served>, headers: HeaderMap) -> Response {
    if let Err(m) = authenticate(&s, &headers) {
        return unauthorized(m);
    }
    let data: Vec<Value> =
        s.gw.models()
            .into_iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard"}))
            .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A `POST /v1/chat/completions` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    /// The whole body, passed on to the provider.
    pub body: Map<String, Value>,
    pub stream: bool,
    /// `stream_options.include_usage`: the caller wants the usage-only chunk.
    pub include_usage: bool,
}

/// Most choices (`n`) a served request may ask for; the budget hold counts each.
pub const MAX_CHOICES: u64 = 16;

/// Reads a chat-completion request body, or says what is wrong with it (answered 400). Pure, so
/// it is fuzzed (`fuzz/`).
pub fn read_request(body: &[u8]) -> Result<ChatRequest, String> {
    let mut req: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("the body must be a JSON object".into()),
        Err(e) => return Err(format!("the body is not JSON: {e}")),
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_string) else {
        return Err("\"model\" (a string) is required".into());
    };
    if req
        .get("messages")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        return Err("\"messages\" (a non-empty array) is required".into());
    }
    // What bounds the call's cost must be a number the hold can count: an output cap that is not
    // a positive integer would be passed on (uncapped output) while the hold counted the default.
    // `null` is taken as absent (the gateway then sets the cap it holds for).
    for k in ["max_tokens", "max_completion_tokens", "n"] {
        if req.get(k).is_some_and(Value::is_null) {
            req.remove(k);
        }
    }
    for k in ["max_tokens", "max_completion_tokens"] {
        if req
            .get(k)
            .is_some_and(|v| v.as_u64().is_none_or(|n| n == 0))
        {
            return Err(format!("\"{k}\", when given, is a positive integer"));
        }
    }
    if req
        .get("n")
        .is_some_and(|v| v.as_u64().is_none_or(|n| n == 0 || n > MAX_CHOICES))
    {
        return Err(format!(
            "\"n\", when given, is an integer from 1 to {MAX_CHOICES}"
        ));
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatRequest {
        model,
        body: req,
        stream,
        include_usage,
    })
}

async fn completions(
    State(s): State<Served>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = match authenticate(&s, &headers) {
        Ok(c) => c,
        Err(m) => return unauthorized(m),
    };
    let bad = |m: String| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad_request",
            m,
        )
    };
    let ChatRequest {
        model,
        body: req,
        stream,
        include_usage,
    } = match read_request(&body) {
        Ok(r) => r,
        Err(m) => return bad(m),
    };
    if !stream {
        return match s.gw.complete(&caller, &model, &req).await {
            Ok(c) => Json(c.body).into_response(),
            Err(e) => gateway_error(&e),
        };
    }
    match s.gw.stream(&caller, &model, &req).await {
        Err(e) => gateway_error(&e),
        Ok((_, chunks)) => {
            let events = chunks
                .filter_map(move |item| async move {
                    match item {
                        Ok(v) => {
                            // The usage-only chunk goes to callers who asked for it.
                            let usage_only = v
                                .get("choices")
                                .and_then(Value::as_array)
                                .is_some_and(|c| c.is_empty());
                            if usage_only && !include_usage {
                                return None;
                            }
                            Some(format!("data: {v}\n\n"))
                        }
                        Err(e) => Some(format!(
                            "data: {}\n\n",
                            json!({"error": {"message": format!("the provider's stream failed: {e}"), "type": "api_error", "code": "provider_failed"}})
                        )),
                    }
                })
                .chain(futures::stream::once(async { "data: [DONE]\n\n".to_string() }))
                .map(Ok::<_, Infallible>);
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(events))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store failure is answered with a reference to the log, never Redis's words (its address,
    /// keys, errors), and with Retry-After.
    #[tokio::test]
    async fn an_unavailable_store_is_not_quoted_to_the_caller() {
        let r = gateway_error(&GatewayError::Unavailable(
            "redis://:pw@10.0.0.7:6379: Connection refused".into(),
        ));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let body = axum::body::to_bytes(r.into_body(), 1 << 16)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("reference"), "{text}");
        assert!(
            !text.contains("10.0.0.7") && !text.contains("refused"),
            "{text}"
        );
    }

    #[test]
    fn what_bounds_a_call_s_cost_must_be_countable() {
        let read = |extra: &str| {
            read_request(
                format!(
                    r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#
                )
                .as_bytes(),
            )
        };
        assert!(read("").is_ok());
        assert!(read(r#", "max_tokens": 16, "n": 2"#).is_ok());
        // null is absent: the gateway sets the cap it holds for.
        let nulled = read(r#", "max_tokens": null, "n": null"#).unwrap();
        assert!(!nulled.body.contains_key("max_tokens") && !nulled.body.contains_key("n"));
        for bad in [
            r#", "max_tokens": "lots""#,
            r#", "max_tokens": 0"#,
            r#", "max_completion_tokens": -1"#,
            r#", "n": 0"#,
            r#", "n": 17"#,
            r#", "n": 2.5"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}
