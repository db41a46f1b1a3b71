//! The accounting API (seed-compatible paths and field names). Bodies are the
//! types of [`crate::accounting::contract`]; the work is the configured
//! [`crate::accounting::Accounting`] (built-in ledger or external service).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request, State};
use serde_json::Value;

use super::ApiJson;
use crate::accounting::Caller;
use crate::accounting::contract::{
    AbortRequest, AccountQuery, BalanceResponse, CalculateRequest, CalculateResponse, CheckRequest,
    CheckResponse, ContractRequest, FinalizeRequest, GrantRequest, InitializeRequest,
    InitializeResponse, SettlementResponse, UsageResponse,
};
use crate::error::{Error, ErrorBody};
use crate::state::AppState;

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

fn account_query(
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<AccountQuery, Error> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| Error::InvalidQuery(rejection.body_text()))
}

#[utoipa::path(
    post,
    path = "/api/credits/calculate",
    tag = "credits",
    request_body = CalculateRequest,
    responses(
        (status = 200, description = "Worst-case price", body = CalculateResponse),
        (status = 400, description = "`INVALID_FIELDS` or `UNKNOWN_MODEL` (with the allowed list)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn calculate(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<CalculateRequest>,
) -> Result<Json<CalculateResponse>, Error> {
    state.accounting.calculate(&caller, request).await.map(Json)
}

#[utoipa::path(
    post,
    path = "/api/credits/check",
    tag = "credits",
    request_body = CheckRequest,
    responses(
        (status = 200, description = "Whether the account can pay now (reserves nothing)", body = CheckResponse),
        (status = 400, description = "`INVALID_FIELDS` naming missing or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable: denied", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn check(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<CheckRequest>,
) -> Result<Json<CheckResponse>, Error> {
    state.accounting.check(&caller, request).await.map(Json)
}

#[utoipa::path(
    post,
    path = "/api/streaming-sessions/initialize",
    tag = "credits",
    request_body = InitializeRequest,
    responses(
        (status = 200, description = "Credits held for the reply", body = InitializeResponse),
        (status = 400, description = "`INVALID_FIELDS`, `UNKNOWN_MODEL`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 402, description = "`INSUFFICIENT_CREDITS` with balance, available and requiredCredits", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 409, description = "This sessionId was already finalized or aborted", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable: denied", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn initialize(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<InitializeRequest>,
) -> Result<Json<InitializeResponse>, Error> {
    state
        .accounting
        .initialize(&caller, request)
        .await
        .map(Json)
}

#[utoipa::path(
    post,
    path = "/api/streaming-sessions/finalize",
    tag = "credits",
    request_body = FinalizeRequest,
    responses(
        (status = 200, description = "Charged once; a repeat answers the first record with replayed: true", body = SettlementResponse),
        (status = 400, description = "`INVALID_FIELDS`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 404, description = "`STREAMING_SESSION_NOT_FOUND`", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn finalize(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<FinalizeRequest>,
) -> Result<Json<SettlementResponse>, Error> {
    state.accounting.finalize(&caller, request).await.map(Json)
}

#[utoipa::path(
    post,
    path = "/api/streaming-sessions/abort",
    tag = "credits",
    request_body = AbortRequest,
    responses(
        (status = 200, description = "Released (no tokens) or charged once for the tokens generated", body = SettlementResponse),
        (status = 400, description = "`INVALID_FIELDS`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 404, description = "`STREAMING_SESSION_NOT_FOUND`", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<AbortRequest>,
) -> Result<Json<SettlementResponse>, Error> {
    state.accounting.abort(&caller, request).await.map(Json)
}

#[utoipa::path(
    get,
    path = "/api/credits/balance",
    tag = "credits",
    params(AccountQuery),
    responses(
        (status = 200, description = "Balance, open holds and available credits", body = BalanceResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn balance(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<BalanceResponse>, Error> {
    let query = account_query(query)?;
    state.accounting.balance(&caller, query).await.map(Json)
}

#[utoipa::path(
    get,
    path = "/api/credits/usage",
    tag = "credits",
    params(AccountQuery),
    responses(
        (status = 200, description = "Usage records, newest first", body = UsageResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Another user's account", body = ErrorBody),
        (status = 422, description = "page or limit out of range", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<UsageResponse>, Error> {
    let query = account_query(query)?;
    state.accounting.usage(&caller, query).await.map(Json)
}

#[utoipa::path(
    post,
    path = "/api/admin/credits/grant",
    tag = "credits",
    request_body = GrantRequest,
    responses(
        (status = 200, description = "The account after the grant", body = BalanceResponse),
        (status = 400, description = "`INVALID_FIELDS`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 503, description = "Ledger or accounting unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn grant(
    State(state): State<AppState>,
    caller: Caller,
    ContractJson(request): ContractJson<GrantRequest>,
) -> Result<Json<BalanceResponse>, Error> {
    state.accounting.grant(&caller, request).await.map(Json)
}
