//! Replies end to end over real HTTP on loopback: the service with its
//! providers driving the Bedrock stand-in through the real AWS SDK and the
//! OpenAI stand-in, read with a standards-following SSE parser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use eventsource_stream::Event;
use futures::StreamExt;
use http_body_util::BodyExt;
use parley_service::auth::Role;
use parley_service::embedded_db::EmbeddedDb;
use parley_service::ledger::{EmbeddedLedger, Ledger, MongoLedger};
use parley_service::model_routes::{ProviderRegistry, Routes, watch_routes_file};
use parley_service::providers::{
    BedrockProvider, Completion, CompletionRequest, OpenAiProvider, Provider, ProviderError,
    ProviderEvent, ProviderStream, SimulatedProvider, SimulatedSettings, StopReason, collect,
};
use parley_service::store::{
    BlockAudit, BlockDirection, BlockKind, BlockQuery, CohortScope, EmbeddedStore, PageRequest,
};
use parley_service::stream::{Replies, ReplySettings};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::openai::OpenAiStandIn;
use parley_test_support::script::{
    Fault, GuardrailFinding, GuardrailIntervention, Rejection, Script, StreamFailure,
};
use parley_test_support::sse::{Events, PROMPTLY, data, drain, events, next};
use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const PRIMARY: &str = "anthropic.claude-3-haiku-20240307-v1:0";
const SECONDARY: &str = "amazon.nova-micro-v1:0";
const OPENAI_MODEL: &str = "smollm2-135m";
/// The model behind the `metered` route, which allows one stream per user.
const METERED_MODEL: &str = "amazon.titan-text-lite-v1";

/// Text that broke the old server's SSE handling.
const AWKWARD: [&str; 7] = [
    "line\nbreak",
    "\r\n",
    "back\\slash \\n",
    " \"quoted\"",
    " data: fake\n\nevent: x",
    " 😀",
    " 中文",
];

fn routes_yaml(primary_timeout: u32) -> String {
    format!(
        "
routes:
  - alias: default
    fallbackOn: [throttled, unavailable, timeout]
    targets:
      - provider: bedrock
        model: {PRIMARY}
        pricing: {{inputPer1k: 1, outputPer1k: 2}}
        maxOutputTokens: 256
        timeoutSeconds: {primary_timeout}
      - provider: bedrock
        model: {SECONDARY}
        pricing: {{inputPer1k: 0.5, outputPer1k: 1}}
        maxOutputTokens: 256
  - alias: open
    targets:
      - provider: openai
        model: {OPENAI_MODEL}
        pricing: {{inputPer1k: 1, outputPer1k: 1}}
        maxOutputTokens: 256
  - alias: staff
    allowedRoles: [admin]
    targets:
      - provider: simulated
        model: sim
        pricing: {{inputPer1k: 0, outputPer1k: 0}}
        maxOutputTokens: 64
  - alias: dear
    targets:
      - provider: openai
        model: {OPENAI_MODEL}
        pricing: {{inputPer1k: 1000, outputPer1k: 1000}}
        maxOutputTokens: 256
  - alias: thrifty
    downgradeWhenUnaffordable: true
    targets:
      - provider: openai
        model: {OPENAI_MODEL}
        pricing: {{inputPer1k: 1000, outputPer1k: 1000}}
        maxOutputTokens: 256
      - provider: simulated
        model: sim-cheap
        pricing: {{inputPer1k: 1, outputPer1k: 1}}
        maxOutputTokens: 64
  - alias: metered
    limits: {{concurrentStreams: 1}}
    targets:
      - provider: bedrock
        model: {METERED_MODEL}
        pricing: {{inputPer1k: 0, outputPer1k: 0}}
        maxOutputTokens: 64
  - alias: rationed
    limits: {{requestsPerMinute: 1}}
    targets:
      - provider: simulated
        model: sim-rationed
        pricing: {{inputPer1k: 0, outputPer1k: 0}}
        maxOutputTokens: 64
"
    )
}

struct Harness {
    address: SocketAddr,
    store: EmbeddedStore,
    bedrock: BedrockStandIn,
    openai: OpenAiStandIn,
    replies: Arc<Replies>,
    shutdown: CancellationToken,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(grace: Duration, primary_timeout: u32) -> Self {
        Self::start_with_ledger(grace, primary_timeout, None).await
    }

