//! LLM agents (`kind: llm`): a model, through the AI gateway, in a tool-calling loop.
//!
//! The prompt is a minijinja template over the event, the task and the agent's scoped context. The
//! model works only through tools: built-in ones bounded by the agent's scopes (`read_context`,
//! `recent_events`, `write_finding`, `propose_action`) and the external tools its `tools:` list
//! allows. It never executes anything itself: its findings and proposals become the task's
//! response, and a mutating tool's call becomes a proposal `tool.<name>`, so resolve, governance
//! and the approval gate decide every side effect. Every model call is accounted by the gateway
//! (transcript on `switchyard.llm-calls`); every tool call is recorded on `switchyard.tool-calls`
//! and audited (`tool_call`).

use std::sync::Arc;
use std::time::Instant;

use crate::spans::Span;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::model::{allowed, Agent, AgentError, AgentRequest, BuildDeps, Scopes};
use crate::gateway::{Caller, Gateway, GatewayError};
use crate::records::{AgentResponse, Finding, Impact, ProposalSpec};
use crate::telemetry::METRICS;
use crate::tools::log::{ToolCallLog, ToolCallRecord};
use crate::tools::{CallCtx, Effect, Tool, Toolbox};

/// Settings of `kind: llm`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// A gateway alias (or `provider/model`).
    pub model: String,
    /// The system prompt (a template, like `prompt`).
    #[serde(default)]
    pub system: Option<String>,
    /// The user prompt: a minijinja template over `event`, `task`, `context` (the facts the
    /// agent's `reads` allow, capped at `context_max_bytes`), `context_note`, `agent`.
    pub prompt: String,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Model calls per run at most (a schema repair may take one more).
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// JSON schema the final answer must match (one repair attempt, then the task fails).
    #[serde(default)]
    pub output: Option<Value>,
    /// Finding key the final answer is written to (must be among `writes`); none: not kept.
    #[serde(default)]
    pub answer_key: Option<String>,
    /// External tools this agent may use (`*` patterns over `tools:` names; MCP tools are
    /// `<server>__<tool>`).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Largest context (JSON bytes) put into the prompt; the rest is left out, with a note.
    #[serde(default = "default_context_max_bytes")]
    pub context_max_bytes: usize,
    /// Malformed or failing tool calls handed back to the model before the run fails.
    #[serde(default = "default_max_tool_errors")]
    pub max_tool_errors: u32,
    /// Tool calls run per model answer; the rest are handed back unrun, as one tool error.
    /// (Left out of the serialised spec at its default, so recorded answers' digests still match.)
    #[serde(
        default = "default_max_tool_calls_per_answer",
        skip_serializing_if = "is_default_max_tool_calls_per_answer"
    )]
    pub max_tool_calls_per_answer: u32,
    /// The highest priority the model may give a proposal (`propose_action`'s `priority`); a
    /// higher one is lowered to it. Text the model reads (an event, a tool's answer) can ask it
    /// for anything: a model-chosen priority would outrank the agents an operator trusts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_priority: i32,
    /// The lowest impact the model may give a proposal; a lower one is raised to it (approval rules
    /// with `min_impact` cannot be dodged by a proposal calling itself `low`). Default `medium`.
    #[serde(
        default = "default_min_impact",
        skip_serializing_if = "is_default_min_impact"
    )]
    pub min_impact: Impact,
    /// Keeps a bounded memory of this agent's runs on a resource (its summaries and proposals,
    /// the context key `memory.<agent>`), shown to its next run there (`memory` in the templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySpec>,
}

/// `memory:` of an LLM agent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// Runs remembered per resource (the oldest is dropped).
    #[serde(default = "default_memory_entries")]
    pub max_entries: usize,
}

fn default_memory_entries() -> usize {
    5
}

/// The most an agent's memory takes (JSON bytes): half what a finding may hold.
const MEMORY_MAX_BYTES: usize = crate::context::MAX_FACT_BYTES / 2;
/// A proposal's parameters kept in memory whole up to this size (JSON bytes).
const MEMORY_PARAMETERS_BYTES: usize = 1024;

/// Keeps the newest `max_entries` entries, and of those as many as fit [`MEMORY_MAX_BYTES`]: the
/// oldest go first (a memory over what a finding may hold would be refused on every run from then
/// on — frozen). The newest entry stays, whatever its size.
fn fit_memory(entries: &mut Vec<Value>, max_entries: usize) {
    let drop = entries.len().saturating_sub(max_entries.max(1));
    entries.drain(..drop);
    // Each entry serialised once; the oldest cut in one go.
    let sizes: Vec<usize> = entries.iter().map(|e| e.to_string().len() + 1).collect();
    let mut size: usize = sizes.iter().sum();
    let mut cut = 0;
    while size > MEMORY_MAX_BYTES && entries.len() - cut > 1 {
        size -= sizes[cut];
        cut += 1;
    }
    entries.drain(..cut);
}

