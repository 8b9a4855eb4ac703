#!/usr/bin/env python3
"""notes — a Hangar example agent, Python 3.11 standard library only.

It speaks OpenResponses (the OpenAI Responses API) on port 8088 (``PORT`` overrides):

* ``POST /responses`` — JSON, or SSE with ``"stream": true``. For the text ``note: X`` of the last
  user message it appends ``X`` as a line to ``~/notes.txt`` and answers ``noted (N notes)``; for any
  other text it answers with every note, one per line, or ``no notes yet``. The notes file is its only
  state, so its answers show whether the session's files survived.
  Client function tools (deterministic, no model): when the request offers ``tools`` of type
  ``function`` and the user's text names one of them (``... use get_weather with city=Paris``), the
  output is one ``function_call`` item whose arguments are the ``key=value`` pairs of the text; a
  later ``function_call_output`` item is answered with ``<tool> returned: <output>``. Neither touches
  the notes.
* ``GET /responses/{id}`` (``?stream=true`` replays the events), ``DELETE /responses/{id}``,
  ``POST /responses/{id}/cancel``, ``GET /responses/{id}/input_items`` — responses are kept as JSON
  under ``~/.responses/`` so they survive a restart of the process.
* ``GET /readiness`` and ``GET /liveness`` — 200.

The server is ``http.server.ThreadingHTTPServer``: its accept loop waits in ``poll(2)``, which gVisor
can checkpoint (no asyncio / epoll). SIGTERM stops accepting, lets in-flight requests finish (every
write is already fsynced) and exits 0.
"""

import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOME = os.path.expanduser("~")
NOTES_PATH = os.path.join(HOME, "notes.txt")
STORE_DIR = os.path.join(HOME, ".responses")
MAX_BODY = 4 * 1024 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DEFAULT_MODEL = "notes"
LOG_LEVEL = os.environ.get("LOG_LEVEL", "info").strip().lower()
STREAM_DELAY_MS = int(os.environ.get("NOTES_STREAM_DELAY_MS", "0") or 0)

_state_lock = threading.Lock()  # the notes file and the response store
_inflight = 0
_inflight_cv = threading.Condition()
_stopping = threading.Event()


def log(msg):
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z notes: {msg}\n")
    sys.stderr.flush()


def new_id(prefix):
    # 16 hex partition key + "00" + 32 hex entropy: the shape Foundry's IdGenerator accepts too.
    return f"{prefix}_{secrets.token_hex(8)}00{secrets.token_hex(16)}"


