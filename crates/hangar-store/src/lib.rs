//! Hangar's control-plane store: images, agents, versions, traffic, sessions, the index
//! from response and conversation ids to sessions, mapped protocols' threads, sealed secrets,
//! API keys, egress records and the audit trail. sqlx on SQLite (WAL) in the data directory;
//! the SQL is kept portable so that the same migrations serve PostgreSQL later.
//!
//! This crate holds rows and the rules that keep them consistent (version numbering, traffic
//! summing to 100, a session visible only to its isolation key). It never touches a sandbox
//! or speaks HTTP. Timestamps are RFC 3339 UTC strings supplied by the caller, so that tests
//! and the service agree on one clock.

mod audit;
mod egress;
mod keys;
mod signing_keys;
mod traces;

pub use audit::{AuditEntry, AuditFilter, AuditRecord, ChainBreak, GENESIS};
pub use egress::EgressRecord;
pub use keys::KeyRow;
pub use signing_keys::SigningKeyRow;
pub use traces::{SessionEvent, SpanRow, TraceFilter, TraceStore, TraceSummary};

use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store")]
    Open(#[source] sqlx::Error),
    #[error("migrating the store")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("no agent {0:?}")]
    NoAgent(String),
    #[error("agent {agent:?} has no version {version}")]
    NoVersion { agent: String, version: i64 },
    #[error("no image {0:?}")]
    NoImage(String),
    #[error("{0}")]
    InvalidTraffic(String),
    #[error("store query failed")]
    Query(#[from] sqlx::Error),
    #[error("corrupt JSON in the store")]
    Json(#[from] serde_json::Error),
}

impl StoreError {
    /// Whether the error is the caller's (a name or number that does not exist, a bad split).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            StoreError::NoAgent(_)
                | StoreError::NoVersion { .. }
                | StoreError::NoImage(_)
                | StoreError::InvalidTraffic(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRow {
    pub id: String,
    pub name: Option<String>,
    pub layout: String,
    pub config: serde_json::Value,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRow {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRow {
    pub agent: String,
    pub number: i64,
    pub image_id: String,
    pub spec: serde_json::Value,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: String,
    pub agent: String,
    pub version: i64,
    pub isolation_key: String,
    pub state: String,
    pub sandbox_id: Option<String>,
    pub created_at: String,
    pub last_activity: String,
    pub checkpoint: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// What a follow-up request names to find its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Response,
    Conversation,
}

impl RefKind {
    fn as_str(self) -> &'static str {
        match self {
            RefKind::Response => "response",
            RefKind::Conversation => "conversation",
        }
    }
}

/// Names a mapped protocol's conversation: per agent, isolation key and protocol.
pub struct ThreadKey<'a> {
    pub agent: &'a str,
    pub isolation_key: &'a str,
    /// `ag-ui` or `activity`.
    pub protocol: &'a str,
    pub thread: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRow {
    pub session_id: String,
    pub last_response_id: Option<String>,
    pub last_message_id: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL is durable across process crashes; a power loss may lose the
            // last transactions but never corrupts the database.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(StoreError::Open)?;
        MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Store { pool })
    }

    /// A write transaction, holding SQLite's write lock from its start. A deferred one that
    /// reads first fails at once with "database is locked" when another connection wrote in
    /// between (its snapshot is stale); waiting for the lock up front honours the busy
    /// timeout instead.
    async fn write(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn put_image(&self, image: &ImageRow) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        if let Some(name) = &image.name {
            // A name moves to the newest image that carries it (like a tag).
            sqlx::query("UPDATE images SET name = NULL WHERE name = ? AND id <> ?")
                .bind(name)
                .bind(&image.id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO images (id, name, layout, config, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET name = COALESCE(excluded.name, images.name), layout = excluded.layout",
        )
        .bind(&image.id)
        .bind(&image.name)
        .bind(&image.layout)
        .bind(serde_json::to_string(&image.config)?)
        .bind(&image.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// An image by id (`sha256:…`) or by name.
    pub async fn image(&self, id_or_name: &str) -> Result<Option<ImageRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, layout, config, created_at FROM images WHERE id = ? OR name = ?",
        )
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| image_row(&r)).transpose()
    }

    pub async fn images(&self) -> Result<Vec<ImageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, layout, config, created_at FROM images ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(image_row).collect()
    }

    /// Creates the next version of `agent` (creating the agent on its first deploy) and sets
    /// traffic: the first version gets 100; a later one gets `weight` (taken proportionally
    /// from the others), or 0.
    pub async fn deploy(
        &self,
        agent: &str,
        image_id: &str,
        spec: &serde_json::Value,
        weight: Option<i64>,
        now: &str,
    ) -> Result<VersionRow, StoreError> {
        if weight.is_some_and(|w| !(0..=100).contains(&w)) {
            return Err(StoreError::InvalidTraffic(
                "a version's traffic must be between 0 and 100".into(),
            ));
        }
        let mut tx = self.write().await?;
        if sqlx::query("SELECT 1 FROM images WHERE id = ?")
            .bind(image_id)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NoImage(image_id.into()));
        }
        sqlx::query(
            "INSERT INTO agents (name, created_at, updated_at) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
        )
        .bind(agent)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let number: i64 =
            sqlx::query("SELECT COALESCE(MAX(number), 0) + 1 AS n FROM versions WHERE agent = ?")
                .bind(agent)
                .fetch_one(&mut *tx)
                .await?
                .get("n");
        sqlx::query("INSERT INTO versions (agent, number, image_id, spec, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(agent)
            .bind(number)
            .bind(image_id)
            .bind(serde_json::to_string(spec)?)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let mut split = traffic_in(&mut tx, agent).await?;
        let weight = if number == 1 {
            100
        } else {
            weight.unwrap_or(0)
        };
        rescale(&mut split, 100 - weight);
        split.push((number, weight));
        write_traffic(&mut tx, agent, &split).await?;
        tx.commit().await?;
        Ok(VersionRow {
            agent: agent.into(),
            number,
            image_id: image_id.into(),
            spec: spec.clone(),
            created_at: now.into(),
        })
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let rows = sqlx::query("SELECT name, created_at, updated_at FROM agents ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AgentRow {
                name: r.get("name"),
                created_at: r.get("created_at"),
                updated_at: r.get("updated_at"),
            })
            .collect())
    }

    pub async fn agent(&self, name: &str) -> Result<Option<AgentRow>, StoreError> {
        let row = sqlx::query("SELECT name, created_at, updated_at FROM agents WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| AgentRow {
            name: r.get("name"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
        }))
    }

    /// Deletes an agent's versions and traffic (the agent stays, with no version to start a
    /// session on).
    pub async fn delete_agent_versions(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        delete_versions_in(&mut tx, name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes an agent with its versions, traffic, sessions and references. The caller
    /// deletes the sessions' sandboxes first.
    pub async fn delete_agent(&self, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        for table in ["refs", "threads", "secrets", "signing_keys"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE agent = ?"))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM sessions WHERE agent = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        delete_versions_in(&mut tx, name).await?;
        let r = sqlx::query("DELETE FROM agents WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn version(
        &self,
        agent: &str,
        number: i64,
    ) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .versions(agent)
            .await?
            .into_iter()
            .find(|v| v.number == number))
    }

    pub async fn versions(&self, agent: &str) -> Result<Vec<VersionRow>, StoreError> {
        let rows = sqlx::query("SELECT agent, number, image_id, spec, created_at FROM versions WHERE agent = ? ORDER BY number")
            .bind(agent)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionRow {
                    agent: r.get("agent"),
                    number: r.get("number"),
                    image_id: r.get("image_id"),
                    spec: serde_json::from_str(r.get::<&str, _>("spec"))?,
                    created_at: r.get("created_at"),
                })
            })
            .collect()
    }

    /// The traffic split as (version, weight), versions ascending; weights sum to 100.
    pub async fn traffic(&self, agent: &str) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut tx = self.write().await?;
        let split = traffic_in(&mut tx, agent).await?;
        tx.commit().await?;
        Ok(split)
    }

    /// Replaces the split: every named version must exist and the weights must sum to 100.
    pub async fn set_traffic(&self, agent: &str, split: &[(i64, i64)]) -> Result<(), StoreError> {
        let sum: i64 = split.iter().map(|(_, w)| w).sum();
        if sum != 100 || split.iter().any(|(_, w)| !(0..=100).contains(w)) {
            return Err(StoreError::InvalidTraffic(format!(
                "traffic weights must be 0..=100 and sum to 100, not {sum}"
            )));
        }
        let mut tx = self.write().await?;
        if sqlx::query("SELECT 1 FROM agents WHERE name = ?")
            .bind(agent)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NoAgent(agent.into()));
        }
        for (version, _) in split {
            let found = sqlx::query("SELECT 1 FROM versions WHERE agent = ? AND number = ?")
                .bind(agent)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(StoreError::NoVersion {
                    agent: agent.into(),
                    version: *version,
                });
            }
        }
        write_traffic(&mut tx, agent, split).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn create_session(&self, s: &SessionRow) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO sessions (id, agent, version, isolation_key, state, sandbox_id, created_at, last_activity, checkpoint, error)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.agent)
        .bind(s.version)
        .bind(&s.isolation_key)
        .bind(&s.state)
        .bind(&s.sandbox_id)
        .bind(&s.created_at)
        .bind(&s.last_activity)
        .bind(s.checkpoint.as_ref().map(serde_json::to_string).transpose()?)
        .bind(&s.error)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO session_events (session, at, kind) VALUES (?, ?, ?)")
            .bind(&s.id)
            .bind(&s.created_at)
            .bind(&s.state)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A session as its owner sees it: `None` both when it does not exist and when it belongs
    /// to another isolation key, so that existence never leaks.
    pub async fn session_for(
        &self,
        id: &str,
        isolation_key: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        Ok(self
            .session(id)
            .await?
            .filter(|s| s.isolation_key == isolation_key))
    }

    /// A session whatever its owner (operators, the scheduler).
    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| session_row(&r)).transpose()
    }

    /// Sessions of an agent, of one owner if `isolation_key` is given, newest first.
    pub async fn sessions(
        &self,
        agent: &str,
        isolation_key: Option<&str>,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE agent = ? AND (? IS NULL OR isolation_key = ?)
             ORDER BY created_at DESC, id"
        ))
        .bind(agent)
        .bind(isolation_key)
        .bind(isolation_key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Every session of every agent (recovery after a restart, the scheduler).
    pub async fn all_sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Records a session's state (persisted before the transition is acted on).
    pub async fn set_session_state(
        &self,
        id: &str,
        state: &str,
        sandbox_id: Option<&str>,
        checkpoint: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        // A change of state is one of the session's events (its timeline).
        sqlx::query(
            "INSERT INTO session_events (session, at, kind, detail)
             SELECT id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?, ? FROM sessions
             WHERE id = ? AND state != ?",
        )
        .bind(state)
        .bind(error.map(|e| serde_json::json!({ "error": e }).to_string()))
        .bind(id)
        .bind(state)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET state = ?, sandbox_id = ?, checkpoint = ?, error = ? WHERE id = ?",
        )
        .bind(state)
        .bind(sandbox_id)
        .bind(checkpoint.map(serde_json::to_string).transpose()?)
        .bind(error)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn touch_session(&self, id: &str, now: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET last_activity = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sessions in `state` whose last activity is before `before`, oldest first (idle
    /// scale-to-zero, retention).
    pub async fn idle_sessions(
        &self,
        state: &str,
        before: &str,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE state = ? AND last_activity < ? ORDER BY last_activity, id"
        ))
        .bind(state)
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    pub async fn delete_session(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Remembers that `session_id` (owned by `isolation_key`) made response `reference` or
    /// holds conversation `reference`. A response id already recorded keeps its session; a
    /// conversation is bound once (the first session wins). Returns the session the reference
    /// points at afterwards.
    pub async fn put_ref(
        &self,
        agent: &str,
        isolation_key: &str,
        kind: RefKind,
        reference: &str,
        session_id: &str,
        now: &str,
    ) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO refs (agent, isolation_key, kind, ref, session_id, created_at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (agent, isolation_key, kind, ref) DO NOTHING",
        )
        .bind(agent)
        .bind(isolation_key)
        .bind(kind.as_str())
        .bind(reference)
        .bind(session_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(self
            .session_by_ref(agent, isolation_key, kind, reference)
            .await?
            .unwrap_or_else(|| session_id.to_owned()))
    }

    /// The session of `isolation_key` that made a response or holds a conversation.
    pub async fn session_by_ref(
        &self,
        agent: &str,
        isolation_key: &str,
        kind: RefKind,
        reference: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT session_id FROM refs WHERE agent = ? AND isolation_key = ? AND kind = ? AND ref = ?",
        )
        .bind(agent)
        .bind(isolation_key)
        .bind(kind.as_str())
        .bind(reference)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get("session_id")))
    }

    /// The session and chain position of a mapped protocol's conversation.
    pub async fn thread(&self, key: &ThreadKey<'_>) -> Result<Option<ThreadRow>, StoreError> {
        let row = sqlx::query(
            "SELECT session_id, last_response_id, last_message_id FROM threads
             WHERE agent = ? AND isolation_key = ? AND protocol = ? AND thread = ?",
        )
        .bind(key.agent)
        .bind(key.isolation_key)
        .bind(key.protocol)
        .bind(key.thread)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ThreadRow {
            session_id: r.get("session_id"),
            last_response_id: r.get("last_response_id"),
            last_message_id: r.get("last_message_id"),
        }))
    }

    /// Records where a conversation stands after a turn (or binds it to a new session).
    pub async fn put_thread(
        &self,
        key: &ThreadKey<'_>,
        row: &ThreadRow,
        now: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO threads (agent, isolation_key, protocol, thread, session_id, last_response_id, last_message_id, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (agent, isolation_key, protocol, thread) DO UPDATE SET
                session_id = excluded.session_id, last_response_id = excluded.last_response_id,
                last_message_id = excluded.last_message_id, updated_at = excluded.updated_at",
        )
        .bind(key.agent)
        .bind(key.isolation_key)
        .bind(key.protocol)
        .bind(key.thread)
        .bind(&row.session_id)
        .bind(&row.last_response_id)
        .bind(&row.last_message_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets a secret: its sealed value and the hosts (a JSON array) it may be sent to.
    pub async fn put_secret(
        &self,
        agent: &str,
        name: &str,
        sealed: &str,
        hosts: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO secrets (agent, name, sealed, hosts, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (agent, name) DO UPDATE SET sealed = excluded.sealed, hosts = excluded.hosts, updated_at = excluded.updated_at",
        )
        .bind(agent)
        .bind(name)
        .bind(sealed)
        .bind(hosts)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The sealed value of a secret.
    pub async fn secret(&self, agent: &str, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT sealed FROM secrets WHERE agent = ? AND name = ?")
            .bind(agent)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("sealed")))
    }

    /// The sealed value of a secret and the hosts (a JSON array) it may be sent to.
    pub async fn secret_and_hosts(
        &self,
        agent: &str,
        name: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT sealed, hosts FROM secrets WHERE agent = ? AND name = ?")
            .bind(agent)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("sealed"), r.get("hosts"))))
    }

    /// Names and update times of an agent's secrets, by name.
    /// Names, update times and hosts (JSON arrays) of an agent's secrets, by name.
    pub async fn secrets(&self, agent: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, updated_at, hosts FROM secrets WHERE agent = ? ORDER BY name",
        )
        .bind(agent)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("name"), r.get("updated_at"), r.get("hosts")))
            .collect())
    }

    pub async fn delete_secret(&self, agent: &str, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM secrets WHERE agent = ? AND name = ?")
            .bind(agent)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

const SESSION_COLUMNS: &str =
    "id, agent, version, isolation_key, state, sandbox_id, created_at, last_activity, checkpoint, error";

fn image_row(r: &sqlx::sqlite::SqliteRow) -> Result<ImageRow, StoreError> {
    Ok(ImageRow {
        id: r.get("id"),
        name: r.get("name"),
        layout: r.get("layout"),
        config: serde_json::from_str(r.get::<&str, _>("config"))?,
        created_at: r.get("created_at"),
    })
}

fn session_row(r: &sqlx::sqlite::SqliteRow) -> Result<SessionRow, StoreError> {
    Ok(SessionRow {
        id: r.get("id"),
        agent: r.get("agent"),
        version: r.get("version"),
        isolation_key: r.get("isolation_key"),
        state: r.get("state"),
        sandbox_id: r.get("sandbox_id"),
        created_at: r.get("created_at"),
        last_activity: r.get("last_activity"),
        checkpoint: r
            .get::<Option<&str>, _>("checkpoint")
            .map(serde_json::from_str)
            .transpose()?,
        error: r.get("error"),
    })
}

async fn delete_versions_in(
    tx: &mut sqlx::SqliteConnection,
    agent: &str,
) -> Result<(), StoreError> {
    for table in ["traffic", "versions"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE agent = ?"))
            .bind(agent)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn traffic_in(
    tx: &mut sqlx::SqliteConnection,
    agent: &str,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let rows = sqlx::query("SELECT version, weight FROM traffic WHERE agent = ? ORDER BY version")
        .bind(agent)
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("version"), r.get("weight")))
        .collect())
}

