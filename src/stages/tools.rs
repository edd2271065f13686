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
//!
//! The call's records are the stage's own outputs, its audit record sealed into the stage's chain
//! like every stage's: the action's offset is committed only once they are written. Their bytes
//! depend only on the action and the call's outcome, which is kept beside the marker (until the
//! commit) so that an action redelivered after a crash writes the same records again without
//! calling anything. An action whose marker says a call was started but never finished (a crash
//! during the call, or the call still under way on a previous owner) is recorded as `unknown`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::Stream;
use redis::Script;
use serde_json::{json, Value};

use super::batch::{sealed_waves, Decided};
use super::services::{runner, Runner, Services};
use crate::audit::Sealer;
use crate::error::ProcessError;
use crate::kafka::runtime::{Done, Processor};
use crate::kafka::{dead_letter, Input};
use crate::records::{audit_event, types, ActionData, Emitter};
use crate::store::{RedisConn, ResourceKey};
use crate::telemetry::METRICS;
use crate::tools::log::{ToolCallLog, ToolCallRecord};
use crate::tools::{CallCtx, Inject, Lookup, Toolbox};
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
            sealer: s.sealer.clone(),
            log: ToolCallLog {
                audit: s.recorder.clone(),
                topic: cfg.topics.tool_calls.clone(),
            },
            dlq_topic: cfg.topics.dlq.clone(),
            max_record_bytes: cfg.kafka.max_record_bytes,
            claim: Script::new(CLAIM),
            reclaim: Script::new(RECLAIM),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            calls: Default::default(),
            previous_owner_wait: previous_owner_wait(&cfg.tools),
            keep_seconds: keep_seconds(cfg.governance.approvals.keep_decided_seconds),
            epoch_began: std::sync::Mutex::new((u64::MAX, None)),
        }))
    })
}

/// How long an action's marker and a resource's fence are kept, at least ([`keep_seconds`]).
const KEEP_SECONDS: u64 = 7 * 24 * 3600;
const DAY_SECONDS: u64 = 24 * 3600;

/// How long markers and fences are kept: a week, and a day longer than a decided approval is
/// (`keep_decided_seconds`: a decisions-topic record repeated until then produces its approved
/// action again, which its marker must still know). An action older than a day less than this
/// (by its record's time) whose marker is gone is refused ([`ToolsStage::process`]): carried out
/// and forgotten, or never — nobody can tell, and calling it could do it twice.
fn keep_seconds(keep_decided_seconds: u64) -> u64 {
    KEEP_SECONDS.max(keep_decided_seconds.saturating_add(DAY_SECONDS))
}
/// How long a call's outcome is kept when its records' commit never deletes it (it normally goes
/// with the commit, seconds later).
const OUTCOME_KEEP_SECONDS: u64 = 24 * 3600;
/// Attempts of a call that fails (transport error, 5xx) before the action is given up.
const ATTEMPTS: u32 = 3;

/// A call's outcome, kept beside its action's marker until the action is committed: what its
/// records need that the action does not say.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Outcome {
    time: String,
    outcome: String,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    duration_ms: u64,
    /// The record whose call it is (`topic:partition:offset`): a redriven copy that failed again
    /// is told from a new redrive of the same action.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    place: String,
}

/// KEYS[1] the action's marker, KEYS[2] the resource's fence, KEYS[3] its claimant (which process
/// claimed it: beside the marker, so a marker says `running` as it always did); ARGV token, ttl,
/// this process's instance id, the claimant's ttl. Returns `{1, "", ""}` claimed, `{0, state,
/// claimant}` already claimed, `{-1, fence, ""}` stale.
const CLAIM: &str = r"
local state = redis.call('GET', KEYS[1])
if state then return {0, state, redis.call('GET', KEYS[3]) or ''} end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < fence then return {-1, tostring(fence), ''} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return {1, '', ''}
";

/// [`CLAIM`] of an action whose marker says `failed`, for a redrive of the delivery that failed:
/// KEYS[4] that delivery (`failed_at`, none when an older build failed it), KEYS[5] its kept
/// outcome (dropped: the new call makes its own); ARGV[5] the delivery the redrive names. The same
/// replies.
const RECLAIM: &str = r"
local state = redis.call('GET', KEYS[1])
local at = redis.call('GET', KEYS[4])
if state ~= 'failed' or (at and at ~= ARGV[5]) then
  return {0, state or '', redis.call('GET', KEYS[3]) or ''}
