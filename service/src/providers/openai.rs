//! Any OpenAI-compatible `/chat/completions` server (vLLM, Ollama, llama.cpp
//! server, OpenAI itself).

use std::pin::Pin;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyDataStream, Full};
use hyper_util::client::legacy::Client as PooledClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use self::chunk::{ChunkChoice, scan_first_choice};
use super::reply::{ReplySource, ReplyStep, reply_stream};
use super::sse::SseData;
use super::{
    Completion, CompletionRequest, PromptTurns, Provider, ProviderError, ProviderErrorKind,
    ProviderStream, StopReason, TokenDeadline, Usage, mentions_context_window,
};
use crate::turns::{ChatTurn, chat_message};

mod chunk;

pub struct OpenAiProvider {
    transport: Transport,
    /// `Bearer {api_key}`, built once and marked sensitive.
    authorization: Option<HeaderValue>,
}

/// How requests reach the upstream, chosen once from its URL and the
/// proxy settings.
enum Transport {
    /// A plain-HTTP upstream that no proxy setting covers (a model server
    /// in the cluster): hyper's pooled client, without reqwest's layers
    /// around it. Those (default headers, redirects, retries, a proxy
    /// lookup and two URL parses per request) were 3.8% of the service's
    /// CPU at 100 clients.
    Direct {
        /// Boxed (reqwest keeps its own behind an `Arc`): the client is 120
        /// bytes of handles.
        client: Box<PooledClient<HttpConnector, Full<Bytes>>>,
        completions: Uri,
    },
    /// TLS, or an upstream behind a proxy: reqwest, through the proxy the
    /// settings name for the upstream, if any.
    Reqwest {
        client: reqwest::Client,
        /// Parsed once: a URL given as a string is parsed again for every request.
        completions: reqwest::Url,
    },
}

/// An upstream answer's body, whichever client read it.
type BodyError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

