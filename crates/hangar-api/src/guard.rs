//! Data-loss guardrails on agents' answers: an agent version with `guardrails` in its
//! `agent.yaml` has every answer scanned on its way to the caller (`/responses`, its
//! operations, `/invocations` and the mapped protocols, which read `/responses`), and each hit
//! is redacted, or the answer withheld, as the version says; every hit is audited.
//!
//! - A whole answer (JSON or anything not a stream) is read (at most [`MAX_WHOLE`]) and
//!   scanned; in JSON each string is redacted on its own, so the document stays valid.
//! - A stream is scanned event by event. The text of `response.output_text.delta` events is
//!   run through one [`hangar_dlp::StreamRedactor`] per content part, so a card number split
//!   across deltas is still caught: each delta event leaves when the next one of its part (or
//!   its `.done`) has come, carrying the text released by then, and events behind it wait, so
//!   that the order (and `sequence_number`) is the agent's. Other events have their strings
//!   redacted one by one.
//! - `block` ends the answer at the first hit: a whole answer becomes a 502 `output_blocked`
//!   error, a stream gets an `error` event and ends. Nothing of the hit has left by then.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use hangar_agents::OutputGuard;
use hangar_dlp::{Scanner, StreamRedactor};
use hangar_proto::agent::{OutputAction, SESSION_HEADER};

use crate::error::ApiError;
use crate::mapping::sse::{SseEvent, SseParser};
use crate::AppState;

/// The largest whole answer the guardrails read; a larger one is withheld.
pub const MAX_WHOLE: usize = 16 * 1024 * 1024;

/// Whose answer this is, for the audit trail.
#[derive(Debug, Clone)]
pub struct Whose {
    pub agent: String,
    pub session: String,
    pub request_id: Option<String>,
}

/// The answer with the guardrails applied (as it is when there are none).
pub async fn answer(
    st: &AppState,
    guard: Option<Arc<OutputGuard>>,
    whose: Whose,
    resp: Response,
) -> Response {
    let Some(guard) = guard else {
        return resp;
    };
    // The agent was asked for no encoding (`plain_request`); bytes it compressed anyway
    // cannot be read, so they are not relayed.
    let encoded = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded && guard.action != OutputAction::Off {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "output_blocked",
            "the agent's answer is compressed, which its guardrails cannot read",
        )
        .into_response();
    }
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        stream(st.clone(), guard, whose, resp)
    } else {
        whole(st, guard, whose, resp).await
    }
}

fn blocked(detectors: &[String]) -> Response {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "output_blocked",
        format!(
            "the agent's answer was withheld by its guardrails: it contains {}",
            detectors.join(", ")
        ),
    )
    .into_response()
}

async fn audit(st: &AppState, guard: &OutputGuard, whose: &Whose, detectors: &[String]) {
    st.metrics.dlp_hit(&whose.agent);
    let action = serde_json::to_value(guard.action).unwrap_or_default();
    st.audit
        .record(hangar_store::AuditEntry {
            actor: format!("agent:{}", whose.agent),
            action: "dlp.hit".into(),
            agent: Some(whose.agent.clone()),
            session: Some(whose.session.clone()),
            request_id: whose.request_id.clone(),
            detail: json!({"where": "output", "detectors": detectors, "action": action}),
        })
        .await;
}

fn names(hits: impl IntoIterator<Item = hangar_dlp::Hit>) -> Vec<String> {
    let mut v: Vec<String> = hits.into_iter().map(|h| h.detector).collect();
    v.sort();
    v.dedup();
    v
}

/// Redacts every string in `v`, returning the detectors hit.
fn redact_json(scanner: &Scanner, v: &mut Value, hits: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let (out, h) = scanner.redact(s);
            if !h.is_empty() {
                hits.extend(h.into_iter().map(|h| h.detector));
                *s = out;
            }
        }
        // A number that is a card cannot be redacted in place: it becomes the marker string.
        Value::Number(n) => {
            let text = n.to_string();
            let (out, h) = scanner.redact(&text);
            if !h.is_empty() {
                hits.extend(h.into_iter().map(|h| h.detector));
                *v = Value::String(out);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| redact_json(scanner, x, hits)),
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                let (out, h) = scanner.redact(&k);
                if !h.is_empty() {
                    hits.extend(h.into_iter().map(|h| h.detector));
                    let x = o.remove(&k).expect("listed");
                    o.insert(out, x);
                }
            }
            o.values_mut().for_each(|x| redact_json(scanner, x, hits));
        }
        _ => {}
    }
}

