#!/usr/bin/env python3
"""An external switchyard agent over Kafka, in ~60 lines of Python (confluent-kafka).

Protocol (see the README, "Kafka agents"):
  request  (request topic): structured JSON CloudEvent, type switchyard.agent.request,
           data = {correlation_id, reply_topic, agent, attempt, task, event, context: {version, facts}}
  reply    (reply topic):   structured JSON CloudEvent, type switchyard.agent.reply,
           data = {correlation_id, findings: [{key, value}], proposals: [{action, parameters, priority, impact, reason}]}
           or     {correlation_id, error: "...", retryable: true|false}

This example notes what it saw in the resource's context (key example.note) and proposes `notify`.
An event whose data has "fail": true gets a non-retryable error reply.

Usage: agent.py --brokers HOST:PORT --request-topic T --reply-topic R [--group G]
"""
import argparse
import json
import os
import signal
import sys
import uuid
from datetime import datetime, timezone

from confluent_kafka import Consumer, Producer


def handle(req):
    event = req.get("event", {})
    data = event.get("data") or {}
    if data.get("fail"):
        return {"error": "example agent was asked to fail", "retryable": False}
    seen = req.get("context", {}).get("facts", {})
    return {
        "findings": [{"key": "example.note", "value": {
            "saw_event": event.get("id"), "saw_type": event.get("type"),
            "context_version": req.get("context", {}).get("version"),
            "known_keys": sorted(seen.keys())}}],
        "proposals": [{"action": "notify", "priority": 5, "impact": "low",
                       "parameters": {"channel": "#ops", "text": f"{event.get('type')} on {event.get('subject')}"},
                       "reason": "example agent always notifies"}],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default=os.environ.get("SWITCHYARD_KAFKA_BROKERS", "127.0.0.1:9092"))
    ap.add_argument("--request-topic", required=True)
    ap.add_argument("--reply-topic", required=True)
    ap.add_argument("--group", default="example-agent")
    args = ap.parse_args()
    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": True,
                         "session.timeout.ms": int(os.environ.get("SESSION_TIMEOUT_MS", "6000")),
                         "fetch.wait.max.ms": 20})
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 2})
    consumer.subscribe([args.request_topic])
    running = True

    def stop(*_):
        nonlocal running
        running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"example agent: {args.request_topic} -> {args.reply_topic}", file=sys.stderr, flush=True)
    while running:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        try:
            request = json.loads(msg.value())
            data = request["data"]
            body = handle(data)
        except Exception as e:  # a malformed request: answer if we can, never crash
            data = locals().get("data") or {}
            body = {"error": f"cannot handle request: {e}", "retryable": False}
        if "correlation_id" not in data:
            continue
        body["correlation_id"] = data["correlation_id"]
        reply = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "example-agent",
                 "type": "switchyard.agent.reply", "subject": request.get("subject"),
                 "time": datetime.now(timezone.utc).isoformat(), "datacontenttype": "application/json",
                 "data": body}
        producer.produce(data.get("reply_topic") or args.reply_topic, key=msg.key(), value=json.dumps(reply),
                         headers={"content-type": "application/cloudevents+json"})
        producer.poll(0)
    producer.flush(5)
    consumer.close()


if __name__ == "__main__":
    main()
