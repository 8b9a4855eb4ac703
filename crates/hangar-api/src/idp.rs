//! Identity providers, both ways: JWTs checked against the keys a provider's OpenID
//! configuration names (OIDC end users, the Activity channel's tokens), and OAuth
//! client-credentials tokens fetched for Hangar's own calls (the bot's replies). Keys and tokens are cached; keys are fetched again when a token names
//! one not seen (at most every five minutes), tokens five minutes before they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use hangar_proto::agent::ActivityChannel;

/// Keys are trusted this long without asking again.
const KEYS_FOR: Duration = Duration::from_secs(24 * 3600);
/// An unknown key id refetches the keys at most this often.
const REFETCH_AFTER: Duration = Duration::from_secs(300);
/// Clock skew allowed on `exp` and `nbf` (the Bot Framework's own figure).
const LEEWAY_SECS: u64 = 300;
/// The largest document read from an identity provider.
const MAX_DOC: usize = 1024 * 1024;

struct Keys {
    set: JwkSet,
    /// Per key id, the channels its `endorsements` name (the Bot Framework's extension).
    endorsements: HashMap<String, Vec<String>>,
    fetched: Instant,
    /// The last fetch failed then: no new attempt before [`BACKOFF`] has passed.
    failed: Option<Instant>,
}

/// After a failed fetch of keys, how long before the next attempt.
const BACKOFF: Duration = Duration::from_secs(30);

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// The token is bad: 401.
    Token(String),
    /// The keys to check it cannot be had now: 503.
    Keys(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Token(m) | Refused::Keys(m) => f.write_str(m),
        }
    }
}

struct Token {
    value: String,
    refresh_at: Instant,
}

/// HTTP to identity providers and channels, and what it has learnt.
pub struct IdentityProviders {
    http: reqwest::Client,
    keys: Mutex<HashMap<String, Keys>>,
    /// By (agent, endpoint, app id, scope, a digest of the secret): one agent's token is never
    /// another's, even under the same app id.
    tokens: Mutex<HashMap<String, Token>>,
}

impl IdentityProviders {
    pub fn new() -> Result<IdentityProviders, String> {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hangar/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(IdentityProviders {
            http,
            keys: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let body = read_bounded(resp)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
    }

    async fn fetch_keys(&self, openid: &str) -> Result<Keys, String> {
        let meta = self.get_json(openid).await?;
        let jwks_uri = meta["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{openid} names no jwks_uri"))?;
        let set = self.get_json(jwks_uri).await?;
        // Keys the library cannot read (other key types, extra members it rejects) are
        // dropped one by one rather than failing the whole set.
        let keys: Vec<Value> = set["keys"].as_array().cloned().unwrap_or_default();
        let mut endorsements = HashMap::new();
        let mut usable = vec![];
        for k in keys {
            if serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone()).is_err() {
                continue;
            }
            if let (Some(kid), Some(e)) = (k["kid"].as_str(), k["endorsements"].as_array()) {
                endorsements.insert(
                    kid.to_owned(),
                    e.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                );
            }
            usable.push(k);
        }
        let set = serde_json::from_value(serde_json::json!({ "keys": usable }))
            .map_err(|e| format!("{jwks_uri}: {e}"))?;
        Ok(Keys {
            set,
            endorsements,
            fetched: Instant::now(),
            failed: None,
        })
    }

