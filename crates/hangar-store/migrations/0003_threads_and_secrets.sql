-- Conversations of the mapped protocols (an AG-UI thread, an Activity Protocol conversation):
-- the session each lives in, per isolation key, and where its chain of responses has got to,
-- so that the next turn continues it with `previous_response_id`.
CREATE TABLE threads (
    agent             TEXT NOT NULL,
    isolation_key     TEXT NOT NULL,
    protocol          TEXT NOT NULL CHECK (protocol IN ('ag-ui', 'activity')),
    thread            TEXT NOT NULL,
    session_id        TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    last_response_id  TEXT,
    last_message_id   TEXT,
    updated_at        TEXT NOT NULL,
    PRIMARY KEY (agent, isolation_key, protocol, thread)
);
CREATE INDEX threads_by_session ON threads (session_id);

-- Agent secrets, sealed (XChaCha20-Poly1305 under the node's key, bound to agent and name):
-- the store alone never reveals a value.
CREATE TABLE secrets (
    agent       TEXT NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    sealed      TEXT NOT NULL,         -- base64(nonce || ciphertext)
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (agent, name)
);
