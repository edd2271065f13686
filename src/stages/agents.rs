//! Agent stage: `switchyard.tasks` → agents → proposals, results, audit.
//!
//! Tasks of one resource run one at a time in order (lane = resource), so a finding written by one
//! agent is in the context the next task on that resource sees; other resources run concurrently,
//! bounded per agent (`max_concurrency`) and overall (`kafka.max_in_flight`). A task whose outcome is
//! recorded in the store is not run again: its records are emitted again from the recorded outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use futures::{Stream, StreamExt};

use super::batch::{sealed_jobs, Decided};
use super::services::{runner, Runner, Services};
use crate::agents::circuit::Admit;
use crate::agents::stats::AgentStats;
use crate::agents::{
    allowed, Agent, AgentError, AgentKind, AgentRequest, AgentSpec, BuildDeps, ScopedContext,
};
use crate::audit::Sealer;
use crate::codec;
use crate::context::redis::RedisStore;
use crate::context::{CommitResult, ContextStore, Fact, Outcome, Prior, Snapshot};
use crate::error::ProcessError;
use crate::event::{now_rfc3339, CloudEvent};
use crate::governance::budgets::{BudgetCheck, Budgets, Spender};
use crate::governance::GovernanceConfig;
use crate::kafka::runtime::{Done, Processor};
use crate::kafka::{dead_letter, Input, Output};
use crate::pattern::stable_id;
use crate::records::{
    audit_event, trace_id, types, AgentResponse, AuditData, Emitter, ProposalCounts, ProposalData,
    ResultData, TaskData,
};
use crate::spans::{self, Span};
use crate::store::{Place, ResourceKey, StoreError};
use crate::telemetry::METRICS;
use crate::topics::TopicsConfig;

/// The agent stage consumes the tasks topic.
pub fn inputs(t: &TopicsConfig) -> Vec<String> {
    vec![t.tasks.clone()]
}

/// Builds every configured agent and the stage; starts the agent-health flusher.
pub fn build(s: &Services) -> BoxFuture<'_, Result<Runner, String>> {
    Box::pin(async move {
        let cfg = s.config();
        let deps = BuildDeps {
            kafka: cfg.kafka.clone(),
            producer: s.producer.clone(),
            stop: s.stop.clone(),
            gateway: s.gateway.clone(),
            tools: s.tools.clone(),
            tool_calls: Some(crate::tools::log::ToolCallLog {
                audit: s.recorder.clone(),
                topic: cfg.topics.tool_calls.clone(),
            }),
        };
        let mut agents = HashMap::new();
        for (name, spec) in &cfg.agents {
            let spec = &effective_spec(name, spec);
            let agent = spec
                .kind
                .build(name, spec, &deps)
                .await
                .map_err(|e| format!("agents.{name}: {e}"))?;
            agents.insert(
                name.clone(),
                AgentEntry {
                    spec: spec.clone(),
                    agent,
                    permits: Arc::new(Semaphore::new(spec.max_concurrency)),
                    digest: crate::agents::answer_digest(spec, &cfg.gateway, &cfg.tools),
                },
            );
        }
        let workflows = (!cfg.workflows.is_empty()).then(|| {
            Arc::new(Workflows {
                runs: crate::workflow::runs::Runs::new(s.redis.clone(), &cfg.redis.key_prefix),
                specs: cfg.workflows.clone(),
                tasks_topic: cfg.topics.tasks.clone(),
                workflows_topic: cfg.topics.workflows.clone(),
                choose: s.chooser(),
            })
        });
        if let Some(wf) = &workflows {
            // A timed-out run's record is handed out again once its first write would have
            // been reported failed, and a little more.
            let resend_after =
                Duration::from_millis(cfg.kafka.delivery_timeout_ms().saturating_add(30_000));
            s.tracker.spawn(expire_runs(
                wf.clone(),
                (s.emitter.clone(), s.producer.clone()),
                resend_after,
                s.stop.clone(),
            ));
        }
        init_metrics(agents.keys());
        Ok(runner(AgentStage {
            agents,
            budgets: s.budgets.clone(),
            governance: Arc::new(cfg.governance.clone()),
            stats: Some(s.stats.clone()),
            store: Arc::new(RedisStore::new(
                s.redis.clone(),
                &cfg.redis.key_prefix,
                cfg.context.clone(),
            )),
            emitter: s.emitter.clone(),
            proposals_topic: cfg.topics.proposals.clone(),
            results_topic: cfg.topics.results.clone(),
            sealer: s.sealer.clone(),
            dlq_topic: cfg.topics.dlq.clone(),
            max_record_bytes: cfg.kafka.max_record_bytes,
            unrecorded: Default::default(),
            workflows,
            graph: Some(s.graph.clone()),
            indexed: cfg.context.index.clone(),
            context_ttl_seconds: cfg.context.ttl_seconds,
            breakers: cfg.agents.values().any(|a| a.circuit.is_some()).then(|| {
                Arc::new(crate::agents::circuit::Breakers::new(
                    s.redis.clone(),
                    &cfg.redis.key_prefix,
                ))
            }),
        }))
    })
}

/// An agent's declaration as the stage applies it: an LLM agent with `memory` also reads and
/// writes its memory key.
pub fn effective_spec(name: &str, spec: &AgentSpec) -> AgentSpec {
    let mut spec = spec.clone();
    if let crate::agents::AgentKind::Llm(l) = &spec.kind {
        if l.memory.is_some() {
            let key = crate::agents::llm::memory_key(name);
            spec.reads.push(key.clone());
            spec.writes.push(key);
        }
    }
    spec
}

/// Every 5 s (any instance; each run once, by compare-and-set): ends the runs past their
/// workflow's deadline and writes their `workflow.timed_out` records — again, the same record, when
/// one was not confirmed written within `resend_after` ([`crate::workflow::runs::Runs::expire`]).
async fn expire_runs(
    wf: Arc<Workflows>,
    (emitter, producer): (Emitter, crate::kafka::Producer),
    resend_after: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // Runs started before the sweeper kept its list of deadlines (an upgrade) join it.
    let mut listed = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if !listed {
            match wf.runs.list_deadlines(&wf.specs, chrono::Utc::now()).await {
                Ok(n) => {
                    listed = true;
                    if n > 0 {
                        tracing::info!(
                            runs = n,
                            "Listed running workflow runs for the deadline sweeper."
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Could not list the running workflow runs' deadlines; trying again.")
                }
            }
        }
        match wf.runs.active().await {
            Ok(active) => {
                for name in wf.specs.keys() {
                    let n = active.get(name).copied().unwrap_or(0).max(0);
                    METRICS
                        .workflow_runs_active
                        .with_label_values(&[name])
                        .set(n);
                }
            }
            Err(e) => tracing::debug!(error = %e, "Could not read the active workflow runs."),
        }
        let ended = match wf
            .runs
            .expire(&wf.specs, chrono::Utc::now(), resend_after)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Could not sweep workflow deadlines.");
                continue;
            }
        };
        let mut outs = Vec::with_capacity(ended.len());
        let mut runs = Vec::with_capacity(ended.len());
        for t in ended {
            if t.again {
                tracing::info!(run_id = %t.run.run_id, workflow = %t.run.workflow, "Writing a workflow.timed_out record again: its first write was not confirmed.");
            } else {
                tracing::warn!(run_id = %t.run.run_id, workflow = %t.run.workflow, "Workflow run timed out.");
                METRICS
                    .workflow_runs
                    .with_label_values(&[&t.run.workflow, "timed_out"])
                    .inc();
            }
            let ev = crate::workflow::lifecycle_event(&t.run, &t.record);
            match emitter.emit(&wf.workflows_topic, &ev) {
                Ok(out) => {
                    outs.push(out);
                    runs.push(t.run.run_id);
                }
                Err(e) => {
                    // Not a passing failure: written again, it would fail again.
                    tracing::error!(error = %e, run_id = %t.run.run_id, "Could not encode a workflow.timed_out record; it is not written.");
                    let _ = wf.runs.timed_out_written(&t.run.run_id).await;
                }
            }
        }
        // All queued at once: a broker that is slow holds this pass up once, not once per run.
        for (run_id, r) in runs.iter().zip(producer.send_all(&outs).await) {
            let written = match r {
                Ok(_) => true,
                Err(e) if crate::kafka::is_too_large(&e) => {
                    tracing::error!(error = %e, %run_id, "A workflow.timed_out record is larger than its topic takes; it is not written.");
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, %run_id, "Could not write a workflow.timed_out record; it is written again later.");
                    false
                }
            };
            if written {
                if let Err(e) = wf.runs.timed_out_written(run_id).await {
                    tracing::warn!(error = %e, %run_id, "Could not confirm a written workflow.timed_out record; it is written again later.");
                }
            }
        }
    }
}

/// Creates the stage's series at zero, so dashboards and alerts see them before the first task.
fn init_metrics<'a>(agents: impl Iterator<Item = &'a String>) {
    for op in ["snapshot", "commit"] {
        for result in ["ok", "error"] {
            METRICS
                .context_ops
                .with_label_values(&[op, result])
                .inc_by(0);
        }
    }
    for a in agents {
        for outcome in ["succeeded", "failed", "timed_out", "refused"] {
            METRICS
                .agent_tasks
                .with_label_values(&[a, outcome])
                .inc_by(0);
        }
    }
}

