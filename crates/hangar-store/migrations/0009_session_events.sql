-- What happened to each session, in order: its state changes and how its sandbox came back.
CREATE TABLE session_events (
    seq         INTEGER PRIMARY KEY,
    session     TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX session_events_by_session ON session_events (session, seq);