impl OpenAiProvider {
    /// `base_url` as OpenAI clients take it, including the API version
    /// (`http://localhost:8000/v1`); `api_key` is sent as a bearer token.
    /// Refuses a URL that does not parse, or a key that cannot be a header
    /// value, here rather than at the first reply. Proxies come from the
    /// environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self, ProviderError> {
        Self::with_proxies(base_url, api_key, &Matcher::from_system())
    }

    /// [`OpenAiProvider::new`] with the proxy settings given: an upstream
    /// they cover is called through its proxy.
    pub fn with_proxies(
        base_url: &str,
        api_key: Option<String>,
        proxies: &Matcher,
    ) -> Result<Self, ProviderError> {
        let invalid = |what: &str| ProviderError::new(ProviderErrorKind::Other, what.to_owned());
        let completions = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let completions: reqwest::Url = completions
            .parse()
            .map_err(|e| invalid(&format!("the base URL {base_url:?} is not a URL: {e}")))?;
        if !matches!(completions.scheme(), "http" | "https") {
            return Err(invalid(&format!(
                "the base URL {base_url:?} is not an http or https URL"
            )));
        }
        let uri: Uri = completions
            .as_str()
            .parse()
            .map_err(|e| invalid(&format!("the base URL {base_url:?} is not a URI: {e}")))?;
        // The settings are read once, here: they choose the client, and
        // reqwest is told the proxy they name rather than reading them again.
        let proxy = proxies.intercept(&uri);
        let transport = if proxy.is_none() && uri.scheme() == Some(&Scheme::HTTP) {
            let mut connector = HttpConnector::new();
            // Deltas are small writes; do not let Nagle hold them back.
            connector.set_nodelay(true);
            let client = PooledClient::builder(TokioExecutor::new())
                // Idle connections are closed after the pool's timeout
                // (90 s, as reqwest's) only with a timer.
                .pool_timer(TokioTimer::new())
                .build(connector);
            Transport::Direct {
                client: Box::new(client),
                completions: uri,
            }
        } else {
            let client = reqwest::Client::builder().tcp_nodelay(true);
            let client = match proxy {
                None => client.no_proxy(),
                Some(proxy) => {
                    let mut through = reqwest::Proxy::all(proxy.uri().to_string())
                        .map_err(|e| invalid(&format!("the proxy is not usable: {e}")))?;
                    if let Some(credentials) = proxy.basic_auth() {
                        through = through.custom_http_auth(credentials.clone());
                    }
                    client.proxy(through)
                }
            };
            let client = client.build().map_err(|e| invalid(&e.to_string()))?;
            Transport::Reqwest {
                client,
                completions,
            }
        };
        let authorization = api_key
            .map(|key| {
                // The error does not repeat the key.
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| invalid("the API key cannot be sent as a header value"))?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        Ok(Self {
            transport,
            authorization,
        })
    }

    /// Sends `body`; the answer's body when the upstream accepted it.
    async fn send(&self, body: &ChatRequest<'_>) -> Result<ResponseBody, ProviderError> {
        let encoded = body
            .encode()
            .map_err(|e| ProviderError::new(ProviderErrorKind::InvalidRequest, e.to_string()))?;
        let json = HeaderValue::from_static("application/json");
        let (status, body): (StatusCode, ResponseBody) = match &self.transport {
            Transport::Direct {
                client,
                completions,
            } => {
                let mut request = Request::new(Full::new(Bytes::from(encoded)));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = completions.clone();
                let headers = request.headers_mut();
                headers.insert(CONTENT_TYPE, json);
                if let Some(authorization) = &self.authorization {
                    headers.insert(AUTHORIZATION, authorization.clone());
                }
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| transport_error(&e))?;
                let status = response.status();
                let body = BodyDataStream::new(response.into_body()).map_err(BodyError::from);
                (status, Box::pin(body))
            }
            Transport::Reqwest {
                client,
                completions,
            } => {
                let mut request = client
                    .post(completions.clone())
                    .header(CONTENT_TYPE, json)
                    .body(encoded);
                if let Some(authorization) = &self.authorization {
                    request = request.header(AUTHORIZATION, authorization.clone());
                }
                let response = request.send().await.map_err(|e| transport_error(&e))?;
                let status = response.status();
                (
                    status,
                    Box::pin(response.bytes_stream().map_err(BodyError::from)),
                )
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        let body = read_whole(body).await.unwrap_or_default();
        Err(rejection(status, &body))
    }
}

/// All of `body`.
async fn read_whole(mut body: ResponseBody) -> Result<Bytes, BodyError> {
    let mut whole = BytesMut::new();
    while let Some(bytes) = body.next().await {
        whole.extend_from_slice(&bytes?);
    }
    Ok(whole.freeze())
}

/// A `/chat/completions` request. Its messages are written by hand: each
/// text goes in as the JSON string it was encoded to once
/// ([`crate::shared_text::SharedText::json`]), and a session's history,
/// sent again with every reply, as the messages its segments hold encoded
/// ([`crate::turns::History::chat_messages`]).
struct ChatRequest<'a> {
    model: &'a str,
    turns: &'a PromptTurns,
    options: RequestOptions<'a>,
}

