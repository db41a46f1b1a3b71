//! The providers against the loopback stand-ins, through the real AWS SDK and
//! real HTTP, and the simulated model on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use futures::StreamExt;
use hyper_util::client::proxy::matcher::Matcher;
use parley_service::providers::estimate_turn_tokens;
use parley_service::providers::simulated::count_tokens;
use parley_service::providers::{
    BedrockProvider, ChatTurn, CompletionRequest, Guardrail, Intervention, OpenAiProvider,
    PromptTurns, Provider, ProviderErrorKind, ProviderEvent, ProviderStream, Role, Sampling,
    SimulatedProvider, SimulatedSettings, StopReason, Usage,
};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::openai::OpenAiStandIn;
use parley_test_support::proxy::TcpProxy;
use parley_test_support::script::{
    Fault, GuardrailFinding, GuardrailIntervention, RecordedGuardrail, Rejection, Script,
    StreamFailure,
};

const BEDROCK_MODEL: &str = "anthropic.claude-3-haiku-20240307-v1:0";
const OPENAI_MODEL: &str = "smollm2-135m";
/// Upper bound for anything that should happen promptly; never a wait.
const PROMPTLY: Duration = Duration::from_secs(10);

fn bedrock(standin: &BedrockStandIn) -> BedrockProvider {
    let credentials = Credentials::new("AKIDSTANDIN", "secret", None, None, "test");
    let sdk_config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .build();
    BedrockProvider::new(&sdk_config, Some(&standin.base_url()))
}

fn openai(standin: &OpenAiStandIn) -> OpenAiProvider {
    OpenAiProvider::new(&standin.base_url(), Some("sk-standin".to_owned())).unwrap()
}

fn request(model: &str, timeout: Duration) -> CompletionRequest {
    CompletionRequest {
        model: model.to_owned(),
        turns: PromptTurns::new(
            Arc::from([ChatTurn::new(Role::System, "You are terse.")]),
            vec![
                ChatTurn::new(Role::User, "Say hello"),
                ChatTurn::new(Role::Assistant, "Hello."),
            ]
            .into(),
            ChatTurn::new(Role::User, "Again, with feeling"),
        ),
        max_output_tokens: 128,
        timeout,
        guardrail: None,
        sampling: Sampling::default(),
    }
}

/// `request` with every sampling setting a caller may give.
fn sampled(model: &str) -> CompletionRequest {
    CompletionRequest {
        guardrail: None,
        sampling: Sampling {
            temperature: Some(0.25),
            top_p: Some(0.5),
            stop: vec!["END".into(), "\n\n".into()],
        },
        ..request(model, PROMPTLY)
    }
}

/// Every item of the stream, in order.
async fn drain(mut stream: ProviderStream) -> Vec<Result<ProviderEvent, ProviderErrorKind>> {
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item.map_err(|e| e.kind));
    }
    items
}

fn deltas(texts: &[&str]) -> Vec<Result<ProviderEvent, ProviderErrorKind>> {
    texts
        .iter()
        .map(|t| Ok(ProviderEvent::Delta((*t).to_owned())))
        .collect()
}

const AWKWARD: [&str; 6] = [
    "line\nbreak",
    "\r\n",
    "back\\slash",
    " \"quoted\"",
    " 😀",
    " 中文",
];

// ---------------------------------------------------------------- bedrock

#[tokio::test]
async fn bedrock_streams_deltas_then_usage_then_finished() {
    let standin = BedrockStandIn::start().await.unwrap();
    standin.set_script(BEDROCK_MODEL, Script::reply(AWKWARD).with_usage(11, 6));

    let stream = bedrock(&standin)
        .stream(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    let mut expected = deltas(&AWKWARD);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: 11,
        output_tokens: 6,
    })));
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: StopReason::EndTurn,
    }));
    assert_eq!(drain(stream).await, expected);

    // One Converse request shape: system prompts apart, turns as messages.
    let call = &standin.calls()[0];
    assert!(call.streaming);
    assert_eq!(call.model, BEDROCK_MODEL);
    assert_eq!(
        call.body["system"],
        serde_json::json!([{ "text": "You are terse." }])
    );
    let roles: Vec<&str> = call.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(
        call.body.pointer("/messages/2/content/0/text").unwrap(),
        "Again, with feeling"
    );
    assert_eq!(
        call.body.pointer("/inferenceConfig/maxTokens").unwrap(),
        128
    );
}

