"""broken — a test fixture for `hangar check`, the OpenResponses conformance checker. It breaks the
protocol on purpose, in known ways, so that a test can assert the checker reports each break. Do
not "fix" it: every break below is something the checker must find (rule numbers are those of
docs/protocols-research.md §5). Standard library only (poll-based server).

GET /readiness and GET /liveness answer 200. POST /responses breaks these rules:

JSON (`stream` false or absent): HTTP 200, `application/json`, a response object with `id`,
`object: "response"` and an `output` holding one completed assistant message with the
output_text "hello". Every other field of the response object is present, except two:
  * `created_at` is missing (rule 3: a required field of the response object);
  * `status` is missing (rule 3, and so rule 4: the status is not "completed").

SSE (`stream: true`): `text/event-stream`, and `event:` + `data:` lines, in this order:
  seq 0  response.created             — valid: the full response object, status in_progress
  seq 1  response.output_text.delta   — item msg_1, delta "hel". It comes BEFORE the
         response.output_item.added of its item (rule 12: an event for an output_index
         that was not added). No response.content_part.added is ever sent, so neither delta
         is inside a content part (rule 13).
  seq 3  response.output_item.added   — the message msg_1. The sequence number skips 2
         (rule 9 WARN: a step that is not +1).
  seq 2  response.output_text.delta   — delta "lo". The sequence number goes backwards (rule 9:
         it must be strictly increasing).
  then nothing more: no output_text.done, content_part.done or output_item.done (rule 12: the
  item is never done), no terminal event such as response.completed (rule 11: exactly one
  terminal event), and no `data: [DONE]` (rule 17). The server sends `connection: close` and
  closes the connection, so the stream just ends.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MSG_ID = "msg_1"


def response_object(rid, status, output):
    """A complete response object (every field the schema requires, zero values where unknown)."""
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "background": False, "completed_at": None, "conversation": None, "error": None,
        "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "max_tool_calls": None, "model": "broken", "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None}, "safety_identifier": None,
        "service_tier": "default", "store": False, "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": [], "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled", "usage": None,
        "user": None, "metadata": {},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if self.path in ("/readiness", "/liveness"):
            return
        sys.stderr.write("broken: " + (fmt % args) + "\n")

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

    def do_GET(self):
        if self.path in ("/readiness", "/liveness"):
            return self.send_json(200, {"ready": True})
        self.send_json(404, {"error": {"message": "no route " + self.path, "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}})

    def do_POST(self):
        raw = self.body()
        if self.path != "/responses":
            return self.send_json(404, {"error": {"message": "no route " + self.path, "type": "invalid_request_error",
                                                  "param": None, "code": "not_found"}})
        try:
            req = json.loads(raw)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self.send_json(400, {"error": {"message": "bad json", "type": "invalid_request_error",
                                                  "param": None, "code": "invalid_json"}})
        rid = "resp_" + os.urandom(8).hex()
        if not req.get("stream"):
            message = {"id": MSG_ID, "type": "message", "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": "hello", "annotations": [], "logprobs": []}]}
            resp = response_object(rid, "completed", [message])
            del resp["created_at"]  # broken on purpose
            del resp["status"]  # broken on purpose
            return self.send_json(200, resp)

        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        ids = {"item_id": MSG_ID, "output_index": 0, "content_index": 0}
        events = [
            (0, "response.created", {"response": response_object(rid, "in_progress", [])}),
            (1, "response.output_text.delta", {**ids, "delta": "hel", "logprobs": []}),
            (3, "response.output_item.added", {"output_index": 0, "item": {
                "id": MSG_ID, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            (2, "response.output_text.delta", {**ids, "delta": "lo", "logprobs": []}),
        ]
        for seq, kind, data in events:
            data = {"type": kind, "sequence_number": seq, **data}
            self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
        # No terminal event and no `data: [DONE]`: the stream just ends with the connection.
        self.close_connection = True


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8088"))
    print(f"broken listening on {port}", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
