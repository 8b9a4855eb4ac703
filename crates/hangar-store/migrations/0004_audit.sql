-- The audit trail: append-only, each record chained to the one before by a SHA-256 over its
-- contents and the previous record's hash, so that an edited, removed or reordered record
-- breaks the chain where it happened (`hangar audit verify`).
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,         -- who: the caller as Hangar knows it
    action      TEXT NOT NULL,         -- what: e.g. "agent.deploy", "session.exec"
    agent       TEXT,
    session     TEXT,
    request_id  TEXT,
    detail      TEXT NOT NULL,         -- JSON
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_by_agent ON audit (agent, seq);
CREATE INDEX audit_by_session ON audit (session, seq);
