//! Resource limits at the API: a body over the limit is 413 on every
//! operation that takes one (the operations come from the served document),
//! and a message over the configured length is 422 wherever a message is
//! written. (Header size, slow clients: tests/connections.rs; tokens:
//! tests/jwt.rs; sessions per user: tests/api.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::openapi::Document;
use common::{MAX_BODY_BYTES, MAX_MESSAGE_CHARS, TestApp, create_session, request, token};
use parley_service::auth::Role;
use serde_json::json;

#[tokio::test]
async fn a_body_over_the_limit_is_413_on_every_operation_that_takes_one() {
    let app = TestApp::new().await;
    let document = Document::served(&app.router).await;
    let alice = token("alice", Role::User, &["c1"]);
    let session = create_session(&app.router, &alice, json!({})).await;
    let oversized = json!({"message": "a".repeat(MAX_BODY_BYTES)}).to_string();
    let mut checked = 0;
    for operation in document.operations().into_iter().filter(|o| o.has_body()) {
        let uri = operation.path.replace("{id}", &session);
        let request = Request::builder()
            .method(operation.method.as_str())
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {alice}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(oversized.clone()))
            .unwrap();
        let (status, body) = common::send(&app.router, request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {body}");
        // The OpenAI-compatible API answers in OpenAI's shape, the code in lower case.
        let code = if uri.starts_with("/v1/") {
            body["error"]["code"].as_str().map(str::to_uppercase)
        } else {
            body["code"].as_str().map(str::to_owned)
        };
        assert_eq!(code.as_deref(), Some("PAYLOAD_TOO_LARGE"), "{uri}: {body}");
        checked += 1;
    }
    assert!(checked >= 9, "{checked} operations with a body");
}

#[tokio::test]
async fn a_message_over_the_configured_length_is_422_wherever_one_is_written() {
    let app = TestApp::new().await;
    let alice = token("alice", Role::User, &["c1"]);
    let session = create_session(&app.router, &alice, json!({})).await;
    let longest = "é".repeat(MAX_MESSAGE_CHARS);
    let too_long = format!("{longest}x");
    let cases = [
        ("/api/chat/sessions".to_owned(), "initialMessage"),
        (format!("/api/chat/sessions/{session}/messages"), "message"),
        (format!("/api/chat/sessions/{session}/stream"), "message"),
    ];
    for (uri, field) in cases {
        let (status, body) = app
            .send(request(
                "POST",
                &uri,
                Some(&alice),
                Some(json!({field: too_long})),
            ))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {body}");
        assert_eq!(body["field"], field, "{uri}");
    }
    // Exactly the limit (counted in characters, not bytes) is accepted.
    let (status, body) = app
        .send(request(
            "POST",
            &format!("/api/chat/sessions/{session}/messages"),
            Some(&alice),
            Some(json!({"message": longest})),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
