//! Who is calling. Every request but `/healthz` carries an API key (`Authorization: Bearer
//! hk_…` or `x-api-key`), checked against the hashes in the store (held in memory). Keys have
//! a role — `admin` ⊃ `deployer` ⊃ `invoker` — and may have the `assert-user` permission:
//! only such a key may name the end user with `x-agent-user-id`. A key without it acts as
//! an end user of its own, `key:<id>`, on the data plane.
//!
//! The Activity endpoint also accepts the channel's own JWTs, which it checks itself
//! (`mapping::activity`); an API key there works as anywhere else.
//!
//! On first start, `hangar serve` makes an admin key and writes it to `<data-dir>/admin-key`
//! (0600), where the CLI on the same machine finds it.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::RwLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use hangar_proto::agent::USER_HEADER;
use hangar_store::{KeyRow, Store};

use crate::{ApiError, AppState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Invoker,
    Deployer,
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Invoker => "invoker",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "invoker" => Some(Role::Invoker),
            "deployer" => Some(Role::Deployer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller, for the handlers and the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `key:<id>` for an API key, `oidc:<user>` for an OIDC token.
    pub id: String,
    pub role: Role,
    pub assert_user: bool,
}

impl Caller {
    /// How the audit trail names the caller.
    pub fn actor(&self) -> String {
        self.id.clone()
    }
}

/// End users signed in with an OpenID Connect provider call the data plane with its JWTs.
#[derive(Debug, Clone)]
pub struct Oidc {
    /// The `iss` tokens must carry; its discovery document names the keys.
    pub issuer: String,
    /// The `aud` tokens must carry.
    pub audience: String,
    /// The claim that is the isolation key.
    pub user_claim: String,
}

impl Oidc {
    pub fn new(issuer: &str, audience: &str, user_claim: &str) -> Result<Oidc, String> {
        let local = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| {
                issuer
                    .strip_prefix(p)
                    .is_some_and(|r| r.is_empty() || r.starts_with([':', '/']))
            });
        if !(issuer.starts_with("https://") || local) {
            return Err(format!(
                "the OIDC issuer must be an https URL (http only to this machine), not {issuer:?}"
            ));
        }
        if audience.is_empty() {
            return Err("the OIDC audience must not be empty".into());
        }
        Ok(Oidc {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            user_claim: user_claim.to_owned(),
        })
    }

    fn discovery(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }
}

/// The signatures OIDC tokens may have: public-key ones only (`none`, and HMAC keyed with
/// what is a public key, are refused).
const ASYMMETRIC: [jsonwebtoken::Algorithm; 9] = {
    use jsonwebtoken::Algorithm::*;
    [
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ]
};

pub struct Keys {
    store: Store,
    /// Active keys by the hash of their secret.
    active: RwLock<HashMap<String, Caller>>,
    oidc: Option<Oidc>,
    /// OIDC tokens already verified, by their hash: the user and until when the answer
    /// holds (the token's `exp`, at most [`VERIFIED_FOR`] from the check, so that a key the
    /// provider withdraws stops working soon). An ES256 or RS256 check costs ~0.3 ms; a
    /// caller sends the same token with every request.
    verified: std::sync::Mutex<HashMap<[u8; 32], (String, std::time::Instant)>>,
}

/// How long a verified OIDC token is taken as verified without checking it again.
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// The most verified tokens remembered (the map is emptied when full).
const VERIFIED_MAX: usize = 10_000;

fn hash(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    hex::encode(b)
}

/// A new key as the API shows it once: the secret is never stored and never shown again.
#[derive(Debug, Serialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub row: KeyRow,
    pub key: String,
}

impl Keys {
    pub async fn open(store: Store, oidc: Option<Oidc>) -> Result<Keys, String> {
        let rows = store.keys().await.map_err(|e| e.to_string())?;
        let keys = Keys {
            store,
            active: RwLock::new(HashMap::new()),
            oidc,
            verified: Default::default(),
        };
        for r in rows.into_iter().filter(|r| r.revoked_at.is_none()) {
            keys.remember(&r);
        }
        Ok(keys)
    }

