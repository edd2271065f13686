//! MCP servers (`kind: mcp` under `tools:`) over the streamable-HTTP transport, through the
//! official Rust SDK (`rmcp`). The server's tools are listed when switchyard starts (and again
//! after a failure) and exposed as `<entry>__<tool>`.
//!
//! A tool is mutating unless the config says `read_only` for it or the server annotates it with
//! `readOnlyHint: true`; `mutating` in the config wins over both.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};

use super::model::{capped, hide, valid_name, validator, Call, CallCtx, Effect, Inject, Tool};
use crate::secret::SecretRef;

/// Settings of an MCP server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The server's streamable-HTTP endpoint, e.g. `http://tools.internal:8000/mcp`.
    pub url: String,
    /// An environment variable that, when set, replaces `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// Headers sent with every request (e.g. `Authorization`); values are secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretRef>,
    /// Tools of the server switchyard offers at all (`*` patterns over the server's tool names;
    /// empty: all).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Tools that are read-only whatever the server says.
    #[serde(default)]
    pub read_only: Vec<String>,
    /// Tools that are mutating whatever the server says.
    #[serde(default)]
    pub mutating: Vec<String>,
    /// Parameters switchyard fills in and hides from the model (for every tool that has them).
    #[serde(default)]
    pub inject: BTreeMap<String, Inject>,
    /// Per call (and per listing).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// How long after a failed listing the server is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

impl Spec {
    /// `url`, or the value of `url_env` when that variable is set.
    pub fn effective_url(&self) -> String {
        super::model::effective_url(&self.url, self.url_env.as_deref())
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let url = self.effective_url();
        p.extend(super::model::url_problem(&url));
        if self.timeout_ms == 0 {
            p.push("timeout_ms must be at least 1".into());
        }
        for k in self.headers.keys() {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                p.push(format!("header {k:?} is not a valid header name"));
            }
        }
        p
    }
}

type Client = RunningService<RoleClient, ()>;

/// A connection to one MCP server and its listed tools.
pub struct Server {
    name: String,
    spec: Spec,
    client: Mutex<Option<Arc<Client>>>,
    tools: RwLock<Vec<Tool>>,
    last_failure: Mutex<Option<Instant>>,
    /// Whether a listing ever succeeded.
    listed: std::sync::atomic::AtomicBool,
}

