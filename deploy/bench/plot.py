#!/usr/bin/env python3
"""Plots throughput and p99 latency against offered rate from the e2e benchmark's JSON."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
doc = json.load(open(src))
phases = doc["phases"]
colors = {"switchyard": "tab:blue", "limit": "tab:gray", "peer": "tab:orange"}
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
for system, color in colors.items():
    fixed = sorted((p for p in phases if p["system"] == system and p["offered_rate"]), key=lambda p: p["offered_rate"])
    top = [p for p in phases if p["system"] == system and not p["offered_rate"]]
    if not fixed and not top:
        continue
    xs = [p["offered_rate"] for p in fixed] + [p["throughput_eps"] for p in top]
    a1.plot(xs, [p["throughput_eps"] for p in fixed] + [p["throughput_eps"] for p in top], "o-", color=color, label=system)
    a2.plot([p["offered_rate"] for p in fixed], [p["p99_ms"] for p in fixed], "o-", color=color, label=f"{system} p99")
    a2.plot([p["offered_rate"] for p in fixed], [p["p50_ms"] for p in fixed], "x--", color=color, alpha=0.6, label=f"{system} p50")
a1.set_xlabel("offered rate (events/s; last point: maximum)")
a1.set_ylabel("achieved throughput (events/s)")
a1.set_title("Throughput")
a1.legend()
a2.set_xlabel("offered rate (events/s)")
a2.set_ylabel("latency produce → result (ms)")
a2.set_yscale("log")
a2.set_title("Latency")
a2.legend(fontsize=8)
m = doc.get("machine", {})
fig.suptitle(f"switchyard e2e: {doc['events_per_phase']} events/phase, {doc['resources']} resources — {m.get('cpu', '?')}, {m.get('cores', '?')} cores", fontsize=9)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
