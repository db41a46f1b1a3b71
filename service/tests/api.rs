//! The chat session API through `app(state)`, on the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{MAX_BODY_BYTES, MAX_MESSAGE_CHARS, TestApp, create_session, request, token};
use parley_service::auth::Role;
use parley_service::store::{Message, MessageRole, ObjectId, SessionStore, TokenTotals};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn alice() -> String {
    token("alice", Role::User, &["c1"])
}

#[tokio::test]
async fn create_get_list_messages_delete() {
    let app = TestApp::new().await;
    let alice = alice();
    let (status, created) = app
        .send(request(
            "POST",
            "/api/chat/sessions",
            Some(&alice),
            Some(json!({"title": "Rust", "modelId": "fast", "initialMessage": "hi"})),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["sessionId"].as_str().unwrap();
    assert!(
        id.len() == 24 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(created["title"], "Rust");
    assert_eq!(created["route"], "fast");
    assert_eq!(created["modelId"], "fast");
    assert_eq!(created["userId"], "alice");
    assert_eq!(created["tokenTotals"], json!({"input": 0, "output": 0}));
    assert_eq!(created["messages"][0]["role"], "user");
    assert_eq!(created["messages"][0]["content"], "hi");
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));

    let (status, fetched) = app
        .send(request(
            "GET",
            &format!("/api/chat/sessions/{id}"),
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    // A session is read back as created, and nobody has observed it yet.
    let mut expected = created.clone();
    expected["observedBy"] = serde_json::json!([]);
    assert_eq!(fetched, expected);

    let (status, messages) = app
        .send(request(
            "GET",
            &format!("/api/chat/sessions/{id}/messages"),
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(messages["sessionId"], id);
    assert_eq!(messages["messages"], created["messages"]);

    let (status, listed) = app
        .send(request(
            "GET",
            "/api/chat/sessions?page=1&limit=10",
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        listed["pagination"],
        json!({"total": 1, "page": 1, "limit": 10, "pages": 1})
    );
    assert_eq!(listed["sessions"][0]["sessionId"], id);
    assert!(listed["sessions"][0].get("messages").is_none());

    let (status, deleted) = app
        .send(request(
            "DELETE",
            &format!("/api/chat/sessions/{id}"),
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted["sessionId"], id);
    let (status, gone) = app
        .send(request(
            "GET",
            &format!("/api/chat/sessions/{id}"),
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(gone["code"], "SESSION_NOT_FOUND");
}

#[tokio::test]
async fn rename_sets_a_valid_title_and_keeps_the_rest() {
    let app = TestApp::new().await;
    let alice = alice();
    let id = create_session(
        &app.router,
        &alice,
        json!({"title": "old", "initialMessage": "hi"}),
    )
    .await;
    let uri = format!("/api/chat/sessions/{id}");
    let (_, before) = app.send(request("GET", &uri, Some(&alice), None)).await;

    let (status, renamed) = app
        .send(request(
            "PATCH",
            &uri,
            Some(&alice),
            Some(json!({"title": "  Borrow checker \"tips\" 🦀  "})),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    assert_eq!(renamed["title"], "Borrow checker \"tips\" 🦀");
    assert!(renamed.get("messages").is_none());
    let (_, after) = app.send(request("GET", &uri, Some(&alice), None)).await;
    let mut expected = before.clone();
    expected["title"] = renamed["title"].clone();
    assert_eq!(
        after, expected,
        "only the title changes, updatedAt included"
    );

    for (body, status, code) in [
        (json!({"title": "   "}), 422, "VALIDATION_FAILED"),
        (json!({"title": "x".repeat(201)}), 422, "VALIDATION_FAILED"),
        (json!({}), 422, "INVALID_BODY"),
        (json!({"title": "t", "route": "fast"}), 422, "INVALID_BODY"),
    ] {
        let (got, error) = app
            .send(request("PATCH", &uri, Some(&alice), Some(body.clone())))
            .await;
        assert_eq!(got.as_u16(), status, "{body}: {error}");
        assert_eq!(error["code"], code, "{body}");
    }
    let (status, error) = app
        .send(request(
            "PATCH",
            "/api/chat/sessions/not-an-id",
            Some(&alice),
            Some(json!({"title": "t"})),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "INVALID_SESSION_ID");
    let (status, _) = app
        .send(request("PATCH", &uri, None, Some(json!({"title": "t"}))))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, unchanged) = app.send(request("GET", &uri, Some(&alice), None)).await;
    assert_eq!(unchanged, after);
}

#[tokio::test]
async fn defaults_and_pagination() {
    let app = TestApp::new().await;
    let alice = alice();
    let (status, created) = app
        .send(request(
            "POST",
            "/api/chat/sessions",
            Some(&alice),
            Some(json!({})),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["title"], "New Chat");
    assert_eq!(created["route"], "default");
    assert_eq!(created["messages"], json!([]));
    for n in 0..4 {
        create_session(&app.router, &alice, json!({"title": format!("t{n}")})).await;
    }
    let (_, page) = app
        .send(request(
            "GET",
            "/api/chat/sessions?limit=2&page=3",
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(
        page["pagination"],
        json!({"total": 5, "page": 3, "limit": 2, "pages": 3})
    );
    assert_eq!(page["sessions"].as_array().unwrap().len(), 1);
    let (_, default_page) = app
        .send(request("GET", "/api/chat/sessions", Some(&alice), None))
        .await;
    assert_eq!(default_page["pagination"]["limit"], 20);
    assert_eq!(default_page["sessions"].as_array().unwrap().len(), 5);
}

/// Every bad input gets its status and stable code, never a 5xx.
#[tokio::test]
async fn bad_input_answers_clear_errors() {
    let app = TestApp::new().await;
    let alice = alice();
    let id = create_session(&app.router, &alice, json!({})).await;
    let raw = |method: &str, uri: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {alice}"));
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        builder.body(Body::from(body)).unwrap()
    };
    let json_post = |body: &str| {
        raw(
            "POST",
            "/api/chat/sessions",
            Some("application/json"),
            body.as_bytes().to_vec(),
        )
    };
    let long_message = "x".repeat(MAX_MESSAGE_CHARS + 1);
    let long_title = "t".repeat(201);
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            json_post("{\"title\": "),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "empty body",
            json_post(""),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "wrong type",
            json_post("{\"title\": 5}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "not an object",
            json_post("[1,2]"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "unknown field",
            json_post("{\"titel\": \"x\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "blank title",
            json_post("{\"title\": \"  \"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "long title",
            json_post(&json!({"title": long_title}).to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "overlong message",
            json_post(&json!({"initialMessage": long_message}).to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "blank message",
            json_post("{\"initialMessage\": \"\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "bad route",
            json_post("{\"route\": \"a b\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "route and modelId disagree",
            json_post("{\"route\": \"a\", \"modelId\": \"b\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "oversized body",
            json_post(&format!(
                "{{\"title\": \"{}\"}}",
                "x".repeat(MAX_BODY_BYTES)
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "not JSON",
            raw(
                "POST",
                "/api/chat/sessions",
                Some("text/plain"),
                b"{}".to_vec(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "invalid UTF-8",
            raw(
                "POST",
                "/api/chat/sessions",
                Some("application/json"),
                vec![b'"', 0xff, 0xfe, b'"'],
            ),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "short id",
            raw("GET", "/api/chat/sessions/abc", None, vec![]),
            StatusCode::BAD_REQUEST,
            "INVALID_SESSION_ID",
        ),
        (
            "non-hex id",
            raw(
                "GET",
                "/api/chat/sessions/zzzzzzzzzzzzzzzzzzzzzzzz",
                None,
                vec![],
            ),
            StatusCode::BAD_REQUEST,
            "INVALID_SESSION_ID",
        ),
        (
            "injection id",
            raw(
                "DELETE",
                "/api/chat/sessions/%7B%22%24ne%22%3A1%7D",
                None,
                vec![],
            ),
            StatusCode::BAD_REQUEST,
            "INVALID_SESSION_ID",
        ),
        (
            "unknown id",
            raw(
                "GET",
                &format!("/api/chat/sessions/{}/messages", ObjectId::new()),
                None,
                vec![],
            ),
            StatusCode::NOT_FOUND,
            "SESSION_NOT_FOUND",
        ),
        (
            "page zero",
            raw("GET", "/api/chat/sessions?page=0", None, vec![]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "limit too big",
            raw("GET", "/api/chat/sessions?limit=101", None, vec![]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "limit not a number",
            raw("GET", "/api/chat/sessions?limit=ten", None, vec![]),
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
        ),
        (
            "unknown endpoint",
            raw("GET", "/api/nope", None, vec![]),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "wrong method",
            raw("PUT", &format!("/api/chat/sessions/{id}"), None, vec![]),
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (name, request, status, code) in cases {
        let (actual_status, body) = app.send(request).await;
        assert_eq!(
            (actual_status, body["code"].as_str()),
            (status, Some(code)),
            "{name}: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
    }
}

/// A path or method that does not exist is 404 or 405 whatever token comes
/// with it: the token is verified only for a route that exists (a forged
/// token made TRACE on the dev sign-in a 401, found by Schemathesis).
#[tokio::test]
async fn unknown_paths_and_methods_are_404_and_405_whatever_the_token() {
    let app = TestApp::with_dev_sign_in().await;
    let valid = format!("Bearer {}", alice());
    let tokens = [None, Some("Bearer x.y.z"), Some(valid.as_str())];
    let cases = [
        ("TRACE", "/api/dev/token", StatusCode::METHOD_NOT_ALLOWED),
        (
            "TRACE",
            "/api/chat/sessions",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "PUT",
            "/api/credits/balance",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        ("GET", "/api/nope", StatusCode::NOT_FOUND),
    ];
    for (method, uri, expected) in cases {
        for authorization in tokens {
            let mut builder = Request::builder().method(method).uri(uri);
            if let Some(value) = authorization {
                builder = builder.header(header::AUTHORIZATION, value);
            }
            let (status, body) = app.send(builder.body(Body::empty()).unwrap()).await;
            assert_eq!(
                status, expected,
                "{method} {uri} with {authorization:?}: {body}"
            );
        }
    }
}

#[tokio::test]
async fn missing_expired_and_forged_tokens_are_401() {
    let app = TestApp::new().await;
    let forged = parley_service::auth::mint_token(
        b"not-the-secret",
        &parley_service::auth::Principal {
            sub: "alice".into(),
            role: Role::Admin,
            cohorts: vec![],
        },
        std::time::Duration::from_secs(60),
        None,
        None,
    )
    .unwrap();
    let expired = expired_token();
    let cases = [
        (None, "MISSING_TOKEN"),
        (Some("Basic YWxpY2U6cHc=".to_owned()), "INVALID_TOKEN"),
        (Some("Bearer".to_owned()), "INVALID_TOKEN"),
        (Some("Bearer not.a.jwt".to_owned()), "INVALID_TOKEN"),
        (Some(format!("Bearer {forged}")), "INVALID_TOKEN"),
        (Some(format!("Bearer {expired}")), "INVALID_TOKEN"),
    ];
    for (authorization, code) in cases {
        let mut builder = Request::builder().uri("/api/chat/sessions");
        if let Some(value) = &authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let (status, body) = app.send(builder.body(Body::empty()).unwrap()).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{authorization:?}: {body}"
        );
        assert_eq!(body["code"], code, "{authorization:?}");
    }
}

/// A proxy that checks one of two Authorization headers would disagree with
/// a service that reads the other: both orders are refused.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let app = TestApp::new().await;
    let valid = format!("Bearer {}", alice());
    let forged = "Bearer not.a.jwt".to_owned();
    for pair in [
        [valid.clone(), forged.clone()],
        [forged, valid.clone()],
        [valid.clone(), valid],
    ] {
        let mut builder = Request::builder().uri("/api/chat/sessions");
        for value in &pair {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let (status, body) = app.send(builder.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["code"], "INVALID_TOKEN");
        assert_eq!(
            body["message"],
            "invalid bearer token: more than one Authorization header"
        );
    }
}

fn expired_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "alice", "role": "user", "exp": now - 3600, "iat": now - 7200});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(common::SECRET),
    )
    .unwrap()
}

/// The authorization rule, caller × endpoint, against a session of alice
/// (user in cohort c1). Denials look exactly like a missing session.
#[tokio::test]
async fn authorization_matrix() {
    let app = TestApp::new().await;
    let owner = alice();
    let callers = [
        ("owner", owner.clone()),
        ("user, same cohort", token("bob", Role::User, &["c1"])),
        ("user, other cohort", token("carol", Role::User, &["c2"])),
        (
            "supervisor of c1",
            token("sam", Role::Supervisor, &["c0", "c1"]),
        ),
        ("supervisor of c2", token("tom", Role::Supervisor, &["c2"])),
        ("admin", token("ada", Role::Admin, &[])),
    ];
    // Expected statuses: get, messages, listed-in-own-list, rename, delete.
    let expected = [
        ("owner", (200, 200, true, 200, 200)),
        ("user, same cohort", (404, 404, false, 404, 404)),
        ("user, other cohort", (404, 404, false, 404, 404)),
        ("supervisor of c1", (200, 200, false, 404, 404)),
        ("supervisor of c2", (404, 404, false, 404, 404)),
        ("admin", (200, 200, false, 404, 404)),
    ];
    let as_status = |code: u16| StatusCode::from_u16(code).unwrap();
    for ((name, caller), (expected_name, (get, messages, listed, rename, delete))) in
        callers.iter().zip(expected)
    {
        assert_eq!(*name, expected_name);
        let id = create_session(&app.router, &owner, json!({"initialMessage": "private"})).await;
        let uri = format!("/api/chat/sessions/{id}");
        let (status, body) = app.send(request("GET", &uri, Some(caller), None)).await;
        assert_eq!(status, as_status(get), "{name} GET: {body}");
        if status == StatusCode::NOT_FOUND {
            assert_eq!(body["code"], "SESSION_NOT_FOUND");
        }
        let (status, _) = app
            .send(request(
                "GET",
                &format!("{uri}/messages"),
                Some(caller),
                None,
            ))
            .await;
        assert_eq!(status, as_status(messages), "{name} messages");
        let (_, list) = app
            .send(request(
                "GET",
                "/api/chat/sessions?limit=100",
                Some(caller),
                None,
            ))
            .await;
        let in_list = list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["sessionId"] == id.as_str());
        assert_eq!(in_list, listed, "{name} list");
        let (status, _) = app
            .send(request(
                "PATCH",
                &uri,
                Some(caller),
                Some(json!({"title": name})),
            ))
            .await;
        assert_eq!(status, as_status(rename), "{name} PATCH");
        let (_, seen) = app.send(request("GET", &uri, Some(&owner), None)).await;
        assert_eq!(seen["title"] == *name, rename == 200, "{name} PATCH effect");
        let (status, _) = app.send(request("DELETE", &uri, Some(caller), None)).await;
        assert_eq!(status, as_status(delete), "{name} DELETE");
        let still_there =
            app.send(request("GET", &uri, Some(&owner), None)).await.0 == StatusCode::OK;
        assert_eq!(still_there, delete != 200, "{name} DELETE effect");
    }
}

#[tokio::test]
async fn appends_show_in_session_and_list() {
    let app = TestApp::new().await;
    let alice = alice();
    let id = create_session(&app.router, &alice, json!({"title": "x"})).await;
    let oid = ObjectId::parse_str(&id).unwrap();
    let reply = Message::new(MessageRole::Assistant, "hello \"there\"\n🦀");
    app.store
        .append_messages(
            oid,
            "alice",
            &[reply],
            TokenTotals {
                input: 7,
                output: 9,
            },
        )
        .await
        .unwrap();
    let (_, session) = app
        .send(request(
            "GET",
            &format!("/api/chat/sessions/{id}"),
            Some(&alice),
            None,
        ))
        .await;
    assert_eq!(session["tokenTotals"], json!({"input": 7, "output": 9}));
    assert_eq!(session["messageCount"], 1);
    assert_eq!(session["messages"][0]["content"], "hello \"there\"\n🦀");
    assert_eq!(session["messages"][0]["role"], "assistant");
}

#[tokio::test]
async fn openapi_document_lists_every_endpoint() {
    let app = TestApp::new().await;
    let (status, document) = app
        .send(request("GET", "/api/openapi.json", None, None))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let paths = &document["paths"];
    for (path, method) in [
        ("/api/chat/sessions", "post"),
        ("/api/chat/sessions", "get"),
        ("/api/chat/sessions/{id}", "get"),
        ("/api/chat/sessions/{id}", "patch"),
        ("/api/chat/sessions/{id}", "delete"),
        ("/api/chat/sessions/{id}/messages", "get"),
        ("/api/chat/sessions/{id}/stream", "post"),
        ("/api/chat/sessions/{id}/stream", "get"),
        ("/api/chat/sessions/{id}/stream", "delete"),
        ("/api/credits/calculate", "post"),
        ("/api/credits/check", "post"),
        ("/api/streaming-sessions/initialize", "post"),
        ("/api/streaming-sessions/finalize", "post"),
        ("/api/streaming-sessions/abort", "post"),
        ("/api/credits/balance", "get"),
        ("/api/credits/usage", "get"),
        ("/api/admin/credits/grant", "post"),
        ("/api/keys", "post"),
        ("/api/keys", "get"),
        ("/api/keys/{id}", "delete"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    assert!(document["components"]["schemas"]["CreateSessionRequest"].is_object());
    let completions = &paths["/v1/chat/completions"]["post"];
    assert_eq!(
        completions["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ChatCompletionRequest"
    );
    assert!(completions["responses"]["200"]["content"]["text/event-stream"].is_object());
    let finalize = &paths["/api/streaming-sessions/finalize"]["post"];
    assert_eq!(
        finalize["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/FinalizeRequest"
    );
    assert_eq!(
        finalize["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/SettlementResponse"
    );
    let statuses: Vec<&str> = finalize["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        statuses,
        [
            "200", "400", "401", "403", "404", "408", "413", "415", "422", "429", "503"
        ]
    );
    assert!(document["components"]["schemas"]["SettlementResponse"].is_object());
    assert!(document["components"]["schemas"]["UsageView"].is_object());
    assert_eq!(
        paths["/api/credits/usage"]["get"]["parameters"][1]["name"],
        "page"
    );
}

#[tokio::test]
async fn health_ready_and_request_ids() {
    let app = TestApp::new().await;
    let (status, body) = app.send(request("GET", "/health", None, None)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.send(request("GET", "/ready", None, None)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));

    use tower::ServiceExt;
    let response = app
        .router
        .clone()
        .oneshot(request("GET", "/health", None, None))
        .await
        .unwrap();
    assert!(!response.headers()["x-request-id"].is_empty());
    let mut given = request("GET", "/nope", None, None);
    given
        .headers_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let response = app.router.clone().oneshot(given).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
}

/// Random bodies, content types, methods and ids at every endpoint: the
/// answer is never a server error (the store is up).
#[tokio::test]
async fn random_requests_never_get_a_server_error() {
    let app = TestApp::new().await;
    let alice = alice();
    let existing = create_session(&app.router, &alice, json!({"initialMessage": "seed"})).await;
    let mut rng = StdRng::seed_from_u64(0x5eed_0f9a_71e7);
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"];
    for round in 0..600 {
        let id = match rng.random_range(0..5) {
            0 => existing.clone(),
            1 => ObjectId::new().to_hex(),
            2 => random_text(&mut rng, 30),
            3 => "0".repeat(rng.random_range(0..40)),
            _ => format!("{}{}", existing, random_text(&mut rng, 3)),
        };
        let id = urlencode(&id);
        let path = match rng.random_range(0..6) {
            0 | 1 => "/api/chat/sessions".to_owned(),
            2 => format!("/api/chat/sessions/{id}"),
            3 => format!("/api/chat/sessions/{id}/messages"),
            4 => format!(
                "/api/chat/sessions?page={}&limit={}",
                urlencode(&random_text(&mut rng, 4)),
                rng.random_range(-5i64..200)
            ),
            _ => format!("/api/{}", urlencode(&random_text(&mut rng, 10))),
        };
        let method = methods[rng.random_range(0..methods.len())];
        let body: Vec<u8> = match rng.random_range(0..4) {
            0 => random_json(&mut rng, 0).to_string().into_bytes(),
            1 => create_like_body(&mut rng).to_string().into_bytes(),
            2 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            _ => {
                let text = create_like_body(&mut rng).to_string();
                let cut = rng.random_range(0..=text.len());
                text.as_bytes()[..cut].to_vec()
            }
        };
        let content_type = [
            "application/json",
            "text/plain",
            "application/json; charset=utf-8",
            "",
        ][rng.random_range(0..4)];
        let mut builder = Request::builder().method(method).uri(&path);
        if rng.random_range(0..10) > 0 {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {alice}"));
        }
        if !content_type.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let request = builder.body(Body::from(body.clone())).unwrap();
        let (status, response) = app.send(request).await;
        assert!(
            !status.is_server_error(),
            "round {round}: {method} {path} body {:?} answered {status}: {response}",
            String::from_utf8_lossy(&body)
        );
        if method != "HEAD" && status != StatusCode::OK && status != StatusCode::CREATED {
            assert!(
                response["code"].is_string(),
                "round {round}: {method} {path}: {response}"
            );
        }
    }
}

fn random_text(rng: &mut StdRng, max_len: usize) -> String {
    let pool = [
        'a', 'Z', '0', '9', ' ', '"', '\\', '\n', '/', '%', '?', '&', '{', '$', 'é', '🦀', '\u{0}',
    ];
    (0..rng.random_range(0..=max_len))
        .map(|_| pool[rng.random_range(0..pool.len())])
        .collect()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>()),
        4 => json!(random_text(rng, 40)),
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => create_like_body(rng),
    }
}

/// Objects that look like create requests: real field names with random values.
fn create_like_body(rng: &mut StdRng) -> Value {
    let fields = [
        "title",
        "route",
        "modelId",
        "initialMessage",
        "message",
        "$set",
        "",
    ];
    let mut object = serde_json::Map::new();
    for _ in 0..rng.random_range(0..4) {
        let field = fields[rng.random_range(0..fields.len())];
        let value = match rng.random_range(0..4) {
            0 => json!(random_text(rng, 20)),
            1 => json!("x".repeat(rng.random_range(0..2 * MAX_MESSAGE_CHARS))),
            2 => json!(rng.random::<i32>()),
            _ => Value::Null,
        };
        object.insert(field.to_owned(), value);
    }
    Value::Object(object)
}

/// A user keeps at most `MAX_SESSIONS_PER_USER` sessions; the next create is
/// 409 `TOO_MANY_SESSIONS` until one is deleted, and other users are not
/// affected.
#[tokio::test]
async fn sessions_per_user_are_limited() {
    let app = TestApp::new().await;
    let alice = alice();
    let mut ids = Vec::new();
    for _ in 0..common::MAX_SESSIONS_PER_USER {
        ids.push(create_session(&app.router, &alice, json!({})).await);
    }
    let create = || request("POST", "/api/chat/sessions", Some(&alice), Some(json!({})));
    let (status, body) = app.send(create()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "TOO_MANY_SESSIONS");
    let bob = token("bob", Role::User, &["c1"]);
    create_session(&app.router, &bob, json!({})).await;
    let uri = format!("/api/chat/sessions/{}", ids[0]);
    let (status, _) = app.send(request("DELETE", &uri, Some(&alice), None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.send(create()).await.0, StatusCode::CREATED);
}

/// The web pages: `index.html` at every page path with a strict CSP and no
/// caching, the hashed assets it names cached for good, with their types.
#[tokio::test]
async fn the_pages_and_their_assets_are_served_with_safe_headers() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let app = TestApp::new().await;
    let get = |uri: &str, if_none_match: Option<&str>| {
        let mut builder = Request::builder().uri(uri);
        if let Some(tag) = if_none_match {
            builder = builder.header(header::IF_NONE_MATCH, tag);
        }
        app.router
            .clone()
            .oneshot(builder.body(Body::empty()).unwrap())
    };

    let response = get("/", None).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // No inline script or style: everything comes from /assets/.
    assert!(!html.contains("<style"), "{html}");
    assert!(!html.contains(" style="), "{html}");
    let scripts: Vec<&str> = html.split("<script").skip(1).collect();
    assert_eq!(scripts.len(), 1, "{html}");
    assert!(scripts[0].contains("src=\"/assets/"), "{html}");

    let etag = headers["etag"].to_str().unwrap();
    let response = get("/", Some(etag)).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(response.headers()["etag"], etag);

    let assets: Vec<&str> = html
        .split("\"/assets/")
        .skip(1)
        .map(|rest| &rest[..rest.find('"').unwrap()])
        .collect();
    assert_eq!(assets.len(), 3, "script, stylesheet and icon: {html}");
    for asset in assets {
        let response = get(&format!("/assets/{asset}"), None).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        let expected = match asset.rsplit_once('.').unwrap().1 {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "svg" => "image/svg+xml",
            other => panic!("unexpected asset type {other}"),
        };
        assert_eq!(response.headers()["content-type"], expected, "{asset}");
        assert_eq!(
            response.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let name = asset.rsplit_once('.').unwrap().0;
        assert!(
            name.rsplit_once('-')
                .is_some_and(|(_, hash)| hash.len() == 8),
            "{asset} has a content hash in its name"
        );
    }

    // The console's pages are the same index.html (the app routes on the client).
    for page in ["/console", "/console/audit", "/console/credits"] {
        let response = get(page, Some(etag)).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{page}");
        assert!(
            response.headers().contains_key("content-security-policy"),
            "{page}"
        );
    }

    for missing in [
        "/assets/app-00000000.js",
        "/index.html",
        "/console/",
        "/console/nope",
    ] {
        let (status, body) = app.send(request("GET", missing, None, None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(body["code"], "NOT_FOUND");
    }
}