    /// `ledger`: the credits ledger to use instead of the embedded one.
    async fn start_with_ledger(
        grace: Duration,
        primary_timeout: u32,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> Self {
        let (store, dir) = common::embedded_store().await;
        let ledger = match ledger {
            Some(ledger) => ledger,
            None => common::embedded_ledger(&store).await,
        };
        Self::start_on(grace, primary_timeout, store, ledger, dir).await
    }

    /// On these stores; `dir` lives as long as the harness.
    async fn start_on(
        grace: Duration,
        primary_timeout: u32,
        store: EmbeddedStore,
        ledger: Arc<dyn Ledger>,
        dir: tempfile::TempDir,
    ) -> Self {
        let bedrock = BedrockStandIn::start().await.unwrap();
        let openai = OpenAiStandIn::start().await.unwrap();
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
        let openai_provider =
            OpenAiProvider::new(&openai.base_url(), Some("sk-standin".into())).unwrap();
        let providers =
            ProviderRegistry::new(Arc::new(simulated), Some(Arc::new(openai_provider)), None)
                .with_bedrock(Arc::new(BedrockProvider::new(
                    &sdk_config,
                    Some(&bedrock.base_url()),
                )));
        let mut registry = Registry::default();
        let replies = Replies::new(
            Routes::from_yaml(&routes_yaml(primary_timeout)).unwrap(),
            providers,
            ReplySettings {
                grace,
                ..ReplySettings::new()
            },
            &mut registry,
        );
        let state = common::state_with_replies(Arc::new(store.clone()), ledger, registry, replies);
        let replies = Arc::clone(&state.replies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = parley_service::app(state);
        let until = shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .unwrap();
        });
        Self {
            address,
            store,
            bedrock,
            openai,
            replies,
            shutdown,
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    async fn session(&self, token: &str) -> String {
        let response = self
            .client
            .post(self.url("/api/chat/sessions"))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["sessionId"].as_str().unwrap().to_owned()
    }

    /// Starts a streamed reply; the response head, then its SSE events.
    async fn stream(&self, token: &str, session: &str, body: Value) -> Events {
        let response = self
            .client
            .post(self.url(&format!("/api/chat/sessions/{session}/stream")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_sse_headers(&response, false);
        events(response)
    }

    /// A reply that writes `first` and then stalls, in a new session of
    /// `token`'s user, read up to that first chunk.
    async fn stalled_reply(&self, token: &str, first: &str) -> (String, Events) {
        self.bedrock.set_script(
            PRIMARY,
            Script::reply([first, "never"]).with_fault(Fault::Stall { after_deltas: 1 }),
        );
        let session = self.session(token).await;
        let mut stream = self.stream(token, &session, json!({"message": "hi"})).await;
        assert_eq!(next(&mut stream).await.event, "model");
        assert_eq!(next(&mut stream).await.event, "chunk");
        (session, stream)
    }

    async fn stored(&self, session: &str, token: &str) -> Value {
        let response = self
            .client
            .get(self.url(&format!("/api/chat/sessions/{session}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An event stream that proxies pass on unbuffered, and (`cacheable`: a
/// response to a GET) that caches do not store.
fn assert_sse_headers(response: &reqwest::Response, cacheable: bool) {
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "text/event-stream");
    assert_eq!(header("x-accel-buffering"), "no");
    let mut names: Vec<&str> = response
        .headers()
        .keys()
        .map(|name| name.as_str())
        // Written by hyper as it sends the head, not held in the map.
        .filter(|name| !["date", "transfer-encoding"].contains(name))
        .collect();
    names.sort_unstable();
    if cacheable {
        assert_eq!(header("cache-control"), "no-cache");
        assert_eq!(
            names,
            [
                "cache-control",
                "content-type",
                "x-accel-buffering",
                "x-request-id"
            ]
        );
    } else {
        // No cache stores a POST's response, and three headers fit the
        // smallest header map, which hyper keeps while the reply streams.
        assert_eq!(names, ["content-type", "x-accel-buffering", "x-request-id"]);
    }
}

fn chunk_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "chunk")
        .map(|e| data(e)["text"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.id.parse().unwrap()).collect()
}

fn user() -> String {
    common::token("alice", Role::User, &["c1"])
}

#[tokio::test]
async fn a_streamed_reply_arrives_whole_and_is_stored() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness
        .bedrock
        .set_script(PRIMARY, Script::reply(AWKWARD).with_usage(11, 7));
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": "Say something awkward"}),
            )
            .await,
    )
    .await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names[0], "model");
    assert_eq!(*names.last().unwrap(), "complete");
    assert_eq!(ids(&events), (1..=events.len() as u64).collect::<Vec<_>>());
    let model = data(&events[0]);
    assert_eq!(model["model"], PRIMARY);
    assert_eq!(model["route"], "default");
    assert_eq!(model["fallbackApplied"], false);
    assert_eq!(chunk_text(&events), AWKWARD.concat());
    let complete = data(events.last().unwrap());
    assert_eq!(
        complete["usage"],
        json!({"inputTokens": 11, "outputTokens": 7})
    );

    let stored = harness.stored(&session, &token).await;
    let messages = stored["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["content"], "Say something awkward");
    assert_eq!(messages[1]["content"], AWKWARD.concat());
    assert_eq!(messages[1]["id"], complete["messageId"]);
    assert!(messages[1].get("incomplete").is_none());
    assert_eq!(stored["tokenTotals"], json!({"input": 11, "output": 7}));
}

#[tokio::test]
async fn throttling_on_the_first_target_falls_back_to_the_second() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness
        .bedrock
        .set_script(PRIMARY, Script::rejected(Rejection::Throttled));
    harness
        .bedrock
        .set_script(SECONDARY, Script::reply(["from ", "the second"]));
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi"}))
            .await,
    )
    .await;
    let model = data(&events[0]);
    assert_eq!(model["model"], SECONDARY);
    assert_eq!(model["fallbackApplied"], true);
    assert_eq!(chunk_text(&events), "from the second");
    assert_eq!(events.last().unwrap().event, "complete");
    let models: Vec<String> = harness
        .bedrock
        .calls()
        .into_iter()
        .map(|c| c.model)
        .collect();
    assert_eq!(models, [PRIMARY, SECONDARY]);

    let metrics = harness
        .client
        .get(harness.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "parley_fallbacks_total{{from=\"{PRIMARY}\",to=\"{SECONDARY}\",reason=\"throttled\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("parley_streams_total{route=\"default\","));
}

#[tokio::test]
async fn a_stall_times_out_and_falls_back() {
    let harness = Harness::start(Duration::from_secs(30), 1).await;
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["never"]).with_fault(Fault::Stall { after_deltas: 0 }),
    );
    harness
        .bedrock
        .set_script(SECONDARY, Script::reply(["rescued"]));
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi"}))
            .await,
    )
    .await;
    assert_eq!(data(&events[0])["model"], SECONDARY);
    assert_eq!(data(&events[0])["fallbackApplied"], true);
    assert_eq!(chunk_text(&events), "rescued");
    // The stalled upstream request was abandoned, not left open.
    tokio::time::timeout(PROMPTLY, harness.bedrock.wait_for_dropped_streams(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_mid_stream_exception_ends_with_an_error_and_keeps_the_partial_reply() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["partial ", "reply ", "lost"]).with_fault(Fault::StreamError {
            after_deltas: 2,
            failure: StreamFailure::ModelStreamError,
        }),
    );
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi"}))
            .await,
    )
    .await;
    assert_eq!(chunk_text(&events), "partial reply ");
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert!(data(last)["code"].as_str().unwrap().starts_with("MODEL_"));
    // No fallback after output: the second target was never called.
    assert_eq!(harness.bedrock.calls().len(), 1);

    let stored = harness.stored(&session, &token).await;
    let messages = stored["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1]["content"], "partial reply ");
    assert_eq!(messages[1]["incomplete"], true);
}

#[tokio::test]
async fn the_openai_provider_serves_a_route() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness
        .openai
        .set_script(OPENAI_MODEL, Script::reply(AWKWARD));
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi", "route": "open"}))
            .await,
    )
    .await;
    assert_eq!(data(&events[0])["model"], OPENAI_MODEL);
    assert_eq!(chunk_text(&events), AWKWARD.concat());
    assert_eq!(events.last().unwrap().event, "complete");
}

