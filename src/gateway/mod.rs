//! The AI gateway: one door to every model, shared by all agents and all instances.
//!
//! A caller names a model **alias** (`analyst`) or a `provider/model` pair; the alias lists ordered
//! candidates. For each call the gateway
//! 1. holds a capped estimate of its cost against every budget that applies (agent, workflow,
//!    tenant, model: one atomic script, all or none; exhausted means deny, or a cheaper alias);
//! 2. for each candidate in order: takes room from its rate limits (token buckets in Redis shared
//!    by every instance; a call waits, bounded, or fails over), skips it while it cools down, sends
//!    the request, retries 429/5xx/timeouts with backoff honouring `Retry-After`, and moves on to
//!    the next candidate when retries are spent or the candidate went into a cooldown;
//! 3. settles the hold to the cost computed from the usage the provider reported (estimated and
//!    flagged when it reported none) and gives unused tokens back to the token-per-minute buckets.
//!
//! Other 4xx answers are the request's fault: returned at once, never retried.

pub mod limits;
pub mod providers;
pub mod served;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::SpanKind;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::governance::budgets::{Budgets, Hold, Spender};
use crate::records::AuditData;
use crate::spans::Span;
use crate::store::{RedisConn, StoreError};
use crate::telemetry::METRICS;
use limits::{Acquire, Bucket, LimitScope, LimitSpec, Limiter, OnLimit};
use providers::{CallError, ChunkStream, Provider, ProviderKind, ProviderSpec, Usage};

/// `gateway:` in the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Providers by name. `default` is overridden by `SWITCHYARD_LLM_BASE_URL` and
    /// `SWITCHYARD_LLM_API_KEY` (and created by them when absent).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSpec>,
    /// Model aliases by name: ordered candidates.
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasSpec>,
    /// Rate limits per provider and model.
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Prices per 1M tokens, by `provider/model` or by model name.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Retries of one candidate after a 429, 5xx, timeout or transport error.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff between retries (doubling), when the provider gave no `Retry-After`.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest `Retry-After` honoured before moving to the next candidate instead.
    #[serde(default = "default_max_retry_after_ms")]
    pub max_retry_after_ms: u64,
    #[serde(default)]
    pub cooldown: CooldownSpec,
    /// How long a budget hold lives when its call never settles (a crash).
    #[serde(default = "default_hold_seconds")]
    pub hold_seconds: u64,
    /// Output tokens assumed when neither the request nor the alias caps them.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Input tokens assumed for each content part that is not text (an image, audio or a file,
    /// which a provider bills far beyond the bytes of its URL): the hold counts them.
    #[serde(default = "default_media_part_tokens")]
    pub media_part_tokens: u64,
    /// API keys of the served endpoint (`/v1/chat/completions`), stored as SHA-256.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Longest a call of an alias with `on_exhausted: approve` waits for a person's decision.
    #[serde(default = "default_approval_wait_seconds")]
    pub approval_wait_seconds: u64,
    /// How many over-budget calls of one task (alias and budget) one approval lets through; the
    /// next one asks again.
    #[serde(default = "default_approval_covers_calls")]
    pub approval_covers_calls: u64,
}

fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_retry_after_ms() -> u64 {
    20_000
}
fn default_hold_seconds() -> u64 {
    900
}
fn default_media_part_tokens() -> u64 {
    2_000
}
fn default_max_tokens() -> u64 {
    1024
}
fn default_approval_wait_seconds() -> u64 {
    900
}
fn default_approval_covers_calls() -> u64 {
    10
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            providers: BTreeMap::new(),
            aliases: BTreeMap::new(),
            limits: Vec::new(),
            prices: BTreeMap::new(),
            retries: default_retries(),
            backoff_ms: default_backoff_ms(),
            max_retry_after_ms: default_max_retry_after_ms(),
            cooldown: CooldownSpec::default(),
            hold_seconds: default_hold_seconds(),
            default_max_tokens: default_max_tokens(),
            media_part_tokens: default_media_part_tokens(),
            keys: Vec::new(),
            approval_wait_seconds: default_approval_wait_seconds(),
            approval_covers_calls: default_approval_covers_calls(),
        }
    }
}

/// An alias: ordered candidates, tried until one answers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AliasSpec {
    pub candidates: Vec<Candidate>,
    /// Output-token cap applied when the request sets none (also the estimate's cap).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// What an exhausted budget does: refuse the call (`deny`) or use `downgrade_to`.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    /// A cheaper alias for `on_exhausted: downgrade`.
    #[serde(default)]
    pub downgrade_to: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExhausted {
    /// The call is refused (`budget_exhausted`, HTTP 429).
    #[default]
    Deny,
    /// The call moves to `downgrade_to`, a cheaper alias.
    Downgrade,
    /// The call waits for a person's approval (the approvals API, the CLI, the decisions topic),
    /// at most `gateway.approval_wait_seconds`; approved, it goes ahead over the budget (and is
    /// counted against it); rejected, expired or not decided in time, it is refused.
    Approve,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub provider: String,
    pub model: String,
}

/// Price per 1M tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input: f64,
    #[serde(default)]
    pub output: f64,
    /// Input tokens read from the provider's cache (the input price when unset).
    #[serde(default)]
    pub cached_input: Option<f64>,
    #[serde(default = "usd")]
    pub currency: String,
}

fn usd() -> String {
    "USD".into()
}

impl Price {
    fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cached.min(u.input);
        ((u.input - cached) as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + u.output as f64 * self.output)
            / 1e6
    }
}

/// When a failing candidate is put aside for every instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CooldownSpec {
    /// Failed attempts (after retries of one call count each) within a minute.
    #[serde(default = "default_failures")]
    pub failures: u32,
    #[serde(default = "default_cooldown_seconds")]
    pub seconds: u64,
}

fn default_failures() -> u32 {
    3
}
fn default_cooldown_seconds() -> u64 {
    30
}

impl Default for CooldownSpec {
    fn default() -> Self {
        CooldownSpec {
            failures: default_failures(),
            seconds: default_cooldown_seconds(),
        }
    }
}

/// An API key of the served endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Who calls (the agent name the calls are accounted to).
    pub name: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    pub key_sha256: String,
}

fn default_tenant() -> String {
    "default".into()
}

impl GatewayConfig {
    /// The config with the environment's default provider applied.
    pub fn effective(mut self) -> Self {
        let base = std::env::var("SWITCHYARD_LLM_BASE_URL")
            .ok()
            .filter(|v| !v.is_empty());
        let key_set = std::env::var("SWITCHYARD_LLM_API_KEY").is_ok_and(|v| !v.is_empty());
        if base.is_some() || (key_set && self.providers.contains_key("default")) {
            let p = self
                .providers
                .entry("default".into())
                .or_insert_with(|| ProviderSpec {
                    kind: ProviderKind::Openai,
                    base_url: String::new(),
                    api_key: None,
                    api_key_env: None,
                    api_key_file: None,
                    timeout_ms: 60_000,
                });
            if let Some(b) = base {
                p.base_url = b;
                p.kind = ProviderKind::Openai;
            }
            if key_set {
                p.api_key = None;
                p.api_key_file = None;
                p.api_key_env = Some("SWITCHYARD_LLM_API_KEY".into());
            }
        }
        self
    }

