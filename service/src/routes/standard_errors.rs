//! Answers shared by many operations of the OpenAPI document. Whatever takes
//! a bearer token, a JSON body or query parameters answers that extractor's
//! errors, so they are added here from what each operation declares rather
//! than by hand on each one. A test sends every documented operation the
//! requests that get these errors and checks each status it gets is listed.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::{PartialSchema, ToSchema};

use crate::error::ErrorBody;

/// One error answer: its status and the codes it carries.
type StandardError = (u16, &'static str);

/// The bearer token extractors (`Principal`, `Caller`).
const BEARER_TOKEN: &[StandardError] = &[
    (
        401,
        "`MISSING_TOKEN`, or `INVALID_TOKEN` (also for several Authorization headers)",
    ),
    (
        503,
        "`AUTH_UNAVAILABLE`: the identity provider does not answer",
    ),
];

/// A token sent to an `/api/` operation that does not need one: the rate
/// limiter in front of `/api/` verifies every token it is given.
const SENT_TOKEN: &[StandardError] = &[
    (
        401,
        "`INVALID_TOKEN`: a bearer token was sent and is not valid (none is needed)",
    ),
    (
        503,
        "`AUTH_UNAVAILABLE`: a token was sent and the identity provider does not answer",
    ),
];

/// The rate limiter in front of every `/api/` request that carries a valid
/// token.
const RATE_LIMITED: &[StandardError] = &[
    (429, "`RATE_LIMITED`, with `Retry-After`"),
    (503, "`RATE_LIMITER_UNAVAILABLE`"),
];
const RATE_LIMITED_PREFIX: &str = "/api/";

/// JSON bodies (`ApiJson`, `ContractJson`) and the connection's body deadline.
const JSON_BODY: &[StandardError] = &[
    (400, "`MALFORMED_JSON`"),
    (
        408,
        "`REQUEST_TIMEOUT`: the body did not arrive in time; the connection closes",
    ),
    (413, "`PAYLOAD_TOO_LARGE`"),
    (
        415,
        "`UNSUPPORTED_MEDIA_TYPE`: no `Content-Type: application/json`",
    ),
];

/// Query parameters.
const QUERY: &[StandardError] = &[(400, "`INVALID_QUERY`: an unknown or mistyped parameter")];

/// Adds the shared errors to every operation that answers them.
pub fn add_standard_errors(openapi: &mut OpenApi) {
    let error_body = Ref::from_schema_name(ErrorBody::name());
    openapi
        .components
        .get_or_insert_with(Default::default)
        .schemas
        .entry(ErrorBody::name().into_owned())
        .or_insert_with(<ErrorBody as PartialSchema>::schema);
    for (path, item) in &mut openapi.paths.paths {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let mut errors: Vec<StandardError> = Vec::new();
            let rate_limited = path.starts_with(RATE_LIMITED_PREFIX);
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                errors.extend(BEARER_TOKEN);
            } else if rate_limited {
                errors.extend(SENT_TOKEN);
            }
            if rate_limited {
                errors.extend(RATE_LIMITED);
            }
            if operation.request_body.is_some() {
                errors.extend(JSON_BODY);
            }
            if takes_query(operation) {
                errors.extend(QUERY);
            }
            for error in errors {
                add_error(operation, error, &error_body);
            }
        }
    }
}

fn takes_query(operation: &Operation) -> bool {
    operation.parameters.iter().flatten().any(|parameter| {
        matches!(parameter, RefOr::T(parameter) if parameter.parameter_in == ParameterIn::Query)
    })
}

/// Lists `error` under its status, after what the operation already says there.
fn add_error(operation: &mut Operation, (status, codes): StandardError, error_body: &Ref) {
    let responses = &mut operation.responses.responses;
    match responses.get_mut(&status.to_string()) {
        Some(RefOr::T(response)) => {
            if !response.description.contains(codes) {
                response.description = format!("{}; {codes}", response.description);
            }
        }
        // A shared response component documents itself.
        Some(RefOr::Ref(_)) => {}
        None => {
            let response = ResponseBuilder::new()
                .description(codes)
                .content("application/json", Content::new(Some(error_body.clone())))
                .build();
            responses.insert(status.to_string(), RefOr::T(response));
        }
    }
}
