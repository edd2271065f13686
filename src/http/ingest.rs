//! HTTP ingest: events from systems that speak HTTP rather than Kafka, written to an input topic
//! exactly as a Kafka producer would have written them.
//!
//! - `POST /v1/events`: the CloudEvents HTTP binding — structured (`application/cloudevents+json`),
//!   binary (`ce-*` headers, the body is the data) and batch (`application/cloudevents-batch+json`);
//! - `POST /v1/ingest/alertmanager`: the Prometheus Alertmanager webhook (version 4), one
//!   `sla.breached` / `sla.recovered` event per alert;
//! - `POST /v1/ingest/github`: GitHub `deployment_status` webhooks, signed with HMAC-SHA256, as
//!   `deployment.<state>` events.
//!
//! The first two take a bearer token of `http.ingest.tokens` (or the default token,
//! `SWITCHYARD_INGEST_TOKEN`); GitHub's requests are authenticated by their signature. Each event
//! goes to the input topic its type maps to (`http.ingest.topics`, `*` patterns), encoded as that
//! topic's definition says (structured JSON or Avro) and keyed by its subject. The answer is `202`
//! only once the broker acknowledged every record of the request.
//!
//! Idempotence: an event is taken once per (tenant, source, id) within `dedupe_seconds`. Its Redis
//! key (`<prefix>:ingest:seen:{<hash of tenant, source and id>}`, the default tenant's without it) is claimed as `pending:<request>` before producing
//! (for longer than the producer may take to deliver: its `message.timeout.ms` plus a minute) and set to `done` for the window once the broker acknowledged; a failed produce
//! deletes the claim, so a retry produces the event. A second request while the first is still
//! producing answers `409` (retry later); once it is done, `202` with `duplicate: true`.
//!
//! A request's records are queued in its order (a batch's events of one resource keep their order
//! on its partition), then their acknowledgements awaited together.
//!
//! Rate limit: a token bucket per token (`rate_per_minute` events, a minute's worth of burst),
//! shared by every instance through Redis ([`crate::gateway::limits::Limiter`], keys
//! `<prefix>:gw:bucket:{ingest/<token name>}:rpm`); a batch counts its events.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use super::auth::{Auth, AuthError, UserSpec};
use crate::codec::{self, RecordView, CONTENT_TYPE_HEADER};
use crate::event::CloudEvent;
use crate::gateway::limits::{Acquire, Bucket, Limiter};
use crate::kafka::{Notice, ProduceError, Producer};
use crate::pattern::{stable_id, TypePattern};
use crate::records::Emitter;
use crate::schema::SchemaRegistry;
use crate::secret::{Secret, SecretRef};
use crate::store::RedisConn;
use crate::telemetry::METRICS;

/// Content type of a structured CloudEvent.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Content type of a batch of structured CloudEvents.
pub const BATCH: &str = "application/cloudevents-batch+json";
/// The most events one batch request may carry (413 above).
pub const MAX_BATCH_EVENTS: usize = 1000;
/// The most wrong events a refusal lists.
const MAX_REPORTED: usize = 50;

/// The `http.ingest:` config section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Serve the ingest routes (without a token they answer 503).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Largest request body accepted (413 beyond).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a (source, id) pair is remembered: a repeat within it produces nothing.
    #[serde(default = "default_dedupe_seconds")]
    pub dedupe_seconds: u64,
    /// Events per minute per token (a batch counts its events); 0: no limit.
    #[serde(default = "default_rate_per_minute")]
    pub rate_per_minute: u64,
    /// The default token (named `default`). `SWITCHYARD_INGEST_TOKEN` overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Tokens of the systems that send events, each with its own name (its rate limit and log
    /// field): `{name, token}` or `{name, token_sha256}`.
    #[serde(default)]
    pub tokens: Vec<IngestToken>,
    /// Event type pattern → input topic. The most specific pattern wins: a literal type first, then
    /// the longest pattern.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// The Alertmanager webhook.
    #[serde(default)]
    pub alertmanager: AlertmanagerConfig,
    /// GitHub webhooks.
    #[serde(default)]
    pub github: GithubConfig,
}

/// A token of `http.ingest.tokens`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestToken {
    /// Who sends with this token (rate limit bucket, logs).
    pub name: String,
    /// The bearer token (a secret: prefer `token_sha256`, or the environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Hex SHA-256 of the bearer token (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// This sender's events per minute, instead of `http.ingest.rate_per_minute` (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u64>,
    /// The tenants this sender may send events for (patterns; default every tenant): an event of
    /// another tenant is refused (403), so one tenant's sender cannot start another's agents.
    #[serde(default = "every_tenant")]
    pub tenants: Vec<String>,
}

fn every_tenant() -> Vec<String> {
    vec!["*".into()]
}

/// `http.ingest.alertmanager`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// The alert label naming the resource (the events' subject).
    #[serde(default = "default_subject_label")]
    pub subject_label: String,
    /// An alert label naming the tenant (the `tenant` extension); none: the default tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_label: Option<String>,
    /// The events' `source`.
    #[serde(default = "default_am_source")]
    pub source: String,
    /// Input topic of these events; none: by `http.ingest.topics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

/// What a GitHub deployment event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GithubSubject {
    /// The repository's name (`payments` of `acme/payments`): one repository is one service.
    #[default]
    Repository,
    /// The deployment's environment (`production`).
    Environment,
}

/// `http.ingest.github`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The webhook secret (`{env: VAR}`, `{file: PATH}` or the value); none: the route answers 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
    /// The events' subject: `repository` (default) or `environment`.
    #[serde(default)]
    pub subject: GithubSubject,
    /// Input topic of these events; none: by `http.ingest.topics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_dedupe_seconds() -> u64 {
    86_400
}
fn default_rate_per_minute() -> u64 {
    6_000
}
fn default_subject_label() -> String {
    "service".into()
}
fn default_am_source() -> String {
    "alertmanager".into()
}

impl Default for IngestConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