    /// Problems with the section, each with its path.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.approval_covers_calls == 0 {
            p.push((
                "gateway.approval_covers_calls".into(),
                "must be at least 1".into(),
            ));
        }
        for (name, spec) in &self.providers {
            if spec.base_url.is_empty() {
                p.push((
                    format!("gateway.providers.{name}.base_url"),
                    "is empty".into(),
                ));
            } else if !(spec.base_url.starts_with("http://")
                || spec.base_url.starts_with("https://"))
            {
                p.push((
                    format!("gateway.providers.{name}.base_url"),
                    "must start with http:// or https://".into(),
                ));
            }
            if let Err(e) = spec.key() {
                p.push((format!("gateway.providers.{name}"), e));
            }
        }
        for (name, a) in &self.aliases {
            if name.contains('/') {
                p.push((
                    format!("gateway.aliases.{name}"),
                    "an alias name may not contain '/' (that names provider/model)".into(),
                ));
            }
            if a.candidates.is_empty() {
                p.push((
                    format!("gateway.aliases.{name}.candidates"),
                    "lists no candidate".into(),
                ));
            }
            for (i, c) in a.candidates.iter().enumerate() {
                if !self.providers.contains_key(&c.provider) {
                    p.push((
                        format!("gateway.aliases.{name}.candidates[{i}].provider"),
                        format!("no provider named {:?}", c.provider),
                    ));
                }
            }
            match (&a.on_exhausted, &a.downgrade_to) {
                (OnExhausted::Downgrade, None) => p.push((
                    format!("gateway.aliases.{name}.downgrade_to"),
                    "is required by on_exhausted: downgrade".into(),
                )),
                (_, Some(d)) if !self.aliases.contains_key(d) || d == name => p.push((
                    format!("gateway.aliases.{name}.downgrade_to"),
                    format!("{d:?} is not another alias"),
                )),
                _ => {}
            }
        }
        for (i, l) in self.limits.iter().enumerate() {
            if !self.providers.contains_key(&l.provider) {
                p.push((
                    format!("gateway.limits[{i}].provider"),
                    format!("no provider named {:?}", l.provider),
                ));
            }
            if l.rpm.is_none() && l.tpm.is_none() {
                p.push((
                    format!("gateway.limits[{i}]"),
                    "sets neither rpm nor tpm".into(),
                ));
            }
            if l.rpm == Some(0) || l.tpm == Some(0) {
                p.push((format!("gateway.limits[{i}]"), "a limit of 0".into()));
            }
        }
        for (model, price) in &self.prices {
            let all = [Some(price.input), Some(price.output), price.cached_input];
            if all.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) {
                // A negative price would give a settle back more than its call held.
                p.push((
                    format!("gateway.prices.{model}"),
                    "prices must be finite and not negative".into(),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if !names.insert(k.name.as_str()) {
                // Calls are accounted to the name: two keys (of any tenants) would share budgets
                // and limits `per: agent`.
                p.push((
                    format!("gateway.keys[{i}].name"),
                    format!(
                        "{:?} names another key too; each key needs a name of its own",
                        k.name
                    ),
                ));
            }
            let ok =
                k.key_sha256.len() == 64 && k.key_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                p.push((
                    format!("gateway.keys[{i}].key_sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)".into(),
                ));
            }
        }
        p
    }
}

impl GatewayConfig {
    /// Candidates (`provider/model`) without a price: their calls cost 0, so no `max_cost` budget
    /// ever binds them (`switchyard run` warns when a budget has one).
    pub fn unpriced(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .aliases
            .values()
            .flat_map(|a| &a.candidates)
            .filter(|c| {
                !self
                    .prices
                    .contains_key(&format!("{}/{}", c.provider, c.model))
                    && !self.prices.contains_key(&c.model)
            })
            .map(|c| format!("{}/{}", c.provider, c.model))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The resource of calls that name none (`X-Switchyard-Resource` absent): their audit records and
/// over-budget approvals are about it.
pub const NO_RESOURCE: &str = "gateway";

/// Who calls, for budgets, limits and accounting.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub agent: String,
    pub workflow: String,
    pub task: String,
    /// The resource the call is about, when known (the audit record's subject).
    pub resource: String,
    /// The caller's W3C trace context (an agent attempt's span, or a `traceparent` header): the
    /// parent of the call's span.
    pub traceparent: Option<String>,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    /// No alias or provider/model of that name.
    UnknownModel(String),
    /// The request is malformed, or a provider refused it (4xx other than 429).
    BadRequest(String),
    /// A budget has no room (`deny`).
    BudgetExhausted { budget: String },
    /// Every candidate is rate limited or cooling down.
    RateLimited { retry_after: Duration },
    /// Every candidate failed.
    ProviderFailed(String),
    /// Redis (limits, budgets) is unavailable.
    Unavailable(String),
    /// The caller went away before an attempt was sent (none was).
    CallerGone,
}

impl GatewayError {
    /// The outcome named in the audit record.
    pub fn outcome(&self) -> &'static str {
        match self {
            GatewayError::UnknownModel(_) => "unknown_model",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::BudgetExhausted { .. } => "budget_exhausted",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::ProviderFailed(_) => "provider_failed",
            GatewayError::Unavailable(_) => "unavailable",
            GatewayError::CallerGone => "caller_gone",
        }
    }

    /// The HTTP status of the served endpoint.
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::UnknownModel(_) => 404,
            GatewayError::BadRequest(_) => 400,
            GatewayError::BudgetExhausted { .. } | GatewayError::RateLimited { .. } => 429,
            GatewayError::ProviderFailed(_) => 502,
            GatewayError::Unavailable(_) => 503,
            // nginx's "client closed request": nobody reads it.
            GatewayError::CallerGone => 499,
        }
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayError::UnknownModel(m) => write!(f, "the model {m:?} does not exist"),
            GatewayError::BadRequest(m) => write!(f, "{m}"),
            GatewayError::BudgetExhausted { budget } => {
                write!(f, "budget {budget:?} is exhausted")
            }
            GatewayError::RateLimited { retry_after } => {
                write!(f, "rate limited; retry in {} ms", retry_after.as_millis())
            }
            GatewayError::ProviderFailed(m) => write!(f, "every provider failed: {m}"),
            GatewayError::Unavailable(m) => write!(f, "gateway state unavailable: {m}"),
            GatewayError::CallerGone => write!(f, "the caller went away before the call was sent"),
        }
    }
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        GatewayError::Unavailable(e.to_string())
    }
}

/// What a finished call leaves to settle in Redis ([`Gateway::settle`]).
struct Books {
    hold: Option<Hold>,
    buckets: Vec<Bucket>,
    est: Usage,
    used: u64,
    cost: f64,
}

/// A completed call.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The answer in OpenAI's chat-completion shape.
    pub body: Value,
    pub meta: CallMeta,
}

/// What the gateway accounts for a call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallMeta {
    pub alias: String,
    pub provider: String,
    pub model: String,
    pub usage: Usage,
    /// The provider reported no usage: tokens and cost are estimates.
    pub usage_estimated: bool,
    pub cost: f64,
    pub currency: String,
    pub attempts: u32,
    pub latency_ms: u64,
}

/// The configured gateway.
pub struct Gateway {
    cfg: GatewayConfig,
    providers: BTreeMap<String, Arc<Provider>>,
    limiter: Limiter,
    budgets: Arc<Budgets>,
    recorder: Option<Recorder>,
    /// Where over-budget calls of `on_exhausted: approve` aliases ask a person.
    approvals: Option<(
        Arc<crate::governance::approvals::Approvals>,
        crate::kafka::Producer,
    )>,
}

/// Where the gateway writes what each call did: an `llm_call` audit record sealed into this
/// process's audit chain (never the prompt or the answer), and the call's transcript (request and
/// answer, capped) on the llm-calls topic, keyed by task id.
pub struct Recorder {
    pub audit: crate::audit::Recorder,
    /// The transcripts' topic (`topics.llm_calls`).
    pub calls_topic: String,
}

/// Largest transcript written; beyond it the request's messages and the answer are cut.
const MAX_TRANSCRIPT_BYTES: usize = 256 * 1024;

/// A call's transcript record: what was asked and answered, capped at [`MAX_TRANSCRIPT_BYTES`]
/// (the request's messages and the answer then become a prefix of their JSON, marked truncated).
fn transcript(
    caller: &Caller,
    model: &str,
    meta: Option<&CallMeta>,
    outcome: &str,
    request: &Map<String, Value>,
    response: &Value,
) -> Value {
    let mut t = serde_json::json!({
        "task_id": caller.task, "tenant": caller.tenant, "agent": caller.agent, "resource": caller.resource,
        "model": model, "meta": meta, "outcome": outcome, "request": request, "response": response,
        "truncated": false,
    });
    if t.to_string().len() > MAX_TRANSCRIPT_BYTES {
        let cut = |v: &Value| {
            let text = v.to_string();
            let mut end = (MAX_TRANSCRIPT_BYTES / 3).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Value::String(text[..end].to_string())
        };
        if let Some(m) = t["request"].get_mut("messages") {
            *m = cut(m);
        }
        t["response"] = cut(&t["response"]);
        t["truncated"] = Value::Bool(true);
    }
    t
}