/// How deep a finding's value or a proposal's parameters may nest, whatever kind of agent said
/// them (an LLM's tool arguments are read with serde's own, deeper limit): the records that carry
/// them add a few levels, and every record must stay within what the next stage reads
/// ([`crate::codec::MAX_DEPTH`]).
const MAX_ANSWER_DEPTH: usize = crate::codec::MAX_DEPTH - 8;

/// The most refusals one task's answer records (each is an audit record); the rest are counted
/// in the last.
const MAX_REFUSALS: usize = 64;

/// Proposals a task may make (what passes its scopes); the rest are refused in one record.
const MAX_PROPOSALS_PER_TASK: usize = 64;

/// Source attribute of records the agent stage writes.
pub const SOURCE: &str = "switchyard/agents";

/// The facts to write and the outcome of a task's agent call.
pub type Computed = (Vec<(String, Fact)>, Outcome);

/// A step's inputs cut down when they take more than `max` bytes (its parents' findings can be
/// 256 × 64 KiB each): a task record too large for its topic would be dead-lettered and leave its
/// step running for ever. Each top-level entry over a fair share becomes `{"cut": true, "bytes":
/// n}`; `None` when they fit as they are.
pub fn bounded_inputs(inputs: &Value, max: usize) -> Option<Value> {
    let size = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    if size(inputs) <= max {
        return None;
    }
    let Value::Object(m) = inputs else {
        return Some(json!({"cut": true, "bytes": size(inputs)}));
    };
    let share = max / m.len().max(1);
    let cut = |v: &Value, limit: usize| {
        let n = size(v);
        if n > limit {
            json!({"cut": true, "bytes": n})
        } else {
            v.clone()
        }
    };
    // One level down too: `delegated` and a join's parents are maps of sub-steps.
    let out: serde_json::Map<String, Value> = m
        .iter()
        .map(|(k, v)| match v {
            Value::Object(inner) if size(v) > share && !inner.is_empty() => {
                let each = share / inner.len();
                let inner = inner.iter().map(|(k2, v2)| (k2.clone(), cut(v2, each)));
                (k.clone(), Value::Object(inner.collect()))
            }
            v => (k.clone(), cut(v, share)),
        })
        .collect();
    Some(Value::Object(out))
}

/// Outcomes computed but not yet recorded, by task id (see [`AgentsStage::unrecorded`]). An entry
/// no retry has used for [`Unrecorded::IDLE`] is dropped at the next insert: its record moved to
/// another instance or was dead-lettered, and nothing else would ever remove it.
///
/// It also knows the calls running in this process: a copy of a task whose call is still running
/// (a rebalance gave the partition back while the drain had given up on the call, which runs on)
/// waits for it and takes its outcome, instead of calling the agent a second time.
#[derive(Default)]
pub struct Unrecorded {
    done: std::sync::Mutex<HashMap<String, (std::time::Instant, Arc<Computed>)>>,
    running: std::sync::Mutex<HashMap<String, tokio::sync::watch::Receiver<()>>>,
}

/// A call running for a task: leaves [`Unrecorded`]'s running calls when dropped (the call ended,
/// either way), which wakes the copies waiting for it.
struct RunningCall<'a> {
    of: &'a Unrecorded,
    task_id: String,
    _ended: tokio::sync::watch::Sender<()>,
}

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        self.of
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.task_id);
    }
}

impl Unrecorded {
    /// Longer than any retry's backoff: a record still being retried always finds its entry.
    pub const IDLE: std::time::Duration = std::time::Duration::from_secs(600);

    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, Arc<Computed>)>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outcome of `task_id` computed in this process, waiting for a call of it still running
    /// here; `Err` with the right to call when there is neither (dropping it ends the call).
    async fn outcome_or_call(&self, task_id: &str) -> Result<Arc<Computed>, RunningCall<'_>> {
        loop {
            if let Some(c) = self.get(task_id, std::time::Instant::now()) {
                return Ok(c);
            }
            let mut waiting = {
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                match running.get(task_id) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(());
                        running.insert(task_id.to_string(), rx);
                        return Err(RunningCall {
                            of: self,
                            task_id: task_id.to_string(),
                            _ended: tx,
                        });
                    }
                }
            };
            // Nothing is ever sent: this returns when the call ends (its sender dropped).
            let _ = waiting.changed().await;
        }
    }

    /// The entry of `task_id`, marked used at `now`.
    pub fn get(&self, task_id: &str, now: std::time::Instant) -> Option<Arc<Computed>> {
        self.map().get_mut(task_id).map(|(used, c)| {
            *used = now;
            c.clone()
        })
    }

    /// Keeps `c` for `task_id`, dropping entries unused for [`Self::IDLE`] before `now`.
    pub fn insert(&self, task_id: String, c: Arc<Computed>, now: std::time::Instant) {
        let mut map = self.map();
        map.retain(|_, (used, _)| now.saturating_duration_since(*used) < Self::IDLE);
        map.insert(task_id, (now, c));
    }

    pub fn remove(&self, task_id: &str) {
        self.map().remove(task_id);
    }

    pub fn ids(&self) -> std::collections::HashSet<String> {
        self.map().keys().cloned().collect()
    }
}

/// One configured agent, ready to call.
pub struct AgentEntry {
    pub spec: AgentSpec,
    pub agent: Arc<dyn Agent>,
    pub permits: Arc<Semaphore>,
    /// [`crate::agents::answer_digest`] of its declaration.
    pub digest: String,
}

pub struct AgentStage<S: ContextStore> {
    pub agents: HashMap<String, AgentEntry>,
    /// Reserved before every agent call: an exhausted budget refuses the task (spend stops).
    pub budgets: Arc<Budgets>,
    /// The access rules a result's proposals are checked against, so the result says which ones
    /// resolve will reject (its [`ProposalCounts`]).
    pub governance: Arc<GovernanceConfig>,
    /// Where per-agent health counters go (`switchyard status`); none in unit tests.
    pub stats: Option<Arc<AgentStats>>,
    pub store: Arc<S>,
    pub emitter: Emitter,
    pub proposals_topic: String,
    pub results_topic: String,
    /// Seals the stage's audit records into their resource's chain.
    pub sealer: Arc<Sealer>,
    pub dlq_topic: String,
    pub max_record_bytes: usize,
    /// Outcomes computed but not yet recorded (Redis failed right after the call): a retry records
    /// these instead of calling the agent again.
    pub unrecorded: Unrecorded,
    /// Moves workflow runs on as their steps finish; none without workflows.
    pub workflows: Option<Arc<Workflows>>,
    /// Circuit breakers of the agents that declare one; none when no agent does.
    pub breakers: Option<Arc<crate::agents::circuit::Breakers>>,
    /// Relations between resources and the fact index; none in unit tests.
    pub graph: Option<Arc<crate::context::graph::Graph>>,
    /// Fact keys the index keeps (`context.index`).
    pub indexed: Vec<String>,
    /// `context.ttl_seconds`: how long a fact index entry may go unwritten before its fact is
    /// looked for ([`crate::context::graph::Graph::index`]).
    pub context_ttl_seconds: u64,
}

/// The workflows of the config and where their runs live.
pub struct Workflows {
    pub runs: crate::workflow::runs::Runs,
    pub specs: std::collections::BTreeMap<String, crate::workflow::WorkflowSpec>,
    pub tasks_topic: String,
    pub workflows_topic: String,
    /// Picks `best_of` agents of steps and checks delegations against governance.
    pub choose: Arc<dyn crate::workflow::Chooser>,
}

/// A context store failure, counted; [`ProcessError`] decides retry (unreachable) or dead letter
/// (corrupt).
fn context_error(op: &'static str) -> impl Fn(StoreError) -> ProcessError {
    move |e| {
        METRICS.context_ops.with_label_values(&[op, "error"]).inc();
        ProcessError::from(e).context(&format!("context {op}"))
    }
}

async fn timed<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    op: &'static str,
    f: F,
) -> Result<T, StoreError> {
    let t = Instant::now();
    let r = f.await;
    METRICS
        .context_op_duration
        .with_label_values(&[op])
        .observe(t.elapsed().as_secs_f64());
    if r.is_ok() {
        METRICS.context_ops.with_label_values(&[op, "ok"]).inc();
    }
    r
}

fn poison(reason: &'static str, detail: impl Into<String>) -> ProcessError {
    ProcessError::poison(reason, detail)
}

/// An (unsealed) audit record of the agent stage about task `t`.
fn task_audit(t: &DecodedTask, decision: &str, reason: Option<String>, detail: Value) -> AuditData {
    let task = &t.task;
    AuditData {
        decision: decision.into(),
        stage: "agents".into(),
        resource: task.resource.clone(),
        tenant: task.tenant.clone(),
        event_id: Some(t.event.id.clone()),
        task_id: Some(task.task_id.clone()),
        workflow_id: Some(task.workflow_id.clone()),
        trace_id: trace_id(t.traceparent.as_deref()),
        reason,
        detail,
        seq: None,
        prev_hash: None,
        hash: None,
    }
}