impl IngestConfig {
    /// Problems of the section, as (item, message); `inputs` are the config's input topics.
    pub fn problems(&self, inputs: &[String]) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.max_body_bytes < 1024 {
            p.push((
                "http.ingest.max_body_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if self.dedupe_seconds == 0 {
            p.push((
                "http.ingest.dedupe_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(t) = &self.token {
            if t.expose().len() < 16 {
                p.push((
                    "http.ingest.token".into(),
                    "must be at least 16 characters".into(),
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let path = format!("http.ingest.tokens[{i}]");
            p.extend(t.as_user().problems(&path, false));
            if (t.name == "default" && self.token.is_some()) || t.name == "github" {
                p.push((
                    format!("{path}.name"),
                    format!(
                        "{:?} is reserved (default: http.ingest.token; github: the GitHub webhook)",
                        t.name
                    ),
                ));
            }
            if self.tokens[..i].iter().any(|o| o.name == t.name) {
                p.push((
                    format!("{path}.name"),
                    format!("{:?} is used by an earlier token", t.name),
                ));
            }
        }
        let input = |item: String, t: &str, p: &mut Vec<(String, String)>| {
            if !inputs.iter().any(|i| i == t) {
                p.push((item, format!("topic {t:?} is not one of topics.inputs")));
            }
        };
        for (pattern, topic) in &self.topics {
            if let Some(m) = crate::pattern::pattern_problem(pattern) {
                p.push((format!("http.ingest.topics.{pattern:?}"), m));
            }
            input(format!("http.ingest.topics.{pattern:?}"), topic, &mut p);
        }
        if self.alertmanager.subject_label.trim().is_empty() {
            p.push((
                "http.ingest.alertmanager.subject_label".into(),
                "must not be empty".into(),
            ));
        }
        if self.alertmanager.source.trim().is_empty() {
            p.push((
                "http.ingest.alertmanager.source".into(),
                "must not be empty".into(),
            ));
        }
        if let Some(t) = &self.alertmanager.topic {
            input("http.ingest.alertmanager.topic".into(), t, &mut p);
        }
        if let Some(t) = &self.github.topic {
            input("http.ingest.github.topic".into(), t, &mut p);
        }
        if let Some(SecretRef::Value(s)) = &self.github.secret {
            if s.is_empty() {
                p.push((
                    "http.ingest.github.secret".into(),
                    "must not be empty".into(),
                ));
            }
        }
        p
    }

    /// The input topic of an event type: a literal pattern first, then the longest matching one.
    pub fn topic_for(&self, ty: &str) -> Option<&str> {
        if let Some(t) = self.topics.get(ty) {
            return Some(t);
        }
        self.topics
            .iter()
            .filter(|(p, _)| TypePattern::new(p).matches(ty))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, t)| t.as_str())
    }

    /// Events per minute a sender may send (0: no limit).
    /// The tenants `sender` may send events for (every one for the default token).
    pub fn tenants_of(&self, sender: &str) -> Vec<String> {
        self.tokens
            .iter()
            .find(|t| t.name == sender)
            .map_or_else(every_tenant, |t| t.tenants.clone())
    }

    pub fn rate_of(&self, sender: &str) -> u64 {
        self.tokens
            .iter()
            .find(|t| t.name == sender)
            .and_then(|t| t.rate_per_minute)
            .unwrap_or(self.rate_per_minute)
    }

    /// The users [`Auth`] checks bearer tokens against (the default token is `default`).
    fn auth(&self) -> Auth {
        let mut users: Vec<UserSpec> = self.tokens.iter().map(IngestToken::as_user).collect();
        if let Some(t) = self.token.as_ref().filter(|t| !t.is_empty()) {
            users.push(
                IngestToken {
                    name: "default".into(),
                    token: Some(t.clone()),
                    token_sha256: None,
                    rate_per_minute: None,
                    tenants: every_tenant(),
                }
                .as_user(),
            );
        }
        Auth::new(&users, None)
    }
}

impl IngestToken {
    fn as_user(&self) -> UserSpec {
        UserSpec {
            name: self.name.clone(),
            token: self.token.clone(),
            token_sha256: self.token_sha256.clone(),
            roles: vec![super::auth::Role::Viewer],
            tenants: self.tenants.clone(),
            groups: Vec::new(),
        }
    }
}

/// The front door an event came through (the metric's `source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    CloudEvents,
    Alertmanager,
    Github,
}

impl Door {
    pub fn label(self) -> &'static str {
        match self {
            Door::CloudEvents => "cloudevents",
            Door::Alertmanager => "alertmanager",
            Door::Github => "github",
        }
    }

    /// The status telling this door's sender to try again later: a webhook sender retries only
    /// 5xx (Alertmanager drops an alert answered 429 or 409 until the group's next flush; GitHub
    /// retries nothing, but a 5xx shows as failed for redelivery), so those doors get 503 (with
    /// the same `Retry-After`) where a CloudEvents client gets 429 or 409.
    pub fn retryable(self, status: StatusCode) -> StatusCode {
        match self {
            Door::CloudEvents => status,
            Door::Alertmanager | Door::Github => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Outcomes counted by `switchyard_ingest_events_total` (requests refused before their events are
/// read count once).
pub const OUTCOMES: &[&str] = &[
    "accepted",
    "duplicate",
    "rejected",
    "unauthorized",
    "too_large",
    "rate_limited",
    "in_progress",
    "failed",
    "ignored",
];

fn count(door: Door, outcome: &str, n: usize) {
    METRICS
        .ingest_events
        .with_label_values(&[door.label(), outcome])
        .inc_by(n as u64);
}

/// A refused request: its status, message and, for a batch, what was wrong with which event.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// (index in the request, message) of each event that was wrong.
    pub events: Vec<(usize, String)>,
}

impl Refusal {
    /// A request refused whole for some of its `n` events (`wrong`: index and why): one event's
    /// reason, or "k of n events <what>" with each listed.
    fn listed(status: StatusCode, n: usize, wrong: Vec<(usize, String)>, what: &str) -> Self {
        if n == 1 {
            let message = wrong.into_iter().next().map(|w| w.1).unwrap_or_default();
            return Refusal::new(status, message);
        }
        Refusal {
            status,
            message: format!("{} of {n} events {what}; nothing was produced", wrong.len()),
            events: wrong,
        }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
            events: Vec::new(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn response(&self) -> Response {
        let mut body = json!({"error": self.message});
        if !self.events.is_empty() {
            body["events"] = self
                .events
                .iter()
                .map(|(i, e)| json!({"index": i, "error": e}))
                .collect();
        }
        (self.status, Json(body)).into_response()
    }
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Percent-decodes a binary-mode header value (CloudEvents HTTP binding, 3.1.3.2).
fn percent_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = std::str::from_utf8(&v[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// The events of a `POST /v1/events` request, by its mode: structured, batch or binary.
pub fn parse_cloudevents(
    headers: &HeaderMap,
    body: &[u8],
    schemas: &SchemaRegistry,
) -> Result<Vec<CloudEvent>, Refusal> {
    let media = media_type(headers);
    let one = |payload: &[u8], headers: &[(String, Vec<u8>)]| {
        codec::decode(
            RecordView {
                key: None,
                payload,
                headers,
            },
            schemas,
        )
        .map_err(|e| match e {
            codec::DecodeError::MissingResource => {
                "attribute subject is missing: it names the resource the event is about".to_string()
            }
            e => e.to_string(),
        })
    };
    if media == BATCH {
        codec::check_json_depth(body, codec::MAX_DEPTH).map_err(|e| Refusal::bad(e.to_string()))?;
        let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(body)
            .map_err(|e| Refusal::bad(format!("batch is not a JSON array of events: {e}")))?;
        if items.is_empty() {
            return Err(Refusal::bad("batch is empty"));
        }
        if items.len() > MAX_BATCH_EVENTS {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "batch has {} events; at most {MAX_BATCH_EVENTS} per request",
                    items.len()
                ),
            ));
        }
        let mut events = Vec::with_capacity(items.len());
        let mut wrong = Vec::new();
        for (i, raw) in items.iter().enumerate() {
            match one(raw.get().as_bytes(), &[]) {
                Ok(ev) => events.push(ev),
                Err(e) => wrong.push((i, e)),
            }
        }
        if !wrong.is_empty() {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "{} of {} events in the batch are not valid CloudEvents; nothing was produced",
                    wrong.len(),
                    items.len()
                ),
                // The first ones name the problem; all of them could be a larger body than sent.
                events: wrong.into_iter().take(MAX_REPORTED).collect(),
            });
        }
        return Ok(events);
    }
    if media == STRUCTURED {
        return one(body, &[]).map(|e| vec![e]).map_err(Refusal::bad);
    }
    if headers.contains_key("ce-specversion") {
        // Binary mode: the same attributes as Kafka's binary mode, so the codec reads both alike.
        let mut h: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, value) in headers {
            if let Some(attr) = name.as_str().strip_prefix("ce-") {
                h.push((format!("ce_{attr}"), percent_decode(value.as_bytes())));
            }
        }
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            h.push((CONTENT_TYPE_HEADER.into(), ct.as_bytes().to_vec()));
        }
        return one(body, &h).map(|e| vec![e]).map_err(Refusal::bad);
    }
    Err(Refusal::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "content type {media:?} is not a CloudEvents mode: send {STRUCTURED} (structured), {BATCH} (batch), or ce-* headers with the data as the body (binary)"
        ),
    ))
}