/// A request's model resolved: alias name (or `provider/model`), candidates, output cap.
struct Route {
    alias: String,
    candidates: Vec<Candidate>,
    max_tokens: Option<u64>,
    on_exhausted: OnExhausted,
    downgrade_to: Option<String>,
}

/// What a call that got no answer spent on its attempts (set by [`Gateway::try_candidates`] once
/// one was sent): the route, the last candidate tried, the attempts, and the estimates charged for
/// those the provider most likely billed ([`Gateway::billed`]) — for the call's `llm_call` record.
type Tally = std::sync::Mutex<Option<CallMeta>>;

fn lock_tally(t: &Tally) -> std::sync::MutexGuard<'_, Option<CallMeta>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// A candidate's successful attempt: its answer, the candidate, the limit buckets it was charged
/// to, and the attempts the call took (every candidate's counted).
struct Answered<T> {
    value: T,
    candidate: Candidate,
    buckets: Vec<Bucket>,
    attempts: u32,
    /// What the failed attempts before the answer are charged ([`Gateway::billed`]).
    billed: f64,
}

/// The attempts a call sent so far: how many, what those the provider most likely billed were
/// charged, and the last candidate sent to.
#[derive(Default)]
struct Tried {
    attempts: u32,
    billed: f64,
    /// The estimates of the attempts charged.
    charged: Usage,
    last: Option<Candidate>,
}

