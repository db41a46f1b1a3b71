//! Who may call what: every operation of the served OpenAPI document, called
//! by each kind of caller about a session or account of alice (a user in
//! cohort c1), answers exactly the status of one table. An operation without
//! a row (a new endpoint) fails the test until its row is added; every answer
//! must also be documented, with a body its documented schema admits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::header::HOST;
use axum::http::{HeaderValue, StatusCode};
use common::openapi::Document;
use common::{
    create_session, dev_tokens, embedded_ledger, embedded_store, request, state_with_replies, token,
};
use http_body_util::BodyExt;
use parley_service::auth::Role;
use parley_service::providers::{SimulatedProvider, SimulatedSettings};
use parley_service::stream::Replies;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The callers, in the order of every row's statuses.
const CALLERS: [&str; 6] = [
    "no token",
    "owner",
    "other user",
    "supervisor of the owner's cohort",
    "supervisor of another cohort",
    "admin",
];

const OWNER: &str = "alice";

/// What a row's operation needs to exist before it is called.
#[derive(Clone, Copy)]
enum Setup {
    Nothing,
    /// A session of the owner (`{id}`).
    Session,
    /// A session of the owner with a reply in progress.
    ReplyInProgress,
    /// A hold of the owner's account (its id in the body's `sessionId`).
    Hold,
    /// An API key of the owner's (`{id}`).
    ApiKey,
}

/// What one call is about: the owner's session and a fresh hold id.
struct Target {
    session: String,
    hold: String,
    key: String,
}

struct Row {
    method: &'static str,
    path: &'static str,
    setup: Setup,
    call: fn(&Target) -> (String, Option<Value>),
    /// One status per caller of [`CALLERS`].
    expected: [u16; 6],
}

const fn row(
    method: &'static str,
    path: &'static str,
    setup: Setup,
    call: fn(&Target) -> (String, Option<Value>),
    expected: [u16; 6],
) -> Row {
    Row {
        method,
        path,
        setup,
        call,
        expected,
    }
}

