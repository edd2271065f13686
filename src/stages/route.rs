//! Route stage: input events → one task per matched agent on `switchyard.tasks`, keyed by resource.
//!
//! Undecodable records go to the dead-letter topic; events no route matches are counted and audited.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::json;

use futures::Stream;

use super::batch::{sealed_waves, Decided};
use super::services::{runner, Runner, Services};
use crate::audit::Sealer;
use crate::codec;
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::runtime::{Done, Processor};
use crate::kafka::{Input, Output};
use crate::records::{audit_event, data_value, trace_id, types, AuditData, Emitter, TaskData};
use crate::route::{task_id, workflow_id, RouteMatch, Router};
use crate::spans::{self, Ctx, Span};
use crate::telemetry::METRICS;
use crate::topics::TopicsConfig;
use opentelemetry::trace::SpanKind;

/// The route stage consumes the input topics.
pub fn inputs(t: &TopicsConfig) -> Vec<String> {
    t.inputs.clone()
}

pub fn build(s: &Services) -> BoxFuture<'_, Result<Runner, String>> {
    Box::pin(async move {
        let cfg = s.config();
        let router = Router::new(&cfg.routes).map_err(|p| {
            let lines: Vec<String> = p
                .iter()
                .map(|p| format!("{}: {}", p.route, p.message))
                .collect();
            format!("routes are invalid: {}", lines.join("; "))
        })?;
        Ok(runner(RouteStage {
            router,
            emitter: s.emitter.clone(),
            tasks_topic: cfg.topics.tasks.clone(),
            workflows_topic: cfg.topics.workflows.clone(),
            workflows: cfg.workflows.clone(),
            sealer: s.sealer.clone(),
            choose: s.chooser(),
            graph: Some(s.graph.clone()),
            picks: Some(Arc::new(crate::agents::select::PickStore::new(
                s.redis.clone(),
                &cfg.redis.key_prefix,
            ))),
            max_output_bytes: cfg.kafka.max_output_bytes(),
            topic_limits: s.producer.limits(),
        }))
    })
}

/// Source attribute of records the route stage writes.
pub const SOURCE: &str = "switchyard/route";

pub struct RouteStage {
    pub router: Router,
    pub emitter: Emitter,
    pub tasks_topic: String,
    pub workflows_topic: String,
    /// The workflows routes can start.
    pub workflows: std::collections::BTreeMap<String, crate::workflow::WorkflowSpec>,
    /// Seals the routing decision into the resource's audit chain.
    pub sealer: Arc<Sealer>,
    /// Picks the agent of a `best_of` group.
    pub choose: Arc<dyn crate::workflow::Chooser>,
    /// Records the relations events teach; none in unit tests.
    pub graph: Option<Arc<crate::context::graph::Graph>>,
    /// Keeps each `best_of` task's first pick, so a redelivered event picks the same agent; none
    /// in replays (they pick what was recorded) and unit tests.
    pub picks: Option<Arc<crate::agents::select::PickStore>>,
    /// The largest record the producer writes, and each topic's limit: an event whose task or
    /// workflow record would be larger is dead-lettered with nothing routed.
    pub max_output_bytes: usize,
    pub topic_limits: crate::kafka::TopicLimits,
}

impl RouteStage {
    /// The records one decoded event causes: its tasks, and its (unsealed) audit record.
    /// `time` stamps every record (the input's time, so a redelivery yields identical records).
    pub fn outputs_for(
        &self,
        topic: &str,
        ev: &CloudEvent,
        time: &str,
    ) -> Result<(Vec<Output>, CloudEvent), ProcessError> {
        self.outputs_with(topic, ev, time, self.choose.as_ref())
    }