/// What a candidate's admission decided.
enum Admit {
    Go(Vec<Bucket>),
    /// Limited or cooling: try the next candidate; say how long until this one has room.
    Skip(Duration, &'static str),
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        conn: RedisConn,
        prefix: &str,
        budgets: Arc<Budgets>,
    ) -> Result<Self, String> {
        let cfg = cfg.effective();
        if let Some((path, why)) = cfg.problems().into_iter().next() {
            return Err(format!("{path}: {why}"));
        }
        let providers = cfg
            .providers
            .iter()
            .map(|(name, spec)| {
                if let (Some(var), Ok(None)) = (&spec.api_key_env, spec.key()) {
                    tracing::warn!(provider = %name, variable = %var, "The provider's API key variable is not set; its calls go out without a key.");
                }
                Ok((name.clone(), Arc::new(Provider::new(name, spec)?)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Gateway {
            limiter: Limiter::new(conn, prefix),
            cfg,
            providers,
            budgets,
            recorder: None,
            approvals: None,
        })
    }

    /// Lets calls of `on_exhausted: approve` aliases wait for a person (records produced with
    /// `producer`).
    pub fn with_approvals(
        mut self,
        approvals: Arc<crate::governance::approvals::Approvals>,
        producer: crate::kafka::Producer,
    ) -> Self {
        self.approvals = Some((approvals, producer));
        self
    }

    /// Writes an `llm_call` audit record for every call.
    pub fn with_recorder(mut self, r: Recorder) -> Self {
        self.recorder = Some(r);
        self
    }

    /// Records a call that got no answer, with what its attempts were charged when any was sent
    /// ([`Tally`]).
    fn record_failure(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        req: &Map<String, Value>,
        (e, spent): (&GatewayError, &Tally),
        took: Duration,
    ) {
        let error = Some(e.to_string());
        let spent = lock_tally(spent).take().map(|mut m| {
            m.latency_ms = took.as_millis() as u64;
            m
        });
        self.record(
            caller,
            model,
            spent.as_ref(),
            e.outcome(),
            error,
            req,
            &Value::Null,
            took,
        );
    }

    /// Records a call's outcome in the audit trail, in the background (the caller does not wait
    /// for the seal and the broker; a failure is logged).
    #[allow(clippy::too_many_arguments)]
    fn record(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        meta: Option<&CallMeta>,
        outcome: &str,
        error: Option<String>,
        request: &Map<String, Value>,
        response: &Value,
        took: Duration,
    ) {
        let span = self.span(caller, model, meta, outcome, error.as_deref(), took);
        if self.recorder.is_none() {
            return;
        }
        let script = transcript(caller, model, meta, outcome, request, response);
        let detail = serde_json::json!({
            "agent": caller.agent, "task_id": caller.task, "model": model,
            "alias": meta.map(|m| m.alias.clone()), "provider": meta.map(|m| m.provider.clone()),
            "provider_model": meta.map(|m| m.model.clone()),
            "input_tokens": meta.map(|m| m.usage.input), "output_tokens": meta.map(|m| m.usage.output),
            "cached_tokens": meta.map(|m| m.usage.cached), "usage_estimated": meta.map(|m| m.usage_estimated),
            "cost": meta.map(|m| m.cost), "currency": meta.map(|m| m.currency.clone()),
            "attempts": meta.map(|m| m.attempts), "latency_ms": meta.map(|m| m.latency_ms),
            "outcome": outcome, "error": error,
        });
        let audit = AuditData {
            decision: "llm_call".into(),
            stage: "gateway".into(),
            // Every audit record is about a resource: a call that names none is the gateway's own.
            resource: if caller.resource.is_empty() {
                NO_RESOURCE.to_string()
            } else {
                caller.resource.clone()
            },
            tenant: caller.tenant.clone(),
            event_id: None,
            task_id: (!caller.task.is_empty()).then(|| caller.task.clone()),
            workflow_id: (!caller.workflow.is_empty()).then(|| caller.workflow.clone()),
            trace_id: crate::records::trace_id(caller.traceparent.as_deref()),
            reason: (outcome != "ok").then(|| outcome.to_string()),
            detail,
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let Some(r) = &self.recorder else { return };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let ev = crate::event::CloudEvent::new(
            format!("llm-{id}"),
            "switchyard/gateway",
            "switchyard.llm_call",
        )
        .with_subject(audit.task_id.clone().unwrap_or_default())
        .with_time(&now)
        .with_data(script);
        let ev = match span.or_else(|| caller.traceparent.clone()) {
            Some(tp) => ev.with_extension("traceparent", tp),
            None => ev,
        };
        r.audit.record(
            "gateway",
            "llm_call",
            audit,
            Some((r.calls_topic.clone(), ev)),
        );
    }

    /// Exports the call's span (OpenTelemetry GenAI conventions) under the caller's trace
    /// context; its `traceparent`, when it has one.
    fn span(
        &self,
        caller: &Caller,
        model: &str,
        meta: Option<&CallMeta>,
        outcome: &str,
        error: Option<&str>,
        took: Duration,
    ) -> Option<String> {
        let mut span = Span::random(format!("chat {model}"), caller.traceparent.as_deref())
            .kind(SpanKind::Client)
            .started_at(SystemTime::now() - took);
        span.attr("gen_ai.operation.name", "chat")
            .attr("gen_ai.request.model", model.to_string())
            .attr("switchyard.llm.outcome", outcome.to_string());
        if let Some(m) = meta {
            let system = match self.providers.get(&m.provider).map(|p| p.kind) {
                Some(ProviderKind::Anthropic) => "anthropic",
                _ => "openai",
            };
            span.attr("gen_ai.system", system)
                .attr("gen_ai.provider.name", system)
                .attr("gen_ai.response.model", m.model.clone())
                .attr("gen_ai.usage.input_tokens", m.usage.input as i64)
                .attr("gen_ai.usage.output_tokens", m.usage.output as i64)
                .attr("switchyard.llm.provider", m.provider.clone())
                .attr("switchyard.llm.alias", m.alias.clone())
                .attr("switchyard.llm.cost", m.cost)
                .attr("switchyard.llm.usage_estimated", m.usage_estimated)
                .attr("switchyard.llm.attempts", i64::from(m.attempts));
        }
        if let Some(e) = error {
            span.fail(e.to_string());
        }
        let tp = span.traceparent();
        span.end();
        tp
    }

    /// The models callers may name: aliases, then every `provider/model` of a candidate.
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = self.cfg.aliases.keys().cloned().collect();
        for a in self.cfg.aliases.values() {
            for c in &a.candidates {
                let m = format!("{}/{}", c.provider, c.model);
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        out
    }

    /// The API keys of the served endpoint.
    pub fn keys(&self) -> &[KeySpec] {
        &self.cfg.keys
    }

    /// Why `model` names no alias or candidate, or `None` (agents check their model at start).
    pub fn unknown_model(&self, model: &str) -> Option<String> {
        self.route(model)
            .err()
            .map(|e| format!("{e}; the gateway has {}", self.models().join(", ")))
    }

    fn route(&self, model: &str) -> Result<Route, GatewayError> {
        if let Some(a) = self.cfg.aliases.get(model) {
            return Ok(Route {
                alias: model.to_string(),
                candidates: a.candidates.clone(),
                max_tokens: a.max_tokens,
                on_exhausted: a.on_exhausted,
                downgrade_to: a.downgrade_to.clone(),
            });
        }
        // `provider/model` of an alias's candidate: that alias pinned to that candidate (its budgets,
        // limits, output cap and `on_exhausted` apply). Any other name is unknown: a model nobody
        // configured has no price (its cost would count as nothing against a budget) and would be a
        // new metric series per name.
        if let Some((provider, m)) = model.split_once('/') {
            let pinned = self.cfg.aliases.iter().find_map(|(name, a)| {
                a.candidates
                    .iter()
                    .find(|c| c.provider == provider && c.model == m)
                    .map(|c| (name, a, c))
            });
            if let Some((name, a, c)) = pinned {
                return Ok(Route {
                    alias: name.clone(),
                    candidates: vec![c.clone()],
                    max_tokens: a.max_tokens,
                    on_exhausted: a.on_exhausted,
                    downgrade_to: a.downgrade_to.clone(),
                });
            }
        }
        Err(GatewayError::UnknownModel(model.to_string()))
    }

    /// How long a call's budget hold lives unsettled: `hold_seconds`, or longer when a call of
    /// the route can take longer (every attempt of every candidate waiting out its rate limits and
    /// timing out, with the waits between, plus a minute) — a hold given back while its call still
    /// runs would let its room be spent twice. A stream has no overall deadline (not counted).
    fn hold_ms(&self, route: &Route) -> u64 {
        let attempts = u64::from(self.cfg.retries) + 1;
        let between = u64::from(self.cfg.retries)
            .saturating_mul(self.cfg.max_retry_after_ms.max(self.cfg.backoff_ms));
        let longest = route
            .candidates
            .iter()
            .map(|c| {
                let timeout = self
                    .providers
                    .get(&c.provider)
                    .map_or(0, |p| p.timeout_ms());
                let wait = self
                    .cfg
                    .limits
                    .iter()
                    .filter(|l| l.provider == c.provider)
                    .map(|l| l.max_wait_ms)
                    .max()
                    .unwrap_or(0);
                attempts
                    .saturating_mul(timeout.saturating_add(wait))
                    .saturating_add(between)
            })
            .fold(0u64, u64::saturating_add);
        self.cfg
            .hold_seconds
            .saturating_mul(1000)
            .max(longest.saturating_add(60_000))
    }

    fn price(&self, c: &Candidate) -> Option<&Price> {
        self.cfg
            .prices
            .get(&format!("{}/{}", c.provider, c.model))
            .or_else(|| self.cfg.prices.get(&c.model))
    }

    /// Input tokens guessed from the request's size (about four bytes a token) and the output cap.
    fn estimate(&self, route: &Route, req: &Map<String, Value>) -> Usage {
        let bytes: usize = ["messages", "tools", "system"]
            .iter()
            .filter_map(|k| req.get(*k))
            .map(|v| v.to_string().len())
            .sum();
        // Each of `n` choices may say as much as the cap.
        let choices = req.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
        // Parts that are not text (`image_url`, `input_audio`, `file`, Anthropic's `image`…):
        // a URL of a few bytes can be thousands of tokens.
        let media = req
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("content").and_then(Value::as_array))
            .flatten()
            .filter(|part| part.get("type").and_then(Value::as_str) != Some("text"))
            .count() as u64;
        Usage {
            input: (bytes as u64)
                .div_ceil(4)
                .saturating_add(media.saturating_mul(self.cfg.media_part_tokens)),
            output: self.output_cap(route, req).saturating_mul(choices),
            cached: 0,
        }
    }

    /// The output cap of one choice: the request's, else the alias's, else the default.
    /// With both `max_tokens` and `max_completion_tokens`, the larger (a provider may honour
    /// either; [`cap`] then sends both at this value), and never more than
    /// [`providers::MAX_USAGE_TOKENS`].
    fn output_cap(&self, route: &Route, req: &Map<String, Value>) -> u64 {
        CAP_FIELDS
            .iter()
            .filter_map(|k| req.get(*k).and_then(Value::as_u64))
            .max()
            .or(route.max_tokens)
            .unwrap_or(self.cfg.default_max_tokens)
            .min(providers::MAX_USAGE_TOKENS)
    }

    /// The costliest candidate's price for `u` (the hold must cover whichever answers).
    fn worst_cost(&self, route: &Route, u: &Usage) -> f64 {
        route
            .candidates
            .iter()
            .filter_map(|c| self.price(c))
            .map(|p| p.cost(u))
            .fold(0.0, f64::max)
    }

    /// Holds the estimate against the budgets; on exhaustion denies or moves to the downgrade
    /// alias. Returns the route to use and the hold.
    async fn hold(
        &self,
        caller: &Caller,
        mut route: Route,
        req: &Map<String, Value>,
        gone: &CancellationToken,
    ) -> Result<(Route, Option<Hold>, Usage), GatewayError> {
        for _ in 0..4 {
            let est = self.estimate(&route, req);
            if self.budgets.is_empty() {
                return Ok((route, None, est));
            }
            let spender = Spender {
                agent: &caller.agent,
                workflow: &caller.workflow,
                tenant: &caller.tenant,
                model: &route.alias,
            };
            let cost = self.worst_cost(&route, &est);
            match self
                .budgets
                .hold(&spender, cost, self.hold_ms(&route))
                .await?
            {
                Ok(h) => return Ok((route, Some(h), est)),
                Err(budget) => {
                    METRICS.budget_refusals.with_label_values(&[&budget]).inc();
                    match (&route.on_exhausted, route.downgrade_to.clone()) {
                        (OnExhausted::Downgrade, Some(d)) => {
                            tracing::info!(alias = %route.alias, to = %d, budget = %budget, "Budget exhausted; downgrading the call.");
                            route = self.route(&d)?;
                        }
                        (OnExhausted::Approve, _) => {
                            self.approved_overrun(caller, &route.alias, &budget, cost, gone)
                                .await?;
                            let h = self
                                .budgets
                                .hold_over(&spender, cost, self.hold_ms(&route))
                                .await?;
                            return Ok((route, Some(h), est));
                        }
                        _ => return Err(GatewayError::BudgetExhausted { budget }),
                    }
                }
            }
        }
        Err(GatewayError::BadRequest(
            "downgrade aliases form a loop".into(),
        ))
    }

    /// Asks a person to let a call go over `budget` and waits for the decision (polling the
    /// approval, at most `approval_wait_seconds`): `Ok` when approved, `BudgetExhausted` when
    /// rejected, expired, not decided in time, or when no approvals service is configured. One
    /// approval per task, alias and budget, so a retried call waits on the same one.
    async fn approved_overrun(
        &self,
        caller: &Caller,
        alias: &str,
        budget: &str,
        estimate: f64,
        gone: &CancellationToken,
    ) -> Result<(), GatewayError> {
        let exhausted = || GatewayError::BudgetExhausted {
            budget: budget.to_string(),
        };
        let Some((approvals, producer)) = &self.approvals else {
            tracing::warn!(alias, budget, "on_exhausted: approve, but this process has no approvals service; the call is refused.");
            return Err(exhausted());
        };
        let resource = if caller.resource.is_empty() {
            NO_RESOURCE
        } else {
            caller.resource.as_str()
        };
        // Calls that name no task share one per agent and hour (a fresh one per call let a caller
        // in a loop open an approval with every call, even calls it abandoned at once; one for
        // good would let a rejection or expiry refuse the agent's calls until it is forgotten).
        let basis = if caller.task.is_empty() {
            format!(
                "agent:{}:{}",
                caller.agent,
                chrono::Utc::now().format("%Y%m%d%H")
            )
        } else {
            caller.task.clone()
        };
        // One approval covers `approval_covers_calls` calls of the task that went through (its
        // loop, its retries); then the next asks again — an approval is not a standing permit for
        // a caller that keeps calling under one task id. A refused call counts nothing, so a
        // rejection stays final. The caller's tenant and resource are part of it: a task id is the
        // caller's word, and another tenant naming the same one must not share its approval.
        let permit = crate::pattern::stable_id(&[
            "llm.over_budget",
            &caller.tenant,
            resource,
            &basis,
            alias,
            budget,
        ]);
        let covers = self.cfg.approval_covers_calls;
        'round: loop {
            let n = self.limiter.overrun_calls(&permit).await?;
            let round = n / covers;
            let action_id = if round == 0 {
                format!("act-{permit}")
            } else {
                format!(
                    "act-{}",
                    crate::pattern::stable_id(&[&permit, &round.to_string()])
                )
            };
            let action = crate::records::ActionData {
                action_id,
                action: "llm.over_budget".into(),
                resource: resource.to_string(),
                tenant: caller.tenant.clone(),
                workflow_id: caller.workflow.clone(),
                parameters: serde_json::json!({"alias": alias, "budget": budget, "estimated_cost": estimate,
                                           "agent": caller.agent, "task": caller.task,
                                           "calls": covers, "round": round}),
                fencing_token: 0,
                proposals: serde_json::json!([]),
                agents: serde_json::json!([caller.agent]),
                priority: 0,
                impact: crate::records::Impact::Medium,
                approved_by: None,
                reason: Some(format!("budget {budget} is exhausted")),
            };
            if gone.is_cancelled() {
                // Its caller gave up already: no approval for nobody.
                return Err(exhausted());
            }
            let key = crate::store::ResourceKey::new(&caller.tenant, resource);
            let unavailable = |e: crate::governance::approvals::ApprovalError| {
                GatewayError::Unavailable(format!("approval of an over-budget call: {e}"))
            };
            let (approval, outputs) = approvals.request(&key, action).await.map_err(unavailable)?;
            for o in &outputs {
                producer.send(o).await.map_err(|e| {
                    // Its seal may be lost: the chain re-seals from what it knows delivered.
                    approvals.sealer.distrust(&approvals.sealer.own_chain);
                    GatewayError::Unavailable(format!("approval request not written: {e}"))
                })?;
            }
            if !outputs.is_empty() {
                // Written: a retry asks again without producing them again.
                approvals
                    .sent_request(&approval.approval_id)
                    .await
                    .map_err(unavailable)?;
            }
            tracing::info!(approval_id = %approval.approval_id, alias, budget, agent = %caller.agent, "Budget exhausted; the call waits for a person's approval.");
            let deadline = Instant::now() + Duration::from_secs(self.cfg.approval_wait_seconds);
            loop {
                let status = approvals
                    .get(&approval.approval_id)
                    .await
                    .map_err(unavailable)?
                    .map(|s| s.approval.status)
                    .unwrap_or_default();
                match status.as_str() {
                    "approved" => {
                        // Counted within its round, atomically (calls at once cannot stretch a
                        // round); kept longer than approvals are, from each call, so a count gone
                        // while its round's approval is still kept cannot let that approval cover
                        // its calls again. The slot is the call's once approved, whether or not it
                        // then gets room under the limits.
                        let keep = approvals.config.keep_decided_seconds + 86_400;
                        if self
                            .limiter
                            .count_overrun(&permit, (round, covers), keep)
                            .await?
                        {
                            return Ok(());
                        }
                        // Other calls used this round up meanwhile: the next round's approval.
                        continue 'round;
                    }
                    "pending" | "escalated" if Instant::now() < deadline => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = gone.cancelled() => {
                                // Its caller gave up (an agent's deadline): no call for nobody.
                                tracing::info!(approval_id = %approval.approval_id, "The over-budget call's caller went away; it no longer waits.");
                                return Err(exhausted());
                            }
                        }
                    }
                    _ => {
                        tracing::info!(approval_id = %approval.approval_id, status = %status, "The over-budget call was not approved; refused.");
                        return Err(exhausted());
                    }
                }
            }
        }
    }

    /// The buckets of a candidate's limits for a caller, costing one request and `tokens`.
    fn buckets(&self, c: &Candidate, caller: &Caller, tokens: u64) -> Vec<(Bucket, &LimitSpec)> {
        let mut out = Vec::new();
        for l in &self.cfg.limits {
            if l.provider != c.provider || (l.model != "*" && l.model != c.model) {
                continue;
            }
            let who = match l.per {
                LimitScope::All => None,
                LimitScope::Agent => Some(("agent", caller.agent.as_str())),
                LimitScope::Tenant => Some(("tenant", caller.tenant.as_str())),
            };
            if let Some(rpm) = l.rpm {
                out.push((
                    Bucket {
                        key: self.limiter.bucket_key(&l.provider, &l.model, "rpm", who),
                        capacity: rpm as f64,
                        rate: rpm as f64 / 60_000.0,
                        cost: 1.0,
                        tokens: false,
                    },
                    l,
                ));
            }
            if let Some(tpm) = l.tpm {
                out.push((
                    Bucket {
                        key: self.limiter.bucket_key(&l.provider, &l.model, "tpm", who),
                        capacity: tpm as f64,
                        rate: tpm as f64 / 60_000.0,
                        cost: tokens as f64,
                        tokens: true,
                    },
                    l,
                ));
            }
        }
        out
    }

    /// Takes room for one request of a candidate: waits while a limit says so (bounded), or
    /// skips the candidate.
    async fn admit(
        &self,
        c: &Candidate,
        caller: &Caller,
        tokens: u64,
        gone: &CancellationToken,
    ) -> Result<Admit, GatewayError> {
        let with_specs = self.buckets(c, caller, tokens);
        let failover = with_specs
            .iter()
            .any(|(_, l)| l.on_limit == OnLimit::Failover);
        let max_wait = with_specs
            .iter()
            .map(|(_, l)| l.max_wait_ms)
            .min()
            .unwrap_or(0);
        let buckets: Vec<Bucket> = with_specs.into_iter().map(|(b, _)| b).collect();
        let started = Instant::now();
        loop {
            match self
                .limiter
                .acquire(&c.provider, &c.model, &buckets)
                .await?
            {
                Acquire::Granted => return Ok(Admit::Go(buckets)),
                Acquire::Cooling(ms) => {
                    return Ok(Admit::Skip(Duration::from_millis(ms), "cooling"))
                }
                Acquire::Wait(ms) => {
                    let waited = started.elapsed().as_millis() as u64;
                    if failover || waited + ms > max_wait {
                        return Ok(Admit::Skip(Duration::from_millis(ms), "rate_limited"));
                    }
                    // Nothing was taken yet: a caller that leaves ends the wait (and the call).
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                        _ = gone.cancelled() => return Err(GatewayError::CallerGone),
                    }
                }
            }
        }
    }

