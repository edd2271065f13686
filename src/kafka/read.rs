//! Reading topics outside any consumer group (tail, audit verify, recovery), and the committed
//! offsets of switchyard's own groups.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

use super::{admin_config, Input, KafkaConfig};

/// A consumer assigned every partition of `topic` at `start` (no consumer group is joined).
pub fn reader(kafka: &KafkaConfig, topic: &str, start: Offset) -> Result<BaseConsumer, String> {
    reader_with(kafka, topic, start, false)
}

/// [`reader`], telling each partition's end when `eof` (`enable.partition.eof`: the fetch
/// responses' high watermark, which is right where a broker's ListOffsets answer may not be).
fn reader_with(
    kafka: &KafkaConfig,
    topic: &str,
    start: Offset,
    eof: bool,
) -> Result<BaseConsumer, String> {
    let mut cfg =
        crate::kafka::consumer_config(kafka, &format!("switchyard-read-{}", uuid::Uuid::new_v4()));
    cfg.set("enable.auto.commit", "false");
    if eof {
        cfg.set("enable.partition.eof", "true");
    }
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("cannot read metadata of {topic}: {e}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| format!("topic {topic} does not exist (run `switchyard topics apply`)"))?;
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), start)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("cannot assign partitions: {e}"))?;
    Ok(consumer)
}

/// Reads single records by place (outside any consumer group), with one consumer for all.
pub struct RecordReader {
    consumer: BaseConsumer,
}

impl RecordReader {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, String> {
        let mut cfg = crate::kafka::consumer_config(
            kafka,
            &format!("switchyard-read-{}", uuid::Uuid::new_v4()),
        );
        cfg.set("enable.auto.commit", "false");
        Ok(RecordReader {
            consumer: cfg
                .create()
                .map_err(|e| format!("cannot create consumer: {e}"))?,
        })
    }

    /// The record at `topic`/`partition`@`offset`; none when the partition no longer holds it
    /// (retention, compaction) or nothing came within `timeout`.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<Option<Input>, String> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| e.to_string())?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| format!("cannot assign {topic}[{partition}]: {e}"))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    if m.offset() == offset {
                        return Ok(Some(Input::from_message(&m, Arc::from(topic))));
                    }
                    if m.offset() > offset {
                        return Ok(None);
                    }
                }
                Some(Ok(_)) | None => {}
                Some(Err(e)) => return Err(format!("reading {topic}[{partition}]: {e}")),
            }
        }
        Ok(None)
    }
}

/// Reads every record of a topic from the beginning to the end each partition had when the read
/// got there (records written later are not waited for: a live topic is read as a snapshot). Fails
/// — never returns part of a topic — when a partition gives nothing for `patience` (at least 30 s)
/// before its end.
pub fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
    patience: Duration,
) -> Result<Vec<Input>, String> {
    let mut out = Vec::new();
    read_each(kafka, topic, patience, |r| out.push(r))?;
    // Topic order: per partition by offset (a resource's records share a partition).
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// [`read_all`], handing each record to `each` as it arrives (each partition's in offset order)
/// instead of holding them all: for a topic too large to keep in memory (the audit topic).
pub fn read_each(
    kafka: &KafkaConfig,
    topic: &str,
    patience: Duration,
    each: impl FnMut(Input),
) -> Result<(), String> {
    let consumer = reader_with(kafka, topic, Offset::Beginning, true)?;
    drain(&consumer, topic, patience, each)
}

/// Reads the records of a topic written at `since_ms` (milliseconds since the epoch) or later, on
/// every partition, until nothing arrives for `idle`: the broker's time index finds where to
/// start (a partition's beginning when it has no answer for it).
pub fn read_since(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    patience: Duration,
) -> Result<Vec<Input>, String> {
    let mut out = Vec::new();
    read_since_each(kafka, topic, since_ms, patience, |rec| out.push(rec))?;
    Ok(out)
}

/// [`read_since`], handing each record to `each` as it arrives instead of holding them all. An
/// error when the broker's time index does not answer (read from the beginning instead, a busy
/// audit topic kept a year was read whole into memory).
pub fn read_since_each(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    patience: Duration,
    mut each: impl FnMut(Input),
) -> Result<(), String> {
    let consumer = reader_with(kafka, topic, Offset::Beginning, true)?;
    let mut times = TopicPartitionList::new();
    if let Ok(assigned) = consumer.assignment() {
        for e in assigned.elements() {
            times
                .add_partition_offset(topic, e.partition(), Offset::Offset(since_ms))
                .map_err(|e| e.to_string())?;
        }
    }
    let found = consumer
        .offsets_for_times(times, Duration::from_secs(5))
        .map_err(|e| format!("the broker did not say where {topic} has records since then: {e}"))?;
    {
        let mut start = TopicPartitionList::new();
        for e in found.elements() {
            let at = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                // No record that late: nothing to read there.
                Offset::End => Offset::End,
                _ => Offset::Beginning,
            };
            start
                .add_partition_offset(topic, e.partition(), at)
                .map_err(|e| e.to_string())?;
        }
        if start.count() > 0 {
            consumer
                .assign(&start)
                .map_err(|e| format!("cannot assign partitions: {e}"))?;
        }
    }
    drain(&consumer, topic, patience, |rec| {
        if rec.timestamp_ms.is_none_or(|t| t >= since_ms) {
            each(rec);
        }
    })
}