/// The outcome of a task that was not run (a budget exhausted, an open circuit).
fn refused(version: u64, error: String, refusals: Vec<String>) -> Outcome {
    Outcome {
        status: "refused".into(),
        attempts: 0,
        duration_ms: 0,
        context_version: version,
        response: AgentResponse::default(),
        error: Some(error),
        refusals,
        at: now_rfc3339(),
        ran: None,
        ..Default::default()
    }
}

/// A decoded task.
pub struct DecodedTask {
    pub task: TaskData,
    pub event: CloudEvent,
    /// The task's own span: what its records carry (see [`crate::spans`]).
    pub traceparent: Option<String>,
    /// The task record's `traceparent` (the routing span, or the workflow step before).
    pub parent: Option<String>,
}

/// Reads a task record; anything else is poison.
pub fn decode_task(rec: &Input, emitter: &Emitter) -> Result<DecodedTask, ProcessError> {
    let (ev, task) = codec::decode_typed::<TaskData>(rec.view(), &emitter.schemas)?;
    if ev.ty != types::TASK {
        return Err(poison(
            "not_a_task",
            format!("record type is {:?}, expected {}", ev.ty, types::TASK),
        ));
    }
    let parent = ev.traceparent().map(str::to_string);
    let task = task.map_err(|e| poison("malformed_task", e))?;
    let event: CloudEvent = serde::Deserialize::deserialize(&task.event)
        .map_err(|e| poison("malformed_task", format!("task.event: {e}")))?;
    Ok(DecodedTask {
        traceparent: crate::spans::propagate(parent.as_deref(), "task", &task.task_id),
        parent,
        task,
        event,
    })
}

impl<S: ContextStore> AgentStage<S> {
    /// Calls the agent with timeout, retries and backoff. Returns the response or the last error,
    /// the attempts made, and the keys read outside scope.
    async fn call(
        &self,
        entry: &AgentEntry,
        name: &str,
        t: &DecodedTask,
        version: u64,
        facts: std::collections::BTreeMap<String, Value>,
        related: Value,
    ) -> (Result<AgentResponse, AgentError>, u32, Vec<String>) {
        let spec = &entry.spec;
        // Counted as this agent's load (best_of routing) while queued and running.
        let _load = self.stats.as_ref().map(|s| s.start(name));
        let mut refused_reads = Vec::new();
        let mut attempt = 0;
        // Every attempt sees the same snapshot: the request is built once.
        let mut req = AgentRequest {
            agent: name.to_string(),
            task: t.task.clone(),
            event: t.event.clone(),
            context: ScopedContext::new(version, facts, &spec.reads).with_related(related),
            attempt,
            traceparent: None,
        };
        loop {
            attempt += 1;
            req.attempt = attempt;
            let n = attempt.to_string();
            let mut span = Span::child(
                format!("invoke_agent {name}"),
                t.traceparent.as_deref(),
                "attempt",
                &n,
            );
            if let AgentKind::Http(_) | AgentKind::Kafka(_) = spec.kind {
                // A remote agent: the call leaves the process.
                span = span.kind(opentelemetry::trace::SpanKind::Client);
            }
            span.attr("gen_ai.operation.name", "invoke_agent")
                .attr("gen_ai.agent.name", name.to_string())
                .attr("switchyard.attempt", i64::from(attempt));
            req.traceparent = spans::propagate(t.traceparent.as_deref(), "attempt", &n);
            let result = {
                let _permit = entry.permits.acquire().await;
                METRICS.agent_in_flight.with_label_values(&[name]).inc();
                let r = tokio::time::timeout(spec.timeout(), entry.agent.call(&req)).await;
                METRICS.agent_in_flight.with_label_values(&[name]).dec();
                r.unwrap_or(Err(AgentError::Timeout(spec.timeout())))
            };
            refused_reads.extend(req.context.take_refused_reads());
            let label = match &result {
                Ok(_) => "ok",
                Err(AgentError::Timeout(_)) => "timeout",
                Err(_) => "error",
            };
            METRICS.agent_calls.with_label_values(&[name, label]).inc();
            if let Err(e) = &result {
                span.fail(e.to_string());
            }
            span.attr("switchyard.result", label);
            span.end();
            match result {
                Err(AgentError::Timeout(_) | AgentError::Retryable(_))
                    if attempt <= spec.retries =>
                {
                    let backoff = Duration::from_millis(
                        spec.backoff_ms.saturating_mul(1 << (attempt - 1).min(10)),
                    );
                    tracing::warn!(agent = name, task_id = %t.task.task_id, attempt, error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "Agent attempt failed; retrying.");
                    tokio::time::sleep(backoff).await;
                }
                r => {
                    refused_reads.sort();
                    refused_reads.dedup();
                    return (r, attempt, refused_reads);
                }
            }
        }
    }

