//! Model providers over HTTP(S): the OpenAI-compatible chat-completions API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp server, LiteLLM, Groq, ...) and Anthropic's Messages API.
//!
//! The gateway speaks one request and response shape inside, OpenAI's chat completion: an OpenAI
//! provider passes it through untouched (tools, `response_format`, everything else the caller set);
//! the Anthropic provider translates it to a Messages request and the answer back, tool calls
//! and JSON-schema output included. Streams are read as server-sent events and handed on as OpenAI
//! chunks.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::secret::Secret;

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The OpenAI-compatible chat-completions API.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

/// A provider as configured under `gateway.providers`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    #[serde(default = "openai")]
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `https://api.anthropic.com/v1`, `http://localhost:11434/v1`.
    pub base_url: String,
    /// The API key itself (better: `api_key_env` or `api_key_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Environment variable holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key (a mounted secret); surrounding whitespace is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Per request, including reading the whole answer.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn openai() -> ProviderKind {
    ProviderKind::Openai
}
fn default_timeout_ms() -> u64 {
    60_000
}

impl ProviderSpec {
    /// The API key from wherever the spec says; an error names the source, never the key.
    pub fn key(&self) -> Result<Option<Secret>, String> {
        if let Some(k) = &self.api_key {
            return Ok(Some(k.clone()));
        }
        if let Some(var) = &self.api_key_env {
            // Unset: calls go out without a key (a local model server needs none); the gateway
            // says so when it starts.
            return Ok(std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Secret::new));
        }
        if let Some(path) = &self.api_key_file {
            return std::fs::read_to_string(path)
                .map(|s| Some(Secret::new(s.trim().to_string())))
                .map_err(|e| format!("cannot read {}: {e}", path.display()));
        }
        Ok(None)
    }
}

/// Tokens a call used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    /// Of `input`, read from the provider's prompt cache (billed at the cached price).
    pub cached: u64,
}

impl Usage {
    /// From an OpenAI `usage` object; `None` (the call's usage is then estimated and flagged)
    /// when a count is missing, not a whole number, or beyond [`MAX_USAGE_TOKENS`] — a provider's
    /// word is not taken for a count that would wrap a sum or charge an absurd cost.
    pub fn from_openai(u: &Value) -> Option<Usage> {
        let input = tokens(u.get("prompt_tokens"))?;
        let output = tokens(u.get("completion_tokens"))?;
        let cached = match u.pointer("/prompt_tokens_details/cached_tokens") {
            None | Some(Value::Null) => 0,
            v => tokens(v)?.min(input),
        };
        Some(Usage {
            input,
            output,
            cached,
        })
    }