/// The fields after `messages`.
#[derive(Serialize)]
struct RequestOptions<'a> {
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> ChatRequest<'a> {
    fn new(request: &'a CompletionRequest, stream: bool) -> Self {
        Self {
            model: &request.model,
            turns: &request.turns,
            options: RequestOptions {
                max_tokens: request.max_output_tokens,
                temperature: request.sampling.temperature,
                top_p: request.sampling.top_p,
                stop: &request.sampling.stop,
                stream,
                stream_options: stream.then_some(StreamOptions {
                    include_usage: true,
                }),
            },
        }
    }

    /// The request as JSON, in a buffer sized once: a long session's prompt
    /// is tens of KiB, which a growing buffer would copy several times over.
    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut body = Vec::with_capacity(self.encoded_size_hint());
        body.extend_from_slice(br#"{"model":"#);
        serde_json::to_writer(&mut body, self.model)?;
        body.extend_from_slice(br#","messages":"#);
        // Every message goes after a comma (the history's come encoded so);
        // the first one's opens the list instead.
        let list_at = body.len();
        for turn in self.turns.instructions() {
            body.push(b',');
            write_chat_message(turn, &mut body);
        }
        for messages in self.turns.history().chat_messages() {
            body.extend_from_slice(messages);
        }
        body.push(b',');
        write_chat_message(self.turns.message(), &mut body);
        body[list_at] = b'[';
        body.push(b']');
        // The options close the request: their opening brace becomes the
        // comma after `messages`.
        let options_at = body.len();
        serde_json::to_writer(&mut body, &self.options)?;
        body[options_at] = b',';
        Ok(body)
    }

    /// About the size of the encoded request: the texts, and room for the
    /// rest (fields, roles).
    fn encoded_size_hint(&self) -> usize {
        let turns = &self.turns;
        let loose = turns
            .instructions()
            .iter()
            .chain(std::iter::once(turns.message()))
            .map(|turn| turn.text.json().len() + 40)
            .sum::<usize>();
        let history = turns
            .history()
            .chat_messages()
            .map(<[u8]>::len)
            .sum::<usize>();
        loose + history + self.model.len() + 256
    }
}

fn write_chat_message(turn: &ChatTurn, body: &mut Vec<u8>) {
    for part in chat_message(turn) {
        body.extend_from_slice(part.as_bytes());
    }
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

/// An error object; servers differ in what they fill in (`code` is a string
/// at OpenAI, a number at llama.cpp).
#[derive(Default, Deserialize)]
struct WireError {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl WireError {
    fn code(&self) -> &str {
        self.code
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    fn is_throttling(&self) -> bool {
        let kind = self.kind.as_deref().unwrap_or_default();
        matches!(self.code(), "rate_limit_exceeded" | "insufficient_quota")
            || matches!(kind, "requests" | "tokens" | "rate_limit_error")
    }

    fn is_context_window(&self) -> bool {
        self.code() == "context_length_exceeded" || mentions_context_window(&self.message)
    }
}

/// `{"error": {...}}` as OpenAI sends it, or the error fields at top level
/// as some compatible servers do.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorBody {
    Wrapped { error: WireError },
    Flat(WireError),
}

fn rejection(status: StatusCode, body: &[u8]) -> ProviderError {
    let error = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody::Wrapped { error } | ErrorBody::Flat(error)) => error,
        Err(_) => WireError {
            message: String::from_utf8_lossy(body).into_owned(),
            ..WireError::default()
        },
    };
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => ProviderErrorKind::Throttled,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderErrorKind::Auth,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => ProviderErrorKind::Timeout,
        _ if error.is_context_window() => ProviderErrorKind::ContextWindow,
        status if status.is_server_error() => ProviderErrorKind::Unavailable,
        status if status.is_client_error() => ProviderErrorKind::InvalidRequest,
        _ => ProviderErrorKind::Other,
    };
    ProviderError::new(kind, format!("HTTP {status}: {}", error.message))
}

/// A failure to reach the upstream or to read its answer, with its causes
/// (the clients' own messages name only the request).
fn transport_error(error: &(dyn std::error::Error + 'static)) -> ProviderError {
    let mut message = error.to_string();
    let mut timed_out = is_timeout(error);
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        timed_out |= is_timeout(cause);
        source = cause.source();
    }
    let kind = if timed_out {
        ProviderErrorKind::Timeout
    } else {
        ProviderErrorKind::Unavailable
    };
    ProviderError::new(kind, message)
}

fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(error) = error.downcast_ref::<reqwest::Error>() {
        error.is_timeout()
    } else if let Some(error) = error.downcast_ref::<hyper::Error>() {
        error.is_timeout()
    } else if let Some(error) = error.downcast_ref::<std::io::Error>() {
        error.kind() == std::io::ErrorKind::TimedOut
    } else {
        false
    }
}