#[tokio::test]
async fn bedrock_sampling_goes_in_the_inference_config_and_absent_settings_stay_absent() {
    let standin = BedrockStandIn::start().await.unwrap();
    standin.set_script(BEDROCK_MODEL, Script::reply(["ok"]));
    let provider = bedrock(&standin);
    drain(provider.stream(sampled(BEDROCK_MODEL)).await.unwrap()).await;
    provider.complete(sampled(BEDROCK_MODEL)).await.unwrap();
    drain(
        provider
            .stream(request(BEDROCK_MODEL, PROMPTLY))
            .await
            .unwrap(),
    )
    .await;
    let calls = standin.calls();
    for call in &calls[..2] {
        assert_eq!(
            call.body["inferenceConfig"],
            serde_json::json!({
                "maxTokens": 128,
                "temperature": 0.25,
                "topP": 0.5,
                "stopSequences": ["END", "\n\n"],
            }),
            "streaming: {}",
            call.streaming
        );
    }
    assert_eq!(
        calls[2].body["inferenceConfig"],
        serde_json::json!({ "maxTokens": 128 })
    );
}

#[tokio::test]
async fn bedrock_complete_uses_converse() {
    let standin = BedrockStandIn::start().await.unwrap();
    standin.set_script(BEDROCK_MODEL, Script::reply(["Hel", "lo"]).with_usage(5, 2));
    let completion = bedrock(&standin)
        .complete(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    assert_eq!(completion.text, "Hello");
    assert_eq!(
        completion.usage,
        Some(Usage {
            input_tokens: 5,
            output_tokens: 2
        })
    );
    assert_eq!(completion.stop_reason, StopReason::EndTurn);
    assert!(!standin.calls()[0].streaming);
}

#[tokio::test]
async fn bedrock_rejections_are_classified() {
    let standin = BedrockStandIn::start().await.unwrap();
    let provider = bedrock(&standin);
    let cases = [
        (Rejection::Throttled, ProviderErrorKind::Throttled),
        (
            Rejection::ServiceUnavailable,
            ProviderErrorKind::Unavailable,
        ),
        (Rejection::InternalError, ProviderErrorKind::Unavailable),
        (Rejection::AccessDenied, ProviderErrorKind::Auth),
        (
            Rejection::ContextWindowExceeded,
            ProviderErrorKind::ContextWindow,
        ),
        (Rejection::InvalidRequest, ProviderErrorKind::InvalidRequest),
    ];
    for (rejection, kind) in cases {
        standin.push_script(BEDROCK_MODEL, Script::rejected(rejection));
        let streamed = provider
            .stream(request(BEDROCK_MODEL, PROMPTLY))
            .await
            .err()
            .unwrap();
        assert_eq!(streamed.kind, kind, "stream, {rejection:?}: {streamed}");
        standin.push_script(BEDROCK_MODEL, Script::rejected(rejection));
        let completed = provider
            .complete(request(BEDROCK_MODEL, PROMPTLY))
            .await
            .unwrap_err();
        assert_eq!(completed.kind, kind, "complete, {rejection:?}: {completed}");
    }
    // One call per attempt: the SDK does not retry behind the fallback chain.
    assert_eq!(standin.calls().len(), cases.len() * 2);
}

#[tokio::test]
async fn bedrock_exception_mid_stream_ends_the_stream_after_the_deltas() {
    let standin = BedrockStandIn::start().await.unwrap();
    let provider = bedrock(&standin);
    let cases = [
        (StreamFailure::Throttled, ProviderErrorKind::Throttled),
        (
            StreamFailure::ModelStreamError,
            ProviderErrorKind::Unavailable,
        ),
        (StreamFailure::InternalError, ProviderErrorKind::Unavailable),
    ];
    for (failure, kind) in cases {
        let fault = Fault::StreamError {
            after_deltas: 2,
            failure,
        };
        standin.push_script(
            BEDROCK_MODEL,
            Script::reply(["a", "b", "c"]).with_fault(fault),
        );
        let stream = provider
            .stream(request(BEDROCK_MODEL, PROMPTLY))
            .await
            .unwrap();
        let mut expected = deltas(&["a", "b"]);
        expected.push(Err(kind));
        assert_eq!(drain(stream).await, expected, "{failure:?}");
    }
}

#[tokio::test]
async fn bedrock_stall_times_out_within_the_request_timeout() {
    let standin = BedrockStandIn::start().await.unwrap();
    let script = Script::reply(["first", "never"]).with_fault(Fault::Stall { after_deltas: 1 });
    standin.set_script(BEDROCK_MODEL, script);
    let timeout = Duration::from_millis(300);
    let mut stream = bedrock(&standin)
        .stream(request(BEDROCK_MODEL, timeout))
        .await
        .unwrap();

    // The idle timeout counts from the delta's arrival, which is after this.
    let started = Instant::now();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Delta("first".into())
    );
    let error = stream.next().await.unwrap().unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error.kind, ProviderErrorKind::Timeout);
    assert!(
        waited >= timeout && waited < PROMPTLY,
        "timed out after {waited:?}"
    );
    assert!(stream.next().await.is_none());

    drop(stream);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the upstream connection outlived the stream");
}

