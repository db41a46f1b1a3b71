//! The web pages at `/`: the committed build of `web/` (`web/dist`),
//! compiled into the binary by `build.rs`, so the service needs no Node.js.
//!
//! `index.html` is served at every page path (the app routes on the client)
//! and revalidated on every load (`no-cache` with an ETag), so a new release
//! is picked up at once; everything under `/assets/` has a content hash in
//! its name and is cached for a year (`immutable`). Pages carry a strict
//! Content-Security-Policy: scripts and styles only from this origin (no
//! inline ones), nothing framed, and Trusted Types required, so no code of
//! the page can hand a string to an HTML sink such as `innerHTML`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::LazyLock;

use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// Every file of `web/dist` as (URL path, bytes).
static FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// Client-side routes of the app, each answered with `index.html`: the chat,
/// and the supervisor console's live replies, audit and credits.
pub const PAGE_PATHS: &[&str] = &["/", "/console", "/console/audit", "/console/credits"];

const INDEX: &str = "/index.html";

pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
     trusted-types 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

static INDEX_ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    let mut hasher = DefaultHasher::new();
    index_html().hash(&mut hasher);
    HeaderValue::from_str(&format!("\"{:016x}\"", hasher.finish()))
        .unwrap_or_else(|_| HeaderValue::from_static("\"index\""))
});

fn index_html() -> &'static [u8] {
    FILES
        .iter()
        .find(|(path, _)| *path == INDEX)
        .map_or(&[][..], |(_, bytes)| bytes)
}

/// The pages and their assets.
pub fn router() -> Router<AppState> {
    let mut router = Router::new();
    for &page in PAGE_PATHS {
        router = router.route(page, get(page_response));
    }
    for &(path, bytes) in FILES {
        if path == INDEX {
            continue;
        }
        let cache = if path.starts_with("/assets/") {
            IMMUTABLE
        } else {
            "no-cache"
        };
        let headers = [
            (CONTENT_TYPE, content_type(path)),
            (CACHE_CONTROL, cache),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ];
        router = router.route(path, get(move || async move { (headers, bytes) }));
    }
    router
}

async fn page_response(request_headers: HeaderMap) -> Response {
    let etag = INDEX_ETAG.clone();
    let fresh = request_headers
        .get(IF_NONE_MATCH)
        .is_some_and(|tags| tags.as_bytes() == etag.as_bytes());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            index_html(),
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(ETAG, etag);
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, extension)| extension) {
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
