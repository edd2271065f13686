//! The story of one event or one resource, read from the audit trail: the records in order and
//! one line of text for each (used by `switchyard trace`/`history` and the agent inbox).

use std::time::Duration;

use serde_json::{json, Value};

use crate::event::CloudEvent;
use crate::kafka::config::KafkaConfig;
use crate::schema::SchemaRegistry;

/// The audit records (not seals) on `topic` written since `since_ms` (milliseconds since the
/// epoch, found through the broker's time index), decoded, oldest first. Blocking: reads the topic.
pub fn audit_since(
    kafka: &KafkaConfig,
    topic: &str,
    schemas: &SchemaRegistry,
    since_ms: i64,
) -> Result<Vec<(CloudEvent, Value)>, String> {
    let recs = crate::kafka::read::read_since(kafka, topic, since_ms, Duration::from_millis(1500))?;
    let mut out: Vec<(CloudEvent, Value)> = recs
        .iter()
        .filter_map(|r| crate::codec::decode(r.view(), schemas).ok())
        .filter(|ev| ev.ty != super::SEAL_TYPE)
        .map(|ev| {
            let d = ev.data.clone().unwrap_or(Value::Null);
            (ev, d)
        })
        .collect();
    out.sort_by(|a, b| a.0.time.cmp(&b.0.time));
    Ok(out)
}

/// One line of the story.
pub fn line(first: Option<&str>, ev: &CloudEvent, d: &Value) -> Value {
    let x = &d["detail"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let what = match d["decision"].as_str().unwrap_or("") {
        "routed" => format!(
            "routed to {} task(s){}",
            x["tasks"].as_array().map_or(0, Vec::len),
            x["workflow_runs"]
                .as_array()
                .map(|r| format!(", workflow runs {}", r.len()))
                .unwrap_or_default()
        ),
        "unrouted" => "no route matches".into(),
        "agent_result" => format!(
            "{} {} in {} ms ({} attempt(s)), {} finding(s), {} proposal(s){}{}",
            s(&x["agent"]),
            s(&x["status"]),
            x["duration_ms"],
            x["attempts"],
            x["findings"].as_array().map_or(0, Vec::len),
            x["proposals"].as_array().map_or(0, Vec::len),
            match x["held"].as_u64() {
                Some(n) if n > 0 => format!(" (+{n} handed to the workflow run)"),
                _ => String::new(),
            },
            x["ran"]
                .as_str()
                .map(|r| format!(", run by {r}"))
                .unwrap_or_default()
        ),
        "llm_call" => format!(
            "{} called {} ({} {}) tokens in {} out {}, cost {} {}, {} ms — {}",
            s(&x["agent"]),
            s(&x["model"]),
            s(&x["provider"]),
            s(&x["provider_model"]),
            x["input_tokens"],
            x["output_tokens"],
            x["cost"],
            s(&x["currency"]),
            x["latency_ms"],
            s(&x["outcome"])
        ),
        "tool_call" => format!(
            "{} used tool {} — {}",
            s(&x["agent"]),
            s(&x["tool"]),
            s(&x["outcome"])
        ),
        "accepted" | "rejected" | "approval_requested" | "deduplicated" | "merged" => format!(
            "{} {} by {}{}{}",
            s(&x["action"]),
            d["decision"].as_str().unwrap_or(""),
            s(&x["agent"]),
            x["rule"]
                .as_str()
                .map(|r| format!(" (rule {r})"))
                .unwrap_or_default(),
            x["detail"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(|t| format!(": {t}"))
                .unwrap_or_default()
        ),
        other => {
            let mut t = other.to_string();
            if let Some(r) = d["reason"].as_str() {
                t.push_str(&format!(" ({r})"));
            }
            let compact = x.to_string();
            if compact != "null" && compact != "{}" {
                t.push_str(&format!(
                    " {}",
                    compact.chars().take(160).collect::<String>()
                ));
            }
            t
        }
    };
    let at = ev.time.clone().unwrap_or_default();
    let offset = first
        .zip(Some(at.as_str()))
        .and_then(|(a, b)| {
            let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
            let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
            Some((b - a).num_milliseconds())
        })
        .unwrap_or(0);
    json!({"time": at, "after_ms": offset, "stage": d["stage"], "decision": d["decision"],
           "resource": d["resource"], "task_id": d["task_id"], "event_id": d["event_id"],
           "summary": what, "record": d})
}
