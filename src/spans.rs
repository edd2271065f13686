//! OpenTelemetry traces: a span for each routing decision, task, agent attempt, model call, tool
//! call, workflow step, resolve decision and approval wait, exported over OTLP/HTTP (protobuf)
//! when `tracing.enabled` (off by default).
//!
//! Spans are parented on the event's W3C `traceparent` (or a trace of its own), and every record a
//! stage writes carries the `traceparent` of the span that wrote it — as the CloudEvent extension
//! and a Kafka header — so HTTP agents (a `traceparent` request header), Kafka agents (a record
//! header) and any consumer of switchyard's topics continue the trace.
//!
//! Span ids of the stages' spans are derived from what they are about (the input record's
//! position, the task id, the attempt, the proposal id) instead of drawn at random: a redelivered
//! record re-emits byte-identical records, `traceparent` included, and a replay names the same
//! spans. A trace started here takes its id from the event id the same way.
//!
//! Spans are built when their work ends (start and end times given), so nothing is held open across
//! awaits; the SDK's batch processor exports them from its own thread (bounded queue: when the
//! collector is slow, spans are dropped, never the pipeline held up).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::SecretRef;

/// The `tracing:` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Export spans (`SWITCHYARD_OTLP_ENDPOINT` set turns it on).
    #[serde(default)]
    pub enabled: bool,
    /// The OTLP/HTTP endpoint: a base URL (`/v1/traces` is appended) or the full traces URL.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// `service.name` of the spans.
    #[serde(default = "default_service")]
    pub service_name: String,
    /// Headers sent with every export (e.g. an `authorization` for a hosted backend): the value,
    /// `{env: VAR}` or `{file: PATH}`; never shown.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, SecretRef>,
    /// One export request's time limit.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_endpoint() -> String {
    "http://127.0.0.1:4318".into()
}
fn default_service() -> String {
    "switchyard".into()
}
fn default_timeout_ms() -> u64 {
    5_000
}

impl Default for TracingConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

impl TracingConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            p.push((
                "tracing.endpoint".into(),
                format!(
                    "not an http(s) URL (it reads as {})",
                    crate::secret::url_origin(&self.endpoint)
                ),
            ));
        }
        if self.service_name.is_empty() {
            p.push(("tracing.service_name".into(), "must not be empty".into()));
        }
        if self.timeout_ms == 0 {
            p.push(("tracing.timeout_ms".into(), "must be at least 1".into()));
        }
        p
    }

    /// The URL spans are POSTed to.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }
}

struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Starts exporting (once per process; later calls do nothing). Needs a Tokio runtime: the exports'
/// HTTP requests run on it.
pub fn init(cfg: &TracingConfig, instance: &str) -> Result<(), String> {
    if !cfg.enabled || EXPORTER.get().is_some() {
        return Ok(());
    }
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.timeout_ms))
        // A redirect would carry the export headers (an API key) to wherever it points.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("tracing: cannot build the HTTP client: {e}"))?;
    let mut headers = std::collections::HashMap::new();
    for (k, v) in &cfg.headers {
        let v = v
            .resolve()
            .map_err(|e| format!("tracing.headers.{k}: {e}"))?;
        headers.insert(k.clone(), v.expose().to_string());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OnRuntime {
            client,
            runtime: tokio::runtime::Handle::try_current()
                .map_err(|_| "tracing: no Tokio runtime to export on".to_string())?,
        })
        .with_endpoint(cfg.traces_url())
        .with_timeout(Duration::from_millis(cfg.timeout_ms))
        .with_headers(headers)
        .build()
        .map_err(|e| format!("tracing: cannot build the OTLP exporter: {e}"))?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(
        &opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
            .with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_string(),
            ))
            .build(),
    );
    let scope = InstrumentationScope::builder("switchyard")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let _ = EXPORTER.set(Exporter { processor, scope });
    // Scheme, host and port only: a URL may carry credentials.
    let shown = reqwest::Url::parse(&cfg.traces_url())
        .map(|u| {
            format!(
                "{}://{}:{}",
                u.scheme(),
                u.host_str().unwrap_or("?"),
                u.port_or_known_default().unwrap_or(0)
            )
        })
        .unwrap_or_default();
    tracing::info!(endpoint = %shown, "Exporting OpenTelemetry traces.");
    Ok(())
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Exports what is queued (CLI commands before they exit; the server at shutdown).
pub fn flush() {
    if let Some(e) = EXPORTER.get() {
        if let Err(err) = e.processor.force_flush() {
            tracing::warn!(error = %err, "Could not export the last spans.");
        }
    }
}

