//! `switchyard publish`: CloudEvents built from flags or read as JSON from a file or stdin, written
//! structured, in binary mode or as Avro; `--raw` sends lines verbatim (to exercise dead letters).

use std::io::Read;

use serde_json::{json, Value};

use super::ctx::Ctx;
use crate::codec::{self, Encoding, CONTENT_TYPE_HEADER};
use crate::config::Loaded;
use crate::event::CloudEvent;
use crate::kafka::{producer_config, Output, Producer};

#[derive(clap::Args)]
pub struct Args {
    /// Topic to write to.
    #[arg(short, long)]
    pub topic: String,
    /// Read events from this file (`-` for stdin): one JSON object, a JSON array, or JSON lines.
    #[arg(short, long, conflicts_with_all = ["ty", "data"])]
    pub file: Option<String>,
    /// Event type, e.g. deployment.completed.
    #[arg(long = "type", required_unless_present = "file")]
    pub ty: Option<String>,
    /// Resource id the event is about (also the record key).
    #[arg(long)]
    pub subject: Option<String>,
    /// Event source.
    #[arg(long, default_value = "switchyard-cli")]
    pub source: String,
    /// Event id (default: a random UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// Event data as JSON.
    #[arg(long)]
    pub data: Option<String>,
    /// Tenant extension.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Encoding on the wire.
    #[arg(long, value_enum, default_value = "structured")]
    pub mode: Mode,
    /// Send each line of --file verbatim, unvalidated (to exercise the dead-letter path).
    #[arg(long, requires = "file")]
    pub raw: bool,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    if a.raw {
        let text = read_input(a.file.as_deref().unwrap_or("-"))?;
        return publish_raw(&l, &a.topic, a.subject.as_deref().unwrap_or(""), &text).await;
    }
    let events = match a.file {
        Some(f) => parse_events(&read_input(&f)?)?,
        None => {
            let mut ev = CloudEvent::new(
                a.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                a.source,
                a.ty.unwrap_or_default(),
            )
            .with_time_now();
            if let Some(s) = a.subject.clone() {
                ev = ev.with_subject(s);
            }
            if let Some(d) = a.data {
                let v: Value = serde_json::from_str(&d)
                    .map_err(|e| format!("--data is not valid JSON: {e}"))?;
                ev = ev.with_data(v);
            }
            if let Some(t) = a.tenant.clone() {
                ev = ev.with_extension("tenant", t);
            }
            codec::validate(&ev)
                .and_then(|_| codec::validate_input(&ev))
                .map_err(|e| e.to_string())?;
            vec![ev]
        }
    };
    let events: Vec<CloudEvent> = events
        .into_iter()
        .map(|mut e| {
            if e.subject.is_none() {
                e.subject = a.subject.clone();
            }
            e
        })
        .collect();
    publish(&l, &a.topic, &events, a.mode).await
}

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
