//! Accounting: the seed-compatible credits API over the ledger.
//!
//! [`Accounting`] is the one interface the HTTP handlers (and the reply path)
//! use. Two implementations:
//! - [`LocalAccounting`]: the built-in ledger of this deployment's store;
//! - [`ExternalAccounting`]: another Parley's accounting API
//!   (`PARLEY_ACCOUNTING_URL`), called over the same [`contract`] with the
//!   caller's own bearer token.
//!
//! Every failure is an `Err` that denies the request; nothing defaults to allow.
//!
//! # Who may call what
//!
//! A user operates on their own account only (`userId`, when given, must be
//! their own `sub`); admins on any account; grants are admin-only. There is
//! no separate service identity: a Parley in external mode forwards the end
//! user's token, so the accounting server applies exactly these rules to the
//! end user (both must trust the same token issuer). Back-office jobs use an
//! admin token.

pub mod contract;
mod external;
mod metrics;
pub mod reaper;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;

use crate::auth::{Authenticator, Principal, Role, bearer_token};
use crate::embedded_db::PendingDurability;
use crate::error::Error;
use crate::ledger::{
    Closed, Credits, Hold, HoldRequest, Ledger, LedgerError, Page, Progress, ReplyOutcome,
    Settlement,
};
use crate::model_routes::RoutesCell;
pub use crate::model_routes::{PriceBook, RoutePrice};
use crate::providers::estimate_tokens;
use contract::{
    AbortRequest, AccountQuery, BalanceResponse, CalculateRequest, CalculateResponse, CheckRequest,
    CheckResponse, FinalizeRequest, GrantRequest, InitializeRequest, InitializeResponse,
    SessionNaming, SettlementResponse, UsageDetails, UsageResponse,
};
pub use external::ExternalAccounting;
pub use metrics::AccountingMetrics;

/// Longest `sessionId` of the streaming-session endpoints.
const MAX_SESSION_ID_BYTES: usize = 128;
/// Longest request id the ledger accepts.
const MAX_REQUEST_ID_BYTES: usize = 256;

/// The authenticated caller and the token it presented (forwarded as is in
/// external mode).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// Empty in a caller the built-in accounting retained for a reply
    /// ([`Accounting::retained`]): it reads only the principal.
    pub token: String,
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let token = bearer_token(&parts.headers)?.to_owned();
        let principal = Principal::from_request_parts(parts, state).await?;
        Ok(Caller { principal, token })
    }
}