/// The context key an LLM agent's memory lives under.
pub fn memory_key(agent: &str) -> String {
    format!("memory.{agent}")
}

fn default_max_iterations() -> u32 {
    8
}
fn default_context_max_bytes() -> usize {
    16 * 1024
}
fn default_max_tool_errors() -> u32 {
    3
}
fn is_zero(n: &i32) -> bool {
    *n == 0
}
fn default_min_impact() -> Impact {
    Impact::Medium
}
fn is_default_min_impact(i: &Impact) -> bool {
    *i == default_min_impact()
}
fn default_max_tool_calls_per_answer() -> u32 {
    16
}
fn is_default_max_tool_calls_per_answer(n: &u32) -> bool {
    *n == default_max_tool_calls_per_answer()
}

/// The built-in tools every LLM agent has.
pub const BUILTIN_TOOLS: &[&str] = &[
    "read_context",
    "recent_events",
    "write_finding",
    "propose_action",
    "delegate",
    "related_context",
];

impl Spec {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.model.is_empty() {
            p.push("model must name a gateway alias".into());
        }
        let env = minijinja::Environment::new();
        for (field, t) in [
            ("prompt", Some(&self.prompt)),
            ("system", self.system.as_ref()),
        ] {
            if let Some(t) = t {
                if let Err(e) = env.template_from_str(t) {
                    p.push(format!("{field} is not a valid template: {e}"));
                }
            }
        }
        if self.max_iterations == 0 {
            p.push("max_iterations must be at least 1".into());
        }
        if self.max_priority < 0 {
            p.push("max_priority must not be negative (lower priorities stay as proposed)".into());
        }
        if self.max_tool_calls_per_answer == 0 {
            p.push("max_tool_calls_per_answer must be at least 1".into());
        }
        if let Some(o) = &self.output {
            if let Err(e) = jsonschema::validator_for(o) {
                p.push(format!("output is not a valid JSON schema: {e}"));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                p.push("temperature must be between 0 and 2".into());
            }
        }
        for (i, t) in self.tools.iter().enumerate() {
            if let Some(m) = crate::pattern::pattern_problem(t) {
                p.push(format!("tools[{i}]: {m}"));
            }
        }
        p
    }

    /// Problems between this agent and the rest of the config: tools that match nothing,
    /// mutating HTTP tools whose `tool.<name>` action the agent may not propose, an answer key it
    /// may not write.
    pub fn config_problems(
        &self,
        common: &Scopes,
        tools: &std::collections::BTreeMap<String, crate::tools::ToolSpec>,
    ) -> Vec<String> {
        use crate::tools::ToolSpec;
        let mut p = Vec::new();
        for t in &self.tools {
            let pat = crate::pattern::TypePattern::new(t);
            let hit = tools.iter().any(|(name, spec)| match spec {
                ToolSpec::Http(_) => pat.matches(name),
                // MCP tools are listed at start: a pattern naming the server is enough here.
                ToolSpec::Mcp(_) => {
                    t.starts_with(&format!("{name}__")) || pat.matches(&format!("{name}__"))
                }
            });
            if !hit {
                p.push(format!(
                    "tools: {t:?} matches no tool under tools: (MCP tools are named <server>__<tool>)"
                ));
            }
        }
        for (name, spec) in tools {
            if let ToolSpec::Http(h) = spec {
                let offered = crate::pattern::matches_any(&self.tools, name);
                let action = format!("tool.{name}");
                if offered && h.effect == Effect::Mutating && !allowed(&common.actions, &action) {
                    p.push(format!(
                        "tool {name} is mutating: add {action:?} to actions so its calls can be proposed"
                    ));
                }
            }
        }
        if let Some(k) = &self.answer_key {
            if !allowed(&common.writes, k) {
                p.push(format!("answer_key {k:?} is not among writes"));
            }
        }
        p
    }

    pub fn build(
        &self,
        name: &str,
        scopes: Scopes,
        deps: &BuildDeps,
    ) -> Result<Arc<dyn Agent>, String> {
        let gateway = deps.gateway.clone().ok_or_else(|| {
            "kind: llm needs the AI gateway: declare gateway.providers (or set SWITCHYARD_LLM_BASE_URL)"
                .to_string()
        })?;
        if let Some(a) = gateway.unknown_model(&self.model) {
            return Err(a);
        }
        let output = match &self.output {
            Some(o) => Some(Arc::new(
                jsonschema::validator_for(o).map_err(|e| format!("output: {e}"))?,
            )),
            None => None,
        };
        Ok(Arc::new(LlmAgent {
            name: name.to_string(),
            spec: self.clone(),
            gateway,
            tools: deps.tools.clone(),
            recorder: deps.tool_calls.clone(),
            output,
            scopes,
        }))
    }
}

