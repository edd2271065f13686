//! `switchyard tail`: records of a topic as JSON lines or one readable summary line each
//! (`--format human`), optionally only one key's or one partition's.

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
    /// `json`: one JSON object per record; `human`: one summary line per record.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    /// Only records with this key (for switchyard's topics: the resource id).
    #[arg(long)]
    pub key: Option<String>,
    /// Only records of this partition.
    #[arg(long)]
    pub partition: Option<i32>,
}

/// How `tail` prints a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Human,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let opts = TailOptions {
        from_beginning: a.from_beginning,
        max: a.max,
        idle_timeout: a.idle_timeout_ms.map(Duration::from_millis),
        format: a.format,
        key: a.key.clone(),
        partition: a.partition,
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
    pub format: Format,
    /// Only records with this key.
    pub key: Option<String>,
    /// Only records of this partition.
    pub partition: Option<i32>,
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

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn j(v: &Value, k: &str) -> String {
    match v.get(k) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

/// At most `n` characters of `text`, with `…` when cut.
fn cut(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// One record as a readable line (what the demo prints): where it is, then what it says —
/// tasks, proposals, results, actions, approvals, workflow steps, tool calls, audit decisions
/// and dead letters each in their own words, any other event by type, subject and data.
pub fn human_line(loaded: &Loaded, rec: &Input) -> String {
    use crate::records::types;
    let at = format!("{}[{}]@{}", rec.topic, rec.partition, rec.offset);
    let header = |name: &str| {
        crate::kafka::dlq_headers::value(&rec.headers, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let dead = |what: String| {
        format!(
            "{at:<34} DEAD LETTER reason={} from {}@{}: {}",
            header(crate::kafka::dlq_headers::REASON).unwrap_or_else(|| "?".into()),
            header(crate::kafka::dlq_headers::SOURCE_TOPIC).unwrap_or_else(|| "?".into()),
            header(crate::kafka::dlq_headers::SOURCE_OFFSET).unwrap_or_else(|| "?".into()),
            cut(&what, 80)
        )
    };
    let ev = match codec::decode(rec.view(), &loaded.schemas) {
        Ok(ev) => ev,
        Err(_) if header(crate::kafka::dlq_headers::REASON).is_some() => {
            return dead(header(crate::kafka::dlq_headers::DETAIL).unwrap_or_default())
        }
        Err(e) => return format!("{at:<34} UNREADABLE {e}"),
    };
    if header(crate::kafka::dlq_headers::REASON).is_some() {
        return dead(header(crate::kafka::dlq_headers::DETAIL).unwrap_or_default());
    }
    let d = ev.data.clone().unwrap_or(Value::Null);
    let res = s(&d, "resource");
    match ev.ty.as_str() {
        types::TASK => {
            let src = d.get("event").cloned().unwrap_or(Value::Null);
            format!(
                "{at:<34} task {:<14} resource={res:<10} for {} ({})",
                s(&d, "agent"),
                s(&src, "type"),
                s(&src, "id")
            )
        }
        types::PROPOSAL => format!(
            "{at:<34} proposal {:<15} resource={res:<10} by {:<14} impact={} priority={} {}",
            s(&d, "action"),
            s(&d, "agent"),
            j(&d, "impact"),
            j(&d, "priority"),
            d.get("parameters").unwrap_or(&Value::Null)
        ),
        types::RELEASE => format!(
            "{at:<34} release {:<16} resource={res:<10} approved by {} ({})",
            s(&d, "action"),
            s(&d, "approved_by"),
            s(&d, "edit_of")
        ),
        types::RESULT => {
            let findings: Vec<&str> = d
                .get("findings")
                .and_then(Value::as_array)
                .map(|f| f.iter().map(|x| s(x, "key")).collect())
                .unwrap_or_default();
            // What became of the proposals (results written before counts: their number only).
            let r = serde_json::from_value::<crate::records::ResultData>(d.clone()).ok();
            let proposals = match r.as_ref().and_then(|r| r.proposal_counts) {
                Some(c) => c.summary(),
                None => d
                    .get("proposals")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
                    .to_string(),
            };
            let warnings: String = r
                .iter()
                .flat_map(|r| &r.warnings)
                .map(|w| format!(" WARNING: {w}"))
                .collect();
            format!(
                "{at:<34} result {:<14} resource={res:<10} {} in {} ms, findings: {}, proposals: {proposals}{warnings}",
                s(&d, "agent"),
                s(&d, "status"),
                j(&d, "duration_ms"),
                if findings.is_empty() {
                    "-".to_string()
                } else {
                    findings.join(",")
                },
            )
        }
        types::ACTION => format!(
            "{at:<34} ACTION {:<15} resource={res:<10} token={} {}{}",
            s(&d, "action"),
            j(&d, "fencing_token"),
            d.get("parameters").unwrap_or(&Value::Null),
            d.get("approved_by")
                .and_then(Value::as_str)
                .map(|b| format!(" approved by {b}"))
                .unwrap_or_default()
        ),
        types::APPROVAL => format!(
            "{at:<34} approval {:<9} {:<15} resource={res:<10} id={}",
            s(&d, "status"),
            s(&d, "action"),
            s(&d, "approval_id")
        ),
        types::AUDIT => {
            let det = crate::records::audit_detail_as_json(d.clone())
                .get("detail")
                .cloned()
                .unwrap_or(Value::Null);
            let reason = d.get("reason").and_then(Value::as_str);
            let extra = if det.get("proposal_id").is_some() {
                format!(
                    "{} from {}{}",
                    s(&det, "action"),
                    s(&det, "agent"),
                    reason
                        .map(|r| format!(" REASON={r}: {}", j(&det, "detail")))
                        .unwrap_or_default()
                )
            } else if det.get("approval_id").is_some() {
                format!(
                    "{} {} by {}",
                    s(&det, "action"),
                    s(&det, "status"),
                    s(&det, "decided_by")
                )
            } else if let Some(r) = reason {
                r.to_string()
            } else if det.get("agent").is_some() {
                format!("{} {}", s(&det, "agent"), j(&det, "status"))
            } else {
                j(&det, "routes")
            };
            format!(
                "{at:<34} audit {:<18} resource={res:<10} {extra}",
                s(&d, "decision")
            )
        }
        "switchyard.workflow" => format!(
            "{at:<34} {} {} {:<18} {} {} {}",
            s(&d, "workflow"),
            cut(s(&d, "run_id"), 16),
            s(&d, "kind"),
            j(&d, "step"),
            j(&d, "agent"),
            j(&d, "status")
        ),
        "switchyard.tool_call" => {
            let c = d.get("call").cloned().unwrap_or(Value::Null);
            format!(
                "{at:<34} tool {:<20} by {:<17} {:<9} {}",
                s(&c, "tool"),
                s(&d, "agent"),
                s(&c, "outcome"),
                cut(&j(&c, "arguments"), 80)
            )
        }
        other => format!(
            "{at:<34} {other} subject={} id={} {}",
            ev.subject.as_deref().unwrap_or("-"),
            ev.id,
            cut(&d.to_string(), 120)
        ),
    }
}

/// Prints records of a topic, as JSON lines or summary lines. Reads partitions directly (no
/// consumer group).
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
    if let Some(p) = opts.partition {
        use rdkafka::consumer::Consumer;
        let all = consumer.assignment().map_err(|e| e.to_string())?;
        let count = all.count() as i32;
        if p < 0 || p >= count {
            return Err(format!(
                "topic {topic} has partitions 0 to {}; there is no partition {p}",
                count - 1
            ));
        }
        let mut one = rdkafka::TopicPartitionList::new();
        one.add_partition_offset(topic, p, start)
            .map_err(|e| e.to_string())?;
        consumer
            .assign(&one)
            .map_err(|e| format!("cannot assign partition {p}: {e}"))?;
    }
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
                last = Instant::now();
                if opts
                    .key
                    .as_ref()
                    .is_some_and(|k| rec.key.as_deref() != Some(k.as_bytes()))
                {
                    continue;
                }
                match opts.format {
                    Format::Json => println!("{}", record_json(loaded, &rec)),
                    Format::Human => println!("{}", human_line(loaded, &rec)),
                }
                n += 1;
            }
            Some(Err(e)) => return Err(format!("consumer error: {e}")),
        }
    }
    Ok(n)
}
