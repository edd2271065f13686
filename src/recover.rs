//! Rebuilding Redis from the Kafka topics after Redis lost its data (`switchyard recover`).
//!
//! Redis must be durable (AOF). If it restarted empty anyway, switchyard notices (the epoch marker
//! is gone) and processes nothing; this rebuilds what the topics hold, then writes a new epoch
//! marker, and every instance resumes:
//!
//! - each audit chain's head: its highest seal on the audit topic, so chains continue without a
//!   fork;
//! - pending approvals: the latest record of each approval on the approvals topic that is still
//!   pending or escalated, back in the API, the sweeper's index and the resource's state;
//! - the resolve state: each resource's highest fencing token, and the actions accepted within the
//!   conflict window (so conflicts, dedupe and cooldowns keep holding);
//! - the shared context: each resource's facts, from the findings on the results topic (latest value
//!   per key).
//!
//! Not rebuilt (they are not on any topic): recorded task outcomes and decisions by proposal id (a
//! record redelivered after recovery is processed again), budgets spent in the current period, agent
//! health counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::audit::ChainStore;
use crate::codec;
use crate::config::Loaded;
use crate::context::{ContextStore, Fact, Outcome};
use crate::event::{now_secs, CloudEvent};
use crate::records::{ActionData, AgentResponse, ApprovalData, ProposalData, ResultData};
use crate::resolve::apply::{Change, StoredApproval};
use crate::resolve::rules::{params_hash, ActiveAction, ActiveStatus, ResolveConfig};
use crate::resolve::store::{ResourceStore, Write};
use crate::store::{RedisConn, ResourceKey, StoreError};

/// What a recovery rebuilt.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovered {
    pub chains: usize,
    pub pending_approvals: usize,
    /// Approvals whose last record says pending while their action went out (approved, the
    /// decision's own record never written): not reopened.
    pub approved_unrecorded: usize,
    /// Approvals approved whose action is not on the actions topic (resolve had not released it):
    /// back as approved, so their release sends it.
    pub approved_unsent: usize,
    /// Those of them whose release record is not on the proposals topic either: the sweeper
    /// produces their decision's records (the release among them) again.
    pub releases_again: usize,
    /// Approved more than [`RELEASE_HORIZON_SECONDS`] ago, their action not on the actions topic:
    /// not brought back (it may have aged out of the topic after it went out).
    pub approved_too_old: usize,
    pub resources: usize,
    pub facts: usize,
    /// Resources that were in Redis already and got the rebuilt state written over theirs (the
    /// marker was gone: written since Redis came back empty).
    pub rebuilt_over: usize,
    /// Resources in Redis already that kept their records (`--force` on a Redis with its state).
    pub kept: usize,
    /// Resources whose context was in Redis already and stood (`--force` on a Redis with its
    /// state): not rebuilt from the results topic.
    pub contexts_kept: usize,
    pub epoch: String,
}

/// The stores recovery writes to.
pub struct Stores<'a> {
    pub conn: &'a RedisConn,
    pub prefix: &'a str,
    pub chains: &'a dyn ChainStore,
    pub resources: &'a dyn ResourceStore,
    pub context: &'a crate::context::redis::RedisStore,
}

