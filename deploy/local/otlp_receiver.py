"""A small OTLP/HTTP trace receiver for switchyard's tests and demo, built on the official
OpenTelemetry protocol definitions (the `opentelemetry-proto` package from PyPI): it accepts
`POST /v1/traces` (protobuf, as the OTLP exporters send it, or OTLP JSON), answers with an
ExportTraceServiceResponse, and appends every span as a JSON line to SPANS_FILE.

    python otlp_receiver.py PORT SPANS_FILE

A line: {"trace_id", "span_id", "parent_span_id" (hex, "" for a root), "name", "kind",
"start_ns", "end_ns", "attributes": {key: value}, "status": {"code", "message"},
"service": service.name of its resource}.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

port = int(sys.argv[1])
spans_file = sys.argv[2]
lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def lines(req):
    for rs in req.resource_spans:
        service = next(
            (value(a.value) for a in rs.resource.attributes if a.key == "service.name"), None
        )
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                    "attributes": {a.key: value(a.value) for a in s.attributes},
                    "status": {"code": s.status.code, "message": s.status.message},
                    "service": service,
                    "scope": ss.scope.name,
                }


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path.rstrip("/") != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        req = ExportTraceServiceRequest()
        try:
            if "json" in (self.headers.get("content-type") or ""):
                json_format.Parse(body, req)
            else:
                req.ParseFromString(body)
        except Exception as e:  # a malformed export is refused, as a collector would
            self.send_error(400, str(e))
            return
        out = "".join(json.dumps(line) + "\n" for line in lines(req))
        with lock, open(spans_file, "a", encoding="utf-8") as f:
            f.write(out)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