#[tokio::test]
async fn bedrock_slow_first_token_times_out() {
    let standin = BedrockStandIn::start().await.unwrap();
    let script = Script::reply(["late"]).with_delta_delay(Duration::from_secs(30));
    standin.set_script(BEDROCK_MODEL, script);
    let timeout = Duration::from_millis(200);
    let started = Instant::now();
    let stream = bedrock(&standin)
        .stream(request(BEDROCK_MODEL, timeout))
        .await
        .unwrap();
    assert_eq!(drain(stream).await, [Err(ProviderErrorKind::Timeout)]);
    assert!(started.elapsed() < PROMPTLY);
}

#[tokio::test]
async fn bedrock_dropping_the_stream_drops_the_upstream_request() {
    let standin = BedrockStandIn::start().await.unwrap();
    let many: Vec<String> = (0..500).map(|i| format!("t{i} ")).collect();
    let script = Script::reply(many).with_delta_delay(Duration::from_millis(10));
    standin.set_script(BEDROCK_MODEL, script);
    let mut stream = bedrock(&standin)
        .stream(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Delta("t0 ".into())
    );

    drop(stream);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the upstream connection outlived the stream");
    assert_eq!(standin.stream_counts().finished, 0);
}

#[tokio::test]
async fn bedrock_broken_connection_is_unavailable() {
    let standin = BedrockStandIn::start().await.unwrap();
    let script = Script::reply(["a", "b"]).with_fault(Fault::Disconnect { after_deltas: 1 });
    standin.set_script(BEDROCK_MODEL, script);
    let stream = bedrock(&standin)
        .stream(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    let mut expected = deltas(&["a"]);
    expected.push(Err(ProviderErrorKind::Unavailable));
    assert_eq!(drain(stream).await, expected);
}

/// `request` through the guardrail `gr-homework`, version 3.
fn guarded(model: &str) -> CompletionRequest {
    CompletionRequest {
        guardrail: Some(Guardrail {
            identifier: "gr-homework".into(),
            version: "3".into(),
        }),
        ..request(model, PROMPTLY)
    }
}

/// The guardrail as the stand-in saw it: `guarded`'s, trace on.
fn recorded_guardrail() -> Option<RecordedGuardrail> {
    Some(RecordedGuardrail {
        identifier: "gr-homework".into(),
        version: "3".into(),
        trace: Some("enabled".into()),
    })
}

/// Words in `request`'s turns: the stand-in's default input tokens.
const REQUEST_WORDS: u32 = 9;

fn topic(name: &str) -> GuardrailFinding {
    GuardrailFinding::Topic(name.into())
}

fn content(filter: &str) -> GuardrailFinding {
    GuardrailFinding::Content(filter.into())
}

fn blocked(on_input: bool, flagged: &[&str]) -> StopReason {
    StopReason::GuardrailIntervened(Intervention {
        on_input,
        flagged: flagged.iter().map(|f| (*f).to_owned()).collect(),
    })
}

#[tokio::test]
async fn bedrock_guardrail_on_the_output_ends_the_stream_after_the_deltas_sent() {
    let standin = BedrockStandIn::start().await.unwrap();
    let guardrail = GuardrailIntervention::on_output(3, [topic("Homework"), content("VIOLENCE")]);
    standin.set_script(
        BEDROCK_MODEL,
        Script::reply(["One", " two", " three", " four", " five"]).with_guardrail(guardrail),
    );

    let stream = bedrock(&standin)
        .stream(guarded(BEDROCK_MODEL))
        .await
        .unwrap();
    // The deltas Bedrock let through stay sent; its blocked message follows.
    let mut expected = deltas(&[
        "One",
        " two",
        " three",
        GuardrailIntervention::DEFAULT_BLOCKED_MESSAGE,
    ]);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: REQUEST_WORDS,
        output_tokens: 3,
    })));
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: blocked(false, &["content:VIOLENCE", "topic:Homework"]),
    }));
    assert_eq!(drain(stream).await, expected);

    let call = &standin.calls()[0];
    assert!(call.streaming);
    assert_eq!(call.guardrail, recorded_guardrail());
    // Synchronous: Bedrock checks each chunk before sending it.
    assert_eq!(
        call.body.pointer("/guardrailConfig/streamProcessingMode"),
        Some(&serde_json::json!("sync"))
    );
}

