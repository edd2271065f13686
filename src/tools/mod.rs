//! External tools LLM agents may use, declared under `tools:`: one HTTP endpoint per entry
//! (`kind: http`) or every tool of an MCP server (`kind: mcp`, exposed as `<entry>__<tool>`).
//!
//! A tool is **read-only** (the agent calls it and the model sees the result) or **mutating**: a
//! mutating tool is never called by the agent; the model's call becomes a proposal `tool.<name>`
//! that resolve, governance and the approval gate decide, and an accepted one is carried out by
//! the `tools` stage with the action's fencing token ([`Toolbox::execute`]).
//!
//! Parameters named under `inject` (tenant, resource, ...) are filled in by switchyard and removed
//! from the schema the model sees.

pub mod http;
pub mod mcp;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest tool result handed to a model or recorded; a longer one is cut and marked.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// One entry of `tools:`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ToolSpec {
    /// One HTTP endpoint.
    Http(http::Spec),
    /// Every tool an MCP server lists (streamable-HTTP transport).
    Mcp(mcp::Spec),
}

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
    target: Target,
    validator: Option<Arc<jsonschema::Validator>>,
}

#[derive(Clone)]
enum Target {
    Http(Arc<http::HttpTool>),
    Mcp {
        server: std::sync::Weak<mcp::Server>,
        tool: String,
    },
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
        match &self.target {
            Target::Http(t) => t.call(args, ctx).await,
            Target::Mcp { server, tool } => match server.upgrade() {
                Some(s) => s.call(tool, args).await,
                None => Err(format!("the MCP server of tool {} is gone", self.name)),
            },
        }
    }
}

/// Removes the injected parameters from a schema's `properties` and `required`.
fn hide(mut schema: Value, inject: &BTreeMap<String, Inject>) -> Value {
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

fn validator(schema: &Value) -> Result<Option<Arc<jsonschema::Validator>>, String> {
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

/// Problems of the `tools:` section, as `(item, message)`.
pub fn problems(tools: &BTreeMap<String, ToolSpec>) -> Vec<(String, String)> {
    let mut p = Vec::new();
    for (name, spec) in tools {
        let item = format!("tools.{name}");
        if !valid_name(name) || name.contains("__") {
            p.push((
                item.clone(),
                "a tool name may hold only letters, digits, `_` and `-` (at most 64, no `__`)"
                    .into(),
            ));
        }
        let own = match spec {
            ToolSpec::Http(s) => s.problems(),
            ToolSpec::Mcp(s) => s.problems(),
        };
        p.extend(own.into_iter().map(|m| (item.clone(), m)));
    }
    p
}

/// Every configured tool, ready to call. MCP servers are listed when the toolbox is built; one
/// that cannot be reached then is listed again on later use (at most every 30 s).
#[derive(Clone, Default)]
pub struct Toolbox {
    http: BTreeMap<String, Tool>,
    mcp: BTreeMap<String, Arc<mcp::Server>>,
}

impl Toolbox {
    /// Builds the HTTP tools and connects to the MCP servers (a server that does not answer is
    /// logged and tried again later, so switchyard starts without it).
    pub async fn build(tools: &BTreeMap<String, ToolSpec>) -> Result<Toolbox, String> {
        let mut b = Toolbox::default();
        for (name, spec) in tools {
            match spec {
                ToolSpec::Http(s) => {
                    let t = http::HttpTool::new(name, s)?;
                    let parameters = hide(s.parameters.clone(), &s.inject);
                    b.http.insert(
                        name.clone(),
                        Tool {
                            name: name.clone(),
                            description: s.description.clone(),
                            validator: validator(&parameters)
                                .map_err(|e| format!("tools.{name}: {e}"))?,
                            parameters,
                            effect: s.effect,
                            inject: s.inject.clone(),
                            target: Target::Http(Arc::new(t)),
                        },
                    );
                }
                ToolSpec::Mcp(s) => {
                    let server = Arc::new(mcp::Server::new(name, s)?);
                    if let Err(e) = server.refresh().await {
                        tracing::warn!(server = %name, error = %e, "Could not list the MCP server's tools; trying again on use.");
                    }
                    b.mcp.insert(name.clone(), server);
                }
            }
        }
        Ok(b)
    }

    /// The tools whose names match one of `patterns` (an agent's `tools:` list).
    pub async fn offered(&self, patterns: &[String]) -> Vec<Tool> {
        let mut out: Vec<Tool> = self
            .http
            .values()
            .filter(|t| crate::pattern::matches_any(patterns, &t.name))
            .cloned()
            .collect();
        for (name, server) in &self.mcp {
            let prefix = format!("{name}__");
            if !patterns.iter().any(|p| {
                crate::pattern::TypePattern::new(p).matches(&prefix)
                    || p.starts_with(&prefix)
                    || p == "*"
            }) {
                continue;
            }
            for t in server.tools().await {
                if crate::pattern::matches_any(patterns, &t.name) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// The tool of that name, whoever may use it (the executor's lookup).
    pub async fn get(&self, name: &str) -> Option<Tool> {
        if let Some(t) = self.http.get(name) {
            return Some(t.clone());
        }
        let (server, _) = name.split_once("__")?;
        let s = self.mcp.get(server)?;
        s.tools().await.into_iter().find(|t| t.name == name)
    }

    /// True when no tool is declared.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.mcp.is_empty()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_parameters_are_hidden_from_the_model() {
        let inject = BTreeMap::from([("tenant".to_string(), Inject::Tenant)]);
        let s = serde_json::json!({"type": "object", "properties": {"tenant": {"type": "string"},
            "title": {"type": "string"}}, "required": ["tenant", "title"]});
        let h = hide(s, &inject);
        assert_eq!(h["properties"].as_object().map(|o| o.len()), Some(1));
        assert_eq!(h["required"], serde_json::json!(["title"]));
        assert!(valid_name("create_ticket-2"));
        assert!(!valid_name("tool.x"));
        let big = Value::String("x".repeat(MAX_RESULT_BYTES + 10));
        assert_eq!(capped(big)["truncated"], Value::Bool(true));
    }
}