/// Reqwest on the process's Tokio runtime: the batch processor exports from a thread of its own.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let send = async move {
            let resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let (status, headers) = (resp.status(), resp.headers().clone());
            // The collector's answer is small; more than 1 MiB of it is not read.
            let (body, _) = crate::body::read_at_most(resp, 1 << 20).await?;
            let body = bytes::Bytes::from(body);
            let mut out = http::Response::builder().status(status).body(body)?;
            *out.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(out)
        };
        self.runtime.spawn(send).await?
    }
}

/// A W3C trace context: the trace, the span, and whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub trace: [u8; 16],
    pub span: [u8; 8],
    pub sampled: bool,
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

impl Ctx {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
    pub fn parse(tp: &str) -> Option<Ctx> {
        let mut it = tp.trim().split('-');
        let (v, t, s, f) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if v.len() != 2 || v == "ff" || (v == "00" && it.next().is_some()) {
            return None;
        }
        let mut trace = [0u8; 16];
        let mut span = [0u8; 8];
        hex::decode_to_slice(t, &mut trace).ok()?;
        hex::decode_to_slice(s, &mut span).ok()?;
        let mut flags = [0u8; 1];
        hex::decode_to_slice(f, &mut flags).ok()?;
        if trace == [0; 16] || span == [0; 8] {
            return None;
        }
        Some(Ctx {
            trace,
            span,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// A new trace for something that came without one: ids from `seed` (an event id).
    pub fn root(seed: &str) -> Ctx {
        let d = digest(&["trace", seed]);
        let mut trace = [0u8; 16];
        let mut span = [0u8; 8];
        trace.copy_from_slice(&d[..16]);
        span.copy_from_slice(&d[16..24]);
        Ctx {
            trace,
            span,
            sampled: true,
        }
    }

    /// The span `kind` `id` opens under this one (same trace, id derived from both).
    pub fn child(&self, kind: &str, id: &str) -> Ctx {
        let d = digest(&[&hex::encode(self.trace), &hex::encode(self.span), kind, id]);
        let mut span = [0u8; 8];
        span.copy_from_slice(&d[..8]);
        Ctx { span, ..*self }
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace),
            hex::encode(self.span),
            u8::from(self.sampled)
        )
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace),
            SpanId::from_bytes(self.span),
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            false,
            TraceState::default(),
        )
    }
}

/// The `traceparent` a stage writes on the records of the span `kind` `id` it opens under a
/// record's `parent`: the child's — whether this process exports or not, so every instance writes
/// the same bytes for the same record. A `parent` that is not a valid trace context is dropped (it
/// would make an HTTP header invalid downstream).
pub fn propagate(parent: Option<&str>, kind: &str, id: &str) -> Option<String> {
    parent
        .and_then(Ctx::parse)
        .map(|c| c.child(kind, id).traceparent())
}

/// A span being described; exported when [`Span::end`] is called (nothing happens when tracing is
/// off, or the trace is not sampled).
pub struct Span {
    live: bool,
    ctx: Option<Ctx>,
    parent: Option<Ctx>,
    name: String,
    kind: SpanKind,
    start: SystemTime,
    attrs: Vec<KeyValue>,
    error: Option<String>,
}

impl Span {
    /// The span `kind` `id` under `parent` (a `traceparent`), named `name`, started now.
    pub fn child(name: impl Into<String>, parent: Option<&str>, kind: &str, id: &str) -> Span {
        let parent = parent.and_then(Ctx::parse);
        let ctx = parent.map(|p| p.child(kind, id));
        Self::with(name, ctx, parent)
    }

