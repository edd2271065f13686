#!/usr/bin/env python3
"""Plots the e2e benchmark's JSON: throughput and latency against offered rate (top row), and, when the
JSON has them, the work each system does per event at maximum rate and switchyard's scaling figures
(bottom row). Older JSON without the newer fields gives the top row only."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
doc = json.load(open(src))
phases = doc["phases"]
colors = {"switchyard": "tab:blue", "limit": "tab:gray", "peer": "tab:orange"}
scaling = doc.get("scaling") or {}
top_phases = {p["system"]: p for p in phases if not p.get("offered_rate")}
has_work = any("records_per_event" in p for p in top_phases.values())
rows = 2 if (has_work or scaling) else 1
fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
a1, a2 = axes[0]
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
a1.set_ylabel("achieved throughput (events/s, to the last output record)")
a1.set_title("Throughput")
a1.legend()
a2.set_xlabel("offered rate (events/s)")
a2.set_ylabel("latency produce → result record (ms)")
a2.set_yscale("log")
a2.set_title("Latency")
a2.legend(fontsize=8)

if rows == 2:
    a3, a4 = axes[1]
    # Work per event at maximum rate: what each system writes and asks of Redis.
    metrics = [
        ("records/ev", lambda p: p.get("records_per_event")),
        ("batches/ev", lambda p: p.get("batches_per_event")),
        ("KB/ev", lambda p: (p.get("bytes_per_event") or 0) / 1000.0),
        ("Redis cmds/ev", lambda p: p.get("redis_commands_per_event")),
        ("CPU ms/ev (all)", lambda p: p["cpu_seconds_per_1000"] + p["broker_cpu_seconds_per_1000"] + p["redis_cpu_seconds_per_1000"]),
    ]
    systems = [s for s in colors if s in top_phases]
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        p = top_phases[system]
        vals = [(f(p) or 0.0) for _, f in metrics]
        xs = [m + (i - (len(systems) - 1) / 2) * width for m in range(len(metrics))]
        bars = a3.bar(xs, vals, width, color=colors[system], label=system)
        for b, v in zip(bars, vals):
            a3.annotate(f"{v:.2f}" if v < 10 else f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    a3.set_xticks(range(len(metrics)), [m for m, _ in metrics], fontsize=8)
    a3.set_yscale("log")  # Redis commands per event dwarf the rest; zero bars are left out
    a3.set_title("Work per event at maximum rate")
    a3.legend(fontsize=8)
    mix = doc.get("redis_mix")
    if mix:
        a3.set_xlabel(f"switchyard's Redis command mix replayed pipelined: {mix['throughput_eps']:,.0f} events/s, "
                      f"Redis {mix['redis_cpu_seconds_per_1000']:.3f} CPU-s per 1,000 events", fontsize=8)
    # Scaling: switchyard at maximum rate.
    bars = []
    for p in scaling.get("by_resources", []):
        bars.append((f"{p['resources']:,} res\n1 proc", p["throughput_eps"]))
    for p in scaling.get("by_processes", []):
        if p["processes"] == 1:
            continue  # the same phase as the 10,000-resource bar
        bars.append((f"{p['resources']:,} res\n{p['processes']} procs", p["throughput_eps"]))
    if bars:
        b = a4.bar(range(len(bars)), [v for _, v in bars], color="tab:blue")
        for rect, (_, v) in zip(b, bars):
            a4.annotate(f"{v:,.0f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom", fontsize=8)
        a4.set_xticks(range(len(bars)), [lbl for lbl, _ in bars], fontsize=8)
        a4.set_ylabel("events/s")
        a4.set_title(f"switchyard scaling at maximum rate ({scaling.get('events_per_phase', '?')} events/phase)")
    else:
        a4.set_axis_off()

m = doc.get("machine", {})
fig.suptitle(f"switchyard e2e: {doc['events_per_phase']} events/phase, {doc['resources']} resources — {m.get('cpu', '?')}, {m.get('cores', '?')} cores", fontsize=9)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
