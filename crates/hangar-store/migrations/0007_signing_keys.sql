-- Each agent's token-signing key: the private half sealed under the node's secrets key, the
-- public half as a JWK (what /.well-known/jwks.json serves). `kid` is the key's RFC 7638
-- thumbprint.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    sealed      TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX signing_keys_agent ON signing_keys (agent);
