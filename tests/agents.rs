//! Agent stage and shared context, against the real broker and Redis.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};

use common::*;
use switchyard::context::redis::RedisStore;
use switchyard::context::{ContextStore, ResourceKey};
use switchyard::kafka::dlq_headers;
use switchyard::records::{AuditData, ProposalData, ResultData};
use switchyard::store::RedisConn;

fn store(env: &TestEnv) -> RedisStore {
    let c = &env.loaded.config;
    RedisStore::new(
        RedisConn::new(&c.redis.url).unwrap(),
        &c.redis.key_prefix,
        c.context.clone(),
    )
}

fn proposals(recs: &[switchyard::kafka::Input]) -> Vec<ProposalData> {
    recs.iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).unwrap())
        .collect()
}

fn results(recs: &[switchyard::kafka::Input]) -> Vec<ResultData> {
    recs.iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).unwrap())
        .collect()
}

fn audits(recs: &[switchyard::kafka::Input]) -> Vec<AuditData> {
    recs.iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_meets_the_context_contract() {
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let s = RedisStore::new(
        RedisConn::new(&c.redis.url).unwrap(),
        &c.redis.key_prefix,
        switchyard::context::contract::config(),
    );
    switchyard::context::contract::run_all(&s, &env.prefix).await;
}

/// A context hash's TTL is set on its first commit, renewed once a sixteenth of it has passed or
/// when the configured TTL changed, and not on the commits in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_hash_renews_its_ttl_when_a_sixteenth_passed_or_it_changed() {
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let with_ttl = |ttl: u64| {
        let mut cfg = switchyard::context::contract::config();
        cfg.ttl_seconds = ttl;
        RedisStore::new(RedisConn::new(&c.redis.url).unwrap(), &env.prefix, cfg)
    };
    let (s, longer) = (with_ttl(1600), with_ttl(16000));
    let k = ResourceKey::new("default", "ttl-svc");
    let key = format!("{}:ctx:{}", env.prefix, k.hash_tag());
    let mut r = redis_connection(c.redis.url.as_str()).await;
    let outcome = switchyard::context::Outcome::default();
    let ttl = |r: &mut redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            redis::cmd("TTL")
                .arg(&key)
                .query_async::<i64>(&mut r)
                .await
                .unwrap()
        }
    };
    let expire = |r: &mut redis::aio::MultiplexedConnection, secs: i64| {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            redis::cmd("EXPIRE")
                .arg(&key)
                .arg(secs)
                .query_async::<()>(&mut r)
                .await
                .unwrap()
        }
    };
    s.commit(&k, "t1", &[], None, &outcome, None).await.unwrap();
    assert!(
        (1590..=1600).contains(&ttl(&mut r).await),
        "set on the first commit"
    );
    // As if 600 s passed since: a commit inside the sixteenth (100 s since the renewal) leaves it.
    expire(&mut r, 1000).await;
    s.commit(&k, "t2", &[], None, &outcome, None).await.unwrap();
    assert!(ttl(&mut r).await <= 1000, "not renewed within a sixteenth");
    // The last renewal 200 s ago: renewed.
    let now = chrono::Utc::now().timestamp();
    redis::cmd("HSET")
        .arg(&key)
        .arg("_x")
        .arg(format!("{}:1600", now - 200))
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    s.commit(&k, "t3", &[], None, &outcome, None).await.unwrap();
    assert!(
        (1590..=1600).contains(&ttl(&mut r).await),
        "renewed after a sixteenth"
    );
    // A longer TTL configured: the next commit applies it at once.
    expire(&mut r, 1000).await;
    longer
        .commit(&k, "t4", &[], None, &outcome, None)
        .await
        .unwrap();
    assert!(ttl(&mut r).await > 15000, "a changed TTL is applied");
}

