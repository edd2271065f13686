//! Replay and what-if: recorded input events run again through route → agents/workflows →
//! resolve, in a sandbox, under the config in force or a candidate one.
//!
//! The sandbox runs the stages' own processors (the same code as `switchyard run`) in this
//! process, on their Redis stores under a scratch key prefix (`<prefix>:replay-<id>`, deleted at
//! the end), and writes nothing to Kafka: the records the stages produce are read here. Agents are
//! not called: every agent is served its recorded answer for the task (the `answer` and
//! `findings` of its `switchyard.results` record), so a replay costs no model call and has no side
//! effect; a task the recording has no answer for (the candidate routes an event somewhere new) is
//! `diverged`. Each proposal is decided at the time the live pipeline decided it (its resolve audit
//! record's time), so cooldowns and windows see what they saw. Events run one at a time in
//! recorded order, each task's proposals decided as soon as it finishes: the same recording and
//! config give the same decisions, byte for byte.
//!
//! What the sandbox starts from is empty: facts, active actions, cooldowns and budgets before the
//! first replayed event are not there (start the window at a quiet point, or include earlier events).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::agents::{Agent, AgentError, AgentRequest};
use crate::codec;
use crate::config::Loaded;
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::runtime::Processor;
use crate::kafka::{Input, Output};
use crate::records::{AgentResponse, AuditData, Emitter, Finding, ResultData};
use crate::stages::agents::{AgentEntry, AgentStage, Workflows};
use crate::stages::resolve::ResolveStage;
use crate::stages::route::RouteStage;
use crate::store::RedisConn;

/// What an agent did for a task, as recorded.
#[derive(Debug, Clone)]
pub enum Answer {
    Answered(AgentResponse),
    /// It failed (or timed out, or was refused): served as a failure again.
    Failed(String),
}

/// A recorded answer and what gave it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub answer: Answer,
    /// The task's agent.
    pub agent: String,
    /// [`crate::agents::answer_digest`] of the task's agent when it answered.
    pub digest: Option<String>,
    /// The agent that answered instead (a fallback, the task's agent's circuit open).
    pub ran: Option<String>,
}

/// The proposal a decision is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct About {
    pub proposal_id: String,
    pub event_id: String,
    /// The event's tenant: ids are unique only within a tenant (and source).
    pub tenant: String,
    pub agent: String,
    pub action: String,
    pub resource: String,
}

/// What was decided on a proposal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decided {
    /// accepted, approval_requested, rejected, deduplicated or merged.
    pub decision: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub detail: String,
}

/// One decision on one proposal.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub about: About,
    pub decided: Decided,
}

impl Decision {
    /// From a resolve audit record.
    fn of(a: &AuditData) -> Option<Decision> {
        if a.stage != "resolve" {
            return None;
        }
        let d = &a.detail;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        Some(Decision {
            about: About {
                proposal_id: d["proposal_id"].as_str()?.to_string(),
                event_id: a.event_id.clone().unwrap_or_default(),
                tenant: a.tenant.clone(),
                agent: s("agent"),
                action: s("action"),
                resource: a.resource.clone(),
            },
            decided: Decided {
                decision: a.decision.clone(),
                rule: d["rule"].as_str().map(str::to_string),
                reason: a.reason.clone(),
                detail: s("detail"),
            },
        })
    }

    /// Whether two decisions differ in what was decided (the detail's wording aside).
    fn differs(&self, other: &Decision) -> bool {
        let (a, b) = (&self.decided, &other.decided);
        (&a.decision, &a.rule, &a.reason) != (&b.decision, &b.rule, &b.reason)
    }
}

/// What the live pipeline recorded: agents' answers per task, decisions per proposal.
#[derive(Debug, Default)]
pub struct Recording {
    pub answers: HashMap<String, Recorded>,
    /// Proposal id → the decision and when it was made (seconds since the epoch).
    pub decisions: HashMap<String, (Decision, i64)>,
}

