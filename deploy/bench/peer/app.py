#!/usr/bin/env python3
"""The peer: switchyard's three-stage flow written the way a team would with quixstreams + redis-py.

  route    input topics -> <prefix>.tasks        (match type -> agent, re-key by subject)
  agent    <prefix>.tasks -> <prefix>.results    (read + write the resource's context in Redis,
                                                  propose an action; result and proposal records)
           and <prefix>.proposals
  resolve  <prefix>.proposals -> <prefix>.actions (per-resource: last action in Redis, reject conflicts)

Run one process per stage:  app.py STAGE --brokers B --redis URL --prefix P --inputs T1,T2,T3
Used by the end-to-end benchmark (deploy/bench/run.sh); not part of switchyard.
"""
import argparse
import json
import os
import time

import redis
from quixstreams import Application

ROUTES = {"deployment.": "deploy-guard", "sla.": "sla-responder", "cost.": "cost-guard"}
CONFLICTS = {("scale_down", "rollback"), ("rollback", "scale_down")}
PRIORITY = {"rollback": 100, "page": 50, "scale_down": 10, "deployment.hold": 80}


def producer_config(stage, max_in_flight):
    """linger.ms and max.in.flight.requests.per.connection as switchyard's; with BENCH_PEER_BATCHES_DIR set, librdkafka statistics every
    second and the running total of record batches sent written to <dir>/<stage> for the bench."""
    cfg = {"linger.ms": 5, "max.in.flight.requests.per.connection": max_in_flight}
    out = os.environ.get("BENCH_PEER_BATCHES_DIR")
    if out:
        path = os.path.join(out, stage)
        total = [0]

        def stats(text):
            for topic in json.loads(text).get("topics", {}).values():
                total[0] += max(topic.get("batchcnt", {}).get("cnt", 0), 0)
            with open(path + ".tmp", "w") as f:
                f.write(str(total[0]))
            os.replace(path + ".tmp", path)

        cfg.update({"statistics.interval.ms": 1000, "stats_cb": stats})
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["route", "agent", "resolve"])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--inputs", default="")
    ap.add_argument("--fetch-wait-ms", type=int, default=20, help="consumer fetch.wait.max.ms")
    ap.add_argument("--max-in-flight", type=int, default=5,
                    help="producer max.in.flight.requests.per.connection")
    args = ap.parse_args()
    app = Application(
        broker_address=args.brokers,
        consumer_group=f"{args.prefix}-peer-{args.stage}",
        auto_offset_reset="earliest",
        consumer_extra_config={"session.timeout.ms": 6000, "fetch.wait.max.ms": args.fetch_wait_ms},
        producer_extra_config=producer_config(args.stage, args.max_in_flight),
        auto_create_topics=True,
        use_changelog_topics=False,
    )
    r = redis.Redis.from_url(args.redis)
    p = args.prefix

    if args.stage == "route":
        tasks = app.topic(f"{p}.tasks", value_serializer="json", key_serializer="string")
        for name in args.inputs.split(","):
            sdf = app.dataframe(app.topic(name, value_deserializer="json"))

            def route(ev):
                for prefix, agent in ROUTES.items():
                    if ev.get("type", "").startswith(prefix):
                        return {"agent": agent, "event": ev}
                return None

            sdf = sdf.apply(route).filter(lambda t: t is not None)
            # Re-key by resource so one agent process sees a resource's tasks in order.
            sdf.to_topic(tasks, key=lambda t: t["event"].get("subject", ""))
    elif args.stage == "agent":
        results = app.topic(f"{p}.results", value_serializer="json", key_serializer="bytes")
        proposals = app.topic(f"{p}.proposals", value_serializer="json", key_serializer="bytes")
        sdf = app.dataframe(app.topic(f"{p}.tasks", value_deserializer="json"))

        def run_agent(task):
            ev = task["event"]
            key = f"{p}:ctx:{ev.get('subject')}"
            ctx = r.hgetall(key)  # read the shared context
            ty = ev.get("type", "")
            action = None
            if ty.startswith("sla.breached") and b"deployment" in ctx:
                action = "rollback"
            elif ty.startswith("cost."):
                action = "scale_down"
            elif ty.startswith("sla."):
                action = "page"
            r.hset(key, mapping={ty.split(".")[0]: json.dumps(ev.get("data"))})  # write a finding
            return {"event_id": ev.get("id"), "resource": ev.get("subject"), "agent": task["agent"],
                    "status": "succeeded", "action": action, "context_keys": len(ctx)}

        sdf = sdf.apply(run_agent)
        sdf.to_topic(results)
        sdf.filter(lambda res: res["action"] is not None).to_topic(proposals)
    else:
        actions = app.topic(f"{p}.actions", value_serializer="json", key_serializer="bytes")
        sdf = app.dataframe(app.topic(f"{p}.proposals", value_deserializer="json"))

        def resolve(prop):
            key = f"{p}:last:{prop['resource']}"
            last = r.get(key)
            if last:
                last = json.loads(last)
                if (last["action"], prop["action"]) in CONFLICTS and PRIORITY[prop["action"]] <= PRIORITY[last["action"]]:
                    return None
            r.set(key, json.dumps({"action": prop["action"], "at": time.time()}), ex=1800)
            return {"resource": prop["resource"], "action": prop["action"], "event_id": prop["event_id"]}

        sdf.apply(resolve).filter(lambda a: a is not None).to_topic(actions)
    app.run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
