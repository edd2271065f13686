//! Tools stage: the built-in executor of accepted tool actions. An action `tool.<name>` on the
//! actions topic (a mutating tool's call an LLM agent proposed, accepted by resolve and governance,
//! approved where a rule asked for it) is carried out once, with the action's fencing token in
//! `X-Switchyard-Fencing-Token` and its id in `Idempotency-Key`; its result goes to the tool-calls
//! topic, keyed by action id, and into the audit trail (a `tool_call` record). Other actions are left
//! to their executors.
//!
//! Once per action: a Redis marker per action id (set before the call, in the same script that
//! checks the resource's fence) makes a redelivered action a no-op, and an action whose token is
//! below one already carried out for its resource is refused as stale. A crash during the call
//! leaves the marker: the action is not carried out twice (the receiving system can also use the
//! idempotency key).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::Stream;
use redis::Script;
use serde_json::{json, Value};

use super::services::{runner, Runner, Services};
use crate::error::ProcessError;
use crate::kafka::runtime::{each, Done, Processor};
use crate::kafka::{dead_letter, Input, Output};
use crate::records::{types, ActionData, Emitter};
use crate::store::{RedisConn, ResourceKey};
use crate::telemetry::METRICS;
use crate::tools::log::{ToolCallLog, ToolCallRecord};
use crate::tools::{CallCtx, Inject, Toolbox};
use crate::topics::TopicsConfig;

/// The tools stage consumes the actions topic.
pub fn inputs(t: &TopicsConfig) -> Vec<String> {
    vec![t.actions.clone()]
}

pub fn build(s: &Services) -> BoxFuture<'_, Result<Runner, String>> {
    Box::pin(async move {
        let cfg = s.config();
        Ok(runner(ToolsStage {
            tools: s.tools.clone(),
            redis: s.redis.clone(),
            prefix: cfg.redis.key_prefix.clone(),
            emitter: s.emitter.clone(),
            log: ToolCallLog {
                audit: s.recorder.clone(),
                topic: cfg.topics.tool_calls.clone(),
            },
            dlq_topic: cfg.topics.dlq.clone(),
            max_record_bytes: cfg.kafka.max_record_bytes,
            claim: Script::new(CLAIM),
        }))
    })
}

/// How long an action's marker and a resource's fence are kept.
const KEEP_SECONDS: u64 = 7 * 24 * 3600;
/// Attempts of a call that fails (transport error, 5xx) before the action is given up.
const ATTEMPTS: u32 = 3;

/// KEYS[1] the action's marker, KEYS[2] the resource's fence; ARGV token, ttl. Returns
/// `{1, ""}` claimed, `{0, state}` already claimed, `{-1, fence}` stale.
const CLAIM: &str = r"
local state = redis.call('GET', KEYS[1])
if state then return {0, state} end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < fence then return {-1, tostring(fence)} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[2])
return {1, ''}
";

pub struct ToolsStage {
    pub tools: Arc<Toolbox>,
    pub redis: RedisConn,
    pub prefix: String,
    pub emitter: Emitter,
    pub log: ToolCallLog,
    pub dlq_topic: String,
    pub max_record_bytes: usize,
    claim: Script,
}

impl Processor for ToolsStage {
    fn stage(&self) -> &'static str {
        "tools"
    }

    /// One lane per resource (the record key): a resource's tool actions run in token order.
    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        each(recs, |rec| self.execute(rec))
    }
}