#[tokio::test]
async fn bedrock_guardrail_on_the_input_blocks_before_the_model_runs() {
    let standin = BedrockStandIn::start().await.unwrap();
    let guardrail = GuardrailIntervention::on_input([
        GuardrailFinding::Pii {
            entity: "EMAIL".into(),
            matched: "kim@example.com".into(),
        },
        GuardrailFinding::ManagedWords {
            list: "PROFANITY".into(),
            matched: "darn".into(),
        },
        GuardrailFinding::CustomWord("essay".into()),
        GuardrailFinding::Regex {
            name: "STUDENT_ID".into(),
            matched: "S-1234".into(),
        },
    ])
    .with_blocked_message("This message breaks the school's rules.");
    standin.set_script(
        BEDROCK_MODEL,
        Script::reply(["never", " sent"]).with_guardrail(guardrail),
    );

    let stream = bedrock(&standin)
        .stream(guarded(BEDROCK_MODEL))
        .await
        .unwrap();
    let mut expected = deltas(&["This message breaks the school's rules."]);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: REQUEST_WORDS,
        output_tokens: 0,
    })));
    // Policy labels only: the matched texts never leave the provider.
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: blocked(
            true,
            &[
                "pii:EMAIL",
                "regex:STUDENT_ID",
                "word:CUSTOM",
                "word:PROFANITY",
            ],
        ),
    }));
    assert_eq!(drain(stream).await, expected);
    assert_eq!(standin.calls()[0].guardrail, recorded_guardrail());
}