pub struct LlmAgent {
    name: String,
    spec: Spec,
    gateway: Arc<Gateway>,
    tools: Arc<Toolbox>,
    recorder: Option<ToolCallLog>,
    output: Option<Arc<jsonschema::Validator>>,
    /// The declared scopes: the built-in tools enforce them (the agent stage checks them again).
    scopes: Scopes,
}

/// A run's state: the conversation and what the model produced so far.
struct Run<'a> {
    req: &'a AgentRequest,
    ctx: CallCtx,
    external: Vec<Tool>,
    out: AgentResponse,
    iteration: u32,
    tool_errors: u32,
    last_tool_error: String,
}

impl Agent for LlmAgent {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        Box::pin(self.run(req))
    }
}

fn gateway_error(e: GatewayError, calls: u32) -> AgentError {
    match e {
        GatewayError::BudgetExhausted { budget } => AgentError::Permanent(format!(
            "budget {budget:?} is exhausted (after {calls} model calls of this run)"
        )),
        GatewayError::RateLimited { .. }
        | GatewayError::ProviderFailed(_)
        | GatewayError::Unavailable(_)
        | GatewayError::CallerGone => AgentError::Retryable(format!("model call failed: {e}")),
        GatewayError::UnknownModel(_) | GatewayError::BadRequest(_) => {
            AgentError::Permanent(format!("model call refused: {e}"))
        }
    }
}

/// The final answer as JSON: the text itself, or the JSON inside a ``` fence.
pub fn answer_json(text: &str) -> Result<Value, String> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.strip_suffix("```"))
        .unwrap_or(t)
        .trim();
    serde_json::from_str(t).map_err(|e| format!("the answer is not JSON ({e})"))
}

impl LlmAgent {
    /// The template variables of a task: event, task, scoped context (capped), note.
    fn vars(&self, req: &AgentRequest) -> Value {
        let mut context = Map::new();
        let mut left_out = Vec::new();
        let mut used = 2;
        for (k, v) in req.context.facts() {
            let n = k.len() + v.to_string().len() + 4;
            if used + n > self.spec.context_max_bytes {
                left_out.push(k.clone());
            } else {
                used += n;
                context.insert(k.clone(), v.clone());
            }
        }
        let note = if left_out.is_empty() {
            String::new()
        } else {
            format!(
                "{} facts were left out to keep the prompt under {} bytes: {}. Use read_context to read them.",
                left_out.len(),
                self.spec.context_max_bytes,
                left_out.join(", ")
            )
        };
        let memory = req
            .context
            .facts()
            .get(&memory_key(&self.name))
            .cloned()
            .unwrap_or(json!([]));
        json!({"event": req.event, "task": req.task, "context": context, "context_note": note,
               "agent": self.name, "attempt": req.attempt, "related": req.context.related(),
               "memory": memory})
    }

    fn render(&self, template: &str, vars: &Value) -> Result<String, AgentError> {
        minijinja::Environment::new()
            .render_str(template, minijinja::value::Serde(vars))
            .map_err(|e| AgentError::Permanent(format!("the prompt template failed: {e}")))
    }