    /// [`Self::outputs_for`], with `best_of` picks first pinned in Redis ([`crate::agents::select::PickStore`]):
    /// a redelivered event picks what its first delivery picked. Also the keys to forget once the
    /// input is committed.
    async fn pinned_outputs_for(
        &self,
        topic: &str,
        ev: &CloudEvent,
        time: &str,
    ) -> Result<(Vec<Output>, CloudEvent, Vec<String>), ProcessError> {
        use crate::agents::select::Pinning;
        let Some(store) = &self.picks else {
            let (out, audit) = self.outputs_for(topic, ev, time)?;
            return Ok((out, audit, Vec::new()));
        };
        let live = Pinning::new(self.choose.as_ref(), Default::default());
        let (out, audit) = self.outputs_with(topic, ev, time, &live)?;
        let made = live.made();
        if made.is_empty() {
            return Ok((out, audit, Vec::new()));
        }
        let kept = store
            .pin(&made)
            .await
            .map_err(|e| ProcessError::from(e).context("best_of picks"))?;
        let forget = made.iter().map(|(task, _)| store.key(task)).collect();
        if made
            .iter()
            .all(|(task, agent)| kept.get(task) == Some(agent))
        {
            return Ok((out, audit, forget));
        }
        // An earlier delivery picked otherwise: its picks again (the metrics count this event
        // twice, as they count any redelivery).
        let (out, audit) =
            self.outputs_with(topic, ev, time, &Pinning::new(self.choose.as_ref(), kept))?;
        Ok((out, audit, forget))
    }

    fn outputs_with(
        &self,
        topic: &str,
        ev: &CloudEvent,
        time: &str,
        choose: &dyn crate::workflow::Chooser,
    ) -> Result<(Vec<Output>, CloudEvent), ProcessError> {
        let matches = self.router.route(topic, ev);
        let resource = ev.subject.clone().unwrap_or_default();
        let wf = workflow_id(ev);
        let mut out = Vec::with_capacity(matches.len() + 1);
        let mut task_ids = Vec::with_capacity(matches.len());
        let mut picks = Vec::new();
        // Each agent runs once per event: a group draws only among candidates no route names
        // directly and no earlier group drew (else one agent ran twice, under two task ids: two
        // model calls and two sets of proposals); a group with none left has no task.
        let mut taken: std::collections::HashSet<String> = matches
            .iter()
            .filter(|m| m.select.is_none())
            .map(|m| m.agent.clone())
            .collect();
        for m in &matches {
            // A `best_of` group's task id comes from the group, so a redelivered event gets the
            // same id (and runs once) whichever candidate it draws.
            let id = task_id(ev, &m.agent);
            let picked;
            let m = match &m.select {
                Some(sel) => {
                    let free: Vec<String> = sel
                        .best_of
                        .iter()
                        .filter(|a| !taken.contains(*a))
                        .cloned()
                        .collect();
                    if free.is_empty() {
                        picks.push(json!({"group": m.agent, "agent": null, "task": null,
                                          "skipped": "every candidate runs already"}));
                        continue;
                    }
                    let agent = if free.len() == sel.best_of.len() {
                        choose.pick(sel, &id)
                    } else {
                        let narrowed = crate::route::Select {
                            best_of: free,
                            ..sel.clone()
                        };
                        choose.pick(&narrowed, &id)
                    };
                    picked = RouteMatch {
                        agent,
                        select: None,
                        ..m.clone()
                    };
                    picks.push(json!({"group": m.agent, "agent": picked.agent, "task": id}));
                    &picked
                }
                None => m,
            };
            taken.insert(m.agent.clone());
            let task = self.task_event(ev, m, &resource, &wf, time, id, None)?;
            task_ids.push(task.id.clone());
            out.push(self.emitter.emit(&self.tasks_topic, &task)?);
            METRICS
                .tasks_emitted
                .with_label_values(&[&m.route, &m.agent])
                .inc();
        }
        let mut runs = Vec::new();
        for (name, route, priority) in self.router.workflows(topic, ev) {
            let Some(spec) = self.workflows.get(&name) else {
                continue;
            };
            let run_id = crate::workflow::run_id(&wf, &name);
            let run = crate::workflow::RunState {
                run_id: run_id.clone(),
                workflow: name.clone(),
                resource: resource.clone(),
                tenant: ev.tenant().to_string(),
                event_id: ev.id.clone(),
                started_at: time.to_string(),
                ..Default::default()
            };
            let (starts, records) = crate::workflow::start(spec, &run_id, time, choose);
            for st in &starts {
                let m = RouteMatch {
                    agent: st.agent.clone(),
                    route: route.clone(),
                    priority,
                    select: None,
                };
                let step = crate::records::StepRef {
                    run_id: run_id.clone(),
                    workflow: name.clone(),
                    step: st.step.clone(),
                    attempt: st.attempt,
                    hold: st.hold,
                    inputs: st.inputs.clone(),
                    run_started_at: time.to_string(),
                    round: st.round,
                    delegates: st.delegates.clone(),
                };
                let task =
                    self.task_event(ev, &m, &resource, &wf, time, st.task_id.clone(), Some(step))?;
                task_ids.push(task.id.clone());
                out.push(
                    self.emitter
                        .emit(&self.tasks_topic, &task)?
                        .header(crate::workflow::STEP_HEADER, st.step.clone()),
                );
                METRICS
                    .tasks_emitted
                    .with_label_values(&[&route, &st.agent])
                    .inc();
            }
            for r in &records {
                let ev = crate::workflow::lifecycle_event(&run, r);
                out.push(self.emitter.emit(&self.workflows_topic, &ev)?);
            }
            METRICS
                .workflow_runs
                .with_label_values(&[&name, "started"])
                .inc();
            runs.push(run_id);
        }
        let (decision, reason, detail) = if matches.is_empty() && runs.is_empty() {
            (
                "unrouted",
                Some("no route matches".to_string()),
                json!({"topic": topic, "type": ev.ty}),
            )
        } else {
            let routes: Vec<&str> = matches.iter().map(|m| m.route.as_str()).collect();
            let mut detail =
                json!({"topic": topic, "type": ev.ty, "tasks": task_ids, "routes": routes});
            if !runs.is_empty() {
                detail["workflow_runs"] = json!(runs);
            }
            if !picks.is_empty() {
                detail["best_of"] = json!(picks);
            }
            ("routed", None, detail)
        };
        METRICS
            .events_routed
            .with_label_values(&[topic, decision])
            .inc();
        let audit = AuditData {
            decision: decision.into(),
            stage: "route".into(),
            resource: resource.clone(),
            tenant: ev.tenant().to_string(),
            event_id: Some(ev.id.clone()),
            task_id: None,
            workflow_id: Some(wf.clone()),
            trace_id: trace_id(ev.traceparent()),
            reason,
            detail,
            seq: None,
            prev_hash: None,
            hash: None,
        };
        let audit_ev = audit_event(
            SOURCE,
            &[decision, &ev.source, &ev.id, &wf],
            &audit,
            ev.traceparent(),
            time,
        )?;
        Ok((out, audit_ev))
    }