#[tokio::test]
async fn bedrock_guardrail_on_complete_replaces_the_reply_with_its_message() {
    let standin = BedrockStandIn::start().await.unwrap();
    let provider = bedrock(&standin);
    let reply = Script::reply(["Hel", "lo", " there"]);

    standin.push_script(
        BEDROCK_MODEL,
        reply
            .clone()
            .with_guardrail(GuardrailIntervention::on_output(2, [content("HATE")])),
    );
    let completion = provider.complete(guarded(BEDROCK_MODEL)).await.unwrap();
    // Not streamed: nothing of the model's reply gets out.
    assert_eq!(
        completion.text,
        GuardrailIntervention::DEFAULT_BLOCKED_MESSAGE
    );
    assert_eq!(completion.stop_reason, blocked(false, &["content:HATE"]));
    assert_eq!(
        completion.usage,
        Some(Usage {
            input_tokens: REQUEST_WORDS,
            output_tokens: 2
        })
    );

    standin.push_script(
        BEDROCK_MODEL,
        reply.with_guardrail(GuardrailIntervention::on_input([topic("Homework")])),
    );
    let completion = provider.complete(guarded(BEDROCK_MODEL)).await.unwrap();
    assert_eq!(
        completion.text,
        GuardrailIntervention::DEFAULT_BLOCKED_MESSAGE
    );
    assert_eq!(completion.stop_reason, blocked(true, &["topic:Homework"]));

    let calls = standin.calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert!(!call.streaming);
        assert_eq!(call.guardrail, recorded_guardrail());
    }
}

#[tokio::test]
async fn bedrock_without_a_guardrail_in_the_request_nothing_intervenes() {
    let standin = BedrockStandIn::start().await.unwrap();
    let provider = bedrock(&standin);
    standin.set_script(
        BEDROCK_MODEL,
        Script::reply(["Hel", "lo"])
            .with_guardrail(GuardrailIntervention::on_input([topic("Homework")])),
    );

    let stream = provider
        .stream(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    let mut expected = deltas(&["Hel", "lo"]);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: REQUEST_WORDS,
        output_tokens: 2,
    })));
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: StopReason::EndTurn,
    }));
    assert_eq!(drain(stream).await, expected);

    let completion = provider
        .complete(request(BEDROCK_MODEL, PROMPTLY))
        .await
        .unwrap();
    assert_eq!(completion.text, "Hello");
    assert_eq!(completion.stop_reason, StopReason::EndTurn);

    let calls = standin.calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call.guardrail, None);
        assert!(call.body.get("guardrailConfig").is_none());
    }
}

// ---------------------------------------------------------------- openai

#[tokio::test]
async fn openai_streams_deltas_then_usage_then_finished() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let script = Script::reply(AWKWARD)
        .with_usage(11, 6)
        .with_stop(parley_test_support::script::Stop::MaxTokens);
    standin.set_script(OPENAI_MODEL, script);

    let stream = openai(&standin)
        .stream(request(OPENAI_MODEL, PROMPTLY))
        .await
        .unwrap();
    let mut expected = deltas(&AWKWARD);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: 11,
        output_tokens: 6,
    })));
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: StopReason::MaxTokens,
    }));
    assert_eq!(drain(stream).await, expected);

    let call = &standin.calls()[0];
    assert_eq!(call.authorization.as_deref(), Some("Bearer sk-standin"));
    assert_eq!(call.body["stream"], true);
    assert_eq!(
        call.body.pointer("/stream_options/include_usage").unwrap(),
        true
    );
    assert_eq!(call.body["max_tokens"], 128);
    assert_eq!(
        call.body["messages"][0],
        serde_json::json!({"role": "system", "content": "You are terse."})
    );
    assert_eq!(call.body["messages"].as_array().unwrap().len(), 4);
}