    async fn run(&self, req: &AgentRequest) -> Result<AgentResponse, AgentError> {
        let vars = self.vars(req);
        let mut messages = Vec::new();
        if let Some(s) = &self.spec.system {
            messages.push(json!({"role": "system", "content": self.render(s, &vars)?}));
        }
        messages.push(json!({"role": "user", "content": self.render(&self.spec.prompt, &vars)?}));
        let external = self.tools.offered(&self.spec.tools).await;
        let mut declarations = builtin_declarations();
        // A workflow supervisor may hand work to the agents its step allows.
        if let Some(st) = req.task.step.as_ref().filter(|s| !s.delegates.is_empty()) {
            declarations.push(json!({"type": "function", "function": {"name": "delegate",
                "description": "Hand a piece of work to another agent. It runs after this turn ends; you are then called again with every delegated result (task.step.inputs.delegated) to review and conclude. Only your final proposals go to conflict resolution.",
                "parameters": {"type": "object", "properties": {
                    "agent": {"type": "string", "enum": st.delegates},
                    "instructions": {"type": "string"}}, "required": ["agent", "instructions"]}}}));
        }
        if !req.context.related().is_null() {
            declarations.push(json!({"type": "function", "function": {"name": "related_context",
                "description": "Facts of resources related to this one (e.g. the services it depends_on), as this agent's `related` settings allow. Propose an action on one of them with propose_action's `resource`.",
                "parameters": {"type": "object", "properties": {
                    "relation": {"type": "string"}, "depth": {"type": "integer", "minimum": 1, "maximum": 3},
                    "keys": {"type": "array", "items": {"type": "string"}}}, "required": ["relation"]}}}));
        }
        declarations.extend(external.iter().map(Tool::declaration));
        let caller = Caller {
            tenant: req.task.tenant.clone(),
            agent: self.name.clone(),
            workflow: req.task.workflow_id.clone(),
            task: req.task.task_id.clone(),
            resource: req.task.resource.clone(),
            traceparent: req.traceparent.clone(),
        };
        let mut run = Run {
            req,
            ctx: CallCtx {
                tenant: req.task.tenant.clone(),
                resource: req.task.resource.clone(),
                task_id: req.task.task_id.clone(),
                agent: self.name.clone(),
                event_id: req.event.id.clone(),
                fencing_token: None,
                action_id: None,
            },
            external,
            out: AgentResponse::default(),
            iteration: 0,
            tool_errors: 0,
            last_tool_error: String::new(),
        };
        let mut repairing = false;
        let result = loop {
            let limit = self.spec.max_iterations + u32::from(repairing);
            if run.iteration >= limit {
                break Err(AgentError::Permanent(format!(
                    "max_iterations ({}) reached without a final answer",
                    self.spec.max_iterations
                )));
            }
            run.iteration += 1;
            let mut body = Map::new();
            body.insert("messages".into(), Value::Array(messages.clone()));
            body.insert("tools".into(), Value::Array(declarations.clone()));
            body.insert("tool_choice".into(), json!("auto"));
            if let Some(m) = self.spec.max_tokens {
                body.insert("max_tokens".into(), json!(m));
            }
            if let Some(t) = self.spec.temperature {
                body.insert("temperature".into(), json!(t));
            }
            if let Some(o) = &self.spec.output {
                body.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": "output", "schema": o}}),
                );
            }
            let c = match self
                .gateway
                .complete(&caller, &self.spec.model, &body)
                .await
            {
                Ok(c) => c,
                Err(e) => break Err(gateway_error(e, run.iteration - 1)),
            };
            self.count(&c.meta);
            *run.out.cost.get_or_insert(0.0) += c.meta.cost;
            run.out.model = Some(c.meta.model.clone());
            let Some(choice) = c.body["choices"].get(0) else {
                // No choice at all (a provider's content filter answers so): no answer to keep.
                break Err(AgentError::Retryable(
                    "the model's answer has no choices".into(),
                ));
            };
            let finish = choice["finish_reason"].as_str().unwrap_or("").to_string();
            let msg = choice["message"].clone();
            let calls = msg
                .get("tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let text = msg.get("content").and_then(Value::as_str).unwrap_or("");
            let mut kept = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                kept["tool_calls"] = Value::Array(calls.clone());
                messages.push(kept);
                let cap = self.spec.max_tool_calls_per_answer as usize;
                for call in calls.iter().take(cap) {
                    let (id, content) = self.tool_call(&mut run, call).await;
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
                if calls.len() > cap {
                    // Every call gets its answer (providers refuse a conversation without one);
                    // the excess is not run and counts as one tool error.
                    let why = format!(
                        "not run: at most {cap} tool calls are run per answer ({} were asked for)",
                        calls.len()
                    );
                    for call in &calls[cap..] {
                        let id = call["id"].as_str().unwrap_or("");
                        messages.push(json!({"role": "tool", "tool_call_id": id,
                                             "content": json!({"error": why}).to_string()}));
                    }
                    METRICS
                        .tool_calls
                        .with_label_values(&["unknown", "not_run"])
                        .inc_by((calls.len() - cap) as u64);
                    run.tool_errors += 1;
                    run.last_tool_error = why;
                }
                if run.tool_errors > self.spec.max_tool_errors {
                    break Err(AgentError::Permanent(format!(
                        "too many failed tool calls ({}); the last: {}",
                        run.tool_errors, run.last_tool_error
                    )));
                }
                continue;
            }
            // A final answer cut off at the output cap, filtered, or empty is not an answer: it
            // would be kept as the agent's finding and count as a success.
            match finish.as_str() {
                "length" => {
                    break Err(AgentError::Permanent(
                        "the final answer was cut off at the output limit (finish_reason length): raise the alias's max_tokens or ask for less".into(),
                    ))
                }
                "content_filter" => {
                    break Err(AgentError::Permanent(
                        "the provider withheld the final answer (finish_reason content_filter)"
                            .into(),
                    ))
                }
                _ if text.trim().is_empty() => {
                    break Err(AgentError::Retryable(
                        "the model's final answer is empty".into(),
                    ))
                }
                _ => {}
            }
            messages.push(kept);
            let answer = match &self.output {
                None => Value::String(text.to_string()),
                Some(v) => {
                    let checked = answer_json(text).and_then(|a| {
                        let errors: Vec<String> =
                            v.iter_errors(&a).take(3).map(|e| e.to_string()).collect();
                        if errors.is_empty() {
                            Ok(a)
                        } else {
                            Err(errors.join("; "))
                        }
                    });
                    match checked {
                        Ok(a) => a,
                        Err(why) if !repairing => {
                            repairing = true;
                            messages.push(json!({"role": "user", "content": format!(
                                "Your answer does not match the required output schema: {why}. Answer again with only a JSON document matching the schema.")}));
                            continue;
                        }
                        Err(why) => {
                            break Err(AgentError::Permanent(format!(
                                "the final answer does not match the output schema after one repair: {why}"
                            )))
                        }
                    }
                }
            };
            // The answer and the memory go first: past the findings a task may write (a model
            // that wrote hundreds), the stage keeps the first ones.
            let mut first = Vec::new();
            if let Some(k) = &self.spec.answer_key {
                first.push(Finding {
                    key: k.clone(),
                    value: answer.clone(),
                });
            }
            if let Some(m) = &self.spec.memory {
                first.push(self.remember(req, m, &answer, &run.out));
            }
            run.out.findings.splice(0..0, first);
            break Ok(std::mem::take(&mut run.out));
        };
        METRICS
            .agent_llm_iterations
            .with_label_values(&[&self.name])
            .observe(f64::from(run.iteration));
        if let Err(e) = &result {
            tracing::warn!(agent = %self.name, task_id = %req.task.task_id, iterations = run.iteration, error = %e, "LLM agent run failed.");
        }
        result
    }

