//! The AI gateway against the LLM stand-in (llmock, the real OpenAI HTTP protocol) and the stack's
//! Redis: fallback, Retry-After, shared cooldowns, rate limits and budgets held by several gateway
//! instances at once, and the served OpenAI-compatible endpoint driven by the official `openai`
//! Python client.
//!
//! Each test names its own models (llmock matches scenarios by model), so tests share one stand-in.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use common::*;
use switchyard::gateway::{Caller, Gateway, GatewayConfig, GatewayError};
use switchyard::governance::budgets::{BudgetSpec, Budgets, RedisBudgetStore};
use switchyard::records::AuditData;
use switchyard::store::RedisConn;

/// One gateway instance over the stack's Redis (several built with the same `prefix` share all
/// their state, as separate processes do).
fn gateway(prefix: &str, yaml: &str, budgets: &str) -> Arc<Gateway> {
    let yaml = yaml.replace("$LLM", &llm_base());
    let cfg: GatewayConfig = serde_yaml::from_str(&yaml).expect("gateway config parses");
    let specs: Vec<BudgetSpec> = if budgets.is_empty() {
        Vec::new()
    } else {
        serde_yaml::from_str(budgets).expect("budgets parse")
    };
    let conn = RedisConn::new(&stack().1).expect("redis url");
    let budgets = Arc::new(Budgets::new(
        Arc::new(RedisBudgetStore::new(conn.clone())),
        prefix,
        specs,
    ));
    Arc::new(Gateway::new(cfg, conn, prefix, budgets).expect("gateway builds"))
}

/// Like [`gateway`], recording its calls: transcripts on a topic of their own (returned) and
/// `llm_call` audit records, as `switchyard run` does.
async fn recorded_gateway(prefix: &str, yaml: &str, budgets: &str) -> (Arc<Gateway>, String) {
    let gw = Arc::into_inner(gateway(prefix, yaml, budgets)).expect("one owner");
    let calls = format!("{prefix}.llm-calls");
    let (audit, _) = audit_recorder(prefix, &[&calls]).await;
    let recorder = switchyard::gateway::Recorder {
        audit,
        calls_topic: calls.clone(),
    };
    (Arc::new(gw.with_recorder(recorder)), calls)
}

/// An audit recorder as `switchyard run` makes it, writing to `<prefix>.audit` (created, with
/// `more` topics), and its producer.
async fn audit_recorder(
    prefix: &str,
    more: &[&str],
) -> (switchyard::audit::Recorder, switchyard::kafka::Producer) {
    let audit = format!("{prefix}.audit");
    let defs: Vec<switchyard::topics::TopicDef> = more
        .iter()
        .copied()
        .chain([audit.as_str()])
        .map(|t| {
            serde_yaml::from_str(&format!(
                "name: {t}\npartitions: 1\nkey: task id\nencoding: json\n"
            ))
            .expect("topic definition")
        })
        .collect();
    let kafka = switchyard::kafka::KafkaConfig {
        brokers: stack().0.clone(),
        ..Default::default()
    };
    switchyard::topics::apply(
        &switchyard::kafka::admin_config(&kafka),
        &defs.iter().collect::<Vec<_>>(),
        Duration::from_secs(15),
    )
    .await
    .expect("topics");
    let producer = switchyard::kafka::Producer::new(&switchyard::kafka::producer_config(&kafka))
        .expect("producer");
    let conn = RedisConn::new(&stack().1).expect("redis url");
    let sealer = Arc::new(switchyard::audit::Sealer::new(
        Arc::new(switchyard::audit::RedisChainStore::new(conn, prefix)),
        &audit,
    ));
    let emitter = switchyard::records::Emitter::new(Default::default(), Default::default());
    (
        switchyard::audit::Recorder::new(emitter, sealer, producer.clone()),
        producer,
    )
}

fn caller() -> Caller {
    Caller {
        tenant: "default".into(),
        agent: "tester".into(),
        workflow: String::new(),
        task: "t-1".into(),
        resource: "checkout".into(),
        traceparent: None,
    }
}