/// An upstream the proxy settings cover is called through its proxy (a
/// forward proxy is sent the whole URL, which the stand-in routes by its
/// path). Its host does not resolve, so only the proxy can reach it.
#[tokio::test]
async fn openai_behind_a_proxy_is_called_through_it() {
    let standin = OpenAiStandIn::start().await.unwrap();
    standin.set_script(OPENAI_MODEL, Script::reply(AWKWARD));
    let proxy = TcpProxy::start(standin.addr().to_string(), None)
        .await
        .unwrap();
    let proxies = Matcher::builder()
        .http(format!("http://{}", proxy.address()))
        .build();
    let provider = OpenAiProvider::with_proxies(
        "http://upstream.invalid/v1",
        Some("sk-standin".to_owned()),
        &proxies,
    )
    .unwrap();

    let stream = provider
        .stream(request(OPENAI_MODEL, PROMPTLY))
        .await
        .unwrap();
    let events = drain(stream).await;
    assert_eq!(events[..AWKWARD.len()], deltas(&AWKWARD)[..]);
    assert!(matches!(
        events.last(),
        Some(Ok(ProviderEvent::Finished { .. }))
    ));
    let call = &standin.calls()[0];
    assert_eq!(call.authorization.as_deref(), Some("Bearer sk-standin"));
    proxy.stop().await;
}

#[tokio::test]
async fn openai_sampling_is_sent_as_the_protocol_names_it() {
    let standin = OpenAiStandIn::start().await.unwrap();
    standin.set_script(OPENAI_MODEL, Script::reply(["ok"]));
    let provider = openai(&standin);
    drain(provider.stream(sampled(OPENAI_MODEL)).await.unwrap()).await;
    provider.complete(sampled(OPENAI_MODEL)).await.unwrap();
    drain(
        provider
            .stream(request(OPENAI_MODEL, PROMPTLY))
            .await
            .unwrap(),
    )
    .await;
    let calls = standin.calls();
    for call in &calls[..2] {
        assert_eq!(call.body["temperature"], 0.25);
        assert_eq!(call.body["top_p"], 0.5);
        assert_eq!(call.body["stop"], serde_json::json!(["END", "\n\n"]));
    }
    for field in ["temperature", "top_p", "stop"] {
        assert!(calls[2].body.get(field).is_none(), "{field} sent unasked");
    }
}

#[tokio::test]
async fn openai_complete_is_one_non_streaming_call() {
    let standin = OpenAiStandIn::start().await.unwrap();
    standin.set_script(OPENAI_MODEL, Script::reply(["Hel", "lo"]).with_usage(5, 2));
    let completion = openai(&standin)
        .complete(request(OPENAI_MODEL, PROMPTLY))
        .await
        .unwrap();
    assert_eq!(completion.text, "Hello");
    assert_eq!(
        completion.usage,
        Some(Usage {
            input_tokens: 5,
            output_tokens: 2
        })
    );
    assert_eq!(completion.stop_reason, StopReason::EndTurn);
    assert_eq!(standin.calls()[0].body["stream"], false);
}

#[tokio::test]
async fn openai_rejections_are_classified() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let provider = openai(&standin);
    let cases = [
        (Rejection::Throttled, ProviderErrorKind::Throttled),
        (
            Rejection::ServiceUnavailable,
            ProviderErrorKind::Unavailable,
        ),
        (Rejection::InternalError, ProviderErrorKind::Unavailable),
        (Rejection::AccessDenied, ProviderErrorKind::Auth),
        (
            Rejection::ContextWindowExceeded,
            ProviderErrorKind::ContextWindow,
        ),
        (Rejection::InvalidRequest, ProviderErrorKind::InvalidRequest),
    ];
    for (rejection, kind) in cases {
        standin.push_script(OPENAI_MODEL, Script::rejected(rejection));
        let streamed = provider
            .stream(request(OPENAI_MODEL, PROMPTLY))
            .await
            .err()
            .unwrap();
        assert_eq!(streamed.kind, kind, "stream, {rejection:?}: {streamed}");
        standin.push_script(OPENAI_MODEL, Script::rejected(rejection));
        let completed = provider
            .complete(request(OPENAI_MODEL, PROMPTLY))
            .await
            .unwrap_err();
        assert_eq!(completed.kind, kind, "complete, {rejection:?}: {completed}");
    }
}

