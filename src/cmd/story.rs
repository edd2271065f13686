//! `switchyard trace EVENT_ID` and `switchyard history RESOURCE`: the story of one event or one
//! resource, in order, from the audit trail — every stage writes what it decided there (routing,
//! each task's result, every model and tool call, each resolve decision with its rule, approvals
//! and their verdicts, workflow steps). One topic is read, from `--since` on (the broker's time
//! index), not every topic.

use std::collections::BTreeSet;

use serde_json::Value;

use super::ctx::Ctx;

/// The audit records since `since` (`30m`, `2h`, `1d` or an RFC 3339 time).
pub(crate) fn audit_since(l: &Loaded, since: &str) -> Result<Vec<(CloudEvent, Value)>, String> {
    let t = super::dlq::since_time(since)?;
    crate::audit::story::audit_since(
        &l.config.kafka,
        &l.config.topics.audit,
        &l.schemas,
        t.timestamp_millis(),
    )
}
use crate::config::Loaded;
use crate::event::CloudEvent;

#[derive(clap::Args)]
pub struct TraceArgs {
    pub event_id: String,
    /// The event's tenant (event ids are unique per tenant and source): needed when the id is
    /// found in several.
    #[arg(long)]
    pub tenant: Option<String>,
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

/// Prints the records as the story's lines (times relative to the first).
fn print(recs: &[&(CloudEvent, Value)], json_out: bool) {
    let first = recs.first().and_then(|(ev, _)| ev.time.clone());
    let lines: Vec<Value> = recs
        .iter()
        .map(|(ev, d)| crate::audit::story::line(first.as_deref(), ev, d))
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
    // One tenant's story: two tenants' events may share an id. The tenant picks the event's own
    // records; its tasks', actions' and approvals' records follow by id (a model call's record
    // names the tenant of the key that made it).
    let of_event = |d: &Value| {
        d["event_id"] == a.event_id.as_str() && a.tenant.as_deref().is_none_or(|t| d["tenant"] == t)
    };
    if a.tenant.is_none() {
        let tenants: BTreeSet<&str> = recs
            .iter()
            .filter(|(_, d)| d["event_id"] == a.event_id.as_str())
            .filter_map(|(_, d)| d["tenant"].as_str())
            .collect();
        if tenants.len() > 1 {
            return Err(format!(
                "event {} is found in {} tenants ({}): give --tenant",
                a.event_id,
                tenants.len(),
                tenants.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    // The event's records, then the model and tool calls of its tasks.
    let tasks: BTreeSet<String> = recs
        .iter()
        .filter(|(_, d)| of_event(d))
        .filter_map(|(_, d)| d["task_id"].as_str().map(str::to_string))
        .chain(recs.iter().flat_map(|(_, d)| {
            (of_event(d) && d["decision"] == "routed")
                .then(|| d["detail"]["tasks"].as_array().cloned().unwrap_or_default())
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
        }))
        .collect();
    // Approvals and their verdicts name the action (and approval) the event's decisions made.
    let ids: BTreeSet<String> = recs
        .iter()
        .filter(|(_, d)| of_event(d))
        .flat_map(|(_, d)| {
            ["action_id", "approval_id"]
                .into_iter()
                .filter_map(|k| d["detail"][k].as_str().map(str::to_string))
        })
        .collect();
    let mine: Vec<&(CloudEvent, Value)> = recs
        .iter()
        .filter(|(_, d)| {
            of_event(d)
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
    if !a.json {
        let fates = crate::audit::story::proposal_fates(mine.iter().copied());
        if !fates.is_empty() {
            println!("proposals by task:");
            for f in &fates {
                println!("  {}", f["summary"].as_str().unwrap_or(""));
            }
        }
    }
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