/// A read skips the `GET` of a task's outcome where none can exist; that holds only while an
/// outcome never outlives its context hash and a list that once dropped an id counts as full, also
/// once a larger `remember_tasks` is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_outcome_is_found_after_its_id_left_the_list_and_never_outlives_the_hash() {
    use switchyard::context::{ContextStore, Prior};
    let env = TestEnv::new(1, "").await;
    let c = &env.loaded.config;
    let with = |remember: usize| {
        let mut cfg = switchyard::context::contract::config();
        cfg.ttl_seconds = 1600;
        cfg.remember_tasks = remember;
        RedisStore::new(RedisConn::new(&c.redis.url).unwrap(), &env.prefix, cfg)
    };
    let k = ResourceKey::new("default", "full-svc");
    let key = format!("{}:ctx:{}", env.prefix, k.hash_tag());
    let mut r = redis_connection(c.redis.url.as_str()).await;
    let outcome = switchyard::context::Outcome::default();
    let small = with(2);
    for t in ["t1", "t2", "t3"] {
        small
            .commit(&k, t, &[], None, &outcome, None)
            .await
            .unwrap();
    }
    // t1 left the list of two; a store configured for ten (a fresh process) still finds it.
    let (prior, _) = with(10).read(&k, "t1").await.unwrap();
    assert_eq!(prior, Prior::Recorded(Box::new(outcome.clone())));
    assert_eq!(with(10).read(&k, "t9").await.unwrap().0, Prior::New);
    // As if the hash was renewed 50 s ago: a commit that does not renew it stores an outcome that
    // expires with the hash, not a full TTL later.
    let now = chrono::Utc::now().timestamp();
    redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg("_x")
        .arg(format!("{}:1600", now - 50))
        .cmd("EXPIRE")
        .arg(&key)
        .arg(1550)
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    small
        .commit(&k, "t4", &[], None, &outcome, None)
        .await
        .unwrap();
    let (hash_ttl, memo_ttl): (i64, i64) = redis::pipe()
        .cmd("TTL")
        .arg(&key)
        .cmd("TTL")
        .arg(format!("{key}:o:t4"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(hash_ttl <= 1550, "not renewed: {hash_ttl}");
    assert!(
        memo_ttl > 0 && memo_ttl <= hash_ttl + 1,
        "the outcome ({memo_ttl} s) outlives the hash ({hash_ttl} s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_agents_share_context_and_propose_actions() {
    let env = TestEnv::new(3, "").await;
    let running = env.start(&["route", "agents"]);
    env.deployment_then_breach("checkout", 0).await;
    env.publish_one(
        "events.deployments",
        "d2",
        "deployment.started",
        "checkout",
        json!({"service": "checkout", "version": "v43", "previous_version": "v42"}),
    )
    .await;
    env.publish_one(
        "events.cost-thresholds",
        "c1",
        "cost.threshold_exceeded",
        "search",
        json!({"service": "search", "budget": 100.0, "spend": 130.0}),
    )
    .await;
    let props = proposals(
        &env.read("switchyard.proposals", 4, Duration::from_secs(40))
            .await,
    );
    let by_action: BTreeMap<&str, &ProposalData> =
        props.iter().map(|p| (p.action.as_str(), p)).collect();
    assert_eq!(
        by_action.keys().copied().collect::<Vec<_>>(),
        ["deployment.hold", "page", "rollback", "scale_down"]
    );

    // Cross-agent context: the SLA responder saw the deployment the deploy guard recorded.
    let rb = by_action["rollback"];
    assert_eq!(rb.agent, "sla-responder");
    assert_eq!(rb.parameters["to_version"], "v41");
    assert_eq!(rb.parameters["from_version"], "v42");
    assert_eq!(rb.parameters["deployment_event"], "d1");
    assert_eq!(rb.impact, switchyard::records::Impact::High);
    assert!(
        rb.context_version >= 1,
        "based on the context the deploy guard wrote"
    );
    assert_eq!(by_action["page"].parameters["severity"], "critical");
    assert_eq!(by_action["page"].parameters["owner"], "team-pay");
    // Deploy guard saw the breach state the SLA responder recorded.
    assert_eq!(by_action["deployment.hold"].parameters["version"], "v43");
    assert_eq!(by_action["scale_down"].parameters["overspend"], json!(30.0));
    assert_eq!(by_action["scale_down"].resource, "search");

    let res = results(
        &env.read("switchyard.results", 4, Duration::from_secs(20))
            .await,
    );
    assert_eq!(res.len(), 4);
    assert!(res
        .iter()
        .all(|r| r.status == "succeeded" && r.attempts == 1));

    let s = store(&env);
    let ctx = s
        .snapshot(&ResourceKey::new("default", "checkout"))
        .await
        .unwrap();
    assert_eq!(ctx.facts["suspect_deployment"].value["version"], "v42");
    assert_eq!(ctx.facts["suspect_deployment"].by, "sla-responder");
    assert_eq!(ctx.facts["sla"].value["active"], true);
    assert_eq!(ctx.facts["deployment"].value["version"], "v43");
    assert_eq!(ctx.version, 3, "three tasks wrote to checkout");
    let ids: Vec<&str> = ctx
        .recent_events
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d2", "s1", "d1"]);
    assert_eq!(
        s.snapshot(&ResourceKey::new("default", "search"))
            .await
            .unwrap()
            .facts["cost"]
            .value["overspend"],
        json!(30.0)
    );
    running.stop().await;
}

/// A real HTTP agent server: behaviour per event, call counts per task.
#[derive(Default)]
struct HttpAgentState {
    calls: std::sync::Mutex<BTreeMap<String, usize>>,
    total: AtomicUsize,
    /// `until-healed` tasks hang until this is set.
    healed: std::sync::atomic::AtomicBool,
    /// Calls in `ok` and `slow` mode.
    ok_calls: AtomicUsize,
}

async fn http_agent(
    State(st): State<Arc<HttpAgentState>>,
    Json(req): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let task_id = req["task"]["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let n = {
        let mut c = st.calls.lock().unwrap();
        let e = c.entry(task_id).or_default();
        *e += 1;
        *e
    };
    st.total.fetch_add(1, Ordering::SeqCst);
    let mode = req["event"]["data"]["mode"]
        .as_str()
        .unwrap_or("ok")
        .to_string();
    if mode == "ok" || mode == "slow" {
        st.ok_calls.fetch_add(1, Ordering::SeqCst);
    }
    if mode == "slow" {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match mode.as_str() {
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Json(json!({})).into_response()
        }
        "fail-once" if n == 1 => (axum::http::StatusCode::BAD_GATEWAY, "upstream down").into_response(),
        "until-healed" if !st.healed.load(Ordering::SeqCst) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Json(json!({})).into_response()
        }
        "bad-request" => (axum::http::StatusCode::UNPROCESSABLE_ENTITY, "no").into_response(),
        // A finding and a proposal nested 60 levels deep (the answer itself within the 64
        // levels an answer may have), and a flat finding.
        "deep" => {
            let mut v = json!(1);
            for _ in 0..60 {
                v = json!([v]);
            }
            Json(json!({
                "findings": [{"key": "triage.deep", "value": v.clone()}, {"key": "triage.flat", "value": 1}],
                "proposals": [{"action": "page", "parameters": {"x": v}}, {"action": "page", "parameters": {"who": "oncall"}}]
            }))
            .into_response()
        }
        // An answer far past what a task may write: a value over 64 KiB, 3,000 findings in
        // scope, 100 out of it.
        "flood" => {
            let mut findings = vec![json!({"key": "triage.big", "value": "x".repeat(70_000)})];
            findings.extend((0..3000).map(|i| json!({"key": format!("triage.k{i}"), "value": i})));
            findings.extend((0..100).map(|i| json!({"key": format!("other.k{i}"), "value": i})));
            // And 100 proposals, each its own (distinct parameters): 64 is what a task may make.
            let proposals: Vec<Value> = (0..100)
                .map(|i| json!({"action": "page", "priority": 1, "parameters": {"who": format!("p{i}")}}))
                .collect();
            Json(json!({"findings": findings, "proposals": proposals})).into_response()
        }
        "out-of-scope" => Json(json!({
            "findings": [{"key": "triage.note", "value": 1}, {"key": "secrets", "value": "x"}],
            "proposals": [{"action": "page", "priority": 1}, {"action": "delete_cluster", "priority": 99, "impact": "high"}]
        }))
        .into_response(),
        _ => Json(json!({
            "findings": [{"key": "triage.note", "value": {"seen": req["event"]["id"], "facts": req["context"]["facts"]}}],
            "proposals": [{"action": "page", "parameters": {"who": "oncall"}, "priority": 3, "impact": "low"}]
        }))
        .into_response(),
    }
}

async fn serve_http_agent() -> (String, Arc<HttpAgentState>) {
    let st = Arc::new(HttpAgentState::default());
    let app = axum::Router::new()
        .route("/agent", post(http_agent))
        .with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/agent"), st)
}

fn http_agent_yaml(url: &str, timeout_ms: u64, retries: u32) -> String {
    format!(
        r#"
agents:
  triage:
    kind: http
    url: {url}
    reads: ["*"]
    writes: ["triage.*"]
    actions: [page]
    timeout_ms: {timeout_ms}
    retries: {retries}
    backoff_ms: 50
routes:
  - name: all
    agents: [triage]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_agent_round_trip_retries_5xx_not_4xx() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::new(2, &http_agent_yaml(&url, 2000, 2)).await;
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[
            event("h-ok", "deployment.started", "svc-1", json!({"mode": "ok"})),
            event(
                "h-flaky",
                "deployment.started",
                "svc-2",
                json!({"mode": "fail-once"}),
            ),
            event(
                "h-bad",
                "deployment.started",
                "svc-3",
                json!({"mode": "bad-request"}),
            ),
        ],
    )
    .await;
    let res = results(
        &env.read("switchyard.results", 3, Duration::from_secs(40))
            .await,
    );
    let by_res: BTreeMap<&str, &ResultData> =
        res.iter().map(|r| (r.resource.as_str(), r)).collect();
    assert_eq!(by_res["svc-1"].status, "succeeded");
    assert_eq!(by_res["svc-1"].findings[0]["key"], "triage.note");
    assert_eq!(by_res["svc-2"].status, "succeeded");
    assert_eq!(by_res["svc-2"].attempts, 2, "the 502 was retried");
    assert_eq!(by_res["svc-3"].status, "failed");
    assert_eq!(by_res["svc-3"].attempts, 1, "a 4xx is not retried");
    let props = proposals(
        &env.read("switchyard.proposals", 2, Duration::from_secs(10))
            .await,
    );
    assert_eq!(props.len(), 2);
    assert!(props
        .iter()
        .all(|p| p.action == "page" && p.parameters["who"] == "oncall"));
    let dlq = env.read("switchyard.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(header(&dlq[0], dlq_headers::REASON), Some("agent_failed"));
    assert_eq!(
        event_of(&dlq[0]).ty,
        "switchyard.task",
        "the failed task itself is dead-lettered"
    );
    assert_eq!(st.total.load(Ordering::SeqCst), 4);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_agent_times_out_and_retries_without_holding_up_other_resources() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::new(1, &http_agent_yaml(&url, 700, 1)).await;
    let running = env.start(&["route", "agents"]);
    // One partition: the hanging task and the others share it; only lanes keep them apart.
    let mut evs = vec![event(
        "slow",
        "deployment.started",
        "svc-slow",
        json!({"mode": "hang"}),
    )];
    for i in 0..5 {
        evs.push(event(
            &format!("fast-{i}"),
            "deployment.started",
            &format!("svc-{i}"),
            json!({"mode": "ok"}),
        ));
    }
    env.publish("events.deployments", &evs).await;
    let recs = env
        .read("switchyard.results", 6, Duration::from_secs(40))
        .await;
    let res = results(&recs);
    assert_eq!(res.len(), 6);
    assert_eq!(
        res.last().unwrap().resource,
        "svc-slow",
        "every other resource finished first"
    );
    let slow = res.last().unwrap();
    assert_eq!(slow.status, "timed_out");
    assert_eq!(slow.attempts, 2, "timed out, retried once, timed out again");
    assert_eq!(st.calls.lock().unwrap().values().sum::<usize>(), 7);
    let dlq = env.read("switchyard.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(header(&dlq[0], dlq_headers::REASON), Some("agent_failed"));
    running.stop().await;
}

/// A counter of this process's metrics, for one stage.
fn stage_counter(name: &str, stage: &str) -> f64 {
    let prefix = format!("{name}{{stage=\"{stage}\"}} ");
    switchyard::telemetry::METRICS
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The event ids of `resource`'s results in the order they were written, asserted to be the
/// order of the ids (the tests number their events).
fn event_ids_in_order<'a>(res: &'a [ResultData], resource: &str) -> Vec<&'a str> {
    let order: Vec<&str> = res
        .iter()
        .filter(|r| r.resource == resource)
        .filter_map(|r| r.event_id.as_deref())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "{resource}'s tasks ran in order");
    order
}

/// Waits up to `limit` for `cond`.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Four tasks that hang until the agent is healed (one resource each), then `queued` more on five
/// resources behind them.
fn held_then_queued(queued: usize) -> Vec<switchyard::event::CloudEvent> {
    let mut evs: Vec<_> = (0..4)
        .map(|i| {
            let id = format!("held-{i}");
            event(
                &id,
                "deployment.started",
                &format!("svc-h{i}"),
                json!({"mode": "until-healed"}),
            )
        })
        .collect();
    evs.extend((0..queued).map(|i| {
        let id = format!("queued-{i:02}");
        event(
            &id,
            "deployment.started",
            &format!("svc-q{}", i % 5),
            json!({"mode": "ok"}),
        )
    }));
    evs
}

/// A stage at `kafka.max_in_flight` stops taking records (librdkafka keeps what it prefetched);
/// held past 3 s — here by an agent that hangs — it pauses its consumer; once the agent answers
/// it resumes, and every task runs once, each resource's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_held_at_its_limit_pauses_then_resumes_without_losing_or_doubling() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::with(1, "  max_in_flight: 4", &http_agent_yaml(&url, 8_000, 3)).await;
    let holds = || stage_counter("switchyard_backpressure_pauses_total", "agents");
    let pauses = || stage_counter("switchyard_consumer_pauses_total", "agents");
    let (holds0, pauses0) = (holds(), pauses());
    let running = env.start(&["route", "agents"]);
    let evs = held_then_queued(20);
    env.publish("events.deployments", &evs).await;
    assert!(
        wait_for(Duration::from_secs(40), || holds() > holds0).await,
        "the agents stage reached its limit"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        pauses(),
        pauses0,
        "a hold shorter than 3 s does not pause the consumer"
    );
    assert!(
        wait_for(Duration::from_secs(10), || pauses() > pauses0).await,
        "held past 3 s, the agents stage paused its consumer"
    );
    assert_eq!(
        st.ok_calls.load(Ordering::SeqCst),
        0,
        "nothing beyond the limit was taken while held"
    );
    st.healed.store(true, Ordering::SeqCst);
    let res = results(
        &env.read("switchyard.results", evs.len(), Duration::from_secs(60))
            .await,
    );
    let ids: std::collections::BTreeSet<&str> = res.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len(), evs.len(), "every task has its result: {res:?}");
    assert!(res.iter().all(|r| r.status == "succeeded"), "{res:?}");
    let calls = st.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), evs.len());
    for (task, n) in &calls {
        let held = res
            .iter()
            .any(|r| &r.task_id == task && r.resource.starts_with("svc-h"));
        if held {
            assert!(*n >= 2, "a hanging call timed out and ran again: {calls:?}");
        } else {
            assert_eq!(*n, 1, "every task behind the limit ran once: {calls:?}");
        }
    }
    for q in 0..5 {
        let order = event_ids_in_order(&res, &format!("svc-q{q}"));
        assert_eq!(order.len(), 4);
    }
    running.stop().await;
}