impl Server {
    pub fn new(name: &str, spec: &Spec) -> Result<Self, String> {
        for (k, v) in &spec.headers {
            v.resolve()
                .map_err(|e| format!("tools.{name}.headers.{k}: {e}"))?;
        }
        Ok(Server {
            name: name.to_string(),
            spec: spec.clone(),
            client: Mutex::new(None),
            tools: RwLock::new(Vec::new()),
            last_failure: Mutex::new(None),
            listed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.spec.timeout_ms)
    }

    async fn connect(&self) -> Result<Arc<Client>, String> {
        // rmcp's HTTP client (reqwest 0.13) is built without a TLS crypto provider of its own, so
        // it uses the process's: ring, the one the rest of switchyard's rustls uses.
        static PROVIDER: std::sync::Once = std::sync::Once::new();
        PROVIDER.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let mut headers = HashMap::new();
        for (k, v) in &self.spec.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("header {k:?} is not a valid header name"))?;
            let secret = v.resolve()?;
            let value = http::HeaderValue::from_str(secret.expose())
                .map_err(|_| format!("the value of header {k} is not a valid header value"))?;
            headers.insert(name, value);
        }
        let cfg = StreamableHttpClientTransportConfig::with_uri(self.spec.effective_url())
            .custom_headers(headers);
        let transport = StreamableHttpClientTransport::from_config(cfg);
        let client = tokio::time::timeout(self.timeout(), ().serve(transport))
            .await
            .map_err(|_| format!("MCP server {} did not answer in time", self.name))?
            .map_err(|e| {
                format!(
                    "MCP server {} refused the session: {}",
                    self.name,
                    crate::secret::without_urls(&e.to_string())
                )
            })?;
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    /// Lists the server's tools again.
    pub async fn refresh(self: &Arc<Self>) -> Result<usize, String> {
        let r = self.list().await;
        match &r {
            Ok(tools) => {
                *self.last_failure.lock().await = None;
                self.listed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(server = %self.name, tools = ?tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), "MCP server's tools listed.");
            }
            Err(_) => {
                *self.last_failure.lock().await = Some(Instant::now());
                *self.client.lock().await = None;
            }
        }
        let tools = r?;
        let n = tools.len();
        *self.tools.write().await = tools;
        Ok(n)
    }

    async fn list(self: &Arc<Self>) -> Result<Vec<Tool>, String> {
        let client = self.connect().await?;
        let listed = tokio::time::timeout(self.timeout(), client.list_all_tools())
            .await
            .map_err(|_| format!("MCP server {} did not list its tools in time", self.name))?
            .map_err(|e| {
                format!(
                    "MCP server {} could not list its tools: {}",
                    self.name,
                    crate::secret::without_urls(&e.to_string())
                )
            })?;
        // Weak: the server holds its tools, each tool points back at its server.
        let server = Arc::downgrade(self);
        let mut out = Vec::new();
        for t in listed {
            let tool = t.name.to_string();
            if !self.spec.allow.is_empty() && !crate::pattern::matches_any(&self.spec.allow, &tool)
            {
                continue;
            }
            let name = format!("{}__{tool}", self.name);
            if !valid_name(&name) {
                tracing::warn!(server = %self.name, tool = %tool, "MCP tool skipped: its name is not one models accept.");
                continue;
            }
            let effect = if crate::pattern::matches_any(&self.spec.mutating, &tool) {
                Effect::Mutating
            } else if crate::pattern::matches_any(&self.spec.read_only, &tool)
                || t.annotations
                    .as_ref()
                    .and_then(|a| a.read_only_hint)
                    .unwrap_or(false)
            {
                Effect::ReadOnly
            } else {
                Effect::Mutating
            };
            let schema = Value::Object((*t.input_schema).clone());
            let inject: BTreeMap<String, Inject> = self
                .spec
                .inject
                .iter()
                .filter(|(p, _)| schema["properties"].get(p.as_str()).is_some())
                .map(|(p, i)| (p.clone(), *i))
                .collect();
            // Configured but not declared by this tool: not filled in, and never passed on from
            // the model or a proposal either (a loose schema would take any argument).
            let strip: Vec<String> = self
                .spec
                .inject
                .keys()
                .filter(|p| !inject.contains_key(*p))
                .cloned()
                .collect();
            let parameters = hide(schema, &inject);
            out.push(Tool {
                name,
                description: t.description.map(|d| d.to_string()).unwrap_or_default(),
                validator: validator(&parameters).unwrap_or(None),
                parameters,
                effect,
                inject,
                target: Arc::new(McpTool {
                    server: server.clone(),
                    tool,
                    strip,
                }),
            });
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tools it holds are the server's word: a listing succeeded, and the last one
    /// did not fail. Otherwise a tool missing from them may only not be listed yet.
    pub async fn answered(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::Relaxed)
            && self.last_failure.lock().await.is_none()
    }

    /// The listed tools; lists them first when the last listing failed long enough ago.
    pub async fn tools(self: &Arc<Self>) -> Vec<Tool> {
        let stale = self.tools.read().await.is_empty()
            && self
                .last_failure
                .lock()
                .await
                .is_none_or(|t| t.elapsed() >= RETRY_AFTER);
        if stale {
            if let Err(e) = self.refresh().await {
                tracing::warn!(server = %self.name, error = %e, "Could not list the MCP server's tools.");
            }
        }
        self.tools.read().await.clone()
    }

    /// Calls a tool; the result is the structured content when there is one, else the text
    /// blocks (parsed as JSON when they are). An error result becomes `Err` with its text.
    ///
    /// A call that carries out an action (the tools stage) says so in the request's `_meta` —
    /// `switchyard/idempotency_key` (the action id) and `switchyard/fencing_token` — the MCP
    /// counterpart of the HTTP tools' `Idempotency-Key` and `X-Switchyard-Fencing-Token` headers.
    pub async fn call(
        &self,
        tool: &str,
        args: &Map<String, Value>,
        ctx: &CallCtx,
    ) -> Result<Value, String> {
        let client = self.connect().await?;
        let mut params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.clone());
        if let Some(action) = &ctx.action_id {
            let mut meta = Map::new();
            meta.insert(
                "switchyard/idempotency_key".into(),
                Value::from(action.clone()),
            );
            if let Some(token) = ctx.fencing_token {
                meta.insert("switchyard/fencing_token".into(), Value::from(token));
            }
            params.meta = Some(rmcp::model::Meta(meta));
        }
        let r = tokio::time::timeout(self.timeout(), client.call_tool(params))
            .await
            .map_err(|_| format!("MCP tool {tool} {TIMED_OUT}"))?;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                // The session may be gone: the next call connects again.
                *self.client.lock().await = None;
                // Cut like an error result: the text may quote the server's whole answer, and it
                // reaches the model, the tool-calls topic, the audit trail and the dead letter.
                let text: String = crate::secret::without_urls(&e.to_string())
                    .chars()
                    .take(300)
                    .collect();
                // A request whose connection could not be made (refused, unreachable) never
                // reached the tool: sent again (on a new session), it acts once. Anything else —
                // an error status (a 500 after the tool ran, a proxy's 502 or 504 while the server
                // works on), the session closed mid-call, no answer — may have acted.
                let what = match &e {
                    rmcp::service::ServiceError::TransportSend(_) if not_connected(&e) => NOT_SENT,
                    _ => FAILED,
                };
                return Err(format!("MCP tool {tool} {what}: {text}"));
            }
        };
        let text: Vec<String> = r
            .content
            .iter()
            .filter_map(ContentBlock::as_text)
            .map(|t| t.text.clone())
            .collect();
        let text = text.join("\n");
        if r.is_error == Some(true) {
            let text: String = text.chars().take(300).collect();
            return Err(format!("MCP tool {tool} {REPORTED}: {text}"));
        }
        if let Some(v) = r.structured_content {
            return Ok(capped(v));
        }
        Ok(capped(
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        ))
    }
}

