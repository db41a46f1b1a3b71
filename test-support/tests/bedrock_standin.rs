//! The Bedrock stand-in, driven by the real `aws-sdk-bedrockruntime` client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::retry::RetryConfig;
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Region};
use aws_sdk_bedrockruntime::error::SdkError;
use aws_sdk_bedrockruntime::operation::converse::ConverseError;
use aws_sdk_bedrockruntime::operation::converse_stream::{
    ConverseStreamError, ConverseStreamOutput,
};
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput as Event,
    InferenceConfiguration, Message, StopReason,
};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::script::{Fault, Rejection, Script, Stop, StreamFailure};

const MODEL: &str = "amazon.nova-micro-v1:0";
/// Upper bound for anything that should happen promptly; never a wait.
const PROMPTLY: Duration = Duration::from_secs(10);

fn client(standin: &BedrockStandIn) -> Client {
    let config = aws_sdk_bedrockruntime::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(standin.base_url())
        .credentials_provider(Credentials::new(
            "AKIDSTANDIN",
            "secret",
            None,
            None,
            "test",
        ))
        // Each scripted fault must reach the test, not be retried away.
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

fn user(text: &str) -> Message {
    Message::builder()
        .role(ConversationRole::User)
        .content(ContentBlock::Text(text.to_owned()))
        .build()
        .unwrap()
}

async fn start_stream(client: &Client, prompt: &str) -> ConverseStreamOutput {
    client
        .converse_stream()
        .model_id(MODEL)
        .messages(user(prompt))
        .inference_config(InferenceConfiguration::builder().max_tokens(64).build())
        .send()
        .await
        .unwrap()
}

/// Every event until the end of the stream.
async fn all_events(output: &mut ConverseStreamOutput) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = output.stream.recv().await.unwrap() {
        events.push(event);
    }
    events
}

fn delta_text(event: &Event) -> Option<&str> {
    match event {
        Event::ContentBlockDelta(delta) => match delta.delta() {
            Some(ContentBlockDelta::Text(text)) => Some(text),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn converse_returns_the_scripted_reply_and_records_the_request() {
    let standin = BedrockStandIn::start().await.unwrap();
    standin.set_script(MODEL, Script::reply(["Hello", ", world"]).with_usage(12, 3));

    let reply = client(&standin)
        .converse()
        .model_id(MODEL)
        .messages(user("hi there"))
        .inference_config(InferenceConfiguration::builder().max_tokens(64).build())
        .send()
        .await
        .unwrap();

    let message = reply.output().unwrap().as_message().unwrap();
    assert_eq!(message.role(), &ConversationRole::Assistant);
    assert_eq!(message.content()[0].as_text().unwrap(), "Hello, world");
    assert_eq!(reply.stop_reason(), &StopReason::EndTurn);
    let usage = reply.usage().unwrap();
    assert_eq!(
        (
            usage.input_tokens(),
            usage.output_tokens(),
            usage.total_tokens()
        ),
        (12, 3, 15)
    );

    let calls = standin.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].model, MODEL);
    assert!(!calls[0].streaming);
    assert_eq!(
        calls[0].body.pointer("/inferenceConfig/maxTokens"),
        Some(&64.into())
    );
    assert_eq!(
        calls[0].body.pointer("/messages/0/role"),
        Some(&"user".into())
    );
    assert_eq!(
        calls[0].body.pointer("/messages/0/content/0/text"),
        Some(&"hi there".into())
    );
    let authorization = calls[0].authorization.as_deref().unwrap();
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDSTANDIN/"),
        "{authorization}"
    );
}

