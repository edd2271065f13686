"""Prints the span tree of one event's trace from the OTLP receiver's file (otlp_receiver.py):

    python span_tree.py SPANS_FILE EVENT_ID

The trace is the one whose routing span names the event (attribute switchyard.event.id); each line
is a span with its duration and a few attributes, children indented under their parent.
"""

import json
import sys

spans_file, event_id = sys.argv[1], sys.argv[2]
spans = []
with open(spans_file, encoding="utf-8") as f:
    for line in f:
        try:
            spans.append(json.loads(line))
        except ValueError:
            pass
roots = [s for s in spans if s["attributes"].get("switchyard.event.id") == event_id and s["name"].startswith("route ")]
if not roots:
    print(f"no routing span of event {event_id} yet ({len(spans)} spans received)")
    sys.exit(0)
trace = roots[0]["trace_id"]
mine = {s["span_id"]: s for s in spans if s["trace_id"] == trace}
children = {}
for s in mine.values():
    children.setdefault(s["parent_span_id"], []).append(s)
SHOW = ["switchyard.decision", "switchyard.status", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "switchyard.rule", "switchyard.approval.decided_by", "gen_ai.tool.name"]


def show(s, depth):
    ms = (s["end_ns"] - s["start_ns"]) / 1e6
    attrs = " ".join(f"{k.split('.')[-1]}={s['attributes'][k]}" for k in SHOW if s["attributes"].get(k) not in (None, ""))
    print(f"  {'  ' * depth}{s['name']}  {ms:.1f} ms  {attrs}")
    for c in sorted(children.get(s["span_id"], []), key=lambda c: c["start_ns"]):
        show(c, depth + 1)


print(f"trace {trace}: {len(mine)} spans")
top = [s for s in mine.values() if s["parent_span_id"] not in mine]
for s in sorted(top, key=lambda s: s["start_ns"]):
    show(s, 0)
