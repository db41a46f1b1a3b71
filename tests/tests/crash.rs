//! A replica killed mid-reply (SIGKILL: no shutdown code runs) leaves an
//! open hold. After a restart the reaper closes it once its lease ends,
//! charging the progress the replica recorded, with exactly one usage record
//! — and never charges it again. On the embedded store (the restart opens
//! the same file) and on MongoDB (the restart connects to the same database).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley_e2e::{Process, logged_address, mint_token};
use parley_test_support::env;
use serde_json::{Value, json};

const SECRET: &str = "e2e-crash-secret-of-enough-length-0123456789";
/// Short, so the test sees the reaper act; replies renew every third of it.
const LEASE_SECONDS: u64 = 3;
/// Bound for the reaper to close the hold after the restart: the lease,
/// reaper ticks and the restart itself, with room for a loaded machine.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// Where the replica keeps its data; a restart finds it there again.
enum Data {
    Embedded(tempfile::TempDir),
    MongoDb { database: String },
}

impl Data {
    fn embedded() -> Self {
        Self::Embedded(tempfile::tempdir().unwrap())
    }

    fn mongodb() -> Self {
        Self::MongoDb {
            database: env::unique_name("parley_crash").replace('-', "_"),
        }
    }
}

fn environment(data: &Data) -> Vec<(&'static str, String)> {
    let mut environment = vec![
        ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
        ("PARLEY_JWT_SECRET", SECRET.to_owned()),
        ("PARLEY_INITIAL_CREDITS", "10".to_owned()),
        ("PARLEY_HOLD_LEASE_SECONDS", LEASE_SECONDS.to_string()),
        ("PARLEY_REAPER_INTERVAL_SECONDS", "1".to_owned()),
        ("PARLEY_SIMULATED_FIRST_TOKEN_MILLIS", "0".to_owned()),
        ("PARLEY_SIMULATED_TOKENS_PER_SECOND", "20".to_owned()),
        ("PARLEY_SIMULATED_REPLY_TOKENS", "1000".to_owned()),
    ];
    match data {
        Data::Embedded(dir) => {
            environment.push(("PARLEY_DATA_DIR", dir.path().display().to_string()));
        }
        Data::MongoDb { database } => {
            environment.push(("PARLEY_MONGODB_URI", env::mongodb_uri()));
            environment.push(("PARLEY_MONGODB_DATABASE", database.clone()));
        }
    }
    environment
}

async fn start(data: &Data) -> (Process, String) {
    let mut process = Process::start("parley-service", &[], &environment(data));
    let serving = process.wait_for_line("\"serving\"").await;
    let base = format!("http://{}", logged_address(&serving));
    (process, base)
}

async fn get(http: &reqwest::Client, url: String, token: &str) -> Value {
    let response = http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn on_the_embedded_store_a_killed_replica_leaves_a_hold_the_reaper_settles_once_after_restart()
 {
    killed_and_restarted(Data::embedded()).await;
}

#[tokio::test]
async fn on_mongodb_a_killed_replica_leaves_a_hold_the_reaper_settles_once_after_restart() {
    killed_and_restarted(Data::mongodb()).await;
}

async fn killed_and_restarted(data: Data) {
    let token = mint_token(SECRET, &["--sub", "carol", "--role", "user", "--ttl", "1h"]).await;
    let http = reqwest::Client::new();
    let (mut process, base) = start(&data).await;
    let session: Value = http
        .post(format!("{base}/api/chat/sessions"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = session["sessionId"].as_str().unwrap().to_owned();
    let response = http
        .post(format!("{base}/api/chat/sessions/{session}/stream"))
        .bearer_auth(&token)
        .json(&json!({"message": "tell me a long story please"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    // 40 chunks at 20 tokens/s: two seconds, past the first lease renewal
    // (every second), which records the output so far.
    let mut chunks = 0;
    while chunks < 40 {
        let event = tokio::time::timeout(SETTLE_LIMIT, events.next())
            .await
            .expect("no event")
            .expect("the stream ended")
            .unwrap();
        if event.event == "chunk" {
            chunks += 1;
        }
    }
    let held = get(&http, format!("{base}/api/credits/balance"), &token).await;
    assert_ne!(held["held"], json!(0.0), "the reply holds credits: {held}");
    process.kill().await;
    drop(events);

    let (mut process, base) = start(&data).await;
    let records = tokio::time::timeout(SETTLE_LIMIT, async {
        loop {
            let usage = get(&http, format!("{base}/api/credits/usage"), &token).await;
            let records = usage["records"].as_array().unwrap().clone();
            if !records.is_empty() {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the reaper did not close the hold");
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    eprintln!("reaped after the kill: {record}");
    assert_eq!(record["outcome"], "reaped", "{record}");
    assert_eq!(record["estimated"], true);
    // The renewals recorded output; the last one before the kill at most
    // what the client had received.
    let output = record["outputTokens"].as_u64().unwrap();
    assert!(output > 0 && output <= 1000, "{record}");
    // 11 input tokens ("tell me a long story please": 27 bytes, 7 tokens,
    // and 4 for the turn) at 1/1k and the output at 2/1k: what the built-in
    // route charges.
    assert_eq!(record["inputTokens"], 11);
    let charged_micros = 11 * 1_000 + output * 2_000;
    let charged = record["charged"].as_f64().unwrap();
    assert!(
        (charged * 1e6 - charged_micros as f64).abs() < 0.5,
        "{record}"
    );

    let balance = get(&http, format!("{base}/api/credits/balance"), &token).await;
    assert_eq!(balance["held"], json!(0.0), "{balance}");
    let expected = (10_000_000 - charged_micros) as f64 / 1e6;
    assert!(
        (balance["balance"].as_f64().unwrap() - expected).abs() < 1e-9,
        "{balance}"
    );

    // A turn is stored whole (the question with its reply) when the reply
    // ends; the killed one was never stored, so the session holds no half
    // turn. Its charge is traceable through the record's id, which starts
    // with the chat session's.
    assert!(
        record["sessionId"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{session}/")),
        "{record}"
    );
    let stored = get(&http, format!("{base}/api/chat/sessions/{session}"), &token).await;
    assert_eq!(stored["messages"], json!([]), "{stored}");
    assert_eq!(stored["messageCount"], 0, "{stored}");

    // Later reaper passes find nothing more to charge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let usage = get(&http, format!("{base}/api/credits/usage"), &token).await;
    assert_eq!(usage["records"].as_array().unwrap().len(), 1);
    let again = get(&http, format!("{base}/api/credits/balance"), &token).await;
    assert_eq!(again, balance);
    let status = process.terminate().await;
    assert!(status.success());
}