#[tokio::test]
async fn openai_error_event_mid_stream_ends_the_stream_after_the_deltas() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let provider = openai(&standin);
    let cases = [
        (StreamFailure::Throttled, ProviderErrorKind::Throttled),
        (
            StreamFailure::ServiceUnavailable,
            ProviderErrorKind::Unavailable,
        ),
    ];
    for (failure, kind) in cases {
        let fault = Fault::StreamError {
            after_deltas: 2,
            failure,
        };
        standin.push_script(
            OPENAI_MODEL,
            Script::reply(["a", "b", "c"]).with_fault(fault),
        );
        let stream = provider
            .stream(request(OPENAI_MODEL, PROMPTLY))
            .await
            .unwrap();
        let mut expected = deltas(&["a", "b"]);
        expected.push(Err(kind));
        assert_eq!(drain(stream).await, expected, "{failure:?}");
    }
}

#[tokio::test]
async fn openai_stall_times_out_within_the_request_timeout() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let script = Script::reply(["first", "never"]).with_fault(Fault::Stall { after_deltas: 1 });
    standin.set_script(OPENAI_MODEL, script);
    let timeout = Duration::from_millis(300);
    let mut stream = openai(&standin)
        .stream(request(OPENAI_MODEL, timeout))
        .await
        .unwrap();

    // The idle timeout counts from the delta's arrival, which is after this.
    let started = Instant::now();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Delta("first".into())
    );
    let error = stream.next().await.unwrap().unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error.kind, ProviderErrorKind::Timeout);
    assert!(
        waited >= timeout && waited < PROMPTLY,
        "timed out after {waited:?}"
    );

    drop(stream);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the upstream connection outlived the stream");
}

#[tokio::test]
async fn openai_dropping_the_stream_drops_the_upstream_request() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let many: Vec<String> = (0..500).map(|i| format!("t{i} ")).collect();
    let script = Script::reply(many).with_delta_delay(Duration::from_millis(10));
    standin.set_script(OPENAI_MODEL, script);
    let mut stream = openai(&standin)
        .stream(request(OPENAI_MODEL, PROMPTLY))
        .await
        .unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Delta("t0 ".into())
    );

    drop(stream);
    tokio::time::timeout(PROMPTLY, standin.wait_for_dropped_streams(1))
        .await
        .expect("the upstream connection outlived the stream");
    assert_eq!(standin.stream_counts().finished, 0);
}

#[tokio::test]
async fn openai_broken_connection_is_unavailable() {
    let standin = OpenAiStandIn::start().await.unwrap();
    let script = Script::reply(["a", "b"]).with_fault(Fault::Disconnect { after_deltas: 1 });
    standin.set_script(OPENAI_MODEL, script);
    let stream = openai(&standin)
        .stream(request(OPENAI_MODEL, PROMPTLY))
        .await
        .unwrap();
    let mut expected = deltas(&["a"]);
    expected.push(Err(ProviderErrorKind::Unavailable));
    assert_eq!(drain(stream).await, expected);
}

// ---------------------------------------------------------------- simulated

fn simulated(first_token_latency: Duration, tokens_per_second: Option<u32>) -> SimulatedProvider {
    SimulatedProvider::new(SimulatedSettings {
        first_token_latency,
        tokens_per_second: tokens_per_second.and_then(NonZeroU32::new),
        reply_tokens: None,
    })
}

#[tokio::test]
async fn simulated_echoes_the_last_user_turn_deterministically() {
    let provider = simulated(Duration::ZERO, None);
    let first = drain(provider.stream(request("sim", PROMPTLY)).await.unwrap()).await;
    let second = drain(provider.stream(request("sim", PROMPTLY)).await.unwrap()).await;
    assert_eq!(first, second);

    let mut expected = deltas(&["Again,", " with", " feeling"]);
    let input_tokens = [
        "You are terse.",
        "Say hello",
        "Hello.",
        "Again, with feeling",
    ]
    .into_iter()
    .map(|text| estimate_turn_tokens(&ChatTurn::new(Role::User, text)))
    .sum();
    // Input is counted as holds estimate it: 4 + 3 + 2 + 5 (bytes / 4,
    // rounded up) and 4 per turn.
    assert_eq!(input_tokens, 30);
    expected.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens,
        output_tokens: 3,
    })));
    expected.push(Ok(ProviderEvent::Finished {
        stop_reason: StopReason::EndTurn,
    }));
    assert_eq!(first, expected);

    let completion = provider.complete(request("sim", PROMPTLY)).await.unwrap();
    assert_eq!(completion.text, "Again, with feeling");
}

