//! The commit-safe consumer runtime every stage runs on, batch-shaped.
//!
//! - One OS thread owns the consumer and polls it; rebalance callbacks run there and may block.
//! - Each record goes to a *lane* (the processor picks it, e.g. the resource id): records of one lane
//!   run one at a time in offset order, lanes run concurrently.
//! - One driver task per stage takes the heads of every ready lane together and hands them to
//!   [`Processor::process_batch`] as one batch, so a stage can do its Redis work for the whole batch
//!   in one pipeline or script call. Results come back per record as soon as each is known (a slow
//!   agent does not hold up the rest of its batch), and a record's outputs are queued to the
//!   producer in one burst; the next record of its lane is ready as soon as they are queued.
//! - No task or channel per record: delivery reports arrive on the producer's polling thread and
//!   count down the record's outstanding outputs. When the broker has acknowledged all of them (and
//!   the batch's shared outputs, such as its audit seal), the record is marked done in its
//!   partition's [`AckTracker`], and the poll thread stores the offset below which everything is
//!   done. Auto-commit then commits stored offsets only; once committed, the record's cleanup keys
//!   go to [`Processor::cleanup`].
//! - Flow control: the poll loop stops taking records when `max_in_flight` records are held and
//!   takes them again once half of them are done (hysteresis), so fetching overlaps processing
//!   instead of alternating with it. It does not pause the consumer for that: librdkafka's pause
//!   discards every record it prefetched, fetched again on resume — with a backlog that multiplied
//!   the broker's fetch work (see [`HOLD_BEFORE_PAUSE`]).
//! - On revoke and on shutdown, in-flight records are drained (up to `drain_timeout`) and offsets are
//!   committed synchronously.
//! - Poison records go to the dead-letter topic with reason headers and the partition moves on;
//!   transient failures (Redis down) retry the same record until it succeeds, so nothing is skipped.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::acks::{commit_position, AckTracker};
use super::{dead_letter, is_too_large, Delivered, Input, Notice, Output, Producer};
use crate::error::ProcessError;
use crate::telemetry::METRICS;

/// What processing one record produced.
#[derive(Default)]
pub struct Done {
    /// Records to write, in order.
    pub outputs: Vec<Output>,
    /// Records shared by several records of a batch (its audit seal): each of them is done only
    /// when these are delivered too. The runtime writes them once.
    pub shared: Option<Arc<SharedOutputs>>,
    /// Redis keys that may go once this record's offset is committed (memos that only a
    /// redelivery reads).
    pub cleanup: Vec<String>,
}

impl From<Vec<Output>> for Done {
    fn from(outputs: Vec<Output>) -> Self {
        Done {
            outputs,
            ..Done::default()
        }
    }
}

/// What the writer of some records (a batch's audit seals) tells whoever made them: that they could
/// not be written ([`DeliveryWatch::unsent`], a flag the maker may share among several watches),
/// and that they are settled — delivered, failed or dropped — which [`DeliveryWatch::settle`] or
/// dropping the watch says. The audit sealer uses it to count a chain's undelivered seals (a stage
/// decides only while its chain has room: [`crate::audit::Sealer::wait_for_room`]).
pub struct DeliveryWatch {
    unsent: Arc<AtomicBool>,
    settled: tokio_util::sync::CancellationToken,
}

impl DeliveryWatch {
    pub fn new(unsent: Arc<AtomicBool>) -> Self {
        DeliveryWatch {
            unsent,
            settled: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Cancelled once the records are settled.
    pub fn settled(&self) -> tokio_util::sync::CancellationToken {
        self.settled.clone()
    }

    /// The records were not written (dropped unqueued, or their delivery failed).
    pub fn unsent(&self) {
        self.unsent.store(true, Ordering::Release);
    }

    /// The records' deliveries are over (either way: call [`Self::unsent`] first when they failed).
    pub fn settle(&self) {
        self.settled.cancel();
    }
}

impl Drop for DeliveryWatch {
    fn drop(&mut self) {
        self.settled.cancel();
    }
}

/// Records a batch shares (see [`Done::shared`]).
pub struct SharedOutputs {
    outputs: Mutex<Option<Vec<Output>>>,
    /// Deliveries still outstanding, plus one until the outputs were queued.
    pending: AtomicUsize,
    /// Records waiting for these deliveries.
    waiting: Mutex<Option<Vec<Arc<dyn Delivered>>>>,
    failed: AtomicBool,
    /// The audit sealer's watch of these records (its seals): told when they are dropped without
    /// ever being queued (their batch's work was revoked and given up) or fail (it then no longer
    /// trusts the chain head it wrote), and when their deliveries are over.
    watch: Option<DeliveryWatch>,
}

impl Drop for SharedOutputs {
    fn drop(&mut self) {
        let never_queued = self.outputs.get_mut().map_or(true, |o| o.is_some());
        if let (Some(watch), true) = (&self.watch, never_queued) {
            watch.unsent();
        }
        // Dropping the watch settles it.
    }
}

impl SharedOutputs {
    /// The records, for a caller that writes them itself (tools; once).
    pub fn take(&self) -> Vec<Output> {
        lock(&self.outputs).take().unwrap_or_default()
    }
}

impl SharedOutputs {
    pub fn new(outputs: Vec<Output>) -> Arc<Self> {
        Self::watched(outputs, None)
    }

    /// Like [`Self::new`], for a batch's seals: `watch` is told of their fate.
    pub fn watched(outputs: Vec<Output>, watch: Option<DeliveryWatch>) -> Arc<Self> {
        Arc::new(SharedOutputs {
            pending: AtomicUsize::new(outputs.len() + 1),
            outputs: Mutex::new(Some(outputs)),
            waiting: Mutex::new(Some(Vec::new())),
            failed: AtomicBool::new(false),
            watch,
        })
    }

    /// Makes `who` wait for these deliveries (told at once when they are done already).
    fn attach(&self, who: Arc<dyn Delivered>) {
        let mut w = lock(&self.waiting);
        match w.as_mut() {
            Some(list) => list.push(who),
            None => {
                drop(w);
                who.delivered("", self.result());
            }
        }
    }

    fn result(&self) -> Result<(i32, i64), KafkaError> {
        if self.failed.load(Ordering::Acquire) {
            Err(KafkaError::Canceled)
        } else {
            Ok((0, 0))
        }
    }

    fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(watch) = &self.watch {
                watch.settle();
            }
            let waiting = lock(&self.waiting).take().unwrap_or_default();
            for w in waiting {
                w.delivered("", self.result());
            }
        }
    }
}

impl Delivered for SharedOutputs {
    fn delivered(&self, _topic: &str, result: Result<(i32, i64), KafkaError>) {
        if result.is_err() {
            self.failed.store(true, Ordering::Release);
            // A seal among these records may not be on the topic: its head is no longer trusted.
            if let Some(watch) = &self.watch {
                watch.unsent();
            }
        }
        self.settle();
    }
}

