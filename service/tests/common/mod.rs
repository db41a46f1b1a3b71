//! Helpers shared by the service's integration tests.
#![allow(dead_code, unused_macros, clippy::unwrap_used, clippy::expect_used)]

pub mod openapi;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use parley_service::accounting::{AccountingMetrics, LocalAccounting};
use parley_service::auth::dev::DevTokens;
use parley_service::auth::{AuthSettings, Authenticator, Principal, Role, mint_token};
use parley_service::embedded_db::DEFAULT_CACHE_BYTES;
use parley_service::ledger::{Credits, EmbeddedLedger, Ledger, LedgerSettings};
use parley_service::metrics::HttpMetrics;
use parley_service::model_routes::{ProviderRegistry, Routes};
use parley_service::policy::BlockRecorder;
use parley_service::providers::{Provider, SimulatedProvider, SimulatedSettings};
use parley_service::ratelimit::{LocalRateLimiter, RateLimitMetrics, RateLimits};
use parley_service::state::{Limits, Services};
use parley_service::store::{
    ApiKeyStore, BlockAudit, EmbeddedStore, MongoStore, ObservationAudit, SessionStore,
};
use parley_service::stream::{Replies, ReplySettings};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;

pub const SECRET: &[u8] = b"integration-test-secret";
pub const MAX_BODY_BYTES: usize = 16 * 1024;
pub const MAX_MESSAGE_CHARS: usize = 1000;
pub const MAX_SESSIONS_PER_USER: u64 = 50;

pub fn hs256_authenticator() -> Authenticator {
    Authenticator::new(AuthSettings {
        hs256_secret: Some(SECRET.to_vec()),
        jwks: None,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(5),
    })
    .unwrap()
}

/// Credits a new account starts with in test apps.
pub const INITIAL_CREDITS: Credits = Credits::from_micros(10_000_000);

pub const LEDGER_SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: INITIAL_CREDITS,
};

/// The API state on `store`, with the built-in ledger on its database and no
/// rate limits.
pub async fn state(store: &EmbeddedStore) -> Services {
    state_with(Arc::new(store.clone()), embedded_ledger(store).await)
}

/// The built-in ledger on the embedded store's database.
pub async fn embedded_ledger(store: &EmbeddedStore) -> Arc<dyn Ledger> {
    let ledger = EmbeddedLedger::new(Arc::clone(store.database()), LEDGER_SETTINGS)
        .await
        .unwrap();
    Arc::new(ledger)
}

/// A store of sessions, API keys and the audits, as both backends are.
pub trait TestStore: SessionStore + ObservationAudit + BlockAudit + ApiKeyStore + 'static {}

impl<S: SessionStore + ObservationAudit + BlockAudit + ApiKeyStore + 'static> TestStore for S {}

/// The API state on these stores, with no rate limits.
pub fn state_with<S: TestStore>(store: Arc<S>, ledger: Arc<dyn Ledger>) -> Services {
    let mut registry = Registry::default();
    let replies = builtin_replies(&mut registry);
    state_with_replies(store, ledger, registry, replies)
}

/// The built-in routes on an unpaced simulated model.
pub fn builtin_replies(registry: &mut Registry) -> Replies {
    let simulated = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: None,
        reply_tokens: None,
    });
    builtin_replies_on(simulated, registry)
}

/// The built-in routes, every target answered by `provider`.
pub fn builtin_replies_on(provider: impl Provider + 'static, registry: &mut Registry) -> Replies {
    Replies::new(
        Routes::builtin(),
        ProviderRegistry::new(Arc::new(provider), None, None),
        ReplySettings::new(),
        registry,
    )
}

