//! The OpenAI-compatible API in process, against the Bedrock stand-in and
//! the simulated model: the protocol's shapes (whole, streamed, errors),
//! the fields it takes and refuses, metering (holds capped by `max_tokens`,
//! settlement equal to the usage record), fallback, cancellation when the
//! client leaves, sessions and observation, API keys, metrics by API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use futures::stream::BoxStream;
use parley_service::auth::Role;
use parley_service::model_routes::{ProviderRegistry, Routes};
use parley_service::providers::{BedrockProvider, SimulatedProvider, SimulatedSettings};
use parley_service::stream::{Replies, ReplySettings};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::script::{Fault, Rejection, Script, StreamFailure};
use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything that should happen promptly; never a wait.
const PROMPTLY: Duration = Duration::from_secs(15);
const PRIMARY: &str = "anthropic.claude-3-haiku-20240307-v1:0";
const SECONDARY: &str = "amazon.nova-micro-v1:0";

const ROUTES: &str = "
routes:
  - alias: default
    fallbackOn: [throttled, unavailable]
    targets:
      - provider: bedrock
        model: anthropic.claude-3-haiku-20240307-v1:0
        pricing: {inputPer1k: 1, outputPer1k: 2}
        maxOutputTokens: 256
      - provider: bedrock
        model: amazon.nova-micro-v1:0
        pricing: {inputPer1k: 0.5, outputPer1k: 1}
        maxOutputTokens: 256
  - alias: sim
    targets:
      - provider: simulated
        model: sim-model
        pricing: {inputPer1k: 1, outputPer1k: 3}
        maxOutputTokens: 64
  - alias: dear
    targets:
      - provider: simulated
        model: sim-dear
        pricing: {inputPer1k: 1, outputPer1k: 100}
        maxOutputTokens: 1000
  - alias: rationed
    limits: {requestsPerMinute: 1}
    targets:
      - provider: simulated
        model: sim-rationed
        pricing: {inputPer1k: 0, outputPer1k: 0}
        maxOutputTokens: 64
  - alias: staff
    allowedRoles: [admin]
    targets:
      - provider: simulated
        model: sim-staff
        pricing: {inputPer1k: 0, outputPer1k: 0}
        maxOutputTokens: 64
";

