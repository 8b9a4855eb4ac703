-- Recent spans: Hangar's own and those agents sent to /v1/traces, bounded by age and size.
-- In a database of their own (traces.db): their writes never wait for the control plane's,
-- nor the control plane's for theirs.
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