    /// This run appended to the agent's memory of the resource, capped at `max_entries`.
    fn remember(
        &self,
        req: &AgentRequest,
        m: &MemorySpec,
        answer: &Value,
        out: &AgentResponse,
    ) -> Finding {
        let key = memory_key(&self.name);
        let mut entries: Vec<Value> = req
            .context
            .facts()
            .get(&key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let summary: String = match answer {
            Value::String(s) => s.chars().take(500).collect(),
            other => other.to_string().chars().take(500).collect(),
        };
        // What the scopes let through (refused writes and proposals are audited, not remembered):
        // the first 16 proposals, each one's parameters cut to a bounded text when large.
        let params = |v: &Value| {
            let t = v.to_string();
            if t.len() <= MEMORY_PARAMETERS_BYTES {
                v.clone()
            } else {
                Value::String(format!(
                    "{}… ({} bytes)",
                    t.chars()
                        .take(MEMORY_PARAMETERS_BYTES / 4)
                        .collect::<String>(),
                    t.len()
                ))
            }
        };
        entries.push(json!({
            "at": crate::event::now_rfc3339(),
            "event": {"id": req.event.id, "type": req.event.ty},
            "summary": summary,
            "findings": out.findings.iter().filter(|f| allowed(&self.scopes.writes, &f.key)).map(|f| &f.key).collect::<Vec<_>>(),
            "proposals": out.proposals.iter().filter(|p| allowed(&self.scopes.actions, &p.action)).take(16).map(|p| json!({"action": p.action, "resource": p.resource, "parameters": params(&p.parameters)})).collect::<Vec<_>>(),
        }));
        fit_memory(&mut entries, m.max_entries);
        Finding {
            key,
            value: Value::Array(entries),
        }
    }

    fn count(&self, m: &crate::gateway::CallMeta) {
        for (kind, n) in [
            ("input", m.usage.input),
            ("output", m.usage.output),
            ("cached", m.usage.cached),
        ] {
            METRICS
                .agent_llm_tokens
                .with_label_values(&[&self.name, kind])
                .inc_by(n);
        }
        if !m.currency.is_empty() {
            METRICS
                .agent_llm_cost
                .with_label_values(&[&self.name, &m.currency])
                .inc_by(m.cost);
        }
    }

    /// Handles one tool call of the model: the call's id and the content handed back.
    async fn tool_call(&self, run: &mut Run<'_>, call: &Value) -> (String, String) {
        let id = call["id"].as_str().unwrap_or("").to_string();
        let name = call["function"]["name"].as_str().unwrap_or("").to_string();
        let raw = call["function"]["arguments"].as_str().unwrap_or("{}");
        let started = Instant::now();
        let parsed: Result<Map<String, Value>, String> = if raw.trim().is_empty() {
            Ok(Map::new())
        } else {
            match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => Err("the arguments must be a JSON object".into()),
                Err(e) => Err(format!("the arguments are not valid JSON: {e}")),
            }
        };
        let (effect, args, r) = match parsed {
            Err(e) => (
                "unknown",
                Value::String(raw.chars().take(1000).collect()),
                Err(e),
            ),
            Ok(args) => {
                let (effect, r, args) = self.dispatch(run, &name, args).await;
                (effect, Value::Object(args), r)
            }
        };
        let label = if BUILTIN_TOOLS.contains(&name.as_str())
            || run.external.iter().any(|t| t.name == name)
        {
            name.as_str()
        } else {
            "unknown"
        };
        let (outcome, result, error) = match r {
            Ok((outcome, v)) => (outcome, v, None),
            Err(e) => {
                run.tool_errors += 1;
                run.last_tool_error = format!("{name}: {e}");
                ("error", Value::Null, Some(e))
            }
        };
        METRICS
            .tool_calls
            .with_label_values(&[label, outcome])
            .inc();
        let mut span = Span::random(
            format!("execute_tool {name}"),
            run.req.traceparent.as_deref(),
        )
        .started_at(std::time::SystemTime::now() - started.elapsed());
        span.attr("gen_ai.operation.name", "execute_tool")
            .attr("gen_ai.tool.name", name.clone())
            .attr("gen_ai.tool.call.id", id.clone())
            .attr("switchyard.tool.effect", effect)
            .attr("switchyard.tool.outcome", outcome)
            .attr("switchyard.llm.iteration", i64::from(run.iteration));
        if let Some(e) = &error {
            span.fail(e.clone());
        }
        span.end();
        let content = match &error {
            Some(e) => json!({"error": e}).to_string(),
            None => result.to_string(),
        };
        if let Some(log) = &self.recorder {
            log.write(
                &run.ctx,
                &ToolCallRecord {
                    tool: name,
                    effect,
                    iteration: run.iteration,
                    arguments: args,
                    outcome,
                    result,
                    error,
                    duration_ms: started.elapsed().as_millis() as u64,
                },
            );
        }
        (id, content)
    }