async fn whole(st: &AppState, guard: Arc<OutputGuard>, whose: Whose, resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_WHOLE)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "output_blocked",
                format!(
                    "the agent's answer is larger than the {} MiB its guardrails can read",
                    MAX_WHOLE >> 20
                ),
            )
            .into_response()
        }
    };
    let scanner = &guard.scanner;
    let mut hits = Vec::new();
    let redacted: Option<Bytes> = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) => {
            redact_json(scanner, &mut v, &mut hits);
            Some(serde_json::to_vec(&v).expect("JSON serialises").into())
        }
        Err(_) => match std::str::from_utf8(&bytes) {
            Ok(text) => {
                let (out, h) = scanner.redact(text);
                hits.extend(h.into_iter().map(|h| h.detector));
                Some(out.into())
            }
            // Bytes that are not text cannot be redacted in place: a hit withholds them.
            Err(_) => {
                hits.extend(scanner.scan_bytes(&bytes).into_iter().map(|h| h.detector));
                None
            }
        },
    };
    if hits.is_empty() {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let detectors = names(hits.into_iter().map(|d| hangar_dlp::Hit {
        detector: d,
        start: 0,
        end: 0,
    }));
    audit(st, &guard, &whose, &detectors).await;
    match (guard.action, redacted) {
        (OutputAction::Off, _) => Response::from_parts(parts, Body::from(bytes)),
        (OutputAction::Redact, Some(out)) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(out))
        }
        _ => {
            let mut resp = blocked(&detectors);
            if let Some(s) = parts.headers.get(SESSION_HEADER) {
                resp.headers_mut().insert(SESSION_HEADER, s.clone());
            }
            resp
        }
    }
}

/// An event on its way out; a text delta is `open` until its part's next text is known.
struct Out {
    event: Option<String>,
    data: String,
    /// For an open delta: the part it belongs to and its JSON, whose `delta` is set on close.
    open: Option<(PartKey, Value)>,
}

/// One stream of deltas: the event type, the item and the content part.
type PartKey = (String, String, u64);

/// The guardrails' state over one stream.
struct StreamGuard {
    scanner: Scanner,
    action: OutputAction,
    parts: HashMap<PartKey, (StreamRedactor, String)>,
    queue: VecDeque<Out>,
    hits: Vec<String>,
}

fn part_key(kind: &str, v: &Value) -> PartKey {
    let item = v
        .get("item_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "#{}",
                v.get("output_index").and_then(Value::as_u64).unwrap_or(0)
            )
        });
    (
        kind.trim_end_matches(".delta")
            .trim_end_matches(".done")
            .to_owned(),
        item,
        v.get("content_index").and_then(Value::as_u64).unwrap_or(0),
    )
}

/// The most a stream may hold back (queued events) before the guardrails give up on it.
const MAX_HELD: usize = 4 * 1024 * 1024;
const MAX_PARTS: usize = 1024;

impl StreamGuard {
    /// Closes the open delta of `key` with the text released so far.
    fn close(&mut self, key: &PartKey) {
        if let Some((_, released)) = self.parts.get_mut(key) {
            let text = std::mem::take(released);
            self.close_with(key, text);
        }
    }

    fn close_with(&mut self, key: &PartKey, text: String) {
        if let Some(out) = self
            .queue
            .iter_mut()
            .find(|o| o.open.as_ref().is_some_and(|(k, _)| k == key))
        {
            let (_, mut v) = out.open.take().expect("found open");
            v["delta"] = Value::String(text);
            out.data = v.to_string();
        }
    }

    /// Ends a part: the rest of its text goes to its open delta.
    fn finish_part(&mut self, key: &PartKey) {
        if let Some((r, mut released)) = self.parts.remove(key) {
            let (rest, hits) = r.finish();
            self.hits.extend(hits.into_iter().map(|h| h.detector));
            released.push_str(&rest);
            self.close_with(key, released);
        }
    }

