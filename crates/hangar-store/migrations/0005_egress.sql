-- Every connection a sandbox made (or tried) through the egress proxy, per session.
CREATE TABLE egress (
    seq         INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    sandbox     TEXT NOT NULL,
    agent       TEXT,
    session     TEXT,
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    allowed     INTEGER NOT NULL,
    reason      TEXT,
    bytes_out   INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL
);
CREATE INDEX egress_by_session ON egress (session, seq);
CREATE INDEX egress_by_sandbox ON egress (sandbox, seq);