    fn remember(&self, r: &KeyRow) {
        if let Some(role) = Role::parse(&r.role) {
            self.active.write().unwrap().insert(
                r.hash.clone(),
                Caller {
                    id: format!("key:{}", r.id),
                    role,
                    assert_user: r.assert_user,
                },
            );
        }
    }

    pub fn check(&self, key: &str) -> Option<Caller> {
        self.active.read().unwrap().get(&hash(key)).cloned()
    }

    pub async fn create(
        &self,
        name: &str,
        role: Role,
        assert_user: bool,
    ) -> Result<NewKey, ApiError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "a key's name must be 1 to 128 printable characters",
            ));
        }
        let id = random_hex(6);
        let key = format!("hk_{id}_{}", random_hex(32));
        let row = KeyRow {
            id,
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            assert_user,
            hash: hash(&key),
            created_at: hangar_agents::now_rfc3339(),
            revoked_at: None,
        };
        self.store
            .put_key(&row)
            .await
            .map_err(hangar_agents::AgentsError::from)?;
        self.remember(&row);
        Ok(NewKey { row, key })
    }

    pub async fn list(&self) -> Result<Vec<KeyRow>, ApiError> {
        Ok(self
            .store
            .keys()
            .await
            .map_err(hangar_agents::AgentsError::from)?)
    }

    pub async fn revoke(&self, id: &str) -> Result<(), ApiError> {
        let revoked = self
            .store
            .revoke_key(id, &hangar_agents::now_rfc3339())
            .await
            .map_err(hangar_agents::AgentsError::from)?;
        if !revoked {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no active key {id:?}"),
            ));
        }
        let gone = format!("key:{id}");
        self.active.write().unwrap().retain(|_, c| c.id != gone);
        Ok(())
    }

    /// The admin key in `<data-dir>/admin-key`: kept if it is still an active admin key,
    /// else a new one is made and written there (mode 0600).
    pub async fn ensure_admin(&self, data_dir: &Path) -> Result<(), String> {
        let path = data_dir.join("admin-key");
        if let Ok(existing) = std::fs::read_to_string(&path) {
            if self
                .check(existing.trim())
                .is_some_and(|c| c.role == Role::Admin)
            {
                return Ok(());
            }
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let new = self
            .create("admin (made by hangar serve)", Role::Admin, true)
            .await
            .map_err(|e| e.body.error.message)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(format!("{}\n", new.key).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(key = %new.row.id, file = %path.display(), "made an admin API key");
        Ok(())
    }
}

/// The role a route needs.
fn needs(path: &str) -> Role {
    if path.starts_with("/v1/keys")
        || path.starts_with("/v1/audit")
        || (path.starts_with("/v1/agents/") && path.contains("/secrets"))
    {
        Role::Admin
    } else if path.starts_with("/agents/") {
        Role::Invoker
    } else {
        Role::Deployer
    }
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    let mut r = ApiError::new(status, code, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hangar\""),
        );
    }
    r
}

/// The API key a request carries, if it carries one.
fn presented(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && token.trim().starts_with("hk_"))
        .then(|| token.trim().to_owned())
}

/// A bearer token that is not an API key (a JWT).
fn bearer(req: &Request) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().starts_with("hk_"))
        .then(|| token.trim().to_owned())
}

/// The end user an OIDC token names, or the answer refusing it.
async fn oidc_user(st: &AppState, path: &str, token: String) -> Result<String, Response> {
    let oidc = st.keys.oidc.as_ref().expect("checked");
    if !path.starts_with("/agents/") {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "OIDC tokens are for the data plane (/agents/…); the control plane takes API keys"
                .into(),
        ));
    }
    let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
    let now = std::time::Instant::now();
    if let Some((user, until)) = st.keys.verified.lock().unwrap().get(&digest) {
        if *until > now {
            return Ok(user.clone());
        }
    }
    let claims = st
        .idp
        .verify_jwt(
            &oidc.discovery(),
            &oidc.issuer,
            &oidc.audience,
            &ASYMMETRIC,
            &token,
        )
        .await
        .map_err(|e| match e {
            crate::idp::Refused::Token(m) => refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("the token was refused: {m}"),
            ),
            crate::idp::Refused::Keys(m) => {
                refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
        })?
        .0;
    let user = claims
        .get(&oidc.user_claim)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("the token has no {:?} claim", oidc.user_claim),
            )
        })?;
    let left = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .and_then(|exp| {
            std::time::UNIX_EPOCH
                .checked_add(std::time::Duration::from_secs(exp))?
                .duration_since(std::time::SystemTime::now())
                .ok()
        })
        .unwrap_or_default();
    let mut verified = st.keys.verified.lock().unwrap();
    if verified.len() >= VERIFIED_MAX {
        verified.clear();
    }
    verified.insert(digest, (user.clone(), now + left.min(VERIFIED_FOR)));
    Ok(user)
}