class ApiError(Exception):
    def __init__(self, status, message, code=None, param=None, etype="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.etype = status, message, code, param, etype

    def body(self):
        return {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": self.code}}


def not_found(response_id):
    return ApiError(404, f"No response found with id '{response_id}'.", code="not_found", param="response_id")


# --------------------------------------------------------------------------------------------------
# durable files


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_notes():
    try:
        with open(NOTES_PATH, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def append_note(text):
    """Append one line and fsync it; return the number of notes now in the file."""
    os.makedirs(HOME, exist_ok=True)
    created = not os.path.exists(NOTES_PATH)
    fd = os.open(NOTES_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(HOME)
    return len(read_notes())


def store_path(response_id):
    return os.path.join(STORE_DIR, response_id + ".json")


def store_put(record):
    os.makedirs(STORE_DIR, exist_ok=True)
    path = store_path(record["response"]["id"])
    tmp = f"{path}.tmp-{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(STORE_DIR)


def store_get(response_id):
    if not ID_RE.match(response_id or ""):
        return None
    try:
        with open(store_path(response_id), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def store_delete(response_id):
    if not ID_RE.match(response_id or ""):
        return False
    try:
        os.unlink(store_path(response_id))
    except FileNotFoundError:
        return False
    fsync_dir(STORE_DIR)
    return True


# --------------------------------------------------------------------------------------------------
# the Responses request / response shapes


def content_text(content):
    if isinstance(content, str):
        return content
    parts = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("input_text", "text", "output_text"):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
    return "".join(parts)


def normalize_input(raw):
    """Return the request's input as a list of stored input items (each with an id)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise ApiError(400, "'input' must be a string or a list of input items.", code="invalid_type", param="input")
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{i}] must be an object.", code="invalid_type", param=f"input[{i}]")
        item = dict(item)
        kind = item.get("type", "message")
        if kind == "message" or ("role" in item and "type" not in item):
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"input[{i}].role must be one of user, system, developer, assistant.",
                               code="invalid_value", param=f"input[{i}].role")
            content = item.get("content")
            if isinstance(content, str):
                ptype = "output_text" if item["role"] == "assistant" else "input_text"
                part = {"type": ptype, "text": content}
                if ptype == "output_text":
                    part["annotations"] = []
                content = [part]
            elif not isinstance(content, list):
                raise ApiError(400, f"input[{i}].content must be a string or a list of content parts.",
                               code="invalid_type", param=f"input[{i}].content")
            item["type"] = "message"
            item["content"] = content
            item.setdefault("status", "completed")
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise ApiError(400, f"Missing required parameter: 'input[{i}].call_id'.",
                               code="missing_required_parameter", param=f"input[{i}].call_id")
            if "output" not in item:
                raise ApiError(400, f"Missing required parameter: 'input[{i}].output'.",
                               code="missing_required_parameter", param=f"input[{i}].output")
            item.setdefault("status", "completed")
        item.setdefault("id", new_id({"function_call": "fc", "function_call_output": "fco"}.get(kind, "msg")))
        items.append(item)
    return items


def last_user_text(items):
    for item in reversed(items):
        if item.get("type") == "message" and item.get("role") == "user":
            return content_text(item.get("content"))
    return ""


# -- client function tools (deterministic: the user's text says which tool and which arguments) ----

KV_RE = re.compile(r"(?<![\w-])([A-Za-z_][\w-]*)=(\S+)")


def function_tools(tools):
    """The request's function tools, by name, in order ({"type":"function","name":...,"parameters":...};
    the Chat Completions nesting {"type":"function","function":{...}} is accepted too)."""
    out = {}
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool if isinstance(tool.get("name"), str) else tool.get("function")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]:
            params = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
            out.setdefault(spec["name"], params)
    return out


def pick_tool(req, text):
    """(name, parameters) of the function tool to call for this request, or None.

    ``tool_choice: "none"`` never calls; ``{"type":"function","name":N}`` calls N; otherwise the tool
    whose name appears first in the text (as a whole word), or, for ``"required"``, the first tool."""
    tools = function_tools(req.get("tools"))
    if not tools:
        return None
    choice = req.get("tool_choice", "auto")
    if choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if name in tools:
            return name, tools[name]
    best = None
    for name, params in tools.items():
        m = re.search(r"(?<![A-Za-z0-9_-])" + re.escape(name) + r"(?![A-Za-z0-9_-])", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name, params)
    if best:
        return best[1], best[2]
    if choice == "required":
        name = next(iter(tools))
        return name, tools[name]
    return None


def _types(schema):
    t = schema.get("type") if isinstance(schema, dict) else None
    return set(t) if isinstance(t, list) else {t}


def coerce(value, schema):
    """A key=value value as the property's JSON type (integer, number, boolean), else the string."""
    types = _types(schema)
    if "integer" in types and re.fullmatch(r"-?\d+", value):
        return int(value)
    if "number" in types and re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", value):
        return float(value) if re.search(r"[.eE]", value) else int(value)
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def tool_arguments(text, params):
    """The arguments object for a call: key=value pairs of the text whose key is a property (the value
    is the run of non-space characters, trailing .,;!? dropped); each required string property still
    missing gets the rest of the text (the text without those pairs)."""
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    args, spans = {}, []
    for m in KV_RE.finditer(text):
        key, value = m.group(1), m.group(2).rstrip(".,;!?")
        if key in props:
            spans.append(m.span())
            if value and key not in args:
                args[key] = coerce(value, props[key])
    rest = text
    for start, end in reversed(spans):
        rest = rest[:start] + " " + rest[end:]
    rest = " ".join(rest.split())
    required = params.get("required") if isinstance(params.get("required"), list) else []
    for key in required:
        if key in props and key not in args and _types(props[key]) & {"string", None}:
            args[key] = rest
    return args


def function_call_item(name, arguments, status="completed"):
    return {"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": name,
            "arguments": arguments, "status": status}


def tool_outputs(items):
    """The function_call_output items after the last user message (the turn being answered), or []."""
    out = []
    for item in reversed(items):
        if item.get("type") == "function_call_output":
            out.append(item)
        elif item.get("type") == "message" and item.get("role") == "user":
            break
    return list(reversed(out))


def tool_output_answer(outputs, items, prev_record):
    """``<tool> returned: <output>`` for each output, the tool's name found by call_id among the
    function_call items of the previous response (its output, then its input) and of this input."""
    names = {}
    sources = []
    if prev_record:
        sources += prev_record.get("input_items") or []
        sources += prev_record.get("response", {}).get("output") or []
    sources += items
    for item in sources:
        if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("name"), str):
            names[item.get("call_id")] = item["name"]
    lines = []
    for item in outputs:
        out = item.get("output")
        out = out if isinstance(out, str) else content_text(out) if isinstance(out, list) else json.dumps(out)
        lines.append(f"{names.get(item['call_id'], 'the tool')} returned: {out}")
    return "\n".join(lines)


def answer_for(text):
    """The agent's whole behaviour. The answer depends only on the notes file."""
    stripped = text.strip()
    if stripped[:5].lower() == "note:":
        note = " ".join(stripped[5:].split())  # one line per note
        if note:
            with _state_lock:
                n = append_note(note)
            return f"noted ({n} notes)"
    with _state_lock:
        notes = read_notes()
    return "\n".join(notes) if notes else "no notes yet"


def words(text):
    return len(text.split())


def build_response(req, response_id, created_at, status, item=None, usage=None):
    conversation = req.get("conversation")
    if isinstance(conversation, str):
        conversation = {"id": conversation}
    elif not (isinstance(conversation, dict) and isinstance(conversation.get("id"), str)):
        conversation = None
    text_cfg = req.get("text") if isinstance(req.get("text"), dict) else {}
    text_cfg = {"format": {"type": "text"}, "verbosity": "medium", **text_cfg}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "conversation": conversation,
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": req.get("max_tool_calls"),
        "model": req.get("model") if isinstance(req.get("model"), str) and req.get("model") else DEFAULT_MODEL,
        "output": [item] if item else [],
        "parallel_tool_calls": req.get("parallel_tool_calls", True) is not False,
        "previous_response_id": req.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": req.get("store", True) is not False,
        "temperature": req.get("temperature", 1.0),
        "text": text_cfg,
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools") if isinstance(req.get("tools"), list) else [],
        "top_logprobs": 0,
        "top_p": req.get("top_p", 1.0),
        "truncation": req.get("truncation", "disabled"),
        "usage": usage,
        "user": req.get("user"),
        "metadata": req.get("metadata") if isinstance(req.get("metadata"), dict) else {},
    }


def output_message(msg_id, text, status="completed"):
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text is not None else []
    return {"id": msg_id, "type": "message", "status": status, "role": "assistant", "content": content}


def usage_for(in_text, out_text):
    i, o = words(in_text), words(out_text)
    return {"input_tokens": i, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": o, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": i + o}


def chunks(text, n=4):
    """Split text into up to n pieces along word boundaries (joined, they give text back)."""
    pieces = re.findall(r"\s*\S+", text) or [text]
    tail = text[len("".join(pieces)):]
    if tail:
        pieces[-1] += tail
    size = max(1, -(-len(pieces) // n))
    return ["".join(pieces[i:i + size]) for i in range(0, len(pieces), size)]


def split_n(text, n):
    """Split text into n pieces of (about) equal length, at least 2 when text has 2+ characters."""
    n = max(2, min(n, len(text)))
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)] or [text]


def function_call_events(final, item):
    base = {**final, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
    ids = {"item_id": item["id"], "output_index": 0}
    yield {"type": "response.created", "response": base}
    yield {"type": "response.in_progress", "response": base}
    yield {"type": "response.output_item.added", "output_index": 0,
           "item": {**item, "arguments": "", "status": "in_progress"}}
    for piece in split_n(item["arguments"], min(4, 1 + len(item["arguments"]) // 8)):
        yield {"type": "response.function_call_arguments.delta", **ids, "delta": piece}
    yield {"type": "response.function_call_arguments.done", **ids, "arguments": item["arguments"],
           "name": item["name"]}
    yield {"type": "response.output_item.done", "output_index": 0, "item": item}
    yield {"type": "response.completed", "response": final}


def stream_events(final):
    """The OpenResponses event sequence (without sequence numbers) for a completed response."""
    if final["output"] and final["output"][0].get("type") == "function_call":
        yield from function_call_events(final, final["output"][0])
        return
    msg = final["output"][0]
    text = msg["content"][0]["text"]
    base = {**final, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
    ids = {"item_id": msg["id"], "output_index": 0, "content_index": 0}
    yield {"type": "response.created", "response": base}
    yield {"type": "response.in_progress", "response": base}
    yield {"type": "response.output_item.added", "output_index": 0,
           "item": output_message(msg["id"], None, "in_progress")}
    yield {"type": "response.content_part.added", **ids,
           "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}
    for piece in chunks(text):
        yield {"type": "response.output_text.delta", **ids, "delta": piece, "logprobs": []}
    yield {"type": "response.output_text.done", **ids, "text": text, "logprobs": []}
    yield {"type": "response.content_part.done", **ids, "part": msg["content"][0]}
    yield {"type": "response.output_item.done", "output_index": 0, "item": msg}
    yield {"type": "response.completed", "response": final}


# --------------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hangar-notes/1"
    disable_nagle_algorithm = True

    # -- plumbing ------------------------------------------------------------------------------

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _done()

    def log_message(self, fmt, *args):
        log(f"{self.address_string()} {fmt % args}")

    def _begin(self):
        global _inflight
        self._t0 = time.monotonic()
        self._status = 0
        self._sent = 0
        with _inflight_cv:
            _inflight += 1

    def _done(self):
        global _inflight
        with _inflight_cv:
            _inflight -= 1
            _inflight_cv.notify_all()
        if LOG_LEVEL not in ("warning", "warn", "error", "critical"):
            ms = (time.monotonic() - self._t0) * 1000
            log(f'{self.command} {self.path} {self._status} {self._sent}B {ms:.1f}ms')

    def _send_json(self, status, obj, extra_headers=None):
        body = json.dumps(obj).encode("utf-8")
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        if _stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self._sent = len(body)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                if len(out) + size > MAX_BODY:
                    self.close_connection = True
                    raise ApiError(413, "Request body too large.", code="body_too_large")
                out += self.rfile.read(size)
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "Request body too large.", code="body_too_large")
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self):
        raw = self._read_body()
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"Request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
        return body

    def _route(self):
        parts = urlsplit(self.path)
        segs = [s for s in parts.path.split("/") if s]
        return segs, parse_qs(parts.query)

    def _dispatch(self, fn):
        self._begin()
        try:
            fn()
        except ApiError as e:
            try:
                self._send_json(e.status, e.body())
            except OSError:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            log(f"{self.command} {self.path}: client went away")
        except Exception as e:  # noqa: BLE001 — answer 500 rather than drop the connection
            log(f"{self.command} {self.path}: internal error: {e!r}")
            try:
                self._send_json(500, ApiError(500, "internal error", etype="server_error").body())
            except OSError:
                pass
            self.close_connection = True
        finally:
            self._done()

    def do_GET(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def do_DELETE(self):
        self._dispatch(self._delete)

    def _not_allowed(self):
        self._read_body()
        raise ApiError(405, f"Method {self.command} not allowed on {urlsplit(self.path).path}", code="method_not_allowed")

    def do_PUT(self):
        self._dispatch(self._not_allowed)

    def do_PATCH(self):
        self._dispatch(self._not_allowed)

    # -- routes --------------------------------------------------------------------------------

    def _get(self):
        segs, query = self._route()
        if segs in (["readiness"], ["liveness"]):
            return self._send_json(200, {"status": "ok"})
        if len(segs) == 2 and segs[0] == "responses":
            rec = store_get(segs[1])
            if rec is None:
                raise not_found(segs[1])
            if query.get("stream", ["false"])[0].lower() == "true":
                after = query.get("starting_after", ["-1"])[0]
                return self._stream(rec["response"], starting_after=int(after) if after.lstrip("-").isdigit() else -1)
            return self._send_json(200, rec["response"])
        if len(segs) == 3 and segs[0] == "responses" and segs[2] == "input_items":
            rec = store_get(segs[1])
            if rec is None:
                raise not_found(segs[1])
            return self._send_json(200, self._input_items(rec["input_items"], query))
        raise ApiError(404, f"No route for GET {urlsplit(self.path).path}", code="not_found")

    def _delete(self):
        segs, _ = self._route()
        if len(segs) == 2 and segs[0] == "responses":
            with _state_lock:
                ok = store_delete(segs[1])
            if not ok:
                raise not_found(segs[1])
            return self._send_json(200, {"id": segs[1], "object": "response.deleted", "deleted": True})
        raise ApiError(404, f"No route for DELETE {urlsplit(self.path).path}", code="not_found")

    def _post(self):
        segs, _ = self._route()
        if segs == ["responses"]:
            return self._create(self._json_body())
        if len(segs) == 3 and segs[0] == "responses" and segs[2] == "cancel":
            self._read_body()
            rec = store_get(segs[1])
            if rec is None:
                raise not_found(segs[1])
            return self._send_json(200, rec["response"])  # nothing is ever in progress
        self._read_body()
        raise ApiError(404, f"No route for POST {urlsplit(self.path).path}", code="not_found")

    @staticmethod
    def _input_items(items, query):
        order = query.get("order", ["desc"])[0]
        try:
            limit = max(1, min(100, int(query.get("limit", ["20"])[0])))
        except ValueError:
            raise ApiError(400, "'limit' must be an integer.", code="invalid_value", param="limit")
        seq = list(reversed(items)) if order != "asc" else list(items)
        after = query.get("after", [None])[0]
        if after:
            idx = next((i for i, it in enumerate(seq) if it.get("id") == after), None)
            seq = seq[idx + 1:] if idx is not None else []
        page = seq[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(seq) > limit}

    def _create(self, req):
        stream = req.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean.", code="invalid_type", param="stream")
        if "input" not in req and not req.get("previous_response_id"):
            raise ApiError(400, "Missing required parameter: 'input'.", code="missing_required_parameter",
                           param="input")
        items = normalize_input(req.get("input"))
        prev = req.get("previous_response_id")
        prev_record = None
        if prev is not None:
            prev_record = store_get(prev) if isinstance(prev, str) else None
            if prev_record is None:
                raise ApiError(400, f"Previous response with id '{prev}' not found.",
                               code="previous_response_not_found", param="previous_response_id")
        response_id = (self.headers.get("x-agent-response-id") or "").strip()
        if response_id:
            if not ID_RE.match(response_id):
                raise ApiError(400, "x-agent-response-id is not a valid id.", code="invalid_value")
            if store_get(response_id) is not None:
                raise ApiError(400, f"Response with id '{response_id}' already exists.", code="already_exists")
        else:
            response_id = new_id("resp")
        created_at = int(time.time())

        text = last_user_text(items)
        outputs = tool_outputs(items)
        tool = None if outputs else pick_tool(req, text)
        if outputs:  # the client ran a tool we asked for: report its result, notes untouched
            answer = tool_output_answer(outputs, items, prev_record)
            final = build_response(req, response_id, created_at, "completed",
                                   output_message(new_id("msg"), answer),
                                   usage_for(" ".join(str(o.get("output")) for o in outputs), answer))
        elif tool:  # ask the client to run a tool, notes untouched
            arguments = json.dumps(tool_arguments(text, tool[1]), separators=(",", ":"))
            final = build_response(req, response_id, created_at, "completed",
                                   function_call_item(tool[0], arguments), usage_for(text, arguments))
        else:
            answer = answer_for(text)  # the note (if any) is durable before anything is sent
            final = build_response(req, response_id, created_at, "completed",
                                   output_message(new_id("msg"), answer), usage_for(text, answer))
        if final["store"]:
            with _state_lock:
                store_put({"response": final, "input_items": items})

        if not stream:
            return self._send_json(200, final)
        delay = STREAM_DELAY_MS
        md = req.get("metadata") if isinstance(req.get("metadata"), dict) else {}
        if str(md.get("notes_stream_delay_ms", "")).isdigit():
            delay = min(5000, int(md["notes_stream_delay_ms"]))
        self._stream(final, delay_ms=delay)

    def _stream(self, final, delay_ms=0, starting_after=-1):
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for seq, event in enumerate(stream_events(final)):
            if seq <= starting_after:
                continue
            event["sequence_number"] = seq
            if delay_ms and event["type"] in ("response.output_text.delta",
                                              "response.function_call_arguments.delta"):
                time.sleep(delay_ms / 1000)
            data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode("utf-8")
            self.wfile.write(data)  # wfile is unbuffered: each event leaves now
            self._sent += len(data)
        self.wfile.write(b"data: [DONE]\n\n")
        self._sent += 14


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    timeout = None  # handle_request() waits in poll(2) until a connection arrives
    shutdown_requested = False

    def handle_request(self):
        if self.shutdown_requested:
            return
        super().handle_request()


def main():
    try:
        port = int(os.environ.get("PORT", "8088"))
    except ValueError:
        log(f"invalid PORT {os.environ.get('PORT')!r}")
        return 2
    os.makedirs(HOME, exist_ok=True)
    server = Server(("0.0.0.0", port), Handler)

    def stop():
        server.shutdown_requested = True
        try:  # wake the accept loop out of poll(2)
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            pass

    def on_term(signum, _frame):
        if not _stopping.is_set():
            _stopping.set()
            log(f"signal {signum}: shutting down")
            threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log(f"listening on 0.0.0.0:{port}, notes in {NOTES_PATH}")
    # The accept loop sleeps in poll(2) with no timeout: an idle agent makes no system calls at all.
    while not server.shutdown_requested:
        server.handle_request()
    server.server_close()
    with _inflight_cv:  # let requests already being answered finish (at most 10 s)
        _inflight_cv.wait_for(lambda: _inflight == 0, timeout=10)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