impl Recording {
    /// Reads `switchyard.results` and `switchyard.audit` records (already read from the broker).
    pub fn from_records(l: &Loaded, results: &[Input], audit: &[Input]) -> Recording {
        let mut r = Recording::default();
        for rec in results {
            let Ok(ev) = codec::decode(rec.view(), &l.schemas) else {
                continue;
            };
            let Some(Ok(res)) = ev.data.map(serde_json::from_value::<ResultData>) else {
                continue;
            };
            let answer = match (res.status.as_str(), res.answer) {
                ("succeeded", Some(a)) => match serde_json::from_value::<AgentResponse>(a) {
                    Ok(mut resp) => {
                        resp.findings = serde_json::from_value::<Vec<Finding>>(res.findings)
                            .unwrap_or_default();
                        Answer::Answered(resp)
                    }
                    Err(_) => continue,
                },
                // Recorded before results carried answers, or too large to keep: nothing to serve.
                ("succeeded", None) => continue,
                (status, _) => Answer::Failed(res.error.unwrap_or_else(|| status.to_string())),
            };
            // The first record of a task is its outcome (a redelivery re-emits the same one).
            r.answers.entry(res.task_id).or_insert(Recorded {
                answer,
                agent: res.agent,
                digest: res.agent_digest,
                ran: res.ran,
            });
        }
        for rec in audit {
            let Ok(ev) = codec::decode(rec.view(), &l.schemas) else {
                continue;
            };
            if ev.ty == crate::audit::SEAL_TYPE {
                continue;
            }
            let at = ev
                .time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp());
            let Some(Ok(a)) = ev.data.map(serde_json::from_value::<AuditData>) else {
                continue;
            };
            if let (Some(d), Some(at)) = (Decision::of(&a), at) {
                r.decisions
                    .entry(d.about.proposal_id.clone())
                    .or_insert((d, at));
            }
        }
        r
    }
}

/// An agent that answers from the recording; never calls anything.
struct FromRecording {
    recording: Arc<Recording>,
    /// The digest of each agent's declaration in the config replayed.
    digests: HashMap<String, String>,
    /// Tasks it could not answer: task id, agent, why.
    diverged: Arc<Mutex<Vec<Diverged>>>,
}

/// A task the recording could not answer.
#[derive(Debug, Clone, Serialize)]
pub struct Diverged {
    pub task_id: String,
    pub agent: String,
    pub why: String,
}

impl Agent for FromRecording {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        Box::pin(async move {
            let why = match self.recording.answers.get(&req.task.task_id) {
                Some(r) if r.agent != req.agent => "another agent answered this task",
                // A fallback answered (the agent's circuit was open): what the agent itself would
                // have said is not recorded.
                Some(r) if r.ran.is_some() => {
                    "its fallback answered (the agent's circuit was open)"
                }
                // The agent's declaration changed (prompt, model, scopes, URL, the model behind its
                // alias, its tools): its recorded answer is not what it would say now.
                Some(r)
                    if r.digest.is_some() && r.digest.as_ref() != self.digests.get(&req.agent) =>
                {
                    "the agent's declaration changed since it answered"
                }
                Some(r) => {
                    return match &r.answer {
                        Answer::Answered(a) => Ok(a.clone()),
                        Answer::Failed(e) => {
                            Err(AgentError::Permanent(format!("as recorded: {e}")))
                        }
                    }
                }
                None => "the recording has no answer for this task",
            };
            self.diverged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Diverged {
                    task_id: req.task.task_id.clone(),
                    agent: req.agent.clone(),
                    why: why.to_string(),
                });
            Err(AgentError::Permanent(format!("diverged: {why}")))
        })
    }
}

/// Counts of a replay.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub events: usize,
    pub tasks: usize,
    /// Tasks served a recorded answer (or failure).
    pub replayed: usize,
    /// Tasks the recording had no answer for.
    pub diverged: usize,
    pub proposals: usize,
    /// Records the sandbox's stages would have dead-lettered.
    pub dead_letters: usize,
    pub same: usize,
    pub changed: usize,
    /// Decided in the replay, not in the recording.
    pub new: usize,
    /// Decided in the recording, not in the replay (the proposal was not made).
    pub missing: usize,
    /// Model calls made: always 0 (agents are served from the recording).
    pub model_calls: usize,
}

