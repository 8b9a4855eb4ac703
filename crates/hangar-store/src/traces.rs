//! Recent spans (Hangar's own and its agents'), in a database of their own, and each
//! session's events.

use std::path::Path;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{Store, StoreError};

static TRACE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-traces");

/// The trace store (`<data>/traces.db`). Apart from the control plane's database: spans come
/// in batches many times a second, and a write waits for no other.
#[derive(Clone)]
pub struct TraceStore {
    pool: SqlitePool,
}

/// One finished span, flattened from OTLP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    /// The `service.name` of the span's resource.
    pub service: String,
    /// `internal`, `server`, `client`, `producer` or `consumer`.
    pub kind: String,
    pub start_us: i64,
    pub end_us: i64,
    /// `unset`, `ok` or `error`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(skip)]
    pub agent: Option<String>,
    #[serde(skip)]
    pub session: Option<String>,
    /// The span's attributes as a JSON object (resource attributes are not repeated).
    pub attributes: serde_json::Value,
}

/// A trace as listed: its root (or earliest) span and totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub trace_id: String,
    pub name: String,
    pub agent: Option<String>,
    pub session_id: Option<String>,
    pub start_us: i64,
    pub duration_us: i64,
    pub spans: i64,
    pub error: bool,
}

/// Which traces to list.
#[derive(Debug, Default, Clone)]
pub struct TraceFilter<'a> {
    pub agent: Option<&'a str>,
    pub session: Option<&'a str>,
    /// Only traces that started before this (paging, newest first).
    pub before_us: Option<i64>,
    pub limit: i64,
}

/// One thing that happened to a session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionEvent {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl TraceStore {
    /// Opens (creating if needed) the trace store at `path`.
    pub async fn open(path: &Path) -> Result<TraceStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(StoreError::Open)?;
        TRACE_MIGRATOR
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(TraceStore { pool })
    }

    /// Stores spans, all in one transaction. `received_at` is unix seconds.
    pub async fn put_spans(&self, spans: &[SpanRow], received_at: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for s in spans {
            let attributes = serde_json::to_string(&s.attributes)?;
            let size = (attributes.len() + s.name.len() + s.service.len() + 128) as i64;
            sqlx::query(
                "INSERT INTO spans (trace_id, span_id, parent_span_id, name, service, kind, start_us, end_us,
                                    status, status_message, agent, session, attributes, received_at, size)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&s.trace_id)
            .bind(&s.span_id)
            .bind(&s.parent_span_id)
            .bind(&s.name)
            .bind(&s.service)
            .bind(&s.kind)
            .bind(s.start_us)
            .bind(s.end_us)
            .bind(&s.status)
            .bind(&s.status_message)
            .bind(&s.agent)
            .bind(&s.session)
            .bind(attributes)
            .bind(received_at)
            .bind(size)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Drops spans received before `older_than` (unix seconds), then the oldest ones until
    /// the rest take at most `max_bytes`. Returns how many went.
    pub async fn prune_spans(&self, older_than: i64, max_bytes: i64) -> Result<u64, StoreError> {
        let aged = sqlx::query("DELETE FROM spans WHERE received_at < ?")
            .bind(older_than)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let total: i64 = sqlx::query("SELECT COALESCE(SUM(size), 0) AS total FROM spans")
            .fetch_one(&self.pool)
            .await?
            .get("total");
        if total <= max_bytes {
            return Ok(aged);
        }
        // The newest spans whose sizes add up to at most `max_bytes` stay.
        let sized = sqlx::query(
            "DELETE FROM spans WHERE seq <= (
                SELECT seq FROM (
                    SELECT seq, SUM(size) OVER (ORDER BY seq DESC) AS kept FROM spans
                ) WHERE kept > ? ORDER BY seq DESC LIMIT 1
            )",
        )
        .bind(max_bytes)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(aged + sized)
    }

    /// Traces, newest first: each one's root span (the earliest when the root is missing),
    /// start, duration, span count and whether any span failed.
    pub async fn traces(&self, f: &TraceFilter<'_>) -> Result<Vec<TraceSummary>, StoreError> {
        let rows = sqlx::query(
            "WITH wanted AS (
                SELECT trace_id, MIN(start_us) AS start_us, MAX(end_us) AS end_us, COUNT(*) AS spans,
                       MAX(status = 'error') AS error, MAX(agent) AS agent, MAX(session) AS session
                FROM spans
                WHERE trace_id IN (
                    SELECT trace_id FROM spans
                    WHERE (? IS NULL OR agent = ?) AND (? IS NULL OR session = ?))
                GROUP BY trace_id
                HAVING ? IS NULL OR MIN(start_us) < ?
                ORDER BY start_us DESC
                LIMIT ?
             )
             SELECT w.*, (SELECT name FROM spans s WHERE s.trace_id = w.trace_id
                          ORDER BY s.parent_span_id IS NOT NULL, s.start_us LIMIT 1) AS name
             FROM wanted w ORDER BY w.start_us DESC",
        )
        .bind(f.agent)
        .bind(f.agent)
        .bind(f.session)
        .bind(f.session)
        .bind(f.before_us)
        .bind(f.before_us)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let start: i64 = r.get("start_us");
                TraceSummary {
                    trace_id: r.get("trace_id"),
                    name: r.get("name"),
                    agent: r.get("agent"),
                    session_id: r.get("session"),
                    start_us: start,
                    duration_us: r.get::<i64, _>("end_us") - start,
                    spans: r.get("spans"),
                    error: r.get::<i64, _>("error") != 0,
                }
            })
            .collect())
    }

    /// A trace's spans in start order, with the agent and session they were stored under.
    pub async fn trace(&self, trace_id: &str) -> Result<Vec<SpanRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT trace_id, span_id, parent_span_id, name, service, kind, start_us, end_us, status,
                    status_message, agent, session, attributes
             FROM spans WHERE trace_id = ? ORDER BY start_us, seq",
        )
        .bind(trace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SpanRow {
                    trace_id: r.get("trace_id"),
                    span_id: r.get("span_id"),
                    parent_span_id: r.get("parent_span_id"),
                    name: r.get("name"),
                    service: r.get("service"),
                    kind: r.get("kind"),
                    start_us: r.get("start_us"),
                    end_us: r.get("end_us"),
                    status: r.get("status"),
                    status_message: r.get("status_message"),
                    agent: r.get("agent"),
                    session: r.get("session"),
                    attributes: serde_json::from_str(r.get("attributes"))?,
                })
            })
            .collect()
    }
}

impl Store {
    /// Records something that happened to a session (its state changes are recorded by
    /// `set_session_state` itself).
    pub async fn session_event(
        &self,
        id: &str,
        at: &str,
        kind: &str,
        detail: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO session_events (session, at, kind, detail) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(at)
            .bind(kind)
            .bind(detail.map(serde_json::to_string).transpose()?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A session's events, oldest first (at most `limit`, the newest ones).
    pub async fn session_events(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT seq, at, kind, detail FROM session_events WHERE session = ?
                            ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SessionEvent {
                    seq: r.get("seq"),
                    at: r.get("at"),
                    kind: r.get("kind"),
                    detail: r
                        .get::<Option<String>, _>("detail")
                        .map(|d| serde_json::from_str(&d))
                        .transpose()?,
                })
            })
            .collect()
    }
}