    /// Runs a task that has no recorded outcome and records it; `None` when it turned out to be
    /// finished already (a zombie, or a copy racing the original). With the outcome: whether it
    /// was kept in the resource's memo slot (nothing to forget once committed).
    async fn run(
        &self,
        entry: &AgentEntry,
        t: &DecodedTask,
        key: &ResourceKey,
        snap: Snapshot,
        budget: BudgetCheck,
        place: Option<&Place>,
    ) -> Result<Option<(Outcome, bool)>, ProcessError> {
        let task_id = t.task.task_id.clone();
        let computed = match self.unrecorded.outcome_or_call(&task_id).await {
            Ok(c) => c,
            Err(_calling) => {
                let c = Arc::new(self.call_and_check(entry, t, snap, budget).await?);
                self.unrecorded
                    .insert(task_id.clone(), c.clone(), std::time::Instant::now());
                c
            }
        };
        let (facts, outcome) = &*computed;
        let summary = json!({"id": t.event.id, "type": t.event.ty, "time": t.event.time});
        let recorded = timed(
            "commit",
            self.store
                .commit(key, &task_id, facts, Some(&summary), outcome, place),
        )
        .await
        .map_err(context_error("commit"))?;
        self.unrecorded.remove(&task_id);
        if let (CommitResult::Applied { .. }, Some(g)) = (&recorded, &self.graph) {
            let keys: Vec<&str> = facts
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| self.indexed.iter().any(|i| i == k))
                .collect();
            // Best effort: the facts are committed; a missed index entry only hides the resource
            // from `context query` until its next write.
            let at = crate::event::now_secs();
            if let Err(e) = g.index(key, &keys, at, self.context_ttl_seconds).await {
                tracing::warn!(error = %e, resource = %key.resource, "Could not index the task's facts.");
            }
        }
        Ok(match recorded {
            CommitResult::Applied { kept, .. } => Some((
                match Arc::try_unwrap(computed) {
                    Ok((_, o)) => o,
                    Err(shared) => shared.1.clone(),
                },
                kept,
            )),
            CommitResult::AlreadyRecorded(o) => Some((*o, false)),
            CommitResult::Finished => None,
        })
    }

    /// Reads the context, calls the agent and applies the scope rules: the facts to write and the outcome.
    async fn call_and_check(
        &self,
        entry: &AgentEntry,
        t: &DecodedTask,
        snap: Snapshot,
        budget: BudgetCheck,
    ) -> Result<Computed, ProcessError> {
        let name = t.task.agent.as_str();
        if let BudgetCheck::Exhausted { budget } = budget {
            METRICS.budget_refusals.with_label_values(&[&budget]).inc();
            METRICS
                .agent_tasks
                .with_label_values(&[name, "refused"])
                .inc();
            let outcome = refused(
                snap.version,
                format!("budget {budget} is exhausted"),
                vec![format!("budget:{budget}")],
            );
            return Ok((Vec::new(), outcome));
        }
        // The circuit breaker: while the agent's circuit is open its fallback runs the task (or,
        // without one, the task is refused); once it may be closed, one task probes it.
        let (mut entry, mut ran, mut probe) = (entry, None::<String>, false);
        if let (Some(c), Some(b)) = (&entry.spec.circuit, &self.breakers) {
            match b.admit(name, c).await {
                Ok(Admit::Call) => {}
                Ok(Admit::Probe) => probe = true,
                Ok(Admit::Open) => {
                    let fallback = entry
                        .spec
                        .fallback
                        .as_ref()
                        .and_then(|f| self.agents.get(f).map(|e| (f, e)));
                    match fallback {
                        Some((f, fe)) => {
                            ran = Some(f.clone());
                            entry = fe;
                        }
                        None => {
                            METRICS
                                .agent_tasks
                                .with_label_values(&[name, "refused"])
                                .inc();
                            let outcome = refused(
                                snap.version,
                                format!("the circuit of {name} is open and it has no fallback"),
                                Vec::new(),
                            );
                            return Ok((Vec::new(), outcome));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(agent = name, error = %e, "Circuit state unavailable; calling the agent.")
                }
            }
        }
        let runner = ran.as_deref().unwrap_or(name);
        METRICS
            .agent_tasks
            .with_label_values(&[name, "started"])
            .inc();
        let started = Instant::now();
        // Facts of related resources (the agent's `related:`): read now, never locked.
        let seen_at = now_rfc3339();
        let related = match &self.graph {
            Some(g) if !entry.spec.related.is_empty() => {
                let k = ResourceKey::new(t.task.tenant.clone(), t.task.resource.clone());
                g.related(&k, &entry.spec.related)
                    .await
                    .map_err(context_error("related"))?
            }
            _ => Default::default(),
        };
        let call = self.call(
            entry,
            runner,
            t,
            snap.version,
            snap.values(),
            related.value.clone(),
        );
        // A workflow step's `timeout_seconds` bounds the whole task, every attempt included.
        let (result, attempts, refused_reads) = match self.step_timeout(&t.task) {
            Some(d) => tokio::time::timeout(d, call)
                .await
                .unwrap_or_else(|_| (Err(AgentError::Timeout(d)), 1, Vec::new())),
            None => call.await,
        };
        if ran.is_none() {
            if let (Some(c), Some(b)) = (&entry.spec.circuit, &self.breakers) {
                if let Err(e) = b.record(name, c, result.is_ok(), probe).await {
                    tracing::warn!(agent = name, error = %e, "Could not count the call for the circuit breaker.");
                }
            }
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        METRICS
            .agent_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let mut refusals: Vec<String> = refused_reads.iter().map(|k| format!("read:{k}")).collect();
        let (status, error, response) = match result {
            Ok(resp) => {
                use crate::codec::check_value_depth;
                use crate::context::{MAX_FACT_BYTES, MAX_FINDINGS_PER_TASK};
                let mut kept = AgentResponse::default();
                let mut over = 0;
                for f in resp.findings {
                    // Keys starting with `_` are the store's own fields, never an agent's.
                    if f.key.starts_with('_') || !allowed(&entry.spec.writes, &f.key) {
                        refusals.push(format!("write:{}", f.key));
                    } else if kept.findings.len() >= MAX_FINDINGS_PER_TASK {
                        over += 1;
                    } else if f.value.to_string().len() > MAX_FACT_BYTES {
                        refusals.push(format!(
                            "write:{} (its value is over {MAX_FACT_BYTES} bytes)",
                            f.key
                        ));
                    } else if check_value_depth(&f.value, MAX_ANSWER_DEPTH).is_err() {
                        refusals.push(format!(
                            "write:{} (its value nests deeper than {MAX_ANSWER_DEPTH} levels)",
                            f.key
                        ));
                    } else {
                        kept.findings.push(f);
                    }
                }
                if over > 0 {
                    // First: a flood of refusals below is cut short, this one stays.
                    refusals.insert(
                        0,
                        format!(
                            "write:{over} findings over the {MAX_FINDINGS_PER_TASK} a task may write"
                        ),
                    );
                }
                let mut over_proposals = 0;
                for p in resp.proposals {
                    if kept.proposals.len() >= MAX_PROPOSALS_PER_TASK {
                        // Each one is a proposal record and a resolve decision: an answer with
                        // thousands (a model told to page everyone) is cut here.
                        over_proposals += 1;
                        continue;
                    }
                    // An action on another resource: only on one the task was given as related.
                    let target_ok = p
                        .resource
                        .as_ref()
                        .is_none_or(|r| r == &t.task.resource || related.resources.contains(r));
                    if !allowed(&entry.spec.actions, &p.action) {
                        refusals.push(format!("action:{}", p.action));
                    } else if check_value_depth(&p.parameters, MAX_ANSWER_DEPTH).is_err() {
                        refusals.push(format!(
                            "action:{} (its parameters nest deeper than {MAX_ANSWER_DEPTH} levels)",
                            p.action
                        ));
                    } else if !target_ok {
                        refusals.push(format!(
                            "action:{}@{}",
                            p.action,
                            p.resource.as_deref().unwrap_or_default()
                        ));
                    } else {
                        // What the agent saw of the target (switchyard's to say, not the agent's):
                        // kept with the proposal, so a workflow merge that sends it with another
                        // branch's outcome still judges its staleness by its own agent's view.
                        let mut p = p;
                        p.seen_version = match p.resource.as_ref() {
                            Some(r) if *r != t.task.resource => related.versions.get(r).copied(),
                            _ => Some(snap.version),
                        };
                        p.seen_at = Some(seen_at.clone());
                        kept.proposals.push(p);
                    }
                }
                if over_proposals > 0 {
                    refusals.insert(
                        0,
                        format!(
                            "action:{over_proposals} proposals over the {MAX_PROPOSALS_PER_TASK} a task may make"
                        ),
                    );
                }
                // Checked against the step's supervision rules when its run moves on.
                kept.delegate = resp.delegate;
                // For the scorecards and the step's cost.
                kept.cost = resp.cost.filter(|c| c.is_finite() && *c >= 0.0);
                kept.model = resp.model;
                // Each refusal is an audit record: a flood of them is summed up in one.
                if refusals.len() > MAX_REFUSALS {
                    let more = refusals.len() - (MAX_REFUSALS - 1);
                    refusals.truncate(MAX_REFUSALS - 1);
                    refusals.push(format!("scope:{more} more refusals"));
                }
                ("succeeded", None, kept)
            }
            Err(e @ AgentError::Timeout(_)) => {
                ("timed_out", Some(e.to_string()), AgentResponse::default())
            }
            Err(e) => ("failed", Some(e.to_string()), AgentResponse::default()),
        };
        METRICS.agent_tasks.with_label_values(&[name, status]).inc();
        let now = now_rfc3339();
        let facts: Vec<(String, Fact)> = response
            .findings
            .iter()
            .map(|f| {
                (
                    f.key.clone(),
                    Fact {
                        value: f.value.clone(),
                        by: runner.to_string(),
                        task_id: t.task.task_id.clone(),
                        at: now.clone(),
                    },
                )
            })
            .collect();
        let outcome = Outcome {
            status: status.into(),
            attempts,
            duration_ms,
            context_version: snap.version,
            response,
            error,
            refusals,
            at: now,
            agent_digest: ran.is_none().then(|| entry.digest.clone()),
            ran: ran.take(),
            seen_at,
            related_reads: related.reads,
            related_versions: related.versions,
        };
        Ok((facts, outcome))
    }

    /// What became of the outcome's proposals as far as this stage knows (none when the agent
    /// proposed nothing), and a warning naming the agent and actions when access rules reject
    /// some: the same check resolve's gate makes ([`GovernanceConfig::allows`]: pure, static), on
    /// the same agent, action, resource and tenant the proposal records carry.
    fn proposal_counts(
        &self,
        t: &DecodedTask,
        o: &Outcome,
        held: bool,
    ) -> (Option<ProposalCounts>, Vec<String>) {
        let task = &t.task;
        let sent = &o.response.proposals;
        let refused = o
            .refusals
            .iter()
            .filter(|r| r.starts_with("action:"))
            .count() as u32;
        let mut c = ProposalCounts {
            proposed: sent.len() as u32 + refused,
            refused,
            ..Default::default()
        };
        if c.proposed == 0 {
            return (None, Vec::new());
        }
        if held {
            c.held = sent.len() as u32;
            return (Some(c), Vec::new());
        }
        let by = o.ran.as_deref().unwrap_or(&task.agent);
        let mut denied: Vec<(&str, &str)> = Vec::new();
        for p in sent {
            let resource = p.resource.as_deref().unwrap_or(&task.resource);
            if self
                .governance
                .allows(&task.tenant, by, &p.action, resource)
            {
                c.to_resolve += 1;
            } else {
                c.rejected += 1;
                if !denied.contains(&(p.action.as_str(), resource)) {
                    denied.push((&p.action, resource));
                }
            }
        }
        let mut warnings = Vec::new();
        if !denied.is_empty() {
            let what: Vec<String> = denied.iter().map(|(a, r)| format!("{a} on {r}")).collect();
            let mut actions: Vec<&str> = denied.iter().map(|(a, _)| *a).collect();
            actions.sort_unstable();
            actions.dedup();
            warnings.push(format!(
                "{} of {} proposals rejected: no governance.access rule lets agent {by} cause {} (tenant {}); add one, e.g. {{ agents: [{by}], actions: [{}] }}",
                c.rejected,
                c.proposed,
                what.join(", "),
                task.tenant,
                actions.join(", ")
            ));
        }
        (Some(c), warnings)
    }

    /// A proposal record of the task `t` (its agent, or for a merge the branch agent `agent`).
    fn proposal(
        &self,
        t: &DecodedTask,
        o: &Outcome,
        id: String,
        agent: &str,
        p: &crate::records::ProposalSpec,
    ) -> Result<Output, ProcessError> {
        let task = &t.task;
        let resource = p.resource.as_deref().unwrap_or(&task.resource);
        let data = ProposalData {
            proposal_id: id.clone(),
            task_id: task.task_id.clone(),
            workflow_id: task.workflow_id.clone(),
            agent: agent.to_string(),
            action: p.action.clone(),
            resource: resource.to_string(),
            tenant: task.tenant.clone(),
            parameters: p.parameters.clone(),
            priority: p.priority,
            impact: p.impact,
            // The version of the resource's context the agent saw (a related one's, as given; kept
            // with the proposal, so a merge that sends it later uses its own agent's view).
            context_version: if resource == task.resource {
                p.seen_version.unwrap_or(o.context_version)
            } else {
                p.seen_version
                    .or_else(|| o.related_versions.get(resource).copied())
                    .unwrap_or(0)
            },
            reason: p.reason.clone(),
            event_id: Some(t.event.id.clone()),
            cost: p.cost,
            seen_at: p
                .seen_at
                .clone()
                .or_else(|| (!o.seen_at.is_empty()).then(|| o.seen_at.clone())),
            approved_by: None,
            edit_of: None,
            confidence: p.confidence,
        };
        let mut ev = CloudEvent::new(id, SOURCE, types::PROPOSAL)
            .with_subject(resource.to_string())
            .with_time(&o.at)
            .with_typed_data(&data)?
            .with_extension("tenant", task.tenant.clone());
        if let Some(tp) = t.traceparent.as_deref() {
            ev = ev.with_extension("traceparent", tp);
        }
        self.emitter.emit(&self.proposals_topic, &ev)
    }

    /// The records an outcome causes: proposals, the result, a dead letter for a failed task, and
    /// the (unsealed) audit records.
    fn outputs(
        &self,
        rec: &Input,
        t: &DecodedTask,
        o: &Outcome,
    ) -> Result<(Vec<Output>, Vec<CloudEvent>), ProcessError> {
        let task = &t.task;
        let tp = t.traceparent.as_deref();
        let mut out = Vec::new();
        let mut proposal_ids = Vec::new();
        // A workflow step whose proposals a merge step joins sends none to resolve.
        let held = task.step.as_ref().is_some_and(|s| s.hold);
        for (i, p) in o.response.proposals.iter().enumerate().filter(|_| !held) {
            let id = format!(
                "prop-{}",
                stable_id(&[&task.task_id, &i.to_string(), &p.action])
            );
            let by = o.ran.as_deref().unwrap_or(&task.agent);
            out.push(self.proposal(t, o, id.clone(), by, p)?);
            proposal_ids.push(id);
        }
        let findings: Vec<Value> = o
            .response
            .findings
            .iter()
            .map(|f| json!({"key": f.key, "value": f.value}))
            .collect();
        let (counts, warnings) = self.proposal_counts(t, o, held);
        let result = ResultData {
            task_id: task.task_id.clone(),
            workflow_id: task.workflow_id.clone(),
            agent: task.agent.clone(),
            resource: task.resource.clone(),
            tenant: task.tenant.clone(),
            status: o.status.clone(),
            duration_ms: o.duration_ms,
            attempts: o.attempts,
            findings: Value::Array(findings),
            proposals: json!(proposal_ids),
            error: o.error.clone(),
            event_id: Some(t.event.id.clone()),
            answer: recorded_answer(&o.response, &task.task_id),
            agent_digest: o.agent_digest.clone(),
            ran: o.ran.clone(),
            proposal_counts: counts,
            warnings: warnings.clone(),
        };
        let mut rev = CloudEvent::new(format!("result-{}", task.task_id), SOURCE, types::RESULT)
            .with_subject(task.resource.clone())
            .with_time(&o.at)
            .with_typed_data(&result)?
            .with_extension("tenant", task.tenant.clone());
        if let Some(tp) = tp {
            rev = rev.with_extension("traceparent", tp);
        }
        out.push(self.emitter.emit(&self.results_topic, &rev)?);
        let audit = |decision: &str, reason: Option<String>, detail: Value| {
            task_audit(t, decision, reason, detail)
        };
        let mut detail = json!({"agent": task.agent, "ran": o.ran, "status": o.status, "attempts": o.attempts, "duration_ms": o.duration_ms,
               "proposals": proposal_ids, "findings": o.response.findings.iter().map(|f| &f.key).collect::<Vec<_>>(),
               "held": if held { o.response.proposals.len() } else { 0 },
               "related_reads": o.related_reads});
        // Only when there is something to say, so a result without proposals is audited as before.
        if let Some(c) = counts {
            detail["proposal_counts"] = json!(c);
        }
        if !warnings.is_empty() {
            detail["warnings"] = json!(warnings);
        }
        let a = audit("agent_result", o.error.clone(), detail);
        let mut audits = vec![audit_event(
            SOURCE,
            &["agent_result", &task.task_id],
            &a,
            tp,
            &o.at,
        )?];
        for r in &o.refusals {
            let (kind, what) = r.split_once(':').unwrap_or(("scope", r.as_str()));
            let a = if kind == "budget" {
                audit(
                    "budget_refused",
                    Some("budget".into()),
                    json!({"agent": task.agent, "budget": what}),
                )
            } else {
                audit(
                    "refused",
                    Some(format!("scope_{kind}")),
                    json!({"agent": task.agent, "kind": kind, "key": what}),
                )
            };
            audits.push(audit_event(
                SOURCE,
                &["refused", &task.task_id, r],
                &a,
                tp,
                &o.at,
            )?);
        }
        if o.status == "failed" || o.status == "timed_out" {
            let detail = format!(
                "agent {} {}: {}",
                task.agent,
                o.status,
                o.error.as_deref().unwrap_or("")
            );
            METRICS
                .dlq_records
                .with_label_values(&["agents", "agent_failed"])
                .inc();
            out.push(dead_letter(
                &self.dlq_topic,
                "agents",
                rec,
                "agent_failed",
                &detail,
                self.max_record_bytes,
            ));
        }
        Ok((out, audits))
    }
}

impl<S: ContextStore> Processor for AgentStage<S> {
    fn stage(&self) -> &'static str {
        "agents"
    }

    /// One lane per resource (the record key), so tasks of a resource run in order.
    fn lane(&self, rec: &Input) -> u64 {
        match rec
            .headers
            .iter()
            .find(|(k, _)| k == crate::workflow::STEP_HEADER)
        {
            // A workflow's parallel steps on one resource run side by side.
            Some((_, step)) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                rec.key.hash(&mut h);
                step.hash(&mut h);
                h.finish()
            }
            None => rec.key_lane(),
        }
    }

    /// A batch's tasks: their contexts read in one round trip and their budgets reserved in
    /// another, then the agents run concurrently; the audit records of the tasks that finish
    /// together are sealed together (a slow agent does not hold up the others).
    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        futures::stream::once(self.prepare(recs)).flat_map(move |jobs| {
            let jobs = jobs
                .into_iter()
                .map(|j| {
                    (
                        Sealer::chain("agents", &j.rec.topic, j.rec.partition),
                        self.finish(j),
                    )
                })
                .collect();
            sealed_jobs("agents", &self.sealer, &self.emitter, jobs)
        })
    }

    /// Forgets the outcomes of committed tasks (one pipeline per commit).
    async fn cleanup(&self, keys: Vec<String>) {
        let tasks: Vec<(ResourceKey, String)> = keys
            .iter()
            .filter_map(|k| serde_json::from_str::<(String, String, String)>(k).ok())
            .map(|(tenant, resource, task)| (ResourceKey::new(tenant, resource), task))
            .collect();
        if let Err(e) = self.store.forget(&tasks).await {
            // They stay until the resource's context expires; nothing is wrong meanwhile.
            tracing::warn!(error = %e, tasks = tasks.len(), "Could not forget committed tasks' outcomes.");
        }
    }
}