#[tokio::test]
async fn whole_replies_unknown_routes_models_and_one_reply_at_a_time() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["slow"]).with_fault(Fault::Stall { after_deltas: 1 }),
    );
    harness
        .bedrock
        .push_script(PRIMARY, Script::reply(["whole ", "reply"]).with_usage(3, 2));
    let token = user();
    let session = harness.session(&token).await;

    // Non-streaming: the whole reply with its usage.
    let response = harness
        .client
        .post(harness.url(&format!("/api/chat/sessions/{session}/messages")))
        .bearer_auth(&token)
        .json(&json!({"message": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["content"], "whole reply");
    assert_eq!(reply["usage"], json!({"inputTokens": 3, "outputTokens": 2}));
    assert_eq!(reply["model"], PRIMARY);

    // Unknown (or forbidden) route: 400 with the routes the caller may use.
    for route in ["nope", "staff"] {
        let response = harness
            .client
            .post(harness.url(&format!("/api/chat/sessions/{session}/messages")))
            .bearer_auth(&token)
            .json(&json!({"message": "hello", "modelId": route}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "UNKNOWN_ROUTE");
        assert_eq!(
            body["allowed"],
            json!(["default", "open", "dear", "thrifty", "metered", "rationed"])
        );
    }

    // Models by role, with prices.
    let models = |token: String| {
        let request = harness
            .client
            .get(harness.url("/api/models"))
            .bearer_auth(token);
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["models"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["alias"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        models(token.clone()).await,
        ["default", "open", "dear", "thrifty", "metered", "rationed"]
    );
    assert_eq!(
        models(common::token("root", Role::Admin, &[])).await,
        [
            "default", "open", "staff", "dear", "thrifty", "metered", "rationed"
        ]
    );

    // One reply per session: a second one while the first streams is 409.
    let mut first = harness
        .stream(&token, &session, json!({"message": "take your time"}))
        .await;
    assert_eq!(next(&mut first).await.event, "model");
    let response = harness
        .client
        .post(harness.url(&format!("/api/chat/sessions/{session}/messages")))
        .bearer_auth(&token)
        .json(&json!({"message": "me too"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "REPLY_IN_PROGRESS");
}

#[tokio::test]
async fn reattaching_with_last_event_id_has_no_gap_and_no_duplicate() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let deltas: Vec<String> = (0..40).map(|i| format!("w{i} ")).collect();
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(deltas.clone()).with_delta_delay(Duration::from_millis(5)),
    );
    let token = user();
    let session = harness.session(&token).await;
    let mut first = harness
        .stream(&token, &session, json!({"message": "count"}))
        .await;
    let mut seen = vec![
        next(&mut first).await,
        next(&mut first).await,
        next(&mut first).await,
    ];
    drop(first);
    let last_id = seen.last().unwrap().id.clone();

    let response = harness
        .client
        .get(harness.url(&format!("/api/chat/sessions/{session}/stream")))
        .bearer_auth(&token)
        .header("Last-Event-ID", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_sse_headers(&response, true);
    seen.extend(drain(events(response)).await);
    assert_eq!(ids(&seen), (1..=seen.len() as u64).collect::<Vec<_>>());
    assert_eq!(chunk_text(&seen), deltas.concat());
    assert_eq!(seen.last().unwrap().event, "complete");

    // Someone else cannot attach to it.
    let response = harness
        .client
        .get(harness.url(&format!("/api/chat/sessions/{session}/stream")))
        .bearer_auth(common::token("mallory", Role::User, &["c1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_disconnected_reply_is_cancelled_upstream_after_the_grace_period() {
    let grace = Duration::from_millis(300);
    let harness = Harness::start(grace, 30).await;
    let token = user();
    let (session, stream) = harness.stalled_reply(&token, "kept ").await;
    let left = tokio::time::Instant::now();
    drop(stream);

    tokio::time::timeout(PROMPTLY, harness.bedrock.wait_for_dropped_streams(1))
        .await
        .unwrap();
    assert!(left.elapsed() >= grace, "cancelled before the grace period");

    // The finished reply lingers: its replay ends with the cancellation,
    // after which the partial reply is stored.
    let response = harness
        .client
        .get(harness.url(&format!("/api/chat/sessions/{session}/stream")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let replay = drain(events(response)).await;
    assert_eq!(chunk_text(&replay), "kept ");
    assert_eq!(data(replay.last().unwrap())["code"], "CANCELLED");
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"][1]["content"], "kept ");
    assert_eq!(stored["messages"][1]["incomplete"], true);
}

#[tokio::test]
async fn the_owner_stops_a_reply_at_once_and_keeps_what_was_generated() {
    // A long grace period: only the explicit stop can end this reply soon.
    let harness = Harness::start(Duration::from_secs(3600), 30).await;
    let token = user();
    let (session, stream) = harness.stalled_reply(&token, "kept ").await;
    let stop_url = harness.url(&format!("/api/chat/sessions/{session}/stream"));
    let stop = |token: String| harness.client.delete(&stop_url).bearer_auth(token).send();

    // Nobody else can stop it, not even a supervisor of the owner's cohort.
    for other in [
        common::token("mallory", Role::User, &["c1"]),
        common::token("sam", Role::Supervisor, &["c1"]),
    ] {
        let response = stop(other).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "NO_ACTIVE_REPLY");
    }

    let response = stop(token.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["sessionId"], session.as_str());
    // Answered once the reply is over: the partial reply is already stored.
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"][1]["content"], "kept ");
    assert_eq!(stored["messages"][1]["incomplete"], true);
    // The open stream ends with the cancellation, and the model call is dropped.
    let rest = drain(stream).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(data(&rest[0])["code"], "CANCELLED");
    tokio::time::timeout(PROMPTLY, harness.bedrock.wait_for_dropped_streams(1))
        .await
        .unwrap();

    let response = stop(token.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // The session takes the next reply at once.
    harness
        .bedrock
        .set_script(PRIMARY, Script::reply(["again"]));
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "more"}))
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap().event, "complete");
}

#[tokio::test]
async fn shutdown_ends_running_replies_with_shutting_down() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let token = user();
    let (session, stream) = harness.stalled_reply(&token, "before ").await;
    harness.replies.shutdown.cancel();
    let rest = drain(stream).await;
    assert_eq!(data(rest.last().unwrap())["code"], "SHUTTING_DOWN");
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"][1]["content"], "before ");
    assert_eq!(stored["messages"][1]["incomplete"], true);
}

#[tokio::test]
async fn a_draining_replica_is_not_ready_and_starts_no_reply_while_running_ones_go_on() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.bedrock.set_script(
        PRIMARY,
        Script::reply(["still ", "never"]).with_fault(Fault::Stall { after_deltas: 1 }),
    );
    let token = user();
    let running = harness.session(&token).await;
    let idle = harness.session(&token).await;
    let mut stream = harness
        .stream(&token, &running, json!({"message": "hi"}))
        .await;
    assert_eq!(next(&mut stream).await.event, "model");
    assert_eq!(next(&mut stream).await.event, "chunk");
    harness.replies.draining.cancel();

    let ready = harness
        .client
        .get(harness.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["code"], "SHUTTING_DOWN");
    let refused = harness
        .client
        .post(harness.url(&format!("/api/chat/sessions/{idle}/stream")))
        .bearer_auth(&token)
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "SHUTTING_DOWN");

    // The running reply was not touched: it ends only when the drain is over.
    harness.replies.shutdown.cancel();
    let rest = drain(stream).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(data(&rest[0])["code"], "SHUTTING_DOWN");
}

#[tokio::test]
async fn a_changed_routes_file_is_used_by_the_next_request_and_a_bad_one_is_ignored() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, routes_yaml(30)).unwrap();
    tokio::spawn(watch_routes_file(
        Arc::clone(&harness.replies.routes),
        path.clone(),
        Duration::from_millis(20),
        harness.shutdown.clone(),
    ));
    let token = user();
    let aliases = || async {
        let body: Value = harness
            .client
            .get(harness.url("/api/models"))
            .bearer_auth(user())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["alias"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let changed = routes_yaml(30).replace("alias: open", "alias: fresh");
    std::fs::write(&path, &changed).unwrap();
    let now = ["default", "fresh", "dear", "thrifty", "metered", "rationed"];
    wait_until(|| async { aliases().await == now }).await;
    // The next request uses the new chain.
    harness
        .openai
        .set_script(OPENAI_MODEL, Script::reply(["new"]));
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi", "route": "fresh"}))
            .await,
    )
    .await;
    assert_eq!(chunk_text(&events), "new");

    std::fs::write(&path, "routes: [{alias: broken, targets: []}]").unwrap();
    let failures = || async {
        harness
            .client
            .get(harness.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("parley_routes_reload_failures_total 1")
    };
    wait_until(failures).await;
    assert_eq!(aliases().await, now);
}

/// Re-checks `condition` on each tick until it holds (bounded by PROMPTLY).
async fn wait_until<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tokio::time::timeout(PROMPTLY, async {
        loop {
            tick.tick().await;
            if condition().await {
                return;
            }
        }
    })
    .await
    .expect("the condition never held");
}

// ---------------------------------------------------------------------------
// Credits: every reply is held before it runs and settled once.

impl Harness {
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

    /// Serves `routes` (entries of the routes list) besides the usual ones.
    fn add_routes(&self, routes: &str) {
        let yaml = format!("{}{routes}", routes_yaml(30));
        assert!(self.replies.routes.reload_from_yaml(&yaml, "test"));
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_fallback_is_charged_at_the_answering_targets_price_exactly_once() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness
        .bedrock
        .set_script(PRIMARY, Script::rejected(Rejection::Throttled));
    harness.bedrock.set_script(
        SECONDARY,
        Script::reply(["from ", "the second"]).with_usage(40, 2),
    );
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi"}))
            .await,
    )
    .await;
    assert_eq!(data(&events[0])["model"], SECONDARY);
    let complete = data(events.last().unwrap());
    // 40 input tokens at 0.5/1k plus 2 output tokens at 1/1k: the second
    // target's price, not the first's (1 and 2).
    assert_eq!(
        complete["credits"],
        json!({"charged": 0.022, "remaining": 9.978})
    );

    let usage = harness.get_json("/api/credits/usage", &token).await;
    let records = usage["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{usage}");
    let record = &records[0];
    assert_eq!(record["modelId"], SECONDARY);
    assert_eq!(record["route"], "default");
    assert_eq!(record["outcome"], "completed");
    assert_eq!(record["estimated"], false);
    assert_eq!(
        (
            record["inputTokens"].clone(),
            record["outputTokens"].clone()
        ),
        (json!(40), json!(2))
    );
    assert_eq!(record["charged"], json!(0.022));
    // Re-priced on fallback: "hi" is estimated at 5 input tokens (1 for
    // its text, 4 for the turn), plus the second target's 256 output tokens.
    assert_eq!(record["held"], json!(0.2585));
    assert!(
        record["sessionId"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{session}/")),
        "{record}"
    );
    // The service keys its replies' holds apart from the API's: naming
    // the reply's session id there reaches no hold, and charges nothing.
    let named = harness
        .post(
            "/api/streaming-sessions/abort",
            &token,
            json!({"sessionId": record["sessionId"], "tokensGenerated": 0}),
        )
        .await;
    assert_eq!(named.status(), 404);
    let named: Value = named.json().await.unwrap();
    assert_eq!(named["code"], "STREAMING_SESSION_NOT_FOUND", "{named}");
    let balance = harness.get_json("/api/credits/balance", &token).await;
    assert_eq!(
        balance,
        json!({"userId": "alice", "balance": 9.978, "held": 0.0, "available": 9.978})
    );
}

#[tokio::test]
async fn a_whole_reply_carries_the_remaining_balance_and_a_cut_reply_is_estimated() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.openai.set_script(
        OPENAI_MODEL,
        Script::reply(["one", " two", " three"]).with_usage(5, 3),
    );
    let token = user();
    let session = harness.session(&token).await;
    let messages = format!("/api/chat/sessions/{session}/messages");
    let response = harness
        .post(
            &messages,
            &token,
            json!({"message": "count to three", "route": "open"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let remaining = response.headers()["x-parley-credits-remaining"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    // 5 + 3 tokens at 1/1k.
    assert_eq!(
        body["credits"],
        json!({"charged": 0.008, "remaining": 9.992})
    );
    assert_eq!(remaining, "9.992");

    // Cut off after two deltas, the provider never reports usage: the
    // conversation is estimated (8 + 8 + 7 tokens: bytes / 4, rounded up,
    // plus 4 per turn) and each delta counts one output token.
    harness.openai.set_script(
        OPENAI_MODEL,
        Script::reply(["a", "b", "c"]).with_fault(Fault::Disconnect { after_deltas: 2 }),
    );
    let response = harness
        .post(
            &messages,
            &token,
            json!({"message": "and again", "route": "open"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let usage = harness.get_json("/api/credits/usage", &token).await;
    let cut = &usage["records"][0];
    assert_eq!(cut["outcome"], "failed", "{usage}");
    assert_eq!(cut["estimated"], true);
    assert_eq!(cut["outputTokens"], 2);
    assert_eq!(cut["inputTokens"], 23);
    assert_eq!(cut["charged"], json!(0.025));
    assert_eq!(usage["records"][1]["estimated"], false);
    let balance = harness.get_json("/api/credits/balance", &token).await;
    assert_eq!(balance["balance"], json!(9.967));
    assert_eq!(balance["held"], json!(0.0));
}

#[tokio::test]
async fn an_unaffordable_reply_is_402_before_any_provider_call() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let token = user();
    let session = harness.session(&token).await;
    for endpoint in ["stream", "messages"] {
        let response = harness
            .post(
                &format!("/api/chat/sessions/{session}/{endpoint}"),
                &token,
                json!({"message": "hi", "route": "dear"}),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::PAYMENT_REQUIRED,
            "{endpoint}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "INSUFFICIENT_CREDITS");
        // 5 input tokens at 1000/1k plus 256 output tokens at 1000/1k.
        assert_eq!(body["requiredCredits"], json!(261.0), "{body}");
        assert_eq!(body["available"], json!(10.0));
        assert_eq!(body["balance"], json!(10.0));
    }
    assert!(harness.openai.calls().is_empty(), "the provider was called");
    // The session is free again and nothing is held.
    let balance = harness.get_json("/api/credits/balance", &token).await;
    assert_eq!(balance["held"], json!(0.0));
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"], json!([]));
    let metrics = harness
        .client
        .get(harness.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"parley_ledger_denials_total{reason="insufficient_credits"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_opted_in_route_downgrades_to_what_the_caller_can_afford_and_says_so() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": "cheap please", "route": "thrifty"}),
            )
            .await,
    )
    .await;
    let model = data(&events[0]);
    assert_eq!(model["model"], "sim-cheap");
    assert_eq!(model["downgraded"], true);
    assert_eq!(model["fallbackApplied"], false);
    assert_eq!(chunk_text(&events), "cheap please");
    // 7 estimated input tokens (3 for the text, 4 for the turn) and 2
    // words out, at 1/1k each.
    assert_eq!(
        data(events.last().unwrap())["credits"],
        json!({"charged": 0.009, "remaining": 9.991})
    );
    assert!(harness.openai.calls().is_empty());
}

#[tokio::test]
async fn a_ledger_outage_refuses_replies_before_any_provider_call_and_recovers() {
    let real = parley_test_support::env::mongodb_uri();
    let proxy = parley_test_support::proxy::TcpProxy::start(
        parley_test_support::proxy::host_port(&real)
            .unwrap()
            .to_owned(),
        None,
    )
    .await
    .unwrap();
    let uri = format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=300&connectTimeoutMS=300&heartbeatFrequencyMS=500",
        proxy.address()
    );
    let database = parley_test_support::env::unique_name("parley-reply-outage").replace('-', "_");
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let ledger = MongoLedger::new(&client.database(&database), common::LEDGER_SETTINGS);
    ledger.create_indexes().await.unwrap();
    let harness =
        Harness::start_with_ledger(Duration::from_secs(30), 30, Some(Arc::new(ledger))).await;
    harness
        .openai
        .set_script(OPENAI_MODEL, Script::reply(["fine"]));
    let token = user();
    let session = harness.session(&token).await;
    let path = format!("/api/chat/sessions/{session}/stream");
    let body = json!({"message": "hi", "route": "open"});

    proxy.stop().await;
    for _ in 0..3 {
        let response = harness.post(&path, &token, body.clone()).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["code"], "LEDGER_UNAVAILABLE", "{error}");
    }
    assert!(harness.openai.calls().is_empty(), "the provider was called");

    let proxy = parley_test_support::proxy::TcpProxy::start(
        parley_test_support::proxy::host_port(&real)
            .unwrap()
            .to_owned(),
        Some(proxy.address()),
    )
    .await
    .unwrap();
    // The driver finds the server again within a few heartbeats; no restart.
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..40 {
        let response = harness.post(&path, &token, body.clone()).await;
        status = response.status();
        if status == StatusCode::OK {
            let events = drain(events(response)).await;
            assert_eq!(chunk_text(&events), "fine");
            assert!(data(events.last().unwrap())["credits"].is_object());
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(status, StatusCode::OK);
    assert_eq!(harness.openai.calls().len(), 1);
    proxy.stop().await;
    let cleanup = mongodb::Client::with_uri_str(&real).await.unwrap();
    cleanup.database(&database).drop().await.unwrap();
}

/// A disk whose fsync fails once `failing` is set.
#[derive(Debug)]
struct FailingDisk {
    memory: redb::backends::InMemoryBackend,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl redb::StorageBackend for FailingDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.memory.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.memory.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.memory.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("the disk failed"))
        } else {
            self.memory.sync_data()
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.memory.write(offset, data)
    }
}

/// The hold is answered once applied, so the model call overlaps its fsync;
/// when that fsync fails, nothing the model wrote is shown.
#[tokio::test]
async fn a_reply_whose_hold_never_becomes_durable_shows_nothing_of_the_model() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let disk = FailingDisk {
        memory: redb::backends::InMemoryBackend::new(),
        failing: Arc::clone(&failing),
    };
    let database = redb::Database::builder().create_with_backend(disk).unwrap();
    let db = Arc::new(EmbeddedDb::new(database).unwrap());
    let store = EmbeddedStore::new(Arc::clone(&db)).await.unwrap();
    let ledger = EmbeddedLedger::new(db, common::LEDGER_SETTINGS)
        .await
        .unwrap();
    let harness = Harness::start_on(
        Duration::from_secs(30),
        30,
        store,
        Arc::new(ledger),
        tempfile::tempdir().unwrap(),
    )
    .await;
    harness
        .openai
        .set_script(OPENAI_MODEL, Script::reply(["never", "shown"]));
    let token = user();
    let session = harness.session(&token).await;

    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let events = drain(
        harness
            .stream(&token, &session, json!({"message": "hi", "route": "open"}))
            .await,
    )
    .await;
    // The hold was applied and the model called...
    assert_eq!(harness.openai.calls().len(), 1);
    // ...but the reply ended before showing anything it wrote.
    let names: Vec<&str> = events.iter().map(|event| event.event.as_str()).collect();
    assert_eq!(names, ["error"], "{events:?}");
    assert_eq!(data(&events[0])["code"], "STORE_UNAVAILABLE");
}

#[tokio::test]
async fn a_new_session_takes_the_deployments_default_route() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    let with_default = format!("{}defaultRoute: open\n", routes_yaml(30));
    assert!(
        harness
            .replies
            .routes
            .reload_from_yaml(&with_default, "test")
    );
    let token = user();
    let session = harness.session(&token).await;
    assert_eq!(harness.stored(&session, &token).await["route"], "open");
}

// ---------------------------------------------------------------------------
// Route limits: per user and route, on top of the deployment's.

/// A 429 `RATE_LIMITED` naming `limit`, with a Retry-After within a window.
async fn assert_rate_limited(response: reqwest::Response, limit: &str) {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    common::assert_retry_within_a_window(response.headers());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    assert!(
        body["message"].as_str().unwrap().starts_with(limit),
        "{body}"
    );
}

/// A whole reply on `route`.
async fn whole(harness: &Harness, token: &str, session: &str, route: &str) -> reqwest::Response {
    harness
        .post(
            &format!("/api/chat/sessions/{session}/messages"),
            token,
            json!({"message": "hi", "route": route}),
        )
        .await
}

#[tokio::test]
async fn route_limits_refuse_further_replies_on_that_route_for_that_user_only() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness
        .bedrock
        .set_script(METERED_MODEL, Script::reply(["metered"]));
    harness.bedrock.push_script(
        METERED_MODEL,
        Script::reply(["slow"]).with_fault(Fault::Stall { after_deltas: 1 }),
    );
    harness
        .bedrock
        .set_script(PRIMARY, Script::reply(["unmetered"]));
    let (alice, bob) = (user(), common::token("bob", Role::User, &["c1"]));
    let (first, second) = (harness.session(&alice).await, harness.session(&alice).await);
    let bobs = harness.session(&bob).await;

    // Alice's one stream on `metered` stays open, so her next reply there
    // is refused on either endpoint before any provider call.
    let mut open = harness
        .stream(&alice, &first, json!({"message": "hi", "route": "metered"}))
        .await;
    assert_eq!(next(&mut open).await.event, "model");
    for endpoint in ["stream", "messages"] {
        let response = harness
            .post(
                &format!("/api/chat/sessions/{second}/{endpoint}"),
                &alice,
                json!({"message": "hi", "route": "metered"}),
            )
            .await;
        assert_rate_limited(response, "streams").await;
    }
    assert_eq!(harness.bedrock.calls().len(), 1);
    // Another route still answers her, and Bob has a slot of his own.
    let response = whole(&harness, &alice, &second, "default").await;
    assert_eq!(response.status(), StatusCode::OK);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["content"], "unmetered");
    let response = whole(&harness, &bob, &bobs, "metered").await;
    assert_eq!(response.status(), StatusCode::OK);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["content"], "metered");

    // `rationed` allows one reply a minute to each user.
    assert_eq!(
        whole(&harness, &alice, &second, "rationed").await.status(),
        StatusCode::OK
    );
    assert_rate_limited(
        whole(&harness, &alice, &second, "rationed").await,
        "requests",
    )
    .await;
    assert_eq!(
        whole(&harness, &bob, &bobs, "rationed").await.status(),
        StatusCode::OK
    );
    let stored = harness.stored(&second, &alice).await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 4);
}