/// The API state on these stores with the given replies, with no rate limits.
pub fn state_with_replies<S: TestStore>(
    store: Arc<S>,
    ledger: Arc<dyn Ledger>,
    mut registry: Registry,
    replies: Replies,
) -> Services {
    let http_metrics = HttpMetrics::register(&mut registry);
    let replies = Arc::new(replies);
    let accounting = LocalAccounting::new(
        ledger,
        Arc::clone(&replies.routes),
        Duration::from_secs(600),
        AccountingMetrics::register(&mut registry),
    );
    let limits = RateLimits {
        requests_per_minute: 0,
        tokens_per_minute: 0,
        concurrent_streams: 0,
    };
    let rate_limiter = LocalRateLimiter::new(limits, RateLimitMetrics::register(&mut registry));
    let keys: Arc<dyn ApiKeyStore> = Arc::clone(&store) as Arc<dyn ApiKeyStore>;
    let block_audit = Arc::clone(&store) as Arc<dyn BlockAudit>;
    Services {
        blocks: Arc::new(BlockRecorder::new(block_audit, &mut registry)),
        replies,
        sessions: Arc::clone(&store) as Arc<dyn SessionStore>,
        audit: store,
        keys: Arc::clone(&keys),
        accounting: Arc::new(accounting),
        rate_limiter: Arc::new(rate_limiter),
        auth: Arc::new(hs256_authenticator().with_api_keys(keys)),
        registry: Arc::new(registry),
        http_metrics,
        dev_tokens: None,
        limits: Limits {
            max_body_bytes: MAX_BODY_BYTES,
            max_message_chars: MAX_MESSAGE_CHARS,
            max_sessions_per_user: MAX_SESSIONS_PER_USER,
        },
    }
}

pub async fn embedded_store() -> (EmbeddedStore, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("parley.redb"), DEFAULT_CACHE_BYTES)
        .await
        .unwrap();
    (store, dir)
}

/// A MongoDB store on a database of its own; call `drop_mongo` at the end.
pub async fn mongo_store() -> MongoStore {
    let uri = parley_test_support::env::mongodb_uri();
    let database = parley_test_support::env::unique_name("parley-test").replace('-', "_");
    MongoStore::connect(&uri, &database).await.unwrap()
}

pub async fn drop_mongo(store: MongoStore) {
    store.database().drop().await.unwrap();
    store.database().client().clone().shutdown().await;
}

/// The API on an embedded store in a temporary directory.
pub struct TestApp {
    pub router: Router,
    pub store: EmbeddedStore,
    _dir: TempDir,
}

impl TestApp {
    pub async fn new() -> Self {
        let (store, dir) = embedded_store().await;
        let router = parley_service::app(state(&store).await);
        Self {
            router,
            store,
            _dir: dir,
        }
    }

    /// As `new`, with the local mode's dev sign-in (`/api/dev/token`) on.
    pub async fn with_dev_sign_in() -> Self {
        let (store, dir) = embedded_store().await;
        let mut state = state(&store).await;
        state.dev_tokens = Some(dev_tokens());
        Self {
            router: parley_service::app(state),
            store,
            _dir: dir,
        }
    }

    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        send(&self.router, request).await
    }
}

/// Dev sign-in minting with the test secret.
pub fn dev_tokens() -> Arc<DevTokens> {
    Arc::new(DevTokens::new(SECRET.to_vec(), None, None))
}

pub fn token(sub: &str, role: Role, cohorts: &[&str]) -> String {
    let principal = Principal {
        sub: sub.to_owned(),
        role,
        cohorts: cohorts.iter().map(|c| (*c).to_owned()).collect(),
    };
    mint_token(SECRET, &principal, Duration::from_secs(3600), None, None).unwrap()
}

pub fn request(method: &str, uri: &str, token: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

/// Status and JSON body (`Value::Null` when the body is not JSON).
pub async fn send(router: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Creates a session as `token`'s user and returns its id.
pub async fn create_session(router: &Router, token: &str, body: Value) -> String {
    let (status, json) = send(
        router,
        request("POST", "/api/chat/sessions", Some(token), Some(body)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    json["sessionId"].as_str().unwrap().to_owned()
}

/// Asserts a Retry-After header of 1 to 60 seconds: within one rate window.
pub fn assert_retry_within_a_window(headers: &axum::http::HeaderMap) {
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

/// Runs each `case(store)` against the embedded store and against the real
/// MongoDB-wire server: one conformance suite for every implementation of a
/// store trait. Use with `#[macro_use] mod common;`.
macro_rules! store_conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = crate::common::embedded_store().await;
                    crate::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod mongo {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = crate::common::mongo_store().await;
                    crate::$case(std::sync::Arc::new(store.clone())).await;
                    crate::common::drop_mongo(store).await;
                }
            )*
        }
    };
}
