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