    /// A task record: for an agent the route names (`step` none, id from the event and agent), or
    /// for a workflow's first step (`step` set, id from the run and step).
    #[allow(clippy::too_many_arguments)]
    fn task_event(
        &self,
        ev: &CloudEvent,
        m: &RouteMatch,
        resource: &str,
        wf: &str,
        time: &str,
        id: String,
        step: Option<crate::records::StepRef>,
    ) -> Result<CloudEvent, ProcessError> {
        let data = TaskData {
            task_id: id.clone(),
            workflow_id: wf.to_string(),
            agent: m.agent.clone(),
            route: m.route.clone(),
            priority: m.priority,
            resource: resource.to_string(),
            tenant: ev.tenant().to_string(),
            event: data_value(ev)?,
            step,
        };
        let mut task = CloudEvent::new(id, SOURCE, types::TASK)
            .with_subject(resource)
            .with_time(time)
            .with_typed_data(&data)?
            .with_extension("tenant", ev.tenant());
        if let Some(tp) = ev.traceparent() {
            task = task.with_extension("traceparent", tp);
        }
        Ok(task)
    }
}

/// The routing span of an input record (kind `route`, id from the record's position, so a
/// redelivery names the same span), parented on the event's `traceparent` (the extension, else a
/// `traceparent` header) or, while exporting, the root of a trace of its own; the event returned
/// carries the span's `traceparent`, which its tasks and audit record inherit.
fn route_span(rec: &Input, mut ev: CloudEvent) -> (CloudEvent, Span) {
    let header = || {
        rec.headers
            .iter()
            .find(|(k, _)| k == "traceparent")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let given = ev
        .traceparent()
        .or_else(header)
        .filter(|t| Ctx::parse(t).is_some())
        .map(str::to_string);
    let seed = format!("{}/{}/{}", rec.topic, rec.partition, rec.offset);
    let parent = given.as_deref().and_then(Ctx::parse);
    let ctx = match parent {
        Some(p) => Some(p.child("route", &seed)),
        None if spans::enabled() => {
            Some(Ctx::root(&format!("{}/{}", ev.source, ev.id)).child("route", &seed))
        }
        None => None,
    };
    let mut span = Span::with(format!("route {}", ev.ty), ctx, parent).kind(SpanKind::Consumer);
    span.attr("messaging.system", "kafka")
        .attr("messaging.operation.type", "process")
        .attr("messaging.destination.name", rec.topic.to_string())
        .attr("messaging.kafka.offset", rec.offset)
        .attr("switchyard.event.id", ev.id.clone())
        .attr("switchyard.event.type", ev.ty.clone())
        .attr("switchyard.tenant", ev.tenant().to_string());
    match span.traceparent() {
        Some(tp) => ev = ev.with_extension("traceparent", tp),
        // Not a valid trace context: not passed on.
        None => {
            ev.extensions.remove("traceparent");
        }
    }
    (ev, span)
}

/// When the input entered Kafka (its record timestamp), else the event's own time, else now: the
/// routing decision's time.
fn input_time(rec: &Input, ev: &CloudEvent) -> String {
    rec.timestamp_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .or_else(|| ev.time.clone())
        .unwrap_or_else(crate::event::now_rfc3339)
}

impl Processor for RouteStage {
    fn stage(&self) -> &'static str {
        "route"
    }

    /// One lane per record key: records with the same key (the resource id, as producers usually
    /// key them) are routed in order, as Kafka orders them; different keys run concurrently, so a
    /// partition is not held up by one record's audit round trip. Records without a key keep
    /// partition order.
    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    /// A batch's routing decisions are sealed into the partition's audit chain together.
    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_ {
        sealed_waves(
            "route",
            &self.sealer,
            &self.emitter,
            recs,
            move |rec| async move { self.decide(&rec).await },
        )
    }

    /// Committed events' `best_of` picks are forgotten.
    async fn cleanup(&self, keys: Vec<String>) {
        if let Some(store) = &self.picks {
            store.forget(&keys).await;
        }
    }
}