/// The span of a task that runs: `task <agent>`, or `workflow.step <workflow>/<step>` for a
/// workflow step (its round, for a supervisor's), under the task record's `traceparent`.
fn task_span(t: &DecodedTask) -> Span {
    let task = &t.task;
    let name = match &task.step {
        Some(s) => format!("workflow.step {}/{}", s.workflow, s.step),
        None => format!("task {}", task.agent),
    };
    let mut span = Span::child(name, t.parent.as_deref(), "task", &task.task_id);
    span.attr("switchyard.task.id", task.task_id.clone())
        .attr("gen_ai.agent.name", task.agent.clone())
        .attr("switchyard.route", task.route.clone())
        .attr("switchyard.resource", task.resource.clone())
        .attr("switchyard.tenant", task.tenant.clone())
        .attr("switchyard.event.id", t.event.id.clone());
    if let Some(s) = &task.step {
        span.attr("switchyard.workflow", s.workflow.clone())
            .attr("switchyard.workflow.run", s.run_id.clone())
            .attr("switchyard.workflow.step", s.step.clone())
            .attr("switchyard.workflow.round", i64::from(s.round));
    }
    span
}

/// The largest `answer` a result record keeps (JSON bytes); a larger one is left out (`replay`
/// then reports the task diverged), so its proposals do not push the result past the broker's limit.
const MAX_ANSWER_BYTES: usize = 128 * 1024;

/// What a result record keeps of an agent's answer beyond its findings (those are in `findings`).
fn recorded_answer(r: &AgentResponse, task_id: &str) -> Option<Value> {
    let v = serde_json::to_value(AgentResponse {
        findings: Vec::new(),
        ..r.clone()
    })
    .ok()?;
    let size = v.to_string().len();
    if size > MAX_ANSWER_BYTES {
        tracing::info!(task_id, size, "The agent's answer is too large to keep in its result record; a replay cannot serve it.");
        return None;
    }
    Some(v)
}

