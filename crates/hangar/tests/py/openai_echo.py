#!/usr/bin/env python3
"""Drive the `foundry-echo` example agent (azure-ai-agentserver-responses) with the `openai` SDK.

    openai_echo.py BASE_URL [--user KEY]

BASE_URL is the agent itself (http://127.0.0.1:8088) or Hangar's endpoint (…/agents/foundry-echo).
Checks: responses.create answers "echo: <text>"; responses.stream gives the OpenResponses event order
with increasing sequence numbers and deltas that add up to the final text; a follow-up with
previous_response_id works (and lands in the same session through Hangar); retrieve and input_items
reach the stored response. Prints one JSON summary line; exits 1 with a message on failure.
"""

import argparse
import json
import os
import sys
import uuid

import openai
from openai import OpenAI

ORDER = ["response.created", "response.in_progress", "response.output_item.added",
         "response.content_part.added", "response.output_text.delta", "response.output_text.done",
         "response.content_part.done", "response.output_item.done", "response.completed"]


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("--user", help="send x-agent-user-id (the isolation key) on every request")
    ap.add_argument("--same-session", action="store_true",
                    help="assert that x-agent-session-id stays the same across previous_response_id "
                         "(default: on when BASE_URL has /agents/ in it, i.e. goes through Hangar; "
                         "straight to the agent, the package derives a new id per request)")
    args = ap.parse_args()
    args.same_session = args.same_session or "/agents/" in args.base_url

    seen = []

    def on_response(resp):
        seen.append((resp.request.method, resp.request.url.path, resp.status_code,
                     resp.headers.get("x-agent-session-id")))

    headers = {"x-agent-user-id": args.user} if args.user else {}
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("HANGAR_API_KEY", "unused"), default_headers=headers, max_retries=0,
                    timeout=120, http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}))
    word = uuid.uuid4().hex[:8]

    raw = client.responses.with_raw_response.create(model="echo", input=f"hello {word}")
    r1 = raw.parse()
    sid1 = raw.headers.get("x-agent-session-id")
    check(r1.output_text == f"echo: hello {word}", f"create: got {r1.output_text!r}")

    types, seqs, deltas = [], [], []
    with client.responses.stream(model="echo", input=f"streamed {word}", previous_response_id=r1.id) as stream:
        for ev in stream:
            types.append(ev.type)
            seqs.append(ev.sequence_number)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        r2 = stream.get_final_response()
    sid2 = next((s for (m, p, st, s) in reversed(seen) if m == "POST"), None)
    collapsed = [t for i, t in enumerate(types) if not (t == ORDER[4] and i and types[i - 1] == t)]
    check(collapsed == ORDER, f"stream: event types {types}")
    check(all(b > a for a, b in zip(seqs, seqs[1:])), f"stream: sequence numbers {seqs}")
    check("".join(deltas) == r2.output_text, f"stream: deltas {deltas!r} vs final {r2.output_text!r}")
    # TextResponse echoes the text of this request's input (history is not part of get_input_text()).
    check(r2.output_text.startswith("echo: ") and f"streamed {word}" in r2.output_text,
          f"stream: got {r2.output_text!r}")
    if args.same_session:
        check(sid1 is not None, "no x-agent-session-id header on the answer")
        check(sid1 == sid2, f"previous_response_id moved to another session: {sid1} then {sid2}")

    got = client.responses.retrieve(r1.id)
    check(got.id == r1.id and got.output_text == r1.output_text, f"retrieve: got {got!r}")
    items = client.responses.input_items.list(r1.id)
    texts = [c.text for it in items.data for c in (getattr(it, "content", None) or []) if hasattr(c, "text")]
    check(f"hello {word}" in texts, f"input_items: {texts!r}")

    print(json.dumps({"ok": True, "response_ids": [r1.id, r2.id], "session_ids": [sid1, sid2],
                      "stream_events": types, "openai_version": openai.__version__}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"openai_echo.py: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except openai.APIError as e:
        print(f"openai_echo.py: FAILED: API error: {e!r}", file=sys.stderr)
        sys.exit(1)
