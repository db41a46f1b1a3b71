//! The real server in-process: `serve_listener` on a loopback port, talked to
//! over TCP; restarts on the same data dir; a store outage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::server::{RunningServer, call, cli_token, config};
use parley_test_support::proxy::{TcpProxy, host_port};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn serves_health_and_metrics_by_route_template_then_shuts_down() {
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
    assert_eq!(fetched, created);
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