fn finish_reason(reason: &str) -> StopReason {
    match reason {
        "stop" => StopReason::EndTurn,
        "length" => StopReason::MaxTokens,
        "content_filter" => StopReason::ContentFiltered,
        other => StopReason::Other(other.to_owned()),
    }
}

#[derive(Deserialize)]
struct Chunk {
    /// The first choice (Parley asks for one): read without collecting
    /// the array, which cost an allocation per token.
    #[serde(default, rename = "choices", deserialize_with = "first_choice")]
    choice: Option<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

/// Reads a stream's chunks: on the fast path while they have the common
/// shape, else with serde_json (the same answer either way). A server
/// whose chunks have another shape (Azure's content filter results, for
/// one) would have each chunk read twice, so after a few misses in a row
/// the rest of its stream goes straight to serde_json.
#[derive(Default)]
struct ChunkReader {
    misses_in_a_row: u8,
}

/// Misses in a row after which a stream's chunks skip the fast path. More
/// than one: a stream's last chunk (`usage`) always misses.
const FAST_PATH_MISSES: u8 = 3;

impl ChunkReader {
    fn read(&mut self, data: &[u8]) -> serde_json::Result<Chunk> {
        if self.tries_fast_path() {
            if let Some(choice) = scan_first_choice(data) {
                self.misses_in_a_row = 0;
                return Ok(Chunk {
                    choice,
                    usage: None,
                    error: None,
                });
            }
            self.misses_in_a_row += 1;
        }
        serde_json::from_slice(data)
    }

    fn tries_fast_path(&self) -> bool {
        self.misses_in_a_row < FAST_PATH_MISSES
    }
}

/// Whenever the fast path reads `data`, serde_json reads it the same (the
/// `openai_chunk` fuzz target's property).
#[cfg(any(test, feature = "fuzzing"))]
pub fn check_chunk_fast_path(data: &[u8]) {
    let Some(choice) = scan_first_choice(data) else {
        return;
    };
    match serde_json::from_slice::<Chunk>(data) {
        Ok(chunk) => {
            assert!(chunk.usage.is_none() && chunk.error.is_none());
            assert_eq!(chunk.choice, choice, "the fast path misread a chunk");
        }
        Err(error) => panic!("the fast path read a chunk serde_json refuses: {error}"),
    }
}

/// The first element of an array of choices; the others are skipped.
fn first_choice<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ChunkChoice>, D::Error> {
    struct First;

    impl<'de> Visitor<'de> for First {
        type Value = Option<ChunkChoice>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("an array of choices")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut choices: A) -> Result<Self::Value, A::Error> {
            let first = choices.next_element()?;
            while choices.next_element::<IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }

    deserializer.deserialize_seq(First)
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<ResponseChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    message: ResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn stream(&self, request: CompletionRequest) -> Result<ProviderStream, ProviderError> {
        let mut deadline = TokenDeadline::start(request.timeout);
        let body = deadline
            .bound(self.send(&ChatRequest::new(&request, true)))
            .await??;
        Ok(reply_stream(ChatReply::new(body), deadline))
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError> {
        let mut deadline = TokenDeadline::start(request.timeout);
        let call = async {
            let body = self.send(&ChatRequest::new(&request, false)).await?;
            let body = read_whole(body).await.map_err(|e| transport_error(&*e))?;
            serde_json::from_slice::<ChatResponse>(&body).map_err(|e| {
                ProviderError::new(
                    ProviderErrorKind::Unavailable,
                    format!("the answer is not a chat completion: {e}"),
                )
            })
        };
        let response = deadline.bound(call).await??;
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(ProviderError::new(
                ProviderErrorKind::Other,
                "the completion has no choices",
            ));
        };
        Ok(Completion {
            text: choice.message.content.unwrap_or_default(),
            usage: response.usage.map(Usage::from),
            // A server that omits it has nothing else to report.
            stop_reason: choice
                .finish_reason
                .as_deref()
                .map_or(StopReason::EndTurn, finish_reason),
        })
    }
}

/// A streamed chat completion being read.
struct ChatReply {
    events: SseData<ResponseBody>,
    chunks: ChunkReader,
    stop_reason: Option<StopReason>,
    usage: Option<Usage>,
}

/// The provider stream of a streamed chat completion whose body is
/// `chunks`, read as `stream` reads a server's answer (for the fuzz targets).
#[cfg(feature = "fuzzing")]
pub fn read_streamed_body(
    chunks: Vec<bytes::Bytes>,
    timeout: std::time::Duration,
) -> ProviderStream {
    let body: ResponseBody = Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)));
    reply_stream(ChatReply::new(body), TokenDeadline::start(timeout))
}

