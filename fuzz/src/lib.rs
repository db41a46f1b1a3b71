//! The properties the fuzz targets check: one function per target, taking
//! the fuzzer's bytes and panicking (a crash libFuzzer reports and saves)
//! when its property does not hold.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorFuture, SharedHttpConnector, http_client_fn,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::http::{Response as HttpResponse, StatusCode};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley_crds::RoutesFile;
use parley_service::accounting::contract::{
    AbortRequest, BalanceResponse, CalculateRequest, CalculateResponse, CheckRequest,
    CheckResponse, ContractRequest, ErrorReply, FinalizeRequest, GrantRequest, InitializeRequest,
    InitializeResponse, SettlementResponse, UsageResponse,
};
use parley_service::auth::{AuthSettings, Authenticator, Role, bearer_token};
use parley_service::model_routes::Routes;
use parley_service::providers::{
    BedrockProvider, ChatTurn, CompletionRequest, PromptTurns, Provider, ProviderError,
    ProviderErrorKind, ProviderEvent, Role as TurnRole, Sampling, openai,
};
use parley_service::stream::frames::{ChunkData, ErrorData, FrameArena, PING, chunk_frame, frame};
use parley_service::turns::History;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The HS256 secret of the `jwt` target's verifier (its seed tokens are
/// signed with it).
pub const JWT_SECRET: &[u8] = b"parley-fuzz-secret";
pub const JWT_ISSUER: &str = "parley-fuzz";
pub const JWT_AUDIENCE: &str = "parley";
/// A reader given all its input at once has no reason to wait this long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|error| panic!("building the runtime: {error}"))
    })
}

/// The routes file, as the operator and the service read it: parsing never
/// panics; a file that validates survives a trip through its own YAML; the
/// service's reading (validation and prices) resolves every route it offers.
pub fn routes_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = RoutesFile::from_yaml(text)
        && file.validate().is_ok()
    {
        let yaml = file
            .to_yaml()
            .unwrap_or_else(|error| panic!("a valid routes file did not serialize: {error}"));
        let again = RoutesFile::from_yaml(&yaml)
            .unwrap_or_else(|error| panic!("its own YAML did not parse: {error}\n{yaml}"));
        assert_eq!(again, file, "the routes file changed through its YAML");
    }
    if let Ok(routes) = Routes::from_yaml(text) {
        for role in [Role::User, Role::Supervisor, Role::Admin] {
            for route in routes.usable_by(role) {
                let resolved = routes.resolve(Some(&route.alias), role);
                assert!(
                    resolved.is_ok(),
                    "{role:?} may use {} but it does not resolve",
                    route.alias
                );
            }
        }
    }
}

fn verifier() -> &'static Authenticator {
    static VERIFIER: OnceLock<Authenticator> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        Authenticator::new(AuthSettings {
            hs256_secret: Some(JWT_SECRET.to_vec()),
            jwks: None,
            issuer: Some(JWT_ISSUER.into()),
            audience: Some(JWT_AUDIENCE.into()),
            leeway: Duration::from_secs(5),
        })
        .unwrap_or_else(|error| panic!("building the verifier: {error}"))
    })
}

/// JWT verification input, as it arrives in an Authorization header: never a
/// panic; a token accepted meets the claim rules and is accepted again as
/// the same caller.
pub fn jwt(data: &[u8]) {
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        headers.insert(http::header::AUTHORIZATION, value);
    }
    let Ok(token) = bearer_token(&headers).map(str::to_owned) else {
        return;
    };
    let verified = runtime().block_on(verifier().verify(&token));
    if let Ok(principal) = verified {
        assert!(
            !principal.sub.is_empty() && principal.sub.len() <= 256,
            "accepted a token with sub {:?}",
            principal.sub
        );
        assert!(
            token.len() <= 8 * 1024,
            "accepted a token of {} bytes",
            token.len()
        );
        let again = runtime().block_on(verifier().verify(&token));
        assert_eq!(
            again.ok(),
            Some(principal),
            "the same token, another answer"
        );
    }
}

/// Cut points taken from `control`, one per byte, within `0..=len`.
fn cuts(control: &[u8], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = control
        .iter()
        .map(|byte| usize::from(*byte) * len / 255)
        .collect();
    cuts.sort_unstable();
    cuts
}

