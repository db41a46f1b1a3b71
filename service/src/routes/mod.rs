//! The HTTP API and the web pages. `app` builds the router and its OpenAPI
//! document together (from the handlers' annotations; the accounting
//! endpoints from their contract types), so the document cannot drift from
//! the routes.

mod accounting;
mod dev;
mod keys;
mod models;
mod observe;
mod openai;
mod ops;
mod pages;
mod policy;
mod replies;
mod sessions;
mod standard_errors;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::bearer_token;
use crate::connections::BodyReadTimedOut;
use crate::error::Error;
use crate::metrics::track_requests;
use crate::ratelimit::Scope;
use crate::state::AppState;
use openai::OpenAiError;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley chat API", description = "Metered, supervised LLM chat"),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "Chat sessions and their messages"),
        (name = "credits", description = "Seed-compatible accounting: prices, checks, holds, balances"),
        (name = "replies", description = "Model replies, whole or streamed, the models offered and the one to use for a task"),
        (name = "observation", description = "Supervisors and admins watching replies live, and the audit of it"),
        (name = "policy", description = "Content-policy blocks: what was refused or cut, for supervisors and admins"),
        (name = "keys", description = "API keys for programs, usable wherever a token is"),
        (name = "openai", description = "The OpenAI-compatible API: chat completions (whole or streamed) and models, metered and observable like chat replies"),
        (name = "operations", description = "Liveness, readiness and metrics"),
        (name = "dev", description = "Dev sign-in, present only in local mode on the generated dev secret"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT or API key")
            .description(Some(
                "A JWT, or an API key (`pk_…`, from `POST /api/keys`) acting as its creator",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

pub fn app(state: impl Into<AppState>) -> Router {
    let state = state.into();
    let api = OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .routes(routes!(sessions::create_session, sessions::list_sessions))
        .routes(routes!(
            sessions::get_session,
            sessions::rename_session,
            sessions::delete_session
        ))
        .merge(accounting::routes())
        .routes(routes!(sessions::list_messages, replies::send_message))
        .routes(routes!(
            replies::stream_reply,
            replies::reattach,
            replies::stop_reply
        ))
        .routes(routes!(models::list_models))
        .routes(routes!(models::recommend_route))
        .routes(routes!(observe::observe_session))
        .routes(routes!(observe::live))
        .routes(routes!(observe::audit))
        .routes(routes!(policy::blocks))
        .routes(routes!(keys::create_key, keys::list_keys))
        .routes(routes!(keys::delete_key))
        .merge(openai::routes())
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics));
    let api = if state.dev_tokens.is_some() {
        api.merge(dev::routes())
    } else {
        api
    };
    let (router, mut openapi) = api.split_for_parts();
    standard_errors::add_standard_errors(&mut openapi);
    sessions::document_session_operations(&mut openapi);
    accounting::link_holds(&mut openapi);
    let document = openapi_json(&openapi);
    let http_stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id,
                    )
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id());
    router
        .route(
            OPENAPI_PATH,
            get(move || {
                let document = document.clone();
                async move {
                    (
                        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                        document,
                    )
                }
            }),
        )
        .merge(pages::router())
        // Only on the routes: a path or method that does not exist is 404 or
        // 405 whatever token comes with it.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .fallback(|uri: Uri| async move { in_the_shape_of(&uri, Error::EndpointNotFound) })
        .method_not_allowed_fallback(|uri: Uri| async move {
            in_the_shape_of(&uri, Error::MethodNotAllowed)
        })
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.http_metrics.clone(),
            track_requests,
        ))
        .layer(http_stack)
        .with_state(state)
}

/// The error in the shape of the API `uri` belongs to: the OpenAI-compatible
/// one under `/v1/`, the chat API's elsewhere.
fn in_the_shape_of(uri: &Uri, error: Error) -> Response {
    if uri.path().starts_with(OPENAI_PREFIX) {
        OpenAiError::from(error).into_response()
    } else {
        error.into_response()
    }
}

/// Where the OpenAI-compatible API lives.
const OPENAI_PREFIX: &str = "/v1/";

/// Middleware applying the requests limit to authenticated `/api/` and
/// `/v1/` calls. The verified caller is left in the request's extensions, so
/// the handler does not verify the token again; unauthenticated requests
/// pass through to be refused by their handler.
async fn limit_requests(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if !path.starts_with("/api/") && !path.starts_with(OPENAI_PREFIX) {
        return next.run(request).await;
    }
    let Ok(token) = bearer_token(request.headers()) else {
        return next.run(request).await;
    };
    let principal = match state.auth.verify(token).await {
        Ok(principal) => principal,
        Err(error) => return in_the_shape_of(request.uri(), error),
    };
    if let Err(error) = state
        .rate_limiter
        .admit_request(Scope::User(&principal.sub))
        .await
    {
        return in_the_shape_of(request.uri(), error);
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// An SSE response to a GET, which a cache could store: `no-cache` says not to.
fn event_stream(
    frames: impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    sse_response(frames, true)
}

/// An SSE response to a POST. No cache stores a POST's response that
/// carries neither freshness nor `Content-Location` (RFC 9111, section 3),
/// so it goes without `Cache-Control`, and its headers (with the request id
/// added on the way out) fit the smallest header map, three entries: hyper
/// keeps that map for the connection while the reply streams, and it is
/// half the one a fourth header needs (about 0.3 KiB less per open stream).
fn posted_event_stream(
    frames: impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    sse_response(frames, false)
}

fn sse_response(
    frames: impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
    no_cache: bool,
) -> Response {
    let mut response = Response::new(axum::body::Body::from_stream(frames));
    // Sized for these headers and the request id.
    let headers = response.headers_mut();
    *headers = HeaderMap::with_capacity(3 + usize::from(no_cache));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // nginx and similar proxies must pass events through unbuffered.
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    if no_cache {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}

fn openapi_json(openapi: &utoipa::openapi::OpenApi) -> Bytes {
    match openapi.to_json() {
        Ok(json) => Bytes::from(json),
        Err(error) => {
            // Serializing a derived document cannot fail in practice; say so loudly if it does.
            tracing::error!(%error, "serializing the OpenAPI document failed");
            Bytes::from_static(b"{}")
        }
    }
}

/// A JSON body whose every rejection is an API error: bad syntax 400, wrong
/// types or unknown fields 422, too large 413, not JSON 415.
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(error)) => Err(Error::InvalidBody(error.body_text())),
            Err(JsonRejection::JsonSyntaxError(error)) => {
                Err(Error::MalformedJson(error.body_text()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Error::UnsupportedMediaType),
            Err(other) if let Some(timeout) = BodyReadTimedOut::find(&other) => {
                Err(Error::RequestTimeout(timeout))
            }
            Err(other) if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::PayloadTooLarge {
                    limit: state.limits.max_body_bytes,
                })
            }
            Err(other) => Err(Error::MalformedJson(other.body_text())),
        }
    }
}