impl ChatReply {
    fn new(body: ResponseBody) -> Self {
        Self {
            events: SseData::new(body),
            chunks: ChunkReader::default(),
            stop_reason: None,
            usage: None,
        }
    }

    fn finished(&mut self) -> ReplyStep {
        ReplyStep::Finished {
            // A server that sends `[DONE]` without a finish reason has
            // nothing else to report: it ended its turn.
            stop_reason: self.stop_reason.take().unwrap_or(StopReason::EndTurn),
            usage: self.usage.take(),
        }
    }
}

impl ReplySource for ChatReply {
    async fn step(&mut self) -> ReplyStep {
        let chunk = match self.events.next().await {
            // Some servers close without `[DONE]` after the finish reason.
            None if self.stop_reason.is_some() => None,
            None => {
                return ReplyStep::Failed(ProviderError::new(
                    ProviderErrorKind::Unavailable,
                    "the stream ended before the reply finished",
                ));
            }
            Some(Err(error)) => return ReplyStep::Failed(transport_error(&*error)),
            Some(Ok(b"[DONE]")) => None,
            Some(Ok(data)) => Some(self.chunks.read(data)),
        };
        let chunk = match chunk {
            None => return self.finished(),
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                return ReplyStep::Failed(ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("unreadable stream chunk: {e}"),
                ));
            }
        };
        if let Some(error) = chunk.error {
            return ReplyStep::Failed(stream_error(&error));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        let Some(choice) = chunk.choice else {
            return ReplyStep::Nothing;
        };
        if let Some(reason) = choice.finish_reason {
            self.stop_reason = Some(finish_reason(&reason));
        }
        match choice.delta.and_then(|d| d.content) {
            Some(text) if !text.is_empty() => ReplyStep::Delta(text),
            _ => ReplyStep::Nothing,
        }
    }
}