/// The layer: authenticates, authorises by route, and fixes the end user of a key that may
/// not name one.
pub async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    // Health, Hangar's public keys (what a tool needs to check an agent's token), and the
    // dashboard's static shell (its data comes from the API, with the key).
    if path == "/healthz"
        || path.starts_with("/.well-known/")
        || path == "/ui"
        || path.starts_with("/ui/")
    {
        return next.run(req).await;
    }
    let channel = path.starts_with("/agents/") && path.ends_with("/api/messages");
    let caller = match presented(&req) {
        Some(key) => match st.keys.check(&key) {
            Some(c) => c,
            None => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the API key is not valid (unknown or revoked)".into(),
                )
            }
        },
        // The Activity endpoint checks the channel's own credentials.
        None if channel => return next.run(req).await,
        None if st.keys.oidc.is_some() && bearer(&req).is_some() => {
            let token = bearer(&req).expect("checked");
            match oidc_user(&st, &path, token).await {
                Ok(user) => {
                    if path.starts_with("/agents/") && req.headers().contains_key(USER_HEADER) {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            "forbidden",
                            format!("a signed-in user may not name another ({USER_HEADER})"),
                        );
                    }
                    // The token's user is the end user: nobody else's sessions.
                    let value = match HeaderValue::from_str(&user) {
                        Ok(v) if !user.is_empty() && user.len() <= 256 => v,
                        _ => {
                            return refuse(
                                StatusCode::UNAUTHORIZED,
                                "unauthorized",
                                "the token's user claim is not 1 to 256 ASCII characters".into(),
                            )
                        }
                    };
                    req.headers_mut()
                        .insert(HeaderName::from_static(USER_HEADER), value);
                    Caller {
                        id: format!("oidc:{user}"),
                        role: Role::Invoker,
                        assert_user: true,
                    }
                }
                Err(r) => return r,
            }
        }
        None => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required (Authorization: Bearer hk_…); on the server's machine the CLI finds <data-dir>/admin-key, elsewhere set HANGAR_API_KEY".into(),
            )
        }
    };
    let need = needs(&path);
    if caller.role < need {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} is a {} caller; this needs {}",
                caller.id,
                caller.role.as_str(),
                need.as_str()
            ),
        );
    }
    let user_header = HeaderName::from_static(USER_HEADER);
    if !caller.assert_user {
        if req.headers().contains_key(&user_header) {
            return refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} may not name the end user ({USER_HEADER}): it lacks the assert-user permission",
                    caller.id
                ),
            );
        }
        if need == Role::Invoker {
            // The key is its own end user.
            let me = HeaderValue::from_str(&caller.id).expect("hex");
            req.headers_mut().insert(user_header, me);
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    role: Role,
    #[serde(default)]
    assert_user: bool,
}

/// `POST /v1/keys`.
pub async fn create(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateKey = crate::sandboxes::parse_json(&body)?;
    let new = st.keys.create(&req.name, req.role, req.assert_user).await?;
    Ok((StatusCode::CREATED, axum::Json(new)).into_response())
}

/// `GET /v1/keys`.
pub async fn list(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(axum::Json(serde_json::json!({ "keys": st.keys.list().await? })).into_response())
}

/// `DELETE /v1/keys/{id}`.
pub async fn revoke(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    st.keys.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
