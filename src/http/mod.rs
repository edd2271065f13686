//! switchyard's HTTP server: `/metrics` (Prometheus text), `/healthz` (the process runs), `/readyz`
//! (Kafka and Redis reachable and every running stage in its consumer group — consuming, or
//! standing by when there are more members than partitions), and the front doors
//! merged in from the submodules ([`approvals`]: the approvals API; [`context`]: the context API;
//! [`inbox`]: the agent inbox web page; [`ingest`]: events over HTTP), served by [`server`] (the
//! listener's connection bounds).

pub mod approvals;
pub mod auth;
pub mod context;
pub mod inbox;
pub mod ingest;
pub mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use serde::{Deserialize, Serialize};

use crate::kafka::runtime::StageHealth;
use crate::telemetry::METRICS;

/// The `http:` config section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics`, `/healthz`, `/readyz` and the approvals API.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address. Overridden by `SWITCHYARD_HTTP_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <this>`.
    /// `SWITCHYARD_METRICS_TOKEN` overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<crate::secret::Secret>,
    /// Users of the HTTP front doors (approvals API, context API, the inbox) with their roles and
    /// tenants.
    #[serde(default)]
    pub users: Vec<auth::UserSpec>,
    /// A header a trusted reverse proxy (single sign-on in front) sets to the signed-in user's
    /// name, e.g. `X-Forwarded-User`: that user is the caller. Only set it when every request
    /// passes that proxy and the proxy removes the header from what clients send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_user_header: Option<String>,
    /// The agent inbox web page (`/inbox`).
    #[serde(default)]
    pub inbox: inbox::InboxConfig,
    /// HTTP ingest: CloudEvents, Alertmanager and GitHub webhooks to input topics.
    #[serde(default)]
    pub ingest: ingest::IngestConfig,
    /// Connections served at once; past it new ones are closed at once (counted in
    /// `switchyard_http_connections_refused_total`), so slow or idle clients cannot take the
    /// process's file descriptors from Kafka and Redis.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A client must send a request's headers within this long, also on an idle kept-alive
    /// connection; else it is closed.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// ... and its body within this long after its headers; else the request fails (the ingest
    /// doors answer 408).
    #[serde(default = "default_header_timeout")]
    pub body_timeout_ms: u64,
    /// A second address serving only `/metrics`, `/healthz` and `/readyz` (its own 64
    /// connections): point liveness and readiness probes and Prometheus there, so clients that
    /// fill `http.listen`'s connections do not fail the probes (and restart the instance).
    /// Overridden by `SWITCHYARD_HTTP_ADMIN_LISTEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
}

fn default_max_connections() -> usize {
    1024
}
fn default_header_timeout() -> u64 {
    30_000
}

fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_listen(),
            metrics_token: None,
            users: Vec::new(),
            proxy_user_header: None,
            inbox: inbox::InboxConfig::default(),
            ingest: ingest::IngestConfig::default(),
            max_connections: default_max_connections(),
            header_timeout_ms: default_header_timeout(),
            body_timeout_ms: default_header_timeout(),
            admin_listen: None,
        }
    }
}

/// How long a stage may go without progress, while it reports errors or holds records, before it
/// counts as stuck.
pub const STALL_MS: i64 = 60_000;

/// What readiness is made of; updated by the health checker and the stages.
#[derive(Default)]
pub struct Health {
    pub kafka_ok: AtomicBool,
    pub redis_ok: AtomicBool,
    /// The process's Redis connection: lost state (its epoch marker gone) is read from it live.
    pub redis: Option<crate::store::RedisConn>,
    pub stages: Vec<(&'static str, Arc<StageHealth>)>,
}

impl Health {
    /// Reasons the process is not ready; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.kafka_ok.load(Ordering::Relaxed) {
            why.push("kafka unreachable".to_string());
        }
        if !self.redis_ok.load(Ordering::Relaxed) {
            why.push("redis unreachable".to_string());
        }
        if self.redis.as_ref().is_some_and(|r| r.is_lost()) {
            why.push("redis lost its state: run `switchyard recover`".to_string());
        }
        let now = chrono::Utc::now().timestamp_millis();
        for (name, s) in &self.stages {
            if !s.running.load(Ordering::Relaxed) {
                why.push(format!("stage {name} not running"));
            } else if !s.joined.load(Ordering::Relaxed) {
                why.push(format!(
                    "stage {name} has not joined its consumer group yet"
                ));
            } else if let Some(stuck) = s.stuck(now, STALL_MS) {
                why.push(format!("stage {name} makes no progress: {stuck}"));
            }
        }
        why
    }
}