/// An `error` object inside an already started stream.
fn stream_error(error: &WireError) -> ProviderError {
    let kind = if error.is_throttling() {
        ProviderErrorKind::Throttled
    } else if error.is_context_window() {
        ProviderErrorKind::ContextWindow
    } else {
        ProviderErrorKind::Unavailable
    };
    ProviderError::new(kind, error.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::providers::{ChatTurn, Role, Sampling};
    use crate::turns::History;

    #[test]
    fn the_fast_chunk_reader_agrees_with_serde_json() {
        let seeds =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/openai_chunk");
        let mut read_fast = 0;
        for seed in std::fs::read_dir(seeds).unwrap() {
            let data = std::fs::read(seed.unwrap().path()).unwrap();
            check_chunk_fast_path(&data);
            read_fast += usize::from(chunk::scan_first_choice(&data).is_some());
        }
        // Not only refusals: the common shapes take the fast path.
        assert!(read_fast >= 3, "{read_fast} seeds read on the fast path");
    }

    #[test]
    fn a_base_url_or_key_that_cannot_be_sent_is_refused_at_construction() {
        let provider = OpenAiProvider::new("http://localhost:8000/v1/", None).unwrap();
        let Transport::Direct { completions, .. } = provider.transport else {
            panic!("a plain-HTTP upstream without a proxy went through reqwest");
        };
        assert_eq!(completions, "http://localhost:8000/v1/chat/completions");
        assert!(OpenAiProvider::new("http://local host/v1", None).is_err());
        assert!(OpenAiProvider::new("localhost:8000/v1", None).is_err());
        let Err(error) = OpenAiProvider::new("http://localhost/v1", Some("sk-\nsecret".into()))
        else {
            panic!("a key with a line break was accepted");
        };
        assert!(!error.message.contains("secret"), "{}", error.message);
        let sent = OpenAiProvider::new("http://localhost/v1", Some("sk-1".into())).unwrap();
        let authorization = sent.authorization.unwrap();
        assert_eq!(authorization, "Bearer sk-1");
        assert!(authorization.is_sensitive());
    }

    /// Plain HTTP goes straight to the pooled client unless a proxy setting
    /// covers the host; TLS and proxied upstreams go through reqwest.
    #[test]
    fn only_a_plain_http_upstream_outside_the_proxy_settings_goes_direct() {
        let none = Matcher::builder().build();
        let proxied = Matcher::builder()
            .http("http://proxy.internal:3128")
            .https("http://proxy.internal:3128")
            .no("vllm.models.svc,127.0.0.1")
            .build();
        let direct = |url: &str, proxies: &Matcher| {
            let provider = OpenAiProvider::with_proxies(url, None, proxies).unwrap();
            matches!(provider.transport, Transport::Direct { .. })
        };
        assert!(direct("http://vllm.models.svc:8000/v1", &none));
        assert!(!direct("https://api.openai.com/v1", &none));
        assert!(!direct("http://ollama.example:11434/v1", &proxied));
        assert!(direct("http://vllm.models.svc:8000/v1", &proxied));
        assert!(direct("http://127.0.0.1:8000/v1", &proxied));
        assert!(!direct("https://api.openai.com/v1", &proxied));
    }

    /// A stream whose chunks miss the fast path stops trying it after a few
    /// in a row; a stream's single miss (its `usage` chunk) does not, and
    /// the answers are serde_json's either way.
    #[test]
    fn a_stream_of_other_shapes_stops_trying_the_fast_path() {
        let common =
            br#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#;
        let filtered = br#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null,"content_filter_results":{"hate":{"filtered":false}}}]}"#;
        let usage = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let text = |chunk: Chunk| chunk.choice.and_then(|c| c.delta).and_then(|d| d.content);
        let mut reader = ChunkReader::default();
        for data in [&common[..], usage, common, usage, common] {
            assert_eq!(
                text(reader.read(data).unwrap()),
                text(serde_json::from_slice(data).unwrap())
            );
            assert!(reader.tries_fast_path());
        }
        let mut reader = ChunkReader::default();
        for sent in 1..=u32::from(FAST_PATH_MISSES) + 2 {
            assert_eq!(text(reader.read(filtered).unwrap()).as_deref(), Some("a"));
            assert_eq!(reader.tries_fast_path(), sent < u32::from(FAST_PATH_MISSES));
        }
        // Given up for this stream, common chunks included.
        assert_eq!(text(reader.read(common).unwrap()).as_deref(), Some("a"));
        assert!(!reader.tries_fast_path());
    }

    #[test]
    fn a_chunk_gives_its_first_choice() {
        let chunk: Chunk = serde_json::from_str(
            r#"{"id":"x","choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
        )
        .unwrap();
        let delta = chunk.choice.and_then(|choice| choice.delta);
        assert_eq!(delta.and_then(|delta| delta.content).as_deref(), Some("a"));
        for no_choice in [
            r#"{"choices":[]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"object":"chat.completion.chunk"}"#,
        ] {
            let chunk: Chunk = serde_json::from_str(no_choice).unwrap();
            assert!(chunk.choice.is_none(), "{no_choice}");
        }
        assert!(serde_json::from_str::<Chunk>(r#"{"choices":{"delta":{}}}"#).is_err());
    }

    fn request_of(turns: PromptTurns) -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            turns,
            max_output_tokens: 16,
            timeout: std::time::Duration::from_secs(1),
            guardrail: None,
            sampling: Sampling::default(),
        }
    }

    /// History texts go out as the JSON each one was encoded to once: the
    /// request must carry the text itself, neither escaped twice nor raw.
    #[test]
    fn message_texts_are_sent_as_json_strings_of_the_text() {
        let texts = [
            "plain",
            "quote \" backslash \\ newline \n",
            "é 🦀 \u{1}",
            "",
        ];
        let mut turns: Vec<ChatTurn> = texts
            .iter()
            .map(|text| ChatTurn::new(Role::User, *text))
            .collect();
        let message = turns.pop().unwrap();
        let request = request_of(PromptTurns::new(Arc::from([]), turns.into(), message));
        let body = ChatRequest::new(&request, true).encode().unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let contents: Vec<&str> = sent["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["content"].as_str().unwrap())
            .collect();
        assert_eq!(contents, texts);
        assert!(body.len() <= ChatRequest::new(&request, true).encoded_size_hint());
    }

    /// The hand-written request is the OpenAI body: every field, in both
    /// modes, with the optional ones left out when unset.
    #[test]
    fn the_request_is_an_openai_chat_completions_body() {
        let mut request = CompletionRequest {
            model: "m \"quoted\"".into(),
            turns: PromptTurns::new(
                Arc::from([ChatTurn::new(Role::System, "be brief")]),
                vec![
                    ChatTurn::new(Role::User, "hi"),
                    ChatTurn::new(Role::Assistant, "hello"),
                ]
                .into(),
                ChatTurn::new(Role::User, "again"),
            ),
            max_output_tokens: 64,
            timeout: std::time::Duration::from_secs(1),
            guardrail: None,
            sampling: Sampling {
                temperature: Some(0.5),
                top_p: Some(0.25),
                stop: vec!["END".into()],
            },
        };
        let sent = |request: &CompletionRequest, stream| -> serde_json::Value {
            serde_json::from_slice(&ChatRequest::new(request, stream).encode().unwrap()).unwrap()
        };
        let messages = serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ]);
        assert_eq!(
            sent(&request, true),
            serde_json::json!({
                "model": "m \"quoted\"",
                "messages": messages,
                "max_tokens": 64,
                "temperature": 0.5,
                "top_p": 0.25,
                "stop": ["END"],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        request.sampling = Sampling::default();
        assert_eq!(
            sent(&request, false),
            serde_json::json!({
                "model": "m \"quoted\"",
                "messages": messages,
                "max_tokens": 64,
                "stream": false,
            })
        );
    }

    /// Every message is sent once and in order, whatever the prompt leaves
    /// out: instructions or none, a history or none, one cut anywhere in
    /// its segments, sealed or not.
    #[test]
    fn every_prompt_shape_is_one_list_of_its_messages() {
        let turns = (0..40).map(|index| {
            let role = if index % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            ChatTurn::new(role, format!("turn {index} \"quoted\""))
        });
        // Built whole for one prompt, and kept (its full segments sealed).
        let built: History = turns.clone().collect();
        let mut kept = History::default();
        kept.extend(turns);
        let message = ChatTurn::new(Role::User, "now");
        let system = || vec![ChatTurn::new(Role::System, "rules")];
        for (history, instructions) in [
            (&built, vec![]),
            (&built, system()),
            (&kept, vec![]),
            (&kept, system()),
        ] {
            for dropped in [0, 1, 15, 16, 17, 39, 40] {
                let request = request_of(PromptTurns::new(
                    instructions.clone().into(),
                    history.without_oldest(dropped),
                    message.clone(),
                ));
                let body = ChatRequest::new(&request, true).encode().unwrap();
                let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let expected: Vec<serde_json::Value> = request
                    .turns
                    .iter()
                    .map(|turn| {
                        let role = match turn.role {
                            Role::System => "system",
                            Role::User => "user",
                            Role::Assistant => "assistant",
                        };
                        serde_json::json!({"role": role, "content": turn.text.as_str()})
                    })
                    .collect();
                assert_eq!(expected.len(), instructions.len() + 40 - dropped + 1);
                assert_eq!(sent["messages"], serde_json::Value::Array(expected));
                assert!(body.len() <= ChatRequest::new(&request, true).encoded_size_hint());
            }
        }
    }
}