/// An Alertmanager webhook (version 4).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerWebhook {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

/// One alert of an Alertmanager webhook.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(rename = "generatorURL", default)]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

/// The events of an Alertmanager webhook: one per alert, `sla.breached` when firing,
/// `sla.recovered` when resolved, id from fingerprint, start and status (a re-sent notification
/// repeats the ids, so it is deduplicated).
pub fn alertmanager_events(
    cfg: &AlertmanagerConfig,
    body: &[u8],
) -> Result<Vec<CloudEvent>, Refusal> {
    codec::check_json_depth(body, codec::MAX_DEPTH).map_err(|e| Refusal::bad(e.to_string()))?;
    let hook: AlertmanagerWebhook = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad(format!("not an Alertmanager webhook: {e}")))?;
    if !hook.version.is_empty() && hook.version != "4" {
        return Err(Refusal::bad(format!(
            "webhook version {:?} is not supported (only 4)",
            hook.version
        )));
    }
    if hook.alerts.len() > MAX_BATCH_EVENTS {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the webhook has {} alerts; at most {MAX_BATCH_EVENTS} per request (Alertmanager's max_alerts)",
                hook.alerts.len()
            ),
        ));
    }
    let mut events = Vec::new();
    let mut wrong = Vec::new();
    for (i, a) in hook.alerts.iter().enumerate() {
        let ty = match a.status.as_str() {
            "firing" => "sla.breached",
            "resolved" => "sla.recovered",
            other => {
                wrong.push((
                    i,
                    format!("status {other:?} is neither \"firing\" nor \"resolved\""),
                ));
                continue;
            }
        };
        let Some(subject) = a.labels.get(&cfg.subject_label).filter(|s| !s.is_empty()) else {
            wrong.push((
                i,
                format!(
                    "alert {} has no label {:?} (http.ingest.alertmanager.subject_label) naming its resource",
                    a.labels.get("alertname").map(String::as_str).unwrap_or("?"),
                    cfg.subject_label
                ),
            ));
            continue;
        };
        // Older senders without a fingerprint: the labels identify the alert.
        let fingerprint = if a.fingerprint.is_empty() {
            let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            stable_id(&labels.iter().map(String::as_str).collect::<Vec<_>>())
        } else {
            a.fingerprint.clone()
        };
        let id = format!("am-{}", stable_id(&[&fingerprint, &a.starts_at, &a.status]));
        let mut data = Map::new();
        for (k, v) in &a.labels {
            data.insert(k.clone(), json!(v));
        }
        data.insert("status".into(), json!(a.status));
        data.insert("labels".into(), json!(a.labels));
        data.insert("annotations".into(), json!(a.annotations));
        data.insert("startsAt".into(), json!(a.starts_at));
        data.insert("endsAt".into(), json!(a.ends_at));
        data.insert("generatorURL".into(), json!(a.generator_url));
        data.insert("fingerprint".into(), json!(fingerprint));
        data.insert("receiver".into(), json!(hook.receiver));
        data.insert("groupKey".into(), json!(hook.group_key));
        if !hook.external_url.is_empty() {
            data.insert("externalURL".into(), json!(hook.external_url));
        }
        let time = if ty == "sla.recovered" {
            &a.ends_at
        } else {
            &a.starts_at
        };
        let mut ev = CloudEvent::new(id, cfg.source.clone(), ty)
            .with_subject(subject.clone())
            .with_data(Value::Object(data));
        ev.time = chrono::DateTime::parse_from_rfc3339(time)
            .ok()
            .map(|_| time.clone());
        if let Some(t) = cfg
            .tenant_label
            .as_ref()
            .and_then(|l| a.labels.get(l))
            .filter(|t| !t.is_empty())
        {
            ev = ev.with_extension("tenant", t.clone());
        }
        match codec::validate(&ev) {
            Ok(()) => events.push(ev),
            Err(e) => wrong.push((i, e.to_string())),
        }
    }
    if !wrong.is_empty() {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "{} of {} alerts cannot be taken; nothing was produced",
                wrong.len(),
                hook.alerts.len()
            ),
            events: wrong,
        });
    }
    if events.is_empty() {
        return Err(Refusal::bad("the webhook has no alerts"));
    }
    Ok(events)
}

/// Whether `signature` (`X-Hub-Signature-256`: `sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`; compared in constant time.
pub fn github_signature_ok(secret: &Secret, body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_sig) = signature.and_then(|s| s.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(want) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&want).is_ok()
}

/// What a GitHub webhook delivery amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum GithubDelivery {
    /// `ping`: GitHub checking the hook.
    Ping,
    /// An event type switchyard does not take (answered 202, nothing produced).
    Ignored(String),
    /// A `deployment_status` event as a `deployment.<state>` CloudEvent.
    Event(Box<CloudEvent>),
}

/// Reads a GitHub delivery (already authenticated by its signature).
pub fn github_delivery(
    cfg: &GithubConfig,
    event: &str,
    delivery: &str,
    body: &[u8],
) -> Result<GithubDelivery, Refusal> {
    match event {
        "ping" => return Ok(GithubDelivery::Ping),
        "deployment_status" => {}
        "" => return Err(Refusal::bad("header X-GitHub-Event is missing")),
        other => return Ok(GithubDelivery::Ignored(other.to_string())),
    }
    if delivery.is_empty() {
        return Err(Refusal::bad("header X-GitHub-Delivery is missing"));
    }
    codec::check_json_depth(body, codec::MAX_DEPTH).map_err(|e| Refusal::bad(e.to_string()))?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad(format!("body is not valid JSON: {e}")))?;
    let s = |path: &str| -> Option<String> {
        v.pointer(path)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let state = s("/deployment_status/state")
        .ok_or_else(|| Refusal::bad("deployment_status.state is missing"))?;
    if !state
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
    {
        return Err(Refusal::bad(format!(
            "deployment_status.state {state:?} is not a GitHub state"
        )));
    }
    let repo_full = s("/repository/full_name")
        .ok_or_else(|| Refusal::bad("repository.full_name is missing"))?;
    let repo = s("/repository/name").unwrap_or_else(|| {
        repo_full
            .rsplit('/')
            .next()
            .unwrap_or(&repo_full)
            .to_string()
    });
    let environment = s("/deployment_status/environment").or_else(|| s("/deployment/environment"));
    let subject = match cfg.subject {
        GithubSubject::Repository => repo.clone(),
        GithubSubject::Environment => environment
            .clone()
            .ok_or_else(|| Refusal::bad("deployment.environment is missing"))?,
    };
    let data = json!({
        "service": repo,
        "repository": repo_full,
        "environment": environment,
        "state": state,
        "description": s("/deployment_status/description"),
        "target_url": s("/deployment_status/target_url"),
        "environment_url": s("/deployment_status/environment_url"),
        "deployment_id": v.pointer("/deployment/id").cloned().unwrap_or(Value::Null),
        "sha": s("/deployment/sha"),
        "ref": s("/deployment/ref"),
        "task": s("/deployment/task"),
        "creator": s("/deployment_status/creator/login").or_else(|| s("/sender/login")),
    });
    // The id comes from the signed body, not the unsigned X-GitHub-Delivery header: a captured
    // signed body sent again under a new delivery id is the same event, deduplicated.
    let id = match v.pointer("/deployment_status/id") {
        Some(Value::Number(n)) => format!("gh-deployment-status-{n}"),
        _ => format!(
            "gh-{}",
            crate::pattern::stable_id(&[
                &repo_full,
                &v.pointer("/deployment/id")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                &state,
                &s("/deployment_status/updated_at").unwrap_or_default(),
            ])
        ),
    };
    let mut ev = CloudEvent::new(
        id,
        format!("https://github.com/{repo_full}"),
        format!("deployment.{state}"),
    )
    .with_subject(subject)
    .with_data(data);
    ev.time = s("/deployment_status/updated_at")
        .or_else(|| s("/deployment_status/created_at"))
        .filter(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok());
    codec::validate(&ev).map_err(|e| Refusal::bad(e.to_string()))?;
    Ok(GithubDelivery::Event(Box::new(ev)))
}

