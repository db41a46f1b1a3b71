//! The accounting API (seed-compatible paths and field names). Bodies are the
//! types of [`crate::accounting::contract`]; the work is the configured
//! [`crate::accounting::Accounting`] (built-in ledger or external service).
//!
//! Every endpoint is one generic handler: a `POST` answers its body with the
//! operation of the body's [`ContractRequest`] type, a `GET` reads the
//! [`AccountReport`] it names. Its OpenAPI operation is built from the same
//! types and the [`Answers`] table below.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request, State};
use axum::routing::{self, MethodRouter};
use serde_json::{Value, json};
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterIn, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::{Content, Ref, RefOr, Required, ResponseBuilder, Schema};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use super::ApiJson;
use crate::accounting::Caller;
use crate::accounting::contract::{
    AbortRequest, AccountQuery, AccountReport, BalanceResponse, CalculateRequest, CheckRequest,
    ContractRequest, FinalizeRequest, GrantRequest, InitializeRequest, UsageResponse, paths,
};
use crate::error::{Error, ErrorBody};
use crate::state::AppState;

/// The accounting endpoints, documented.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(post::<CalculateRequest>(paths::CALCULATE, &CALCULATE))
        .routes(post::<CheckRequest>(paths::CHECK, &CHECK))
        .routes(post::<InitializeRequest>(paths::INITIALIZE, &INITIALIZE))
        .routes(post::<FinalizeRequest>(paths::FINALIZE, &FINALIZE))
        .routes(post::<AbortRequest>(paths::ABORT, &ABORT))
        .routes(get::<BalanceResponse>(paths::BALANCE, &BALANCE))
        .routes(get::<UsageResponse>(paths::USAGE, &USAGE))
        .routes(post::<GrantRequest>(paths::GRANT, &GRANT))
}

/// What the OpenAPI document says an endpoint answers: its 200 and the error
/// statuses of its own (those of the token, body and query come from
/// `standard_errors`).
struct Answers {
    ok: &'static str,
    errors: &'static [(u16, &'static str)],
}

const FOREIGN_ACCOUNT: (u16, &str) = (403, "Another user's account");
const NO_SESSION: (u16, &str) = (404, "`STREAMING_SESSION_NOT_FOUND`");
const INVALID_FIELDS: (u16, &str) = (400, "`INVALID_FIELDS`");
const UNAVAILABLE: (u16, &str) = (503, "Ledger or accounting unavailable");
const UNAVAILABLE_DENIED: (u16, &str) = (503, "Ledger or accounting unavailable: denied");
const INVALID_SESSION_ID: (u16, &str) = (
    422,
    "`VALIDATION_FAILED`: sessionId too long with the account's user id",
);
const INVALID_PAGE: (u16, &str) = (422, "`VALIDATION_FAILED`: page or limit out of range");

const CALCULATE: Answers = Answers {
    ok: "Worst-case price",
    errors: &[
        (
            400,
            "`INVALID_FIELDS` or `UNKNOWN_MODEL` (with the allowed list)",
        ),
        (503, "Accounting unavailable"),
    ],
};

const CHECK: Answers = Answers {
    ok: "Whether the account can pay now (reserves nothing)",
    errors: &[
        (400, "`INVALID_FIELDS` naming missing or unknown fields"),
        FOREIGN_ACCOUNT,
        UNAVAILABLE_DENIED,
    ],
};

const INITIALIZE: Answers = Answers {
    ok: "Credits held for the reply",
    errors: &[
        (400, "`INVALID_FIELDS`, `UNKNOWN_MODEL`"),
        (
            402,
            "`INSUFFICIENT_CREDITS` with balance, available and requiredCredits",
        ),
        FOREIGN_ACCOUNT,
        (409, "This sessionId was already finalized or aborted"),
        INVALID_SESSION_ID,
        UNAVAILABLE_DENIED,
    ],
};

const FINALIZE: Answers = Answers {
    ok: "Charged once; a repeat answers the first record with replayed: true",
    errors: &[
        INVALID_FIELDS,
        FOREIGN_ACCOUNT,
        NO_SESSION,
        INVALID_SESSION_ID,
        UNAVAILABLE,
    ],
};

const ABORT: Answers = Answers {
    ok: "Released (no tokens) or charged once for the tokens generated",
    errors: &[
        INVALID_FIELDS,
        FOREIGN_ACCOUNT,
        NO_SESSION,
        INVALID_SESSION_ID,
        UNAVAILABLE,
    ],
};

const BALANCE: Answers = Answers {
    ok: "Balance, open holds and available credits",
    errors: &[FOREIGN_ACCOUNT, INVALID_PAGE, UNAVAILABLE],
};

const USAGE: Answers = Answers {
    ok: "Usage records, newest first",
    errors: &[FOREIGN_ACCOUNT, INVALID_PAGE, UNAVAILABLE],
};

