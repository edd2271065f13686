"""The fault suite's independent checker (README, "Faults we test").

Reads every topic from the start, as a subscriber would, with its own Kafka client and none of
switchyard's code, and judges each phase of the fault suite (resources named `<phase>-svc-NNNN`):

- events in, tasks, results, decisions (audit records), approvals asked and decided, actions;
- events lost: an input event with no result and no dead-letter record (must be 0);
- tasks lost: a task with no result (must be 0);
- proposals undecided: a proposal without conflict resolution's audit record for it (must be 0);
- approvals open: asked for and never decided, though the suite decides every one (must be 0);
- dead-lettered: inputs, tasks and approval decisions of the phase on the dead-letter topic (must
  be 0; the suite writes nothing malformed);
- actions doubled: one action id written with different content or fencing token, one proposal
  causing two different actions, or two different actions sharing a resource's fencing token
  (must be 0; the identical record written again after a crash is a duplicate, not a double);
- order violations: along a resource's partition of the actions topic, the fencing tokens of its
  actions must increase (must be 0);
- `switchyard audit verify` over the audit topic (must find no problem).

    python fault_check.py --brokers HOST:PORT --bin switchyard --config faults.yaml \
        [--driver driver.json] [--out check.json]

Prints a table and exits 1 when any count that must be 0 is not, or the audit does not verify.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict

from confluent_kafka import Consumer, TopicPartition

DLQ_REASONS = Counter()  # the dead-letter topic's reasons (its header), for the report

TOPICS = ["events.deployments", "events.sla-breaches", "events.cost-thresholds", "switchyard.tasks",
          "switchyard.results", "switchyard.proposals", "switchyard.actions", "switchyard.approvals",
          "switchyard.audit", "switchyard.dlq"]
PHASE = re.compile(r"^(.+?)-svc-\d+$")


def read_all(brokers, idle=5.0):
    """Every record of TOPICS: {topic: [(partition, offset, value bytes)]}, read until `idle`
    seconds pass without one (the broker's high watermarks are not trusted)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"fault-check-{time.time()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 20, "session.timeout.ms": 6000})
    parts = []
    for t in TOPICS:
        md = c.list_topics(t, timeout=10).topics[t]
        if md.error is not None:
            raise SystemExit(f"fault_check: topic {t}: {md.error}")
        parts += [TopicPartition(t, p, -2) for p in md.partitions]
    c.assign(parts)
    out = defaultdict(list)
    last = time.time()
    while time.time() - last < idle:
        for m in c.consume(1000, 0.5):
            if m.error():
                continue
            out[m.topic()].append((m.partition(), m.offset(), m.value()))
            if m.topic() == "switchyard.dlq":
                reason = dict(m.headers() or []).get("switchyard.dlq.reason") or b"?"
                DLQ_REASONS[reason.decode(errors="replace")] += 1
            last = time.time()
    c.close()
    return out


def resolved_proposal(audit_data):
    """The proposal a conflict-resolution audit record decided (its detail names it), else None."""
    if not isinstance(audit_data, dict) or audit_data.get("stage") != "resolve":
        return None
    detail = audit_data.get("detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return None
    return detail.get("proposal_id") if isinstance(detail, dict) else None


def phase_of(resource):
    m = PHASE.match(resource or "")
    return m.group(1) if m else None


def judge(records):
    """Per phase: the counts of the table."""
    ph = defaultdict(lambda: defaultdict(int))
    inputs = defaultdict(set)  # phase -> event ids
    results_for = set()  # event ids with a result
    tasks = defaultdict(set)
    results = defaultdict(set)
    for t in ("events.deployments", "events.sla-breaches", "events.cost-thresholds"):
        for _, _, v in records[t]:
            ev = json.loads(v)
            p = phase_of(ev.get("subject"))
            if p:
                inputs[p].add(ev["id"])
    dead = defaultdict(set)  # phase -> ids of inputs (or their tasks' inputs) dead-lettered
    dead_decisions = set()  # approval ids whose decision was dead-lettered
    for _, _, v in records["switchyard.dlq"]:
        try:
            ev = json.loads(v)
        except ValueError:
            continue  # not JSON: none of the suite's
        if not isinstance(ev, dict):
            continue
        d = ev.get("data") if isinstance(ev.get("data"), dict) else {}
        p = phase_of(ev.get("subject") or d.get("resource"))
        if p:
            dead[p].add(d.get("event_id") or ev.get("id"))
        elif (d or ev).get("approval_id"):
            dead_decisions.add((d or ev)["approval_id"])  # a decision names no resource
    for _, _, v in records["switchyard.tasks"]:
        d = json.loads(v)["data"]
        p = phase_of(d["resource"])
        if p:
            tasks[p].add(d["task_id"])
    for _, _, v in records["switchyard.results"]:
        d = json.loads(v)["data"]
        p = phase_of(d["resource"])
        if p:
            results[p].add(d["task_id"])
            if d.get("event_id"):
                results_for.add(d["event_id"])
    proposals = defaultdict(set)  # phase -> proposal ids
    for _, _, v in records["switchyard.proposals"]:
        d = json.loads(v).get("data") or {}
        p = phase_of(d.get("resource"))
        if p and d.get("proposal_id"):
            proposals[p].add(d["proposal_id"])
    resolved = set()
    for _, _, v in records["switchyard.audit"]:
        ev = json.loads(v)
        p = phase_of(ev["data"].get("resource"))
        if p:
            ph[p]["_audit_ids"] = ph[p].get("_audit_ids") or set()
            ph[p]["_audit_ids"].add(ev["id"])
            pid = resolved_proposal(ev["data"])
            if pid:
                resolved.add(pid)
    approvals = defaultdict(dict)  # phase -> approval id -> final status
    for _, _, v in records["switchyard.approvals"]:
        d = json.loads(v)["data"]
        p = phase_of(d["resource"])
        if p:
            prev = approvals[p].get(d["approval_id"])
            if prev is None or prev in ("pending", "escalated"):
                approvals[p][d["approval_id"]] = d["status"]
            if d["approval_id"] in dead_decisions:
                dead[p].add(d["approval_id"])
    # Actions: one entry per action id, in the order of its resource's partition.
    by_id = defaultdict(set)  # action id -> distinct (data) serialisations
    first_at = {}  # action id -> (partition, offset, data)
    for part, off, v in records["switchyard.actions"]:
        d = json.loads(v)["data"]
        by_id[d["action_id"]].add(json.dumps(d, sort_keys=True))
        first_at.setdefault(d["action_id"], (part, off, d))
    for p in set(inputs) | set(tasks) | set(proposals):
        row = ph[p]
        row["events in"] = len(inputs[p])
        row["tasks"] = len(tasks[p])
        row["results"] = len(results[p])
        row["decisions"] = len(row.pop("_audit_ids", set()))
        row["proposals"] = len(proposals[p])
        row["proposals undecided"] = len(proposals[p] - resolved)
        statuses = list(approvals[p].values())
        row["approvals"] = len(statuses)
        row["approved"] = statuses.count("approved")
        row["rejected"] = statuses.count("rejected")
        row["approvals open"] = statuses.count("pending") + statuses.count("escalated")
        row["dead-lettered"] = len(dead[p])
        row["events lost"] = sum(1 for e in inputs[p] if e not in results_for and e not in dead[p])
        row["tasks lost"] = len(tasks[p] - results[p])
    doubled = defaultdict(int)
    order = defaultdict(int)
    actions = defaultdict(int)
    approved_actions = defaultdict(int)
    per_resource = defaultdict(list)
    proposal_to = {}
    token_to = {}
    for aid, (part, off, d) in first_at.items():
        p = phase_of(d["resource"])
        if not p:
            continue
        actions[p] += 1
        if d.get("approved_by"):
            approved_actions[p] += 1
        if len(by_id[aid]) > 1:
            doubled[p] += 1  # one action id, different content or token
        for prop in d.get("proposals") or []:
            if proposal_to.setdefault(prop, aid) != aid:
                doubled[p] += 1  # one proposal, two actions
        key = (d["resource"], d["fencing_token"])
        if token_to.setdefault(key, aid) != aid:
            doubled[p] += 1  # two actions, one token
        per_resource[d["resource"]].append(((part, off), d["fencing_token"]))
    for res, lst in per_resource.items():
        lst.sort()
        for (_, a), (_, b) in zip(lst, lst[1:]):
            if b <= a:
                order[phase_of(res)] += 1
    for p in ph:
        ph[p]["actions"] = actions[p]
        ph[p]["approved actions"] = approved_actions[p]
        ph[p]["actions doubled"] = doubled[p]
        ph[p]["order violations"] = order[p]
    return {p: dict(r) for p, r in ph.items()}


def audit_verify(bin_, config, idle):
    r = subprocess.run([bin_, "--config", config, "audit", "verify", "--idle-timeout-ms", str(int(idle * 1000))],
                       capture_output=True, text=True, timeout=600)
    text = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        print("audit verify said:\n  " + "\n  ".join(text.splitlines()[-30:]))
    return r.returncode == 0, text.splitlines()[-1] if text else f"exit {r.returncode}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--driver", help="the driver's report (phase order, notes, exit codes)")
    ap.add_argument("--out")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds without a record that end the reading")
    args = ap.parse_args()
    driver = json.load(open(args.driver)) if args.driver else {"phases": []}
    t = time.time()
    records = read_all(args.brokers, args.idle)
    n = sum(len(v) for v in records.values())
    print(f"fault_check: read {n} records from {len(TOPICS)} topics in {time.time() - t:.1f} s")
    rows = judge(records)
    ok_audit, audit_line = audit_verify(args.bin, args.config, args.idle)
    order = [p["phase"] for p in driver["phases"]] or sorted(rows)
    cols = ["events in", "tasks", "results", "proposals", "proposals undecided", "decisions", "approvals",
            "approved", "rejected", "actions", "approved actions", "dead-lettered", "events lost", "tasks lost",
            "actions doubled", "order violations"]
    must_be_zero = ["events lost", "tasks lost", "proposals undecided", "actions doubled", "order violations",
                    "approvals open", "dead-lettered"]
    print()
    print("| fault | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    failed = []
    for p in order:
        r = rows.get(p, {})
        print(f"| {p} | " + " | ".join(str(r.get(c, 0)) for c in cols) + " |")
        for c in must_be_zero:
            if r.get(c, 0):
                failed.append(f"{p}: {c} = {r[c]}")
        if not r.get("events in"):
            failed.append(f"{p}: no events in")
        elif r.get("actions", 0) == 0 or r.get("approved actions", 0) == 0:
            failed.append(f"{p}: no actions or no approved actions (the load did not exercise the pipeline)")
    print()
    if DLQ_REASONS:
        print("dead-letter reasons: " + ", ".join(f"{r} {n}" for r, n in DLQ_REASONS.most_common()))
    print(f"audit verify: {audit_line}")
    if not ok_audit:
        failed.append(f"audit verify failed: {audit_line}")
    for p in driver["phases"]:
        for note in p.get("notes", []):
            print(f"  {p['phase']}: {note}")
            if note.startswith("NOT DONE"):
                failed.append(f"{p['phase']}: {note}")
    for name, code in (driver.get("exit_codes") or {}).items():
        if code != 0:
            failed.append(f"{name} exited {code} on SIGTERM")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "audit_verify": audit_line, "failed": failed}, f, indent=2)
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed))
        sys.exit(1)
    print("\nfault_check: every phase passed")


if __name__ == "__main__":
    main()
