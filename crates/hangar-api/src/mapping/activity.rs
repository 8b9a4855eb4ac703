//! The Bot Framework / Microsoft 365 Activity Protocol at `POST /agents/{name}/api/messages`.
//!
//! An agent that implements the protocol itself (`protocols: [activity]`) gets the activity
//! as it is, at its `/activity/messages`. Otherwise a `message` becomes one `/responses` turn:
//! the conversation is the session (per user: `from.aadObjectId`, else `from.id`), chained on
//! the conversation's last response. Other activity types are acknowledged.
//!
//! Replies: `deliveryMode: expectReplies` gets `200 {"activities": [...]}` when the turn is
//! done. Otherwise the answer is `202` at once, and the reply is POSTed to the channel's
//! connector (`{serviceUrl}/v3/conversations/{conversation}/activities/{id}`), preceded by a
//! `typing` activity as soon as the agent begins to answer.
//!
//! Inbound requests carry the channel's JWT (checked against the configured OpenID keys, and
//! its `serviceurl` claim against the activity's), or nothing where `anonymous: true`. The
//! bot's own token goes only to a `serviceUrl` a verified channel token vouched for.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use hangar_proto::agent::{ActivityChannel, Protocol, SESSION_HEADER};
use hangar_store::ThreadRow;

use super::{call, Step, Text};
use crate::dataplane::{forward, read_limited, Outbound};
use crate::idp::{IdentityProviders, Refused};
use crate::{ApiError, AppState};

pub const PROTOCOL: &str = "activity";

