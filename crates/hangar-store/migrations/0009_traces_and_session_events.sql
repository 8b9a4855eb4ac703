-- Recent spans: Hangar's own and those agents sent to /v1/traces, bounded by age and size.
CREATE TABLE spans (
    seq             INTEGER PRIMARY KEY,
    trace_id        TEXT NOT NULL,
    span_id         TEXT NOT NULL,
    parent_span_id  TEXT,
    name            TEXT NOT NULL,
    service         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    start_us        INTEGER NOT NULL,
    end_us          INTEGER NOT NULL,
    status          TEXT NOT NULL,
    status_message  TEXT,
    agent           TEXT,
    session         TEXT,
    attributes      TEXT NOT NULL,
    received_at     INTEGER NOT NULL,
    size            INTEGER NOT NULL
);
CREATE INDEX spans_by_trace ON spans (trace_id);
CREATE INDEX spans_by_session ON spans (session, start_us);
CREATE INDEX spans_by_agent ON spans (agent, start_us);
CREATE INDEX spans_by_start ON spans (start_us);

-- What happened to each session, in order: its state changes and how its sandbox came back.
CREATE TABLE session_events (
    seq         INTEGER PRIMARY KEY,
    session     TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX session_events_by_session ON session_events (session, seq);
