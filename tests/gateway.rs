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

fn caller() -> Caller {
    Caller {
        tenant: "default".into(),
        agent: "tester".into(),
        workflow: String::new(),
        task: "t-1".into(),
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

/// Queues llmock behaviours (`POST /_llmock/scenario`).
async fn scenario(behaviors: Value) {
    let admin = llm_base().trim_end_matches("/v1").to_string();
    let r = reqwest::Client::new()
        .post(format!("{admin}/_llmock/scenario"))
        .json(&json!({ "behaviors": behaviors }))
        .send()
        .await
        .expect("llmock answers");
    assert!(
        r.status().is_success(),
        "scenario refused: {}",
        r.text().await.unwrap_or_default()
    );
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
    let mut conn = redis::Client::open(stack().1.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let key = format!("{s}:budget:{{budgets}}:llm-{s}:cheap:total");
    let (calls_n, cost): (u64, f64) = redis::cmd("HMGET")
        .arg(&key)
        .arg("calls")
        .arg("cost")
        .query_async::<(Option<u64>, Option<f64>)>(&mut conn)
        .await
        .map(|(n, c)| (n.unwrap_or(0), c.unwrap_or(0.0)))
        .expect("budget bucket");
    assert_eq!(calls_n, ok as u64);
    assert!(
        (cost - spent).abs() < 1e-6,
        "redis says {cost}, calls cost {spent}"
    );
    let held: u64 = redis::cmd("ZCARD")
        .arg(format!("{s}:budget:{{budgets}}:holds"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
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