/// The SSE frame writer: any text, cut into deltas anywhere, written as
/// frames (with pings between) and delivered in pieces cut anywhere, reads
/// back through a standard SSE parser as exactly that text, event by event;
/// an error event's message too. A chunk's hand-written frame is its data
/// serialized, byte for byte.
pub fn sse_frames(data: &[u8]) {
    let (control, text) = data.split_at(data.len().min(4));
    let text = String::from_utf8_lossy(text);
    let mut deltas = Vec::new();
    let mut start = 0;
    for cut in cuts(control.get(..2).unwrap_or_default(), text.len()) {
        let cut = (cut..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        if cut > start {
            deltas.push(&text[start..cut]);
            start = cut;
        }
    }
    deltas.push(&text[start..]);
    let mut wire = Vec::new();
    let mut arena = FrameArena::default();
    for (index, delta) in deltas.iter().enumerate() {
        let (id, total_tokens) = (index as u64 + 1, u32::try_from(index).unwrap_or(u32::MAX));
        let written = chunk_frame(&mut arena, id, delta, total_tokens);
        let data = ChunkData {
            text: delta,
            tokens: 1,
            total_tokens,
        };
        assert_eq!(written, frame(id, "chunk", &data), "{delta:?}");
        wire.extend_from_slice(&written);
        wire.extend_from_slice(PING);
    }
    let error = ErrorData {
        code: "MODEL_ERROR",
        message: &text,
    };
    let error_id = deltas.len() as u64 + 1;
    wire.extend_from_slice(&frame(error_id, "error", &error));

    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts(control.get(2..).unwrap_or_default(), wire.len()) {
        pieces.push(Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(
            &wire[start..cut],
        )));
        start = cut;
    }
    pieces.push(Ok(Bytes::copy_from_slice(&wire[start..])));
    let events: Vec<_> =
        futures::executor::block_on(futures::stream::iter(pieces).eventsource().collect());

    assert_eq!(
        events.len(),
        deltas.len() + 1,
        "{deltas:?} read as {events:?}"
    );
    let mut read = String::new();
    for (index, event) in events.iter().enumerate() {
        let event = event
            .as_ref()
            .unwrap_or_else(|error| panic!("unreadable event: {error}"));
        assert_eq!(event.id, (index + 1).to_string());
        let data: Value = serde_json::from_str(&event.data)
            .unwrap_or_else(|error| panic!("event data is not JSON: {error}: {}", event.data));
        if index < deltas.len() {
            assert_eq!(event.event, "chunk");
            assert_eq!(data["text"].as_str(), Some(deltas[index]));
            read.push_str(deltas[index]);
        } else {
            assert_eq!(event.event, "error");
            assert_eq!(data["message"].as_str(), Some(&*text));
        }
    }
    assert_eq!(read, text);
}

/// One provider stream's items: deltas (never empty), then usage when
/// reported and `Finished`, or one error; nothing after. The reader had all
/// its input at once, so it must not have waited for more (`Timeout`).
fn check_reply(items: &[Result<ProviderEvent, ProviderError>]) {
    let mut ended = false;
    for (index, item) in items.iter().enumerate() {
        assert!(!ended, "an item after the end: {items:?}");
        match item {
            Ok(ProviderEvent::Delta(text)) => assert!(!text.is_empty(), "an empty delta"),
            Ok(ProviderEvent::Usage(_)) => assert!(
                matches!(
                    items.get(index + 1),
                    Some(Ok(ProviderEvent::Finished { .. }))
                ),
                "usage not followed by Finished: {items:?}"
            ),
            Ok(ProviderEvent::Finished { .. }) => ended = true,
            Err(error) => {
                assert_ne!(
                    error.kind,
                    ProviderErrorKind::Timeout,
                    "the reader stalled: {error}"
                );
                ended = true;
            }
        }
    }
    assert!(
        ended,
        "the stream ended neither finished nor failed: {items:?}"
    );
}

/// The OpenAI-compatible stream reader: any upstream body, in chunks cut
/// anywhere, is a well-formed reply or one classified error.
pub fn openai_stream(data: &[u8]) {
    let (control, body) = data.split_at(data.len().min(3));
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts(control, body.len()) {
        chunks.push(Bytes::copy_from_slice(&body[start..cut]));
        start = cut;
    }
    chunks.push(Bytes::copy_from_slice(&body[start..]));
    let stream = openai::read_streamed_body(chunks, READ_TIMEOUT);
    let items: Vec<_> = runtime().block_on(stream.collect());
    check_reply(&items);
}

/// An upstream chunk's JSON: whenever the fast path reads it, serde_json
/// reads the same (see `providers::openai::check_chunk_fast_path`).
pub fn openai_chunk(data: &[u8]) {
    openai::check_chunk_fast_path(data);
}

/// The answer the in-memory Bedrock endpoint gives: status and body.
type BedrockAnswer = Arc<Mutex<(u16, Bytes)>>;

#[derive(Debug)]
struct Answering(BedrockAnswer);

