//! The agent inbox: a web page for the people who decide what agents proposed (`/inbox`).
//!
//! Server-rendered HTML (minijinja templates and one small script, compiled into the binary):
//!
//! - `GET /inbox`: open approvals of the tenants the user sees, with filters (tenant, agent,
//!   action, impact, resource, age) and counts; live updates by server-sent events
//!   (`GET /inbox/events`);
//! - `GET /inbox/approvals/{id}`: the proposal and its parameters, the agent's reason, the rule
//!   that asked for a person, the resource's shared context now (and a warning when the resource
//!   moved since the proposal), what the budgets that apply have spent, the resource's recent
//!   history from the audit trail (`…/history`, fetched by the page), and the decision;
//! - `POST /inbox/approvals/{id}/approve|reject|edit|respond`: decide (approver role): approve,
//!   reject with a reason, edit the parameters and approve (checked again by resolve and
//!   governance), or respond with a comment the agent gets as a new task.
//!
//! Who is calling: a trusted proxy's header (`http.proxy_user_header`), a bearer token, or a
//! session made by signing in with a user's token (`POST /inbox/login`; the session id lives in an
//! HttpOnly, SameSite=Strict cookie and, hashed, in Redis, so every instance knows it and signing
//! out ends it everywhere). The token is never put in a URL. Form posts carry a CSRF token that
//! must equal a cookie only this origin can set (double submit), and a foreign `Origin` is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::auth::{Auth, AuthError, Identity, Role};
use crate::context::redis::RedisStore;
use crate::context::ContextStore;
use crate::governance::amend::Answer;
use crate::governance::approvals::{ApprovalError, Approvals, Decision};
use crate::governance::budgets::{Budgets, Spender};
use crate::kafka::Producer;
use crate::records::ApprovalData;
use crate::store::{RedisConn, ResourceKey};

/// The `http.inbox` config section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    /// Serve `/inbox` (when `http.enabled`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long a sign-in lasts.
    #[serde(default = "default_session_minutes")]
    pub session_minutes: u64,
    /// Mark cookies `Secure` (set it when people reach the inbox over HTTPS, e.g. behind a proxy).
    #[serde(default)]
    pub secure_cookies: bool,
    /// How far back the detail page reads the resource's history from the audit trail.
    #[serde(default = "default_history_hours")]
    pub history_hours: u64,
}

fn yes() -> bool {
    true
}
fn default_session_minutes() -> u64 {
    12 * 60
}
fn default_history_hours() -> u64 {
    24
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            enabled: true,
            session_minutes: default_session_minutes(),
            secure_cookies: false,
            history_hours: default_history_hours(),
        }
    }
}

const SESSION_COOKIE: &str = "switchyard_session";
const CSRF_COOKIE: &str = "switchyard_csrf";
/// The most open approvals one page lists.
const LIST_LIMIT: usize = 1000;
/// The most history lines the detail page shows.
const HISTORY_LINES: usize = 30;
/// A resource's history records kept per read (the newest; the count and model cost cover all).
const HISTORY_KEPT: usize = 1000;

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    for (name, text) in [
        ("layout.html", include_str!("inbox/layout.html")),
        ("login.html", include_str!("inbox/login.html")),
        ("list.html", include_str!("inbox/list.html")),
        ("detail.html", include_str!("inbox/detail.html")),
        ("history.html", include_str!("inbox/history.html")),
        ("message.html", include_str!("inbox/message.html")),
    ] {
        if let Err(e) = env.add_template(name, text) {
            tracing::error!(template = name, error = %e, "An inbox template does not compile.");
        }
    }
    env
});

/// Bounds on the inbox's heavier work, so one viewer cannot exhaust the process.
#[derive(Debug)]
pub struct Gates {
    /// History reads (each reads the audit topic over `history_hours`) at once.
    history: Arc<tokio::sync::Semaphore>,
    /// Live-update streams open now.
    streams: std::sync::atomic::AtomicUsize,
    /// ... per user (at most [`MAX_STREAMS_PER_USER`] each, so one user cannot take them all).
    per_user: std::sync::Mutex<HashMap<String, usize>>,
    /// Cancelled when the process stops: live-update streams end (else a graceful stop waited
    /// for every open inbox tab).
    stop: tokio_util::sync::CancellationToken,
}

