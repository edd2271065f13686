//! Conflict resolution and governance against the real broker and Redis.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use common::*;
use switchyard::event::CloudEvent;
use switchyard::kafka::{dlq_headers, Input, Output};
use switchyard::records::{ActionData, ApprovalData, AuditData, ProposalData, ResultData};

fn data<T: serde::de::DeserializeOwned>(r: &Input) -> T {
    serde_json::from_value(data_of(&event_of(r)).clone()).expect("record data")
}

const RULES: &str = r#"
resolve:
  actions:
    rollback: { priority: 100, conflicts_with: [scale_down, scale_up], cooldown_seconds: 900, invalidated_by: [deployment] }
    scale_down: { priority: 10, conflicts_with: [scale_up] }
    page: { merge: true }
"#;

fn governance(extra_rules: &str) -> String {
    format!(
        r#"{RULES}
governance:
  access:
    - {{ agents: [deploy-guard], actions: [deployment.hold] }}
    - {{ agents: [sla-responder, tester], actions: [rollback, page, restart] }}
    - {{ agents: [cost-guard, tester], actions: [scale_down, scale_up] }}
  approvals:
    token: test-token
    timeout_seconds: 600
    rules: [{extra_rules}]
"#
    )
}

/// A proposal record as the agent stage would write it.
fn proposal(
    id: &str,
    agent: &str,
    action: &str,
    resource: &str,
    params: Value,
    ctx_version: u64,
) -> CloudEvent {
    let p = ProposalData {
        proposal_id: id.into(),
        task_id: format!("task-{id}"),
        workflow_id: format!("wf-{id}"),
        agent: agent.into(),
        action: action.into(),
        resource: resource.into(),
        tenant: "default".into(),
        parameters: params,
        priority: 0,
        impact: switchyard::records::Impact::Low,
        context_version: ctx_version,
        reason: None,
        event_id: Some(format!("ev-{id}")),
        cost: None,
        seen_at: None,
        approved_by: None,
        edit_of: None,
        confidence: None,
    };
    CloudEvent::new(id, "test", "switchyard.proposal")
        .with_subject(resource)
        .with_data(serde_json::to_value(p).unwrap())
}

/// A sealer over the test's Redis (each call stands for another process).
fn sealer(conn: &switchyard::store::RedisConn, prefix: &str) -> Arc<switchyard::audit::Sealer> {
    Arc::new(switchyard::audit::Sealer::new(
        Arc::new(switchyard::audit::RedisChainStore::new(
            conn.clone(),
            prefix,
        )),
        "audit",
    ))
}

/// A resource record holding only a fencing token.
fn token_only(token: u64) -> switchyard::resolve::apply::Change {
    switchyard::resolve::apply::Change {
        token,
        ..Default::default()
    }
}

/// The write of a whole record (no proposal, no offset).
fn write_of(change: &switchyard::resolve::apply::Change) -> switchyard::resolve::store::Write<'_> {
    switchyard::resolve::store::Write {
        change,
        applied: None,
        decision: None,
        place: None,
    }
}

/// A guarded resolve store (what a running switchyard uses) trusts Redis only while it has its
/// epoch marker; a Redis that came back empty has none. Then an absence (an approval not found:
/// dead-lettered, 404) is not believed, and a write is refused — on a single Redis inside the
/// compare-and-set, so nothing decided on the empty state is left behind; a cluster keeps the
/// marker on another slot, so there the epoch watcher stops writes. Unguarded (recovery, replay's
/// scratch prefix) the store checks nothing.
async fn the_epoch_marker_guards_the_store(conn: &switchyard::store::RedisConn, prefix: &str) {
    use switchyard::resolve::store::ResourceStore;
    use switchyard::store::{ResourceKey, StoreError};
    let store = |guarded: bool| {
        let s = switchyard::resolve::store::RedisResourceStore::new(
            conn.clone(),
            prefix,
            3600,
            switchyard::resolve::store::contract::REMEMBER,
        );
        if guarded {
            s.guarded()
        } else {
            s
        }
    };
    let (guarded, plain) = (store(true), store(false));
    let k = ResourceKey::new("default", "r-epoch");
    let change = token_only(7);
    let w = write_of(&change);
    assert!(
        matches!(guarded.confirm_state().await, Err(StoreError::Lost)),
        "no epoch marker: an absence is not believed"
    );
    plain.confirm_state().await.expect("unguarded: not checked");
    let refused = guarded.commit(&k, 0, w).await;
    if conn.is_cluster() {
        assert!(refused.expect("a cluster's script cannot see the marker"));
    } else {
        assert!(matches!(refused, Err(StoreError::Lost)), "{refused:?}");
        assert_eq!(
            plain.load(&k, &[], None).await.unwrap().record.rev,
            0,
            "nothing written"
        );
        assert!(plain.commit(&k, 0, w).await.unwrap(), "unguarded: written");
    }
    // An audit chain's head likewise: not created without the marker.
    use switchyard::audit::ChainStore;
    let chains = switchyard::audit::RedisChainStore::new(conn.clone(), prefix).guarded();
    let created = chains.advance("c-epoch", 0, (1, "h1"), b"seal 1").await;
    if conn.is_cluster() {
        created.expect("a cluster's script cannot see the marker");
    } else {
        assert!(
            matches!(created, Err(StoreError::Lost)),
            "{:?}",
            created.err()
        );
        assert_eq!(
            chains.head("c-epoch").await.unwrap().seq,
            0,
            "nothing written"
        );
    }
    switchyard::store::create_epoch(conn, prefix).await.unwrap();
    guarded
        .confirm_state()
        .await
        .expect("with its epoch marker");
    assert!(guarded.commit(&k, 1, w).await.unwrap());
    assert_eq!(guarded.load(&k, &[], None).await.unwrap().record.rev, 2);
    if !conn.is_cluster() {
        chains
            .advance("c-epoch", 0, (1, "h1"), b"seal 1")
            .await
            .expect("created with the marker");
        // A head that exists was created on a Redis with its marker: it moves without looking.
        let mut c = conn.get().await.unwrap();
        let marker = switchyard::store::epoch_key(prefix);
        let saved: String = redis::cmd("GET")
            .arg(&marker)
            .query_async(&mut c)
            .await
            .unwrap();
        redis::cmd("DEL")
            .arg(&marker)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let moved = chains.advance("c-epoch", 1, (2, "h2"), b"seal 2").await;
        redis::cmd("SET")
            .arg(&marker)
            .arg(&saved)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        moved.expect("an existing head moves");
        assert_eq!(chains.head("c-epoch").await.unwrap().seq, 2);
    }
}

/// An approval not found on a Redis without its epoch marker (one that came back empty, in the
/// second before the epoch watcher notices) is not believed: the decisions stage retries the
/// decision (transient) instead of dead-lettering it as unknown, the API's lookup fails (503) instead
/// of answering 404; once Redis has its marker, the same approval is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_unknown_only_while_redis_has_its_state() {
    use switchyard::error::ProcessError;
    use switchyard::governance::approvals::{ApprovalError, Verdict};
    use switchyard::kafka::runtime::process_one;
    let env = TestEnv::new(1, "").await;
    let approvals = Arc::new(switchyard::cmd::approvals::service(&env.loaded).unwrap());
    let stage = switchyard::stages::decisions::DecisionsStage {
        approvals: approvals.clone(),
    };
    let decision = || {
        Arc::new(Input::new(
            "decisions",
            0,
            0,
            None,
            serde_json::to_vec(
                &json!({"approval_id": "apr-none", "decision": "approve", "by": "carol"}),
            )
            .unwrap(),
        ))
    };
    let decide = || approvals.decide("apr-none", Verdict::Approve, "carol", "", false, false);
    // The approvals API, as an operator's client reaches it.
    let api = {
        let token = switchyard::secret::Secret::new("api-token");
        let router = switchyard::http::approvals::router(switchyard::http::approvals::Api {
            approvals: approvals.clone(),
            producer: env.producer(),
            auth: Arc::new(switchyard::http::auth::Auth::new(&[], Some(&token))),
            public_url: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}/v1/approvals/apr-none")
    };
    let lookup = || async {
        let r = reqwest::Client::new()
            .get(&api)
            .bearer_auth("api-token")
            .send()
            .await
            .unwrap();
        let after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), after)
    };
    // No marker: the state is not trusted.
    assert!(
        matches!(
            decide().await,
            Err(ApprovalError::Store(switchyard::store::StoreError::Lost))
        ),
        "lost, not unknown"
    );
    assert!(approvals.get("apr-none").await.is_err());
    // Over HTTP: a 503 worth repeating shortly.
    assert_eq!(lookup().await, (503, Some("1".to_string())));
    let r = process_one(&stage, decision()).await;
    assert!(matches!(r, Err(ProcessError::Transient(_))), "{r:?}");
    // With its marker, Redis is believed: not found, dead-lettered.
    let conn = switchyard::store::RedisConn::new(&env.loaded.config.redis.url).unwrap();
    switchyard::store::create_epoch(&conn, &env.loaded.config.redis.key_prefix)
        .await
        .unwrap();
    assert!(matches!(decide().await, Err(ApprovalError::NotFound(_))));
    assert!(approvals.get("apr-none").await.unwrap().is_none());
    assert_eq!(lookup().await, (404, None));
    let r = process_one(&stage, decision()).await;
    assert!(
        matches!(
            r,
            Err(ProcessError::Poison {
                reason: "unknown_approval",
                ..
            })
        ),
        "{r:?}"
    );
}

/// The resolve, budget and audit-chain stores meet the same contracts in Redis as their in-memory
/// twins do in the unit tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_meet_their_contracts() {
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    let p = &c.redis.key_prefix;
    switchyard::resolve::store::contract::run_all(
        &switchyard::resolve::store::RedisResourceStore::new(
            conn.clone(),
            p,
            3600,
            switchyard::resolve::store::contract::REMEMBER,
        ),
        &env.prefix,
    )
    .await;
    // Another instance (no copy of the record) reads the kept decision from the hash.
    let other = switchyard::resolve::store::RedisResourceStore::new(
        conn.clone(),
        p,
        3600,
        switchyard::resolve::store::contract::REMEMBER,
    );
    let slot = switchyard::resolve::store::contract::memo_slot_resource(&env.prefix);
    for (id, at) in [("m4", "proposals:0:13"), ("m2", "proposals:0:11")] {
        let l = switchyard::resolve::store::ResourceStore::load(&other, &slot, &[], Some(id))
            .await
            .unwrap();
        assert!(l.decided.is_some(), "the kept decision of {id}");
        assert_eq!(l.decided_at.as_deref(), Some(at));
    }
    let l = switchyard::resolve::store::ResourceStore::load(&other, &slot, &[], Some("m1"))
        .await
        .unwrap();
    assert!(l.decided.is_none() && l.finished);
    switchyard::governance::budgets::contract::run_all(
        &switchyard::governance::budgets::RedisBudgetStore::new(conn.clone()),
        &env.prefix,
    )
    .await;
    switchyard::audit::sealer::contract::run_all(
        &switchyard::audit::RedisChainStore::new(conn.clone(), p),
        &env.prefix,
    )
    .await;
    // Old seals leave a head's hash sixteen at a time: it holds the last KEPT_SEALS and at most
    // fifteen more.
    {
        use switchyard::audit::ChainStore;
        let chains = switchyard::audit::RedisChainStore::new(conn.clone(), p);
        for seq in 1..=40u64 {
            chains
                .advance("c-trim", seq - 1, (seq, &format!("h{seq}")), b"seal")
                .await
                .unwrap();
        }
        let head = chains.head("c-trim").await.unwrap();
        assert_eq!(
            head.seals.len() as u64,
            switchyard::audit::sealer::KEPT_SEALS
        );
        let mut c = conn.get().await.unwrap();
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("{p}:auditchain:{{c-trim}}"))
            .query_async(&mut c)
            .await
            .unwrap();
        let seals = fields.iter().filter(|f| f.starts_with("seal:")).count() as u64;
        assert!(
            (switchyard::audit::sealer::KEPT_SEALS..switchyard::audit::sealer::KEPT_SEALS + 16)
                .contains(&seals),
            "{fields:?}"
        );
    }
    the_epoch_marker_guards_the_store(&conn, &format!("{p}-epoch")).await;
}

/// A proposal's decision is kept in its resource's memo slot (the resource's hash, no key of its
/// own) while the slot is free. A new owner of the proposals partition, which knows nothing
/// delivered (another consumer group here, reading from the start, as an instance taking over after a
/// crash would re-read what was not committed), replays the kept decision: the same records, byte
/// for byte, and never a second action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_kept_in_the_memo_slot_is_replayed_by_a_new_owner_never_doubled() {
    let env = TestEnv::new(1, "").await;
    let running = env.start(&["route", "agents", "resolve"]);
    env.deployment_then_breach("svc-m", 0).await;
    let proposals = env
        .read("switchyard.proposals", 2, Duration::from_secs(10))
        .await;
    // Both decided (page and rollback: an action or an approval each).
    let mut before = 0;
    for _ in 0..30 {
        before = env
            .read("switchyard.actions", usize::MAX, Duration::from_secs(1))
            .await
            .len()
            + env
                .read("switchyard.approvals", usize::MAX, Duration::from_secs(1))
                .await
                .len();
        if before >= 2 {
            break;
        }
    }
    assert!(before >= 2, "both proposals decided");
    let ids: Vec<String> = proposals
        .iter()
        .map(|r| {
            serde_json::from_value::<ProposalData>(data_of(&event_of(r)).clone())
                .expect("proposal")
                .proposal_id
        })
        .collect();
    let c = &env.loaded.config;
    let hash = format!("{}:res:{{default/svc-m}}", c.redis.key_prefix);
    // Both decisions (made back to back, the first not yet delivered when the second was) are in
    // the two slots, none in a key of its own.
    for s in ["1", "2"] {
        let (id_field, input_field) = (format!("_dt{s}"), format!("_dp{s}"));
        let (kept, input, apart) =
            memo_slot(&c.redis.url, &hash, (&id_field, &input_field, "d")).await;
        assert!(ids.contains(&kept), "a decision in slot {s}: {kept:?}");
        assert!(
            input.starts_with(&format!("{}:0:", env.topic("switchyard.proposals"))),
            "{input}"
        );
        assert!(!apart, "no decision key of its own");
    }
    running.stop().await;

    let mut loaded = env.loaded.clone();
    loaded.config.kafka.group_prefix = format!("{}-new-owner", loaded.config.kafka.group_prefix);
    let owner = Running::start(loaded, &["resolve"]);
    let mut again = (Vec::new(), Vec::new());
    for _ in 0..60 {
        again = (
            env.read("switchyard.actions", usize::MAX, Duration::from_secs(1))
                .await,
            env.read("switchyard.approvals", usize::MAX, Duration::from_secs(1))
                .await,
        );
        if again.0.len() + again.1.len() > before {
            break;
        }
    }
    owner.stop().await;
    assert!(
        again.0.len() + again.1.len() > before,
        "the kept decision's records again"
    );
    // Whatever was written again is the same bytes, and no action or approval is doubled: one id
    // per action, one record's bytes per id.
    let once = |recs: &[Input], id: &str| {
        let mut by_action: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        let mut bytes: BTreeMap<String, std::collections::BTreeSet<Vec<u8>>> = BTreeMap::new();
        for r in recs {
            let d = data_of(&event_of(r)).clone();
            let key = d[id].as_str().unwrap_or_default().to_string();
            by_action
                .entry(d["action"].as_str().unwrap_or_default().to_string())
                .or_default()
                .insert(key.clone());
            bytes.entry(key).or_default().insert(r.payload.clone());
        }
        assert!(
            by_action.values().all(|ids| ids.len() == 1),
            "{by_action:?}"
        );
        assert!(
            bytes.values().all(|b| b.len() == 1),
            "replayed bytes differ"
        );
    };
    once(&again.0, "action_id");
    once(&again.1, "approval_id");
}