/// A stage's logic. The runtime owns delivery guarantees; the processor only maps records to
/// outputs.
pub trait Processor: Send + Sync + 'static {
    /// Stage name for metrics, logs and dead-letter headers.
    fn stage(&self) -> &'static str;

    /// Records with the same lane are processed one at a time in offset order. The default (one lane
    /// per partition) keeps strict partition order.
    fn lane(&self, _rec: &Input) -> u64 {
        0
    }

    /// Processes lane heads together (at most one record per lane), yielding `(index in recs,
    /// result)` for each as soon as it is known, in any order, so a stage can share its I/O across
    /// the batch. Called again for a record after a [`ProcessError::Transient`] error or a
    /// redelivery, so effects must be idempotent. [`each`] serves stages that need nothing shared.
    fn process_batch(
        &self,
        recs: Vec<Arc<Input>>,
    ) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + '_;

    /// Keys of committed records' [`Done::cleanup`], to delete (best effort: they expire anyway).
    fn cleanup(&self, _keys: Vec<String>) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A batch processed record by record, concurrently: for stages that share nothing across it.
pub fn each<'a, F, Fut>(
    recs: Vec<Arc<Input>>,
    process: F,
) -> impl Stream<Item = (usize, Result<Done, ProcessError>)> + Send + 'a
where
    F: Fn(Arc<Input>) -> Fut,
    Fut: Future<Output = Result<Vec<Output>, ProcessError>> + Send + 'a,
{
    recs.into_iter()
        .enumerate()
        .map(|(i, r)| process(r).map(move |r| (i, r.map(Done::from))))
        .collect::<FuturesUnordered<_>>()
}

/// One record through a processor, outside the runtime (tests, tools): its outputs, the batch's
/// shared outputs (its audit seal) included.
pub async fn process_one<P: Processor>(
    p: &P,
    rec: Arc<Input>,
) -> Result<Vec<Output>, ProcessError> {
    Ok(process_one_done(p, rec).await?.0)
}

/// [`process_one`], with the keys its [`Processor::cleanup`] may delete once it is committed.
pub async fn process_one_done<P: Processor>(
    p: &P,
    rec: Arc<Input>,
) -> Result<(Vec<Output>, Vec<String>), ProcessError> {
    let mut results = std::pin::pin!(p.process_batch(vec![rec]));
    let (_, done) = results
        .next()
        .await
        .ok_or_else(|| ProcessError::Fatal("the processor answered nothing".into()))?;
    let done = done?;
    let mut out = done.outputs;
    if let Some(so) = done.shared {
        out.extend(so.take());
    }
    Ok((out, done.cleanup))
}

/// What a stage needs besides its processor.
#[derive(Clone)]
pub struct StageSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    pub consumer: ClientConfig,
    /// For asking the broker for topic ids ([`super::topic_id`]) on a client of its own.
    pub admin: ClientConfig,
    pub max_in_flight: usize,
    /// The most lane heads handed to the processor in one batch.
    pub max_batch: usize,
    pub max_record_bytes: usize,
    pub drain_timeout: Duration,
    pub dlq_topic: String,
}

/// Errors further apart than this are separate incidents, not one stall.
pub const ERROR_GAP_MS: i64 = 15_000;

/// Live state of a stage, read by the health endpoint.
#[derive(Debug, Default)]
pub struct StageHealth {
    pub assigned: AtomicUsize,
    /// The consumer joined its group (got an assignment, possibly empty: with more members than
    /// partitions a member stands by, ready to take over).
    pub joined: AtomicBool,
    pub running: AtomicBool,
    /// When a record was last read or finished (ms since the epoch).
    pub last_progress_ms: AtomicI64,
    /// When the consumer last reported an error (ms since the epoch).
    pub last_error_ms: AtomicI64,
    /// When the current run of errors began (errors less than [`ERROR_GAP_MS`] apart, no record read
    /// in between); 0 when there is none.
    pub error_streak_ms: AtomicI64,
    /// Records between poll and done.
    pub in_flight: AtomicUsize,
}

impl StageHealth {
    fn now_ms() -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    /// A record was read or finished.
    pub fn progress(&self) {
        self.last_progress_ms
            .store(Self::now_ms(), Ordering::Relaxed);
        self.error_streak_ms.store(0, Ordering::Relaxed);
    }

