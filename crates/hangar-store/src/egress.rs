//! Connections sandboxes made (or tried) through the egress proxy, per sandbox and session.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Store, StoreError};

/// One connection through the egress proxy, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRecord {
    pub seq: i64,
    pub at: String,
    pub sandbox: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub host: String,
    pub port: u16,
    pub allowed: bool,
    pub reason: Option<String>,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Store {
    pub async fn put_egress(&self, r: &EgressRecord) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO egress (at, sandbox, agent, session, host, port, allowed, reason, bytes_out, bytes_in)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&r.at)
        .bind(&r.sandbox)
        .bind(&r.agent)
        .bind(&r.session)
        .bind(&r.host)
        .bind(i64::from(r.port))
        .bind(r.allowed)
        .bind(&r.reason)
        .bind(r.bytes_out as i64)
        .bind(r.bytes_in as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get("seq"))
    }

    /// A sandbox's or a session's connections, oldest first (at most `limit`).
    pub async fn egress(
        &self,
        sandbox: Option<&str>,
        session: Option<&str>,
        limit: i64,
    ) -> Result<Vec<EgressRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, sandbox, agent, session, host, port, allowed, reason, bytes_out, bytes_in FROM egress
             WHERE (? IS NULL OR sandbox = ?) AND (? IS NULL OR session = ?) ORDER BY seq LIMIT ?",
        )
        .bind(sandbox)
        .bind(sandbox)
        .bind(session)
        .bind(session)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| EgressRecord {
                seq: r.get("seq"),
                at: r.get("at"),
                sandbox: r.get("sandbox"),
                agent: r.get("agent"),
                session: r.get("session"),
                host: r.get("host"),
                port: r.get::<i64, _>("port") as u16,
                allowed: r.get("allowed"),
                reason: r.get("reason"),
                bytes_out: r.get::<i64, _>("bytes_out") as u64,
                bytes_in: r.get::<i64, _>("bytes_in") as u64,
            })
            .collect())
    }
}
