//! The small commands: `publish` and `tail`.

use std::io::Read;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Map, Value};

use crate::codec::{self, Encoding, CONTENT_TYPE_HEADER};
use crate::config::{KafkaConfig, Loaded};
use crate::event::CloudEvent;
use crate::kafka::{producer_config, Input, Output, Producer};

/// Parses one or more events: a JSON object, a JSON array of objects, or JSON lines.
pub fn parse_events(text: &str) -> Result<Vec<CloudEvent>, String> {
    let trimmed = text.trim_start();
    let values: Vec<(String, Value)> = if trimmed.starts_with('[') {
        let v: Vec<Value> =
            serde_json::from_str(text).map_err(|e| format!("input is not a JSON array: {e}"))?;
        v.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("item {}", i + 1), v))
            .collect()
    } else {
        let mut out = Vec::new();
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        for (i, v) in stream.enumerate() {
            out.push((
                format!("event {}", i + 1),
                v.map_err(|e| format!("event {}: not valid JSON: {e}", i + 1))?,
            ));
        }
        out
    };
    let mut events = Vec::new();
    for (label, v) in values {
        let mut obj = match v {
            Value::Object(o) => o,
            _ => return Err(format!("{label}: not a JSON object")),
        };
        obj.entry("specversion").or_insert_with(|| json!("1.0"));
        let payload = serde_json::to_vec(&obj).map_err(|e| format!("{label}: {e}"))?;
        let ev = codec::decode(
            codec::RecordView {
                key: None,
                payload: &payload,
                headers: &[],
            },
            &Default::default(),
        )
        .map_err(|e| format!("{label}: {e}"))?;
        events.push(ev);
    }
    Ok(events)
}

/// How `publish` writes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Structured JSON (`application/cloudevents+json`).
    Structured,
    /// Kafka binary mode: `ce_*` headers, JSON data as the payload.
    Binary,
    /// Avro single-object encoding of the topic's envelope schema.
    Avro,
}

/// Builds the record for an event in the chosen mode.
pub fn record_for(
    loaded: &Loaded,
    topic: &str,
    ev: &CloudEvent,
    mode: Mode,
) -> Result<Output, String> {
    let key = ev.subject.clone().unwrap_or_default();
    match mode {
        Mode::Structured => {
            let enc = codec::encode(ev, Encoding::Json, None, &loaded.schemas)
                .map_err(|e| e.to_string())?;
            Ok(Output::new(topic, key, enc.payload).header(CONTENT_TYPE_HEADER, enc.content_type))
        }
        Mode::Avro => {
            let schema = loaded
                .topics
                .get(topic)
                .and_then(|d| d.schema.clone())
                .ok_or_else(|| format!("topic {topic} has no schema in its definition"))?;
            let enc = codec::encode(ev, Encoding::Avro, Some(&schema), &loaded.schemas)
                .map_err(|e| e.to_string())?;
            Ok(Output::new(topic, key, enc.payload).header(CONTENT_TYPE_HEADER, enc.content_type))
        }
        Mode::Binary => {
            let mut out = Output::new(
                topic,
                key,
                ev.data
                    .as_ref()
                    .map(|d| d.to_string().into_bytes())
                    .unwrap_or_default(),
            );
            let mut attrs = serde_json::to_value(ev).map_err(|e| e.to_string())?;
            if let Some(obj) = attrs.as_object_mut() {
                obj.remove("data");
                let ct = obj.remove("datacontenttype");
                out = out.header(
                    CONTENT_TYPE_HEADER,
                    ct.as_ref()
                        .and_then(Value::as_str)
                        .unwrap_or("application/json"),
                );
                for (k, v) in obj.iter() {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out = out.header(format!("ce_{k}"), s);
                }
            }
            Ok(out)
        }
    }
}

/// Reads `--file` (or stdin for `-`).
pub fn read_input(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
    }
}