/// Folds the events of a topic into `acc` as they are read (each partition in offset order: a
/// resource's records share one), skipping what does not decode — streamed, so a topic larger
/// than memory can be read (only what is kept of it is held).
async fn fold_events<T: Send + 'static>(
    loaded: &Loaded,
    topic: &str,
    idle: Duration,
    mut acc: T,
    mut each: impl FnMut(&mut T, CloudEvent) + Send + 'static,
) -> Result<T, String> {
    let (kafka, t, schemas) = (
        loaded.config.kafka.clone(),
        topic.to_string(),
        loaded.schemas.clone(),
    );
    tokio::task::spawn_blocking(move || {
        crate::kafka::read::read_each(&kafka, &t, idle, |r| {
            if let Ok(ev) = codec::decode(r.view(), &schemas) {
                each(&mut acc, ev);
            }
        })?;
        Ok(acc)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn data<T: serde::de::DeserializeOwned>(ev: &CloudEvent) -> Option<T> {
    serde_json::from_value(ev.data.clone()?).ok()
}

/// Whether RFC 3339 time `a` is strictly later than `b` (unreadable times are not later).
fn later_than(a: &str, b: &str) -> bool {
    let t = |x: &str| chrono::DateTime::parse_from_rfc3339(x).ok();
    matches!((t(a), t(b)), (Some(a), Some(b)) if a > b)
}

/// Puts an approval (`a`, decided at `time`) back in its resource's rebuilt record, and its action
/// in the state with `status` since `at`: pending or escalated (`PendingApproval`), or approved and
/// not yet sent (`Approved`, its records carrying a release).
fn bring_back(
    change: &mut Change,
    a: &ApprovalData,
    action: ActionData,
    time: String,
    (status, at): (ActiveStatus, i64),
) {
    change.state.active.push(ActiveAction {
        action_id: action.action_id.clone(),
        action: action.action.clone(),
        priority: action.priority,
        status,
        at,
        params_hash: params_hash(&action.parameters),
        parameters: action.parameters.clone(),
        proposals: serde_json::from_value(action.proposals.clone()).unwrap_or_default(),
        agents: serde_json::from_value(action.agents.clone()).unwrap_or_default(),
        approval_id: Some(a.approval_id.clone()),
        supersedes: Vec::new(),
    });
    change.approvals.push(StoredApproval {
        escalated: a.status == "escalated" || a.level > 0,
        approval: a.clone(),
        action,
        decided_at: time,
        traceparent: None,
        seen: None,
        amend: None,
        superseded: Vec::new(),
        by_release: status == ActiveStatus::Approved,
    });
}

/// How long after its decision an approved action whose action is not on the actions topic is
/// brought back to be sent: a release takes milliseconds; older, its action may have gone out and
/// aged out of the topic.
pub const RELEASE_HORIZON_SECONDS: i64 = 86_400;

/// Seconds since the epoch of an RFC 3339 time.
fn time_of(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp())
}

fn time_secs(ev: &CloudEvent) -> i64 {
    ev.time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

/// Rebuilds Redis from the topics (see the module documentation). Refuses when Redis still has its
/// epoch marker, unless `force`.
pub async fn recover(
    loaded: &Loaded,
    stores: &Stores<'_>,
    rules: &ResolveConfig,
    force: bool,
    idle: Duration,
) -> Result<Recovered, String> {
    let err = |e: StoreError| e.to_string();
    let marker = crate::store::read_epoch(stores.conn, stores.prefix)
        .await
        .map_err(err)?;
    if let Some(e) = &marker {
        if !force {
            return Err(format!(
                "Redis has its state (epoch marker {e}); nothing to recover (--force rebuilds anyway)"
            ));
        }
    }
    // What this rebuilds is in this build's format: not over a newer build's.
    let found = crate::format::claim(stores.conn, stores.prefix)
        .await
        .map_err(err)?;
    if found.newer() {
        return Err(crate::format::newer_message(stores.prefix, found.now));
    }
    let topics = &loaded.config.topics;
    let mut out = Recovered::default();

    // Audit chain heads: each chain's highest seal — kept as the topic streams by (a year of audit
    // records does not fit in memory; a chain's head does).
    let (kafka, t, schemas) = (
        loaded.config.kafka.clone(),
        topics.audit.clone(),
        loaded.schemas.clone(),
    );
    let heads = tokio::task::spawn_blocking(move || {
        let mut heads: HashMap<String, (u64, String, Vec<u8>)> = HashMap::new();
        crate::kafka::read::read_each(&kafka, &t, idle, |r| {
            let Ok(ev) = codec::decode(r.view(), &schemas) else {
                return;
            };
            if ev.ty != crate::audit::SEAL_TYPE {
                return;
            }
            let Some(seal) = data::<crate::audit::SealData>(&ev) else {
                return;
            };
            if heads.get(&seal.chain).is_none_or(|(s, _, _)| seal.seq > *s) {
                let hash = crate::audit::hash::payload_hash(&r.payload);
                heads.insert(seal.chain, (seal.seq, hash, r.payload));
            }
        })?;
        Ok::<_, String>(heads)
    })
    .await
    .map_err(|e| e.to_string())??;
    for (chain, (seq, hash, seal)) in &heads {
        stores
            .chains
            .restore_head(chain, (*seq, hash), seal)
            .await
            .map_err(err)?;
    }
    out.chains = heads.len();

    // Approvals: the furthest status of each; the open ones come back. Not simply the last record:
    // a redelivered proposal writes its request again (the same bytes) after a decision may have
    // been recorded, and a decided approval must not reopen (approving it again would send a
    // second action).
    let approvals = fold_events(
        loaded,
        &topics.approvals,
        idle,
        BTreeMap::new(),
        |approvals, ev| {
            if let Some(a) = data::<ApprovalData>(&ev) {
                keep_furthest(approvals, a, ev.time.clone().unwrap_or_default());
            }
        },
    )
    .await?;
    // Resolve state: tokens and recent actions per resource.
    let now = now_secs();
    let keep = rules.retention_seconds() as i64;
    let on_action =
        move |(records, went_out): &mut (HashMap<ResourceKey, Change>, HashSet<String>),
              ev: CloudEvent| {
            let Some(a) = data::<ActionData>(&ev) else {
                return;
            };
            went_out.insert(a.action_id.clone());
            let change = records
                .entry(ResourceKey::new(a.tenant.clone(), a.resource.clone()))
                .or_default();
            change.token = change.token.max(a.fencing_token);
            let at = time_secs(&ev);
            if now - at > keep {
                return;
            }
            change.state.active.retain(|x| x.action_id != a.action_id);
            change.state.active.push(ActiveAction {
                action_id: a.action_id.clone(),
                action: a.action.clone(),
                priority: a.priority,
                status: ActiveStatus::Accepted,
                at,
                params_hash: params_hash(&a.parameters),
                parameters: a.parameters.clone(),
                proposals: serde_json::from_value(a.proposals.clone()).unwrap_or_default(),
                agents: serde_json::from_value(a.agents.clone()).unwrap_or_default(),
                approval_id: None,
                supersedes: Vec::new(),
            });
        };
    let (mut records, went_out) = fold_events(
        loaded,
        &topics.actions,
        idle,
        (HashMap::new(), HashSet::new()),
        on_action,
    )
    .await?;
    // Approved actions' release records (resolve sends an approved action when it reads its
    // release; see `resolve::apply::release`), by approval id.
    let on_release = |released: &mut HashSet<String>, ev: CloudEvent| {
        if ev.ty == crate::records::types::RELEASE {
            if let Some(id) = data::<ProposalData>(&ev).and_then(|p| p.edit_of) {
                released.insert(id);
            }
        }
    };
    let release_written =
        fold_events(loaded, &topics.proposals, idle, HashSet::new(), on_release).await?;
    let mut open = Vec::new();
    let mut unsent = Vec::new();
    for (a, time) in approvals.into_values() {
        let Ok(action) = serde_json::from_value::<ActionData>(a.action_record.clone()) else {
            continue;
        };
        if a.status == "approved" && action.fencing_token == 0 {
            // Approved, and its action not on the actions topic: back as approved, so the release
            // resolve has still to read finds it; a release that never reached the proposals topic
            // (its decider died, and Redis lost the outbox entry that would have sent it again) is
            // produced again by the sweeper. (Approved by an earlier build: the action carried its
            // token, and went out with the decision.)
            if went_out.contains(&action.action_id) {
                continue;
            }
            // Decided more than a day ago (a release takes milliseconds): its action may have left
            // the actions topic while the approval record stayed (a quiet partition's segment
            // outlives a busy one's) — sending it now could send it twice. Left as it is.
            if time_of(&time).is_none_or(|t| now - t > RELEASE_HORIZON_SECONDS) {
                out.approved_too_old += 1;
                continue;
            }
            // In force, not yet sent: resolve sends it when it reads its release.
            let at = time_of(&time).unwrap_or(a.requested_at);
            let change = records
                .entry(ResourceKey::new(a.tenant.clone(), a.resource.clone()))
                .or_default();
            bring_back(change, &a, action, time, (ActiveStatus::Approved, at));
            let written = release_written.contains(&a.approval_id);
            unsent.push((a, written));
            continue;
        }
        if !matches!(a.status.as_str(), "pending" | "escalated") {
            continue;
        }
        // Its action went out (approved) but the decision's own record did not (its producer
        // failed, Redis was lost before the sweeper wrote it again): not reopened — approved
        // again, it would send a second action.
        if went_out.contains(&action.action_id) {
            out.approved_unrecorded += 1;
            continue;
        }
        let change = records
            .entry(ResourceKey::new(a.tenant.clone(), a.resource.clone()))
            .or_default();
        let held = (ActiveStatus::PendingApproval, a.requested_at);
        bring_back(change, &a, action, time, held);
        open.push(a);
    }
    for change in records.values_mut() {
        supersede_once_approved(&mut change.state.active, rules);
    }
    // A resource already in Redis: with the marker gone, written since Redis came back empty by an
    // instance that had not yet noticed (possible on a cluster, where the scripts cannot see the
    // marker) — the rebuilt record is written over it, keeping the higher fencing token and any
    // approval decided meanwhile. Under `--force` on a Redis that has its state, its records stand.
    let mut decided_since = std::collections::HashSet::new();
    for (k, change) in &records {
        let mut change = change.clone();
        let mut rev = 0;
        for attempt in 0.. {
            let w = Write {
                change: &change,
                applied: None,
                decision: None,
                place: None,
            };
            if stores.resources.commit(k, rev, w).await.map_err(err)? {
                break;
            }
            if marker.is_some() {
                out.kept += 1;
                break;
            }
            if attempt == 20 {
                return Err(format!(
                    "resource {} kept changing while it was rebuilt: is an instance still writing?",
                    k.resource
                ));
            }
            if attempt == 0 {
                out.rebuilt_over += 1;
            } else {
                // Someone else keeps writing it (an instance that has not noticed the loss yet):
                // give it a moment before reading again, 10 ms more each time (~2 s in all).
                tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
            }
            let there = stores
                .resources
                .load(k, &[], None)
                .await
                .map_err(err)?
                .record;
            rev = there.rev;
            change.token = change.token.max(there.token);
            for (id, a) in &there.approvals {
                if !matches!(a.approval.status.as_str(), "pending" | "escalated") {
                    decided_since.insert(id.clone());
                }
            }
            change
                .approvals
                .retain(|a| !decided_since.contains(&a.approval.approval_id));
            change.state.active.retain(|a| {
                a.approval_id
                    .as_ref()
                    .is_none_or(|id| !decided_since.contains(id))
            });
        }
    }
    open.retain(|a| !decided_since.contains(&a.approval_id));
    let refs: Vec<&ApprovalData> = open.iter().collect();
    stores.resources.index_open(&refs).await.map_err(err)?;
    // Approved, unsent: findable by id again (the index of open ones does not hold them); those
    // whose release is not on the proposals topic go to the outbox, which the sweeper produces.
    unsent.retain(|(a, _)| !decided_since.contains(&a.approval_id));
    out.approved_unsent = unsent.len();
    for (a, release_written) in &unsent {
        stores.resources.index_open(&[a]).await.map_err(err)?;
        stores
            .resources
            .index_close(&a.approval_id)
            .await
            .map_err(err)?;
        if !release_written {
            out.releases_again += 1;
            stores
                .resources
                .outbox_add(&a.approval_id, now)
                .await
                .map_err(err)?;
        }
    }
    out.pending_approvals = open.len();
    out.resources = records.len();

    // Context: the latest value of each fact per resource, from the results' findings — the
    // latest by the result's time (a resource's results can sit on more than one partition when
    // the topic's keying changed), the later record on a tie.
    let on_result = |facts: &mut HashMap<ResourceKey, BTreeMap<String, Fact>>, ev: CloudEvent| {
        let Some(r) = data::<ResultData>(&ev) else {
            return;
        };
        let Some(found) = r.findings.as_array() else {
            return;
        };
        let entry = facts
            .entry(ResourceKey::new(r.tenant.clone(), r.resource.clone()))
            .or_default();
        let at = ev.time.clone().unwrap_or_default();
        for f in found {
            if let (Some(key), Some(value)) = (f.get("key").and_then(Value::as_str), f.get("value"))
            {
                if entry.get(key).is_some_and(|old| later_than(&old.at, &at)) {
                    continue;
                }
                entry.insert(
                    key.to_string(),
                    Fact {
                        value: value.clone(),
                        by: r.agent.clone(),
                        task_id: r.task_id.clone(),
                        at: at.clone(),
                    },
                );
            }
        }
    };
    let facts = fold_events(loaded, &topics.results, idle, HashMap::new(), on_result).await?;
    // Context versions continue above every version used before the loss (the time in ms: a
    // version counts writes, a resource never reaches that many), so proposals still on their way
    // are judged stale against what is written from now on (`RedisStore::raise_version`).
    let floor = chrono::Utc::now().timestamp_millis().max(0) as u64;
    // Resources one at a time each (raise, commit, forget), sixteen at once.
    let force = marker.is_some();
    let rebuilt: Vec<Result<Option<usize>, String>> =
        futures::stream::iter(facts.iter().map(|(k, f)| async move {
            // Under `--force` on a Redis that has its state, a resource's context that is there
            // stands: instances may be writing it, and the topic may be older than what they wrote.
            if force && stores.context.snapshot(k).await.map_err(err)?.version > 0 {
                return Ok(None);
            }
            stores.context.raise_version(k, floor).await.map_err(err)?;
            let list: Vec<(String, Fact)> = f.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let outcome = Outcome {
                status: "recovered".into(),
                attempts: 0,
                duration_ms: 0,
                context_version: 0,
                response: AgentResponse::default(),
                error: None,
                refusals: Vec::new(),
                at: crate::event::now_rfc3339(),
                ran: None,
                ..Default::default()
            };
            let task = format!(
                "recover-{}",
                crate::pattern::stable_id(&[&k.tenant, &k.resource])
            );
            stores
                .context
                .commit(k, &task, &list, None, &outcome, None)
                .await
                .map_err(err)?;
            stores
                .context
                .forget(&[(k.clone(), task)])
                .await
                .map_err(err)?;
            Ok(Some(list.len()))
        }))
        .buffer_unordered(16)
        .collect()
        .await;
    for r in rebuilt {
        match r? {
            Some(n) => out.facts += n,
            None => out.contexts_kept += 1,
        }
    }
    out.epoch = crate::store::renew_epoch(stores.conn, stores.prefix)
        .await
        .map_err(err)?;
    Ok(out)
}

/// Keeps `a` (read at `time`) unless an approval record already kept for its id has come further:
/// requested, escalated (by level), decided — a record never moves an approval back.
fn keep_furthest(
    approvals: &mut BTreeMap<String, (ApprovalData, String)>,
    a: ApprovalData,
    time: String,
) {
    let stage = |a: &ApprovalData| match a.status.as_str() {
        "pending" => (0u8, a.level),
        "escalated" => (1, a.level),
        // Superseded can follow approved (a later action before its release), never precede it.
        "superseded" => (3, 0),
        _ => (2, 0),
    };
    if approvals
        .get(&a.approval_id)
        .is_some_and(|(seen, _)| stage(seen) > stage(&a))
    {
        return;
    }
    approvals.insert(a.approval_id.clone(), (a, time));
}

/// What each action awaiting approval supersedes once approved (`ActiveAction::supersedes`),
/// which no record names: the accepted actions it conflicts with, of lower priority, accepted
/// within the conflict window before it was asked for — as resolve judged them then.
fn supersede_once_approved(active: &mut [ActiveAction], rules: &ResolveConfig) {
    let accepted: Vec<(String, String, i32, i64)> = active
        .iter()
        .filter(|a| a.status.in_force())
        .map(|a| (a.action_id.clone(), a.action.clone(), a.priority, a.at))
        .collect();
    for p in active
        .iter_mut()
        .filter(|a| a.status == ActiveStatus::PendingApproval)
    {
        p.supersedes = accepted
            .iter()
            .filter(|(_, action, priority, at)| {
                rules.conflicts(action, &p.action)
                    && *priority < p.priority
                    && p.at - at <= rules.conflict_window_seconds as i64
            })
            .map(|(id, ..)| id.clone())
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fact_times_compare_as_times() {
        assert!(later_than(
            "2026-01-01T10:00:01Z",
            "2026-01-01T10:00:00.999Z"
        ));
        assert!(later_than(
            "2026-01-01T11:00:00+01:00",
            "2026-01-01T09:59:59Z"
        ));
        assert!(!later_than("2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z"));
        assert!(
            !later_than("", "2026-01-01T10:00:00Z"),
            "an unreadable time is not later"
        );
    }

    /// An action awaiting approval, rebuilt, supersedes once approved what resolve let it: the
    /// conflicting accepted action of lower priority within the window, not one of higher
    /// priority, one that does not conflict, or one accepted before the window.
    #[test]
    fn a_rebuilt_pending_action_supersedes_what_it_would_have() {
        let rules: ResolveConfig = serde_yaml::from_str(
            "conflict_window_seconds: 300\nactions:\n  rollback: {priority: 100, conflicts_with: [scale_down, scale_up]}\n  scale_up: {priority: 200}\n",
        )
        .expect("rules");
        let act =
            |id: &str, action: &str, priority: i32, status: ActiveStatus, at: i64| ActiveAction {
                action_id: id.into(),
                action: action.into(),
                priority,
                status,
                at,
                params_hash: String::new(),
                parameters: serde_json::Value::Null,
                proposals: vec![],
                agents: vec![],
                approval_id: None,
                supersedes: Vec::new(),
            };
        let mut active = vec![
            act("sd", "scale_down", 0, ActiveStatus::Accepted, 1_000),
            act("old", "scale_down", 0, ActiveStatus::Accepted, 600),
            act("up", "scale_up", 200, ActiveStatus::Accepted, 1_000),
            act("pg", "page", 0, ActiveStatus::Accepted, 1_000),
            act("rb", "rollback", 100, ActiveStatus::PendingApproval, 1_100),
        ];
        supersede_once_approved(&mut active, &rules);
        assert_eq!(active[4].supersedes, ["sd"]);
        assert!(active[..4].iter().all(|a| a.supersedes.is_empty()));
    }

    #[test]
    fn a_request_written_again_after_its_decision_does_not_reopen_it() {
        let rec = |status: &str, level: u32| ApprovalData {
            approval_id: "apr-1".into(),
            status: status.into(),
            level,
            ..Default::default()
        };
        let mut kept = BTreeMap::new();
        for (a, t) in [
            (rec("pending", 0), "t1"),
            (rec("escalated", 1), "t2"),
            (rec("pending", 0), "t3"),
            (rec("escalated", 2), "t4"),
            (rec("escalated", 1), "t5"),
        ] {
            keep_furthest(&mut kept, a, t.into());
        }
        assert_eq!((kept["apr-1"].0.level, kept["apr-1"].1.as_str()), (2, "t4"));
        for (a, t) in [(rec("approved", 2), "t6"), (rec("pending", 0), "t7")] {
            keep_furthest(&mut kept, a, t.into());
        }
        assert_eq!(
            (kept["apr-1"].0.status.as_str(), kept["apr-1"].1.as_str()),
            ("approved", "t6")
        );
    }
}