    /// The consumer reported an error.
    pub fn error(&self) {
        let now = Self::now_ms();
        let last = self.last_error_ms.swap(now, Ordering::Relaxed);
        if now - last > ERROR_GAP_MS || self.error_streak_ms.load(Ordering::Relaxed) == 0 {
            self.error_streak_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Why the stage is stuck, if it is: consumer errors for a while and nothing read (e.g. a record
    /// larger than the consumer can fetch), or records in flight and none finished for a while.
    /// `now_ms` is the current time; `stall_ms` how long counts as a while.
    pub fn stuck(&self, now_ms: i64, stall_ms: i64) -> Option<String> {
        let progress = self.last_progress_ms.load(Ordering::Relaxed);
        let error = self.last_error_ms.load(Ordering::Relaxed);
        let streak = self.error_streak_ms.load(Ordering::Relaxed);
        let quiet = now_ms - progress;
        if streak > 0 && now_ms - error < ERROR_GAP_MS && now_ms - streak > stall_ms {
            return Some(format!(
                "consumer errors and no record read for {} s",
                (now_ms - streak) / 1000
            ));
        }
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        if in_flight > 0 && progress > 0 && quiet > stall_ms * 2 {
            return Some(format!(
                "{in_flight} records in flight and none finished for {} s",
                quiet / 1000
            ));
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create consumer: {0}")]
    Create(KafkaError),
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("stage {stage} stopped: {message}")]
    Fatal {
        stage: &'static str,
        message: String,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (every critical section is a few field
    // updates), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A record between poll and done.
struct Work {
    rec: Arc<Input>,
    polled_at: Instant,
    /// Transient failures so far (backoff doubles with each).
    attempts: u32,
}

#[derive(Default)]
struct PartState {
    acks: AckTracker,
    /// Lanes with a record taken or ready; the queue holds the records behind it (the head first
    /// while it waits in the ready queue).
    lanes: HashMap<u64, VecDeque<Work>>,
    /// Last offset stored for commit.
    stored: Option<i64>,
    /// Cleanup keys of done records, by offset, until their offset is committed.
    cleanup: VecDeque<(i64, Vec<String>)>,
}

struct Part {
    topic: Arc<str>,
    partition: i32,
    state: Mutex<PartState>,
    revoked: AtomicBool,
    /// Records taken by the driver and not yet done or abandoned.
    active: AtomicUsize,
    idle: Notify,
    /// Cancelled when a revoke's drain timed out: work still running must not produce (the next
    /// owner has the records).
    cancel: CancellationToken,
    /// The last offset up to which every record is done, -1 before one is: handed to the
    /// processor with each record ([`Input::delivered`]).
    delivered: Arc<AtomicI64>,
    /// The topic's id when it was assigned ([`super::topic_id`]), handed to the processor with
    /// each record ([`Input::topic_id`]).
    topic_id: Option<Arc<str>>,
}

impl Part {
    fn new(topic: Arc<str>, partition: i32, topic_id: Option<&String>) -> Part {
        Part {
            topic,
            partition,
            state: Mutex::new(PartState::default()),
            revoked: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            cancel: CancellationToken::new(),
            delivered: Arc::new(AtomicI64::new(-1)),
            topic_id: topic_id.map(|id| Arc::from(id.as_str())),
        }
    }

    fn finish_active(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Assigned partitions by (topic, partition).
type PartMap = HashMap<(Arc<str>, i32), Arc<Part>>;

struct Shared<P: Processor> {
    processor: Arc<P>,
    producer: Producer,
    settings: StageSettings,
    parts: Mutex<PartMap>,
    /// Lanes whose head waits to be processed.
    ready: Mutex<VecDeque<(Arc<Part>, u64)>>,
    /// Wakes the driver when `ready` got work.
    wake: Notify,
    handle: tokio::runtime::Handle,
    /// Set when the stage must stop because of a fatal error.
    fatal: CancellationToken,
    fatal_message: Mutex<Option<String>>,
    health: Arc<StageHealth>,
    in_flight: AtomicUsize,
}

impl<P: Processor> Shared<P> {
    fn stage(&self) -> &'static str {
        self.processor.stage()
    }

    fn set_fatal(&self, message: String) {
        tracing::error!(stage = self.stage(), error = %message, "Stage is stopping after a fatal error.");
        lock(&self.fatal_message).get_or_insert(message);
        self.fatal.cancel();
    }

    fn part(&self, topic: &str, partition: i32) -> Option<Arc<Part>> {
        lock(&self.parts)
            .iter()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .map(|(_, v)| v.clone())
    }

    fn make_ready(&self, part: Arc<Part>, lane: u64) {
        lock(&self.ready).push_back((part, lane));
        self.wake.notify_one();
    }

    /// Lanes whose head is ready (revoked ones included until taken).
    fn ready_len(&self) -> usize {
        lock(&self.ready).len()
    }

    /// Takes the heads of up to `max` ready lanes.
    fn take_ready(&self, max: usize) -> Vec<(Arc<Part>, u64, Work)> {
        let mut out = Vec::new();
        let mut ready = lock(&self.ready);
        while out.len() < max {
            let Some((part, lane)) = ready.pop_front() else {
                break;
            };
            // Under the part's lock, which the drain takes to mark it revoked: a head taken here
            // is counted active before the drain looks (it waits for it), or not taken at all.
            let work = {
                let mut st = lock(&part.state);
                if part.revoked.load(Ordering::Acquire) {
                    None
                } else {
                    let w = st.lanes.get_mut(&lane).and_then(VecDeque::pop_front);
                    if w.is_some() {
                        part.active.fetch_add(1, Ordering::AcqRel);
                    }
                    w
                }
            };
            if let Some(w) = work {
                out.push((part, lane, w));
            }
        }
        out
    }

    /// The lane's record was handled (its outputs are queued, or it was given up): its next record
    /// is ready, or the lane goes.
    fn advance(&self, part: &Arc<Part>, lane: u64) {
        let next = {
            let mut st = lock(&part.state);
            match st.lanes.get(&lane).map(VecDeque::is_empty) {
                Some(false) => true,
                Some(true) => {
                    st.lanes.remove(&lane);
                    false
                }
                None => false,
            }
        };
        if next {
            self.make_ready(part.clone(), lane);
        }
    }

    /// The record leaves the in-flight set (done, or given up to be redelivered).
    fn release(&self, part: &Part) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        METRICS.in_flight.with_label_values(&[self.stage()]).dec();
        part.finish_active();
    }
}

/// A record whose outputs are being delivered: counted down by delivery reports.
struct Track<P: Processor> {
    shared: Arc<Shared<P>>,
    part: Arc<Part>,
    offset: i64,
    polled_at: Instant,
    timestamp_ms: Option<i64>,
    cleanup: Mutex<Vec<String>>,
    /// Outstanding deliveries (own outputs, plus one for shared outputs), plus one until every
    /// output was queued.
    pending: AtomicUsize,
    failed: AtomicBool,
}

impl<P: Processor> Track<P> {
    fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let shared = &self.shared;
        if self.failed.load(Ordering::Acquire) || self.part.cancel.is_cancelled() {
            shared.release(&self.part);
            return;
        }
        let stage = shared.stage();
        {
            let mut st = lock(&self.part.state);
            match st.acks.complete(self.offset) {
                Ok(Some(done)) => self.part.delivered.store(done, Ordering::Release),
                Ok(None) => {}
                Err(e) => tracing::error!(stage, error = %e, "Ack tracker refused a completion."),
            }
            let keys = std::mem::take(&mut *lock(&self.cleanup));
            if !keys.is_empty() {
                st.cleanup.push_back((self.offset, keys));
            }
        }
        shared.health.progress();
        METRICS
            .record_duration
            .with_label_values(&[stage])
            .observe(self.polled_at.elapsed().as_secs_f64());
        if let Some(ts) = self.timestamp_ms {
            let now = chrono::Utc::now().timestamp_millis();
            METRICS
                .end_to_end_latency
                .with_label_values(&[stage])
                .observe(((now - ts).max(0) as f64) / 1000.0);
        }
        shared.release(&self.part);
    }
}

impl<P: Processor> Delivered for Track<P> {
    fn delivered(&self, topic: &str, result: Result<(i32, i64), KafkaError>) {
        let stage = self.shared.stage();
        match result {
            Ok(_) if topic.is_empty() => {}
            Ok(_) => METRICS
                .records_produced
                .with_label_values(&[stage, topic])
                .inc(),
            Err(e) => {
                // librdkafka already retried (idempotently, in order); re-sending only this record
                // would put it behind later ones, so the stage stops without committing past it and
                // a restart redelivers it.
                METRICS.produce_errors.with_label_values(&[stage]).inc();
                if !self.failed.swap(true, Ordering::AcqRel) {
                    let what = if topic.is_empty() {
                        "a batch's shared records".to_string()
                    } else {
                        topic.to_string()
                    };
                    self.shared
                        .set_fatal(format!("delivery to {what} failed: {e}"));
                }
            }
        }
        self.settle();
    }
}

/// Consumer context: turns rebalance callbacks into drain-and-commit, and commits into cleanup.
struct Ctx<P: Processor> {
    shared: Arc<Shared<P>>,
}

impl<P: Processor> ClientContext for Ctx<P> {
    /// Client-level errors (a broker connection failing, a response the client refuses): counted
    /// and remembered for readiness (a stage that only errors is not making progress).
    fn error(&self, error: KafkaError, reason: &str) {
        let stage = self.shared.stage();
        self.shared.health.error();
        METRICS.consumer_errors.with_label_values(&[stage]).inc();
        tracing::warn!(stage, error = %error, reason, "Kafka client error.");
    }

    /// librdkafka statistics (every `statistics.interval.ms`): approximate lag per topic, from the
    /// client's cached high watermarks. Some brokers report wrong watermarks, so lag is clamped at 0.
    fn stats(&self, stats: rdkafka::Statistics) {
        let stage = self.shared.stage();
        for (name, topic) in &stats.topics {
            let lag: i64 = topic
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            METRICS
                .consumer_lag
                .with_label_values(&[stage, name])
                .set(lag.max(0));
        }
    }
}

impl<P: Processor> ConsumerContext for Ctx<P> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let stage = self.shared.stage();
            METRICS
                .rebalances
                .with_label_values(&[stage, "revoke"])
                .inc();
            let revoked: Vec<Arc<Part>> = {
                let mut parts = lock(&self.shared.parts);
                tpl.elements()
                    .iter()
                    .filter_map(|e| {
                        let key = parts
                            .keys()
                            .find(|(t, p)| &**t == e.topic() && *p == e.partition())
                            .cloned()?;
                        parts.remove(&key)
                    })
                    .collect()
            };
            tracing::info!(
                stage,
                partitions = revoked.len(),
                "Partitions revoked; draining in-flight records."
            );
            drain_and_commit(&self.shared, consumer, &revoked);
            let left = lock(&self.shared.parts).len();
            self.shared.health.assigned.store(left, Ordering::Relaxed);
            METRICS
                .assigned_partitions
                .with_label_values(&[stage])
                .set(left as i64);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let stage = self.shared.stage();
        match rebalance {
            Rebalance::Assign(tpl) => {
                METRICS
                    .rebalances
                    .with_label_values(&[stage, "assign"])
                    .inc();
                let elements = tpl.elements();
                let topics: Vec<&str> = elements.iter().map(|e| e.topic()).collect();
                let ids = topic_ids(stage, &self.shared.settings.admin, &topics);
                let mut parts = lock(&self.shared.parts);
                for e in &elements {
                    let key: (Arc<str>, i32) = (Arc::from(e.topic()), e.partition());
                    parts.entry(key.clone()).or_insert_with(|| {
                        Arc::new(Part::new(key.0.clone(), key.1, ids.get(e.topic())))
                    });
                }
                // librdkafka keeps a partition's pause through unassign and assign: one paused
                // before this rebalance would never be fetched again. The poll loop pauses what it
                // owns again while it holds.
                let _ = consumer.resume(tpl);
                let n = consumer
                    .assignment()
                    .map(|a| a.count())
                    .unwrap_or(parts.len());
                self.shared.health.assigned.store(n, Ordering::Relaxed);
                self.shared.health.joined.store(true, Ordering::Relaxed);
                METRICS
                    .assigned_partitions
                    .with_label_values(&[stage])
                    .set(n as i64);
                if n == 0 {
                    tracing::info!(stage, "Joined the group with no partition: standing by (more members than partitions).");
                } else {
                    tracing::info!(stage, partitions = n, "Partitions assigned.");
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(stage, error = %e, "Rebalance error.");
            }
            Rebalance::Revoke(_) => {}
        }
    }

    /// Offsets were committed: the cleanup keys of records below them go.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_err() {
            return;
        }
        let mut keys = Vec::new();
        for e in offsets.elements() {
            let Offset::Offset(committed) = e.offset() else {
                continue;
            };
            let Some(part) = self.shared.part(e.topic(), e.partition()) else {
                continue;
            };
            let mut st = lock(&part.state);
            while st.cleanup.front().is_some_and(|(o, _)| *o < committed) {
                if let Some((_, k)) = st.cleanup.pop_front() {
                    keys.extend(k);
                }
            }
        }
        if !keys.is_empty() {
            let p = self.shared.processor.clone();
            self.shared
                .handle
                .spawn(async move { p.cleanup(keys).await });
        }
    }
}

/// Marks `part` revoked and drops its queued records (not those running).
fn drop_queued<P: Processor>(shared: &Shared<P>, part: &Part) {
    let dropped: usize = {
        let mut st = lock(&part.state);
        part.revoked.store(true, Ordering::Release);
        st.lanes.drain().map(|(_, q)| q.len()).sum()
    };
    if dropped > 0 {
        shared.in_flight.fetch_sub(dropped, Ordering::AcqRel);
        shared
            .health
            .in_flight
            .fetch_sub(dropped, Ordering::Relaxed);
        METRICS
            .in_flight
            .with_label_values(&[shared.stage()])
            .sub(dropped as i64);
        tracing::debug!(topic = %part.topic, partition = part.partition, dropped, "Dropped queued records; the next owner reads them again.");
    }
}

/// Marks partitions revoked, drops their queued (unstarted) records, waits for started ones up to the
/// drain timeout, and commits what is done. Runs on the poll thread.
fn drain_and_commit<P: Processor>(
    shared: &Arc<Shared<P>>,
    consumer: &BaseConsumer<Ctx<P>>,
    parts: &[Arc<Part>],
) {
    for part in parts {
        drop_queued(shared, part);
    }
    let deadline = shared.settings.drain_timeout;
    let drained = shared.handle.block_on(async {
        tokio::time::timeout(deadline, async {
            for p in parts {
                p.wait_idle().await;
            }
        })
        .await
        .is_ok()
    });
    if !drained {
        for p in parts {
            p.cancel.cancel();
        }
        tracing::warn!(
            stage = shared.stage(),
            timeout_ms = deadline.as_millis() as u64,
            "In-flight records did not finish before the drain timeout; they will be redelivered."
        );
    }
    let mut tpl = TopicPartitionList::new();
    let mut positions = Vec::new();
    for p in parts {
        if let Some(done) = lock(&p.state).acks.released() {
            let at = commit_position(done);
            positions.push((p, at));
            if let Err(e) = tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(at)) {
                tracing::warn!(error = %e, "Cannot build commit list.");
            }
        }
    }
    // Stored too: the client's own commit on close (auto-commit of stored offsets) must not move a
    // partition back behind this commit.
    if tpl.count() > 0 {
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "Storing offsets failed (partition likely revoked).");
        }
    }
    if commit_sync(shared.stage(), consumer, &tpl) {
        // The parts left the map before the drain, so the commit callback cannot find them: their
        // committed records' cleanup keys go from here.
        let mut keys = Vec::new();
        for (p, at) in positions {
            let mut st = lock(&p.state);
            while st.cleanup.front().is_some_and(|(o, _)| *o < at) {
                if let Some((_, k)) = st.cleanup.pop_front() {
                    keys.extend(k);
                }
            }
        }
        if !keys.is_empty() {
            let proc = shared.processor.clone();
            shared.handle.spawn(async move { proc.cleanup(keys).await });
        }
    }
}

