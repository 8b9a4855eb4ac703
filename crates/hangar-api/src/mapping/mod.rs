//! The protocols an agent does not implement itself, mapped onto the one it does
//! (`/responses`): AG-UI ([`agui`]) and the Bot Framework Activity Protocol ([`activity`]).
//!
//! Both run a turn the same way: route the conversation to its session (a `threads` row per
//! AG-UI thread or Activity conversation, per isolation key), send the new input to the agent
//! chained on the conversation's last response, and read the agent's answer as normalised
//! [`turn::Step`]s as it streams. The call goes through the same relay as `/responses`, so the
//! response ids it makes are remembered and the session is held running until the end.

pub(crate) mod activity;
pub(crate) mod agui;
pub(crate) mod sse;
mod turn;

use std::collections::VecDeque;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use hangar_agents::Lease;
use hangar_proto::agent::Protocol;

use crate::dataplane::{forward, Capture, Outbound};
use crate::{ApiError, AppState};

pub(crate) use turn::{output_text, Step};

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

/// What the mapped protocols keep between requests: one lock per conversation (its turns run one at a time, so that each chains on the last and two
/// first turns do not make two sessions), and the Activity ids recently taken (a channel
/// that retries a slow turn does not run it twice).
#[derive(Default)]
pub struct Channels {
    locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seen: StdMutex<HashMap<String, Instant>>,
}

/// How long an Activity id is remembered.
const SEEN_FOR: Duration = Duration::from_secs(600);

impl Channels {
    /// Waits for the conversation's earlier turn to end; the guard is this turn's.
    pub(crate) async fn turn_lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap();
            if locks.len() > 4096 {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Whether `key` was taken within the last ten minutes (and takes it if not).
    pub(crate) fn seen(&self, key: String) -> bool {
        let mut seen = self.seen.lock().unwrap();
        if seen.len() > 65_536 {
            seen.retain(|_, t| t.elapsed() < SEEN_FOR);
        }
        match seen.get(&key) {
            Some(t) if t.elapsed() < SEEN_FOR => true,
            _ => {
                seen.insert(key, Instant::now());
                false
            }
        }
    }
}

/// The text of a turn's messages as they stream, messages apart by a blank line.
#[derive(Default)]
pub(crate) struct Text(Vec<String>);

impl Text {
    pub fn step(&mut self, step: &Step) {
        let size: usize = self.0.iter().map(String::len).sum();
        match step {
            Step::TextStart { .. } => self.0.push(String::new()),
            Step::TextDelta { delta, .. } if size < MAX_TEXT => {
                let mut room = MAX_TEXT - size;
                while !delta.is_char_boundary(room.min(delta.len())) {
                    room -= 1;
                }
                let delta = &delta[..room.min(delta.len())];
                match self.0.last_mut() {
                    Some(t) => t.push_str(delta),
                    None => self.0.push(delta.to_owned()),
                }
            }
            _ => {}
        }
    }

