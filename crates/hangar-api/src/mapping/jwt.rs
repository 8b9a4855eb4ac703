//! The Activity Protocol's credentials, both ways: the channel's JWTs checked against the
//! keys its OpenID configuration names (inbound), and the bot's client-credentials token for
//! replies (outbound). Keys and tokens are cached; keys are fetched again when a token names
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
    fetched: Instant,
}

struct Token {
    value: String,
    refresh_at: Instant,
}

/// HTTP to identity providers and channels, and what it has learnt.
pub struct ChannelAuth {
    http: reqwest::Client,
    keys: Mutex<HashMap<String, Keys>>,
    tokens: Mutex<HashMap<(String, String, String), Token>>,
}

impl ChannelAuth {
    pub fn new() -> Result<ChannelAuth, String> {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hangar/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ChannelAuth {
            http,
            keys: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let mut resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOC {
                return Err(format!("GET {url}: larger than {MAX_DOC} bytes"));
            }
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
    }

    async fn fetch_keys(&self, openid: &str) -> Result<JwkSet, String> {
        let meta = self.get_json(openid).await?;
        let jwks_uri = meta["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{openid} names no jwks_uri"))?;
        let set = self.get_json(jwks_uri).await?;
        // Keys the library cannot read (other key types, extra members it rejects) are
        // dropped one by one rather than failing the whole set.
        let keys: Vec<Value> = set["keys"].as_array().cloned().unwrap_or_default();
        let usable: Vec<Value> = keys
            .into_iter()
            .filter(|k| serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone()).is_ok())
            .collect();
        serde_json::from_value(serde_json::json!({ "keys": usable }))
            .map_err(|e| format!("{jwks_uri}: {e}"))
    }

    /// The key `kid` of the channel's issuer.
    async fn key(&self, openid: &str, kid: &str) -> Result<DecodingKey, String> {
        let mut cache = self.keys.lock().await;
        let fresh = cache.get(openid).is_some_and(|k| {
            k.fetched.elapsed() < KEYS_FOR
                && (k.set.find(kid).is_some() || k.fetched.elapsed() < REFETCH_AFTER)
        });
        if !fresh {
            let set = self.fetch_keys(openid).await?;
            cache.insert(
                openid.to_owned(),
                Keys {
                    set,
                    fetched: Instant::now(),
                },
            );
        }
        let jwk = cache[openid]
            .set
            .find(kid)
            .ok_or_else(|| format!("no signing key {kid:?} at {openid}"))?;
        DecodingKey::from_jwk(jwk).map_err(|e| format!("signing key {kid:?}: {e}"))
    }

    /// Checks a channel's bearer token: RS256 by a key of the configured issuer, `iss`,
    /// `aud` = the bot's app id, `exp`/`nbf` within five minutes. Returns its claims.
    pub async fn verify(&self, ch: &ActivityChannel, token: &str) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if header.alg != Algorithm::RS256 {
            return Err(format!("tokens must be RS256, not {:?}", header.alg));
        }
        let kid = header.kid.ok_or("the token names no key (kid)")?;
        let key = self.key(&ch.openid_metadata, &kid).await?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[ch.issuer.as_str()]);
        v.set_audience(&[ch.app_id.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| e.to_string())?;
        Ok(data.claims)
    }

    /// The bot's token for the connector (OAuth 2.0 client credentials), cached.
    pub async fn bot_token(&self, ch: &ActivityChannel, secret: &str) -> Result<String, String> {
        let endpoint = ch.token_endpoint();
        let key = (endpoint.clone(), ch.app_id.clone(), ch.scope.clone());
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
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("POST {endpoint}: HTTP {status}, {e}"))?;
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