/// A GitHub delivery's event is taken only while a repeat of it would still be recognised as a
/// duplicate: its (signed) `updated_at` within `dedupe_seconds` of now. A captured delivery sent
/// again after that window would otherwise be a new event; it is refused (409) instead. A status
/// without a time is taken (nothing to judge it by).
fn fresh_enough(
    ev: &CloudEvent,
    dedupe_seconds: u64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Refusal> {
    let Some(t) = ev
        .time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return Ok(());
    };
    let age = now.timestamp() - t.timestamp();
    if age > dedupe_seconds as i64 {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            format!(
                "the deployment status is from {} ({age} s ago), older than http.ingest.dedupe_seconds ({dedupe_seconds} s): a delivery that old could not be told from a replay, so it is refused",
                t.to_rfc3339()
            ),
        ));
    }
    Ok(())
}

/// What the ingest routes share.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: IngestConfig,
    schemas: Arc<SchemaRegistry>,
    emitter: Emitter,
    producer: Producer,
    redis: RedisConn,
    prefix: String,
    /// How long a (source, id) stays claimed while its record is produced.
    claim_ms: u64,
    auth: Auth,
    limiter: Limiter,
    /// The GitHub secret, or why there is none.
    github_secret: Result<Secret, String>,
}

/// What claiming an event's (source, id) found.
enum Claim {
    Mine,
    Duplicate,
    InProgress,
    Failed(String),
}

/// How one event of a request ended.
#[derive(Debug)]
enum Taken {
    Produced {
        topic: String,
        partition: i32,
        offset: i64,
    },
    Duplicate,
    InProgress,
    /// The record is larger than the broker takes.
    TooLarge(String),
    Failed(String),
}

/// Longest a client may take to send its body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a claim lasts: longer than a produce can take (`message.timeout.ms` or
/// `delivery.timeout.ms` of `kafka.client`/`kafka.producer`), plus a minute.
pub fn claim_ms(kafka: &crate::kafka::KafkaConfig) -> u64 {
    kafka.delivery_timeout_ms() + 60_000
}

impl Ingest {
    pub fn new(
        cfg: IngestConfig,
        emitter: Emitter,
        producer: Producer,
        redis: RedisConn,
        prefix: &str,
        claim_ms: u64,
    ) -> Self {
        let github_secret = match &cfg.github.secret {
            None => Err("no GitHub secret is configured: set http.ingest.github.secret".into()),
            Some(r) => r
                .resolve()
                .and_then(|s| {
                    if s.is_empty() {
                        Err("http.ingest.github.secret is empty".into())
                    } else {
                        Ok(s)
                    }
                })
                .map_err(|e| format!("http.ingest.github.secret: {e}")),
        };
        if let (Some(_), Err(e)) = (&cfg.github.secret, &github_secret) {
            tracing::warn!(error = %e, "The GitHub webhook secret cannot be read; /v1/ingest/github answers 503.");
        }
        for door in [Door::CloudEvents, Door::Alertmanager, Door::Github] {
            for o in OUTCOMES {
                count(door, o, 0);
            }
        }
        Ingest {
            inner: Arc::new(Inner {
                auth: cfg.auth(),
                schemas: emitter.schemas.clone(),
                limiter: Limiter::new(redis.clone(), prefix),
                cfg,
                emitter,
                producer,
                redis,
                prefix: prefix.to_string(),
                claim_ms,
                github_secret,
            }),
        }
    }

    /// Whether `source` is one the Alertmanager or GitHub door writes.
    fn reserved(&self, source: &str) -> bool {
        source == self.inner.cfg.alertmanager.source || source.starts_with("https://github.com/")
    }

    fn seen_key(&self, ev: &CloudEvent) -> String {
        format!(
            "{}:ingest:seen:{{{}}}",
            self.inner.prefix,
            stable_id(&crate::route::event_parts(ev))
        )
    }