struct Harness {
    address: SocketAddr,
    bedrock: BedrockStandIn,
    client: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Owners' grace period of an hour: a completion whose client leaves
    /// must end at once anyway.
    async fn start() -> Self {
        let (store, dir) = common::embedded_store().await;
        let ledger = common::embedded_ledger(&store).await;
        let bedrock = BedrockStandIn::start().await.unwrap();
        let credentials = Credentials::new("AKIDSTANDIN", "secret", None, None, "test");
        let sdk_config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .build();
        let simulated = SimulatedProvider::new(SimulatedSettings {
            first_token_latency: Duration::ZERO,
            tokens_per_second: None,
            reply_tokens: None,
        });
        let providers = ProviderRegistry::new(Arc::new(simulated), None, None).with_bedrock(
            Arc::new(BedrockProvider::new(&sdk_config, Some(&bedrock.base_url()))),
        );
        let mut registry = Registry::default();
        let replies = Replies::new(
            Routes::from_yaml(ROUTES).unwrap(),
            providers,
            ReplySettings {
                grace: Duration::from_secs(3600),
                ping: Duration::from_millis(200),
                ..ReplySettings::new()
            },
            &mut registry,
        );
        let state = common::state_with_replies(Arc::new(store), ledger, registry, replies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let until = shutdown.clone().cancelled_owned();
        let app = parley_service::app(state);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .unwrap();
        });
        Self {
            address,
            bedrock,
            client: reqwest::Client::new(),
            shutdown,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn completion(&self, token: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(token)
            .json(body)
    }

    /// A whole completion: status and body.
    async fn whole(&self, token: &str, body: Value) -> (StatusCode, Value) {
        let response = self.completion(token, &body).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.json().await.unwrap()
    }

    /// Available credits, in micro-credits.
    async fn available(&self, token: &str) -> i64 {
        micros(&self.get_json("/api/credits/balance", token).await["available"])
    }

    /// The account's usage records, newest first.
    async fn usage(&self, token: &str) -> Vec<Value> {
        self.get_json("/api/credits/usage", token).await["records"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn micros(credits: &Value) -> i64 {
    (credits.as_f64().unwrap() * 1e6).round() as i64
}

fn alice() -> String {
    common::token("alice", Role::User, &["c1"])
}

fn ask(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The `data:` payloads of a streamed completion until the stream ends,
/// pings dropped.
async fn data_events(response: reqwest::Response) -> Vec<String> {
    tokio::time::timeout(PROMPTLY, events(response).map(|event| event.data).collect())
        .await
        .expect("the stream did not end")
}

fn events(response: reqwest::Response) -> BoxStream<'static, Event> {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| event.unwrap())
        .boxed()
}

fn json_chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .take_while(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk.pointer("/choices/0/delta/content"))
        .map(|text| text.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn whole_and_streamed_completions_have_the_protocols_shape_and_cost_what_the_usage_record_says()
 {
    let harness = Harness::start().await;
    let token = alice();
    let before = harness.available(&token).await;

    let (status, completion) = harness
        .whole(&token, ask("sim", "one two three four five"))
        .await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert!(completion["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "sim-model");
    assert_eq!(
        completion["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "one two three four five"},
            "finish_reason": "stop",
        }])
    );
    let usage = &completion["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + 5
    );
    let after_whole = harness.available(&token).await;
    let records = harness.usage(&token).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "completed");
    assert_eq!(records[0]["outputTokens"], 5);
    assert_eq!(records[0]["inputTokens"], usage["prompt_tokens"]);
    assert!(
        records[0]["sessionId"]
            .as_str()
            .unwrap()
            .starts_with("openai/")
    );
    assert!(micros(&records[0]["charged"]) > 0);
    assert_eq!(before - after_whole, micros(&records[0]["charged"]));

    // Streamed, with the usage chunk.
    let response = harness
        .completion(
            &token,
            &json!({
                "model": "sim", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "system", "content": "Echo."}, {"role": "user", "content": "six seven eight"}],
            }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let data = data_events(response).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks = json_chunks(&data);
    assert_eq!(chunks.len() + 1, data.len(), "nothing after [DONE]");
    let id = chunks[0]["id"].as_str().unwrap();
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "sim-model");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(streamed_text(&chunks), "six seven eight");
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let finish = rest.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    for chunk in rest {
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
    }
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    let after_stream = harness.available(&token).await;
    let records = harness.usage(&token).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["outputTokens"], 3);
    assert_eq!(
        records[0]["inputTokens"],
        usage_chunk["usage"]["prompt_tokens"]
    );
    assert_eq!(after_whole - after_stream, micros(&records[0]["charged"]));

    // Without include_usage: no usage anywhere.
    let response = harness
        .completion(
            &token,
            &json!({"model": "sim", "stream": true, "messages": [{"role": "user", "content": "nine"}]}),
        )
        .send()
        .await
        .unwrap();
    let chunks = json_chunks(&data_events(response).await);
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    assert_eq!(streamed_text(&chunks), "nine");

    // Nothing but usage records was kept, and the replies count as the
    // OpenAI API's.
    let sessions = harness.get_json("/api/chat/sessions", &token).await;
    assert_eq!(sessions["sessions"], json!([]));
    let metrics = harness.metrics().await;
    assert!(
        metrics.contains(
            "parley_streams_total{route=\"sim\",model=\"sim-model\",outcome=\"completed\",api=\"openai\"} 3"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "parley_tokens_total{direction=\"output\",model=\"sim-model\",api=\"openai\"} 9"
    ));
}

#[tokio::test]
async fn max_tokens_caps_the_reply_and_its_hold_and_sampling_reaches_the_model() {
    let harness = Harness::start().await;
    let token = alice();
    // The whole route's worst case (1000 tokens at 100 credits per 1k) is
    // more than the 10 credits a new account has; 3 tokens are not.
    let (status, error) = harness.whole(&token, ask("dear", "a b c d e f")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{error}");
    assert_eq!(error["error"]["code"], "insufficient_credits");
    assert_eq!(error["error"]["type"], "insufficient_credits");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("required")
    );
    let mut capped = ask("dear", "a b c d e f");
    capped["max_completion_tokens"] = json!(3);
    let (status, completion) = harness.whole(&token, capped).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(completion["choices"][0]["message"]["content"], "a b c");
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    assert_eq!(completion["usage"]["completion_tokens"], 3);
    let record = &harness.usage(&token).await[0];
    // Held for 3 output tokens (at 0.1 credit each), not 1000, plus the
    // estimated input (11 bytes: 3 tokens, and 4 for the turn, at 0.001).
    assert_eq!(micros(&record["held"]), 307_000, "{record}");

    // A request above the route's maximum gets the route's maximum; the
    // sampling settings go to the model as Bedrock names them.
    harness.bedrock.set_script(PRIMARY, Script::reply(["fine"]));
    let (status, _) = harness
        .whole(
            &token,
            json!({
                "model": "default", "max_tokens": 100000, "temperature": 0.5, "top_p": 0.25,
                "stop": ["\n\n", "END"], "messages": [{"role": "user", "content": "go"}],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        harness.bedrock.calls()[0].body["inferenceConfig"],
        json!({"maxTokens": 256, "temperature": 0.5, "topP": 0.25, "stopSequences": ["\n\n", "END"]})
    );

    // A stop sequence ends the simulated reply.
    let mut stopped = ask("sim", "alpha beta gamma delta");
    stopped["stop"] = json!("gam");
    let (_, completion) = harness.whole(&token, stopped).await;
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "alpha beta "
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_throttled_first_target_falls_back_to_the_second() {
    let harness = Harness::start().await;
    let token = alice();
    harness
        .bedrock
        .set_script(PRIMARY, Script::rejected(Rejection::Throttled));
    harness.bedrock.set_script(
        SECONDARY,
        Script::reply(["from ", "the second"]).with_usage(4, 2),
    );
    let (status, completion) = harness.whole(&token, ask("default", "hello")).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(completion["model"], SECONDARY);
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "from the second"
    );
    assert_eq!(completion["usage"]["prompt_tokens"], 4);
    let record = &harness.usage(&token).await[0];
    assert_eq!(record["modelId"], SECONDARY);

    // Both throttled: a 429 the client retries after Retry-After.
    harness
        .bedrock
        .set_script(SECONDARY, Script::rejected(Rejection::Throttled));
    let mut streamed = ask("default", "hello");
    streamed["stream"] = json!(true);
    let response = harness.completion(&token, &streamed).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert_eq!(error["error"]["code"], "model_throttled");
}

#[tokio::test]
async fn errors_have_the_protocols_shape() {
    let harness = Harness::start().await;
    let token = alice();
    let error_of = |body: &Value| body["error"].clone();

    let response = harness
        .client
        .post(harness.url("/v1/chat/completions"))
        .json(&ask("sim", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    assert_eq!(error_of(&body)["type"], "authentication_error");
    let (status, body) = harness.whole("pk_garbage", ask("sim", "hi")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    for model in ["nope", "staff"] {
        let (status, body) = harness.whole(&token, ask(model, "hi")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(
            error_of(&body),
            json!({
                "message": format!("unknown model route `{model}`; you may use: default, sim, dear, rationed"),
                "type": "not_found_error", "param": "model", "code": "model_not_found",
            })
        );
    }
    // A route's first model id is a model too.
    let (status, _) = harness.whole(&token, ask("sim-model", "hi")).await;
    assert_eq!(status, StatusCode::OK);

    let mut with_tools = ask("sim", "hi");
    with_tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let (status, body) = harness.whole(&token, with_tools).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "tools");
    assert_eq!(error_of(&body)["code"], "unsupported_parameter");
    assert_eq!(error_of(&body)["type"], "invalid_request_error");
    let mut two = ask("sim", "hi");
    two["n"] = json!(2);
    let (status, body) = harness.whole(&token, two).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "n");

    let response = harness
        .client
        .post(harness.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body)["type"], "invalid_request_error");

    let response = harness
        .client
        .post(harness.url("/v1/embeddings"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body)["type"], "not_found_error");

    // A per-user limit: 429, Retry-After within the minute.
    let (status, _) = harness.whole(&token, ask("rationed", "one")).await;
    assert_eq!(status, StatusCode::OK);
    let response = harness
        .completion(&token, &ask("rationed", "two"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    common::assert_retry_within_a_window(response.headers());
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body)["code"], "rate_limit_exceeded");

    // The chat API keeps its own shape.
    let response = harness
        .client
        .get(harness.url("/api/models"))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "MISSING_TOKEN");
}

#[tokio::test]
async fn an_error_after_the_first_token_ends_the_stream_with_an_error_event() {
    let harness = Harness::start().await;
    let token = alice();
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["kept ", "lost"]).with_fault(Fault::StreamError {
            after_deltas: 1,
            failure: StreamFailure::ModelStreamError,
        }),
    );
    let mut body = ask("default", "hi");
    body["stream"] = json!(true);
    let response = harness.completion(&token, &body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let data = data_events(response).await;
    assert_ne!(data.last().unwrap(), "[DONE]");
    let all: Vec<Value> = data
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (error, chunks) = all.split_last().unwrap();
    assert_eq!(streamed_text(chunks), "kept ");
    assert_eq!(error["error"]["code"], "model_unavailable");
    assert_eq!(error["error"]["type"], "server_error");
    let record = &harness.usage(&token).await[0];
    assert_eq!(record["outcome"], "failed");
    assert_eq!(record["outputTokens"], 1);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_reply_upstream_at_once_and_pays_for_the_part() {
    let harness = Harness::start().await;
    let token = alice();
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["kept ", "never"]).with_fault(Fault::Stall { after_deltas: 1 }),
    );
    let before = harness.available(&token).await;
    let mut body = ask("default", "hi");
    body["stream"] = json!(true);
    let response = harness.completion(&token, &body).send().await.unwrap();
    let mut events = events(response);
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let event = tokio::time::timeout(PROMPTLY, events.next())
            .await
            .unwrap()
            .unwrap();
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        texts.push(chunk["choices"][0]["delta"]["content"].clone());
    }
    assert_eq!(texts, [json!(""), json!("kept ")]);
    drop(events);
    // The owners' grace period is an hour: only the connection ends it.
    tokio::time::timeout(PROMPTLY, harness.bedrock.wait_for_dropped_streams(1))
        .await
        .expect("the upstream stream was not cancelled");
    let record = tokio::time::timeout(PROMPTLY, async {
        loop {
            if let Some(record) = harness.usage(&token).await.first().cloned() {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the partial reply was not settled");
    assert_eq!(record["outcome"], "cancelled");
    assert_eq!(record["outputTokens"], 1);
    assert!(micros(&record["charged"]) > 0);
    assert_eq!(
        before - harness.available(&token).await,
        micros(&record["charged"])
    );

    // The same for a whole completion whose client gives up.
    let gave_up = harness
        .completion(&token, &ask("default", "hi"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    tokio::time::timeout(PROMPTLY, harness.bedrock.wait_for_dropped_streams(2))
        .await
        .expect("the upstream stream was not cancelled");
    let metrics = harness.metrics().await;
    assert!(
        metrics.contains("outcome=\"abandoned\",api=\"openai\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_a_session_the_exchange_is_stored_and_observers_follow_it() {
    let harness = Harness::start().await;
    let token = alice();
    let supervisor = common::token("sam", Role::Supervisor, &["c1"]);
    let response = harness
        .client
        .post(harness.url("/api/chat/sessions"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let session: Value = response.json().await.unwrap();
    let session = session["sessionId"].as_str().unwrap().to_owned();

    // The observer arrives first and waits for the reply.
    let response = harness
        .client
        .get(harness.url(&format!("/api/chat/sessions/{session}/observe")))
        .bearer_auth(&supervisor)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut observed = events(response);

    let body = json!({
        "model": "sim", "stream": true,
        "messages": [
            {"role": "system", "content": "Echo."},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "earlier"},
            {"role": "user", "content": "watched words"},
        ],
    });
    let response = harness
        .completion(&token, &body)
        .header("X-Parley-Session", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        streamed_text(&json_chunks(&data_events(response).await)),
        "watched words"
    );

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(name, data): &(String, Value)| name == "observe" && data["state"] == "ended")
    {
        let event = tokio::time::timeout(PROMPTLY, observed.next())
            .await
            .unwrap()
            .unwrap();
        seen.push((event.event, serde_json::from_str(&event.data).unwrap()));
    }
    let names: Vec<&str> = seen.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["observe", "model", "chunk", "chunk", "complete", "observe"]
    );
    let text: String = seen
        .iter()
        .filter(|(name, _)| name == "chunk")
        .map(|(_, data)| data["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "watched words");

    // Stored: the request's last user message and the reply.
    let stored = harness
        .get_json(&format!("/api/chat/sessions/{session}"), &token)
        .await;
    let messages: Vec<(&str, &str)> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        messages,
        [("user", "watched words"), ("assistant", "watched words")]
    );
    assert_eq!(
        harness.usage(&token).await[0]["sessionId"]
            .as_str()
            .unwrap()
            .split('/')
            .next(),
        Some(session.as_str())
    );

    // Only the owner's sessions; a malformed id is named.
    let bob = common::token("bob", Role::User, &["c1"]);
    let (status, body) = {
        let response = harness
            .completion(&bob, &ask("sim", "mine?"))
            .header("X-Parley-Session", &session)
            .send()
            .await
            .unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "session_not_found");
    let response = harness
        .completion(&token, &ask("sim", "hi"))
        .header("X-Parley-Session", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "X-Parley-Session");
}

#[tokio::test]
async fn models_are_the_callers_routes_and_api_keys_work_like_tokens() {
    let harness = Harness::start().await;
    let token = alice();
    let ids = |list: &Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let models = harness.get_json("/v1/models", &token).await;
    assert_eq!(models["object"], "list");
    assert_eq!(ids(&models), ["default", "sim", "dear", "rationed"]);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "parley");
    let admin = common::token("root", Role::Admin, &[]);
    assert!(ids(&harness.get_json("/v1/models", &admin).await).contains(&"staff".to_owned()));
    let one = harness
        .get_json(&format!("/v1/models/{PRIMARY}"), &token)
        .await;
    assert_eq!(one["id"], PRIMARY);
    let response = harness
        .client
        .get(harness.url("/v1/models/staff"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // An API key made with the token completes and lists as alice.
    let response = harness
        .client
        .post(harness.url("/api/keys"))
        .bearer_auth(&token)
        .json(&json!({"name": "sdk"}))
        .send()
        .await
        .unwrap();
    let created: Value = response.json().await.unwrap();
    let key = created["secret"].as_str().unwrap();
    let (status, _) = harness.whole(key, ask("sim", "with a key")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(harness.usage(&token).await.len(), 1);
    let response = harness
        .client
        .delete(harness.url(&format!("/api/keys/{}", created["id"].as_str().unwrap())))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = harness.whole(key, ask("sim", "revoked")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_api_key");
}