/// The resolve store answers a proposal's load from its own copy of the record where it wrote one
/// recently; a copy out of date (the resource written by another instance) never commits, and the
/// load after the refused commit reads Redis again: it finds the proposal the other instance
/// decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_resource_written_elsewhere_never_commits() {
    use switchyard::resolve::apply::{Change, Decided, Verdict};
    use switchyard::resolve::store::{RedisResourceStore, ResourceStore, Write};
    let env = TestEnv::new(1, "").await;
    let conn = switchyard::store::RedisConn::new(&env.loaded.config.redis.url).unwrap();
    let p = &env.loaded.config.redis.key_prefix;
    let (a, b) = (
        RedisResourceStore::new(conn.clone(), p, 3600, 64),
        RedisResourceStore::new(conn.clone(), p, 3600, 64),
    );
    let k = switchyard::store::ResourceKey::new("default", format!("copy-{}", env.prefix));
    let change = Change::default();
    let decided = Decided {
        outcome: Verdict::Accepted,
        reason: None,
        rule: None,
        detail: "by b".into(),
        action: None,
        approvals: vec![],
        into_action: None,
        superseded: vec![],
        at: "2026-01-01T00:00:00Z".into(),
    };
    let write = |id: &'static str, offset: i64| Write {
        change: &change,
        applied: Some((0, offset, "proposals")),
        decision: Some((id, &decided)),
        place: None,
    };
    // A copy only read is not used: a reads the empty resource, b (another instance) decides x0,
    // and a's next load reads Redis.
    assert_eq!(a.load(&k, &[], Some("x0")).await.unwrap().record.rev, 0);
    assert!(b.commit(&k, 0, write("x0", 0)).await.unwrap());
    let l = a.load(&k, &[], Some("x0")).await.unwrap();
    assert_eq!(l.decided.as_ref(), Some(&decided), "{l:?}");
    // a writes (its copy is now usable); then b writes behind its back and decides x1.
    assert!(a.commit(&k, 1, write("x9", 9)).await.unwrap());
    assert!(b.commit(&k, 2, write("x1", 10)).await.unwrap());
    // a's next load answers from its copy: it cannot know, and its commit is refused.
    let stale = a.load(&k, &[], Some("x1")).await.unwrap();
    assert!(
        stale.decided.is_none() && stale.record.rev == 2,
        "{stale:?}"
    );
    assert!(!a.commit(&k, 2, write("x1", 10)).await.unwrap());
    // The load after the refusal reads Redis: x1 was decided, with b's decision.
    let fresh = a.load(&k, &[], Some("x1")).await.unwrap();
    assert_eq!(fresh.decided.as_ref(), Some(&decided));
    assert_eq!(fresh.record.rev, 3);
    assert_eq!(fresh.record.applied.get(&0), Some(&10));
    // a's own writes keep its copy current: the next load reads no record, and commits.
    assert!(a.commit(&k, 3, write("x2", 11)).await.unwrap());
    let next = a.load(&k, &[], Some("x3")).await.unwrap();
    assert_eq!(next.record.rev, 4);
    assert_eq!(next.record.recent, ["x2", "x1", "x9", "x0"]);
    assert_eq!(next.record.applied.get(&0), Some(&11));
    assert!(a.commit(&k, 4, write("x3", 12)).await.unwrap());
    // Written back the same as Redis has it.
    let other = RedisResourceStore::new(conn, p, 3600, 64);
    assert_eq!(
        other.load(&k, &[], Some("x4")).await.unwrap().record,
        a.load(&k, &[], Some("x4")).await.unwrap().record
    );
}

/// Every store's contract, then the pipeline itself, on a Redis Cluster of three masters: each
/// resource's keys share a hash tag (one slot), and a batch's pipelines, which span many resources,
/// are sent command by command to their slots' nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_and_the_pipeline_run_on_a_redis_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, port) = start_redis_cluster(&dir.path().join("cluster"));
    let url = format!("redis://127.0.0.1:{port}/");
    let cfg = switchyard::store::RedisConfig {
        url: url.clone(),
        cluster: true,
        ..Default::default()
    };
    let conn = switchyard::store::RedisConn::from_config(&cfg).expect("cluster client");
    let tag = suffix();
    switchyard::context::contract::run_all(
        &switchyard::context::redis::RedisStore::new(
            conn.clone(),
            &tag,
            switchyard::context::contract::config(),
        ),
        &tag,
    )
    .await;
    switchyard::resolve::store::contract::run_all(
        &switchyard::resolve::store::RedisResourceStore::new(
            conn.clone(),
            &tag,
            3600,
            switchyard::resolve::store::contract::REMEMBER,
        ),
        &tag,
    )
    .await;
    switchyard::governance::budgets::contract::run_all(
        &switchyard::governance::budgets::RedisBudgetStore::new(conn.clone()),
        &tag,
    )
    .await;
    switchyard::audit::sealer::contract::run_all(
        &switchyard::audit::RedisChainStore::new(conn.clone(), &tag),
        &tag,
    )
    .await;
    the_epoch_marker_guards_the_store(&conn, &format!("{tag}-epoch")).await;

    // The pipeline: the demo's story (deployment, breach, rollback awaiting approval) with its
    // state on the cluster.
    let env = TestEnv::new(
        2,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("{ actions: [rollback] }"),
            default_routes("")
        ),
    )
    .await;
    let loaded = on_the_cluster(&env, &url);
    let running = Running::start(loaded.clone(), &["route", "agents", "resolve"]);
    env.deployment_then_breach("checkout", 0).await;
    let approvals = env
        .read("switchyard.approvals", 1, Duration::from_secs(30))
        .await;
    let a: switchyard::records::ApprovalData =
        serde_json::from_value(data_of(&event_of(&approvals[0])).clone()).expect("approval");
    assert_eq!(
        (a.action.as_str(), a.status.as_str()),
        ("rollback", "pending")
    );
    running.stop().await;
    // Its state is spread over the cluster's nodes (one slot per resource, many resources).
    let mut keys = 0;
    for node in cluster_ports(port) {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &node.to_string(),
                "--scan",
                "--pattern",
                &format!("{}:*", env.prefix),
            ])
            .output()
            .expect("redis-cli");
        keys += String::from_utf8_lossy(&out.stdout).lines().count();
    }
    assert!(keys > 0, "the state is on the cluster");
    // Commands too: the approval is approved through the CLI against the cluster.
    let out = cli_on_cluster(
        &env,
        &url,
        &["approvals", "approve", &a.approval_id, "--by", "carol"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The page went out at once; the rollback once approved, sent by resolve when it reads the
    // approval's release.
    let running = Running::start(loaded, &["resolve"]);
    let actions = env
        .read("switchyard.actions", 2, Duration::from_secs(30))
        .await;
    running.stop().await;
    let names: Vec<Value> = actions
        .iter()
        .map(|r| data_of(&event_of(r))["action"].clone())
        .collect();
    assert_eq!(names, [json!("page"), json!("rollback")]);
    // A replay on the cluster: its sandbox's keys go to every node, and are all deleted after.
    let out = cli_on_cluster(&env, &url, &["replay", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 changed"), "{text}");
    for node in cluster_ports(port) {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &node.to_string(),
                "--scan",
                "--pattern",
                &format!("{}:replay-*", env.prefix),
            ])
            .output()
            .expect("redis-cli");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "",
            "node {node}"
        );
    }
}

/// A Redis Cluster shard that comes back empty (here: flushed) is noticed although the epoch
/// marker itself lives on another shard: the shard markers it held are gone, every write waits
/// (`/readyz` says why, an event is not routed), `switchyard recover` (no `--force`) writes a
/// whole new epoch, and processing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shard_that_lost_its_data_stops_writes_until_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, port) = start_redis_cluster(&dir.path().join("cluster"));
    let url = format!("redis://127.0.0.1:{port}/");
    let env = TestEnv::new(1, "").await;
    let mut loaded = on_the_cluster(&env, &url);
    let http = free_port();
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{http}");
    let running = Running::start(loaded.clone(), &["route"]);
    assert_eq!(deploy_then_count_tasks(&env, "c1", "svc-c", 1, 40).await, 1);
    // Where the markers are: the node holding the epoch marker, and another holding shard markers.
    let local = |node: u16, pattern: String| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &node.to_string(), "--scan", "--pattern", &pattern])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let main = format!("{}:epoch", env.prefix);
    let nodes = cluster_ports(port);
    let shard_markers = || -> usize {
        nodes
            .iter()
            .map(|n| local(*n, format!("{main}:*")).len())
            .sum()
    };
    let shards = shard_markers();
    assert_eq!(
        shards,
        switchyard::store::SHARD_MARKERS,
        "every shard marker written"
    );
    let slot_markers = || -> usize {
        nodes
            .iter()
            .map(|n| local(*n, format!("{}:epochslot:*", env.prefix)).len())
            .sum()
    };
    assert_eq!(
        slot_markers(),
        switchyard::store::SLOTS,
        "a marker in every slot"
    );
    let victim = *nodes
        .iter()
        .find(|n| {
            !local(**n, main.clone()).contains(&main) && !local(**n, format!("{main}:*")).is_empty()
        })
        .expect("a node without the epoch marker, holding shard markers");
    // A store of this process, which has read the epoch (so it knows the slot markers are written)
    // and runs no watcher: what an instance does between the loss and its watcher's next look.
    use switchyard::audit::sealer::{Advance, ChainStore, RedisChainStore};
    let conn = switchyard::store::RedisConn::from_config(&loaded.config.redis).expect("conn");
    assert!(matches!(
        switchyard::store::epoch(&conn, &env.prefix).await,
        Ok(switchyard::store::Epoch::Whole(_))
    ));
    let chains = RedisChainStore::new(conn, &env.prefix).guarded();
    let owned = owned_slots(victim);
    let chain_on = |on_victim: bool| {
        (0..)
            .map(|i| format!("probe/{i}"))
            .find(|c| {
                let slot = switchyard::store::key_slot(&format!("{{{c}}}"));
                owned.iter().any(|(a, b)| (*a..=*b).contains(&slot)) == on_victim
            })
            .expect("a chain")
    };
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &victim.to_string(), "FLUSHALL"])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    // At once, before any watcher looks: no audit chain starts again on the emptied shard (its slot
    // markers went with its data), while one elsewhere does.
    let refused = chains.advance(&chain_on(true), 0, (1, "h1"), b"seal").await;
    assert!(
        matches!(refused, Err(switchyard::store::StoreError::Lost)),
        "{refused:?}"
    );
    let elsewhere = chains
        .advance(&chain_on(false), 0, (1, "h1"), b"seal")
        .await;
    assert!(matches!(elsewhere, Ok(Advance::Done)), "{elsewhere:?}");
    // Noticed within a few seconds; nothing is routed meanwhile.
    let mut ready = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ready = readyz(http).await;
        if ready.contains("redis lost its state") {
            break;
        }
    }
    assert!(ready.contains("redis lost its state"), "{ready}");
    assert_eq!(
        deploy_then_count_tasks(&env, "c2", "svc-c2", 2, 4).await,
        1,
        "nothing is routed while the state is lost"
    );
    // Recovered from Kafka: a new, whole epoch; the waiting event goes through.
    let out = cli_on_cluster(&env, &url, &["recover"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.read("switchyard.tasks", 2, Duration::from_secs(40))
            .await
            .len(),
        2
    );
    let shards = shard_markers();
    assert_eq!(
        shards,
        switchyard::store::SHARD_MARKERS,
        "the new epoch is whole"
    );
    assert_eq!(slot_markers(), switchyard::store::SLOTS, "slot markers too");
    // Shard markers never completed for the epoch (a build before them wrote it, or a writer
    // stopped half way: no completion key) are written by the next instance, not taken for a loss.
    running.stop().await;
    let cli_c = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "{args:?}");
    };
    cli_c(&["DEL", &format!("{{{main}}}:shards")]);
    for k in switchyard::store::shard_epoch_keys(&env.prefix)
        .iter()
        .step_by(3)
    {
        cli_c(&["DEL", k]);
    }
    let running = Running::start(loaded, &["route"]);
    assert_eq!(
        deploy_then_count_tasks(&env, "c3", "svc-c3", 3, 40).await,
        3,
        "routed: not taken for a loss"
    );
    let shards = shard_markers();
    assert_eq!(shards, switchyard::store::SHARD_MARKERS, "written again");
    running.stop().await;
}

/// The slot ranges the cluster node on `port` serves (`CLUSTER NODES`, its own line).
fn owned_slots(port: u16) -> Vec<(u16, u16)> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLUSTER", "NODES"])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let me = text
        .lines()
        .find(|l| l.contains("myself"))
        .expect("its own line");
    me.split_whitespace()
        .skip(8)
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// The env's config pointed at the Redis Cluster at `url` (its file too, for the CLI), loaded.
fn on_the_cluster(env: &TestEnv, url: &str) -> switchyard::config::Loaded {
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let plain = format!("url: {}", stack().1);
    assert!(text.contains(&plain));
    std::fs::write(
        &env.config_path,
        text.replace(&plain, &format!("url: {url}\n  cluster: true")),
    )
    .expect("write");
    let overrides = |k: &str| match k {
        "SWITCHYARD_REDIS_URL" => None,
        k => std::env::var(k).ok(),
    };
    let loaded =
        switchyard::config::Config::load_with(&env.config_path, &overrides).expect("loads");
    assert!(loaded.config.redis.cluster);
    loaded
}

/// The body of `/readyz` of the instance serving HTTP on `port`.
async fn readyz(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("readyz body")
}

/// The switchyard command with `args` on the env's config, against the Redis Cluster at `url`.
fn cli_on_cluster(env: &TestEnv, url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(["--config", env.config_path.to_str().expect("path")])
        .args(args)
        .env("SWITCHYARD_KAFKA_BROKERS", &stack().0)
        .env("SWITCHYARD_REDIS_URL", url)
        .output()
        .expect("switchyard runs")
}

/// Publishes a `deployment.started` for `resource`; the tasks routed so far once `n` are there
/// (or `secs` passed).
async fn deploy_then_count_tasks(
    env: &TestEnv,
    id: &str,
    resource: &str,
    n: usize,
    secs: u64,
) -> usize {
    env.publish_one(
        "events.deployments",
        id,
        "deployment.started",
        resource,
        json!({"service": resource}),
    )
    .await;
    env.read("switchyard.tasks", n, Duration::from_secs(secs))
        .await
        .len()
}

/// The ports of a cluster's nodes, from one of them.
fn cluster_ports(port: u16) -> Vec<u16> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "nodes"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|a| a.split('@').next()?.rsplit(':').next()?.parse().ok())
        .collect()
}

