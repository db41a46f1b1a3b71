//! The real `parley-service` binary: starts on embedded defaults, answers,
//! keeps its data across a restart, and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley_e2e::{Process, logged_address};
use serde_json::{Value, json};

struct Service {
    process: Process,
    base: String,
}

async fn start_service(data_dir: &std::path::Path, extra: &[(&str, String)]) -> Service {
    let mut envs = vec![
        ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
        ("PARLEY_DATA_DIR", data_dir.display().to_string()),
    ];
    envs.extend(extra.iter().cloned());
    let mut process = Process::start("parley-service", &[], &envs);
    let serving = process.wait_for_line("\"serving\"").await;
    let base = format!("http://{}", logged_address(&serving));
    Service { process, base }
}

async fn stop(service: &mut Service) {
    let status = service.process.terminate().await;
    assert!(
        status.success(),
        "parley-service exited with {status} after SIGTERM"
    );
}

#[tokio::test]
async fn local_mode_serves_prints_a_working_dev_token_and_stops_on_sigterm() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut envs = vec![
        ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
        ("PARLEY_DATA_DIR", data_dir.path().display().to_string()),
    ];
    envs.push(("RUST_LOG", "info".to_owned()));
    let mut process = Process::start("parley-service", &[], &envs);
    let lines = process
        .wait_for_lines(&["Dev token for user", "curl -s -X POST", "\"serving\""])
        .await;
    let (curl, serving) = (&lines[1], &lines[2]);
    // The ready-to-paste curl line carries the dev token.
    let token = curl
        .split_once("Bearer ")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(token, _)| token.to_owned())
        .unwrap();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    let base = format!("http://{}", logged_address(serving));
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let created = http
        .post(format!("{base}/api/chat/sessions"))
        .bearer_auth(&token)
        .json(&json!({ "title": "Hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session: Value = created.json().await.unwrap();
    let session = session["sessionId"].as_str().unwrap();

    // The dev user starts with credits, so the quick start can reply.
    let reply = http
        .post(format!("{base}/api/chat/sessions/{session}/messages"))
        .bearer_auth(&token)
        .json(&json!({ "message": "hello there" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let reply: Value = reply.json().await.unwrap();
    assert_eq!(reply["content"], "hello there");
    // 7 tokens in (3 for the text, 4 for the turn) at 1/1k, 2 out at 2/1k,
    // from the 100 a dev account starts with.
    assert_eq!(
        reply["credits"],
        json!({"charged": 0.011, "remaining": 99.989})
    );

    let unauthenticated = http
        .get(format!("{base}/api/chat/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("route=\"/api/chat/sessions\""),
        "request durations are labelled by the matched route:\n{metrics}"
    );

    let status = process.terminate().await;
    assert!(
        status.success(),
        "parley-service exited with {status} after SIGTERM"
    );
}

#[tokio::test]
async fn minted_tokens_work_and_the_embedded_store_survives_a_restart() {
    let data_dir = tempfile::tempdir().unwrap();
    let secret = (
        "PARLEY_JWT_SECRET",
        "e2e-secret-of-enough-length-0123456789".to_owned(),
    );

    let minted = tokio::process::Command::new(parley_e2e::binary("parley-service"))
        .args([
            "token", "--sub", "alice", "--role", "user", "--cohort", "c1", "--ttl", "1h",
        ])
        .env_clear()
        .env(secret.0, &secret.1)
        .output()
        .await
        .unwrap();
    assert!(
        minted.status.success(),
        "token: {}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();

    let http = reqwest::Client::new();
    let mut service = start_service(data_dir.path(), std::slice::from_ref(&secret)).await;
    let created: Value = http
        .post(format!("{}/api/chat/sessions", service.base))
        .bearer_auth(&token)
        .json(&json!({ "title": "kept across restarts" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["sessionId"].as_str().unwrap().to_owned();
    stop(&mut service).await;

    let mut service = start_service(data_dir.path(), &[secret]).await;
    let fetched = http
        .get(format!("{}/api/chat/sessions/{id}", service.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    let fetched: Value = fetched.json().await.unwrap();
    assert_eq!(fetched["title"], "kept across restarts");
    stop(&mut service).await;
}
