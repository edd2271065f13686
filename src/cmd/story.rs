//! `switchyard trace EVENT_ID` and `switchyard history RESOURCE`: the story of one event or one
//! resource, in order, from the audit trail — every stage writes what it decided there (routing,
//! each task's result, every model and tool call, each resolve decision with its rule, approvals
//! and their verdicts, workflow steps). One topic is read, from `--since` on (the broker's time
//! index), not every topic.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use super::ctx::Ctx;
use crate::config::Loaded;
use crate::event::CloudEvent;

#[derive(clap::Args)]
pub struct TraceArgs {
    pub event_id: String,
    /// How far back to look: `30m`, `2h`, `1d` or an RFC 3339 time.
    #[arg(long, default_value = "1d")]
    pub since: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    pub resource: String,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    #[arg(long, default_value = "1d")]
    pub since: String,
    #[arg(long)]
    pub json: bool,
}

/// The audit records (not seals) written since `since`, decoded, oldest first.
pub(crate) fn audit_since(l: &Loaded, since: &str) -> Result<Vec<(CloudEvent, Value)>, String> {
    let t = super::dlq::since_time(since)?;
    let recs = crate::kafka::read::read_since(
        &l.config.kafka,
        &l.config.topics.audit,
        t.timestamp_millis(),
        Duration::from_millis(1500),
    )?;
    let mut out: Vec<(CloudEvent, Value)> = recs
        .iter()
        .filter_map(|r| crate::codec::decode(r.view(), &l.schemas).ok())
        .filter(|ev| ev.ty != crate::audit::SEAL_TYPE)
        .map(|ev| {
            let d = ev.data.clone().unwrap_or(Value::Null);
            (ev, d)
        })
        .collect();
    out.sort_by(|a, b| a.0.time.cmp(&b.0.time));
    Ok(out)
}

/// One line of the story.
fn line(first: Option<&str>, ev: &CloudEvent, d: &Value) -> Value {
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

/// Prints the records as the story's lines (times relative to the first).
fn print(recs: &[&(CloudEvent, Value)], json_out: bool) {
    let first = recs.first().and_then(|(ev, _)| ev.time.clone());
    let lines: Vec<Value> = recs
        .iter()
        .map(|(ev, d)| line(first.as_deref(), ev, d))
        .collect();
    for l in &lines {
        if json_out {
            println!("{l}");
        } else {
            println!(
                "{}  +{:>6} ms  {:<9} {:<12} {}",
                l["time"].as_str().unwrap_or(""),
                l["after_ms"],
                l["stage"].as_str().unwrap_or(""),
                l["resource"].as_str().unwrap_or(""),
                l["summary"].as_str().unwrap_or("")
            );
        }
    }
    if !json_out {
        println!("{} records", lines.len());
    }
}

pub async fn trace(ctx: &Ctx, a: TraceArgs) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let since = a.since.clone();
    let recs = tokio::task::spawn_blocking(move || audit_since(&l, &since))
        .await
        .map_err(|e| e.to_string())??;
    // The event's records, then the model and tool calls of its tasks.
    let tasks: BTreeSet<String> = recs
        .iter()
        .filter(|(_, d)| d["event_id"] == a.event_id.as_str())
        .filter_map(|(_, d)| d["task_id"].as_str().map(str::to_string))
        .chain(recs.iter().flat_map(|(_, d)| {
            (d["event_id"] == a.event_id.as_str() && d["decision"] == "routed")
                .then(|| d["detail"]["tasks"].as_array().cloned().unwrap_or_default())
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
        }))
        .collect();
    // Approvals and their verdicts name the action (and approval) the event's decisions made.
    let ids: BTreeSet<String> = recs
        .iter()
        .filter(|(_, d)| d["event_id"] == a.event_id.as_str())
        .flat_map(|(_, d)| {
            ["action_id", "approval_id"]
                .into_iter()
                .filter_map(|k| d["detail"][k].as_str().map(str::to_string))
        })
        .collect();
    let mine: Vec<&(CloudEvent, Value)> = recs
        .iter()
        .filter(|(_, d)| {
            d["event_id"] == a.event_id.as_str()
                || d["task_id"].as_str().is_some_and(|t| tasks.contains(t))
                || ["action_id", "approval_id"]
                    .into_iter()
                    .any(|k| d["detail"][k].as_str().is_some_and(|x| ids.contains(x)))
        })
        .collect();
    if mine.is_empty() {
        return Err(format!(
            "no audit record of event {} since {} (try --since 7d)",
            a.event_id, a.since
        ));
    }
    print(&mine, a.json);
    Ok(())
}

pub async fn history(ctx: &Ctx, a: HistoryArgs) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let since = a.since.clone();
    let recs = tokio::task::spawn_blocking(move || audit_since(&l, &since))
        .await
        .map_err(|e| e.to_string())??;
    let mine: Vec<&(CloudEvent, Value)> = recs
        .iter()
        .filter(|(_, d)| d["resource"] == a.resource.as_str() && d["tenant"] == a.tenant.as_str())
        .collect();
    print(&mine, a.json);
    Ok(())
}