#[tokio::test]
async fn simulated_reply_length_is_configurable_and_capped() {
    let provider = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: None,
        reply_tokens: Some(7),
    });
    let completion = provider.complete(request("sim", PROMPTLY)).await.unwrap();
    assert_eq!(
        completion.text,
        "Again, with feeling Again, with feeling Again,"
    );
    assert_eq!(completion.usage.unwrap().output_tokens, 7);
    assert_eq!(count_tokens(&completion.text), 7);
    assert_eq!(completion.stop_reason, StopReason::EndTurn);

    let mut capped = request("sim", PROMPTLY);
    capped.max_output_tokens = 4;
    let completion = provider.complete(capped).await.unwrap();
    assert_eq!(completion.text, "Again, with feeling Again,");
    assert_eq!(completion.usage.unwrap().output_tokens, 4);
    assert_eq!(completion.stop_reason, StopReason::MaxTokens);
}

#[tokio::test]
async fn simulated_stops_where_a_stop_sequence_first_appears() {
    let provider = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: None,
        reply_tokens: Some(7),
    });
    let stopped = |stop: &[&str]| CompletionRequest {
        guardrail: None,
        sampling: Sampling {
            stop: stop.iter().map(|s| (*s).to_owned()).collect(),
            ..Sampling::default()
        },
        ..request("sim", PROMPTLY)
    };
    // Inside a word: the reply ends just before it, that token counted.
    let completion = provider.complete(stopped(&["eel", "zzz"])).await.unwrap();
    assert_eq!(completion.text, "Again, with f");
    assert_eq!(completion.usage.unwrap().output_tokens, 3);
    assert_eq!(completion.stop_reason, StopReason::StopSequence);
    // At a word's start: the reply ends with the words before it.
    let completion = provider.complete(stopped(&[" with"])).await.unwrap();
    assert_eq!(completion.text, "Again,");
    assert_eq!(completion.usage.unwrap().output_tokens, 1);
    assert_eq!(completion.stop_reason, StopReason::StopSequence);
    // Of two stop sequences, the one appearing first wins.
    let completion = provider
        .complete(stopped(&["feeling Again", "with"]))
        .await
        .unwrap();
    assert_eq!(completion.text, "Again, ");
    // Never appearing: the whole reply.
    let completion = provider.complete(stopped(&["nowhere"])).await.unwrap();
    assert_eq!(count_tokens(&completion.text), 7);
    assert_eq!(completion.stop_reason, StopReason::EndTurn);
}

#[tokio::test]
async fn simulated_paces_tokens() {
    // 50 ms to the first token, then 100 tokens/s: 3 tokens take >= 70 ms.
    let provider = simulated(Duration::from_millis(50), Some(100));
    let started = Instant::now();
    let mut stream = provider.stream(request("sim", PROMPTLY)).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(ProviderEvent::Delta(_)))
    ));
    assert!(started.elapsed() >= Duration::from_millis(50));
    let rest = drain(stream).await;
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(70));
}

#[tokio::test]
async fn simulated_honours_the_request_timeout() {
    let provider = simulated(Duration::from_secs(60), None);
    let timeout = Duration::from_millis(100);
    let started = Instant::now();
    let stream = provider.stream(request("sim", timeout)).await.unwrap();
    assert_eq!(drain(stream).await, [Err(ProviderErrorKind::Timeout)]);
    let waited = started.elapsed();
    assert!(
        waited >= timeout && waited < PROMPTLY,
        "timed out after {waited:?}"
    );
}