    fn count(c: &Candidate, outcome: &str) {
        METRICS
            .llm_requests
            .with_label_values(&[&c.provider, &c.model, outcome])
            .inc();
    }

    /// One chat completion through the gateway, accounted in the audit trail.
    pub async fn complete(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        req: &Map<String, Value>,
    ) -> Result<Completion, GatewayError> {
        let (gw, caller, model, req) =
            (self.clone(), caller.clone(), model.to_string(), req.clone());
        // On its own task: a caller that gives up (an agent's deadline) does not cut the call
        // short between paying and accounting; a late answer is accounted, then dropped. The
        // budget is settled before the answer goes out (the caller's next call is held against
        // what this one cost, not its estimate); the rate limits get their unused tokens back
        // right after it (until then they count the estimate: fewer calls pass, never more).
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let t0 = Instant::now();
            // Told when the caller went away, so that a wait for a person's approval (which can
            // outlast an agent's deadline many times) ends instead of making a call for nobody.
            let gone = CancellationToken::new();
            let spent = Tally::default();
            let call = gw.call(&caller, &model, &req, (&gone, &spent));
            tokio::pin!(call);
            let answered = tokio::select! {
                r = &mut call => r,
                _ = tx.closed() => {
                    gone.cancel();
                    call.await
                }
            };
            match answered {
                Ok((c, mut books)) => {
                    gw.settle_budget(&mut books).await;
                    gw.record(
                        &caller,
                        &model,
                        Some(&c.meta),
                        "ok",
                        None,
                        &req,
                        &c.body,
                        t0.elapsed(),
                    );
                    let _ = tx.send(Ok(c));
                    gw.settle(books).await;
                }
                Err(e) => {
                    gw.record_failure(&caller, &model, &req, (&e, &spent), t0.elapsed());
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(GatewayError::Unavailable(
                "the call's task failed before answering".into(),
            ))
        })
    }