/// A stage that reaches its limit but keeps up (every task takes 50 ms) only stops taking records
/// for a moment: it never pauses its consumer, and every task runs once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_at_its_limit_that_keeps_up_never_pauses_its_consumer() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::with(1, "  max_in_flight: 4", &http_agent_yaml(&url, 8_000, 0)).await;
    let holds = || stage_counter("switchyard_backpressure_pauses_total", "agents");
    let pauses = || stage_counter("switchyard_consumer_pauses_total", "agents");
    let (holds0, pauses0) = (holds(), pauses());
    let running = env.start(&["route", "agents"]);
    let evs: Vec<_> = (0..40)
        .map(|i| {
            let id = format!("slow-{i:02}");
            event(
                &id,
                "deployment.started",
                &format!("svc-s{}", i % 8),
                json!({"mode": "slow"}),
            )
        })
        .collect();
    env.publish("events.deployments", &evs).await;
    let res = results(
        &env.read("switchyard.results", evs.len(), Duration::from_secs(60))
            .await,
    );
    assert_eq!(res.len(), evs.len());
    assert!(holds() > holds0, "the stage reached its limit");
    assert_eq!(pauses(), pauses0, "and never paused its consumer");
    assert_eq!(
        st.ok_calls.load(Ordering::SeqCst),
        evs.len(),
        "every task ran once"
    );
    for s in 0..8 {
        event_ids_in_order(&res, &format!("svc-s{s}"));
    }
    running.stop().await;
}

/// librdkafka keeps a partition's pause through a rebalance: a stage paused (held past 3 s), whose
/// partition is taken away by a second member and given back, consumes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_before_a_rebalance_is_consumed_after_it() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::with(1, "  max_in_flight: 4", &http_agent_yaml(&url, 8_000, 3)).await;
    let pauses = || stage_counter("switchyard_consumer_pauses_total", "agents");
    let pauses0 = pauses();
    let first = env.start(&["route", "agents"]);
    let evs = held_then_queued(20);
    env.publish("events.deployments", &evs).await;
    assert!(
        wait_for(Duration::from_secs(40), || pauses() > pauses0).await,
        "held past 3 s, the agents stage paused its consumer"
    );
    // A second member joins (the one partition moves or stays), the agent heals, the second
    // member leaves: the partition ends up with the first, paused before all of this.
    let second = env.start(&["agents"]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    st.healed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.stop().await;
    let want: std::collections::BTreeSet<String> = evs.iter().map(|e| e.id.clone()).collect();
    let topic = env.topic("switchyard.results");
    let recs = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &topic,
        Duration::from_secs(90),
        move |got: &[switchyard::kafka::Input]| {
            let done: std::collections::BTreeSet<String> = results(got)
                .into_iter()
                .filter(|r| r.status == "succeeded")
                .filter_map(|r| r.event_id)
                .collect();
            done == want
        },
    )
    .await;
    let done: std::collections::BTreeSet<String> = results(&recs)
        .into_iter()
        .filter(|r| r.status == "succeeded")
        .filter_map(|r| r.event_id)
        .collect();
    assert_eq!(
        done.len(),
        evs.len(),
        "every task succeeded after the rebalances: {done:?}"
    );
    first.stop().await;
}