/// A task of a batch, read and reserved for.
struct Job {
    rec: Arc<Input>,
    step: Result<Prepared, ProcessError>,
}

struct Prepared {
    t: DecodedTask,
    key: ResourceKey,
    prior: Prior,
    snap: Snapshot,
    budget: BudgetCheck,
    /// Where the task's record is ([`Place`]): the outcome may be kept in the resource's memo slot.
    place: Option<Place>,
}

/// Where a task's record is, for the memo slots and the applied-offset fence ([`Place`]): a task of
/// a resource's own lane only. A workflow's steps run in lanes of their own, side by side, so a
/// step at a lower offset may finish after a later task of the resource: their outcomes are kept
/// apart until committed, as before, and they neither move nor read the fence.
fn memo_place(rec: &Input) -> Option<Place> {
    if rec
        .headers
        .iter()
        .any(|(k, _)| k == crate::workflow::STEP_HEADER)
    {
        return None;
    }
    Place::of(rec)
}

/// What a committed task leaves for [`Processor::cleanup`]: its outcome to forget.
fn forget_token(key: &ResourceKey, task_id: &str) -> String {
    json!([key.tenant, key.resource, task_id]).to_string()
}

impl<S: ContextStore> AgentStage<S> {
    /// Decodes a batch's tasks, reads their contexts (one round trip) and reserves budgets for the
    /// ones that will call their agent (one more).
    async fn prepare(&self, recs: Vec<Arc<Input>>) -> Vec<Job> {
        let decoded: Vec<Result<DecodedTask, ProcessError>> = recs
            .iter()
            .map(|rec| {
                let t = decode_task(rec, &self.emitter)?;
                // A workflow step's task goes on to fail its step (see `finish`), so its run moves on.
                if !self.agents.contains_key(&t.task.agent) && t.task.step.is_none() {
                    return Err(poison(
                        "unknown_agent",
                        format!("agent {:?} is not declared in the config", t.task.agent),
                    ));
                }
                Ok(t)
            })
            .collect();
        let asks: Vec<(ResourceKey, String)> = decoded
            .iter()
            .flatten()
            .map(|t| {
                (
                    ResourceKey::new(t.task.tenant.clone(), t.task.resource.clone()),
                    t.task.task_id.clone(),
                )
            })
            .collect();
        let started = Instant::now();
        let mut reads = self.store.read_many(&asks).await.into_iter();
        METRICS
            .context_op_duration
            .with_label_values(&["snapshot"])
            .observe(started.elapsed().as_secs_f64());
        let mut read: Vec<Result<(ResourceKey, Prior, Snapshot, DecodedTask), ProcessError>> =
            Vec::with_capacity(recs.len());
        for (d, rec) in decoded.into_iter().zip(&recs) {
            read.push(d.and_then(|t| {
                let (prior, snap) = reads
                    .next()
                    .unwrap_or_else(|| Err(StoreError::Corrupt("context reply too short".into())))
                    .map_err(context_error("snapshot"))?;
                METRICS
                    .context_ops
                    .with_label_values(&["snapshot", "ok"])
                    .inc();
                let key = ResourceKey::new(t.task.tenant.clone(), t.task.resource.clone());
                // What is known means for this very record (see Prior::at).
                let prior = prior.at(memo_place(rec).as_ref(), &snap);
                Ok((key, prior, snap, t))
            }));
        }
        // Budgets for the tasks that will call their agent, in batch order.
        let unrecorded = self.unrecorded.ids();
        let spenders: Vec<(usize, Spender<'_>, f64)> = read
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Ok((_, Prior::New, _, t))
                    if !unrecorded.contains(&t.task.task_id)
                        && self.agents.contains_key(&t.task.agent) =>
                {
                    Some((
                        i,
                        Spender {
                            agent: &t.task.agent,
                            workflow: &t.task.workflow_id,
                            tenant: &t.task.tenant,
                            model: "",
                        },
                        self.agents
                            .get(&t.task.agent)
                            .map(|e| e.spec.cost_per_call)
                            .unwrap_or(0.0),
                    ))
                }
                _ => None,
            })
            .collect();
        let calls: Vec<(Spender<'_>, f64)> =
            spenders.iter().map(|(_, s, c)| (s.clone(), *c)).collect();
        let checks = self.budgets.reserve_many(&calls).await;
        let mut budget: HashMap<usize, Result<BudgetCheck, ProcessError>> = HashMap::new();
        match checks {
            Ok(c) => {
                for ((i, _, _), check) in spenders.iter().zip(c) {
                    budget.insert(*i, Ok(check));
                }
            }
            Err(e) => {
                for (i, _, _) in &spenders {
                    budget.insert(
                        *i,
                        Err(ProcessError::from(e.clone()).context("budget reservation")),
                    );
                }
            }
        }
        drop(spenders);
        recs.into_iter()
            .zip(read)
            .enumerate()
            .map(|(i, (rec, r))| {
                let step = r.and_then(|(key, prior, snap, t)| {
                    let budget = budget.remove(&i).unwrap_or(Ok(BudgetCheck::Ok))?;
                    Ok(Prepared {
                        t,
                        key,
                        prior,
                        snap,
                        budget,
                        place: memo_place(&rec),
                    })
                });
                Job { rec, step }
            })
            .collect()
    }

    /// Runs one prepared task (or replays its recorded outcome): its records and (unsealed) audit
    /// records.
    async fn finish(&self, job: Job) -> Result<Decided, ProcessError> {
        let Prepared {
            t,
            key,
            prior,
            snap,
            budget,
            place,
        } = job.step?;
        let entry = self.agents.get(&t.task.agent);
        if entry.is_none() && t.task.step.is_none() {
            return Err(poison(
                "unknown_agent",
                format!("agent {:?} is not declared in the config", t.task.agent),
            ));
        }
        // Whether the outcome is in a key of its own, to forget once the input is committed (not
        // when it is kept in the resource's memo slot).
        let mut apart = true;
        let outcome = match prior {
            Prior::Finished => {
                METRICS
                    .agent_tasks
                    .with_label_values(&[crate::telemetry::agent_label(&t.task.agent), "skipped"])
                    .inc();
                tracing::info!(task_id = %t.task.task_id, agent = %t.task.agent, "Task finished and committed before; skipping this copy.");
                return Ok(Decided::default());
            }
            Prior::Recorded(o) | Prior::Kept { outcome: o, .. } => {
                METRICS
                    .agent_tasks
                    .with_label_values(&[crate::telemetry::agent_label(&t.task.agent), "replayed"])
                    .inc();
                tracing::info!(task_id = %t.task.task_id, agent = %t.task.agent, "Task already ran; emitting its recorded outcome without calling the agent.");
                *o
            }
            // A workflow step whose agent left the config (since the run started), not run
            // before: the step fails — its task dead-lettered, its run moved on as `on_failure`
            // says — instead of the run waiting for a step that never ends. Stamped with the
            // event's time, so a redelivery writes the same records (and the run's move is a
            // compare-and-set). A step that ran before is replayed or skipped as any task.
            Prior::New if entry.is_none() => {
                tracing::warn!(task_id = %t.task.task_id, agent = %t.task.agent, "A workflow step's agent is not in the config; the step fails.");
                apart = false;
                Outcome {
                    status: "failed".into(),
                    error: Some(format!(
                        "agent {:?} is not declared in the config",
                        t.task.agent
                    )),
                    at: t.event.time.clone().unwrap_or_else(now_rfc3339),
                    ..Default::default()
                }
            }
            Prior::New => {
                let Some(entry) = entry else {
                    // Not reached: the arm above takes a missing agent.
                    return Err(ProcessError::Fatal(format!(
                        "agent {:?} vanished while its task ran",
                        t.task.agent
                    )));
                };
                let mut span = task_span(&t);
                let Some((o, kept)) = self
                    .run(entry, &t, &key, snap, budget, place.as_ref())
                    .await?
                else {
                    return Ok(Decided::default());
                };
                apart = !kept;
                span.attr("switchyard.status", o.status.clone())
                    .attr("switchyard.attempts", i64::from(o.attempts))
                    .attr("switchyard.findings", o.response.findings.len() as i64)
                    .attr("switchyard.proposals", o.response.proposals.len() as i64);
                if let Some(r) = &o.ran {
                    span.attr("switchyard.ran", r.clone());
                }
                if let Some(e) = &o.error {
                    span.fail(e.clone());
                }
                span.end();
                if let Some(stats) = &self.stats {
                    let ran = o.ran.as_deref().unwrap_or(&t.task.agent);
                    let per_call = self.agents.get(ran).map_or(0.0, |e| e.spec.cost_per_call);
                    stats.task(ran, &o, o.response.cost.unwrap_or(0.0) + per_call);
                }
                for r in o.refusals.iter().filter(|r| !r.starts_with("budget:")) {
                    let kind = r.split_once(':').map(|(k, _)| k).unwrap_or("scope");
                    METRICS
                        .agent_refusals
                        .with_label_values(&[&t.task.agent, kind])
                        .inc();
                }
                o
            }
        };
        let (mut outputs, mut audits) = self.outputs(&job.rec, &t, &outcome)?;
        let (more, more_audits) = self.advance(&t, &outcome).await?;
        outputs.extend(more);
        audits.extend(more_audits);
        Ok(Decided {
            outputs,
            audits,
            cleanup: if apart {
                vec![forget_token(&key, &t.task.task_id)]
            } else {
                Vec::new()
            },
        })
    }
}

