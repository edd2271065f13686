//! `switchyard tail`: records of a topic as JSON lines; also the reader `audit verify` uses.

use std::time::{Duration, Instant};

use rdkafka::topic_partition_list::Offset;
use serde_json::{json, Map, Value};

use super::ctx::Ctx;
use crate::codec;
use crate::config::Loaded;
use crate::kafka::{Input, KafkaConfig};

#[derive(clap::Args)]
pub struct Args {
    pub topic: String,
    /// Start at the oldest record instead of new ones.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<usize>,
    /// Stop after this many milliseconds without a record.
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let opts = TailOptions {
        from_beginning: a.from_beginning,
        max: a.max,
        idle_timeout: a.idle_timeout_ms.map(Duration::from_millis),
    };
    let kafka = l.config.kafka.clone();
    tokio::task::spawn_blocking(move || tail(&kafka, &l, &a.topic, &opts))
        .await
        .map_err(|e| format!("tail failed: {e}"))?
        .map(|_| ())
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
    let consumer = crate::kafka::read::reader(kafka, topic, start)?;
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