    /// As an OpenAI `usage` object.
    pub fn to_openai(self) -> Value {
        json!({
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.input.saturating_add(self.output),
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// The most tokens one count of a provider's usage may say (far beyond any context window).
pub const MAX_USAGE_TOKENS: u64 = 100_000_000;

/// A usage count: a whole number up to [`MAX_USAGE_TOKENS`].
fn tokens(v: Option<&Value>) -> Option<u64> {
    v?.as_u64().filter(|n| *n <= MAX_USAGE_TOKENS)
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// 429 or 5xx: worth retrying, after `retry_after` when the provider said.
    Retryable {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// Any other 4xx: the request itself is wrong; not retried.
    Rejected { status: u16, message: String },
    /// No answer in time.
    Timeout,
    /// The request never went out (no connection).
    Transport(String),
    /// The connection broke once the request could have gone out (reset, closed mid-answer): the
    /// provider may have run (and billed) it.
    Broken(String),
    /// An answer that is not what the API promises (truncated, not JSON, no choices).
    Malformed(String),
}

impl CallError {
    /// Whether another attempt (or candidate) may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, CallError::Rejected { .. })
    }

    /// A bounded label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Retryable { status: 429, .. } => "rate_limited",
            CallError::Retryable { .. } => "server_error",
            CallError::Rejected { .. } => "rejected",
            CallError::Timeout => "timeout",
            CallError::Transport(_) => "unreachable",
            CallError::Broken(_) => "broken",
            CallError::Malformed(_) => "malformed",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Retryable {
                status, message, ..
            }
            | CallError::Rejected { status, message } => write!(f, "HTTP {status}: {message}"),
            CallError::Timeout => f.write_str("timed out"),
            CallError::Transport(m) => write!(f, "unreachable: {m}"),
            CallError::Broken(m) => write!(f, "connection broke: {m}"),
            CallError::Malformed(m) => write!(f, "malformed answer: {m}"),
        }
    }
}

/// A streamed answer: OpenAI `chat.completion.chunk` objects.
pub type ChunkStream = BoxStream<'static, Result<Value, CallError>>;

/// The most of a (non-streamed) answer read: a larger one is malformed, the rest never read.
const MAX_ANSWER_BYTES: usize = 32 << 20;
/// The most of an error answer read (its message is cut much shorter).
const MAX_ERROR_BYTES: usize = 64 << 10;

/// A configured provider, ready to call.
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    base_url: String,
    key: Option<Secret>,
    timeout: Duration,
    client: reqwest::Client,
}

/// Longest error text kept from a provider's answer (it may echo the request).
const MAX_ERROR_TEXT: usize = 500;

fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_TEXT {
        return s.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `Retry-After` (seconds or an HTTP date) or `retry-after-ms`, capped at a minute.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let d = if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::from_secs_f64((ms / 1000.0).max(0.0))
    } else if let Some(v) = get("retry-after") {
        match v.parse::<f64>() {
            Ok(s) => Duration::from_secs_f64(s.max(0.0)),
            Err(_) => {
                let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
                let left = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
                Duration::from_millis(left.max(0) as u64)
            }
        }
    } else {
        return None;
    };
    Some(d.min(Duration::from_secs(60)))
}

fn transport(e: reqwest::Error) -> CallError {
    // A connection that timed out while connecting never carried the request: a transport
    // failure (charged nothing), not a timeout (which the provider most likely billed).
    if e.is_timeout() && !e.is_connect() {
        CallError::Timeout
    } else if e.is_connect() || e.is_builder() {
        // Without the URL's query (never holds a key here, but keep errors short).
        CallError::Transport(e.without_url().to_string())
    } else {
        // Connected: the request may have gone out, and the provider run it.
        CallError::Broken(e.without_url().to_string())
    }
}