end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < fence then return {-1, tostring(fence), ''} end
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('DEL', KEYS[5])
return {1, '', ''}
";

/// How long an action claimed by another owner whose call never finished is waited for before it is
/// recorded `unknown`: longer than a call of the slowest tool with its retries ([`ATTEMPTS`] of its
/// `timeout_ms`, the backoff between them), plus a minute; two minutes at least.
fn previous_owner_wait(
    tools: &std::collections::BTreeMap<String, crate::tools::ToolSpec>,
) -> Duration {
    use crate::tools::ToolSpec;
    let slowest = tools
        .values()
        .map(|t| match t {
            ToolSpec::Http(h) => h.timeout_ms,
            ToolSpec::Mcp(m) => m.timeout_ms,
        })
        .max()
        .unwrap_or(0);
    let call = Duration::from_millis(slowest.saturating_mul(u64::from(ATTEMPTS)))
        + Duration::from_millis((1..ATTEMPTS).map(|a| 200u64 << a).sum::<u64>());
    (call + Duration::from_secs(60)).max(Duration::from_secs(120))
}

/// How long a claim's claimant is kept: longer than any call, retry and redelivery of it within
/// one process's life that needs it.
const CLAIMANT_SECONDS: u64 = 24 * 3600;

/// The calls this process started, by action id: under way (`None`) or finished with an outcome
/// not yet kept in Redis. A claim of this process found again (its reply was lost: a Redis stall,
/// a timeout) is then told apart from one whose call may have begun: none here means no call was
/// made, and the action is called; one under way waits for it; one finished is recorded.
#[derive(Default)]
struct Calls(std::sync::Mutex<std::collections::HashMap<String, (Instant, Option<Outcome>)>>);

impl Calls {
    /// An entry is kept as long as the claimant key that lets it be found: dropped earlier, a late
    /// redelivery of its action to this process would take its own claim for one never called.
    /// Entries exist only for calls under way and outcomes Redis did not take, so they are few.
    const IDLE: Duration = Duration::from_secs(CLAIMANT_SECONDS);

    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (Instant, Option<Outcome>)>>
    {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, action_id: &str) -> Option<Option<Outcome>> {
        self.map().get(action_id).map(|(_, o)| o.clone())
    }

    fn set(&self, action_id: &str, o: Option<Outcome>) {
        let now = Instant::now();
        let mut map = self.map();
        map.retain(|_, (at, _)| now.duration_since(*at) < Self::IDLE);
        map.insert(action_id.to_string(), (now, o));
    }

    fn remove(&self, action_id: &str) {
        self.map().remove(action_id);
    }
}

pub struct ToolsStage {
    pub tools: Arc<Toolbox>,
    pub redis: RedisConn,
    pub prefix: String,
    pub emitter: Emitter,
    pub sealer: Arc<Sealer>,
    pub log: ToolCallLog,
    pub dlq_topic: String,
    pub max_record_bytes: usize,
    claim: Script,
    reclaim: Script,
    /// This process's claims name it as their claimant.
    instance: String,
    calls: Calls,
    /// How long another owner's claim of an action is waited for ([`previous_owner_wait`]).
    previous_owner_wait: Duration,
    /// How long markers and fences are kept ([`keep_seconds`]).
    keep_seconds: u64,
    /// When Redis's epoch began (ms), as read for the connection's generation.
    epoch_began: std::sync::Mutex<(u64, Option<i64>)>,
}

impl Processor for ToolsStage {
    fn stage(&self) -> &'static str {
        "tools"
    }

    /// One lane per resource (the record key): a resource's tool actions run in token order.
    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    /// A batch's tool calls run concurrently (one per resource); their audit records are sealed
    /// into the partition's chain as they finish.
    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        sealed_waves(
            "tools",
            &self.sealer,
            &self.emitter,
            recs,
            move |rec| async move { self.execute(rec).await },
        )
    }

    async fn cleanup(&self, keys: Vec<String>) {
        let Ok(mut c) = self.redis.get().await else {
            return;
        };
        // Each outcome key is in its resource's slot: one DEL each (they expire anyway).
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("DEL").arg(k).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            tracing::debug!(error = %e, "Could not delete committed tool outcomes; they expire.");
        }
    }
}

/// Clocks of the instance that wrote the epoch marker and of one that produced an action may
/// differ this much.
const EPOCH_SKEW_MS: i64 = 5_000;

