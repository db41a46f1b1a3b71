//! Paying for one reply through [`Accounting`] (the built-in ledger or an
//! external accounting server, the same calls either way):
//! hold the worst case before any provider is called, re-price on fallback,
//! renew the lease (recording the output so far) while the reply runs, then
//! settle what was used or release the hold — once, since settling consumes
//! the bill.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parley_crds::{ModelRouteSpec, RouteTarget};

use crate::accounting::contract::{
    AbortRequest, FinalizeRequest, InitializeRequest, InitializeResponse, SessionNaming,
    UsageDetails,
};
use crate::accounting::{Accounting, Caller};
use crate::embedded_db::PendingDurability;
use crate::error::Error;
use crate::ledger::{Credits, LedgerError};
use crate::providers::Usage;

/// Delays between attempts to settle a finished reply: a settlement that
/// still fails is left to the reaper, which charges the recorded progress.
const SETTLE_RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(500)];

/// The open hold of one reply.
pub struct ReplyBill {
    accounting: Arc<dyn Accounting>,
    caller: Caller,
    /// The hold's streaming-session id ([`request_id`]).
    request_id: String,
    route: String,
    /// The target the hold is priced for now.
    model: String,
    /// Estimated input tokens of that target's prompt.
    input_tokens: u64,
    /// The most output tokens the caller asked for, when fewer than the
    /// targets' maximum: the hold is priced for them.
    max_output_tokens: Option<u32>,
    lease_expires_at: DateTime<Utc>,
}

/// Where a reply starts and what its hold was priced for.
pub struct Opened {
    pub bill: ReplyBill,
    /// The hold is applied; the reply waits on this before its first token.
    pub pending: PendingDurability,
    /// Index in the route's chain of the first target to try.
    pub first_target: usize,
    /// The caller could not afford the route's first target and the route
    /// allowed falling to a cheaper one.
    pub downgraded: bool,
}

/// How a reply that produced output ended, for its usage record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    /// The model failed mid-reply.
    Failed,
    /// The client left, the service shut down, or the hold could not be kept.
    Cancelled,
}

/// What a reply cost and what is left, for the `complete` event and the
/// balance header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub charged: Credits,
    pub remaining: Credits,
}

/// A reply's hold id: `origin` (the chat session's id, or the API of a reply
/// kept in no session), which tells whose usage record it is, then a UUID
/// that is unique per reply and ordered by creation (version 7). The ledger
/// keys the hold by that UUID first (`SessionNaming::Reply`), so the
/// replies one write transaction holds and settles share its newest pages.
fn request_id(origin: &str) -> String {
    format!("{origin}/{}", uuid::Uuid::now_v7())
}

impl ReplyBill {
    /// Holds the worst case of the route's first target the prompt fits,
    /// or — when the route allows downgrading — of the first such target in
    /// chain order the caller can afford. `input_tokens` has the estimated
    /// input of each target's prompt (`None`: the prompt fits no window of
    /// that target, which is skipped). Any refusal or failure is returned
    /// before a provider is called. `origin` starts the hold's id: the chat
    /// session, or the API of a reply kept in no session.
    pub async fn open(
        accounting: Arc<dyn Accounting>,
        caller: Caller,
        origin: &str,
        route: &ModelRouteSpec,
        input_tokens: &[Option<u64>],
        max_output_tokens: Option<u32>,
    ) -> Result<Opened, Error> {
        let mut bill = ReplyBill {
            caller: accounting.retained(caller),
            accounting,
            request_id: request_id(origin),
            route: route.alias.clone(),
            model: String::new(),
            input_tokens: 0,
            max_output_tokens,
            lease_expires_at: DateTime::<Utc>::MIN_UTC,
        };
        let mut first_refusal = None;
        let fitting = route
            .targets
            .iter()
            .zip(input_tokens)
            .enumerate()
            .filter_map(|(index, (target, tokens))| Some((index, target, (*tokens)?)));
        for (index, target, tokens) in fitting {
            bill.input_tokens = tokens;
            let held = bill
                .accounting
                .initialize_applied(&bill.caller, bill.initialize_request(target, None))
                .await;
            match held {
                Ok((held, pending)) => {
                    bill.held(target, &held);
                    return Ok(Opened {
                        bill,
                        pending,
                        first_target: index,
                        downgraded: first_refusal.is_some(),
                    });
                }
                Err(refusal @ Error::Ledger(LedgerError::InsufficientCredits { .. }))
                    if route.downgrade_when_unaffordable =>
                {
                    // The price of the route asked for is what a 402 reports.
                    first_refusal.get_or_insert(refusal);
                }
                Err(error) => return Err(first_refusal.unwrap_or(error)),
            }
        }
        Err(first_refusal
            .unwrap_or_else(|| Error::Config(format!("route `{}` has no targets", route.alias))))
    }

