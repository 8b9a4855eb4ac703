-- Response and conversation ids are chosen by agents and callers, not by Hangar: one user's
-- id must never find, reveal or re-point another user's session. References are therefore
-- per isolation key, and a response id, once recorded, is never moved.
CREATE TABLE refs (
    agent          TEXT NOT NULL,
    isolation_key  TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('response', 'conversation')),
    ref            TEXT NOT NULL,
    session_id     TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (agent, isolation_key, kind, ref)
);
INSERT INTO refs (agent, isolation_key, kind, ref, session_id, created_at)
    SELECT r.agent, s.isolation_key, r.kind, r.ref, r.session_id, r.created_at
    FROM session_refs r JOIN sessions s ON s.id = r.session_id;
DROP TABLE session_refs;
CREATE INDEX refs_by_session ON refs (session_id);