async fn write_traffic(
    tx: &mut sqlx::SqliteConnection,
    agent: &str,
    split: &[(i64, i64)],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM traffic WHERE agent = ?")
        .bind(agent)
        .execute(&mut *tx)
        .await?;
    for (version, weight) in split {
        sqlx::query("INSERT INTO traffic (agent, version, weight) VALUES (?, ?, ?)")
            .bind(agent)
            .bind(version)
            .bind(weight)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Scales `split` so that its weights sum to `total`, keeping their proportions (largest
/// remainders get the rounding), so that adding a version at N% takes N% from the others.
fn rescale(split: &mut [(i64, i64)], total: i64) {
    let sum: i64 = split.iter().map(|(_, w)| w).sum();
    if split.is_empty() {
        return;
    }
    if sum == 0 {
        // Nothing to scale: the whole remainder goes to the newest existing version.
        let last = split.len() - 1;
        split[last].1 = total;
        return;
    }
    let mut rem: Vec<(usize, i64)> = Vec::with_capacity(split.len());
    let mut given = 0;
    for (i, (_, w)) in split.iter_mut().enumerate() {
        let exact = *w * total;
        rem.push((i, exact % sum));
        *w = exact / sum;
        given += *w;
    }
    rem.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, _) in rem.into_iter().take((total - given) as usize) {
        split[i].1 += 1;
    }
}

#[cfg(test)]
mod tests;
