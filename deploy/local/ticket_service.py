"""A stand-in ticket system for the demo: accepts POST /tickets/<service> with a JSON body, answers
{"ticket": "T-<n>"}, and prints one line per ticket with the headers switchyard's tool executor
sends (fencing token, idempotency key), so the demo shows a mutating tool carried out once.

    python ticket_service.py PORT
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

tickets = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if not self.path.startswith("/tickets/"):
            self.send_error(404)
            return
        tickets.append(body)
        n = len(tickets)
        print(
            f"ticket T-{n} for {self.path[len('/tickets/'):]}: {body.decode(errors='replace')} "
            f"fencing-token={self.headers.get('x-switchyard-fencing-token')} "
            f"idempotency-key={self.headers.get('idempotency-key')}",
            flush=True,
        )
        out = json.dumps({"ticket": f"T-{n}"}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
