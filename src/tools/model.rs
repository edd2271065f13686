//! A tool as switchyard offers it to a model and calls it: [`Tool`], what it is called for
//! ([`CallCtx`]), its [`Effect`], and the parameters switchyard fills in ([`Inject`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest tool result handed to a model or recorded; a longer one is cut and marked.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Whether calling a tool changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Called by the agent; the model sees the result.
    #[default]
    ReadOnly,
    /// Proposed as `tool.<name>`; carried out only once resolve and governance accept it.
    Mutating,
}

impl Effect {
    pub fn name(self) -> &'static str {
        match self {
            Effect::ReadOnly => "read_only",
            Effect::Mutating => "mutating",
        }
    }
}

/// A value switchyard fills in for a tool parameter (hidden from the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inject {
    Tenant,
    Resource,
    TaskId,
    Agent,
    EventId,
}

/// Who a tool call is for: what [`Inject`] draws from, and the headers the call carries.
#[derive(Debug, Clone, Default)]
pub struct CallCtx {
    pub tenant: String,
    pub resource: String,
    pub task_id: String,
    pub agent: String,
    pub event_id: String,
    /// Set when the executor carries out an accepted action: sent as `X-Switchyard-Fencing-Token`.
    pub fencing_token: Option<u64>,
    /// Set with the fencing token: sent as `Idempotency-Key`.
    pub action_id: Option<String>,
}

impl CallCtx {
    fn value(&self, i: Inject) -> &str {
        match i {
            Inject::Tenant => &self.tenant,
            Inject::Resource => &self.resource,
            Inject::TaskId => &self.task_id,
            Inject::Agent => &self.agent,
            Inject::EventId => &self.event_id,
        }
    }
}

/// A tool as offered to a model and called by switchyard.
#[derive(Clone)]
pub struct Tool {
    /// The name the model calls (`^[A-Za-z0-9_-]{1,64}$`, as providers require).
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments, as the model sees it (injected parameters removed).
    pub parameters: Value,
    pub effect: Effect,
    pub inject: BTreeMap<String, Inject>,
    pub target: Arc<dyn Call>,
    pub validator: Option<Arc<jsonschema::Validator>>,
}

/// How a tool is called: an HTTP endpoint, or a tool of an MCP server.
pub trait Call: Send + Sync {
    /// Calls with complete arguments; the result is JSON, an error a sentence for the model.
    fn call<'a>(
        &'a self,
        args: &'a Map<String, Value>,
        ctx: &'a CallCtx,
    ) -> BoxFuture<'a, Result<Value, String>>;

    /// Whether a call that failed with `error` may succeed if sent again (the tools stage's
    /// retries): by default yes — every action call carries its idempotency key.
    fn retryable(&self, _error: &str) -> bool {
        true
    }
}

impl Tool {
    /// The tool as the OpenAI chat-completions API declares it.
    pub fn declaration(&self) -> Value {
        serde_json::json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}})
    }

    /// Why `args` do not fit the tool's schema, or `None`.
    pub fn check(&self, args: &Value) -> Option<String> {
        let v = self.validator.as_ref()?;
        let errors: Vec<String> = v
            .iter_errors(args)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    /// The arguments with the injected parameters set (what is sent, proposed and recorded).
    pub fn with_injected(&self, mut args: Map<String, Value>, ctx: &CallCtx) -> Map<String, Value> {
        for (param, what) in &self.inject {
            args.insert(param.clone(), Value::String(ctx.value(*what).to_string()));
        }
        args
    }

    /// Calls the tool with complete arguments (injected ones included). The result is JSON (text
    /// answers become strings); an error is a sentence fit to show the model.
    pub async fn call(&self, args: &Map<String, Value>, ctx: &CallCtx) -> Result<Value, String> {
        self.target.call(args, ctx).await
    }

    /// See [`Call::retryable`].
    pub fn retryable(&self, error: &str) -> bool {
        self.target.retryable(error)
    }
}

/// Removes the injected parameters from a schema's `properties` and `required`.
pub fn hide(mut schema: Value, inject: &BTreeMap<String, Inject>) -> Value {
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for p in inject.keys() {
            props.remove(p);
        }
    }
    if let Some(req) = schema.get_mut("required").and_then(Value::as_array_mut) {
        req.retain(|r| r.as_str().is_none_or(|r| !inject.contains_key(r)));
    }
    schema
}

pub fn validator(schema: &Value) -> Result<Option<Arc<jsonschema::Validator>>, String> {
    if schema.as_object().is_none_or(|o| o.is_empty()) {
        return Ok(None);
    }
    jsonschema::validator_for(schema)
        .map(|v| Some(Arc::new(v)))
        .map_err(|e| format!("the parameters schema is not a valid JSON schema: {e}"))
}

/// Whether a name is one providers accept for a function.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A result cut to [`MAX_RESULT_BYTES`] of its JSON text, marked, or the result itself.
pub fn capped(v: Value) -> Value {
    let text = v.to_string();
    if text.len() <= MAX_RESULT_BYTES {
        return v;
    }
    let mut end = MAX_RESULT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    serde_json::json!({"truncated": true, "bytes": text.len(), "prefix": &text[..end]})
}

/// `url`, or the value of the environment variable `url_env` when it is set and not empty.
pub fn effective_url(url: &str, url_env: Option<&str>) -> String {
    url_env
        .and_then(|v| std::env::var(v).ok())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| url.to_string())
}

/// Why `url` cannot be a tool's endpoint, or `None`.
pub fn url_problem(url: &str) -> Option<String> {
    (!(url.starts_with("http://") || url.starts_with("https://"))).then(|| {
        format!(
            "url is not an http(s) URL (it reads as {})",
            crate::secret::url_origin(url)
        )
    })
}
