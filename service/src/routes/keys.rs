//! API keys: a user creates named keys for programs (the secret is shown
//! once), lists their own, and deletes them; admins delete anyone's.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiJson;
use crate::accounting::Caller;
use crate::auth::keys::{NewKey, is_api_key, mint};
use crate::auth::{Principal, Role};
use crate::error::{Error, ErrorBody};
use crate::state::AppState;
use crate::store::{ApiKey, ObjectId};

const MAX_NAME_CHARS: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateKeyRequest {
    /// What the key is for, 1 to 100 characters.
    #[schema(min_length = 1, max_length = 100)]
    name: String,
    /// When the key stops working (RFC 3339, in the future); omitted, it
    /// works until deleted.
    expires_at: Option<DateTime<Utc>>,
}

/// A key as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    /// 24 hexadecimal characters; also the part of the key after `pk_`.
    id: String,
    name: String,
    /// The creator's role when the key was made; the key acts with it.
    role: Role,
    /// The creator's cohorts when the key was made.
    cohorts: Vec<String>,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    expired: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKeyView {
    #[serde(flatten)]
    key: KeyView,
    /// The whole key, `pk_<id>_<secret>`: send it as `Authorization: Bearer
    /// <key>`. Shown only here; Parley keeps only its SHA-256.
    secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeysView {
    /// Newest first.
    keys: Vec<KeyView>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> Self {
        Self {
            id: key.id.to_hex(),
            name: key.name,
            role: key.role,
            cohorts: key.cohorts,
            created_at: key.created_at,
            expired: key.expires_at.is_some_and(|expiry| expiry <= Utc::now()),
            expires_at: key.expires_at,
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/keys",
    tag = "keys",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "Created; `secret` is shown this once", body = CreatedKeyView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Presented an API key: keys are created with a signed-in token", body = ErrorBody),
        (status = 422, description = "Invalid fields (name empty or too long, expiry not in the future)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKeyView>), Error> {
    // A key minting keys could outlive its own expiry or revocation.
    if is_api_key(&caller.token) {
        return Err(Error::Forbidden(
            "API keys cannot create API keys; use a signed-in token",
        ));
    }
    // The bound is on the name as sent, as the schema states it; the
    // stored name is trimmed.
    let name = request.name.trim();
    if name.is_empty() || request.name.chars().count() > MAX_NAME_CHARS {
        return Err(Error::Validation {
            field: "name",
            message: format!("must be 1 to {MAX_NAME_CHARS} characters"),
        });
    }
    if request
        .expires_at
        .is_some_and(|expiry| expiry <= Utc::now())
    {
        return Err(Error::Validation {
            field: "expiresAt",
            message: "must be in the future".into(),
        });
    }
    let NewKey { key, secret } = mint(&caller.principal, name.to_owned(), request.expires_at);
    state.keys.create_key(&key).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKeyView {
            key: key.into(),
            secret,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/api/keys",
    tag = "keys",
    responses(
        (status = 200, description = "The caller's keys, newest first, without secrets", body = KeysView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Principal,
) -> Result<Json<KeysView>, Error> {
    let keys = state.keys.keys_of(&caller.sub).await?;
    Ok(Json(KeysView {
        keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

#[utoipa::path(
    delete,
    path = "/api/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "Key id, 24 hexadecimal characters")),
    responses(
        (status = 204, description = "Deleted: the key stops working at once"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such key of the caller's (admins: no such key)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Error> {
    // A malformed id names no key.
    let id = id
        .ok()
        .and_then(|Path(id)| ObjectId::parse_str(&id).ok())
        .ok_or(Error::ApiKeyNotFound)?;
    let owner = (caller.role != Role::Admin).then_some(caller.sub.as_str());
    if state.keys.delete_key(id, owner).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::ApiKeyNotFound)
    }
}
