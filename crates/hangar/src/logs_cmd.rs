//! `hangar sessions logs`: a session's console through the logs API's Server-Sent Events,
//! printed as the lines `hangar-init` wrote or as JSON lines. With `-f` it follows until
//! Ctrl-C or the session's deletion, and when the connection drops (a restart of
//! `hangar serve`) it reconnects and resumes after the last line shown (`Last-Event-ID`).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use hyper::Method;

use hangar_proto::console::{LogLine, LogStream, END_EVENT, INIT_TAG};

use crate::client::{self, Client};

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The session.
    pub id: String,
    /// Keep following the log, until Ctrl-C or the session is deleted.
    #[arg(short, long)]
    pub follow: bool,
    /// Only lines since this time: RFC 3339 (2026-11-27T10:00:00Z) or an age (90s, 10m, 2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only the last N lines (default: those in the last 64 KiB).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only this stream: stdout, stderr, init (hangar-init's lines) or console (the
    /// runtime's); repeatable.
    #[arg(long, value_name = "STREAM")]
    pub stream: Vec<String>,
    /// One JSON object per line: `id` (where the line ends in the log), `ts`, `stream`, `line`.
    #[arg(long)]
    pub json: bool,
}

/// The query string of the logs request.
fn query(a: &LogsArgs, now: SystemTime) -> anyhow::Result<String> {
    let mut q = vec![format!("follow={}", a.follow), "format=sse".to_owned()];
    if let Some(since) = &a.since {
        let at = match humantime::parse_rfc3339_weak(since) {
            Ok(t) => t,
            Err(_) => {
                let age = humantime::parse_duration(since).map_err(|_| {
                    anyhow::anyhow!(
                        "--since takes an RFC 3339 time (2026-11-27T10:00:00Z) or an age (10m), not {since:?}"
                    )
                })?;
                now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)
            }
        };
        q.push(format!(
            "since={}",
            hangar_proto::encode_query(&humantime::format_rfc3339_millis(at).to_string())
        ));
    }
    if let Some(n) = a.tail {
        q.push(format!("tail={n}"));
    }
    if !a.stream.is_empty() {
        for s in &a.stream {
            if LogStream::parse(s).is_none() {
                anyhow::bail!("--stream takes stdout, stderr, init or console, not {s:?}");
            }
        }
        q.push(format!("stream={}", a.stream.join(",")));
    }
    Ok(q.join("&"))
}