/// A task delivered again is never run again: its recorded outcome is replayed (the same records)
/// while its input may not be delivered, and a later copy is skipped once it is. The outcome is kept
/// in the resource's memo slot (its hash, no key of its own): a new owner of the partition, which
/// knows nothing delivered, replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_task_is_not_run_again() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::new(1, &http_agent_yaml(&url, 2000, 0)).await;
    let running = env.start(&["route", "agents"]);
    let ev = event("once", "deployment.started", "svc-r", json!({"mode": "ok"}));
    env.publish("events.deployments", std::slice::from_ref(&ev))
        .await;
    let first = env
        .read("switchyard.tasks", 1, Duration::from_secs(30))
        .await;
    let _ = env
        .read("switchyard.results", 1, Duration::from_secs(30))
        .await;
    // Redeliver: the same task record again (as after a crash before the commit), and the same
    // event again (routes to the same task id).
    let copy = || {
        let mut out = switchyard::kafka::Output::new(
            env.topic("switchyard.tasks"),
            first[0].key.clone().unwrap(),
            first[0].payload.clone(),
        );
        out.headers = first[0].headers.clone();
        out
    };
    env.producer().send(&copy()).await.unwrap();
    env.publish("events.deployments", &[ev]).await;
    // Each copy is replayed (its input not yet delivered) or skipped (delivered): never run
    // again, and whatever is written is the same records.
    let res = results(
        &env.read("switchyard.results", 3, Duration::from_secs(10))
            .await,
    );
    assert!(res
        .iter()
        .all(|r| r.task_id == res[0].task_id && r.status == "succeeded"));
    let props = proposals(
        &env.read("switchyard.proposals", 3, Duration::from_secs(5))
            .await,
    );
    assert!(
        props.iter().all(|p| p.proposal_id == props[0].proposal_id),
        "replays carry the same proposal id"
    );
    // The outcome is in the resource's memo slot, no key of its own.
    let c = &env.loaded.config;
    let hash = format!("{}:ctx:{{default/svc-r}}", c.redis.key_prefix);
    let task_id = res[0].task_id.clone();
    let (kept, input, apart) = memo_slot(&c.redis.url, &hash, ("_mt1", "_mp1", "o")).await;
    assert_eq!(kept, task_id);
    assert!(
        input.starts_with(&format!("{}:0:", env.topic("switchyard.tasks"))),
        "{input}"
    );
    assert!(!apart, "no outcome key of its own");
    let conn = RedisConn::new(&c.redis.url).unwrap();
    let mut r = conn.get().await.unwrap();
    let done: String = redis::cmd("HGET")
        .arg(&hash)
        .arg("_done")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(done.contains(&task_id), "{done}");
    // A copy now is skipped: no new result, the agent still called once.
    let before = env
        .read("switchyard.results", usize::MAX, Duration::from_secs(2))
        .await;
    env.producer().send(&copy()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env
        .read("switchyard.results", usize::MAX, Duration::from_secs(2))
        .await
        .len();
    assert_eq!(
        after,
        before.len(),
        "a copy of a delivered task writes nothing"
    );
    running.stop().await;
    // A new owner of the partition (another consumer group here, reading from the start: it knows
    // nothing delivered, like an instance taking over after a crash) replays the kept outcome for
    // the original record — the same result bytes, without calling the agent. (The copies behind
    // it are replayed too while the original's outputs are not yet delivered, skipped after.)
    let mut loaded = env.loaded.clone();
    loaded.config.kafka.group_prefix = format!("{}-new-owner", loaded.config.kafka.group_prefix);
    let owner = Running::start(loaded, &["agents"]);
    let all = env
        .read(
            "switchyard.results",
            before.len() + 1,
            Duration::from_secs(30),
        )
        .await;
    assert!(all.len() > before.len(), "the original task's result again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = env
        .read("switchyard.results", usize::MAX, Duration::from_secs(2))
        .await;
    assert!(
        later[before.len()..]
            .iter()
            .all(|r| r.payload == before[0].payload),
        "replayed from the kept outcome: the same bytes"
    );
    assert_eq!(
        st.total.load(Ordering::SeqCst),
        1,
        "the agent was called once"
    );
    owner.stop().await;
}

/// A busy resource's finished tasks are remembered past its list of finished ids: the context keeps
/// the highest input offset its partition applied, and a task at or below it with no outcome kept
/// (its memo left a slot once its records were delivered) is finished. A new owner re-reading them
/// all (another consumer group from the start) replays only what the slots still hold and never
/// calls the agent again. (Without the offset, the tasks that fell off the three-id list were run
/// again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_skips_a_busy_resources_delivered_tasks_beyond_the_finished_list() {
    let (url, st) = serve_http_agent().await;
    let env = TestEnv::new(1, &http_agent_yaml(&url, 2000, 0)).await;
    let mut loaded = env.loaded.clone();
    loaded.config.context.remember_tasks = 3;
    let running = Running::start(loaded.clone(), &["route", "agents"]);
    for i in 0..10 {
        let ev = event(
            &format!("busy-{i}"),
            "deployment.started",
            "svc-busy",
            json!({"mode": "ok"}),
        );
        env.publish("events.deployments", &[ev]).await;
        env.read("switchyard.results", i + 1, Duration::from_secs(30))
            .await;
    }
    let before = env
        .read("switchyard.results", usize::MAX, Duration::from_secs(2))
        .await;
    assert_eq!(before.len(), 10);
    assert_eq!(st.total.load(Ordering::SeqCst), 10);
    running.stop().await;

    loaded.config.kafka.group_prefix = format!("{}-new-owner", loaded.config.kafka.group_prefix);
    let owner = Running::start(loaded, &["agents"]);
    // The last tasks' outcomes are in the slots: replayed, the same bytes.
    let replayed = env
        .read("switchyard.results", 11, Duration::from_secs(30))
        .await;
    assert!(replayed.len() > 10, "the kept outcomes replayed");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = env
        .read("switchyard.results", usize::MAX, Duration::from_secs(2))
        .await;
    owner.stop().await;
    assert!(
        after[10..]
            .iter()
            .all(|r| before.iter().any(|b| b.payload == r.payload)),
        "only replays of recorded outcomes"
    );
    // What is replayed: the two slots' outcomes, and a last task's memo kept apart if the old owner
    // stopped before forgetting it (13 results once in CI) — each once, never a task run again.
    let mut replays: Vec<&[u8]> = after[10..].iter().map(|r| &r.payload[..]).collect();
    replays.sort_unstable();
    replays.dedup();
    assert_eq!(replays.len(), after.len() - 10, "an outcome replayed twice");
    assert_eq!(st.total.load(Ordering::SeqCst), 10, "no task ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_violations_are_refused_and_audited() {
    let (url, _st) = serve_http_agent().await;
    // deploy-guard may not read `sla` here; triage may write only triage.* and propose only page.
    let yaml = format!(
        r#"
agents:
  triage:
    kind: http
    url: {url}
    writes: ["triage.*"]
    actions: [page]
  deploy-guard:
    kind: builtin
    reads: []
    writes: [deployment, last_completed_deployment]
    actions: [deployment.hold]
routes:
  - name: all
    agents: [triage, deploy-guard]
"#
    );
    let env = TestEnv::new(1, &yaml).await;
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[event(
            "sc",
            "deployment.started",
            "svc-s",
            json!({"mode": "out-of-scope", "version": "v1"}),
        )],
    )
    .await;
    let props = proposals(
        &env.read("switchyard.proposals", 1, Duration::from_secs(30))
            .await,
    );
    assert_eq!(props.len(), 1);
    assert_eq!(props[0].action, "page", "delete_cluster was refused");
    // route audit + 2 agent_result + refusals (write secrets, action delete_cluster, read sla)
    let audit = audits(&env.audit(6, Duration::from_secs(30)).await);
    let mut refused: Vec<(String, String)> = audit
        .iter()
        .filter(|a| a.decision == "refused")
        .map(|a| {
            (
                a.reason.clone().unwrap(),
                a.detail["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            ("scope_action".to_string(), "delete_cluster".to_string()),
            ("scope_read".to_string(), "sla".to_string()),
            ("scope_write".to_string(), "secrets".to_string()),
        ]
    );
    let ctx = store(&env)
        .snapshot(&ResourceKey::new("default", "svc-s"))
        .await
        .unwrap();
    assert!(ctx.facts.contains_key("triage.note"));
    assert!(
        !ctx.facts.contains_key("secrets"),
        "a refused write never reaches the context"
    );
    running.stop().await;
}

/// A store script that fails while running fails the same way on every retry: it counts as stored
/// data that cannot be processed (its record is dead-lettered, `corrupt_state`), not as Redis being
/// away (retried for ever, holding its partition); other error replies stay worth retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_script_is_not_retried_for_ever() {
    let mut c = redis_connection(stack().1.as_str()).await;
    let e = redis::cmd("EVAL")
        .arg("error('boom')")
        .arg(0)
        .query_async::<()>(&mut c)
        .await
        .expect_err("the script fails");
    assert!(
        matches!(
            switchyard::store::StoreError::from(e),
            switchyard::store::StoreError::Corrupt(_)
        ),
        "a script error is not transient"
    );
    let e = redis::cmd("NO-SUCH-COMMAND")
        .query_async::<()>(&mut c)
        .await
        .expect_err("an error reply");
    assert!(matches!(
        switchyard::store::StoreError::from(e),
        switchyard::store::StoreError::Redis(_)
    ));
}

/// One task stuck at the head of its lane holds its partition's commit while the partition's other
/// lanes go on: past 4 × `max_in_flight` records read behind it, that partition is paused until it
/// moves (before, everything behind it was read and kept tracked — memory and what a restart would
/// redeliver grew without bound). Once the stuck task ends, everything runs, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_lane_head_pauses_its_partition_past_a_bounded_span() {
    let (url, _st) = serve_http_agent().await;
    let env = TestEnv::with(1, "  max_in_flight: 4", &http_agent_yaml(&url, 12_000, 0)).await;
    let running = env.start(&["route", "agents"]);
    let mut events = vec![event(
        "stuck-1",
        "deployment.started",
        "svc-stuck",
        json!({"mode": "hang"}),
    )];
    events.extend((0..200).map(|i| {
        event(
            &format!("flow-{i}"),
            "deployment.started",
            &format!("svc-{i}"),
            json!({"mode": "ok"}),
        )
    }));
    env.publish("events.deployments", &events).await;
    // While the head hangs (12 s), the others run only up to the span (16 records behind it, plus
    // what one look's 200 ms let through), not all 200.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let early = env
        .read("switchyard.results", 201, Duration::from_secs(1))
        .await
        .len();
    assert!(
        early > 0 && early < 200,
        "the partition is paused past the span: {early} results while the head hangs"
    );
    // The head times out (its result written): everything after it runs.
    let all = env
        .read("switchyard.results", 201, Duration::from_secs(60))
        .await;
    running.stop().await;
    assert_eq!(all.len(), 201, "nothing lost");
}

/// An agent answering with thousands of findings (and a huge value) does not wedge its partition:
/// a task writes at most 256 findings of at most 64 KiB each, the rest are refused — summed up in
/// at most 64 refusal records — and the next task on the same resource runs. (Before, the context
/// commit's script failed past ~2,000 findings and the task was retried for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_findings_is_capped_and_the_partition_moves_on() {
    let (url, _st) = serve_http_agent().await;
    let env = TestEnv::new(1, &http_agent_yaml(&url, 10_000, 0)).await;
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[
            event(
                "flood-1",
                "deployment.started",
                "svc-f",
                json!({"mode": "flood"}),
            ),
            event(
                "after-1",
                "deployment.completed",
                "svc-f",
                json!({"mode": "ok"}),
            ),
        ],
    )
    .await;
    let rs = results(
        &env.read("switchyard.results", 2, Duration::from_secs(60))
            .await,
    );
    assert_eq!(rs.len(), 2, "both tasks finished: {rs:?}");
    assert!(rs.iter().all(|r| r.status == "succeeded"), "{rs:?}");
    let ctx = store(&env)
        .snapshot(&ResourceKey::new("default", "svc-f"))
        .await
        .unwrap();
    let written = ctx
        .facts
        .keys()
        .filter(|k| k.starts_with("triage.k"))
        .count();
    assert_eq!(written, 256, "at most 256 findings a task");
    assert!(
        !ctx.facts.contains_key("triage.big"),
        "a value over 64 KiB is refused"
    );
    assert!(ctx.facts.contains_key("triage.note"), "the next task ran");
    let flood = rs
        .iter()
        .find(|r| r.event_id.as_deref() == Some("flood-1"))
        .expect("the flood's result");
    assert_eq!(
        flood.proposals.as_array().map(Vec::len),
        Some(64),
        "at most 64 proposals a task"
    );
    let flood_task = flood.task_id.clone();
    let audit = audits(&env.audit(100, Duration::from_secs(10)).await);
    let refused: Vec<&AuditData> = audit
        .iter()
        .filter(|a| a.decision == "refused" && a.task_id.as_deref() == Some(&flood_task))
        .collect();
    assert_eq!(refused.len(), 64, "refusals summed up: {}", refused.len());
    let keys: Vec<&str> = refused
        .iter()
        .filter_map(|a| a.detail["key"].as_str())
        .collect();
    assert!(
        keys.iter().any(|k| k.contains("over 65536 bytes")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with("more refusals")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.contains("2744 findings over the 256")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.contains("36 proposals over the 64")),
        "{keys:?}"
    );
    let v = env.verified_audit(68, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    running.stop().await;
}

