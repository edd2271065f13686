//! Kafka agents: external services in any language on their own topics.
//!
//! Request (to `request_topic`, keyed by resource id): a structured JSON CloudEvent of type
//! `switchyard.agent.request`, id = correlation id, with `data` = the [`super::model::AgentRequest`] JSON plus
//! `correlation_id` and `reply_topic`. Reply (to `reply_topic`): a CloudEvent of type
//! `switchyard.agent.reply` whose `data` is `{"correlation_id": ..., "findings": [...], "proposals":
//! [...]}` or `{"correlation_id": ..., "error": "...", "retryable": bool}`.
//!
//! Every switchyard process reads all partitions of the reply topic (no consumer group) and keeps the
//! replies it is waiting for; others are ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use super::model::{Agent, AgentError, AgentRequest, BuildDeps};
use crate::codec::{self, RecordView, CONTENT_TYPE_HEADER};
use crate::event::CloudEvent;
use crate::kafka::{consumer_config, Input, Output, Producer};
use crate::records::AgentResponse;

/// Settings of `kind: kafka`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The topic requests are written to.
    pub request_topic: String,
    /// The topic replies arrive on.
    pub reply_topic: String,
}

impl Spec {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.request_topic.trim().is_empty() {
            p.push("request_topic must name a topic".into());
        }
        if self.reply_topic.trim().is_empty() {
            p.push("reply_topic must name a topic".into());
        }
        if !p.is_empty() {
            return p;
        }
        if self.request_topic == self.reply_topic {
            p.push("request_topic and reply_topic must differ".into());
        }
        p
    }

    /// Starts the reply reader (blocking on metadata, so on a blocking thread).
    pub async fn build(&self, deps: &BuildDeps) -> Result<Arc<dyn Agent>, String> {
        let consumer = consumer_config(&deps.kafka, "unused");
        let (p, s) = (deps.producer.clone(), deps.stop.clone());
        let (req, reply) = (self.request_topic.clone(), self.reply_topic.clone());
        let agent =
            tokio::task::spawn_blocking(move || KafkaAgent::start(&consumer, p, &req, &reply, s))
                .await
                .map_err(|e| e.to_string())??;
        Ok(Arc::new(agent))
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<AgentResponse, AgentError>>>>>;

pub struct KafkaAgent {
    producer: Producer,
    request_topic: String,
    reply_topic: String,
    pending: Pending,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the pending entry when the call ends for any reason (timeout drops the future).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

impl KafkaAgent {
    /// Starts the reply reader (positioned at the end of every reply partition before returning, so no
    /// reply to a later request can be missed).
    pub fn start(
        consumer_cfg: &ClientConfig,
        producer: Producer,
        request_topic: &str,
        reply_topic: &str,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let mut cfg = consumer_cfg.clone();
        cfg.set(
            "group.id",
            format!("switchyard-replies-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        // No statistics: nothing reads them here, and the default context logs each at INFO.
        .set("statistics.interval.ms", "0");
        let consumer: BaseConsumer = cfg
            .create()
            .map_err(|e| format!("cannot create reply consumer: {e}"))?;
        let md = consumer
            .fetch_metadata(Some(reply_topic), Duration::from_secs(10))
            .map_err(|e| format!("cannot read metadata of {reply_topic}: {e}"))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == reply_topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            return Err(format!("reply topic {reply_topic} does not exist"));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition_offset(reply_topic, *p, Offset::End)
                .map_err(|e| e.to_string())?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| format!("cannot assign {reply_topic}: {e}"))?;
        // Wait until "end" is resolved to real offsets.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let _ = consumer.poll(Duration::from_millis(50));
            let resolved = consumer
                .position()
                .map(|p| {
                    p.elements()
                        .iter()
                        .all(|e| matches!(e.offset(), Offset::Offset(_)))
                })
                .unwrap_or(false);
            if resolved {
                break;
            }
        }
        let pending: Pending = Default::default();
        let thread_pending = pending.clone();
        let topic: Arc<str> = Arc::from(reply_topic);
        std::thread::Builder::new()
            .name(format!("replies-{reply_topic}"))
            .spawn(move || {
                while !stop.is_cancelled() {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            let rec = Input::from_message(&m, topic.clone());
                            if let Some((id, result)) = parse_reply(rec.view()) {
                                if let Some(tx) = lock(&thread_pending).remove(&id) {
                                    let _ = tx.send(result);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(topic = %topic, error = %e, "Reply consumer error.")
                        }
                        None => {}
                    }
                }
            })
            .map_err(|e| format!("cannot start reply thread: {e}"))?;
        Ok(KafkaAgent {
            producer,
            request_topic: request_topic.to_string(),
            reply_topic: reply_topic.to_string(),
            pending,
        })
    }
}

/// Reads a reply record: (correlation id, result); `None` for a record that is no reply. Pure, so
/// it is fuzzed (`fuzz/`).
pub fn parse_reply(rec: RecordView<'_>) -> Option<(String, Result<AgentResponse, AgentError>)> {
    let ev = codec::decode(rec, &Default::default()).ok()?;
    let data = ev.data?;
    let id = data.get("correlation_id")?.as_str()?.to_string();
    if let Some(err) = data.get("error").and_then(Value::as_str) {
        let retryable = data
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let e = if retryable {
            AgentError::Retryable(err.to_string())
        } else {
            AgentError::Permanent(err.to_string())
        };
        return Some((id, Err(e)));
    }
    let mut body = data;
    if let Some(o) = body.as_object_mut() {
        o.remove("correlation_id");
    }
    let parsed = serde_json::from_value::<AgentResponse>(body)
        .map_err(|e| AgentError::Permanent(format!("reply is not an agent response: {e}")));
    Some((id, parsed))
}

impl Agent for KafkaAgent {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        Box::pin(async move {
            let id = format!("{}/{}", req.task.task_id, req.attempt);
            let (tx, rx) = oneshot::channel();
            lock(&self.pending).insert(id.clone(), tx);
            let _guard = PendingGuard {
                pending: &self.pending,
                id: id.clone(),
            };
            let mut data = req.to_json();
            if let Some(o) = data.as_object_mut() {
                o.insert("correlation_id".into(), json!(id));
                o.insert("reply_topic".into(), json!(self.reply_topic));
            }
            let mut ev =
                CloudEvent::new(id.clone(), "switchyard/agents", "switchyard.agent.request")
                    .with_subject(req.task.resource.clone())
                    .with_time_now()
                    .with_data(data)
                    .with_extension("tenant", req.task.tenant.clone());
            if let Some(tp) = &req.traceparent {
                ev = ev.with_extension("traceparent", tp.clone());
            }
            let payload =
                serde_json::to_vec(&ev).map_err(|e| AgentError::Permanent(e.to_string()))?;
            let mut out = Output::new(&self.request_topic, req.task.resource.as_bytes(), payload)
                .header(CONTENT_TYPE_HEADER, codec::STRUCTURED_JSON)
                .header("switchyard.correlation_id", id.as_bytes())
                .header("switchyard.reply_topic", self.reply_topic.as_bytes());
            if let Some(tp) = &req.traceparent {
                out = out.header("traceparent", tp.as_bytes());
            }
            self.producer.send(&out).await.map_err(|e| {
                AgentError::Retryable(format!(
                    "cannot send request to {}: {e}",
                    self.request_topic
                ))
            })?;
            rx.await
                .map_err(|_| AgentError::Retryable("reply reader stopped".into()))?
        })
    }
}
