//! Operability: a real Prometheus scrapes a running switchyard under a small load; every PromQL
//! expression of every dashboard panel and alert rule is evaluated through Prometheus's API; an alert
//! is provoked; promtool and the dashboard/manifest validators pass.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

use common::*;

/// Every `expr` of every target of every panel (rows included).
fn dashboard_exprs(v: &Value, out: &mut Vec<(String, String)>, title: &str) {
    match v {
        Value::Object(m) => {
            let t = m
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(title)
                .to_string();
            if let Some(Value::Array(targets)) = m.get("targets") {
                for tg in targets {
                    if let Some(e) = tg.get("expr").and_then(Value::as_str) {
                        out.push((t.clone(), e.to_string()));
                    }
                }
            }
            for (k, x) in m {
                if k != "targets" {
                    dashboard_exprs(x, out, &t);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out, title)),
        _ => {}
    }
}

fn substitute(expr: &str) -> String {
    expr.replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("${agent}", ".*")
        .replace("$agent", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

async fn query(client: &reqwest::Client, base: &str, q: &str) -> Value {
    client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .expect("prometheus answers")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_evaluate_against_a_real_prometheus() {
    let dead = free_port(); // nothing listens here: the "flaky" agent always fails
    let yaml = format!(
        r#"{}
  flaky:
    kind: http
    url: http://127.0.0.1:{dead}/agent
    actions: [page]
    retries: 0
    timeout_ms: 500
routes:
  - {{ name: deployments, types: ["deployment.*"], agents: [deploy-guard], priority: 50 }}
  - {{ name: failures, types: [deployment.failed], agents: [flaky] }}
  - {{ name: sla, types: [sla.breached, sla.recovered], agents: [sla-responder], priority: 100 }}
  - {{ name: cost, types: [cost.threshold_exceeded], agents: [cost-guard], priority: 10 }}
resolve:
  actions:
    rollback: {{ priority: 100, conflicts_with: [scale_down] }}
    page: {{ merge: true }}
governance:
  budgets:
    - {{ name: agent-calls, per: agent, matches: "*", period: day, max_calls: 1000 }}
    - {{ name: flaky-calls, per: agent, matches: flaky, period: day, max_calls: 1 }}
  approvals:
    timeout_seconds: 6
    rules: [{{ actions: [rollback] }}]
gateway:
  providers:
    mock: {{ base_url: "{llm}", api_key: k }}
  aliases:
    analyst: {{ candidates: [{{ provider: mock, model: dash-model }}] }}
  prices:
    dash-model: {{ input: 0.15, output: 0.60 }}
  keys:
    - {{ name: dashboards, key_sha256: "{digest}" }}
"#,
        // deploy-guard may not read `sla` here, so its reads are refused (and counted).
        DEFAULT_AGENTS.replacen(
            "reads: [sla, deployment, last_completed_deployment]",
            "reads: []",
            1
        ),
        llm = llm_base(),
        digest = hex::encode(sha2::Sha256::digest(b"sk-dashboards")),
    );
    let env = TestEnv::new(2, &yaml).await;
    let port = free_port();
    let mut loaded = env.loaded.clone();
    loaded.config.http.enabled = true;
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let app = Running::start(loaded, &["route", "agents", "resolve", "decisions"]);

    // Prometheus scraping it every second, with the repo's alert rules.
    let dir = tempfile::tempdir().unwrap();
    let pport = free_port();
    let rules = root().join("deploy/prometheus/alerts.yml");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n  - job_name: switchyard\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n",
            rules.display()
        ),
    )
    .unwrap();
    let prom = Reaper(
        std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed (deploy/local/stack.sh install)"),
    );
    let base = format!("http://127.0.0.1:{pport}");
    // Load starts only once Prometheus scrapes the stages' zero-valued series, so counters are seen
    // going up (increase() cannot see a series that first appears already at 1).
    let client = reqwest::Client::new();
    let mut scraping = false;
    for _ in 0..120 {
        if let Ok(r) = client
            .get(format!("{base}/api/v1/query"))
            .query(&[("query", "switchyard_actions_rejected_total")])
            .send()
            .await
        {
            if let Ok(v) = r.json::<Value>().await {
                if v["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    scraping = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(scraping, "Prometheus scrapes switchyard");

    // A small load touching every part: routed and unrouted events, a rollback that waits for approval
    // (and expires), a conflicting scale_down, a failing agent, an exhausted budget, dead letters.
    let e = |id: &str, ty: &str, sub: &str, d: Value| event(id, ty, sub, d);
    env.deployment_then_breach("svc-a", 0).await;
    // The rollback must be pending before the cost event arrives, so its scale_down is rejected.
    assert_eq!(
        env.read("switchyard.approvals", 1, Duration::from_secs(30))
            .await
            .len(),
        1,
        "the rollback awaits approval"
    );
    env.publish(
        "events.cost-thresholds",
        &[e(
            "o3",
            "cost.threshold_exceeded",
            "svc-a",
            json!({"budget": 10.0, "spend": 20.0}),
        )],
    )
    .await;
    env.publish(
        "events.deployments",
        &[
            e("o4", "deployment.failed", "svc-b", json!({})),
            e("o5", "deployment.failed", "svc-c", json!({})),
            e("o6", "build.done", "svc-d", json!({})),
        ],
    )
    .await;
    // Keep dead letters (and model calls through the gateway) coming for a while so the DLQ alert
    // and the gateway panels have growth to see.
    for i in 0..12 {
        let r = client
            .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .bearer_auth("sk-dashboards")
            .json(&json!({"model": "analyst", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(r.status(), 200);
        env.send_raw(
            "events.deployments",
            "svc-x",
            format!("not json {i}").as_bytes(),
            &[],
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Every dashboard expression returns data.
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        dashboard_exprs(&dash["panels"], &mut exprs, "");
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        for (panel, expr) in exprs {
            checked += 1;
            let q = substitute(&expr);
            let r = query(&client, &base, &q).await;
            let ok = r["status"] == "success"
                && r["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
            if !ok {
                failures.push(format!(
                    "{} / {panel}: {q} -> {}",
                    path.file_name().unwrap().to_string_lossy(),
                    r
                ));
            }
        }
    }
    if !failures.is_empty() {
        for q in [
            "switchyard_actions_rejected_total",
            "switchyard_proposals_total",
            "switchyard_approvals_total",
        ] {
            eprintln!("{q}: {}", query(&client, &base, q).await["data"]["result"]);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} dashboard queries returned no data:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every alert expression is valid, and every metric it reads has series.
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    let metric = regex::Regex::new(r"(switchyard_[a-z_]+|up|process_[a-z_]+)").unwrap();
    let mut names = BTreeSet::new();
    for g in alerts["groups"].as_sequence().unwrap() {
        for rule in g["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            let r = query(&client, &base, expr).await;
            assert_eq!(
                r["status"], "success",
                "alert {:?}: {expr} -> {r}",
                rule["alert"]
            );
            assert!(
                rule["annotations"]["runbook"]
                    .as_str()
                    .is_some_and(|s| s.len() > 40),
                "alert {:?} has a runbook",
                rule["alert"]
            );
            for m in metric.find_iter(expr) {
                names.insert(m.as_str().to_string());
            }
        }
    }
    for n in &names {
        let r = query(&client, &base, &format!("count({n})")).await;
        assert!(
            r["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "alert input {n} has no series: {r}"
        );
    }

    // The provoked condition fires its alert.
    let mut fired = false;
    for _ in 0..60 {
        let a: Value = client
            .get(format!("{base}/api/v1/alerts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if a["data"]["alerts"].as_array().is_some_and(|v| {
            v.iter().any(|x| {
                x["labels"]["alertname"] == "SwitchyardDLQGrowing" && x["state"] == "firing"
            })
        }) {
            fired = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(fired, "SwitchyardDLQGrowing fired while dead letters grew");
    drop(prom);
    app.stop().await;
}

#[test]
fn promtool_accepts_the_config_and_rules() {
    let p = root().join("deploy/prometheus");
    for (what, file) in [("config", "prometheus.yml"), ("rules", "alerts.yml")] {
        let out = std::process::Command::new("promtool")
            .args(["check", what])
            .arg(p.join(file))
            .output()
            .expect("promtool is installed");
        assert!(
            out.status.success(),
            "promtool check {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn dashboards_and_deployment_files_validate() {
    for script in ["deploy/grafana/validate.sh", "deploy/validate-manifests.sh"] {
        // The binary of this build, not whatever target/release holds from an older one.
        let out = std::process::Command::new("bash")
            .arg(root().join(script))
            .env("SWITCHYARD_BIN", bin())
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{script} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

const INGEST_TOKEN: &str = "ingest-token-0123456789";
const TIGHT_TOKEN: &str = "tight-token-0123456789";
const GITHUB_SECRET: &str = "github-webhook-secret";

/// A config with HTTP ingest on a free port: the default token, a `tight` token allowed three
/// events a minute, a 4 KiB body limit and GitHub's secret.
async fn ingest_env() -> (TestEnv, String) {
    let env = TestEnv::new(
        1,
        r#"
http:
  enabled: true
  ingest:
    max_body_bytes: 4096
    tokens:
      - { name: tight, token: tight-token-0123456789, rate_per_minute: 3 }
      - { name: acme-ci, token: acme-token-0123456789, tenants: [acme] }
    alertmanager: { subject_label: service }
    github: { secret: { env: SWITCHYARD_TEST_GITHUB_SECRET } }
"#,
    )
    .await;
    let mut loaded = env.loaded.clone();
    let port = free_port();
    loaded.config.http.listen = format!("127.0.0.1:{port}");
    let ingest = &mut loaded.config.http.ingest;
    ingest.token = Some(switchyard::secret::Secret::new(INGEST_TOKEN));
    ingest.github.secret = Some(switchyard::secret::SecretRef::Value(
        switchyard::secret::Secret::new(GITHUB_SECRET),
    ));
    for (pattern, logical) in [
        ("deployment.*", "events.deployments"),
        ("sla.*", "events.sla-breaches"),
    ] {
        ingest.topics.insert(pattern.into(), env.topic(logical));
    }
    assert!(
        ingest.problems(&loaded.config.topics.inputs).is_empty(),
        "{:?}",
        ingest.problems(&loaded.config.topics.inputs)
    );
    let env = TestEnv { loaded, ..env };
    (env, format!("http://127.0.0.1:{port}"))
}

async fn wait_for_http(base: &str) {
    for _ in 0..200 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} does not answer");
}

fn structured(id: &str, ty: &str, subject: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "ci", "type": ty, "subject": subject,
           "time": "2026-01-01T10:00:00Z", "data": data})
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = c.post(url).header("content-type", content_type).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("ingest answers");
    let (code, headers) = (resp.status().as_u16(), resp.headers().clone());
    let v = resp.json().await.unwrap_or(Value::Null);
    (code, v, headers)
}

/// [`post`] of a CloudEvents batch with `token`.
async fn post_batch(
    c: &reqwest::Client,
    url: &str,
    token: &str,
    batch: impl Into<reqwest::Body>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    post(
        c,
        url,
        Some(token),
        "application/cloudevents-batch+json",
        batch,
    )
    .await
}

fn metric(text: &str, source: &str, outcome: &str) -> u64 {
    let want =
        format!("switchyard_ingest_events_total{{outcome=\"{outcome}\",source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The CloudEvents HTTP binding (structured, binary, batch), Alertmanager and GitHub webhooks into
/// a running pipeline: records on the input topics exactly once, results and actions downstream;
/// refusals (401, 413, 400, 415, 422, 429) leave the server working; metrics count every outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_cloudevents_alertmanager_and_github_into_the_pipeline() {
    let (env, base) = ingest_env().await;
    let app = Running::start(env.loaded.clone(), &["route", "agents", "resolve"]);
    wait_for_http(&base).await;
    let c = reqwest::Client::new();
    let events_url = format!("{base}/v1/events");
    let metrics_before = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Without any token configured the token routes answer 503.
    let untokened = {
        let l = &env.loaded;
        let ingest = switchyard::http::ingest::Ingest::new(
            switchyard::http::ingest::IngestConfig::default(),
            switchyard::records::Emitter::new(l.schemas.clone(), l.topics.clone()),
            env.producer(),
            switchyard::store::RedisConn::from_config(&l.config.redis).unwrap(),
            &l.config.redis.key_prefix,
            60_000,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, switchyard::http::ingest::router(ingest)).await
        });
        format!("http://{addr}")
    };
    for route in ["/v1/events", "/v1/ingest/alertmanager", "/v1/ingest/github"] {
        let (code, v, _) = post(
            &c,
            &format!("{untokened}{route}"),
            Some(INGEST_TOKEN),
            "application/json",
            "{}",
        )
        .await;
        assert_eq!(code, 503, "{route}: {v}");
        assert!(v["error"].as_str().unwrap().contains("configured"), "{v}");
    }

    // No token, a wrong token.
    let one = structured(
        "s-1",
        "deployment.completed",
        "svc-a",
        json!({"service": "svc-a", "version": "v42", "previous_version": "v41", "environment": "production"}),
    );
    let (code, v, _) = post(
        &c,
        &events_url,
        None,
        "application/cloudevents+json",
        one.to_string(),
    )
    .await;
    assert_eq!(code, 401, "{v}");
    let (code, _, _) = post(
        &c,
        &events_url,
        Some("nope"),
        "application/cloudevents+json",
        one.to_string(),
    )
    .await;
    assert_eq!(code, 401);

    // Structured.
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        one.to_string(),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        (v["accepted"].clone(), v["duplicate"].clone()),
        (json!(1), json!(false)),
        "{v}"
    );
    assert_eq!(v["events"][0]["topic"], env.topic("events.deployments"));

    // The same (source, id) again: 202, a duplicate, nothing produced.
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        one.to_string(),
    )
    .await;
    assert_eq!((code, v["duplicate"].clone()), (202, json!(true)), "{v}");
    // The same (source, id) from another tenant is another event: produced, its own task.
    let mut other = one.clone();
    other["tenant"] = json!("globex");
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        other.to_string(),
    )
    .await;
    assert_eq!((code, v["duplicate"].clone()), (202, json!(false)), "{v}");
    // A token limited to tenant acme sends for acme only: another tenant's event is 403.
    for (tenant, want) in [("globex", 403), ("acme", 202)] {
        let mut ev = structured("a-1", "deployment.started", "svc-a", json!({}));
        ev["tenant"] = json!(tenant);
        let (code, v, _) = post(
            &c,
            &events_url,
            Some("acme-token-0123456789"),
            "application/cloudevents+json",
            ev.to_string(),
        )
        .await;
        assert_eq!(code, want, "{tenant}: {v}");
    }

    // Binary: ce-* headers, the body is the data.
    let resp = c
        .post(&events_url)
        .bearer_auth(INGEST_TOKEN)
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-1")
        .header("ce-source", "ci")
        .header("ce-type", "deployment.started")
        .header("ce-subject", "svc-b")
        .body(json!({"service": "svc-b", "version": "v7"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "{}",
        resp.text().await.unwrap_or_default()
    );

    // Batch.
    let batch = json!([
        structured(
            "c-1",
            "deployment.started",
            "svc-c",
            json!({"service": "svc-c"})
        ),
        structured(
            "c-2",
            "deployment.completed",
            "svc-c",
            json!({"service": "svc-c", "version": "v2"})
        ),
    ]);
    let (code, v, _) = post_batch(&c, &events_url, INGEST_TOKEN, batch.to_string()).await;
    assert_eq!((code, v["accepted"].clone()), (202, json!(2)), "{v}");
    // A batch with one bad event is refused whole, naming the event.
    let bad_batch = json!([
        structured("c-3", "deployment.started", "svc-c", json!({})),
        {"specversion": "1.0", "source": "ci", "type": "deployment.started", "subject": "svc-c"},
    ]);
    let (code, v, _) = post_batch(&c, &events_url, INGEST_TOKEN, bad_batch.to_string()).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["events"][0]["index"], 1, "{v}");
    assert!(
        v["events"][0]["error"]
            .as_str()
            .unwrap()
            .contains("id is missing"),
        "{v}"
    );

    // Refusals: too large, malformed, wrong media type, a type without a topic.
    let big = structured(
        "big",
        "deployment.started",
        "svc-a",
        json!({"pad": "x".repeat(5000)}),
    );
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        big.to_string(),
    )
    .await;
    assert_eq!(code, 413, "{v}");
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        "{\n \"id\": ",
    )
    .await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("line 2"), "{v}");
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        json!({"specversion": "1.0", "id": "x", "source": "ci", "subject": "svc-a"}).to_string(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        v["error"].as_str().unwrap().contains("type is missing"),
        "{v}"
    );
    let (code, _, _) = post(&c, &events_url, Some(INGEST_TOKEN), "text/plain", "hello").await;
    assert_eq!(code, 415);
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        structured("u-1", "cost.unknown", "svc-a", json!({})).to_string(),
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        v["error"].as_str().unwrap().contains("\"cost.unknown\""),
        "{v}"
    );

    // Alertmanager: one firing, one resolved alert.
    let am = json!({
        "version": "4", "groupKey": "{}:{alertname=\"SLOBurn\"}", "status": "firing", "receiver": "switchyard",
        "groupLabels": {"alertname": "SLOBurn"}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {"status": "firing", "labels": {"alertname": "SLOBurn", "service": "svc-a", "slo": "availability", "owner": "team-pay"},
             "annotations": {"summary": "availability burning"}, "startsAt": "2026-01-01T10:01:00Z",
             "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus/graph", "fingerprint": "f1"},
            {"status": "resolved", "labels": {"alertname": "SLOBurn", "service": "svc-d"},
             "annotations": {}, "startsAt": "2026-01-01T09:00:00Z", "endsAt": "2026-01-01T09:40:00Z",
             "generatorURL": "http://prometheus/graph", "fingerprint": "f2"}
        ]
    });
    let am_url = format!("{base}/v1/ingest/alertmanager");
    let (code, _, _) = post(&c, &am_url, None, "application/json", am.to_string()).await;
    assert_eq!(code, 401);
    let (code, v, _) = post(
        &c,
        &am_url,
        Some(INGEST_TOKEN),
        "application/json",
        am.to_string(),
    )
    .await;
    assert_eq!((code, v["accepted"].clone()), (202, json!(2)), "{v}");
    // Alertmanager sends the same notification again: nothing new.
    let (code, v, _) = post(
        &c,
        &am_url,
        Some(INGEST_TOKEN),
        "application/json",
        am.to_string(),
    )
    .await;
    assert_eq!((code, v["duplicate"].clone()), (202, json!(true)), "{v}");

    // GitHub: a signed deployment_status, a bad signature, a ping, another event type.
    let gh_url = format!("{base}/v1/ingest/github");
    let recent = (chrono::Utc::now() - chrono::Duration::minutes(2)).to_rfc3339();
    let gh = json!({
        "action": "created",
        "deployment_status": {"id": 9001, "state": "success", "environment": "production", "updated_at": recent},
        "deployment": {"id": 7, "sha": "abc123", "ref": "main", "environment": "production"},
        "repository": {"name": "svc-e", "full_name": "acme/svc-e"}
    })
    .to_string();
    let sign = |body: &str| {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
        m.update(body.as_bytes());
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    };
    let gh_post = |event: &'static str, sig: String, body: String| {
        c.post(&gh_url)
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
            .header("x-hub-signature-256", sig)
            .body(body)
            .send()
    };
    let r = gh_post("deployment_status", sign(&gh), gh.clone())
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "{}",
        r.text().await.unwrap_or_default()
    );
    // The same signed body under another delivery id (a replay) is the same event.
    let r = c
        .post(&gh_url)
        .header("content-type", "application/json")
        .header("x-github-event", "deployment_status")
        .header("x-github-delivery", "00000000-replayed-delivery")
        .header("x-hub-signature-256", sign(&gh))
        .body(gh.clone())
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(v["duplicate"], json!(true), "a replayed GitHub body: {v}");
    // A delivery older than the dedupe window (a day) could not be told from a replay: refused.
    let stale = gh.replace(&recent, "2026-01-01T10:02:00Z");
    let r = gh_post("deployment_status", sign(&stale), stale.clone())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(
        v["error"].as_str().unwrap_or("").contains("dedupe_seconds"),
        "{v}"
    );
    let r = gh_post("deployment_status", sign("other body"), gh.clone())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = gh_post("ping", sign("{}"), "{}".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = gh_post("push", sign("{}"), "{}".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 202);

    // The rate limit: `tight` may send three events a minute. Four in one request are more than a
    // minute's worth: refused whole (it would otherwise pass once a minute).
    let batch_of = |p: &str, n: usize| {
        Value::Array(
            (1..=n)
                .map(|i| {
                    structured(
                        &format!("{p}-{i}"),
                        "deployment.started",
                        &format!("svc-{p}"),
                        json!({}),
                    )
                })
                .collect(),
        )
    };
    for (batch, want) in [(batch_of("f", 4), 413), (batch_of("t", 3), 202)] {
        let (code, v, _) = post_batch(&c, &events_url, TIGHT_TOKEN, batch.to_string()).await;
        assert_eq!(code, want, "{v}");
    }
    let (code, v, headers) = post(
        &c,
        &events_url,
        Some(TIGHT_TOKEN),
        "application/cloudevents+json",
        structured("t-4", "deployment.started", "svc-t", json!({})).to_string(),
    )
    .await;
    assert_eq!(code, 429, "{v}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Events taken before cost nothing: the same three again are duplicates, answered 202 with
    // the bucket empty (copies drained it for new events).
    let (code, v, _) = post_batch(&c, &events_url, TIGHT_TOKEN, batch_of("t", 3).to_string()).await;
    assert_eq!((code, v["duplicate"].clone()), (202, json!(true)), "{v}");
    // Alertmanager retries only 5xx: its door answers a rate limit 503 with Retry-After (a 429
    // made it drop the alert), and the same notification again is free.
    let (code, v, _) = post(
        &c,
        &am_url,
        Some(TIGHT_TOKEN),
        "application/json",
        am.to_string(),
    )
    .await;
    assert_eq!((code, v["duplicate"].clone()), (202, json!(true)), "{v}");
    let mut fresh = am.clone();
    fresh["alerts"][0]["fingerprint"] = json!("f-new");
    fresh["alerts"][0]["startsAt"] = json!("2026-01-01T11:00:00Z");
    let (code, v, headers) = post(
        &c,
        &am_url,
        Some(TIGHT_TOKEN),
        "application/json",
        fresh.to_string(),
    )
    .await;
    assert_eq!(code, 503, "{v}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");

    // After all that, the server still takes events; the last one marks the end of the topic.
    let (code, v, _) = post(
        &c,
        &events_url,
        Some(INGEST_TOKEN),
        "application/cloudevents+json",
        structured("z-last", "deployment.started", "svc-z", json!({})).to_string(),
    )
    .await;
    assert_eq!(code, 202, "{v}");

    // Each accepted event once on its input topic, keyed by its subject.
    let deployments = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("events.deployments"),
        Duration::from_secs(30),
        |got: &[switchyard::kafka::Input]| got.last().is_some_and(|r| event_of(r).id == "z-last"),
    )
    .await;
    let ids: Vec<String> = deployments.iter().map(|r| event_of(r).id).collect();
    assert_eq!(
        ids,
        [
            "s-1",
            "s-1",
            "a-1",
            "b-1",
            "c-1",
            "c-2",
            "gh-deployment-status-9001",
            "t-1",
            "t-2",
            "t-3",
            "z-last"
        ],
        "every accepted event once, in order"
    );
    assert_eq!(event_of(&deployments[1]).tenant(), "globex");
    assert_eq!(event_of(&deployments[2]).tenant(), "acme");
    let b1 = event_of(&deployments[3]);
    assert_eq!(
        (b1.ty.as_str(), b1.data.clone()),
        (
            "deployment.started",
            Some(json!({"service": "svc-b", "version": "v7"}))
        )
    );
    assert_eq!(deployments[3].key.as_deref(), Some(&b"svc-b"[..]));
    let gh_ev = event_of(&deployments[6]);
    assert_eq!(
        (gh_ev.ty.as_str(), gh_ev.subject.as_deref()),
        ("deployment.success", Some("svc-e"))
    );
    let slas = env
        .read("events.sla-breaches", 2, Duration::from_secs(20))
        .await;
    let types: Vec<(String, Option<String>)> = slas
        .iter()
        .map(|r| {
            let e = event_of(r);
            (e.ty, e.subject)
        })
        .collect();
    assert_eq!(
        types,
        [
            ("sla.breached".to_string(), Some("svc-a".to_string())),
            ("sla.recovered".to_string(), Some("svc-d".to_string()))
        ]
    );

    // Downstream: the agents' results, and the breach's page on the actions topic.
    let results = env
        .read("switchyard.results", 11, Duration::from_secs(60))
        .await;
    let agents: BTreeSet<(String, String)> = results
        .iter()
        .map(|r| {
            let d = data_of(&event_of(r)).clone();
            (
                d["agent"].as_str().unwrap_or("").to_string(),
                d["resource"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("deploy-guard", "svc-a"),
        ("deploy-guard", "svc-e"),
        ("sla-responder", "svc-a"),
        ("sla-responder", "svc-d"),
    ] {
        assert!(
            agents.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {agents:?}"
        );
    }
    fn is_page_of_svc_a(r: &switchyard::kafka::Input) -> bool {
        let d = data_of(&event_of(r)).clone();
        d["action"] == "page" && d["resource"] == "svc-a"
    }
    let actions = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("switchyard.actions"),
        Duration::from_secs(30),
        |got: &[switchyard::kafka::Input]| got.iter().any(is_page_of_svc_a),
    )
    .await;
    assert!(
        actions.iter().any(is_page_of_svc_a),
        "the breach's page is an action"
    );

    // Metrics per source and outcome (the registry is shared by the tests of this process: deltas).
    let m = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let delta = |s: &str, o: &str| metric(&m, s, o) - metric(&metrics_before, s, o);
    assert!(delta("cloudevents", "accepted") >= 8, "{m}");
    assert!(delta("cloudevents", "duplicate") >= 1);
    assert!(delta("cloudevents", "unauthorized") >= 2);
    assert!(delta("cloudevents", "too_large") >= 1);
    assert!(delta("cloudevents", "rejected") >= 4);
    assert!(delta("cloudevents", "rate_limited") >= 1);
    assert!(delta("alertmanager", "accepted") >= 2);
    assert!(delta("alertmanager", "duplicate") >= 2);
    assert!(delta("github", "accepted") >= 1);
    assert!(delta("github", "unauthorized") >= 1);
    assert!(delta("github", "ignored") >= 1);
    assert!(app.is_running());
    app.stop().await;
}

/// `tail --format human` with `--key` and `--partition`, and `approvals list` showing the agent,
/// parameters and reason of what waits for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_human_format_filters_and_approvals_list_details() {
    let env = TestEnv::new(
        2,
        "governance:\n  approvals:\n    rules: [{ actions: [page] }]\n",
    )
    .await;
    let app = env.start(&["route", "agents", "resolve"]);
    for (id, svc) in [("q-1", "svc-q"), ("o-1", "svc-other"), ("o-2", "svc-more")] {
        env.publish_one(
            "events.sla-breaches",
            id,
            "sla.breached",
            svc,
            json!({"service": svc, "slo": "availability", "objective": 99.9, "observed": 97.0, "owner": "team-pay"}),
        )
        .await;
    }
    env.read("switchyard.approvals", 3, Duration::from_secs(40))
        .await;
    app.stop().await;

    let results = env.topic("switchyard.results");
    let tail = |extra: &[&str]| {
        let mut args = vec![
            results.as_str(),
            "--from-beginning",
            "--idle-timeout-ms",
            "3000",
        ];
        args.extend_from_slice(extra);
        cli(&env, &[&["tail"][..], &args].concat())
    };
    let human = tail(&["--format", "human", "--key", "svc-q"]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 1, "{human}");
    assert!(
        lines[0].contains("result sla-responder")
            && lines[0].contains("resource=svc-q")
            && lines[0].contains("succeeded"),
        "{human}"
    );
    // Every record of one partition, none of the other; the JSON format is the default.
    let all = tail(&[]);
    let count = |p: i64| {
        all.lines()
            .filter(|l| serde_json::from_str::<Value>(l).unwrap()["partition"] == p)
            .count()
    };
    for p in [0, 1] {
        let only = tail(&["--partition", &p.to_string(), "--format", "human"]);
        assert_eq!(only.lines().count(), count(p), "{only}\n{all}");
        assert!(
            only.lines().all(|l| l.contains(&format!("[{p}]@"))),
            "{only}"
        );
    }

    let approvals = cli(
        &env,
        &[
            "tail",
            &env.topic("switchyard.approvals"),
            "--from-beginning",
            "--idle-timeout-ms",
            "3000",
            "--format",
            "human",
        ],
    );
    assert_eq!(
        approvals
            .lines()
            .filter(|l| l.contains(" approval pending   page "))
            .count(),
        3,
        "{approvals}"
    );
    let list = cli(&env, &["approvals", "list"]);
    assert!(list.contains("3 open approvals"), "{list}");
    assert!(list.contains("agent: sla-responder"), "{list}");
    assert!(
        list.contains("parameters: {") && list.contains("team-pay"),
        "{list}"
    );
    let reason = list
        .lines()
        .find(|l| l.trim_start().starts_with("reason:"))
        .expect("a reason line");
    assert!(reason.trim() != "reason: -", "{list}");
}

/// A client that gives up on an ingest request (a timeout, a proxy) does not leave its events
/// half done: the request's claims, records and settlements go on without it, so its retry is
/// answered 202 (each event produced or a duplicate) — never "in progress" for minutes — and each
/// event is on the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_request_its_client_gave_up_on_still_settles_every_event() {
    let env = TestEnv::new(1, "").await;
    let l = &env.loaded;
    let cfg = switchyard::http::ingest::IngestConfig {
        token: Some(switchyard::secret::Secret::new(INGEST_TOKEN)),
        max_body_bytes: 4 << 20,
        topics: [("deployment.*".to_string(), env.topic("events.deployments"))].into(),
        ..Default::default()
    };
    let ingest = switchyard::http::ingest::Ingest::new(
        cfg,
        switchyard::records::Emitter::new(l.schemas.clone(), l.topics.clone()),
        env.producer(),
        switchyard::store::RedisConn::from_config(&l.config.redis).expect("redis"),
        &l.config.redis.key_prefix,
        60_000,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1/events", listener.local_addr().expect("addr"));
    tokio::spawn(
        async move { axum::serve(listener, switchyard::http::ingest::router(ingest)).await },
    );
    let batch = Value::Array(
        (0..500)
            .map(|i| {
                structured(
                    &format!("g-{i}"),
                    "deployment.started",
                    &format!("svc-{i}"),
                    json!({}),
                )
            })
            .collect(),
    )
    .to_string();
    let hasty = reqwest::Client::builder()
        .timeout(Duration::from_millis(30))
        .build()
        .expect("client");
    // It gives up (or, on a fast day, gets its answer): either way the retry below must find
    // every event settled.
    let _ = hasty
        .post(&url)
        .bearer_auth(INGEST_TOKEN)
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.clone())
        .send()
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = reqwest::Client::new();
    let (code, v, _) = post_batch(&c, &url, INGEST_TOKEN, batch).await;
    assert_eq!(code, 202, "{v}");
    let produced = v["accepted"].as_u64().unwrap_or(0);
    let duplicates = v["duplicates"].as_u64().unwrap_or(0);
    assert_eq!(produced + duplicates, 500, "{v}");
    let recs = read_topic_until(
        &l.config.kafka.brokers,
        &env.topic("events.deployments"),
        Duration::from_secs(30),
        |got: &[switchyard::kafka::Input]| got.len() >= 500,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids: BTreeSet<String> = recs.iter().map(|r| event_of(r).id).collect();
    assert_eq!((recs.len(), ids.len()), (500, 500), "each event once");
}

/// An event of a batch that is not taken (here: the same event is being produced by another
/// request) holds back the later events of its resource in that batch — a retry would otherwise
/// write it after them — while other resources' events go ahead; the held ones are produced by the
/// retry, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_a_resource_s_order_when_one_of_its_events_is_not_taken() {
    let (env, base) = ingest_env().await;
    let app = Running::start(env.loaded.clone(), &["route"]);
    wait_for_http(&base).await;
    let url = format!("{base}/v1/events");
    let batch = json!([
        structured("o-1", "deployment.started", "svc-o", json!({})),
        structured("o-2", "deployment.completed", "svc-o", json!({})),
        structured("p-1", "deployment.started", "svc-p", json!({})),
    ])
    .to_string();
    // o-1 is being produced by another request (its claim is taken).
    let first = serde_json::from_value::<switchyard::event::CloudEvent>(structured(
        "o-1",
        "deployment.started",
        "svc-o",
        json!({}),
    ))
    .unwrap();
    let seen = format!(
        "{}:ingest:seen:{{{}}}",
        env.prefix,
        switchyard::pattern::stable_id(&switchyard::route::event_parts(&first))
    );
    let mut conn = redis_connection(stack().1.as_str()).await;
    let () = redis::cmd("SET")
        .arg(&seen)
        .arg("pending")
        .query_async(&mut conn)
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let (code, v, _) = post_batch(&c, &url, INGEST_TOKEN, batch.clone()).await;
    assert_ne!(code, 202, "{v}");
    assert_eq!(v["accepted"], json!(1), "only svc-p's event: {v}");
    // The other request gives up; the retry produces svc-o's events, in order.
    let () = redis::cmd("DEL")
        .arg(&seen)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, v, _) = post_batch(&c, &url, INGEST_TOKEN, batch).await;
    assert_eq!(code, 202, "{v}");
    let recs = read_topic_until(
        &env.loaded.config.kafka.brokers,
        &env.topic("events.deployments"),
        Duration::from_secs(30),
        |got: &[switchyard::kafka::Input]| got.len() >= 3,
    )
    .await;
    let order: Vec<String> = recs.iter().map(|r| event_of(r).id).collect();
    assert_eq!(order, ["p-1", "o-1", "o-2"]);
    app.stop().await;
}
