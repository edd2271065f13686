//! Context across resources, end to end through the broker, Redis, HTTP agents of the test and the
//! LLM stand-in: relations from the config and from events, related facts in built-in, HTTP and
//! LLM agents' inputs within their scope and depth, actions on a related resource (and refused on
//! any other), cross-resource staleness, agent memory, and context queries by fact and relation
//! through the CLI and the HTTP API; then expiry of relations and index entries.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};

use common::*;

#[derive(Default)]
struct Seen {
    calls: Mutex<BTreeMap<String, Vec<Value>>>,
}

async fn agent(State(st): State<Arc<Seen>>, Json(req): Json<Value>) -> Json<Value> {
    let name = req["agent"].as_str().unwrap_or_default().to_string();
    st.calls
        .lock()
        .expect("lock")
        .entry(name.clone())
        .or_default()
        .push(req.clone());
    match name.as_str() {
        "watcher" => Json(json!({"proposals": [
            {"action": "note", "resource": "api", "parameters": {"saw": "api"}},
            {"action": "note", "resource": "elsewhere", "parameters": {}}]})),
        "slowroll" => {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            Json(json!({"proposals": [{"action": "rollback", "parameters": {"to_version": "v1"}}]}))
        }
        _ => Json(json!({})),
    }
}

async fn serve() -> (String, Arc<Seen>) {
    let st = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/agent", post(agent))
        .with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (format!("http://{addr}/agent"), st)
}

fn deployment(
    id: &str,
    svc: &str,
    version: &str,
    previous: &str,
    deps: &[&str],
) -> switchyard::event::CloudEvent {
    event(
        id,
        "deployment.completed",
        svc,
        json!({"service": svc, "version": version, "previous_version": previous, "dependencies": deps}),
    )
}

fn data_list(recs: &[switchyard::kafka::Input]) -> Vec<Value> {
    recs.iter().map(|r| data_of(&event_of(r)).clone()).collect()
}