impl RouteStage {
    /// The tasks and the (unsealed) audit record of one input record; first, the relations the
    /// event teaches (`context.relations.learn`) are recorded, so its tasks see them.
    async fn decide(&self, rec: &Input) -> Result<Decided, ProcessError> {
        let ev = codec::decode(rec.view(), &self.emitter.schemas)?;
        codec::validate_input(&ev)?;
        let (ev, mut span) = route_span(rec, ev);
        let time = input_time(rec, &ev);
        if let Some(g) = self.graph.as_ref().filter(|g| !g.config().learn.is_empty()) {
            let at = chrono::DateTime::parse_from_rfc3339(&time)
                .map(|t| t.timestamp())
                .unwrap_or_else(|_| crate::event::now_secs());
            g.learn(&ev, at)
                .await
                .map_err(|e| ProcessError::from(e).context("relations"))?;
        }
        let (outputs, audit, forget) = self.pinned_outputs_for(&rec.topic, &ev, &time).await?;
        // Measured before anything is sealed: one record too large to write would be skipped
        // while the audit record said `routed` with its task, and a workflow's `started` records
        // went out for a run whose first step never did.
        // (A record's framing in librdkafka's own measure, which it checks at queueing.)
        const OVERHEAD: usize = 64;
        if let Some((o, limit)) =
            self.topic_limits
                .first_too_large(&outputs, self.max_output_bytes, OVERHEAD)
        {
            return Err(ProcessError::poison(
                "output_too_large",
                format!(
                    "the event's record for {} would be {} bytes, more than the {limit} the producer writes (or its topic takes); nothing was routed",
                    o.topic,
                    crate::kafka::record_size(o),
                ),
            ));
        }
        let decision = if outputs.is_empty() {
            "unrouted"
        } else {
            "routed"
        };
        span.attr("switchyard.decision", decision)
            .attr("switchyard.outputs", outputs.len() as i64);
        span.end();
        Ok(Decided {
            outputs,
            audits: vec![audit],
            cleanup: forget,
        })
    }
}