impl ToolsStage {
    async fn execute(&self, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
        let ev = crate::codec::decode(rec.view(), &self.emitter.schemas)?;
        if ev.ty != types::ACTION {
            return Ok(Vec::new());
        }
        let a: ActionData = serde_json::from_value(ev.data.clone().unwrap_or(Value::Null))
            .map_err(|e| ProcessError::poison("malformed_action", e.to_string()))?;
        let Some(name) = a.action.strip_prefix("tool.") else {
            return Ok(Vec::new());
        };
        let fail = |reason: &'static str, detail: String| {
            METRICS
                .dlq_records
                .with_label_values(&["tools", reason])
                .inc();
            Ok(vec![dead_letter(
                &self.dlq_topic,
                "tools",
                &rec,
                reason,
                &detail,
                self.max_record_bytes,
            )])
        };
        let Some(tool) = self.tools.get(name).await else {
            METRICS
                .tool_calls
                .with_label_values(&["unknown", "error"])
                .inc();
            return fail(
                "unknown_tool",
                format!(
                    "action {} names tool {name:?}, which is not configured under tools:",
                    a.action_id
                ),
            );
        };
        // The tool is aimed by the action itself: its tenant, resource and agent fill the injected
        // parameters, whatever the proposal's parameters say (a `tool.<name>` proposal made
        // directly, not through the tool, could name another tenant); the task and event ids
        // injected when the tool was called stay as proposed. The rest must fit the tool's schema.
        let mut args = a.parameters.as_object().cloned().unwrap_or_default();
        let proposed = |what: Inject| -> String {
            tool.inject
                .iter()
                .filter(|(_, w)| **w == what)
                .find_map(|(p, _)| args.get(p).and_then(Value::as_str))
                .unwrap_or("")
                .to_string()
        };
        let ctx = CallCtx {
            tenant: a.tenant.clone(),
            resource: a.resource.clone(),
            task_id: proposed(Inject::TaskId),
            agent: a
                .agents
                .as_array()
                .and_then(|x| x.first())
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            event_id: proposed(Inject::EventId),
            fencing_token: Some(a.fencing_token),
            action_id: Some(a.action_id.clone()),
        };
        for p in tool.inject.keys() {
            args.remove(p);
        }
        // Checked after the claim below (an action already carried out is skipped, whatever).
        let misfit = tool.check(&Value::Object(args.clone()));
        let args = tool.with_injected(args, &ctx);
        let key = ResourceKey::new(&a.tenant, &a.resource);
        let tag = key.hash_tag();
        let marker = format!("{}:tools:{tag}:a:{}", self.prefix, a.action_id);
        let fence = format!("{}:tools:{tag}:fence", self.prefix);
        let mut c = self.redis.get().await.map_err(ProcessError::from)?;
        let (status, info): (i64, String) = self
            .claim
            .key(&marker)
            .key(&fence)
            .arg(a.fencing_token)
            .arg(KEEP_SECONDS)
            .invoke_async(&mut c)
            .await
            .map_err(|e| ProcessError::Transient(format!("tool action claim: {e}")))?;
        if status == 0 {
            tracing::info!(action_id = %a.action_id, tool = name, state = %info, "Tool action already carried out (or under way); skipped.");
            METRICS
                .tool_calls
                .with_label_values(&[name, "skipped"])
                .inc();
            return Ok(Vec::new());
        }
        // Counted and recorded (tool-calls topic, audit) once per action, whatever happened.
        let note = |outcome: &'static str, result: Value, error: Option<String>, ms: u64| {
            METRICS.tool_calls.with_label_values(&[name, outcome]).inc();
            let call = ToolCallRecord {
                tool: name.to_string(),
                effect: tool.effect.name(),
                iteration: 0,
                arguments: json!(args),
                outcome,
                result,
                error,
                duration_ms: ms,
            };
            self.log.write(&ctx, &call);
        };
        if let Some(why) = misfit {
            let _: Result<(), _> = redis::cmd("SET")
                .arg(&marker)
                .arg("failed")
                .arg("EX")
                .arg(KEEP_SECONDS)
                .query_async(&mut c)
                .await;
            METRICS.tool_calls.with_label_values(&[name, "error"]).inc();
            return fail(
                "invalid_tool_arguments",
                format!(
                    "action {}: its parameters do not fit tool {name}'s schema: {why}",
                    a.action_id
                ),
            );
        }
        if status < 0 {
            let why = format!(
                "fencing token {} is below {info}, already carried out for {}",
                a.fencing_token, a.resource
            );
            note("stale", Value::Null, Some(why.clone()), 0);
            return fail("stale_action", why);
        }
        let started = Instant::now();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match tool.call(&args, &ctx).await {
                Ok(v) => break Ok(v),
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(action_id = %a.action_id, tool = name, attempt, error = %e, "Tool action failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => break Err(e),
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        let state = if result.is_ok() { "done" } else { "failed" };
        let _: Result<(), _> = redis::cmd("SET")
            .arg(&marker)
            .arg(state)
            .arg("EX")
            .arg(KEEP_SECONDS)
            .query_async(&mut c)
            .await;
        match result {
            Ok(v) => {
                tracing::info!(action_id = %a.action_id, tool = name, fencing_token = a.fencing_token, duration_ms = ms, "Tool action carried out.");
                note("executed", v, None, ms);
                Ok(Vec::new())
            }
            Err(e) => {
                note("error", Value::Null, Some(e.clone()), ms);
                fail("tool_failed", format!("action {}: {e}", a.action_id))
            }
        }
    }
}