/// Commits `tpl` synchronously; whether it was committed.
fn commit_sync<C: ConsumerContext>(
    stage: &'static str,
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> bool {
    if tpl.count() == 0 {
        return false;
    }
    match consumer.commit(tpl, CommitMode::Sync) {
        Ok(()) => {
            METRICS.commits.with_label_values(&[stage, "ok"]).inc();
            tracing::info!(stage, partitions = tpl.count(), "Committed offsets.");
            true
        }
        Err(e) => {
            METRICS.commits.with_label_values(&[stage, "error"]).inc();
            tracing::warn!(stage, error = %e, "Synchronous commit failed; records after the last commit will be redelivered.");
            false
        }
    }
}

/// Runs a stage until `shutdown` is cancelled or a fatal error occurs. On return, offsets of every
/// finished record are committed.
pub async fn run_stage<P: Processor>(
    settings: StageSettings,
    processor: Arc<P>,
    producer: Producer,
    shutdown: CancellationToken,
    health: Arc<StageHealth>,
) -> Result<(), RuntimeError> {
    let shared = Arc::new(Shared {
        processor,
        producer,
        settings: settings.clone(),
        parts: Mutex::new(HashMap::new()),
        ready: Mutex::new(VecDeque::new()),
        wake: Notify::new(),
        handle: tokio::runtime::Handle::current(),
        fatal: CancellationToken::new(),
        fatal_message: Mutex::new(None),
        health: health.clone(),
        in_flight: AtomicUsize::new(0),
    });
    let consumer: BaseConsumer<Ctx<P>> = settings
        .consumer
        .create_with_context(Ctx {
            shared: shared.clone(),
        })
        .map_err(RuntimeError::Create)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| RuntimeError::Subscribe {
            topics: settings.topics.clone(),
            source,
        })?;
    health.running.store(true, Ordering::Relaxed);
    let driver = tokio::spawn(drive(shared.clone()));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread_shared = shared.clone();
    let thread_shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("poll-{}", shared.stage()))
        .spawn(move || {
            poll_loop(&thread_shared, &consumer, &thread_shutdown);
            // Dropping the consumer closes it: leaves the group, running the revoke callback.
            drop(consumer);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        driver.abort();
        return Err(RuntimeError::Fatal {
            stage: shared.stage(),
            message: format!("cannot start poll thread: {e}"),
        });
    }
    let ended = done_rx.await;
    // Everything owned is drained and committed (or given up): nothing left for the driver.
    driver.abort();
    health.running.store(false, Ordering::Relaxed);
    let mut fatal = lock(&shared.fatal_message).take();
    if ended.is_err() && fatal.is_none() {
        // The poll thread ended without saying so: it panicked. The stage is dead, and the process
        // must say so (and stop), not carry on without it.
        fatal = Some("the poll thread panicked (see the log above)".into());
    }
    match fatal {
        Some(message) => Err(RuntimeError::Fatal {
            stage: shared.stage(),
            message,
        }),
        None => Ok(()),
    }
}