impl<S: ContextStore> AgentStage<S> {
    /// The `timeout_seconds` of the workflow step a task runs (a sub-step: its supervisor's).
    fn step_timeout(&self, task: &TaskData) -> Option<Duration> {
        let (wf, step) = (self.workflows.as_ref()?, task.step.as_ref()?);
        let name = step.step.split('#').next().unwrap_or(&step.step);
        let secs = wf
            .specs
            .get(&step.workflow)?
            .steps
            .get(name)?
            .timeout_seconds?;
        Some(Duration::from_secs(secs))
    }

    /// For a workflow step: moves its run on (one compare-and-set; idempotent) and returns the
    /// records that causes — the next steps' tasks, lifecycle records, a declarative merge's
    /// proposals — and audit records of skipped steps and the run's end.
    async fn advance(
        &self,
        t: &DecodedTask,
        o: &Outcome,
    ) -> Result<(Vec<Output>, Vec<CloudEvent>), ProcessError> {
        let (Some(wf), Some(step)) = (&self.workflows, &t.task.step) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let Some(spec) = wf.specs.get(&step.workflow) else {
            tracing::warn!(workflow = %step.workflow, run_id = %step.run_id, "A step finished for a workflow no longer in the config; its run stops here.");
            return Ok((Vec::new(), Vec::new()));
        };
        let task = &t.task;
        let meta = crate::workflow::RunState {
            run_id: step.run_id.clone(),
            workflow: step.workflow.clone(),
            resource: task.resource.clone(),
            tenant: task.tenant.clone(),
            event_id: t.event.id.clone(),
            started_at: step.run_started_at.clone(),
            ..Default::default()
        };
        let f = crate::workflow::Finished {
            step,
            agent: &task.agent,
            task_id: &task.task_id,
            status: &o.status,
            findings: &o.response.findings,
            proposals: &o.response.proposals,
            delegate: &o.response.delegate,
            error: o.error.as_deref(),
            duration_ms: o.duration_ms,
            cost: o.response.cost.unwrap_or(0.0)
                + self
                    .agents
                    .get(o.ran.as_deref().unwrap_or(&task.agent))
                    .map_or(0.0, |e| e.spec.cost_per_call),
            at: &o.at,
            choose: wf.choose.as_ref(),
        };
        let plan = wf
            .runs
            .advance(spec, &meta, &f)
            .await
            .map_err(|e| ProcessError::from(e).context("workflow run"))?;
        METRICS
            .workflow_step_duration
            // A supervisor's sub-steps (`S#r0#3`) count under their step: one series per step
            // of the config, not per round and delegation.
            .with_label_values(&[
                &step.workflow,
                step.step.split('#').next().unwrap_or_default(),
            ])
            .observe(o.duration_ms as f64 / 1000.0);
        let tp = t.traceparent.as_deref();
        let mut out = Vec::new();
        for st in &plan.start {
            let inputs = bounded_inputs(&st.inputs, self.max_record_bytes / 2);
            if inputs.is_some() {
                tracing::warn!(run_id = %step.run_id, step = %st.step, "A step's inputs (its parents' findings and proposals) are too large for its task record; the step gets them cut, and reads the shared context instead.");
            }
            let data = TaskData {
                task_id: st.task_id.clone(),
                workflow_id: task.workflow_id.clone(),
                agent: st.agent.clone(),
                route: task.route.clone(),
                priority: task.priority,
                resource: task.resource.clone(),
                tenant: task.tenant.clone(),
                event: task.event.clone(),
                step: Some(crate::records::StepRef {
                    run_id: step.run_id.clone(),
                    workflow: step.workflow.clone(),
                    step: st.step.clone(),
                    attempt: st.attempt,
                    hold: st.hold,
                    inputs: inputs.unwrap_or_else(|| st.inputs.clone()),
                    run_started_at: step.run_started_at.clone(),
                    round: st.round,
                    delegates: st.delegates.clone(),
                }),
            };
            let mut ev = CloudEvent::new(st.task_id.clone(), SOURCE, types::TASK)
                .with_subject(task.resource.clone())
                .with_time(&o.at)
                .with_typed_data(&data)?
                .with_extension("tenant", task.tenant.clone());
            if let Some(tp) = tp {
                ev = ev.with_extension("traceparent", tp);
            }
            out.push(
                self.emitter
                    .emit(&wf.tasks_topic, &ev)?
                    .header(crate::workflow::STEP_HEADER, st.step.clone()),
            );
        }
        for (i, (merge_step, agent, p)) in plan.merged.iter().enumerate() {
            let id = format!(
                "prop-{}",
                stable_id(&[&step.run_id, merge_step, &i.to_string(), &p.action])
            );
            out.push(self.proposal(t, o, id, agent, p)?);
        }
        let mut audits = Vec::new();
        for r in &plan.records {
            out.push(self.emitter.emit(
                &wf.workflows_topic,
                &crate::workflow::lifecycle_event(&meta, r),
            )?);
            let decision = match r.kind.as_str() {
                "step.delegated" => "workflow_delegated",
                "delegation.refused" => "workflow_delegation_refused",
                "step.skipped" => "workflow_step_skipped",
                "workflow.completed" => "workflow_completed",
                "workflow.failed" => "workflow_failed",
                _ => continue,
            };
            if let Some(outcome) = r
                .status
                .as_deref()
                .filter(|_| r.kind.starts_with("workflow."))
            {
                METRICS
                    .workflow_runs
                    .with_label_values(&[&step.workflow, outcome])
                    .inc();
            }
            let a = task_audit(
                t,
                decision,
                r.error.clone(),
                json!({"run_id": step.run_id, "workflow": step.workflow, "step": r.step,
                       "status": r.status, "agent": r.agent}),
            );
            let mut parts = vec![
                decision,
                &step.run_id,
                r.step.as_deref().unwrap_or(""),
                r.agent.as_deref().unwrap_or(""),
                &task.task_id,
            ];
            if r.kind == "delegation.refused" {
                // Several refusals of one agent (for different reasons) are several records.
                parts.push(r.error.as_deref().unwrap_or(""));
            }
            audits.push(audit_event(SOURCE, &parts, &a, tp, &o.at)?);
        }
        Ok((out, audits))
    }
}

