//! Agents' identities: Hangar is an OpenID Connect issuer, and each agent signs with a key of
//! its own.
//!
//! - A **session token** names an agent acting in one session: `sub` = `agent:{name}`, with the
//!   version, the session and its isolation key. Hangar hands it to the session's sandbox
//!   through a file that `hangar-init` keeps current (never through the environment), and
//!   renews it before it expires.
//! - An **on-behalf-of token** (RFC 8693 token exchange) names the session's user as `sub`
//!   and the agent as `act.sub`, for one audience (a tool, an MCP server). A sandbox gets one
//!   only for the user who owns its session, and only by presenting its own session token
//!   through its own egress link.
//!
//! Both are ES256 JWTs signed with the agent's key (P-256, made on first use, the private half
//! sealed under the node's secrets key); `/.well-known/jwks.json` lists every agent's public
//! key under its RFC 7638 thumbprint, so a tool verifies a token with any OIDC library.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use hangar_store::{SigningKeyRow, Store};

use crate::secrets::SecretKey;
use crate::{now_rfc3339, random_hex, AgentsError};

/// What `hangar serve` configures.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The `iss` of every token, and where `/.well-known/openid-configuration` is served.
    pub issuer: String,
    /// How long a session token lasts; it is renewed when a third of it is left.
    pub session_ttl: Duration,
}

