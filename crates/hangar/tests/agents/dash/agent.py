"""The dashboard test's agent: answers /responses after a short, varying delay (so the
latency chart has a shape), prints one distinctive line per request to stdout (the log
tail shows it), and keeps each input as a file in its workspace (the file browser lists
it). Standard library only."""

import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOME = os.environ.get("HOME", "/root")
NOTES = os.path.join(HOME, "notes")
VARIANT = os.environ.get("VARIANT", "?")
served = 0


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
        global served
        n = int(self.headers.get("content-length") or 0)
        try:
            req = json.loads(self.rfile.read(n) if n else b"{}")
        except ValueError:
            return self.send_json(400, {"error": {"message": "bad json"}})
        if self.path != "/responses":
            return self.send_json(404, {"error": {"message": "no route"}})
        served += 1
        text = str(req.get("input"))
        time.sleep(0.005 * (served % 7))
        os.makedirs(NOTES, exist_ok=True)
        with open(os.path.join(NOTES, f"note-{served}.txt"), "w") as f:
            f.write(text + "\n")
        session = os.environ.get("FOUNDRY_AGENT_SESSION_ID")
        print(f"dash-agent v{VARIANT} served request #{served} input={text}", flush=True)
        self.send_json(200, {
            "id": "resp_" + secrets.token_hex(8), "object": "response", "status": "completed",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": f"noted #{served} in {session}"}]}],
        })


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8088"))
    print(f"dash-agent v{VARIANT} listening on {port}", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
