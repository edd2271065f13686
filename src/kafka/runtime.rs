//! The commit-safe consumer runtime every stage runs on.
//!
//! - One OS thread owns the consumer and polls it; rebalance callbacks run there and may block.
//! - Each record goes to a *lane* (the processor picks it, e.g. the resource id): records of one lane
//!   run one at a time in offset order, lanes run concurrently.
//! - A record's outputs are queued to the producer in order; when the broker has acknowledged all of
//!   them the record is marked done in its partition's [`AckTracker`], and the poll thread stores the
//!   offset below which everything is done. Auto-commit then commits stored offsets only.
//! - `max_in_flight` bounds records between poll and done; at the bound the partitions are paused.
//! - On revoke and on shutdown, in-flight records are drained (up to `drain_timeout`) and offsets are
//!   committed synchronously.
//! - Poison records go to the dead-letter topic with reason headers and the partition moves on;
//!   transient failures (Redis down) retry the same record until it succeeds, so nothing is skipped.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::DeliveryFuture;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::acks::{commit_position, AckTracker};
use super::{dead_letter, is_too_large, Input, Output, Producer};
use crate::error::ProcessError;
use crate::telemetry::METRICS;

/// A stage's logic. The runtime owns delivery guarantees; the processor only maps a record to outputs.
pub trait Processor: Send + Sync + 'static {
    /// Stage name for metrics, logs and dead-letter headers.
    fn stage(&self) -> &'static str;

    /// Records with the same lane are processed one at a time in offset order. The default (one lane
    /// per partition) keeps strict partition order.
    fn lane(&self, _rec: &Input) -> u64 {
        0
    }

    /// Turns one record into the records it causes. Called again for the same record after a
    /// [`ProcessError::Transient`] error or a redelivery, so effects must be idempotent.
    fn process(
        &self,
        rec: Arc<Input>,
    ) -> impl Future<Output = Result<Vec<Output>, ProcessError>> + Send;
}

/// What a stage needs besides its processor.
#[derive(Clone)]
pub struct StageSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    pub consumer: ClientConfig,
    pub max_in_flight: usize,
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

struct Work {
    rec: Arc<Input>,
    polled_at: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct PartState {
    acks: AckTracker,
    /// Lanes with a running task; the queue holds records waiting behind the running one.
    lanes: HashMap<u64, VecDeque<Work>>,
    /// Last offset stored for commit.
    stored: Option<i64>,
}

struct Part {
    topic: Arc<str>,
    partition: i32,
    state: Mutex<PartState>,
    revoked: AtomicBool,
    /// Records taken by a lane task and not yet done or abandoned.
    active: AtomicUsize,
    idle: Notify,
    /// Cancelled when a revoke's drain timed out: work still running must not produce (the next
    /// owner has the records).
    cancel: CancellationToken,
}

impl Part {
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
    permits: Arc<Semaphore>,
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
}

/// Consumer context: turns rebalance callbacks into drain-and-commit.
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
                let mut parts = lock(&self.shared.parts);
                for e in tpl.elements() {
                    let key: (Arc<str>, i32) = (Arc::from(e.topic()), e.partition());
                    parts.entry(key.clone()).or_insert_with(|| {
                        Arc::new(Part {
                            topic: key.0.clone(),
                            partition: key.1,
                            state: Mutex::new(PartState::default()),
                            revoked: AtomicBool::new(false),
                            active: AtomicUsize::new(0),
                            idle: Notify::new(),
                            cancel: CancellationToken::new(),
                        })
                    });
                }
                let n = consumer
                    .assignment()
                    .map(|a| a.count())
                    .unwrap_or(parts.len());
                self.shared.health.assigned.store(n, Ordering::Relaxed);
                METRICS
                    .assigned_partitions
                    .with_label_values(&[stage])
                    .set(n as i64);
                tracing::info!(stage, partitions = n, "Partitions assigned.");
            }
            Rebalance::Error(e) => {
                tracing::warn!(stage, error = %e, "Rebalance error.");
            }
            Rebalance::Revoke(_) => {}
        }
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
        part.revoked.store(true, Ordering::Release);
        let dropped: usize = {
            let mut st = lock(&part.state);
            st.lanes.values_mut().map(|q| q.drain(..).count()).sum()
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
    for p in parts {
        if let Some(done) = lock(&p.state).acks.released() {
            if let Err(e) = tpl.add_partition_offset(
                &p.topic,
                p.partition,
                Offset::Offset(commit_position(done)),
            ) {
                tracing::warn!(error = %e, "Cannot build commit list.");
            }
        }
    }
    commit_sync(shared.stage(), consumer, &tpl);
}

