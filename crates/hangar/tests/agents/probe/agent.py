"""A test agent that reports what Hangar gave it: its session, version, the headers it
received and a counter kept in its workspace. Standard library only (poll-based server)."""

import base64
import hashlib
import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOME = os.environ.get("HOME", "/root")
COUNTER = os.path.join(HOME, "count")
STARTED = time.time()


def bump():
    n = 0
    try:
        with open(COUNTER) as f:
            n = int(f.read().strip() or 0)
    except FileNotFoundError:
        pass
    n += 1
    with open(COUNTER, "w") as f:
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
    return n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if self.path in ("/readiness", "/liveness"):
            return
        sys.stderr.write("probe: " + (fmt % args) + "\n")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def info(self):
        return {
            "session": os.environ.get("FOUNDRY_AGENT_SESSION_ID"),
            "version": os.environ.get("FOUNDRY_AGENT_VERSION"),
            "agent": os.environ.get("FOUNDRY_AGENT_NAME"),
            "agent_id": os.environ.get("FOUNDRY_AGENT_ID"),
            "hosting": os.environ.get("FOUNDRY_HOSTING_ENVIRONMENT"),
            "hangar_session": os.environ.get("HANGAR_SESSION_ID"),
            "port": os.environ.get("PORT"),
            "greeting": os.environ.get("GREETING"),
            "header_session": self.headers.get("x-agent-session-id"),
            "header_invocation": self.headers.get("x-agent-invocation-id"),
            "header_credentials": [self.headers.get(h) for h in ("authorization", "x-api-key") if self.headers.get(h)],
            "pid": os.getpid(),
        }

    def do_GET(self):
        if self.path in ("/readiness", "/liveness"):
            if os.environ.get("NEVER_READY"):
                return self.send_json(503, {"ready": False})
            return self.send_json(200, {"ready": True})
        if self.path.startswith("/responses/"):
            return self.send_json(200, {"id": self.path.split("/")[2], "object": "response", "via": "get", **self.info()})
        if self.path == "/invocations_ws":
            return self.websocket()
        self.send_json(404, {"error": {"message": "no route " + self.path}})

    def do_DELETE(self):
        if self.path.startswith("/responses/"):
            return self.send_json(200, {"id": self.path.split("/")[2], "deleted": True, **self.info()})
        self.send_json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        raw = self.body()
        if self.path == "/responses":
            try:
                req = json.loads(raw)
            except ValueError:
                return self.send_json(400, {"error": {"message": "bad json"}})
            n = bump()
            rid = "resp_" + secrets.token_hex(8)
            info = {"count": n, "input": req.get("input"), **self.info()}
            text = json.dumps(info)
            if req.get("input") == "big":
                # A JSON answer larger than the gateway reads whole (16 MiB), chunked.
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                parts = [('{"id": "%s", "pad": "' % rid).encode()] + [b"x" * 1048576] * 17 + [b'"}']
                for p in parts:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(p), p))
                self.wfile.write(b"0\r\n\r\n")
                return
            if not req.get("stream"):
                return self.send_json(200, {"id": rid, "object": "response", "status": "completed",
                                            "output": [{"type": "message", "role": "assistant",
                                                        "content": [{"type": "output_text", "text": text}]}],
                                            "probe": info})
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            delay = float(req.get("metadata", {}).get("delay", "0") or 0)
            if not delay and "slow" in json.dumps(req.get("input")).lower():
                delay = 0.7  # a pause asked for in the user's text, whatever protocol carried it
            events = [("response.created", {"response": {"id": rid, "status": "in_progress"}})]
            for chunk in (text[: len(text) // 2], text[len(text) // 2 :]):
                events.append(("response.output_text.delta", {"item_id": "msg_" + rid[len("resp_"):],
                                                               "output_index": 0, "content_index": 0,
                                                               "delta": chunk}))
            events.append(("response.completed", {"response": {"id": rid, "status": "completed"}}))
            for seq, (kind, data) in enumerate(events):
                data = {"type": kind, "sequence_number": seq, **data}
                self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
                if delay:
                    time.sleep(delay)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/responses/") and self.path.endswith("/cancel"):
            return self.send_json(200, {"id": self.path.split("/")[2], "cancelled": True, **self.info()})
        if self.path.startswith("/invocations"):
            return self.send_json(200, {"echo": raw.decode(errors="replace"), "query": self.path, **self.info()})
        self.send_json(404, {"error": {"message": "no route"}})

    def websocket(self):
        key = self.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        # One masked client text frame in, the same text out with the session id.
        head = self.rfile.read(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self.rfile.read(2), "big")
        mask = self.rfile.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
        reply = (data.decode() + " from " + str(os.environ.get("FOUNDRY_AGENT_SESSION_ID"))).encode()
        self.wfile.write(bytes([0x81, len(reply)]) + reply)
        self.wfile.flush()
        self.close_connection = True


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8088"))
    print(f"probe listening on {port}", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