/// The accounting operations, at the level of the seed contract.
#[async_trait]
pub trait Accounting: Send + Sync {
    async fn calculate(
        &self,
        caller: &Caller,
        request: CalculateRequest,
    ) -> Result<CalculateResponse, Error>;
    async fn check(&self, caller: &Caller, request: CheckRequest) -> Result<CheckResponse, Error>;
    /// Holds the worst case of a reply; 402 when the account cannot cover it.
    async fn initialize(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<InitializeResponse, Error>;
    /// [`Accounting::initialize`], answered once the hold is applied but
    /// perhaps before it is durable (see [`Ledger::hold_applied`]): the reply
    /// may call its model meanwhile, and waits on the [`PendingDurability`]
    /// before it shows the first token.
    async fn initialize_applied(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<(InitializeResponse, PendingDurability), Error> {
        Ok((
            self.initialize(caller, request).await?,
            PendingDurability::none(),
        ))
    }
    /// Charges a reply exactly once, whatever the order or number of calls.
    async fn finalize(
        &self,
        caller: &Caller,
        request: FinalizeRequest,
    ) -> Result<SettlementResponse, Error>;
    async fn abort(
        &self,
        caller: &Caller,
        request: AbortRequest,
    ) -> Result<SettlementResponse, Error>;
    async fn balance(&self, caller: &Caller, query: AccountQuery)
    -> Result<BalanceResponse, Error>;
    async fn usage(&self, caller: &Caller, query: AccountQuery) -> Result<UsageResponse, Error>;
    async fn grant(&self, caller: &Caller, request: GrantRequest)
    -> Result<BalanceResponse, Error>;
    /// What of `caller` a reply keeps for the calls after its hold (renewing
    /// and settling it), for as long as it streams. All of it by default: a
    /// remote accounting is called with the caller's token.
    fn retained(&self, caller: Caller) -> Caller {
        caller
    }
}

/// The account `caller` acts on: `requested` if allowed, else its own.
fn account_of(caller: &Caller, requested: Option<String>) -> Result<String, Error> {
    let principal = &caller.principal;
    match requested {
        None => Ok(principal.sub.clone()),
        Some(user) if user == principal.sub || principal.role == Role::Admin => Ok(user),
        Some(_) => Err(Error::Forbidden(
            "users may only use their own credits account",
        )),
    }
}

/// The ledger request id of a streaming session. The account is part of
/// the key, so one user can never address another user's hold.
///
/// A client's session is keyed under its account, the length prefix
/// keeping `(user, session)` pairs from colliding. A reply's session
/// (`<origin>/<UUID v7>`, made by this service) is keyed by its UUID first:
/// ordered by time across all accounts, the holds and usage records of the
/// replies that one write transaction settles sit in the ledger's newest
/// pages instead of each in a page of its account's history. Client keys
/// start `acct:` and reply keys `reply:`, so neither reaches the other.
fn hold_key(user: &str, session_id: &str, named_by: SessionNaming) -> Result<String, Error> {
    if session_id.is_empty() || session_id.len() > MAX_SESSION_ID_BYTES {
        return Err(Error::Validation {
            field: "sessionId",
            message: format!("must be 1 to {MAX_SESSION_ID_BYTES} bytes"),
        });
    }
    let key = match named_by {
        SessionNaming::Client => format!("acct:{}:{user}:{session_id}", user.len()),
        SessionNaming::Reply => {
            let made = session_id
                .rsplit_once('/')
                .and_then(|(_, made)| uuid::Uuid::try_parse(made).ok())
                .ok_or_else(|| Error::Validation {
                    field: "sessionId",
                    message: "a reply's id ends with a UUID".into(),
                })?;
            // The UUID's fixed length ends it, so `(UUID, user)` pairs
            // cannot collide either. Joined without `format!`, whose
            // machinery cost more than the rest of this function.
            let mut made_text = uuid::Uuid::encode_buffer();
            [
                "reply:",
                made.hyphenated().encode_lower(&mut made_text),
                ":",
                user,
            ]
            .concat()
        }
    };
    if key.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::Validation {
            field: "sessionId",
            message: "too long for this account's user id".into(),
        });
    }
    Ok(key)
}

/// How a streaming session ends.
#[derive(Debug, Clone)]
enum Ending {
    /// Nothing was generated: release the whole hold.
    Release,
    /// Charge `output_tokens` and the input (reported, else as recorded).
    Settle {
        outcome: ReplyOutcome,
        output_tokens: u64,
        usage: UsageDetails,
    },
}

/// The built-in ledger.
pub struct LocalAccounting {
    ledger: Arc<dyn Ledger>,
    /// Prices come from the current routes: what answers is what is charged.
    routes: Arc<RoutesCell>,
    /// Lease of holds opened by `initialize`.
    lease: Duration,
    metrics: AccountingMetrics,
}