    fn feed(&mut self, e: SseEvent) {
        let parsed: Option<Value> = serde_json::from_str(&e.data).ok();
        let kind = parsed
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let is_delta = kind.ends_with(".delta")
            && parsed
                .as_ref()
                .is_some_and(|v| v.get("delta").is_some_and(Value::is_string));
        match (kind.as_str(), parsed) {
            (_, Some(mut v)) if is_delta => {
                let key = part_key(&kind, &v);
                let delta = v
                    .as_object_mut()
                    .and_then(|o| o.remove("delta"))
                    .and_then(|d| d.as_str().map(str::to_owned))
                    .unwrap_or_default();
                // The rest of the event (log probabilities, …) is redacted on its own.
                let mut hits = Vec::new();
                redact_json(&self.scanner, &mut v, &mut hits);
                self.hits.extend(hits);
                let delta = delta.as_str();
                let scanner = self.scanner.clone();
                let (r, released) = self
                    .parts
                    .entry(key.clone())
                    .or_insert_with(|| (scanner.stream(), String::new()));
                let (text, hits) = r.push(delta);
                released.push_str(&text);
                self.hits.extend(hits.into_iter().map(|h| h.detector));
                self.close(&key);
                self.queue.push_back(Out {
                    event: e.event,
                    data: String::new(),
                    open: Some((key, v)),
                });
            }
            (kind, Some(mut v)) => {
                if kind.ends_with(".done") {
                    self.finish_part(&part_key(kind, &v));
                }
                let mut hits = Vec::new();
                redact_json(&self.scanner, &mut v, &mut hits);
                let data = if hits.is_empty() {
                    e.data
                } else {
                    v.to_string()
                };
                self.hits.extend(hits);
                self.queue.push_back(Out {
                    event: e.event,
                    data,
                    open: None,
                });
            }
            (_, None) => {
                if e.data == "[DONE]" {
                    let keys: Vec<PartKey> = self.parts.keys().cloned().collect();
                    keys.iter().for_each(|k| self.finish_part(k));
                }
                let (data, hits) = self.scanner.redact(&e.data);
                self.hits.extend(hits.into_iter().map(|h| h.detector));
                self.queue.push_back(Out {
                    event: e.event,
                    data,
                    open: None,
                });
            }
        }
    }

    /// The events ready to leave, as SSE bytes.
    fn ready(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|o| o.open.is_none()) {
            let o = self.queue.pop_front().expect("front");
            if let Some(ev) = &o.event {
                out.extend_from_slice(format!("event: {ev}\n").as_bytes());
            }
            for line in o.data.split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
            out.push(b'\n');
        }
        out
    }

    /// Whether the stream holds back more than it may (a hostile or broken agent).
    fn overloaded(&self) -> bool {
        self.parts.len() > MAX_PARTS
            || self.queue.iter().map(|o| o.data.len() + 64).sum::<usize>()
                + self.parts.values().map(|(_, r)| r.len()).sum::<usize>()
                > MAX_HELD
    }

    /// Closes everything still open (the stream ended).
    fn end(&mut self) {
        let keys: Vec<PartKey> = self.parts.keys().cloned().collect();
        keys.iter().for_each(|k| self.finish_part(k));
    }
}

