-- Hangar's control-plane state. Portable SQL only (TEXT, INTEGER, standard constraints): the
-- same migrations run on PostgreSQL when one machine is outgrown.

CREATE TABLE images (
    id          TEXT PRIMARY KEY,      -- sha256:<manifest digest>
    name        TEXT,                  -- e.g. "debian:bookworm", "notes:3"; NULL if unnamed
    layout      TEXT NOT NULL,         -- the OCI image layout in Hangar's data directory
    config      TEXT NOT NULL,         -- the image config (entrypoint, env, ...) as JSON
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX images_by_name ON images (name);

CREATE TABLE agents (
    name        TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE versions (
    agent       TEXT NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    image_id    TEXT NOT NULL REFERENCES images (id),
    spec        TEXT NOT NULL,         -- agent.yaml as deployed, as JSON
    created_at  TEXT NOT NULL,
    PRIMARY KEY (agent, number)
);

CREATE TABLE traffic (
    agent       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    weight      INTEGER NOT NULL CHECK (weight BETWEEN 0 AND 100),
    PRIMARY KEY (agent, version),
    FOREIGN KEY (agent, version) REFERENCES versions (agent, number) ON DELETE CASCADE
);

CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    agent          TEXT NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    version        INTEGER NOT NULL,
    isolation_key  TEXT NOT NULL,
    state          TEXT NOT NULL,
    sandbox_id     TEXT,
    created_at     TEXT NOT NULL,
    last_activity  TEXT NOT NULL,
    checkpoint     TEXT,               -- the last checkpoint as JSON
    error          TEXT
);
CREATE INDEX sessions_by_owner ON sessions (agent, isolation_key);
CREATE INDEX sessions_by_activity ON sessions (state, last_activity);

-- Which session made a response or holds a conversation, for routing follow-up requests.
CREATE TABLE session_refs (
    agent       TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('response', 'conversation')),
    ref         TEXT NOT NULL,
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (agent, kind, ref)
);