/// One line of the decision diff.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// same, changed, new or missing.
    pub status: &'static str,
    #[serde(flatten)]
    pub about: About,
    pub before: Option<Decided>,
    pub after: Option<Decided>,
}

/// What a replay found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub decisions: Vec<Row>,
    /// The tasks the recording could not answer.
    pub diverged: Vec<Diverged>,
    /// The actions the sandbox would have written (for `--to-topic`).
    #[serde(skip)]
    pub actions: Vec<Output>,
}

/// The stages of a config over scratch Redis keys.
pub struct Sandbox {
    route: RouteStage,
    agents: AgentStage<crate::context::redis::RedisStore>,
    resolve: ResolveStage,
    loaded: Loaded,
    redis: RedisConn,
    prefix: String,
    clock: Arc<AtomicI64>,
    recording: Arc<Recording>,
    diverged: Arc<Mutex<Vec<Diverged>>>,
    offsets: HashMap<String, i64>,
}

impl Sandbox {
    /// The stages of `loaded` (the candidate, or the config in force), agents served from
    /// `recording`, state under a fresh scratch prefix of `loaded`'s `redis.key_prefix`.
    pub fn new(
        loaded: &Loaded,
        redis: RedisConn,
        recording: Arc<Recording>,
    ) -> Result<Self, String> {
        let mut l = loaded.clone();
        let prefix = format!(
            "{}:replay-{}",
            l.config.redis.key_prefix,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        l.config.redis.key_prefix = prefix.clone();
        let cfg = &l.config;
        let emitter = Emitter::new(l.schemas.clone(), l.topics.clone());
        // Unguarded: the scratch prefix has no epoch marker (the sandbox's chains are its own).
        let sealer = Arc::new(crate::audit::Sealer::new(
            Arc::new(crate::audit::RedisChainStore::new(redis.clone(), &prefix)),
            &cfg.topics.audit,
        ));
        let clock = Arc::new(AtomicI64::new(crate::event::now_secs()));
        let budgets = Arc::new(
            crate::governance::budgets::Budgets::new(
                Arc::new(crate::governance::budgets::RedisBudgetStore::new(
                    redis.clone(),
                )),
                &prefix,
                cfg.governance.budgets.clone(),
            )
            .with_clock(crate::event::Clock::set_by(clock.clone())),
        );
        let graph = Arc::new(crate::context::graph::Graph::new(
            redis.clone(),
            &prefix,
            cfg.context.relations.clone(),
        ));
        let chooser = Arc::new(RecordedChoice {
            recording: recording.clone(),
            stage: crate::stages::services::StageChooser {
                scoreboard: Default::default(),
                capacity: cfg
                    .agents
                    .iter()
                    .map(|(n, a)| (n.clone(), a.max_concurrency))
                    .collect(),
                governance: Arc::new(cfg.governance.clone()),
            },
        });
        let router = crate::route::Router::new(&cfg.routes).map_err(|p| {
            let lines: Vec<String> = p
                .iter()
                .map(|p| format!("{}: {}", p.route, p.message))
                .collect();
            format!("routes are invalid: {}", lines.join("; "))
        })?;
        let diverged: Arc<Mutex<Vec<Diverged>>> = Arc::default();
        let agent: Arc<dyn Agent> = Arc::new(FromRecording {
            recording: recording.clone(),
            digests: cfg
                .agents
                .iter()
                .map(|(n, a)| (n.clone(), digest_of(n, a, cfg)))
                .collect(),
            diverged: diverged.clone(),
        });
        let agents = cfg
            .agents
            .iter()
            .map(|(name, spec)| {
                let mut spec = crate::stages::agents::effective_spec(name, spec);
                // Served from the recording: nothing to wait for, nothing to retry.
                spec.retries = 0;
                spec.circuit = None;
                let entry = AgentEntry {
                    permits: Arc::new(tokio::sync::Semaphore::new(spec.max_concurrency)),
                    digest: digest_of(name, &spec, cfg),
                    spec,
                    agent: agent.clone(),
                };
                (name.clone(), entry)
            })
            .collect();
        Ok(Sandbox {
            route: RouteStage {
                router,
                emitter: emitter.clone(),
                tasks_topic: cfg.topics.tasks.clone(),
                workflows_topic: cfg.topics.workflows.clone(),
                workflows: cfg.workflows.clone(),
                sealer: sealer.clone(),
                choose: chooser.clone(),
                graph: Some(graph.clone()),
                picks: None,
                max_output_bytes: usize::MAX,
                topic_limits: Default::default(),
            },
            agents: AgentStage {
                agents,
                budgets: budgets.clone(),
                governance: Arc::new(cfg.governance.clone()),
                stats: None,
                store: Arc::new(crate::context::redis::RedisStore::new(
                    redis.clone(),
                    &prefix,
                    cfg.context.clone(),
                )),
                emitter: emitter.clone(),
                proposals_topic: cfg.topics.proposals.clone(),
                results_topic: cfg.topics.results.clone(),
                sealer: sealer.clone(),
                dlq_topic: cfg.topics.dlq.clone(),
                max_record_bytes: cfg.kafka.max_record_bytes,
                unrecorded: Default::default(),
                workflows: (!cfg.workflows.is_empty()).then(|| {
                    Arc::new(Workflows {
                        runs: crate::workflow::runs::Runs::new(redis.clone(), &prefix),
                        specs: cfg.workflows.clone(),
                        tasks_topic: cfg.topics.tasks.clone(),
                        workflows_topic: cfg.topics.workflows.clone(),
                        choose: chooser.clone(),
                    })
                }),
                breakers: None,
                graph: Some(graph.clone()),
                indexed: cfg.context.index.clone(),
                context_ttl_seconds: cfg.context.ttl_seconds,
            },
            resolve: ResolveStage {
                rules: cfg.resolve.clone(),
                governance: Arc::new(cfg.governance.clone()),
                budgets,
                store: crate::app::resource_store_unguarded(&l, redis.clone()),
                emitter,
                actions_topic: cfg.topics.actions.clone(),
                approvals_topic: cfg.topics.approvals.clone(),
                sealer,
                stats: None,
                graph: Some(graph),
                clock: crate::event::Clock::set_by(clock.clone()),
                notifier: None,
                max_output_bytes: cfg.kafka.max_output_bytes(),
                topic_limits: Default::default(),
            },
            loaded: l,
            redis,
            prefix,
            clock,
            recording,
            diverged,
            offsets: HashMap::new(),
        })
    }

    /// Replays `inputs` (input-topic records, in the order given) and compares each decision with
    /// the recorded one. `events` are the ids of the input events: recorded decisions about other
    /// events are not compared.
    pub async fn run(&mut self, inputs: &[Input]) -> Result<Report, String> {
        let mut summary = Summary {
            events: inputs.len(),
            ..Summary::default()
        };
        let mut after: Vec<Decision> = Vec::new();
        let mut actions = Vec::new();
        let mut event_ids = std::collections::HashSet::new();
        for rec in inputs {
            if let Ok(ev) = codec::decode(rec.view(), &self.loaded.schemas) {
                event_ids.insert((ev.tenant().to_string(), ev.id));
            }
            let event_secs = rec
                .timestamp_ms
                .map(|t| t / 1000)
                .unwrap_or_else(crate::event::now_secs);
            self.clock.store(event_secs, Ordering::Relaxed);
            let mut tasks: VecDeque<Input> = VecDeque::new();
            for o in self
                .step(Stage::Route, Arc::new(rec.clone()), &mut summary)
                .await?
            {
                self.sort(
                    o,
                    &mut tasks,
                    &mut Vec::new(),
                    &mut after,
                    &mut actions,
                    rec,
                )?;
            }
            while let Some(task) = tasks.pop_front() {
                summary.tasks += 1;
                let mut proposals = Vec::new();
                for o in self
                    .step(Stage::Agents, Arc::new(task), &mut summary)
                    .await?
                {
                    self.sort(o, &mut tasks, &mut proposals, &mut after, &mut actions, rec)?;
                }
                for p in proposals {
                    summary.proposals += 1;
                    // Decided when the live pipeline decided it (else at the event's time).
                    let id = codec::decode(p.view(), &self.loaded.schemas)
                        .ok()
                        .and_then(|ev| ev.data)
                        .and_then(|d| d["proposal_id"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    let at = self
                        .recording
                        .decisions
                        .get(&id)
                        .map_or(event_secs, |(_, at)| *at);
                    self.clock.store(at, Ordering::Relaxed);
                    for o in self.step(Stage::Resolve, Arc::new(p), &mut summary).await? {
                        self.sort(
                            o,
                            &mut tasks,
                            &mut Vec::new(),
                            &mut after,
                            &mut actions,
                            rec,
                        )?;
                    }
                }
            }
        }
        let diverged =
            std::mem::take(&mut *self.diverged.lock().unwrap_or_else(|e| e.into_inner()));
        summary.diverged = diverged.len();
        summary.replayed = summary.tasks.saturating_sub(summary.diverged);
        // The diff: replay order, then recorded decisions the replay did not make.
        let mut rows = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for d in &after {
            if !seen.insert(d.about.proposal_id.clone()) {
                continue;
            }
            let before = self
                .recording
                .decisions
                .get(&d.about.proposal_id)
                .map(|(b, _)| b);
            let status = match before {
                None => "new",
                Some(b) if b.differs(d) => "changed",
                Some(_) => "same",
            };
            rows.push(row(status, d, before, Some(d)));
        }
        let mut missing: Vec<&Decision> = self
            .recording
            .decisions
            .values()
            .map(|(d, _)| d)
            .filter(|d| {
                event_ids.contains(&(d.about.tenant.clone(), d.about.event_id.clone()))
                    && !seen.contains(&d.about.proposal_id)
            })
            .collect();
        missing.sort_by(|a, b| a.about.proposal_id.cmp(&b.about.proposal_id));
        for d in missing {
            rows.push(row("missing", d, Some(d), None));
        }
        for r in &rows {
            match r.status {
                "same" => summary.same += 1,
                "changed" => summary.changed += 1,
                "new" => summary.new += 1,
                _ => summary.missing += 1,
            }
        }
        Ok(Report {
            summary,
            decisions: rows,
            diverged,
            actions,
        })
    }

    /// Where a record a stage wrote goes next.
    fn sort(
        &mut self,
        o: Output,
        tasks: &mut VecDeque<Input>,
        proposals: &mut Vec<Input>,
        decisions: &mut Vec<Decision>,
        actions: &mut Vec<Output>,
        from: &Input,
    ) -> Result<(), String> {
        let t = &self.loaded.config.topics;
        if o.topic == t.tasks {
            tasks.push_back(self.input(o, from));
        } else if o.topic == t.proposals {
            proposals.push(self.input(o, from));
        } else if o.topic == t.actions {
            actions.push(o);
        } else if o.topic == t.audit {
            let rec = self.input(o, from);
            let ev: CloudEvent = match codec::decode(rec.view(), &self.loaded.schemas) {
                Ok(ev) => ev,
                Err(_) => return Ok(()),
            };
            if let Some(Ok(a)) = ev.data.map(serde_json::from_value::<AuditData>) {
                if let Some(d) = Decision::of(&a) {
                    decisions.push(d);
                }
            }
        }
        Ok(())
    }

    /// A record the sandbox wrote, as the next stage reads it (its own offsets per topic).
    fn input(&mut self, o: Output, from: &Input) -> Input {
        let offset = self.offsets.entry(o.topic.clone()).or_insert(0);
        *offset += 1;
        let mut rec = Input::new(&o.topic, 0, *offset, o.key.as_deref(), o.payload);
        rec.headers = o.headers;
        rec.timestamp_ms = from.timestamp_ms;
        rec
    }

    /// One record through one stage: its records (a poison record's none: it would be a dead
    /// letter). Transient errors (Redis) are retried a few times.
    async fn step(
        &self,
        stage: Stage,
        rec: Arc<Input>,
        summary: &mut Summary,
    ) -> Result<Vec<Output>, String> {
        let mut last = String::new();
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            let r = match stage {
                Stage::Route => once(&self.route, rec.clone()).await,
                Stage::Agents => once(&self.agents, rec.clone()).await,
                Stage::Resolve => once(&self.resolve, rec.clone()).await,
            };
            match r {
                Ok(out) => return Ok(out),
                Err(ProcessError::Poison { reason, detail }) => {
                    tracing::info!(
                        reason,
                        detail,
                        "Replay: a record the pipeline would dead-letter."
                    );
                    summary.dead_letters += 1;
                    return Ok(Vec::new());
                }
                Err(ProcessError::Transient(m)) => last = m,
                Err(ProcessError::Fatal(m)) => return Err(m),
            }
        }
        Err(format!("the sandbox kept failing: {last}"))
    }

    /// Deletes the scratch keys.
    pub async fn cleanup(&self) -> Result<usize, String> {
        use crate::store::Conn;
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let err = |e: redis::RedisError| e.to_string();
        let mut conn = self.redis.get().await.map_err(|e| e.to_string())?;
        let escaped: String = self
            .prefix
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let pattern = format!("{escaped}:*");
        // On a cluster every primary is scanned (a cursor belongs to one node).
        let nodes: Vec<Option<(String, u16)>> = match &mut conn {
            Conn::Single(_) => vec![None],
            Conn::Cluster(c) => {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(c)
                    .await
                    .map_err(err)?;
                text.lines()
                    .filter(|l| {
                        l.split_whitespace()
                            .nth(2)
                            .is_some_and(|f| f.contains("master"))
                    })
                    .filter_map(|l| {
                        let addr = l.split_whitespace().nth(1)?.split('@').next()?;
                        let (host, port) = addr.rsplit_once(':')?;
                        Some(Some((host.to_string(), port.parse().ok()?)))
                    })
                    .collect()
            }
        };
        let mut deleted = 0usize;
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = match (&mut conn, &node) {
                    (Conn::Cluster(c), Some((host, port))) => {
                        let v = c
                            .route_command(
                                scan,
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                }),
                            )
                            .await
                            .map_err(err)?;
                        redis::FromRedisValue::from_redis_value(v).map_err(|e| e.to_string())?
                    }
                    _ => scan.query_async(&mut conn).await.map_err(err)?,
                };
                if !keys.is_empty() {
                    deleted += keys.len();
                    // One UNLINK per key: on a cluster the keys are in many slots.
                    let mut p = redis::pipe();
                    for k in &keys {
                        p.cmd("UNLINK").arg(k).ignore();
                    }
                    p.query_async::<()>(&mut conn).await.map_err(err)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }
}

/// [`crate::agents::answer_digest`] of an agent of `cfg`, as the agent stage applies it.
fn digest_of(name: &str, spec: &crate::agents::AgentSpec, cfg: &crate::config::Config) -> String {
    let spec = crate::stages::agents::effective_spec(name, spec);
    crate::agents::answer_digest(&spec, &cfg.gateway, &cfg.tools)
}

/// `best_of` picks the agent that answered the task when it was recorded (the live scoreboard is
/// gone); delegations are checked as live.
struct RecordedChoice {
    recording: Arc<Recording>,
    stage: crate::stages::services::StageChooser,
}

impl crate::workflow::Chooser for RecordedChoice {
    fn pick(&self, select: &crate::route::Select, task_id: &str) -> String {
        match self.recording.answers.get(task_id) {
            Some(r) if select.best_of.contains(&r.agent) => r.agent.clone(),
            _ => self.stage.pick(select, task_id),
        }
    }

    fn may_delegate(
        &self,
        supervisor: &str,
        agent: &str,
        run: &crate::workflow::RunState,
    ) -> Result<(), String> {
        self.stage.may_delegate(supervisor, agent, run)
    }
}

#[derive(Clone, Copy)]
enum Stage {
    Route,
    Agents,
    Resolve,
}

/// A record through a processor; its records (the batch's seal included), its memos cleaned up
/// as after a commit.
async fn once<P: Processor>(p: &P, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
    let (out, cleanup) = crate::kafka::runtime::process_one_done(p, rec).await?;
    p.cleanup(cleanup).await;
    Ok(out)
}

fn row(
    status: &'static str,
    d: &Decision,
    before: Option<&Decision>,
    after: Option<&Decision>,
) -> Row {
    Row {
        status,
        about: d.about.clone(),
        before: before.map(|b| b.decided.clone()),
        after: after.map(|a| a.decided.clone()),
    }
}
