//! The story of one event or one resource, read from the audit trail: the records in order and
//! one line of text for each (used by `switchyard trace`/`history` and the agent inbox).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};

use crate::event::CloudEvent;
use crate::kafka::config::KafkaConfig;
use crate::records::ProposalCounts;
use crate::schema::SchemaRegistry;

/// The audit records (not seals) on `topic` written since `since_ms` (milliseconds since the
/// epoch, found through the broker's time index), decoded, oldest first. Blocking: reads the topic.
pub fn audit_since(
    kafka: &KafkaConfig,
    topic: &str,
    schemas: &SchemaRegistry,
    since_ms: i64,
) -> Result<Vec<(CloudEvent, Value)>, String> {
    Ok(audit_since_where(kafka, topic, schemas, since_ms, |_| true, usize::MAX)?.0)
}

/// [`audit_since`], keeping only the records whose data `keep` takes — each record decoded and
/// dropped as it arrives, so memory holds what is kept, not the topic — and at most `max` of them
/// (the newest); with how many `keep` took in all.
pub fn audit_since_where(
    kafka: &KafkaConfig,
    topic: &str,
    schemas: &SchemaRegistry,
    since_ms: i64,
    keep: impl Fn(&Value) -> bool,
    max: usize,
) -> Result<(Vec<(CloudEvent, Value)>, usize), String> {
    let mut out: Vec<(CloudEvent, Value)> = Vec::new();
    let mut total = 0usize;
    crate::kafka::read::read_since_each(
        kafka,
        topic,
        since_ms,
        Duration::from_millis(1500),
        |r| {
            let Ok(mut ev) = crate::codec::decode(r.view(), schemas) else {
                return;
            };
            if ev.ty == super::SEAL_TYPE {
                return;
            }
            ev.data = ev.data.take().map(crate::records::audit_detail_as_json);
            let d = ev.data.clone().unwrap_or(Value::Null);
            if !keep(&d) {
                return;
            }
            total += 1;
            out.push((ev, d));
            // Past twice the cap, the oldest go (amortised: one sort and cut per `max` records).
            if out.len() >= max.saturating_mul(2).max(1024) {
                out.sort_by(|a, b| a.0.time.cmp(&b.0.time));
                let cut = out.len() - max;
                out.drain(..cut);
            }
        },
    )?;
    out.sort_by(|a, b| a.0.time.cmp(&b.0.time));
    if out.len() > max {
        let cut = out.len() - max;
        out.drain(..cut);
    }
    Ok((out, total))
}

/// The proposal counts an `agent_result` record's detail carries (results since they do).
fn counts(detail: &Value) -> Option<ProposalCounts> {
    serde_json::from_value(detail.get("proposal_counts")?.clone()).ok()
}