impl Provider {
    pub fn new(name: &str, spec: &ProviderSpec) -> Result<Provider, String> {
        let timeout = Duration::from_millis(spec.timeout_ms.max(1));
        // Connecting gives up well before the request's own timeout, so a host that does not
        // answer ends as a connect failure (charged nothing), never as a request timeout.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(timeout / 2))
            .pool_max_idle_per_host(64)
            // A redirect would carry the API key (`x-api-key` is not a header reqwest drops on
            // a host change) to wherever it points, plain http included.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Provider {
            name: name.to_string(),
            kind: spec.kind,
            base_url: spec.base_url.trim_end_matches('/').to_string(),
            key: spec.key()?,
            timeout,
            client,
        })
    }

    fn request(&self, body: &Value) -> reqwest::RequestBuilder {
        let (url, rb) = match self.kind {
            ProviderKind::Openai => {
                let url = format!("{}/chat/completions", self.base_url);
                let mut rb = self.client.post(&url);
                if let Some(k) = &self.key {
                    rb = rb.bearer_auth(k.expose());
                }
                (url, rb)
            }
            ProviderKind::Anthropic => {
                let url = format!("{}/messages", self.base_url);
                let mut rb = self
                    .client
                    .post(&url)
                    .header("anthropic-version", "2023-06-01");
                if let Some(k) = &self.key {
                    // Sensitive: kept out of reqwest's own debug output.
                    if let Ok(mut v) = reqwest::header::HeaderValue::from_str(k.expose()) {
                        v.set_sensitive(true);
                        rb = rb.header("x-api-key", v);
                    }
                }
                (url, rb)
            }
        };
        let _ = url;
        rb.json(body)
    }

    /// The longest one attempt may take (`timeout_ms`), in milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends the request; a non-2xx answer becomes its [`CallError`].
    async fn send(&self, body: &Value, stream: bool) -> Result<reqwest::Response, CallError> {
        let mut rb = self.request(body);
        if !stream {
            rb = rb.timeout(self.timeout);
        }
        let resp = tokio::time::timeout(self.timeout, rb.send())
            .await
            .map_err(|_| CallError::Timeout)?
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(resp);
        }
        let after = retry_after(resp.headers());
        let (text, _) = crate::body::read_at_most(resp, MAX_ERROR_BYTES)
            .await
            .unwrap_or_default();
        let message = error_message(String::from_utf8_lossy(&text).into_owned());
        Err(if status == 429 || status >= 500 {
            CallError::Retryable {
                status,
                retry_after: after,
                message,
            }
        } else {
            CallError::Rejected { status, message }
        })
    }

    /// One chat completion: the answer in OpenAI's shape, and its usage when the provider gave it.
    pub async fn complete(
        &self,
        model: &str,
        request: &Map<String, Value>,
    ) -> Result<(Value, Option<Usage>), CallError> {
        let body = match self.kind {
            ProviderKind::Openai => {
                let mut b = request.clone();
                b.insert("model".into(), json!(model));
                b.remove("stream");
                b.remove("stream_options");
                Value::Object(b)
            }
            ProviderKind::Anthropic => anthropic::request(model, request, false)?,
        };
        let resp = self.send(&body, false).await?;
        let (bytes, cut) = crate::body::read_at_most(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(transport)?;
        if cut {
            return Err(CallError::Malformed(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        read_answer(self.kind, &bytes, model, request)
    }

    /// A streamed chat completion, as OpenAI chunks. The last chunk carries the usage where the
    /// provider reports it (asked for with `stream_options.include_usage`).
    pub async fn stream(
        &self,
        model: &str,
        request: &Map<String, Value>,
    ) -> Result<ChunkStream, CallError> {
        let body = match self.kind {
            ProviderKind::Openai => {
                let mut b = request.clone();
                b.insert("model".into(), json!(model));
                b.insert("stream".into(), json!(true));
                b.insert("stream_options".into(), json!({"include_usage": true}));
                Value::Object(b)
            }
            ProviderKind::Anthropic => anthropic::request(model, request, true)?,
        };
        let resp = self.send(&body, true).await?;
        let events = sse_events(resp, self.timeout);
        Ok(match self.kind {
            ProviderKind::Openai => events
                .filter_map(|ev| async move {
                    match ev {
                        Err(e) => Some(Err(e)),
                        Ok((_, data)) => openai_chunk(&data),
                    }
                })
                .boxed(),
            ProviderKind::Anthropic => anthropic::chunks(events, model.to_string()),
        })
    }
}

/// The server-sent events of a response: (event name, data), until the body ends. A gap of more
/// than `idle` between bytes is a timeout.
fn sse_events(
    resp: reqwest::Response,
    idle: Duration,
) -> BoxStream<'static, Result<(String, String), CallError>> {
    let bytes = resp.bytes_stream();
    futures::stream::unfold(
        (bytes, SseBuffer::default(), false),
        move |(mut bytes, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(event) = buf.next_event() {
                    return Some((Ok(event), (bytes, buf, false)));
                }
                match tokio::time::timeout(idle, bytes.next()).await {
                    Err(_) => return Some((Err(CallError::Timeout), (bytes, buf, true))),
                    Ok(None) => {
                        if buf.is_blank() {
                            return None;
                        }
                        buf.push(b"\n\n");
                    }
                    Ok(Some(Err(e))) => {
                        return Some((Err(transport(e)), (bytes, buf, true)));
                    }
                    Ok(Some(Ok(chunk))) => {
                        if buf.len() + chunk.len() > MAX_EVENT_BYTES {
                            return Some((
                                Err(CallError::Malformed("a streamed event is too large".into())),
                                (bytes, buf, true),
                            ));
                        }
                        buf.push(&chunk);
                    }
                }
            }
        },
    )
    .boxed()
}

/// The bytes of a server-sent event stream not yet cut into events. Work is linear in the stream
/// however it is split into chunks: each byte is searched for an event's end once, and the bytes of
/// cut events are dropped once per chunk, not once per event (the fuzzer found the quadratic cost
/// of rescanning and shifting the whole buffer for every chunk and every event).
#[derive(Debug, Default)]
pub struct SseBuffer {
    buf: Vec<u8>,
    /// Where the bytes not yet cut into an event start.
    start: usize,
    /// How many bytes from `start` on were already searched for an event's end.
    scanned: usize,
}

impl SseBuffer {
    /// Appends a chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            // What is left after the last cut event came with the last chunk at most.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that are not yet an event.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes held are only whitespace (no event is left when the body ends).
    pub fn is_blank(&self) -> bool {
        self.buf[self.start..].iter().all(u8::is_ascii_whitespace)
    }

    /// The next complete event as (event name, data); events without data are skipped. `None`
    /// until a blank line ends one. Pure, so it is fuzzed (`fuzz/`).
    pub fn next_event(&mut self) -> Option<(String, String)> {
        loop {
            let rest = &self.buf[self.start..];
            // A terminator may have started in the last 3 bytes searched.
            let Some((text_end, end)) = find_event_end(rest, self.scanned.saturating_sub(3)) else {
                self.scanned = rest.len();
                return None;
            };
            let text = String::from_utf8_lossy(&rest[..text_end]).to_string();
            self.start += end;
            self.scanned = 0;
            let (mut name, mut data) = (String::new(), Vec::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            if !data.is_empty() {
                return Some((name, data.join("\n")));
            }
        }
    }
}

/// One event of an OpenAI stream as its chunk; `None` for the closing `[DONE]`.
pub fn openai_chunk(data: &str) -> Option<Result<Value, CallError>> {
    if data.trim() == "[DONE]" {
        return None;
    }
    Some(
        serde_json::from_str::<Value>(data)
            .map_err(|e| CallError::Malformed(format!("chunk not JSON ({e})"))),
    )
}

/// A provider's answer to a chat completion, in OpenAI's shape, with its usage when it gave it.
/// Pure, so it is fuzzed (`fuzz/`).
pub fn read_answer(
    kind: ProviderKind,
    bytes: &[u8],
    model: &str,
    request: &Map<String, Value>,
) -> Result<(Value, Option<Usage>), CallError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| CallError::Malformed(format!("not JSON ({e})")))?;
    match kind {
        ProviderKind::Openai => {
            if !v.get("choices").is_some_and(Value::is_array) {
                return Err(CallError::Malformed("no choices".into()));
            }
            let usage = v.get("usage").and_then(Usage::from_openai);
            Ok((v, usage))
        }
        ProviderKind::Anthropic => anthropic::response(&v, model, request),
    }
}