fn ask(text: &str) -> Map<String, Value> {
    let Value::Object(m) =
        json!({"messages": [{"role": "user", "content": text}], "max_tokens": 8})
    else {
        unreachable!()
    };
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_429_and_5xx_honours_retry_after_and_shares_cooldowns() {
    let s = suffix();
    let yaml = format!(
        r#"
providers:
  mock: {{base_url: "$LLM", api_key: "k-{s}"}}
aliases:
  analyst:
    candidates:
      - {{provider: mock, model: "a-{s}"}}
      - {{provider: mock, model: "b-{s}"}}
  strict:
    candidates: [{{provider: mock, model: "c-{s}"}}]
  patient:
    candidates: [{{provider: mock, model: "p-{s}"}}]
retries: 1
backoff_ms: 50
cooldown: {{failures: 2, seconds: 30}}
"#
    );
    let gw = gateway(&s, &yaml, "");
    // A 429 with Retry-After: 1 on the first candidate: the retry waits, then succeeds there.
    scenario(json!([{"type": "fail", "status": 429, "retry_after": 1, "times": 1, "match": {"model": format!("a-{s}")}}])).await;
    let t0 = Instant::now();
    let c = gw
        .complete(&caller(), "analyst", &ask("hello"))
        .await
        .expect("answered");
    assert_eq!(c.meta.model, format!("a-{s}"));
    assert_eq!(c.meta.attempts, 2);
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "Retry-After was not honoured: {:?}",
        t0.elapsed()
    );
    assert!(c.body["choices"][0]["message"].is_object(), "{}", c.body);
    assert!(c.meta.usage.input > 0 && !c.meta.usage_estimated);

    // 503s on the first candidate: its retries are spent, the second answers.
    scenario(
        json!([{"type": "fail", "status": 503, "times": 2, "match": {"model": format!("a-{s}")}}]),
    )
    .await;
    let c = gw
        .complete(&caller(), "analyst", &ask("hello"))
        .await
        .expect("answered");
    assert_eq!(c.meta.model, format!("b-{s}"));
    assert_eq!(c.meta.attempts, 3);

    // Two failures in a row (the success before reset the count): the candidate cools down for
    // every instance. Another instance (same Redis) skips it at once.
    let other = gateway(&s, &yaml, "");
    let c = other
        .complete(&caller(), "analyst", &ask("hello"))
        .await
        .expect("answered");
    assert_eq!(c.meta.model, format!("b-{s}"), "the cooldown is shared");
    assert_eq!(c.meta.attempts, 1);

    // A 400 is the request's fault: not retried, no fallback.
    scenario(
        json!([{"type": "fail", "status": 400, "times": 1, "match": {"model": format!("c-{s}")}}]),
    )
    .await;
    match gw.complete(&caller(), "strict", &ask("hello")).await {
        Err(GatewayError::BadRequest(m)) => assert!(m.contains("400"), "{m}"),
        other => panic!("expected a bad request, got {other:?}"),
    }
    // Unknown model.
    assert!(matches!(
        gw.complete(&caller(), "nope", &ask("hello")).await,
        Err(GatewayError::UnknownModel(_))
    ));
    // A provider that is down: every candidate fails, the error says so.
    let down = gateway(
        &s,
        &format!(
            "providers: {{gone: {{base_url: \"http://127.0.0.1:{}/v1\"}}}}\nretries: 0\naliases: {{x: {{candidates: [{{provider: gone, model: m}}]}}}}",
            free_port()
        ),
        "",
    );
    match down.complete(&caller(), "x", &ask("hello")).await {
        Err(GatewayError::ProviderFailed(m)) => assert!(m.contains("gone/m"), "{m}"),
        other => panic!("expected a provider failure, got {other:?}"),
    }
    // A caller that gives up while its call waits out a Retry-After: the retry is never sent
    // (nobody would read its answer, and the provider would bill it).
    scenario(json!([{"type": "fail", "status": 429, "retry_after": 2, "times": 1, "match": {"model": format!("p-{s}")}}])).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        gw.complete(&caller(), "patient", &ask("hello")),
    )
    .await;
    assert!(gave_up.is_err(), "the caller gave up during the wait");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        llm_requests(&format!("p-{s}")).await.len(),
        1,
        "only the first attempt was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_overspend_a_budget_or_exceed_a_rate_limit() {
    let s = suffix();
    // Output costs 1 per token; the alias caps answers at 8 tokens, so each call holds 8 + its
    // input. The budget fits about ten calls.
    let yaml = format!(
        r#"
providers:
  mock: {{base_url: "$LLM", api_key: "k-{s}"}}
aliases:
  cheap:
    max_tokens: 8
    candidates: [{{provider: mock, model: "m-{s}"}}]
  limited:
    candidates: [{{provider: mock, model: "r-{s}"}}]
prices:
  "m-{s}": {{input: 100000, output: 1000000}}
limits:
  - {{provider: mock, model: "r-{s}", rpm: 5, on_limit: failover}}
"#
    );
    let budgets = format!(
        "- {{name: llm-{s}, per: model, matches: cheap, period: total, max_cost: 100.0}}\n"
    );
    let a = gateway(&s, &yaml, &budgets);
    let b = gateway(&s, &yaml, &budgets);
    // The stand-in does not shorten answers to max_tokens (real providers do): script short ones.
    scenario(json!([{"type": "reply", "text": "Twelve.", "times": 100, "match": {"model": format!("m-{s}")}}])).await;
    let mut calls = Vec::new();
    for i in 0..100 {
        let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn(async move {
            gw.complete(&caller(), "cheap", &ask("how much?")).await
        }));
    }
    let (mut ok, mut refused, mut spent) = (0, 0, 0.0);
    for c in calls {
        match c.await.expect("join") {
            Ok(c) => {
                ok += 1;
                spent += c.meta.cost;
            }
            Err(GatewayError::BudgetExhausted { budget }) => {
                assert_eq!(budget, format!("llm-{s}"));
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert!(spent <= 100.0 + 1e-9, "spent {spent} of a budget of 100");
    // What Redis holds agrees with what the calls cost (every hold settled, nothing left held).
    let (calls_n, cost, held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:llm-{s}:cheap:total")).await;
    assert_eq!(calls_n, ok as u64);
    assert!(
        (cost - spent).abs() < 1e-6,
        "redis says {cost}, calls cost {spent}"
    );
    assert_eq!(held, 0, "every hold was settled");

    // Five requests a minute, for both instances together.
    let mut calls = Vec::new();
    for i in 0..20 {
        let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn(async move {
            gw.complete(&caller(), "limited", &ask("hi")).await
        }));
    }
    let mut ok = 0;
    for c in calls {
        match c.await.expect("join") {
            Ok(_) => ok += 1,
            Err(GatewayError::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO)
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    // One refill step (12 s at 5/min) cannot pass during the test.
    assert_eq!(
        ok, 5,
        "two instances together let {ok} requests through a limit of 5/min"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_endpoint_works_with_the_official_openai_client() {
    let s = suffix();
    let key = format!("sk-{s}");
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let yaml = format!(
        r#"
providers:
  mock: {{base_url: "$LLM", api_key: "k-{s}"}}
aliases:
  analyst:
    candidates: [{{provider: mock, model: "s-{s}"}}]
prices:
  "s-{s}": {{input: 1.0, output: 2.0}}
keys:
  - {{name: python-agent, tenant: default, key_sha256: "{digest}"}}
"#
    );
    let gw = gateway(&s, &yaml, "");
    let app = switchyard::gateway::served::router(gw);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}/v1");

    // Raw HTTP: errors in OpenAI's shape.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/chat/completions"))
        .json(&json!({"model": "analyst", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let r = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{base}/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("answer");
    let models: Value = r.json().await.expect("json");
    assert!(
        models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "analyst")),
        "{models}"
    );

    // The official client, plain and streamed.
    let script = r#"
import json, sys, openai
base, key, model = sys.argv[1:4]
c = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}])
out["text"] = r.choices[0].message.content
out["usage"] = r.usage.total_tokens
parts, usage = [], None
for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}],
                                    stream=True, stream_options={"include_usage": True}):
    if ch.choices:
        parts.append(ch.choices[0].delta.content or "")
    if ch.usage:
        usage = ch.usage.total_tokens
out["stream_text"], out["stream_usage"] = "".join(parts), usage
try:
    c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}])
