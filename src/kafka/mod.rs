//! Kafka plumbing shared by every stage: client settings, records, the producer, and the
//! commit-safe consumer runtime ([`runtime`]).

pub mod acks;
pub mod config;
pub mod read;
pub mod runtime;
pub mod topic_id;

pub use config::{
    admin_config, consumer_config, producer_config, run_producer_config, stage_consumer_config,
    KafkaConfig,
};

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};

use crate::codec::RecordView;

/// A record read from Kafka, owned.
#[derive(Debug, Clone)]
pub struct Input {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Kafka timestamp (milliseconds since the epoch), when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// The payload's size in the broker; larger than `payload.len()` when only a prefix was kept.
    pub payload_size: usize,
    /// The key's and headers' bytes in the broker (with the payload, what `max_record_bytes`
    /// bounds); only a prefix of them is kept when they are larger than a stage accepts.
    pub other_size: usize,
    /// The key's size in the broker (only a prefix is kept past a stage's cap).
    pub key_size: usize,
    /// Headers not kept (past a stage's cap): a dead letter says so, and `dlq redrive` refuses it.
    pub headers_dropped: usize,
    /// Set by the consumer runtime: the last offset of the record's partition up to which every
    /// record is done (outputs delivered), -1 while none is ([`crate::store::Place`]).
    pub delivered: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// Set by the consumer runtime: the id of the topic the record was read from, when the broker
    /// gives topic ids ([`topic_id`]: the incarnation the stages' offset fences are written for).
    pub topic_id: Option<Arc<str>>,
    /// Set by the consumer runtime: cancelled when the record's partition was revoked and its
    /// drain timed out — the next owner has the record, and nothing done with it here will be
    /// written ([`Input::is_revoked`]).
    pub revoked: Option<tokio_util::sync::CancellationToken>,
}

impl Input {
    /// Whether the record's partition was taken away while it was worked on (see the field): a
    /// stage about to take something only it should hand out (a fencing token) stops here, as
    /// its outputs would be dropped and the next owner's written later.
    pub fn is_revoked(&self) -> bool {
        self.revoked.as_ref().is_some_and(|c| c.is_cancelled())
    }
}

/// The headers of a fetched record, names as text (lossy) and values as bytes. librdkafka takes any
/// bytes as a header name, and rdkafka's own reader (`Headers::iter`) panics on a name that is not
/// UTF-8 — one such record from a non-Java producer killed the stage's poll thread, then every
/// group member's in turn — so they are read here through librdkafka's C API.
///
/// With their total size (names and values) and how many were not kept: headers past `cap` bytes
/// are counted, not copied.
fn raw_headers(m: &BorrowedMessage<'_>, cap: usize) -> (Vec<(String, Vec<u8>)>, usize, usize) {
    use rdkafka::bindings as rd;
    let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut out = Vec::new();
    let (mut total, mut dropped) = (0usize, 0usize);
    // SAFETY: `m` is a live message for the whole call; librdkafka owns its headers, and the
    // name and value pointers it hands out stay valid while the message lives (each is copied
    // at once). A null name or value is read as empty; `size` is the value's length in bytes.
    unsafe {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) != ok || hdrs.is_null() {
            return (out, 0, 0);
        }
        let n = rd::rd_kafka_header_cnt(hdrs);
        out.reserve(n.min(1024));
        for i in 0..n {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size = 0usize;
            if rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size) != ok {
                break;
            }
            let name = if name.is_null() {
                &[][..]
            } else {
                std::ffi::CStr::from_ptr(name).to_bytes()
            };
            let value = if value.is_null() || size == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(value.cast::<u8>(), size)
            };
            total = total.saturating_add(name.len() + value.len());
            if total <= cap {
                out.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
            } else {
                dropped += 1;
            }
        }
    }
    (out, total, dropped)
}

