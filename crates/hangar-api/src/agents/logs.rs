//! `GET …/sessions/{id}/logs`: a session's console — its agent's stdout and stderr and
//! `hangar-init`'s own lines, each stamped by `hangar-init` — as plain text (the lines as they
//! are) or as Server-Sent Events (one event per line, `id:` its end offset, `data:` a
//! [`LogLine`]), optionally followed across rotations until the session is deleted.
//!
//! The request is parsed into a [`LogsRequest`] by a pure function; the log is read by
//! `hangar_sandbox::console` on blocking threads, a bounded batch at a time, so a slow client
//! holds back only its own reader and nothing reads a log whole.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use hangar_proto::console::{LogLine, LogStream, END_EVENT};
use hangar_sandbox::console::{self, ConsoleReader, Filter, Filtering, LineSplitter, RawLine};

use super::{session_ref, SessionRef};
use crate::{ApiError, AppState};

/// What is shown when the request names no start: the last 64 KiB.
const DEFAULT_TAIL_BYTES: u64 = 64 * 1024;
/// How often a follower looks for more.
const POLL: Duration = Duration::from_millis(200);
/// An SSE comment this often keeps proxies and clients from timing out a quiet log.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a follower checks that the session still exists.
const SESSION_CHECK: Duration = Duration::from_secs(2);
/// How long a follower waits for the end of a line before showing its start as a line.
const PARTIAL_WAIT: Duration = Duration::from_secs(1);
/// At most this much of the log is read per batch.
const BATCH: usize = 256 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Only the last this many bytes, from the first whole line (default 64 KiB; all with 0).
    tail_bytes: Option<u64>,
    /// Only the last this many lines (of those the filters let through).
    tail: Option<usize>,
    /// Only lines stamped at or after this RFC 3339 time.
    since: Option<String>,
    /// Only these streams: `stdout`, `stderr`, `init`, `console`, comma-separated.
    stream: Option<String>,
    /// `text` or `sse`; by default SSE when the `Accept` header asks for `text/event-stream`.
    format: Option<String>,
}

/// Where a logs answer starts.
#[derive(Debug, Clone, PartialEq)]
enum Start {
    /// Just after this offset (an SSE `Last-Event-ID`).
    After(u64),
    /// At the last this many lines that the filter lets through.
    TailLines(usize),
    /// At the first whole line in the last this many bytes.
    TailBytes(u64),
    /// At the first line kept.
    First,
}

/// What a logs request asks for.
#[derive(Debug, Clone, PartialEq)]
struct LogsRequest {
    sse: bool,
    follow: bool,
    start: Start,
    filter: Filter,
}

fn parse_request(q: &LogsQuery, headers: &HeaderMap) -> Result<LogsRequest, String> {
    let sse = match q.format.as_deref() {
        Some("sse") => true,
        Some("text") => false,
        Some(f) => return Err(format!("format must be text or sse, not {f:?}")),
        None => accepts_sse(headers),
    };
    let since = match &q.since {
        Some(s) => Some(humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!("since must be an RFC 3339 time such as 2026-11-27T10:00:00Z, not {s:?}")
        })?),
        None => None,
    };
    let mut streams = Vec::new();
    for s in q.stream.iter().flat_map(|s| s.split(',')) {
        let s = s.trim();
        streams.push(LogStream::parse(s).ok_or_else(|| {
            format!("stream must be stdout, stderr, init or console (comma-separated), not {s:?}")
        })?);
    }
    let last_event = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("Last-Event-ID must be the id of an event of this log (a number)")?,
        ),
        None => None,
    };
    let start = match (last_event, q.tail, q.tail_bytes) {
        (_, Some(_), Some(_)) => return Err("give tail (lines) or tail_bytes, not both".into()),
        (Some(id), _, _) => Start::After(id),
        (None, Some(n), None) => Start::TailLines(n),
        (None, None, Some(0)) => Start::First,
        (None, None, Some(n)) => Start::TailBytes(n),
        (None, None, None) if since.is_some() => Start::First,
        (None, None, None) => Start::TailBytes(DEFAULT_TAIL_BYTES),
    };
    Ok(LogsRequest {
        sse,
        follow: q.follow,
        start,
        filter: Filter { since, streams },
    })
}

