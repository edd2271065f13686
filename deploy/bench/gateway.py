#!/usr/bin/env python3
"""Gateway overhead: the same chat completions sent to the upstream directly, through switchyard's
served endpoint (/v1/chat/completions) and through the LiteLLM proxy, configured alike (an alias with
a fallback candidate and a rate limit), side by side in one run.

Phases per system: latency (one call at a time) and throughput (CONCURRENCY calls in flight).
Prints a table and writes deploy/bench/results/gateway.json. Run by deploy/bench/gateway.sh.
"""
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
# The upstream every system calls: `fast` (examples/llm_bench.rs, answers at once: what is measured
# is the gateway) or `llmock` (the stack's stand-in, SWITCHYARD_LLM_BASE_URL; ~150 calls/s here).
UPSTREAM = os.environ.get("GW_UPSTREAM", "fast")
SEQUENTIAL = int(os.environ.get("GW_SEQUENTIAL", "1000"))
CALLS = int(os.environ.get("GW_CALLS", "20000"))
# LiteLLM serves tens of calls a second: fewer calls keep its phase short.
LITELLM_CALLS = int(os.environ.get("GW_LITELLM_CALLS", "3000"))
CONCURRENCY = int(os.environ.get("GW_CONCURRENCY", "64"))
LITELLM_WORKERS = int(os.environ.get("GW_LITELLM_WORKERS", str(os.cpu_count() or 1)))
BENCH_TOOL = Path(os.environ.get("GW_BENCH_TOOL", str(ROOT / "target/release/examples/llm_bench")))
KEY = "sk-gateway-bench-4f1d2c9a7b3e8d6f0a5c1e9b7d3f2a8c"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def measure(url: str, model: str, n: int, concurrency: int) -> dict:
    """n calls with `concurrency` in flight, sent by the Rust load generator (one thread)."""
    out = subprocess.run([str(BENCH_TOOL), "load", url, model, KEY, str(n), str(concurrency)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"load generator failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_responder(procs: list) -> str:
    """The fast OpenAI-protocol stand-in (examples/llm_bench.rs); its base URL."""
    proc = subprocess.Popen([str(BENCH_TOOL), "respond", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    line = proc.stdout.readline().strip() if proc.stdout else ""
    if not line.startswith("listening on "):
        sys.exit(f"the bench responder did not start: {line!r}")
    return f"http://{line.removeprefix('listening on ')}/v1"


def metric_sum(port: int, name: str, match: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and match in line)


def audited(port: int, binary: str, cfg: Path, env: dict) -> dict:
    """Every call switchyard made has its llm_call audit record sealed and on the audit topic: how
    long after the last answer the background writing caught up, and `audit verify`'s count."""
    t = time.perf_counter()
    calls = metric_sum(port, "switchyard_llm_requests_total", 'outcome="ok"')
    sealed = 0.0
    while time.perf_counter() - t < 120:
        sealed = metric_sum(port, "switchyard_audit_records_sealed_total", 'stage="gateway"')
        if sealed >= calls:
            break
        time.sleep(0.1)
    caught_up = round(time.perf_counter() - t, 2)
    out = subprocess.run([binary, "--config", str(cfg), "audit", "verify", "--idle-timeout-ms", "5000"],
                         env=env, capture_output=True, text=True, timeout=600)
    line = (out.stdout.strip().splitlines() or [""])[-1]
    records = int(line.split(": ", 1)[1].split(" records")[0]) if " records" in line else None
    if out.returncode != 0 or records != int(calls):
        sys.exit(f"audit check failed: {int(calls)} calls, verify said {line!r} {out.stderr.strip()}")
    return {"calls": int(calls), "sealed": int(sealed), "caught_up_after_s": caught_up,
            "verify": line}


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
        llm = start_responder(procs) if UPSTREAM == "fast" else os.environ["SWITCHYARD_LLM_BASE_URL"].rstrip("/")
        # switchyard: a config of its own (no agents or routes: its stages idle), the gateway alias
        # `bench` (two candidates, a limit that does not bind but is checked on every call).
        sy_port = free_port()
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        cfg = f"""
log: {{level: warn}}
topics: {{dir: "{ROOT / 'topics'}"}}
schemas_dir: "{ROOT / 'schemas'}"
gateway:
  providers:
    default: {{base_url: "{llm}"}}
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
        env = dict(os.environ, SWITCHYARD_HTTP_LISTEN=f"127.0.0.1:{sy_port}", RUST_LOG="warn",
                   SWITCHYARD_LLM_BASE_URL=llm)  # it overrides the provider `default`
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
    litellm_params: {{model: openai/bench-a, api_base: "{llm}", api_key: sk-none, rpm: 100000000}}
  - model_name: bench-b
    litellm_params: {{model: openai/bench-b, api_base: "{llm}", api_key: sk-none, rpm: 100000000}}
general_settings:
  master_key: "{KEY}"
router_settings:
  fallbacks: [{{"bench": ["bench-b"]}}]
litellm_settings:
  drop_params: true
  set_verbose: false
""")
        litellm = os.environ.get("GW_LITELLM", "litellm")
        # As many worker processes as cores (switchyard's runtime uses every core too).
        procs.append(subprocess.Popen([litellm, "--config", str(ll_cfg), "--port", str(ll_port), "--host", "127.0.0.1",
                                       "--num_workers", str(LITELLM_WORKERS)],
                                      stdout=open(tmp / "litellm.log", "w"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", procs[-1], "litellm")

        systems = [
            ("direct", f"{llm}/chat/completions", "bench-a"),
            ("switchyard", f"http://127.0.0.1:{sy_port}/v1/chat/completions", "bench"),
            ("litellm proxy", f"http://127.0.0.1:{ll_port}/v1/chat/completions", "bench"),
        ]
        results = {}
        for name, url, model in systems:
            print(f"gateway bench: {name}", file=sys.stderr)
            calls = LITELLM_CALLS if name.startswith("litellm") else CALLS
            results[name] = {
                "sequential": measure(url, model, min(SEQUENTIAL, calls), 1),
                "concurrent": measure(url, model, calls, CONCURRENCY),
            }
            if name == "switchyard":
                # Right after its throughput phase, before LiteLLM runs: what it still had to write.
                results[name]["audit"] = audited(sy_port, binary, sy_cfg, env)
                failed = results[name]["sequential"]["errors"] + results[name]["concurrent"]["errors"]
                if failed:
                    sys.exit(f"switchyard failed {failed} calls")
        direct = results["direct"]
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
        a = results["switchyard"]["audit"]
        print(f"switchyard audit: {a['calls']} calls, every one sealed {a['caught_up_after_s']} s after the "
              f"last answer; {a['verify']}")
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip() != ""
        out = {"git": git, "dirty_tree": dirty, "litellm_workers": LITELLM_WORKERS, "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
               "upstream": UPSTREAM, "sequential_calls": SEQUENTIAL, "concurrent_calls": CALLS,
               "litellm_calls": LITELLM_CALLS, "concurrency": CONCURRENCY,
               "results": results, "switchyard_over_litellm_calls_per_s": round(ratio, 2),
               "method": "one load generator (examples/llm_bench.rs load: Rust, reqwest, one thread) against "
                         "each system in turn, all calling the same upstream (GW_UPSTREAM); the same "
                         "request; latency phase one call at a time, throughput phase CONCURRENCY in flight; "
                         "50 warm-up calls each, not counted; added = system p50/p99 - direct p50/p99"}
        dest = Path(os.environ.get("GW_RESULT", str(ROOT / "deploy/bench/results/gateway.json")))
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
