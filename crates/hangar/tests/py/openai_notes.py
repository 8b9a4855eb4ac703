#!/usr/bin/env python3
"""Drive the `notes` example agent with the real `openai` Python SDK.

    openai_notes.py BASE_URL [--session-id S] [--user KEY] [--expect-fresh] [--tag T]

BASE_URL is either the agent itself (http://127.0.0.1:8088) or Hangar's stable endpoint for it
(http://127.0.0.1:7070/agents/notes). The run:

  1. responses.create("note: <tag>-one")                       -> "noted (N notes)"
  2. responses.create("note: <tag>-two", previous_response_id)  -> "noted (N+1 notes)"
  3. responses.stream("note: <tag>-three"), routed by the x-agent-session-id header seen so far
     (when there is one) — text deltas collected, event types checked in order, final response
  4. responses.create("list notes", previous_response_id=<3>)  -> every note, the three last
  5. responses.retrieve / input_items.list / delete / retrieve-after-delete (404)

With --session-id every request carries `x-agent-session-id: S` (and step 1 too); with --user every
request carries `x-agent-user-id: KEY`. --expect-fresh asserts that the session starts with no notes.

On success it prints one JSON line on stdout:
  {"ok": true, "response_ids": [...], "session_ids": [...], "session_id": S|null, "notes": [...],
   "counts": [N, N+1, N+2], "stream_events": [...], "openai_version": "..."}
`session_ids` are the `x-agent-session-id` header values of the data-plane answers in order (null
where absent: straight to the agent there is no such header). On failure it exits 1 with an
assertion message on stderr.
"""

import argparse
import json
import os
import re
import sys
import uuid

import openai
from openai import OpenAI

EXPECTED_STREAM = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",  # one or more
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def collapse_deltas(types):
    out = []
    for t in types:
        if t == "response.output_text.delta" and out and out[-1] == t:
            continue
        out.append(t)
    return out


