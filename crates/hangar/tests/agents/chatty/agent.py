"""A test agent for session logs: prints what a request asks for on its stdout or stderr and,
with NOISE set, a numbered line every few milliseconds. Standard library only, with a
poll-based server (which gVisor can checkpoint)."""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/readiness", "/liveness"):
            return self.send_json(200, {"ready": True})
        self.send_json(404, {"error": {"message": "no route " + self.path}})

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}")
        if not self.path.startswith("/invocations"):
            return self.send_json(404, {"error": {"message": "no route"}})
        out = sys.stderr if req.get("stream") == "stderr" else sys.stdout
        for line in req.get("lines", []):
            print(line, file=out, flush=True)
        if "raw" in req:
            # Bytes as they are: invalid UTF-8, a line without its end.
            os.write(2 if req.get("stream") == "stderr" else 1, bytes.fromhex(req["raw"]))
        self.send_json(200, {"pid": os.getpid()})


def noise():
    pad = "n" * 120
    i = 0
    while True:
        print(f"noise {i} {pad}", flush=True)
        i += 1
        time.sleep(0.005)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8088"))
    print(f"chatty listening on {port}", flush=True)
    print("chatty says hello on stderr", file=sys.stderr, flush=True)
    if os.environ.get("NOISE"):
        threading.Thread(target=noise, daemon=True).start()
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
