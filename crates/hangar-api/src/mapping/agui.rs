//! AG-UI at `POST /agents/{name}/ag-ui`: a `RunAgentInput` becomes one `/responses` turn,
//! and the agent's stream becomes AG-UI events as it arrives (`data:` frames only).
//!
//! | AG-UI | Responses |
//! |---|---|
//! | `threadId` | the session (a `threads` row per isolation key) |
//! | `messages` after the last one Hangar has seen | `input` items, chained with `previous_response_id` |
//! | `tools` | function `tools` |
//! | `context` | a leading `developer` message |
//! | `state`, `forwardedProps`, `threadId`, `runId` | `metadata.agui_*` (JSON text) |
//!
//! The agent's `metadata.agui_state` (JSON text) on its final response comes back as
//! `STATE_SNAPSHOT`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use hangar_proto::agent::{SESSION_HEADER, USER_HEADER};
use hangar_store::ThreadRow;

use super::{call, require_responses, Step};
use crate::dataplane::{read_limited, user_of, ANONYMOUS};
use crate::{ApiError, AppState};

pub const PROTOCOL: &str = "ag-ui";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunAgentInput {
    thread_id: String,
    run_id: String,
    messages: Vec<Value>,
    #[serde(default)]
    tools: Vec<Tool>,
    #[serde(default)]
    context: Vec<ContextItem>,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    forwarded_props: Option<Value>,
    #[serde(default)]
    parent_run_id: Option<String>,
}

#[derive(Deserialize)]
struct Tool {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct ContextItem {
    description: String,
    value: String,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A user message's content as Responses input parts.
fn user_content(content: &Value) -> Result<Value, ApiError> {
    let Value::Array(parts) = content else {
        return Ok(Value::String(text_of(content)));
    };
    let mut out = vec![];
    for p in parts {
        match p["type"].as_str() {
            Some("text") => out.push(json!({"type": "input_text", "text": p["text"]})),
            Some("image") => {
                let src = &p["source"];
                let url = match src["type"].as_str() {
                    Some("url") => src["value"].as_str().unwrap_or_default().to_owned(),
                    Some("data") => format!(
                        "data:{};base64,{}",
                        src["mimeType"].as_str().unwrap_or("image/png"),
                        src["value"].as_str().unwrap_or_default()
                    ),
                    _ => return Err(bad("an image part needs a source of type url or data")),
                };
                out.push(json!({"type": "input_image", "image_url": url, "detail": "auto"}));
            }
            Some(other) => {
                return Err(bad(format!(
                    "user content parts of type {other:?} are not supported (text and image are)"
                )))
            }
            None => return Err(bad("a content part has no type")),
        }
    }
    Ok(Value::Array(out))
}

/// AG-UI messages as Responses input items.
fn input_items(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut items = vec![];
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .ok_or_else(|| bad(format!("messages[{i}] has no role")))?;
        match role {
            "user" => items.push(
                json!({"type": "message", "role": "user", "content": user_content(&m["content"])?}),
            ),
            "system" | "developer" => items
                .push(json!({"type": "message", "role": role, "content": text_of(&m["content"])})),
            "assistant" => {
                let text = text_of(&m["content"]);
                if !text.is_empty() {
                    items.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}));
                }
                for c in m["toolCalls"].as_array().into_iter().flatten() {
                    items.push(json!({
                        "type": "function_call",
                        "call_id": c["id"],
                        "name": c["function"]["name"],
                        "arguments": c["function"]["arguments"].as_str().unwrap_or("{}"),
                    }));
                }
            }
            "tool" => {
                let call_id = m["toolCallId"].as_str().ok_or_else(|| {
                    bad(format!("messages[{i}] (a tool message) has no toolCallId"))
                })?;
                let mut output = text_of(&m["content"]);
                if let Some(e) = m["error"].as_str() {
                    output = format!("error: {e}");
                }
                items.push(
                    json!({"type": "function_call_output", "call_id": call_id, "output": output}),
                );
            }
            // Activity messages are the front end's own; reasoning is the agent's.
            "activity" | "reasoning" => {}
            other => return Err(bad(format!("messages[{i}] has an unknown role {other:?}"))),
        }
    }
    Ok(items)
}