    /// The caller's token name, or the refusal.
    #[allow(clippy::result_large_err)]
    fn caller(&self, door: Door, headers: &HeaderMap) -> Result<String, Response> {
        match self.inner.auth.authenticate(headers) {
            Ok(who) => Ok(who.name),
            Err(AuthError::Disabled) => {
                count(door, "unauthorized", 1);
                Err(super::auth::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no ingest token is configured: declare http.ingest.tokens or set SWITCHYARD_INGEST_TOKEN",
                ))
            }
            Err(e @ AuthError::Ambiguous) => {
                count(door, "unauthorized", 1);
                Err(super::auth::error(StatusCode::BAD_REQUEST, e.to_string()))
            }
            Err(e @ AuthError::Unauthenticated) => {
                count(door, "unauthorized", 1);
                Err(super::auth::error(StatusCode::UNAUTHORIZED, e.to_string()))
            }
        }
    }

    /// The body, unless it is larger than `max_body_bytes`.
    async fn body(&self, door: Door, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Response> {
        let max = self.inner.cfg.max_body_bytes;
        let too_large = || {
            count(door, "too_large", 1);
            super::auth::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body is larger than {max} bytes (http.ingest.max_body_bytes)"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        // Read chunk by chunk, so a body without (or lying about) its length stops at the limit.
        let mut stream = body.into_data_stream();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
        loop {
            let Ok(chunk) = tokio::time::timeout_at(deadline, stream.next()).await else {
                count(door, "rejected", 1);
                return Err(super::auth::error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body took longer than {} s to arrive",
                        BODY_TIMEOUT.as_secs()
                    ),
                ));
            };
            let Some(chunk) = chunk else { break };
            match chunk {
                Ok(c) if out.len() + c.len() > max => return Err(too_large()),
                Ok(c) => out.extend_from_slice(&c),
                // The listener's body deadline (`http.body_timeout_ms`) is a slow body too.
                Err(e) if e.to_string().contains(super::server::BODY_TOO_SLOW) => {
                    count(door, "rejected", 1);
                    return Err(super::auth::error(
                        StatusCode::REQUEST_TIMEOUT,
                        e.to_string(),
                    ));
                }
                Err(e) => {
                    count(door, "rejected", 1);
                    return Err(super::auth::error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Routes, rate-limits, deduplicates and produces `events`; `202` once every record is
    /// acknowledged (or was a duplicate).
    async fn accept(
        &self,
        door: Door,
        caller: &str,
        events: Vec<CloudEvent>,
        topic: Option<&str>,
    ) -> Response {
        let inner = &self.inner;
        // What every event entering switchyard must be (bounded attributes, no control characters),
        // whichever door it came through.
        let invalid: Vec<(usize, String)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, ev)| codec::validate_input(ev).err().map(|e| (i, e.to_string())))
            .collect();
        if !invalid.is_empty() {
            count(door, "rejected", events.len());
            return Refusal::listed(
                StatusCode::BAD_REQUEST,
                events.len(),
                invalid,
                "are not valid",
            )
            .response();
        }
        // Only tenants this sender may send for (an event names its tenant itself).
        let allowed = inner.cfg.tenants_of(caller);
        let foreign: Vec<(usize, String)> = events
            .iter()
            .enumerate()
            .filter(|(_, ev)| !crate::pattern::matches_any(&allowed, ev.tenant()))
            .map(|(i, ev)| {
                (
                    i,
                    format!("{caller} may not send events for tenant {:?}", ev.tenant()),
                )
            })
            .collect();
        if !foreign.is_empty() {
            count(door, "unauthorized", events.len());
            return Refusal::listed(
                StatusCode::FORBIDDEN,
                events.len(),
                foreign,
                &format!("are for tenants {caller} may not send for"),
            )
            .response();
        }
        // Where each event goes, and its record; every problem is reported before anything is sent.
        let mut records = Vec::with_capacity(events.len());
        let mut wrong = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let Some(t) = topic.or_else(|| inner.cfg.topic_for(&ev.ty)) else {
                wrong.push((
                    i,
                    format!(
                        "no input topic for event type {:?}: map it in http.ingest.topics",
                        ev.ty
                    ),
                ));
                continue;
            };
            match inner.emitter.emit(t, ev) {
                Ok(out) => records.push(out),
                Err(e) => wrong.push((i, format!("cannot encode for topic {t}: {e}"))),
            }
        }
        if !wrong.is_empty() {
            count(door, "rejected", events.len());
            return Refusal::listed(
                StatusCode::UNPROCESSABLE_ENTITY,
                events.len(),
                wrong,
                "cannot be taken",
            )
            .response();
        }
        let rate = inner.cfg.rate_of(caller);
        if rate > 0 && events.len() as u64 > rate {
            // The bucket holds a minute's events: a larger request would pass whole once a minute.
            count(door, "rate_limited", events.len());
            return Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} events in one request are more than {caller}'s rate limit of {rate} per minute; send fewer at a time",
                    events.len()
                ),
            )
            .response();
        }
        let keys: Vec<String> = events.iter().map(|ev| self.seen_key(ev)).collect();
        // Events already taken cost nothing: Alertmanager sends a group's every firing alert again
        // on each change and repeat, and those copies drained the bucket for new alerts.
        let fresh = if rate > 0 {
            self.unseen(&keys).await
        } else {
            0
        };
        if rate > 0 && fresh > 0 {
            let cap = rate as f64;
            let bucket = Bucket {
                key: inner.limiter.bucket_key("ingest", caller, "rpm", None),
                capacity: cap,
                rate: cap / 60_000.0,
                cost: fresh as f64,
                tokens: false,
            };
            match inner.limiter.acquire("ingest", caller, &[bucket]).await {
                Ok(Acquire::Granted) => {}
                Ok(Acquire::Wait(ms) | Acquire::Cooling(ms)) => {
                    count(door, "rate_limited", events.len());
                    let secs = ms.div_ceil(1000).max(1);
                    return (
                        door.retryable(StatusCode::TOO_MANY_REQUESTS),
                        [(header::RETRY_AFTER, secs.to_string())],
                        Json(json!({"error": format!(
                            "rate limit of {rate} events per minute for {caller} reached; retry in {secs} s")})),
                    )
                        .into_response();
                }
                Err(e) => {
                    count(door, "failed", events.len());
                    return super::auth::store_unavailable("the ingest rate limit", e);
                }
            }
        }
        // Claiming, producing and settling run as a task of their own: a client that gives up (or
        // a proxy that times out) drops this request, not the work — a claim left pending would
        // answer the client's retry "in progress" for minutes, and a record produced but never
        // settled would be produced again once its claim expired.
        let this = self.clone();
        let work = tokio::spawn(async move { this.produce_claimed(keys, records).await });
        let taken: Vec<Taken> = match work.await {
            Ok(t) => t,
            Err(e) => {
                count(door, "failed", events.len());
                return super::auth::unavailable(format!("producing failed: {e}; retry"));
            }
        };
        let mut list = Vec::with_capacity(taken.len());
        let (mut produced, mut duplicates, mut busy, mut failed, mut large) = (0, 0, 0, 0, 0);
        for (ev, t) in events.iter().zip(&taken) {
            let mut o = json!({"id": ev.id, "source": ev.source, "type": ev.ty});
            match t {
                Taken::Produced {
                    topic,
                    partition,
                    offset,
                } => {
                    produced += 1;
                    o["topic"] = json!(topic);
                    o["partition"] = json!(partition);
                    o["offset"] = json!(offset);
                    o["duplicate"] = json!(false);
                }
                Taken::Duplicate => {
                    duplicates += 1;
                    o["duplicate"] = json!(true);
                }
                Taken::InProgress => {
                    busy += 1;
                    o["error"] = json!(
                        "the same (tenant, source, id) is being produced by another request; retry"
                    );
                }
                Taken::TooLarge(e) => {
                    large += 1;
                    o["error"] = json!(e);
                }
                Taken::Failed(e) => {
                    failed += 1;
                    o["error"] = json!(e);
                }
            }
            list.push(o);
        }
        count(door, "accepted", produced);
        count(door, "duplicate", duplicates);
        count(door, "in_progress", busy);
        count(door, "failed", failed);
        count(door, "too_large", large);
        tracing::debug!(
            source = door.label(),
            caller,
            produced,
            duplicates,
            busy,
            failed,
            "Ingest request done."
        );
        let n = events.len();
        if busy + failed + large > 0 {
            let (status, advice) = if failed > 0 {
                (StatusCode::SERVICE_UNAVAILABLE, "repeat the request")
            } else if busy > 0 {
                (door.retryable(StatusCode::CONFLICT), "repeat the request")
            } else {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "send smaller events (the broker's message.max.bytes)",
                )
            };
            let mut r = (
                status,
                Json(json!({
                    "error": format!("{} of {n} events were not taken; {advice} (events already taken are not produced twice)", busy + failed + large),
                    "accepted": produced, "duplicates": duplicates, "events": list,
                })),
            )
                .into_response();
            if status != StatusCode::PAYLOAD_TOO_LARGE {
                r = super::auth::retry_later(r);
            }
            return r;
        }
        (
            StatusCode::ACCEPTED,
            Json(json!({
                "accepted": produced,
                "duplicates": duplicates,
                "duplicate": duplicates == n,
                "events": list,
            })),
        )
            .into_response()
    }

    /// Claims each event's dedupe key (a key twice in one request is taken once), queues the
    /// claimed records in the request's order (events of one resource keep their order on its
    /// partition), awaits their acknowledgements together and settles each claim: what became of
    /// each event, in order.
    async fn produce_claimed(
        &self,
        keys: Vec<String>,
        records: Vec<crate::kafka::Output>,
    ) -> Vec<Taken> {
        let inner = &self.inner;
        // This request's name in its claims.
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let owner = owner.as_str();
        let mut firsts = HashSet::new();
        let claims = futures::future::join_all(keys.iter().map(|key| {
            let first = firsts.insert(key.clone());
            async move {
                if first {
                    self.claim(key, owner).await
                } else {
                    Claim::Duplicate
                }
            }
        }))
        .await;
        let enqueue_by = tokio::time::Instant::now()
            + std::time::Duration::from_millis(inner.claim_ms.saturating_sub(10_000).min(50_000));
        let mut taken: Vec<Option<Taken>> = Vec::with_capacity(keys.len());
        let mut waiting = Vec::new();
        // Resources (record keys) with an event of this request that was not queued: their later
        // events wait too, or a retry would write the earlier one after them.
        let mut held: HashSet<Option<Vec<u8>>> = HashSet::new();
        for (i, ((key, claim), out)) in keys.iter().zip(claims).zip(records).enumerate() {
            match claim {
                Claim::Mine if held.contains(&out.key) => {
                    self.release(key, owner).await;
                    taken.push(Some(Taken::Failed(
                        "an earlier event of the same resource in this request was not taken; retry"
                            .into(),
                    )));
                    continue;
                }
                Claim::Mine => {}
                Claim::Duplicate => {
                    taken.push(Some(Taken::Duplicate));
                    continue;
                }
                Claim::InProgress => {
                    held.insert(out.key.clone());
                    taken.push(Some(Taken::InProgress));
                    continue;
                }
                Claim::Failed(e) => {
                    held.insert(out.key.clone());
                    taken.push(Some(Taken::Failed(e)));
                    continue;
                }
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A producer queue that stays full must not outlast the claim: a record queued late
            // may be delivered up to the producer's delivery timeout after, and the claim lasts
            // that plus a minute from when it was taken — so a record not queued within 50 s of
            // the claims is not queued, and its claim let go (else a retry claiming the event
            // after the claim expired produced it a second time).
            let queued = tokio::time::timeout_at(
                enqueue_by,
                inner.producer.enqueue(&out, Notice::Waiter(tx), || {
                    METRICS
                        .producer_queue_full
                        .with_label_values(&["ingest"])
                        .inc()
                }),
            )
            .await;
            match queued {
                Ok(Ok(())) => {
                    taken.push(None);
                    waiting.push((i, key.clone(), out.topic, rx));
                }
                Ok(Err(ProduceError::Rejected { source, .. })) => {
                    held.insert(out.key.clone());
                    taken.push(Some(self.settle(key, owner, out.topic, Err(source)).await));
                }
                Err(_) => {
                    held.insert(out.key.clone());
                    self.release(key, owner).await;
                    taken.push(Some(Taken::Failed(
                        "the producer's queue stayed full; retry".into(),
                    )));
                }
            }
        }
        let settled =
            futures::future::join_all(waiting.into_iter().map(|(i, key, topic, rx)| async move {
                let acked = rx
                    .await
                    .unwrap_or(Err(rdkafka::error::KafkaError::Canceled));
                (i, self.settle(&key, owner, topic, acked).await)
            }))
            .await;
        for (i, t) in settled {
            taken[i] = Some(t);
        }
        taken
            .into_iter()
            .map(|t| t.unwrap_or_else(|| Taken::Failed("no delivery report".into())))
            .collect()
    }

    /// How many of `keys` (distinct) no event was taken under yet: what a request costs in its
    /// caller's rate limit. Redis failing counts them all.
    async fn unseen(&self, keys: &[String]) -> usize {
        let distinct: Vec<&String> = keys.iter().collect::<HashSet<_>>().into_iter().collect();
        let seen = async {
            let mut c = self.inner.redis.get().await?;
            let mut pipe = redis::pipe();
            for k in &distinct {
                pipe.cmd("EXISTS").arg(*k);
            }
            let found: Vec<u8> = pipe.query_async(&mut c).await?;
            Ok::<_, crate::store::StoreError>(found.iter().filter(|f| **f > 0).count())
        };
        match seen.await {
            Ok(n) => distinct.len().saturating_sub(n),
            Err(e) => {
                tracing::debug!(error = %e, "Could not look for events taken before; the whole request counts toward the rate limit.");
                distinct.len()
            }
        }
    }

    /// Claims a (source, id) key for producing it: mine, already done (a duplicate), or being
    /// produced by another request. The claim names its request (`pending:<owner>`), so only
    /// that request lets go of it.
    async fn claim(&self, key: &str, owner: &str) -> Claim {
        let claimed = async {
            let mut c = self.inner.redis.get().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(format!("pending:{owner}"))
                .arg("NX")
                .arg("PX")
                .arg(self.inner.claim_ms)
                .query_async(&mut c)
                .await?;
            if set.is_some() {
                return Ok::<_, crate::store::StoreError>(None);
            }
            let now: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await?;
            Ok(Some(now))
        }
        .await;
        match claimed {
            Ok(None) => Claim::Mine,
            Ok(Some(Some(v))) if v == "done" => Claim::Duplicate,
            Ok(Some(_)) => Claim::InProgress,
            // Redis's words go to the log, a reference to the caller.
            Err(e) => Claim::Failed(format!(
                "its duplicate check is unavailable (reference {} in switchyard's log)",
                super::auth::logged("the ingest duplicate check", e)
            )),
        }
    }

    /// Lets go of `owner`'s claim whose event was not produced, so that a retry produces it —
    /// only while it is still that request's: one that expired and was claimed by a retry is the
    /// retry's (an unconditional delete let a third request produce the event again).
    async fn release(&self, key: &str, owner: &str) {
        static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            )
        });
        let released = async {
            let mut c = self.inner.redis.get().await?;
            RELEASE
                .key(key)
                .arg(format!("pending:{owner}"))
                .invoke_async::<i64>(&mut c)
                .await?;
            Ok::<_, crate::store::StoreError>(())
        }
        .await;
        if let Err(re) = released {
            tracing::warn!(error = %re, "Could not release the claim of an event that was not produced; a retry is refused while the claim lasts.");
        }
    }

    /// After the broker answered: marks the key done for the dedupe window, or releases the
    /// claim of a record that was not written, so a retry produces it.
    async fn settle(
        &self,
        key: &str,
        owner: &str,
        topic: String,
        acked: Result<(i32, i64), rdkafka::error::KafkaError>,
    ) -> Taken {
        let window = self.inner.cfg.dedupe_seconds.max(1);
        match acked {
            Ok((partition, offset)) => {
                let marked = async {
                    let mut c = self.inner.redis.get().await?;
                    redis::cmd("SET")
                        .arg(key)
                        .arg("done")
                        .arg("EX")
                        .arg(window)
                        .query_async::<()>(&mut c)
                        .await?;
                    Ok::<_, crate::store::StoreError>(())
                }
                .await;
                if let Err(e) = marked {
                    // The record is on its topic; a repeat while the claim lasts is refused, a
                    // later one would be produced again.
                    tracing::warn!(error = %e, "Could not mark an ingested event as done; a repeat after its claim expires is produced again.");
                }
                Taken::Produced {
                    topic,
                    partition,
                    offset,
                }
            }
            Err(e) => {
                self.release(key, owner).await;
                if crate::kafka::is_too_large(&e) {
                    Taken::TooLarge(format!("the record is too large for {topic}: {e}"))
                } else {
                    Taken::Failed(format!("producing to {topic} failed: {e}"))
                }
            }
        }
    }
}