impl LocalAccounting {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        routes: Arc<RoutesCell>,
        lease: Duration,
        metrics: AccountingMetrics,
    ) -> Self {
        LocalAccounting {
            ledger,
            routes,
            lease,
            metrics,
        }
    }

    async fn close(
        &self,
        caller: &Caller,
        session_id: String,
        named_by: SessionNaming,
        user_id: Option<String>,
        ending: Ending,
    ) -> Result<SettlementResponse, Error> {
        let user = account_of(caller, user_id)?;
        let request_id = hold_key(&user, &session_id, named_by)?;
        let closed = match ending {
            Ending::Release => self.ledger.release(&request_id).await,
            Ending::Settle {
                outcome,
                output_tokens,
                usage,
            } => {
                self.settle(&request_id, outcome, output_tokens, usage)
                    .await
            }
        };
        let closed = closed.map_err(|error| match error {
            LedgerError::HoldNotFound { .. } => Error::StreamingSessionNotFound(session_id.clone()),
            other => Error::Ledger(other),
        })?;
        if !closed.replayed {
            self.metrics.charged(&closed.record);
        }
        Ok(SettlementResponse::from_closed(session_id, closed))
    }

    async fn check_balance(
        &self,
        caller: &Caller,
        request: CheckRequest,
    ) -> Result<CheckResponse, Error> {
        let user = account_of(caller, Some(request.user_id))?;
        if let Some(model) = &request.model_id {
            self.routes.snapshot().prices().lookup(model)?;
        }
        let balance = self.ledger.balance(&user).await?;
        Ok(CheckResponse {
            user_id: user,
            sufficient: balance.available >= request.required_credits,
            required_credits: request.required_credits,
            balance: balance.into(),
        })
    }

    async fn hold(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<(InitializeResponse, PendingDurability), Error> {
        let user = account_of(caller, request.user_id)?;
        let request_id = hold_key(&user, &request.session_id, request.named_by)?;
        let routes = self.routes.snapshot();
        let route = match &request.route {
            Some(alias) => routes.prices().lookup_target(alias, &request.model_id)?,
            None => routes.prices().lookup(&request.model_id)?,
        };
        let amount = route.worst_case(request.estimated_tokens, request.max_output_tokens)?;
        let output_tokens = request.tokens_generated.unwrap_or(0);
        // Recorded as progress, this is what the reaper charges if the
        // caller never comes back: the prompt is spent once the hold stands.
        let progress = Progress {
            model: route.model.clone(),
            input_tokens: request.estimated_tokens,
            output_tokens,
            cost: route.cost(request.estimated_tokens, output_tokens)?,
        };
        // Held again (a fallback re-prices, a renewal brings the output so
        // far), the same call refreshes the open hold in one write.
        let (hold, pending) = self
            .ledger
            .hold_applied(HoldRequest {
                request_id,
                user: user.clone(),
                session_id: request.session_id.clone(),
                route: route.alias.clone(),
                model: route.model.clone(),
                amount,
                lease: self.lease,
                progress: Some(progress),
            })
            .await?;
        let response = InitializeResponse {
            session_id: request.session_id,
            user_id: user,
            model_id: route.model.clone(),
            route: route.alias.clone(),
            allocated_credits: amount,
            lease_expires_at: hold.lease_expires_at,
        };
        Ok((response, pending))
    }

    async fn settle(
        &self,
        request_id: &str,
        outcome: ReplyOutcome,
        output_tokens: u64,
        usage: UsageDetails,
    ) -> Result<Closed, LedgerError> {
        let routes = self.routes.snapshot();
        let estimated = usage.usage_estimated.unwrap_or(false);
        // Priced from the open hold inside the write that closes it: its
        // route, and its recorded target and input for what was not reported.
        let price = move |hold: &Hold| {
            let recorded = hold.progress.as_ref();
            let model = usage
                .model_id
                .clone()
                .or_else(|| recorded.map(|p| p.model.clone()))
                .unwrap_or_else(|| hold.model.clone());
            let input_tokens = usage
                .input_tokens
                .or_else(|| recorded.map(|p| p.input_tokens))
                .unwrap_or(0);
            let cost = match routes.prices().lookup_target(&hold.route, &model) {
                Ok(target) => target.cost(input_tokens, output_tokens)?,
                Err(_) => {
                    // The target left the routes while the reply ran: charge
                    // the hold, the most the account agreed to pay.
                    tracing::warn!(request_id = %hold.request_id, route = %hold.route, %model, "target of an open hold has no price any more; charging the hold");
                    hold.amount
                }
            };
            Ok(Settlement {
                route: hold.route.clone(),
                model,
                input_tokens,
                output_tokens,
                cost,
                outcome,
                estimated,
            })
        };
        self.ledger.settle(request_id, Box::new(price)).await
    }
}