/// Longest the poll loop stops taking records without pausing the consumer (see [`poll_loop`]).
const HOLD_BEFORE_PAUSE: Duration = Duration::from_secs(3);
/// How often a holding poll loop looks at the in-flight count again.
const HOLD_SLEEP: Duration = Duration::from_millis(5);

fn poll_loop<P: Processor>(
    shared: &Arc<Shared<P>>,
    consumer: &BaseConsumer<Ctx<P>>,
    shutdown: &CancellationToken,
) {
    let stage = shared.stage();
    let max = shared.settings.max_in_flight;
    let resume_below = (max / 2).max(1);
    // Over the limit, the loop first only stops taking records (`held`): librdkafka keeps what it
    // prefetched and its own bounds stop the fetcher. Only a hold longer than HOLD_BEFORE_PAUSE
    // pauses the partitions, which discards the prefetched records (they are fetched again on
    // resume) but lets the loop serve rebalances and commits while processing is stuck.
    let mut held: Option<Instant> = None;
    let mut paused = false;
    // Per partition, the records read past its oldest unfinished one: one lane head that keeps
    // failing (its Redis shard out of reach) holds the partition's commit while its other lanes go
    // on, and everything read behind it stays tracked. Past SPAN_LIMIT the partition is paused
    // until it is back under half of it.
    let span_limit = max.saturating_mul(SPAN_PER_IN_FLIGHT).max(1);
    let mut span_paused: Vec<Arc<Part>> = Vec::new();
    let mut spans_looked = Instant::now();
    tracing::info!(stage, topics = ?shared.settings.topics, group = %shared.settings.group_id, "Stage started.");
    METRICS.init_stage(stage);
    loop {
        if shutdown.is_cancelled() || shared.fatal.is_cancelled() {
            break;
        }
        store_offsets(shared, consumer);
        if spans_looked.elapsed() >= SPAN_LOOK_EVERY {
            spans_looked = Instant::now();
            hold_long_spans(shared, consumer, span_limit, &mut span_paused);
        }
        let in_flight = shared.in_flight.load(Ordering::Acquire);
        if held.is_some() && in_flight < resume_below {
            // A failed resume stays paused and is tried again next round.
            // Partitions paused for their span stay paused.
            let resumed = !paused
                || consumer
                    .assignment()
                    .and_then(|a| {
                        let mut keep = TopicPartitionList::new();
                        for e in a.elements() {
                            if !span_paused
                                .iter()
                                .any(|p| &*p.topic == e.topic() && p.partition == e.partition())
                            {
                                keep.add_partition(e.topic(), e.partition());
                            }
                        }
                        consumer.resume(&keep)
                    })
                    .is_ok();
            if resumed {
                paused = false;
                held = None;
            }
        } else if held.is_none() && in_flight >= max {
            METRICS
                .backpressure_pauses
                .with_label_values(&[stage])
                .inc();
            tracing::debug!(
                stage,
                in_flight,
                "In-flight limit reached; holding consumption."
            );
            held = Some(Instant::now());
        }
        if let Some(since) = held {
            if !paused && since.elapsed() < HOLD_BEFORE_PAUSE {
                // Records stay in librdkafka's queue; rebalances and commit callbacks wait too.
                std::thread::sleep(HOLD_SLEEP);
                continue;
            }
            if !paused {
                METRICS.consumer_pauses.with_label_values(&[stage]).inc();
                tracing::debug!(
                    stage,
                    in_flight,
                    "Held at the in-flight limit for {HOLD_BEFORE_PAUSE:?}; pausing the consumer."
                );
            }
            paused = true;
            // Re-pause every round: a rebalance may have assigned unpaused partitions.
            if let Ok(a) = consumer.assignment() {
                let _ = consumer.pause(&a);
            }
        }
        let timeout = if paused {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(timeout) {
            None => {}
            Some(Ok(msg)) => {
                let Some(part) = shared.part(msg.topic(), msg.partition()) else {
                    // Not (or no longer) ours: the next owner reads it.
                    continue;
                };
                // A record larger than the stage accepts is only dead-lettered: keep a prefix.
                let rec = Input::from_message_capped(
                    &msg,
                    part.topic.clone(),
                    shared.settings.max_record_bytes + 1,
                );
                shared.health.progress();
                METRICS
                    .records_consumed
                    .with_label_values(&[stage, msg.topic()])
                    .inc();
                if let Some(rec) = dispatch(shared, &part, rec) {
                    // An offset at or below one handed over before, with no new assignment: a
                    // repeat (harmless to skip), or the partition went back — its topic created
                    // again while consumed, or its log cut after an unclean leader election —
                    // whose records up to the old position are then not read (left: reading
                    // afresh safely needs the old part drained first; see the README).
                    tracing::warn!(
                        stage,
                        topic = %part.topic,
                        partition = part.partition,
                        offset = rec.offset,
                        last_read = ?lock(&part.state).acks.last_tracked(),
                        "Skipping a record at or below an offset already read (no new assignment): a repeat, or the partition went back (topic created again, or log cut)."
                    );
                }
            }
            Some(Err(e)) => {
                METRICS.consumer_errors.with_label_values(&[stage]).inc();
                shared.health.error();
                tracing::warn!(stage, error = %e, "Consumer error.");
            }
        }
    }
    // Shutdown: drain every partition and commit synchronously.
    let parts: Vec<Arc<Part>> = lock(&shared.parts).drain().map(|(_, p)| p).collect();
    tracing::info!(
        stage,
        partitions = parts.len(),
        "Stage stopping; draining in-flight records."
    );
    drain_and_commit(shared, consumer, &parts);
}

/// How often the poll loop looks at the partitions' spans.
const SPAN_LOOK_EVERY: Duration = Duration::from_millis(200);

/// A partition may have this many times `max_in_flight` records read past its oldest unfinished
/// one before it is paused ([`hold_long_spans`]).
const SPAN_PER_IN_FLIGHT: usize = 4;

/// Pauses the partitions with `limit` or more records tracked behind their oldest unfinished one,
/// and resumes those paused here once under half of it. `paused` holds the parts themselves: a
/// partition assigned again is a new part (and resumed on assignment), looked at afresh.
fn hold_long_spans<P: Processor>(
    shared: &Shared<P>,
    consumer: &BaseConsumer<Ctx<P>>,
    limit: usize,
    paused: &mut Vec<Arc<Part>>,
) {
    let parts: Vec<Arc<Part>> = lock(&shared.parts).values().cloned().collect();
    paused.retain(|p| parts.iter().any(|x| Arc::ptr_eq(x, p)));
    for part in parts {
        let span = lock(&part.state).acks.in_flight();
        let was = paused.iter().any(|p| Arc::ptr_eq(p, &part));
        let over = span >= limit && !was;
        let under = span < limit / 2 && was;
        if !over && !under {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&part.topic, part.partition);
        if over {
            if consumer.pause(&tpl).is_ok() {
                METRICS
                    .consumer_pauses
                    .with_label_values(&[shared.stage()])
                    .inc();
                tracing::warn!(stage = shared.stage(), topic = %part.topic, partition = part.partition, span, "A record holds this partition's commit ({span} records read behind it); pausing the partition until it moves.");
                paused.push(part);
            }
        } else if consumer.resume(&tpl).is_ok() {
            paused.retain(|p| !Arc::ptr_eq(p, &part));
        }
    }
}

fn store_offsets<P: Processor>(shared: &Shared<P>, consumer: &BaseConsumer<Ctx<P>>) {
    let mut tpl = TopicPartitionList::new();
    for part in lock(&shared.parts).values() {
        let mut st = lock(&part.state);
        if let Some(done) = st.acks.released() {
            if st.stored != Some(done) {
                st.stored = Some(done);
                let _ = tpl.add_partition_offset(
                    &part.topic,
                    part.partition,
                    Offset::Offset(commit_position(done)),
                );
            }
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "Storing offsets failed (partition likely revoked).");
        }
    }
}