    async fn call(
        &self,
        caller: &Caller,
        model: &str,
        req: &Map<String, Value>,
        (gone, spent): (&CancellationToken, &Tally),
    ) -> Result<(Completion, Books), GatewayError> {
        let started = Instant::now();
        let route = self.route(model)?;
        let (route, hold, est) = self.hold(caller, route, req, gone).await?;
        let req = &cap(req, self.output_cap(&route, req));
        let a = self
            .try_candidates(
                caller,
                &route,
                (hold.as_ref(), gone, spent),
                &est,
                |p, m| async move { p.complete(&m, req).await },
            )
            .await?;
        let ((body, usage), c) = (a.value, a.candidate);
        let (usage, estimated) = match usage {
            Some(u) => (u, false),
            None => (estimate_answer(&est, &body), true),
        };
        let (meta, books) = self.account(
            caller,
            &route.alias,
            &c,
            hold,
            a.buckets,
            &est,
            usage,
            estimated,
            (a.attempts, a.billed),
            started,
        );
        Ok((Completion { body, meta }, books))
    }

    /// Tries the route's candidates in order, each with its retries, until `send` (one request to
    /// a provider's model) succeeds. On a refusal (4xx other than 429), or once every candidate
    /// failed, cooled down or was rate limited, the hold is released and the error returned.
    /// Once `gone` (the caller went away), no further attempt is sent — a retry's backoff ends at
    /// once — and the hold is released: no call is made and paid for nobody.
    /// A call that gets no answer after sending an attempt leaves what it spent in `spent`.
    async fn try_candidates<T, F, Fut>(
        &self,
        caller: &Caller,
        route: &Route,
        (hold, gone, spent): (Option<&Hold>, &CancellationToken, &Tally),
        est: &Usage,
        send: F,
    ) -> Result<Answered<T>, GatewayError>
    where
        F: Fn(Arc<Provider>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let mut tried = Tried::default();
        let r = self
            .send_to_candidates(caller, route, (hold, gone), est, send, &mut tried)
            .await;
        if let (Err(_), Some(c)) = (&r, &tried.last) {
            let price = self.price(c);
            *lock_tally(spent) = Some(CallMeta {
                alias: route.alias.clone(),
                provider: c.provider.clone(),
                model: c.model.clone(),
                // What the charged attempts were charged for: their estimates.
                usage: tried.charged,
                usage_estimated: true,
                cost: tried.billed,
                currency: price.map(|p| p.currency.clone()).unwrap_or_else(usd),
                attempts: tried.attempts,
                latency_ms: 0,
            });
        }
        r
    }

    async fn send_to_candidates<T, F, Fut>(
        &self,
        caller: &Caller,
        route: &Route,
        (hold, gone): (Option<&Hold>, &CancellationToken),
        est: &Usage,
        send: F,
        tried: &mut Tried,
    ) -> Result<Answered<T>, GatewayError>
    where
        F: Fn(Arc<Provider>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let mut last = String::from("no candidate was tried");
        let mut soonest: Option<Duration> = None;
        let mut all_limited = true;
        for c in &route.candidates {
            let Some(provider) = self.providers.get(&c.provider) else {
                continue;
            };
            let mut attempt = 0;
            loop {
                if gone.is_cancelled() {
                    tracing::info!(tenant = %caller.tenant, agent = %caller.agent, task = %caller.task, attempts = tried.attempts, "The call's caller went away; no further attempt is sent.");
                    self.settle_failed(hold, tried.billed).await;
                    return Err(GatewayError::CallerGone);
                }
                let buckets = match self
                    .admit(c, caller, est.input.saturating_add(est.output), gone)
                    .await
                {
                    Ok(Admit::Go(b)) if gone.is_cancelled() => {
                        // Admitted just as its caller left: nothing is sent, the tokens go back.
                        self.give_back(&b, est, 0).await;
                        self.settle_failed(hold, tried.billed).await;
                        return Err(GatewayError::CallerGone);
                    }
                    Ok(Admit::Go(b)) => b,
                    Ok(Admit::Skip(after, why)) => {
                        Self::count(c, why);
                        soonest = Some(soonest.map_or(after, |s| s.min(after)));
                        last = format!("{}/{}: {why}", c.provider, c.model);
                        break;
                    }
                    Err(e) => {
                        self.settle_failed(hold, tried.billed).await;
                        return Err(e);
                    }
                };
                all_limited = false;
                tried.attempts += 1;
                tried.last = Some(c.clone());
                attempt += 1;
                let t0 = Instant::now();
                let r = send(provider.clone(), c.model.clone()).await;
                METRICS
                    .llm_duration
                    .with_label_values(&[&c.provider])
                    .observe(t0.elapsed().as_secs_f64());
                match r {
                    Ok(value) => {
                        Self::count(c, "ok");
                        let _ = self.limiter.succeeded(&c.provider, &c.model).await;
                        return Ok(Answered {
                            value,
                            candidate: c.clone(),
                            buckets,
                            attempts: tried.attempts,
                            billed: tried.billed,
                        });
                    }
                    Err(CallError::Rejected { status, message }) => {
                        Self::count(c, "rejected");
                        self.give_back(&buckets, est, 0).await;
                        self.settle_failed(hold, tried.billed).await;
                        return Err(GatewayError::BadRequest(format!(
                            "{}/{} refused the request ({status}): {message}",
                            c.provider, c.model
                        )));
                    }
                    Err(e) => {
                        Self::count(c, e.kind());
                        if matches!(
                            e,
                            CallError::Timeout | CallError::Broken(_) | CallError::Malformed(_)
                        ) {
                            // The provider most likely processed (and bills) it: its estimate is
                            // charged, and its tokens stay counted against the rate limits.
                            tried.billed += self.billed(c, est);
                            tried.charged.input = tried.charged.input.saturating_add(est.input);
                            tried.charged.output = tried.charged.output.saturating_add(est.output);
                        } else {
                            self.give_back(&buckets, est, 0).await;
                        }
                        last = format!("{}/{}: {e}", c.provider, c.model);
                        tracing::warn!(provider = %c.provider, model = %c.model, attempt, error = %e, "Model call failed.");
                        let cooled = self
                            .limiter
                            .failed(
                                &c.provider,
                                &c.model,
                                self.cfg.cooldown.failures,
                                self.cfg.cooldown.seconds * 1000,
                            )
                            .await
                            .unwrap_or(false);
                        if cooled {
                            tracing::warn!(provider = %c.provider, model = %c.model, seconds = self.cfg.cooldown.seconds, "Candidate put in a cooldown for every instance.");
                        }
                        if cooled || attempt > self.cfg.retries {
                            break;
                        }
                        let wait = match &e {
                            CallError::Retryable {
                                retry_after: Some(d),
                                ..
                            } => *d,
                            _ => Duration::from_millis(
                                self.cfg
                                    .backoff_ms
                                    .saturating_mul(1 << (attempt - 1).min(10)),
                            ),
                        };
                        if wait.as_millis() as u64 > self.cfg.max_retry_after_ms {
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = gone.cancelled() => {}
                        }
                    }
                }
            }
        }
        self.settle_failed(hold, tried.billed).await;
        match soonest {
            Some(after) if all_limited => Err(GatewayError::RateLimited { retry_after: after }),
            _ => Err(GatewayError::ProviderFailed(last)),
        }
    }

