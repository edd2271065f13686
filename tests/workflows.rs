//! Workflows end to end through the real broker and Redis: sequential steps that see each other's
//! findings, `when:` skips, parallel branches joined once by declarative and agent merges, the
//! failure policies, and a join that fires once while a process is SIGKILLed during the branches.
//! The agents are HTTP agents of this test whose behaviour depends on their name.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};

use common::*;
use switchyard::records::ProposalData;

/// Calls per agent name, and the bodies each got.
#[derive(Default)]
struct Agents {
    calls: Mutex<BTreeMap<String, Vec<Value>>>,
}

async fn agent(State(st): State<Arc<Agents>>, Json(req): Json<Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let name = req["agent"].as_str().unwrap_or_default().to_string();
    st.calls
        .lock()
        .expect("lock")
        .entry(name.clone())
        .or_default()
        .push(req.clone());
    let inputs = &req["task"]["step"]["inputs"];
    match name.as_str() {
        "writer" => Json(json!({"findings": [{"key": "wf.a", "value": 1}]})).into_response(),
        "reader" => Json(json!({"proposals": [{"action": "page", "parameters": {
            "saw": req["context"]["facts"]["wf.a"], "a_status": inputs["a"]["status"]}}]}))
        .into_response(),
        "pager" => Json(json!({"proposals": [{"action": "page", "parameters": {"team": "pay"}}]})).into_response(),
        "pager-scaler" => Json(json!({"proposals": [{"action": "page", "parameters": {"team": "pay"}},
                                                    {"action": "scale_up", "parameters": {"n": 1}}]}))
        .into_response(),
        "merger" => {
            let seen: Vec<String> = inputs
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let n: usize = inputs
                .as_object()
                .map(|m| m.values().map(|v| v["proposals"].as_array().map_or(0, Vec::len)).sum())
                .unwrap_or(0);
            Json(json!({"proposals": [{"action": "restart", "parameters": {"branches": seen, "proposals_seen": n}}]}))
                .into_response()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Json(json!({"findings": [{"key": "wf.slow", "value": req["task"]["step"]["step"]}]})).into_response()
        }
        "failer" | "flaky" => (axum::http::StatusCode::UNPROCESSABLE_ENTITY, "cannot").into_response(),
        "good" => Json(json!({"proposals": [{"action": "page", "parameters": {"team": "pay"}}]})).into_response(),
        "fixer" => Json(json!({"proposals": [{"action": "rollback", "parameters": {}, "priority": 100}]})).into_response(),
        // A supervisor: delegates twice (once to an agent it may not use), then concludes
        // (its delegation in the third round is over max_rounds).
        "boss" => {
            let round = req["task"]["step"]["round"].as_u64().unwrap_or(0);
            let seen: Vec<String> = inputs["delegated"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let (delegate, action) = match round {
                0 => (json!([{"agent": "writer", "instructions": "find the cause"},
                             {"agent": "pager", "instructions": "page the team"},
                             {"agent": "failer", "instructions": "not allowed"}]), "restart"),
                1 => (json!([{"agent": "writer", "instructions": "look again"}]), "restart"),
                _ => (json!([{"agent": "writer", "instructions": "one more"}]), "scale_up"),
            };
            Json(json!({"delegate": delegate,
                        "proposals": [{"action": action, "parameters": {"round": round, "saw": seen}}]}))
            .into_response()
        }
        _ => Json(json!({})).into_response(),
    }
}

async fn serve() -> (String, Arc<Agents>) {
    let st = Arc::new(Agents::default());
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

fn agents_yaml(url: &str) -> String {
    let mut y = String::from("agents:\n");
    for name in [
        "writer",
        "reader",
        "pager",
        "pager-scaler",
        "merger",
        "slow",
        "failer",
        "quiet",
        "boss",
    ] {
        y.push_str(&format!(
            "  {name}:\n    kind: http\n    url: {url}\n    reads: [\"*\"]\n    writes: [\"wf.*\"]\n    actions: [page, scale_up, restart]\n    retries: 0\n    timeout_ms: 10000\n"
        ));
    }
    y
}

/// The lifecycle records of a run, oldest first, as `kind` or `kind:step`.
fn timeline(recs: &[switchyard::kafka::Input], run: &str) -> Vec<String> {
    recs.iter()
        .map(|r| data_of(&event_of(r)).clone())
        .filter(|d| d["run_id"] == run)
        .map(|d| match d["step"].as_str() {
            Some(s) => format!("{}:{s}", d["kind"].as_str().unwrap_or("")),
            None => d["kind"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

fn run_of(recs: &[switchyard::kafka::Input], workflow: &str) -> String {
    recs.iter()
        .map(|r| data_of(&event_of(r)).clone())
        .find(|d| d["workflow"] == workflow)
        .and_then(|d| d["run_id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no run of {workflow}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_parallel_merged_and_failing_workflows() {
    let (url, agents) = serve().await;
    let env = TestEnv::new(
        2,
        &format!(
            r#"
routes:
  - {{name: seq, types: [t.seq], workflows: [seq]}}
  - {{name: par, types: [t.par], workflows: [par]}}
  - {{name: soft, types: [t.soft], workflows: [soft]}}
  - {{name: hard, types: [t.hard], workflows: [hard]}}
  - {{name: late, types: [t.late], workflows: [late]}}
  - {{name: sup, types: [t.sup], workflows: [sup]}}
  - {{name: tmo, types: [t.tmo], workflows: [tmo]}}
  - {{name: gone, types: [t.gone], workflows: [gone]}}
workflows:
  gone:
    steps:
      v1: {{agent: vanishing, on_failure: continue}}
      v2: {{agent: writer, after: [v1], when: [{{step: v1, status: [failed]}}]}}
  tmo:
    steps:
      t1: {{agent: slow, timeout_seconds: 1, on_failure: continue}}
      t2: {{agent: writer, after: [t1], when: [{{step: t1, status: [failed]}}]}}
  seq:
    steps:
      a: {{agent: writer}}
      b: {{agent: reader, after: [a]}}
      c: {{agent: quiet, after: [b], when: [{{step: a, finding: wf.a, equals: 2}}]}}
  par:
    steps:
      x: {{agent: pager}}
      y: {{agent: pager-scaler}}
      both: {{merge: union, after: [x, y]}}
      review: {{agent: merger, merge: agent, after: [x, y]}}
  soft:
    steps:
      f1: {{agent: failer, on_failure: fallback, fallback: writer}}
      f2: {{agent: failer, after: [f1], on_failure: continue}}
      f3: {{agent: reader, after: [f2], when: [{{step: f2, status: [failed]}}]}}
  hard:
    steps:
      h1: {{agent: failer}}
      h2: {{agent: writer, after: [h1]}}
  late:
    deadline_seconds: 2
    steps:
      l1: {{agent: slow}}
      l2: {{agent: slow, after: [l1]}}
      l3: {{agent: slow, after: [l2]}}
      l4: {{agent: slow, after: [l3]}}
      l5: {{agent: slow, after: [l4]}}
      l6: {{agent: slow, after: [l5]}}
      l7: {{agent: slow, after: [l6]}}
  sup:
    steps:
      boss: {{agent: boss, supervise: {{agents: [writer, pager], max_rounds: 2, max_delegations: 3}}}}
{agents}  vanishing:
    kind: http
    url: {url}
    reads: ["*"]
    writes: ["wf.*"]
"#,
            agents = agents_yaml(&url)
        ),
    )
    .await;
    // The agents stage runs a config without `vanishing` (it left the config after the route
    // started a run that uses it).
    let running = env.start(&["route"]);
    let mut without = env.loaded.clone();
    without.config.agents.remove("vanishing");
    let agents_running = Running::start(without, &["agents"]);
    for (i, ty) in [
        "t.seq", "t.par", "t.soft", "t.hard", "t.late", "t.sup", "t.tmo", "t.gone",
    ]
    .iter()
    .enumerate()
    {
        env.publish_one(
            "events.deployments",
            &format!("w{i}"),
            ty,
            &format!("svc-{i}"),
            json!({}),
        )
        .await;
    }
    // seq 7, par 2+2+2+2+1+1 = 10, soft 1+2+2+2+2+1 ≈ 10, hard 1+2+2 = 5 records at least.
    let recs = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.workflows"),
        Duration::from_secs(60),
        |got| {
            got.iter()
                .filter_map(|r| {
                    let ev = event_of(r);
                    let d = data_of(&ev);
                    let k = &d["kind"];
                    (k == "workflow.completed"
                        || k == "workflow.failed"
                        || k == "workflow.timed_out")
                        .then(|| d["run_id"].as_str().unwrap_or("").to_string())
                })
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= 8
        },
    )
    .await;
    // gone: the step whose agent is not in the config fails (its task dead-lettered) and the
    // run goes on, instead of waiting for ever.
    let gone = run_of(&recs, "gone");
    assert_eq!(
        timeline(&recs, &gone),
        [
            "workflow.started",
            "step.started:v1",
            "step.failed:v1",
            "step.started:v2",
            "step.completed:v2",
            "workflow.completed"
        ]
    );

    let seq = run_of(&recs, "seq");
    assert_eq!(
        timeline(&recs, &seq),
        [
            "workflow.started",
            "step.started:a",
            "step.completed:a",
            "step.started:b",
            "step.completed:b",
            "step.skipped:c",
            "workflow.completed"
        ]
    );
    let calls = agents.calls.lock().expect("lock").clone();
    let reader = &calls["reader"][0];
    assert_eq!(
        reader["task"]["step"]["inputs"]["a"]["findings"][0]["key"], "wf.a",
        "b gets a's result"
    );
    assert_eq!(
        reader["context"]["facts"]["wf.a"], 1,
        "b sees a's finding in the shared context"
    );
    assert!(!calls.contains_key("quiet"), "c was skipped");

    // par: the branches run, their proposals are held; the union merge proposes page once and
    // scale_up once; the agent merge saw both branches; the join fired once each.
    let par = run_of(&recs, "par");
    let t = timeline(&recs, &par);
    assert_eq!(
        t.iter().filter(|k| *k == "step.started:review").count(),
        1,
        "{t:?}"
    );
    assert_eq!(
        t.iter().filter(|k| *k == "step.completed:both").count(),
        1,
        "{t:?}"
    );
    assert_eq!(t.last().map(String::as_str), Some("workflow.completed"));
    assert_eq!(calls["merger"].len(), 1);
    let props: Vec<ProposalData> = env
        .read("switchyard.proposals", 6, Duration::from_secs(10))
        .await
        .iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).expect("proposal"))
        .filter(|p: &ProposalData| p.resource == "svc-1")
        .collect();
    let mut actions: Vec<&str> = props.iter().map(|p| p.action.as_str()).collect();
    actions.sort();
    assert_eq!(
        actions,
        ["page", "restart", "scale_up"],
        "branch proposals held, merged once"
    );
    let restart = props
        .iter()
        .find(|p| p.action == "restart")
        .expect("restart");
    assert_eq!(restart.parameters["branches"], json!(["x", "y"]));
    assert_eq!(restart.parameters["proposals_seen"], 3);

    // soft: f1 fails, its fallback (writer) runs it; f2 fails and the run goes on; f3 runs
    // because f2 failed; the run completes with failures.
    let soft = run_of(&recs, "soft");
    let t = timeline(&recs, &soft);
    for k in [
        "step.failed:f1",
        "step.completed:f1",
        "step.failed:f2",
        "step.completed:f3",
    ] {
        assert!(t.contains(&k.to_string()), "{k} in {t:?}");
    }
    let last = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .rfind(|d| d["run_id"] == soft.as_str() && d["kind"] == "workflow.completed")
        .expect("soft completed");
    assert_eq!(last["status"], "completed_with_failures");
    // hard: h1 fails, the run fails, h2 never starts.
    let hard = run_of(&recs, "hard");
    assert_eq!(
        timeline(&recs, &hard),
        [
            "workflow.started",
            "step.started:h1",
            "step.failed:h1",
            "workflow.failed"
        ]
    );

    // late: seven 1.5 s steps against a 2 s deadline: the sweeper ends the run; no step starts
    // after it.
    let late = run_of(&recs, "late");
    let t = timeline(&recs, &late);
    let end = t
        .iter()
        .position(|k| k == "workflow.timed_out")
        .expect("timed out");
    assert!(
        !t[end..].iter().any(|k| k.starts_with("step.started")),
        "{t:?}"
    );
    assert!(!t.iter().any(|k| k == "step.started:l7"), "{t:?}");
    // Its record written, it left the deadline sweeper's list.
    let mut redis = redis_connection(stack().1.as_str()).await;
    let mut still: Option<f64> = Some(0.0);
    for _ in 0..40 {
        still = redis::cmd("ZSCORE")
            .arg(format!("{}:wf:deadlines", env.prefix))
            .arg(&late)
            .query_async(&mut redis)
            .await
            .expect("zscore");
        if still.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(still, None, "the timed-out run is no longer listed");

    // A step past its timeout_seconds (1 s against a 1.5 s agent) is timed out; on_failure applies.
    let tmo = run_of(&recs, "tmo");
    assert_eq!(
        timeline(&recs, &tmo),
        [
            "workflow.started",
            "step.started:t1",
            "step.failed:t1",
            "step.started:t2",
            "step.completed:t2",
            "workflow.completed"
        ]
    );
    let t1 = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .find(|d| d["run_id"] == tmo.as_str() && d["kind"] == "step.failed")
        .expect("t1 failed");
    assert_eq!(t1["status"], "timed_out", "{t1}");

    // sup: the supervisor delegates to writer and pager (failer refused), is called again with
    // their results, delegates once more (the third delegation), and concludes in round 2 (its
    // delegation there is over max_rounds); only its final proposal goes to resolve.
    let sup = run_of(&recs, "sup");
    let t = timeline(&recs, &sup);
    assert_eq!(
        t.iter().filter(|k| *k == "step.delegated:boss").count(),
        2,
        "{t:?}"
    );
    assert_eq!(
        t.iter().filter(|k| *k == "delegation.refused:boss").count(),
        2,
        "{t:?}"
    );
    assert_eq!(
        t.last().map(String::as_str),
        Some("workflow.completed"),
        "{t:?}"
    );
    let calls = agents.calls.lock().expect("lock").clone();
    let in_run = |agent: &str| {
        calls
            .get(agent)
            .map(|c| {
                c.iter()
                    .filter(|x| x["task"]["step"]["run_id"] == sup.as_str())
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        (
            in_run("boss"),
            in_run("writer"),
            in_run("pager"),
            in_run("failer")
        ),
        (3, 2, 1, 0)
    );
    let last_boss = calls["boss"]
        .iter()
        .rfind(|x| x["task"]["step"]["run_id"] == sup.as_str())
        .expect("boss");
    assert_eq!(
        last_boss["task"]["step"]["inputs"]["delegated"]
            .as_object()
            .map(|m| m.len()),
        Some(1)
    );
    let sup_props: Vec<String> = env
        .read("switchyard.proposals", 20, Duration::from_secs(3))
        .await
        .iter()
        .map(|r| {
            serde_json::from_value::<ProposalData>(data_of(&event_of(r)).clone()).expect("proposal")
        })
        .filter(|p| p.resource == "svc-5")
        .map(|p| format!("{}:{}", p.action, p.parameters["round"]))
        .collect();
    assert_eq!(
        sup_props,
        ["scale_up:2"],
        "only the supervisor's final proposal"
    );

    // The CLI prints a run's timeline from Redis.
    let out = std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "workflows",
            "show",
            &par,
        ])
        .env("SWITCHYARD_REDIS_URL", &stack().1)
        .output()
        .expect("workflows show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "workflow par",
        "completed",
        "review",
        "merger",
        "(merge)",
        "both",
        "cost 0.000000",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    let out = std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "workflows",
            "list",
        ])
        .env("SWITCHYARD_REDIS_URL", &stack().1)
        .output()
        .expect("workflows list");
    assert!(String::from_utf8_lossy(&out.stdout).contains("8 runs"));
    // The story of the par event: its branches' proposals are held for the merge.
    let story = cli(&env, &["trace", "w1"]);
    assert!(
        story.contains("pager-scaler succeeded") && story.contains("+2 handed to the workflow run"),
        "{story}"
    );
    let v = env.verified_audit(10, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    agents_running.stop().await;
    running.stop().await;
}

/// Two `switchyard run` processes share the work of 8 runs of a four-branch workflow; one is
/// SIGKILLed while the branches run. Every run completes, and each join (an agent merge) runs
/// exactly once: the survivor redelivers the dead one's branches, and their completions, racing or
/// repeated, start the join once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_fires_once_when_an_instance_is_killed_during_the_branches() {
    let (url, agents) = serve().await;
    let env = TestEnv::new(
        4,
        &format!(
            r#"
routes:
  - {{name: wide, types: [t.wide], workflows: [wide]}}
workflows:
  wide:
    steps:
      b1: {{agent: slow}}
      b2: {{agent: slow}}
      b3: {{agent: slow}}
      b4: {{agent: slow}}
      join: {{agent: merger, merge: agent, after: [b1, b2, b3, b4]}}
{agents}
"#,
            agents = agents_yaml(&url)
        ),
    )
    .await;
    let spawn = || spawn_run(&env.config_path, "route,agents");
    let mut procs = vec![spawn(), spawn()];
    // Both in the groups before the events come.
    tokio::time::sleep(Duration::from_secs(8)).await;
    const RUNS: usize = 8;
    for i in 0..RUNS {
        env.publish_one(
            "events.deployments",
            &format!("k{i}"),
            "t.wide",
            &format!("res-{i}"),
            json!({}),
        )
        .await;
    }
    // Kill one once branches are running.
    for _ in 0..100 {
        if agents
            .calls
            .lock()
            .expect("lock")
            .get("slow")
            .map_or(0, Vec::len)
            >= 4
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut victim = procs.remove(0);
    victim.0.kill().expect("SIGKILL");
    let _ = victim.0.wait();

    let recs = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.workflows"),
        Duration::from_secs(120),
        |got| {
            got.iter()
                .filter_map(|r| {
                    let ev = event_of(r);
                    let d = data_of(&ev);
                    (d["kind"] == "workflow.completed")
                        .then(|| d["run_id"].as_str().unwrap_or("").to_string())
                })
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= RUNS
        },
    )
    .await;
    let completed: std::collections::BTreeSet<String> = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .filter(|d| d["kind"] == "workflow.completed")
        .map(|d| d["run_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(completed.len(), RUNS, "every run completes");
    let calls = agents.calls.lock().expect("lock").clone();
    let mut joins: BTreeMap<String, usize> = BTreeMap::new();
    for c in &calls["merger"] {
        *joins
            .entry(
                c["task"]["step"]["run_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_default() += 1;
    }
    assert_eq!(joins.len(), RUNS, "{joins:?}");
    assert!(
        joins.values().all(|n| *n == 1),
        "each join ran once: {joins:?}"
    );
    // Each join saw all four branches.
    assert!(calls["merger"]
        .iter()
        .all(|c| c["task"]["step"]["inputs"].as_object().map(|m| m.len()) == Some(4)));
    let slow = calls["slow"].len();
    println!(
        "branch calls: {slow} for {} branches (redelivered after the kill: {})",
        RUNS * 4,
        slow - RUNS * 4
    );
    drop(procs);
}

/// `best_of` routing moves most of 200 tasks to the better of two agents (by the scorecards every
/// instance shares, one flush a second) and keeps exploring the other; a workflow step's `select`
/// picks too; the scorecards count outcomes, latency, cost and the fate of proposals (accepted by
/// resolve, and undone by a superseding rollback); a supervisor's delegations are checked against
/// `governance.access` and the refused one is recorded and audited with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_learns_the_better_agent_and_delegation_is_governed() {
    let (url, agents) = serve().await;
    let mut yaml = String::from("agents:\n");
    for (name, actions) in [
        ("good", "[page]"),
        ("flaky", "[page]"),
        ("fixer", "[rollback]"),
        ("boss", "[page, scale_up, restart]"),
        ("writer", "[page]"),
        ("pager", "[page]"),
    ] {
        yaml.push_str(&format!(
            "  {name}:\n    kind: http\n    url: {url}\n    reads: [\"*\"]\n    writes: [\"wf.*\"]\n    actions: {actions}\n    retries: 0\n    timeout_ms: 10000\n    cost_per_call: 0.01\n    max_concurrency: 16\n"
        ));
    }
    let env = TestEnv::new(
        2,
        &format!(
            r#"
routes:
  - {{name: pick, types: [t.pick], select: {{best_of: [good, flaky], explore: 0.1}}}}
  - {{name: fix, types: [t.fix], agents: [fixer]}}
  - {{name: stepwise, types: [t.step], workflows: [stepwise]}}
  - {{name: gov, types: [t.gov], workflows: [gov]}}
workflows:
  stepwise:
    steps:
      s: {{select: {{best_of: [good, flaky]}}}}
  gov:
    steps:
      boss: {{agent: boss, supervise: {{agents: [writer, pager], max_rounds: 1}}}}
resolve:
  actions:
    page: {{priority: 10}}
    rollback: {{priority: 100, conflicts_with: [page]}}
governance:
  access:
    - {{agents: [good, flaky], actions: [page]}}
    - {{agents: [fixer], actions: [rollback]}}
    - {{agents: [boss], actions: ["delegate:writer"]}}
{yaml}
"#
        ),
    )
    .await;
    let running = env.start(&["route", "agents", "resolve"]);
    let calls = |name: &str| {
        agents
            .calls
            .lock()
            .expect("lock")
            .get(name)
            .map_or(0, Vec::len)
    };
    // Four waves of 50 events on distinct resources; after each, time for the scorecards to be
    // flushed (1 s) and read back (1 s).
    for wave in 0..4 {
        let events: Vec<_> = (0..50)
            .map(|i| {
                let n = wave * 50 + i;
                event(&format!("p{n}"), "t.pick", &format!("svc-{n}"), json!({}))
            })
            .collect();
        env.publish("events.deployments", &events).await;
        for _ in 0..300 {
            if calls("good") + calls("flaky") >= (wave + 1) * 50 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let (good, flaky) = (calls("good"), calls("flaky"));
    eprintln!("best_of: good {good}, flaky {flaky}");
    assert_eq!(good + flaky, 200, "every task ran once");
    assert!(
        good >= 140,
        "most tasks go to the better agent: good {good}, flaky {flaky}"
    );
    assert!(
        flaky >= 5,
        "the exploration floor keeps measuring the other: {flaky}"
    );

    // A rollback supersedes the page accepted on svc-0 (if good handled it) or svc-n.
    let paged = agents.calls.lock().expect("lock")["good"][0]["task"]["resource"]
        .as_str()
        .expect("resource")
        .to_string();
    env.publish_one("events.deployments", "fix-1", "t.fix", &paged, json!({}))
        .await;
    env.publish_one(
        "events.deployments",
        "step-1",
        "t.step",
        "svc-step",
        json!({}),
    )
    .await;
    env.publish_one("events.deployments", "gov-1", "t.gov", "svc-gov", json!({}))
        .await;
    let recs = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.workflows"),
        Duration::from_secs(60),
        |got| {
            got.iter()
                .filter(|r| data_of(&event_of(r))["kind"] == "workflow.completed")
                .count()
                >= 2
        },
    )
    .await;
    let step_agent = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .find(|d| d["workflow"] == "stepwise" && d["kind"] == "step.started")
        .map(|d| d["agent"].as_str().unwrap_or("").to_string());
    assert!(
        matches!(step_agent.as_deref(), Some("good") | Some("flaky")),
        "{step_agent:?}"
    );
    let completed: Vec<Value> = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .filter(|d| d["kind"] == "step.completed" || d["kind"] == "workflow.completed")
        .collect();
    assert!(
        completed.iter().all(|d| d["cost"].as_f64().is_some()),
        "lifecycle records carry costs: {completed:?}"
    );
    let refused: Vec<Value> = recs
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .filter(|d| d["kind"] == "delegation.refused")
        .collect();
    let why = |agent: &str| {
        refused
            .iter()
            .find(|d| d["agent"] == agent)
            .and_then(|d| d["error"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        why("pager").contains("governance.access"),
        "pager is in supervise.agents but no access rule grants it: {refused:?}"
    );
    assert!(why("failer").contains("supervise.agents"), "{refused:?}");
    assert_eq!(calls("writer"), 1, "the granted delegation ran");
    assert_eq!(calls("pager"), 0, "the refused one did not");
    fn governed(r: &switchyard::kafka::Input) -> bool {
        let d = data_of(&event_of(r)).clone();
        d["decision"] == "workflow_delegation_refused"
            && d["reason"]
                .as_str()
                .unwrap_or("")
                .contains("governance.access")
    }
    let audit = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.audit"),
        Duration::from_secs(30),
        |got| got.iter().any(governed),
    )
    .await;
    assert!(
        audit.iter().any(governed),
        "the refusal is audited with its reason"
    );

    // Scorecards, as every instance and `switchyard status` read them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let conn = switchyard::store::RedisConn::new(&env.loaded.config.redis.url).expect("redis");
    let names: Vec<String> = ["good", "flaky", "fixer"].map(String::from).to_vec();
    let cards = switchyard::agents::stats::scorecards(
        &conn,
        &env.loaded.config.redis.key_prefix,
        &names,
        3600,
    )
    .await
    .expect("scorecards");
    let (g, f, x) = (&cards[0], &cards[1], &cards[2]);
    eprintln!("{g:?}\n{f:?}\n{x:?}");
    assert_eq!(g.succeeded as usize, calls("good"), "{g:?}");
    assert_eq!(f.failed as usize, calls("flaky"), "{f:?}");
    assert!(
        g.accepted >= 100,
        "good's pages were accepted by resolve: {g:?}"
    );
    assert_eq!(
        g.undone, 1,
        "the rollback superseded one accepted page: {g:?}"
    );
    assert_eq!(x.accepted, 1, "{x:?}");
    assert!(
        (g.cost_per_task().unwrap_or(0.0) - 0.01).abs() < 1e-9,
        "{g:?}"
    );
    assert!(g.score() > f.score() + 0.5, "{g:?} {f:?}");
    let status = std::process::Command::new(bin())
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "status",
        ])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    let good_line = text
        .lines()
        .find(|l| l.starts_with("good "))
        .unwrap_or_default();
    assert!(good_line.contains("/1 "), "undone shown: {text}");

    // A task's first pick is kept: events whose picks were pinned before (as a first delivery
    // that crashed before its commit leaves them) go to the pinned agent — here flaky, which the
    // live scores now rarely pick — so a redelivery writes the same task and audit record.
    let mut redis = redis_connection(&env.loaded.config.redis.url).await;
    let pinned: Vec<_> = (0..6)
        .map(|i| {
            event(
                &format!("pin{i}"),
                "t.pick",
                &format!("svc-pin{i}"),
                json!({}),
            )
        })
        .collect();
    for ev in &pinned {
        let task = switchyard::route::task_id(ev, "best_of(good,flaky)");
        let _: () = redis::cmd("SET")
            .arg(format!("{}:pick:{{{task}}}", env.prefix))
            .arg("flaky")
            .arg("EX")
            .arg(600)
            .query_async(&mut redis)
            .await
            .expect("pin");
    }
    let flaky_before = calls("flaky");
    env.publish("events.deployments", &pinned).await;
    for _ in 0..300 {
        if calls("flaky") >= flaky_before + 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        calls("flaky"),
        flaky_before + 6,
        "every pinned task went to its pinned agent (good took {})",
        calls("good")
    );
    running.stop().await;
}

/// The deadline sweeper reads only the runs that are due: a run is listed from its first step
/// completion, timed out once, its record handed out again (the same record) while its writing is
/// not confirmed, and unlisted once it is; a run that ends on its own leaves the list; a run started
/// before the list existed (an upgrade) joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_sweeper_reads_due_runs_and_writes_each_timeout_until_confirmed() {
    use switchyard::workflow::lifecycle_event;
    use switchyard::workflow::runs::Runs;
    let s = suffix();
    let conn = switchyard::store::RedisConn::new(&stack().1).expect("redis url");
    let runs = Runs::new(conn, &s);
    let specs: BTreeMap<String, switchyard::workflow::WorkflowSpec> = serde_yaml::from_str(
        "slow: {deadline_seconds: 60, steps: {a: {agent: x}, a2: {agent: x}, b: {agent: x, after: [a]}}}\n",
    )
    .expect("workflows");
    let now = chrono::Utc::now();
    let started = (now - chrono::Duration::seconds(5)).to_rfc3339();
    let spec = &specs["slow"];
    let mut redis = redis_connection(stack().1.as_str()).await;
    let listed = |id: &'static str| {
        let key = format!("{s}:wf:deadlines");
        async move {
            let mut c = redis_connection(stack().1.as_str()).await;
            redis::cmd("ZSCORE")
                .arg(key)
                .arg(id)
                .query_async::<Option<f64>>(&mut c)
                .await
                .expect("zscore")
        }
    };
    // r1 runs on; r2 ends on its own; r3 is "from before the upgrade" (not listed).
    for run in ["r1", "r2", "r3"] {
        advance_run(&runs, spec, &started, run, "a").await;
    }
    let due = listed("r1").await.expect("r1 listed");
    let want = (now - chrono::Duration::seconds(5)).timestamp_millis() as f64 + 60_000.0;
    assert!(
        (due - want).abs() < 1_000.0,
        "scored by its deadline: {due} vs {want}"
    );
    advance_run(&runs, spec, &started, "r2", "a2").await;
    advance_run(&runs, spec, &started, "r2", "b").await;
    assert_eq!(listed("r2").await, None, "an ended run leaves the list");
    let _: () = redis::cmd("ZREM")
        .arg(format!("{s}:wf:deadlines"))
        .arg("r3")
        .query_async(&mut redis)
        .await
        .expect("zrem");

    // Not due yet: nothing.
    let resend = Duration::from_secs(330);
    let sweep = |at: chrono::DateTime<chrono::Utc>| {
        let (runs, specs) = (&runs, &specs);
        async move { runs.expire(specs, at, resend).await.expect("sweep") }
    };
    assert!(sweep(now).await.is_empty());
    // Past the deadline: r1 times out (r3 is not seen: not listed).
    let later = now + chrono::Duration::seconds(61);
    let ended = sweep(later).await;
    let ids: Vec<&str> = ended.iter().map(|t| t.run.run_id.as_str()).collect();
    assert_eq!(ids, ["r1"]);
    assert!(!ended[0].again);
    let first = lifecycle_event(&ended[0].run, &ended[0].record);
    assert_eq!(ended[0].record.kind, "workflow.timed_out");
    assert_eq!(
        runs.get("r1").await.expect("get").expect("r1").status,
        "timed_out"
    );
    // A step finishing after the timeout changes the run, not its timeout record.
    advance_run(&runs, spec, &started, "r1", "a2").await;
    // Its record not confirmed: not again at once (its writer may still be waiting for the
    // broker), but once a write would have been reported failed — the same record, to one of
    // two sweepers at the same moment.
    assert!(sweep(later).await.is_empty());
    let at = later + chrono::Duration::seconds(331);
    let (a, b) = tokio::join!(sweep(at), sweep(at));
    assert_eq!(a.len() + b.len(), 1, "one sweeper claims it");
    let again = a.into_iter().chain(b).next().expect("handed out again");
    assert!(again.again);
    let second = lifecycle_event(&again.run, &again.record);
    assert_eq!(
        serde_json::to_value(&first).expect("json"),
        serde_json::to_value(&second).expect("json"),
        "written again, the same record"
    );
    runs.timed_out_written("r1").await.expect("confirm");
    assert_eq!(listed("r1").await, None);
    assert!(sweep(at + chrono::Duration::seconds(3600)).await.is_empty());

    // The run from before the list: a starting sweeper lists it, and it times out.
    assert_eq!(runs.list_deadlines(&specs, later).await.expect("list"), 1);
    assert_eq!(
        runs.list_deadlines(&specs, later).await.expect("list"),
        0,
        "once"
    );
    let ended = sweep(later).await;
    assert_eq!(
        ended
            .iter()
            .map(|t| t.run.run_id.as_str())
            .collect::<Vec<_>>(),
        ["r3"]
    );

    // A run whose listings were not written after its first completion's compare-and-set (Redis
    // failed in between): the completion delivered again writes them.
    advance_run(&runs, spec, &started, "r4", "a").await;
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(format!("{s}:wf:where:r4"))
        .cmd("ZREM")
        .arg(format!("{s}:wf:deadlines"))
        .arg("r4")
        .query_async(&mut redis)
        .await
        .expect("forget");
    advance_run(&runs, spec, &started, "r4", "a").await;
    assert!(listed("r4").await.is_some(), "listed again");
    assert_eq!(
        runs.get("r4").await.expect("get").map(|r| r.run_id),
        Some("r4".to_string()),
        "found again"
    );
    // Its `where` written but not its deadline entry: the same.
    let _: () = redis::cmd("ZREM")
        .arg(format!("{s}:wf:deadlines"))
        .arg("r4")
        .query_async(&mut redis)
        .await
        .expect("zrem");
    advance_run(&runs, spec, &started, "r4", "a").await;
    assert_eq!(
        listed("r4").await,
        Some(due),
        "listed by its deadline again"
    );
}

/// Step `step` of run `run` (workflow `slow`, started at `started`) finished: the run moves on.
async fn advance_run(
    runs: &switchyard::workflow::runs::Runs,
    spec: &switchyard::workflow::WorkflowSpec,
    started: &str,
    run: &str,
    step: &str,
) {
    use switchyard::workflow::{Finished, FirstChoice, RunState, StepRef};
    let r = StepRef {
        run_id: run.into(),
        workflow: "slow".into(),
        step: step.into(),
        attempt: 1,
        hold: false,
        inputs: json!({}),
        run_started_at: started.into(),
        round: 0,
        delegates: vec![],
    };
    let meta = RunState {
        run_id: run.into(),
        workflow: "slow".into(),
        resource: format!("res-{run}"),
        tenant: "default".into(),
        event_id: "e".into(),
        started_at: started.into(),
        ..Default::default()
    };
    let f = Finished {
        step: &r,
        agent: "x",
        task_id: &format!("{run}-{step}"),
        status: "succeeded",
        findings: &[],
        proposals: &[],
        delegate: &[],
        error: None,
        duration_ms: 1,
        cost: 0.0,
        at: started,
        choose: &FirstChoice,
    };
    runs.advance(spec, &meta, &f).await.expect("advance");
}

/// Each agent runs once per event: a `best_of` group draws only among candidates no route names
/// directly and no earlier group drew, and a group with none left makes no task (one agent ran
/// twice, under two task ids: two model calls, two sets of proposals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_best_of_group_never_picks_an_agent_that_runs_already() {
    let mut yaml = String::from("agents:\n");
    for name in ["good", "flaky", "other"] {
        yaml.push_str(&format!(
            "  {name}:\n    kind: http\n    url: http://127.0.0.1:9/unused\n    actions: [page]\n"
        ));
    }
    let env = TestEnv::new(
        1,
        &format!(
            r#"
routes:
  - {{name: direct, types: [t.dup], agents: [good]}}
  - {{name: grp, types: [t.dup], select: {{best_of: [good, flaky], explore: 0}}}}
  - {{name: only-good, types: [t.dup], select: {{best_of: [good]}}}}
  - {{name: grp3, types: [t.dup], select: {{best_of: [flaky, other], explore: 0}}}}
{yaml}
"#
        ),
    )
    .await;
    let running = env.start(&["route"]);
    env.publish_one("events.deployments", "e1", "t.dup", "svc-dup", json!({}))
        .await;
    env.read("switchyard.tasks", 3, Duration::from_secs(20))
        .await;
    let tasks = env
        .read("switchyard.tasks", 10, Duration::from_secs(2))
        .await;
    running.stop().await;
    let mut agents: Vec<String> = tasks.iter().map(|r| task_of(r).agent).collect();
    agents.sort();
    assert_eq!(agents, ["flaky", "good", "other"], "each agent once");
}
