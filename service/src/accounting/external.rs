//! `external` accounting mode: another Parley's accounting API over the one
//! [`contract`](super::contract), called with the caller's bearer token.
//!
//! Fail closed: a transport error, a timeout, a status the contract does not
//! define for the call, or a body that does not parse as the contract's type
//! is [`Error::AccountingUnavailable`] (503) and denies the request.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::contract::{
    AbortRequest, AccountQuery, BalanceResponse, CalculateRequest, CalculateResponse, CheckRequest,
    CheckResponse, ErrorReply, FinalizeRequest, GrantRequest, InitializeRequest,
    InitializeResponse, SettlementResponse, UsageResponse, paths,
};
use super::{Accounting, AccountingMetrics, Caller};
use crate::error::Error;
use crate::ledger::LedgerError;

pub struct ExternalAccounting {
    client: reqwest::Client,
    metrics: AccountingMetrics,
    /// Root URL of the accounting server, without a trailing slash.
    base_url: String,
}

impl ExternalAccounting {
    /// `base_url` is the server's root (`http://accounting:8080`); the
    /// contract's paths are appended to it.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        metrics: AccountingMetrics,
    ) -> Result<Self, Error> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "PARLEY_ACCOUNTING_URL must be an http(s) URL, got `{base_url}`"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|error| Error::Config(format!("building the accounting client: {error}")))?;
        Ok(ExternalAccounting {
            client,
            metrics,
            base_url,
        })
    }

    async fn call<B, T>(
        &self,
        method: Method,
        path: &str,
        caller: &Caller,
        body: Option<&B>,
        query: Option<&AccountQuery>,
    ) -> Result<T, Error>
    where
        B: Serialize + Sync,
        T: DeserializeOwned,
    {
        let mut url = Url::parse(&format!("{}{path}", self.base_url))
            .map_err(|error| Error::AccountingUnavailable(format!("{path}: bad URL: {error}")))?;
        if let Some(query) = query {
            let mut pairs = url.query_pairs_mut();
            if let Some(user) = &query.user_id {
                pairs.append_pair("userId", user);
            }
            if let Some(page) = query.page {
                pairs.append_pair("page", &page.to_string());
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
        }
        let mut request = self.client.request(method, url).bearer_auth(&caller.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| unavailable(path, &error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| unavailable(path, &error))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|error| {
                Error::AccountingUnavailable(format!(
                    "{path}: {status} with a body that is not the contract's: {error}"
                ))
            });
        }
        Err(remote_error(path, status, &bytes))
    }
}

fn unavailable(path: &str, error: &reqwest::Error) -> Error {
    Error::AccountingUnavailable(format!("{path}: {error}"))
}

/// The error the accounting server answered, as this service's error. Only
/// answers the contract defines are passed on; anything else denies as 503.
fn remote_error(path: &str, status: StatusCode, body: &[u8]) -> Error {
    let unexpected = || {
        Error::AccountingUnavailable(format!(
            "{path}: unexpected answer {status}: {}",
            String::from_utf8_lossy(body.get(..200).unwrap_or(body))
        ))
    };
    let Ok(reply) = serde_json::from_slice::<ErrorReply>(body) else {
        return unexpected();
    };
    match (status, reply.code.as_str()) {
        (StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_CREDITS") => {
            match (reply.balance, reply.available, reply.required_credits) {
                (Some(balance), Some(available), Some(required)) => {
                    Error::Ledger(LedgerError::InsufficientCredits {
                        balance,
                        available,
                        required,
                    })
                }
                _ => unexpected(),
            }
        }
        (StatusCode::BAD_REQUEST, "UNKNOWN_MODEL") => match reply.allowed {
            Some(allowed) => Error::UnknownModel {
                model: reply.message,
                allowed,
            },
            None => unexpected(),
        },
        (StatusCode::NOT_FOUND, "STREAMING_SESSION_NOT_FOUND") => {
            Error::StreamingSessionNotFound(reply.message)
        }
        (StatusCode::CONFLICT, "STREAMING_SESSION_CLOSED") => {
            Error::Ledger(LedgerError::HoldClosed {
                request_id: reply.message,
            })
        }
        (StatusCode::FORBIDDEN, "FORBIDDEN") => {
            Error::Forbidden("the accounting service refused this account")
        }
        (StatusCode::UNAUTHORIZED, _) => {
            Error::InvalidToken("the accounting service rejected the token")
        }
        _ => unexpected(),
    }
}

#[async_trait]
impl Accounting for ExternalAccounting {
    async fn calculate(
        &self,
        caller: &Caller,
        request: CalculateRequest,
    ) -> Result<CalculateResponse, Error> {
        self.call(Method::POST, paths::CALCULATE, caller, Some(&request), None)
            .await
    }

    async fn check(&self, caller: &Caller, request: CheckRequest) -> Result<CheckResponse, Error> {
        let result = self
            .call(Method::POST, paths::CHECK, caller, Some(&request), None)
            .await;
        self.metrics
            .observe_check(&result, |answer: &CheckResponse| answer.sufficient);
        result
    }

    async fn initialize(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<InitializeResponse, Error> {
        let result = self
            .call(
                Method::POST,
                paths::INITIALIZE,
                caller,
                Some(&request),
                None,
            )
            .await;
        self.metrics.observe_check(&result, |_| true);
        result
    }

    async fn finalize(
        &self,
        caller: &Caller,
        request: FinalizeRequest,
    ) -> Result<SettlementResponse, Error> {
        self.call(Method::POST, paths::FINALIZE, caller, Some(&request), None)
            .await
    }

    async fn abort(
        &self,
        caller: &Caller,
        request: AbortRequest,
    ) -> Result<SettlementResponse, Error> {
        self.call(Method::POST, paths::ABORT, caller, Some(&request), None)
            .await
    }

    async fn balance(
        &self,
        caller: &Caller,
        query: AccountQuery,
    ) -> Result<BalanceResponse, Error> {
        self.call::<(), _>(Method::GET, paths::BALANCE, caller, None, Some(&query))
            .await
    }

    async fn usage(&self, caller: &Caller, query: AccountQuery) -> Result<UsageResponse, Error> {
        self.call::<(), _>(Method::GET, paths::USAGE, caller, None, Some(&query))
            .await
    }

    async fn grant(
        &self,
        caller: &Caller,
        request: GrantRequest,
    ) -> Result<BalanceResponse, Error> {
        self.call(Method::POST, paths::GRANT, caller, Some(&request), None)
            .await
    }
}