/// The ids of `topics` ([`super::topic_id`]), for the offset fences. None when the
/// broker gives none or does not answer in 10 s: the fences then apply as before (logged).
///
/// Asked on a short-lived admin client of its own, leaving the consumer's handle (and its
/// metadata cache) to the consumer.
fn topic_ids(stage: &str, admin: &ClientConfig, topics: &[&str]) -> HashMap<String, String> {
    let mut topics: Vec<&str> = topics.to_vec();
    topics.sort_unstable();
    topics.dedup();
    let client: Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, _> =
        admin.create();
    let ids = match client {
        // SAFETY: the admin client's handle lives for the whole call (`c` is held until after).
        Ok(c) => unsafe {
            super::topic_id::describe(c.inner().native_ptr(), &topics, Duration::from_secs(10))
        },
        Err(e) => Err(format!("cannot make an admin client: {e}")),
    };
    match ids {
        Ok(ids) => {
            let missing: Vec<&&str> = topics.iter().filter(|t| !ids.contains_key(**t)).collect();
            if !missing.is_empty() {
                tracing::warn!(stage, topics = ?missing, "The broker gave no topic id: a topic deleted and created again under the same name would have its first records taken for ones already done.");
            }
            ids
        }
        Err(e) => {
            tracing::warn!(stage, error = %e, "Could not ask for the topic ids: a topic deleted and created again under the same name would have its first records taken for ones already done.");
            HashMap::new()
        }
    }
}

/// Queues a polled record in its lane; a new lane is ready at once. The record back when the ack
/// tracker refuses it (an offset at or below one already read, with no new assignment).
fn dispatch<P: Processor>(
    shared: &Arc<Shared<P>>,
    part: &Arc<Part>,
    mut rec: Input,
) -> Option<Input> {
    let offset = rec.offset;
    let lane = shared.processor.lane(&rec);
    let new_lane = {
        let mut st = lock(&part.state);
        if st.acks.track(offset).is_err() {
            return Some(rec);
        }
        rec.delivered = Some(part.delivered.clone());
        rec.topic_id = part.topic_id.clone();
        rec.revoked = Some(part.cancel.clone());
        let work = Work {
            rec: Arc::new(rec),
            polled_at: Instant::now(),
            attempts: 0,
        };
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        shared.health.in_flight.fetch_add(1, Ordering::Relaxed);
        METRICS.in_flight.with_label_values(&[shared.stage()]).inc();
        match st.lanes.get_mut(&lane) {
            Some(q) => {
                q.push_back(work);
                false
            }
            None => {
                st.lanes.insert(lane, VecDeque::from([work]));
                true
            }
        }
    };
    if new_lane {
        shared.make_ready(part.clone(), lane);
    }
    None
}