/// What the server's own routes need.
#[derive(Clone)]
struct Server {
    health: Arc<Health>,
    /// When set, the only bearer token `/metrics` answers.
    metrics_auth: Option<Arc<auth::Auth>>,
}

async fn metrics(State(s): State<Server>, headers: axum::http::HeaderMap) -> Response {
    if let Some(a) = &s.metrics_auth {
        if let Err(e) = a.authenticate(&headers) {
            let code = match e {
                auth::AuthError::Ambiguous => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNAUTHORIZED,
            };
            return (code, format!("{e}\n")).into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        METRICS.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Server>) -> impl IntoResponse {
    let why = s.health.not_ready();
    if why.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join("; ")),
        )
    }
}

/// The routes; extra routes (the approvals API) are merged in by the caller.
pub fn router(health: Arc<Health>, metrics_token: Option<&crate::secret::Secret>) -> Router {
    let metrics_auth = metrics_token
        .filter(|t| !t.is_empty())
        .map(|t| Arc::new(auth::Auth::new(&[], Some(t))));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Server {
            health,
            metrics_auth,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_without_progress_is_not_ready() {
        let h = Health::default();
        h.kafka_ok.store(true, Ordering::Relaxed);
        h.redis_ok.store(true, Ordering::Relaxed);
        let s = Arc::new(StageHealth::default());
        s.running.store(true, Ordering::Relaxed);
        let h0 = Health {
            stages: vec![("route", s.clone())],
            kafka_ok: AtomicBool::new(true),
            redis_ok: AtomicBool::new(true),
            ..Health::default()
        };
        assert!(h0.not_ready()[0].contains("has not joined its consumer group"));
        // Joined with no partition (more members than partitions): standing by, ready.
        s.joined.store(true, Ordering::Relaxed);
        assert!(h0.not_ready().is_empty(), "{:?}", h0.not_ready());
        s.assigned.store(3, Ordering::Relaxed);
        let h = Health {
            stages: vec![("route", s.clone())],
            ..h
        };
        let now = chrono::Utc::now().timestamp_millis();
        s.last_progress_ms.store(now - 1000, Ordering::Relaxed);
        assert!(h.not_ready().is_empty());
        // Consumer errors for two minutes and nothing read (a record it cannot fetch).
        s.last_progress_ms.store(now - 120_000, Ordering::Relaxed);
        s.error_streak_ms.store(now - 90_000, Ordering::Relaxed);
        s.last_error_ms.store(now - 500, Ordering::Relaxed);
        let why = h.not_ready();
        assert!(
            why[0].contains("makes no progress: consumer errors"),
            "{why:?}"
        );
        // An error now and then is not a stall.
        s.error_streak_ms.store(now - 500, Ordering::Relaxed);
        assert!(h.not_ready().is_empty());
        s.progress();
        // Records in flight and none finished for a long time.
        s.last_error_ms.store(0, Ordering::Relaxed);
        s.in_flight.store(5, Ordering::Relaxed);
        s.last_progress_ms
            .store(now - 3 * STALL_MS, Ordering::Relaxed);
        assert!(h.not_ready()[0].contains("5 records in flight"));
        // Idle (nothing in flight, no errors) is ready however long it has been.
        s.in_flight.store(0, Ordering::Relaxed);
        assert!(h.not_ready().is_empty());
    }
}