/// Sends events and prints where each landed.
pub async fn publish(
    loaded: &Loaded,
    topic: &str,
    events: &[CloudEvent],
    mode: Mode,
) -> Result<(), String> {
    let producer = Producer::new(&producer_config(&loaded.config.kafka))
        .map_err(|e| format!("cannot create producer: {e}"))?;
    for ev in events {
        let out = record_for(loaded, topic, ev, mode)?;
        let (p, o) = producer
            .send(&out)
            .await
            .map_err(|e| format!("sending {} to {topic} failed: {e}", ev.id))?;
        println!(
            "sent {} ({}, subject {}) to {topic}[{p}]@{o}",
            ev.id,
            ev.ty,
            ev.subject.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// Sends each non-empty line verbatim, keyed by `key`.
pub async fn publish_raw(
    loaded: &Loaded,
    topic: &str,
    key: &str,
    text: &str,
) -> Result<(), String> {
    let producer = Producer::new(&producer_config(&loaded.config.kafka))
        .map_err(|e| format!("cannot create producer: {e}"))?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let out = Output::new(topic, key, line.as_bytes().to_vec());
        let (p, o) = producer
            .send(&out)
            .await
            .map_err(|e| format!("sending to {topic} failed: {e}"))?;
        println!("sent {} raw bytes to {topic}[{p}]@{o}", line.len());
    }
    Ok(())
}

/// Options of `tail`.
pub struct TailOptions {
    pub from_beginning: bool,
    pub max: Option<usize>,
    /// Stop after this long without a record (None: run until interrupted).
    pub idle_timeout: Option<Duration>,
}

/// One record as `tail` prints it.
pub fn record_json(loaded: &Loaded, rec: &Input) -> Value {
    let mut o = Map::new();
    o.insert("topic".into(), json!(&*rec.topic));
    o.insert("partition".into(), json!(rec.partition));
    o.insert("offset".into(), json!(rec.offset));
    o.insert(
        "key".into(),
        json!(rec.key.as_deref().map(String::from_utf8_lossy)),
    );
    let sy: Map<String, Value> = rec
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("switchyard."))
        .map(|(k, v)| (k.clone(), json!(String::from_utf8_lossy(v))))
        .collect();
    if !sy.is_empty() {
        o.insert("headers".into(), Value::Object(sy));
    }
    match codec::decode(rec.view(), &loaded.schemas) {
        Ok(ev) => {
            o.insert(
                "event".into(),
                serde_json::to_value(ev).unwrap_or(Value::Null),
            );
        }
        Err(e) => {
            o.insert("error".into(), json!(e.to_string()));
            o.insert(
                "payload".into(),
                json!(String::from_utf8_lossy(&rec.payload)),
            );
        }
    }
    Value::Object(o)
}

/// A consumer assigned every partition of `topic` at `start` (no consumer group is joined).
fn reader(kafka: &KafkaConfig, topic: &str, start: Offset) -> Result<BaseConsumer, String> {
    let mut cfg =
        crate::kafka::consumer_config(kafka, &format!("switchyard-read-{}", uuid::Uuid::new_v4()));
    cfg.set("enable.auto.commit", "false");
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

/// Prints records of a topic as JSON lines. Reads partitions directly (no consumer group).
pub fn tail(
    kafka: &KafkaConfig,
    loaded: &Loaded,
    topic: &str,
    opts: &TailOptions,
) -> Result<usize, String> {
    let start = if opts.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    let consumer = reader(kafka, topic, start)?;
    let name: std::sync::Arc<str> = std::sync::Arc::from(topic);
    let mut n = 0;
    let mut last = Instant::now();
    loop {
        if opts.max.is_some_and(|m| n >= m) {
            break;
        }
        if opts.idle_timeout.is_some_and(|t| last.elapsed() >= t) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let rec = Input::from_message(&m, name.clone());
                println!("{}", record_json(loaded, &rec));
                n += 1;
                last = Instant::now();
            }
            Some(Err(e)) => return Err(format!("consumer error: {e}")),
        }
    }
    Ok(n)
}

/// Reads every record of a topic from the beginning until nothing arrives for `idle`.
pub fn read_all(kafka: &KafkaConfig, topic: &str, idle: Duration) -> Result<Vec<Input>, String> {
    let consumer = reader(kafka, topic, Offset::Beginning)?;
    let name: std::sync::Arc<str> = std::sync::Arc::from(topic);
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(Input::from_message(&m, name.clone()));
                last = Instant::now();
            }
            Some(Err(e)) => return Err(format!("consumer error: {e}")),
            None => {}
        }
    }
    // Topic order: per partition by offset (a resource's records share a partition).
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}