def noted_count(text, what):
    m = re.fullmatch(r"noted \((\d+) notes\)", text)
    check(m is not None, f"{what}: expected 'noted (N notes)', got {text!r}")
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("--session-id", help="send x-agent-session-id on every request")
    ap.add_argument("--user", help="send x-agent-user-id (the isolation key) on every request")
    ap.add_argument("--expect-fresh", action="store_true", help="the session must start with no notes")
    ap.add_argument("--tag", default=None, help="prefix for the notes written (default: random)")
    ap.add_argument("--model", default="notes")
    args = ap.parse_args()

    tag = args.tag or uuid.uuid4().hex[:8]
    seen = []  # (method, path, status, x-agent-session-id) of every HTTP answer

    def on_response(resp):
        seen.append((resp.request.method, resp.request.url.path, resp.status_code,
                     resp.headers.get("x-agent-session-id")))

    headers = {}
    if args.user:
        headers["x-agent-user-id"] = args.user
    if args.session_id:
        headers["x-agent-session-id"] = args.session_id
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("HANGAR_API_KEY", "unused"), default_headers=headers, max_retries=0,
                    timeout=120, http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}))

    response_ids, session_ids, counts = [], [], []
    session = args.session_id

    def routed():
        # Route by header once a session is known; previous_response_id routes on its own too.
        return {"x-agent-session-id": session} if session else None

    def remember(resp_id, sid):
        nonlocal session
        response_ids.append(resp_id)
        session_ids.append(sid)
        if sid:
            check(session is None or sid == session,
                  f"request for response {resp_id} landed in session {sid}, expected {session}")
            session = sid

    # 1. a note, through with_raw_response to see the headers
    raw = client.responses.with_raw_response.create(model=args.model, input=f"note: {tag}-one",
                                                    extra_headers=routed())
    r1 = raw.parse()
    check(r1.object == "response" and r1.status == "completed", f"step 1: unexpected response {r1!r}")
    check(r1.id.startswith("resp_") or r1.id.startswith("caresp_"), f"step 1: odd response id {r1.id!r}")
    n1 = noted_count(r1.output_text, "step 1")
    if args.expect_fresh:
        check(n1 == 1, f"step 1: expected a fresh session ('noted (1 notes)'), got {r1.output_text!r}")
    check(r1.usage is not None and r1.usage.total_tokens == r1.usage.input_tokens + r1.usage.output_tokens,
          f"step 1: bad usage {r1.usage!r}")
    remember(r1.id, raw.headers.get("x-agent-session-id"))
    counts.append(n1)

    # 2. another note, chained with previous_response_id (message-list input shape)
    raw = client.responses.with_raw_response.create(
        model=args.model,
        previous_response_id=r1.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": f"note: {tag}-two"}]}],
        instructions="keep notes",
        metadata={"step": "2"},
    )
    r2 = raw.parse()
    check(r2.previous_response_id == r1.id, f"step 2: previous_response_id not echoed: {r2.previous_response_id!r}")
    check(r2.metadata == {"step": "2"}, f"step 2: metadata not echoed: {r2.metadata!r}")
    check(r2.instructions == "keep notes", f"step 2: instructions not echoed: {r2.instructions!r}")
    n2 = noted_count(r2.output_text, "step 2")
    check(n2 == n1 + 1, f"step 2: previous_response_id should reach the same notes file: {n1} then {n2} notes")
    remember(r2.id, raw.headers.get("x-agent-session-id"))
    counts.append(n2)

    # 3. a streamed note
    types, seqs, deltas = [], [], []
    with client.responses.stream(model=args.model, input=f"note: {tag}-three", extra_headers=routed(),
                                 previous_response_id=openai.omit if session else r2.id) as stream:
        for event in stream:
            types.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        r3 = stream.get_final_response()
    stream_sid = next((s for (m, p, st, s) in reversed(seen) if m == "POST" and p.endswith("/responses")), None)
    check(collapse_deltas(types) == EXPECTED_STREAM,
          f"step 3: stream events out of order or missing:\n  got      {types}\n  expected {EXPECTED_STREAM}")
    check(all(b > a for a, b in zip(seqs, seqs[1:])), f"step 3: sequence_number not increasing: {seqs}")
    check(len(deltas) >= 2, f"step 3: expected the text in several deltas, got {deltas!r}")
    check("".join(deltas) == r3.output_text,
          f"step 3: deltas {''.join(deltas)!r} differ from the final text {r3.output_text!r}")
    n3 = noted_count(r3.output_text, "step 3")
    check(n3 == n2 + 1, f"step 3: the streamed note did not reach the same notes file: {n2} then {n3} notes")
    remember(r3.id, stream_sid)
    counts.append(n3)

    # 4. listing, chained on the streamed response
    raw = client.responses.with_raw_response.create(model=args.model, input="list notes",
                                                    previous_response_id=r3.id)
    r4 = raw.parse()
    notes = r4.output_text.split("\n")
    expected_tail = [f"{tag}-one", f"{tag}-two", f"{tag}-three"]
    check(notes[-3:] == expected_tail, f"step 4: listing should end with {expected_tail}, got {notes!r}")
    check(len(notes) == n3, f"step 4: listing has {len(notes)} notes, the agent counted {n3}")
    if args.expect_fresh:
        check(notes == expected_tail, f"step 4: a fresh session should hold only this run's notes: {notes!r}")
    remember(r4.id, raw.headers.get("x-agent-session-id"))

    # 5. stored responses: retrieve, input items, delete
    got = client.responses.retrieve(r2.id)
    check(got.id == r2.id and got.output_text == r2.output_text, f"step 5: retrieve({r2.id}) gave {got!r}")
    items = client.responses.input_items.list(r2.id)
    texts = [c.text for it in items.data for c in (getattr(it, "content", None) or []) if hasattr(c, "text")]
    check(f"note: {tag}-two" in texts, f"step 5: input_items of {r2.id} lack the note: {texts!r}")
    deleted = client.responses.delete(r4.id)  # returns None in the SDK; the HTTP status is checked below
    check(seen[-1][2] == 200, f"step 5: delete({r4.id}) answered {seen[-1][2]}")
    try:
        client.responses.retrieve(r4.id)
        raise AssertionError(f"step 5: {r4.id} still retrievable after delete")
    except openai.NotFoundError:
        pass
    del deleted

    print(json.dumps({
        "ok": True,
        "response_ids": response_ids,
        "session_ids": session_ids,
        "session_id": session,
        "notes": notes,
        "counts": counts,
        "stream_events": types,
        "openai_version": openai.__version__,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"openai_notes.py: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except openai.APIError as e:
        print(f"openai_notes.py: FAILED: API error: {e!r}", file=sys.stderr)
        sys.exit(1)
