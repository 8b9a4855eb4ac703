"""Runs one AG-UI run against a URL and checks what comes back, as an AG-UI client would.

    agui_run.py URL --user U --input JSON     (the RunAgentInput)

Every event is validated with the AG-UI SDK's own models (`ag_ui.core.Event`), and the
stream against the spec's ordering rules: RUN_STARTED first, one terminal event last,
messages and tool calls opened before their content and closed before RUN_FINISHED, never
interleaved, no empty deltas, `data:` frames only. Prints one JSON line: the events with
their arrival times, the text, the tool calls, the session, and the violations found. Exits
1 if the stream broke a rule."""

import argparse
import json
import os
import sys
import time
import urllib.request

from pydantic import TypeAdapter
from ag_ui.core import Event

EVENT = TypeAdapter(Event)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--user", default="agui-user")
    ap.add_argument("--input", required=True)
    a = ap.parse_args()
    body = json.loads(a.input)
    req = urllib.request.Request(
        a.url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "accept": "text/event-stream", "x-agent-user-id": a.user,
                 **({"authorization": "Bearer " + os.environ["HANGAR_API_KEY"]} if os.environ.get("HANGAR_API_KEY") else {})},
        method="POST",
    )
    t0 = time.monotonic()
    errors, events = [], []
    with urllib.request.urlopen(req, timeout=300) as resp:
        session = resp.headers.get("x-agent-session-id")
        ctype = resp.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            errors.append(f"content type {ctype!r}")
        data = []
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    payload = "\n".join(data)
                    data = []
                    try:
                        obj = json.loads(payload)
                        EVENT.validate_python(obj)
                    except Exception as e:  # a model the SDK refuses is a protocol violation
                        errors.append(f"invalid event {payload[:200]}: {e}")
                        obj = json.loads(payload) if payload.startswith("{") else {"type": "?"}
                    events.append({"t": time.monotonic() - t0, **obj})
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field != "data":
                errors.append(f"a {field!r} field: AG-UI producers send data: frames only")
            data.append(value[1:] if value.startswith(" ") else value)
    end = time.monotonic() - t0

    # The ordering rules (AG-UI 1.x, with the stricter no-interleaving of older verifiers).
    open_item, finished, text, calls = None, False, "", {}
    for i, e in enumerate(events):
        ty = e.get("type")
        if i == 0 and ty not in ("RUN_STARTED", "RUN_ERROR"):
            errors.append(f"first event is {ty}")
        if finished:
            errors.append(f"{ty} after the run ended")
        if ty == "RUN_STARTED":
            if e.get("threadId") != body["threadId"] or e.get("runId") != body["runId"]:
                errors.append("RUN_STARTED does not echo threadId/runId")
        elif ty in ("TEXT_MESSAGE_START", "TOOL_CALL_START"):
            if open_item:
                errors.append(f"{ty} while {open_item} is open")
            open_item = ("text", e["messageId"]) if ty == "TEXT_MESSAGE_START" else ("tool", e["toolCallId"])
            if ty == "TOOL_CALL_START":
                calls.setdefault(e["toolCallId"], {"name": e["toolCallName"], "args": ""})
        elif ty == "TEXT_MESSAGE_CONTENT":
            if open_item != ("text", e["messageId"]):
                errors.append("TEXT_MESSAGE_CONTENT outside its message")
            if not e.get("delta"):
                errors.append("an empty delta")
            text += e.get("delta", "")
        elif ty == "TOOL_CALL_ARGS":
            if open_item != ("tool", e["toolCallId"]):
                errors.append("TOOL_CALL_ARGS outside its call")
            calls.setdefault(e["toolCallId"], {"name": "?", "args": ""})["args"] += e.get("delta", "")
        elif ty in ("TEXT_MESSAGE_END", "TOOL_CALL_END"):
            key = ("text", e.get("messageId")) if ty == "TEXT_MESSAGE_END" else ("tool", e.get("toolCallId"))
            if open_item != key:
                errors.append(f"{ty} for what is not open")
            open_item = None
        elif ty == "RUN_FINISHED":
            if open_item:
                errors.append(f"RUN_FINISHED while {open_item} is open")
            if e.get("threadId") != body["threadId"] or e.get("runId") != body["runId"]:
                errors.append("RUN_FINISHED does not echo threadId/runId")
            finished = True
        elif ty == "RUN_ERROR":
            finished = True
    if not finished:
        errors.append("the stream ended without RUN_FINISHED or RUN_ERROR")
    print(json.dumps({
        "session": session,
        "events": events,
        "types": [e.get("type") for e in events],
        "text": text,
        "tool_calls": [{"id": k, **v} for k, v in calls.items()],
        "end": end,
        "errors": errors,
    }))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