/// A route whose small window holds a few exchanges: "Be brief." is 3 + 4
/// estimated tokens, "question N" 3 + 4 and the answer "ok" 1 + 4, so with
/// 20 tokens kept for the reply, 120 leave room for seven exchanges beside
/// the system prompt and the new question. The first target's window of 30
/// cannot even hold those (14) beside the reply's 20: it is skipped.
const WINDOWED_ROUTE: &str = "
  - alias: windowed
    systemPrompt: Be brief.
    targets:
      - provider: bedrock
        model: windowed-small
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 20
        contextTokens: 30
      - provider: bedrock
        model: windowed-large
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 20
        contextTokens: 120
";

/// The texts of a Converse request's messages, and of its system prompts.
fn converse_texts(body: &Value) -> (Vec<String>, Vec<String>) {
    let texts = |entries: &Value, nested: bool| {
        entries
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let block = if nested { &entry["content"][0] } else { entry };
                block["text"].as_str().unwrap().to_owned()
            })
            .collect::<Vec<_>>()
    };
    (
        texts(&body["messages"], true),
        texts(&body["system"], false),
    )
}

#[tokio::test]
async fn a_long_session_sends_only_the_newest_turns_that_fit_and_holds_for_them() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(WINDOWED_ROUTE);
    for model in ["windowed-small", "windowed-large"] {
        harness
            .bedrock
            .set_script(model, Script::reply(["ok"]).with_usage(1, 1));
    }
    let token = user();
    let session = harness.session(&token).await;
    let messages = format!("/api/chat/sessions/{session}/messages");
    for index in 0..=10 {
        let body = json!({"message": format!("question {index}"), "route": "windowed"});
        let response = harness.post(&messages, &token, body).await;
        assert_eq!(response.status(), StatusCode::OK, "question {index}");
    }
    let calls = harness.bedrock.calls();
    assert_eq!(calls.len(), 11);
    // The small window (30 - 20 output) cannot hold the system prompt and a
    // question: every reply skipped it.
    assert!(calls.iter().all(|call| call.model == "windowed-large"));
    let (first, system) = converse_texts(&calls[0].body);
    assert_eq!(
        (first, system),
        (vec!["question 0".to_owned()], vec!["Be brief.".to_owned()])
    );
    // The eleventh question: 100 tokens for the prompt, 14 of them the
    // system prompt and the question, 84 for seven exchanges of 12; the
    // eighth newest turn (an answer, 5) would not fit.
    let (last, system) = converse_texts(&calls[10].body);
    assert_eq!(system, ["Be brief."]);
    let mut expected: Vec<String> = (3..10)
        .flat_map(|index| [format!("question {index}"), "ok".to_owned()])
        .collect();
    expected.push("question 10".to_owned());
    assert_eq!(last, expected);

    // The hold was priced on that prompt: 98 input tokens and 20 output at
    // 1/1k; each reply was charged the usage reported (1 + 1).
    let usage = harness.get_json("/api/credits/usage?limit=1", &token).await;
    let record = &usage["records"][0];
    assert_eq!(record["modelId"], "windowed-large", "{usage}");
    assert_eq!(record["held"], json!(0.118), "{record}");
    assert_eq!(record["charged"], json!(0.002), "{record}");
    // The whole session is still stored.
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 22);
}