impl Input {
    /// A record with a whole payload (tests, tools).
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Vec<u8>,
    ) -> Self {
        Input {
            topic: Arc::from(topic),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            payload_size: payload.len(),
            other_size: key.map_or(0, <[u8]>::len),
            key_size: key.map_or(0, <[u8]>::len),
            headers_dropped: 0,
            payload,
            headers: Vec::new(),
            timestamp_ms: None,
            delivered: None,
            topic_id: None,
            revoked: None,
        }
    }

    /// Whether only a prefix of the payload was kept (the record is larger than a stage accepts).
    pub fn is_cut(&self) -> bool {
        self.payload_size > self.payload.len()
    }

    /// The record's size in the broker: payload, key and headers.
    pub fn size(&self) -> usize {
        self.payload_size.saturating_add(self.other_size)
    }

    pub fn from_message(m: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        Self::from_message_capped(m, topic, usize::MAX)
    }

    /// Like [`Input::from_message`], keeping at most `cap` bytes of the payload: a record larger
    /// than a stage accepts is only dead-lettered, so a copy of all of it (which may be hundreds of
    /// megabytes) is never made.
    /// The key and headers count toward `cap` too (a record with a small payload and a key of
    /// hundreds of megabytes is as large): past it only a prefix of them is kept.
    pub fn from_message_capped(m: &BorrowedMessage<'_>, topic: Arc<str>, cap: usize) -> Self {
        let key = m.key();
        let key_size = key.map_or(0, <[u8]>::len);
        let (headers, header_size, headers_dropped) = raw_headers(m, cap);
        let payload = m.payload().unwrap_or_default();
        Input {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: key.map(|k| k[..k.len().min(cap)].to_vec()),
            payload: payload[..payload.len().min(cap)].to_vec(),
            payload_size: payload.len(),
            other_size: key_size.saturating_add(header_size),
            key_size,
            headers_dropped,
            headers,
            timestamp_ms: m.timestamp().to_millis(),
            delivered: None,
            topic_id: None,
            revoked: None,
        }
    }

    /// A lane per record key: stages keyed by resource use it so one resource's records run in order.
    pub fn key_lane(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.key.hash(&mut h);
        h.finish()
    }

    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            key: self.key.as_deref(),
            payload: &self.payload,
            headers: &self.headers,
        }
    }
}

/// A record to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, payload: Vec<u8>) -> Self {
        Output {
            topic: topic.into(),
            key: Some(key.into()),
            payload,
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, k: impl Into<String>, v: impl Into<Vec<u8>>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// Header names of dead-letter records.
pub mod dlq_headers {
    /// A dead-letter header's value: its last, since a dead letter's own headers are appended after
    /// the input's (which earlier builds kept even when they had these names).
    pub fn value<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
        headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Header a redriven record carries: the dead letter it came from (`<partition>@<offset>`).
    pub const REDRIVEN_FROM: &str = "switchyard.redriven.from";
    /// And the delivery that dead letter was written for (`<topic>:<partition>:<offset>`).
    pub const REDRIVEN_SOURCE: &str = "switchyard.redriven.source";
    pub const REASON: &str = "switchyard.dlq.reason";
    pub const DETAIL: &str = "switchyard.dlq.detail";
    pub const STAGE: &str = "switchyard.dlq.stage";
    pub const SOURCE_TOPIC: &str = "switchyard.dlq.source.topic";
    pub const SOURCE_PARTITION: &str = "switchyard.dlq.source.partition";
    pub const SOURCE_OFFSET: &str = "switchyard.dlq.source.offset";
    pub const TIME: &str = "switchyard.dlq.time";
    /// Present when the payload was cut to `max_record_bytes`: the original size.
    pub const TRUNCATED: &str = "switchyard.dlq.truncated";
    /// Present when the key was cut to [`super::DLQ_KEY_CAP`]: the original size.
    pub const KEY_TRUNCATED: &str = "switchyard.dlq.key.truncated";
    /// Present when some of the input's headers were left out ([`super::DLQ_HEADERS_CAP`]): how many.
    pub const HEADERS_DROPPED: &str = "switchyard.dlq.headers.dropped";
}

/// Dead-letter payloads are cut to at most this, so the copy fits common broker limits (1 MB) with
/// its headers.
pub const DLQ_PAYLOAD_CAP: usize = 512 * 1024;
/// A dead letter keeps at most this much of the input's key ...
pub const DLQ_KEY_CAP: usize = 1024;
/// ... and of its headers (names and values; the ones past it are left out, whole), so a record
/// with a huge key or headers still fits the dead-letter topic (it would otherwise stop the stage
/// on every start).
pub const DLQ_HEADERS_CAP: usize = 64 * 1024;

/// The dead-letter record for an input: original key, payload (cut to `max_bytes`, at most
/// [`DLQ_PAYLOAD_CAP`]) and headers, plus headers giving the reason and where the record came from.
pub fn dead_letter(
    dlq_topic: &str,
    stage: &str,
    rec: &Input,
    reason: &str,
    detail: &str,
    max_bytes: usize,
) -> Output {
    use dlq_headers::*;
    let max_bytes = max_bytes.min(DLQ_PAYLOAD_CAP);
    let truncated = rec.payload_size > max_bytes;
    // The input's own headers go along, except any that look like ours: whoever can write to an
    // input topic could otherwise name the topic `dlq redrive` sends the record to (a forged
    // approval decision, a task of another tenant).
    let (mut headers, mut kept, mut dropped) = (Vec::new(), 0usize, rec.headers_dropped);
    for (k, v) in rec
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("switchyard.dlq."))
    {
        if kept + k.len() + v.len() > DLQ_HEADERS_CAP {
            dropped += 1;
        } else {
            kept += k.len() + v.len();
            headers.push((k.clone(), v.clone()));
        }
    }
    let key = rec
        .key
        .as_ref()
        .map(|k| k[..k.len().min(DLQ_KEY_CAP)].to_vec());
    let key_size = rec.key_size.max(rec.key.as_ref().map_or(0, Vec::len));
    let key_cut = key_size > DLQ_KEY_CAP;
    let mut add = |k: &str, v: String| headers.push((k.to_string(), v.into_bytes()));
    add(REASON, reason.to_string());
    // Details can quote input; keep them bounded.
    add(DETAIL, detail.chars().take(1024).collect());
    add(STAGE, stage.to_string());
    add(SOURCE_TOPIC, rec.topic.to_string());
    add(SOURCE_PARTITION, rec.partition.to_string());
    add(SOURCE_OFFSET, rec.offset.to_string());
    add(TIME, crate::event::now_rfc3339());
    if truncated {
        add(TRUNCATED, rec.payload_size.to_string());
    }
    if key_cut {
        add(KEY_TRUNCATED, key_size.to_string());
    }
    if dropped > 0 {
        add(HEADERS_DROPPED, dropped.to_string());
    }
    Output {
        topic: dlq_topic.to_string(),
        key,
        payload: rec.payload[..rec.payload.len().min(max_bytes)].to_vec(),
        headers,
    }
}

