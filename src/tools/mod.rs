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
pub mod log;
pub mod mcp;
pub mod model;

pub use model::{capped, valid_name, CallCtx, Effect, Inject, Tool, MAX_RESULT_BYTES};

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One entry of `tools:`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ToolSpec {
    /// One HTTP endpoint.
    Http(http::Spec),
    /// Every tool an MCP server lists (streamable-HTTP transport).
    Mcp(mcp::Spec),
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
                    let parameters = model::hide(s.parameters.clone(), &s.inject);
                    b.http.insert(
                        name.clone(),
                        Tool {
                            name: name.clone(),
                            description: s.description.clone(),
                            validator: model::validator(&parameters)
                                .map_err(|e| format!("tools.{name}: {e}"))?,
                            parameters,
                            effect: s.effect,
                            inject: s.inject.clone(),
                            target: Arc::new(t),
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
    pub async fn get(&self, name: &str) -> Lookup {
        if let Some(t) = self.http.get(name) {
            return Lookup::Found(t.clone());
        }
        let Some(s) = name
            .split_once("__")
            .and_then(|(server, _)| self.mcp.get(server))
        else {
            return Lookup::Unknown;
        };
        if let Some(t) = s.tools().await.into_iter().find(|t| t.name == name) {
            return Lookup::Found(t);
        }
        if s.answered().await {
            Lookup::Unknown
        } else {
            Lookup::Unlisted(s.name().to_string())
        }
    }

    /// True when no tool is declared.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.mcp.is_empty()
    }
}

/// What [`Toolbox::get`] found.
pub enum Lookup {
    Found(Tool),
    /// No such tool: not declared, or its MCP server (which answered) does not list it.
    Unknown,
    /// Its MCP server (named) has not listed its tools: it may be one of them once it does.
    Unlisted(String),
}

#[cfg(test)]
mod tests {
    use super::model::*;
    use super::*;
    use serde_json::Value;

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