#[tokio::test]
async fn converse_stream_reassembles_awkward_text_exactly() {
    let standin = BedrockStandIn::start().await.unwrap();
    let deltas = [
        "line one\nline two",
        "\r\n",
        "back\\slash \\n not a newline",
        " \"quoted\" 'single'",
        " emoji 😀👩‍👩‍👧",
        " 中文、日本語",
        "\n\ndata: not an event\n\n",
        "",
        "é",
    ];
    standin.set_script(MODEL, Script::reply(deltas).with_stop(Stop::MaxTokens));

    let mut output = start_stream(&client(&standin), "four words of prompt").await;
    let events = all_events(&mut output).await;

    match &events[0] {
        Event::MessageStart(start) => assert_eq!(start.role(), &ConversationRole::Assistant),
        other => panic!("first event {other:?}"),
    }
    let received: Vec<&str> = events.iter().filter_map(delta_text).collect();
    assert_eq!(received, deltas);
    assert_eq!(received.concat(), deltas.concat());
    let tail: Vec<&Event> = events.iter().skip(1 + deltas.len()).collect();
    assert!(matches!(tail[0], Event::ContentBlockStop(stop) if stop.content_block_index() == 0));
    assert!(
        matches!(tail[1], Event::MessageStop(stop) if stop.stop_reason() == &StopReason::MaxTokens)
    );
    match tail[2] {
        Event::Metadata(metadata) => {
            let usage = metadata.usage().unwrap();
            // Default usage: words of the prompt in, deltas out.
            assert_eq!(usage.input_tokens(), 4);
            assert_eq!(usage.output_tokens(), i32::try_from(deltas.len()).unwrap());
            assert!(metadata.metrics().is_some());
        }
        other => panic!("expected metadata, got {other:?}"),
    }
    assert_eq!(tail.len(), 3);

    let calls = standin.calls();
    assert!(calls[0].streaming);
    assert_eq!(
        calls[0].body.pointer("/inferenceConfig/maxTokens"),
        Some(&64.into())
    );
    tokio::time::timeout(PROMPTLY, standin.wait_for_finished_streams(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn rejections_surface_as_the_sdk_error_types() {
    let standin = BedrockStandIn::start().await.unwrap();
    let client = client(&standin);
    for rejection in [
        Rejection::Throttled,
        Rejection::ServiceUnavailable,
        Rejection::InternalError,
        Rejection::AccessDenied,
        Rejection::ContextWindowExceeded,
    ] {
        standin.push_script(MODEL, Script::rejected(rejection));
        let streaming = client
            .converse_stream()
            .model_id(MODEL)
            .messages(user("hi"))
            .send()
            .await
            .unwrap_err();
        let SdkError::ServiceError(streaming) = streaming else {
            panic!("{rejection:?}: not a service error: {streaming:?}");
        };
        let matched = match (rejection, streaming.err()) {
            (Rejection::Throttled, ConverseStreamError::ThrottlingException(_))
            | (
                Rejection::ServiceUnavailable,
                ConverseStreamError::ServiceUnavailableException(_),
            )
            | (Rejection::InternalError, ConverseStreamError::InternalServerException(_))
            | (Rejection::AccessDenied, ConverseStreamError::AccessDeniedException(_)) => true,
            (Rejection::ContextWindowExceeded, ConverseStreamError::ValidationException(e)) => {
                e.message().unwrap().contains("too long")
            }
            _ => false,
        };
        assert!(matched, "{rejection:?} became {:?}", streaming.err());

        standin.push_script(MODEL, Script::rejected(rejection));
        let plain = client
            .converse()
            .model_id(MODEL)
            .messages(user("hi"))
            .send()
            .await;
        let plain = plain.unwrap_err().into_service_error();
        let matched = matches!(
            (rejection, &plain),
            (Rejection::Throttled, ConverseError::ThrottlingException(_))
                | (
                    Rejection::ServiceUnavailable,
                    ConverseError::ServiceUnavailableException(_)
                )
                | (
                    Rejection::InternalError,
                    ConverseError::InternalServerException(_)
                )
                | (
                    Rejection::AccessDenied,
                    ConverseError::AccessDeniedException(_)
                )
                | (
                    Rejection::ContextWindowExceeded,
                    ConverseError::ValidationException(_)
                )
        );
        assert!(matched, "{rejection:?} became {plain:?}");
    }
}

#[tokio::test]
async fn an_unscripted_model_is_not_found() {
    let standin = BedrockStandIn::start().await.unwrap();
    let error = client(&standin)
        .converse()
        .model_id("no.such-model")
        .messages(user("hi"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(
        matches!(error, ConverseError::ResourceNotFoundException(_)),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_exception_frame_mid_stream_arrives_after_the_deltas() {
    let standin = BedrockStandIn::start().await.unwrap();
    let client = client(&standin);
    for failure in [StreamFailure::Throttled, StreamFailure::ModelStreamError] {
        let fault = Fault::StreamError {
            after_deltas: 2,
            failure,
        };
        standin.push_script(
            MODEL,
            Script::reply(["one ", "two ", "three"]).with_fault(fault),
        );
        let mut output = start_stream(&client, "hi").await;

        let mut texts = Vec::new();
        let error = loop {
            match output.stream.recv().await {
                Ok(Some(event)) => texts.extend(delta_text(&event).map(str::to_owned)),
                Ok(None) => panic!("stream ended without the exception"),
                Err(error) => break error.into_service_error(),
            }
        };
        assert_eq!(texts, ["one ", "two "]);
        let matched = matches!(
            (failure, &error),
            (
                StreamFailure::Throttled,
                ConverseStreamOutputError::ThrottlingException(_)
            ) | (
                StreamFailure::ModelStreamError,
                ConverseStreamOutputError::ModelStreamErrorException(_)
            )
        );
        assert!(matched, "{failure:?} became {error:?}");
    }
}

#[tokio::test]
async fn a_stall_times_out_and_the_dropped_connection_is_seen() {
    let standin = BedrockStandIn::start().await.unwrap();
    let script =
        Script::reply(["first", "never sent"]).with_fault(Fault::Stall { after_deltas: 1 });
    standin.set_script(MODEL, script);
    let mut output = start_stream(&client(&standin), "hi").await;

    let start = output.stream.recv().await.unwrap().unwrap();
    assert!(matches!(start, Event::MessageStart(_)));
    let first = output.stream.recv().await.unwrap().unwrap();
    assert_eq!(delta_text(&first), Some("first"));
    let stalled = tokio::time::timeout(Duration::from_millis(300), output.stream.recv()).await;
    assert!(stalled.is_err(), "expected a stall, got {stalled:?}");
    assert_eq!(standin.stream_counts().dropped_by_client, 0);

    drop(output);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the stand-in never saw the client leave");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_seen() {
    let standin = BedrockStandIn::start().await.unwrap();
    let deltas: Vec<String> = (0..200).map(|i| format!("token{i} ")).collect();
    standin.set_script(
        MODEL,
        Script::reply(deltas).with_delta_delay(Duration::from_millis(20)),
    );
    let mut output = start_stream(&client(&standin), "hi").await;

    let mut seen = 0;
    while seen < 2 {
        let event = output.stream.recv().await.unwrap().unwrap();
        seen += usize::from(delta_text(&event).is_some());
    }
    drop(output);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the stand-in never saw the client leave");
    assert_eq!(standin.stream_counts().finished, 0);
}

#[tokio::test]
async fn a_scripted_disconnect_breaks_the_stream() {
    let standin = BedrockStandIn::start().await.unwrap();
    let script = Script::reply(["only", "lost"]).with_fault(Fault::Disconnect { after_deltas: 1 });
    standin.set_script(MODEL, script);
    let mut output = start_stream(&client(&standin), "hi").await;

    let mut texts = Vec::new();
    let outcome = loop {
        match output.stream.recv().await {
            Ok(Some(event)) => texts.extend(delta_text(&event).map(str::to_owned)),
            other => break other,
        }
    };
    assert_eq!(texts, ["only"]);
    assert!(
        outcome.is_err(),
        "a broken stream must not look finished: {outcome:?}"
    );
}
