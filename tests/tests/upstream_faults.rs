//! An upstream model server failing, seen through the real service binary
//! (embedded store) and an OpenAI-compatible stand-in: a connection reset and
//! a stall in the middle of a reply end it with the documented code, the
//! part the owner saw is stored once (marked incomplete) and charged exactly
//! once; an upstream that is down altogether ends the reply before any
//! output and releases its hold, and the service uses it again by itself
//! once it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use parley_e2e::{Process, logged_address, mint_token};
use parley_test_support::openai::OpenAiStandIn;
use parley_test_support::proxy::TcpProxy;
use parley_test_support::script::{Fault, Script};
use parley_test_support::sse::{data, events, until};
use serde_json::{Value, json};

const SECRET: &str = "e2e-upstream-secret-of-enough-length-0123456789";
const MODEL: &str = "flaky-model";
const INITIAL_CREDITS: f64 = 10.0;
/// The route target's timeout: also how long a stalled stream may go
/// without a token.
const TIMEOUT_SECONDS: u64 = 2;

struct Service {
    process: Process,
    base: String,
    http: reqwest::Client,
    token: String,
    _dir: tempfile::TempDir,
}

impl Service {
    /// The service with one route to the upstream at `openai_base_url`.
    async fn start(openai_base_url: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.yaml");
        std::fs::write(
            &routes,
            format!(
                "routes:\n  - alias: default\n    targets:\n      - provider: openai\n        model: {MODEL}\n        pricing: {{inputPer1k: 1, outputPer1k: 2}}\n        maxOutputTokens: 64\n        timeoutSeconds: {TIMEOUT_SECONDS}\n"
            ),
        )
        .unwrap();
        let environment = vec![
            ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
            (
                "PARLEY_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("PARLEY_ROUTES_FILE", routes.display().to_string()),
            ("PARLEY_OPENAI_BASE_URL", openai_base_url),
            ("PARLEY_JWT_SECRET", SECRET.to_owned()),
            ("PARLEY_INITIAL_CREDITS", INITIAL_CREDITS.to_string()),
        ];
        let mut process = Process::start("parley-service", &[], &environment);
        let base = format!(
            "http://{}",
            logged_address(&process.wait_for_line("\"serving\"").await)
        );
        let token = mint_token(SECRET, &["--sub", "dana", "--role", "user", "--ttl", "1h"]).await;
        Self {
            process,
            base,
            http: reqwest::Client::new(),
            token,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    async fn session(&self) -> String {
        let response = self
            .http
            .post(format!("{}/api/chat/sessions", self.base))
            .bearer_auth(&self.token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let session: Value = response.json().await.unwrap();
        session["sessionId"].as_str().unwrap().to_owned()
    }

    async fn post_stream(&self, session: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/chat/sessions/{session}/stream", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"message": "explain tides to me"}))
            .send()
            .await
            .unwrap()
    }

    /// A streamed reply read to its end: the text of its chunks and its
    /// last event (`complete` or `error`) with that event's data.
    async fn reply(&self, session: &str) -> (String, String, Value) {
        let response = self.post_stream(session).await;
        assert_eq!(response.status(), 200);
        let mut events = events(response);
        let seen = until(&mut events, &["complete", "error"]).await;
        let text: String = seen
            .iter()
            .filter(|event| event.event == "chunk")
            .map(|event| data(event)["text"].as_str().unwrap().to_owned())
            .collect();
        let last = seen.last().unwrap();
        (text, last.event.clone(), data(last))
    }

    async fn usage_records(&self) -> Vec<Value> {
        self.get("/api/credits/usage").await["records"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn stop(mut self) {
        assert!(self.process.terminate().await.success());
    }
}

/// A reply cut after `deltas` of its deltas by `fault` ends with `code`;
/// its part is stored once, marked incomplete, and charged exactly once.
async fn cut_reply(fault: Fault, deltas: usize, code: &str) {
    let upstream = OpenAiStandIn::start().await.unwrap();
    let script_deltas: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let part: String = script_deltas[..deltas].concat();
    upstream.set_script(
        MODEL,
        Script::reply(script_deltas)
            .with_delta_delay(Duration::from_millis(20))
            .with_fault(fault),
    );
    let service = Service::start(upstream.base_url()).await;
    let session = service.session().await;

    let (text, last, end) = service.reply(&session).await;
    assert_eq!(text, part);
    assert_eq!(
        (last.as_str(), end["code"].as_str()),
        ("error", Some(code)),
        "{end}"
    );

    let stored = service.get(&format!("/api/chat/sessions/{session}")).await;
    let messages = stored["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{stored}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], part.as_str());
    assert_eq!(messages[1]["incomplete"], true);

    let records = service.usage_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "failed", "{records:?}");
    let charged = records[0]["charged"].as_f64().unwrap();
    assert!(
        charged > 0.0,
        "the part the owner saw is paid for: {records:?}"
    );
    let balance = service.get("/api/credits/balance").await;
    assert_eq!(balance["held"], json!(0.0), "{balance}");
    assert!(
        (INITIAL_CREDITS - balance["balance"].as_f64().unwrap() - charged).abs() < 1e-9,
        "the balance moved by other than the one charge: {balance} {records:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_connection_reset_mid_reply_ends_it_with_the_part_stored_and_charged_once() {
    cut_reply(
        Fault::Disconnect { after_deltas: 5 },
        5,
        "MODEL_UNAVAILABLE",
    )
    .await;
}

#[tokio::test]
async fn a_stall_mid_reply_times_out_with_the_part_stored_and_charged_once() {
    cut_reply(Fault::Stall { after_deltas: 5 }, 5, "MODEL_TIMEOUT").await;
}

#[tokio::test]
async fn an_upstream_that_is_down_ends_the_reply_uncharged_and_is_used_again_once_back() {
    let upstream = OpenAiStandIn::start().await.unwrap();
    upstream.set_script(MODEL, Script::reply(["back ", "again"]));
    let upstream_address = upstream.addr().to_string();
    let proxy = TcpProxy::start(upstream_address.clone(), None)
        .await
        .unwrap();
    let service = Service::start(format!("http://{}/v1", proxy.address())).await;
    let session = service.session().await;
    proxy.stop().await;

    // The stream has started (the hold was taken) when the upstream is
    // found down: it ends at once with the error, and the hold is released.
    let (text, last, end) = service.reply(&session).await;
    assert_eq!(text, "");
    assert_eq!(
        (last.as_str(), end["code"].as_str()),
        ("error", Some("MODEL_UNAVAILABLE")),
        "{end}"
    );
    let records = service.usage_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (
            records[0]["outcome"].as_str(),
            records[0]["charged"].as_f64()
        ),
        (Some("released"), Some(0.0)),
        "{records:?}"
    );
    let balance = service.get("/api/credits/balance").await;
    assert_eq!(
        (balance["balance"].as_f64(), balance["held"].as_f64()),
        (Some(INITIAL_CREDITS), Some(0.0)),
        "{balance}"
    );
    let stored = service.get(&format!("/api/chat/sessions/{session}")).await;
    assert_eq!(stored["messages"], json!([]), "{stored}");

    let _back = TcpProxy::start(upstream_address, Some(proxy.address()))
        .await
        .unwrap();
    let (text, last, _) = service.reply(&session).await;
    assert_eq!((text.as_str(), last.as_str()), ("back again", "complete"));
    service.stop().await;
}