/// A finding or proposal nested deeper than 56 levels is refused (the records that carry them add
/// levels; every record must stay within the 64 the next reader takes): the rest of the answer is
/// kept, and every record it causes decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_findings_and_parameters_are_refused() {
    let (url, _st) = serve_http_agent().await;
    let env = TestEnv::new(1, &http_agent_yaml(&url, 10_000, 0)).await;
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[event(
            "deep-1",
            "deployment.started",
            "svc-d",
            json!({"mode": "deep"}),
        )],
    )
    .await;
    let rs = env
        .read("switchyard.results", 1, Duration::from_secs(30))
        .await;
    assert_eq!(rs.len(), 1);
    let props = env
        .read("switchyard.proposals", 2, Duration::from_secs(5))
        .await;
    assert_eq!(props.len(), 1, "the deep proposal was refused");
    for r in rs.iter().chain(&props) {
        switchyard::codec::decode(r.view(), &env.loaded.schemas)
            .expect("within the depth a reader takes");
    }
    let ctx = store(&env)
        .snapshot(&ResourceKey::new("default", "svc-d"))
        .await
        .unwrap();
    assert!(ctx.facts.contains_key("triage.flat"));
    assert!(
        !ctx.facts.contains_key("triage.deep"),
        "the deep finding was refused"
    );
    let audit = audits(&env.audit(10, Duration::from_secs(5)).await);
    let keys: Vec<String> = audit
        .iter()
        .filter(|a| a.decision == "refused")
        .filter_map(|a| a.detail["key"].as_str().map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.contains("deeper than 56 levels")),
        "{keys:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_agent_round_trips_with_the_example_external_agent() {
    let pre = suffix();
    let (req_topic, reply_topic) = (
        format!("{pre}.agents.notifier.requests"),
        format!("{pre}.agents.notifier.replies"),
    );
    let yaml = format!(
        r#"
agents:
  notifier:
    kind: kafka
    request_topic: {req_topic}
    reply_topic: {reply_topic}
    reads: ["*"]
    writes: ["example.*"]
    actions: [notify]
    timeout_ms: 20000
    retries: 1
routes:
  - name: all
    agents: [notifier]
"#
    );
    // The agent's topics are created with every other topic the config refers to (the harness
    // applies them as `topics apply` does), and `topics apply` reports them.
    let env = TestEnv::new(2, &yaml).await;
    let (brokers, _) = stack().clone();
    let out = std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "topics",
            "apply",
        ])
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .output()
        .expect("topics apply");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in [&req_topic, &reply_topic] {
        assert!(
            text.contains(&format!("unchanged {t}")),
            "{t} applied: {text}"
        );
    }
    let python = stack_dir().join("venv/bin/python");
    let agent = std::process::Command::new(&python)
        .arg(root().join("deploy/agents/example-agent/agent.py"))
        .args([
            "--brokers",
            &brokers,
            "--request-topic",
            &req_topic,
            "--reply-topic",
            &reply_topic,
            "--group",
            &format!("{pre}-agent"),
        ])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let _agent = Reaper(agent);
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[
            event(
                "k1",
                "deployment.started",
                "svc-k1",
                json!({"version": "v1"}),
            ),
            event("k2", "deployment.failed", "svc-k2", json!({"fail": true})),
        ],
    )
    .await;
    let res = results(
        &env.read("switchyard.results", 2, Duration::from_secs(60))
            .await,
    );
    let by: BTreeMap<&str, &ResultData> = res.iter().map(|r| (r.resource.as_str(), r)).collect();
    assert_eq!(by["svc-k1"].status, "succeeded");
    assert_eq!(by["svc-k1"].findings[0]["key"], "example.note");
    assert_eq!(by["svc-k1"].findings[0]["value"]["saw_event"], "k1");
    assert_eq!(
        by["svc-k2"].status, "failed",
        "a non-retryable error reply fails the task"
    );
    assert_eq!(by["svc-k2"].attempts, 1);
    let props = proposals(
        &env.read("switchyard.proposals", 1, Duration::from_secs(10))
            .await,
    );
    assert_eq!(props[0].action, "notify");
    assert_eq!(props[0].parameters["text"], "deployment.started on svc-k1");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_pauses_processing_and_nothing_is_lost() {
    // A Redis of this test's own, so stopping it does not disturb other tests.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(port, dir.path(), true);
    let env = TestEnv::new(2, "").await;
    let mut loaded = env.loaded.clone();
    loaded.config.redis.url = format!("redis://127.0.0.1:{port}/");
    let running = Running::start(loaded, &["route", "agents"]);
    const N: usize = 60;
    let evs = numbered_events("r", "deployment.completed", 0..N / 2, 7);
    env.publish("events.deployments", &evs).await;
    let _ = env
        .read("switchyard.results", 5, Duration::from_secs(30))
        .await;
    drop(redis); // Redis dies mid-stream.
    let evs = numbered_events("r", "deployment.completed", N / 2..N, 7);
    env.publish("events.deployments", &evs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = env
        .read("switchyard.results", N, Duration::from_secs(2))
        .await
        .len();
    assert!(
        during < N,
        "with Redis down not every task can finish ({during} of {N})"
    );
    // Back from its append-only file (the durable setup the README asks for): nothing was lost.
    let _redis = start_redis(port, dir.path(), true);
    let res = results(
        &env.read("switchyard.results", N, Duration::from_secs(60))
            .await,
    );
    let tasks: std::collections::BTreeSet<&str> = res.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(tasks.len(), N, "every task finished after Redis came back");
    assert!(res.iter().all(|r| r.status == "succeeded"));
    let dlq = env.read("switchyard.dlq", 1, Duration::from_secs(2)).await;
    assert!(dlq.is_empty(), "an outage is not a reason to dead-letter");
    running.stop().await;
}

/// What the circuit-breaker test's agents saw: calls per agent, and whether `flaky` fails.
#[derive(Default)]
struct Flaky {
    failing: std::sync::atomic::AtomicBool,
    flaky: AtomicUsize,
    backup: AtomicUsize,
}

async fn flaky_agent(
    State(st): State<Arc<Flaky>>,
    Json(req): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match req["agent"].as_str() {
        Some("flaky") => {
            st.flaky.fetch_add(1, Ordering::SeqCst);
            if st.failing.load(Ordering::SeqCst) {
                return (axum::http::StatusCode::UNPROCESSABLE_ENTITY, "broken").into_response();
            }
            Json(json!({"findings": [{"key": "cb.by", "value": "flaky"}]})).into_response()
        }
        _ => {
            st.backup.fetch_add(1, Ordering::SeqCst);
            Json(json!({"findings": [{"key": "cb.by", "value": "backup"}]})).into_response()
        }
    }
}

/// Two `switchyard run` processes share one circuit breaker: once `flaky` fails 4 of 4 calls the
/// circuit opens for both, its fallback `backup` runs the tasks without `flaky` being called;
/// after `open_seconds` one task probes it, the probe succeeds, and `flaky` gets the tasks again.
/// (The tasks are published one at a time, so the counts are exact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_breaker_opens_and_closes_across_two_processes() {
    let st = Arc::new(Flaky::default());
    st.failing.store(true, Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/agent", post(flaky_agent))
        .with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/agent", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let env = TestEnv::new(
        4,
        &format!(
            r#"
routes:
  - {{name: cb, types: [t.cb], agents: [flaky]}}
agents:
  flaky:
    kind: http
    url: {url}
    writes: [cb.by]
    retries: 0
    max_concurrency: 1
    circuit: {{failure_rate: 0.5, min_calls: 4, window_seconds: 60, open_seconds: 12}}
    fallback: backup
  backup:
    kind: http
    url: {url}
    writes: [cb.by]
    retries: 0
"#
        ),
    )
    .await;
    let (brokers, redis) = stack().clone();
    let spawn = || spawn_run(&env.config_path, "route,agents,decisions");
    let procs = vec![spawn(), spawn()];
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Phase 1: 4 failures open the circuit; the next 8 tasks go to the fallback.
    let publish = |from: usize, n: usize| {
        let env = &env;
        async move {
            for i in from..from + n {
                env.publish_one(
                    "events.deployments",
                    &format!("cb{i}"),
                    "t.cb",
                    &format!("svc-{i}"),
                    json!({}),
                )
                .await;
                // One at a time, so the count that opens the circuit is exact.
                let _ = env
                    .read("switchyard.results", i + 1, Duration::from_secs(20))
                    .await;
            }
        }
    };
    publish(0, 12).await;
    let (flaky1, backup1) = (
        st.flaky.load(Ordering::SeqCst),
        st.backup.load(Ordering::SeqCst),
    );
    assert_eq!(
        flaky1, 4,
        "the circuit opened after 4 failed calls, for both processes"
    );
    assert_eq!(backup1, 8, "the fallback ran the tasks while it was open");
    // Phase 2: the agent heals; after open_seconds a probe succeeds and the circuit closes.
    st.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(13)).await;
    publish(12, 6).await;
    assert_eq!(
        st.flaky.load(Ordering::SeqCst),
        flaky1 + 6,
        "the probe closed the circuit"
    );
    assert_eq!(st.backup.load(Ordering::SeqCst), backup1);
    let results: Vec<ResultData> = env
        .read("switchyard.results", 18, Duration::from_secs(5))
        .await
        .iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.status == "failed").count(), 4);
    let by_backup = results
        .iter()
        .filter(|r| r.findings.to_string().contains("backup"))
        .count();
    assert_eq!(by_backup, 8);
    // `status`: a stage that committed nothing says so (it may be running: decisions here), and
    // the agent table counts tasks.
    let out = std::process::Command::new(bin())
        .args(["--config", env.config_path.to_str().unwrap(), "status"])
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .env("SWITCHYARD_REDIS_URL", &redis)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |stage: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{stage} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("decisions").contains("no commits yet"), "{text}");
    assert!(!text.contains("never ran"), "{text}");
    assert!(
        line("agents")
            .split_whitespace()
            .nth(2)
            .is_some_and(|l| l.parse::<i64>().is_ok()),
        "{text}"
    );
    assert!(text.contains("TASKS(2h)"), "{text}");
    drop(procs);
}