/// Batches that may run before the driver waits for a full one (or [`LINGER`]).
const BUSY_BATCHES: usize = 2;
/// Longest a ready record waits for its batch to fill while others run.
const LINGER: Duration = Duration::from_millis(5);

/// The driver: takes ready lane heads as batches and runs them, several at once. Group commit:
/// while [`BUSY_BATCHES`] batches run, ready heads gather into the next one until it is full, one
/// finishes, or [`LINGER`] has passed since the last one started. Under load that makes batches
/// large (one seal, one Redis round trip and one produce burst for many records); a quiet stage
/// or a slow agent adds at most `LINGER`.
async fn drive<P: Processor>(shared: Arc<Shared<P>>) {
    let mut batches = FuturesUnordered::new();
    let max = shared.settings.max_batch;
    let mut last_start = tokio::time::Instant::now();
    loop {
        let due = last_start + LINGER;
        let room = batches.len() < BUSY_BATCHES
            || shared.ready_len() >= max
            || tokio::time::Instant::now() >= due;
        if room {
            let heads = shared.take_ready(max);
            if !heads.is_empty() {
                batches.push(run_batch(shared.clone(), heads));
                last_start = tokio::time::Instant::now();
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = shared.fatal.cancelled() => {
                // Finish what runs (it produces nothing more); the poll thread stops the stage.
                while batches.next().await.is_some() {}
                return;
            }
            Some(()) = batches.next(), if !batches.is_empty() => {}
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(due), if !room => {}
        }
    }
}

/// Runs one batch: too-large records go straight to the dead-letter topic, the rest to the
/// processor; each result is handled as it arrives.
async fn run_batch<P: Processor>(shared: Arc<Shared<P>>, heads: Vec<(Arc<Part>, u64, Work)>) {
    let s = &shared.settings;
    let mut batch: Vec<(Arc<Part>, u64, Work)> = Vec::with_capacity(heads.len());
    for (part, lane, work) in heads {
        if work.rec.size() > s.max_record_bytes {
            let detail = format!(
                "record is {} bytes (payload {}, key and headers {}), limit is {}",
                work.rec.size(),
                work.rec.payload_size,
                work.rec.other_size,
                s.max_record_bytes
            );
            let stage = shared.stage();
            METRICS
                .dlq_records
                .with_label_values(&[stage, "too_large"])
                .inc();
            tracing::warn!(stage, topic = %work.rec.topic, partition = work.rec.partition, offset = work.rec.offset, "Record too large; sent to the dead-letter topic.");
            let dl = dead_letter(
                &s.dlq_topic,
                stage,
                &work.rec,
                "too_large",
                &detail,
                s.max_record_bytes,
            );
            emit(&shared, &part, lane, work, Done::from(vec![dl]), false).await;
        } else {
            batch.push((part, lane, work));
        }
    }
    if batch.is_empty() {
        return;
    }
    let recs: Vec<Arc<Input>> = batch.iter().map(|(_, _, w)| w.rec.clone()).collect();
    let mut slots: Vec<Option<(Arc<Part>, u64, Work)>> = batch.into_iter().map(Some).collect();
    let processor = shared.processor.clone();
    let mut results = std::pin::pin!(processor.process_batch(recs));
    loop {
        let next = std::panic::AssertUnwindSafe(results.next())
            .catch_unwind()
            .await;
        let (i, result) = match next {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => {
                shared.set_fatal("processing panicked".into());
                break;
            }
        };
        let Some((part, lane, work)) = slots.get_mut(i).and_then(Option::take) else {
            shared.set_fatal(format!(
                "the processor answered for record {i} twice or out of range"
            ));
            break;
        };
        handle(&shared, part, lane, work, result).await;
    }
    // Records the processor never answered for (a panic, a fatal error): give them up.
    for (part, lane, _) in slots.into_iter().flatten() {
        shared.release(&part);
        shared.advance(&part, lane);
    }
}

/// What happens to one record's result.
async fn handle<P: Processor>(
    shared: &Arc<Shared<P>>,
    part: Arc<Part>,
    lane: u64,
    mut work: Work,
    result: Result<Done, ProcessError>,
) {
    let stage = shared.stage();
    let s = &shared.settings;
    let rec = &work.rec;
    match result {
        Ok(done) => emit(shared, &part, lane, work, done, true).await,
        Err(ProcessError::Poison { reason, detail }) => {
            METRICS
                .dlq_records
                .with_label_values(&[stage, reason])
                .inc();
            tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, reason, detail = %detail, "Record sent to the dead-letter topic.");
            let dl = dead_letter(
                &s.dlq_topic,
                stage,
                rec,
                reason,
                &detail,
                s.max_record_bytes,
            );
            emit(shared, &part, lane, work, Done::from(vec![dl]), false).await;
        }
        Err(ProcessError::Transient(m)) => {
            let backoff = Duration::from_millis(100)
                .saturating_mul(1 << work.attempts.min(6))
                .min(Duration::from_secs(5));
            tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %m, backoff_ms = backoff.as_millis() as u64, "Processing failed transiently; retrying the same record.");
            work.attempts += 1;
            // Back at the head of its lane after the backoff; the lane stays taken meanwhile. A
            // retry is rare, so a task for its timer is fine.
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(backoff).await;
                let requeued = {
                    let mut st = lock(&part.state);
                    match st.lanes.get_mut(&lane) {
                        Some(q) if !part.revoked.load(Ordering::Acquire) => {
                            q.push_front(work);
                            true
                        }
                        _ => false,
                    }
                };
                if requeued && !shared.fatal.is_cancelled() {
                    // No longer taken: it waits in its lane again.
                    part.finish_active();
                    shared.make_ready(part, lane);
                } else {
                    // Revoked meanwhile (the lane was dropped) or stopping: give it up.
                    shared.release(&part);
                }
            });
        }
        Err(ProcessError::Fatal(m)) => {
            shared.set_fatal(format!(
                "{}[{}]@{}: {m}",
                rec.topic, rec.partition, rec.offset
            ));
            shared.release(&part);
        }
    }
}

/// A dead letter for `dlq` without `out`'s payload, marked truncated (with the payload's size) so
/// `dlq redrive` never sends it back as an empty record.
fn without_payload(out: &Output, dlq: &str) -> Output {
    let mut dl = out.clone();
    let size = dl.payload.len();
    dl.payload.clear();
    dl.topic = dlq.to_string();
    // A dead letter cut before keeps the input's size it names.
    if dl
        .headers
        .iter()
        .any(|(k, _)| k == super::dlq_headers::TRUNCATED)
    {
        dl
    } else {
        dl.header(super::dlq_headers::TRUNCATED, size.to_string())
    }
}