async fn events(State(s): State<Ingest>, headers: HeaderMap, body: Body) -> Response {
    let door = Door::CloudEvents;
    let caller = match s.caller(door, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match s.body(door, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match parse_cloudevents(&headers, &body, &s.inner.schemas) {
        // The sources of the authenticated doors are theirs: a token cannot send (or claim the
        // ids of, so the real ones would be dropped as duplicates) Alertmanager's or GitHub's.
        Ok(evs) if evs.iter().any(|e| s.reserved(&e.source)) => {
            count(door, "rejected", evs.len());
            Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "sources {:?} and https://github.com/… belong to /v1/ingest/alertmanager and /v1/ingest/github",
                    s.inner.cfg.alertmanager.source
                ),
            )
            .response()
        }
        Ok(evs) => s.accept(door, &caller, evs, None).await,
        Err(r) => {
            count(door, "rejected", r.events.len().max(1));
            r.response()
        }
    }
}

async fn alertmanager(State(s): State<Ingest>, headers: HeaderMap, body: Body) -> Response {
    let door = Door::Alertmanager;
    let caller = match s.caller(door, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match s.body(door, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match alertmanager_events(&s.inner.cfg.alertmanager, &body) {
        Ok(evs) => {
            let topic = s.inner.cfg.alertmanager.topic.clone();
            s.accept(door, &caller, evs, topic.as_deref()).await
        }
        Err(r) => {
            count(door, "rejected", r.events.len().max(1));
            r.response()
        }
    }
}

async fn github(State(s): State<Ingest>, headers: HeaderMap, body: Body) -> Response {
    let door = Door::Github;
    let secret = match &s.inner.github_secret {
        Ok(secret) => secret.clone(),
        Err(why) => {
            count(door, "unauthorized", 1);
            return super::auth::error(StatusCode::SERVICE_UNAVAILABLE, why.clone());
        }
    };
    let body = match s.body(door, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if !github_signature_ok(&secret, &body, h("x-hub-signature-256")) {
        count(door, "unauthorized", 1);
        return super::auth::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Hub-Signature-256 (HMAC-SHA256 of the body with the webhook secret)",
        );
    }
    let delivery = h("x-github-delivery").unwrap_or("").to_string();
    match github_delivery(
        &s.inner.cfg.github,
        h("x-github-event").unwrap_or(""),
        &delivery,
        &body,
    ) {
        Ok(GithubDelivery::Ping) => (StatusCode::OK, Json(json!({"ok": true}))).into_response(),
        Ok(GithubDelivery::Ignored(e)) => {
            count(door, "ignored", 1);
            (
                StatusCode::ACCEPTED,
                Json(json!({"ignored": true, "event": e, "why": "only deployment_status events are taken"})),
            )
                .into_response()
        }
        Ok(GithubDelivery::Event(ev)) => {
            if let Err(r) = fresh_enough(&ev, s.inner.cfg.dedupe_seconds, chrono::Utc::now()) {
                count(door, "rejected", 1);
                return r.response();
            }
            let topic = s.inner.cfg.github.topic.clone();
            s.accept(door, "github", vec![*ev], topic.as_deref()).await
        }
        Err(r) => {
            count(door, "rejected", 1);
            r.response()
        }
    }
}

/// The ingest routes.
pub fn router(ingest: Ingest) -> Router {
    Router::new()
        .route("/v1/events", post(events))
        .route("/v1/ingest/alertmanager", post(alertmanager))
        .route("/v1/ingest/github", post(github))
        .with_state(ingest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn schemas() -> SchemaRegistry {
        SchemaRegistry::default()
    }

    #[test]
    fn structured_binary_and_batch() {
        let body = br#"{"specversion":"1.0","id":"e1","source":"ci","type":"deployment.completed","subject":"svc-a","data":{"v":"1"}}"#;
        let evs =
            parse_cloudevents(&headers(&[("content-type", STRUCTURED)]), body, &schemas()).unwrap();
        assert_eq!(
            (evs[0].id.as_str(), evs[0].subject.as_deref()),
            ("e1", Some("svc-a"))
        );
        assert_eq!(evs[0].data, Some(json!({"v": "1"})));

        let h = headers(&[
            ("content-type", "application/json; charset=utf-8"),
            ("ce-specversion", "1.0"),
            ("ce-id", "e2"),
            ("ce-source", "ci%2Fjobs"),
            ("ce-type", "deployment.started"),
            ("ce-subject", "svc-b"),
            ("ce-tenant", "acme"),
        ]);
        let evs = parse_cloudevents(&h, br#"{"x": 1}"#, &schemas()).unwrap();
        let ev = &evs[0];
        assert_eq!(ev.source, "ci/jobs", "header values are percent-decoded");
        assert_eq!(ev.tenant(), "acme");
        assert_eq!(ev.data, Some(json!({"x": 1})));
        assert_eq!(
            ev.datacontenttype.as_deref(),
            Some("application/json; charset=utf-8")
        );

        let batch = br#"[{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r"},
                         {"specversion":"1.0","id":"2","source":"s","type":"t","subject":"r"}]"#;
        let evs =
            parse_cloudevents(&headers(&[("content-type", BATCH)]), batch, &schemas()).unwrap();
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn malformed_input_names_the_problem() {
        let h = headers(&[("content-type", STRUCTURED)]);
        let e = parse_cloudevents(
            &h,
            br#"{"specversion":"1.0","source":"s","type":"t"}"#,
            &schemas(),
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("required attribute id is missing"),
            "{e:?}"
        );
        let e = parse_cloudevents(&h, b"{\n  \"id\": ", &schemas()).unwrap_err();
        assert!(e.message.contains("line 2 column"), "{e:?}");
        let e = parse_cloudevents(
            &h,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#,
            &schemas(),
        )
        .unwrap_err();
        assert!(e.message.contains("subject is missing"), "{e:?}");
        let e = parse_cloudevents(
            &h,
            br#"{"specversion":"0.3","id":"1","source":"s","type":"t","subject":"r"}"#,
            &schemas(),
        )
        .unwrap_err();
        assert!(e.message.contains("specversion"), "{e:?}");
        // Deep nesting is refused, not recursed into.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_cloudevents(&h, deep.as_bytes(), &schemas()).is_err());
        let b = headers(&[("content-type", BATCH)]);
        let e = parse_cloudevents(
            &b,
            br#"[{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"r"}, {"id": 3}]"#,
            &schemas(),
        )
        .unwrap_err();
        assert_eq!(e.events.len(), 1);
        assert_eq!(e.events[0].0, 1);
        assert!(parse_cloudevents(&b, b"[]", &schemas()).is_err());
        let e = parse_cloudevents(
            &headers(&[("content-type", "text/plain")]),
            b"x",
            &schemas(),
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // Any bytes at all: an answer, never a panic.
        for body in [
            &b"\xff\xfe"[..],
            b"\xc3\x01\x00",
            b"null",
            b"[1,2]",
            b"{\"data\":",
        ] {
            for h in [&h, &b] {
                let _ = parse_cloudevents(h, body, &schemas());
            }
        }
    }

    #[test]
    fn claims_outlast_the_producers_delivery_timeout() {
        let mut k = crate::kafka::KafkaConfig::default();
        assert_eq!(claim_ms(&k), 360_000);
        k.producer
            .insert("message.timeout.ms".into(), "30000".into());
        assert_eq!(claim_ms(&k), 90_000);
        assert!(IngestConfig::default().auth().is_empty(), "no token: 503");
    }

    #[test]
    fn topic_map_prefers_the_most_specific_pattern() {
        let cfg: IngestConfig = serde_yaml::from_str(
            r#"topics: {"deployment.*": deps, "deployment.failed": fails, "*": other, "sla.*": slas}"#,
        )
        .unwrap();
        assert_eq!(cfg.topic_for("deployment.failed"), Some("fails"));
        assert_eq!(cfg.topic_for("deployment.started"), Some("deps"));
        assert_eq!(cfg.topic_for("sla.breached"), Some("slas"));
        assert_eq!(cfg.topic_for("x"), Some("other"));
        let p = cfg.problems(&["deps".into(), "slas".into()]);
        assert!(
            p.iter().any(|(i, m)| i.contains("deployment.failed")
                && m.contains("\"fails\" is not one of topics.inputs")),
            "{p:?}"
        );
        let bad: IngestConfig = serde_yaml::from_str("tokens: [{name: a, token: short}]").unwrap();
        assert!(bad
            .problems(&[])
            .iter()
            .any(|(i, _)| i == "http.ingest.tokens[0].token"));
        assert!(serde_yaml::from_str::<IngestConfig>("nope: 1").is_err());
    }

    #[test]
    fn alertmanager_alerts_become_breaches_and_recoveries() {
        let body = json!({
            "version": "4", "groupKey": "{}:{alertname=\"SLO\"}", "status": "firing", "receiver": "switchyard",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": [
                {"status": "firing", "labels": {"alertname": "SLO", "service": "checkout", "team": "pay"},
                 "annotations": {"summary": "burning"}, "startsAt": "2026-01-01T10:00:00Z",
                 "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph", "fingerprint": "abc"},
                {"status": "resolved", "labels": {"alertname": "SLO", "service": "cart"},
                 "annotations": {}, "startsAt": "2026-01-01T09:00:00Z",
                 "endsAt": "2026-01-01T09:30:00Z", "generatorURL": "", "fingerprint": "def"}
            ]
        });
        let cfg = AlertmanagerConfig::default();
        let evs = alertmanager_events(&cfg, body.to_string().as_bytes()).unwrap();
        assert_eq!(evs[0].ty, "sla.breached");
        assert_eq!(evs[0].subject.as_deref(), Some("checkout"));
        assert_eq!(evs[0].time.as_deref(), Some("2026-01-01T10:00:00Z"));
        let d = evs[0].data.as_ref().unwrap();
        assert_eq!(
            (d["team"].clone(), d["annotations"]["summary"].clone()),
            (json!("pay"), json!("burning"))
        );
        assert_eq!(d["generatorURL"], "http://prom/graph");
        assert_eq!(evs[1].ty, "sla.recovered");
        assert_eq!(evs[1].time.as_deref(), Some("2026-01-01T09:30:00Z"));
        // A re-sent notification has the same ids.
        let again = alertmanager_events(&cfg, body.to_string().as_bytes()).unwrap();
        assert_eq!(evs[0].id, again[0].id);
        assert_ne!(evs[0].id, evs[1].id);
        let no_label = json!({"alerts": [{"status": "firing", "labels": {"alertname": "X"}}]});
        let e = alertmanager_events(&cfg, no_label.to_string().as_bytes()).unwrap_err();
        assert!(e.events[0].1.contains("no label \"service\""), "{e:?}");
        assert!(alertmanager_events(&cfg, b"{\"alerts\": 3}").is_err());
    }

    #[test]
    fn github_signatures_and_deployment_status() {
        let secret = Secret::new("It's a Secret to Everybody");
        // GitHub's documented example.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(github_signature_ok(&secret, b"Hello, World!", Some(sig)));
        assert!(!github_signature_ok(&secret, b"Hello, World?", Some(sig)));
        assert!(!github_signature_ok(&secret, b"Hello, World!", None));
        assert!(!github_signature_ok(
            &secret,
            b"Hello, World!",
            Some("sha256=zz")
        ));
        assert!(!github_signature_ok(
            &secret,
            b"Hello, World!",
            Some(&sig.replace("sha256=", "sha1="))
        ));

        let body = json!({
            "action": "created",
            "deployment_status": {"id": 77, "state": "failure", "environment": "production", "description": "boom",
                                  "updated_at": "2026-01-01T10:00:00Z", "creator": {"login": "octo"}},
            "deployment": {"id": 42, "sha": "abc", "ref": "main", "environment": "production"},
            "repository": {"name": "payments", "full_name": "acme/payments"}
        })
        .to_string();
        let cfg = GithubConfig::default();
        let GithubDelivery::Event(ev) =
            github_delivery(&cfg, "deployment_status", "d-1", body.as_bytes()).unwrap()
        else {
            panic!("an event")
        };
        assert_eq!(
            (ev.ty.as_str(), ev.id.as_str()),
            ("deployment.failure", "gh-deployment-status-77")
        );
        assert_eq!(ev.subject.as_deref(), Some("payments"));
        assert_eq!(ev.source, "https://github.com/acme/payments");
        assert_eq!(ev.data.as_ref().unwrap()["environment"], "production");
        let env_cfg = GithubConfig {
            subject: GithubSubject::Environment,
            ..GithubConfig::default()
        };
        let GithubDelivery::Event(ev) =
            github_delivery(&env_cfg, "deployment_status", "d-1", body.as_bytes()).unwrap()
        else {
            panic!("an event")
        };
        assert_eq!(ev.subject.as_deref(), Some("production"));
        assert_eq!(
            github_delivery(&cfg, "ping", "", b"").unwrap(),
            GithubDelivery::Ping
        );
        assert_eq!(
            github_delivery(&cfg, "push", "d", b"{}").unwrap(),
            GithubDelivery::Ignored("push".into())
        );
        assert!(github_delivery(&cfg, "deployment_status", "", body.as_bytes()).is_err());
        assert!(github_delivery(&cfg, "deployment_status", "d", b"{}").is_err());
        assert!(github_delivery(&cfg, "deployment_status", "d", b"\xff").is_err());

        // Taken within the dedupe window of its time (here 2026-01-01T10:00:00Z), refused after.
        let GithubDelivery::Event(ev) =
            github_delivery(&cfg, "deployment_status", "d-1", body.as_bytes()).unwrap()
        else {
            panic!("an event")
        };
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert!(fresh_enough(&ev, 86_400, at("2026-01-02T10:00:00Z")).is_ok());
        let late = fresh_enough(&ev, 86_400, at("2026-01-02T10:00:01Z")).unwrap_err();
        assert_eq!(late.status, StatusCode::CONFLICT);
        assert!(late.message.contains("dedupe_seconds"), "{}", late.message);
        let mut timeless = (*ev).clone();
        timeless.time = None;
        assert!(fresh_enough(&timeless, 86_400, at("2030-01-01T00:00:00Z")).is_ok());
    }
}