/// The least a read waits for a partition that gives nothing before calling it stuck.
const MIN_PATIENCE: Duration = Duration::from_secs(30);

/// Polls `consumer` (made by [`reader_with`] with `eof`) until every assigned partition reached
/// its end — each is paused there, so a live topic ends — handing each record to `each`. An
/// error when nothing at all arrives for `patience` (at least [`MIN_PATIENCE`]) with partitions
/// not at their end: a partial read would pass for the whole topic (a recovery rebuilding from
/// it would write an older state as the current one).
fn drain(
    consumer: &BaseConsumer,
    topic: &str,
    patience: Duration,
    mut each: impl FnMut(Input),
) -> Result<(), String> {
    use rdkafka::error::KafkaError;
    let patience = patience.max(MIN_PATIENCE);
    let name: Arc<str> = Arc::from(topic);
    let mut open: std::collections::BTreeSet<i32> = consumer
        .assignment()
        .map_err(|e| format!("cannot read the assignment: {e}"))?
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    let mut last = Instant::now();
    while !open.is_empty() {
        if last.elapsed() >= patience {
            return Err(format!(
                "{topic}: partitions {open:?} gave nothing for {} s before their end (is the broker reachable and the partition led?); nothing was read in part",
                patience.as_secs()
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                each(Input::from_message(&m, name.clone()));
                last = Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if open.remove(&p) {
                    let mut at_end = TopicPartitionList::new();
                    at_end.add_partition(topic, p);
                    consumer
                        .pause(&at_end)
                        .map_err(|e| format!("cannot pause {topic}[{p}]: {e}"))?;
                }
                last = Instant::now();
            }
            Some(Err(e)) => return Err(format!("consumer error: {e}")),
            None => {}
        }
    }
    Ok(())
}

/// Committed offsets of consumer group `group` on every partition of `topics`: (topic, partition,
/// offset) where the group committed one.
pub fn committed(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[String],
) -> Result<Vec<(String, i32, i64)>, String> {
    Ok(positions(kafka, group, topics)?
        .into_iter()
        .filter_map(|(t, p, o)| Some((t, p, o?)))
        .collect())
}

/// Whether any partition of `topic` holds or held records (its high watermark is past 0); a topic
/// that does not exist holds none.
pub fn ever_written(kafka: &KafkaConfig, topic: &str) -> Result<bool, String> {
    let consumer: BaseConsumer = admin_config(kafka)
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    for mt in md.topics().iter().filter(|m| m.name() == topic) {
        match mt.error() {
            None => {}
            Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                return Ok(false)
            }
            Some(e) => return Err(format!("metadata of {topic}: {e:?}")),
        }
        for p in mt.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                .map_err(|e| format!("offsets of {topic}[{}]: {e}", p.id()))?;
            if high > 0 {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Every partition of `topics`, with `group`'s committed offset where it has one.
pub fn positions(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[String],
) -> Result<Vec<(String, i32, Option<i64>)>, String> {
    let mut cfg = admin_config(kafka);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(5))
            .map_err(|e| format!("metadata of {t}: {e}"))?;
        for mt in md.topics().iter().filter(|m| m.name() == t) {
            for p in mt.partitions() {
                tpl.add_partition(t, p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .map_err(|e| format!("committed offsets of {group}: {e}"))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let at = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.topic().to_string(), e.partition(), at)
        })
        .collect())
}