/// THE table. Denied reads of a session look like a missing session (404,
/// so ids cannot be probed); denied accounts are 403. Dev sign-in is the
/// local mode's, on for this test.
const TABLE: &[Row] = &[
    row(
        "POST",
        "/api/chat/sessions",
        Setup::Nothing,
        |_| ("/api/chat/sessions".into(), Some(json!({"title": "mine"}))),
        [401, 201, 201, 201, 201, 201],
    ),
    row(
        "GET",
        "/api/chat/sessions",
        Setup::Nothing,
        |_| ("/api/chat/sessions".into(), None),
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/api/chat/sessions/{id}",
        Setup::Session,
        |t| (format!("/api/chat/sessions/{}", t.session), None),
        [401, 200, 404, 200, 404, 200],
    ),
    row(
        "PATCH",
        "/api/chat/sessions/{id}",
        Setup::Session,
        |t| {
            (
                format!("/api/chat/sessions/{}", t.session),
                Some(json!({"title": "renamed"})),
            )
        },
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "DELETE",
        "/api/chat/sessions/{id}",
        Setup::Session,
        |t| (format!("/api/chat/sessions/{}", t.session), None),
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "GET",
        "/api/chat/sessions/{id}/messages",
        Setup::Session,
        |t| (format!("/api/chat/sessions/{}/messages", t.session), None),
        [401, 200, 404, 200, 404, 200],
    ),
    row(
        "POST",
        "/api/chat/sessions/{id}/messages",
        Setup::Session,
        |t| {
            (
                format!("/api/chat/sessions/{}/messages", t.session),
                Some(json!({"message": "hi"})),
            )
        },
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "POST",
        "/api/chat/sessions/{id}/stream",
        Setup::Session,
        |t| {
            (
                format!("/api/chat/sessions/{}/stream", t.session),
                Some(json!({"message": "hi"})),
            )
        },
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "GET",
        "/api/chat/sessions/{id}/stream",
        Setup::ReplyInProgress,
        |t| (format!("/api/chat/sessions/{}/stream", t.session), None),
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "DELETE",
        "/api/chat/sessions/{id}/stream",
        Setup::ReplyInProgress,
        |t| (format!("/api/chat/sessions/{}/stream", t.session), None),
        [401, 200, 404, 404, 404, 404],
    ),
    row(
        "GET",
        "/api/chat/sessions/{id}/observe",
        Setup::ReplyInProgress,
        |t| (format!("/api/chat/sessions/{}/observe", t.session), None),
        [401, 404, 404, 200, 404, 200],
    ),
    row(
        "GET",
        "/api/observe/live",
        Setup::Nothing,
        |_| ("/api/observe/live".into(), None),
        [401, 403, 403, 200, 200, 200],
    ),
    row(
        "GET",
        "/api/observe/audit",
        Setup::Nothing,
        |_| ("/api/observe/audit".into(), None),
        [401, 403, 403, 200, 200, 200],
    ),
    row(
        "GET",
        "/api/models",
        Setup::Nothing,
        |_| ("/api/models".into(), None),
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "POST",
        "/api/models/recommend",
        Setup::Nothing,
        |_| {
            (
                "/api/models/recommend".into(),
                Some(json!({"task": "chat", "priority": "quality"})),
            )
        },
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/api/policy/blocks",
        Setup::Nothing,
        |_| ("/api/policy/blocks".into(), None),
        [401, 403, 403, 200, 200, 200],
    ),
    row(
        "POST",
        "/api/credits/calculate",
        Setup::Nothing,
        |_| {
            (
                "/api/credits/calculate".into(),
                Some(json!({"modelId": "default", "tokens": 10})),
            )
        },
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "POST",
        "/api/credits/check",
        Setup::Nothing,
        |_| {
            (
                "/api/credits/check".into(),
                Some(json!({"userId": OWNER, "requiredCredits": 1})),
            )
        },
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "GET",
        "/api/credits/balance",
        Setup::Nothing,
        |_| (format!("/api/credits/balance?userId={OWNER}"), None),
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "GET",
        "/api/credits/usage",
        Setup::Nothing,
        |_| (format!("/api/credits/usage?userId={OWNER}"), None),
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "POST",
        "/api/streaming-sessions/initialize",
        Setup::Nothing,
        |t| {
            (
                "/api/streaming-sessions/initialize".into(),
                Some(json!({
                    "sessionId": t.hold, "modelId": "default", "estimatedTokens": 10, "userId": OWNER,
                })),
            )
        },
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "POST",
        "/api/streaming-sessions/finalize",
        Setup::Hold,
        |t| {
            (
                "/api/streaming-sessions/finalize".into(),
                Some(json!({
                    "sessionId": t.hold, "actualTokens": 5, "success": true, "userId": OWNER,
                })),
            )
        },
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "POST",
        "/api/streaming-sessions/abort",
        Setup::Hold,
        |t| {
            (
                "/api/streaming-sessions/abort".into(),
                Some(json!({
                    "sessionId": t.hold, "tokensGenerated": 0, "userId": OWNER,
                })),
            )
        },
        [401, 200, 403, 403, 403, 200],
    ),
    row(
        "POST",
        "/api/admin/credits/grant",
        Setup::Nothing,
        |_| {
            (
                "/api/admin/credits/grant".into(),
                Some(json!({"userId": OWNER, "credits": 1})),
            )
        },
        [401, 403, 403, 403, 403, 200],
    ),
    row(
        "GET",
        "/api/dev/token",
        Setup::Nothing,
        |_| ("/api/dev/token".into(), None),
        [200, 200, 200, 200, 200, 200],
    ),
    row(
        "POST",
        "/api/dev/token",
        Setup::Nothing,
        |_| ("/api/dev/token".into(), Some(json!({"sub": "newcomer"}))),
        [200, 200, 200, 200, 200, 200],
    ),
    row(
        "POST",
        "/api/keys",
        Setup::Nothing,
        |_| ("/api/keys".into(), Some(json!({"name": "laptop"}))),
        [401, 201, 201, 201, 201, 201],
    ),
    row(
        "GET",
        "/api/keys",
        Setup::Nothing,
        |_| ("/api/keys".into(), None),
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "DELETE",
        "/api/keys/{id}",
        Setup::ApiKey,
        |t| (format!("/api/keys/{}", t.key), None),
        [401, 204, 404, 404, 404, 204],
    ),
    row(
        "GET",
        "/v1/models",
        Setup::Nothing,
        |_| ("/v1/models".into(), None),
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/v1/models/{model}",
        Setup::Nothing,
        |_| ("/v1/models/default".into(), None),
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "POST",
        "/v1/chat/completions",
        Setup::Nothing,
        |_| {
            (
                "/v1/chat/completions".into(),
                Some(json!({
                    "model": "default",
                    "messages": [{"role": "user", "content": "hi"}],
                })),
            )
        },
        [401, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/health",
        Setup::Nothing,
        |_| ("/health".into(), None),
        [200, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/ready",
        Setup::Nothing,
        |_| ("/ready".into(), None),
        [200, 200, 200, 200, 200, 200],
    ),
    row(
        "GET",
        "/metrics",
        Setup::Nothing,
        |_| ("/metrics".into(), None),
        [200, 200, 200, 200, 200, 200],
    ),
];

/// The callers' tokens, in [`CALLERS`] order.
fn caller_tokens() -> [Option<String>; 6] {
    [
        None,
        Some(token(OWNER, Role::User, &["c1"])),
        Some(token("bob", Role::User, &["c1"])),
        Some(token("sam", Role::Supervisor, &["c0", "c1"])),
        Some(token("tom", Role::Supervisor, &["c2"])),
        Some(token("ada", Role::Admin, &[])),
    ]
}

/// Replies of about two seconds, so that one is still in progress when
/// another caller asks to re-attach to it.
fn paced_replies(registry: &mut Registry) -> Replies {
    let simulated = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: NonZeroU32::new(20),
        reply_tokens: Some(40),
    });
    common::builtin_replies_on(simulated, registry)
}