fn unauthorized(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("the request's channel token was refused: {why}"),
    )
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Checks the caller's credentials; `true` if a channel token vouched for the request and
/// for its `serviceUrl` (a matching `serviceurl` claim): only then may the bot's token go
/// there.
async fn authenticate(
    auth: &IdentityProviders,
    ch: &ActivityChannel,
    headers: &HeaderMap,
    activity: &Value,
) -> Result<Option<bool>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if ch.anonymous {
            return Ok(None);
        }
        return Err(unauthorized(
            "there is none (send the channel's JWT as `Authorization: Bearer …`)",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not ASCII"))?;
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => {
            return Err(unauthorized(
                "the Authorization header is not `Bearer <JWT>`",
            ))
        }
    };
    let channel_id = str_at(activity, "/channelId").unwrap_or_default();
    let claims = auth
        .verify(ch, token, channel_id)
        .await
        .map_err(|e| match e {
            Refused::Token(m) => unauthorized(m),
            Refused::Keys(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        })?;
    let claimed = claims
        .get("serviceurl")
        .or_else(|| claims.get("serviceUrl"))
        .and_then(Value::as_str);
    let Some(claimed) = claimed else {
        // Accepted, but nothing vouches for where replies go: they go without the bot's token.
        tracing::warn!(
            "a channel token without a serviceurl claim: replies are sent without the bot's token"
        );
        return Ok(Some(false));
    };
    let actual = str_at(activity, "/serviceUrl").unwrap_or_default();
    if claimed.trim_end_matches('/') != actual.trim_end_matches('/') {
        return Err(unauthorized(format!(
            "its serviceurl claim {claimed:?} is not the activity's serviceUrl {actual:?}"
        )));
    }
    Ok(Some(true))
}

/// Where replies may go: an https URL, or http to this machine (a local emulator); never with
/// credentials, a query or a fragment in it. A request no channel token vouched for may only
/// name this machine.
fn check_service_url(u: &str, authenticated: bool) -> Result<(), ApiError> {
    let url = url::Url::parse(u).map_err(|e| bad(format!("serviceUrl {u:?}: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("serviceUrl must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("serviceUrl must not have a query or a fragment"));
    }
    let local = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    };
    match (url.scheme(), local, authenticated) {
        (_, true, _) if matches!(url.scheme(), "http" | "https") => Ok(()),
        ("https", false, true) => Ok(()),
        ("https", false, false) => Err(bad(
            "an activity without a channel token may only name a serviceUrl on this machine (local testing)",
        )),
        _ => Err(bad(format!(
            "serviceUrl {u:?} must be https (http only to this machine)"
        ))),
    }
}

/// The end user an activity comes from. On Teams, the Entra object id (the same person
/// whichever client they use); elsewhere `from.id` is the channel's own, and a client may
/// choose it, so it is kept apart per channel.
fn user_of(activity: &Value) -> Result<String, ApiError> {
    let channel = str_at(activity, "/channelId").unwrap_or("unknown");
    let user = match str_at(activity, "/from/aadObjectId") {
        Some(oid) if channel == "msteams" => oid.to_owned(),
        _ => {
            let id =
                str_at(activity, "/from/id").ok_or_else(|| bad("the activity has no from.id"))?;
            format!("{channel}:{id}")
        }
    };
    if user.len() > 256 {
        return Err(bad("from.id is longer than 256 bytes"));
    }
    Ok(user)
}

/// `POST /agents/{name}/api/messages`.
pub async fn messages(
    State(st): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_limited(body).await?;
    let activity: Value = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !activity.is_object() {
        return Err(bad("the body must be an Activity (a JSON object)"));
    }
    let spec = st.agents.serving_spec(&name).await?;
    let ch = spec.channels.activity.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("agent {name:?} has no Activity Protocol channel (add channels.activity to its agent.yaml)"),
        )
    })?;
    let auth = authenticate(&st.idp, &ch, &parts.headers, &activity).await?;
    let vouched = auth == Some(true);

    let kind = str_at(&activity, "/type").ok_or_else(|| bad("the activity has no type"))?;
    let conversation = str_at(&activity, "/conversation/id")
        .ok_or_else(|| bad("the activity has no conversation.id"))?
        .to_owned();
    if conversation.len() > 512 {
        return Err(bad("conversation.id is longer than 512 bytes"));
    }
    let user = user_of(&activity)?;
    let expect_replies = str_at(&activity, "/deliveryMode") == Some("expectReplies");
    let service_url = str_at(&activity, "/serviceUrl").map(str::to_owned);
    if let Some(u) = &service_url {
        check_service_url(u, auth.is_some())?;
    }

    if spec.protocols.contains(&Protocol::Activity) {
        // The agent speaks the protocol itself: the activity goes to it as it came, without
        // the channel's token (checked here; in an untrusted sandbox it could be replayed).
        let thread = st
            .agents
            .route_thread(&name, &user, PROTOCOL, &conversation)
            .await?;
        let mut headers = parts.headers.clone();
        headers.remove(header::AUTHORIZATION);
        return forward(
            &st.pool,
            thread.lease,
            Method::POST,
            "/activity/messages",
            None,
            &headers,
            Outbound::Buffered(body),
            None,
        )
        .await;
    }
    if !spec.protocols.contains(&Protocol::Responses) {
        return Err(bad(format!(
            "agent {name:?} implements neither activity nor responses: the Activity Protocol cannot be mapped onto it"
        )));
    }

    let text = str_at(&activity, "/text").unwrap_or_default().to_owned();
    if kind == "invoke" {
        // An invoke wants an answer of its own (a card action, a task module): none here.
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "invoke activities are not mapped onto /responses",
        ));
    }
    if kind != "message" || text.trim().is_empty() {
        // conversationUpdate, typing, event, …: acknowledged; nothing for the agent.
        return Ok(acknowledge(expect_replies, vec![], None));
    }
    if !expect_replies && service_url.is_none() {
        return Err(bad(
            "the activity has no serviceUrl to reply to (or ask for deliveryMode: expectReplies)",
        ));
    }
    let mut request = json!({
        "input": [{"type": "message", "role": "user", "content": text}],
        "stream": true,
        "metadata": {
            "activity_channel_id": str_at(&activity, "/channelId").unwrap_or_default(),
            "activity_conversation_id": conversation,
        },
    });
    let mut turn = Turn {
        st: st.clone(),
        name,
        user,
        conversation,
        session: String::new(),
    };

    let lock_key = format!("{}\0{}\0{}", turn.name, turn.user, turn.conversation);
    if expect_replies {
        let _turn = st.channels.turn_lock(lock_key).await;
        let thread = turn.route(&mut request).await?;
        let session = turn.session.clone();
        let mut agent = call(&st, &turn.name, &turn.user, thread, &request).await?;
        let mut text = Text::default();
        let response = loop {
            let step = agent.next().await;
            if let Some(s) = &step {
                text.step(s);
            }
            match step {
                Some(Step::Done { response }) => break response,
                Some(Step::Failed { message, .. }) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "agent_failed",
                        format!("the agent did not answer: {message}"),
                    )
                    .with_source(hangar_agents::ErrorSource::Upstream))
                }
                Some(_) => {}
                None => unreachable!("a turn ends with Done or Failed"),
            }
        };
        let text = text.finish(&response);
        // Recorded even if the client has gone by now.
        tokio::spawn(async move { turn.record(&response).await });
        let replies = if text.is_empty() {
            vec![]
        } else {
            vec![reply(&activity, "message", Some(&text))]
        };
        return Ok(acknowledge(true, replies, Some(&session)));
    }

    // Asynchronous: acknowledged at once; the session is found (or made, or resumed) and the
    // reply goes to the connector when it is ready. A channel retrying an activity it already
    // sent is acknowledged again, and the turn runs once.
    if let Some(id) = str_at(&activity, "/id") {
        if st.channels.seen(format!("{lock_key}\0{id}")) {
            return Ok(acknowledge(false, vec![], None));
        }
    }
    let channel = Replies {
        idp: st.idp.clone(),
        agents: st.agents.clone(),
        agent: turn.name.clone(),
        ch,
        vouched,
        url: reply_url(service_url.as_deref().unwrap_or_default(), &activity),
    };
    let channels = st.channels.clone();
    // In the request's span: the work it started is part of its trace.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let _turn = channels.turn_lock(lock_key).await;
        let started = match turn.route(&mut request).await {
            Ok(lease) => call(&turn.st, &turn.name, &turn.user, lease, &request).await,
            Err(e) => Err(e),
        };
        let mut agent = match started {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e.body.error.message, agent = %turn.name, "an activity's turn did not start");
                channel
                    .post(&reply(&activity, "message", Some(SORRY)))
                    .await;
                return;
            }
        };
        let mut typing = false;
        let mut text = Text::default();
        while let Some(step) = agent.next().await {
            text.step(&step);
            match step {
                Step::Done { response } => {
                    turn.record(&response).await;
                    let text = std::mem::take(&mut text).finish(&response);
                    if !text.is_empty() {
                        channel
                            .post(&reply(&activity, "message", Some(&text)))
                            .await;
                    }
                }
                Step::Failed { message, .. } => {
                    tracing::warn!(error = %message, agent = %turn.name, "the agent failed an activity's turn");
                    channel
                        .post(&reply(&activity, "message", Some(SORRY)))
                        .await;
                }
                _ if !typing => {
                    // The agent has begun: the user sees it typing while it streams.
                    typing = true;
                    channel.post(&reply(&activity, "typing", None)).await;
                }
                _ => {}
            }
        }
    }));
    Ok(acknowledge(false, vec![], None))
}