    /// Runs a tool call with parsed arguments: its effect, what happened (outcome, result) or why
    /// it failed, and the arguments as used (injected ones included).
    async fn dispatch(
        &self,
        run: &mut Run<'_>,
        name: &str,
        args: Map<String, Value>,
    ) -> (
        &'static str,
        Result<(&'static str, Value), String>,
        Map<String, Value>,
    ) {
        if BUILTIN_TOOLS.contains(&name) {
            let r = self.builtin(run, name, &args);
            return ("builtin", r, args);
        }
        let Some(tool) = run.external.iter().find(|t| t.name == name).cloned() else {
            return (
                "unknown",
                Err(format!(
                    "there is no tool {name:?}; use one of the tools offered"
                )),
                args,
            );
        };
        if let Some(why) = tool.check(&Value::Object(args.clone())) {
            return (
                tool.effect.name(),
                Err(format!(
                    "the arguments do not match the tool's schema: {why}"
                )),
                args,
            );
        }
        let args = tool.with_injected(args, &run.ctx);
        match tool.effect {
            Effect::Mutating => {
                let action = format!("tool.{name}");
                let ok = allowed(&self.scopes.actions, &action);
                run.out.proposals.push(ProposalSpec {
                    action: action.clone(),
                    parameters: Value::Object(args.clone()),
                    priority: 0,
                    impact: Impact::Medium.max(self.spec.min_impact),
                    reason: Some(format!("{} asked to call {name}", self.name)),
                    cost: None,
                    resource: None,
                    seen_version: None,
                    seen_at: None,
                    confidence: None,
                });
                let r = if ok {
                    Ok((
                        "proposed",
                        json!({"status": "proposed", "action": action,
                               "note": "This tool changes things: the call was proposed, and runs only once conflict resolution and governance accept it (possibly after a human approval). Do not call it again for the same purpose."}),
                    ))
                } else {
                    Ok((
                        "refused",
                        json!({"status": "refused", "action": action,
                               "note": format!("{} may not propose {action}.", self.name)}),
                    ))
                };
                (tool.effect.name(), r, args)
            }
            Effect::ReadOnly => {
                let r = tool.call(&args, &run.ctx).await.map(|v| ("ok", v));
                (tool.effect.name(), r, args)
            }
        }
    }

    /// The built-in tools, bounded by the agent's scopes. Refused reads and writes are kept so
    /// the agent stage audits them; the model is told at once.
    fn builtin(
        &self,
        run: &mut Run<'_>,
        name: &str,
        args: &Map<String, Value>,
    ) -> Result<(&'static str, Value), String> {
        let ctx = &run.req.context;
        match name {
            "read_context" => {
                let keys: Vec<String> = args
                    .get("keys")
                    .and_then(|k| serde_json::from_value(k.clone()).ok())
                    .ok_or("keys must be a list of context keys")?;
                let mut facts = Map::new();
                let mut refused = Vec::new();
                for k in keys.iter().take(100) {
                    if !self
                        .reads()
                        .iter()
                        .any(|p| crate::pattern::TypePattern::new(p).matches(k))
                    {
                        // Recorded as a refused read (audited by the agent stage).
                        let _ = ctx.get(k);
                        refused.push(k.clone());
                    } else {
                        facts.insert(k.clone(), ctx.get(k).cloned().unwrap_or(Value::Null));
                    }
                }
                let outcome = if refused.is_empty() { "ok" } else { "refused" };
                Ok((outcome, json!({"facts": facts, "refused": refused})))
            }
            "recent_events" => {
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(10).min(50) as usize;
                if !self
                    .reads()
                    .iter()
                    .any(|p| crate::pattern::TypePattern::new(p).matches("recent_events"))
                {
                    let _ = ctx.get("recent_events");
                    return Ok((
                        "refused",
                        json!({"refused": "recent_events is not among this agent's reads"}),
                    ));
                }
                let events: Vec<Value> = ctx
                    .get("recent_events")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().take(n).cloned().collect())
                    .unwrap_or_default();
                Ok(("ok", json!({"events": events})))
            }
            "write_finding" => {
                let key = args
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or("key must be a string")?
                    .to_string();
                // The answer's key and the memory are switchyard's to write (from the final
                // answer, checked against `output`, and from the run): a model told by what it
                // reads to write them would replace the answer or plant instructions in every later
                // run's `{{ memory }}`.
                if self.spec.answer_key.as_deref() == Some(key.as_str())
                    || key == memory_key(&self.name)
                {
                    return Ok((
                        "refused",
                        json!({"status": "refused", "key": key,
                               "note": format!("{key} is written by switchyard from your final answer and this run, not with write_finding.")}),
                    ));
                }
                let value = args.get("value").cloned().unwrap_or(Value::Null);
                let ok = !key.starts_with('_') && allowed(&self.scopes.writes, &key);
                run.out.findings.push(Finding {
                    key: key.clone(),
                    value,
                });
                if ok {
                    Ok((
                        "ok",
                        json!({"status": "written", "key": key,
                        "note": "Shared with other agents of this resource once this task finishes."}),
                    ))
                } else {
                    Ok((
                        "refused",
                        json!({"status": "refused", "key": key,
                        "note": format!("{} may not write {key}.", self.name)}),
                    ))
                }
            }
            "propose_action" => {
                let req_resource = run.req.task.resource.clone();
                let req_resource = req_resource.as_str();
                let action = args
                    .get("action")
                    .and_then(Value::as_str)
                    .ok_or("action must be a string")?
                    .to_string();
                if let Some(tool) = action.strip_prefix("tool.") {
                    // A tool's call is proposed by calling the tool (its schema checked, its
                    // injected parameters set, its call logged), not by naming it here.
                    return Ok((
                        "refused",
                        json!({"status": "refused", "action": action,
                               "note": format!("To have {tool} carried out, call the tool {tool} itself.")}),
                    ));
                }
                let impact: Impact = match args.get("impact") {
                    None | Some(Value::Null) => Impact::Medium,
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|_| "impact must be low, medium or high".to_string())?,
                };
                // The model's word on impact and priority is bounded by the agent's settings.
                let impact = impact.max(self.spec.min_impact);
                let priority = args
                    .get("priority")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    .clamp(i64::from(i32::MIN), i64::from(self.spec.max_priority));
                let priority = i32::try_from(priority).unwrap_or(0);
                let target = args
                    .get("resource")
                    .and_then(Value::as_str)
                    .filter(|r| *r != req_resource);
                // Another resource: only one this task was given as related.
                if let Some(t) = target {
                    let related = ctx
                        .related()
                        .as_object()
                        .into_iter()
                        .flat_map(|m| m.values())
                        .any(|rel| rel.get(t).is_some());
                    if !related {
                        return Ok((
                            "refused",
                            json!({"status": "refused", "resource": t,
                                   "note": format!("{t} is not among the resources related to {req_resource} that this agent was given (see related_context).")}),
                        ));
                    }
                }
                // A confidence out of range is this call's error: the model may propose again.
                let confidence = crate::records::check_confidence(
                    args.get("confidence").unwrap_or(&Value::Null),
                )?;
                let ok = allowed(&self.scopes.actions, &action);
                run.out.proposals.push(ProposalSpec {
                    action: action.clone(),
                    parameters: args.get("parameters").cloned().unwrap_or(json!({})),
                    priority,
                    impact,
                    reason: args
                        .get("reason")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    cost: args.get("cost").and_then(Value::as_f64),
                    resource: args
                        .get("resource")
                        .and_then(Value::as_str)
                        .filter(|r| *r != req_resource)
                        .map(str::to_string),
                    seen_version: None,
                    seen_at: None,
                    confidence,
                });
                if ok {
                    Ok((
                        "proposed",
                        json!({"status": "proposed", "action": action,
                        "note": "Conflict resolution and governance decide whether it runs."}),
                    ))
                } else {
                    Ok((
                        "refused",
                        json!({"status": "refused", "action": action,
                        "note": format!("{} may not propose {action}.", self.name)}),
                    ))
                }
            }
            "delegate" => {
                let can = run
                    .req
                    .task
                    .step
                    .as_ref()
                    .map(|s| s.delegates.clone())
                    .unwrap_or_default();
                let agent = args
                    .get("agent")
                    .and_then(Value::as_str)
                    .ok_or("agent must be a string")?
                    .to_string();
                if !can.contains(&agent) {
                    return Err(if can.is_empty() {
                        "this task may not delegate".to_string()
                    } else {
                        format!("may not delegate to {agent:?}; allowed: {}", can.join(", "))
                    });
                }
                let instructions = args
                    .get("instructions")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                run.out.delegate.push(crate::records::Delegation {
                    agent: agent.clone(),
                    instructions,
                });
                Ok((
                    "proposed",
                    json!({"status": "delegated", "agent": agent,
                    "note": "It runs after you answer; you will be called again with its result."}),
                ))
            }
            "related_context" => {
                let relation = args
                    .get("relation")
                    .and_then(Value::as_str)
                    .ok_or("relation must be a string")?;
                let depth = args.get("depth").and_then(Value::as_u64).unwrap_or(3);
                let keys: Option<Vec<String>> = args
                    .get("keys")
                    .and_then(|k| serde_json::from_value(k.clone()).ok());
                let Some(rel) = ctx.related().get(relation).and_then(Value::as_object) else {
                    return Ok((
                        "refused",
                        json!({"refused": format!("{relation} is not among this agent's related settings"),
                               "available": ctx.related().as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()}),
                    ));
                };
                let mut shown = Map::new();
                for (r, v) in rel {
                    if v["depth"].as_u64().unwrap_or(1) > depth {
                        continue;
                    }
                    let mut v = v.clone();
                    if let (Some(keys), Some(facts)) = (&keys, v["facts"].as_object_mut()) {
                        facts.retain(|k, _| keys.contains(k));
                    }
                    shown.insert(r.clone(), v);
                }
                Ok(("ok", json!({"relation": relation, "resources": shown})))
            }
            _ => Err(format!("there is no tool {name:?}")),
        }
    }

    fn reads(&self) -> &[String] {
        &self.scopes.reads
    }
}

