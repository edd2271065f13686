#!/usr/bin/env python3
"""Gateway overhead: the same chat completions sent to the LLM stand-in directly, through switchyard's
served endpoint (/v1/chat/completions) and through the LiteLLM proxy, configured alike (an alias with
a fallback candidate and a rate limit), side by side in one run.

Phases per system: latency (one call at a time) and throughput (CONCURRENCY calls in flight).
Prints a table and writes deploy/bench/results/gateway.json. Run by deploy/bench/gateway.sh.
"""
import asyncio
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LLM = os.environ["SWITCHYARD_LLM_BASE_URL"].rstrip("/")
SEQUENTIAL = int(os.environ.get("GW_SEQUENTIAL", "300"))
CALLS = int(os.environ.get("GW_CALLS", "3000"))
CONCURRENCY = int(os.environ.get("GW_CONCURRENCY", "64"))
KEY = "sk-gateway-bench-4f1d2c9a7b3e8d6f0a5c1e9b7d3f2a8c"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def measure(url: str, model: str, n: int, concurrency: int) -> dict:
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    body = dict(BODY, model=model)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                try:
                    r = await client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})
                except httpx.HTTPError:
                    errors += 1
                    return
                dt = time.perf_counter() - t
                if r.status_code == 200:
                    latencies.append(dt)
                else:
                    errors += 1

        await asyncio.gather(*[one() for _ in range(min(50, n))])  # warm-up, not counted
        latencies.clear()
        errors = 0
        start = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        elapsed = time.perf_counter() - start
    latencies.sort()

    def q(p: float):
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) if latencies else None

    return {"calls": n, "ok": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "calls_per_s": round(len(latencies) / elapsed, 1), "p50_ms": q(0.5), "p99_ms": q(0.99)}


def wait_http(url: str, proc: subprocess.Popen, what: str, headers=None) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"{what} exited during start-up (code {proc.returncode})")
        try:
            if httpx.get(url, headers=headers or {}, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not answer {url}")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    procs = []
    try:
        # switchyard: the shipped config (its stages idle: no events), the gateway alias `bench` (two
        # candidates, a limit that does not bind but is checked on every call).
        sy_port = free_port()
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        base = (ROOT / "deploy/switchyard.yaml").read_text()
        base = base.replace("../topics", str(ROOT / "topics")).replace("../schemas", str(ROOT / "schemas"))
        base = base.replace("level: info", "level: warn")
        base = base[: base.index("\n# The AI gateway (README")]
        cfg = base + f"""
gateway:
  providers:
    default: {{base_url: "{LLM}"}}
  aliases:
    bench:
      candidates: [{{provider: default, model: bench-a}}, {{provider: default, model: bench-b}}]
  limits:
    - {{provider: default, model: "*", rpm: 100000000, tpm: 100000000000}}
  prices:
    bench-a: {{input: 0.15, output: 0.60}}
  keys:
    - {{name: bench, tenant: default, key_sha256: "{digest}"}}
"""
        sy_cfg = tmp / "switchyard.yaml"
        sy_cfg.write_text(cfg)
        binary = os.environ.get("GW_SWITCHYARD_BIN", str(ROOT / "target/release/switchyard"))
        env = dict(os.environ, SWITCHYARD_HTTP_LISTEN=f"127.0.0.1:{sy_port}", RUST_LOG="warn")
        procs.append(subprocess.Popen([binary, "--config", str(sy_cfg), "run"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp / "switchyard.log", "w")))
        wait_http(f"http://127.0.0.1:{sy_port}/v1/models", procs[-1], "switchyard",
                  {"Authorization": f"Bearer {KEY}"})

        # LiteLLM proxy: the same alias, fallback and (non-binding) rate limit.
        ll_port = free_port()
        ll_cfg = tmp / "litellm.yaml"
        ll_cfg.write_text(f"""
model_list:
  - model_name: bench
    litellm_params: {{model: openai/bench-a, api_base: "{LLM}", api_key: sk-none, rpm: 100000000}}
  - model_name: bench-b
    litellm_params: {{model: openai/bench-b, api_base: "{LLM}", api_key: sk-none, rpm: 100000000}}
general_settings:
  master_key: "{KEY}"
router_settings:
  fallbacks: [{{"bench": ["bench-b"]}}]
litellm_settings:
  drop_params: true
  set_verbose: false
""")
        litellm = os.environ.get("GW_LITELLM", "litellm")
        procs.append(subprocess.Popen([litellm, "--config", str(ll_cfg), "--port", str(ll_port), "--host", "127.0.0.1"],
                                      stdout=open(tmp / "litellm.log", "w"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", procs[-1], "litellm")

        systems = [
            ("direct (llmock)", f"{LLM}/chat/completions", "bench-a"),
            ("switchyard", f"http://127.0.0.1:{sy_port}/v1/chat/completions", "bench"),
            ("litellm proxy", f"http://127.0.0.1:{ll_port}/v1/chat/completions", "bench"),
        ]
        results = {}
        for name, url, model in systems:
            print(f"gateway bench: {name}", file=sys.stderr)
            results[name] = {
                "sequential": asyncio.run(measure(url, model, SEQUENTIAL, 1)),
                "concurrent": asyncio.run(measure(url, model, CALLS, CONCURRENCY)),
            }
        direct = results["direct (llmock)"]
        for name in ("switchyard", "litellm proxy"):
            r = results[name]
            r["added_p50_ms"] = round(r["sequential"]["p50_ms"] - direct["sequential"]["p50_ms"], 2)
            r["added_p99_ms"] = round(r["sequential"]["p99_ms"] - direct["sequential"]["p99_ms"], 2)
        ratio = results["switchyard"]["concurrent"]["calls_per_s"] / max(results["litellm proxy"]["concurrent"]["calls_per_s"], 1e-9)
        print(f"{'system':<18} {'seq p50 ms':>10} {'seq p99 ms':>10} {'added p50':>10} {'added p99':>10} "
              f"{'calls/s @' + str(CONCURRENCY):>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name, r in results.items():
            s, c = r["sequential"], r["concurrent"]
            print(f"{name:<18} {s['p50_ms']:>10} {s['p99_ms']:>10} {r.get('added_p50_ms', '-'):>10} "
                  f"{r.get('added_p99_ms', '-'):>10} {c['calls_per_s']:>12} {c['p50_ms']:>8} {c['p99_ms']:>8} "
                  f"{s['errors'] + c['errors']:>7}")
        print(f"switchyard / litellm calls/s: {ratio:.2f}x")
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        out = {"git": git, "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
               "sequential_calls": SEQUENTIAL, "concurrent_calls": CALLS, "concurrency": CONCURRENCY,
               "results": results, "switchyard_over_litellm_calls_per_s": round(ratio, 2),
               "method": "one load generator (python httpx, asyncio) against each system in turn; the same "
                         "request; latency phase one call at a time, throughput phase CONCURRENCY in flight; "
                         "50 warm-up calls each, not counted; added = system p50/p99 - direct p50/p99"}
        dest = ROOT / "deploy/bench/results/gateway.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {dest}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