const SORRY: &str = "Sorry, something went wrong and I could not answer that.";

fn acknowledge(expect_replies: bool, replies: Vec<Value>, session: Option<&str>) -> Response {
    let mut resp = if expect_replies {
        let mut r = Response::new(Body::from(
            serde_json::to_vec(&json!({ "activities": replies })).expect("JSON serialises"),
        ));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    } else {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        r
    };
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(SESSION_HEADER), s);
    }
    resp
}

/// A reply to `activity`: addressed back to its sender, in its conversation and channel.
fn reply(activity: &Value, kind: &str, text: Option<&str>) -> Value {
    let mut r = json!({
        "type": kind,
        "from": activity["recipient"],
        "recipient": activity["from"],
        "conversation": activity["conversation"],
        "channelId": activity["channelId"],
        "serviceUrl": activity["serviceUrl"],
    });
    if let Some(id) = activity.get("id").filter(|v| v.is_string()) {
        r["replyToId"] = id.clone();
    }
    if let Some(l) = activity.get("locale").filter(|v| v.is_string()) {
        r["locale"] = l.clone();
    }
    if let Some(t) = text {
        r["text"] = json!(t);
        r["textFormat"] = json!("markdown");
        r["inputHint"] = json!("acceptingInput");
    }
    r.as_object_mut()
        .expect("an object")
        .retain(|_, v| !v.is_null());
    r
}

