//! LLM agents (`kind: llm`) end to end: the real broker and Redis, the model stand-in llmock (the
//! OpenAI protocol; replies scripted per model name), an MCP server on the official `mcp` SDK, and
//! an HTTP tool server. The model works only through tools; its findings and proposals pass the
//! agent's scopes, resolve and governance like any agent's; a mutating tool runs only once accepted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as AxPath, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Value};

use common::*;
use switchyard::records::{ActionData, ApprovalData, AuditData, ResultData};

/// A model's scripted reply that calls tools: `(name, arguments)` pairs.
fn calls(model: &str, tools: &[(&str, Value)]) -> Value {
    json!({"type": "reply", "match": {"model": model},
           "tool_calls": tools.iter().map(|(n, a)| json!({"name": n, "arguments": a})).collect::<Vec<_>>()})
}

fn text(model: &str, t: &str) -> Value {
    json!({"type": "reply", "match": {"model": model}, "text": t})
}

fn audit_of(recs: &[switchyard::kafka::Input]) -> Vec<AuditData> {
    recs.iter()
        .filter_map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).ok())
        .collect()
}

fn results_of(recs: &[switchyard::kafka::Input]) -> Vec<ResultData> {
    recs.iter()
        .filter_map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).ok())
        .collect()
}

/// Tool messages (`role: tool`) of a request body, their contents joined.
fn tool_results(body: &Value) -> String {
    body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "tool")
                .map(|m| m["content"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_agent_reads_context_writes_findings_and_proposes_through_resolve() {
    let s = suffix();
    let model = format!("a-{s}");
    let dir = tempfile::tempdir().expect("tempdir");
    let mcp_calls = dir.path().join("mcp.jsonl");
    let (_mcp, mcp_port) = start_mcp(&mcp_calls);
    let env = TestEnv::new(
        2,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    analyst: {{candidates: [{{provider: mock, model: "{model}"}}]}}
  prices:
    "{model}": {{input: 1.0, output: 2.0}}
tools:
  ops: {{kind: mcp, url: "http://127.0.0.1:{mcp_port}/mcp", inject: {{tenant: tenant}}}}
routes:
  - {{name: deployments, types: ["deployment.*"], agents: [deploy-guard]}}
  - {{name: sla, types: [sla.breached], agents: [incident-analyst]}}
agents:
  deploy-guard:
    kind: builtin
    reads: [sla, deployment, last_completed_deployment]
    writes: [deployment, last_completed_deployment]
    actions: [deployment.hold]
  incident-analyst:
    kind: llm
    model: analyst
    system: "You are the incident analyst of {{{{ task.tenant }}}}."
    prompt: "SLA breach on {{{{ task.resource }}}}: {{{{ event.data | tojson }}}}"
    reads: [deployment, sla, recent_events]
    writes: [incident.summary]
    actions: [page]
    tools: ["ops__*"]
    retries: 0
"#,
            llm = llm_base()
        ),
    )
    .await;
    scenario(json!([
        calls(
            &model,
            &[
                (
                    "read_context",
                    json!({"keys": ["deployment", "secrets.db"]})
                ),
                (
                    "write_finding",
                    json!({"key": "incident.summary", "value": "v42 broke checkout"})
                ),
                (
                    "write_finding",
                    json!({"key": "deployment", "value": "overwritten"})
                ),
                ("ops__service_status", json!({"service": "checkout"})),
            ]
        ),
        calls(
            &model,
            &[
                (
                    "propose_action",
                    json!({"action": "page", "parameters": {"team": "team-pay"}, "priority": 4294967396u64,
                                      "impact": "low", "reason": "availability breach after v42"})
                ),
                (
                    "propose_action",
                    json!({"action": "drop_database", "reason": "why not"})
                ),
                (
                    "propose_action",
                    json!({"action": "tool.ops__restart_pods",
                           "parameters": {"service": "checkout", "tenant": "globex"}})
                ),
            ]
        ),
        text(&model, "Paged team-pay; deployment v42 is the suspect."),
    ]))
    .await;
    let running = env.start(&["route", "agents", "resolve"]);
    env.deployment_then_breach("checkout", 0).await;

    // The accepted proposal became an action; the undeclared one did not.
    let actions = env
        .read("switchyard.actions", 1, Duration::from_secs(40))
        .await;
    let a: ActionData =
        serde_json::from_value(data_of(&event_of(&actions[0])).clone()).expect("action");
    assert_eq!(a.action, "page");
    assert_eq!(a.parameters["team"], "team-pay");
    // The model asked for impact low and a priority past i32 (2^32 + 100, which a cast wraps to
    // 100): the agent's floor (`min_impact`, medium by default) and ceiling (`max_priority`, 0).
    assert_eq!(a.impact, switchyard::records::Impact::Medium, "{a:?}");
    assert_eq!(a.priority, 0, "{a:?}");
    assert_eq!(a.agents, json!(["incident-analyst"]));

    let results = results_of(
        &env.read("switchyard.results", 2, Duration::from_secs(10))
            .await,
    );
    let r = results
        .iter()
        .find(|r| r.agent == "incident-analyst")
        .expect("analyst result");
    assert_eq!(r.status, "succeeded", "{r:?}");
    assert_eq!(
        r.findings,
        json!([{"key": "incident.summary", "value": "v42 broke checkout"}])
    );
    assert_eq!(
        r.proposals.as_array().map(Vec::len),
        Some(1),
        "only the declared action is proposed"
    );

    // What the model was sent: the rendered prompt, the tools (the injected parameter hidden),
    // and the tool results: the deployment fact, the refusals, the MCP tool's answer.
    let reqs = llm_requests(&model).await;
    assert_eq!(reqs.len(), 3, "three model calls");
    let first = &reqs[0];
    assert_eq!(
        first["messages"][0]["content"],
        "You are the incident analyst of default."
    );
    assert!(
        first["messages"][1]["content"]
            .as_str()
            .is_some_and(|c| c.contains("SLA breach on checkout") && c.contains("97.0")),
        "{first}"
    );
    let tools: Vec<&Value> = first["tools"].as_array().expect("tools").iter().collect();
    let status = tools
        .iter()
        .find(|t| t["function"]["name"] == "ops__service_status")
        .expect("MCP tool offered");
    assert!(
        status["function"]["parameters"]["properties"]
            .get("tenant")
            .is_none(),
        "injected parameter hidden: {status}"
    );
    assert!(
        tools
            .iter()
            .any(|t| t["function"]["name"] == "ops__restart_pods"),
        "every tool of the server matching ops__*"
    );
    let seen = tool_results(&reqs[1]);
    assert!(
        seen.contains("v42"),
        "read_context returned the deployment fact: {seen}"
    );
    assert!(
        seen.contains("secrets.db") && seen.contains("refused"),
        "the read outside scope is refused: {seen}"
    );
    assert!(
        seen.contains("may not write deployment"),
        "the write outside scope is refused: {seen}"
    );
    assert!(seen.contains("error_rate"), "the MCP tool's answer: {seen}");
    assert!(tool_results(&reqs[2]).contains("may not propose drop_database"));
    assert!(
        tool_results(&reqs[2]).contains("call the tool ops__restart_pods itself"),
        "a tool's call is proposed through the tool, not by naming it"
    );

    // The MCP server got the call with the tenant filled in by switchyard.
    let got = json_lines(&mcp_calls);
    assert_eq!(
        got,
        vec![
            json!({"tool": "service_status", "args": {"service": "checkout", "tenant": "default"}})
        ]
    );

    // Audited: three model calls, seven tool calls, and each refusal; the trail verifies.
    // deploy-guard 1, the analyst's result 1 + refusals 3, model calls 3, tool calls 7, resolve 1.
    let v = env.verified_audit(16, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // Everything on the topic (the count above is a floor: resolve may write more).
    let audit = audit_of(&env.audit(40, Duration::from_secs(4)).await);
    let count = |d: &str| audit.iter().filter(|a| a.decision == d).count();
    assert_eq!(count("llm_call"), 3);
    assert_eq!(count("tool_call"), 7);
    let refused: Vec<(&str, &str)> = audit
        .iter()
        .filter(|a| a.decision == "refused" && a.detail["agent"] == "incident-analyst")
        .map(|a| {
            (
                a.reason.as_deref().unwrap_or(""),
                a.detail["key"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for want in [
        ("scope_read", "secrets.db"),
        ("scope_write", "deployment"),
        ("scope_action", "drop_database"),
    ] {
        assert!(refused.contains(&want), "{want:?} audited: {refused:?}");
    }
    // Each tool call with its arguments and result is on the tool-calls topic, keyed by task.
    let tc = env
        .read("switchyard.tool-calls", 7, Duration::from_secs(20))
        .await;
    assert_eq!(tc.len(), 7);
    let status_call = tc
        .iter()
        .map(|r| data_of(&event_of(r)).clone())
        .find(|d| d["call"]["tool"] == "ops__service_status")
        .expect("the MCP call recorded");
    assert_eq!(status_call["call"]["arguments"]["tenant"], "default");
    assert_eq!(status_call["call"]["result"]["version"], "v42");
    assert_eq!(status_call["task_id"], r.task_id);

    // Metrics: tokens per agent, tool calls per tool and outcome, iterations.
    let m = switchyard::telemetry::METRICS.render();
    assert!(
        m.contains("switchyard_agent_llm_tokens_total{agent=\"incident-analyst\",kind=\"input\"}"),
        "tokens per agent"
    );
    assert!(m.contains("switchyard_tool_calls_total{outcome=\"ok\",tool=\"ops__service_status\"}"));
    assert!(m.contains("switchyard_agent_llm_iterations_count{agent=\"incident-analyst\"}"));
    running.stop().await;
}

/// What the ticket service received: path, headers, body.
type Seen = Arc<Mutex<Vec<(String, HeaderMap, Value)>>>;

async fn ticket_server() -> (u16, Seen) {
    async fn create(
        State(seen): State<Seen>,
        AxPath(service): AxPath<String>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        let mut s = seen.lock().expect("lock");
        s.push((service, headers, body));
        Json(json!({"ticket": format!("T-{}", s.len())}))
    }
    async fn flaky() -> (axum::http::StatusCode, &'static str) {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "metrics store down",
        )
    }
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route("/tickets/{service}", post(create))
        .route("/metrics", get(flaky))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_tools_wait_for_approval_and_run_once_with_the_fencing_token() {
    let s = suffix();
    let model = format!("c-{s}");
    let dir = tempfile::tempdir().expect("tempdir");
    let mcp_calls = dir.path().join("mcp.jsonl");
    let (_mcp, mcp_port) = start_mcp(&mcp_calls);
    let (tickets, seen) = ticket_server().await;
    let env = TestEnv::new(
        2,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}"}}
  aliases:
    advisor: {{candidates: [{{provider: mock, model: "{model}"}}]}}
tools:
  ticket:
    kind: http
    description: Open a ticket for a service's owners.
    method: POST
    url: "http://127.0.0.1:{tickets}/tickets/{{{{ service }}}}"
    headers: {{Authorization: "Bearer tk-{s}"}}
    parameters:
      type: object
      properties: {{service: {{type: string}}, title: {{type: string}}, tenant: {{type: string}}}}
      required: [service, title]
    inject: {{tenant: tenant}}
    effect: mutating
  ops: {{kind: mcp, url: "http://127.0.0.1:{mcp_port}/mcp"}}
routes:
  - {{name: cost, types: [cost.threshold_exceeded], agents: [cost-advisor]}}
agents:
  cost-advisor:
    kind: llm
    model: advisor
    prompt: "Spend on {{{{ task.resource }}}} crossed its threshold: {{{{ event.data | tojson }}}}"
    reads: [cost]
    actions: [tool.ticket, tool.ops__restart_pods]
    tools: [ticket, ops__restart_pods]
    retries: 0
governance:
  approvals:
    rules:
      - {{actions: [tool.ticket]}}
"#,
            llm = llm_base()
        ),
    )
    .await;
    scenario(json!([
        calls(
            &model,
            &[
                (
                    "ticket",
                    json!({"service": "checkout", "title": "spend above threshold"})
                ),
                (
                    "ops__restart_pods",
                    json!({"service": "checkout", "reason": "leaking replicas"})
                ),
            ]
        ),
        text(&model, "Proposed a ticket and a restart."),
    ]))
    .await;
    let running = env.start(&["route", "agents", "resolve", "decisions", "tools"]);
    env.publish_one(
        "events.cost-thresholds",
        "c1",
        "cost.threshold_exceeded",
        "checkout",
        json!({"spend": 1200.0, "threshold": 1000.0}),
    )
    .await;

    // The restart needs no approval: an action, carried out once by the executor (the MCP server
    // sees it); the ticket waits for a person.
    let approvals = env
        .read("switchyard.approvals", 1, Duration::from_secs(40))
        .await;
    let ap: ApprovalData =
        serde_json::from_value(data_of(&event_of(&approvals[0])).clone()).expect("approval");
    assert_eq!(ap.action, "tool.ticket");
    let actions = env
        .read("switchyard.actions", 1, Duration::from_secs(20))
        .await;
    let restart: ActionData =
        serde_json::from_value(data_of(&event_of(&actions[0])).clone()).expect("action");
    assert_eq!(restart.action, "tool.ops__restart_pods");
    let mut executed = Vec::new();
    for _ in 0..100 {
        executed = json_lines(&mcp_calls);
        if !executed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        executed,
        vec![
            json!({"tool": "restart_pods", "args": {"service": "checkout", "reason": "leaking replicas"},
                   "meta": {"switchyard/idempotency_key": restart.action_id,
                            "switchyard/fencing_token": restart.fencing_token}})
        ]
    );
    assert!(
        seen.lock().expect("lock").is_empty(),
        "nothing calls the ticket service before the approval"
    );

    // Approved through the decisions topic: the action runs once, with the fencing token.
    env.send_raw(
        "switchyard.approval-decisions",
        &ap.approval_id,
        json!({"approval_id": ap.approval_id, "decision": "approve", "by": "alice"})
            .to_string()
            .as_bytes(),
        &[],
    )
    .await;
    let actions = env
        .read("switchyard.actions", 2, Duration::from_secs(30))
        .await;
    let ticket: ActionData = actions
        .iter()
        .map(|r| {
            serde_json::from_value::<ActionData>(data_of(&event_of(r)).clone()).expect("action")
        })
        .find(|a| a.action == "tool.ticket")
        .expect("the approved ticket action");
    assert_eq!(ticket.approved_by.as_deref(), Some("alice"));
    for _ in 0..100 {
        if !seen.lock().expect("lock").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    {
        let got = seen.lock().expect("lock");
        assert_eq!(got.len(), 1, "the ticket service called once");
        let (service, headers, body) = &got[0];
        assert_eq!(service, "checkout");
        assert_eq!(
            headers["x-switchyard-fencing-token"],
            ticket.fencing_token.to_string().as_str()
        );
        assert_eq!(headers["idempotency-key"], ticket.action_id.as_str());
        assert_eq!(headers["authorization"], format!("Bearer tk-{s}").as_str());
        assert_eq!(
            body,
            &json!({"title": "spend above threshold", "tenant": "default"})
        );
    }
    // The same action delivered again: not carried out twice.
    let again = actions
        .iter()
        .find(|r| {
            event_of(r)
                .data
                .as_ref()
                .is_some_and(|d| d["action"] == "tool.ticket")
        })
        .expect("ticket action record");
    env.send_raw(
        "switchyard.actions",
        &ticket.resource,
        &again.payload,
        &[("content-type", "application/cloudevents+json")],
    )
    .await;
    let skipped = "switchyard_tool_calls_total{outcome=\"skipped\",tool=\"ticket\"} 1";
    for _ in 0..100 {
        if switchyard::telemetry::METRICS.render().contains(skipped) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        switchyard::telemetry::METRICS.render().contains(skipped),
        "the repeat was skipped"
    );
    // The repeat writes the call's records again (the same ids) while its outcome is kept, until
    // the first delivery's commit: count calls by record id.
    let outcomes = |tc: &[switchyard::kafka::Input]| -> std::collections::BTreeMap<String, String> {
        tc.iter()
            .map(|r| {
                let ev = event_of(r);
                let outcome = data_of(&ev)["call"]["outcome"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (ev.id, outcome)
            })
            .collect()
    };
    let tc = outcomes(
        &env.read("switchyard.tool-calls", 10, Duration::from_secs(5))
            .await,
    );
    assert_eq!(
        tc.values().filter(|o| *o == "executed").count(),
        2,
        "{tc:?}"
    );
    assert_eq!(
        tc.values().filter(|o| *o == "proposed").count(),
        2,
        "{tc:?}"
    );
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "a redelivered action is not carried out again"
    );
    // Actions naming the tool directly (as an agent's `tool.ticket` proposal would, not through
    // the tool): the tenant comes from the action, not its parameters, and parameters that do not
    // fit the tool's schema are dead-lettered, not sent.
    let forged = |id: &str, parameters: Value| -> Vec<u8> {
        let mut ev: Value = serde_json::from_slice(&again.payload).expect("json");
        ev["id"] = json!(format!("ev-{id}"));
        ev["data"]["action_id"] = json!(id);
        ev["data"]["fencing_token"] = json!(ticket.fencing_token + (1 << 20));
        ev["data"]["parameters"] = parameters;
        ev.to_string().into_bytes()
    };
    let headers = [("content-type", "application/cloudevents+json")];
    env.send_raw(
        "switchyard.actions",
        &ticket.resource,
        &forged(
            "act-other-tenant",
            json!({"service": "checkout", "title": "forged", "tenant": "globex"}),
        ),
        &headers,
    )
    .await;
    env.send_raw(
        "switchyard.actions",
        &ticket.resource,
        &forged("act-no-title", json!({"service": "checkout"})),
        &headers,
    )
    .await;
    for _ in 0..100 {
        if seen.lock().expect("lock").len() > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dlq = read_topic_matching(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.dlq"),
        1,
        Duration::from_secs(20),
        |r| {
            r.headers
                .iter()
                .any(|(k, v)| k == "switchyard.dlq.reason" && v == b"invalid_tool_arguments")
        },
    )
    .await;
    assert_eq!(dlq.len(), 1, "the action without a title is dead-lettered");
    {
        let got = seen.lock().expect("lock");
        assert_eq!(got.len(), 2, "only the well-formed action was carried out");
        assert_eq!(got[1].2, json!({"title": "forged", "tenant": "default"}));
    }
    // Actions delivered again after a crash: one whose call finished (its outcome kept beside its
    // marker until its records' commit) has its records written again; one whose call was started
    // and never finished is recorded as unknown. Neither calls the tool.
    let mut redis = redis_connection(&env.loaded.config.redis.url).await;
    let tag = switchyard::store::ResourceKey::new("default", &ticket.resource).hash_tag();
    let marker = |id: &str| format!("{}:tools:{tag}:a:{id}", env.prefix);
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(marker("act-crashed"))
        .arg("running")
        .cmd("SET")
        .arg(marker("act-finished"))
        .arg("done")
        .cmd("SET")
        .arg(format!("{}:outcome", marker("act-finished")))
        .arg(
            json!({"time": "2026-11-28T10:00:00.000Z", "outcome": "executed",
                   "result": {"ticket": "T-9"}, "duration_ms": 5})
            .to_string(),
        )
        .query_async(&mut redis)
        .await
        .expect("markers");
    let well_formed = json!({"service": "checkout", "title": "again"});
    for id in ["act-crashed", "act-finished"] {
        env.send_raw(
            "switchyard.actions",
            &ticket.resource,
            &forged(id, well_formed.clone()),
            &headers,
        )
        .await;
    }
    let stable = |id: &str| {
        format!(
            "tool-{}",
            switchyard::pattern::stable_id(&["tool_call", id])
        )
    };
    let mut by_id: std::collections::BTreeMap<String, Value> = Default::default();
    for _ in 0..60 {
        by_id = env
            .read("switchyard.tool-calls", 100, Duration::from_millis(500))
            .await
            .iter()
            .map(|r| {
                let ev = event_of(r);
                (ev.id.clone(), data_of(&ev)["call"].clone())
            })
            .filter(|(id, _)| *id == stable("act-crashed") || *id == stable("act-finished"))
            .collect();
        if by_id.len() == 2 {
            break;
        }
    }
    let crashed = &by_id[&stable("act-crashed")];
    assert_eq!(crashed["outcome"], "unknown", "{crashed}");
    assert!(crashed["error"]
        .as_str()
        .is_some_and(|e| e.contains("not carried out again")));
    let finished = &by_id[&stable("act-finished")];
    assert_eq!(finished["outcome"], "executed");
    assert_eq!(finished["result"], json!({"ticket": "T-9"}));
    assert_eq!(
        seen.lock().expect("lock").len(),
        2,
        "neither redelivered action calls the tool"
    );
    // One claimed a moment ago by another instance, whose call may still be under way (a
    // rebalance gave up on it and it runs on): waited for, not recorded unknown; once that call's
    // outcome is kept, its records are written here.
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(marker("act-busy"))
        .arg("running")
        .cmd("SET")
        .arg(format!("{}:by", marker("act-busy")))
        .arg("another-instance")
        .arg("EX")
        .arg(86_400)
        .query_async(&mut redis)
        .await
        .expect("markers");
    env.send_raw(
        "switchyard.actions",
        &ticket.resource,
        &forged("act-busy", well_formed.clone()),
        &headers,
    )
    .await;
    let busy_record = |recs: &[switchyard::kafka::Input]| {
        recs.iter()
            .map(event_of)
            .find(|ev| ev.id == stable("act-busy"))
            .map(|ev| data_of(&ev)["call"].clone())
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    let early = env
        .read("switchyard.tool-calls", 100, Duration::from_millis(500))
        .await;
    assert_eq!(
        busy_record(&early),
        None,
        "not recorded while its call may run"
    );
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(marker("act-busy"))
        .arg("done")
        .cmd("SET")
        .arg(format!("{}:outcome", marker("act-busy")))
        .arg(
            json!({"time": "2026-11-28T10:00:01.000Z", "outcome": "executed",
                   "result": {"ticket": "T-10"}, "duration_ms": 7})
            .to_string(),
        )
        .query_async(&mut redis)
        .await
        .expect("outcome");
    let mut busy = None;
    for _ in 0..40 {
        busy = busy_record(
            &env.read("switchyard.tool-calls", 100, Duration::from_millis(500))
                .await,
        );
        if busy.is_some() {
            break;
        }
    }
    let busy = busy.expect("the previous owner's outcome written");
    assert_eq!(busy["outcome"], "executed", "{busy}");
    assert_eq!(busy["result"], json!({"ticket": "T-10"}));
    assert_eq!(seen.lock().expect("lock").len(), 2, "nothing called here");
    // Every tool action's call is in the trail, sealed into the tools stage's chain: the first
    // ticket, the restart, the forged one carried out, the three above (the repeat's record is the
    // same bytes as the first).
    let v = env.verified_audit(1, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let audit = audit_of(&env.audit(40, Duration::from_secs(4)).await);
    let executor_calls: std::collections::BTreeSet<String> = audit
        .iter()
        .filter(|a| a.decision == "tool_call" && !a.detail["action_id"].is_null())
        .map(|a| a.detail["action_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(executor_calls.len(), 6, "{executor_calls:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_loop_is_bounded_repaired_timed_and_budgeted_and_never_pays_twice() {
    let s = suffix();
    let m = |n: &str| format!("{n}-{s}");
    let (tool_port, _) = ticket_server().await;
    let agent = |name: &str, model: &str, extra: &str| {
        format!(
            r#"
  {name}:
    kind: llm
    model: {model}
    prompt: "Look at {{{{ task.resource }}}}."
    reads: [sla]
    writes: [verdict]
    retries: 0
{extra}"#
        )
    };
    let env = TestEnv::new(
        2,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}"}}
  aliases:
    looping: {{candidates: [{{provider: mock, model: "{looping}"}}]}}
    schema: {{candidates: [{{provider: mock, model: "{schema}"}}]}}
    stubborn: {{candidates: [{{provider: mock, model: "{stubborn}"}}]}}
    slow: {{candidates: [{{provider: mock, model: "{slow}"}}]}}
    costly: {{candidates: [{{provider: mock, model: "{costly}"}}], max_tokens: 10}}
    reader: {{candidates: [{{provider: mock, model: "{reader}"}}]}}
  prices:
    "{costly}": {{input: 0.0, output: 1000000.0}}
tools:
  metrics:
    kind: http
    description: Error-rate metrics of a service.
    method: GET
    url: "http://127.0.0.1:{tool_port}/metrics"
    parameters: {{type: object, properties: {{service: {{type: string}}}}}}
routes:
  - {{name: r1, types: [t.looping], agents: [looper]}}
  - {{name: r2, types: [t.schema], agents: [schemer]}}
  - {{name: r3, types: [t.stubborn], agents: [stubborn]}}
  - {{name: r4, types: [t.slow], agents: [sleeper]}}
  - {{name: r5, types: [t.costly], agents: [spender]}}
  - {{name: r6, types: [t.reader], agents: [reader]}}
agents:{a1}{a2}{a3}{a4}{a5}{a6}
governance:
  budgets:
    - {{name: spender-cost, per: agent, matches: spender, period: day, max_cost: 12.0}}
"#,
            llm = llm_base(),
            looping = m("loop"),
            schema = m("schema"),
            stubborn = m("stub"),
            slow = m("slow"),
            costly = m("cost"),
            reader = m("read"),
            a1 = agent("looper", "looping", "    max_iterations: 2"),
            a2 = agent("schemer", "schema", "    answer_key: verdict\n    output: {type: object, properties: {verdict: {type: string}}, required: [verdict]}"),
            a3 = agent("stubborn", "stubborn", "    output: {type: object, required: [verdict]}"),
            a4 = agent("sleeper", "slow", "    timeout_ms: 1500"),
            a5 = agent("spender", "costly", ""),
            a6 = agent("reader", "reader", "    tools: [metrics]\n    answer_key: verdict\n    max_tool_calls_per_answer: 2"),
        ),
    )
    .await;
    let again = |model: &str| calls(model, &[("read_context", json!({"keys": ["sla"]}))]);
    scenario(json!([
        // looper: asks for tools forever; max_iterations 2 ends it.
        again(&m("loop")), again(&m("loop")), again(&m("loop")),
        // schemer: writes its answer's key itself (refused: switchyard writes it from the
        // checked answer), then a non-JSON answer, then (repair) a valid one.
        calls(&m("schema"), &[("write_finding", json!({"key": "verdict", "value": "forged, unchecked"}))]),
        text(&m("schema"), "the verdict is: fine"),
        text(&m("schema"), "{\"verdict\": \"deployment v42\"}"),
        // stubborn: wrong twice.
        text(&m("stub"), "{\"nope\": 1}"), text(&m("stub"), "still no"),
        // sleeper: a tool round, then a model that takes longer than the deadline.
        again(&m("slow")),
        {"type": "delay", "seconds": 4, "match": {"model": m("slow")}},
        text(&m("slow"), "too late"),
        // spender: the first call fits the budget, the second does not.
        again(&m("cost")), again(&m("cost")), text(&m("cost"), "never"),
        // reader: an unknown tool (and, past max_tool_calls_per_answer, a call not run), then a
        // read-only tool that fails; all go back to the model.
        calls(&m("read"), &[("launch_missiles", json!({})),
                            ("read_context", json!({"keys": ["sla"]})),
                            ("read_context", json!({"keys": ["sla"]}))]),
        calls(&m("read"), &[("metrics", json!({"service": "checkout"}))]),
        text(&m("read"), "metrics are down; no verdict"),
    ]))
    .await;
    let running = env.start(&["route", "agents"]);
    for (i, ty) in [
        "t.looping",
        "t.schema",
        "t.stubborn",
        "t.slow",
        "t.costly",
        "t.reader",
    ]
    .iter()
    .enumerate()
    {
        env.publish_one(
            "events.deployments",
            &format!("e{i}"),
            ty,
            &format!("svc-{i}"),
            json!({"n": i}),
        )
        .await;
    }
    let results = results_of(
        &env.read("switchyard.results", 6, Duration::from_secs(60))
            .await,
    );
    let by = |a: &str| {
        results
            .iter()
            .find(|r| r.agent == a)
            .unwrap_or_else(|| panic!("result of {a}: {results:?}"))
    };
    let looper = by("looper");
    assert_eq!(looper.status, "failed");
    assert!(
        looper
            .error
            .as_deref()
            .is_some_and(|e| e.contains("max_iterations (2)")),
        "{looper:?}"
    );
    let schemer = by("schemer");
    assert_eq!(schemer.status, "succeeded", "{schemer:?}");
    assert_eq!(
        schemer.findings,
        json!([{"key": "verdict", "value": {"verdict": "deployment v42"}}]),
        "the checked answer alone, not the model's own write of its key"
    );
    assert!(tool_results(&llm_requests(&m("schema")).await[1])
        .contains("is written by switchyard from your final answer"));
    let stubborn = by("stubborn");
    assert_eq!(stubborn.status, "failed");
    assert!(
        stubborn
            .error
            .as_deref()
            .is_some_and(|e| e.contains("after one repair")),
        "{stubborn:?}"
    );
    let sleeper = by("sleeper");
    assert_eq!(sleeper.status, "timed_out", "{sleeper:?}");
    let spender = by("spender");
    assert_eq!(spender.status, "failed");
    assert!(
        spender
            .error
            .as_deref()
            .is_some_and(|e| e.contains("spender-cost") && e.contains("after 1 model calls")),
        "{spender:?}"
    );
    let reader = by("reader");
    assert_eq!(reader.status, "succeeded", "{reader:?}");
    let reqs = llm_requests(&m("read")).await;
    assert_eq!(reqs.len(), 3);
    assert!(
        tool_results(&reqs[1]).contains("there is no tool \\\"launch_missiles\\\""),
        "{}",
        tool_results(&reqs[1])
    );
    let answered = reqs[1]["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "tool").count());
    assert_eq!(answered, Some(3), "every tool call of the answer answered");
    assert_eq!(
        tool_results(&reqs[1])
            .matches("not run: at most 2 tool calls are run per answer (3 were asked for)")
            .count(),
        1,
        "the call past max_tool_calls_per_answer is not run: {}",
        tool_results(&reqs[1])
    );
    assert!(
        tool_results(&reqs[2]).contains("503")
            && tool_results(&reqs[2]).contains("metrics store down")
    );
    assert_eq!(
        llm_requests(&m("loop")).await.len(),
        2,
        "max_iterations bounds the calls"
    );
    assert_eq!(
        llm_requests(&m("cost")).await.len(),
        1,
        "no call after the budget ran out"
    );
    // Failed runs go to the dead-letter topic with the reason.
    let dlq = env.read("switchyard.dlq", 4, Duration::from_secs(20)).await;
    assert!(
        dlq.len() >= 4,
        "looper, stubborn, sleeper, spender dead-lettered"
    );
    assert!(dlq
        .iter()
        .all(|r| header(r, "switchyard.dlq.reason") == Some("agent_failed")));

    // A copy of a finished task is not run again: nothing is called, nothing written twice. (A
    // task redelivered before its commit re-emits its recorded outcome: tests/agents.rs.)
    let tasks = env
        .read("switchyard.tasks", 6, Duration::from_secs(10))
        .await;
    let schema_task = tasks
        .iter()
        .find(|r| task_of(r).agent == "schemer")
        .expect("schemer task");
    let before = llm_requests(&m("schema")).await.len();
    env.send_raw(
        "switchyard.tasks",
        std::str::from_utf8(schema_task.key.as_deref().unwrap_or_default()).unwrap_or_default(),
        &schema_task.payload,
        &[("content-type", "application/cloudevents+json")],
    )
    .await;
    // Processed once the agents stage committed past it: 7 tasks in all.
    let mut committed = 0;
    for _ in 0..100 {
        committed = env
            .committed("agents", "switchyard.tasks", 2)
            .await
            .values()
            .filter(|o| **o > 0)
            .sum::<i64>();
        if committed >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(committed, 7, "the copy was consumed");
    assert_eq!(
        llm_requests(&m("schema")).await.len(),
        before,
        "and no model was called for it"
    );
    let results = results_of(
        &env.read("switchyard.results", 7, Duration::from_secs(3))
            .await,
    );
    assert_eq!(
        results.iter().filter(|r| r.agent == "schemer").count(),
        1,
        "nor a second result written"
    );
    running.stop().await;
}

/// A span as the OTLP receiver wrote it.
fn spans_named<'a>(spans: &'a [Value], prefix: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect()
}

fn span_id_of(traceparent: &str) -> String {
    traceparent
        .split('-')
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_makes_one_span_tree_at_an_otlp_receiver() {
    let s = suffix();
    let model = format!("tr-{s}");
    let dir = tempfile::tempdir().expect("tempdir");
    let spans_file = dir.path().join("spans.jsonl");
    let (_otlp, otlp_port) = start_otlp(&spans_file);
    // An HTTP agent that notes the trace context it is sent.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/agent",
            post(|State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap| async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                seen.lock().expect("lock").push(tp);
                Json(json!({"proposals": [{"action": "scale_up", "parameters": {"replicas": 3}}]}))
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let agent_url = format!("http://{}/agent", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    let env = TestEnv::new(
        2,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    analyst: {{candidates: [{{provider: mock, model: "{model}"}}]}}
routes:
  - {{name: sla, types: [sla.breached], agents: [incident-analyst, capacity]}}
agents:
  incident-analyst:
    kind: llm
    model: analyst
    prompt: "SLA breach on {{{{ task.resource }}}}"
    reads: [sla]
    actions: [page]
    retries: 0
  capacity:
    kind: http
    url: "{agent_url}"
    actions: [scale_up]
governance:
  approvals:
    token: t-{s}
    rules: [{{actions: [page]}}]
"#,
            llm = llm_base()
        ),
    )
    .await;
    scenario(json!([
        calls(
            &model,
            &[
                ("read_context", json!({"keys": ["sla"]})),
                (
                    "propose_action",
                    json!({"action": "page", "parameters": {"team": "team-pay"}, "reason": "breach"})
                ),
            ]
        ),
        text(&model, "Paged."),
    ]))
    .await;
    let (brokers, redis) = stack().clone();
    let otlp = format!("http://127.0.0.1:{otlp_port}");
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(bin());
        c.args(["--config", env.config_path.to_str().expect("path")])
            .args(args)
            .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
            .env("SWITCHYARD_REDIS_URL", &redis)
            .env("SWITCHYARD_OTLP_ENDPOINT", &otlp)
            .env("RUST_LOG", "warn");
        c
    };
    let _running = Reaper(
        run(&["run", "--stages", "route,agents,resolve"])
            .spawn()
            .expect("spawn switchyard"),
    );
    // The event arrives in a trace of its producer's.
    let (trace, producer_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let ev = event(
        "tr-1",
        "sla.breached",
        "checkout",
        json!({"slo": "availability", "observed": 97.0}),
    )
    .with_extension("traceparent", format!("00-{trace}-{producer_span}-01"));
    env.publish("events.sla-breaches", &[ev]).await;

    let actions = env
        .read("switchyard.actions", 1, Duration::from_secs(60))
        .await;
    let pending = env
        .read("switchyard.approvals", 1, Duration::from_secs(20))
        .await;
    let approval: ApprovalData =
        serde_json::from_value(data_of(&event_of(&pending[0])).clone()).expect("approval");
    let out = run(&[
        "approvals",
        "approve",
        &approval.approval_id,
        "--by",
        "alice",
    ])
    .output()
    .expect("approve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let approved = env
        .read("switchyard.actions", 2, Duration::from_secs(20))
        .await;

    // Spans are exported in batches (every 5 s): wait for the last ones.
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = json_lines(&spans_file);
        let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
        if names.iter().filter(|n| n.starts_with("resolve ")).count() >= 2
            && names.iter().any(|n| n.starts_with("approval wait"))
            && names.iter().any(|n| n.starts_with("release "))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spans: Vec<Value> = spans
        .into_iter()
        .filter(|s| s["trace_id"] == trace)
        .collect();
    let one = |prefix: &str| -> &Value {
        let v = spans_named(&spans, prefix);
        assert_eq!(v.len(), 1, "one {prefix} span: {spans:#?}");
        v[0]
    };
    assert!(spans.iter().all(|s| s["service"] == "switchyard"));
    // route, under the producer's span
    let route = one("route sla.breached");
    assert_eq!(route["parent_span_id"], producer_span);
    assert_eq!(route["attributes"]["switchyard.event.id"], "tr-1");
    // a task per agent, under the route
    let task_llm = one("task incident-analyst");
    let task_http = one("task capacity");
    for t in [task_llm, task_http] {
        assert_eq!(t["parent_span_id"], route["span_id"]);
        assert_eq!(t["attributes"]["switchyard.status"], "succeeded");
    }
    // an attempt under each task
    let att_llm = one("invoke_agent incident-analyst");
    let att_http = one("invoke_agent capacity");
    assert_eq!(att_llm["parent_span_id"], task_llm["span_id"]);
    assert_eq!(att_http["parent_span_id"], task_http["span_id"]);
    // The HTTP agent was sent its attempt's context.
    let sent = seen.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        span_id_of(&sent[0]),
        att_http["span_id"].as_str().unwrap_or("-")
    );
    assert!(sent[0].contains(trace));
    // two model calls (GenAI conventions) and two tool calls under the LLM agent's attempt
    let chats = spans_named(&spans, "chat analyst");
    assert_eq!(chats.len(), 2, "{spans:#?}");
    for c in &chats {
        assert_eq!(c["parent_span_id"], att_llm["span_id"]);
        assert_eq!(c["kind"], 3, "client span");
        let a = &c["attributes"];
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.system"], "openai");
        assert_eq!(a["gen_ai.request.model"], "analyst");
        assert_eq!(a["gen_ai.response.model"], model.as_str());
        assert!(
            a["gen_ai.usage.input_tokens"].as_i64().unwrap_or(0) > 0,
            "{a}"
        );
        assert!(
            a["gen_ai.usage.output_tokens"].as_i64().unwrap_or(0) > 0,
            "{a}"
        );
    }
    let tools = spans_named(&spans, "execute_tool ");
    let tool_names: Vec<&str> = tools
        .iter()
        .filter_map(|t| t["attributes"]["gen_ai.tool.name"].as_str())
        .collect();
    assert_eq!(tool_names.len(), 2);
    assert!(tool_names.contains(&"read_context") && tool_names.contains(&"propose_action"));
    assert!(tools
        .iter()
        .all(|t| t["parent_span_id"] == att_llm["span_id"]));
    // a resolve decision under each task, with its rule
    let page = one("resolve page");
    let scale = one("resolve scale_up");
    assert_eq!(page["parent_span_id"], task_llm["span_id"]);
    assert_eq!(scale["parent_span_id"], task_http["span_id"]);
    assert_eq!(
        page["attributes"]["switchyard.decision"],
        "approval_requested"
    );
    assert_eq!(scale["attributes"]["switchyard.decision"], "accepted");
    // the approval's wait, from the CLI process, under the decision that asked for it
    let wait = one("approval wait page");
    assert_eq!(wait["parent_span_id"], page["span_id"]);
    assert_eq!(
        wait["attributes"]["switchyard.approval.decided_by"],
        "alice"
    );
    assert!(wait["end_ns"].as_u64() >= wait["start_ns"].as_u64());
    // Resolve sends the approved action when it reads the approval's release, under the wait.
    let release = one("release page");
    assert_eq!(release["parent_span_id"], wait["span_id"]);
    assert_eq!(release["attributes"]["switchyard.decision"], "released");
    // Records carry the span that wrote them: the accepted action its decision's, the approved
    // one its release's.
    let tp_of = |r: &switchyard::kafka::Input| span_id_of(header(r, "traceparent").unwrap_or(""));
    assert_eq!(tp_of(&actions[0]), scale["span_id"].as_str().unwrap_or("-"));
    assert_eq!(
        event_of(&actions[0]).traceparent().map(span_id_of),
        Some(tp_of(&actions[0]))
    );
    assert_eq!(
        tp_of(&approved[1]),
        release["span_id"].as_str().unwrap_or("-")
    );
    // Every span of the tree is in the trace, and every parent is a span of it (or the producer's).
    let ids: Vec<&str> = spans.iter().filter_map(|s| s["span_id"].as_str()).collect();
    for sp in &spans {
        let p = sp["parent_span_id"].as_str().unwrap_or("");
        assert!(p == producer_span || ids.contains(&p), "orphan span {sp}");
    }
}

/// `switchyard replay` with the env's config, or `candidate`; its exit status and stdout.
fn replay(env: &TestEnv, candidate: Option<&std::path::Path>, args: &[&str]) -> (bool, String) {
    let (brokers, redis) = stack().clone();
    let config = candidate.unwrap_or(&env.config_path);
    let out = std::process::Command::new(bin())
        .args(["--config", config.to_str().expect("path"), "replay"])
        .args(args)
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .env("SWITCHYARD_REDIS_URL", &redis)
        .output()
        .expect("switchyard replay runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!(
            "replay {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_day_replays_identically_and_a_candidate_config_shows_its_diff() {
    let s = suffix();
    let model = format!("rp-{s}");
    let rules = |rollback: i32| {
        format!(
            r#"
resolve:
  actions:
    rollback: {{priority: {rollback}, conflicts_with: [scale_down]}}
    scale_down: {{priority: 50, conflicts_with: [rollback]}}
"#
        )
    };
    let yaml = format!(
        r#"
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    scribe: {{candidates: [{{provider: mock, model: "{model}"}}]}}
routes:
  - {{name: deployments, types: ["deployment.*"], agents: [deploy-guard]}}
  - {{name: sla, types: [sla.breached], agents: [sla-responder, scribe]}}
  - {{name: cost, types: [cost.threshold_exceeded], agents: [cost-guard]}}
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
  cost-guard:
    kind: builtin
    reads: [cost, sla]
    writes: [cost]
    actions: [scale_down]
  scribe:
    kind: llm
    model: scribe
    prompt: "Breach on {{{{ task.resource }}}}"
    writes: [incident.note]
    actions: [page]
    retries: 0
{}"#,
        rules(10),
        llm = llm_base()
    );
    let env = TestEnv::new(2, &yaml).await;
    scenario(json!([
        calls(
            &model,
            &[
                (
                    "write_finding",
                    json!({"key": "incident.note", "value": "checkout degraded"})
                ),
                (
                    "propose_action",
                    json!({"action": "page", "parameters": {"team": "team-pay"}})
                ),
            ]
        ),
        text(&model, "Paged."),
    ]))
    .await;
    let running = env.start(&["route", "agents", "resolve"]);
    // The recorded day: an overspend (scale_down accepted), a deployment, then a breach whose
    // rollback loses to the active scale_down (priority 10 < 50) while the responder's and the
    // scribe's pages go out.
    env.publish_one(
        "events.cost-thresholds",
        "c1",
        "cost.threshold_exceeded",
        "checkout",
        json!({"budget": 100.0, "spend": 130.0}),
    )
    .await;
    env.read("switchyard.results", 1, Duration::from_secs(40))
        .await;
    env.deployment_then_breach("checkout", 1).await;
    let results = env
        .read("switchyard.results", 4, Duration::from_secs(40))
        .await;
    assert_eq!(results.len(), 4);
    let actions = env
        .read("switchyard.actions", 3, Duration::from_secs(20))
        .await;
    let mut names: Vec<String> = actions
        .iter()
        .map(|r| {
            data_of(&event_of(r))["action"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    names.sort();
    // Two pages (different parameters), no rollback.
    assert_eq!(
        names,
        ["page", "page", "scale_down"],
        "rollback was rejected live"
    );
    let calls_live = llm_requests(&model).await.len();
    assert_eq!(calls_live, 2);
    running.stop().await;

    // The same config: every decision as recorded, twice byte for byte, no model call.
    let (ok, first) = replay(&env, None, &["--since", "1h", "--json"]);
    assert!(ok, "no difference: exit 0\n{first}");
    let (ok, second) = replay(&env, None, &["--since", "1h", "--json"]);
    assert!(ok);
    assert_eq!(
        first, second,
        "same recording + same config = the same bytes"
    );
    let r: Value = serde_json::from_str(&first).expect("JSON report");
    let sm = &r["summary"];
    assert_eq!(sm["events"], 3, "{sm}");
    assert_eq!(sm["tasks"], 4);
    assert_eq!(sm["replayed"], 4);
    assert_eq!(sm["diverged"], 0);
    // scale_down, the rollback, and two pages (the responder's and the scribe's, merged).
    assert_eq!(sm["same"], 4, "{r:#}");
    assert_eq!(
        (
            sm["changed"].clone(),
            sm["new"].clone(),
            sm["missing"].clone()
        ),
        (json!(0), json!(0), json!(0))
    );
    let rollback = r["decisions"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["action"] == "rollback"))
        .expect("the rollback's decision")
        .clone();
    assert_eq!(rollback["after"]["decision"], "rejected");
    assert_eq!(rollback["after"]["rule"], "priority");
    assert_eq!(
        llm_requests(&model).await.len(),
        calls_live,
        "zero calls reach the stand-in"
    );

    // A candidate that ranks rollback above scale_down: the rollback would have been accepted.
    let candidate = env.config_path.with_file_name("candidate.yaml");
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(
        &candidate,
        text.replace("rollback: {priority: 10,", "rollback: {priority: 100,"),
    )
    .expect("write candidate");
    let (ok, out) = replay(&env, Some(&candidate), &["--since", "1h", "--json"]);
    assert!(!ok, "decisions differ: exit 1");
    let r: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(r["summary"]["changed"], 1, "{r:#}");
    assert_eq!(r["summary"]["same"], 3);
    let row = r["decisions"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["status"] == "changed"))
        .expect("a changed decision")
        .clone();
    assert_eq!(row["action"], "rollback");
    assert_eq!(row["event_id"], "s1");
    assert_eq!(row["before"]["decision"], "rejected");
    assert_eq!(row["after"]["decision"], "accepted");
    // The text report, one event only.
    let (ok, out) = replay(&env, Some(&candidate), &["--since", "1h", "--event", "s1"]);
    assert!(!ok);
    assert!(out.contains("changed  s1"), "{out}");
    assert!(out.contains("rejected [priority]"), "{out}");
    assert!(
        out.contains("2 tasks (2 from the recording, 0 diverged)"),
        "{out}"
    );
    assert!(out.contains("0 model calls"), "{out}");
    assert_eq!(llm_requests(&model).await.len(), calls_live);

    // A candidate that changes the scribe's prompt: its recorded answer is not served (diverged),
    // so its page is missing from the replay's decisions.
    let reworded = env.config_path.with_file_name("reworded.yaml");
    std::fs::write(
        &reworded,
        text.replace("prompt: \"Breach on", "prompt: \"Incident on"),
    )
    .expect("write candidate");
    let (ok, out) = replay(&env, Some(&reworded), &["--since", "1h", "--json"]);
    assert!(!ok, "a diverged task fails the replay");
    let r: Value = serde_json::from_str(&out).expect("JSON report");
    let sm = &r["summary"];
    assert_eq!(
        (
            sm["diverged"].clone(),
            sm["missing"].clone(),
            sm["same"].clone()
        ),
        (json!(1), json!(1), json!(3)),
        "{r:#}"
    );
    assert_eq!(r["diverged"][0]["agent"], "scribe");
    assert_eq!(
        r["diverged"][0]["why"],
        "the agent's declaration changed since it answered"
    );
    let missing = r["decisions"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["status"] == "missing"))
        .expect("the scribe's page")
        .clone();
    assert_eq!(
        (missing["agent"].as_str(), missing["action"].as_str()),
        (Some("scribe"), Some("page"))
    );

    // Nothing reached the live topics or Redis keys.
    let after = env
        .read("switchyard.actions", 4, Duration::from_secs(3))
        .await;
    assert_eq!(after.len(), 3, "no action written by a replay");
    let mut conn = redis_connection(stack().1.as_str()).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:replay-*", env.prefix))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(left.is_empty(), "scratch keys deleted: {left:?}");

    // Ids are unique within a tenant: another tenant's event with the same id is not replayed
    // with it (nor its decisions compared) — `--event` asks which, and `--tenant` says.
    let other = event(
        "s1",
        "sla.breached",
        "checkout",
        json!({"slo": "availability", "observed": 97.0, "objective": 99.9}),
    )
    .with_extension("tenant", "globex");
    env.publish("events.sla-breaches", &[other]).await;
    let (brokers, redis) = stack().clone();
    let ambiguous = std::process::Command::new(bin())
        .args(["--config", candidate.to_str().expect("path")])
        .args(["replay", "--since", "1h", "--event", "s1"])
        .env("SWITCHYARD_KAFKA_BROKERS", &brokers)
        .env("SWITCHYARD_REDIS_URL", &redis)
        .output()
        .expect("switchyard replay runs");
    let err = String::from_utf8_lossy(&ambiguous.stderr);
    assert!(
        !ambiguous.status.success() && err.contains("in 2 tenants (default, globex)"),
        "ambiguous: {err}"
    );
    let (ok, out) = replay(
        &env,
        Some(&candidate),
        &["--since", "1h", "--event", "s1", "--tenant", "default"],
    );
    assert!(!ok);
    assert!(out.contains("changed  s1"), "{out}");
    assert!(
        out.contains("2 tasks (2 from the recording, 0 diverged)"),
        "{out}"
    );
}

/// A final answer cut off at the output limit, or empty, is not an answer: the task fails (and is
/// dead-lettered) instead of keeping it as the agent's finding and counting a success. And a tool
/// loop over Anthropic's Messages API: a turn that only calls a tool is sent back without an empty
/// text block (which the API refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_or_empty_final_answer_fails_the_task_and_a_tool_loop_runs_over_anthropic() {
    let s = suffix();
    let m = |n: &str| format!("{n}-{s}");
    let agent = |name: &str, model: &str| {
        format!(
            "\n  {name}:\n    kind: llm\n    model: {model}\n    prompt: \"Look at {{{{ task.resource }}}}.\"\n    writes: [verdict]\n    answer_key: verdict\n    retries: 0\n"
        )
    };
    let anthropic_base = format!("{}/anthropic/v1", llm_base().trim_end_matches("/v1"));
    let env = TestEnv::new(
        1,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}"}}
    claude: {{kind: anthropic, base_url: "{anthropic}", api_key: "k-{s}"}}
  aliases:
    clipped: {{candidates: [{{provider: mock, model: "{clipped}"}}]}}
    blank: {{candidates: [{{provider: mock, model: "{blank}"}}]}}
    messages: {{candidates: [{{provider: claude, model: "{claude}"}}]}}
routes:
  - {{name: r1, types: [t.clipped], agents: [clipper]}}
  - {{name: r2, types: [t.blank], agents: [blanker]}}
  - {{name: r3, types: [t.claude], agents: [claude]}}
agents:{a1}{a2}{a3}    reads: [sla]
"#,
            llm = llm_base(),
            anthropic = anthropic_base,
            clipped = m("clip"),
            blank = m("blank"),
            claude = m("claude"),
            a1 = agent("clipper", "clipped"),
            a2 = agent("blanker", "blank"),
            a3 = agent("claude", "messages"),
        ),
    )
    .await;
    scenario(json!([
        {"type": "reply", "match": {"model": m("clip")}, "text": "The verdict is that the deploy", "finish_reason": "length", "times": 5},
        {"type": "reply", "match": {"model": m("blank")}, "text": "", "times": 5},
        calls(&m("claude"), &[("read_context", json!({"keys": ["sla"]}))]),
        text(&m("claude"), "all quiet"),
    ]))
    .await;
    let running = env.start(&["route", "agents"]);
    for (i, ty) in ["t.clipped", "t.blank", "t.claude"].iter().enumerate() {
        env.publish_one(
            "events.deployments",
            &format!("c{i}"),
            ty,
            &format!("svc-{i}"),
            json!({}),
        )
        .await;
    }
    let results = results_of(
        &env.read("switchyard.results", 3, Duration::from_secs(60))
            .await,
    );
    running.stop().await;
    let by = |a: &str| {
        results
            .iter()
            .find(|r| r.agent == a)
            .unwrap_or_else(|| panic!("result of {a}: {results:?}"))
    };
    let clipper = by("clipper");
    assert_eq!(clipper.status, "failed", "{clipper:?}");
    assert!(
        clipper
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cut off")),
        "{clipper:?}"
    );
    assert_eq!(clipper.findings, json!([]), "nothing kept: {clipper:?}");
    let blanker = by("blanker");
    assert_eq!(blanker.status, "failed", "{blanker:?}");
    assert!(
        blanker
            .error
            .as_deref()
            .is_some_and(|e| e.contains("empty")),
        "{blanker:?}"
    );
    let claude = by("claude");
    assert_eq!(claude.status, "succeeded", "{claude:?}");
    assert_eq!(
        claude.findings,
        json!([{"key": "verdict", "value": "all quiet"}])
    );
    let reqs = llm_requests(&m("claude")).await;
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let turn = &reqs[1]["messages"][1];
    assert_eq!(turn["role"], "assistant", "{}", reqs[1]);
    let blocks = turn["content"].as_array().expect("blocks");
    assert!(
        blocks.iter().any(|b| b["type"] == "tool_use")
            && !blocks.iter().any(|b| b["type"] == "text"),
        "the tool call alone, no empty text block: {turn}"
    );
    assert_eq!(reqs[1]["messages"][2]["content"][0]["type"], "tool_result");
}

/// The tools stage's claim survives what passes: an MCP server out of reach when an action naming
/// its tool arrives holds the action (retried) instead of dead-lettering it as an unknown tool, and
/// it is carried out once the server lists its tools; a claim whose reply was lost (Redis stalled
/// past the client's timeout after running it) is this process's own, found again with no call
/// made — the action is called, not recorded as unknown; an action dead-lettered because its tool
/// kept failing is called again when redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_actions_wait_for_an_mcp_server_survive_a_lost_claim_reply_and_are_redriven() {
    let s = suffix();
    let dir = tempfile::tempdir().expect("tempdir");
    let redis_port = free_port();
    let _redis = start_redis(redis_port, dir.path(), false);
    let mcp_calls = dir.path().join("mcp.jsonl");
    let mcp_port = free_port();
    let (tickets, seen) = ticket_server().await;
    // A tool that answers 500 until `up`, counting what it is sent.
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flaky_port = {
        let (up, n) = (up.clone(), flaky_calls.clone());
        let app = axum::Router::new().route(
            "/do",
            post(move |Json(body): Json<Value>| {
                let (up, n) = (up.clone(), n.clone());
                async move {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if body["n"] == 2 {
                        (axum::http::StatusCode::UNPROCESSABLE_ENTITY, "no such n")
                    } else if up.load(std::sync::atomic::Ordering::SeqCst) {
                        (axum::http::StatusCode::OK, "{\"done\": true}")
                    } else {
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        port
    };
    let env = TestEnv::new(
        1,
        &format!(
            r#"
gateway:
  providers:
    mock: {{base_url: "{llm}"}}
  aliases:
    advisor: {{candidates: [{{provider: mock, model: "m-{s}"}}]}}
tools:
  ticket:
    kind: http
    description: Open a ticket for a service's owners.
    method: POST
    url: "http://127.0.0.1:{tickets}/tickets/{{{{ service }}}}"
    parameters:
      type: object
      properties: {{service: {{type: string}}, title: {{type: string}}}}
      required: [service, title]
    effect: mutating
  flaky:
    kind: http
    description: Fails until it is fixed.
    method: POST
    url: "http://127.0.0.1:{flaky_port}/do"
    parameters: {{type: object, properties: {{n: {{type: integer}}}}}}
    effect: mutating
  ops: {{kind: mcp, url: "http://127.0.0.1:{mcp_port}/mcp"}}
routes:
  - {{name: cost, types: [cost.threshold_exceeded], agents: [cost-advisor]}}
agents:
  cost-advisor:
    kind: llm
    model: advisor
    prompt: "Spend on {{{{ task.resource }}}}"
    actions: [tool.ticket, tool.ops__restart_pods, tool.flaky]
    tools: [ticket, ops__restart_pods, flaky]
"#,
            llm = llm_base()
        ),
    )
    .await;
    let mut loaded = env.loaded.clone();
    loaded.config.redis.url = format!("redis://127.0.0.1:{redis_port}/");
    let running = Running::start(loaded, &["tools"]);
    let action = |id: &str, tool: &str, resource: &str, parameters: Value| {
        let a = ActionData {
            action_id: id.into(),
            action: format!("tool.{tool}"),
            resource: resource.into(),
            tenant: "default".into(),
            workflow_id: "wf".into(),
            parameters,
            fencing_token: 1,
            proposals: json!([]),
            agents: json!(["cost-advisor"]),
            priority: 0,
            impact: switchyard::records::Impact::Low,
            approved_by: None,
            reason: None,
        };
        switchyard::event::CloudEvent::new(format!("ev-{id}"), "test", "switchyard.action")
            .with_subject(resource)
            .with_data(serde_json::to_value(a).expect("action"))
    };
    let calls_of = |want: usize| {
        let env = &env;
        async move {
            let mut calls = Vec::new();
            for _ in 0..90 {
                calls = env
                    .read(
                        "switchyard.tool-calls",
                        usize::MAX,
                        Duration::from_millis(500),
                    )
                    .await
                    .iter()
                    .map(|r| data_of(&event_of(r))["call"].clone())
                    .collect::<Vec<Value>>();
                if calls.len() >= want {
                    break;
                }
            }
            calls
        }
    };

    // The MCP server is not up: the action waits, nothing is dead-lettered.
    env.publish(
        "switchyard.actions",
        &[action(
            "act-mcp",
            "ops__restart_pods",
            "checkout",
            json!({"service": "checkout", "reason": "leaking replicas"}),
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        env.read("switchyard.dlq", usize::MAX, Duration::from_secs(1))
            .await
            .is_empty(),
        "not dead-lettered as an unknown tool"
    );
    // It comes up: the action is carried out once it lists its tools (at most 30 s later).
    let start_mcp = || {
        Reaper(
            std::process::Command::new(stack_dir().join("venv/bin/python"))
                .arg(root().join("deploy/local/mcp_server.py"))
                .arg(mcp_port.to_string())
                .arg(&mcp_calls)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mcp server"),
        )
    };
    let _mcp = start_mcp();
    let calls = calls_of(1).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["outcome"], "executed", "{calls:?}");
    assert_eq!(json_lines(&mcp_calls).len(), 1);

    // Redis stalls past the client's 2 s timeout just as a ticket action's claim is sent: the
    // claim runs once Redis wakes, its reply is lost; the retry finds this process's own claim.
    let stall = tokio::spawn(async move {
        let mut r = redis_connection(&format!("redis://127.0.0.1:{redis_port}/")).await;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(4000)
            .arg("ALL")
            .query_async::<()>(&mut r)
            .await
            .expect("pause");
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.publish(
        "switchyard.actions",
        &[action(
            "act-stall",
            "ticket",
            "billing",
            json!({"service": "billing", "title": "spend above threshold"}),
        )],
    )
    .await;
    stall.await.expect("stall");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = calls_of(2).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1]["tool"], "ticket");
    assert_eq!(calls[1]["outcome"], "executed", "not unknown: {calls:?}");
    assert_eq!(seen.lock().expect("lock").len(), 1, "called once");

    let dlq_topic = env.topic("switchyard.dlq");
    let dead_letters = |of_reason: fn(&switchyard::kafka::Input) -> bool, n: usize| {
        read_topic_matching(
            &env.loaded.config.kafka.brokers,
            &dlq_topic,
            n,
            Duration::from_secs(30),
            of_reason,
        )
    };
    let tool_failed = |n: usize| dead_letters(|r| dlq_reason(r, b"tool_failed"), n);
    // A tool that keeps failing: its action is dead-lettered (tool_failed); once the tool is
    // fixed, `switchyard dlq redrive` sends it again and it is called again — not skipped as an
    // action carried out before.
    env.publish(
        "switchyard.actions",
        &[action("act-flaky", "flaky", "search", json!({"n": 1}))],
    )
    .await;
    let failed = tool_failed(1).await;
    assert_eq!(failed.len(), 1);
    let tries = flaky_calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(tries, 3, "a 500 is tried three times");
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    // (On the Redis the stage runs on: it remembers what was redriven.)
    let redis_url = format!("redis://127.0.0.1:{redis_port}/");
    cli(
        &env,
        &[
            "--redis",
            &redis_url,
            "dlq",
            "redrive",
            "--reason",
            "tool_failed",
        ],
    );
    let calls = calls_of(4).await;
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(
        (&calls[2]["tool"], &calls[2]["outcome"]),
        (&json!("flaky"), &json!("error"))
    );
    assert_eq!(
        (&calls[3]["tool"], &calls[3]["outcome"]),
        (&json!("flaky"), &json!("executed")),
        "{calls:?}"
    );
    assert_eq!(
        flaky_calls.load(std::sync::atomic::Ordering::SeqCst),
        tries + 1,
        "called once more"
    );
    // A request the tool refuses (422) is not sent again: one call, then its dead letter.
    env.publish(
        "switchyard.actions",
        &[action("act-refused", "flaky", "search2", json!({"n": 2}))],
    )
    .await;
    let failed = tool_failed(2).await;
    assert_eq!(failed.len(), 2);
    assert_eq!(
        flaky_calls.load(std::sync::atomic::Ordering::SeqCst),
        tries + 2,
        "a refused request is not retried"
    );
    // An MCP tool that reports an error ran (and failed): not called again — MCP has no standard
    // idempotency key — but dead-lettered at once.
    env.publish(
        "switchyard.actions",
        &[action(
            "act-mcp-broken",
            "ops__restart_pods",
            "broken",
            json!({"service": "broken"}),
        )],
    )
    .await;
    assert_eq!(tool_failed(3).await.len(), 3);
    let broken = json_lines(&mcp_calls)
        .iter()
        .filter(|c| c["args"]["service"] == "broken")
        .count();
    assert_eq!(broken, 1, "an MCP tool's own error is not retried");
    // Read eight days after it was written (the group's offsets lost): an action carried out then
    // is skipped as ever while its marker lasts; one whose marker is gone (or never was) is not
    // called — it may have been — but dead-lettered.
    let eight_days_ago = chrono::Utc::now().timestamp_millis() - 8 * 86_400_000;
    let mcp_before = json_lines(&mcp_calls).len();
    let tickets_before = seen.lock().expect("lock").len();
    for ev in [
        action(
            "act-mcp",
            "ops__restart_pods",
            "checkout",
            json!({"service": "checkout", "reason": "leaking replicas"}),
        ),
        action(
            "act-forgotten",
            "ticket",
            "billing",
            json!({"service": "billing", "title": "old"}),
        ),
    ] {
        env.publish_at("switchyard.actions", &ev, eight_days_ago)
            .await;
    }
    let expired = dead_letters(|r| dlq_reason(r, b"expired_action"), 1).await;
    assert_eq!(expired.len(), 1);
    assert!(
        String::from_utf8_lossy(&expired[0].payload).contains("act-forgotten"),
        "the forgotten one"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(json_lines(&mcp_calls).len(), mcp_before, "not called again");
    assert_eq!(
        seen.lock().expect("lock").len(),
        tickets_before,
        "not called"
    );
    // The MCP server restarts (the session switchyard held is gone with it): an action sent right
    // after is carried out once.
    drop(_mcp);
    let _mcp = start_mcp();
    // Sent as soon as it listens (before anything else talks to it).
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", mcp_port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = calls_of(0).await.len();
    env.publish(
        "switchyard.actions",
        &[action(
            "act-mcp-after-restart",
            "ops__restart_pods",
            "payments",
            json!({"service": "payments"}),
        )],
    )
    .await;
    let calls = calls_of(before + 1).await;
    assert_eq!(
        calls.last().map(|c| (&c["tool"], &c["outcome"])),
        Some((&json!("ops__restart_pods"), &json!("executed"))),
        "{calls:?}"
    );
    let payments = json_lines(&mcp_calls)
        .iter()
        .filter(|c| c["args"]["service"] == "payments")
        .count();
    assert_eq!(payments, 1);
    // An action written before this Redis's epoch began (here: before the test started it; in
    // life, before `switchyard recover` rebuilt a lost state, which knows nothing of the tools'
    // markers) is not called either: it may have been carried out before.
    let tickets_before = seen.lock().expect("lock").len();
    env.publish_at(
        "switchyard.actions",
        &action(
            "act-before-epoch",
            "ticket",
            "ledger",
            json!({"service": "ledger", "title": "from before"}),
        ),
        chrono::Utc::now().timestamp_millis() - 10 * 60_000,
    )
    .await;
    let expired = dead_letters(|r| dlq_reason(r, b"expired_action"), 2).await;
    assert_eq!(expired.len(), 2);
    let detail = expired[1]
        .headers
        .iter()
        .find(|(k, _)| k == "switchyard.dlq.detail")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    assert!(
        detail.contains("before Redis's state was rebuilt"),
        "{detail}"
    );
    assert_eq!(
        seen.lock().expect("lock").len(),
        tickets_before,
        "not called"
    );
    running.stop().await;
}

/// Whether dead letter `r` was written for `reason`.
fn dlq_reason(r: &switchyard::kafka::Input, reason: &[u8]) -> bool {
    r.headers
        .iter()
        .any(|(k, v)| k == "switchyard.dlq.reason" && v == reason)
}
