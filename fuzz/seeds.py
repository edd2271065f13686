#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target to fuzz/corpus/<target>/seed-*, from the repository's
samples (deploy/local/samples), the shipped config, and the shapes the unit tests use. Each target's
input framing is the one src/fuzzing.rs documents (a selector byte, header lines, a blank line, the
body). Run from anywhere: python3 fuzz/seeds.py
"""
import glob
import hashlib
import json
import os
import struct

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def events():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy/local/samples/*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    for ev in out:
        ev.setdefault("specversion", "1.0")
    return out


def head(pairs, body):
    lines = "".join(f"{k}: {v}\n" for k, v in pairs)
    return lines.encode() + b"\n" + (body if isinstance(body, bytes) else body.encode())


# Avro binary encoding, enough for the event envelopes.
def zz(n):
    n = (n << 1) ^ (n >> 63)
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def a_str(s):
    b = s.encode()
    return zz(len(b)) + b


def a_opt_str(s):
    return zz(0) if s is None else zz(1) + a_str(s)


def a_opt_double(x):
    return zz(0) if x is None else zz(1) + struct.pack("<d", float(x))


def envelope(ev, data):
    out = a_str("1.0") + a_str(ev["id"]) + a_str(ev["source"]) + a_str(ev["type"])
    out += a_opt_str(ev.get("subject")) + a_opt_str(ev.get("time"))
    out += a_opt_str("application/json") + a_opt_str(None)
    out += a_opt_str(ev.get("tenant")) + a_opt_str(None)
    return out + data


def avro_data(ev):
    d = ev.get("data", {})
    if ev["type"].startswith("deployment."):
        deps = d.get("dependencies")
        deps_b = zz(0) if deps is None else zz(1) + (zz(len(deps)) + b"".join(a_str(x) for x in deps) + zz(0) if deps else zz(0))
        return 5, (a_str(d.get("service", "")) + a_str(d.get("version", "")) + a_opt_str(d.get("previous_version"))
                   + a_opt_str(d.get("environment")) + a_opt_str(d.get("actor")) + a_opt_str(d.get("change_url"))
                   + a_opt_str(d.get("owner")) + deps_b)
    if ev["type"].startswith("sla."):
        return 10, (a_str(d.get("service", "")) + a_str(d.get("slo", "")) + a_opt_double(d.get("objective"))
                    + a_opt_double(d.get("observed")) + a_opt_str(d.get("severity")) + a_opt_str(d.get("window"))
                    + a_opt_str(d.get("owner")))
    if ev["type"].startswith("cost."):
        return 4, (a_str(d.get("service", "")) + struct.pack("<d", float(d.get("budget", 0)))
                   + struct.pack("<d", float(d.get("spend", 0))) + a_str(d.get("currency", "USD"))
                   + a_opt_str(d.get("period")) + a_opt_double(d.get("threshold_pct")))
    return None, None


def main():
    evs = events()
    for i, ev in enumerate(evs):
        text = json.dumps(ev)
        put("codec_structured", f"sample-{i}", b"\x00" + text.encode())
        put("ingest_cloudevents", f"structured-{i}", b"\x00" + text.encode())
        attrs = [(f"ce_{k}", v) for k, v in ev.items() if k != "data" and isinstance(v, str)]
        binary = head(attrs + [("content-type", "application/json")], json.dumps(ev.get("data", {})))
        put("codec_binary", f"sample-{i}", binary)
        put("ingest_cloudevents", f"binary-{i}",
            b"\x02" + head([(f"ce-{k}", v) for k, v in ev.items() if k != "data" and isinstance(v, str)]
                           + [("content-type", "application/json")], json.dumps(ev.get("data", {}))))
        pick, data = avro_data(ev)
        if pick is not None:
            put("codec_avro", f"sample-{i}", bytes([pick]) + envelope(ev, data))
    put("codec_structured", "keyed", b"\x01" + json.dumps({k: v for k, v in evs[0].items() if k != "subject"}).encode())
    put("ingest_cloudevents", "batch", b"\x01" + json.dumps(evs[:5]).encode())
    with open(os.path.join(ROOT, "deploy/local/samples/poison.txt"), "rb") as f:
        for i, line in enumerate(f.read().splitlines()):
            put("codec_structured", f"poison-{i}", b"\x00" + line)

    # Alertmanager and GitHub, as in src/http/ingest.rs's tests.
    put("ingest_alertmanager", "firing-resolved", json.dumps({
        "version": "4", "groupKey": "{}:{alertname=\"SLO\"}", "status": "firing", "receiver": "switchyard",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
        "alerts": [
            {"status": "firing", "labels": {"alertname": "SLO", "service": "checkout", "team": "pay", "tenant": "acme"},
             "annotations": {"summary": "burning"}, "startsAt": "2026-01-01T10:00:00Z",
             "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph", "fingerprint": "abc"},
            {"status": "resolved", "labels": {"alertname": "SLO", "service": "cart"},
             "annotations": {}, "startsAt": "2026-01-01T09:00:00Z",
             "endsAt": "2026-01-01T09:30:00Z", "generatorURL": "", "fingerprint": ""}]}))
    gh = json.dumps({
        "action": "created",
        "deployment_status": {"id": 77, "state": "failure", "environment": "production", "description": "boom",
                              "updated_at": "2026-01-01T10:00:00Z", "creator": {"login": "octo"}},
        "deployment": {"id": 42, "sha": "abc", "ref": "main", "environment": "production"},
        "repository": {"name": "payments", "full_name": "acme/payments"}})
    put("ingest_github", "deployment-status", b"\x00" + gh.encode())
    put("ingest_github", "deployment-status-env", b"\x04" + gh.encode())
    put("ingest_github", "ping", b"\x01" + b'{"zen": "Keep it logically awesome."}')
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17\n"
    put("ingest_github", "signed", b"\x00" + sig.encode() + gh.encode())

    # Agents' answers.
    resp = {"findings": [{"key": "sla", "value": {"active": True}}],
            "proposals": [{"action": "rollback", "parameters": {"to": "v41"}, "priority": 5, "impact": "high",
                           "reason": "breach after deploy", "confidence": 0.8}]}
    put("agent_http_reply", "ok", b"\x00\x64" + json.dumps(resp).encode())  # 100 + 100 = 200
    put("agent_http_reply", "error-500", b"\x01\x90" + b"boom")  # 100 + 400 = 500
    put("agent_http_reply", "delegate", b"\x00\x64" + json.dumps(
        {"delegate": [{"agent": "sla-responder", "instructions": "look"}], "cost": 0.1, "model": "m"}).encode())
    reply = {"specversion": "1.0", "id": "r-1", "source": "agent", "type": "switchyard.agent.reply",
             "subject": "checkout", "data": dict(resp, correlation_id="task-1/1")}
    put("agent_kafka_reply", "ok", head([("content-type", "application/cloudevents+json")], json.dumps(reply)))
    put("agent_kafka_reply", "error", json.dumps(dict(reply, data={"correlation_id": "task-1/1",
                                                                     "error": "no", "retryable": False})))
    put("agent_kafka_reply", "binary", head([("ce_specversion", "1.0"), ("ce_id", "r-2"), ("ce_source", "a"),
                                             ("ce_type", "switchyard.agent.reply"), ("ce_subject", "x"),
                                             ("content-type", "application/json")],
                                            json.dumps(dict(resp, correlation_id="t/2"))))

    # Model answers: OpenAI and Anthropic, plain and streamed.
    oa = {"id": "c-1", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "```json\n{\"a\": 1}\n```",
                                               "tool_calls": [{"id": "t1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}}
    an = {"id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "tool_use",
          "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "tu1", "name": "structured_output",
                                                        "input": {"a": 1}},
                      {"type": "tool_use", "id": "tu2", "name": "lookup", "input": {"q": "x"}}],
          "usage": {"input_tokens": 10, "cache_read_input_tokens": 3, "output_tokens": 4}}
    put("gateway_response", "openai", b"\x00" + json.dumps(oa).encode())
    put("gateway_response", "anthropic", b"\x01" + json.dumps(an).encode())
    put("gateway_response", "anthropic-structured", b"\x03" + json.dumps(an).encode())
    put("gateway_response", "error", b"\x00" + b'{"error": {"message": "rate limited", "type": "rate_limit"}}')
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    put("gateway_stream", "openai", b"\x10" + f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
    sse = [("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}),
           ("content_block_start", {"type": "content_block_start", "index": 1,
                                    "content_block": {"type": "tool_use", "id": "tu", "name": "f"}}),
           ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "hi"}}),
           ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                    "delta": {"type": "input_json_delta", "partial_json": "{\"q\":"}}),
           ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                              "usage": {"output_tokens": 7}}),
           ("error", {"type": "error", "error": {"message": "overloaded"}})]
    body = "".join(f"event: {n}\r\ndata: {json.dumps(d)}\r\n\r\n" for n, d in sse)
    put("gateway_stream", "anthropic", b"\x21" + body.encode())

    # The served endpoint's request.
    req = {"model": "fast", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
           "temperature": 0.2, "stop": ["\n"], "tool_choice": {"type": "function", "function": {"name": "f"}},
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
           "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
           "messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                        {"role": "assistant", "content": None,
                         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                        {"role": "tool", "tool_call_id": "t1", "content": "42"},
                        {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "43"}]}]}
    put("gateway_request", "full", json.dumps(req))
    put("gateway_request", "plain", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))

    # Approval decisions.
    for i, (verb, body) in enumerate([(0, {"why": "ok"}), (1, {"by": "alice", "why": "no"}),
                                      (2, {"parameters": {"replicas": 3}, "why": "fewer"}), (3, {"comment": "why?"}),
                                      (2, {"parameters": [1]}), (4, {})]):
        put("approvals_body", f"verb-{i}", bytes([verb]) + json.dumps(body).encode())
    put("approvals_body", "no-body", b"\x00")

    # Configs: the shipped one and small ones.
    with open(os.path.join(ROOT, "deploy/switchyard.yaml"), "rb") as f:
        put("config_yaml", "shipped", f.read())
    put("config_yaml", "empty", "")
    put("config_yaml", "agents", "agents:\n  probe:\n    kind: http\n    url: http://localhost:9/agent\n"
                                 "    actions: [page]\nroutes:\n  - name: r\n    match: {type: 'sla.*'}\n    agents: [probe]\n")
    put("config_yaml", "anchors", "a: &x [1, 2]\nb: *x\n")


if __name__ == "__main__":
    main()