impl Gates {
    /// Gates whose live-update streams end when `stop` is cancelled.
    pub fn until(stop: tokio_util::sync::CancellationToken) -> Self {
        Gates {
            stop,
            ..Default::default()
        }
    }
}

/// Live-update streams one user may have open at once (tabs, reconnects).
const MAX_STREAMS_PER_USER: usize = 8;

/// History reads at once.
const HISTORY_AT_ONCE: usize = 2;
/// Live-update streams at once (each reads the open approvals every 2 s).
const MAX_STREAMS: usize = 256;

impl Default for Gates {
    fn default() -> Self {
        Gates {
            history: Arc::new(tokio::sync::Semaphore::new(HISTORY_AT_ONCE)),
            streams: Default::default(),
            per_user: Default::default(),
            stop: Default::default(),
        }
    }
}

/// What the inbox needs.
#[derive(Clone)]
pub struct Inbox {
    pub gates: Arc<Gates>,
    pub approvals: Arc<Approvals>,
    pub producer: Producer,
    pub auth: Arc<Auth>,
    pub redis: RedisConn,
    pub context: Arc<RedisStore>,
    pub budgets: Arc<Budgets>,
    pub settings: Arc<Settings>,
}

/// The settings the inbox reads (from the config: `http.inbox`, and where the audit trail is).
#[derive(Debug, Clone)]
pub struct Settings {
    pub inbox: InboxConfig,
    pub proxy_user_header: Option<String>,
    /// `governance.approvals.public_url`.
    pub public_url: Option<String>,
    pub key_prefix: String,
    pub kafka: crate::kafka::config::KafkaConfig,
    pub audit_topic: String,
    pub schemas: crate::schema::SchemaRegistry,
}

impl Inbox {
    fn config(&self) -> &InboxConfig {
        &self.settings.inbox
    }

    fn public_url(&self) -> Option<&str> {
        self.settings.public_url.as_deref()
    }

    fn session_key(&self, sid: &str) -> String {
        format!(
            "{}inbox:session:{}",
            self.settings.key_prefix,
            hex::encode(Sha256::digest(sid.as_bytes()))
        )
    }
}

/// How the caller was recognised: a browser's (session or proxy) posts need a CSRF token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Bearer,
    Browser,
}

/// The value of cookie `name`, when sent once.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut found = None;
    for v in headers.get_all(header::COOKIE) {
        for part in v.to_str().unwrap_or("").split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == name {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(val.to_string());
                }
            }
        }
    }
    found
}

/// A random hex string (two v4 UUIDs: 244 random bits from the OS).
fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

enum Caller {
    Known(Identity, Via),
    /// Not signed in: the login page.
    Anonymous,
    Refused(Response),
}

async fn caller(inbox: &Inbox, headers: &HeaderMap) -> Caller {
    if let Some(who) = inbox.auth.proxy_user(headers) {
        return match who {
            Ok(w) => Caller::Known(w, Via::Browser),
            Err(e) => Caller::Refused(page_error(StatusCode::FORBIDDEN, &e.to_string())),
        };
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return match inbox.auth.authenticate(headers) {
            Ok(w) => Caller::Known(w, Via::Bearer),
            Err(AuthError::Disabled) => Caller::Refused(page_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &AuthError::Disabled.to_string(),
            )),
            Err(e) => Caller::Refused(page_error(StatusCode::UNAUTHORIZED, &e.to_string())),
        };
    }
    let Some(sid) = cookie(headers, SESSION_COOKIE) else {
        return Caller::Anonymous;
    };
    let stored: Option<String> = match inbox.redis.get().await {
        Ok(mut c) => match c.get(inbox.session_key(&sid)).await {
            Ok(n) => n,
            Err(e) => return Caller::Refused(unavailable(&e.to_string())),
        },
        Err(e) => return Caller::Refused(unavailable(&e.to_string())),
    };
    // `name digest`: the session ends when the user's token changes.
    let who = stored.as_deref().and_then(|v| {
        // The digest has no space; a user's name may.
        let (name, digest) = v.rsplit_once(' ')?;
        inbox.auth.user_with_digest(name, digest)
    });
    match who {
        Some(w) => Caller::Known(w, Via::Browser),
        None => Caller::Anonymous,
    }
}