/// The built-in tools as the OpenAI chat-completions API declares them.
fn builtin_declarations() -> Vec<Value> {
    let f = |name: &str, description: &str, parameters: Value| json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}});
    vec![
        f(
            "read_context",
            "Read facts of this resource's shared context (only keys this agent may read).",
            json!({"type": "object", "properties": {"keys": {"type": "array", "items": {"type": "string"}}},
                   "required": ["keys"]}),
        ),
        f(
            "recent_events",
            "The most recent events seen for this resource, newest first.",
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 50}}}),
        ),
        f(
            "write_finding",
            "Share a finding with other agents working on this resource (a context key this agent may write).",
            json!({"type": "object", "properties": {"key": {"type": "string"}, "value": {}},
                   "required": ["key", "value"]}),
        ),
        f(
            "propose_action",
            "Propose an action on this resource. It is not executed by you: conflict resolution, governance and possibly a human decide.",
            json!({"type": "object", "properties": {
                "action": {"type": "string"}, "parameters": {"type": "object"},
                "impact": {"type": "string", "enum": ["low", "medium", "high"]},
                "reason": {"type": "string"}, "priority": {"type": "integer"},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1, "description": "How sure you are that this action is right, from 0 to 1; low confidence may send it to a person for review."},
                "resource": {"type": "string", "description": "Another resource the action is for: one of the related resources (see related_context); default this one."}},
                "required": ["action", "reason"]}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory keeps its newest entries within `max_entries` and within half what a finding may
    /// hold, so it never grows past what the agent stage accepts (and freezes).
    #[test]
    fn a_memory_keeps_its_newest_entries_within_its_count_and_size() {
        let entry = |i: usize, bytes: usize| json!({"n": i, "summary": "x".repeat(bytes)});
        let mut small: Vec<Value> = (0..7).map(|i| entry(i, 10)).collect();
        fit_memory(&mut small, 5);
        assert_eq!(
            small.iter().map(|e| e["n"].clone()).collect::<Vec<_>>(),
            [2, 3, 4, 5, 6]
        );
        // 50 entries of 2 KiB: 100 KiB, over what a finding may hold.
        let mut big: Vec<Value> = (0..50).map(|i| entry(i, 2048)).collect();
        fit_memory(&mut big, 50);
        let size: usize = big.iter().map(|e| e.to_string().len() + 1).sum();
        assert!(
            size <= MEMORY_MAX_BYTES && size > MEMORY_MAX_BYTES - 2200,
            "{size}"
        );
        assert_eq!(
            big.last().map(|e| e["n"].clone()),
            Some(json!(49)),
            "newest kept"
        );
        // One entry larger than the whole budget stays: the newest run is remembered.
        let mut one = vec![entry(0, 10), entry(1, MEMORY_MAX_BYTES)];
        fit_memory(&mut one, 5);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0]["n"], 1);
    }
}