#[async_trait]
impl Accounting for LocalAccounting {
    /// Without the token, which this accounting never reads: every open
    /// stream keeps its caller, and an identity provider's token can be a
    /// kilobyte or more.
    fn retained(&self, caller: Caller) -> Caller {
        Caller {
            token: String::new(),
            ..caller
        }
    }

    async fn calculate(
        &self,
        _caller: &Caller,
        request: CalculateRequest,
    ) -> Result<CalculateResponse, Error> {
        let routes = self.routes.snapshot();
        let route = routes.prices().lookup(&request.model_id)?;
        let input_tokens = match (request.tokens, &request.message) {
            (Some(tokens), _) => tokens,
            (None, Some(message)) => u64::from(estimate_tokens(message)),
            (None, None) => 0,
        };
        Ok(CalculateResponse {
            model_id: request.model_id,
            tokens: input_tokens.saturating_add(route.max_output_tokens),
            input_tokens,
            max_output_tokens: route.max_output_tokens,
            required_credits: route.worst_case(input_tokens, None)?,
        })
    }

    async fn check(&self, caller: &Caller, request: CheckRequest) -> Result<CheckResponse, Error> {
        let result = self.check_balance(caller, request).await;
        self.metrics
            .observe_check(&result, |answer: &CheckResponse| answer.sufficient);
        result
    }