/// One AG-UI event as an SSE frame.
fn frame(event: Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, &event).expect("a JSON value serialises");
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// `POST /agents/{name}/ag-ui`.
pub async fn run(
    State(st): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // Thread ids are the client's and often guessable (`default`, `main`): callers who share
    // the anonymous key would continue each other's threads. AG-UI needs an end user.
    let user = user_of(&parts.headers)?;
    if user == ANONYMOUS {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "AG-UI needs an end user: send {USER_HEADER} (authentication arrives with issue 6)"
            ),
        ));
    }
    let body = read_limited(body).await?;
    let input: RunAgentInput = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not a RunAgentInput: {e}")))?;
    if input.thread_id.is_empty() || input.run_id.is_empty() {
        return Err(bad("threadId and runId must not be empty"));
    }
    if input.thread_id.len() > 512 {
        return Err(bad("threadId is longer than 512 bytes"));
    }
    require_responses(&st, &name, "AG-UI").await?;
    // Every message is checked before anything is routed: bad input makes no session.
    if input_items(&input.messages)?.is_empty() && input.context.is_empty() {
        return Err(bad("messages holds nothing to run"));
    }
    // The thread's runs one at a time: each chains on the last.
    let guard = st
        .channels
        .turn_lock(format!("{name}\0{user}\0{}", input.thread_id))
        .await;
    let thread = st
        .agents
        .route_thread(&name, &user, PROTOCOL, &input.thread_id)
        .await?;

    // Only what the agent has not seen goes to it: the messages after the last one of the
    // thread's previous run. A history that no longer holds that message (the front end
    // rewrote it) is sent whole, as a new chain.
    let known = thread.last_message_id.as_deref().and_then(|last| {
        input
            .messages
            .iter()
            .position(|m| m["id"].as_str() == Some(last))
    });
    let (fresh, previous) = match (known, &thread.last_response_id) {
        (Some(i), Some(prev)) => (&input.messages[i + 1..], Some(prev.clone())),
        _ => (&input.messages[..], None),
    };
    let mut items = vec![];
    if !input.context.is_empty() {
        let lines: Vec<String> = input
            .context
            .iter()
            .map(|c| format!("- {}: {}", c.description, c.value))
            .collect();
        items.push(json!({"type": "message", "role": "developer", "content": format!("Context from the application:\n{}", lines.join("\n"))}));
    }
    items.extend(input_items(fresh)?);
    if items.is_empty() {
        return Err(bad(
            "messages holds nothing after the thread's last message: there is nothing to run",
        ));
    }
    let mut metadata = Map::new();
    metadata.insert("agui_thread_id".into(), json!(input.thread_id));
    metadata.insert("agui_run_id".into(), json!(input.run_id));
    // Metadata values are short strings (512 characters in OpenAI's API); what is longer
    // goes to the agent as a developer message instead.
    for (key, what, value) in [
        ("agui_state", "state", &input.state),
        (
            "agui_forwarded_props",
            "forwarded properties",
            &input.forwarded_props,
        ),
    ] {
        let Some(value) = value else { continue };
        let text = value.to_string();
        if text.chars().count() <= 512 {
            metadata.insert(key.into(), json!(text));
        } else {
            items.insert(
                0,
                json!({"type": "message", "role": "developer", "content": format!("The application's {what} (JSON): {text}")}),
            );
        }
    }
    let mut request = json!({"input": items, "stream": true, "metadata": metadata});
    if let Some(prev) = previous {
        request["previous_response_id"] = json!(prev);
    }
    if !input.tools.is_empty() {
        request["tools"] = input
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                })
            })
            .collect();
    }

    let session = thread.lease.session_id.clone();
    let session_header = HeaderValue::from_str(&session).expect("session ids are ASCII");
    let mut agent = call(&st, &name, &user, thread.lease, &request).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let (thread_id, run_id) = (input.thread_id, input.run_id);
    let mut started = json!({"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id});
    if let Some(p) = input.parent_run_id {
        started["parentRunId"] = json!(p);
    }
    let agents = st.agents.clone();
    let input_state = input.state.clone();
    let fallback_last = input
        .messages
        .last()
        .and_then(|m| m["id"].as_str())
        .map(str::to_owned);
    // In the request's span: the work it started is part of its trace.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        // The run goes on to its end even if the client leaves (within the turn's time
        // limits), so that the thread's chain stays whole for its next run.
        let _turn = guard;
        let mut pending_calls: Vec<String> = vec![];
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(b).await;
            }
        };
        send(frame(started)).await;
        let mut last_message: Option<String> = None;
        let mut text_message: Option<String> = None;
        while let Some(step) = agent.next().await {
            let ev = match step {
                Step::TextStart { id } => {
                    last_message = Some(id.clone());
                    text_message = Some(id.clone());
                    json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": "assistant"})
                }
                Step::TextDelta { id, delta } => {
                    json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": id, "delta": delta})
                }
                Step::TextEnd { id } => json!({"type": "TEXT_MESSAGE_END", "messageId": id}),
                Step::ToolStart { call_id, name } => {
                    // Calls hang off the run's assistant message (a front end appends them
                    // to it), or off a message of their own.
                    let parent = text_message
                        .clone()
                        .unwrap_or_else(|| format!("msg_{call_id}"));
                    last_message = Some(parent.clone());
                    pending_calls.push(call_id.clone());
                    json!({"type": "TOOL_CALL_START", "toolCallId": call_id, "toolCallName": name, "parentMessageId": parent})
                }
                Step::ToolArgs { call_id, delta } => {
                    json!({"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": delta})
                }
                Step::ToolEnd { call_id } => {
                    json!({"type": "TOOL_CALL_END", "toolCallId": call_id})
                }
                Step::Done { response } => {
                    // The agent's state, when it changed it (echoed metadata is not news).
                    if let Some(state) = response
                        .pointer("/metadata/agui_state")
                        .and_then(Value::as_str)
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        .filter(|s| Some(s) != input_state.as_ref())
                    {
                        send(frame(json!({"type": "STATE_SNAPSHOT", "snapshot": state}))).await;
                    }
                    let row = ThreadRow {
                        session_id: session.clone(),
                        last_response_id: response["id"].as_str().map(str::to_owned),
                        last_message_id: last_message.clone().or(fallback_last.clone()),
                    };
                    if let Err(e) = agents
                        .thread_turn(&name, &user, PROTOCOL, &thread_id, &row)
                        .await
                    {
                        tracing::warn!(error = %e, thread = %thread_id, "cannot record the AG-UI thread's turn");
                    }
                    let mut finished =
                        json!({"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id});
                    if !pending_calls.is_empty() {
                        // Frontend tools: the application answers them in the next run.
                        finished["outcome"] =
                            json!({"type": "success", "pendingToolCallIds": pending_calls});
                    }
                    finished
                }
                Step::Failed { message, code } => {
                    let mut e = json!({"type": "RUN_ERROR", "message": message});
                    if let Some(c) = code {
                        e["code"] = json!(c);
                    }
                    e
                }
            };
            send(frame(ev)).await;
        }
    }));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(HeaderName::from_static(SESSION_HEADER), session_header);
    Ok(resp)
}