/// The stage's logic against in-memory stores: no broker, no Redis.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemoryChainStore;
    use crate::context::memory::MemoryStore;
    use crate::governance::budgets::{
        BudgetSpec, BudgetStore, Holds, Line, MemoryBudgetStore, Request, Reserved,
    };
    use crate::kafka::runtime::process_one;

    /// A budget store whose stored state cannot be read.
    struct CorruptBudgets;

    impl BudgetStore for CorruptBudgets {
        fn reserve<'a>(
            &'a self,
            _: &'a [Request],
        ) -> BoxFuture<'a, Result<Vec<Reserved>, StoreError>> {
            Box::pin(async { Err(StoreError::Corrupt("budget bucket holds \"x\"".into())) })
        }
        fn spent<'a>(
            &'a self,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Vec<(u64, f64)>, StoreError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn hold<'a>(
            &'a self,
            _: &'a Holds,
            _: &'a str,
            _: u64,
            _: &'a Request,
        ) -> BoxFuture<'a, Result<Reserved, StoreError>> {
            Box::pin(async { Err(StoreError::Corrupt("budget bucket holds \"x\"".into())) })
        }
        fn settle<'a>(
            &'a self,
            _: &'a Holds,
            _: &'a str,
            _: &'a [Line],
            _: f64,
        ) -> BoxFuture<'a, Result<f64, StoreError>> {
            Box::pin(async { Err(StoreError::Corrupt("budget bucket holds \"x\"".into())) })
        }
        fn sweep<'a>(&'a self, _: &'a Holds, _: usize) -> BoxFuture<'a, Result<usize, StoreError>> {
            Box::pin(async { Ok(0) })
        }
    }

    fn stage(budget_store: Arc<dyn BudgetStore>) -> AgentStage<MemoryStore> {
        let spec: AgentSpec = serde_yaml::from_str(
            "kind: builtin\nbuiltin: cost-guard\nwrites: [cost]\nactions: [scale_down]",
        )
        .unwrap();
        let agent = spec.kind.build_builtin("cost-guard").unwrap();
        let budgets: Vec<BudgetSpec> =
            serde_yaml::from_str("[{name: b, per: agent, period: day, max_calls: 10}]").unwrap();
        AgentStage {
            agents: HashMap::from([(
                "cost-guard".to_string(),
                AgentEntry {
                    permits: Arc::new(Semaphore::new(1)),
                    spec,
                    agent,
                    digest: String::new(),
                },
            )]),
            budgets: Arc::new(Budgets::new(budget_store, "t", budgets)),
            governance: Default::default(),
            stats: None,
            store: Arc::new(MemoryStore::default()),
            emitter: Emitter::new(Default::default(), Default::default()),
            proposals_topic: "proposals".into(),
            results_topic: "results".into(),
            sealer: Arc::new(Sealer::new(Arc::new(MemoryChainStore::default()), "audit")),
            dlq_topic: "dlq".into(),
            max_record_bytes: 1 << 20,
            unrecorded: Default::default(),
            workflows: None,
            breakers: None,
            graph: None,
            indexed: Vec::new(),
            context_ttl_seconds: 604_800,
        }
    }

    fn task() -> Arc<Input> {
        let ev = CloudEvent::new("e1", "t", "cost.threshold_exceeded")
            .with_subject("svc")
            .with_data(json!({"budget": 10.0, "spend": 12.0}));
        let task = TaskData {
            task_id: "task-1".into(),
            workflow_id: "wf".into(),
            agent: "cost-guard".into(),
            route: "r".into(),
            priority: 0,
            resource: "svc".into(),
            tenant: "default".into(),
            event: serde_json::to_value(&ev).unwrap(),
            step: None,
        };
        let rec = CloudEvent::new("task-1", "t", types::TASK)
            .with_subject("svc")
            .with_data(serde_json::to_value(task).unwrap());
        Arc::new(Input::new(
            "tasks",
            0,
            0,
            Some(b"svc"),
            serde_json::to_vec(&rec).unwrap(),
        ))
    }

    #[tokio::test]
    async fn runs_an_agent_and_replays_its_outcome() {
        let s = stage(Arc::new(MemoryBudgetStore::default()));
        let first = process_one(&s, task()).await.unwrap();
        let topics: Vec<&str> = first.iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(topics, ["proposals", "results", "audit", "audit"]);
        let seal: CloudEvent = serde_json::from_slice(&first[3].payload).unwrap();
        assert_eq!(
            seal.ty,
            crate::audit::SEAL_TYPE,
            "the batch's seal comes last"
        );
        let again = process_one(&s, task()).await.unwrap();
        assert_eq!(
            again[..3],
            first[..3],
            "a redelivery re-emits the same records (under a new seal)"
        );
    }

    fn result_of(out: &[Output]) -> ResultData {
        let rec = out.iter().find(|o| o.topic == "results").expect("a result");
        let ev: CloudEvent = serde_json::from_slice(&rec.payload).unwrap();
        serde_json::from_value(ev.data.unwrap()).unwrap()
    }

    /// The result says what became of the proposals: with access rules that do not let the agent
    /// cause its action, the proposal is still sent (resolve rejects and audits it), and the result
    /// counts it as rejected with a warning naming the agent and action; allowed, it is to resolve.
    #[tokio::test]
    async fn the_result_counts_proposals_access_rules_reject() {
        let mut s = stage(Arc::new(MemoryBudgetStore::default()));
        s.governance = Arc::new(
            serde_yaml::from_str("access: [{agents: [sla-responder], actions: [rollback]}]")
                .unwrap(),
        );
        let out = process_one(&s, task()).await.unwrap();
        assert_eq!(
            out.iter().filter(|o| o.topic == "proposals").count(),
            1,
            "a proposal access rejects still goes to resolve, which audits the rejection"
        );
        let r = result_of(&out);
        assert_eq!(
            r.proposal_counts,
            Some(ProposalCounts {
                proposed: 1,
                rejected: 1,
                ..Default::default()
            })
        );
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("1 of 1 proposals rejected: no governance.access rule lets agent cost-guard cause scale_down on svc")
                && r.warnings[0].contains("{ agents: [cost-guard], actions: [scale_down] }"),
            "{:?}",
            r.warnings
        );
        let audit: CloudEvent = serde_json::from_slice(&out[2].payload).unwrap();
        let detail = &audit.data.unwrap()["detail"];
        assert_eq!(detail["proposal_counts"]["rejected"], 1, "{detail}");

        let mut s = stage(Arc::new(MemoryBudgetStore::default()));
        s.governance = Arc::new(
            serde_yaml::from_str("access: [{agents: [cost-*], actions: [scale_*]}]").unwrap(),
        );
        let r = result_of(&process_one(&s, task()).await.unwrap());
        assert_eq!(
            (r.proposal_counts, r.warnings.len()),
            (
                Some(ProposalCounts {
                    proposed: 1,
                    to_resolve: 1,
                    ..Default::default()
                }),
                0
            )
        );
        // Without proposals the result carries no counts (and reads as before).
        let json = serde_json::to_value(ResultData {
            proposal_counts: None,
            warnings: Vec::new(),
            ..r
        })
        .unwrap();
        assert!(json.get("proposal_counts").is_none() && json.get("warnings").is_none());
    }

    /// Once a task's input is committed its outcome is forgotten: a copy of the task further down
    /// the topic (an upstream redelivery) is skipped, not run again.
    #[tokio::test]
    async fn a_committed_task_is_forgotten_and_its_copy_skipped() {
        let s = stage(Arc::new(MemoryBudgetStore::default()));
        let (_, done) = std::pin::pin!(s.process_batch(vec![task()]))
            .next()
            .await
            .unwrap();
        let done = done.unwrap();
        assert_eq!(
            done.cleanup.len(),
            1,
            "the outcome is to be forgotten once committed"
        );
        s.cleanup(done.cleanup).await;
        let key = ResourceKey::new("default", "svc");
        assert_eq!(
            s.store.read(&key, "task-1").await.unwrap().0,
            Prior::Finished
        );
        let again = process_one(&s, task()).await.unwrap();
        assert!(
            again.is_empty(),
            "a copy of a finished task writes nothing: {again:?}"
        );
    }

    /// Corrupt budget state can never be read by retrying: the task is dead-lettered instead of
    /// being retried forever (every budget error used to be classified as transient).
    #[tokio::test]
    async fn corrupt_budget_state_dead_letters_the_task() {
        let s = stage(Arc::new(CorruptBudgets));
        match process_one(&s, task()).await {
            Err(ProcessError::Poison { reason, detail }) => {
                assert_eq!(reason, "corrupt_state");
                assert!(detail.contains("budget reservation"), "{detail}");
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn unrecorded_outcomes_left_behind_are_dropped_and_retried_ones_kept() {
        let u = Unrecorded::default();
        let t0 = std::time::Instant::now();
        let c = || Arc::new((Vec::new(), Outcome::default()));
        u.insert("moved".into(), c(), t0);
        u.insert("retried".into(), c(), t0);
        // A retry uses its entry just before the idle time is over, and so keeps it.
        let near = t0 + Unrecorded::IDLE - std::time::Duration::from_secs(1);
        assert!(u.get("retried", near).is_some());
        u.insert("later".into(), c(), t0 + Unrecorded::IDLE);
        assert_eq!(
            u.ids(),
            ["retried", "later"].map(String::from).into_iter().collect(),
            "the entry whose record went elsewhere is dropped"
        );
        u.remove("retried");
        assert!(u.get("retried", near).is_none());
    }

    /// A copy of a task whose call is running in this process waits for it and takes its
    /// outcome (one call, not two); when that call fails, one waiting copy calls instead.
    #[tokio::test]
    async fn a_copy_of_a_task_waits_for_its_running_call() {
        let u = Arc::new(Unrecorded::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let run = |fail: bool| {
            let (u, calls) = (u.clone(), calls.clone());
            async move {
                match u.outcome_or_call("t1").await {
                    Ok(_) => "waited",
                    Err(_calling) => {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        if !fail {
                            let c = Arc::new((Vec::new(), Outcome::default()));
                            u.insert("t1".into(), c, std::time::Instant::now());
                        }
                        "called"
                    }
                }
            }
        };
        let (a, b) = tokio::join!(run(false), async {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            run(false).await
        });
        assert_eq!((a, b), ("called", "waited"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        u.remove("t1");
        // The running call fails (no outcome): the copy waiting for it calls.
        let (a, b) = tokio::join!(run(true), async {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            run(false).await
        });
        assert_eq!((a, b), ("called", "called"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn a_steps_inputs_too_large_for_its_task_are_cut() {
        let big = "x".repeat(300_000);
        let inputs = json!({"a": {"findings": {"k": big}}, "b": {"findings": {"k": "small"}},
                            "delegated": {"s#r0#0": {"findings": big}, "s#r0#1": {"ok": 1}}});
        assert_eq!(bounded_inputs(&inputs, 1 << 20), None, "fits");
        let cut = bounded_inputs(&inputs, 200_000).expect("cut");
        assert!(serde_json::to_vec(&cut).expect("json").len() <= 200_000);
        assert_eq!(cut["b"]["findings"]["k"], "small", "what fits is kept");
        assert_eq!(cut["a"]["findings"]["cut"], true);
        assert_eq!(cut["delegated"]["s#r0#1"]["ok"], 1);
        assert_eq!(cut["delegated"]["s#r0#0"]["cut"], true);
    }
}