/// Queues a record's outputs (in order) and tracks their delivery; the lane moves on once they are
/// queued. `may_dead_letter` says whether an output the broker refuses as too large may turn into a
/// dead letter of the input (not when the outputs are a dead letter already).
async fn emit<P: Processor>(
    shared: &Arc<Shared<P>>,
    part: &Arc<Part>,
    lane: u64,
    work: Work,
    done: Done,
    may_dead_letter: bool,
) {
    let stage = shared.stage();
    let s = &shared.settings;
    if part.cancel.is_cancelled() || shared.fatal.is_cancelled() {
        // Revoked and the drain timed out, or the stage stops: the next owner processes it again.
        shared.release(part);
        return;
    }
    let rec = &work.rec;
    let track = Arc::new(Track {
        shared: shared.clone(),
        part: part.clone(),
        offset: rec.offset,
        polled_at: work.polled_at,
        timestamp_ms: rec.timestamp_ms,
        cleanup: Mutex::new(done.cleanup),
        pending: AtomicUsize::new(1),
        failed: AtomicBool::new(false),
    });
    let sink: Arc<dyn Delivered> = track.clone();
    let on_full = || {
        METRICS
            .producer_queue_full
            .with_label_values(&[stage])
            .inc()
    };
    let mut dead_lettered = false;
    for out in done.outputs {
        if part.cancel.is_cancelled() {
            // Revoked while its outputs were being queued (the queue was full): the rest are not
            // queued (the next owner writes them all again: the same records), and the record is
            // released, not acknowledged.
            break;
        }
        track.pending.fetch_add(1, Ordering::AcqRel);
        match shared
            .producer
            .enqueue(&out, Notice::Sink(sink.clone()), on_full)
            .await
        {
            Ok(()) => {}
            Err(super::ProduceError::Rejected { topic, source }) if is_too_large(&source) => {
                track.pending.fetch_sub(1, Ordering::AcqRel);
                // A record the broker will never take. A dead letter keeps its headers but drops its
                // payload; any other output is skipped and dead-letters the input (once). The other
                // outputs still go out: audit records are part of the trail, which must not have a
                // hole.
                let dl = if out.topic == s.dlq_topic || !may_dead_letter {
                    without_payload(&out, &s.dlq_topic)
                } else if dead_lettered {
                    continue;
                } else {
                    dead_lettered = true;
                    METRICS
                        .dlq_records
                        .with_label_values(&[stage, "output_too_large"])
                        .inc();
                    let detail = format!("an output record for {topic} is too large: {source}");
                    tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, output_topic = %topic, bytes = out.payload.len(), "An output record is too large for the broker; the input goes to the dead-letter topic.");
                    dead_letter(
                        &s.dlq_topic,
                        stage,
                        rec,
                        "output_too_large",
                        &detail,
                        s.max_record_bytes,
                    )
                };
                track.pending.fetch_add(1, Ordering::AcqRel);
                let mut queued = shared
                    .producer
                    .enqueue(&dl, Notice::Sink(sink.clone()), || {})
                    .await;
                if let Err(super::ProduceError::Rejected { source, .. }) = &queued {
                    if is_too_large(source) && !dl.payload.is_empty() {
                        // The dead-letter topic takes less than the input's payload: its headers
                        // (reason, source offsets) still say what happened.
                        let bare = without_payload(&dl, &s.dlq_topic);
                        queued = shared
                            .producer
                            .enqueue(&bare, Notice::Sink(sink.clone()), || {})
                            .await;
                    }
                }
                if let Err(e) = queued {
                    track.pending.fetch_sub(1, Ordering::AcqRel);
                    shared.set_fatal(format!("cannot write dead letter: {e}"));
                    track.failed.store(true, Ordering::Release);
                    break;
                }
            }
            Err(e) => {
                track.pending.fetch_sub(1, Ordering::AcqRel);
                METRICS.produce_errors.with_label_values(&[stage]).inc();
                shared.set_fatal(format!("cannot produce: {e}"));
                track.failed.store(true, Ordering::Release);
                break;
            }
        }
    }
    if let Some(so) = done.shared.filter(|_| !part.cancel.is_cancelled()) {
        track.pending.fetch_add(1, Ordering::AcqRel);
        // The first record of the batch to get here queues the shared records.
        let outs = lock(&so.outputs).take();
        if let Some(outs) = outs {
            let shared_sink: Arc<dyn Delivered> = so.clone();
            for out in outs {
                if let Err(e) = shared
                    .producer
                    .enqueue(&out, Notice::Sink(shared_sink.clone()), || {})
                    .await
                {
                    so.failed.store(true, Ordering::Release);
                    so.settle();
                    shared.set_fatal(format!("cannot produce a batch's shared record: {e}"));
                }
            }
            so.settle();
        }
        so.attach(sink.clone());
    }
    shared.advance(part, lane);
    // Every output is queued: drop the extra count that kept the record from finishing early.
    track.settle();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's shared records dropped without being queued (the revoked batch given up) raise
    /// their flag; queued ones, or taken by the caller, do not. Either way they are settled once
    /// dropped, and delivered ones as soon as their deliveries are over.
    #[test]
    fn shared_outputs_dropped_unqueued_raise_their_flag() {
        let out = || vec![Output::new("audit", "k", b"seal".to_vec())];
        let flag = Arc::new(AtomicBool::new(false));
        let watch = DeliveryWatch::new(flag.clone());
        let settled = watch.settled();
        let so = SharedOutputs::watched(out(), Some(watch));
        let other_holder = so.clone();
        drop(so);
        assert!(!flag.load(Ordering::Acquire), "still held elsewhere");
        assert!(!settled.is_cancelled());
        drop(other_holder);
        assert!(flag.load(Ordering::Acquire), "dropped unqueued");
        assert!(settled.is_cancelled());

        let flag = Arc::new(AtomicBool::new(false));
        let so = SharedOutputs::watched(out(), Some(DeliveryWatch::new(flag.clone())));
        assert_eq!(so.take().len(), 1);
        drop(so);
        assert!(!flag.load(Ordering::Acquire), "taken to be written");

        // Queued (the +1 goes) and delivered: settled while still held, not unsent.
        let flag = Arc::new(AtomicBool::new(false));
        let watch = DeliveryWatch::new(flag.clone());
        let settled = watch.settled();
        let so = SharedOutputs::watched(out(), Some(watch));
        assert_eq!(so.take().len(), 1);
        so.settle();
        assert!(!settled.is_cancelled(), "a delivery outstanding");
        so.delivered("audit", Ok((0, 1)));
        assert!(settled.is_cancelled(), "delivered");
        assert!(!flag.load(Ordering::Acquire));
    }
}