    /// The text; what the final response holds if nothing streamed.
    pub fn finish(self, response: &Value) -> String {
        let streamed: Vec<String> = self.0.into_iter().filter(|t| !t.is_empty()).collect();
        if streamed.is_empty() {
            output_text(response)
        } else {
            streamed.join("\n\n")
        }
    }
}

/// The largest non-streamed answer read.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// A turn whose agent sends nothing for this long fails.
const IDLE: Duration = Duration::from_secs(300);
/// No turn lasts longer (a turn holds its session running).
const TURN: Duration = Duration::from_secs(3600);
/// The most text a turn collects for a reply that is one message.
const MAX_TEXT: usize = 256 * 1024;

/// Refuses a mapping onto an agent that does not implement `/responses`.
pub(crate) async fn require_responses(
    st: &AppState,
    agent: &str,
    what: &str,
) -> Result<hangar_proto::agent::AgentSpec, ApiError> {
    let spec = st.agents.serving_spec(agent).await?;
    if !spec.protocols.contains(&Protocol::Responses) {
        return Err(ApiError::bad_request(format!(
            "{what} is mapped onto the agent's /responses, and agent {agent:?} does not implement it (protocols: {})",
            serde_json::to_string(&spec.protocols).unwrap_or_default()
        )));
    }
    Ok(spec)
}

/// One turn on the agent's `/responses`, read as [`Step`]s.
pub(crate) struct AgentCall {
    body: Option<Body>,
    sse: bool,
    parser: sse::SseParser,
    turn: turn::Turn,
    queue: VecDeque<Step>,
    json: Vec<u8>,
    deadline: tokio::time::Instant,
}

/// Sends `request` (a Responses create body) to the agent of `lease`'s session; returns once
/// the agent's answer has begun.
pub(crate) async fn call(
    st: &AppState,
    agent: &str,
    isolation_key: &str,
    lease: Lease,
    request: &Value,
) -> Result<AgentCall, ApiError> {
    let capture = Capture {
        agents: st.agents.clone(),
        agent: agent.to_owned(),
        isolation_key: isolation_key.to_owned(),
        session: lease.session_id.clone(),
        span: tracing::Span::current(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
    let bytes = serde_json::to_vec(request).expect("a JSON value serialises");
    let guard = st.agents.output_guard(&lease).await;
    let whose = crate::guard::Whose {
        agent: agent.to_owned(),
        session: lease.session_id.clone(),
        request_id: None,
    };
    let resp = forward(
        &st.pool,
        lease,
        Method::POST,
        "/responses",
        None,
        &headers,
        Outbound::Buffered(bytes.into()),
        Some(capture),
    )
    .await?;
    let resp = crate::guard::answer(st, guard, whose, resp).await;
    let status = resp.status();
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut call = AgentCall {
        body: Some(resp.into_body()),
        sse,
        parser: Default::default(),
        turn: Default::default(),
        queue: VecDeque::new(),
        json: Vec::new(),
        deadline: tokio::time::Instant::now() + TURN,
    };
    if !status.is_success() {
        let body = call.body.take().expect("just set");
        let bytes = http_body_util::Limited::new(body, 64 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let said = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .or_else(|| v.get("message"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
        let mut out = vec![];
        call.turn.fail(
            format!("the agent answered HTTP {}: {said}", status.as_u16()),
            Some(if status == StatusCode::BAD_REQUEST {
                "invalid_request".into()
            } else {
                "agent_error".into()
            }),
            &mut out,
        );
        call.queue.extend(out);
    }
    Ok(call)
}

impl AgentCall {
    /// The next step of the turn; `None` after the last (which is `Done` or `Failed`).
    pub async fn next(&mut self) -> Option<Step> {
        loop {
            if let Some(s) = self.queue.pop_front() {
                return Some(s);
            }
            if self.turn.finished() {
                // Whatever the agent sends after its terminal event (`[DONE]`) is not read.
                self.body = None;
                return None;
            }
            let body = self.body.as_mut()?;
            let mut out = vec![];
            let wait = IDLE.min(
                self.deadline
                    .saturating_duration_since(tokio::time::Instant::now()),
            );
            let Ok(frame) = tokio::time::timeout(wait, body.frame()).await else {
                self.turn.fail(
                    format!(
                        "the agent's turn ran out of time ({} s without a word, or {} s in all)",
                        IDLE.as_secs(),
                        TURN.as_secs()
                    ),
                    Some("timeout".into()),
                    &mut out,
                );
                self.queue.extend(out);
                continue;
            };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if self.sse {
                        let mut events = vec![];
                        if let Err(e) = self.parser.feed(&data, &mut events) {
                            self.turn.fail(e.to_string(), None, &mut out);
                        }
                        for ev in events {
                            if ev.data.trim() == "[DONE]" {
                                continue;
                            }
                            match serde_json::from_str::<Value>(&ev.data) {
                                Ok(v) => self.turn.event(&v, &mut out),
                                Err(e) => {
                                    tracing::debug!(error = %e, "an agent event that is not JSON")
                                }
                            }
                        }
                    } else if self.json.len() + data.len() > MAX_ANSWER {
                        self.turn.fail(
                            format!("the agent's answer exceeds {MAX_ANSWER} bytes"),
                            None,
                            &mut out,
                        );
                    } else {
                        self.json.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    self.turn
                        .fail(format!("reading the agent's answer: {e}"), None, &mut out);
                }
                None => {
                    if !self.sse {
                        match serde_json::from_slice::<Value>(&self.json) {
                            Ok(v) => self.turn.whole(v, &mut out),
                            Err(e) => self.turn.fail(
                                format!("the agent's answer is not JSON: {e}"),
                                None,
                                &mut out,
                            ),
                        }
                    }
                    self.turn.end(&mut out);
                }
            }
            self.queue.extend(out);
        }
    }
}