/// Dead letters are listed and redriven without harm: a timed-out task, republished as it was, is
/// a no-op (its failed outcome is recorded) — `dlq redrive` runs it again under a new id derived
/// from the dead letter, once however often it is redriven; republishing the event after a route
/// change adds routing records instead of forking the chain; the audit verifies throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven_without_harm() {
    let (url, st) = serve_http_agent().await;
    let yaml = format!(
        "{}  deploy-guard:\n    kind: builtin\n    reads: [sla, deployment, last_completed_deployment]\n    writes: [deployment, last_completed_deployment]\n    actions: [deployment.hold]\n",
        http_agent_yaml(&url, 500, 0).replace("routes:\n  - name: all\n    agents: [triage]\n", "")
    ) + "routes:\n  - name: all\n    agents: [triage]\n";
    let env = TestEnv::new(1, &yaml).await;
    let running = env.start(&["route", "agents"]);
    let ev = event(
        "e-dlq",
        "deployment.started",
        "svc-dlq",
        json!({"mode": "until-healed"}),
    );
    env.publish("events.deployments", std::slice::from_ref(&ev))
        .await;
    let recs = env
        .read("switchyard.results", 1, Duration::from_secs(40))
        .await;
    assert_eq!(results(&recs)[0].status, "timed_out");
    running.stop().await;

    // The routes change (deploy-guard joins) and the event is published again: triage's task is
    // the same and finished (not run again), deploy-guard's is new; the chain stays whole.
    let mut changed = env.loaded.clone();
    changed.config.routes[0].agents.push("deploy-guard".into());
    let running = Running::start(changed, &["route", "agents"]);
    env.publish("events.deployments", std::slice::from_ref(&ev))
        .await;
    let guard = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.results"),
        1,
        Duration::from_secs(40),
        |r| data_of(&event_of(r))["agent"] == "deploy-guard",
    )
    .await;
    assert_eq!(guard.len(), 1);
    let calls_before = st.total.load(Ordering::SeqCst);
    assert_eq!(calls_before, 1, "the failed task was not called again");
    let v = env.verified_audit(4, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);

    // The agent is back; the dead letter is listed and redriven — twice.
    st.healed.store(true, Ordering::SeqCst);
    let cli = |args: &[&str]| cli(&env, args);
    let list = cli(&["dlq", "list", "--reason", "agent_failed", "--since", "1h"]);
    // Two: replaying the recorded outcome for the republished event wrote its dead letter again.
    assert!(
        list.contains("agent_failed") && list.contains("2 dead letters"),
        "{list}"
    );
    let dry = cli(&["dlq", "redrive", "--reason", "agent_failed", "--dry-run"]);
    assert!(
        dry.contains("would redrive 1") && dry.contains("a copy of dlq"),
        "{dry}"
    );
    let once = cli(&["dlq", "redrive", "--reason", "agent_failed"]);
    assert!(
        once.contains("runs again as") && once.contains("-redrive-"),
        "{once}"
    );
    let recs = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.results"),
        1,
        Duration::from_secs(40),
        |r| {
            data_of(&event_of(r))["task_id"]
                .as_str()
                .is_some_and(|t| t.contains("-redrive-"))
        },
    )
    .await;
    let again = &results(&recs)[0];
    assert_eq!(again.status, "succeeded", "{again:?}");
    assert!(again.task_id.contains("-redrive-"), "{again:?}");
    let twice = cli(&["dlq", "redrive", "--reason", "agent_failed"]);
    assert!(
        twice.contains("skipped: redriven before (") && twice.contains("redrove 0 "),
        "a redriven dead letter is remembered: {twice}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        st.total.load(Ordering::SeqCst),
        calls_before + 1,
        "a dead letter redriven twice runs once"
    );
    let v = env.verified_audit(5, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    running.stop().await;
}

/// Runs the switchyard binary with `config`, the brokers and Redis given; its status, stdout and
/// stderr.
/// The first `page` action on `topic`, tailed through `config` (waits up to a minute); Null when none
/// came, with what the last `tail` said.
fn first_page_action(
    config: &std::path::Path,
    brokers: &str,
    redis_url: &str,
    topic: &str,
) -> (Value, String) {
    let mut last = String::new();
    for _ in 0..30 {
        let (_, out, err) = run_with(
            config,
            brokers,
            redis_url,
            &[
                "tail",
                topic,
                "--from-beginning",
                "--max",
                "1",
                "--idle-timeout-ms",
                "2000",
            ],
        );
        if let Some(line) = out.lines().find(|l| l.contains("\"page\"")) {
            return (serde_json::from_str(line).expect("JSON line"), last);
        }
        last = format!("{out}{err}");
    }
    (Value::Null, last)
}

fn run_with(
    config: &std::path::Path,
    brokers: &str,
    redis_url: &str,
    args: &[&str],
) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .args(["--config", config.to_str().expect("path")])
        .args(args)
        .env("SWITCHYARD_KAFKA_BROKERS", brokers)
        .env("SWITCHYARD_REDIS_URL", redis_url)
        .output()
        .expect("switchyard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// SASL as a managed cluster asks for it (SASL_SSL, SCRAM-SHA-512): every client switchyard makes —
/// the admin client of `topics apply`, the stages' consumers and producers, `publish` and `tail` —
/// authenticates through `kafka.client`; the password is redacted by `config show`; a wrong one is
/// refused by the broker and the command fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_kafka_with_sasl_scram_over_tls() {
    let (_kafka, kafka_port) = start_kafka_sasl(&["switchyard:s3cret-sy", "other:other-pw"]);
    let ca = test_ca_dir().join("ca.crt");
    let ca_s = ca.to_str().expect("path").to_string();
    let brokers = format!("127.0.0.1:{kafka_port}");
    let env = TestEnv::new(
        1,
        r#"
routes:
  - {name: sla, types: [sla.breached], agents: [sla-responder]}
agents:
  sla-responder:
    kind: builtin
    reads: [sla, last_completed_deployment, deployment]
    writes: [sla, suspect_deployment]
    actions: [rollback, page]
"#,
    )
    .await;
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let plain_kafka = format!("brokers: {}", stack().0);
    assert!(text.contains(&plain_kafka));
    // `password` is a line of `client:` (the value in the file) or of `client_secrets:`.
    let sasl = |password: &str| {
        text.replace(
            &plain_kafka,
            &format!(
                "brokers: {brokers}\n  client:\n    security.protocol: SASL_SSL\n    ssl.ca.location: {ca_s}\n    sasl.mechanism: SCRAM-SHA-512\n    sasl.username: switchyard\n{password}"
            ),
        )
    };
    // The right password from a mounted secret file (`client_secrets`), kept out of the config.
    let secret_file = env.config_path.with_file_name("kafka-password");
    std::fs::write(&secret_file, "s3cret-sy\n").expect("write");
    let config = env.config_path.with_file_name("sasl.yaml");
    std::fs::write(
        &config,
        sasl(&format!(
            "  client_secrets:\n    sasl.password: {{file: {}}}",
            secret_file.display()
        )),
    )
    .expect("write");
    let redis = stack().1.clone();
    // The password never shows.
    let (ok, out, err) = run_with(&config, &brokers, &redis, &["config", "show"]);
    assert!(ok, "{out}{err}");
    assert!(
        !out.contains("s3cret-sy")
            && out.contains("sasl.username")
            && out.contains("client_secrets"),
        "{out}"
    );
    // A secret that cannot be read is a config problem naming its source, not its value.
    let unreadable = env.config_path.with_file_name("unreadable.yaml");
    std::fs::write(
        &unreadable,
        sasl("  client_secrets:\n    sasl.password: {env: SWITCHYARD_TEST_UNSET_KAFKA_PASSWORD}"),
    )
    .expect("write");
    let (ok, out, err) = run_with(&unreadable, &brokers, &redis, &["config", "show"]);
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("kafka.client_secrets.sasl.password")
            && err.contains("SWITCHYARD_TEST_UNSET_KAFKA_PASSWORD is not set"),
        "{err}"
    );
    // A wrong password: refused by the broker, and the command says so.
    let wrong = env.config_path.with_file_name("wrong.yaml");
    std::fs::write(&wrong, sasl("    sasl.password: not-the-password")).expect("write");
    let (ok, out, err) = run_with(&wrong, &brokers, &redis, &["topics", "apply"]);
    assert!(!ok, "a wrong password fails: {out}{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    assert!(
        kafka_sasl_journal(kafka_port).contains("refused"),
        "{}",
        kafka_sasl_journal(kafka_port)
    );
    // With the right one: topics, the pipeline, publish and tail, all authenticated.
    let (ok, out, err) = run_with(&config, &brokers, &redis, &["topics", "apply"]);
    assert!(ok, "topics apply over SASL_SSL: {out}{err}");
    let _run = Reaper(
        std::process::Command::new(bin())
            .args([
                "--config",
                config.to_str().expect("path"),
                "run",
                "--stages",
                "route,agents,resolve",
            ])
            .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
            .env("SWITCHYARD_REDIS_URL", &redis)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn switchyard"),
    );
    let topic = env.topic("events.sla-breaches");
    let (ok, out, err) = run_with(
        &config,
        &brokers,
        &redis,
        &[
            "publish",
            "-t",
            &topic,
            "--type",
            "sla.breached",
            "--subject",
            "checkout",
            "--id",
            "sasl-1",
            "--data",
            r#"{"slo": "availability", "objective": 99.9, "observed": 97.0}"#,
        ],
    );
    assert!(ok, "publish over SASL_SSL: {out}{err}");
    let actions_topic = env.topic("switchyard.actions");
    let (action, last) = first_page_action(&config, &brokers, &redis, &actions_topic);
    assert!(
        action.to_string().contains("checkout"),
        "an action came out over SASL_SSL: {action}; last tail: {last}; journal: {}",
        kafka_sasl_journal(kafka_port)
    );
    let journal = kafka_sasl_journal(kafka_port);
    let ok_lines = journal
        .lines()
        .filter(|l| l.starts_with("authenticated"))
        .count();
    assert!(ok_lines >= 4, "every client authenticated: {journal}");
    assert!(
        journal
            .lines()
            .filter(|l| l.starts_with("authenticated"))
            .all(|l| l.ends_with(": switchyard")),
        "{journal}"
    );
    // Nothing reached the stack's own (plaintext) broker.
    assert!(env
        .read("switchyard.actions", 1, Duration::from_secs(2))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_kafka_and_redis_over_tls_with_an_agent_over_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let calls = dir.path().join("https-calls.jsonl");
    let (_agent, port) = start_https_agent(&calls);
    let (_kafka, kafka_port) = start_kafka_tls();
    let ca = test_ca_dir().join("ca.crt");
    let ca_s = ca.to_str().expect("path").to_string();
    let tls_url = redis_tls_url();
    let brokers = format!("127.0.0.1:{kafka_port}");
    let env = TestEnv::new(
        1,
        &format!(
            r#"
routes:
  - {{name: sla, types: [sla.breached], agents: [remote]}}
agents:
  remote:
    kind: http
    url: "https://127.0.0.1:{port}/agent"
    actions: [page]
"#
        ),
    )
    .await;
    // The same config on Kafka and Redis over TLS, trusting the stack's test CA.
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let (plain_redis, plain_kafka) = (
        format!("url: {}", stack().1),
        format!("brokers: {}", stack().0),
    );
    assert!(text.contains(&plain_redis) && text.contains(&plain_kafka));
    let tls_text = text
        .replace(&plain_redis, &format!("url: {tls_url}\n  ca_file: {ca_s}"))
        .replace(
            &plain_kafka,
            &format!("brokers: {brokers}\n  client:\n    security.protocol: ssl\n    ssl.ca.location: {ca_s}"),
        );
    let tls_config = env.config_path.with_file_name("tls.yaml");
    std::fs::write(&tls_config, &tls_text).expect("write");
    // Without the CA, Redis's certificate is refused, and the error says so.
    let untrusting = env.config_path.with_file_name("untrusting.yaml");
    std::fs::write(
        &untrusting,
        text.replace(&plain_redis, &format!("url: {tls_url}")),
    )
    .expect("write");
    let (ok, _, err) = run_with(&untrusting, &stack().0, &tls_url, &["status"]);
    assert!(!ok, "an untrusted certificate is refused");
    assert!(
        err.contains("UnknownIssuer") || err.to_lowercase().contains("certificate"),
        "{err}"
    );
    // Topics on the TLS broker, through the admin client over TLS.
    let (ok, out, err) = run_with(&tls_config, &brokers, &tls_url, &["topics", "apply"]);
    assert!(ok, "topics apply over TLS: {out}{err}");
    // The HTTPS agent's certificate chains to the test CA: the process trusts it through
    // SSL_CERT_FILE (the system's roots otherwise).
    let _run = Reaper(
        std::process::Command::new(bin())
            .args([
                "--config",
                tls_config.to_str().expect("path"),
                "run",
                "--stages",
                "route,agents,resolve",
            ])
            .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
            .env("SWITCHYARD_REDIS_URL", &tls_url)
            .env("SSL_CERT_FILE", &ca_s)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn switchyard"),
    );
    let topic = env.topic("events.sla-breaches");
    let (ok, out, err) = run_with(
        &tls_config,
        &brokers,
        &tls_url,
        &[
            "publish",
            "-t",
            &topic,
            "--type",
            "sla.breached",
            "--subject",
            "checkout",
            "--id",
            "tls-1",
            "--data",
            r#"{"slo": "availability", "observed": 97.0}"#,
        ],
    );
    assert!(ok, "publish over TLS: {out}{err}");
    let actions_topic = env.topic("switchyard.actions");
    let (action, _) = first_page_action(&tls_config, &brokers, &tls_url, &actions_topic);
    assert_ne!(action, Value::Null, "an action came out over TLS");
    let seen = json_lines(&calls);
    assert_eq!(seen.len(), 1, "one call over HTTPS: {seen:?}");
    assert_eq!(seen[0]["agent"], "remote");
    // The state is in the TLS Redis, none of it in the plaintext one.
    let cfg = switchyard::store::RedisConfig {
        url: tls_url.clone(),
        ca_file: Some(ca.clone()),
        ..Default::default()
    };
    let mut tls = RedisConn::from_config(&cfg)
        .expect("conn")
        .get()
        .await
        .expect("connect over TLS");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", env.prefix))
        .query_async(&mut tls)
        .await
        .expect("keys");
    assert!(
        keys.iter().any(|k| k.contains(":ctx:")),
        "context written over TLS: {keys:?}"
    );
    let mut plain_conn = RedisConn::new(&stack().1)
        .expect("conn")
        .get()
        .await
        .expect("connect");
    let plain_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", env.prefix))
        .query_async(&mut plain_conn)
        .await
        .expect("keys");
    assert!(plain_keys.is_empty(), "{plain_keys:?}");
    // Nothing went to the plaintext broker's topics either.
    assert!(env
        .read("switchyard.actions", 1, Duration::from_secs(2))
        .await
        .is_empty());
    // Commands use the same connection settings: the audit trail read over TLS verifies.
    let (ok, out, err) = run_with(&tls_config, &brokers, &tls_url, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("0 problems") || !out.contains("problem"),
        "{out}"
    );
}