#[tokio::test]
async fn a_message_no_window_can_hold_is_422_before_any_hold_or_provider_call() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(WINDOWED_ROUTE);
    let token = user();
    let session = harness.session(&token).await;
    // 400 bytes: 100 + 4 tokens, past the largest window's 120 - 20 - 7.
    let long = "x".repeat(400);
    for endpoint in ["stream", "messages"] {
        let response = harness
            .post(
                &format!("/api/chat/sessions/{session}/{endpoint}"),
                &token,
                json!({"message": long, "route": "windowed"}),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{endpoint}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "MESSAGE_TOO_LONG_FOR_MODEL", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("about 131 tokens") && message.contains("window of 120 tokens"),
            "{message}"
        );
    }
    // The same through the OpenAI-compatible API, in its own shape.
    let response = harness
        .post(
            "/v1/chat/completions",
            &token,
            json!({"model": "windowed", "messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");

    assert!(
        harness.bedrock.calls().is_empty(),
        "the provider was called"
    );
    let usage = harness.get_json("/api/credits/usage", &token).await;
    assert_eq!(usage["records"], json!([]), "a hold was taken: {usage}");
    let balance = harness.get_json("/api/credits/balance", &token).await;
    assert_eq!(balance["held"], json!(0.0));
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"], json!([]));
}

#[tokio::test]
async fn a_fallback_whose_window_cannot_hold_the_message_is_skipped() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    // 40 bytes: 10 + 4 tokens, more than the cramped target's 30 - 20.
    let skipping = "
  - alias: skipping
    fallbackOn: [throttled]
    targets:
      - {provider: bedrock, model: roomy, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 20, contextTokens: 1000}
      - {provider: bedrock, model: cramped, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 20, contextTokens: 30}
      - {provider: bedrock, model: last, pricing: {inputPer1k: 2, outputPer1k: 2}, maxOutputTokens: 20, contextTokens: 1000}
";
    harness.add_routes(skipping);
    harness
        .bedrock
        .set_script("roomy", Script::rejected(Rejection::Throttled));
    for model in ["cramped", "last"] {
        harness
            .bedrock
            .set_script(model, Script::reply(["fine"]).with_usage(1, 1));
    }
    let token = user();
    let session = harness.session(&token).await;
    let message = "x".repeat(40);
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": message, "route": "skipping"}),
            )
            .await,
    )
    .await;
    let model = data(&events[0]);
    assert_eq!(model["model"], "last", "{model}");
    assert_eq!(model["fallbackApplied"], true);
    let called: Vec<String> = harness
        .bedrock
        .calls()
        .into_iter()
        .map(|call| call.model)
        .collect();
    assert_eq!(called, ["roomy", "last"]);
    // Re-priced for the last target: 14 input tokens and 20 output at 2/1k.
    let usage = harness.get_json("/api/credits/usage", &token).await;
    assert_eq!(usage["records"][0]["held"], json!(0.068), "{usage}");
}