except openai.AuthenticationError as e:
    out["bad_key"] = e.status_code
print(json.dumps(out))
"#;
    let python = stack_dir().join("venv/bin/python");
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&base)
        .arg(&key)
        .arg("analyst")
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("script prints JSON");
    assert!(got["text"].as_str().is_some_and(|t| !t.is_empty()), "{got}");
    assert!(got["usage"].as_u64().is_some_and(|u| u > 0), "{got}");
    assert!(
        got["stream_text"].as_str().is_some_and(|t| !t.is_empty()),
        "{got}"
    );
    assert!(got["stream_usage"].as_u64().is_some_and(|u| u > 0), "{got}");
    assert_eq!(got["unknown_model"], 404, "{got}");
    assert_eq!(got["bad_key"], 401, "{got}");

    // The streamed call was settled and accounted like the plain one.
    let m = switchyard::telemetry::METRICS.render();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("switchyard_llm_requests_total")
                && l.contains(&format!("s-{s}"))
                && l.contains("outcome=\"ok\"")
        })
        .unwrap_or_default()
        .to_string();
    assert!(line.ends_with(" 2"), "two calls counted ok: {line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_audited_without_its_prompt_and_its_transcript_is_on_the_llm_calls_topic() {
    let port = free_port();
    let s = suffix();
    let key = format!("sk-{s}");
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let env = TestEnv::new(
        2,
        &format!(
            r#"
http:
  enabled: true
  listen: 127.0.0.1:{port}
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    analyst:
      candidates: [{{provider: mock, model: "e-{s}"}}]
  prices:
    "e-{s}": {{input: 1.0, output: 2.0}}
  keys:
    - {{name: incident-bot, tenant: default, key_sha256: "{digest}"}}
"#,
            llm = llm_base()
        ),
    )
    .await;
    let running = env.start(&["route"]);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let secret_prompt = format!("the prompt {s} stays out of the audit trail");
    let mut answer = None;
    for _ in 0..100 {
        let r = http
            .post(&url)
            .bearer_auth(&key)
            .header("X-Switchyard-Task", "task-42")
            .header("X-Switchyard-Resource", "checkout")
            .json(&json!({"model": "analyst", "messages": [{"role": "user", "content": secret_prompt}]}))
            .send()
            .await;
        if let Ok(r) = r {
            answer = Some((r.status(), r.json::<Value>().await.unwrap_or_default()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = answer.expect("switchyard's http port answers");
    assert_eq!(status, 200, "{body}");
    assert!(
        body["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{body}"
    );

    let v = env.verified_audit(1, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let recs = env.audit(1, Duration::from_secs(10)).await;
    let calls: Vec<AuditData> = recs
        .iter()
        .map(|r| serde_json::from_value(data_of(&event_of(r)).clone()).expect("audit data"))
        .filter(|a: &AuditData| a.decision == "llm_call")
        .collect();
    assert_eq!(calls.len(), 1, "one llm_call record");
    let a = &calls[0];
    assert_eq!(a.resource, "checkout");
    assert_eq!(a.task_id.as_deref(), Some("task-42"));
    assert_eq!(a.detail["agent"], "incident-bot");
    assert_eq!(a.detail["provider_model"], format!("e-{s}"));
    assert_eq!(a.detail["outcome"], "ok");
    assert!(a.detail["input_tokens"].as_u64().is_some_and(|t| t > 0));
    assert!(a.detail["cost"].as_f64().is_some_and(|c| c > 0.0));
    let raw: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .collect();
    assert!(
        !raw.iter().any(|p| p.contains(&secret_prompt)),
        "the prompt leaked into the audit topic"
    );
    // The transcript (prompt and answer) is on the llm-calls topic, keyed by the task.
    let t = read_topic(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.llm-calls"),
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(t.len(), 1, "one transcript");
    assert_eq!(t[0].key.as_deref(), Some(&b"task-42"[..]));
    let ev = event_of(&t[0]);
    let d = data_of(&ev);
    assert_eq!(d["request"]["messages"][0]["content"], secret_prompt);
    assert!(d["response"]["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(d["truncated"], false);
    assert!(d["meta"]["cost"].as_f64().is_some_and(|c| c > 0.0));
    running.stop().await;
}

/// HGET calls and cost of a budget bucket, and how many holds are open — once every hold is
/// settled or after 5 s (a call's books are settled just after its answer went out).
async fn budget_state(prefix: &str, key: &str) -> (u64, f64, u64) {
    let mut conn = redis_connection(stack().1.as_str()).await;
    let mut held = 0;
    for _ in 0..100 {
        held = redis::cmd("ZCARD")
            .arg(format!("{prefix}:budget:{{budgets}}:holds"))
            .query_async(&mut conn)
            .await
            .expect("zcard");
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (n, c): (Option<u64>, Option<f64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("calls")
        .arg("cost")
        .query_async(&mut conn)
        .await
        .expect("bucket");
    (n.unwrap_or(0), c.unwrap_or(0.0), held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_usage_broken_answers_and_broken_streams_are_accounted() {
    use axum::response::IntoResponse;
    let s = suffix();
    // A server speaking the OpenAI protocol badly, as some OpenAI-compatible servers do: an answer
    // without usage, a body that is not JSON, and a JSON body without choices.
    let odd = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|axum::Json(body): axum::Json<Value>| async move {
            match body["model"].as_str() {
                Some("no-usage") => axum::Json(json!({"id": "c1", "object": "chat.completion", "created": 0, "model": "no-usage",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "forty bytes of an answer without usage"}, "finish_reason": "stop"}]}))
                .into_response(),
                Some("not-json") => "{\"choices\": [".into_response(),
                _ => axum::Json(json!({"id": "c2"})).into_response(),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let odd_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, odd).await });
    // A provider that takes the request and hangs up without answering (a proxy resetting a long
    // answer): the request went out, so the provider may have run and billed it.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hang_port = hang.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = hang.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 65536];
                let _ = tokio::time::timeout(Duration::from_millis(300), sock.read(&mut buf)).await;
                drop(sock);
            });
        }
    });
    // llmock serves Anthropic's Messages API under /anthropic.
    let anthropic = format!("{}/anthropic/v1", llm_base().trim_end_matches("/v1"));
    let yaml = format!(
        r#"
providers:
  odd: {{base_url: "http://127.0.0.1:{odd_port}/v1"}}
  hang: {{base_url: "http://127.0.0.1:{hang_port}/v1"}}
  mock: {{base_url: "$LLM", api_key: "k-{s}"}}
  claude: {{kind: anthropic, base_url: "{anthropic}", api_key: "k-{s}"}}
aliases:
  hangup:
    candidates: [{{provider: hang, model: hang-up}}]
  nousage:
    candidates: [{{provider: odd, model: no-usage}}]
  broken:
    candidates: [{{provider: odd, model: not-json}}, {{provider: odd, model: no-choices}}, {{provider: mock, model: "ok-{s}"}}]
  allbroken:
    candidates: [{{provider: odd, model: not-json}}, {{provider: odd, model: no-choices}}]
  streamy:
    candidates: [{{provider: mock, model: "st-{s}"}}]
  media:
    candidates: [{{provider: mock, model: "md-{s}"}}]
  messages:
    candidates: [{{provider: claude, model: "an-{s}"}}]
prices:
  "an-{s}": {{input: 1000000, output: 1000000}}
  "md-{s}": {{input: 1000000, output: 1000000}}
  no-usage: {{input: 1000000, output: 1000000}}
  hang-up: {{input: 1000000, output: 1000000}}
  not-json: {{input: 1000000, output: 1000000}}
  no-choices: {{input: 1000000, output: 1000000}}
  "st-{s}": {{input: 1000000, output: 1000000}}
retries: 0
cooldown: {{failures: 100, seconds: 1}}
"#
    );
    let budgets = format!(
        "- {{name: b-{s}, per: model, matches: \"*\", period: total, max_cost: 1000000.0}}\n- {{name: m-{s}, per: model, matches: media, period: total, max_cost: 1000.0}}\n"
    );
    let (gw, calls_topic) = recorded_gateway(&s, &yaml, &budgets).await;

    // No usage: the answer is kept, its tokens estimated and flagged, and the budget charged that.
    let c = gw
        .complete(&caller(), "nousage", &ask("hello"))
        .await
        .expect("answered");
    assert!(c.meta.usage_estimated);
    assert_eq!(
        c.meta.usage.output, 10,
        "40 bytes of answer, about 4 a token"
    );
    let (calls, cost, held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:b-{s}:nousage:total")).await;
    assert_eq!((calls, held), (1, 0));
    assert!(
        (cost - c.meta.cost).abs() < 1e-9 && cost > 0.0,
        "{cost} vs {}",
        c.meta.cost
    );

    // Not JSON, then no choices: both are the provider's fault; the third candidate answers.
    // The two answers that could not be read were most likely billed: each is charged its
    // estimate (input and the 8-token cap, $1 a token), the answer itself (unpriced) nothing.
    let c = gw
        .complete(&caller(), "broken", &ask("hello"))
        .await
        .expect("answered by the fallback");
    assert_eq!(c.meta.model, format!("ok-{s}"));
    assert_eq!(c.meta.attempts, 3);
    assert!(
        c.meta.cost >= 2.0 * 9.0,
        "failed attempts charged: {}",
        c.meta.cost
    );
    let (calls, cost, held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:b-{s}:broken:total")).await;
    assert_eq!((calls, held), (1, 0));
    assert!(
        (cost - c.meta.cost).abs() < 1e-9,
        "{cost} vs {}",
        c.meta.cost
    );

    // Every candidate's answer unreadable: the call fails, and what its two attempts were
    // charged (the budget's cost) is in its record too, with its attempts.
    let e = gw
        .complete(&caller(), "allbroken", &ask("hello"))
        .await
        .expect_err("no candidate answered");
    assert_eq!(e.outcome(), "provider_failed");
    let (calls, cost, held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:b-{s}:allbroken:total")).await;
    assert_eq!(held, 0);
    assert!(
        cost >= 2.0 * 9.0,
        "failed attempts charged: {cost} ({calls} calls)"
    );
    let failed = transcripts(&calls_topic, "allbroken", 1)
        .await
        .pop()
        .unwrap_or_default();
    assert_eq!(failed["outcome"], "provider_failed", "{failed}");

    // An image is held at gateway.media_part_tokens (2,000 at $1 a token: over the $1,000 budget),
    // not at the few bytes of its URL; the same text alone fits.
    gw.complete(&caller(), "media", &ask("look"))
        .await
        .expect("text alone fits the budget");
    let mut with_image = ask("look");
    with_image["messages"][0]["content"] = json!([
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://img.example/a.png", "detail": "high"}}
    ]);
    let e = gw
        .complete(&caller(), "media", &with_image)
        .await
        .expect_err("the image's tokens are held");
    assert_eq!(e.outcome(), "budget_exhausted", "{e}");

    // The connection broke after the request went out: charged its estimate, not nothing.
    let e = gw
        .complete(&caller(), "hangup", &ask("hello"))
        .await
        .expect_err("no answer");
    assert_eq!(e.outcome(), "provider_failed");
    let (_, hang_cost, hang_held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:b-{s}:hangup:total")).await;
    assert_eq!(hang_held, 0);
    assert!(
        hang_cost >= 9.0,
        "a broken connection is charged: {hang_cost}"
    );
    assert_eq!(failed["meta"]["attempts"], 2, "{failed}");
    assert_eq!(
        failed["meta"]["model"], "no-choices",
        "the last tried: {failed}"
    );
    let recorded = failed["meta"]["cost"].as_f64().unwrap_or(0.0);
    assert!(
        (recorded - cost).abs() < 1e-9,
        "the record says what the budget was charged: {recorded} vs {cost}"
    );

    // A stream cut short (no usage, no finish): what arrived is passed on, the call is settled
    // on an estimate, and nothing stays held.
    scenario(json!([{"type": "stream_fault", "kind": "truncate", "after_chunks": 2, "match": {"model": format!("st-{s}"), "stream": true}}])).await;
    let (_, chunks) = gw
        .stream(&caller(), "streamy", &ask("hello"))
        .await
        .expect("stream opens");
    let got: Vec<_> = futures::StreamExt::collect::<Vec<_>>(chunks).await;
    assert!(!got.is_empty() && got.iter().all(Result::is_ok));
    // A malformed chunk surfaces as an error item.
    scenario(json!([{"type": "stream_fault", "kind": "malformed", "after_chunks": 1, "match": {"model": format!("st-{s}"), "stream": true}}])).await;
    let (_, chunks) = gw
        .stream(&caller(), "streamy", &ask("hello"))
        .await
        .expect("stream opens");
    let got: Vec<_> = futures::StreamExt::collect::<Vec<_>>(chunks).await;
    assert!(
        got.iter().any(Result::is_err),
        "a malformed chunk is reported"
    );
    // Anthropic's protocol (llmock speaks it too): an answer and a stream carry the provider's
    // usage, input and output, not an estimate (a stream's input comes with message_start, its
    // output with message_delta).
    let c = gw
        .complete(&caller(), "messages", &ask("hello"))
        .await
        .expect("answered");
    assert!(!c.meta.usage_estimated, "{:?}", c.meta);
    assert!(
        c.meta.usage.input > 0 && c.meta.usage.output > 0,
        "{:?}",
        c.meta
    );
    let (_, chunks) = gw
        .stream(&caller(), "messages", &ask("hello"))
        .await
        .expect("stream opens");
    let got: Vec<Value> = futures::StreamExt::collect::<Vec<_>>(chunks)
        .await
        .into_iter()
        .map(|c| c.expect("chunk"))
        .collect();
    let usage = got
        .iter()
        .filter_map(|c| c.get("usage").filter(|u| !u.is_null()))
        .next_back()
        .expect("the stream's usage");
    assert!(
        usage["prompt_tokens"].as_u64() > Some(0) && usage["completion_tokens"].as_u64() > Some(0),
        "{usage}"
    );
    let key = format!("{s}:budget:{{budgets}}:b-{s}:streamy:total");
    let mut state = (0, 0.0, 1);
    for _ in 0..50 {
        state = budget_state(&s, &key).await;
        if state.0 == 2 && state.2 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (calls, cost, held) = state;
    assert_eq!((calls, held), (2, 0), "both streams settled");
    assert!(cost > 0.0);
    // A caller that goes away while its stream opens (the provider is slow to its first chunk):
    // the call goes on without it and is settled — its hold does not block the budget until the
    // sweep.
    scenario(json!([{"type": "delay", "seconds": 2, "match": {"model": format!("st-{s}"), "stream": true}}])).await;
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        gw.stream(&caller(), "streamy", &ask("hello")),
    )
    .await;
    assert!(gone.is_err(), "the caller gave up first");
    // (Each look waits up to 5 s for the holds to go.)
    for _ in 0..4 {
        state = budget_state(&s, &key).await;
        if state.0 == 3 && state.2 == 0 {
            break;
        }
    }
    assert_eq!(
        (state.0, state.2),
        (3, 0),
        "the stream whose caller left before its first chunk was settled"
    );
    // Recorded as what happened: the stream cut short (no finish) and the malformed one failed;
    // one whose caller stops reading is abandoned; a whole one is ok.
    let (_, mut chunks) = gw
        .stream(&caller(), "streamy", &ask("hello"))
        .await
        .expect("stream opens");
    let _first = futures::StreamExt::next(&mut chunks).await;
    drop(chunks);
    // (Scenarios are replaced, not added: one matching no call clears the delay.)
    scenario(json!([{"type": "delay", "seconds": 0, "match": {"model": "no-such-model"}}])).await;
    let (_, chunks) = gw
        .stream(&caller(), "streamy", &ask("hello"))
        .await
        .expect("stream opens");
    let got: Vec<_> = futures::StreamExt::collect::<Vec<_>>(chunks).await;
    assert!(got.iter().all(Result::is_ok));
    // (One of the abandoned: the stream whose caller left before its first chunk, read on by
    // nobody. Records are written in the background: compared as a set.)
    assert_eq!(
        outcomes(&calls_topic, "streamy", 5).await,
        [
            "ok",
            "stream_abandoned",
            "stream_abandoned",
            "stream_failed",
            "stream_failed"
        ],
    );
}

/// A caller that leaves while its call waits for room under a rate limit (`on_limit: wait`) ends
/// the call at once: nothing is sent (not even once the room comes), its budget hold is given back
/// at once (not held until the wait would have ended, a minute here), and its record says
/// `caller_gone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_during_a_rate_limit_wait_ends_its_call_at_once() {
    let s = suffix();
    let yaml = format!(
        r#"
providers:
  mock: {{base_url: "$LLM", api_key: "k-{s}"}}
aliases:
  queued:
    max_tokens: 8
    candidates: [{{provider: mock, model: "w-{s}"}}]
prices:
  "w-{s}": {{input: 1000, output: 1000}}
limits:
  - {{provider: mock, model: "w-{s}", rpm: 1, on_limit: wait, max_wait_ms: 120000}}
"#
    );
    let budgets = format!(
        "- {{name: b-{s}, per: model, matches: \"*\", period: total, max_cost: 1000000.0}}\n"
    );
    let (gw, calls_topic) = recorded_gateway(&s, &yaml, &budgets).await;
    gw.complete(&caller(), "queued", &ask("first"))
        .await
        .expect("the first call has room");
    // The second waits for the next minute's room; its caller gives up after half a second.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        gw.complete(&caller(), "queued", &ask("second")),
    )
    .await;
    assert!(gave_up.is_err(), "the caller gave up during the wait");
    // (budget_state waits up to 5 s for the holds to go.)
    let (_, _, held) =
        budget_state(&s, &format!("{s}:budget:{{budgets}}:b-{s}:queued:total")).await;
    assert_eq!(
        held, 0,
        "the waiting call's hold was given back when its caller left"
    );
    assert_eq!(
        outcomes(&calls_topic, "queued", 2).await,
        ["caller_gone", "ok"]
    );
    assert_eq!(
        llm_requests(&format!("w-{s}")).await.len(),
        1,
        "only the first call was sent"
    );
}

/// The transcripts on `calls_topic` of calls that asked for `model`, once at least `want` are
/// there (or after 20 tries): records are written in the background.
async fn transcripts(calls_topic: &str, model: &str, want: usize) -> Vec<Value> {
    let mut found = Vec::new();
    for _ in 0..20 {
        found = read_topic(&stack().0, calls_topic, 50, Duration::from_secs(2))
            .await
            .iter()
            .map(|r| data_of(&event_of(r)).clone())
            .filter(|d| d["model"] == model)
            .collect();
        if found.len() >= want {
            break;
        }
    }
    found
}

/// The outcomes of [`transcripts`], sorted.
async fn outcomes(calls_topic: &str, model: &str, want: usize) -> Vec<String> {
    let mut o: Vec<String> = transcripts(calls_topic, model, want)
        .await
        .iter()
        .map(|d| d["outcome"].as_str().unwrap_or("").to_string())
        .collect();
    o.sort();
    o
}

/// `n` chat completions through the served endpoints of `ports` (alternating), all at once:
/// (status, Retry-After header) of each.
async fn burst(ports: &[u16], key: &str, model: &str, n: usize) -> Vec<(u16, Option<String>)> {
    let http = reqwest::Client::new();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("http://127.0.0.1:{}/v1/chat/completions", ports[i % ports.len()]);
            let (http, key, model) = (http.clone(), key.to_string(), model.to_string());
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({"model": model, "messages": [{"role": "user", "content": "how much?"}]}))
                    .send()
                    .await
                    .expect("switchyard answers");
                let after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                (r.status().as_u16(), after)
            })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_switchyard_processes_hold_one_budget_and_one_rate_limit() {
    let s = suffix();
    let key = format!("sk-{s}");
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let env = TestEnv::new(
        1,
        &format!(
            r#"
http:
  enabled: true
governance:
  budgets:
    - {{name: llm-{s}, per: model, matches: cheap, period: total, max_cost: 100.0}}
gateway:
  providers:
    mock: {{base_url: "{llm}", api_key: "k-{s}"}}
  aliases:
    cheap: {{max_tokens: 8, candidates: [{{provider: mock, model: "p-{s}"}}]}}
    limited: {{candidates: [{{provider: mock, model: "q-{s}"}}]}}
  prices:
    "p-{s}": {{input: 100000, output: 1000000}}
  limits:
    - {{provider: mock, model: "q-{s}", rpm: 5, on_limit: failover}}
  keys:
    - {{name: bot, tenant: default, key_sha256: "{digest}"}}
"#,
            llm = llm_base()
        ),
    )
    .await;
    let ports = [free_port(), free_port()];
    let _procs: Vec<Reaper> = ports
        .iter()
        .map(|p| {
            Reaper(
                std::process::Command::new(bin())
                    .arg("--config")
                    .arg(config_path(&env))
                    .arg("run")
                    .env("SWITCHYARD_HTTP_LISTEN", format!("127.0.0.1:{p}"))
                    .env("RUST_LOG", "warn")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("switchyard starts"),
            )
        })
        .collect();
    let http = reqwest::Client::new();
    for p in ports {
        let mut up = false;
        for _ in 0..200 {
            let r = http
                .get(format!("http://127.0.0.1:{p}/v1/models"))
                .bearer_auth(&key)
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "switchyard on port {p} serves the gateway");
    }
    // Short scripted answers (the stand-in ignores max_tokens; real providers honour it).
    scenario(json!([{"type": "reply", "text": "Twelve.", "times": 100, "match": {"model": format!("p-{s}")}}])).await;
    let got = burst(&ports, &key, "cheap", 100).await;
    let ok = got.iter().filter(|(st, _)| *st == 200).count();
    let refused = got.iter().filter(|(st, _)| *st == 429).count();
    assert_eq!(ok + refused, 100, "only 200 or 429: {got:?}");
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    let (calls, cost, held) = budget_state(
        &env.prefix,
        &format!("{}:budget:{{budgets}}:llm-{s}:cheap:total", env.prefix),
    )
    .await;
    assert_eq!(calls, ok as u64, "one call counted per answered request");
    assert!(
        cost <= 100.0 + 1e-9,
        "two processes spent {cost} of a budget of 100"
    );
    assert_eq!(held, 0, "every hold settled");
    // Naming the alias's candidate directly is that alias pinned to it: the same budget counts
    // (and refuses) its calls. A model no alias has is unknown (it has no price, and would be a
    // new metric series per name).
    let bucket = format!("{}:budget:{{budgets}}:llm-{s}:cheap:total", env.prefix);
    let (before, _, _) = budget_state(&env.prefix, &bucket).await;
    let got = burst(&ports, &key, &format!("mock/p-{s}"), 3).await;
    assert!(
        got.iter().all(|(st, _)| *st == 200 || *st == 429),
        "{got:?}"
    );
    let ok = got.iter().filter(|(st, _)| *st == 200).count() as u64;
    let (after, cost, _) = budget_state(&env.prefix, &bucket).await;
    assert_eq!(
        after - before,
        ok,
        "direct calls count against the alias's budget"
    );
    assert!(cost <= 100.0 + 1e-9, "spent {cost} of 100");
    let got = burst(&ports, &key, &format!("mock/unpriced-{s}"), 1).await;
    assert_eq!(got[0].0, 404, "{got:?}");

    // Five requests a minute through both processes together.
    let got = burst(&ports, &key, "limited", 20).await;
    let ok = got.iter().filter(|(st, _)| *st == 200).count();
    assert_eq!(
        ok, 5,
        "two processes let {ok} requests through a limit of 5/min: {got:?}"
    );
    assert!(got
        .iter()
        .filter(|(st, _)| *st == 429)
        .all(|(_, after)| after
            .as_deref()
            .is_some_and(|a| a.parse::<u64>().is_ok_and(|s| s >= 1))));
}

/// `on_exhausted: approve`: a call over its budget waits for a person through the approvals API;
/// approved, it goes through (and is counted over the budget); rejected, it is refused with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_budget_call_waits_for_approval_and_goes_through_only_when_approved() {
    let port = free_port();
    let s = suffix();
    let model = format!("o-{s}");
    let key = format!("sk-{s}");
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let acme_key = format!("sk-acme-{s}");
    let acme_digest = hex::encode(Sha256::digest(acme_key.as_bytes()));
    let env = TestEnv::new(
        2,
        &format!(
            r#"
http:
  enabled: true
  listen: 127.0.0.1:{port}
gateway:
  providers:
    mock: {{base_url: "{llm}"}}
  aliases:
    guarded: {{candidates: [{{provider: mock, model: "{model}"}}], on_exhausted: approve, max_tokens: 16}}
  prices:
    "{model}": {{input: 1000.0, output: 1000.0}}
  keys:
    - {{name: planner, tenant: default, key_sha256: "{digest}"}}
    - {{name: planner-acme, tenant: acme, key_sha256: "{acme_digest}"}}
  approval_covers_calls: 2
governance:
  budgets:
    - {{name: guarded-daily, per: model, matches: guarded, period: total, max_cost: 0.001}}
  approvals:
    token: "tok-{s}"
"#,
            llm = llm_base()
        ),
    )
    .await;
    let running = env.start(&["decisions"]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let call = |task: &'static str| {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .header("X-Switchyard-Task", task)
                .header("X-Switchyard-Resource", "checkout")
                .json(&json!({"model": "guarded", "messages": [{"role": "user", "content": "over budget?"}]}))
                .send()
                .await
                .expect("the gateway answers");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or_default(),
            )
        })
    };
    // The pending approval of a task's call, through the approvals API.
    let pending = |task: &'static str| {
        let (http, base, tok) = (http.clone(), base.clone(), format!("tok-{s}"));
        async move {
            for _ in 0..100 {
                let list: Value = http
                    .get(format!("{base}/v1/approvals"))
                    .bearer_auth(&tok)
                    .send()
                    .await
                    .expect("approvals API")
                    .json()
                    .await
                    .expect("JSON");
                let found = list["approvals"].as_array().and_then(|a| {
                    a.iter()
                        .find(|x| x["action_record"]["parameters"]["task"] == task)
                        .cloned()
                });
                if let Some(a) = found {
                    return a;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("no approval for {task}");
        }
    };
    let decide = |id: String, verb: &'static str| {
        let (http, base, tok) = (http.clone(), base.clone(), format!("tok-{s}"));
        async move {
            let r = http
                .post(format!("{base}/v1/approvals/{id}/{verb}"))
                .bearer_auth(&tok)
                .json(&json!({"by": "alice", "why": "the incident needs it"}))
                .send()
                .await
                .expect("approvals API");
            assert!(
                r.status().is_success(),
                "{verb}: {}",
                r.text().await.unwrap_or_default()
            );
        }
    };

    let approved = call("t-approved");
    let a = pending("t-approved").await;
    assert_eq!(a["action"], "llm.over_budget");
    assert_eq!(a["resource"], "checkout");
    assert_eq!(a["action_record"]["parameters"]["budget"], "guarded-daily");
    assert_eq!(a["action_record"]["parameters"]["agent"], "planner");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!approved.is_finished(), "the call waits for the decision");
    assert!(
        llm_requests(&model).await.is_empty(),
        "nothing reached the model yet"
    );
    decide(
        a["approval_id"].as_str().expect("id").to_string(),
        "approve",
    )
    .await;
    let (status, body) = approved.await.expect("join");
    assert_eq!(status, 200, "{body}");
    assert_eq!(llm_requests(&model).await.len(), 1);
    let a_first = a["approval_id"].clone();
    // Another tenant's caller naming the same task and resource asks for an approval of its own:
    // the first tenant's approval is neither reused nor taken over.
    let acme = {
        let (http, base, key) = (http.clone(), base.clone(), acme_key.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .header("X-Switchyard-Task", "t-approved")
                .header("X-Switchyard-Resource", "checkout")
                .json(&json!({"model": "guarded", "messages": [{"role": "user", "content": "mine?"}]}))
                .send()
                .await
                .expect("the gateway answers")
                .status()
                .as_u16()
        })
    };
    let mut acme_approval = Value::Null;
    for _ in 0..100 {
        let list: Value = http
            .get(format!("{base}/v1/approvals?tenant=acme"))
            .bearer_auth(format!("tok-{s}"))
            .send()
            .await
            .expect("approvals API")
            .json()
            .await
            .expect("JSON");
        if let Some(a) = list["approvals"].as_array().and_then(|a| a.first()) {
            acme_approval = a.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(acme_approval["tenant"], "acme", "{acme_approval}");
    assert_ne!(acme_approval["approval_id"], a_first);
    let first: Value = http
        .get(format!(
            "{base}/v1/approvals/{}",
            a_first.as_str().expect("id")
        ))
        .bearer_auth(format!("tok-{s}"))
        .send()
        .await
        .expect("approvals API")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        (&first["approval"]["tenant"], &first["approval"]["status"]),
        (&json!("default"), &json!("approved")),
        "{first}"
    );
    decide(
        acme_approval["approval_id"]
            .as_str()
            .expect("id")
            .to_string(),
        "reject",
    )
    .await;
    assert_eq!(acme.await.expect("join"), 429);
    assert_eq!(llm_requests(&model).await.len(), 1);

    let rejected = call("t-rejected");
    let a = pending("t-rejected").await;
    decide(a["approval_id"].as_str().expect("id").to_string(), "reject").await;
    let (status, body) = rejected.await.expect("join");
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("guarded-daily")),
        "{body}"
    );
    assert_eq!(
        llm_requests(&model).await.len(),
        1,
        "the rejected call never reached the model"
    );
    // The task asks again (an agent retrying): the rejection stands — refused at once, no new
    // approval asked of anyone.
    let t0 = std::time::Instant::now();
    let (status, body) = call("t-rejected").await.expect("join");
    assert_eq!(status, 429, "{body}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refused without waiting for a person: {:?}",
        t0.elapsed()
    );
    let open: Value = http
        .get(format!("{base}/v1/approvals"))
        .bearer_auth(format!("tok-{s}"))
        .send()
        .await
        .expect("approvals API")
        .json()
        .await
        .expect("JSON");
    assert!(
        !open["approvals"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["action_record"]["parameters"]["task"] == "t-rejected")),
        "no new approval for the rejected task: {open}"
    );
    assert_eq!(llm_requests(&model).await.len(), 1);
    // A caller that gives up while its call waits for a person (plain or streamed): the wait ends
    // with it, so an approval given later sends no call to the model for nobody.
    for (task, stream) in [("t-gone", false), ("t-gone-stream", true)] {
        let quitter = {
            let (http, base, key) = (http.clone(), base.clone(), key.clone());
            tokio::spawn(async move {
                http.post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(key)
                    .header("X-Switchyard-Task", task)
                    .header("X-Switchyard-Resource", "checkout")
                    .timeout(Duration::from_millis(1500))
                    .json(&json!({"model": "guarded", "stream": stream,
                                  "messages": [{"role": "user", "content": "over budget?"}]}))
                    .send()
                    .await
                    .is_err()
            })
        };
        let a = pending(task).await;
        assert!(quitter.await.expect("join"), "{task}: the caller gave up");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        decide(
            a["approval_id"].as_str().expect("id").to_string(),
            "approve",
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            llm_requests(&model).await.len(),
            1,
            "{task}: no call for a caller that went away"
        );
    }

    // The approved call is counted against the budget, over its maximum; no hold is left.
    let (calls, cost, held) = budget_state(
        &env.prefix,
        &format!(
            "{}:budget:{{budgets}}:guarded-daily:guarded:total",
            env.prefix
        ),
    )
    .await;
    assert_eq!(calls, 1, "one call counted");
    assert!(cost > 0.001, "spent {cost}, over the maximum");
    assert_eq!(held, 0, "no hold left");
    let v = env.verified_audit(4, Duration::from_secs(30)).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let decisions: Vec<String> = env
        .audit(4, Duration::from_secs(5))
        .await
        .iter()
        .filter_map(|r| serde_json::from_value::<AuditData>(data_of(&event_of(r)).clone()).ok())
        .map(|a| a.decision)
        .collect();
    for d in ["approval_requested", "approval_decided", "llm_call"] {
        assert!(
            decisions.iter().any(|x| x == d),
            "{d} audited: {decisions:?}"
        );
    }
    // One approval covers two calls of its task (approval_covers_calls: 2): the task's second
    // call goes through at once, its third asks again (a standing permit would let a caller
    // reusing one task id spend without end).
    let (status, body) = call("t-approved").await.expect("join");
    assert_eq!(status, 200, "the second call under the approval: {body}");
    assert_eq!(llm_requests(&model).await.len(), 2);
    let third = call("t-approved");
    let again = pending("t-approved").await;
    assert_ne!(
        again["approval_id"], a_first,
        "a new approval for the third call"
    );
    assert_eq!(again["action_record"]["parameters"]["round"], 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the third call waits for a person");
    decide(
        again["approval_id"].as_str().expect("id").to_string(),
        "approve",
    )
    .await;
    let (status, body) = third.await.expect("join");
    assert_eq!(status, 200, "{body}");
    assert_eq!(llm_requests(&model).await.len(), 3);
    running.stop().await;
}

