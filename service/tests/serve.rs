//! The real server in-process: `serve_listener` on a loopback port, talked to
//! over TCP; restarts on the same data dir; a store outage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::server::{RunningServer, call, cli_token, config};
use parley_test_support::proxy::{TcpProxy, host_port};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[tokio::test]
async fn serves_health_and_metrics_by_route_template_and_backend_timings_then_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["--jwt-secret", "serve-test-secret"]);
    let token = cli_token(&config, "alice").await;
    let server = RunningServer::start(config).await;

    let (status, created) = call(
        reqwest::Method::POST,
        server.url("/api/chat/sessions"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["sessionId"].as_str().unwrap();
    let (status, _) = call(
        reqwest::Method::GET,
        server.url(&format!("/api/chat/sessions/{id}")),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        reqwest::Method::GET,
        server.url("/no/such/path"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        reqwest::Method::GET,
        server.url("/api/credits/balance"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let metrics = response.text().await.unwrap();
    let has = |needle: &str| {
        metrics.lines().any(|line| {
            line.starts_with("http_request_duration_seconds_count") && line.contains(needle)
        })
    };
    assert!(has(r#"route="/api/chat/sessions/{id}""#), "{metrics}");
    assert!(
        has(r#"method="POST",route="/api/chat/sessions",status="201""#),
        "{metrics}"
    );
    assert!(has(r#"route="unmatched",status="404""#), "{metrics}");
    // The store and the ledger are timed by operation, whichever backend runs.
    let timed = |histogram: &str, operation: &str| {
        let count = format!("{histogram}_count{{");
        let labels = format!(r#"operation="{operation}",outcome="ok""#);
        metrics
            .lines()
            .any(|line| line.starts_with(&count) && line.contains(&labels))
    };
    for operation in ["create", "get"] {
        assert!(
            timed("parley_store_operation_duration_seconds", operation),
            "store {operation} not timed:\n{metrics}"
        );
    }
    assert!(
        timed("parley_ledger_operation_duration_seconds", "balance"),
        "ledger balance not timed:\n{metrics}"
    );
    assert!(
        !metrics.contains(id),
        "a session id leaked into metric labels"
    );

    server.stop().await;
}

#[tokio::test]
async fn embedded_sessions_and_the_dev_secret_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Local mode: no secret configured, so a dev secret is generated in the data dir.
    let first = RunningServer::start(config(dir.path(), &[])).await;
    let token = cli_token(&config(dir.path(), &[]), "alice").await;
    let (status, created) = call(
        reqwest::Method::POST,
        first.url("/api/chat/sessions"),
        &token,
        Some(json!({"title": "keep me", "initialMessage": "still here?"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    first.stop().await;

    let second = RunningServer::start(config(dir.path(), &[])).await;
    let id = created["sessionId"].as_str().unwrap();
    let (status, fetched) = call(
        reqwest::Method::GET,
        second.url(&format!("/api/chat/sessions/{id}")),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{fetched}");
    let mut expected = created.clone();
    expected["observedBy"] = serde_json::json!([]);
    assert_eq!(fetched, expected);
    second.stop().await;
}

#[tokio::test]
async fn a_store_outage_answers_503_store_unavailable() {
    let real = parley_test_support::env::mongodb_uri();
    let proxy = TcpProxy::start(host_port(&real).unwrap().to_owned(), None)
        .await
        .unwrap();
    let database = parley_test_support::env::unique_name("parley-outage").replace('-', "_");
    let uri = format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=300&connectTimeoutMS=300",
        proxy.address()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[
            "--jwt-secret",
            "outage",
            "--mongodb-uri",
            &uri,
            "--mongodb-database",
            &database,
        ],
    );
    let token = cli_token(&config, "alice").await;
    let server = RunningServer::start(config).await;

    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let (status, created) = call(
        reqwest::Method::POST,
        server.url("/api/chat/sessions"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    proxy.stop().await;
    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["code"],
        "STORE_UNAVAILABLE"
    );
    let id = created["sessionId"].as_str().unwrap();
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/chat/sessions/{id}")),
        (reqwest::Method::GET, "/api/chat/sessions".to_owned()),
        (reqwest::Method::POST, "/api/chat/sessions".to_owned()),
        (reqwest::Method::DELETE, format!("/api/chat/sessions/{id}")),
    ] {
        let body = (method == reqwest::Method::POST).then(|| json!({}));
        let (status, error) = call(method.clone(), server.url(&path), &token, body).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {error}"
        );
        assert_eq!(error["code"], "STORE_UNAVAILABLE");
        assert!(
            !error["message"].as_str().unwrap().contains("127.0.0.1"),
            "internal detail leaked: {error}"
        );
    }
    server.stop().await;

    let cleanup = parley_service::store::MongoStore::connect(&real, &database)
        .await
        .unwrap();
    common::drop_mongo(cleanup).await;
}

/// The `paths` of the server's OpenAPI document.
async fn openapi_paths(server: &RunningServer) -> Value {
    let document: Value = reqwest::get(server.url("/api/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    document["paths"].clone()
}

/// A request to the dev sign-in endpoint with optional Host and Origin headers.
async fn dev_request(
    method: reqwest::Method,
    url: String,
    host: Option<&str>,
    origin: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut builder = reqwest::Client::new().request(method, url);
    if let Some(host) = host {
        builder = builder.header(reqwest::header::HOST, host);
    }
    if let Some(origin) = origin {
        builder = builder.header(reqwest::header::ORIGIN, origin);
    }
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    builder.send().await.unwrap()
}

#[tokio::test]
async fn dev_sign_in_mints_working_tokens_in_local_mode_for_loopback_requests_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(config(dir.path(), &[])).await;
    let url = server.url("/api/dev/token");

    let response = dev_request(reqwest::Method::GET, url.clone(), None, None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let offered: Value = response.json().await.unwrap();
    assert_eq!(
        offered,
        json!({"ttlSeconds": 86400, "roles": ["user", "supervisor", "admin"]})
    );

    let response = dev_request(
        reqwest::Method::POST,
        url.clone(),
        None,
        Some(&format!("http://{}", server.address)),
        Some(json!({"sub": "sam", "role": "supervisor", "cohorts": ["c1", " c2 "]})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let minted: Value = response.json().await.unwrap();
    assert_eq!(minted["sub"], "sam");
    assert_eq!(minted["role"], "supervisor");
    assert_eq!(minted["cohorts"], json!(["c1", "c2"]));
    let token = minted["token"].as_str().unwrap();
    let (status, balance) = call(
        reqwest::Method::GET,
        server.url("/api/credits/balance"),
        token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{balance}");
    assert_eq!(balance["userId"], "sam");

    // A page of another site whose name resolves to 127.0.0.1 (DNS
    // rebinding) names itself in Host and Origin: refused.
    let port = server.address.port();
    for (host, origin) in [
        (Some(format!("evil.example:{port}")), None),
        (None, Some("http://evil.example".to_owned())),
        (None, Some("null".to_owned())),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = dev_request(
                method.clone(),
                url.clone(),
                host.as_deref(),
                origin.as_deref(),
                Some(json!({"sub": "eve", "role": "admin"})),
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::FORBIDDEN,
                "{method} {host:?} {origin:?}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["code"], "FORBIDDEN");
            assert!(body.get("token").is_none());
        }
    }
    for (body, field) in [
        (json!({"sub": ""}), "sub"),
        (json!({"sub": "a\u{7}b"}), "sub"),
        (json!({"sub": "x".repeat(257)}), "sub"),
        (json!({"sub": "ann", "cohorts": [""]}), "cohorts"),
    ] {
        let response =
            dev_request(reqwest::Method::POST, url.clone(), None, None, Some(body)).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field);
    }
    let response = dev_request(
        reqwest::Method::POST,
        url.clone(),
        None,
        None,
        Some(json!({"sub": "ann", "role": "root"})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    assert!(openapi_paths(&server).await["/api/dev/token"]["post"].is_object());
    server.stop().await;
}

#[tokio::test]
async fn dev_sign_in_does_not_exist_with_a_configured_secret_or_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let configured = RunningServer::start(config(dir.path(), &["--jwt-secret", "s3cret"])).await;
    // Local mode on every interface: reachable from other machines.
    let other_dir = tempfile::tempdir().unwrap();
    let everywhere = RunningServer::start_on(
        TcpListener::bind("0.0.0.0:0").await.unwrap(),
        config(other_dir.path(), &[]),
    )
    .await;

    for server in [&configured, &everywhere] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = dev_request(
                method.clone(),
                server.url("/api/dev/token"),
                None,
                None,
                Some(json!({"sub": "eve", "role": "admin"})),
            )
            .await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["code"], "NOT_FOUND");
        }
        assert!(openapi_paths(server).await.get("/api/dev/token").is_none());
    }
    configured.stop().await;
    everywhere.stop().await;
}