fn reply_url(service_url: &str, activity: &Value) -> String {
    // As `encodeURIComponent`: RFC 3986's unreserved characters stay as they are.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string();
    let base = service_url.trim_end_matches('/');
    let conv = enc(str_at(activity, "/conversation/id").unwrap_or_default());
    match str_at(activity, "/id") {
        Some(id) => format!("{base}/v3/conversations/{conv}/activities/{}", enc(id)),
        None => format!("{base}/v3/conversations/{conv}/activities"),
    }
}

/// Where an activity's turn is recorded.
struct Turn {
    st: AppState,
    name: String,
    user: String,
    conversation: String,
    session: String,
}

impl Turn {
    /// The conversation's session, running; chains `request` on its last response.
    async fn route(&mut self, request: &mut Value) -> Result<hangar_agents::Lease, ApiError> {
        let thread = self
            .st
            .agents
            .route_thread(&self.name, &self.user, PROTOCOL, &self.conversation)
            .await?;
        if let Some(prev) = &thread.last_response_id {
            request["previous_response_id"] = json!(prev);
        }
        self.session = thread.lease.session_id.clone();
        Ok(thread.lease)
    }

    async fn record(&self, response: &Value) {
        let row = ThreadRow {
            session_id: self.session.clone(),
            last_response_id: response["id"].as_str().map(str::to_owned),
            last_message_id: None,
        };
        if let Err(e) = self
            .st
            .agents
            .thread_turn(&self.name, &self.user, PROTOCOL, &self.conversation, &row)
            .await
        {
            tracing::warn!(error = %e, "cannot record the conversation's turn");
        }
    }
}

/// Sends reply activities to the channel's connector.
struct Replies {
    idp: Arc<IdentityProviders>,
    agents: hangar_agents::Agents,
    agent: String,
    ch: ActivityChannel,
    /// A channel token vouched for the request (and its serviceUrl): only then does the
    /// bot's token go with the reply.
    vouched: bool,
    url: String,
}

impl Replies {
    async fn token(&self) -> Result<Option<String>, String> {
        let (true, Some(secret)) = (self.vouched, &self.ch.client_secret) else {
            return Ok(None);
        };
        let value = self
            .agents
            .secret_value(&self.agent, secret)
            .await
            .map_err(|e| e.to_string())?;
        let value =
            String::from_utf8(value).map_err(|_| format!("secret {secret:?} is not UTF-8"))?;
        self.idp
            .bot_token(&self.agent, &self.ch, &value)
            .await
            .map(Some)
    }

    async fn post(&self, activity: &Value) {
        let token = match self.token().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, agent = %self.agent, "no token for the reply; it is not sent");
                return;
            }
        };
        let mut req = self.idp.http().post(&self.url).json(activity);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(status = %r.status(), url = %self.url, "the connector refused a reply")
            }
            Err(e) => tracing::warn!(error = %e, url = %self.url, "cannot send a reply"),
        }
    }
}
