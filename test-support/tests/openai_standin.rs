//! The OpenAI-compatible stand-in, driven over real HTTP with reqwest and a
//! real SSE parser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use parley_test_support::openai::OpenAiStandIn;
use parley_test_support::script::{Fault, Rejection, Script, Stop, StreamFailure};
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m";
/// Upper bound for anything that should happen promptly; never a wait.
const PROMPTLY: Duration = Duration::from_secs(10);

fn request(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [
            { "role": "system", "content": "be brief" },
            { "role": "user", "content": "three word prompt" },
        ],
        "max_tokens": 32,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

async fn post(standin: &OpenAiStandIn, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", standin.base_url()))
        .bearer_auth("sk-standin")
        .json(body)
        .send()
        .await
        .unwrap()
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>>>>;

fn events(response: reqwest::Response) -> Events {
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|event| event.map_err(|e| e.to_string())),
    )
}

/// Every `data` payload up to and including `[DONE]`.
async fn all_data(events: &mut Events) -> Vec<String> {
    let mut data = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let done = event.data == "[DONE]";
        data.push(event.data);
        if done {
            break;
        }
    }
    data
}

fn content(chunk: &Value) -> Option<&str> {
    chunk
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
}

#[tokio::test]
async fn a_completion_returns_the_scripted_reply_and_records_the_request() {
    let standin = OpenAiStandIn::start().await.unwrap();
    standin.set_script(MODEL, Script::reply(["Hel", "lo"]));

    let response = post(&standin, &request(false, false)).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["content"], "Hello");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    // Default usage: words of all messages in, deltas out.
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    );

    let calls = standin.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].model, MODEL);
    assert!(!calls[0].streaming);
    assert_eq!(calls[0].body["max_tokens"], 32);
    assert_eq!(calls[0].authorization.as_deref(), Some("Bearer sk-standin"));
}

#[tokio::test]
async fn a_stream_reassembles_awkward_text_and_ends_with_usage_and_done() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let deltas = [
        "a\nb",
        "\r\n",
        "c\\d",
        "\"e\"",
        " 😀",
        " 中文",
        "\n\ndata: [DONE]\n\n",
        "z",
    ];
    standin.set_script(
        MODEL,
        Script::reply(deltas)
            .with_stop(Stop::MaxTokens)
            .with_usage(9, 8),
    );

    let response = post(&standin, &request(true, true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let data = all_data(&mut events(response)).await;

    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let texts: Vec<&str> = chunks[1..=deltas.len()]
        .iter()
        .filter_map(content)
        .collect();
    assert_eq!(texts, deltas);
    let finish = &chunks[deltas.len() + 1];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[deltas.len() + 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 9);
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(chunks.len(), deltas.len() + 3);
}

#[tokio::test]
async fn without_include_usage_there_is_no_usage_chunk() {
    let standin = OpenAiStandIn::start().await.unwrap();
    standin.set_script(MODEL, Script::reply(["x"]));
    let data = all_data(&mut events(post(&standin, &request(true, false)).await)).await;
    let chunks = data.len() - 1;
    // role chunk, one delta, finish chunk, [DONE]
    assert_eq!(chunks, 3);
    assert!(data.iter().all(|d| !d.contains("\"usage\"")));
}

#[tokio::test]
async fn rejections_are_http_errors_with_openai_error_bodies() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let expected = [
        (Rejection::Throttled, 429, "rate_limit_exceeded"),
        (Rejection::ServiceUnavailable, 503, "service_unavailable"),
        (Rejection::InternalError, 500, "internal_error"),
        (Rejection::AccessDenied, 401, "invalid_api_key"),
        (
            Rejection::ContextWindowExceeded,
            400,
            "context_length_exceeded",
        ),
    ];
    for (rejection, status, code) in expected {
        for stream in [false, true] {
            standin.push_script(MODEL, Script::rejected(rejection));
            let response = post(&standin, &request(stream, true)).await;
            assert_eq!(response.status(), status, "{rejection:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], code, "{rejection:?}");
        }
    }
}

#[tokio::test]
async fn a_stream_error_event_follows_the_deltas() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let fault = Fault::StreamError {
        after_deltas: 1,
        failure: StreamFailure::ServiceUnavailable,
    };
    standin.set_script(MODEL, Script::reply(["one", "two"]).with_fault(fault));
    let mut events = events(post(&standin, &request(true, true)).await);
    let mut data = Vec::new();
    while let Some(event) = events.next().await {
        data.push(event.unwrap().data);
    }
    let chunks: Vec<Value> = data
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3);
    assert_eq!(content(&chunks[1]), Some("one"));
    assert_eq!(chunks[2]["error"]["code"], "service_unavailable");
}

#[tokio::test]
async fn a_stall_keeps_the_connection_silent_until_the_client_leaves() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let script = Script::reply(["first", "never"]).with_fault(Fault::Stall { after_deltas: 1 });
    standin.set_script(MODEL, script);
    let mut events = events(post(&standin, &request(true, true)).await);

    let role = events.next().await.unwrap().unwrap();
    assert!(role.data.contains("assistant"));
    let first: Value = serde_json::from_str(&events.next().await.unwrap().unwrap().data).unwrap();
    assert_eq!(content(&first), Some("first"));
    let stalled = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(stalled.is_err(), "expected a stall, got {stalled:?}");

    drop(events);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the stand-in never saw the client leave");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_seen() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let deltas: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    standin.set_script(
        MODEL,
        Script::reply(deltas).with_delta_delay(Duration::from_millis(20)),
    );
    let mut events = events(post(&standin, &request(true, true)).await);
    for _ in 0..3 {
        events.next().await.unwrap().unwrap();
    }
    drop(events);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the stand-in never saw the client leave");
    assert_eq!(standin.stream_counts().finished, 0);
}

#[tokio::test]
async fn a_scripted_disconnect_breaks_the_stream() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let script = Script::reply(["only", "lost"]).with_fault(Fault::Disconnect { after_deltas: 1 });
    standin.set_script(MODEL, script);
    let mut events = events(post(&standin, &request(true, true)).await);
    let mut outcome = Vec::new();
    while let Some(event) = events.next().await {
        outcome.push(event.map(|e| e.data));
    }
    assert_eq!(outcome.len(), 3, "{outcome:?}");
    assert!(
        outcome[2].is_err(),
        "a broken stream must end with an error: {outcome:?}"
    );
    assert!(
        outcome
            .iter()
            .all(|o| o.as_ref().map_or(true, |d| d != "[DONE]"))
    );
}