    /// A streamed chat completion: OpenAI chunks, then (once the stream ends) the call is settled.
    /// Falls back to the next candidate only before the first chunk.
    pub async fn stream(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        req: &Map<String, Value>,
    ) -> Result<(CallMeta, ChunkStream), GatewayError> {
        // Opened by a task of its own, as `complete` calls: a caller that goes away while the
        // stream opens drops this future, not the call. Before an attempt is sent (waiting for a
        // person, for room under a limit, for a retry) the call then ends and settles; once sent,
        // it opens, and its stream, dropped unread, settles the hold and writes the call's record
        // (instead of the hold blocking the budget until its sweep and no record of a call the
        // provider may bill).
        let (gw, caller, model, req) =
            (self.clone(), caller.clone(), model.to_string(), req.clone());
        // Cancelled when this future is dropped (its caller went away): a wait for a person's
        // approval then ends instead of making a call for nobody. (Once the stream is open, the
        // token is no longer looked at.)
        let gone = CancellationToken::new();
        let _gone_on_drop = gone.clone().drop_guard();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let spent = Tally::default();
            let r = gw.open_stream(&caller, &model, &req, (&gone, &spent)).await;
            if let Err(e) = &r {
                gw.record_failure(&caller, &model, &req, (e, &spent), t0.elapsed());
            }
            r
        })
        .await
        .unwrap_or_else(|e| {
            Err(GatewayError::Unavailable(format!(
                "the call's task failed before answering: {e}"
            )))
        })
    }

    async fn open_stream(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        req: &Map<String, Value>,
        (gone, spent): (&CancellationToken, &Tally),
    ) -> Result<(CallMeta, ChunkStream), GatewayError> {
        let started = Instant::now();
        let route = self.route(model)?;
        let (route, hold, est) = self.hold(caller, route, req, gone).await?;
        let req = &cap(req, self.output_cap(&route, req));
        // A candidate counts as answering once its first chunk arrived; only before that can the
        // call fall back.
        let a = self
            .try_candidates(
                caller,
                &route,
                (hold.as_ref(), gone, spent),
                &est,
                |p, m| async move {
                    let mut s = p.stream(&m, req).await?;
                    match s.next().await {
                        Some(Ok(chunk)) => Ok((chunk, s)),
                        Some(Err(e)) => Err(e),
                        None => Err(CallError::Malformed("the stream ended at once".into())),
                    }
                },
            )
            .await?;
        let ((chunk, rest), c) = (a.value, a.candidate);
        let meta = CallMeta {
            alias: route.alias.clone(),
            provider: c.provider.clone(),
            model: c.model.clone(),
            attempts: a.attempts,
            ..Default::default()
        };
        let watch = Watch {
            gw: self.clone(),
            caller: caller.clone(),
            model: model.to_string(),
            request: self.recorder.as_ref().map(|_| req.clone()),
            text: String::new(),
            tool_calls: Vec::new(),
            route_alias: route.alias.clone(),
            c,
            hold,
            buckets: a.buckets,
            est,
            attempts: (a.attempts, a.billed),
            started,
            usage: None,
            text_bytes: 0,
            failed: None,
            ended: false,
            finished: false,
            settled: false,
        };
        // The watch sees each chunk, an error, and the end (`None` after the last item).
        let s = futures::stream::once(async move { Ok(chunk) })
            .chain(rest)
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .scan(watch, |w, item| {
                futures::future::ready(match item {
                    Some(item) => {
                        match &item {
                            Ok(v) => w.see(v),
                            Err(e) => {
                                w.failed.get_or_insert_with(|| e.to_string());
                            }
                        }
                        Some(item)
                    }
                    None => {
                        w.ended = true;
                        None
                    }
                })
            })
            .boxed();
        Ok((meta, s))
    }

    /// Gives back what a call's buckets were charged beyond `used` tokens.
    async fn give_back(&self, buckets: &[Bucket], est: &Usage, used: u64) {
        let counted = est.input.saturating_add(est.output) as f64;
        // Told by the bucket, not by its key (a tenant's name can hold `:tpm:`).
        for b in buckets.iter().filter(|b| b.tokens) {
            let back = counted.min(b.capacity) - used as f64;
            if let Err(e) = self.limiter.give_back(b, back).await {
                tracing::warn!(error = %e, "Could not give tokens back to a rate limit.");
            }
        }
    }

    /// A call that got no answer costs what its failed attempts are charged (nothing when none
    /// was billable): its hold is settled to that.
    async fn settle_failed(&self, hold: Option<&Hold>, billed: f64) {
        if let Some(h) = hold {
            self.settle_hold(h, billed).await;
        }
    }

    /// What a failed attempt that most likely ran at the provider (it timed out, or its answer
    /// could not be read), which bills it, is charged: its estimate (input and output cap at the
    /// candidate's price), counted in `switchyard_llm_cost_total` too. Errors before the provider
    /// did the work (refusals, 429, 5xx, a connection that failed) are charged nothing.
    fn billed(&self, c: &Candidate, est: &Usage) -> f64 {
        let Some(price) = self.price(c) else {
            return 0.0;
        };
        let cost = price.cost(est);
        METRICS
            .llm_cost
            .with_label_values(&[&c.model, &price.currency])
            .inc_by(cost);
        cost
    }

    /// Settles a finished call's books in Redis: the budget hold becomes the actual cost, the
    /// rate limits get back the tokens charged beyond what was used.
    async fn settle(&self, mut books: Books) {
        self.settle_budget(&mut books).await;
        self.give_back(&books.buckets, &books.est, books.used).await;
    }

    /// Settles a hold to `cost`, tried three times (a settle is idempotent): a hold left unsettled
    /// is given back by the sweeper after `hold_seconds`, which makes its call free.
    async fn settle_hold(&self, h: &Hold, cost: f64) {
        for attempt in 0..3u64 {
            match self.budgets.settle(h, cost).await {
                Ok(()) => return,
                Err(e) if attempt == 2 => {
                    tracing::warn!(error = %e, "Could not settle a budget hold; it expires and gives the estimate back.");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 << (2 * attempt))).await,
            }
        }
    }

    /// Settles the budget hold of a finished call (once: the hold is taken out of `books`).
    async fn settle_budget(&self, books: &mut Books) {
        if let Some(h) = books.hold.take() {
            self.settle_hold(&h, books.cost).await;
        }
    }

    /// Accounts a finished call: cost, metrics, a log line; what is left to settle in Redis.
    #[allow(clippy::too_many_arguments)]
    fn account(
        &self,
        caller: &Caller,
        alias: &str,
        c: &Candidate,
        hold: Option<Hold>,
        buckets: Vec<Bucket>,
        est: &Usage,
        usage: Usage,
        estimated: bool,
        (attempts, billed): (u32, f64),
        started: Instant,
    ) -> (CallMeta, Books) {
        let price = self.price(c);
        let answered = price.map(|p| p.cost(&usage)).unwrap_or(0.0);
        // The failed attempts before the answer are part of what the call cost (and were counted
        // in the cost metric when they failed).
        let cost = answered + billed;
        let currency = price.map(|p| p.currency.clone()).unwrap_or_else(usd);
        let books = Books {
            hold,
            buckets,
            est: *est,
            used: usage.input.saturating_add(usage.output),
            cost,
        };
        for (kind, n) in [
            ("input", usage.input),
            ("output", usage.output),
            ("cached", usage.cached),
        ] {
            METRICS
                .llm_tokens
                .with_label_values(&[&c.model, kind])
                .inc_by(n);
        }
        METRICS
            .llm_cost
            .with_label_values(&[&c.model, &currency])
            .inc_by(answered);
        let latency_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            tenant = %caller.tenant, agent = %caller.agent, task = %caller.task, alias, provider = %c.provider,
            model = %c.model, input_tokens = usage.input, output_tokens = usage.output, cached_tokens = usage.cached,
            usage_estimated = estimated, cost, currency = %currency, attempts, latency_ms, "Model call."
        );
        let meta = CallMeta {
            alias: alias.to_string(),
            provider: c.provider.clone(),
            model: c.model.clone(),
            usage,
            usage_estimated: estimated,
            cost,
            currency,
            attempts,
            latency_ms,
        };
        (meta, books)
    }

    /// Gives back expired budget holds (called periodically by every instance).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.budgets.sweep().await
    }
}

/// The request with the output cap the estimate assumed, unless it sets one itself: the hold
/// then bounds what the call can cost (a provider that ignores the cap is still charged in full).
fn cap(req: &Map<String, Value>, max_tokens: u64) -> Map<String, Value> {
    let mut r = req.clone();
    let mut set = false;
    for k in CAP_FIELDS {
        if let Some(v) = r.get_mut(k) {
            // Each cap the request gives says what the hold assumed.
            *v = Value::from(max_tokens);
            set = true;
        }
    }
    if !set {
        r.insert("max_tokens".into(), Value::from(max_tokens));
    }
    r
}