/// Headers named like the dead-letter ones on an input record are not trusted: whoever can write
/// to an input topic cannot make `dlq redrive` send its record to another topic (here, as a forged
/// approval decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_dead_letter_headers_do_not_steer_a_redrive() {
    let env = TestEnv::new(1, "").await;
    let running = env.start(&["route"]);
    let decisions = env.topic("switchyard.approval-decisions");
    env.send_raw(
        "events.deployments",
        "svc-forged",
        br#"{"approval_id":"apr-x","decision":"approve","by":"mallory"}"#,
        &[
            ("switchyard.dlq.source.topic", decisions.as_str()),
            ("switchyard.dlq.reason", "agent_failed"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    let dl = env.read("switchyard.dlq", 1, Duration::from_secs(40)).await;
    assert_eq!(dl.len(), 1);
    let values = |name: &str| -> Vec<String> {
        dl[0]
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    };
    let source = env.topic("events.deployments");
    assert_eq!(values("switchyard.dlq.source.topic"), vec![source.clone()]);
    assert_eq!(values("switchyard.dlq.reason"), vec!["not_cloudevent"]);
    assert_eq!(values("x-kept"), vec!["yes"], "other headers go along");
    let dry = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(
        dry.contains(&format!("republished to {source}")) && !dry.contains(&decisions),
        "{dry}"
    );
    // Redriven (the producer was not fixed), it comes back as a second dead letter; redriving
    // again sends only that newest copy, not both (runs would double them).
    cli(&env, &["dlq", "redrive"]);
    let dl = env.read("switchyard.dlq", 2, Duration::from_secs(40)).await;
    running.stop().await;
    assert_eq!(dl.len(), 2);
    let again = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(
        again.contains("would redrive 1 ") && again.contains("skipped: redriven before"),
        "{again}"
    );
    // A record written straight to the dead-letter topic (its headers say anything) naming a
    // source record that is not the record it holds: not sent on with the operator's credentials.
    env.send_raw(
        "switchyard.dlq",
        "svc-forged",
        br#"{"approval_id":"apr-y","decision":"approve","by":"mallory"}"#,
        &[
            ("switchyard.dlq.source.topic", source.as_str()),
            ("switchyard.dlq.source.partition", "0"),
            ("switchyard.dlq.source.offset", "0"),
            ("switchyard.dlq.stage", "route"),
            ("switchyard.dlq.reason", "not_cloudevent"),
            ("switchyard.dlq.time", "2099-01-01T00:00:00Z"),
        ],
    )
    .await;
    let forged = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(
        forged.contains(&format!(
            "skipped: its source record {source}[0]@0 is not the record it holds"
        )) && forged.contains("would redrive 1 "),
        "{forged}"
    );
    // The source record's very key and bytes, with headers of its own: binary-mode CloudEvent
    // attributes (`ce_*`) would make the republished record an event of the writer's choosing.
    env.send_raw(
        "switchyard.dlq",
        "svc-forged",
        br#"{"approval_id":"apr-x","decision":"approve","by":"mallory"}"#,
        &[
            ("switchyard.dlq.source.topic", source.as_str()),
            ("switchyard.dlq.source.partition", "0"),
            ("switchyard.dlq.source.offset", "0"),
            ("switchyard.dlq.stage", "route"),
            ("switchyard.dlq.reason", "not_cloudevent"),
            ("switchyard.dlq.time", "2099-01-01T00:00:01Z"),
            ("x-kept", "yes"),
            ("ce_specversion", "1.0"),
            ("ce_tenant", "acme"),
        ],
    )
    .await;
    let forged = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(
        forged.contains(&format!(
            "skipped: its headers are not those of its source record {source}[0]@0"
        )) && forged.contains("would redrive 1 "),
        "{forged}"
    );
}

/// A `switchyard.redriven.from` header on an input record is believed only of a genuine copy of
/// the dead letter it names (the same payload, or the task redriven from it): a forged one does not
/// make `dlq redrive` skip the dead letter it names as "redriven before".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_redriven_from_header_does_not_hide_a_dead_letter() {
    let env = TestEnv::new(1, "").await;
    let running = env.start(&["route"]);
    env.send_raw("events.deployments", "svc-a", b"first, not json", &[])
        .await;
    let dl = env.read("switchyard.dlq", 1, Duration::from_secs(40)).await;
    assert_eq!(dl.len(), 1);
    let named = format!("{}@{}", dl[0].partition, dl[0].offset);
    env.send_raw(
        "events.deployments",
        "svc-b",
        b"second, not json either",
        &[("switchyard.redriven.from", named.as_str())],
    )
    .await;
    let dl = env.read("switchyard.dlq", 2, Duration::from_secs(40)).await;
    running.stop().await;
    assert_eq!(dl.len(), 2);
    let dry = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(
        dry.contains("would redrive 2 ") && !dry.contains("skipped: redriven before"),
        "{dry}"
    );
}

/// A record too big to copy whole into a dead letter (a key and headers near the broker's limit),
/// and an event whose attributes are past their bounds, are dead-lettered — bounded — and the
/// stage goes on with the next record (the first used to stop the stage at every start, the second
/// to make an audit seal too large to write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_keys_headers_and_attributes_are_dead_lettered_and_the_stage_goes_on() {
    use switchyard::kafka::dlq_headers::{HEADERS_DROPPED, KEY_TRUNCATED, REASON};
    let env = TestEnv::new(1, "").await;
    let running = env.start(&["route"]);
    let key = "k".repeat(700_000);
    // Together just under the producer's limit (1,000,000 bytes): a whole copy plus the dead-letter
    // headers is over it.
    let big = "h".repeat(299_900);
    env.send_raw(
        "events.deployments",
        &key,
        b"not json",
        &[("x-big", big.as_str()), ("x-small", "yes")],
    )
    .await;
    env.publish_one(
        "events.deployments",
        "long-subject",
        "deployment.started",
        &"s".repeat(513),
        json!({"version": "v1"}),
    )
    .await;
    env.publish_one(
        "events.deployments",
        "after",
        "deployment.started",
        "svc-after",
        json!({"version": "v2"}),
    )
    .await;
    let tasks = env
        .read("switchyard.tasks", 1, Duration::from_secs(40))
        .await;
    assert_eq!(event_of(&tasks[0]).subject.as_deref(), Some("svc-after"));
    let dl = env.read("switchyard.dlq", 2, Duration::from_secs(20)).await;
    running.stop().await;
    assert_eq!(dl.len(), 2);
    let h = |r: &switchyard::kafka::Input, name: &str| {
        r.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let huge = &dl[0];
    assert_eq!(h(huge, REASON).as_deref(), Some("malformed_json"));
    assert_eq!(
        huge.key.as_ref().map(Vec::len),
        Some(switchyard::kafka::DLQ_KEY_CAP)
    );
    assert_eq!(h(huge, KEY_TRUNCATED).as_deref(), Some("700000"));
    assert_eq!(h(huge, HEADERS_DROPPED).as_deref(), Some("1"));
    assert_eq!(h(huge, "x-small").as_deref(), Some("yes"));
    let long = &dl[1];
    assert_eq!(h(long, REASON).as_deref(), Some("invalid_attribute"));
    let dry = cli(&env, &["dlq", "redrive", "--dry-run"]);
    assert!(dry.contains("key or headers were cut"), "{dry}");
}

/// Two tenants' events with the same source and id are two events: their tasks (and so their
/// proposals, actions and approvals) never share an id; the default tenant's ids are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_events_with_one_source_and_id_get_their_own_tasks() {
    let env = TestEnv::new(1, "").await;
    let running = env.start(&["route"]);
    let ev = |tenant: Option<&str>| {
        let e = event(
            "d-42",
            "deployment.started",
            "checkout",
            json!({"version": "v1"}),
        );
        match tenant {
            Some(t) => e.with_extension("tenant", t),
            None => e,
        }
    };
    env.publish(
        "events.deployments",
        &[ev(Some("acme")), ev(Some("globex")), ev(None)],
    )
    .await;
    let tasks = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.tasks"),
        Duration::from_secs(40),
        |got: &[switchyard::kafka::Input]| {
            let tenants: std::collections::BTreeSet<String> = got
                .iter()
                .map(|r| event_of(r).tenant().to_string())
                .collect();
            tenants.len() == 3
        },
    )
    .await;
    running.stop().await;
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &tasks {
        let t = event_of(r);
        by_tenant
            .entry(t.tenant().to_string())
            .or_default()
            .push(data_of(&t)["task_id"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(by_tenant.len(), 3, "{by_tenant:?}");
    let (acme, globex) = (&by_tenant["acme"], &by_tenant["globex"]);
    assert!(
        acme.iter()
            .all(|id| !globex.contains(id) && !by_tenant["default"].contains(id)),
        "{by_tenant:?}"
    );
    // The default tenant's task ids are what they were before the tenant counted.
    let plain = event("d-42", "deployment.started", "checkout", json!({}));
    for r in &tasks {
        let t = event_of(r);
        if t.tenant() == "default" {
            let d = data_of(&t);
            let before = format!(
                "task-{}",
                switchyard::pattern::stable_id(&[
                    &plain.source,
                    &plain.id,
                    d["agent"].as_str().unwrap_or("")
                ])
            );
            assert_eq!(d["task_id"].as_str(), Some(before.as_str()));
        }
    }
}

/// An HTTP agent's credentials stay secret: a URL's user info and query never reach the records
/// (results, audit, dead letters) when the agent cannot be reached; `headers` are sent with each
/// task; a redirect is not followed (it would carry the headers wherever it points).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_agents_credentials_never_reach_records_and_no_redirect_carries_them() {
    #[derive(Default)]
    struct Seen {
        authorized: AtomicUsize,
        elsewhere: AtomicUsize,
    }
    let seen = Arc::new(Seen::default());
    let (s1, s2) = (seen.clone(), seen.clone());
    let other = axum::Router::new().route(
        "/agent",
        post(move || {
            let s = s2.clone();
            async move {
                s.elsewhere.fetch_add(1, Ordering::SeqCst);
                Json(json!({}))
            }
        }),
    );
    let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere = format!("http://{}/agent", l2.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l2, other).await.unwrap() });
    let app = axum::Router::new()
        .route(
            "/agent",
            post(move |headers: axum::http::HeaderMap| {
                let s = s1.clone();
                async move {
                    use axum::response::IntoResponse;
                    if headers
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer hdr-S3cret")
                    {
                        s.authorized.fetch_add(1, Ordering::SeqCst);
                        Json(json!({"findings": [{"key": "triage.note", "value": 1}]}))
                            .into_response()
                    } else {
                        (axum::http::StatusCode::UNAUTHORIZED, "no").into_response()
                    }
                }
            }),
        )
        .route(
            "/moved",
            post(move || {
                let to = elsewhere.clone();
                async move { axum::response::Redirect::temporary(&to) }
            }),
        );
    let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l1.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l1, app).await.unwrap() });
    let closed = free_port();
    let env = TestEnv::new(
        1,
        &format!(
            r#"
agents:
  down:
    kind: http
    url: "http://svc:UrlPassw0rd@127.0.0.1:{closed}/agent?token=QueryT0ken"
    reads: ["*"]
    writes: ["triage.*"]
    retries: 0
  authed:
    kind: http
    url: "http://{addr}/agent"
    headers: {{authorization: "Bearer hdr-S3cret"}}
    reads: ["*"]
    writes: ["triage.*"]
    retries: 0
  moved:
    kind: http
    url: "http://{addr}/moved"
    headers: {{authorization: "Bearer hdr-S3cret"}}
    reads: ["*"]
    writes: ["triage.*"]
    retries: 0
routes:
  - name: down
    types: [x.down]
    agents: [down]
  - name: authed
    types: [x.authed]
    agents: [authed]
  - name: moved
    types: [x.moved]
    agents: [moved]
"#
        ),
    )
    .await;
    let shown = cli(&env, &["config", "show"]);
    for secret in ["UrlPassw0rd", "QueryT0ken", "hdr-S3cret"] {
        assert!(!shown.contains(secret), "config show: {secret}");
    }
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[
            event("e-down", "x.down", "svc-1", json!({})),
            event("e-authed", "x.authed", "svc-2", json!({})),
            event("e-moved", "x.moved", "svc-3", json!({})),
        ],
    )
    .await;
    let res = results(
        &env.read("switchyard.results", 3, Duration::from_secs(40))
            .await,
    );
    let by: BTreeMap<&str, &ResultData> = res.iter().map(|r| (r.agent.as_str(), r)).collect();
    assert_eq!(by["down"].status, "failed");
    assert_eq!(by["authed"].status, "succeeded", "{:?}", by["authed"]);
    assert_eq!(by["moved"].status, "failed", "{:?}", by["moved"]);
    assert_eq!(seen.authorized.load(Ordering::SeqCst), 1);
    assert_eq!(
        seen.elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
    let mut texts: Vec<String> = Vec::new();
    for topic in ["switchyard.results", "switchyard.dlq", "switchyard.audit"] {
        for r in env.read(topic, usize::MAX, Duration::from_secs(3)).await {
            texts.push(String::from_utf8_lossy(&r.payload).into_owned());
            for (k, v) in &r.headers {
                texts.push(format!("{k}: {}", String::from_utf8_lossy(v)));
            }
        }
    }
    let all = texts.join("\n");
    assert!(all.contains("127.0.0.1"), "the failure names where: {all}");
    for secret in ["UrlPassw0rd", "QueryT0ken", "hdr-S3cret"] {
        assert!(!all.contains(secret), "{secret} in the records: {all}");
    }
    running.stop().await;
}