// ---------------------------------------------------------------------------
// Circuit breakers: a failing target is skipped at once.

const GUARDED_PRIMARY: &str = "guarded-primary";
const GUARDED_SECONDARY: &str = "guarded-secondary";
/// The primary's timeout: an open breaker answers well within it.
const GUARDED_TIMEOUT: Duration = Duration::from_secs(2);

const GUARDED_ROUTE: &str = "
  - alias: guarded
    fallbackOn: [throttled, unavailable, timeout]
    targets:
      - provider: bedrock
        model: guarded-primary
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
        timeoutSeconds: 2
        circuitBreaker: {failureThreshold: 2, windowSeconds: 60, cooldownSeconds: 3}
      - provider: bedrock
        model: guarded-secondary
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
";

impl Harness {
    /// One reply on `route` in a new session: which model answered, and
    /// how long its `model` event took.
    async fn answered_by(&self, token: &str, route: &str) -> (String, Duration) {
        let session = self.session(token).await;
        let started = std::time::Instant::now();
        let mut stream = self
            .stream(token, &session, json!({"message": "hi", "route": route}))
            .await;
        let first = next(&mut stream).await;
        let waited = started.elapsed();
        assert_eq!(first.event, "model", "{first:?}");
        let rest = drain(stream).await;
        assert_eq!(rest.last().unwrap().event, "complete", "{rest:?}");
        (data(&first)["model"].as_str().unwrap().to_owned(), waited)
    }