/// Why a produce could not even be queued.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The record can never be written (too large for the broker or client, unknown topic, ...).
    #[error("record for {topic} rejected: {source}")]
    Rejected { topic: String, source: KafkaError },
}

/// Where a delivery report goes: a stage's record tracking (no task or channel per record), or one
/// waiting caller.
pub enum Notice {
    Sink(Arc<dyn Delivered>),
    Waiter(tokio::sync::oneshot::Sender<Result<(i32, i64), KafkaError>>),
}

/// Something told when a record it queued was delivered (or failed for good).
pub trait Delivered: Send + Sync {
    /// `result` is the (partition, offset) written, or the error librdkafka gave up with.
    fn delivered(&self, topic: &str, result: Result<(i32, i64), KafkaError>);
}

/// Routes librdkafka's delivery reports (on its polling thread) to their [`Notice`].
pub struct DeliveryContext;

impl rdkafka::ClientContext for DeliveryContext {
    /// librdkafka statistics (only `switchyard run`'s producer asks for them): the record batches
    /// sent per topic since the last report, and the records in them (librdkafka rolls its windows
    /// over at each report; a retried batch counts again).
    fn stats(&self, stats: rdkafka::Statistics) {
        let m = &crate::telemetry::METRICS;
        for (name, topic) in &stats.topics {
            let (Ok(batches), Ok(records)) = (
                u64::try_from(topic.batchcnt.cnt),
                u64::try_from(topic.batchcnt.sum),
            ) else {
                continue;
            };
            if batches > 0 {
                m.produce_batches.with_label_values(&[name]).inc_by(batches);
                m.produce_batched_records
                    .with_label_values(&[name])
                    .inc_by(records);
            }
        }
    }
}