impl IdentityConfig {
    pub fn new(issuer: impl Into<String>) -> IdentityConfig {
        IdentityConfig {
            issuer: issuer.into().trim_end_matches('/').to_owned(),
            session_ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// The `token_use` of a session token and of an on-behalf-of token: neither passes for the
/// other.
pub const SESSION_TOKEN: &str = "session";
pub const OBO_TOKEN: &str = "obo";
/// The JOSE `typ` of each: an on-behalf-of token is an OAuth access token (RFC 9068), a
/// session token is not, so a verifier that checks `typ` cannot take one for the other.
pub const SESSION_TYP: &str = "hangar-session+jwt";
pub const OBO_TYP: &str = "at+jwt";
/// The longest an on-behalf-of token lives, and its default.
pub const OBO_TTL_MAX: Duration = Duration::from_secs(60 * 60);
pub const OBO_TTL_DEFAULT: Duration = Duration::from_secs(5 * 60);
/// Where a sandbox exchanges its session token (through its egress proxy).
pub const TOKEN_ENDPOINT_IN_SANDBOX: &str = "http://hangar.internal/oauth2/token";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub token_use: String,
    pub agent: String,
    pub agent_version: i64,
    pub session_id: String,
    pub isolation_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    pub sub: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OboClaims {
    pub iss: String,
    /// The user: the session's isolation key.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub token_use: String,
    /// The agent acting for the user.
    pub act: Actor,
    pub session_id: String,
    pub agent_version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// One agent's signing key, opened.
struct AgentKey {
    kid: String,
    agent: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

pub struct Identity {
    store: Store,
    sealer: SecretKey,
    cfg: IdentityConfig,
    /// By agent and by kid.
    by_agent: StdMutex<HashMap<String, Arc<AgentKey>>>,
    by_kid: StdMutex<HashMap<String, Arc<AgentKey>>>,
    /// Serialises key creation.
    making: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("issuer", &self.cfg.issuer)
            .finish()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The sealed private key's name in the sealing's associated data: not a valid secret name,
/// so it can never be confused with one of the agent's secrets.
fn sealed_name(kid: &str) -> String {
    format!("signing-key:{kid}")
}

impl Identity {
    pub fn new(store: Store, sealer: SecretKey, cfg: IdentityConfig) -> Identity {
        // jsonwebtoken needs its crypto provider chosen once per process.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        Identity {
            store,
            sealer,
            cfg,
            by_agent: Default::default(),
            by_kid: Default::default(),
            making: Default::default(),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    pub fn session_ttl(&self) -> Duration {
        self.cfg.session_ttl
    }

    /// The OpenID Provider metadata (`/.well-known/openid-configuration`).
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.cfg.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", self.cfg.issuer),
            "token_endpoint": TOKEN_ENDPOINT_IN_SANDBOX,
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "token_endpoint_auth_methods_supported": ["none"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "subject_types_supported": ["public"],
            "response_types_supported": ["token"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act", "scope",
                "token_use", "session_id", "agent", "agent_version", "isolation_key"],
        })
    }

    /// Every agent's public key (`/.well-known/jwks.json`).
    pub async fn jwks(&self) -> Result<Value, AgentsError> {
        let keys: Vec<Value> = self
            .store
            .signing_keys()
            .await?
            .iter()
            .filter_map(|k| serde_json::from_str(&k.public_jwk).ok())
            .collect();
        Ok(json!({ "keys": keys }))
    }

    /// The agent's key, made on first use.
    async fn agent_key(&self, agent: &str) -> Result<Arc<AgentKey>, AgentsError> {
        if let Some(k) = self.by_agent.lock().unwrap().get(agent) {
            return Ok(k.clone());
        }
        let _making = self.making.lock().await;
        if let Some(k) = self.by_agent.lock().unwrap().get(agent) {
            return Ok(k.clone());
        }
        let row = match self.store.signing_key(agent).await? {
            Some(row) => row,
            None => {
                let made = self.make_key(agent)?;
                let row = self.store.put_signing_key_once(&made).await?;
                tracing::info!(agent, kid = %row.kid, "made the agent's signing key");
                row
            }
        };
        let key = Arc::new(self.open_key(&row)?);
        self.remember(key.clone());
        Ok(key)
    }

    fn remember(&self, key: Arc<AgentKey>) {
        self.by_kid
            .lock()
            .unwrap()
            .insert(key.kid.clone(), key.clone());
        self.by_agent.lock().unwrap().insert(key.agent.clone(), key);
    }

    /// Forgets an agent's key (the agent was deleted; the store drops the key with it).
    pub fn forget(&self, agent: &str) {
        if let Some(k) = self.by_agent.lock().unwrap().remove(agent) {
            self.by_kid.lock().unwrap().remove(&k.kid);
        }
    }

    async fn key_by_kid(&self, kid: &str) -> Result<Option<Arc<AgentKey>>, AgentsError> {
        if let Some(k) = self.by_kid.lock().unwrap().get(kid) {
            return Ok(Some(k.clone()));
        }
        let rows = self.store.signing_keys().await?;
        let Some(row) = rows.iter().find(|r| r.kid == kid) else {
            return Ok(None);
        };
        let key = Arc::new(self.open_key(row)?);
        self.remember(key.clone());
        Ok(Some(key))
    }

    fn make_key(&self, agent: &str) -> Result<SigningKeyRow, AgentsError> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::EncodePrivateKey;
        let secret = loop {
            let mut bytes = [0u8; 32];
            getrandom::getrandom(&mut bytes).expect("the OS random source works");
            // Out of range (zero or past the group order) once in 2^128 tries.
            if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
                break k;
            }
        };
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| AgentsError::Internal(format!("encoding a signing key: {e}")))?;
        let point = secret.public_key().to_encoded_point(false);
        let (x, y) = (
            B64URL.encode(point.x().expect("uncompressed point")),
            B64URL.encode(point.y().expect("uncompressed point")),
        );
        // RFC 7638: the members in lexicographic order, no whitespace.
        let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = B64URL.encode(Sha256::digest(thumbprint.as_bytes()));
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": kid, "use": "sig", "alg": "ES256",
        });
        Ok(SigningKeyRow {
            sealed: self.sealer.seal(agent, &sealed_name(&kid), der.as_bytes()),
            kid,
            agent: agent.to_owned(),
            public_jwk: jwk.to_string(),
            created_at: now_rfc3339(),
        })
    }