    fn calls_to(&self, model: &str) -> usize {
        self.bedrock
            .calls()
            .iter()
            .filter(|call| call.model == model)
            .count()
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

#[tokio::test]
async fn a_failing_target_opens_its_breaker_then_one_probe_after_the_cooldown_decides() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(GUARDED_ROUTE);
    harness.bedrock.set_script(
        GUARDED_PRIMARY,
        Script::reply(["never"]).with_fault(Fault::Stall { after_deltas: 0 }),
    );
    harness
        .bedrock
        .set_script(GUARDED_SECONDARY, Script::reply(["from the second"]));
    let token = user();

    // Two timeouts within the window open the breaker; each reply waited
    // for the timeout before falling back.
    for _ in 0..2 {
        let (model, waited) = harness.answered_by(&token, "guarded").await;
        assert_eq!(model, GUARDED_SECONDARY);
        assert!(waited >= GUARDED_TIMEOUT, "{waited:?}");
    }
    assert_eq!(harness.calls_to(GUARDED_PRIMARY), 2);

    // Open: the primary is not called, and the first token comes without
    // another timeout's wait.
    let (model, waited) = harness.answered_by(&token, "guarded").await;
    assert_eq!(model, GUARDED_SECONDARY);
    println!("time to the model event with the primary's breaker open: {waited:?}");
    assert!(waited < GUARDED_TIMEOUT, "{waited:?}");
    assert_eq!(harness.calls_to(GUARDED_PRIMARY), 2);
    let metrics = harness.metrics().await;
    for line in [
        "parley_target_state{route=\"guarded\",model=\"guarded-primary\"} 2",
        "parley_breaker_transitions_total{route=\"guarded\",model=\"guarded-primary\",to=\"open\"} 1",
        "parley_fallbacks_total{from=\"guarded-primary\",to=\"guarded-secondary\",reason=\"circuit_open\"} 1",
        "parley_fallbacks_total{from=\"guarded-primary\",to=\"guarded-secondary\",reason=\"timeout\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }

    // After the cooldown one probe goes to the primary; it fails (fast, an
    // outage this time), so the breaker opens again and the next reply
    // skips the primary once more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    harness.bedrock.set_script(
        GUARDED_PRIMARY,
        Script::rejected(Rejection::ServiceUnavailable),
    );
    let (model, _) = harness.answered_by(&token, "guarded").await;
    assert_eq!(model, GUARDED_SECONDARY);
    assert_eq!(harness.calls_to(GUARDED_PRIMARY), 3, "one probe");
    let (model, _) = harness.answered_by(&token, "guarded").await;
    assert_eq!(model, GUARDED_SECONDARY);
    assert_eq!(harness.calls_to(GUARDED_PRIMARY), 3, "open again");

    // After the next cooldown the probe succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    harness
        .bedrock
        .set_script(GUARDED_PRIMARY, Script::reply(["back again"]));
    for expected_calls in [4, 5] {
        let (model, _) = harness.answered_by(&token, "guarded").await;
        assert_eq!(model, GUARDED_PRIMARY);
        assert_eq!(harness.calls_to(GUARDED_PRIMARY), expected_calls);
    }
    let metrics = harness.metrics().await;
    for line in [
        "parley_target_state{route=\"guarded\",model=\"guarded-primary\"} 0",
        "parley_breaker_transitions_total{route=\"guarded\",model=\"guarded-primary\",to=\"open\"} 2",
        "parley_breaker_transitions_total{route=\"guarded\",model=\"guarded-primary\",to=\"half_open\"} 2",
        "parley_breaker_transitions_total{route=\"guarded\",model=\"guarded-primary\",to=\"closed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn the_last_target_left_is_tried_even_when_its_breaker_is_open() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(
        "
  - alias: single
    fallbackOn: [throttled, unavailable, timeout]
    targets:
      - provider: bedrock
        model: single-model
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
        circuitBreaker: {failureThreshold: 1, cooldownSeconds: 600}
",
    );
    harness
        .bedrock
        .set_script("single-model", Script::rejected(Rejection::Throttled));
    let token = user();
    for _ in 0..2 {
        let session = harness.session(&token).await;
        let response = harness
            .post(
                &format!("/api/chat/sessions/{session}/messages"),
                &token,
                json!({"message": "hi", "route": "single"}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    // Open after the first failure, yet the only target is still asked:
    // failing at once would gain nothing, and it answers as soon as it can.
    harness
        .bedrock
        .set_script("single-model", Script::reply(["fine now"]));
    let (model, _) = harness.answered_by(&token, "single").await;
    assert_eq!(model, "single-model");
    assert_eq!(harness.calls_to("single-model"), 3);
}

// ---------------------------------------------------------------------------
// Content policy: on the user's message before anything is paid for, on the
// reply as it streams.

const POLICED_MODEL: &str = "policed-model";

const POLICED_ROUTE: &str = "
  - alias: policed
    contentPolicy:
      rules:
        - {name: cheating, words: [answer key], direction: input, reason: Ask your teacher for help instead.}
        - {name: password, words: [password], action: mask}
        - {name: weapons, words: [explosive], direction: output}
    targets:
      - provider: bedrock
        model: policed-model
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
";

impl Harness {
    async fn blocks(&self) -> Vec<parley_service::store::PolicyBlock> {
        let query = BlockQuery {
            user: None,
            scope: CohortScope::All,
            page: PageRequest {
                page: 1,
                limit: 100,
            },
        };
        self.store.blocks(&query).await.unwrap().blocks
    }
}

#[tokio::test]
async fn a_blocked_message_never_reaches_the_model_and_holds_nothing() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(POLICED_ROUTE);
    let token = user();
    let session = harness.session(&token).await;
    let message = "Where can I find the Answer Key for tomorrow?";
    for endpoint in ["stream", "messages"] {
        let response = harness
            .post(
                &format!("/api/chat/sessions/{session}/{endpoint}"),
                &token,
                json!({"message": message, "route": "policed"}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{endpoint}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "CONTENT_BLOCKED", "{body}");
        assert_eq!(body["message"], "Ask your teacher for help instead.");
    }
    let response = harness
        .post(
            "/v1/chat/completions",
            &token,
            json!({"model": "policed", "messages": [{"role": "user", "content": message}]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_policy_violation", "{body}");
    assert_eq!(
        body["error"]["message"],
        "Ask your teacher for help instead."
    );

    assert!(harness.bedrock.calls().is_empty(), "the model was called");
    let usage = harness.get_json("/api/credits/usage", &token).await;
    assert_eq!(usage["records"], json!([]), "a hold was taken: {usage}");
    assert_eq!(
        harness.stored(&session, &token).await["messages"],
        json!([])
    );

    let blocks = harness.blocks().await;
    assert_eq!(blocks.len(), 3);
    for block in &blocks {
        assert_eq!(
            (block.direction, block.rule.as_str(), block.route.as_str()),
            (BlockDirection::Input, "cheating", "policed")
        );
        assert_eq!(block.user_cohorts, ["c1"]);
        assert_eq!(block.model, None);
        let excerpt = block.excerpt.as_deref().unwrap();
        // Twenty characters of context on each side, never the match.
        assert_eq!(excerpt, "here can I find the *** for tomorrow?");
    }
    // Newest first: the OpenAI call named no session.
    let sessions: Vec<Option<String>> = blocks
        .iter()
        .map(|block| block.session_id.map(|id| id.to_hex()))
        .collect();
    assert_eq!(sessions, [None, Some(session.clone()), Some(session)]);
    let metrics = harness.metrics().await;
    let line =
        "parley_content_blocks_total{route=\"policed\",direction=\"input\",rule=\"cheating\"} 3";
    assert!(metrics.contains(line), "{metrics}");
}

#[tokio::test]
async fn a_masked_word_is_masked_in_the_message_and_across_chunks_of_the_reply() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(POLICED_ROUTE);
    harness.bedrock.set_script(
        POLICED_MODEL,
        Script::reply(["Your pass", "word is ", "hunter2; the PASSWORD", " is safe"]),
    );
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": "is my password safe?", "route": "policed"}),
            )
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap().event, "complete", "{events:?}");
    let shown = chunk_text(&events);
    assert_eq!(shown, "Your *** is hunter2; the *** is safe");
    // The model got the masked message; the session keeps what was shown.
    let sent = &harness.bedrock.calls()[0].body;
    assert_eq!(sent["messages"][0]["content"][0]["text"], "is my *** safe?");
    let stored = harness.stored(&session, &token).await;
    assert_eq!(stored["messages"][0]["content"], "is my *** safe?");
    assert_eq!(stored["messages"][1]["content"], shown);
    assert!(harness.blocks().await.is_empty(), "masks are not blocks");
}

#[tokio::test]
async fn a_blocking_rule_mid_reply_ends_it_with_the_partial_stored_redacted_and_settled() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(POLICED_ROUTE);
    harness.bedrock.set_script(
        POLICED_MODEL,
        Script::reply([
            "Here is how ",
            "to make an explo",
            "sive at home",
            " and more",
        ])
        .with_usage(10, 4),
    );
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": "chemistry?", "route": "policed"}),
            )
            .await,
    )
    .await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(data(last)["code"], "CONTENT_BLOCKED");
    assert_eq!(
        data(last)["message"],
        "this content is not allowed here",
        "a rule without a reason gets the generic sentence"
    );
    let shown = chunk_text(&events);
    assert_eq!(shown, "Here is how to make an ");

    let stored = harness.stored(&session, &token).await;
    let reply = &stored["messages"][1];
    assert_eq!(
        reply["content"],
        format!("{shown}\n\n[removed by the content policy]")
    );
    assert_eq!(reply["incomplete"], true);
    let usage = harness.get_json("/api/credits/usage", &token).await;
    let record = &usage["records"][0];
    assert_eq!(record["outcome"], "failed", "{usage}");
    assert!(record["charged"].as_f64().unwrap() > 0.0, "{usage}");
    assert_eq!(
        harness.get_json("/api/credits/balance", &token).await["held"],
        json!(0.0)
    );

    let blocks = harness.blocks().await;
    assert_eq!(blocks.len(), 1);
    let block = &blocks[0];
    assert_eq!(
        (block.direction, block.rule.as_str(), block.model.as_deref()),
        (BlockDirection::Output, "weapons", Some(POLICED_MODEL))
    );
    assert_eq!(block.session_id.map(|id| id.to_hex()), Some(session));
    assert!(!block.excerpt.as_deref().unwrap().contains("explosive"));
    let metrics = harness.metrics().await;
    let line =
        "parley_content_blocks_total{route=\"policed\",direction=\"output\",rule=\"weapons\"} 1";
    assert!(metrics.contains(line), "{metrics}");
}

const GUARDED_BY_BEDROCK: &str = "
  - alias: guardrailed
    targets:
      - provider: bedrock
        model: guardrailed-model
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
        guardrailIdentifier: school-guardrail
        guardrailVersion: '2'
";

#[tokio::test]
async fn a_guardrail_intervention_ends_the_reply_like_a_blocking_rule() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(GUARDED_BY_BEDROCK);
    harness.bedrock.set_script(
        "guardrailed-model",
        Script::reply(["The war ", "began when ", "the army ", "attacked"])
            .with_usage(12, 3)
            .with_guardrail(GuardrailIntervention::on_output(
                2,
                [
                    GuardrailFinding::Content("VIOLENCE".into()),
                    GuardrailFinding::Topic("Homework".into()),
                ],
            )),
    );
    let token = user();
    let session = harness.session(&token).await;
    let events = drain(
        harness
            .stream(
                &token,
                &session,
                json!({"message": "history essay", "route": "guardrailed"}),
            )
            .await,
    )
    .await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(data(last)["code"], "CONTENT_BLOCKED");
    // What Bedrock sent before and as its intervention was shown.
    let shown = chunk_text(&events);
    assert_eq!(
        shown,
        "The war began when Sorry, the model cannot answer this question."
    );
    // The guardrail named in the route reached Bedrock.
    let call = &harness.bedrock.calls()[0];
    let guardrail = call.guardrail.as_ref().unwrap();
    assert_eq!(
        (guardrail.identifier.as_str(), guardrail.version.as_str()),
        ("school-guardrail", "2")
    );