/// The request fields that cap an answer's output tokens.
const CAP_FIELDS: [&str; 2] = ["max_completion_tokens", "max_tokens"];

/// Usage of an answer without reported usage: the input estimate and about four bytes a token of
/// what was said.
fn estimate_answer(est: &Usage, body: &Value) -> Usage {
    let said: usize = body
        .get("choices")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("message"))
                .map(|m| {
                    m.get("content").and_then(Value::as_str).map_or(0, str::len)
                        + m.get("tool_calls").map_or(0, |t| t.to_string().len())
                })
                .sum()
        })
        .unwrap_or(0);
    Usage {
        input: est.input,
        output: (said as u64).div_ceil(4),
        cached: 0,
    }
}

/// Follows a stream's chunks for its usage; settles the call when the stream is done or dropped.
struct Watch {
    gw: Arc<Gateway>,
    caller: Caller,
    /// What the caller asked for (alias or provider/model).
    model: String,
    /// The request, for the transcript (only when calls are recorded).
    request: Option<Map<String, Value>>,
    /// What was said so far (capped), for the transcript.
    text: String,
    tool_calls: Vec<Value>,
    route_alias: String,
    c: Candidate,
    hold: Option<Hold>,
    buckets: Vec<Bucket>,
    est: Usage,
    /// Attempts made, and what the failed ones are charged.
    attempts: (u32, f64),
    started: Instant,
    usage: Option<Usage>,
    text_bytes: usize,
    /// The first error the stream gave (a chunk that is not JSON, the connection cut).
    failed: Option<String>,
    /// Whether the stream was read to its end.
    ended: bool,
    /// Whether a choice finished (a chunk with a `finish_reason`): a stream that ends without one
    /// was cut short.
    finished: bool,
    settled: bool,
}

impl Watch {
    /// The call's outcome as recorded: `ok` only for a stream read to its end without an error.
    fn outcome(&self) -> (&'static str, Option<String>) {
        match (&self.failed, self.ended, self.finished) {
            (Some(e), _, _) => (
                "stream_failed",
                Some(format!("the stream failed midway: {e}")),
            ),
            (None, false, _) => (
                "stream_abandoned",
                Some("the caller stopped reading before the stream ended".into()),
            ),
            (None, true, false) => (
                "stream_failed",
                Some("the stream ended before its answer finished (no finish_reason)".into()),
            ),
            (None, true, true) => ("ok", None),
        }
    }

    fn see(&mut self, chunk: &Value) {
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            // A chunk whose usage cannot be read keeps what an earlier one said.
            if let Some(u) = Usage::from_openai(u) {
                self.usage = Some(u);
            }
        }
        if let Some(cs) = chunk.get("choices").and_then(Value::as_array) {
            for c in cs {
                if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    self.finished = true;
                }
                if let Some(d) = c.get("delta") {
                    if let Some(t) = d.get("content").and_then(Value::as_str) {
                        self.text_bytes += t.len();
                        if self.text.len() + t.len() <= MAX_TRANSCRIPT_BYTES / 2 {
                            self.text.push_str(t);
                        }
                    }
                    if let Some(t) = d.get("tool_calls") {
                        self.text_bytes += t.to_string().len();
                        if self.tool_calls.len() < 1000 {
                            self.tool_calls.push(t.clone());
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        let (usage, estimated) = match self.usage {
            Some(u) => (u, false),
            None => (
                Usage {
                    input: self.est.input,
                    output: (self.text_bytes as u64).div_ceil(4),
                    cached: 0,
                },
                true,
            ),
        };
        let gw = self.gw.clone();
        let caller = self.caller.clone();
        let alias = std::mem::take(&mut self.route_alias);
        let c = self.c.clone();
        let hold = self.hold.take();
        let buckets = std::mem::take(&mut self.buckets);
        let est = self.est;
        let attempts = self.attempts;
        let started = self.started;
        let (outcome, error) = self.outcome();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let model = self.model.clone();
            let request = std::mem::take(&mut self.request);
            let text = std::mem::take(&mut self.text);
            let tools = std::mem::take(&mut self.tool_calls);
            h.spawn(async move {
                let (meta, books) = gw.account(
                    &caller, &alias, &c, hold, buckets, &est, usage, estimated, attempts, started,
                );
                gw.settle(books).await;
                let answer =
                    serde_json::json!({"streamed": true, "content": text, "tool_calls": tools});
                if let Some(request) = request {
                    let took = started.elapsed();
                    gw.record(
                        &caller,
                        &model,
                        Some(&meta),
                        outcome,
                        error,
                        &request,
                        &answer,
                        took,
                    );
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output cap the request gives is sent at the value the hold assumed (a provider may
    /// honour either field), and one is added when it gives none.
    #[test]
    fn the_caps_sent_are_the_one_held() {
        let req: Map<String, Value> = serde_json::from_value(
            serde_json::json!({"max_completion_tokens": 1, "max_tokens": 100000}),
        )
        .unwrap();
        let sent = cap(&req, 100000);
        assert_eq!(sent["max_completion_tokens"], 100000);
        assert_eq!(sent["max_tokens"], 100000);
        let sent = cap(&Map::new(), 64);
        assert_eq!(sent["max_tokens"], 64);
        assert!(!sent.contains_key("max_completion_tokens"));
    }

    fn caller() -> Caller {
        Caller {
            tenant: "t".into(),
            agent: "a".into(),
            workflow: String::new(),
            task: "task-1".into(),
            resource: "r".into(),
            traceparent: None,
        }
    }

    #[test]
    fn a_transcript_over_the_cap_is_cut_and_marked() {
        let small = transcript(
            &caller(),
            "m",
            None,
            "ok",
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})
                .as_object()
                .expect("object"),
            &serde_json::json!({"choices": []}),
        );
        assert_eq!(small["truncated"], false);
        assert_eq!(small["request"]["messages"][0]["content"], "hi");
        let big = "é".repeat(MAX_TRANSCRIPT_BYTES);
        let t = transcript(
            &caller(),
            "m",
            None,
            "ok",
            serde_json::json!({"messages": [{"role": "user", "content": big}], "model": "m"})
                .as_object()
                .expect("object"),
            &serde_json::json!({"choices": [{"message": {"content": big}}]}),
        );
        assert_eq!(t["truncated"], true);
        assert_eq!(t["request"]["model"], "m", "only the messages are cut");
        assert!(
            t.to_string().len() <= MAX_TRANSCRIPT_BYTES + 4096,
            "{}",
            t.to_string().len()
        );
        assert!(t["response"]
            .as_str()
            .is_some_and(|r| r.starts_with("{\"choices\"")));
    }

    #[test]
    fn prices_count_cached_input_at_its_own_price() {
        let p = Price {
            input: 2.0,
            output: 8.0,
            cached_input: Some(0.5),
            currency: "USD".into(),
        };
        let u = Usage {
            input: 1_000_000,
            output: 500_000,
            cached: 400_000,
        };
        assert!((p.cost(&u) - (0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0)).abs() < 1e-9);
    }

    #[test]
    fn the_config_names_what_is_wrong() {
        let cfg: GatewayConfig = serde_yaml::from_str(
            "providers: {p: {base_url: ftp://x}}\naliases: {a: {candidates: [{provider: q, model: m}], on_exhausted: downgrade}, 'x/y': {candidates: []}}\nlimits: [{provider: p}]\nkeys: [{name: k, key_sha256: abc}]",
        )
        .expect("parses");
        let p: Vec<String> = cfg
            .problems()
            .into_iter()
            .map(|(k, m)| format!("{k}: {m}"))
            .collect();
        let all = p.join("\n");
        for want in [
            "gateway.providers.p.base_url: must start with http:// or https://",
            "gateway.aliases.a.candidates[0].provider: no provider named \"q\"",
            "gateway.aliases.a.downgrade_to: is required by on_exhausted: downgrade",
            "gateway.aliases.x/y: an alias name may not contain '/'",
            "gateway.aliases.x/y.candidates: lists no candidate",
            "gateway.limits[0]: sets neither rpm nor tpm",
            "gateway.keys[0].key_sha256: must be 64 hex digits",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }
}
