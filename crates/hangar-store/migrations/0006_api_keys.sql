-- API keys: only a hash of each is kept (keys are 256-bit random, so SHA-256 suffices).
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'deployer', 'invoker')),
    assert_user  INTEGER NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    revoked_at   TEXT
);
