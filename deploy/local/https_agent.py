"""An HTTP agent served over HTTPS, for switchyard's TLS tests: its certificate is the stack's test
CA's server certificate (deploy/local/stack.sh, `$SWITCHYARD_STACK_DIR/tls`). Every POST is appended
to CALLS_FILE as a JSON line (the task id, the agent, the traceparent header) and answered with one
`page` proposal.

    python https_agent.py PORT TLS_DIR CALLS_FILE
"""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, tls_dir, calls_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        with open(calls_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"agent": body.get("agent"), "task_id": (body.get("task") or {}).get("task_id"),
                                "traceparent": self.headers.get("traceparent")}) + "\n")
        out = json.dumps({"proposals": [{"action": "page", "parameters": {"team": "remote"},
                                         "reason": "answered over HTTPS"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{tls_dir}/server.crt", f"{tls_dir}/server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
