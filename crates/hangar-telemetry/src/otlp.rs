//! OTLP/HTTP for traces: reading what clients post (protobuf or JSON, maybe gzipped) and
//! forwarding batches to a collector.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::mpsc;

use crate::Counters;

pub const PROTOBUF: &str = "application/x-protobuf";
pub const JSON: &str = "application/json";

/// How a request was encoded; the answer uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Protobuf,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("Content-Type must be application/x-protobuf or application/json, not {0:?}")]
    MediaType(String),
    #[error("Content-Encoding must be gzip or identity, not {0:?}")]
    Encoding(String),
    #[error("the body is over {0} bytes once decompressed")]
    TooLarge(usize),
    #[error("the gzip body does not decompress: {0}")]
    Gzip(std::io::Error),
    #[error("not an OTLP ExportTraceServiceRequest: {0}")]
    Invalid(String),
}

/// Reads an `ExportTraceServiceRequest`, the way the OTLP/HTTP spec says a server should:
/// by `Content-Type` (parameters ignored), gunzipping when `Content-Encoding: gzip`, and
/// never past `max` bytes of decompressed data.
pub fn decode(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: &[u8],
    max: usize,
) -> Result<(ExportTraceServiceRequest, Format), DecodeError> {
    let essence = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let format = match essence.as_str() {
        PROTOBUF => Format::Protobuf,
        JSON => Format::Json,
        _ => return Err(DecodeError::MediaType(essence)),
    };
    let inflated;
    let raw = match content_encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => body,
        Some(e) if e.is_empty() || e == "identity" => body,
        Some(e) if e == "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(DecodeError::Gzip)?;
            if out.len() > max {
                return Err(DecodeError::TooLarge(max));
            }
            inflated = out;
            &inflated[..]
        }
        Some(e) => return Err(DecodeError::Encoding(e)),
    };
    if raw.len() > max {
        return Err(DecodeError::TooLarge(max));
    }
    let request = match format {
        Format::Protobuf => ExportTraceServiceRequest::decode(raw)
            .map_err(|e| DecodeError::Invalid(e.to_string()))?,
        // An empty JSON body is an empty request.
        Format::Json if raw.iter().all(u8::is_ascii_whitespace) => Default::default(),
        Format::Json => {
            serde_json::from_slice(raw).map_err(|e| DecodeError::Invalid(e.to_string()))?
        }
    };
    Ok((request, format))
}

/// The success answer (`partial_success` unset) in the request's format.
pub fn success(format: Format) -> (&'static str, Vec<u8>) {
    match format {
        Format::Protobuf => (
            PROTOBUF,
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        Format::Json => (JSON, b"{}".to_vec()),
    }
}

/// A collector to forward traces to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The full URL of its traces endpoint (`…/v1/traces`).
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
}

impl Endpoint {
    /// The endpoint from `--otlp-endpoint` (a base URL, like `OTEL_EXPORTER_OTLP_ENDPOINT`)
    /// or the standard variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as it is,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` gets `/v1/traces`. Headers come from
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, compression from
    /// `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`. `None` when nothing names one.
    pub fn resolve(
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Endpoint>, String> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let url = match (flag, env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(base), _) => traces_url(base),
            (None, Some(exact)) => exact,
            (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) => traces_url(&base),
                None => return Ok(None),
            },
        };
        let parsed =
            url::Url::parse(&url).map_err(|e| format!("the OTLP endpoint {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("the OTLP endpoint {url:?} must be http(s)"));
        }
        let headers = env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|h| parse_headers(&h))
            .transpose()?
            .unwrap_or_default();
        let compression = env("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
            .or_else(|| env("OTEL_EXPORTER_OTLP_COMPRESSION"))
            .unwrap_or_default();
        let gzip = match compression.trim() {
            "" | "none" => false,
            "gzip" => true,
            other => {
                return Err(format!(
                    "OTLP compression must be gzip or none, not {other:?}"
                ))
            }
        };
        Ok(Some(Endpoint { url, headers, gzip }))
    }
}

fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

/// `k1=v1,k2=v2`, values percent-decoded (the OTLP exporter spec).
fn parse_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("OTLP header {pair:?} is not key=value"))?;
            let v = percent_encoding::percent_decode_str(v.trim())
                .decode_utf8()
                .map_err(|_| format!("OTLP header {k:?} is not UTF-8"))?;
            Ok((k.trim().to_owned(), v.into_owned()))
        })
        .collect()
}

const ATTEMPTS: u32 = 4;

/// Sends each batch to the collector, retrying what the spec calls retryable (429, 502,
/// 503, 504 and connection failures) with backoff, honouring `Retry-After`.
pub(crate) async fn forward(
    endpoint: Endpoint,
    mut rx: mpsc::Receiver<ExportTraceServiceRequest>,
    counters: Arc<Counters>,
) {
    // reqwest is built without a crypto provider of its own: ring, as everywhere in Hangar.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the OTLP client; traces are not forwarded");
            return;
        }
    };
    tracing::info!(endpoint = %endpoint.url, "forwarding traces over OTLP/HTTP");
    while let Some(request) = rx.recv().await {
        let mut body = request.encode_to_vec();
        if endpoint.gzip {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            if gz.write_all(&body).is_ok() {
                if let Ok(b) = gz.finish() {
                    body = b;
                }
            }
        }
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let mut req = client
                .post(&endpoint.url)
                .header(reqwest::header::CONTENT_TYPE, PROTOBUF)
                .body(body.clone());
            if endpoint.gzip {
                req = req.header(reqwest::header::CONTENT_ENCODING, "gzip");
            }
            for (k, v) in &endpoint.headers {
                req = req.header(k, v);
            }
            let (retry, wait, why) = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(30)));
                    (
                        matches!(status, 429 | 502 | 503 | 504),
                        after,
                        format!("status {status}"),
                    )
                }
                Err(e) => (true, None, e.to_string()),
            };
            if !retry || attempt == ATTEMPTS {
                counters.forward_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %endpoint.url, error = %why, attempt, "traces not forwarded");
                break;
            }
            tokio::time::sleep(wait.unwrap_or(backoff)).await;
            backoff *= 2;
        }
    }
}
