#!/usr/bin/env python3
"""Check an OpenResponses agent's wire format without any SDK help.

    check_sse.py BASE_URL [--input TEXT] [--delay-ms N] [--header K:V ...]

* POST BASE_URL/responses with "stream": true over a raw HTTP connection: every event has an `event:`
  line equal to its data's "type", `sequence_number` strictly increases, the event types come in the
  OpenResponses order, and the stream ends with `data: [DONE]`.
* With --delay-ms N (the notes agent's `metadata.notes_stream_delay_ms`): the deltas must arrive
  spread over time, i.e. nobody between client and agent buffered the stream.
* POST without stream: the JSON body, and every SSE event, validate *strictly* against the `openai`
  SDK's pydantic models when the `openai` package is importable (`model_validate`, not the SDK's
  lenient construction).

Prints one JSON summary line; exits 1 with a message on the first failure. Standard library only,
apart from the optional strict validation.
"""

import argparse
import http.client
import json
import os
import sys
import time
from urllib.parse import urlsplit

ORDER = ["response.created", "response.in_progress", "response.output_item.added",
         "response.content_part.added", "response.output_text.delta", "response.output_text.done",
         "response.content_part.done", "response.output_item.done", "response.completed"]


def fail(msg):
    msg = msg if len(msg) < 4000 else msg[:4000] + " ..."
    print(f"check_sse.py: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def connect(base):
    u = urlsplit(base)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=60), u.path.rstrip("/")


def post(base, body, headers):
    conn, prefix = connect(base)
    conn.request("POST", prefix + "/responses", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **headers})
    return conn, conn.getresponse()


def read_sse(resp):
    """Yield (arrival_time, event_name, data_str) as the bytes arrive."""
    event, data = None, []
    while True:
        line = resp.readline()  # decodes chunked transfer-encoding too
        if not line:
            return
        line = line.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                yield time.monotonic(), event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("--input", default="what are my notes?")
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--header", action="append", default=[])
    args = ap.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if os.environ.get("HANGAR_API_KEY"):
        headers.setdefault("Authorization", "Bearer " + os.environ["HANGAR_API_KEY"])

    try:
        import typing

        from openai.types.responses import Response, ResponseStreamEvent

        union = typing.get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], PropertyInfo]
        by_type = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in typing.get_args(union)}

        def strict_event(ev):
            by_type[ev["type"]].model_validate(ev)

        strict_response = Response.model_validate
    except ImportError:
        strict_event = strict_response = None

    body = {"model": "notes", "input": args.input, "stream": True}
    if args.delay_ms:
        body["metadata"] = {"notes_stream_delay_ms": str(args.delay_ms)}
    t0 = time.monotonic()
    conn, resp = post(args.base_url, body, headers)
    if resp.status != 200:
        fail(f"stream POST answered {resp.status}: {resp.read()[:500]!r}")
    ctype = resp.getheader("Content-Type", "")
    if not ctype.startswith("text/event-stream"):
        fail(f"stream POST Content-Type is {ctype!r}")
    events, done, times, last_seq = [], False, [], -1
    for at, name, data in read_sse(resp):
        if done:
            fail(f"data after [DONE]: {data[:200]!r}")
        if data == "[DONE]":
            done = True
            continue
        ev = json.loads(data)
        if name is not None and name != ev.get("type"):
            fail(f"event line {name!r} but data type {ev.get('type')!r}")
        seq = ev.get("sequence_number")
        if not isinstance(seq, int) or seq <= last_seq:
            fail(f"sequence_number {seq!r} after {last_seq} in {ev.get('type')}")
        last_seq = seq
        if strict_event:
            try:
                strict_event(ev)
            except Exception as e:  # noqa: BLE001
                fail(f"{ev.get('type')} does not validate against the openai SDK's model: {e}")
        events.append(ev)
        times.append(at - t0)
    conn.close()
    if not done:
        fail("stream did not end with data: [DONE]")
    types = [e["type"] for e in events]
    collapsed = [t for i, t in enumerate(types) if not (t == ORDER[4] and i and types[i - 1] == t)]
    if collapsed != ORDER:
        fail(f"event order {types}")
    ids = {e["response"]["id"] for e in events if "response" in e}
    if len(ids) != 1:
        fail(f"lifecycle events carry different response ids: {ids}")
    text = "".join(e["delta"] for e in events if e["type"] == ORDER[4])
    final = events[-1]["response"]
    final_text = final["output"][0]["content"][0]["text"]
    if text != final_text:
        fail(f"deltas {text!r} != final text {final_text!r}")
    delta_times = [t for t, e in zip(times, events) if e["type"] == ORDER[4]]
    spread_ms = (delta_times[-1] - delta_times[0]) * 1000 if delta_times else 0
    if args.delay_ms and len(delta_times) > 1:
        want = args.delay_ms * (len(delta_times) - 1) * 0.5
        if spread_ms < want:
            fail(f"deltas arrived together ({spread_ms:.0f} ms apart, expected >= {want:.0f}): the stream was buffered")
    if strict_response:
        try:
            strict_response(final)
        except Exception as e:  # noqa: BLE001
            fail(f"the completed response does not validate against openai's Response: {e}")

    # JSON mode
    conn, resp = post(args.base_url, {"model": "notes", "input": args.input}, headers)
    raw = resp.read()
    conn.close()
    if resp.status != 200:
        fail(f"JSON POST answered {resp.status}: {raw[:500]!r}")
    obj = json.loads(raw)
    if strict_response:
        try:
            strict_response(obj)
        except Exception as e:  # noqa: BLE001
            fail(f"the JSON response does not validate against openai's Response: {e}")

    print(json.dumps({"ok": True, "events": len(events), "deltas": len(delta_times),
                      "delta_spread_ms": round(spread_ms, 1), "response_id": final["id"],
                      "json_response_id": obj.get("id"), "strict": strict_response is not None,
                      "session_id": resp.getheader("x-agent-session-id")}))


if __name__ == "__main__":
    main()