impl rdkafka::producer::ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Notice>;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, notice: Box<Notice>) {
        let (topic, outcome) = match result {
            Ok(m) => (m.topic(), Ok((m.partition(), m.offset()))),
            Err((e, m)) => (m.topic(), Err(e.clone())),
        };
        match *notice {
            Notice::Sink(s) => s.delivered(topic, outcome),
            Notice::Waiter(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// The `max.message.bytes` of the topics switchyard writes, as read from the brokers at start
/// (`switchyard run`): a record larger than its topic takes is refused before it is queued — as
/// too large, so a stage dead-letters its input (`output_too_large`) — instead of failing its
/// delivery, which would stop the stage at every restart. Topics not read have no limit here (the
/// producer's own `message.max.bytes` still applies). Cheap to clone; shared.
#[derive(Clone, Default)]
pub struct TopicLimits(Arc<std::sync::RwLock<std::collections::HashMap<String, usize>>>);

impl TopicLimits {
    /// Sets the topics' `max.message.bytes`.
    pub fn set(&self, limits: impl IntoIterator<Item = (String, usize)>) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        m.extend(limits);
    }

    /// `topic`'s `max.message.bytes` as last read, when it was.
    pub fn configured(&self, topic: &str) -> Option<usize> {
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        m.get(topic).copied()
    }

    /// The most a record for `topic` may take (payload, key and headers), when its topic's limit
    /// is known: its `max.message.bytes` less the batch's framing.
    pub fn of(&self, topic: &str) -> Option<usize> {
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        m.get(topic)
            .map(|l| l.saturating_sub(config::BATCH_FRAMING_BYTES))
    }

    /// Whether `out` is larger than its topic takes.
    pub fn too_large(&self, out: &Output) -> bool {
        self.of(&out.topic)
            .is_some_and(|max| record_size(out) > max)
    }

    /// The first of `outs` too large to write — over `max_output` (the producer's limit) with
    /// `overhead` bytes added for its framing, or over its topic's limit — with the most a record
    /// for its topic may be: what a stage measures before committing to a decision.
    pub fn first_too_large<'a>(
        &self,
        outs: &'a [Output],
        max_output: usize,
        overhead: usize,
    ) -> Option<(&'a Output, usize)> {
        outs.iter()
            .find(|o| record_size(o) + overhead > max_output || self.too_large(o))
            .map(|o| (o, self.of(&o.topic).unwrap_or(max_output).min(max_output)))
    }
}

/// What a record takes against a topic's `max.message.bytes`: payload, key and headers (the
/// batch's framing aside).
pub fn record_size(out: &Output) -> usize {
    out.payload.len()
        + out.key.as_ref().map_or(0, Vec::len)
        + out
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// The shared producer. Cheap to clone. Delivery reports come back through [`Notice`]s on the
/// producer's own polling thread.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<ThreadedProducer<DeliveryContext>>,
    limits: TopicLimits,
}

impl Producer {
    pub fn new(cfg: &ClientConfig) -> Result<Self, KafkaError> {
        Ok(Producer {
            inner: Arc::new(cfg.create_with_context(DeliveryContext)?),
            limits: TopicLimits::default(),
        })
    }

    /// The topics' limits this producer checks records against (shared with its clones).
    pub fn limits(&self) -> TopicLimits {
        self.limits.clone()
    }

    /// Queues a record, waiting while the local queue is full; its delivery is reported to
    /// `notice`. `on_queue_full` is called for each wait (for metrics). On an error the record was
    /// not queued and `notice` hears nothing.
    pub async fn enqueue(
        &self,
        out: &Output,
        notice: Notice,
        mut on_queue_full: impl FnMut(),
    ) -> Result<(), ProduceError> {
        if self.limits.too_large(out) {
            return Err(ProduceError::Rejected {
                topic: out.topic.clone(),
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            });
        }
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (k, v) in &out.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8], Box<Notice>> =
            BaseRecord::with_opaque_to(&out.topic, Box::new(notice))
                .payload(out.payload.as_slice())
                .headers(headers);
        if let Some(k) = &out.key {
            rec = rec.key(k.as_slice());
        }
        loop {
            match self.inner.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    on_queue_full();
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(ProduceError::Rejected {
                        topic: out.topic.clone(),
                        source: e,
                    })
                }
            }
        }
    }

    /// Queues a record and waits for the broker's acknowledgement.
    pub async fn send(&self, out: &Output) -> Result<(i32, i64), KafkaError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(out, Notice::Waiter(tx), || {})
            .await
            .map_err(|e| match e {
                ProduceError::Rejected { source, .. } => source,
            })?;
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }

    /// Queues `outs` in their order, then waits for every acknowledgement; one result per record.
    pub async fn send_all(&self, outs: &[Output]) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut waiting = Vec::with_capacity(outs.len());
        for out in outs {
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.push(match self.enqueue(out, Notice::Waiter(tx), || {}).await {
                Ok(()) => Ok(rx),
                Err(ProduceError::Rejected { source, .. }) => Err(source),
            });
        }
        let mut results = Vec::with_capacity(waiting.len());
        for w in waiting {
            results.push(match w {
                Ok(rx) => rx.await.unwrap_or(Err(KafkaError::Canceled)),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Waits until queued records are delivered (or the timeout passes).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}

/// True when a broker or client error means the record itself is too large.
pub fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}
