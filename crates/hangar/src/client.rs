//! A small HTTP/1.1 client for Hangar's API (the CLI's only way to reach the server).

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub struct Client {
    /// `host:port`
    authority: String,
    /// The API key sent with every request.
    key: Option<String>,
}

/// The API key the CLI uses: `HANGAR_API_KEY`, else the admin key `hangar serve` wrote in
/// its data directory (`HANGAR_DATA_DIR`, or the default one) on this machine.
pub(crate) fn api_key() -> Option<String> {
    if let Ok(k) = std::env::var("HANGAR_API_KEY") {
        return Some(k.trim().to_owned());
    }
    let dir = std::env::var_os("HANGAR_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(crate::default_data_dir);
    std::fs::read_to_string(dir.join("admin-key"))
        .ok()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
}

impl Client {
    pub fn new(url: &str) -> anyhow::Result<Client> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("HANGAR_URL must be an http:// URL, not {url:?}"))?;
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("HANGAR_URL must be http://HOST:PORT, not {url:?}");
        }
        Ok(Client {
            authority,
            key: api_key(),
        })
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> anyhow::Result<Response<Incoming>> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the Hangar server at http://{} (is `hangar serve` running?)",
                    self.authority
                )
            })?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(key) = &self.key {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                req = req.header("authorization", format!("Bearer {key}"));
            }
        }
        Ok(sender.send_request(req.body(body)?).await?)
    }

    /// Sends a request and returns the body of a successful answer; an error answer becomes
    /// an error carrying the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Bytes> {
        let (headers, body): (&[(&str, &str)], Body) = match body {
            Some(v) => (
                &[("content-type", "application/json")],
                full(serde_json::to_vec(&v)?),
            ),
            None => (&[], empty()),
        };
        let resp = self.send(method, path, headers, body).await?;
        check(resp).await
    }

    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).context("unreadable answer from the server")
    }
}

/// The body of a 2xx answer, or the server's error message.
pub async fn check(resp: Response<Incoming>) -> anyhow::Result<Bytes> {
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let msg = serde_json::from_slice::<hangar_proto::ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{msg} (HTTP {status})");
    }
    Ok(bytes)
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A query string of the pairs that have a value, each value percent-encoded.
pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| Some(format!("{k}={}", hangar_proto::encode_query(v.as_deref()?))))
        .collect::<Vec<_>>()
        .join("&")
}

/// `Authorization: Bearer <key>` for the requests the benches build themselves.
pub(crate) fn auth_header() -> String {
    api_key().map(|k| format!("Bearer {k}")).unwrap_or_default()
}