/// The session's console as text or SSE; with `follow=true` the answer stays open and
/// carries what is appended, until the session is deleted or the client leaves.
pub async fn logs(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<LogsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    let req = parse_request(&q, &headers).map_err(ApiError::bad_request)?;
    let path = st.agents.log_path(&r.id, r.user.as_deref()).await?;
    let reader = st.sandboxes.consoles().reader(&path);
    let (start, request) = (req.start.clone(), req.clone());
    let content_type = if req.sse {
        "text/event-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    let follower = tokio::task::spawn_blocking(move || Follower::open(reader, &request))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(format!("reading the log: {e}")))?;
    tracing::debug!(session = %r.id, ?start, "logs");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(pump(st, r, req, follower, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

fn internal(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

/// Sends the log to the client, batch by batch; when following, looks for more every
/// [`POLL`] until the session is gone or the client leaves.
async fn pump(
    st: AppState,
    session: SessionRef,
    req: LogsRequest,
    mut follower: Follower,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut last_sent = Instant::now();
    let mut last_check = Instant::now();
    loop {
        let (back, batch) = match tokio::task::spawn_blocking(move || {
            let batch = follower.next_batch(!req.follow);
            (follower, batch)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the log reader failed");
                return;
            }
        };
        follower = back;
        let (out, more) = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(session = %session.id, error = %e, "cannot read a console log");
                return;
            }
        };
        if !out.is_empty() {
            if tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
            last_sent = Instant::now();
        }
        if more {
            continue;
        }
        if !req.follow {
            return;
        }
        let gone = follower.reader.gone();
        if last_check.elapsed() >= SESSION_CHECK || gone {
            last_check = Instant::now();
            let deleted = matches!(
                st.agents
                    .log_path(&session.id, session.user.as_deref())
                    .await,
                Err(hangar_agents::AgentsError::NotFound(_))
            );
            if deleted || gone {
                if req.sse {
                    let reason = if deleted {
                        "the session was deleted"
                    } else {
                        "the session's sandbox is gone"
                    };
                    let end = format!(
                        "event: {END_EVENT}\ndata: {}\n\n",
                        serde_json::json!({ "reason": reason })
                    );
                    let _ = tx.send(Bytes::from(end)).await;
                }
                return;
            }
        }
        if req.sse && last_sent.elapsed() >= KEEP_ALIVE {
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                return;
            }
            last_sent = Instant::now();
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// A reader of one console positioned for a request, with the line it is in the middle of.
struct Follower {
    reader: ConsoleReader,
    splitter: LineSplitter,
    filtering: Filtering,
    sse: bool,
    /// Without following, the end of the log when the request came: the answer stops there.
    stop: u64,
    /// Since when the start of a line has been waiting for its end.
    partial_since: Option<Instant>,
    buf: Vec<u8>,
}

impl Follower {
    /// Finds where the request starts (blocking).
    fn open(mut reader: ConsoleReader, req: &LogsRequest) -> std::io::Result<Follower> {
        let (first, end) = reader.span()?;
        let start = match req.start {
            Start::After(offset) => offset.clamp(first, end),
            Start::TailLines(n) => console::tail_lines(&mut reader, n, &req.filter)?,
            Start::TailBytes(n) => console::line_start(&mut reader, end.saturating_sub(n))?,
            Start::First => first,
        };
        reader.seek(start);
        Ok(Follower {
            reader,
            splitter: LineSplitter::new(start),
            filtering: Filtering::new(req.filter.clone()),
            sse: req.sse,
            stop: end,
            partial_since: None,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Reads the next batch and formats the lines it completes. Returns them and whether
    /// more is ready at once (false at the end of the log, or at `stop` when `to_stop`).
    fn next_batch(&mut self, to_stop: bool) -> std::io::Result<(Vec<u8>, bool)> {
        let mut lines = Vec::new();
        let mut read = 0;
        let mut more = true;
        while read < BATCH {
            if to_stop && self.reader.position() >= self.stop && !self.splitter.has_pending() {
                more = false;
                break;
            }
            let (at, n) = self.reader.read(&mut self.buf)?;
            if n == 0 {
                more = false;
                break;
            }
            self.splitter.push(at, &self.buf[..n], &mut lines);
            read += n;
        }
        if !more {
            // The end of the log, in the middle of a line: a runtime writing it byte by byte
            // (the serial console), or a line the truncation of a rotation cut short.
            let waited = self
                .partial_since
                .is_some_and(|t| t.elapsed() >= PARTIAL_WAIT);
            if to_stop || waited {
                self.splitter.flush(&mut lines);
            }
        }
        self.partial_since = match (self.splitter.has_pending(), lines.is_empty()) {
            (false, _) => None,
            (true, true) => self.partial_since.or(Some(Instant::now())),
            (true, false) => Some(Instant::now()),
        };
        let mut out = Vec::new();
        for l in &lines {
            self.format(l, &mut out);
        }
        Ok((out, more))
    }

    fn format(&mut self, raw: &RawLine, out: &mut Vec<u8>) {
        let line = console::parse_line(&raw.bytes);
        if !self.filtering.accepts(&line) {
            return;
        }
        if self.sse {
            sse_event(raw.end, &line, out);
        } else {
            out.extend_from_slice(&raw.bytes);
            out.push(b'\n');
        }
    }
}

/// One SSE event: `id:` the offset after the line (where a client resumes), `data:` the line.
fn sse_event(id: u64, line: &LogLine, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "id: {id}\ndata: ");
    serde_json::to_writer(&mut *out, line).expect("a log line serialises");
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> LogsQuery {
        serde_json::from_value(serde_json::Value::Object(
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    let v = match k {
                        "follow" => serde_json::json!(v == "true"),
                        "tail" | "tail_bytes" => serde_json::json!(v.parse::<u64>().unwrap()),
                        _ => serde_json::json!(v),
                    };
                    (k.to_owned(), v)
                })
                .collect(),
        ))
        .unwrap()
    }

    fn parse(q: &str, headers: &[(&'static str, &'static str)]) -> Result<LogsRequest, String> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        parse_request(&query(q), &h)
    }

    #[test]
    fn parses_requests() {
        let r = parse("", &[]).unwrap();
        assert_eq!(
            r,
            LogsRequest {
                sse: false,
                follow: false,
                start: Start::TailBytes(DEFAULT_TAIL_BYTES),
                filter: Filter::default(),
            }
        );
        let r = parse("follow=true", &[("accept", "text/event-stream")]).unwrap();
        assert!(r.sse && r.follow);
        assert!(parse("format=sse", &[]).unwrap().sse);
        assert!(
            !parse("format=text", &[("accept", "text/event-stream")])
                .unwrap()
                .sse
        );
        assert_eq!(parse("tail_bytes=0", &[]).unwrap().start, Start::First);
        assert_eq!(parse("tail=5", &[]).unwrap().start, Start::TailLines(5));
        assert_eq!(
            parse("tail=5", &[("last-event-id", "123")]).unwrap().start,
            Start::After(123)
        );
        let r = parse("since=2026-11-27T10:00:00Z&stream=stdout,stderr", &[]).unwrap();
        assert_eq!(r.start, Start::First);
        assert_eq!(r.filter.streams, [LogStream::Stdout, LogStream::Stderr]);
        assert_eq!(
            r.filter.since,
            Some(humantime::parse_rfc3339("2026-11-27T10:00:00Z").unwrap())
        );
        for (q, h, why) in [
            ("since=yesterday", None, "since must be an RFC 3339"),
            ("stream=stdin", None, "stream must be"),
            ("format=html", None, "format must be"),
            ("tail=1&tail_bytes=2", None, "not both"),
            ("", Some(("last-event-id", "x")), "Last-Event-ID"),
        ] {
            let err = parse(q, &h.into_iter().collect::<Vec<_>>()).unwrap_err();
            assert!(err.contains(why), "{q}: {err}");
        }
    }

    #[test]
    fn formats_sse_events() {
        let mut out = Vec::new();
        sse_event(
            42,
            &LogLine {
                ts: Some("2026-11-27T10:00:00.123Z".into()),
                stream: LogStream::Stdout,
                line: "say \"hi\"\nnow".into(),
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id: 42\ndata: {\"ts\":\"2026-11-27T10:00:00.123Z\",\"stream\":\"stdout\",\"line\":\"say \\\"hi\\\"\\nnow\"}\n\n"
        );
    }
}