impl ToolsStage {
    /// When Redis's epoch marker was written (ms since the epoch): read again after the
    /// connection's generation changed (a recovery); none when it cannot be read.
    async fn epoch_began_ms(&self) -> Option<i64> {
        let generation = self.redis.generation();
        {
            let cached = self.epoch_began.lock().unwrap_or_else(|e| e.into_inner());
            if cached.0 == generation && cached.1.is_some() {
                return cached.1;
            }
        }
        let id = crate::store::read_epoch(&self.redis, &self.prefix)
            .await
            .ok()
            .flatten()?;
        let began = crate::store::epoch_began_ms(&id);
        *self.epoch_began.lock().unwrap_or_else(|e| e.into_inner()) = (generation, began);
        began
    }

    async fn execute(&self, rec: Arc<Input>) -> Result<Decided, ProcessError> {
        let ev = crate::codec::decode(rec.view(), &self.emitter.schemas)?;
        if ev.ty != types::ACTION {
            return Ok(Decided::default());
        }
        let a: ActionData = serde_json::from_value(ev.data.clone().unwrap_or(Value::Null))
            .map_err(|e| ProcessError::poison("malformed_action", e.to_string()))?;
        let Some(name) = a.action.strip_prefix("tool.") else {
            return Ok(Decided::default());
        };
        let dead_letter_of = |reason: &'static str, detail: String| {
            METRICS
                .dlq_records
                .with_label_values(&["tools", reason])
                .inc();
            dead_letter(
                &self.dlq_topic,
                "tools",
                &rec,
                reason,
                &detail,
                self.max_record_bytes,
            )
        };
        let fail = |reason: &'static str, detail: String| {
            Ok(Decided {
                outputs: vec![dead_letter_of(reason, detail)],
                ..Decided::default()
            })
        };
        let tool = match self.tools.get(name).await {
            Lookup::Found(t) => t,
            // The server is out of reach: the action waits for it (retried), where taking the tool
            // for unknown would dead-letter it — or, carried out before, replace its records.
            Lookup::Unlisted(server) => {
                return Err(ProcessError::Transient(format!(
                    "action {} names tool {name:?} of MCP server {server}, which has not listed its tools yet (out of reach?)",
                    a.action_id
                )))
            }
            Lookup::Unknown => {
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
            }
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
        let misfit = tool.check(&Value::Object(args.clone())).map(|why| {
            format!(
                "action {}: its parameters do not fit tool {name}'s schema: {why}",
                a.action_id
            )
        });
        let args = tool.with_injected(args, &ctx);
        let key = ResourceKey::new(&a.tenant, &a.resource);
        let tag = key.hash_tag();
        let marker = format!("{}:tools:{tag}:a:{}", self.prefix, a.action_id);
        let kept = format!("{marker}:outcome");
        let fence = format!("{}:tools:{tag}:fence", self.prefix);
        let mut c = self.redis.get().await.map_err(ProcessError::from)?;
        let claimant = format!("{marker}:by");
        let failed_at = format!("{marker}:failed_at");
        let keys = [marker.as_str(), fence.as_str(), claimant.as_str()];
        // An action read long after it was written (the group's offsets lost — Kafka forgets a
        // group's offsets 7 days after it stopped — or a new group reading the topic from its
        // start): once its marker has expired, nothing tells whether it was carried out.
        let age_ms = rec
            .timestamp_ms
            .map(|t| chrono::Utc::now().timestamp_millis().saturating_sub(t));
        let too_old = (self.keep_seconds - DAY_SECONDS).saturating_mul(1000);
        let expired = age_ms.is_some_and(|a| a > i64::try_from(too_old).unwrap_or(i64::MAX));
        // Likewise an action written before Redis's state began (`switchyard recover` rebuilt it
        // after a loss, without the tools' markers): it may have been carried out before the loss.
        let before_epoch = match rec.timestamp_ms {
            Some(t) if !expired => self
                .epoch_began_ms()
                .await
                .is_some_and(|e| t < e.saturating_sub(EPOCH_SKEW_MS)),
            _ => false,
        };
        if expired || before_epoch {
            let known: bool = redis::cmd("EXISTS")
                .arg(&marker)
                .query_async(&mut c)
                .await
                .map_err(|e| ProcessError::Transient(format!("tool action marker: {e}")))?;
            if !known {
                METRICS
                    .tool_calls
                    .with_label_values(&[name, "expired"])
                    .inc();
                let why = if expired {
                    format!(
                        "was written {} hours ago, longer than what was carried out is remembered",
                        age_ms.unwrap_or(0) / 3_600_000
                    )
                } else {
                    "was written before Redis's state was rebuilt (switchyard recover), which \
                     does not know what the tools carried out"
                        .to_string()
                };
                return fail(
                    "expired_action",
                    format!(
                        "action {} {why}: not called (it may have been); redrive it to carry it out",
                        a.action_id
                    ),
                );
            }
        }
        let (mut status, mut info, by) = self
            .run_claim(&self.claim, keys, a.fencing_token, &mut c)
            .await?;
        let place = format!("{}:{}:{}", rec.topic, rec.partition, rec.offset);
        // This process's own claim, found again: what it did with it decides (see `Calls`).
        let mut finished = None;
        if status == 0 && info == "running" && by == self.instance {
            match self.calls.get(&a.action_id) {
                None => status = 1,
                Some(None) => {
                    return Err(ProcessError::Transient(format!(
                        "tool action {}: its call is under way in this process",
                        a.action_id
                    )))
                }
                Some(Some(o)) if o.place.is_empty() || o.place == place => finished = Some(o),
                Some(Some(o)) => {
                    // Another record's call (an earlier delivery, whose records went out while
                    // Redis did not take its outcome): its outcome is kept now, and this record
                    // is taken again as what it is (a copy, or a redrive of that failure).
                    self.keep(
                        &mut c,
                        &a.action_id,
                        [&marker, &kept, &claimant, &failed_at],
                        &o,
                    )
                    .await
                    .map_err(|e| ProcessError::Transient(format!("tool outcome keep: {e}")))?;
                    return Err(ProcessError::Transient(format!(
                        "tool action {}: an earlier delivery's outcome was kept only now",
                        a.action_id
                    )));
                }
            }
        }
        // A failed action redriven from the dead-letter topic (`switchyard dlq redrive`) is
        // claimed again and called again (its fence still applies) — only a redrive of the very
        // delivery that failed last (`failed_at`): a second copy of that dead letter, or the
        // redriven record delivered again, is not called again. Otherwise a failed action is never
        // called twice.
        let source = crate::kafka::dlq_headers::value(
            &rec.headers,
            crate::kafka::dlq_headers::REDRIVEN_SOURCE,
        )
        .map(|v| String::from_utf8_lossy(v).into_owned());
        if let (0, "failed", Some(source), None) = (status, info.as_str(), &source, &misfit) {
            let (s2, i2, _) = self
                .reclaim
                .key(&marker)
                .key(&fence)
                .key(&claimant)
                .key(&failed_at)
                .key(&kept)
                .arg(a.fencing_token)
                .arg(self.keep_seconds)
                .arg(&self.instance)
                .arg(CLAIMANT_SECONDS)
                .arg(source)
                .invoke_async::<(i64, String, String)>(&mut c)
                .await
                .map_err(|e| ProcessError::Transient(format!("tool action claim: {e}")))?;
            (status, info) = (s2, i2);
            if status == 1 {
                self.calls.remove(&a.action_id);
            }
        }
        // The call's records, from the action and its outcome: the same bytes whenever written. A
        // failed call's input is dead-lettered too.
        let action_time = ev.time.clone().unwrap_or_default();
        let records = |o: &Outcome| -> Result<Decided, ProcessError> {
            let outcome = outcome_name(&o.outcome);
            let call = ToolCallRecord {
                tool: name.to_string(),
                effect: tool.effect.name(),
                iteration: 0,
                arguments: json!(args),
                outcome,
                result: o.result.clone(),
                error: o.error.clone(),
                duration_ms: o.duration_ms,
            };
            let id = crate::pattern::stable_id(&["tool_call", &a.action_id]);
            let (audit, companion) = self.log.records(&ctx, &call, format!("tool-{id}"), &o.time);
            let audit = audit_event(
                "switchyard/tools",
                &["tool_call", &a.action_id],
                &audit,
                None,
                &o.time,
            )?;
            let mut outputs = vec![self.emitter.emit(&self.log.topic, &companion)?];
            match outcome {
                "error" => outputs.push(dead_letter_of(
                    "tool_failed",
                    format!(
                        "action {}: {}",
                        a.action_id,
                        o.error.as_deref().unwrap_or("")
                    ),
                )),
                "stale" => outputs.push(dead_letter_of(
                    "stale_action",
                    o.error.clone().unwrap_or_default(),
                )),
                _ => {}
            }
            Ok(Decided {
                outputs,
                audits: vec![audit],
                cleanup: vec![kept.clone()],
            })
        };
        if status == 0 && finished.is_none() {
            // Claimed before: by an attempt that finished (its outcome is kept until its records
            // are committed: they are written again, nothing is called), by one whose records
            // were committed (nothing to do), or by one that never finished.
            let outcome: Option<String> = redis::cmd("GET")
                .arg(&kept)
                .query_async(&mut c)
                .await
                .map_err(|e| ProcessError::Transient(format!("tool outcome read: {e}")))?;
            if let Some(o) = outcome
                .and_then(|o| serde_json::from_str::<Outcome>(&o).ok())
                .filter(|o| o.place.is_empty() || o.place == place)
            {
                tracing::info!(action_id = %a.action_id, tool = name, outcome = %o.outcome, "Tool action carried out before; writing its records again.");
                METRICS
                    .tool_calls
                    .with_label_values(&[name, "skipped"])
                    .inc();
                return records(&o);
            }
            if let (Some(why), "failed" | "running") = (misfit, info.as_str()) {
                // Refused before as not fitting the schema: its dead letter again (it may not
                // have been written before a crash).
                return fail("invalid_tool_arguments", why);
            }
            if info == "running" && by != self.instance {
                // Another owner's claim, taken recently: its call may still be under way (a
                // rebalance gave up on it after the drain timeout, and it runs on). Waited for —
                // once it finishes its outcome is kept and written again here, the same bytes its
                // seal lists — rather than recorded unknown beside its real outcome.
                let left: i64 = redis::cmd("PTTL")
                    .arg(&claimant)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| ProcessError::Transient(format!("tool claim age: {e}")))?;
                let age_ms = (CLAIMANT_SECONDS as i64 * 1000).saturating_sub(left);
                if left > 0 && age_ms < self.previous_owner_wait.as_millis() as i64 {
                    return Err(ProcessError::Transient(format!(
                        "tool action {}: a previous owner's call ({by}) may still be under way; waiting for it",
                        a.action_id
                    )));
                }
            }
            if info == "running" {
                tracing::warn!(action_id = %a.action_id, tool = name, "A call of this tool action was started and never finished (a crash, or a previous owner still calling); not carried out again, recorded as unknown.");
                METRICS
                    .tool_calls
                    .with_label_values(&[name, "unknown"])
                    .inc();
                return records(&Outcome {
                    time: action_time.clone(),
                    outcome: "unknown".into(),
                    result: Value::Null,
                    error: Some(
                        "a call was started by an earlier attempt that did not finish (a crash, or a previous owner of the partition still calling); it is not carried out again, and its outcome is unknown"
                            .into(),
                    ),
                    duration_ms: 0,
                    place: String::new(),
                });
            }
            tracing::info!(action_id = %a.action_id, tool = name, state = %info, "Tool action already carried out; skipped.");
            METRICS
                .tool_calls
                .with_label_values(&[name, "skipped"])
                .inc();
            return Ok(Decided::default());
        }
        if let (Some(why), None) = (misfit, &finished) {
            let _: Result<(), _> = redis::pipe()
                .cmd("SET")
                .arg(&marker)
                .arg("failed")
                .arg("EX")
                .arg(self.keep_seconds)
                .ignore()
                .cmd("DEL")
                .arg(&claimant)
                .ignore()
                .query_async::<()>(&mut c)
                .await;
            METRICS.tool_calls.with_label_values(&[name, "error"]).inc();
            return fail("invalid_tool_arguments", why);
        }
        if status < 0 {
            // Nothing was claimed: a redelivery finds a fence above it again and writes the same
            // records.
            tracing::info!(action_id = %a.action_id, tool = name, fencing_token = a.fencing_token, fence = %info, "Tool action is stale; not carried out.");
            METRICS.tool_calls.with_label_values(&[name, "stale"]).inc();
            return records(&Outcome {
                time: action_time,
                outcome: "stale".into(),
                result: Value::Null,
                // Without the fence's value, which later actions move: a redelivery writes the
                // same bytes.
                error: Some(format!(
                    "fencing token {} is below the resource's fence: an action with a later token was carried out for {}",
                    a.fencing_token, a.resource
                )),
                duration_ms: 0,
                place: String::new(),
            });
        }
        let outcome = match finished {
            Some(o) => o,
            None => {
                self.calls.set(&a.action_id, None);
                let mut o = self.call(&tool, &args, &ctx, &a, name).await;
                o.place = place.clone();
                self.calls.set(&a.action_id, Some(o.clone()));
                METRICS
                    .tool_calls
                    .with_label_values(&[name, &o.outcome])
                    .inc();
                o
            }
        };
        // The marker and the outcome together: a redelivery before the commit writes these
        // records again. Should this fail, the marker still says running: a redelivery to this
        // process records the outcome (`Calls`), one to another as unknown (never calling again).
        if let Err(e) = self
            .keep(
                &mut c,
                &a.action_id,
                [&marker, &kept, &claimant, &failed_at],
                &outcome,
            )
            .await
        {
            tracing::warn!(action_id = %a.action_id, tool = name, error = %e, "Could not keep a tool action's outcome in Redis; a redelivery to this process records it, one to another as unknown.");
        }
        records(&outcome)
    }

    /// Keeps a finished call's outcome: the marker says `done` or `failed` (with the delivery that
    /// failed, `failed_at`, which only a redrive of it may claim again), the outcome beside it, the
    /// claimant gone — all at once; then this process forgets it.
    async fn keep<C: redis::aio::ConnectionLike>(
        &self,
        c: &mut C,
        action_id: &str,
        [marker, kept, claimant, failed_at]: [&str; 4],
        outcome: &Outcome,
    ) -> Result<(), String> {
        let kept_json = serde_json::to_string(outcome).map_err(|e| e.to_string())?;
        let mut p = redis::pipe();
        p.atomic();
        let executed = outcome.outcome == "executed";
        p.cmd("SET")
            .arg(marker)
            .arg(if executed { "done" } else { "failed" })
            .arg("EX")
            .arg(self.keep_seconds)
            .ignore();
        if !executed {
            p.cmd("SET")
                .arg(failed_at)
                .arg(&outcome.place)
                .arg("EX")
                .arg(self.keep_seconds)
                .ignore();
        }
        p.cmd("SET")
            .arg(kept)
            .arg(kept_json)
            .arg("EX")
            .arg(OUTCOME_KEEP_SECONDS)
            .ignore()
            .cmd("DEL")
            .arg(claimant)
            .ignore();
        p.query_async::<()>(c).await.map_err(|e| e.to_string())?;
        self.calls.remove(action_id);
        Ok(())
    }

    /// Runs [`CLAIM`] on the action's marker, its resource's fence and its claimant.
    async fn run_claim<C: redis::aio::ConnectionLike>(
        &self,
        script: &Script,
        [marker, fence, claimant]: [&str; 3],
        token: u64,
        c: &mut C,
    ) -> Result<(i64, String, String), ProcessError> {
        script
            .key(marker)
            .key(fence)
            .key(claimant)
            .arg(token)
            .arg(self.keep_seconds)
            .arg(&self.instance)
            .arg(CLAIMANT_SECONDS)
            .invoke_async(c)
            .await
            .map_err(|e| ProcessError::Transient(format!("tool action claim: {e}")))
    }

    /// Calls the tool, trying again after a failure that may pass (see [`ATTEMPTS`]).
    async fn call(
        &self,
        tool: &crate::tools::Tool,
        args: &serde_json::Map<String, Value>,
        ctx: &CallCtx,
        a: &ActionData,
        name: &str,
    ) -> Outcome {
        let started = Instant::now();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match tool.call(args, ctx).await {
                Ok(v) => break Ok(v),
                Err(e) if attempt < ATTEMPTS && tool.retryable(&e) => {
                    tracing::warn!(action_id = %a.action_id, tool = name, attempt, error = %e, "Tool action failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => break Err(e),
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match result {
            Ok(v) => {
                tracing::info!(action_id = %a.action_id, tool = name, fencing_token = a.fencing_token, duration_ms = ms, "Tool action carried out.");
                Outcome {
                    time,
                    outcome: "executed".into(),
                    result: v,
                    error: None,
                    duration_ms: ms,
                    place: String::new(),
                }
            }
            Err(e) => Outcome {
                time,
                outcome: "error".into(),
                result: Value::Null,
                error: Some(e),
                duration_ms: ms,
                place: String::new(),
            },
        }
    }
}

/// The recorded outcome names (bounded: they label a metric and are kept as `&'static str`).
fn outcome_name(o: &str) -> &'static str {
    match o {
        "executed" => "executed",
        "error" => "error",
        "stale" => "stale",
        _ => "unknown",
    }
}