    /// The key `kid` of the channel's issuer, and the channels it is endorsed for. Keys
    /// are fetched again when old or when a token names an unknown one (at most every five
    /// minutes); a failed fetch is not retried for 30 s, and the keys held meanwhile, however
    /// old, still serve.
    async fn key(&self, openid: &str, kid: &str) -> Result<(DecodingKey, Vec<String>), Refused> {
        let mut cache = self.keys.lock().await;
        let want = match cache.get(openid) {
            None => true,
            Some(k) if k.failed.is_some_and(|t| t.elapsed() < BACKOFF) => false,
            Some(k) => {
                k.fetched.elapsed() >= KEYS_FOR
                    || (k.set.find(kid).is_none() && k.fetched.elapsed() >= REFETCH_AFTER)
            }
        };
        if want {
            match self.fetch_keys(openid).await {
                Ok(keys) => {
                    cache.insert(openid.to_owned(), keys);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch signing keys");
                    match cache.get_mut(openid) {
                        Some(k) => k.failed = Some(Instant::now()),
                        None => {
                            return Err(Refused::Keys(format!(
                                "the signing keys cannot be fetched: {e}"
                            )))
                        }
                    }
                }
            }
        }
        let Some(keys) = cache.get(openid) else {
            return Err(Refused::Keys(
                "the signing keys cannot be fetched now".into(),
            ));
        };
        let jwk = keys
            .set
            .find(kid)
            .ok_or_else(|| Refused::Token(format!("no signing key {kid:?} at {openid}")))?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| Refused::Token(format!("signing key {kid:?}: {e}")))?;
        Ok((key, keys.endorsements.get(kid).cloned().unwrap_or_default()))
    }

    /// Checks a channel's bearer token: RS256 by a key of the configured issuer, endorsed for
    /// `channel_id` where the key lists endorsements, `iss`, `aud` = the bot's app id,
    /// `exp`/`nbf` within five minutes. Returns its claims.
    pub async fn verify(
        &self,
        ch: &ActivityChannel,
        token: &str,
        channel_id: &str,
    ) -> Result<Value, Refused> {
        let (claims, endorsed) = self
            .verify_jwt(
                &ch.openid_metadata,
                &ch.issuer,
                &ch.app_id,
                &[Algorithm::RS256],
                token,
            )
            .await?;
        if !endorsed.is_empty() && !endorsed.iter().any(|c| c == channel_id) {
            return Err(Refused::Token(format!(
                "its signing key is not endorsed for channel {channel_id:?}"
            )));
        }
        Ok(claims)
    }

    /// Checks a JWT against the keys the OpenID configuration at `openid` names: one of
    /// `algs` (asymmetric only: `none` and HMAC, which would take a public key for a shared
    /// secret, are never accepted), the key named by `kid`, `iss`, `aud`, and `exp`/`nbf`
    /// within five minutes. Returns its claims and its key's endorsements.
    pub async fn verify_jwt(
        &self,
        openid: &str,
        issuer: &str,
        audience: &str,
        algs: &[Algorithm],
        token: &str,
    ) -> Result<(Value, Vec<String>), Refused> {
        let bad = |m: String| Refused::Token(m);
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| bad(format!("not a JWT: {e}")))?;
        if !algs.contains(&header.alg) {
            return Err(bad(format!(
                "tokens must be signed with {algs:?}, not {:?}",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| bad("the token names no key (kid)".into()))?;
        let (key, endorsed) = self.key(openid, &kid).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| bad(e.to_string()))?;
        Ok((data.claims, endorsed))
    }

    /// The bot's token for the connector (OAuth 2.0 client credentials), cached.
    pub async fn bot_token(
        &self,
        agent: &str,
        ch: &ActivityChannel,
        secret: &str,
    ) -> Result<String, String> {
        use sha2::Digest;
        let endpoint = ch.token_endpoint();
        let key = [
            agent,
            &endpoint,
            &ch.app_id,
            &ch.scope,
            &hex::encode(sha2::Sha256::digest(secret.as_bytes())),
        ]
        .join("\0");
        let mut cache = self.tokens.lock().await;
        if let Some(t) = cache.get(&key) {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let form = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
            enc(&ch.app_id),
            enc(secret),
            enc(&ch.scope)
        );
        let resp = self
            .http
            .post(&endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| format!("POST {endpoint}: {e}"))?;
        let status = resp.status();
        let bytes = read_bounded(resp)
            .await
            .map_err(|e| format!("POST {endpoint}: {e}"))?;
        let body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("POST {endpoint}: HTTP {status}, not JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "POST {endpoint}: HTTP {status}: {}",
                body["error_description"]
                    .as_str()
                    .or(body["error"].as_str())
                    .unwrap_or("no reason given")
            ));
        }
        let value = body["access_token"]
            .as_str()
            .ok_or_else(|| format!("POST {endpoint}: no access_token in the answer"))?
            .to_owned();
        let ttl = body["expires_in"].as_u64().unwrap_or(3600);
        cache.insert(
            key,
            Token {
                value: value.clone(),
                refresh_at: Instant::now() + Duration::from_secs(ttl.saturating_sub(300)),
            },
        );
        Ok(value)
    }
}

/// An answer's body, at most [`MAX_DOC`] bytes.
async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DOC {
            return Err(format!("larger than {MAX_DOC} bytes"));
        }
    }
    Ok(body)
}