fn commit_sync<C: ConsumerContext>(
    stage: &'static str,
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) {
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(tpl, CommitMode::Sync) {
        Ok(()) => {
            METRICS.commits.with_label_values(&[stage, "ok"]).inc();
            tracing::info!(stage, partitions = tpl.count(), "Committed offsets.");
        }
        Err(e) => {
            METRICS.commits.with_label_values(&[stage, "error"]).inc();
            tracing::warn!(stage, error = %e, "Synchronous commit failed; records after the last commit will be redelivered.");
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
        permits: Arc::new(Semaphore::new(settings.max_in_flight)),
        settings: settings.clone(),
        parts: Mutex::new(HashMap::new()),
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
        return Err(RuntimeError::Fatal {
            stage: shared.stage(),
            message: format!("cannot start poll thread: {e}"),
        });
    }
    let _ = done_rx.await;
    health.running.store(false, Ordering::Relaxed);
    let fatal = lock(&shared.fatal_message).take();
    match fatal {
        Some(message) => Err(RuntimeError::Fatal {
            stage: shared.stage(),
            message,
        }),
        None => Ok(()),
    }
}

fn poll_loop<P: Processor>(
    shared: &Arc<Shared<P>>,
    consumer: &BaseConsumer<Ctx<P>>,
    shutdown: &CancellationToken,
) {
    let stage = shared.stage();
    let mut paused = false;
    tracing::info!(stage, topics = ?shared.settings.topics, group = %shared.settings.group_id, "Stage started.");
    METRICS.init_stage(stage);
    loop {
        if shutdown.is_cancelled() || shared.fatal.is_cancelled() {
            break;
        }
        store_offsets(shared, consumer);
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(p) => {
                if paused {
                    if let Ok(a) = consumer.assignment() {
                        let _ = consumer.resume(&a);
                    }
                    paused = false;
                }
                Some(p)
            }
            Err(_) => {
                if !paused {
                    METRICS
                        .backpressure_pauses
                        .with_label_values(&[stage])
                        .inc();
                    tracing::debug!(stage, "In-flight limit reached; pausing consumption.");
                    paused = true;
                }
                // Re-pause every round: a rebalance may have assigned unpaused partitions.
                if let Ok(a) = consumer.assignment() {
                    let _ = consumer.pause(&a);
                }
                None
            }
        };
        let timeout = if permit.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(10)
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
                dispatch(shared, &part, rec, permit);
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

fn dispatch<P: Processor>(
    shared: &Arc<Shared<P>>,
    part: &Arc<Part>,
    rec: Input,
    permit: Option<OwnedSemaphorePermit>,
) {
    let lane = shared.processor.lane(&rec);
    let offset = rec.offset;
    let work = Work {
        rec: Arc::new(rec),
        polled_at: Instant::now(),
        _permit: permit,
    };
    let start = {
        let mut st = lock(&part.state);
        if let Err(e) = st.acks.track(offset) {
            // Only possible if the consumer went backwards without a new assignment; processing the
            // record again is safe, tracking it is not.
            tracing::warn!(topic = %part.topic, partition = part.partition, error = %e, "Skipping record the tracker refused.");
            return;
        }
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        shared.health.in_flight.fetch_add(1, Ordering::Relaxed);
        METRICS.in_flight.with_label_values(&[shared.stage()]).inc();
        match st.lanes.get_mut(&lane) {
            Some(q) => {
                q.push_back(work);
                None
            }
            None => {
                st.lanes.insert(lane, VecDeque::new());
                Some(work)
            }
        }
    };
    if let Some(work) = start {
        part.active.fetch_add(1, Ordering::AcqRel);
        shared
            .handle
            .spawn(run_lane(shared.clone(), part.clone(), lane, work));
    }
}

async fn run_lane<P: Processor>(shared: Arc<Shared<P>>, part: Arc<Part>, lane: u64, first: Work) {
    let mut work = first;
    loop {
        process_one(&shared, &part, work).await;
        let next = {
            let mut st = lock(&part.state);
            match st.lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(w) => {
                    part.active.fetch_add(1, Ordering::AcqRel);
                    Some(w)
                }
                None => {
                    st.lanes.remove(&lane);
                    None
                }
            }
        };
        match next {
            Some(w) => work = w,
            None => return,
        }
    }
}

/// The record leaves the in-flight set (done, or given up to be redelivered).
fn release<P: Processor>(shared: &Shared<P>, part: &Part) {
    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    shared.health.in_flight.fetch_sub(1, Ordering::Relaxed);
    METRICS.in_flight.with_label_values(&[shared.stage()]).dec();
    part.finish_active();
}

/// Processes one record, queues its outputs, and spawns the wait for their delivery.
async fn process_one<P: Processor>(shared: &Arc<Shared<P>>, part: &Arc<Part>, work: Work) {
    let stage = shared.stage();
    let s = &shared.settings;
    let rec = work.rec.clone();
    let outputs = if rec.payload_size > s.max_record_bytes {
        let detail = format!(
            "payload is {} bytes, limit is {}",
            rec.payload_size, s.max_record_bytes
        );
        METRICS
            .dlq_records
            .with_label_values(&[stage, "too_large"])
            .inc();
        tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, "Record too large; sent to the dead-letter topic.");
        vec![dead_letter(
            &s.dlq_topic,
            stage,
            &rec,
            "too_large",
            &detail,
            s.max_record_bytes,
        )]
    } else {
        let mut backoff = Duration::from_millis(100);
        loop {
            if part.revoked.load(Ordering::Acquire) || shared.fatal.is_cancelled() {
                release(shared, part);
                return;
            }
            let attempt =
                std::panic::AssertUnwindSafe(shared.processor.process(rec.clone())).catch_unwind();
            let result = tokio::select! {
                r = attempt => r,
                _ = part.cancel.cancelled() => {
                    release(shared, part);
                    return;
                }
            };
            let result = match result {
                Ok(r) => r,
                Err(_) => Err(ProcessError::Fatal("processing panicked".into())),
            };
            match result {
                Ok(outs) => break outs,
                Err(ProcessError::Poison { reason, detail }) => {
                    METRICS
                        .dlq_records
                        .with_label_values(&[stage, reason])
                        .inc();
                    tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, reason, detail = %detail, "Record sent to the dead-letter topic.");
                    break vec![dead_letter(
                        &s.dlq_topic,
                        stage,
                        &rec,
                        reason,
                        &detail,
                        s.max_record_bytes,
                    )];
                }
                Err(ProcessError::Transient(m)) => {
                    tracing::warn!(stage, topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %m, backoff_ms = backoff.as_millis() as u64, "Processing failed transiently; retrying the same record.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(ProcessError::Fatal(m)) => {
                    shared.set_fatal(format!(
                        "{}[{}]@{}: {m}",
                        rec.topic, rec.partition, rec.offset
                    ));
                    release(shared, part);
                    return;
                }
            }
        }
    };
    if part.cancel.is_cancelled() {
        // Revoked and the drain timed out: the next owner processes this record again.
        release(shared, part);
        return;
    }
    let mut futures = Vec::with_capacity(outputs.len());
    let mut sent = Vec::with_capacity(outputs.len());
    let mut dead_lettered = false;
    for out in outputs {
        match shared
            .producer
            .enqueue(&out, || {
                METRICS
                    .producer_queue_full
                    .with_label_values(&[stage])
                    .inc()
            })
            .await
        {
            Ok(f) => {
                futures.push(f);
                sent.push(out);
            }
            Err(super::ProduceError::Rejected { topic, source }) if is_too_large(&source) => {
                // A record the broker will never take. A dead letter keeps its headers but drops its
                // payload; any other output is skipped and dead-letters the input (once). The other
                // outputs still go out: audit records are already sealed into their chains, and a
                // chain must not have a hole.
                let dl = if out.topic == s.dlq_topic {
                    let mut dl = out.clone();
                    dl.payload.clear();
                    dl
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
                        &rec,
                        "output_too_large",
                        &detail,
                        s.max_record_bytes,
                    )
                };
                match shared.producer.enqueue(&dl, || {}).await {
                    Ok(f) => {
                        futures.push(f);
                        sent.push(dl);
                    }
                    Err(e) => {
                        shared.set_fatal(format!("cannot write dead letter: {e}"));
                        release(shared, part);
                        return;
                    }
                }
            }
            Err(e) => {
                METRICS.produce_errors.with_label_values(&[stage]).inc();
                shared.set_fatal(format!("cannot produce: {e}"));
                release(shared, part);
                return;
            }
        }
    }
    let shared = shared.clone();
    let part = part.clone();
    tokio::spawn(async move {
        if await_deliveries(&shared, futures, sent).await {
            complete(&shared, &part, &work);
        } else {
            release(&shared, &part);
        }
        drop(work);
    });
}