fn stream(st: AppState, guard: Arc<OutputGuard>, whose: Whose, resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    // In the request's span: the work it started is part of its trace.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut g = StreamGuard {
            scanner: guard.scanner.clone(),
            action: guard.action,
            parts: HashMap::new(),
            queue: VecDeque::new(),
            hits: Vec::new(),
        };
        let mut parser = SseParser::default();
        let mut body = body.into_data_stream();
        let mut audited = 0;
        let mut ended = false;
        while !ended {
            let mut events = Vec::new();
            match body.next().await {
                Some(Ok(data)) => {
                    // `off` only audits: the answer leaves as it came.
                    if g.action == OutputAction::Off && tx.send(Ok(data.clone())).await.is_err() {
                        return;
                    }
                    if parser.feed(&data, &mut events).is_err() {
                        let _ = tx
                            .send(Err(std::io::Error::other("an event is too large")))
                            .await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
                None => {
                    // A last event without its blank line still counts.
                    let _ = parser.feed(b"\n\n", &mut events);
                    ended = true;
                }
            }
            events.into_iter().for_each(|e| g.feed(e));
            if g.action != OutputAction::Off && g.overloaded() {
                let ev = json!({
                    "type": "error",
                    "code": "output_blocked",
                    "message": "the agent's stream holds back more than its guardrails can inspect",
                });
                let _ = tx
                    .send(Ok(Bytes::from(format!("event: error\ndata: {ev}\n\n"))))
                    .await;
                return;
            }
            if ended {
                g.end();
            }
            if g.hits.len() > audited {
                let detectors = names(g.hits[audited..].iter().map(|d| hangar_dlp::Hit {
                    detector: d.clone(),
                    start: 0,
                    end: 0,
                }));
                audited = g.hits.len();
                audit(&st, &guard, &whose, &detectors).await;
                if g.action == OutputAction::Block {
                    let ev = json!({
                        "type": "error",
                        "code": "output_blocked",
                        "message": format!(
                            "the agent's answer was withheld by its guardrails: it contains {}",
                            detectors.join(", ")
                        ),
                    });
                    let _ = tx
                        .send(Ok(Bytes::from(format!("event: error\ndata: {ev}\n\n"))))
                        .await;
                    return;
                }
            }
            let out = g.ready();
            if g.action != OutputAction::Off
                && !out.is_empty()
                && tx.send(Ok(out.into())).await.is_err()
            {
                return;
            }
        }
    }));
    let body = Body::from_stream(tokio_stream_from(rx));
    Response::from_parts(parts, body)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(action: OutputAction) -> StreamGuard {
        StreamGuard {
            scanner: Scanner::from_config(&["card_number".into()], &Default::default()).unwrap(),
            action,
            parts: HashMap::new(),
            queue: VecDeque::new(),
            hits: Vec::new(),
        }
    }

    fn delta(seq: u64, item: &str, text: &str) -> SseEvent {
        SseEvent {
            event: Some("response.output_text.delta".into()),
            data: json!({"type": "response.output_text.delta", "sequence_number": seq,
                "item_id": item, "output_index": 0, "content_index": 0, "delta": text})
            .to_string(),
        }
    }

    fn events(bytes: &[u8]) -> Vec<Value> {
        let mut out = vec![];
        SseParser::default().feed(bytes, &mut out).unwrap();
        out.iter()
            .map(|e| serde_json::from_str(&e.data).unwrap_or(Value::Null))
            .collect()
    }

    #[test]
    fn a_card_split_across_deltas_is_redacted_and_order_kept() {
        let card = "4111 1111 1111 1111";
        for cut in 1..card.len() {
            let mut g = guard(OutputAction::Redact);
            let mut out = Vec::new();
            g.feed(delta(1, "m1", &format!("pay with {}", &card[..cut])));
            out.extend(g.ready());
            g.feed(delta(2, "m1", &format!("{} now", &card[cut..])));
            // Another item's event waits behind the open delta.
            g.feed(SseEvent {
                event: None,
                data: json!({"type": "response.output_item.added", "sequence_number": 3})
                    .to_string(),
            });
            out.extend(g.ready());
            g.feed(SseEvent {
                event: None,
                data: "[DONE]".into(),
            });
            g.end();
            out.extend(g.ready());
            let evs = events(&out);
            let seqs: Vec<u64> = evs
                .iter()
                .filter_map(|e| e.get("sequence_number").and_then(Value::as_u64))
                .collect();
            assert_eq!(seqs, [1, 2, 3], "cut {cut}");
            let text: String = evs
                .iter()
                .filter_map(|e| e.get("delta").and_then(Value::as_str))
                .collect();
            assert_eq!(text, "pay with [REDACTED:card_number] now", "cut {cut}");
            assert_eq!(g.hits, ["card_number"], "cut {cut}");
            assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
        }
    }

    #[test]
    fn other_events_are_redacted_string_by_string() {
        let mut g = guard(OutputAction::Redact);
        g.feed(SseEvent {
            event: Some("response.completed".into()),
            data: json!({"type": "response.completed", "response": {"output": [{"content":
                [{"type": "output_text", "text": "card 4111111111111111."}]}]}})
            .to_string(),
        });
        let evs = events(&g.ready());
        assert_eq!(
            evs[0].pointer("/response/output/0/content/0/text"),
            Some(&json!("card [REDACTED:card_number]."))
        );
        assert_eq!(g.hits, ["card_number"]);
    }

    #[test]
    fn json_answers_stay_json() {
        let scanner = Scanner::from_config(&["email".into()], &Default::default()).unwrap();
        let mut v = json!({"a": ["mail bob@example.com"], "b": {"c": "x\"y carol@example.org"}});
        let mut hits = vec![];
        redact_json(&scanner, &mut v, &mut hits);
        assert_eq!(
            v,
            json!({"a": ["mail [REDACTED:email]"], "b": {"c": "x\"y [REDACTED:email]"}})
        );
        assert_eq!(hits.len(), 2);
    }
}
