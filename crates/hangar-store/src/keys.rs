//! API keys: their hashes, roles and revocations (never the keys themselves).

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Store, StoreError};

/// An API key as stored (its hash, never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub assert_user: bool,
    #[serde(skip)]
    pub hash: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl Store {
    pub async fn put_key(&self, k: &KeyRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, assert_user, hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&k.id)
        .bind(&k.name)
        .bind(&k.role)
        .bind(k.assert_user)
        .bind(&k.hash)
        .bind(&k.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, assert_user, hash, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| KeyRow {
                id: r.get("id"),
                name: r.get("name"),
                role: r.get("role"),
                assert_user: r.get("assert_user"),
                hash: r.get("hash"),
                created_at: r.get("created_at"),
                revoked_at: r.get("revoked_at"),
            })
            .collect())
    }

    /// Revokes a key; `false` if there is no such active key.
    pub async fn revoke_key(&self, id: &str, now: &str) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }
}