/// Waits for every delivery. librdkafka already retried each record (idempotently, in order); a
/// failure here stops the stage without committing past the record, so a restart redelivers it and
/// per-key order is kept (re-sending only the failed record would put it behind later ones).
async fn await_deliveries<P: Processor>(
    shared: &Arc<Shared<P>>,
    futures: Vec<DeliveryFuture>,
    sent: Vec<Output>,
) -> bool {
    let stage = shared.stage();
    for (fut, out) in futures.into_iter().zip(sent) {
        let error = match fut.await {
            Ok(Ok(_)) => {
                METRICS
                    .records_produced
                    .with_label_values(&[stage, &out.topic])
                    .inc();
                continue;
            }
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "delivery cancelled (producer closed)".to_string(),
        };
        METRICS.produce_errors.with_label_values(&[stage]).inc();
        shared.set_fatal(format!("delivery to {} failed: {error}", out.topic));
        return false;
    }
    true
}

fn complete<P: Processor>(shared: &Shared<P>, part: &Part, work: &Work) {
    shared.health.progress();
    let stage = shared.stage();
    {
        let mut st = lock(&part.state);
        if let Err(e) = st.acks.complete(work.rec.offset) {
            tracing::error!(stage, error = %e, "Ack tracker refused a completion.");
        }
    }
    METRICS
        .record_duration
        .with_label_values(&[stage])
        .observe(work.polled_at.elapsed().as_secs_f64());
    if let Some(ts) = work.rec.timestamp_ms {
        let now = chrono::Utc::now().timestamp_millis();
        METRICS
            .end_to_end_latency
            .with_label_values(&[stage])
            .observe(((now - ts).max(0) as f64) / 1000.0);
    }
    release(shared, part);
}