fn verify(env: &TestEnv, topic: &str) -> std::process::Output {
    let (brokers, redis) = stack().clone();
    std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "audit",
            "verify",
            "--topic",
            topic,
        ])
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .env("SWITCHYARD_REDIS_URL", &redis)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn story_rollback_awaits_approval_page_goes_out_scale_down_conflicts() {
    // Seals are signed (audit.keys): a chain inserted into the topic is found.
    let keydir = tempfile::tempdir().unwrap();
    let keyfile = keydir.path().join("audit.key");
    std::fs::write(&keyfile, "test-audit-key-0123456789abcdef0123456789\n").unwrap();
    let env = TestEnv::new(
        2,
        &format!(
            "{}{DEFAULT_AGENTS}{}audit:\n  keys:\n    - {{ id: t1, file: {:?} }}\n",
            governance("{ actions: [rollback], min_impact: high }"),
            default_routes(""),
            keyfile.display().to_string()
        ),
    )
    .await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let running = Running::start(loaded, &["route", "agents", "resolve", "decisions"]);
    env.deployment_then_breach("checkout", 0).await;
    env.publish_one(
        "events.cost-thresholds",
        "c1",
        "cost.threshold_exceeded",
        "checkout",
        json!({"service": "checkout", "budget": 100.0, "spend": 150.0}),
    )
    .await;

    let approvals = env
        .read("switchyard.approvals", 1, Duration::from_secs(40))
        .await;
    let pending: ApprovalData = data(&approvals[0]);
    assert_eq!(
        (pending.action.as_str(), pending.status.as_str()),
        ("rollback", "pending")
    );
    let actions = env
        .read("switchyard.actions", 1, Duration::from_secs(20))
        .await;
    let page: ActionData = data(&actions[0]);
    assert_eq!(page.action, "page");
    // Wait for the cost event's decision, then read the sealed audit trail.
    let mut audit: Vec<AuditData> = Vec::new();
    for _ in 0..60 {
        audit = env
            .audit(100, Duration::from_secs(2))
            .await
            .iter()
            .map(data)
            .collect();
        if audit.iter().any(|a| a.detail["action"] == "scale_down") {
            break;
        }
    }
    let sd = audit
        .iter()
        .find(|a| a.detail["action"] == "scale_down")
        .expect("scale_down decision audited");
    assert_eq!(
        (sd.decision.as_str(), sd.reason.as_deref()),
        ("rejected", Some("conflict"))
    );
    let sealed = env
        .verified_audit(audit.len(), Duration::from_secs(30))
        .await;
    assert!(
        sealed.problems.is_empty() && sealed.records >= audit.len(),
        "audit records are sealed: {sealed:?}"
    );
    assert!(
        env.read("switchyard.actions", 2, Duration::from_secs(2))
            .await
            .len()
            == 1,
        "no scale_down and no rollback yet"
    );

    // The approvals API: token required, lists the request, approval puts the rollback out.
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/approvals");
    assert_eq!(
        client.get(&url).send().await.unwrap().status().as_u16(),
        401
    );
    let list: Value = client
        .get(&url)
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["approvals"][0]["approval_id"],
        json!(pending.approval_id)
    );
    let approve = format!("{url}/{}/approve", pending.approval_id);
    let r = client
        .post(&approve)
        .bearer_auth("test-token")
        .json(&json!({"by": "alice", "why": "confirmed bad deploy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "approved");
    let again = client
        .post(&approve)
        .bearer_auth("test-token")
        .json(&json!({"by": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 409, "a decision is made once");
    // The CLI says the same and exits non-zero: nothing changed.
    let (brokers, redis) = stack().clone();
    let cli = std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "approvals",
            "reject",
            &pending.approval_id,
            "--by",
            "bob",
        ])
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .env("SWITCHYARD_REDIS_URL", &redis)
        .output()
        .expect("approvals reject");
    assert!(
        !cli.status.success(),
        "a second decision through the CLI fails"
    );
    let err = String::from_utf8_lossy(&cli.stderr);
    assert!(err.contains("already approved by alice"), "{err}");
    let actions = env
        .read("switchyard.actions", 2, Duration::from_secs(20))
        .await;
    let rb: ActionData = data(
        actions
            .iter()
            .find(|r| data::<ActionData>(r).action == "rollback")
            .expect("rollback on actions"),
    );
    assert_eq!(rb.approved_by.as_deref(), Some("alice"));
    assert_eq!(rb.parameters["to_version"], "v41");
    // Answered again (the 409 and the CLI), the decision produced nothing more: its records were
    // all produced the first time (a retry while they were not would produce them again).
    let rollbacks = env
        .read("switchyard.actions", 10, Duration::from_secs(3))
        .await
        .iter()
        .filter(|r| data::<ActionData>(r).action == "rollback")
        .count();
    assert_eq!(rollbacks, 1, "one rollback record");
    let approved = env
        .read("switchyard.approvals", 20, Duration::from_secs(3))
        .await
        .iter()
        .filter(|r| {
            let d = data_of(&event_of(r)).clone();
            d["approval_id"] == json!(pending.approval_id) && d["status"] == "approved"
        })
        .count();
    assert_eq!(approved, 1, "one approved record");
    assert!(
        rb.fencing_token > page.fencing_token,
        "fencing tokens increase per resource"
    );

    // The audit chains verify, and fail once a record is removed or altered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ok = verify(&env, &env.topic("switchyard.audit"));
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        said.contains(" seals signed and checked, 0 unsigned seals or version 1 records accepted")
            && !said.contains(": 0 seals signed"),
        "{said}"
    );
    // Every record of the audit topic, the seals too.
    let sealed = env
        .read("switchyard.audit", usize::MAX, Duration::from_secs(3))
        .await;
    let copy = |name: &str, f: &dyn Fn(usize, &Input) -> Option<Vec<u8>>| {
        let topic = format!("{}.{name}", env.prefix);
        let recs: Vec<Output> = sealed
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                f(i, r).map(|p| Output::new(topic.clone(), r.key.clone().unwrap_or_default(), p))
            })
            .collect();
        (topic, recs)
    };
    // Drop (or alter) checkout's second decision.
    let victim = sealed
        .iter()
        .enumerate()
        .filter(|(_, r)| r.key.as_deref() == Some(b"checkout") && !is_seal(r))
        .nth(1)
        .map(|(i, _)| i)
        .expect("checkout has a second audit record");
    let (removed_topic, removed) =
        copy("removed", &|i, r| (i != victim).then(|| r.payload.clone()));
    let (altered_topic, altered) = copy("altered", &|i, r| {
        Some(if i == victim {
            String::from_utf8(r.payload.clone())
                .unwrap()
                .replace("\"stage\":\"", "\"stage\":\"x")
                .into_bytes()
        } else {
            r.payload.clone()
        })
    });
    // A chain of someone's own appended to the trail, hashes and seal correct, unsigned (they
    // lack the key).
    let audit_topic = env.topic("switchyard.audit");
    let forger = switchyard::audit::Sealer::new(
        Arc::new(switchyard::audit::MemoryChainStore::default()),
        &audit_topic,
    );
    let fake = switchyard::event::CloudEvent::new(
        "forged-1",
        "switchyard",
        switchyard::records::types::AUDIT,
    )
    .with_subject("checkout")
    .with_time_now()
    .with_data(
        json!({"decision": "approved", "stage": "decisions", "resource": "checkout",
            "tenant": "default", "detail": {"action": "rollback", "approved_by": "mallory"}}),
    );
    let (recs, sealed_fake) = forger
        .seal(
            "decisions",
            "decisions/forged/0",
            &switchyard::records::Emitter::new(Default::default(), Default::default()),
            &[fake],
        )
        .await
        .unwrap();
    let inserted: Vec<Output> = recs.into_iter().chain(sealed_fake.seals).collect();
    let p = env.producer();
    for o in removed.iter().chain(&altered) {
        // One partition each, in the original order.
        let mut o = o.clone();
        o.key = Some(b"same".to_vec());
        p.send(&o).await.unwrap();
    }
    let bad = verify(&env, &removed_topic);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(
        said.contains("BROKEN") && said.contains("/checkout that this seal lists is missing"),
        "{said}"
    );
    let bad = verify(&env, &altered_topic);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    assert!(String::from_utf8_lossy(&bad.stdout).contains("altered"));
    for o in &inserted {
        p.send(o).await.unwrap();
    }
    let bad = verify(&env, &audit_topic);
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(
        bad.status.code() == Some(1)
            && said.contains("BROKEN partition ")
            && said.contains(": 1 unsigned seals or version 1 records ("),
        "{said}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_rules_dedupe_merge_priority_staleness_cooldown_access() {
    let env = TestEnv::new(
        2,
        &format!("{}{DEFAULT_AGENTS}{}", governance(""), default_routes("")),
    )
    .await;
    let running = Running::start(env.loaded.clone(), &["resolve"]);
    // Context for staleness: `deployment` changed at version 2.
    let c = &env.loaded.config;
    let store = switchyard::context::redis::RedisStore::new(
        switchyard::store::RedisConn::new(&c.redis.url).unwrap(),
        &c.redis.key_prefix,
        c.context.clone(),
    );
    use switchyard::context::ContextStore;
    let key = switchyard::store::ResourceKey::new("default", "r-stale");
    let fact = |v| switchyard::context::Fact {
        value: json!(v),
        by: "t".into(),
        task_id: "t".into(),
        at: "x".into(),
    };
    let out = |s: &str| switchyard::context::Outcome {
        status: s.into(),
        attempts: 1,
        duration_ms: 1,
        context_version: 0,
        response: Default::default(),
        error: None,
        refusals: vec![],
        at: String::new(),
        ran: None,
        ..Default::default()
    };
    store
        .commit(
            &key,
            "t1",
            &[("deployment".into(), fact("v1"))],
            None,
            &out("succeeded"),
            None,
        )
        .await
        .unwrap();
    store
        .commit(
            &key,
            "t2",
            &[("deployment".into(), fact("v2"))],
            None,
            &out("succeeded"),
            None,
        )
        .await
        .unwrap();

    let props = vec![
        proposal(
            "dup-1",
            "tester",
            "restart",
            "r-dup",
            json!({"mode": "soft"}),
            0,
        ),
        proposal(
            "dup-2",
            "tester",
            "restart",
            "r-dup",
            json!({"mode": "soft"}),
            0,
        ),
        proposal(
            "pg-1",
            "tester",
            "page",
            "r-merge",
            json!({"severity": "major", "owner": "a"}),
            0,
        ),
        proposal(
            "pg-2",
            "tester",
            "page",
            "r-merge",
            json!({"severity": "critical"}),
            0,
        ),
        proposal("sd-1", "tester", "scale_down", "r-prio", json!({"n": 1}), 0),
        proposal(
            "rb-1",
            "tester",
            "rollback",
            "r-prio",
            json!({"to": "v1"}),
            0,
        ),
        proposal("sd-2", "tester", "scale_down", "r-prio", json!({"n": 2}), 0),
        proposal(
            "rb-2",
            "tester",
            "rollback",
            "r-prio",
            json!({"to": "v0"}),
            0,
        ),
        proposal(
            "rb-stale",
            "tester",
            "rollback",
            "r-stale",
            json!({"to": "v0"}),
            1,
        ),
        proposal(
            "rb-fresh",
            "tester",
            "rollback",
            "r-stale",
            json!({"to": "v1"}),
            2,
        ),
        proposal("intruder", "cost-guard", "rollback", "r-acc", json!({}), 0),
    ];
    env.publish("switchyard.proposals", &props).await;
    // A copy of the first record (an upstream redelivery): replayed with the identical records
    // while the original's records are not known delivered, skipped once they are.
    env.publish("switchyard.proposals", &props[..1]).await;
    // Every proposal's decision (the copy may add a repeat of the first's).
    let mut audit: Vec<AuditData> = Vec::new();
    for n in props.len()..=props.len() + 1 {
        audit = env
            .audit(n, Duration::from_secs(20))
            .await
            .iter()
            .map(data)
            .collect();
        let decided: std::collections::BTreeSet<&str> = audit
            .iter()
            .filter_map(|a| a.detail["proposal_id"].as_str())
            .collect();
        if decided.len() == props.len() {
            break;
        }
    }
    let by_prop: BTreeMap<String, &AuditData> = audit
        .iter()
        .map(|a| (a.detail["proposal_id"].as_str().unwrap().to_string(), a))
        .collect();
    let outcome = |id: &str| {
        (
            by_prop[id].decision.clone(),
            by_prop[id].reason.clone().unwrap_or_default(),
        )
    };
    assert_eq!(outcome("dup-1"), ("accepted".into(), "".into()));
    assert_eq!(outcome("dup-2"), ("deduplicated".into(), "".into()));
    assert_eq!(outcome("pg-2"), ("merged".into(), "".into()));
    assert_eq!(outcome("sd-1"), ("accepted".into(), "".into()));
    assert_eq!(
        outcome("rb-1"),
        ("accepted".into(), "".into()),
        "higher priority supersedes the scale_down"
    );
    assert_eq!(
        by_prop["rb-1"].detail["superseded"][0]
            .as_str()
            .map(|s| s.starts_with("act-")),
        Some(true)
    );
    assert_eq!(outcome("sd-2"), ("rejected".into(), "conflict".into()));
    assert_eq!(outcome("rb-2"), ("rejected".into(), "cooldown".into()));
    assert_eq!(outcome("rb-stale"), ("rejected".into(), "stale".into()));
    assert_eq!(outcome("rb-fresh"), ("accepted".into(), "".into()));
    assert_eq!(outcome("intruder"), ("rejected".into(), "access".into()));

    env.read("switchyard.actions", 6, Duration::from_secs(20))
        .await;
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", usize::MAX, Duration::from_secs(2))
        .await
        .iter()
        .map(data)
        .collect();
    let restarts: Vec<&ActionData> = actions.iter().filter(|a| a.action == "restart").collect();
    assert!(
        (1..=2).contains(&restarts.len()),
        "dedupe: one action, emitted again at most for the copy: {restarts:?}"
    );
    assert!(
        restarts.iter().all(|r| *r == restarts[0]),
        "a replayed proposal yields the identical action"
    );
    assert_eq!(
        by_prop["dup-2"].detail["action_id"],
        json!(restarts[0].action_id),
        "the duplicate is recorded against the one action"
    );
    let pages: Vec<&ActionData> = actions.iter().filter(|a| a.action == "page").collect();
    assert_eq!(pages.len(), 2);
    assert_eq!(
        pages[0].action_id, pages[1].action_id,
        "merged into one action"
    );
    assert_eq!(
        pages[1].parameters,
        json!({"severity": "critical", "owner": "a"})
    );
    assert!(pages[1].fencing_token > pages[0].fencing_token);
    assert_eq!(pages[1].proposals, json!(["pg-1", "pg-2"]));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_owner_cannot_apply_an_older_proposal() {
    use switchyard::kafka::runtime::process_one;
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    let emitter =
        switchyard::records::Emitter::new(env.loaded.schemas.clone(), env.loaded.topics.clone());
    let stage = switchyard::stages::resolve::ResolveStage {
        rules: Default::default(),
        governance: Arc::new(Default::default()),
        budgets: Arc::new(switchyard::governance::budgets::Budgets::new(
            Arc::new(switchyard::governance::budgets::RedisBudgetStore::new(
                conn.clone(),
            )),
            &c.redis.key_prefix,
            vec![],
        )),
        store: Arc::new(switchyard::resolve::store::RedisResourceStore::new(
            conn.clone(),
            &c.redis.key_prefix,
            3600,
            3600,
        )),
        emitter,
        actions_topic: "a".into(),
        approvals_topic: "b".into(),
        sealer: sealer(&conn, &c.redis.key_prefix),
        stats: None,
        graph: None,
        clock: Default::default(),
        notifier: None,
        max_output_bytes: 1_000_000,
        topic_limits: Default::default(),
    };
    let input = |id: &str, offset: i64| {
        let ev = proposal(id, "tester", "restart", "r-z", json!({"id": id}), 0);
        Arc::new(Input::new(
            "p",
            0,
            offset,
            Some(b"r-z"),
            serde_json::to_vec(&ev).unwrap(),
        ))
    };
    // Seals differ from batch to batch (their sequence number); the records they seal do not.
    let unsealed = |outs: Vec<Output>| -> Vec<Output> {
        outs.into_iter()
            .filter(|o| {
                serde_json::from_slice::<CloudEvent>(&o.payload)
                    .map(|e| e.ty != switchyard::audit::SEAL_TYPE)
                    .unwrap_or(true)
            })
            .collect()
    };
    let new_owner = unsealed(process_one(&stage, input("p-10", 10)).await.unwrap());
    assert!(
        new_owner.iter().any(|o| o.topic == "a"),
        "the owner's proposal becomes an action"
    );
    let zombie = unsealed(process_one(&stage, input("p-5", 5)).await.unwrap());
    assert!(zombie.is_empty(), "a zombie's older offset applies nothing");
    let replay = unsealed(process_one(&stage, input("p-10", 10)).await.unwrap());
    assert_eq!(
        replay, new_owner,
        "a redelivered proposal re-emits the same records"
    );
    // The fence is of the topic it was noted for: a proposals topic replaced by another
    // (topics.proposals pointed elsewhere) or deleted and created again (another topic id) starts
    // at low offsets that were never applied from it.
    let from = |topic: &str, topic_id: Option<&str>, id: &str, offset: i64| {
        let ev = proposal(id, "tester", "restart", "r-z", json!({"id": id}), 0);
        let mut rec = Input::new(
            topic,
            0,
            offset,
            Some(b"r-z"),
            serde_json::to_vec(&ev).unwrap(),
        );
        rec.topic_id = topic_id.map(std::sync::Arc::from);
        Arc::new(rec)
    };
    let applied = |outs: Vec<Output>| unsealed(outs).iter().any(|o| o.topic == "a");
    for (topic, topic_id, id, offset, applies, why) in [
        (
            "p2",
            None,
            "q-3",
            3,
            true,
            "another topic's proposal is not fenced by this one's offset",
        ),
        (
            "p",
            Some("aa"),
            "q-20",
            20,
            true,
            "back on the first topic, past its offset",
        ),
        (
            "p",
            Some("bb"),
            "q-4",
            4,
            true,
            "the topic created again (another id): 4 was never applied",
        ),
        (
            "p",
            Some("bb"),
            "q-2",
            2,
            false,
            "a zombie of the new incarnation is fenced as before",
        ),
    ] {
        let outs = process_one(&stage, from(topic, topic_id, id, offset))
            .await
            .unwrap();
        assert_eq!(applied(outs), applies, "{why}");
    }
}

/// Resolve is the one writer of a resource's fencing tokens and actions: an approval's decision
/// takes no token and writes no action, but a release to the proposals topic, which resolve reads
/// in the resource's order. Here an owner decides a `page` (taking its token) and dies before
/// writing it; a person approves the resource's waiting rollback meanwhile. Nothing goes out until
/// resolve runs again; then the page (its stored decision, as decided) and after it the rollback,
/// with the higher token: along the actions topic the resource's tokens only rise, so an executor
/// fencing per resource refuses neither. (Before, the approval took the next token and wrote the
/// rollback at once; the page came after it with a lower token, and was refused as stale.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_action_goes_out_after_what_resolve_decided_before_its_release() {
    use switchyard::kafka::runtime::process_one;
    let env = TestEnv::new(
        1,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("{ actions: [rollback] }"),
            default_routes("")
        ),
    )
    .await;
    let resolve = env.start(&["resolve"]);
    env.publish(
        "switchyard.proposals",
        &[proposal(
            "rb",
            "tester",
            "rollback",
            "r-o",
            json!({"to": "v1"}),
            0,
        )],
    )
    .await;
    let pending: ApprovalData = data(
        &env.read("switchyard.approvals", 1, Duration::from_secs(30))
            .await[0],
    );
    resolve.stop().await;
    // The page's owner decides it (its token taken, its decision stored) and dies before writing.
    env.publish(
        "switchyard.proposals",
        &[proposal("pg", "tester", "page", "r-o", json!({"n": 1}), 0)],
    )
    .await;
    let recs = env
        .read("switchyard.proposals", 2, Duration::from_secs(30))
        .await;
    let page_rec = recs
        .iter()
        .find(|r| data::<ProposalData>(r).proposal_id == "pg")
        .expect("the page's proposal");
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    let owner = switchyard::stages::resolve::ResolveStage {
        rules: c.resolve.clone(),
        governance: Arc::new(c.governance.clone()),
        budgets: Arc::new(switchyard::governance::budgets::Budgets::new(
            Arc::new(switchyard::governance::budgets::RedisBudgetStore::new(
                conn.clone(),
            )),
            &c.redis.key_prefix,
            vec![],
        )),
        store: switchyard::app::resource_store(&env.loaded, conn.clone()),
        emitter: switchyard::records::Emitter::new(
            env.loaded.schemas.clone(),
            env.loaded.topics.clone(),
        ),
        actions_topic: c.topics.actions.clone(),
        approvals_topic: c.topics.approvals.clone(),
        sealer: sealer(&conn, &c.redis.key_prefix),
        stats: None,
        graph: None,
        clock: Default::default(),
        notifier: None,
        max_output_bytes: 1_000_000,
        topic_limits: Default::default(),
    };
    let lost = process_one(&owner, Arc::new(page_rec.clone()))
        .await
        .expect("decided");
    assert!(
        lost.iter().any(|o| o.topic == c.topics.actions),
        "the page was accepted (and its records are lost with its owner)"
    );
    // A person approves the rollback meanwhile.
    let approvals = switchyard::cmd::approvals::service(&env.loaded).unwrap();
    let d = approvals
        .decide(
            &pending.approval_id,
            switchyard::governance::approvals::Verdict::Approve,
            "carol",
            "go",
            false,
            false,
        )
        .await
        .unwrap();
    assert!(
        d.outputs.iter().all(|o| o.topic != c.topics.actions),
        "a decision writes no action"
    );
    let producer = env.producer();
    for o in &d.outputs {
        producer.send(o).await.unwrap();
    }
    assert!(
        env.read("switchyard.actions", 1, Duration::from_secs(3))
            .await
            .is_empty(),
        "nothing goes out before resolve reads the resource's records"
    );
    // The next owner: the page as decided, then the release.
    let resolve = env.start(&["resolve"]);
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 2, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    resolve.stop().await;
    let seen: Vec<(&str, Option<&str>)> = actions
        .iter()
        .map(|a| (a.action.as_str(), a.approved_by.as_deref()))
        .collect();
    assert_eq!(seen, [("page", None), ("rollback", Some("carol"))]);
    assert!(
        actions[1].fencing_token > actions[0].fencing_token,
        "tokens rise along the topic: {} then {}",
        actions[0].fencing_token,
        actions[1].fencing_token
    );
    // The release is audited by resolve with the token it took.
    let audit: Vec<AuditData> = env
        .audit(4, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    assert!(
        audit.iter().any(|a| a.decision == "released"
            && a.detail["fencing_token"] == json!(actions[1].fencing_token)
            && a.detail["approval_id"] == json!(pending.approval_id)),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_budget_stops_agent_calls() {
    let yaml = format!(
        r#"{DEFAULT_AGENTS}{}
governance:
  budgets:
    - {{ name: guard-calls, per: agent, matches: deploy-guard, period: day, max_calls: 2 }}
"#,
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let running = Running::start(env.loaded.clone(), &["route", "agents"]);
    let evs = numbered_events("b", "deployment.started", 0..4, 4);
    env.publish("events.deployments", &evs).await;
    let res: Vec<ResultData> = env
        .read("switchyard.results", 4, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    let statuses: Vec<&str> = res.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "succeeded").count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "refused").count(),
        2,
        "{statuses:?}"
    );
    let audit: Vec<AuditData> = env
        .audit(100, Duration::from_secs(3))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.decision == "budget_refused")
            .count(),
        2
    );
    let m = switchyard::telemetry::METRICS.render();
    assert!(
        m.contains("switchyard_budget_refusals_total{budget=\"guard-calls\"}"),
        "refusals counted"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_timeout_expires_and_decisions_topic_approves() {
    // Rollbacks expire after 3 s (`approvals.timeout_seconds`); restarts, decided below through the
    // decisions topic, have 10 minutes (their rule's one level), so a slow machine does not expire
    // them before their decision arrives.
    let mut yaml = governance(
        "{ actions: [rollback] }, { actions: [restart], escalation: [{group: sre, timeout_seconds: 600}] }",
    );
    yaml = yaml.replace("timeout_seconds: 600\n", "timeout_seconds: 3\n");
    let env = TestEnv::new(1, &format!("{yaml}{DEFAULT_AGENTS}{}", default_routes(""))).await;
    let running = Running::start(env.loaded.clone(), &["resolve", "decisions"]);
    env.publish(
        "switchyard.proposals",
        &[proposal(
            "late",
            "tester",
            "rollback",
            "r-late",
            json!({"to": "v1"}),
            0,
        )],
    )
    .await;
    let first = env
        .read("switchyard.approvals", 1, Duration::from_secs(30))
        .await;
    let pending: ApprovalData = data(&first[0]);
    assert_eq!(pending.status, "pending");
    // Nobody decides: after the timeout the request expires (auto-reject).
    let recs: Vec<ApprovalData> = env
        .read("switchyard.approvals", 2, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(recs[1].status, "expired");
    // A decision through the decisions topic.
    env.publish(
        "switchyard.proposals",
        &[proposal(
            "ok",
            "tester",
            "restart",
            "r-ok",
            json!({"to": "v2"}),
            0,
        )],
    )
    .await;
    let recs: Vec<ApprovalData> = env
        .read("switchyard.approvals", 3, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    let req = recs.iter().find(|a| a.resource == "r-ok").unwrap();
    // Another pending approval whose stored record became unreadable: its decision is
    // dead-lettered (corrupt_state), not retried for ever ahead of every later decision.
    env.publish(
        "switchyard.proposals",
        &[proposal(
            "bad",
            "tester",
            "restart",
            "r-bad",
            json!({"to": "v3"}),
            0,
        )],
    )
    .await;
    let recs: Vec<ApprovalData> = env
        .read("switchyard.approvals", 4, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    let bad = recs.iter().find(|a| a.resource == "r-bad").unwrap();
    let mut conn = redis_connection(stack().1.as_str()).await;
    let key = format!(
        "{}:res:{}",
        env.prefix,
        switchyard::store::ResourceKey::new("default", "r-bad").hash_tag()
    );
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg(format!("approval:{}", bad.approval_id))
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    for (id, by) in [(&bad.approval_id, "dave"), (&req.approval_id, "carol")] {
        let decision = Output::new(
            env.topic("switchyard.approval-decisions"),
            id.clone(),
            serde_json::to_vec(
                &json!({"approval_id": id, "decision": "approve", "by": by, "why": "ok"}),
            )
            .unwrap(),
        );
        env.producer().send(&decision).await.unwrap();
    }
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 1, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(
        (
            actions[0].action.as_str(),
            actions[0].resource.as_str(),
            actions[0].approved_by.as_deref()
        ),
        ("restart", "r-ok", Some("carol"))
    );
    let none = env
        .read("switchyard.actions", 2, Duration::from_secs(2))
        .await;
    assert_eq!(none.len(), 1, "the expired rollback never goes out");
    let dl = env.read("switchyard.dlq", 1, Duration::from_secs(10)).await;
    assert!(
        dl.iter().any(|r| r
            .headers
            .iter()
            .any(|(k, v)| k == "switchyard.dlq.reason" && v == b"corrupt_state")),
        "the unreadable approval's decision is dead-lettered"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_killed_mid_stream_keep_every_guarantee() {
    let yaml = format!(
        r#"{DEFAULT_AGENTS}{}
resolve:
  actions:
    rollback: {{ priority: 100, conflicts_with: [scale_down, scale_up] }}
    scale_up: {{ priority: 20, conflicts_with: [scale_down] }}
    scale_down: {{ priority: 10 }}
    page: {{ merge: true }}
"#,
        default_routes("")
    );
    let env = TestEnv::new(6, &yaml).await;
    // A new installation's marker, before proposals are written (else an instance starting after
    // the first ones would see history in the topic and an empty Redis: a lost state).
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    switchyard::store::start_epoch(&conn, &c.redis.key_prefix, false)
        .await
        .expect("epoch");
    let spawn = || spawn_run(&env.config_path, "resolve");
    let mut procs = vec![spawn(), spawn(), spawn()];
    const N: usize = 900;
    const RESOURCES: usize = 40;
    let actions = ["rollback", "scale_down", "scale_up", "page", "restart"];
    let props: Vec<CloudEvent> = (0..N)
        .map(|i| {
            let action = actions[(i * 7 + i / 3) % actions.len()];
            proposal(
                &format!("mp-{i}"),
                "tester",
                action,
                &format!("res-{}", i % RESOURCES),
                json!({"v": i % 4}),
                0,
            )
        })
        .collect();
    let producer_env = &env;
    let produce = async move {
        for chunk in props.chunks(50) {
            producer_env.publish("switchyard.proposals", chunk).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let kill = async {
        // Once decisions flow, kill one instance with SIGKILL mid-stream.
        let _ = env.audit(200, Duration::from_secs(60)).await;
        let mut victim = procs.remove(1);
        victim.0.kill().expect("SIGKILL");
        let _ = victim.0.wait();
    };
    tokio::join!(produce, kill);

    // Every proposal gets its decision.
    let mut decided = std::collections::BTreeSet::new();
    for _ in 0..90 {
        let audit = env.audit(usize::MAX, Duration::from_secs(2)).await;
        decided = audit
            .iter()
            .filter_map(|r| {
                data::<AuditData>(r).detail["proposal_id"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        if decided.len() >= N {
            break;
        }
    }
    let missing: Vec<String> = (0..N)
        .map(|i| format!("mp-{i}"))
        .filter(|id| !decided.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} proposals without a decision, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    let recs = env
        .read("switchyard.actions", usize::MAX, Duration::from_secs(3))
        .await;
    let mut by_record: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    let mut per_resource: BTreeMap<String, Vec<(i64, ActionData)>> = BTreeMap::new();
    for r in &recs {
        let ev = event_of(r);
        let a: ActionData = data(r);
        // Re-emissions after the crash are the identical record; anything else is a doubled action.
        if let Some(prev) = by_record.insert(ev.id.clone(), r.payload.clone()) {
            assert_eq!(
                prev, r.payload,
                "record {} emitted twice with different content",
                ev.id
            );
            continue;
        }
        let first = a.proposals[0].as_str().unwrap().to_string();
        if let Some(other) = origin.insert(first.clone(), a.action_id.clone()) {
            assert_eq!(
                other, a.action_id,
                "proposal {first} caused two different actions"
            );
        }
        per_resource
            .entry(a.resource.clone())
            .or_default()
            .push((r.offset, a));
    }
    let rules = &env.loaded.config.resolve;
    for (res, mut list) in per_resource {
        list.sort_by_key(|(o, _)| *o);
        // Per-resource order: tokens increase along the topic.
        for w in list.windows(2) {
            assert!(
                w[1].1.fencing_token > w[0].1.fencing_token,
                "{res}: token {} after {}",
                w[1].1.fencing_token,
                w[0].1.fencing_token
            );
        }
        // No accepted action coexists with a conflicting one unless it outranks it (supersedes).
        for (i, (_, later)) in list.iter().enumerate() {
            for (_, earlier) in &list[..i] {
                if earlier.action_id != later.action_id
                    && rules.conflicts(&earlier.action, &later.action)
                {
                    assert!(
                        later.priority > earlier.priority,
                        "{res}: {} (priority {}) accepted after conflicting {} (priority {})",
                        later.action,
                        later.priority,
                        earlier.action,
                        earlier.priority
                    );
                }
            }
        }
    }
    // The sealed audit trail verifies.
    let mut last = 0;
    for _ in 0..30 {
        let n = env.audit(usize::MAX, Duration::from_secs(2)).await.len();
        if n == last && n >= N {
            break;
        }
        last = n;
    }
    let v = verify(&env, &env.topic("switchyard.audit"));
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    for p in &mut procs {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status();
    }
    for p in &mut procs {
        let s = p.0.wait().expect("wait");
        assert!(s.success(), "graceful stop exits 0: {s:?}");
    }
}

/// Batches sealed into one chain by several writers at once (two `Sealer`s stand for two processes,
/// a partition's old and new owner, each with many concurrent batches) form one gapless chain; a
/// decision sealed again (a redelivered input) is the identical record, counted as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sealers_keep_one_chain_and_reseal_identically() {
    use switchyard::audit::{verify, AuditRecord};
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    let emitter = Arc::new(switchyard::records::Emitter::new(
        env.loaded.schemas.clone(),
        env.loaded.topics.clone(),
    ));
    let a = sealer(&conn, &c.redis.key_prefix);
    let b = sealer(&conn, &c.redis.key_prefix);
    let chain = format!("test/{}/0", env.topic("switchyard.proposals"));
    let record = |resource: &str, n: usize| {
        CloudEvent::new(format!("audit-{resource}-{n}"), "test", "switchyard.audit")
            .with_subject(resource)
            .with_time("2026-11-26T00:00:00Z")
            .with_data(
                json!({"decision": "accepted", "stage": "test", "resource": resource,
                          "tenant": "default", "detail": {"n": n}}),
            )
    };
    let mut tasks = Vec::new();
    for n in 0..100 {
        let sealer = if n % 2 == 0 { a.clone() } else { b.clone() };
        let batch = vec![
            record(&format!("r{}", n % 3), 2 * n),
            record("r9", 2 * n + 1),
        ];
        let (emitter, chain) = (emitter.clone(), chain.clone());
        // Each writer's seals count as delivered once made (the watch dropped): a writer makes
        // no more than KEPT_SEALS of a chain's seals while earlier ones are undelivered.
        tasks.push(tokio::spawn(async move {
            sealer
                .seal("test", &chain, &emitter, &batch)
                .await
                .map(|(records, sealed)| (records, sealed.seals))
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        let (records, seals) = t.await.unwrap().expect("sealed");
        outputs.extend(records);
        outputs.extend(seals);
    }
    // A redelivery: the same decision again, later, through the other writer.
    let (again, seal) = b
        .seal("test", &chain, &emitter, &[record("r0", 0)])
        .await
        .expect("sealed again");
    let first = outputs
        .iter()
        .find(|o| o.payload == again[0].payload)
        .expect("a decision sealed again is byte-identical");
    assert_eq!(first.key, again[0].key);
    outputs.extend(again);
    outputs.extend(seal.seals);
    let records: Vec<AuditRecord> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| AuditRecord::new(0, i as i64, o.payload.clone()))
        .collect();
    let v = verify(&records);
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // Seals: 101, some written twice (a writer writes again the head the other one wrote).
    let distinct: std::collections::HashSet<&String> = records
        .iter()
        .filter(|r| r.event.ty == switchyard::audit::SEAL_TYPE)
        .map(|r| &r.hash)
        .collect();
    assert_eq!((v.chains, distinct.len(), v.records), (1, 101, 201));
    // Altering one sealed decision is found.
    let mut altered = records.clone();
    let text = String::from_utf8(outputs[0].payload.clone()).unwrap();
    assert!(text.contains("accepted"));
    altered[0] = AuditRecord::new(0, 0, text.replace("accepted", "rejected").into_bytes());
    let v = verify(&altered);
    assert!(!v.problems.is_empty(), "an altered record is found");
}

/// A proposal of `tenant` (the proposals topic carries tenants in its records).
fn tenant_proposal(id: &str, tenant: &str, resource: &str) -> CloudEvent {
    let mut ev = proposal(id, "tester", "rollback", resource, json!({"id": id}), 0);
    if let Some(d) = ev.data.as_mut() {
        d["tenant"] = json!(tenant);
    }
    ev.with_extension("tenant", tenant)
}

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789abc";

/// The approvals API is scoped to tenants: a user sees and decides only their tenants (another
/// tenant's approval is not found), viewers cannot decide, the recorded approver is the
/// authenticated user, pages are bounded, free text is bounded before anything moves, the scheme
/// is case-insensitive and two Authorization headers are refused; `/metrics` can require a token;
/// the tenant label is bounded to the configured tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_api_is_scoped_paged_and_bounded() {
    let yaml = format!(
        r#"{}
http:
  enabled: true
  metrics_token: metrics-token-0123456789
  users:
    - {{ name: alice, token: {ALICE}, roles: [approver], tenants: [acme] }}
    - {{ name: bob, token: {BOB}, roles: [viewer] }}
{DEFAULT_AGENTS}{}"#,
        governance("{ actions: [rollback] }")
            .replace("governance:\n", "governance:\n  tenants: [acme]\n"),
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let running = Running::start(loaded, &["resolve", "decisions"]);
    env.publish(
        "switchyard.proposals",
        &[
            tenant_proposal("a1", "acme", "r1"),
            tenant_proposal("b1", "beta", "r2"),
            tenant_proposal("a2", "acme", "r3"),
        ],
    )
    .await;
    let pending: Vec<ApprovalData> = env
        .read("switchyard.approvals", 3, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(pending.len(), 3);
    let id_of = |r: &str| {
        pending
            .iter()
            .find(|a| a.resource == r)
            .map(|a| a.approval_id.clone())
            .unwrap()
    };
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: String, token: &'static str| {
        let c = client.clone();
        let url = format!("{base}{path}");
        async move {
            let r = c.get(url).bearer_auth(token).send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["resource"].as_str().unwrap().to_string())
            .collect()
    };
    // Scopes: alice sees acme only, bob every tenant; ?tenant filters within the scope.
    let (code, v) = get("/v1/approvals".into(), ALICE).await;
    assert_eq!(code, 200);
    let mut mine = ids(&v);
    mine.sort();
    assert_eq!(mine, ["r1", "r3"]);
    assert!(ids(&get("/v1/approvals?tenant=beta".into(), ALICE).await.1).is_empty());
    assert_eq!(
        ids(&get("/v1/approvals?tenant=beta".into(), BOB).await.1),
        ["r2"]
    );
    // Pages.
    let (_, p1) = get("/v1/approvals?limit=2".into(), BOB).await;
    assert_eq!(ids(&p1).len(), 2);
    let next = p1["next"].as_str().expect("a next cursor").to_string();
    let (_, p2) = get(format!("/v1/approvals?limit=2&after={next}"), BOB).await;
    assert_eq!(ids(&p2).len(), 1);
    assert!(p2["next"].is_null());
    // One approval; another tenant's is not found.
    assert_eq!(
        get(format!("/v1/approvals/{}", id_of("r2")), ALICE).await.0,
        404
    );
    let (code, one) = get(format!("/v1/approvals/{}", id_of("r2")), BOB).await;
    assert_eq!(
        (code, one["action"]["action"].as_str()),
        (200, Some("rollback"))
    );
    let post = |id: String, token: &'static str, body: Value| {
        let c = client.clone();
        let url = format!("{base}/v1/approvals/{id}/approve");
        async move {
            c.post(url)
                .header("authorization", format!("bearer {token}"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        post(id_of("r2"), ALICE, json!({})).await.status().as_u16(),
        404
    );
    assert_eq!(
        post(id_of("r1"), BOB, json!({})).await.status().as_u16(),
        403
    );
    // A 1.5 MB reason is refused with 400 and nothing moves.
    let r = post(id_of("r1"), ALICE, json!({"why": "x".repeat(1_500_000)})).await;
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("why is 1500000 bytes"));
    assert_eq!(
        get(format!("/v1/approvals/{}", id_of("r1")), ALICE).await.1["approval"]["status"],
        "pending"
    );
    // Two Authorization headers are refused, whatever the first says.
    let r = client
        .post(format!("{base}/v1/approvals/{}/approve", id_of("r1")))
        .header("authorization", format!("Bearer {ALICE}"))
        .header("authorization", "Bearer nope")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // The recorded approver is the authenticated user, whatever the body says.
    let r = post(id_of("r1"), ALICE, json!({"by": "mallory", "why": "ok"})).await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["decided_by"], "alice");
    let actions = env
        .read("switchyard.actions", 1, Duration::from_secs(30))
        .await;
    let act: ActionData = data(&actions[0]);
    assert_eq!(act.approved_by.as_deref(), Some("alice"));
    // /metrics needs its token; the tenant label is bounded.
    let m = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(m.status().as_u16(), 401);
    tokio::time::sleep(Duration::from_secs(3)).await; // a sweep sets the pending gauges
    let m = client
        .get(format!("{base}/metrics"))
        .bearer_auth("metrics-token-0123456789")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("switchyard_approvals_pending{tenant=\"acme\"} 1"),
        "{m}"
    );
    assert!(m.contains("switchyard_approvals_pending{tenant=\"other\"} 1"));
    assert!(
        !m.contains("tenant=\"beta\""),
        "unconfigured tenants are not labels"
    );
    running.stop().await;
}

/// A decision's records are noted in an outbox before its state moves: when the process dies
/// between the state change and producing the records (simulated: decided, never produced), the
/// sweeper produces them, so the approval, the release (and with it, from resolve, the action) and
/// the audit record all arrive and the chain has no hole. A decision from the decisions topic with a 1 MB reason is dead-lettered and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_lost_in_a_crash_is_produced_by_the_sweeper() {
    let yaml = format!(
        "{}{DEFAULT_AGENTS}{}",
        governance("{ actions: [rollback] }").replace(
            "timeout_seconds: 600",
            "timeout_seconds: 600\n    redeliver_after_seconds: 1"
        ),
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let resolve = env.start(&["resolve"]);
    env.publish(
        "switchyard.proposals",
        &[
            tenant_proposal("c1", "default", "r-crash"),
            tenant_proposal("c2", "default", "r-big"),
        ],
    )
    .await;
    let pending: Vec<ApprovalData> = env
        .read("switchyard.approvals", 2, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    resolve.stop().await;
    let id = |r: &str| {
        pending
            .iter()
            .find(|a| a.resource == r)
            .unwrap()
            .approval_id
            .clone()
    };
    // Decided through the outbox path, and the process "dies" before producing anything.
    let approvals = switchyard::cmd::approvals::service(&env.loaded).unwrap();
    let d = approvals
        .decide(
            &id("r-crash"),
            switchyard::governance::approvals::Verdict::Approve,
            "carol",
            "go",
            false,
            true,
        )
        .await
        .unwrap();
    assert!(d.fresh && d.action.is_some());
    drop(approvals);
    // A reason of almost 1 MB on the decisions topic: dead-lettered, nothing decided.
    env.publish_one(
        "switchyard.approval-decisions",
        "d-big",
        "switchyard.approval.decision",
        "r-big",
        json!({"approval_id": id("r-big"), "decision": "approve", "by": "dave", "why": "y".repeat(900_000)}),
    )
    .await;
    // Resolve sends the approved action when it reads the release the sweeper produces.
    let running = env.start(&["decisions", "resolve"]);
    let recs: Vec<ApprovalData> = env
        .read("switchyard.approvals", 3, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(
        recs.len(),
        3,
        "the lost decision's approval record is produced"
    );
    assert!(recs
        .iter()
        .any(|a| a.resource == "r-crash" && a.status == "approved"));
    assert!(!recs
        .iter()
        .any(|a| a.resource == "r-big" && a.status != "pending"));
    let act: ActionData = data(
        &env.read("switchyard.actions", 1, Duration::from_secs(30))
            .await[0],
    );
    assert_eq!(
        (act.resource.as_str(), act.approved_by.as_deref()),
        ("r-crash", Some("carol"))
    );
    let dlq = env.read("switchyard.dlq", 1, Duration::from_secs(30)).await;
    assert_eq!(
        header(&dlq[0], dlq_headers::REASON),
        Some("invalid_decision")
    );
    running.stop().await;
    let v = verify(&env, &env.topic("switchyard.audit"));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// The data format marker (`<prefix>:format`): this build raises a lower one at start and keeps
/// working; once a newer build raises it, the running instance stops (draining and committing;
/// an error naming the marker) without lowering it; a new start (before any setup), the `run`
/// command, `recover` and `approvals approve` are refused, and `status` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_data_format_stops_this_build_and_refuses_its_start() {
    use switchyard::format::DATA_FORMAT;
    let env = TestEnv::new(1, "").await;
    let mut conn = redis_connection(&stack().1).await;
    let key = format!("{}:format", env.prefix);
    let marker = |mut c: redis::aio::MultiplexedConnection, key: String| async move {
        redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<String>>(&mut c)
            .await
            .expect("GET")
    };
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let running = Running::start(env.loaded.clone(), &["route"]);
    env.publish_one(
        "events.deployments",
        "f1",
        "deployment.started",
        "svc-f",
        json!({"service": "svc-f"}),
    )
    .await;
    assert_eq!(
        env.read("switchyard.tasks", 1, Duration::from_secs(40))
            .await
            .len(),
        1
    );
    assert_eq!(
        marker(conn.clone(), key.clone()).await,
        Some(DATA_FORMAT.to_string()),
        "a lower marker is raised to this build's format"
    );

    // A newer build starts against this Redis.
    let newer = (DATA_FORMAT + 1).to_string();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&newer)
        .query_async(&mut conn)
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), running.outcome())
        .await
        .expect("the instance stops within seconds of the newer marker");
    let why = outcome.expect_err("it stops with an error").to_string();
    assert!(
        why.contains("a newer switchyard uses this Redis") && why.contains(&key),
        "{why}"
    );
    assert_eq!(
        marker(conn.clone(), key.clone()).await,
        Some(newer.clone()),
        "never lowered"
    );
    // It drained and committed what it had taken: the first event's offset.
    assert_eq!(
        env.committed("route", "events.deployments", 1)
            .await
            .get(&0),
        Some(&1),
        "the stopped instance committed its work"
    );
    // An event sent now is for the newer build: this one must not take it.
    env.publish_one(
        "events.deployments",
        "f2",
        "deployment.started",
        "svc-f",
        json!({"service": "svc-f"}),
    )
    .await;

    // A start of this build is refused at once, before anything is set up (an HTTP address that
    // cannot be bound would fail the setup otherwise).
    let mut unbindable = env.loaded.clone();
    unbindable.config.http.enabled = true;
    unbindable.config.http.listen = "not-an-address".into();
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        switchyard::app::run(
            unbindable,
            vec!["route".to_string()],
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("refused at once");
    assert!(
        matches!(&refused, Err(switchyard::app::AppError::Superseded(why)) if why.contains("a newer switchyard uses this Redis")),
        "a start is refused: {refused:?}"
    );
    assert_eq!(
        env.read("switchyard.tasks", 2, Duration::from_secs(5))
            .await
            .len(),
        1,
        "the refused instance processed nothing"
    );
    // The command exits non-zero with the reason; `recover` refuses too; `status` says so.
    for args in [
        &["run", "--stages", "route"][..],
        &["recover", "--force"][..],
        &["approvals", "approve", "apr-none", "--by", "erin"][..],
    ] {
        let mut child = std::process::Command::new(bin())
            .args(["--config", env.config_path.to_str().unwrap()])
            .args(args)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("switchyard runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} did not exit on a newer marker");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?} exits non-zero");
        assert!(
            err.contains("a newer switchyard uses this Redis"),
            "{args:?}: {err}"
        );
    }
    // What a claim reports: none before, raised from an older format, a newer one in place.
    let rc = switchyard::store::RedisConn::from_config(&env.loaded.config.redis).unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let claim = |ours: u64| switchyard::format::claim_as(&rc, &env.prefix, ours);
    let first = claim(DATA_FORMAT).await.unwrap();
    assert!(first.before == 0 && first.now == DATA_FORMAT && !first.raised_from_older());
    let up = claim(DATA_FORMAT + 1).await.unwrap();
    assert!(
        up.raised_from_older() && up.now == DATA_FORMAT + 1,
        "{up:?}"
    );
    let ours = claim(DATA_FORMAT).await.unwrap();
    assert!(ours.newer() && !ours.raised_from_older(), "{ours:?}");
    let text = cli(&env, &["status"]);
    assert!(
        text.contains(&format!(
            "FORMAT     {newer}: a newer build uses this Redis"
        )),
        "{text}"
    );
    assert_eq!(
        marker(conn.clone(), key.clone()).await,
        Some(newer),
        "never lowered"
    );
}

/// Redis restarting without its data (no append-only file) is detected: nothing is processed (no
/// second `page` with a restarted fencing token), `/readyz` says why; `switchyard recover` rebuilds
/// the pending approval, the chain heads and the tokens from Kafka, and brings back approved an
/// approval whose release was lost (the sweeper writes it, resolve sends its action); then
/// processing resumes, the approval can be decided, tokens keep rising, and the audit chains verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_is_refused_until_recovered_from_kafka() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(port, dir.path(), false);
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let env = TestEnv::new(
        1,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("{ actions: [rollback], min_impact: high }").replace(
                "timeout_seconds: 600",
                "timeout_seconds: 600\n    redeliver_after_seconds: 1"
            ),
            default_routes("")
        ),
    )
    .await;
    let http = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.redis.url = redis_url.clone();
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{http}");
    let running = Running::start(loaded, &["route", "agents", "resolve", "decisions"]);
    env.deployment_then_breach("svc-l", 0).await;
    let pending: ApprovalData = data(
        &env.read("switchyard.approvals", 1, Duration::from_secs(40))
            .await[0],
    );
    let page: ActionData = data(
        &env.read("switchyard.actions", 1, Duration::from_secs(30))
            .await[0],
    );
    // Redis dies and comes back empty; a decision for the pending approval arrives at once, most
    // likely before the epoch watcher's next look (once a second): it must wait for the recovery,
    // not be dead-lettered as an unknown approval.
    drop(redis);
    let _redis = start_redis(port, dir.path(), false);
    env.publish_one(
        "switchyard.approval-decisions",
        "d-lost",
        "switchyard.approval.decision",
        "svc-l",
        json!({"approval_id": pending.approval_id, "decision": "approve", "by": "erin", "why": "ok"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = reqwest::Client::new();
    let ready = readyz(http).await;
    assert!(ready.contains("redis lost its state"), "{ready}");
    // A new breach is not processed while the state is lost.
    env.publish_one(
        "events.sla-breaches",
        "s2",
        "sla.breached",
        "svc-l",
        json!({"service": "svc-l", "slo": "latency", "objective": 99.0, "observed": 90.0, "owner": "team-l"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.read("switchyard.results", 3, Duration::from_secs(2))
            .await
            .len(),
        2,
        "nothing runs on a Redis that lost its state"
    );
    // What an instance that had not yet noticed might have written meanwhile (on a cluster, where
    // the writes are not guarded in the script): the resource's record with a restarted token.
    {
        use switchyard::resolve::store::ResourceStore;
        let stray = switchyard::resolve::store::RedisResourceStore::new(
            switchyard::store::RedisConn::new(&redis_url).unwrap(),
            &env.loaded.config.redis.key_prefix,
            3600,
            8,
        );
        let k = switchyard::store::ResourceKey::new(pending.tenant.clone(), "svc-l");
        assert!(stray.commit(&k, 0, write_of(&token_only(1))).await.unwrap());
    }
    // The operator recovers from Kafka; the stray record is written over.
    let recover = |extra: &[&str]| {
        let out = std::process::Command::new(bin())
            .args([
                "--config",
                env.config_path.to_str().unwrap(),
                "--redis",
                &redis_url,
                "recover",
            ])
            .args(extra)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    };
    // Another approval whose action went out (approved) while its decision's own record never
    // did (its producer failed, and Redis was lost before the sweeper wrote it again): the
    // approvals topic says pending, the actions topic holds its action.
    {
        let mut extra: ApprovalData = pending.clone();
        extra.approval_id = "apr-extra".into();
        let mut act: ActionData =
            serde_json::from_value(extra.action_record.clone()).expect("action record");
        act.action_id = "act-extra".into();
        act.fencing_token = 1;
        act.approved_by = Some("dave".into());
        extra.action_record = serde_json::to_value(&act).unwrap();
        env.publish(
            "switchyard.approvals",
            &[CloudEvent::new(
                "apr-extra-pending",
                "test",
                switchyard::records::types::APPROVAL,
            )
            .with_subject("svc-l")
            .with_typed_data(&extra)
            .unwrap()],
        )
        .await;
        env.publish(
            "switchyard.actions",
            &[
                CloudEvent::new("act-extra", "test", switchyard::records::types::ACTION)
                    .with_subject("svc-l")
                    .with_typed_data(&act)
                    .unwrap(),
            ],
        )
        .await;
    }
    // And one a person approved whose release never reached the proposals topic (its decider
    // died, and Redis lost the outbox entry that would have sent it again): only the approvals
    // topic has it, approved. Recovery brings it back approved and the sweeper writes its release.
    // One approved two days ago is left alone: its action may have aged out of the actions topic.
    for (id, at) in [
        ("unsent", chrono::Utc::now()),
        ("old", chrono::Utc::now() - chrono::Duration::days(2)),
    ] {
        let mut unsent: ApprovalData = pending.clone();
        unsent.approval_id = format!("apr-{id}");
        unsent.resource = "svc-u".into();
        unsent.status = "approved".into();
        unsent.decided_by = Some("frank".into());
        let mut act: ActionData =
            serde_json::from_value(unsent.action_record.clone()).expect("action record");
        act.action_id = format!("act-{id}");
        act.resource = "svc-u".into();
        act.fencing_token = 0;
        act.approved_by = Some("frank".into());
        unsent.action_record = serde_json::to_value(&act).unwrap();
        env.publish(
            "switchyard.approvals",
            &[CloudEvent::new(
                format!("apr-{id}-approved"),
                "test",
                switchyard::records::types::APPROVAL,
            )
            .with_subject("svc-u")
            .with_time(at.to_rfc3339().as_str())
            .with_typed_data(&unsent)
            .unwrap()],
        )
        .await;
    }
    let before_recovery = chrono::Utc::now().timestamp_millis() as u64;
    let said = recover(&[]);
    assert!(
        said.contains("1 pending approvals (1 whose action went out left decided), 1 approved awaiting their release (1 of whose release records the sweeper writes again; 1 approved over a day ago"),
        "{said}"
    );
    assert!(
        said.contains("(1 written over what was there, 0 kept as they were)"),
        "{said}"
    );
    // The rebuilt context's version continues above every version used before (a proposal
    // still on its way, based on an old one, is stale against what is written from now on).
    {
        let mut c = redis_connection(&redis_url).await;
        let hashes: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:ctx:*", env.prefix))
            .query_async(&mut c)
            .await
            .unwrap();
        let mut versions = Vec::new();
        for h in hashes.iter().filter(|h| !h.contains(":o:")) {
            let v: Option<u64> = redis::cmd("HGET")
                .arg(h)
                .arg("_version")
                .query_async(&mut c)
                .await
                .unwrap();
            versions.extend(v);
        }
        assert!(!versions.is_empty(), "{hashes:?}");
        assert!(
            versions.iter().all(|v| *v > before_recovery),
            "{versions:?} vs {before_recovery}"
        );
    }
    // Processing resumes: the breach runs, its page merges into the recovered page action with a
    // higher token (never the restarted counter's 1), and the waiting decision approves the
    // recovered approval.
    let results = env
        .read("switchyard.results", 3, Duration::from_secs(40))
        .await;
    assert_eq!(results.len(), 3, "the waiting breach ran after recovery");
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 5, Duration::from_secs(40))
        .await
        .iter()
        .map(data::<ActionData>)
        .filter(|a| a.action_id != "act-extra")
        .collect();
    let released = actions
        .iter()
        .find(|a| a.action_id == "act-unsent")
        .expect("the recovered approved action, sent by resolve from the sweeper's release");
    assert_eq!(
        (released.resource.as_str(), released.approved_by.as_deref()),
        ("svc-u", Some("frank"))
    );
    assert!(released.fencing_token > 0);
    assert!(
        !actions.iter().any(|a| a.action_id == "act-old"),
        "the one approved two days ago is not sent"
    );
    let pages: Vec<&ActionData> = actions.iter().filter(|a| a.action == "page").collect();
    assert_eq!(pages.len(), 2);
    assert!(
        pages[1].fencing_token > page.fencing_token,
        "tokens never go backwards"
    );
    let rollback = actions
        .iter()
        .find(|a| a.action == "rollback" && a.resource == "svc-l")
        .expect("the rollback the waiting decision approved");
    assert_eq!(rollback.approved_by.as_deref(), Some("erin"));
    assert!(rollback.fencing_token > page.fencing_token);
    assert_ne!(rollback.fencing_token, pages[1].fencing_token);
    assert!(
        env.read("switchyard.dlq", 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    // The recovered approval, decided, is reported so through the API.
    let r = client
        .get(format!(
            "http://127.0.0.1:{http}/v1/approvals/{}",
            pending.approval_id
        ))
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("\"approved\""), "{body}");
    running.stop().await;
    // `recover --force` on a Redis that has its state leaves its records as they are: the approval
    // stays decided (and the released one is not brought back: its action is on the topic).
    let said = recover(&["--force"]);
    assert!(
        said.contains("0 approved awaiting their release")
            && said.contains("(0 written over what was there, 2 kept as they were)"),
        "{said}"
    );
    // ... and its context too: nothing rewritten from the results topic (which may be older than
    // what running instances wrote).
    assert!(
        said.contains(" 0 facts (") && !said.contains("(0 resources' context kept"),
        "{said}"
    );
    let mut forced = env.loaded.clone();
    forced.config.redis.url = redis_url.clone();
    let after = switchyard::cmd::approvals::service(&forced)
        .unwrap()
        .get(&pending.approval_id)
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(after.approval.status, "approved");
    let v = verify(&env, &env.topic("switchyard.audit"));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// The agent inbox in a real browser (headless Chromium from Debian, driven by Selenium through
/// chromedriver; `tests/inbox_browser.py`): an approver signs in with her token, filters the list,
/// opens an approval with its history, edits the parameters and approves — the edit goes through
/// resolve and governance again and comes out as the action with her name; another approval is
/// sent back to its agent as a new task with her comment; a third, decided elsewhere while its
/// page is open, is announced live and a late click says who decided first. A viewer sees the
/// list and the detail but no decision controls, and a decision of his is refused (403) through
/// the API and through a form post with a valid CSRF token. Screenshots go to
/// `SWITCHYARD_SCREENSHOTS` when set (the README's are made so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_in_a_browser_edits_and_approves_responds_and_a_viewer_cannot_decide() {
    let yaml = format!(
        r#"{}
http:
  enabled: true
  proxy_user_header: X-Test-User
  users:
    - {{ name: alice, token: {ALICE}, roles: [approver], tenants: [acme] }}
    - {{ name: bob, token: {BOB}, roles: [viewer], tenants: [acme] }}
{DEFAULT_AGENTS}{}"#,
        governance("{ actions: [rollback] }")
            .replace("governance:\n", "governance:\n  tenants: [acme]\n"),
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let running = Running::start(loaded, &["resolve", "decisions"]);
    env.publish(
        "switchyard.proposals",
        &[
            tenant_proposal("in1", "acme", "checkout"),
            tenant_proposal("in2", "acme", "payments"),
            tenant_proposal("in3", "acme", "search"),
            tenant_proposal("in4", "acme", "cart"),
            tenant_proposal("other", "beta", "checkout"),
        ],
    )
    .await;
    let pending: Vec<ApprovalData> = env
        .read("switchyard.approvals", 5, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(pending.len(), 5, "{pending:?}");
    let id_of = |r: &str| {
        pending
            .iter()
            .find(|a| a.resource == r && a.tenant == "acme")
            .map(|a| a.approval_id.clone())
            .expect("approval")
    };
    let (edit, respond, race, open) = (
        id_of("checkout"),
        id_of("payments"),
        id_of("search"),
        id_of("cart"),
    );
    // The screenshots go where SWITCHYARD_SCREENSHOTS says, else to a directory removed after.
    let scratch = tempfile::tempdir().expect("tempdir");
    let shots = std::env::var("SWITCHYARD_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| scratch.path().join("inbox-shots"));
    let args = json!({
        "base": format!("http://127.0.0.1:{port}"), "approver": ALICE, "viewer": BOB,
        "edit": edit, "respond": respond, "race": race, "open": open, "filter_resource": "checkout",
        "screenshots": shots,
    });
    let out = tokio::process::Command::new(stack_dir().join("venv/bin/python"))
        .arg(root().join("tests/inbox_browser.py"))
        .arg(args.to_string())
        .output()
        .await
        .expect("run the browser script");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(said.trim()).expect("the script's JSON line");
    let seen = &seen["seen"];
    assert_eq!(seen["total"], "4", "alice sees acme's only: {seen}");
    assert_eq!(
        seen["viewer_total"], "1",
        "what is left open, to bob too: {seen}"
    );
    assert!(shots.join("inbox-list.png").exists() && shots.join("inbox-detail.png").exists());

    // The edit went through resolve and governance again and came out as the action, approved
    // by alice, with her parameters.
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 1, Duration::from_secs(40))
        .await
        .iter()
        .map(data)
        .collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    let a = &actions[0];
    assert_eq!(
        (a.resource.as_str(), a.approved_by.as_deref()),
        ("checkout", Some("alice"))
    );
    assert_eq!(a.parameters, seen["edited"], "{a:?}");
    assert!(a.proposals.to_string().contains("edit-"), "{a:?}");
    // The response is a new task for the proposing agent carrying the comment.
    let tasks = env
        .read("switchyard.tasks", 1, Duration::from_secs(20))
        .await;
    let task: switchyard::records::TaskData = data(&tasks[0]);
    assert_eq!(
        (
            task.task_id.as_str(),
            task.agent.as_str(),
            task.resource.as_str()
        ),
        (format!("respond-{respond}").as_str(), "tester", "payments")
    );
    assert_eq!(task.event["type"], "switchyard.inbox.response");
    assert_eq!(
        task.event["data"]["comment"],
        "check the error budget first, then propose again"
    );
    // Every decision is on the approvals topic with the signed-in user as who decided.
    let decided: Vec<ApprovalData> = env
        .read("switchyard.approvals", 8, Duration::from_secs(20))
        .await
        .iter()
        .map(data)
        .filter(|a: &ApprovalData| a.status != "pending")
        .collect();
    let status_of = |id: &str| {
        decided
            .iter()
            .find(|a| a.approval_id == id)
            .map(|a| (a.status.clone(), a.decided_by.clone().unwrap_or_default()))
    };
    assert_eq!(
        status_of(&edit),
        Some(("superseded".into(), "alice".into()))
    );
    assert_eq!(
        status_of(&respond),
        Some(("rejected".into(), "alice".into()))
    );
    assert_eq!(status_of(&race), Some(("rejected".into(), "alice".into())));
    assert_eq!(
        status_of(&open),
        None,
        "the viewer's attempts decided nothing"
    );

    // A proposal that claims alice's approval without her edit behind it needs a person like any.
    let mut forged = tenant_proposal("forged", "acme", "inventory");
    if let Some(d) = forged.data.as_mut() {
        d["approved_by"] = json!("alice");
        d["edit_of"] = json!(edit);
        d["parameters"] = json!({"id": "in1", "to": "v0.1"});
    }
    env.publish("switchyard.proposals", &[forged]).await;
    let asked = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.approvals"),
        1,
        Duration::from_secs(30),
        |r| {
            let a: ApprovalData = data(r);
            a.status == "pending" && a.action_record["proposals"][0] == "forged"
        },
    )
    .await;
    assert_eq!(asked.len(), 1, "the forged approval claim was not honoured");

    // A trusted proxy's header names the user; a name nobody declared is refused; a browser
    // recognised that way still needs the CSRF token to post.
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let as_user = |name: &'static str| {
        client
            .get(format!("{base}/inbox"))
            .header("X-Test-User", name)
            .send()
    };
    let r = as_user("alice").await.expect("inbox");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap_or_default().contains(">alice<"));
    assert_eq!(as_user("mallory").await.expect("inbox").status(), 403);
    let r = client
        .post(format!("{base}/inbox/approvals/{open}/approve"))
        .header("X-Test-User", "alice")
        .form(&[("why", "no csrf")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "a form post without the CSRF token");
    // The approvals API, for a caller the proxy signed in, takes only JSON from this site (a
    // cross-site form or no-cors fetch cannot decide with the proxy's cookie).
    let api = format!("{base}/v1/approvals/{open}/approve");
    let r = client
        .post(&api)
        .header("X-Test-User", "alice")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "no body");
    let r = client
        .post(&api)
        .header("X-Test-User", "alice")
        .header("Origin", "https://evil.example")
        .json(&json!({"why": "x"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "another site");
    // Live updates: at most 8 streams per user (one user cannot take all 256), and a graceful stop
    // ends the open ones (it waited for every open inbox tab).
    let open_stream = || {
        client
            .get(format!("{base}/inbox/events"))
            .header("X-Test-User", "alice")
            .send()
    };
    let mut streams = Vec::new();
    for _ in 0..8 {
        let r = open_stream().await.expect("stream");
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let r = open_stream().await.expect("stream");
    assert_eq!(r.status(), 503, "a ninth stream of one user");
    let started = std::time::Instant::now();
    running.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stop did not wait for the open streams: {:?}",
        started.elapsed()
    );
    drop(streams);
}

// ---- Confidence, escalation paths and notifications ----

/// A webhook receiver: every POST's `x-switchyard-event` header, `authorization` header and JSON
/// body, in arrival order.
async fn start_webhook() -> (u16, Arc<std::sync::Mutex<Vec<(String, String, Value)>>>) {
    use axum::routing::post;
    let got: Arc<std::sync::Mutex<Vec<(String, String, Value)>>> = Default::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook/{secret}",
        post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let g = g.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    g.lock()
                        .unwrap()
                        .push((h("x-switchyard-event"), h("authorization"), body));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

/// A webhook that accepts connections and never answers.
async fn start_silent_webhook() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    port
}

/// A proposal stating `confidence` (none: unstated), with a reason.
fn confident(id: &str, action: &str, resource: &str, confidence: Option<f64>) -> CloudEvent {
    let mut ev = proposal(id, "tester", action, resource, json!({"id": id}), 0);
    if let Some(d) = ev.data.as_mut() {
        d["reason"] = json!(format!("reason of {id}"));
        if let Some(c) = confidence {
            d["confidence"] = json!(c);
        }
    }
    ev
}

const ANN: &str = "ann-oncall-token-0123456";
const LEE: &str = "lee-leads-token-01234567";

/// Confidence and escalation end to end: a low-confidence rollback (and one stating no
/// confidence, which counts as low) needs a person while a confident one goes straight out; the
/// approvals start with group sre-oncall and move to sre-leads after its 3 s; then a member of
/// sre-oncall gets 403 and a member of sre-leads approves (the action carries her name); the one
/// nobody decides expires after the last level (15 s). The rule's webhook hears requested, escalated
/// and expired with the approval's fields and inbox link; a webhook that never answers holds up
/// nothing (the next proposal of its resource is decided at once), a webhook that is down counts
/// as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidence_escalation_groups_and_webhooks() {
    let (hook, got) = start_webhook().await;
    let silent = start_silent_webhook().await;
    let down = free_port();
    let rules = format!(
        r#"
      {{ name: unsure-rollbacks, actions: [rollback], max_confidence: 0.7,
         escalation: [{{group: sre-oncall, timeout_seconds: 3}}, {{group: sre-leads, timeout_seconds: 15}}],
         notify: {{url: "http://127.0.0.1:{hook}/hook/s3cr3t", headers: {{authorization: "Bearer hook-token"}}}} }},
      {{ name: pages, actions: [page], notify: {{url: "http://127.0.0.1:{silent}/hook/x", timeout_seconds: 30, retries: 1}} }},
      {{ actions: [scale_down], notify: {{url: "http://127.0.0.1:{down}/hook/x", retries: 1}} }}"#
    );
    let yaml = format!(
        r#"{}
http:
  enabled: true
  users:
    - {{ name: ann, token: {ANN}, roles: [approver], groups: [sre-oncall] }}
    - {{ name: lee, token: {LEE}, roles: [approver], groups: [sre-leads] }}
{DEFAULT_AGENTS}{}"#,
        governance(&rules).replace(
            "    timeout_seconds: 600\n",
            "    timeout_seconds: 600\n    public_url: https://switchyard.example.com/\n"
        ),
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    assert_eq!(
        loaded.config.governance.approvals.sweep_interval(),
        Duration::from_millis(1500),
        "a 3 s level is swept every 1.5 s"
    );
    let running = Running::start(loaded, &["resolve", "decisions"]);
    // The page's webhook never answers; the restart after it on the same resource is decided at
    // once all the same.
    let started = std::time::Instant::now();
    env.publish(
        "switchyard.proposals",
        &[
            confident("pg", "page", "r-pg", None),
            confident("pg-restart", "restart", "r-pg", None),
            confident("lo", "rollback", "r-lo", Some(0.3)),
            confident("hi", "rollback", "r-hi", Some(0.9)),
            confident("none", "rollback", "r-none", None),
            confident("sd", "scale_down", "r-sd", None),
        ],
    )
    .await;
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 2, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    let mut went: Vec<&str> = actions.iter().map(|a| a.resource.as_str()).collect();
    went.sort();
    assert_eq!(
        went,
        ["r-hi", "r-pg"],
        "the confident rollback and the restart go out"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "a webhook that never answers (30 s timeout) delays nothing: {:?}",
        started.elapsed()
    );
    // Requests: the unsure and the unstated rollback, at level 0 for sre-oncall.
    let brokers = env.loaded.config.kafka.brokers.clone();
    let approvals_topic = env.topic("switchyard.approvals");
    let escalated = |n: usize| {
        move |recs: &[Input]| {
            recs.iter()
                .filter(|r| data::<ApprovalData>(r).status == "escalated")
                .count()
                >= n
        }
    };
    let recs: Vec<ApprovalData> = read_topic_until(
        &brokers,
        &approvals_topic,
        Duration::from_secs(40),
        escalated(2),
    )
    .await
    .iter()
    .map(data)
    .collect();
    let find = |res: &str, status: &str| {
        recs.iter()
            .find(|a| a.resource == res && a.status == status)
            .unwrap_or_else(|| panic!("{res} {status} in {recs:?}"))
            .clone()
    };
    let lo = find("r-lo", "pending");
    assert_eq!(
        (
            lo.rule.as_deref(),
            lo.confidence,
            lo.level,
            lo.group.as_deref()
        ),
        (Some("unsure-rollbacks"), Some(0.3), 0, Some("sre-oncall"))
    );
    let none = find("r-none", "pending");
    assert_eq!(
        (none.confidence, none.group.as_deref()),
        (None, Some("sre-oncall"))
    );
    assert!(
        !recs.iter().any(|a| a.resource == "r-hi"),
        "no approval for the confident one"
    );
    let lo_up = find("r-lo", "escalated");
    assert_eq!(
        (lo_up.level, lo_up.group.as_deref()),
        (1, Some("sre-leads"))
    );
    assert!(lo_up.expires_at > lo.expires_at);
    // At sre-leads' level: ann (sre-oncall) is refused, lee (sre-leads) decides.
    let client = reqwest::Client::new();
    let approve = |token: &'static str| {
        let c = client.clone();
        let url = format!(
            "http://127.0.0.1:{port}/v1/approvals/{}/approve",
            lo.approval_id
        );
        async move {
            c.post(url)
                .bearer_auth(token)
                .json(&json!({"why": "checked"}))
                .send()
                .await
                .unwrap()
        }
    };
    let r = approve(ANN).await;
    assert_eq!(r.status().as_u16(), 403);
    let msg = r.text().await.unwrap();
    assert!(msg.contains("only group sre-leads"), "{msg}");
    let r = approve(LEE).await;
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    let actions: Vec<ActionData> = env
        .read("switchyard.actions", 3, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    let lo_action = actions
        .iter()
        .find(|a| a.resource == "r-lo")
        .expect("approved rollback");
    assert_eq!(lo_action.approved_by.as_deref(), Some("lee"));
    // The unstated one nobody decides expires after sre-leads' 15 s.
    let recs: Vec<ApprovalData> = read_topic_until(
        &brokers,
        &approvals_topic,
        Duration::from_secs(40),
        |recs: &[Input]| {
            recs.iter()
                .any(|r| data::<ApprovalData>(r).status == "expired")
        },
    )
    .await
    .iter()
    .map(data)
    .collect();
    let expired = recs
        .iter()
        .find(|a| a.status == "expired")
        .expect("expired");
    assert_eq!(
        (
            expired.resource.as_str(),
            expired.level,
            expired.group.as_deref()
        ),
        ("r-none", 1, Some("sre-leads"))
    );
    // The webhook heard requested (2), escalated (2) and expired (1), with the approval's fields.
    let mut heard = Vec::new();
    for _ in 0..100 {
        heard = got.lock().unwrap().clone();
        if heard.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut events: Vec<&str> = heard.iter().map(|(e, _, _)| e.as_str()).collect();
    events.sort();
    assert_eq!(
        events,
        [
            "escalated",
            "escalated",
            "expired",
            "requested",
            "requested"
        ],
        "{heard:?}"
    );
    assert!(heard.iter().all(|(_, auth, _)| auth == "Bearer hook-token"));
    let (_, _, first) = heard
        .iter()
        .find(|(e, _, b)| e == "requested" && b["text"].as_str().unwrap().contains("r-lo"))
        .expect("r-lo requested");
    let text = first["text"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "https://switchyard.example.com/inbox/approvals/{}",
            lo.approval_id
        )),
        "{text}"
    );
    let fields: Vec<&str> = first["blocks"][0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    for want in [
        format!("*Approval*\n{}", lo.approval_id),
        "*Action*\nrollback".into(),
        "*Resource*\nr-lo".into(),
        "*Tenant*\ndefault".into(),
        "*Agent*\ntester".into(),
        "*Reason*\nreason of lo".into(),
        "*Status*\npending".into(),
        "*Group*\nsre-oncall (level 0)".into(),
        "*Rule*\nunsure-rollbacks".into(),
        "*Confidence*\n0.3".into(),
    ] {
        assert!(fields.contains(&want.as_str()), "{want:?} in {fields:?}");
    }
    let expired_note = heard
        .iter()
        .find(|(e, _, _)| e == "expired")
        .map(|(_, _, b)| b["text"].as_str().unwrap().to_string())
        .unwrap();
    assert!(
        expired_note.starts_with("Approval expired: rollback on r-none"),
        "{expired_note}"
    );
    // The webhook that is down: counted as failed (after its retry); the silent one is still
    // waiting and is not counted yet.
    let failed =
        "switchyard_approval_notifications_total{event=\"requested\",outcome=\"failed\"} 1";
    let mut m = String::new();
    for _ in 0..50 {
        m = switchyard::telemetry::METRICS.render();
        if m.contains(failed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(m.contains(failed), "{m}");
    assert!(m.contains(
        "switchyard_approval_notifications_total{event=\"escalated\",outcome=\"sent\"} 2"
    ));
    running.stop().await;
}

/// `switchyard validate` on escalation paths: a group no user belongs to is a warning (only admins
/// could decide there); an empty group, a zero timeout, a threshold outside 0–1 and a webhook that
/// is not an http(s) URL are problems (exit 1), named by their path, the URL never repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_config_is_validated() {
    let users = format!(
        "http:\n  users:\n    - {{ name: ann, token: {ANN}, roles: [approver], groups: [sre-oncall] }}\n"
    );
    let rules = "{ name: paths, actions: [rollback], escalation: [{group: sre-oncall, timeout_seconds: 60}, {group: nobody, timeout_seconds: 60}] }";
    let env = TestEnv::new(
        1,
        &format!(
            "{}{users}{DEFAULT_AGENTS}{}",
            governance(rules),
            default_routes("")
        ),
    )
    .await;
    let out = cli(&env, &["validate"]);
    assert!(
        out.contains("warning: governance.approvals.rules[0].escalation[1].group: no user of http.users is in group \"nobody\""),
        "{out}"
    );
    assert!(!out.contains("\"sre-oncall\""), "{out}");
    // The shared approvals token of these tests is short: a warning, not a refusal.
    assert!(
        out.contains("warning: governance.approvals.token: shorter than 16 characters"),
        "{out}"
    );
    let text = std::fs::read_to_string(&env.config_path).unwrap().replace(
        rules,
        "{ actions: [rollback], max_confidence: 1.2, escalation: [{group: '', timeout_seconds: 0}], notify: {url: 'ftp://u:hunter2@h/x'} }",
    );
    let bad = env.config_path.with_extension("bad.yaml");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(bin())
        .args(["--config", bad.to_str().unwrap(), "validate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "governance.approvals.rules[0].max_confidence: must be a number from 0 to 1",
        "governance.approvals.rules[0].escalation[0].group: must not be empty",
        "governance.approvals.rules[0].escalation[0].timeout_seconds: must be at least 1",
        "governance.approvals.rules[0].notify.url: must be an http:// or https:// URL",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!err.contains("hunter2"), "{err}");
}

/// Issue 18, fix 1: a new agent no `governance.access` rule covers. Its result still says
/// `succeeded`, but counts the proposal as rejected with a warning naming the agent and action;
/// `tail --format human` shows both on the result's line, and `trace` follows the proposal to
/// resolve's rejection (reason access).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_access_rejects_is_counted_in_the_result_tail_and_trace() {
    let yaml = governance("").replace(
        "- { agents: [cost-guard, tester], actions: [scale_down, scale_up] }",
        "- { agents: [tester], actions: [scale_down, scale_up] }",
    );
    assert!(
        !yaml.contains("cost-guard"),
        "cost-guard has no access rule"
    );
    let env = TestEnv::new(1, &format!("{yaml}{DEFAULT_AGENTS}{}", default_routes(""))).await;
    let running = Running::start(env.loaded.clone(), &["route", "agents", "resolve"]);
    env.publish_one(
        "events.cost-thresholds",
        "c-new",
        "cost.threshold_exceeded",
        "billing",
        json!({"service": "billing", "budget": 100.0, "spend": 150.0}),
    )
    .await;
    let results = env
        .read("switchyard.results", 1, Duration::from_secs(40))
        .await;
    let r: ResultData = data(&results[0]);
    assert_eq!(
        (r.agent.as_str(), r.status.as_str()),
        ("cost-guard", "succeeded")
    );
    let c = r.proposal_counts.expect("the result counts its proposals");
    assert_eq!(
        (c.proposed, c.rejected, c.to_resolve, c.refused),
        (1, 1, 0, 0)
    );
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].contains(
            "no governance.access rule lets agent cost-guard cause scale_down on billing"
        ),
        "{:?}",
        r.warnings
    );
    // Resolve rejects it, as counted.
    let mut rejected = None;
    for _ in 0..30 {
        let audit: Vec<AuditData> = env
            .audit(10, Duration::from_secs(2))
            .await
            .iter()
            .map(data)
            .collect();
        rejected = audit
            .into_iter()
            .find(|a| a.stage == "resolve" && a.detail["action"] == "scale_down");
        if rejected.is_some() {
            break;
        }
    }
    let rejected = rejected.expect("resolve decided the proposal");
    assert_eq!(
        (rejected.decision.as_str(), rejected.reason.as_deref()),
        ("rejected", Some("access"))
    );
    running.stop().await;

    let line = cli(
        &env,
        &[
            "tail",
            &env.topic("switchyard.results"),
            "--from-beginning",
            "--max",
            "1",
            "--idle-timeout-ms",
            "5000",
            "--format",
            "human",
        ],
    );
    assert!(
        line.contains("proposals: 1 proposed: 1 rejected (access)")
            && line.contains("WARNING: 1 of 1 proposals rejected: no governance.access rule lets agent cost-guard cause scale_down"),
        "{line}"
    );
    let story = cli(&env, &["trace", "c-new"]);
    assert!(
        story.contains("proposals by task:")
            && story.contains("(cost-guard): 1 proposed: 1 rejected (access)"),
        "{story}"
    );
}

/// The value of one series of a Prometheus text page (0 when absent).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Issue 18, fix 5: a decision made through the CLI (its own process, which serves no metrics)
/// is counted by the running switchyard exactly once — approvals by kind, the wait, the agent's
/// proposals by outcome — as a decision through the decisions topic is; deciding it again
/// through the CLI changes nothing and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_through_the_cli_are_counted_once_in_the_servers_metrics() {
    let env = TestEnv::new(
        1,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("{ actions: [rollback] }"),
            default_routes("")
        ),
    )
    .await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let running = Running::start(loaded, &["resolve", "decisions"]);
    env.publish(
        "switchyard.proposals",
        &[
            proposal(
                "by-cli",
                "tester",
                "rollback",
                "r-cli",
                json!({"to": "v1"}),
                0,
            ),
            proposal(
                "by-topic",
                "tester",
                "rollback",
                "r-topic",
                json!({"to": "v2"}),
                0,
            ),
        ],
    )
    .await;
    let pending: Vec<ApprovalData> = env
        .read("switchyard.approvals", 2, Duration::from_secs(30))
        .await
        .iter()
        .map(data)
        .collect();
    let id_of = |r: &str| {
        pending
            .iter()
            .find(|a| a.resource == r)
            .map(|a| a.approval_id.clone())
            .expect("an approval per resource")
    };
    let (by_cli, by_topic) = (id_of("r-cli"), id_of("r-topic"));
    let client = reqwest::Client::new();
    let page = || async {
        client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("metrics served")
            .text()
            .await
            .expect("text")
    };
    const APPROVED: &str = r#"switchyard_approvals_total{kind="approved"}"#;
    const REJECTED: &str = r#"switchyard_approvals_total{kind="rejected"}"#;
    const WAIT: &str = r#"switchyard_approval_wait_seconds_count{decision="approved"}"#;
    const AGENT: &str = r#"switchyard_agent_proposals_total{agent="tester",outcome="approved"}"#;
    let before = page().await;
    let (approved, wait, agent) = (
        metric(&before, APPROVED),
        metric(&before, WAIT),
        metric(&before, AGENT),
    );
    assert_eq!(approved, 0.0, "{before}");

    let (brokers, redis) = stack().clone();
    let approve = |by: &str| {
        std::process::Command::new(bin())
            .args(["--config", env.config_path.to_str().expect("path")])
            .args(["approvals", "approve", &by_cli, "--by", by])
            .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
            .env("SWITCHYARD_REDIS_URL", &redis)
            .output()
            .expect("approvals approve")
    };
    let out = approve("dana");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server takes the CLI's decision at its next sweep (every 2 s here).
    let mut now = String::new();
    for _ in 0..40 {
        now = page().await;
        if metric(&now, APPROVED) > approved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(metric(&now, APPROVED), approved + 1.0, "{now}");
    // Deciding again through the CLI fails and counts nothing; later sweeps count nothing more.
    assert!(!approve("erin").status.success());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = page().await;
    assert_eq!(
        metric(&now, APPROVED),
        approved + 1.0,
        "counted once: {now}"
    );
    assert_eq!(metric(&now, WAIT), wait + 1.0, "the wait once: {now}");
    assert_eq!(
        metric(&now, AGENT),
        agent + 1.0,
        "the agent's outcome once: {now}"
    );

    // A decision through the decisions topic: made and counted by the server, once.
    let rejected = metric(&now, REJECTED);
    let decision = Output::new(
        env.topic("switchyard.approval-decisions"),
        by_topic.clone(),
        serde_json::to_vec(&json!({"approval_id": by_topic, "decision": "reject", "by": "carol"}))
            .unwrap(),
    );
    env.producer().send(&decision).await.unwrap();
    let mut now = String::new();
    for _ in 0..60 {
        now = page().await;
        if metric(&now, REJECTED) > rejected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now2 = page().await;
    assert_eq!(metric(&now2, REJECTED), rejected + 1.0, "{now}");
    assert_eq!(metric(&now2, APPROVED), approved + 1.0, "{now2}");
    running.stop().await;
}

/// Two sweepers that both found an approval past its deadline escalate it once (the second finds it
/// escalated, not due, and leaves it at its new level and deadline); and an escalation a crash left
/// unsent in the outbox is produced by a later sweep, like a decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_past_its_deadline_is_escalated_once_and_its_records_go_out() {
    use switchyard::governance::approvals::Verdict;
    let rules = "{ name: paths, actions: [rollback], escalation: [{group: a, timeout_seconds: 2}, {group: b, timeout_seconds: 60}, {group: c, timeout_seconds: 60}] }";
    let yaml = format!(
        "{}{DEFAULT_AGENTS}{}",
        governance(rules).replace(
            "    timeout_seconds: 600\n",
            "    timeout_seconds: 600\n    redeliver_after_seconds: 1\n"
        ),
        default_routes("")
    );
    let env = TestEnv::new(1, &yaml).await;
    let running = Running::start(env.loaded.clone(), &["resolve"]);
    env.publish(
        "switchyard.proposals",
        &[proposal(
            "esc",
            "tester",
            "rollback",
            "r-esc",
            json!({"to": "v1"}),
            0,
        )],
    )
    .await;
    let req: ApprovalData = data(
        &env.read("switchyard.approvals", 1, Duration::from_secs(30))
            .await[0],
    );
    running.stop().await;
    let approvals = switchyard::cmd::approvals::service(&env.loaded).unwrap();
    let wait = (req.expires_at - chrono::Utc::now().timestamp() + 1).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let sweep = |n: &str| {
        let approvals = &approvals;
        let id = req.approval_id.clone();
        let n = n.to_string();
        async move {
            approvals
                .decide(&id, Verdict::Reject, "switchyard", "timeout", true, true)
                .await
                .unwrap_or_else(|e| panic!("{n}: {e}"))
        }
    };
    let first = sweep("first").await;
    assert!(first.fresh);
    assert_eq!(
        (first.approval.status.as_str(), first.approval.level),
        ("escalated", 1)
    );
    let second = sweep("second").await;
    assert!(!second.fresh, "not due any more: nothing moves");
    let now = approvals.get(&req.approval_id).await.unwrap().unwrap();
    assert_eq!(
        (
            now.approval.status.as_str(),
            now.approval.level,
            now.approval.expires_at
        ),
        ("escalated", 1, first.approval.expires_at)
    );
    // The first sweep's records were never produced (no `sent`): a later sweep (past the
    // outbox's grace of a second, counted in whole seconds) produces them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let swept = approvals.sweep().await.unwrap();
    let (_, outputs) = swept
        .iter()
        .find(|(id, _)| *id == req.approval_id)
        .expect("the escalation is taken up from the outbox");
    let escalated = outputs
        .iter()
        .filter(|o| o.topic == env.topic("switchyard.approvals"))
        .map(|o| serde_json::from_slice::<Value>(&o.payload).unwrap())
        .find(|v| v["data"]["status"] == "escalated");
    assert!(escalated.is_some(), "its escalation record goes out");
}

/// Governance judges a merge as it judges a new action, and an action awaiting approval takes
/// nothing away before it is approved: a page from an agent without access to pages is not merged
/// into an accepted one (it was, its parameters sent at once); a page needing approval is not
/// merged unseen but awaits approval of its own; a page is not merged into one awaiting approval
/// (the approver would approve other parameters than those sent); a rollback awaiting approval
/// leaves the accepted scale_down it would supersede in force, so a scale_up stays refused after the
/// rollback is rejected, and the scale_down leaves only when a rollback is approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_are_governed_and_an_approval_supersedes_only_once_approved() {
    let env = TestEnv::new(
        1,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("{ actions: [rollback] }, { actions: [page], min_impact: high }"),
            default_routes("")
        ),
    )
    .await;
    let running = Running::start(env.loaded.clone(), &["resolve"]);
    let high = |mut e: CloudEvent| {
        let mut d = data_of(&e).clone();
        d["impact"] = json!("high");
        e = e.with_data(d);
        e
    };
    let first = vec![
        proposal("pa", "tester", "page", "r-m", json!({"sev": "minor"}), 0),
        proposal("px", "cost-guard", "page", "r-m", json!({"sev": "x"}), 0),
        high(proposal(
            "ph",
            "tester",
            "page",
            "r-m",
            json!({"sev": "y"}),
            0,
        )),
        high(proposal(
            "pp",
            "tester",
            "page",
            "r-p",
            json!({"sev": "major"}),
            0,
        )),
        proposal("pl", "tester", "page", "r-p", json!({"sev": "minor"}), 0),
        proposal("sd", "tester", "scale_down", "r-s", json!({"n": 1}), 0),
        proposal("rb", "tester", "rollback", "r-s", json!({"to": "v1"}), 0),
        proposal("sd-g", "tester", "scale_down", "r-g", json!({"n": 1}), 0),
        proposal("rb-g", "tester", "rollback", "r-g", json!({"to": "v1"}), 0),
    ];
    env.publish("switchyard.proposals", &first).await;
    let decided = |audit: &[Input]| -> BTreeMap<String, AuditData> {
        audit
            .iter()
            .map(data::<AuditData>)
            .filter_map(|a| Some((a.detail["proposal_id"].as_str()?.to_string(), a)))
            .collect()
    };
    let by_prop = decided(&env.audit(first.len(), Duration::from_secs(30)).await);
    let outcome = |m: &BTreeMap<String, AuditData>, id: &str| {
        (
            m[id].decision.clone(),
            m[id].reason.clone().unwrap_or_default(),
        )
    };
    assert_eq!(outcome(&by_prop, "pa"), ("accepted".into(), "".into()));
    assert_eq!(
        outcome(&by_prop, "px"),
        ("rejected".into(), "access".into()),
        "a merge from an agent without access is refused"
    );
    assert_eq!(
        outcome(&by_prop, "ph"),
        ("approval_requested".into(), "".into()),
        "a merge needing approval awaits it as an action of its own"
    );
    assert_eq!(
        outcome(&by_prop, "pp"),
        ("approval_requested".into(), "".into())
    );
    assert_eq!(
        outcome(&by_prop, "pl"),
        ("rejected".into(), "pending_approval".into()),
        "nothing merges into parameters a person is looking at"
    );
    assert_eq!(outcome(&by_prop, "sd"), ("accepted".into(), "".into()));
    assert_eq!(
        outcome(&by_prop, "rb"),
        ("approval_requested".into(), "".into())
    );
    assert_eq!(
        by_prop["rb"].detail["superseded"],
        json!([]),
        "nothing superseded before approval"
    );
    // The only page sent is the first one.
    let pages: Vec<ActionData> = env
        .read("switchyard.actions", usize::MAX, Duration::from_secs(3))
        .await
        .iter()
        .map(data)
        .filter(|a: &ActionData| a.action == "page")
        .collect();
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert_eq!(pages[0].parameters, json!({"sev": "minor"}));

    // The rollback of r-s is rejected, the one of r-g approved.
    let approvals: Vec<ApprovalData> = env
        .read("switchyard.approvals", 4, Duration::from_secs(20))
        .await
        .iter()
        .map(data)
        .collect();
    let approval_of = |resource: &str| {
        approvals
            .iter()
            .find(|a| a.resource == resource && a.action == "rollback")
            .map(|a| a.approval_id.clone())
            .expect("approval")
    };
    for (resource, answer) in [("r-s", "reject"), ("r-g", "approve")] {
        let out = cli(
            &env,
            &["approvals", answer, &approval_of(resource), "--by", "bob"],
        );
        assert!(!out.is_empty(), "{answer} {resource}");
    }
    let second = vec![
        proposal("su", "tester", "scale_up", "r-s", json!({"n": 3}), 0),
        proposal("su-g", "tester", "scale_up", "r-g", json!({"n": 3}), 0),
    ];
    env.publish("switchyard.proposals", &second).await;
    let mut by_prop = BTreeMap::new();
    for _ in 0..100 {
        by_prop = decided(&env.audit(usize::MAX, Duration::from_millis(500)).await);
        if by_prop.contains_key("su") && by_prop.contains_key("su-g") {
            break;
        }
    }
    assert_eq!(
        outcome(&by_prop, "su"),
        ("rejected".into(), "conflict".into()),
        "the scale_down the rejected rollback would have superseded is still in force"
    );
    let detail = by_prop["su"].detail.to_string();
    assert!(detail.contains("conflicts with scale_down"), "{detail}");
    // r-g: the approved rollback took the scale_down's place.
    let detail = by_prop["su-g"].detail.to_string();
    assert!(detail.contains("conflicts with rollback"), "{detail}");
    let mut conn = redis_connection(stack().1.as_str()).await;
    let state: String = redis::cmd("HGET")
        .arg(format!(
            "{}:res:{}",
            env.loaded.config.redis.key_prefix,
            switchyard::store::ResourceKey::new("default", "r-g").hash_tag()
        ))
        .arg("state")
        .query_async(&mut conn)
        .await
        .expect("state");
    let state: Value = serde_json::from_str(&state).expect("json");
    let active: Vec<&str> = state["active"]
        .as_array()
        .expect("active")
        .iter()
        .map(|a| a["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(active, ["rollback"], "{state}");
    // The approval's decision names the scale_down it superseded, which is undone on its agent's
    // scorecard (as when an action supersedes one at once).
    let sd_g = by_prop["sd-g"].detail["action_id"].clone();
    let audit = env.audit(usize::MAX, Duration::from_millis(500)).await;
    let decision_on = |resource: &str| {
        audit
            .iter()
            .map(data::<AuditData>)
            .find(|a| {
                a.decision == "approval_decided"
                    && a.detail["approval_id"] == json!(approval_of(resource))
            })
            .expect("the decision's audit record")
    };
    let approved = decision_on("r-g");
    assert_eq!(approved.detail["superseded"], json!([sd_g]), "{approved:?}");
    let rejected = decision_on("r-s");
    assert!(rejected.detail.get("superseded").is_none(), "{rejected:?}");
    let cards = switchyard::agents::stats::scorecards(
        &switchyard::store::RedisConn::new(&env.loaded.config.redis.url).unwrap(),
        &env.loaded.config.redis.key_prefix,
        &["tester".to_string()],
        3_600,
    )
    .await
    .expect("scorecards");
    assert_eq!(cards[0].undone, 1, "{:?}", cards[0]);
    running.stop().await;
}

/// An over-budget model call's action, as the gateway asks approval for it.
fn over_budget_action(id: &str, resource: &str) -> ActionData {
    ActionData {
        action_id: id.into(),
        action: "llm.over_budget".into(),
        resource: resource.into(),
        tenant: "default".into(),
        workflow_id: String::new(),
        parameters: json!({}),
        fencing_token: 0,
        proposals: json!([]),
        agents: json!([]),
        priority: 0,
        impact: switchyard::records::Impact::Medium,
        approved_by: None,
        reason: None,
    }
}

/// A request for approval outside resolve (an over-budget model call) produces its records again
/// when asked again before they were produced. One approval the sweeper cannot move on (here: its
/// stored value is unreadable) holds up no other: the sweep expires the rest, logs the stuck one,
/// and keeps trying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_approval_does_not_stop_the_others_expiring() {
    let env = TestEnv::new(
        1,
        &format!(
            "{}{DEFAULT_AGENTS}{}",
            governance("").replace("timeout_seconds: 600", "timeout_seconds: 1"),
            default_routes("")
        ),
    )
    .await;
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    switchyard::store::start_epoch(&conn, &c.redis.key_prefix, false)
        .await
        .expect("epoch");
    let approvals = switchyard::cmd::approvals::service_on(&env.loaded, conn);
    let action = over_budget_action;
    let mut ids = Vec::new();
    for (id, resource) in [("act-bad", "r-bad"), ("act-good", "r-good")] {
        let key = switchyard::store::ResourceKey::new("default", resource);
        let (a, first) = approvals
            .request(&key, action(id, resource))
            .await
            .expect("request");
        // Asked again before its records were produced (producing failed): the same request
        // record again; once produced, nothing more.
        let (_, again) = approvals
            .request(&key, action(id, resource))
            .await
            .expect("request");
        assert!(!first.is_empty());
        assert_eq!(
            again[0].payload, first[0].payload,
            "the same request record"
        );
        approvals.sent_request(&a.approval_id).await.expect("sent");
        let (_, after) = approvals
            .request(&key, action(id, resource))
            .await
            .expect("request");
        assert!(after.is_empty(), "produced once sent");
        ids.push((a.approval_id, key));
    }
    let mut r = redis_connection(c.redis.url.as_str()).await;
    let (bad, bad_key) = &ids[0];
    redis::cmd("HSET")
        .arg(format!("{}:res:{}", c.redis.key_prefix, bad_key.hash_tag()))
        .arg(format!("approval:{bad}"))
        .arg("not json")
        .query_async::<()>(&mut r)
        .await
        .expect("hset");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let out = approvals.sweep().await.expect("the sweep goes on");
    let expired: Vec<&str> = out.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(expired, [ids[1].0.as_str()], "the readable one expired");
    let good = approvals.get(&ids[1].0).await.expect("get").expect("kept");
    assert_eq!(good.approval.status, "expired");
    // The stuck one stays open (tried again next sweep), and the next sweep does not fail either.
    approvals.sweep().await.expect("again");
    // A decided approval kept past keep_decided_seconds leaves its record with the next request
    // written there (records of over-budget approvals are never written by resolve).
    let (good_id, good_key) = &ids[1];
    let hash = format!("{}:res:{}", c.redis.key_prefix, good_key.hash_tag());
    let field = format!("approval:{good_id}");
    let stored: String = redis::cmd("HGET")
        .arg(&hash)
        .arg(&field)
        .query_async(&mut r)
        .await
        .expect("stored");
    let mut stored: Value = serde_json::from_str(&stored).expect("json");
    stored["decided_at"] = json!("2020-01-01T00:00:00Z");
    redis::cmd("HSET")
        .arg(&hash)
        .arg(&field)
        .arg(stored.to_string())
        .query_async::<()>(&mut r)
        .await
        .expect("hset");
    approvals
        .request(good_key, action("act-good-2", "r-good"))
        .await
        .expect("request");
    let kept: bool = redis::cmd("HEXISTS")
        .arg(&hash)
        .arg(&field)
        .query_async(&mut r)
        .await
        .expect("hexists");
    assert!(!kept, "the old decided approval left with the next write");
}

/// A request for approval whose records its caller never produced (its producer gave up, or the
/// process died) is produced by the sweeper once the caller's producer would have given up —
/// not dropped from the outbox, which left the approval announced nowhere (no approval record for
/// the inbox's subscribers, no audit record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_request_its_caller_left_unsent_is_produced_by_the_sweeper() {
    let env = TestEnv::new(
        1,
        &format!("{}{DEFAULT_AGENTS}{}", governance(""), default_routes("")),
    )
    .await;
    let c = &env.loaded.config;
    let conn = switchyard::store::RedisConn::new(&c.redis.url).unwrap();
    switchyard::store::start_epoch(&conn, &c.redis.key_prefix, false)
        .await
        .expect("epoch");
    let approvals = switchyard::cmd::approvals::service_on(&env.loaded, conn);
    let action = over_budget_action("act-lost", "r-lost");
    let key = switchyard::store::ResourceKey::new("default", "r-lost");
    let (a, first) = approvals
        .request(&key, action.clone())
        .await
        .expect("request");
    assert!(!first.is_empty());
    // Within the producer's delivery timeout the caller may still be producing them: not yet.
    let out = approvals.sweep().await.expect("sweep");
    assert!(out.is_empty(), "too early: {out:?}");
    let mut r = redis_connection(c.redis.url.as_str()).await;
    // Its indexing lost after the commit (Redis failed, the process died): nobody finds it, until
    // the caller asks again, which indexes it again.
    let p = &c.redis.key_prefix;
    redis::pipe()
        .zrem(format!("{p}:approvals:open"), &a.approval_id)
        .hdel(format!("{p}:approvals:where"), &a.approval_id)
        .query_async::<()>(&mut r)
        .await
        .expect("unindex");
    assert!(approvals.get(&a.approval_id).await.expect("get").is_none());
    let (again, _) = approvals
        .request(&key, action)
        .await
        .expect("request again");
    assert_eq!(again.approval_id, a.approval_id);
    assert!(approvals.get(&a.approval_id).await.expect("get").is_some());
    // Its caller's producer gave up long ago (the entry is aged in Redis).
    let outbox = format!("{}:approvals:outbox", c.redis.key_prefix);
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&outbox)
        .arg(0)
        .arg(-1)
        .query_async(&mut r)
        .await
        .expect("zrange");
    assert_eq!(members.len(), 1, "{members:?}");
    redis::cmd("ZADD")
        .arg(&outbox)
        .arg("XX")
        .arg(switchyard::event::now_secs() - 3_600)
        .arg(&members[0])
        .query_async::<()>(&mut r)
        .await
        .expect("zadd");
    let out = approvals.sweep().await.expect("sweep");
    let produced: Vec<&str> = out.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        produced,
        [format!("req:{}", a.approval_id).as_str()],
        "the sweeper produces it, under the request's own outbox entry"
    );
    assert_eq!(
        out[0].1[0].payload, first[0].payload,
        "the same request record"
    );
    assert!(
        out[0].1.iter().any(|o| o.topic == c.topics.audit),
        "with its audit record"
    );
    // Clearing the decision's entry leaves the request's: only its own entry clears it.
    approvals.sent(&a.approval_id).await.expect("sent");
    assert_eq!(
        approvals.sweep().await.expect("sweep").len(),
        1,
        "still due"
    );
    approvals.sent(&out[0].0).await.expect("sent");
    assert!(approvals.sweep().await.expect("sweep").is_empty(), "once");
    let open = approvals
        .get(&a.approval_id)
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(open.approval.status, "pending", "still open for a person");
}

/// A process that crashed with a seal of its own audit chain unsent — after a later seal of that
/// chain was written — left a gap nobody else would fill (no other process seals that chain):
/// `audit verify` failed for good. Another process repairs an own chain idle for a while by writing
/// its kept seals again (the same bytes), and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_own_chain_left_with_an_unsent_seal_is_repaired_by_another_process() {
    use switchyard::audit::sealer::{RedisChainStore, Sealer};
    let env = TestEnv::new(1, "").await;
    let conn = switchyard::store::RedisConn::from_config(&env.loaded.config.redis).expect("redis");
    let audit_topic = env.topic("switchyard.audit");
    let emitter =
        switchyard::records::Emitter::new(env.loaded.schemas.clone(), env.loaded.topics.clone());
    let producer = switchyard::kafka::Producer::new(&switchyard::kafka::producer_config(
        &env.loaded.config.kafka,
    ))
    .expect("producer");
    let store = || Arc::new(RedisChainStore::new(conn.clone(), &env.prefix));
    let gone = Sealer::new(store(), &audit_topic);
    let record = |n: u32| {
        let audit = AuditData {
            decision: "approval_decided".into(),
            stage: "approvals".into(),
            resource: format!("svc-{n}"),
            tenant: "default".into(),
            event_id: None,
            task_id: None,
            workflow_id: None,
            trace_id: None,
            reason: None,
            detail: json!({"n": n}),
            seq: None,
            prev_hash: None,
            hash: None,
        };
        switchyard::records::audit_event(
            "switchyard/approvals",
            &["test", &n.to_string()],
            &audit,
            None,
            "2026-11-29T00:00:00.000Z",
        )
        .expect("audit event")
    };
    // Its first batch: the record written, the seal not (the crash); its second: both.
    let (first, _unsent) = gone
        .seal("approvals", &gone.own_chain, &emitter, &[record(1)])
        .await
        .expect("sealed");
    let (second, sent) = gone
        .seal("approvals", &gone.own_chain, &emitter, &[record(2)])
        .await
        .expect("sealed");
    let trail: Vec<Output> = first
        .into_iter()
        .chain(second)
        .chain(sent.seals.clone())
        .collect();
    for r in producer.send_all(&trail).await {
        r.expect("written");
    }
    drop(sent);
    let broken = env.verified_audit(2, Duration::from_secs(5)).await;
    assert!(
        !broken.problems.is_empty(),
        "the gap is there before the repair"
    );
    // Another process starts: the chain has not sealed for longer than the idle time given.
    let other = Sealer::new(store(), &audit_topic);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let repaired = other
        .repair_idle_own_chains(&emitter, &producer, Duration::from_millis(10))
        .await
        .expect("repaired");
    assert_eq!(repaired, 1);
    let v = env.verified_audit(2, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.records, 2);
    // Forgotten once repaired: a second start has nothing to do.
    assert_eq!(
        other
            .repair_idle_own_chains(&emitter, &producer, Duration::from_millis(10))
            .await
            .expect("nothing"),
        0
    );
}

/// A Redis demoted to a replica (a failover) refuses a script's writes with `READONLY ... on
/// @user_script` (Redis names the script in every error raised inside one): resolve retries the
/// proposal until it is writable again — it was dead-lettered as `corrupt_state`, its action lost.
/// (At `maxmemory`, `OOM` was already retried; the test checks that too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_or_full_redis_holds_decisions_back_instead_of_dead_lettering_them() {
    let env = TestEnv::new(
        1,
        &format!("{}{DEFAULT_AGENTS}{}", governance(""), default_routes("")),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _redis = start_redis(port, dir.path(), false);
    let url = format!("redis://127.0.0.1:{port}/");
    let mut loaded = env.loaded.clone();
    loaded.config.redis.url = url.clone();
    let running = Running::start(loaded, &["resolve"]);
    let page = |id: &str, resource: &str| proposal(id, "tester", "page", resource, json!({}), 0);
    env.publish("switchyard.proposals", &[page("warm", "r-warm")])
        .await;
    assert_eq!(
        env.read("switchyard.actions", 1, Duration::from_secs(40))
            .await
            .len(),
        1
    );
    let mut r = redis_connection(&url).await;
    let cmd = |args: &[&str]| {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    };
    // A replica of a primary that never answers: its data stays, writes are refused.
    for (n, (worse, better)) in [
        (
            ["REPLICAOF", "127.0.0.1", "1"].as_slice(),
            ["REPLICAOF", "NO", "ONE"].as_slice(),
        ),
        (
            ["CONFIG", "SET", "maxmemory", "1"].as_slice(),
            ["CONFIG", "SET", "maxmemory", "0"].as_slice(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        cmd(worse).query_async::<()>(&mut r).await.expect("worse");
        let id = format!("held-{n}");
        env.publish("switchyard.proposals", &[page(&id, &id)]).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            env.read("switchyard.dlq", usize::MAX, Duration::from_secs(1))
                .await
                .is_empty(),
            "{worse:?}: not dead-lettered"
        );
        cmd(better).query_async::<()>(&mut r).await.expect("better");
        let actions = env
            .read("switchyard.actions", n + 2, Duration::from_secs(40))
            .await;
        assert_eq!(
            actions.len(),
            n + 2,
            "{worse:?}: decided once Redis is well"
        );
        assert_eq!(data::<ActionData>(&actions[n + 1]).resource, id);
    }
    running.stop().await;
}

/// An empty Redis in front of a Kafka where switchyard ran before is a lost state, also when the
/// stages' groups have no committed offsets any more (Kafka forgets them a week after a group's
/// last member left): switchyard's own topics holding records is history too. (Taken for a new
/// installation, every instance resumed on the empty Redis: approvals gone, chains forked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_redis_is_a_lost_state_when_switchyard_s_topics_hold_records() {
    let env = TestEnv::new(1, "").await;
    // History: an audit record, no committed offsets.
    env.publish_one(
        "switchyard.audit",
        "a-old",
        switchyard::records::types::AUDIT,
        "svc-old",
        json!({"decision": "accepted", "stage": "resolve", "resource": "svc-old",
            "tenant": "default", "detail": {}}),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _redis = start_redis(port, dir.path(), false);
    let http = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.redis.url = format!("redis://127.0.0.1:{port}/");
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{http}");
    let running = Running::start(loaded, &["resolve"]);
    let mut ready = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{http}/readyz")).await {
            ready = r.text().await.unwrap_or_default();
            if ready.contains("redis") {
                break;
            }
        }
    }
    assert!(ready.contains("redis lost its state"), "{ready}");
    running.stop().await;
}