    async fn initialize(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<InitializeResponse, Error> {
        let (response, pending) = self.initialize_applied(caller, request).await?;
        pending.wait::<Error>().await?;
        Ok(response)
    }

    async fn initialize_applied(
        &self,
        caller: &Caller,
        request: InitializeRequest,
    ) -> Result<(InitializeResponse, PendingDurability), Error> {
        let result = self.hold(caller, request).await;
        self.metrics.observe_check(&result, |_| true);
        result
    }

    async fn finalize(
        &self,
        caller: &Caller,
        request: FinalizeRequest,
    ) -> Result<SettlementResponse, Error> {
        let FinalizeRequest {
            session_id,
            named_by,
            actual_tokens,
            success,
            duration,
            user_id,
            usage,
        } = request;
        tracing::info!(
            %session_id,
            actual_tokens,
            success,
            duration_ms = duration,
            "finalizing a streaming session"
        );
        let ending = match (success, actual_tokens) {
            (false, 0) => Ending::Release,
            (success, output_tokens) => Ending::Settle {
                outcome: if success {
                    ReplyOutcome::Completed
                } else {
                    ReplyOutcome::Failed
                },
                output_tokens,
                usage,
            },
        };
        self.close(caller, session_id, named_by, user_id, ending)
            .await
    }

    async fn abort(
        &self,
        caller: &Caller,
        request: AbortRequest,
    ) -> Result<SettlementResponse, Error> {
        let AbortRequest {
            session_id,
            named_by,
            tokens_generated,
            reason,
            error,
            user_id,
            usage,
        } = request;
        tracing::info!(
            %session_id,
            tokens_generated,
            reason = reason.as_deref(),
            error = error.as_deref(),
            "aborting a streaming session"
        );
        let ending = match tokens_generated {
            0 => Ending::Release,
            output_tokens => Ending::Settle {
                outcome: if error.is_some() {
                    ReplyOutcome::Failed
                } else {
                    ReplyOutcome::Cancelled
                },
                output_tokens,
                usage,
            },
        };
        self.close(caller, session_id, named_by, user_id, ending)
            .await
    }

    async fn balance(
        &self,
        caller: &Caller,
        query: AccountQuery,
    ) -> Result<BalanceResponse, Error> {
        let user = account_of(caller, query.user_id)?;
        let balance = self.ledger.balance(&user).await?;
        Ok(BalanceResponse {
            user_id: user,
            balance: balance.into(),
        })
    }

    async fn usage(&self, caller: &Caller, query: AccountQuery) -> Result<UsageResponse, Error> {
        let (page, limit) = query.page()?;
        let user = account_of(caller, query.user_id)?;
        let records = self
            .ledger
            .usage(
                &user,
                Page {
                    number: page - 1,
                    size: limit,
                },
            )
            .await?;
        Ok(UsageResponse {
            user_id: user,
            page,
            limit,
            records: records.into_iter().map(Into::into).collect(),
        })
    }

    async fn grant(
        &self,
        caller: &Caller,
        request: GrantRequest,
    ) -> Result<BalanceResponse, Error> {
        if caller.principal.role != Role::Admin {
            return Err(Error::Forbidden("only admins grant credits"));
        }
        if request.credits == Credits::ZERO {
            return Err(Error::Validation {
                field: "credits",
                message: "must be more than zero".into(),
            });
        }
        let balance = self.ledger.grant(&request.user_id, request.credits).await?;
        tracing::info!(admin = %caller.principal.sub, user = %request.user_id, credits = %request.credits, "credits granted");
        Ok(BalanceResponse {
            user_id: request.user_id,
            balance: balance.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sub: &str, role: Role) -> Caller {
        Caller {
            principal: Principal {
                sub: sub.into(),
                role,
                cohorts: Vec::new(),
            },
            token: String::new(),
        }
    }

    #[test]
    fn users_act_on_their_own_account_and_admins_on_any() {
        let alice = caller("alice", Role::User);
        assert_eq!(account_of(&alice, None).unwrap(), "alice");
        assert_eq!(account_of(&alice, Some("alice".into())).unwrap(), "alice");
        assert!(matches!(
            account_of(&alice, Some("bob".into())),
            Err(Error::Forbidden(_))
        ));
        let supervisor = caller("sam", Role::Supervisor);
        assert!(account_of(&supervisor, Some("bob".into())).is_err());
        let admin = caller("root", Role::Admin);
        assert_eq!(account_of(&admin, Some("bob".into())).unwrap(), "bob");
    }

    #[test]
    fn hold_keys_never_collide_across_users() {
        let client = SessionNaming::Client;
        assert_ne!(
            hold_key("a:b", "c", client).unwrap(),
            hold_key("a", "b:c", client).unwrap()
        );
        assert!(hold_key("alice", "", client).is_err());
        assert!(hold_key("alice", &"s".repeat(129), client).is_err());
        assert!(hold_key(&"u".repeat(200), &"s".repeat(100), client).is_err());
        let reply = format!("65f0c0ffee0123456789abcd/{}", uuid::Uuid::now_v7());
        assert_ne!(
            hold_key("a:b", &reply, SessionNaming::Reply).unwrap(),
            hold_key("a", &reply, SessionNaming::Reply).unwrap()
        );
    }

    #[test]
    fn a_client_naming_a_replys_session_reaches_another_hold() {
        let reply = format!("65f0c0ffee0123456789abcd/{}", uuid::Uuid::now_v7());
        assert_ne!(
            hold_key("alice", &reply, SessionNaming::Client).unwrap(),
            hold_key("alice", &reply, SessionNaming::Reply).unwrap()
        );
        assert!(
            hold_key("alice", "65f0c0ffee0123456789abcd/7", SessionNaming::Reply).is_err(),
            "a reply's id ends with the UUID that orders it"
        );
    }

    #[test]
    fn reply_holds_sort_in_the_order_they_were_made_whatever_their_account() {
        let origins = [
            "65f0c0ffee0123456789abcd",
            "0000c0ffee0123456789abcd",
            "openai",
        ];
        let keys: Vec<String> = (0..1000)
            .map(|index| {
                let user = ["zoe", "alice", "mallory"][index % 3];
                let session = format!("{}/{}", origins[index % 3], uuid::Uuid::now_v7());
                hold_key(user, &session, SessionNaming::Reply).unwrap()
            })
            .collect();
        assert!(
            keys.windows(2).all(|pair| pair[0] < pair[1]),
            "one transaction's settlements must land beside each other in the ledger"
        );
    }
}
