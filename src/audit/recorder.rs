//! Audit records of work that has no input record of its own (a model call, a tool call): sealed
//! into this process's own chain ([`Sealer::own_chain`]) and written in the background, each
//! optionally with a companion record on another topic (the call's transcript).
//!
//! One background writer takes what was recorded in batches: while it seals and writes one batch,
//! the next gathers, and each batch is one seal (one compare-and-set in Redis) and one produce
//! burst — so the trail keeps up with thousands of calls a second instead of queueing one seal per
//! record behind the chain's lock.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::audit::sealer::Sealer;
use crate::event::CloudEvent;
use crate::kafka::{Output, Producer};
use crate::records::{audit_event, AuditData, Emitter};

/// Records taken into one batch at most.
const MAX_BATCH: usize = 512;

/// Records waiting for the writer at most: past it (Redis or the broker out of reach for long,
/// callers going on) new ones are dropped — counted, logged at ERROR — rather than growing memory
/// until the process dies with every stage.
const MAX_QUEUED: usize = 20_000;

/// One recorded audit record, waiting for the writer.
struct Item {
    stage: &'static str,
    what: &'static str,
    audit: AuditData,
    companion: Option<(String, CloudEvent)>,
}

/// Writes audit records (and their companions) in the background.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Item>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Records taken so far (for [`Recorder::drain`] to see when recording has stopped).
    recorded: Arc<std::sync::atomic::AtomicU64>,
    /// The writer, until [`Recorder::drain`] waits for it.
    writer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Cancelled by [`Recorder::drain`]: the writer takes nothing new and ends once what waits is
    /// written.
    stop: tokio_util::sync::CancellationToken,
}

impl Recorder {
    /// Starts the background writer (on the current Tokio runtime). It ends once every clone of
    /// the recorder is dropped, or [`Recorder::drain`] is called, and what was recorded is
    /// written.
    pub fn new(emitter: Emitter, sealer: Arc<Sealer>, producer: Producer) -> Self {
        let (queue, rx) = mpsc::channel(MAX_QUEUED);
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(write(
            Writer {
                emitter,
                sealer,
                producer,
            },
            rx,
            stop.clone(),
        ));
        Recorder {
            queue,
            dropped: Default::default(),
            recorded: Default::default(),
            writer: Arc::new(std::sync::Mutex::new(Some(writer))),
            stop,
        }
    }