    fn open_key(&self, row: &SigningKeyRow) -> Result<AgentKey, AgentsError> {
        let der = self
            .sealer
            .open(&row.agent, &sealed_name(&row.kid), &row.sealed)
            .ok_or_else(|| {
                AgentsError::Internal(format!(
                    "the signing key of agent {:?} does not open with this server's key",
                    row.agent
                ))
            })?;
        let jwk: Value = serde_json::from_str(&row.public_jwk)
            .map_err(|e| AgentsError::Internal(format!("a stored JWK: {e}")))?;
        let decoding = DecodingKey::from_ec_components(
            jwk["x"].as_str().unwrap_or_default(),
            jwk["y"].as_str().unwrap_or_default(),
        )
        .map_err(|e| AgentsError::Internal(format!("a stored JWK: {e}")))?;
        Ok(AgentKey {
            kid: row.kid.clone(),
            agent: row.agent.clone(),
            encoding: EncodingKey::from_ec_der(&der),
            decoding,
        })
    }

    fn sign<T: Serialize>(
        &self,
        key: &AgentKey,
        typ: &str,
        claims: &T,
    ) -> Result<String, AgentsError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| AgentsError::Internal(format!("signing a token: {e}")))
    }

    /// A fresh session token and when it expires.
    pub async fn session_token(
        &self,
        agent: &str,
        version: i64,
        session: &str,
        isolation_key: &str,
    ) -> Result<(String, SystemTime), AgentsError> {
        let key = self.agent_key(agent).await?;
        let now = SystemTime::now();
        let exp = now + self.cfg.session_ttl;
        let claims = SessionClaims {
            iss: self.cfg.issuer.clone(),
            sub: format!("agent:{agent}"),
            aud: self.cfg.issuer.clone(),
            iat: unix(now),
            nbf: unix(now),
            exp: unix(exp),
            jti: random_hex(16),
            token_use: SESSION_TOKEN.into(),
            agent: agent.to_owned(),
            agent_version: version,
            session_id: session.to_owned(),
            isolation_key: isolation_key.to_owned(),
        };
        Ok((self.sign(&key, SESSION_TYP, &claims)?, exp))
    }

    /// Checks a session token: signed by its agent's key, issued here for here, in date, and
    /// a session token (not an on-behalf-of one). The error says why not.
    pub async fn verify_session_token(&self, token: &str) -> Result<SessionClaims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if header.alg != Algorithm::ES256 {
            return Err(format!("alg {:?} is not ES256", header.alg));
        }
        if header.typ.as_deref() != Some(SESSION_TYP) {
            return Err("not a session token (typ)".into());
        }
        let kid = header.kid.ok_or("the token names no key (kid)")?;
        let key = self
            .key_by_kid(&kid)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the token's key is not one of Hangar's")?;
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.issuer]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = 30;
        let claims = jsonwebtoken::decode::<SessionClaims>(token, &key.decoding, &v)
            .map_err(|e| e.to_string())?
            .claims;
        if claims.token_use != SESSION_TOKEN {
            return Err(format!(
                "a {:?} token is not a session token",
                claims.token_use
            ));
        }
        if claims.agent != key.agent || claims.sub != format!("agent:{}", key.agent) {
            return Err("the token's agent did not sign it".into());
        }
        Ok(claims)
    }

    /// An on-behalf-of token for the session's user, for `audience`, valid for `ttl`.
    pub async fn obo_token(
        &self,
        session: &SessionClaims,
        audience: &str,
        scope: Option<&str>,
        ttl: Duration,
    ) -> Result<String, AgentsError> {
        let key = self.agent_key(&session.agent).await?;
        let now = SystemTime::now();
        let claims = OboClaims {
            iss: self.cfg.issuer.clone(),
            sub: session.isolation_key.clone(),
            aud: audience.to_owned(),
            iat: unix(now),
            nbf: unix(now),
            exp: unix(now + ttl.min(OBO_TTL_MAX)),
            jti: random_hex(16),
            token_use: OBO_TOKEN.into(),
            act: Actor {
                sub: format!("agent:{}", session.agent),
            },
            session_id: session.session_id.clone(),
            agent_version: session.agent_version,
            scope: scope.map(str::to_owned),
        };
        self.sign(&key, OBO_TYP, &claims)
    }
}
