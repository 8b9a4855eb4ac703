//! Agents' token-signing keys: the private half sealed by the caller, the public half as a JWK.

use sqlx::Row;

use crate::{Store, StoreError};

/// One agent's signing key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    pub kid: String,
    pub agent: String,
    /// The private key, sealed (the store never sees it in the clear).
    pub sealed: String,
    pub public_jwk: String,
    pub created_at: String,
}

fn row(r: &sqlx::sqlite::SqliteRow) -> SigningKeyRow {
    SigningKeyRow {
        kid: r.get("kid"),
        agent: r.get("agent"),
        sealed: r.get("sealed"),
        public_jwk: r.get("public_jwk"),
        created_at: r.get("created_at"),
    }
}

impl Store {
    /// Records an agent's key unless it already has one; returns the agent's key either way
    /// (so that two servers making a key at once agree on one).
    pub async fn put_signing_key_once(
        &self,
        k: &SigningKeyRow,
    ) -> Result<SigningKeyRow, StoreError> {
        // One statement, so that it is atomic under SQLite's single writer.
        sqlx::query(
            "INSERT INTO signing_keys (kid, agent, sealed, public_jwk, created_at)
             SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM signing_keys WHERE agent = ?)",
        )
        .bind(&k.kid)
        .bind(&k.agent)
        .bind(&k.sealed)
        .bind(&k.public_jwk)
        .bind(&k.created_at)
        .bind(&k.agent)
        .execute(&self.pool)
        .await?;
        self.signing_key(&k.agent)
            .await?
            .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    /// The agent's current signing key.
    pub async fn signing_key(&self, agent: &str) -> Result<Option<SigningKeyRow>, StoreError> {
        let r = sqlx::query(
            "SELECT kid, agent, sealed, public_jwk, created_at FROM signing_keys WHERE agent = ? ORDER BY created_at DESC, kid LIMIT 1",
        )
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(row))
    }

    /// Every signing key, by kid (what the JWKS lists).
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, agent, sealed, public_jwk, created_at FROM signing_keys ORDER BY kid",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row).collect())
    }
}