    let stored = harness.stored(&session, &token).await;
    let reply = &stored["messages"][1];
    assert_eq!(
        reply["content"],
        format!("{shown}\n\n[removed by the content policy]")
    );
    assert_eq!(reply["incomplete"], true);
    let usage = harness.get_json("/api/credits/usage", &token).await;
    let record = &usage["records"][0];
    assert_eq!(
        (
            &record["outcome"],
            &record["inputTokens"],
            &record["outputTokens"]
        ),
        (&json!("failed"), &json!(12), &json!(3)),
        "{usage}"
    );
    let blocks = harness.blocks().await;
    assert_eq!(blocks.len(), 1);
    let block = &blocks[0];
    assert_eq!(
        (
            block.direction,
            block.kind,
            block.rule.as_str(),
            block.excerpt.as_deref()
        ),
        (
            BlockDirection::Output,
            BlockKind::Guardrail,
            "guardrail:school-guardrail",
            Some("content:VIOLENCE, topic:Homework")
        )
    );
    let metrics = harness.metrics().await;
    let line = "parley_content_blocks_total{route=\"guardrailed\",direction=\"output\",rule=\"guardrail:school-guardrail\"} 1";
    assert!(metrics.contains(line), "{metrics}");
}

#[tokio::test]
async fn a_guardrail_blocking_the_message_keeps_nothing_and_releases_the_hold() {
    let harness = Harness::start(Duration::from_secs(30), 30).await;
    harness.add_routes(GUARDED_BY_BEDROCK);
    harness.bedrock.set_script(
        "guardrailed-model",
        Script::reply(["never shown"]).with_guardrail(GuardrailIntervention::on_input([
            GuardrailFinding::Pii {
                entity: "EMAIL".into(),
                matched: "kid@example.com".into(),
            },
        ])),
    );
    let token = user();
    let session = harness.session(&token).await;
    let response = harness
        .post(
            &format!("/api/chat/sessions/{session}/messages"),
            &token,
            json!({"message": "mail kid@example.com", "route": "guardrailed"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "CONTENT_BLOCKED", "{body}");
    // The flagged message is not kept in the session, and with no output
    // generated the hold is released, as for any reply failed before output.
    assert_eq!(
        harness.stored(&session, &token).await["messages"],
        json!([])
    );
    let usage = harness.get_json("/api/credits/usage", &token).await;
    let record = &usage["records"][0];
    assert_eq!(
        (&record["outcome"], &record["charged"]),
        (&json!("released"), &json!(0.0)),
        "{usage}"
    );
    assert_eq!(
        harness.get_json("/api/credits/balance", &token).await["held"],
        json!(0.0)
    );
    let blocks = harness.blocks().await;
    assert_eq!(
        (blocks[0].direction, blocks[0].excerpt.as_deref()),
        (BlockDirection::Input, Some("pii:EMAIL"))
    );
}

/// A model whose whole reply is ready at once, as when an upstream's reply
/// arrives in one read: `deltas` words, then the end. Counts the deltas the
/// reply has taken from it. Its first reply never comes when `stalls_first`
/// is set, so that reply keeps generating; `stalled` says when it began.
struct BurstProvider {
    deltas: usize,
    taken: Arc<AtomicUsize>,
    stalls_first: AtomicBool,
    stalled: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Provider for BurstProvider {
    async fn stream(&self, _request: CompletionRequest) -> Result<ProviderStream, ProviderError> {
        if self.stalls_first.swap(false, Ordering::SeqCst) {
            self.stalled.notify_one();
            return Ok(futures::stream::pending().boxed());
        }
        let taken = Arc::clone(&self.taken);
        let deltas = (0..self.deltas).map(move |_| {
            taken.fetch_add(1, Ordering::SeqCst);
            Ok(ProviderEvent::Delta("word ".into()))
        });
        let end = Ok(ProviderEvent::Finished {
            stop_reason: StopReason::EndTurn,
        });
        Ok(futures::stream::iter(deltas.chain([end])).boxed())
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError> {
        collect(self.stream(request).await?).await
    }
}

const BURST: usize = 300;

/// Streams a reply whose `BURST` deltas are all ready at once, on the test
/// runtime's one worker, with another reply generating meanwhile or not;
/// answers how many deltas the reply had taken when the connection showed
/// the first token.
async fn taken_when_a_burst_is_first_shown(another_reply_generating: bool) -> usize {
    let (store, _dir) = common::embedded_store().await;
    let taken = Arc::new(AtomicUsize::new(0));
    let stalled = Arc::new(tokio::sync::Notify::new());
    let provider = BurstProvider {
        deltas: BURST,
        taken: Arc::clone(&taken),
        stalls_first: AtomicBool::new(another_reply_generating),
        stalled: Arc::clone(&stalled),
    };
    let mut registry = Registry::default();
    let replies = common::builtin_replies_on(provider, &mut registry);
    let ledger = common::embedded_ledger(&store).await;
    let router = parley_service::app(common::state_with_replies(
        Arc::new(store),
        ledger,
        registry,
        replies,
    ));
    let token = user();
    let stream = |session: String| {
        router.clone().oneshot(common::request(
            "POST",
            &format!("/api/chat/sessions/{session}/stream"),
            Some(&token),
            Some(json!({"message": "hello"})),
        ))
    };
    // Kept open, unread, to the end of the test.
    let _generating = if another_reply_generating {
        let session = common::create_session(&router, &token, json!({})).await;
        let response = stream(session).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        stalled.notified().await;
        Some(response)
    } else {
        None
    };
    let session = common::create_session(&router, &token, json!({})).await;
    let response = stream(session).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = String::new();
    let mut taken_when_shown = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap().into_data().unwrap();
        received.push_str(std::str::from_utf8(&frame).unwrap());
        if taken_when_shown.is_none() && received.contains("event: chunk") {
            taken_when_shown = Some(taken.load(Ordering::SeqCst));
        }
    }
    assert_eq!(received.matches("event: chunk").count(), BURST);
    assert!(received.contains("event: complete"), "{received}");
    taken_when_shown.unwrap()
}

#[tokio::test]
async fn the_first_token_of_a_burst_is_shown_before_the_rest_is_read() {
    // On this test's single thread the reply would read the whole burst
    // before the connection ran, had it not stepped aside after the first
    // token.
    assert_eq!(taken_when_a_burst_is_first_shown(false).await, 1);
}

#[tokio::test]
async fn a_burst_is_read_whole_while_more_replies_generate_than_workers() {
    // Two replies generating on one worker: the burst is read whole, and
    // its first token leaves with the rest, in one write.
    assert_eq!(taken_when_a_burst_is_first_shown(true).await, BURST);
}