/// What became of the proposals of each task whose `agent_result` is among `recs` (an event's
/// story): as the agent stage counted them (refused by scope, held for a merge), then per proposal
/// the resolve decision in `recs` — accepted, rejected (with its reason), deduplicated, merged —
/// and for an approval requested, the person's verdict when it is there too (approved, declined,
/// expired, else awaiting approval); a proposal with no decision among `recs` is "not decided
/// yet". One JSON object per task: `task_id`, `agent`, `proposed`, `fates` (phrase → count) and
/// `summary`, the line `trace` prints.
pub fn proposal_fates<'a>(
    recs: impl IntoIterator<Item = &'a (CloudEvent, Value)> + Clone,
) -> Vec<Value> {
    let mut verdicts: HashMap<&str, &str> = HashMap::new();
    for (_, d) in recs.clone() {
        if let (Some(id), Some(st)) = (
            d["detail"]["approval_id"].as_str(),
            d["detail"]["status"].as_str(),
        ) {
            if d["stage"] == "approvals" {
                verdicts.insert(id, st);
            }
        }
    }
    let mut out = Vec::new();
    for (_, d) in recs.clone() {
        let (Some(task), "agent_result") =
            (d["task_id"].as_str(), d["decision"].as_str().unwrap_or(""))
        else {
            continue;
        };
        let x = &d["detail"];
        let sent: Vec<&str> = x["proposals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let c = counts(x);
        let proposed = c.map_or(sent.len() as u32, |c| c.proposed);
        if proposed == 0 {
            continue;
        }
        let mut decided: HashMap<&str, String> = HashMap::new();
        for (_, r) in recs.clone() {
            if r["stage"] != "resolve" || r["task_id"].as_str() != Some(task) {
                continue;
            }
            let Some(id) = r["detail"]["proposal_id"].as_str() else {
                continue;
            };
            let fate = match r["decision"].as_str().unwrap_or("") {
                "approval_requested" => {
                    match r["detail"]["approval_id"]
                        .as_str()
                        .and_then(|a| verdicts.get(a))
                    {
                        Some(&"approved") => "approved".to_string(),
                        Some(&"rejected") => "declined by a person".to_string(),
                        Some(&"expired") => "expired awaiting approval".to_string(),
                        _ => "awaiting approval".to_string(),
                    }
                }
                "rejected" => format!("rejected ({})", r["reason"].as_str().unwrap_or("?")),
                other => other.to_string(),
            };
            decided.insert(id, fate);
        }
        let mut fates: BTreeMap<String, u32> = BTreeMap::new();
        if let Some(c) = c {
            for (n, what) in [
                (c.refused, "refused (scope)"),
                (c.held, "held for the merge"),
            ] {
                if n > 0 {
                    *fates.entry(what.into()).or_default() += n;
                }
            }
        }
        for id in sent {
            let fate = decided
                .remove(id)
                .unwrap_or_else(|| "not decided yet".to_string());
            *fates.entry(fate).or_default() += 1;
        }
        let agent = x["ran"]
            .as_str()
            .unwrap_or_else(|| x["agent"].as_str().unwrap_or(""));
        let list: Vec<String> = fates.iter().map(|(f, n)| format!("{n} {f}")).collect();
        out.push(
            json!({"task_id": task, "agent": agent, "proposed": proposed, "fates": fates,
            "summary": format!("{task} ({agent}): {proposed} proposed: {}", list.join(", "))}),
        );
    }
    out
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
            "{} {} in {} ms ({} attempt(s)), {} finding(s), {}{}{}{}",
            s(&x["agent"]),
            s(&x["status"]),
            x["duration_ms"],
            x["attempts"],
            x["findings"].as_array().map_or(0, Vec::len),
            match counts(x) {
                Some(c) => c.summary(),
                None => format!(
                    "{} proposal(s)",
                    x["proposals"].as_array().map_or(0, Vec::len)
                ),
            },
            x["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|w| format!(" WARNING: {w}"))
                .collect::<String>(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(d: Value) -> (CloudEvent, Value) {
        (CloudEvent::new("a", "t", "switchyard.audit"), d)
    }

    /// An event's story tells what became of each task's proposals: counted by the agent stage,
    /// then decided by resolve and, for approvals, by people.
    #[test]
    fn proposal_fates_follow_each_proposal_to_its_decision() {
        let recs = [
            rec(
                json!({"decision": "agent_result", "stage": "agents", "task_id": "t1",
                "detail": {"agent": "sla", "proposals": ["p1", "p2", "p3", "p4"],
                           "proposal_counts": {"proposed": 5, "refused": 1, "rejected": 1, "to_resolve": 3},
                           "warnings": ["1 of 5 proposals rejected: no governance.access rule lets agent sla cause page on r"]}}),
            ),
            rec(
                json!({"decision": "accepted", "stage": "resolve", "task_id": "t1", "detail": {"proposal_id": "p1"}}),
            ),
            rec(
                json!({"decision": "rejected", "stage": "resolve", "task_id": "t1", "reason": "access",
                "detail": {"proposal_id": "p2"}}),
            ),
            rec(
                json!({"decision": "approval_requested", "stage": "resolve", "task_id": "t1",
                "detail": {"proposal_id": "p3", "approval_id": "apr-1"}}),
            ),
            rec(json!({"decision": "approval_decided", "stage": "approvals",
                "detail": {"approval_id": "apr-1", "status": "approved"}})),
            // A task without proposals is not listed.
            rec(
                json!({"decision": "agent_result", "stage": "agents", "task_id": "t2",
                "detail": {"agent": "x", "proposals": []}}),
            ),
        ];
        let f = proposal_fates(recs.iter());
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0]["summary"],
            "t1 (sla): 5 proposed: 1 accepted, 1 approved, 1 not decided yet, 1 refused (scope), 1 rejected (access)"
        );
        let l = line(None, &recs[0].0, &recs[0].1);
        let said = l["summary"].as_str().unwrap();
        assert!(
            said.contains("5 proposed: 1 refused (scope), 1 rejected (access), 3 to resolve")
                && said.contains("WARNING: 1 of 5 proposals rejected"),
            "{said}"
        );
    }
}