/// Status and JSON body of one call; an event stream's body is not read
/// (it lasts as long as its reply).
async fn status_and_body(
    router: &Router,
    request: axum::http::Request<axum::body::Body>,
) -> (StatusCode, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|value| value == "text/event-stream");
    if is_stream {
        return (status, Value::Null);
    }
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn prepare(router: &Router, setup: Setup, owner: &str, hold: &str) -> Target {
    let session = match setup {
        Setup::Session | Setup::ReplyInProgress => {
            create_session(router, owner, json!({"initialMessage": "private"})).await
        }
        Setup::Nothing | Setup::Hold | Setup::ApiKey => String::new(),
    };
    match setup {
        Setup::Nothing | Setup::Session | Setup::ApiKey => {}
        Setup::ReplyInProgress => {
            let uri = format!("/api/chat/sessions/{session}/stream");
            let started = request("POST", &uri, Some(owner), Some(json!({"message": "go on"})));
            // The reply runs on its own; its stream is not read.
            let (status, _) = status_and_body(router, started).await;
            assert_eq!(status, StatusCode::OK);
        }
        Setup::Hold => {
            let body = json!({"sessionId": hold, "modelId": "default", "estimatedTokens": 10});
            let opened = request(
                "POST",
                "/api/streaming-sessions/initialize",
                Some(owner),
                Some(body),
            );
            let (status, answer) = status_and_body(router, opened).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        }
    }
    let key = if matches!(setup, Setup::ApiKey) {
        let created = request("POST", "/api/keys", Some(owner), Some(json!({"name": "k"})));
        let (status, answer) = status_and_body(router, created).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        answer["id"].as_str().unwrap().to_owned()
    } else {
        String::new()
    };
    Target {
        session,
        hold: hold.to_owned(),
        key,
    }
}

#[tokio::test]
async fn every_operation_answers_each_caller_as_the_table_says() {
    let (store, _dir) = embedded_store().await;
    let mut registry = Registry::default();
    let replies = paced_replies(&mut registry);
    let mut state = state_with_replies(
        Arc::new(store.clone()),
        embedded_ledger(&store).await,
        registry,
        replies,
    );
    // Every call gets a fresh session of the owner's: more than one user keeps.
    state.limits.max_sessions_per_user = 1_000;
    // The local mode's dev sign-in, so its operations are in the document too.
    state.dev_tokens = Some(dev_tokens());
    let router = parley_service::app(state);
    let document = Document::served(&router).await;

    let documented: BTreeSet<(String, String)> = document
        .operations()
        .into_iter()
        .map(|operation| (operation.method, operation.path))
        .collect();
    let tabled: BTreeSet<(String, String)> = TABLE
        .iter()
        .map(|row| (row.method.to_owned(), row.path.to_owned()))
        .collect();
    let without_row: Vec<_> = documented.difference(&tabled).collect();
    let without_operation: Vec<_> = tabled.difference(&documented).collect();
    assert!(
        without_row.is_empty() && without_operation.is_empty(),
        "operations without a row in TABLE: {without_row:?}; rows of no operation: {without_operation:?}"
    );

    let tokens = caller_tokens();
    let owner = tokens[1].clone().unwrap();
    // Enough credits for every reply and hold below (completions are
    // everyone's, on their own account).
    for user in [OWNER, "bob", "sam", "tom", "ada"] {
        let grant = json!({"userId": user, "credits": 10_000});
        let granted = request(
            "POST",
            "/api/admin/credits/grant",
            tokens[5].as_deref(),
            Some(grant),
        );
        assert_eq!(status_and_body(&router, granted).await.0, StatusCode::OK);
    }
    let holds = AtomicUsize::new(0);
    let mut failures = Vec::new();
    for row in TABLE {
        let operation = document.operation(row.method, row.path);
        for ((caller, token), expected) in CALLERS.iter().zip(&tokens).zip(row.expected) {
            let hold = format!("hold-{}", holds.fetch_add(1, Ordering::Relaxed));
            let target = prepare(&router, row.setup, &owner, &hold).await;
            let (uri, body) = (row.call)(&target);
            let mut call = request(row.method, &uri, token.as_deref(), body);
            // As a browser on the machine would send it (dev sign-in checks it).
            call.headers_mut()
                .insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
            let (status, answer) = status_and_body(&router, call).await;
            let context = format!("{caller}: {} {uri}", row.method);
            if status.as_u16() != expected {
                failures.push(format!(
                    "{context}: expected {expected}, got {status}: {answer}"
                ));
            }
            document.assert_answer(&operation, status.as_u16(), &answer, &context);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
