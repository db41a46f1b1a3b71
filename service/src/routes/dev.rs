//! Dev sign-in (`/api/dev/token`): present only when the service runs in
//! local mode on its generated dev secret and listens on loopback
//! (`auth::dev` says why that is safe); elsewhere it is an unknown path (404).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::CACHE_CONTROL;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use crate::auth::dev::{DEV_TOKEN_TTL, require_loopback_request};
use crate::auth::{Principal, Role};
use crate::error::{Error, ErrorBody};
use crate::state::AppState;

const MAX_SUB_BYTES: usize = 256;
const MAX_COHORTS: usize = 32;
const MAX_COHORT_CHARS: usize = 128;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(dev_sign_in, mint_dev_token))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevSignInView {
    /// Lifetime of the tokens `POST` mints.
    ttl_seconds: u64,
    roles: [Role; 3],
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    /// The user id (`sub` claim), 1 to 256 bytes.
    sub: String,
    /// Defaults to `user`.
    role: Option<Role>,
    /// The user's cohorts (a supervisor's: those it supervises).
    #[serde(default)]
    cohorts: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevTokenView {
    /// An HS256 bearer token signed with the dev secret.
    token: String,
    sub: String,
    role: Role,
    cohorts: Vec<String>,
    expires_at: DateTime<Utc>,
}

#[utoipa::path(
    get,
    path = "/api/dev/token",
    tag = "dev",
    responses(
        (status = 200, description = "Dev sign-in is offered here (local mode only; elsewhere 404)", body = DevSignInView),
        (status = 403, description = "The request does not name a loopback host", body = ErrorBody),
    )
)]
pub async fn dev_sign_in(headers: HeaderMap) -> Result<Json<DevSignInView>, Error> {
    require_loopback_request(&headers)?;
    Ok(Json(DevSignInView {
        ttl_seconds: DEV_TOKEN_TTL.as_secs(),
        roles: [Role::User, Role::Supervisor, Role::Admin],
    }))
}

#[utoipa::path(
    post,
    path = "/api/dev/token",
    tag = "dev",
    request_body = DevTokenRequest,
    responses(
        (status = 200, description = "A token for any user and role (local mode only; elsewhere 404)", body = DevTokenView),
        (status = 403, description = "The request does not name a loopback host", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = ErrorBody),
    )
)]
pub async fn mint_dev_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<DevTokenRequest>,
) -> Result<impl IntoResponse, Error> {
    require_loopback_request(&headers)?;
    // Registered only with a minter; a missing one is a wiring error.
    let minter = state.dev_tokens.as_ref().ok_or(Error::EndpointNotFound)?;
    let principal = validate(request)?;
    let token = minter.mint(&principal)?;
    let expires_at = Utc::now()
        + chrono::Duration::from_std(DEV_TOKEN_TTL)
            .map_err(|_| Error::Config("dev token lifetime out of range".into()))?;
    let view = DevTokenView {
        token,
        sub: principal.sub,
        role: principal.role,
        cohorts: principal.cohorts,
        expires_at,
    };
    // A credential: never kept by a cache.
    Ok(([(CACHE_CONTROL, "no-store")], Json(view)))
}

fn validate(request: DevTokenRequest) -> Result<Principal, Error> {
    let sub = request.sub.trim().to_owned();
    if sub.is_empty() || sub.len() > MAX_SUB_BYTES || sub.chars().any(char::is_control) {
        return Err(Error::Validation {
            field: "sub",
            message: format!("must be 1 to {MAX_SUB_BYTES} bytes without control characters"),
        });
    }
    if request.cohorts.len() > MAX_COHORTS {
        return Err(Error::Validation {
            field: "cohorts",
            message: format!("at most {MAX_COHORTS} cohorts"),
        });
    }
    let mut cohorts = Vec::with_capacity(request.cohorts.len());
    for cohort in request.cohorts {
        let cohort = cohort.trim();
        if cohort.is_empty()
            || cohort.chars().count() > MAX_COHORT_CHARS
            || cohort.chars().any(char::is_control)
        {
            return Err(Error::Validation {
                field: "cohorts",
                message: format!(
                    "each cohort must be 1 to {MAX_COHORT_CHARS} characters without control characters"
                ),
            });
        }
        cohorts.push(cohort.to_owned());
    }
    Ok(Principal {
        sub,
        role: request.role.unwrap_or(Role::User),
        cohorts,
    })
}
