#!/usr/bin/env python3
"""Reads `switchyard tail` JSON lines on stdin and prints one readable line per record."""
import json
import sys

n = 0
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    rec = json.loads(line)
    n += 1
    where = f"{rec['topic']}[{rec['partition']}]@{rec['offset']}"
    if "error" in rec:
        hdr = rec.get("headers", {})
        print(f"  {where:<34} DEAD LETTER reason={hdr.get('switchyard.dlq.reason')} from "
              f"{hdr.get('switchyard.dlq.source.topic')}@{hdr.get('switchyard.dlq.source.offset')}: {hdr.get('switchyard.dlq.detail', '')[:80]}")
        continue
    ev = rec["event"]
    d = ev.get("data") or {}
    t = ev.get("type")
    if t == "switchyard.task":
        src = d.get("event", {})
        print(f"  {where:<34} task {d.get('agent'):<14} resource={d.get('resource'):<10} for {src.get('type')} ({src.get('id')})")
    elif t == "switchyard.proposal":
        print(f"  {where:<34} proposal {d.get('action'):<15} resource={d.get('resource'):<10} by {d.get('agent'):<14} "
              f"impact={d.get('impact')} priority={d.get('priority')} {json.dumps(d.get('parameters'))}")
    elif t == "switchyard.result":
        keys = ",".join(f.get("key", "") for f in d.get("findings") or [])
        print(f"  {where:<34} result {d.get('agent'):<14} resource={d.get('resource'):<10} {d.get('status')} "
              f"in {d.get('duration_ms')} ms, findings: {keys or '-'}, proposals: {len(d.get('proposals') or [])}")
    elif t == "switchyard.action":
        by = f" approved by {d.get('approved_by')}" if d.get("approved_by") else ""
        print(f"  {where:<34} ACTION {d.get('action'):<15} resource={d.get('resource'):<10} token={d.get('fencing_token')} "
              f"{json.dumps(d.get('parameters'))}{by}")
    elif t == "switchyard.approval":
        print(f"  {where:<34} approval {d.get('status'):<9} {d.get('action'):<15} resource={d.get('resource'):<10} id={d.get('approval_id')}")
    elif t == "switchyard.workflow":
        step = f" {d.get('step')}" if d.get("step") else ""
        who = f" ({d.get('agent')})" if d.get("agent") else ""
        extra = f" {d.get('status')}" if d.get("status") else ""
        took = f" in {d.get('duration_ms')} ms" if d.get("duration_ms") is not None else ""
        print(f"  {where:<34} {d.get('workflow')} {d.get('run_id')[:16]}… {d.get('kind'):<18}{step}{who}{extra}{took}")
    elif t == "switchyard.tool_call":
        c = d.get("call") or {}
        who = d.get("agent") or "-"
        print(f"  {where:<34} tool {c.get('tool'):<20} by {who:<17} {c.get('outcome'):<9} "
              f"{json.dumps(c.get('arguments'))[:80]} -> {json.dumps(c.get('result') if c.get('error') is None else c.get('error'))[:60]}")
    elif t == "switchyard.audit":
        det = d.get("detail", {}) or {}
        if d.get("decision") == "tool_call":
            extra = f"{det.get('agent')} called {det.get('tool')} ({det.get('effect')}): {det.get('outcome')}"
        elif d.get("decision") == "llm_call":
            extra = (f"{det.get('agent')} -> {det.get('provider')}/{det.get('provider_model')}: {det.get('outcome')}, "
                     f"{det.get('input_tokens')}+{det.get('output_tokens')} tokens, cost {det.get('cost')}")
        elif det.get("proposal_id"):
            extra = f"{det.get('action')} from {det.get('agent')}" + (f" REASON={d.get('reason')}: {det.get('detail')}" if d.get("reason") else "")
        elif det.get("approval_id"):
            extra = f"{det.get('action')} {det.get('status')} by {det.get('decided_by')}"
        else:
            extra = d.get("reason") or ", ".join(det.get("routes", []) or []) or \
                (f"{det.get('agent')} {det.get('status')}" if det.get("agent") else "")
        if d.get("seq"):
            extra += f"  [seq {d['seq']} hash {d.get('hash', '')[:12]}]"
        print(f"  {where:<34} audit {d.get('decision'):<18} resource={d.get('resource'):<10} {extra}")
    elif rec.get("headers", {}).get("switchyard.dlq.reason"):
        hdr = rec["headers"]
        print(f"  {where:<34} DEAD LETTER reason={hdr['switchyard.dlq.reason']}: {hdr.get('switchyard.dlq.detail', '')[:80]}")
    else:
        print(f"  {where:<34} {t} subject={ev.get('subject')} {json.dumps(d)[:120]}")
if n == 0:
    print("  (no records)")