impl HttpConnector for Answering {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let (status, body) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let status =
            StatusCode::try_from(status).unwrap_or_else(|error| panic!("status {status}: {error}"));
        let mut response = HttpResponse::new(status, SdkBody::from(body));
        let content_type = if status.is_success() {
            "application/vnd.amazon.eventstream"
        } else {
            "application/json"
        };
        response.headers_mut().insert("content-type", content_type);
        HttpConnectorFuture::ready(Ok(response))
    }
}

fn bedrock() -> &'static (BedrockProvider, BedrockAnswer) {
    static BEDROCK: OnceLock<(BedrockProvider, BedrockAnswer)> = OnceLock::new();
    BEDROCK.get_or_init(|| {
        let answer: BedrockAnswer = Arc::new(Mutex::new((200, Bytes::new())));
        let connector = SharedHttpConnector::new(Answering(Arc::clone(&answer)));
        let credentials = Credentials::new("AKIDFUZZ", "secret", None, None, "fuzz");
        let sdk_config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .http_client(http_client_fn(move |_, _| connector.clone()))
            .build();
        let provider = BedrockProvider::new(&sdk_config, Some("http://bedrock.fuzz"));
        (provider, answer)
    })
}

/// The Bedrock ConverseStream reader (the SDK's event-stream decoding and
/// ours): any body, under any of a few statuses, is a well-formed reply or
/// one classified error.
pub fn bedrock_stream(data: &[u8]) {
    const STATUSES: [u16; 6] = [200, 200, 400, 429, 500, 503];
    let (status, body) = match data.split_first() {
        Some((first, body)) => (STATUSES[usize::from(*first) % STATUSES.len()], body),
        None => (200, data),
    };
    let (provider, answer) = bedrock();
    *answer.lock().unwrap_or_else(PoisonError::into_inner) = (status, Bytes::copy_from_slice(body));
    let request = CompletionRequest {
        model: "anthropic.claude-3-haiku-20240307-v1:0".into(),
        turns: PromptTurns::new(
            Arc::from([]),
            History::default(),
            ChatTurn::new(TurnRole::User, "hello"),
        ),
        max_output_tokens: 64,
        guardrail: None,
        sampling: Sampling::default(),
        timeout: READ_TIMEOUT,
    };
    runtime().block_on(async {
        match provider.stream(request).await {
            Ok(stream) => check_reply(&stream.collect::<Vec<_>>().await),
            Err(error) => {
                assert_ne!(
                    error.kind,
                    ProviderErrorKind::Timeout,
                    "the call stalled: {error}"
                );
            }
        }
    });
}

/// A request body accepted by the contract is one the contract writes back
/// the same: its own JSON is accepted again, as the same request.
fn request_round_trip<T>(value: &Value)
where
    T: ContractRequest + Serialize + PartialEq + Debug,
{
    let Ok(request) = T::from_json(value.clone()) else {
        return;
    };
    let json = serde_json::to_value(&request)
        .unwrap_or_else(|error| panic!("{request:?} did not serialize: {error}"));
    match T::from_json(json.clone()) {
        Ok(again) => assert_eq!(again, request, "changed through {json}"),
        Err(error) => panic!("{json} (from {value}) was refused: {error}"),
    }
}

/// A response the `external` client reads is one it would read the same
/// after writing it.
fn response_round_trip<T>(value: &Value)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let Ok(response) = serde_json::from_value::<T>(value.clone()) else {
        return;
    };
    let json = serde_json::to_value(&response)
        .unwrap_or_else(|error| panic!("{response:?} did not serialize: {error}"));
    match serde_json::from_value::<T>(json.clone()) {
        Ok(again) => assert_eq!(again, response, "changed through {json}"),
        Err(error) => panic!("{json} (from {value}) did not read back: {error}"),
    }
}

/// The seed accounting API's bodies: any JSON is refused with named fields
/// or read as a request that round-trips; responses read by the external
/// client round-trip too.
pub fn accounting_bodies(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    request_round_trip::<CalculateRequest>(&value);
    request_round_trip::<CheckRequest>(&value);
    request_round_trip::<InitializeRequest>(&value);
    request_round_trip::<FinalizeRequest>(&value);
    request_round_trip::<AbortRequest>(&value);
    request_round_trip::<GrantRequest>(&value);
    response_round_trip::<CalculateResponse>(&value);
    response_round_trip::<CheckResponse>(&value);
    response_round_trip::<InitializeResponse>(&value);
    response_round_trip::<SettlementResponse>(&value);
    response_round_trip::<BalanceResponse>(&value);
    response_round_trip::<UsageResponse>(&value);
    let _ = serde_json::from_value::<ErrorReply>(value);
}