/// A 503 page for a store (Redis, or the audit topic) that failed: the detail is logged under a
/// short reference the page names, never shown (see `auth::store_unavailable`).
fn unavailable(e: &str) -> Response {
    let reference = super::auth::logged("the inbox", e);
    super::auth::retry_later(page_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "the inbox cannot reach its store (reference {reference} in switchyard's log); retry"
        ),
    ))
}

/// Security headers every inbox answer carries.
fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn render(code: StatusCode, name: &str, ctx: Value) -> Response {
    let body = TEMPLATES
        .get_template(name)
        .and_then(|t| t.render(minijinja::value::Serde(&ctx)));
    match body {
        Ok(b) => harden(
            (
                code,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                b,
            )
                .into_response(),
        ),
        Err(e) => {
            tracing::error!(template = name, error = %e, "Rendering an inbox page failed.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered\n",
            )
                .into_response()
        }
    }
}

fn page_error(code: StatusCode, message: &str) -> Response {
    render(
        code,
        "message.html",
        json!({"title": code.canonical_reason().unwrap_or("Error"), "message": message}),
    )
}

/// The CSRF cookie of the request, or a new one to set.
fn csrf_of(headers: &HeaderMap) -> (String, bool) {
    match cookie(headers, CSRF_COOKIE).filter(|c| c.len() == 64) {
        Some(c) => (c, false),
        None => (random_hex(), true),
    }
}

fn cookie_header(inbox: &Inbox, name: &str, value: &str, max_age: u64, http_only: bool) -> String {
    format!(
        "{name}={value}; Path=/inbox; Max-Age={max_age}; SameSite=Strict{}{}",
        if http_only { "; HttpOnly" } else { "" },
        if inbox.config().secure_cookies {
            "; Secure"
        } else {
            ""
        }
    )
}