pub async fn run(c: &Client, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/v1/sessions/{}/logs?{}",
        a.id,
        query(&a, SystemTime::now())?
    );
    let mut last_id: Option<String> = None;
    let mut connected = false;
    let mut out = std::io::stdout();
    loop {
        let resume = last_id.as_deref().map(|id| ("last-event-id", id));
        let headers: Vec<(&str, &str)> = resume.into_iter().collect();
        let resp = match c.send(Method::GET, &path, &headers, client::empty()).await {
            Ok(r) => r,
            Err(e) if connected => {
                eprintln!("hangar: {e:#}; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !resp.status().is_success() {
            client::check(resp).await?;
            unreachable!("check fails on an error status");
        }
        connected = true;
        let mut body = resp.into_body();
        let mut events = SseEvents::default();
        let mut batch = Vec::new();
        let ended = loop {
            let Some(frame) = body.frame().await else {
                break None;
            };
            let Ok(data) = frame.map(|f| f.into_data()) else {
                break None;
            };
            let Ok(data) = data else { continue };
            events.feed(&data, &mut batch)?;
            let mut end = None;
            for ev in batch.drain(..) {
                if ev.event.as_deref() == Some(END_EVENT) {
                    let why = serde_json::from_str::<serde_json::Value>(&ev.data)
                        .ok()
                        .and_then(|v| v["reason"].as_str().map(str::to_owned));
                    end = Some(why.unwrap_or_else(|| "the log ended".into()));
                    break;
                }
                let line: LogLine = serde_json::from_str(&ev.data)
                    .map_err(|e| anyhow::anyhow!("unreadable log event from the server: {e}"))?;
                if !print(&mut out, ev.id.as_deref(), &line, a.json)? {
                    return Ok(ExitCode::SUCCESS);
                }
                if ev.id.is_some() {
                    last_id = ev.id;
                }
            }
            if end.is_some() {
                break end;
            }
        };
        if let Some(why) = ended {
            eprintln!("hangar: {why}");
            return Ok(ExitCode::SUCCESS);
        }
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("hangar: the connection to the server was lost; reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints one line; false when stdout is closed (`| head`), which ends the command quietly.
fn print(
    out: &mut impl Write,
    id: Option<&str>,
    line: &LogLine,
    json: bool,
) -> anyhow::Result<bool> {
    let text = if json {
        let mut v = serde_json::to_value(line)?;
        if let Some(id) = id.and_then(|i| i.parse::<u64>().ok()) {
            v["id"] = id.into();
        }
        v.to_string()
    } else {
        match (&line.ts, line.stream) {
            (Some(ts), LogStream::Init) => format!("{ts} {INIT_TAG} {}", line.line),
            (Some(ts), s) => format!("{ts} {} {}", s.as_str(), line.line),
            (None, _) => line.line.clone(),
        }
    };
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One Server-Sent Event.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Cuts an event stream into events (the WHATWG grammar, as far as the logs API uses it:
/// `id`, `event`, `data`, comments), holding at most 1 MiB of an unfinished one.
#[derive(Default)]
struct SseEvents {
    line: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

const SSE_MAX: usize = 1024 * 1024;

impl SseEvents {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> anyhow::Result<()> {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(piece);
            if self.line.len() > SSE_MAX {
                anyhow::bail!("the server sent a log event over 1 MiB");
            }
            if !piece.ends_with(b"\n") {
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line_done(&String::from_utf8_lossy(&line), out);
        }
        Ok(())
    }

    fn line_done(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            let ev = std::mem::take(&mut self.current);
            if std::mem::take(&mut self.has_data) {
                out.push(ev);
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseEvents::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c.as_bytes(), &mut out).unwrap();
        }
        out
    }

    #[test]
    fn reads_events_in_pieces() {
        let ev = |id: Option<&str>, event: Option<&str>, data: &str| SseEvent {
            id: id.map(str::to_owned),
            event: event.map(str::to_owned),
            data: data.to_owned(),
        };
        assert_eq!(
            events(&[
                "id: 12\nda",
                "ta: {\"a\":1}\n",
                "\n: keep-alive\n\n",
                "event: end\r\ndata: {}\r\n\r\n"
            ]),
            [
                ev(Some("12"), None, "{\"a\":1}"),
                ev(None, Some("end"), "{}")
            ]
        );
        assert_eq!(events(&["data: a\ndata: b\n\n"]), [ev(None, None, "a\nb")]);
        assert_eq!(events(&["id: 1\n\n", "data: x"]), []);
    }

    #[test]
    fn builds_the_query() {
        let args = |since: Option<&str>, tail, stream: &[&str]| LogsArgs {
            id: "sess_x".into(),
            follow: true,
            since: since.map(str::to_owned),
            tail,
            stream: stream.iter().map(|s| s.to_string()).collect(),
            json: false,
        };
        let now = humantime::parse_rfc3339("2026-11-27T10:00:00Z").unwrap();
        assert_eq!(
            query(&args(Some("10m"), Some(5), &["stdout", "stderr"]), now).unwrap(),
            "follow=true&format=sse&since=2026-11-27T09%3A50%3A00.000Z&tail=5&stream=stdout,stderr"
        );
        assert_eq!(
            query(&args(Some("2026-11-27T08:00:00Z"), None, &[]), now).unwrap(),
            "follow=true&format=sse&since=2026-11-27T08%3A00%3A00.000Z"
        );
        assert!(query(&args(Some("yesterday"), None, &[]), now).is_err());
        assert!(query(&args(None, None, &["stdin"]), now).is_err());
    }

    #[test]
    fn prints_lines_as_init_wrote_them() {
        let line = |ts: Option<&str>, stream, text: &str| LogLine {
            ts: ts.map(str::to_owned),
            stream,
            line: text.to_owned(),
        };
        let ts = Some("2026-11-27T10:00:00.123Z");
        let mut out = Vec::new();
        print(
            &mut out,
            Some("7"),
            &line(ts, LogStream::Stdout, "hi"),
            false,
        )
        .unwrap();
        print(&mut out, None, &line(ts, LogStream::Init, "ready"), false).unwrap();
        print(
            &mut out,
            None,
            &line(None, LogStream::Console, "runsc: x"),
            false,
        )
        .unwrap();
        print(
            &mut out,
            Some("42"),
            &line(ts, LogStream::Stderr, "oops"),
            true,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-27T10:00:00.123Z stdout hi\n\
             2026-11-27T10:00:00.123Z hangar-init: ready\n\
             runsc: x\n\
             {\"id\":42,\"line\":\"oops\",\"stream\":\"stderr\",\"ts\":\"2026-11-27T10:00:00.123Z\"}\n"
        );
    }
}