/// One tool of an MCP server, as a [`Tool`]'s target. Weak: the server holds its tools, each tool
/// points back at its server.
struct McpTool {
    server: std::sync::Weak<Server>,
    tool: String,
    /// The server's `inject` parameters this tool does not declare: removed from every call.
    strip: Vec<String>,
}

/// How an error names a call the server received: it reported the tool's own error (the tool ran
/// and failed), or the call went out and no answer came in time, or the session broke during it.
const REPORTED: &str = "reported an error";
const TIMED_OUT: &str = "timed out";
const FAILED: &str = "failed";
/// How an error names a call that was not sent (retried).
const NOT_SENT: &str = "could not be sent";

/// Whether `e` failed to connect at all (reqwest's connect error, somewhere in its chain of
/// causes: rmcp's transport error wraps it without a kind of its own).
fn not_connected(e: &rmcp::service::ServiceError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_connect)
        {
            return true;
        }
        cause = c.source();
    }
    // (The chain may be cut by a wrapper that keeps only its text.)
    format!("{e:?}").contains("ConnectError")
}

impl Call for McpTool {
    /// Only a call that never reached the server (connecting failed) is sent again: one it
    /// received may have had its effect — an error the tool reported means it ran, and a call
    /// whose answer did not come may have run — and MCP has no standard idempotency key (the
    /// `_meta` one is switchyard's own, which few servers honour), so a retry could do it twice.
    /// The action's dead letter says why; `dlq redrive` sends it again once checked.
    fn retryable(&self, error: &str) -> bool {
        let tool = &self.tool;
        ![REPORTED, TIMED_OUT, FAILED]
            .iter()
            .any(|what| error.starts_with(&format!("MCP tool {tool} {what}")))
    }

    fn call<'a>(
        &'a self,
        args: &'a Map<String, Value>,
        ctx: &'a CallCtx,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let stripped;
            let args = if self.strip.iter().any(|p| args.contains_key(p)) {
                let mut a = args.clone();
                a.retain(|k, _| !self.strip.contains(k));
                stripped = a;
                &stripped
            } else {
                args
            };
            match self.server.upgrade() {
                Some(s) => s.call(&self.tool, args, ctx).await,
                None => Err(format!("the MCP server of tool {} is gone", self.tool)),
            }
        })
    }
}
