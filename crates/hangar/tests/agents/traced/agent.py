"""A test agent that joins Hangar's traces: it reports the trace context it received, and
sends a span of its own (a child of Hangar's call) to $OTEL_EXPORTER_OTLP_ENDPOINT as
OTLP/JSON, through its proxy, with the standard library only."""

import json
import os
import secrets
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_span(traceparent, name):
    """POSTs one span, a child of `traceparent`, to the OTLP endpoint; returns its status."""
    _, trace_id, parent_id, _ = traceparent.split("-")
    now = time.time_ns()
    span = {
        "traceId": trace_id,
        "spanId": secrets.token_hex(8),
        "parentSpanId": parent_id,
        "name": name,
        "kind": 2,
        "startTimeUnixNano": str(now - 3_000_000),
        "endTimeUnixNano": str(now),
        "attributes": [{"key": "tool.name", "value": {"stringValue": "lookup"}},
                       {"key": "hangar.session.id", "value": {"stringValue": "sess_forged"}}],
        "status": {"code": 1},
    }
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": os.environ["OTEL_SERVICE_NAME"]}}]},
        "scopeSpans": [{"scope": {"name": "traced-agent"}, "spans": [span]}]}]}
    req = urllib.request.Request(os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] + "/v1/traces",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        return r.status, span["spanId"]


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
        self.send_json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}")
        tp = self.headers.get("traceparent")
        print(f"traced: got traceparent {tp}", flush=True)
        sent = None
        if tp and req.get("input") == "trace":
            status, span_id = send_span(tp, "agent tool call")
            sent = {"status": status, "span_id": span_id}
        rid = "resp_" + secrets.token_hex(8)
        self.send_json(200, {
            "id": rid, "object": "response", "status": "completed",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "traced"}]}],
            "usage": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18},
            "traceparent": tp, "tracestate": self.headers.get("tracestate"),
            "baggage": self.headers.get("baggage"), "sent": sent,
            "otel_endpoint": os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        })


ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8088"))), Handler).serve_forever()