const GRANT: Answers = Answers {
    ok: "The account after the grant",
    errors: &[
        INVALID_FIELDS,
        (403, "Not an admin"),
        (422, "`VALIDATION_FAILED`: zero credits"),
        UNAVAILABLE,
    ],
};

/// A contract request body; missing and unknown fields are named in a 400
/// `INVALID_FIELDS` answer.
pub struct ContractJson<T>(pub T);

impl<T: ContractRequest> FromRequest<AppState> for ContractJson<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let ApiJson(value) = ApiJson::<Value>::from_request(request, state).await?;
        T::from_json(value).map(ContractJson)
    }
}

async fn answer<R: ContractRequest>(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<R>,
) -> Result<Json<R::Response>, Error> {
    request
        .answer(state.accounting.as_ref(), &caller)
        .await
        .map(Json)
}

async fn report<R: AccountReport>(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<R>, Error> {
    let Query(query) = query.map_err(|rejection| Error::InvalidQuery(rejection.body_text()))?;
    query.page()?;
    R::read(state.accounting.as_ref(), &caller, query)
        .await
        .map(Json)
}

type Schemas = Vec<(String, RefOr<Schema>)>;

const JSON: &str = "application/json";

fn post<R>(path: &str, answers: &Answers) -> UtoipaMethodRouter<AppState>
where
    R: ContractRequest + ToSchema,
    R::Response: ToSchema,
{
    let mut schemas = Schemas::new();
    let body = RequestBodyBuilder::new()
        .content(JSON, Content::new(Some(schema_ref::<R>(&mut schemas))))
        .required(Some(Required::True))
        .build();
    let operation = OperationBuilder::new().request_body(Some(body));
    let handler = routing::post(answer::<R>);
    endpoint::<R::Response>(path, HttpMethod::Post, operation, answers, schemas, handler)
}

fn get<R: AccountReport + ToSchema>(path: &str, answers: &Answers) -> UtoipaMethodRouter<AppState> {
    let parameters = AccountQuery::into_params(|| Some(ParameterIn::Query));
    let operation = OperationBuilder::new().parameters(Some(parameters));
    let handler = routing::get(report::<R>);
    endpoint::<R>(
        path,
        HttpMethod::Get,
        operation,
        answers,
        Schemas::new(),
        handler,
    )
}

/// The route of `path` and its operation: named after the path's last
/// segment, in the `credits` tag, behind the bearer token, answering
/// `Response` or an [`ErrorBody`].
fn endpoint<Response: ToSchema>(
    path: &str,
    method: HttpMethod,
    operation: OperationBuilder,
    answers: &Answers,
    mut schemas: Schemas,
    handler: MethodRouter<AppState>,
) -> UtoipaMethodRouter<AppState> {
    let json_response = |description: &str, schema: Ref| {
        ResponseBuilder::new()
            .description(description)
            .content(JSON, Content::new(Some(schema)))
            .build()
    };
    let ok = json_response(answers.ok, schema_ref::<Response>(&mut schemas));
    let mut operation = operation
        .operation_id(path.rsplit('/').next())
        .tag("credits")
        .response("200", ok)
        .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
    let error_body = schema_ref::<ErrorBody>(&mut schemas);
    for (status, description) in answers.errors {
        let response = json_response(description, error_body.clone());
        operation = operation.response(status.to_string(), response);
    }
    let mut paths = Paths::new();
    paths.add_path_operation(path, vec![method], operation.build());
    (schemas, paths, handler)
}

/// OpenAPI links from an opened hold to its finalize and abort, so clients
/// and API fuzzers can chain them.
pub(super) fn link_holds(openapi: &mut utoipa::openapi::OpenApi) {
    let endings = [
        (
            "finalize",
            json!({"sessionId": "$response.body#/sessionId", "userId": "$response.body#/userId", "actualTokens": 1, "success": true}),
        ),
        (
            "abort",
            json!({"sessionId": "$response.body#/sessionId", "userId": "$response.body#/userId", "tokensGenerated": 1}),
        ),
    ];
    let opened = openapi
        .paths
        .paths
        .get_mut(paths::INITIALIZE)
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.responses.responses.get_mut("200"));
    if let Some(RefOr::T(response)) = opened {
        for (operation_id, body) in endings {
            let link = LinkBuilder::new()
                .operation_id(operation_id)
                .request_body(Some(body))
                .build();
            response
                .links
                .insert(operation_id.to_owned(), RefOr::T(link));
        }
    }
}

/// A reference to `T`'s component schema, which joins `schemas` with every
/// schema it refers to.
fn schema_ref<T: ToSchema>(schemas: &mut Schemas) -> Ref {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
    Ref::from_schema_name(T::name())
}
