//! The dashboard at `/ui`: static assets compiled into the binary (`ui/` beside this
//! crate's sources), served without authentication — they hold no data; the page asks for an
//! API key and sends it with every call to the API.
//!
//! Plain files, no build step: the page is vanilla JavaScript modules and hand-drawn SVG.
//! Every answer forbids inline scripts and other origins (`Content-Security-Policy`), so
//! nothing an agent writes into a log line or a file name can run as script, and carries
//! `Cache-Control: no-cache` with an `ETag`, so a new binary's assets are picked up at once.
//! This module never reads the file system.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::Digest;

use crate::ApiError;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Scripts and styles from this origin only; data only from the API (same origin); no
/// frames, no plugins, no `<base>`.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ct:expr) => {
        Asset {
            path: $path,
            content_type: $ct,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.css", CSS),
    asset!("icon.svg", SVG),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("charts.js", JS),
    asset!("fleet.js", JS),
    asset!("agent.js", JS),
    asset!("session.js", JS),
    asset!("trace.js", JS),
];

/// Each asset's `ETag` (a hash of its bytes), in the order of [`ASSETS`].
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = sha2::Sha256::digest(a.bytes);
            HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..12])))
                .expect("hex is a valid header value")
        })
        .collect()
});

/// `/ui` → `/ui/`, `/ui/` → the shell, `/ui/{file}` → that file or 404.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|headers: HeaderMap| async move { serve("index.html", &headers) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, headers: HeaderMap| async move {
                serve(&path, &headers)
            }),
        )
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        let mut r = ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the dashboard has no file {path:?}"),
        )
        .into_response();
        secure(r.headers_mut());
        return r;
    };
    let (asset, etag) = (&ASSETS[i], &ETAGS[i]);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut r = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.bytes.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(h);
    r
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        router::<()>()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn header<'a>(r: &'a Response, name: &str) -> &'a str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn assets_have_their_types_and_headers() {
        for (path, ct) in [
            ("/ui/", HTML),
            ("/ui/app.js", JS),
            ("/ui/charts.js", JS),
            ("/ui/app.css", CSS),
            ("/ui/icon.svg", SVG),
        ] {
            let r = get(path, &[]).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&r, "content-type"), ct, "{path}");
            assert_eq!(header(&r, "cache-control"), "no-cache", "{path}");
            assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
            assert!(
                header(&r, "content-security-policy").starts_with("default-src 'self'"),
                "{path}"
            );
        }
        // The shell loads its code from files: no inline script for the policy to allow.
        let index = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        assert!(index.contains(r#"<script type="module" src="app.js">"#));
        assert_eq!(index.matches("<script").count(), 1);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_ui_redirects() {
        for path in [
            "/ui/nope.js",
            "/ui/../Cargo.toml",
            "/ui/app.js/x",
            "/ui/APP.JS",
        ] {
            let r = get(path, &[]).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        }
        let r = get("/ui", &[]).await;
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(header(&r, "location"), "/ui/");
    }

    #[tokio::test]
    async fn an_unchanged_asset_is_not_sent_again() {
        let r = get("/ui/app.js", &[]).await;
        let etag = header(&r, "etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
        let r = get("/ui/app.js", &[("if-none-match", &etag)]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        let r = get("/ui/app.js", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        // `import … from "./x.js"` in any asset must name an asset.
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let name = line
                    .rsplit_once("\"./")
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(n, _)| n)
                    .unwrap_or_else(|| panic!("{}: cannot read {line:?}", a.path));
                assert!(
                    ASSETS.iter().any(|b| b.path == name),
                    "{} imports {name}, which is not served",
                    a.path
                );
            }
        }
    }
}
