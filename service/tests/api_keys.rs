//! API keys through the HTTP API: made by a signed-in user (the secret shown
//! once, kept only as a hash), usable wherever a JWT is with the creator's
//! role and cohorts, listed without secrets, deleted by their owner or an
//! admin, and refused once deleted or expired.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::StatusCode;
use chrono::{Duration, Utc};
use common::{TestApp, create_session, request, token};
use parley_service::auth::keys::mint;
use parley_service::auth::{Principal, Role};
use parley_service::store::{ApiKeyStore, ObjectId};
use serde_json::{Value, json};

async fn create(app: &TestApp, bearer: &str, body: Value) -> (StatusCode, Value) {
    app.send(request("POST", "/api/keys", Some(bearer), Some(body)))
        .await
}

async fn new_key(app: &TestApp, bearer: &str, name: &str) -> (String, String) {
    let (status, body) = create(app, bearer, json!({ "name": name })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_key_is_shown_once_stored_as_a_hash_and_acts_as_its_creator() {
    let app = TestApp::new().await;
    let alice = token("alice", Role::User, &["c1"]);
    let (status, created) = create(
        &app,
        &alice,
        json!({ "name": " notebook ", "expiresAt": (Utc::now() + Duration::days(7)).to_rfc3339() }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with(&format!("pk_{id}_")), "{secret}");
    assert_eq!(created["name"], "notebook");
    assert_eq!(created["role"], "user");
    assert_eq!(created["cohorts"], json!(["c1"]));
    assert_eq!(created["expired"], false);

    // The store has the hash, not the secret.
    let stored = app
        .store
        .key(ObjectId::parse_str(id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let secret_hex = secret.rsplit('_').next().unwrap();
    assert_ne!(
        stored
            .secret_sha256
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        secret_hex
    );
    assert!(!format!("{stored:?}").contains(secret_hex));

    // Listed without the secret.
    let (status, listed) = app
        .send(request("GET", "/api/keys", Some(&alice), None))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["id"], id);
    assert!(listed["keys"][0].get("secret").is_none());
    assert!(!listed.to_string().contains(secret_hex));

    // The key is alice: what it creates is hers, what she has it lists.
    let session = create_session(&app.router, secret, json!({"title": "from a program"})).await;
    let (status, sessions) = app
        .send(request("GET", "/api/chat/sessions", Some(&alice), None))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sessions["sessions"][0]["sessionId"], session);
    let (status, listed) = app
        .send(request("GET", "/api/keys", Some(secret), None))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["keys"][0]["id"], id);

    // A key does not make keys.
    let (status, body) = create(&app, secret, json!({ "name": "child" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn a_key_carries_its_creators_role_and_cohorts() {
    let app = TestApp::new().await;
    let (_, supervisor_key) =
        new_key(&app, &token("sam", Role::Supervisor, &["c1"]), "console").await;
    let (_, user_key) = new_key(&app, &token("alice", Role::User, &["c1"]), "ci").await;
    let alices_session = create_session(&app.router, &user_key, json!({})).await;
    let path = format!("/api/chat/sessions/{alices_session}");

    let (status, _) = app
        .send(request(
            "GET",
            "/api/observe/audit",
            Some(&supervisor_key),
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .send(request("GET", "/api/observe/audit", Some(&user_key), None))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The supervisor of alice's cohort reads her session through the key.
    let (status, _) = app
        .send(request("GET", &path, Some(&supervisor_key), None))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn deleted_and_expired_keys_are_refused() {
    let app = TestApp::new().await;
    let alice = token("alice", Role::User, &[]);
    let (id, secret) = new_key(&app, &alice, "ci").await;
    let sessions = |bearer: &str| request("GET", "/api/chat/sessions", Some(bearer), None);
    assert_eq!(app.send(sessions(&secret)).await.0, StatusCode::OK);

    // Someone else cannot delete it (and learns nothing); its owner can.
    let delete =
        |bearer: &str, id: &str| request("DELETE", &format!("/api/keys/{id}"), Some(bearer), None);
    let (status, body) = app.send(delete(&token("bob", Role::User, &[]), &id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "API_KEY_NOT_FOUND");
    assert_eq!(
        app.send(delete(&alice, "not-an-id")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.send(delete(&alice, &id)).await.0,
        StatusCode::NO_CONTENT
    );
    let (status, body) = app.send(sessions(&secret)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "INVALID_TOKEN");
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    // A key's secret with one character changed is no key.
    let (_, other) = new_key(&app, &alice, "other").await;
    let mut forged = other.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    assert_eq!(
        app.send(sessions(&forged)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.send(sessions(&other)).await.0, StatusCode::OK);

    // Admins delete anyone's key.
    let (bobs_id, bobs_key) = new_key(&app, &token("bob", Role::User, &[]), "bob's").await;
    let admin = token("root", Role::Admin, &[]);
    assert_eq!(
        app.send(delete(&admin, &bobs_id)).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.send(sessions(&bobs_key)).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A key past its expiry: refused, and listed as expired.
    let alice_principal = Principal {
        sub: "alice".into(),
        role: Role::User,
        cohorts: Vec::new(),
    };
    let lapsed = mint(
        &alice_principal,
        "lapsed".into(),
        Some(Utc::now() - Duration::seconds(1)),
    );
    app.store.create_key(&lapsed.key).await.unwrap();
    let (status, body) = app.send(sessions(&lapsed.secret)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let (_, listed) = app
        .send(request("GET", "/api/keys", Some(&alice), None))
        .await;
    let expired: Vec<(&str, bool)> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| {
            (
                key["name"].as_str().unwrap(),
                key["expired"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(expired, [("lapsed", true), ("other", false)]);
}

#[tokio::test]
async fn key_requests_are_validated() {
    let app = TestApp::new().await;
    let alice = token("alice", Role::User, &[]);
    for (body, field) in [
        (json!({ "name": "" }), "name"),
        (json!({ "name": "x".repeat(101) }), "name"),
        // Over the bound as sent, under it once trimmed.
        (
            json!({ "name": format!("\u{85}{}", "x".repeat(100)) }),
            "name",
        ),
        (
            json!({ "name": "late", "expiresAt": (Utc::now() - Duration::minutes(1)).to_rfc3339() }),
            "expiresAt",
        ),
    ] {
        let (status, error) = create(&app, &alice, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert_eq!(error["field"], field);
    }
    let (status, _) = create(&app, &alice, json!({ "name": "x", "scope": "all" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.send(request("GET", "/api/keys", None, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