    /// Records waiting for the writer now.
    pub fn waiting(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// At shutdown, once nothing records any more: waits up to `within` for every record waiting
    /// to be sealed and written (the process exiting dropped them: model and tool calls made,
    /// their audit records lost). What is still waiting then is logged as lost.
    pub async fn drain(&self, within: std::time::Duration) {
        // Calls still finishing in tasks of their own (a model call whose stream was cut, its
        // settle and record spawned) record a little after the stages stopped: records are taken
        // until none came for a second (within the same bound).
        let until = tokio::time::Instant::now() + within;
        let mut seen = self.recorded.load(std::sync::atomic::Ordering::Relaxed);
        let mut quiet_since = tokio::time::Instant::now();
        // (A process that never recorded anything has no calls finishing.)
        while seen > 0
            && tokio::time::Instant::now() < until
            && quiet_since.elapsed() < std::time::Duration::from_secs(1)
        {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = self.recorded.load(std::sync::atomic::Ordering::Relaxed);
            if now != seen {
                seen = now;
                quiet_since = tokio::time::Instant::now();
            }
        }
        self.stop.cancel();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(writer) = writer else { return };
        let waiting = self.waiting();
        if waiting > 0 {
            tracing::info!(
                waiting,
                "Writing the audit records still waiting before stopping."
            );
        }
        if tokio::time::timeout_at(
            until.max(tokio::time::Instant::now() + std::time::Duration::from_secs(5)),
            writer,
        )
        .await
        .is_err()
        {
            let left = self.waiting();
            tracing::error!(
                left,
                seconds = within.as_secs(),
                "Audit records were still being written at shutdown; those not written are lost."
            );
        }
    }

    /// Seals `audit` into the process's own chain and produces it, then `companion` (topic,
    /// event) when given. The caller does not wait; a failure is logged (`what` names the record
    /// in the log line).
    pub fn record(
        &self,
        stage: &'static str,
        what: &'static str,
        audit: AuditData,
        companion: Option<(String, CloudEvent)>,
    ) {
        let item = Item {
            stage,
            what,
            audit,
            companion,
        };
        match self.queue.try_send(item) {
            Ok(()) => {
                self.recorded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = self
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Once, then every thousandth: an outage would otherwise flood the log.
                if n % 1000 == 0 {
                    tracing::error!(
                        record = what,
                        dropped = n + 1,
                        "Audit records are not being written (Redis or the broker out of reach) and {MAX_QUEUED} wait: this one is lost."
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!(
                    record = what,
                    "Could not write an audit record: the writer has stopped."
                );
            }
        }
    }
}

struct Writer {
    emitter: Emitter,
    sealer: Arc<Sealer>,
    producer: Producer,
}

async fn write(w: Writer, mut rx: mpsc::Receiver<Item>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let first = tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            // Nothing new is taken; what waits is still written (recv returns it, then None).
            _ = stop.cancelled(), if !rx.is_closed() => {
                rx.close();
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // One seal per stage label (the metric's), in the order recorded.
        while !batch.is_empty() {
            let stage = batch[0].stage;
            let (same, rest): (Vec<Item>, Vec<Item>) =
                batch.into_iter().partition(|i| i.stage == stage);
            batch = rest;
            if let Err((e, whats)) = w.write_batch(stage, same).await {
                for what in whats {
                    tracing::error!(error = %e, record = what, "Could not write an audit record; it is lost.");
                }
            }
        }
    }
}

impl Writer {
    /// Seals and writes one stage's records; on failure the error and what each record was.
    async fn write_batch(
        &self,
        stage: &'static str,
        items: Vec<Item>,
    ) -> Result<(), (String, Vec<&'static str>)> {
        let whats: Vec<&'static str> = items.iter().map(|i| i.what).collect();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let source = format!("switchyard/{stage}");
        let mut events = Vec::with_capacity(items.len());
        let mut companions = Vec::new();
        for item in items {
            let id = uuid::Uuid::new_v4().simple().to_string();
            match audit_event(
                &source,
                &[&item.audit.decision, &id],
                &item.audit,
                None,
                &now,
            ) {
                Ok(ev) => events.push(ev),
                Err(e) => {
                    tracing::warn!(error = %e, record = item.what, "Could not write an audit record.");
                    continue;
                }
            }
            if let Some((topic, ev)) = item.companion {
                match self.emitter.emit(&topic, &ev) {
                    Ok(out) => companions.push(out),
                    Err(e) => {
                        tracing::warn!(error = %e, record = item.what, "Could not write a companion record.")
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        // Sealing fails while Redis is out of reach: tried again (the records wait in memory)
        // rather than dropped with a warning.
        let mut attempt = 0u32;
        let (records, sealed) = loop {
            match self
                .sealer
                .seal(stage, &self.sealer.own_chain, &self.emitter, &events)
                .await
            {
                Ok(r) => break r,
                // Only what may pass (Redis out of reach) is tried again.
                Err(e @ crate::error::ProcessError::Transient(_)) if attempt < SEAL_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "Could not seal audit records; trying again.");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err((e.to_string(), whats)),
            }
        };
        let trail: Vec<Output> = records.into_iter().chain(sealed.seals).collect();
        // A failed delivery (the broker out of reach for the producer's whole
        // `message.timeout.ms`) is tried again with the same bytes: a record delivered twice is a
        // repeat `audit verify` skips; one never delivered under a seal that is would be missing.
        let mut attempt = 0u32;
        loop {
            let failed = self
                .producer
                .send_all(&trail)
                .await
                .into_iter()
                .find_map(Result::err);
            match failed {
                None => break,
                Some(e) if attempt < SEND_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "Could not write audit records; writing them again.");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Some(e) => {
                    // The head moved past a seal that is not on the topic: the next seal writes
                    // it again.
                    sealed.watch.unsent();
                    return Err((e.to_string(), whats));
                }
            }
        }
        if let Some(Err(e)) = self
            .producer
            .send_all(&companions)
            .await
            .into_iter()
            .find(Result::is_err)
        {
            return Err((format!("a companion record: {e}"), whats));
        }
        Ok(())
    }
}

/// Times a batch's sealing is tried again (over about a minute) before its records are given up,
/// logged.
const SEAL_ATTEMPTS: u32 = 15;
/// Times a batch's records are written again after a failed delivery (each waits up to the
/// producer's `message.timeout.ms`).
const SEND_ATTEMPTS: u32 = 1;

/// 0.5 s, 1 s, 2 s, then 5 s between attempts.
fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis((250u64 << attempt.min(5)).min(5_000))
}