/// A page for a signed-in user, with the CSRF cookie set when it was missing.
fn page(
    inbox: &Inbox,
    headers: &HeaderMap,
    code: StatusCode,
    name: &str,
    mut ctx: Value,
) -> Response {
    let (csrf, fresh) = csrf_of(headers);
    ctx["csrf"] = json!(csrf);
    let mut r = render(code, name, ctx);
    if fresh {
        if let Ok(v) = HeaderValue::from_str(&cookie_header(
            inbox,
            CSRF_COOKIE,
            &csrf,
            inbox.config().session_minutes * 60,
            true,
        )) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// Refuses a browser's form post without the right CSRF token or from another origin.
#[allow(clippy::result_large_err)]
fn check_csrf(
    headers: &HeaderMap,
    via: Via,
    form_token: &str,
    public_url: Option<&str>,
) -> Result<(), Response> {
    if via == Via::Bearer {
        return Ok(());
    }
    if !super::auth::same_origin(headers, public_url) {
        return Err(page_error(
            StatusCode::FORBIDDEN,
            "this form was posted from another site",
        ));
    }
    match cookie(headers, CSRF_COOKIE) {
        Some(c)
            if !form_token.is_empty()
                && crate::secret::constant_time_eq(c.as_bytes(), form_token.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(page_error(
            StatusCode::FORBIDDEN,
            "the form's security token is missing or stale: reload the page and try again",
        )),
    }
}

fn user_json(who: &Identity) -> Value {
    json!({"name": who.name, "role": format!("{:?}", who.role).to_lowercase(),
           "tenants": who.tenants, "can_decide": who.can(Role::Approver)})
}

// ---- sign in and out ----

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn login_page(State(inbox): State<Inbox>, headers: HeaderMap) -> Response {
    page(
        &inbox,
        &headers,
        StatusCode::OK,
        "login.html",
        json!({"proxy": inbox.settings.proxy_user_header}),
    )
}

async fn login(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if let Err(r) = check_csrf(&headers, Via::Browser, &f.csrf, inbox.public_url()) {
        return r;
    }
    let mut h = HeaderMap::new();
    let bearer = format!("Bearer {}", f.token.trim());
    match HeaderValue::from_str(&bearer) {
        Ok(v) => {
            h.insert(header::AUTHORIZATION, v);
        }
        Err(_) => return sign_in_again(&inbox, &headers, "that token is not valid"),
    }
    let who = match inbox.auth.authenticate(&h) {
        Ok(w) if w.shared => {
            return sign_in_again(
                &inbox,
                &headers,
                "the shared approvals token cannot say who decides: sign in with your own user's token (http.users)",
            )
        }
        Ok(w) => w,
        Err(AuthError::Disabled) => {
            return page_error(StatusCode::SERVICE_UNAVAILABLE, &AuthError::Disabled.to_string())
        }
        Err(_) => return sign_in_again(&inbox, &headers, "unknown token"),
    };
    let sid = random_hex();
    let ttl = inbox.config().session_minutes.max(1) * 60;
    let stored: Result<(), String> = async {
        let mut c = inbox.redis.get().await.map_err(|e| e.to_string())?;
        let value = format!(
            "{} {}",
            who.name,
            hex::encode(Sha256::digest(f.token.trim().as_bytes()))
        );
        c.set_ex::<_, _, ()>(inbox.session_key(&sid), value, ttl)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = stored {
        return unavailable(&e);
    }
    tracing::info!(user = %who.name, "Signed in to the inbox.");
    let mut r = Redirect::to("/inbox").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie_header(&inbox, SESSION_COOKIE, &sid, ttl, true)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    harden(r)
}

fn sign_in_again(inbox: &Inbox, headers: &HeaderMap, why: &str) -> Response {
    page(
        inbox,
        headers,
        StatusCode::UNAUTHORIZED,
        "login.html",
        json!({"error": why, "proxy": inbox.settings.proxy_user_header}),
    )
}

async fn logout(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if let Err(r) = check_csrf(&headers, Via::Browser, &f.csrf, inbox.public_url()) {
        return r;
    }
    if let Some(sid) = cookie(&headers, SESSION_COOKIE) {
        if let Ok(mut c) = inbox.redis.get().await {
            let _: Result<(), _> = c.del(inbox.session_key(&sid)).await;
        }
    }
    let mut r = Redirect::to("/inbox").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie_header(&inbox, SESSION_COOKIE, "", 0, true)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    harden(r)
}

// ---- the list ----

#[derive(Debug, Default, Deserialize, Serialize)]
struct Filters {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    impact: String,
    #[serde(default)]
    resource: String,
    /// At least this many minutes old.
    #[serde(default)]
    min_age: String,
}

/// One open approval as the list shows it.
fn row(a: &ApprovalData, now: i64) -> Value {
    let rec = &a.action_record;
    json!({
        "id": a.approval_id, "action": a.action, "resource": a.resource, "tenant": a.tenant,
        "status": a.status, "agents": rec["agents"], "agent": rec["agents"][0],
        "impact": rec["impact"], "reason": rec["reason"], "priority": rec["priority"],
        "age": human_secs(now - a.requested_at), "age_secs": now - a.requested_at,
        "expires_in": human_secs(a.expires_at - now), "group": a.group, "level": a.level,
        "rule": a.rule,
    })
}

fn human_secs(s: i64) -> String {
    let s = s.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Open approvals the caller sees, at most [`LIST_LIMIT`].
async fn visible(inbox: &Inbox, who: &Identity) -> Result<Vec<ApprovalData>, ApprovalError> {
    let sees = |t: &str| who.sees(t);
    Ok(inbox
        .approvals
        .list(&sees, None, None, LIST_LIMIT)
        .await?
        .approvals)
}

fn count_by(rows: &[Value], field: &str) -> Vec<(String, usize)> {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for r in rows {
        *m.entry(r[field].as_str().unwrap_or("-").to_string())
            .or_default() += 1;
    }
    m.into_iter().collect()
}

async fn list(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Query(f): Query<Filters>,
) -> Response {
    let who = match caller(&inbox, &headers).await {
        Caller::Known(w, _) => w,
        Caller::Anonymous => return login_page(State(inbox), headers).await,
        Caller::Refused(r) => return r,
    };
    let open = match visible(&inbox, &who).await {
        Ok(o) => o,
        Err(e) => return unavailable(&e.to_string()),
    };
    let now = crate::event::now_secs();
    let all: Vec<Value> = open.iter().map(|a| row(a, now)).collect();
    let min_age: i64 = f
        .min_age
        .trim()
        .parse::<i64>()
        .unwrap_or(0)
        .saturating_mul(60);
    let keep = |r: &&Value| {
        let is = |field: &str, want: &str| want.is_empty() || r[field].as_str() == Some(want);
        is("tenant", &f.tenant)
            && is("agent", &f.agent)
            && is("action", &f.action)
            && is("impact", &f.impact)
            && (f.resource.is_empty()
                || r["resource"]
                    .as_str()
                    .is_some_and(|x| x.contains(f.resource.as_str())))
            && r["age_secs"].as_i64().unwrap_or(0) >= min_age
    };
    let shown: Vec<Value> = all.iter().filter(keep).cloned().collect();
    let escalated = all.iter().filter(|r| r["status"] == "escalated").count();
    page(
        &inbox,
        &headers,
        StatusCode::OK,
        "list.html",
        json!({
            "user": user_json(&who), "rows": shown, "filters": f, "total": all.len(),
            "shown": shown.len(), "escalated": escalated,
            "by_tenant": count_by(&all, "tenant"), "by_action": count_by(&all, "action"),
            "by_agent": count_by(&all, "agent"), "by_impact": count_by(&all, "impact"),
            "digest": digest(&open),
        }),
    )
}

/// A digest of the open approvals' ids and statuses: the page reloads when it changes.
fn digest(open: &[ApprovalData]) -> String {
    let mut h = Sha256::new();
    for a in open {
        h.update(a.approval_id.as_bytes());
        h.update(b":");
        h.update(a.status.as_bytes());
        h.update(b";");
    }
    hex::encode(&h.finalize()[..8])
}

// ---- live updates ----

/// Counts an open live-update stream (in all, and its user's); uncounted when the stream ends
/// (the client went away).
struct StreamSlot(Arc<Gates>, String);

impl StreamSlot {
    /// A slot for `user`'s new stream, unless they have [`MAX_STREAMS_PER_USER`] open.
    fn take(gates: &Arc<Gates>, user: &str) -> Option<StreamSlot> {
        let mut per = gates.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry(user.to_string()).or_default();
        if *n >= MAX_STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        gates
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(StreamSlot(gates.clone(), user.to_string()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut per = self.0.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}

async fn events(State(inbox): State<Inbox>, headers: HeaderMap) -> Response {
    use std::sync::atomic::Ordering;
    let who = match caller(&inbox, &headers).await {
        Caller::Known(w, _) => w,
        Caller::Anonymous => return page_error(StatusCode::UNAUTHORIZED, "sign in first"),
        Caller::Refused(r) => return r,
    };
    let slot = if inbox.gates.streams.load(Ordering::Relaxed) >= MAX_STREAMS {
        None
    } else {
        StreamSlot::take(&inbox.gates, &who.name)
    };
    let Some(slot) = slot else {
        return super::auth::retry_later(page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live-update streams are open; the page still works when reloaded",
        ));
    };
    let stream = futures::stream::unfold(
        (inbox, headers, who, String::new(), slot),
        |(inbox, headers, who, last, slot)| async move {
            let mut first = last.is_empty();
            loop {
                if !first {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = inbox.gates.stop.cancelled() => return None,
                    }
                    // The stream ends with the sign-in (signed out, expired, token or role
                    // changed, scope narrowed).
                    match caller(&inbox, &headers).await {
                        Caller::Known(w, _) if w == who => {}
                        _ => return None,
                    }
                }
                first = false;
                let Ok(open) = visible(&inbox, &who).await else {
                    continue;
                };
                let d = digest(&open);
                if d != last {
                    let ids: Vec<&str> = open.iter().map(|a| a.approval_id.as_str()).collect();
                    let ev = Event::default()
                        .event("approvals")
                        .data(json!({"digest": d, "open": ids.len(), "ids": ids}).to_string());
                    return Some((
                        Ok::<_, std::convert::Infallible>(ev),
                        (inbox, headers, who, d, slot),
                    ));
                }
            }
        },
    );
    harden(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

// ---- one approval ----

#[derive(Deserialize, Default)]
struct DetailQuery {
    #[serde(default)]
    done: String,
}

async fn detail(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let who = match caller(&inbox, &headers).await {
        Caller::Known(w, _) => w,
        Caller::Anonymous => return login_page(State(inbox), headers).await,
        Caller::Refused(r) => return r,
    };
    let notice = match q.done.as_str() {
        d @ ("approved" | "rejected" | "superseded") => {
            Some(format!("Your decision was recorded: {d}."))
        }
        _ => None,
    };
    show(&inbox, &headers, &who, &id, StatusCode::OK, notice, None).await
}

/// The detail page; `conflict` names who decided first when a decision came too late.
async fn show(
    inbox: &Inbox,
    headers: &HeaderMap,
    who: &Identity,
    id: &str,
    code: StatusCode,
    notice: Option<String>,
    problem: Option<String>,
) -> Response {
    // The approval, and the resource now (its fencing token), in one read.
    let found = match inbox.approvals.key_of(id).await {
        Ok(key) => inbox.approvals.load_approval(&key, id).await,
        Err(e) => Err(e),
    };
    let (token, s) = match found {
        Ok((record, s)) if who.sees(&s.approval.tenant) => (record.token, s),
        Ok(_) | Err(ApprovalError::NotFound(_)) => {
            return page_error(StatusCode::NOT_FOUND, &format!("no approval {id}"))
        }
        Err(e) => return unavailable(&e.to_string()),
    };
    let a = &s.approval;
    let key = ResourceKey::new(a.tenant.clone(), a.resource.clone());
    let now = crate::event::now_secs();
    let snap = match inbox.context.snapshot(&key).await {
        Ok(s) => s,
        Err(e) => return unavailable(&e.to_string()),
    };
    let mut moved = Vec::new();
    if let Some(seen) = &s.seen {
        if token > seen.token {
            moved.push(format!(
                "actions went out on {} since this was proposed (fencing token {} → {})",
                a.resource, seen.token, token
            ));
        }
        let changed: Vec<&str> = snap
            .key_versions
            .iter()
            .filter(|(_, v)| **v > seen.context_version)
            .map(|(k, _)| k.as_str())
            .collect();
        if !changed.is_empty() {
            moved.push(format!(
                "the shared context changed since the agent read it (version {} → {}): {}",
                seen.context_version,
                snap.version,
                changed.join(", ")
            ));
        }
    }
    let facts: Vec<Value> = snap
        .facts
        .iter()
        .map(|(k, f)| {
            json!({"key": k, "value": pretty(&f.value), "by": f.by, "at": f.at,
                   "version": snap.key_versions.get(k)})
        })
        .collect();
    let act = &s.action;
    let agents: Vec<String> = act
        .agents
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let agent = agents.first().cloned().unwrap_or_default();
    let spender = Spender {
        agent: &agent,
        workflow: &act.workflow_id,
        tenant: &a.tenant,
        model: "",
    };
    let budgets = inbox.budgets.standing(&spender).await.unwrap_or_default();
    let open = matches!(a.status.as_str(), "pending" | "escalated");
    let may_not = crate::governance::approvals::may_decide(&who.decider(), a).err();
    let amend = s
        .amend
        .as_ref()
        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null));
    let rec = serde_json::to_value(a).unwrap_or(Value::Null);
    page(
        inbox,
        headers,
        code,
        "detail.html",
        json!({
            "user": user_json(who), "a": rec, "open": open,
            "can_decide": open && who.can(Role::Approver) && !who.shared && may_not.is_none(),
            "may_not": may_not,
            "amendable": crate::governance::amend::amendable(&s),
            "parameters": pretty(&act.parameters), "agents": agents, "impact": act.impact,
            "priority": act.priority, "reason": act.reason, "workflow_id": act.workflow_id,
            "proposals": act.proposals, "moved": moved, "facts": facts,
            "context_version": snap.version, "budgets": budgets,
            "requested": human_secs(now - a.requested_at), "expires_in": human_secs(a.expires_at - now),
            "amend": amend, "notice": notice, "problem": problem,
            "rule": rec.get("rule"), "confidence": rec.get("confidence"),
            "group": rec.get("group"), "level": rec.get("level"),
        }),
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

async fn history(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let who = match caller(&inbox, &headers).await {
        Caller::Known(w, _) => w,
        Caller::Anonymous => return page_error(StatusCode::UNAUTHORIZED, "sign in first"),
        Caller::Refused(r) => return r,
    };
    let a = match inbox.approvals.get(&id).await {
        Ok(Some(s)) if who.sees(&s.approval.tenant) => s.approval,
        Ok(_) => return page_error(StatusCode::NOT_FOUND, &format!("no approval {id}")),
        Err(e) => return unavailable(&e.to_string()),
    };
    // The permit goes with the read, not the request: a client that gives up does not stop the
    // read, so it must not free the place for another before the read ends.
    let Ok(permit) = inbox.gates.history.clone().try_acquire_owned() else {
        return page_error(
            StatusCode::TOO_MANY_REQUESTS,
            "other history reads are running; try again in a moment",
        );
    };
    let since =
        chrono::Utc::now().timestamp_millis() - inbox.config().history_hours as i64 * 3_600_000;
    let l = inbox.settings.clone();
    let (resource, tenant) = (a.resource.clone(), a.tenant.clone());
    // Only the resource's records are kept (each other one decoded and dropped), the newest
    // HISTORY_KEPT of them; the model cost is summed over all.
    let cost = Arc::new(std::sync::Mutex::new(0.0f64));
    let summed = cost.clone();
    let read = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        crate::audit::story::audit_since_where(
            &l.kafka,
            &l.audit_topic,
            &l.schemas,
            since,
            |d| {
                let mine = d["resource"] == resource.as_str() && d["tenant"] == tenant.as_str();
                if mine && d["decision"] == "llm_call" {
                    if let Some(c) = d["detail"]["cost"].as_f64() {
                        *summed.lock().unwrap_or_else(|e| e.into_inner()) += c;
                    }
                }
                mine
            },
            HISTORY_KEPT,
        )
    })
    .await;
    let (mine, total) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return unavailable(&e),
        Err(e) => return unavailable(&e.to_string()),
    };
    let model_cost: f64 = *cost.lock().unwrap_or_else(|e| e.into_inner());
    let first = mine.first().and_then(|(ev, _)| ev.time.clone());
    let lines: Vec<Value> = mine
        .iter()
        .rev()
        .take(HISTORY_LINES)
        .map(|(ev, d)| crate::audit::story::line(first.as_deref(), ev, d))
        .collect();
    render(
        StatusCode::OK,
        "history.html",
        json!({"lines": lines, "total": total, "hours": inbox.config().history_hours,
               "model_cost": model_cost, "resource": a.resource}),
    )
}

// ---- deciding ----

#[derive(Deserialize, Default)]
struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    why: String,
    #[serde(default)]
    parameters: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    context_version: Option<u64>,
}

async fn decide(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    Form(f): Form<DecideForm>,
) -> Response {
    let (who, via) = match caller(&inbox, &headers).await {
        Caller::Known(w, v) => (w, v),
        Caller::Anonymous => return page_error(StatusCode::UNAUTHORIZED, "sign in first"),
        Caller::Refused(r) => return r,
    };
    if let Err(r) = check_csrf(&headers, via, &f.csrf, inbox.public_url()) {
        return r;
    }
    if !who.can(Role::Approver) || who.shared {
        return page_error(
            StatusCode::FORBIDDEN,
            &format!(
                "{} may look but not decide (needs the approver role)",
                who.name
            ),
        );
    }
    let stored = match inbox.approvals.get(&id).await {
        Ok(Some(s)) if who.sees(&s.approval.tenant) => s,
        Ok(_) => return page_error(StatusCode::NOT_FOUND, &format!("no approval {id}")),
        Err(e) => return unavailable(&e.to_string()),
    };
    let by = who.name.clone();
    let allowed = |a: &ApprovalData| crate::governance::approvals::may_decide(&who.decider(), a);
    let answer = match verb.as_str() {
        "approve" => Ok(Answer::Approve { why: f.why }),
        "reject" if f.why.trim().is_empty() => {
            Err(ApprovalError::Invalid("a rejection needs a reason".into()))
        }
        "reject" => Ok(Answer::Reject { why: f.why }),
        "edit" => match serde_json::from_str::<Value>(&f.parameters) {
            Ok(parameters) => {
                // What the person saw, at most the context's version now (a larger one would
                // skip the staleness check).
                let key = ResourceKey::new(
                    stored.approval.tenant.clone(),
                    stored.approval.resource.clone(),
                );
                let now = match inbox.context.snapshot(&key).await {
                    Ok(snap) => snap.version,
                    Err(e) => return unavailable(&e.to_string()),
                };
                Ok(Answer::Edit {
                    parameters,
                    why: f.why,
                    context_version: f.context_version.map(|v| v.min(now)),
                })
            }
            Err(e) => Err(ApprovalError::Invalid(format!(
                "the edited parameters are not JSON: {e}"
            ))),
        },
        "respond" => Ok(Answer::Respond { comment: f.comment }),
        _ => return page_error(StatusCode::NOT_FOUND, "no such decision"),
    };
    let result = match answer {
        Ok(a) => inbox.approvals.answer(&id, &by, a, &allowed).await,
        Err(e) => Err(e),
    };
    let d: Decision = match result {
        Ok(d) => d,
        Err(ApprovalError::Invalid(m)) | Err(ApprovalError::TooLarge(m)) => {
            return show(
                &inbox,
                &headers,
                &who,
                &id,
                StatusCode::BAD_REQUEST,
                None,
                Some(m),
            )
            .await
        }
        Err(ApprovalError::NotFound(_)) => {
            return page_error(StatusCode::NOT_FOUND, &format!("no approval {id}"))
        }
        Err(ApprovalError::Forbidden(m)) => return page_error(StatusCode::FORBIDDEN, &m),
        Err(e) => return unavailable(&e.to_string()),
    };
    if let Err(m) = super::approvals::publish(&inbox.approvals, &inbox.producer, &id, &d).await {
        return super::auth::retry_later(page_error(StatusCode::SERVICE_UNAVAILABLE, &m));
    }
    if !d.fresh {
        let first = format!(
            "Not recorded: this approval was already decided — {} by {}{}.",
            d.approval.status,
            d.approval.decided_by.as_deref().unwrap_or("switchyard"),
            d.approval
                .why
                .as_deref()
                .filter(|w| !w.is_empty())
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
        return show(
            &inbox,
            &headers,
            &who,
            &id,
            StatusCode::CONFLICT,
            None,
            Some(first),
        )
        .await;
    }
    tracing::info!(approval_id = %id, user = %who.name, decision = %d.approval.status, "Decided in the inbox.");
    harden(
        Redirect::to(&format!("/inbox/approvals/{id}?done={}", d.approval.status)).into_response(),
    )
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, ty) = match name.as_str() {
        "inbox.js" => (
            include_str!("inbox/inbox.js"),
            "text/javascript; charset=utf-8",
        ),
        "inbox.css" => (include_str!("inbox/inbox.css"), "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    let mut r = ([(header::CONTENT_TYPE, ty)], body).into_response();
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The inbox routes.
pub fn router(inbox: Inbox) -> Router {
    Router::new()
        .route("/inbox", get(list))
        .route("/inbox/", get(|| async { Redirect::permanent("/inbox") }))
        .route("/inbox/login", post(login))
        .route("/inbox/logout", post(logout))
        .route("/inbox/events", get(events))
        .route("/inbox/assets/{name}", get(asset))
        .route("/inbox/approvals/{id}", get(detail))
        .route("/inbox/approvals/{id}/history", get(history))
        .route("/inbox/approvals/{id}/{verb}", post(decide))
        .with_state(inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_renders_escaped() {
        for name in [
            "layout.html",
            "login.html",
            "list.html",
            "detail.html",
            "history.html",
            "message.html",
        ] {
            assert!(TEMPLATES.get_template(name).is_ok(), "{name}");
        }
        let r = TEMPLATES
            .get_template("message.html")
            .and_then(|t| {
                t.render(minijinja::value::Serde(
                    json!({"title": "x", "message": "<script>alert(1)</script>"}),
                ))
            })
            .unwrap_or_default();
        assert!(
            r.contains("&lt;script&gt;") && !r.contains("<script>alert"),
            "{r}"
        );
    }

    #[test]
    fn cookies_are_read_once_and_exactly() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; switchyard_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "switchyard"), None);
        h.append(
            header::COOKIE,
            HeaderValue::from_static("switchyard_session=evil"),
        );
        assert_eq!(
            cookie(&h, SESSION_COOKIE),
            None,
            "a cookie sent twice is ignored"
        );
    }

    #[test]
    fn csrf_needs_the_cookie_and_the_same_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("inbox.example:9464"));
        let t = "a".repeat(64);
        assert!(check_csrf(&h, Via::Browser, &t, None).is_err(), "no cookie");
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{CSRF_COOKIE}={t}")).unwrap(),
        );
        assert!(check_csrf(&h, Via::Browser, &t, None).is_ok());
        assert!(
            check_csrf(&h, Via::Browser, "b", None).is_err(),
            "wrong token"
        );
        assert!(check_csrf(&h, Via::Browser, "", None).is_err(), "no token");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(
            check_csrf(&h, Via::Browser, &t, None).is_err(),
            "foreign origin"
        );
        assert!(
            check_csrf(&HeaderMap::new(), Via::Bearer, "", None).is_ok(),
            "bearer callers need none"
        );
    }
}