    /// A span with a random id under `parent` (model and tool calls: nothing refers to them).
    pub fn random(name: impl Into<String>, parent: Option<&str>) -> Span {
        let id = uuid::Uuid::new_v4().to_string();
        Self::child(name, parent, "random", &id)
    }

    /// A span with the given context and parent.
    pub fn with(name: impl Into<String>, ctx: Option<Ctx>, parent: Option<Ctx>) -> Span {
        let live = enabled() && ctx.is_some_and(|c| c.sampled);
        Span {
            live,
            ctx,
            parent,
            name: if live { name.into() } else { String::new() },
            kind: SpanKind::Internal,
            start: SystemTime::now(),
            attrs: Vec::new(),
            error: None,
        }
    }

    /// Its `traceparent`, when it has a context.
    pub fn traceparent(&self) -> Option<String> {
        self.ctx.map(|c| c.traceparent())
    }

    pub fn kind(mut self, kind: SpanKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn started_at(mut self, t: SystemTime) -> Self {
        self.start = t;
        self
    }

    /// Sets an attribute (skipped when the span is not exported).
    pub fn attr(&mut self, key: &'static str, v: impl Into<Value>) -> &mut Self {
        if self.live {
            self.attrs.push(KeyValue::new(key, v));
        }
        self
    }

    /// Marks the span failed (`error.type` `_OTHER`, the description in the status).
    pub fn fail(&mut self, why: impl Into<String>) -> &mut Self {
        if self.live {
            self.error = Some(why.into());
            self.attrs.push(KeyValue::new("error.type", "_OTHER"));
        }
        self
    }

    pub fn end(self) {
        self.end_at(SystemTime::now());
    }

    pub fn end_at(self, end: SystemTime) {
        let (Some(ex), true, Some(ctx)) = (EXPORTER.get(), self.live, self.ctx) else {
            return;
        };
        let status = match self.error {
            Some(e) => Status::error(e),
            None => Status::Unset,
        };
        ex.processor.on_end(SpanData {
            span_context: ctx.span_context(),
            parent_span_id: self
                .parent
                .map(|p| SpanId::from_bytes(p.span))
                .unwrap_or(SpanId::INVALID),
            parent_span_is_remote: false,
            span_kind: self.kind,
            name: self.name.into(),
            start_time: self.start,
            end_time: end.max(self.start),
            attributes: self.attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: ex.scope.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_children_are_stable() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = Ctx::parse(tp).expect("valid");
        assert_eq!(c.traceparent(), tp);
        assert!(c.sampled);
        let a = c.child("task", "t-1");
        assert_eq!(a, c.child("task", "t-1"), "derived ids are stable");
        assert_ne!(a.span, c.child("task", "t-2").span);
        assert_eq!(a.trace, c.trace);
        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Ctx::parse(bad), None, "{bad}");
        }
        let unsampled = Ctx::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert_eq!(unsampled.map(|c| c.sampled), Some(false));
        assert_eq!(Ctx::root("ev-1"), Ctx::root("ev-1"));
        assert_ne!(Ctx::root("ev-1").trace, Ctx::root("ev-2").trace);
    }

    #[test]
    fn children_are_derived_with_or_without_export_and_bad_contexts_dropped() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = propagate(Some(tp), "task", "x").expect("a child");
        assert_eq!(
            Ctx::parse(&child),
            Ctx::parse(tp).map(|c| c.child("task", "x"))
        );
        assert_eq!(propagate(None, "task", "x"), None);
        assert_eq!(propagate(Some("00-zz\r\nx-1-01"), "task", "x"), None);
    }

    #[test]
    fn traces_url() {
        let mut c = TracingConfig::default();
        assert_eq!(c.traces_url(), "http://127.0.0.1:4318/v1/traces");
        c.endpoint = "https://otel.example.com/v1/traces/".into();
        assert_eq!(c.traces_url(), "https://otel.example.com/v1/traces");
        assert!(c.problems().is_empty());
        c.endpoint = "otel:4318".into();
        assert_eq!(c.problems().len(), 1);
    }
}