const VIEWER: &str = "viewer-token-0123456789abcdef";
const OTHER: &str = "other-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn related_context_reaches_agents_and_governs_actions_staleness_memory_and_queries() {
    let (url, seen) = serve().await;
    let s = suffix();
    let model = format!("rel-{s}");
    let env = TestEnv::new(
        2,
        &format!(
            r#"
http:
  enabled: true
  users:
    - {{ name: ops, token: {VIEWER}, roles: [viewer], tenants: [default] }}
    - {{ name: acme-ops, token: {OTHER}, roles: [viewer], tenants: [acme] }}
context:
  index: [sla]
  relations:
    static:
      - {{ from: web, relation: depends_on, to: api }}
    learn:
      - {{ types: ["deployment.*"], field: data.dependencies, relation: depends_on }}
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    analyst: {{candidates: [{{provider: mock, model: "{model}"}}]}}
resolve:
  actions:
    rollback: {{ priority: 100, invalidated_by: ["depends_on:deployment"] }}
routes:
  - {{name: deployments, types: ["deployment.*"], agents: [deploy-guard]}}
  - {{name: sla, types: [sla.breached, sla.recovered], agents: [sla-responder]}}
  - {{name: watch, types: [t.watch], agents: [watcher]}}
  - {{name: roll, types: [t.roll], agents: [slowroll]}}
  - {{name: think, types: [t.think], agents: [thinker]}}
agents:
  deploy-guard:
    kind: builtin
    reads: [sla, deployment, last_completed_deployment]
    writes: [deployment, last_completed_deployment]
    actions: [deployment.hold]
  sla-responder:
    kind: builtin
    reads: [sla, last_completed_deployment, deployment]
    writes: [sla, suspect_deployment]
    actions: [rollback, page]
    related: [{{ relation: depends_on, reads: [last_completed_deployment] }}]
  watcher:
    kind: http
    url: {url}
    actions: [note]
    retries: 0
    related: [{{ relation: depends_on, depth: 2, reads: [deployment, sla] }}]
  slowroll:
    kind: http
    url: {url}
    actions: [rollback]
    retries: 0
    timeout_ms: 10000
  thinker:
    kind: llm
    model: analyst
    prompt: "Breach on {{{{ task.resource }}}}. Memory: {{{{ memory | tojson }}}}"
    related: [{{ relation: depends_on, reads: [last_completed_deployment] }}]
    memory: {{ max_entries: 2 }}
    retries: 0
"#,
            llm = llm_base()
        ),
    )
    .await;
    scenario(json!([
        {"type": "reply", "match": {"model": model}, "tool_calls": [
            {"name": "related_context", "arguments": {"relation": "depends_on", "keys": ["last_completed_deployment"]}},
            {"name": "related_context", "arguments": {"relation": "owned_by"}}]},
        {"type": "reply", "match": {"model": model}, "text": "first: api v9 looks guilty"},
        {"type": "reply", "match": {"model": model}, "text": "second"},
        {"type": "reply", "match": {"model": model}, "text": "third"},
    ]))
    .await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let running = Running::start(loaded, &["route", "agents", "resolve"]);

    // Relations: web depends_on api (static) and db (learned from web's deployment); api
    // depends_on cache (learned). db deploys last: the latest change among web and what it
    // depends on.
    env.publish(
        "events.deployments",
        &[
            deployment("d-web", "web", "v2", "v1", &["db"]),
            deployment("d-api", "api", "v9", "v8", &["cache"]),
            deployment("d-cache", "cache", "v3", "v2", &[]),
        ],
    )
    .await;
    // Strictly later (events of one batch can share a millisecond; a tie goes to web's own).
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.publish(
        "events.deployments",
        &[deployment("d-db", "db", "v5", "v4", &[])],
    )
    .await;
    env.read("switchyard.results", 4, Duration::from_secs(60))
        .await;

    // The built-in SLA agent suspects db's deployment and proposes its rollback — on db.
    env.publish_one(
        "events.sla-breaches",
        "b-web",
        "sla.breached",
        "web",
        json!({"slo": "availability", "objective": 99.9, "observed": 97.0, "owner": "team-web"}),
    )
    .await;
    let actions = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.actions"),
        1,
        Duration::from_secs(40),
        |r| data_of(&event_of(r))["action"] == "rollback",
    )
    .await;
    let rb = data_of(&event_of(&actions[0])).clone();
    assert_eq!(rb["resource"], "db", "{rb}");
    assert_eq!(rb["parameters"]["to_version"], "v4", "{rb}");
    assert_eq!(rb["parameters"]["breach_of"], "web", "{rb}");

    // An HTTP agent gets the related facts within its scope (deployment, sla; two hops) and may
    // act on a related resource only.
    env.publish_one("events.deployments", "w1", "t.watch", "web", json!({}))
        .await;
    let results = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.results"),
        1,
        Duration::from_secs(40),
        |r| data_of(&event_of(r))["agent"] == "watcher",
    )
    .await;
    let body = seen.calls.lock().expect("lock")["watcher"][0].clone();
    let rel = &body["context"]["related"]["depends_on"];
    assert_eq!(rel["api"]["depth"], 1, "{body}");
    assert_eq!(rel["db"]["depth"], 1, "{body}");
    assert_eq!(rel["cache"]["depth"], 2, "{body}");
    assert_eq!(
        rel["api"]["facts"]["deployment"]["value"]["version"], "v9",
        "{body}"
    );
    assert!(
        rel["api"]["facts"]
            .get("last_completed_deployment")
            .is_none(),
        "only the keys of its related reads: {body}"
    );
    assert_eq!(data_of(&event_of(&results[0]))["status"], "succeeded");
    let refused = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.audit"),
        1,
        Duration::from_secs(20),
        |r| {
            let d = data_of(&event_of(r)).clone();
            d["decision"] == "refused" && d["detail"]["key"] == "note@elsewhere"
        },
    )
    .await;
    assert_eq!(
        refused.len(),
        1,
        "an action on an unrelated resource is refused and audited"
    );
    let reads = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.audit"),
        1,
        Duration::from_secs(20),
        |r| {
            let d = data_of(&event_of(r)).clone();
            d["decision"] == "agent_result" && d["detail"]["agent"] == "watcher"
        },
    )
    .await;
    let reads = data_of(&event_of(&reads[0]))["detail"]["related_reads"].to_string();
    assert!(
        reads.contains("api/deployment") && reads.contains("cache/deployment"),
        "related reads are audited: {reads}"
    );
    let notes = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.proposals"),
        2,
        Duration::from_secs(6),
        |r| data_of(&event_of(r))["action"] == "note",
    )
    .await;
    assert_eq!(
        notes.len(),
        1,
        "only the related one: {:?}",
        data_list(&notes)
    );
    assert_eq!(data_of(&event_of(&notes[0]))["resource"], "api");

    // Cross-resource staleness: api deploys while slowroll thinks about web; its rollback of
    // web is stale, and the audit says why.
    env.publish_one("events.deployments", "r1", "t.roll", "web", json!({}))
        .await;
    for _ in 0..100 {
        if seen.calls.lock().expect("lock").contains_key("slowroll") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.publish(
        "events.deployments",
        &[deployment("d-api-2", "api", "v10", "v9", &["cache"])],
    )
    .await;
    let stale = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.audit"),
        1,
        Duration::from_secs(40),
        |r| {
            let d = data_of(&event_of(r)).clone();
            d["stage"] == "resolve" && d["resource"] == "web" && d["reason"] == "stale"
        },
    )
    .await;
    let why = data_of(&event_of(&stale[0])).to_string();
    assert!(
        why.contains("deployment of api (web depends_on api)"),
        "{why}"
    );

    // The LLM agent: related_context within its relations, memory carried and bounded.
    for i in 0..3 {
        env.publish_one(
            "events.deployments",
            &format!("k{i}"),
            "t.think",
            "web",
            json!({}),
        )
        .await;
    }
    let mut reqs = Vec::new();
    for _ in 0..200 {
        reqs = llm_requests(&model).await;
        if reqs.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    let tools = reqs[1]["messages"].to_string();
    assert!(
        tools.contains("v10") && tools.contains("\\\"db\\\""),
        "{tools}"
    );
    assert!(tools.contains("owned_by is not among"), "{tools}");
    let second_prompt = reqs[2]["messages"][0]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        second_prompt.contains("first: api v9 looks guilty"),
        "{second_prompt}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shown: Value =
        serde_json::from_str(&cli(&env, &["context", "show", "web", "--json"])).expect("json");
    let memory = &shown["facts"]["memory.thinker"]["value"];
    assert_eq!(memory.as_array().map(Vec::len), Some(2), "{memory}");
    assert_eq!(memory[0]["summary"], "second");
    assert_eq!(memory[1]["summary"], "third");

    // Queries: the CLI and the HTTP API, scoped to tenants.
    let breached = cli(
        &env,
        &[
            "context", "query", "--fact", "sla", "--path", "active", "--equals", "true",
        ],
    );
    assert!(
        breached.contains("web ") && breached.contains("1 resources"),
        "{breached}"
    );
    let dependents = cli(
        &env,
        &[
            "context",
            "query",
            "--related-to",
            "api",
            "--relation",
            "depends_on",
            "--direction",
            "in",
        ],
    );
    assert!(
        dependents.contains("web ") && dependents.contains("1 resources"),
        "{dependents}"
    );
    let human = cli(&env, &["context", "show", "web", "--related", "1"]);
    assert!(
        human.contains("-> depends_on api") && human.contains("-> depends_on db"),
        "{human}"
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: &str, token: &str| {
        client
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
    };
    let r = get("/v1/context/web?related=2", VIEWER)
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["related"]["depends_on"]["cache"]["depth"], 2, "{v}");
    assert_eq!(
        v["related"]["depends_on"]["cache"]["facts"]["deployment"]["version"], "v3",
        "{v}"
    );
    let r = get("/v1/context/web", OTHER).await.expect("http");
    assert_eq!(r.status(), 404, "a tenant the user does not see");
    // A store failure (here Redis's WRONGTYPE: a string where the resource's hash belongs) is a
    // 503 naming a reference in the log, never Redis's own words.
    let broken = format!(
        "{}:ctx:{}",
        env.prefix,
        switchyard::store::ResourceKey::new("default", "broken").hash_tag()
    );
    let mut conn = redis_connection(stack().1.as_str()).await;
    redis::cmd("SET")
        .arg(&broken)
        .arg("not a hash")
        .query_async::<()>(&mut conn)
        .await
        .expect("set");
    let r = get("/v1/context/broken", VIEWER).await.expect("http");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.expect("body");
    assert!(
        body.contains("reference") && !body.to_lowercase().contains("wrongtype"),
        "{body}"
    );
    let r = get("/v1/context?fact=sla&path=active&equals=true", VIEWER)
        .await
        .expect("http");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["resources"][0]["resource"], "web", "{v}");
    let r = get("/v1/context?fact=deployment", VIEWER)
        .await
        .expect("http");
    assert_eq!(r.status(), 400, "not indexed");
    // After the recovery the index still names web, the fact does not match any more.
    env.publish_one(
        "events.sla-breaches",
        "ok-web",
        "sla.recovered",
        "web",
        json!({"slo": "availability"}),
    )
    .await;
    let mut after = String::new();
    for _ in 0..100 {
        after = cli(
            &env,
            &[
                "context", "query", "--fact", "sla", "--path", "active", "--equals", "true",
            ],
        );
        if after.contains("0 resources") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(after.contains("0 resources"), "{after}");

    // The story of the breach and of a thinker event, from the audit trail.
    let story = cli(&env, &["trace", "b-web"]);
    for needle in [
        "routed to 1 task(s)",
        "sla-responder succeeded",
        "rollback accepted by sla-responder",
        "db ",
    ] {
        assert!(story.contains(needle), "{needle} in {story}");
    }
    let think = cli(&env, &["trace", "k0", "--json"]);
    let lines: Vec<Value> = think
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let decisions: Vec<&str> = lines
        .iter()
        .map(|l| l["decision"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(decisions.first(), Some(&"routed"), "{decisions:?}");
    assert_eq!(
        decisions.iter().filter(|d| **d == "llm_call").count(),
        2,
        "both model calls of the run: {decisions:?}"
    );
    assert!(decisions.contains(&"agent_result"), "{decisions:?}");
    let history = cli(&env, &["history", "web", "--since", "1h"]);
    assert!(
        history.contains("routed to") && history.contains("thinker succeeded"),
        "{history}"
    );
    running.stop().await;
}

/// Learned relations and fact index entries go with their TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_and_index_entries_expire() {
    let env = TestEnv::new(
        1,
        r#"
context:
  ttl_seconds: 8
  index: [sla]
  relations:
    ttl_seconds: 8
    learn:
      - { types: ["deployment.*"], field: data.dependencies, relation: depends_on }
routes:
  - {name: deployments, types: ["deployment.*"], agents: [deploy-guard]}
  - {name: sla, types: [sla.breached], agents: [sla-responder]}
agents:
  deploy-guard:
    kind: builtin
    reads: [sla, deployment, last_completed_deployment]
    writes: [deployment, last_completed_deployment]
    actions: [deployment.hold]
  sla-responder:
    kind: builtin
    reads: [sla, last_completed_deployment, deployment]
    writes: [sla, suspect_deployment]
    actions: [rollback, page]
"#,
    )
    .await;
    let running = env.start(&["route", "agents"]);
    env.publish(
        "events.deployments",
        &[deployment("d-x", "x", "v2", "v1", &["y"])],
    )
    .await;
    env.publish_one(
        "events.sla-breaches",
        "b-x",
        "sla.breached",
        "x",
        json!({"slo": "latency"}),
    )
    .await;
    env.read("switchyard.results", 2, Duration::from_secs(60))
        .await;
    let q = |env: &TestEnv| cli(env, &["context", "query", "--fact", "sla"]);
    assert!(q(&env).contains("1 resources"));
    let shown: Value =
        serde_json::from_str(&cli(&env, &["context", "show", "x", "--json"])).expect("json");
    assert_eq!(shown["relations"][0]["resource"], "y", "{shown}");
    let back: Value =
        serde_json::from_str(&cli(&env, &["context", "show", "y", "--json"])).expect("json");
    assert_eq!(back["relations"][0]["direction"], "in", "{back}");
    tokio::time::sleep(Duration::from_millis(8500)).await;
    // The next write of the fact lets go of index entries whose fact expired (before any query
    // does): the index holds the resources that have the fact, not every one that ever had it.
    env.publish_one(
        "events.sla-breaches",
        "b-z",
        "sla.breached",
        "z",
        json!({"slo": "latency"}),
    )
    .await;
    env.read("switchyard.results", 3, Duration::from_secs(60))
        .await;
    let c = &env.loaded.config;
    let mut r = redis_connection(c.redis.url.as_str()).await;
    let mut indexed: Vec<String> = Vec::new();
    for _ in 0..50 {
        indexed = redis::cmd("ZRANGE")
            .arg(format!(
                "{}:idx:{}:sla",
                c.redis.key_prefix,
                switchyard::store::ResourceKey::new("default", "").hash_tag()
            ))
            .arg(0)
            .arg(-1)
            .query_async(&mut r)
            .await
            .expect("zrange");
        if indexed == ["z"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(indexed, ["z"], "the expired entry left with the next write");
    assert!(q(&env).contains("1 resources"), "the new one is found");
    tokio::time::sleep(Duration::from_millis(8500)).await;
    assert!(
        q(&env).contains("0 resources"),
        "expired facts are not found"
    );
    let shown: Value =
        serde_json::from_str(&cli(&env, &["context", "show", "x", "--json"])).expect("json");
    assert_eq!(shown["relations"], json!([]), "{shown}");
    running.stop().await;
}

/// An older event (a backfill, a lagging input) stating a relation does not shorten it: a stamp
/// is replaced only by one expiring later, and an event whose relation expired already writes
/// nothing. A resource whose events keep naming new targets that nobody reads does not grow
/// without bound: expired edges are swept by later writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_relations_keep_their_latest_stamp_and_expired_ones_are_swept() {
    use switchyard::context::graph::{Graph, LearnRule, RelationsConfig};
    let (_, redis_url) = stack().clone();
    let prefix = suffix();
    let conn = switchyard::store::RedisConn::new(&redis_url).expect("redis");
    let cfg = |ttl: u64| RelationsConfig {
        learn: vec![LearnRule {
            types: vec!["deployment.*".into()],
            field: "data.dependencies".into(),
            relation: "depends_on".into(),
            targets: vec![],
        }],
        ttl_seconds: ttl,
        ..Default::default()
    };
    let ev = |id: &str, target: &str| {
        event(
            id,
            "deployment.completed",
            "svc-g",
            json!({"dependencies": [target]}),
        )
    };
    let mut r = redis_connection(&redis_url).await;
    let key = |res: &str| {
        format!(
            "{prefix}:rel:{}",
            switchyard::store::ResourceKey::new("default", res).hash_tag()
        )
    };
    let stamp_at = |m: &std::collections::HashMap<String, String>, f: &str| {
        m.get(f)
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .and_then(|v| v["at"].as_i64())
    };
    let now = chrono::Utc::now().timestamp();
    let g = Graph::new(conn.clone(), &prefix, cfg(3600));
    assert_eq!(g.learn(&ev("new", "db"), now).await.expect("learn"), 1);
    // A backfilled event from half an hour ago states the same relation: the stamp stays.
    g.learn(&ev("old", "db"), now - 1800).await.expect("learn");
    // One from two hours ago: expired already, nothing written.
    assert_eq!(
        g.learn(&ev("older", "db2"), now - 7200)
            .await
            .expect("learn"),
        0
    );
    let m: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key("svc-g"))
        .query_async(&mut r)
        .await
        .expect("hgetall");
    assert_eq!(stamp_at(&m, "out|depends_on|db"), Some(now), "{m:?}");
    assert!(!m.contains_key("out|depends_on|db2"), "{m:?}");
    let back: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key("db"))
        .query_async(&mut r)
        .await
        .expect("hgetall");
    assert_eq!(
        stamp_at(&back, "in|depends_on|svc-g"),
        Some(now),
        "{back:?}"
    );

    // A short TTL (16 s: swept at most once a second): an edge that expired is dropped by a later
    // write that states another one, with nobody reading the resource.
    let short = Graph::new(conn, &prefix, cfg(16));
    short
        .learn(&ev("a", "target-a"), now - 14)
        .await
        .expect("learn");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let later = chrono::Utc::now().timestamp();
    short
        .learn(&ev("b", "target-b"), later)
        .await
        .expect("learn");
    let m: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key("svc-g"))
        .query_async(&mut r)
        .await
        .expect("hgetall");
    assert!(!m.contains_key("out|depends_on|target-a"), "swept: {m:?}");
    assert!(m.contains_key("out|depends_on|target-b"), "{m:?}");
}
