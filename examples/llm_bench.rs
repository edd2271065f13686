//! The gateway benchmark's two fast parts (deploy/bench/gateway.sh), so that what is measured is
//! the gateway and not the stand-in or the load generator:
//!
//! - `llm_bench respond ADDR`: an OpenAI-protocol chat-completions server (`POST
//!   /v1/chat/completions` and `/chat/completions`, `GET /v1/models`; JSON answers with `usage`, and
//!   `stream: true` as SSE chunks ending in a usage chunk and `[DONE]`). It answers at once, on one
//!   thread. Prints `listening on HOST:PORT` (ADDR may use port 0).
//! - `llm_bench load URL MODEL KEY CALLS CONCURRENCY`: sends CALLS chat completions with
//!   CONCURRENCY in flight (after 50 warm-up calls, not counted) on one thread, and prints one JSON
//!   line: calls, ok, errors, seconds, calls_per_s, p50_ms, p99_ms.
//!
//! Built by `cargo build --release --example llm_bench`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("respond") if args.len() == 2 => rt.block_on(respond(&args[1])),
        Some("load") if args.len() == 6 => {
            let calls = args[4].parse()?;
            let concurrency = args[5].parse()?;
            rt.block_on(load(&args[1], &args[2], &args[3], calls, concurrency))
        }
        _ => anyhow::bail!(
            "usage: llm_bench respond ADDR | llm_bench load URL MODEL KEY CALLS CONCURRENCY"
        ),
    }
}

async fn respond(addr: &str) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": []})) }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn chat(body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let err = json!({"error": {"message": format!("not JSON: {e}"), "type": "invalid_request_error"}});
            return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
        }
    };
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    let prompt_tokens = (body.len() / 4).max(1);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                       "total_tokens": prompt_tokens + 1});
    if req["stream"].as_bool() == Some(true) {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut out = String::new();
        for c in [
            chunk(json!({"role": "assistant", "content": "pong"}), Value::Null),
            chunk(json!({}), json!("stop")),
        ] {
            out.push_str(&format!("data: {c}\n\n"));
        }
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let u = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                           "model": model, "choices": [], "usage": usage});
            out.push_str(&format!("data: {u}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        return ([(header::CONTENT_TYPE, "text/event-stream")], out).into_response();
    }
    axum::Json(json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"},
                     "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

async fn load(
    url: &str,
    model: &str,
    key: &str,
    calls: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let body = serde_json::to_vec(&json!({
        "model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8,
    }))?;
    let one = |client: reqwest::Client, body: Vec<u8>| async move {
        let t = Instant::now();
        let r = client
            .post(url)
            .bearer_auth(key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let ok = match r {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            _ => false,
        };
        (ok, t.elapsed())
    };
    let run = |n: usize| {
        let next = Arc::new(AtomicUsize::new(0));
        let workers = (0..concurrency.min(n)).map(|_| {
            let (next, client, body) = (next.clone(), client.clone(), body.clone());
            async move {
                let mut seen = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    seen.push(one(client.clone(), body.clone()).await);
                }
                seen
            }
        });
        futures::future::join_all(workers)
    };
    run(50.min(calls)).await;
    let start = Instant::now();
    let seen: Vec<_> = run(calls).await.into_iter().flatten().collect();
    let seconds = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = seen
        .iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, d)| d.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| {
        lat.get(((p * lat.len() as f64) as usize).min(lat.len().saturating_sub(1)))
            .map(|v| (v * 100.0).round() / 100.0)
    };
    println!(
        "{}",
        json!({
            "calls": calls, "ok": lat.len(), "errors": calls - lat.len(),
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "calls_per_s": ((lat.len() as f64 / seconds) * 10.0).round() / 10.0,
            "p50_ms": q(0.5), "p99_ms": q(0.99),
        })
    );
    Ok(())
}