/// The message of a provider's error answer (OpenAI's and Anthropic's `error.message`, else the
/// text), clipped.
pub fn error_message(text: String) -> String {
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or(text);
    clip(&message)
}

/// Largest server-sent event accepted.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// (end of the event's text, end including its terminator), searching from `from` on.
fn find_event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    for i in from..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, i + 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
    }
    None
}

/// Anthropic's Messages API in and out of the OpenAI shape.
pub mod anthropic {
    use super::*;

    /// Name of the tool that stands in for a JSON-schema `response_format`.
    const STRUCTURED: &str = "structured_output";

    fn text_of(content: &Value) -> String {
        match content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }

    /// Content as Messages blocks. Empty text is left out: the Messages API refuses an empty text
    /// block (an assistant turn that only calls tools has no text).
    fn blocks(content: &Value) -> Value {
        match content {
            Value::String(s) if s.is_empty() => json!([]),
            Value::String(s) => json!([{"type": "text", "text": s}]),
            Value::Array(parts) => Value::Array(
                parts
                    .iter()
                    .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = p.get("text").and_then(Value::as_str)?;
                            (!t.is_empty()).then(|| json!({"type": "text", "text": t}))
                        }
                        Some("image_url") => {
                            let url = p.pointer("/image_url/url")?.as_str()?;
                            let (meta, data) = url.strip_prefix("data:")?.split_once(',')?;
                            let media = meta.strip_suffix(";base64")?;
                            Some(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}))
                        }
                        _ => None,
                    })
                    .collect(),
            ),
            _ => json!([]),
        }
    }

    /// An OpenAI chat-completion request as a Messages request.
    pub fn request(model: &str, r: &Map<String, Value>, stream: bool) -> Result<Value, CallError> {
        let bad = |m: &str| CallError::Rejected {
            status: 400,
            message: m.to_string(),
        };
        let mut system = Vec::new();
        let mut messages: Vec<Value> = Vec::new();
        let empty = Vec::new();
        for m in r
            .get("messages")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
        {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = m.get("content").unwrap_or(&Value::Null);
            match role {
                "system" | "developer" => system.push(text_of(content)),
                "assistant" => {
                    let mut b = match content {
                        Value::Null => Vec::new(),
                        c => blocks(c).as_array().cloned().unwrap_or_default(),
                    };
                    for tc in m
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .unwrap_or(&empty)
                    {
                        let args = tc
                            .pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .unwrap_or("{}");
                        b.push(json!({
                            "type": "tool_use",
                            "id": tc.get("id"),
                            "name": tc.pointer("/function/name"),
                            "input": serde_json::from_str::<Value>(args).unwrap_or(json!({})),
                        }));
                    }
                    messages.push(json!({"role": "assistant", "content": b}));
                }
                "tool" => {
                    let block = json!({
                        "type": "tool_result",
                        "tool_use_id": m.get("tool_call_id"),
                        "content": text_of(content),
                    });
                    // Consecutive tool results go back in one user turn.
                    match messages.last_mut() {
                        Some(last)
                            if last["role"] == "user"
                                && last["content"].as_array().is_some_and(|c| {
                                    c.iter().all(|b| b["type"] == "tool_result")
                                }) =>
                        {
                            if let Some(c) = last["content"].as_array_mut() {
                                c.push(block);
                            }
                        }
                        _ => messages.push(json!({"role": "user", "content": [block]})),
                    }
                }
                _ => messages.push(json!({"role": "user", "content": blocks(content)})),
            }
        }
        if messages.is_empty() {
            return Err(bad(
                "messages must hold at least one user or assistant message",
            ));
        }
        let max_tokens = r
            .get("max_completion_tokens")
            .or_else(|| r.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(1024);
        let mut body = json!({"model": model, "messages": messages, "max_tokens": max_tokens});
        if !system.is_empty() {
            body["system"] = json!(system.join("\n\n"));
        }
        for (from, to) in [("temperature", "temperature"), ("top_p", "top_p")] {
            if let Some(v) = r.get(from) {
                body[to] = v.clone();
            }
        }
        match r.get("stop") {
            Some(Value::String(s)) => body["stop_sequences"] = json!([s]),
            Some(Value::Array(a)) => body["stop_sequences"] = json!(a),
            _ => {}
        }
        let mut tools: Vec<Value> = r
            .get("tools")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some(json!({
                    "name": f.get("name")?,
                    "description": f.get("description").cloned().unwrap_or(json!("")),
                    "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
                }))
            })
            .collect();
        let mut choice = match r.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => Some(json!({"type": "any"})),
            Some(Value::String(s)) if s == "none" => Some(json!({"type": "none"})),
            Some(Value::Object(o)) => o
                .get("function")
                .and_then(|f| f.get("name"))
                .map(|n| json!({"type": "tool", "name": n})),
            _ => None,
        };
        // JSON-schema output: a tool whose input is the schema, through which the model answers.
        // Alone, the model is made to call it; beside the caller's tools, to call one of them or
        // it (forcing it would leave the caller's tools uncallable: an agent with an output schema
        // could never look anything up); a tool the caller named stays named.
        if let Some(schema) = r
            .get("response_format")
            .filter(|f| f["type"] == "json_schema")
            .and_then(|f| f.pointer("/json_schema/schema"))
        {
            let others = !tools.is_empty();
            tools.push(json!({"name": STRUCTURED, "description": "Answer with this structure.", "input_schema": schema}));
            choice = match choice {
                Some(c) if c["type"] == "tool" => Some(c),
                Some(c) if others && c["type"] != "none" => Some(c),
                None if others => Some(json!({"type": "any"})),
                _ => Some(json!({"type": "tool", "name": STRUCTURED})),
            };
        }
        if !tools.is_empty() {
            body["tools"] = json!(tools);
        }
        if let Some(c) = choice {
            body["tool_choice"] = c;
        }
        if stream {
            body["stream"] = json!(true);
        }
        Ok(body)
    }

    fn finish(stop: Option<&str>) -> &'static str {
        match stop {
            Some("max_tokens") => "length",
            Some("tool_use") => "tool_calls",
            _ => "stop",
        }
    }

    fn usage(u: Option<&Value>) -> Option<Usage> {
        let mut got = input_usage(u)?;
        got.output = tokens(u?.get("output_tokens"))?;
        Some(got)
    }

    /// The input side of a usage object (a stream's `message_start`, whose output comes later).
    /// Input and cached together stay within [`MAX_USAGE_TOKENS`].
    fn input_usage(u: Option<&Value>) -> Option<Usage> {
        let u = u?;
        let input = tokens(u.get("input_tokens"))?;
        let cached = match u.get("cache_read_input_tokens") {
            None | Some(Value::Null) => 0,
            v => tokens(v)?,
        };
        Some(Usage {
            input: input + cached,
            output: 0,
            cached,
        })
        .filter(|u| u.input <= MAX_USAGE_TOKENS)
    }

    /// A Messages answer as an OpenAI chat completion.
    pub fn response(
        v: &Value,
        model: &str,
        request: &Map<String, Value>,
    ) -> Result<(Value, Option<Usage>), CallError> {
        let content = v
            .get("content")
            .and_then(Value::as_array)
            .ok_or_else(|| CallError::Malformed("no content".into()))?;
        let structured = request
            .get("response_format")
            .is_some_and(|f| f["type"] == "json_schema");
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in content {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("tool_use") if structured && b["name"] == STRUCTURED => {
                    text = b.get("input").cloned().unwrap_or(json!({})).to_string();
                }
                Some("tool_use") => calls.push(json!({
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": b.get("input").cloned().unwrap_or(json!({})).to_string()},
                })),
                _ => {}
            }
        }
        let usage = usage(v.get("usage"));
        let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
        let mut reason = finish(v.get("stop_reason").and_then(Value::as_str));
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        } else if reason == "tool_calls" {
            reason = "stop";
        }
        let mut out = json!({
            "id": v.get("id").cloned().unwrap_or(json!("msg")),
            "object": "chat.completion",
            "created": chrono::Utc::now().timestamp(),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        });
        if let Some(u) = usage {
            out["usage"] = u.to_openai();
        }
        Ok((out, usage))
    }

    /// Messages stream events as OpenAI chunks; the last one carries the usage.
    pub fn chunks(
        events: BoxStream<'static, Result<(String, String), CallError>>,
        model: String,
    ) -> ChunkStream {
        struct St {
            id: String,
            input: Option<Usage>,
            /// Content block index → tool call index.
            tools: std::collections::HashMap<u64, usize>,
            finished: bool,
        }
        let chunk = move |id: &str, delta: Value, finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": chrono::Utc::now().timestamp(),
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        };
        let st = St {
            id: "msg".into(),
            input: None,
            tools: Default::default(),
            finished: false,
        };
        events
            .scan(st, move |st, ev| {
                let out: Vec<Result<Value, CallError>> = match ev {
                    Err(e) => vec![Err(e)],
                    Ok((_, data)) => match serde_json::from_str::<Value>(&data) {
                        Err(e) => vec![Err(CallError::Malformed(format!("event not JSON ({e})")))],
                        Ok(v) => match v.get("type").and_then(Value::as_str) {
                            Some("message_start") => {
                                if let Some(id) = v.pointer("/message/id").and_then(Value::as_str) {
                                    st.id = id.to_string();
                                }
                                st.input = input_usage(v.pointer("/message/usage"));
                                vec![Ok(chunk(&st.id, json!({"role": "assistant", "content": ""}), None))]
                            }
                            Some("content_block_start")
                                if v.pointer("/content_block/type") == Some(&json!("tool_use")) =>
                            {
                                let n = st.tools.len();
                                st.tools.insert(v["index"].as_u64().unwrap_or(0), n);
                                vec![Ok(chunk(
                                    &st.id,
                                    json!({"tool_calls": [{"index": n, "id": v.pointer("/content_block/id"), "type": "function",
                                        "function": {"name": v.pointer("/content_block/name"), "arguments": ""}}]}),
                                    None,
                                ))]
                            }
                            Some("content_block_delta") => {
                                let d = &v["delta"];
                                match d.get("type").and_then(Value::as_str) {
                                    Some("text_delta") => vec![Ok(chunk(&st.id, json!({"content": d.get("text")}), None))],
                                    Some("input_json_delta") => {
                                        let n = st.tools.get(&v["index"].as_u64().unwrap_or(0)).copied().unwrap_or(0);
                                        vec![Ok(chunk(
                                            &st.id,
                                            json!({"tool_calls": [{"index": n, "function": {"arguments": d.get("partial_json")}}]}),
                                            None,
                                        ))]
                                    }
                                    _ => vec![],
                                }
                            }
                            Some("message_delta") => {
                                let reason = finish(v.pointer("/delta/stop_reason").and_then(Value::as_str));
                                st.finished = true;
                                let mut c = chunk(&st.id, json!({}), Some(reason));
                                // Usage only when both sides could be read: otherwise the call's
                                // usage is estimated and flagged, never an output (or input) of 0.
                                if let (Some(mut u), Some(out)) =
                                    (st.input, tokens(v.pointer("/usage/output_tokens")))
                                {
                                    u.output = out;
                                    c["usage"] = u.to_openai();
                                }
                                vec![Ok(c)]
                            }
                            Some("error") => vec![Err(CallError::Retryable {
                                status: 529,
                                retry_after: None,
                                message: clip(v.pointer("/error/message").and_then(Value::as_str).unwrap_or("stream error")),
                            })],
                            _ => vec![],
                        },
                    },
                };
                futures::future::ready(Some(futures::stream::iter(out)))
            })
            .flatten()
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider's usage is taken only when every count is a sane whole number: otherwise the
    /// call's usage is estimated (and flagged), never an output of 0 or a sum that wraps.
    #[test]
    fn usage_is_taken_only_when_it_can_be_believed() {
        let u = |v: Value| Usage::from_openai(&v);
        assert_eq!(
            u(
                json!({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}})
            ),
            Some(Usage {
                input: 10,
                output: 5,
                cached: 4
            })
        );
        assert_eq!(u(json!({"prompt_tokens": 10})), None, "no output count");
        assert_eq!(
            u(json!({"prompt_tokens": 10, "completion_tokens": null})),
            None
        );
        assert_eq!(
            u(json!({"prompt_tokens": 10, "completion_tokens": 12.5})),
            None
        );
        assert_eq!(
            u(json!({"prompt_tokens": 10, "completion_tokens": -1})),
            None
        );
        assert_eq!(
            u(json!({"prompt_tokens": u64::MAX, "completion_tokens": 1})),
            None,
            "absurd"
        );
        assert_eq!(
            u(
                json!({"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}})
            ),
            Some(Usage {
                input: 3,
                output: 1,
                cached: 3
            }),
            "no more cached than input"
        );
    }

    fn cut(stream: &[u8], piece: usize) -> Vec<(String, String)> {
        let mut buf = SseBuffer::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(piece) {
            buf.push(chunk);
            while let Some(ev) = buf.next_event() {
                out.push(ev);
            }
        }
        if !buf.is_blank() {
            buf.push(b"\n\n");
            while let Some(ev) = buf.next_event() {
                out.push(ev);
            }
        }
        out
    }

    #[test]
    fn an_output_schema_leaves_the_caller_s_tools_callable_on_anthropic() {
        let schema = json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}});
        let tool = json!({"type": "function", "function": {"name": "read_context", "parameters": {"type": "object"}}});
        let req = |extra: Value| -> Value {
            let mut r =
                json!({"messages": [{"role": "user", "content": "hi"}], "response_format": schema});
            for (k, v) in extra.as_object().unwrap() {
                r[k] = v.clone();
            }
            anthropic::request("m", r.as_object().unwrap(), false).unwrap()
        };
        // With tools: any tool, the structure among them.
        let with_tools = req(json!({"tools": [tool]}));
        assert_eq!(with_tools["tool_choice"], json!({"type": "any"}));
        let names: Vec<&str> = with_tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(names, ["read_context", "structured_output"]);
        // Alone, or with tools switched off: the structure is the answer.
        let forced = json!({"type": "tool", "name": "structured_output"});
        assert_eq!(req(json!({}))["tool_choice"], forced);
        assert_eq!(
            req(json!({"tools": [tool], "tool_choice": "none"}))["tool_choice"],
            forced
        );
        // A tool the caller named stays named; "required" stays "any".
        let named = req(
            json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "read_context"}}}),
        );
        assert_eq!(
            named["tool_choice"],
            json!({"type": "tool", "name": "read_context"})
        );
        assert_eq!(
            req(json!({"tools": [tool], "tool_choice": "required"}))["tool_choice"],
            json!({"type": "any"})
        );
    }

    #[test]
    fn events_are_cut_alike_however_the_body_is_split() {
        let stream =
            b"event: a\ndata: 1\n\n: comment\n\ndata: x\r\ndata: y\r\n\r\nevent: b\ndata: {}";
        let want = vec![
            ("a".to_string(), "1".to_string()),
            (String::new(), "x\ny".to_string()),
            ("b".to_string(), "{}".to_string()),
        ];
        for piece in 1..stream.len() + 1 {
            assert_eq!(cut(stream, piece), want, "pieces of {piece}");
        }
    }

    /// A 1 MiB event in 1-byte chunks, and 2 MiB of empty events in one chunk: linear, so a
    /// second or two even unoptimised (rescanning and shifting the whole buffer for every chunk
    /// and event is about 10^12 steps: hours).
    #[test]
    fn cutting_is_linear_in_the_stream() {
        let started = std::time::Instant::now();
        let mut big = b"data: ".to_vec();
        big.resize(1 << 20, b'x');
        big.extend_from_slice(b"\n\n");
        let mut buf = SseBuffer::default();
        let mut events = 0;
        for b in &big {
            buf.push(std::slice::from_ref(b));
            while buf.next_event().is_some() {
                events += 1;
            }
        }
        assert_eq!(events, 1);
        assert!(buf.is_empty());
        assert!(cut(&b"\n\n".repeat(1 << 20), 1 << 21).is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
