//! The audit trail's records: appended in one transaction each, chained by hash, read back by
//! agent or session, and verified end to end.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::{Store, StoreError};

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the caller of [`Store::append_audit`] knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub actor: String,
    pub action: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
}

/// A record of the trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// A record as stored: `detail` as its text, which is what the hash covers.
struct Stored {
    seq: i64,
    at: String,
    actor: String,
    action: String,
    agent: Option<String>,
    session: Option<String>,
    request_id: Option<String>,
    detail: String,
    prev_hash: String,
    hash: String,
}

impl Stored {
    fn digest(&self) -> String {
        record_hash(
            self.seq,
            &self.at,
            &self.actor,
            &self.action,
            self.agent.as_deref(),
            self.session.as_deref(),
            self.request_id.as_deref(),
            &self.detail,
            &self.prev_hash,
        )
    }

    fn into_record(self) -> AuditRecord {
        AuditRecord {
            detail: serde_json::from_str(&self.detail)
                .unwrap_or(serde_json::Value::String(self.detail.clone())),
            seq: self.seq,
            at: self.at,
            actor: self.actor,
            action: self.action,
            agent: self.agent,
            session: self.session,
            request_id: self.request_id,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn record_hash(
    seq: i64,
    at: &str,
    actor: &str,
    action: &str,
    agent: Option<&str>,
    session: Option<&str>,
    request_id: Option<&str>,
    detail: &str,
    prev_hash: &str,
) -> String {
    // A JSON array: unambiguous (every field quoted and escaped) and stable.
    let canonical =
        serde_json::json!([seq, at, actor, action, agent, session, request_id, detail, prev_hash])
            .to_string();
    hex(&Sha256::digest(canonical.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stored(r: &sqlx::sqlite::SqliteRow) -> Stored {
    Stored {
        seq: r.get("seq"),
        at: r.get("at"),
        actor: r.get("actor"),
        action: r.get("action"),
        agent: r.get("agent"),
        session: r.get("session"),
        request_id: r.get("request_id"),
        detail: r.get("detail"),
        prev_hash: r.get("prev_hash"),
        hash: r.get("hash"),
    }
}

/// Where the chain breaks, first place first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainBreak {
    /// The position (`seq`) of the record where it breaks.
    pub seq: i64,
    pub problem: String,
}

/// Which records to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub agent: Option<String>,
    pub session: Option<String>,
    /// Only records after this position.
    pub after: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "seq, at, actor, action, agent, session, request_id, detail, prev_hash, hash";

impl Store {
    /// Appends a record after the last one. Appends must not run concurrently (the caller
    /// serialises them); the transaction keeps a crash from leaving half a record.
    pub async fn append_audit(&self, e: &AuditEntry, now: &str) -> Result<AuditRecord, StoreError> {
        let mut tx = self.write().await?;
        let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let (seq, prev_hash) = match last {
            Some(r) => (r.get::<i64, _>("seq") + 1, r.get::<String, _>("hash")),
            None => (1, GENESIS.to_owned()),
        };
        let s = Stored {
            seq,
            at: now.to_owned(),
            actor: e.actor.clone(),
            action: e.action.clone(),
            agent: e.agent.clone(),
            session: e.session.clone(),
            request_id: e.request_id.clone(),
            detail: e.detail.to_string(),
            prev_hash,
            hash: String::new(),
        };
        let s = Stored {
            hash: s.digest(),
            ..s
        };
        sqlx::query(&format!(
            "INSERT INTO audit ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(s.seq)
        .bind(&s.at)
        .bind(&s.actor)
        .bind(&s.action)
        .bind(&s.agent)
        .bind(&s.session)
        .bind(&s.request_id)
        .bind(&s.detail)
        .bind(&s.prev_hash)
        .bind(&s.hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(s.into_record())
    }

    /// Records in order of position, filtered.
    pub async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit
             WHERE (? IS NULL OR agent = ?) AND (? IS NULL OR session = ?) AND seq > ?
             ORDER BY seq LIMIT ?"
        ))
        .bind(&f.agent)
        .bind(&f.agent)
        .bind(&f.session)
        .bind(&f.session)
        .bind(f.after.unwrap_or(0))
        .bind(if f.limit > 0 { f.limit } else { i64::MAX })
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| stored(r).into_record()).collect())
    }

    /// Walks the whole chain. Returns the number of records and the last one's position and
    /// hash, or where the chain first breaks: a record whose contents do not give its hash
    /// (edited), one that does not follow the record before it (one removed, inserted or
    /// moved there), or a gap in the positions.
    pub async fn verify_audit(&self) -> Result<Result<(i64, i64, String), ChainBreak>, StoreError> {
        let mut last_seq = 0;
        let mut last_hash = GENESIS.to_owned();
        let mut count = 0;
        let mut after = 0;
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT 1000"
            ))
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                return Ok(Ok((count, last_seq, last_hash)));
            }
            for r in &rows {
                let s = stored(r);
                if s.seq != last_seq + 1 {
                    return Ok(Err(ChainBreak {
                        seq: last_seq + 1,
                        problem: format!(
                            "record {} is missing (the next one is {})",
                            last_seq + 1,
                            s.seq
                        ),
                    }));
                }
                if s.prev_hash != last_hash {
                    return Ok(Err(ChainBreak {
                        seq: s.seq,
                        problem: format!(
                            "record {} does not follow record {}: a record was removed, inserted or moved there",
                            s.seq, last_seq
                        ),
                    }));
                }
                if s.digest() != s.hash {
                    return Ok(Err(ChainBreak {
                        seq: s.seq,
                        problem: format!(
                            "record {} was edited: its contents do not give its hash",
                            s.seq
                        ),
                    }));
                }
                last_seq = s.seq;
                last_hash = s.hash;
                count += 1;
                after = s.seq;
            }
        }
    }
}