/// At shutdown the audit recorder's queue is written before the process exits: records waiting
/// for the writer (model and tool calls made just before the stop) were dropped with the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_recorder_writes_what_waits_when_drained() {
    let prefix = suffix();
    let audit = format!("{prefix}.audit");
    let (recorder, producer) = audit_recorder(&prefix, &[]).await;
    const N: usize = 3000;
    for i in 0..N {
        recorder.record(
            "gateway",
            "llm_call",
            switchyard::records::AuditData {
                decision: "llm_call".into(),
                stage: "gateway".into(),
                resource: format!("r-{}", i % 7),
                tenant: "default".into(),
                event_id: None,
                task_id: Some(format!("t-{i}")),
                workflow_id: None,
                trace_id: None,
                reason: None,
                detail: json!({"n": i}),
                seq: None,
                prev_hash: None,
                hash: None,
            },
            None,
        );
    }
    assert!(recorder.waiting() > 0, "records wait for the writer");
    // Right away, as `switchyard run` does once its stages stopped: it returns once the writer
    // wrote everything and ended.
    recorder.drain(Duration::from_secs(30)).await;
    assert_eq!(recorder.waiting(), 0, "nothing left waiting");
    producer.flush(Duration::from_secs(5)).expect("flush");
    let recs = read_topic(&stack().0, &audit, N + 100, Duration::from_secs(10)).await;
    let entries = recs.iter().filter(|r| !is_seal(r)).count();
    assert_eq!(entries, N, "every recorded audit record was written");
    let v = switchyard::audit::verify(&audit_records(&recs));
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