    /// Re-prices the hold for a fallback target and its prompt of
    /// `input_tokens` (a dearer one needs the difference to be available).
    pub async fn reprice(&mut self, target: &RouteTarget, input_tokens: u64) -> Result<(), Error> {
        self.input_tokens = input_tokens;
        self.initialize(target, None).await
    }

    /// Extends the lease and records `output_tokens` generated so far, so a
    /// crash of this replica leaves them to be charged by the reaper.
    pub async fn renew(&mut self, target: &RouteTarget, output_tokens: u64) -> Result<(), Error> {
        self.initialize(target, Some(output_tokens)).await
    }

    /// How long until the hold lapses unless renewed (zero once it has).
    pub fn lease_left(&self) -> Duration {
        (self.lease_expires_at - Utc::now())
            .to_std()
            .unwrap_or_default()
    }

    async fn initialize(
        &mut self,
        target: &RouteTarget,
        tokens_generated: Option<u64>,
    ) -> Result<(), Error> {
        let request = self.initialize_request(target, tokens_generated);
        let held = self.accounting.initialize(&self.caller, request).await?;
        self.held(target, &held);
        Ok(())
    }

    fn initialize_request(
        &self,
        target: &RouteTarget,
        tokens_generated: Option<u64>,
    ) -> InitializeRequest {
        InitializeRequest {
            session_id: self.request_id.clone(),
            named_by: SessionNaming::Reply,
            model_id: target.model.clone(),
            estimated_tokens: self.input_tokens,
            user_id: None,
            route: Some(self.route.clone()),
            tokens_generated,
            max_output_tokens: self.max_output_tokens.map(u64::from),
        }
    }

    /// The hold is now priced for `target`.
    fn held(&mut self, target: &RouteTarget, held: &InitializeResponse) {
        self.model.clone_from(&target.model);
        self.lease_expires_at = held.lease_expires_at;
    }

    /// Charges what the reply used (the provider's usage, else the estimate,
    /// marked so) and releases the rest of the hold.
    pub async fn settle(
        self,
        ending: Ending,
        usage: Usage,
        estimated: bool,
    ) -> Result<Charge, Error> {
        let output_tokens = u64::from(usage.output_tokens);
        let details = UsageDetails {
            model_id: Some(self.model.clone()),
            input_tokens: Some(u64::from(usage.input_tokens)),
            usage_estimated: Some(estimated),
        };
        let mut delays = SETTLE_RETRY_DELAYS.iter();
        loop {
            let settled = match ending {
                Ending::Completed | Ending::Failed => {
                    self.accounting
                        .finalize(
                            &self.caller,
                            FinalizeRequest {
                                session_id: self.request_id.clone(),
                                named_by: SessionNaming::Reply,
                                actual_tokens: output_tokens,
                                success: ending == Ending::Completed,
                                duration: None,
                                user_id: None,
                                usage: details.clone(),
                            },
                        )
                        .await
                }
                Ending::Cancelled => {
                    self.accounting
                        .abort(
                            &self.caller,
                            AbortRequest {
                                session_id: self.request_id.clone(),
                                named_by: SessionNaming::Reply,
                                tokens_generated: output_tokens,
                                reason: Some("the reply was cut short".into()),
                                error: None,
                                user_id: None,
                                usage: details.clone(),
                            },
                        )
                        .await
                }
            };
            match (settled, delays.next()) {
                (Ok(settled), _) => {
                    return Ok(Charge {
                        charged: settled.charged_credits,
                        remaining: settled.balance.available,
                    });
                }
                (Err(error), Some(delay)) if error.is_unavailable() => {
                    tracing::warn!(request_id = %self.request_id, %error, "settling a reply failed; retrying");
                    tokio::time::sleep(*delay).await;
                }
                (Err(error), _) => {
                    tracing::error!(request_id = %self.request_id, %error, "settling a reply failed; the reaper charges its recorded progress when the lease ends");
                    return Err(error);
                }
            }
        }
    }

    /// Releases the whole hold: the reply failed before any output.
    pub async fn release(self, why: &str) {
        let released = self
            .accounting
            .abort(
                &self.caller,
                AbortRequest {
                    session_id: self.request_id.clone(),
                    named_by: SessionNaming::Reply,
                    tokens_generated: 0,
                    reason: None,
                    error: Some(why.to_owned()),
                    user_id: None,
                    usage: UsageDetails::default(),
                },
            )
            .await;
        if let Err(error) = released {
            tracing::warn!(request_id = %self.request_id, %error, "releasing a hold failed; the reaper releases it when the lease ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn request_ids_of_one_origin_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000)
            .map(|_| request_id("65f0c0ffee0123456789abcd"))
            .collect();
        assert!(
            ids.iter()
                .all(|id| id.starts_with("65f0c0ffee0123456789abcd/"))
        );
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "ids made one after another (many in the same millisecond) must sort in that order"
        );
    }
}
