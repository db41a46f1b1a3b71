//! Accounting metrics on the injected registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::ledger::{LedgerError, MICROS_PER_CREDIT, UsageOutcome, UsageRecord};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChargeLabels {
    route: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Default)]
pub struct AccountingMetrics {
    credits_charged: Family<ChargeLabels, Counter<f64, AtomicU64>>,
    holds_open: Gauge,
    denials: Family<ReasonLabels, Counter>,
    reaped: Family<OutcomeLabels, Counter>,
}

impl AccountingMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AccountingMetrics::default();
        registry.register(
            "parley_credits_charged",
            "Credits charged for settled requests",
            metrics.credits_charged.clone(),
        );
        registry.register(
            "parley_credit_holds_open",
            "Open credit holds across all replicas (refreshed by the reaper)",
            metrics.holds_open.clone(),
        );
        registry.register(
            "parley_ledger_denials",
            "Requests the ledger denied, by reason",
            metrics.denials.clone(),
        );
        registry.register(
            "parley_ledger_reaped_holds",
            "Expired holds the reaper closed: `reaped` charged from recorded usage, \
             `expired` released without any usage (a request that ran unrecorded)",
            metrics.reaped.clone(),
        );
        metrics
    }

    /// A settlement this replica wrote (not a replay).
    pub fn charged(&self, record: &UsageRecord) {
        #[allow(clippy::cast_precision_loss)]
        let credits = record.charged.micros() as f64 / MICROS_PER_CREDIT as f64;
        self.credits_charged
            .get_or_create(&ChargeLabels {
                route: record.route.clone(),
                model: record.model.clone(),
            })
            .inc_by(credits);
    }

    /// Counts a refused check or hold: short of credits, or the ledger
    /// (or external accounting service) unreachable.
    pub fn denied(&self, reason: &'static str) {
        self.denials.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts `error` as a denial when it is one.
    pub fn denied_by(&self, error: &Error) {
        let reason = match error {
            Error::Ledger(LedgerError::InsufficientCredits { .. }) => "insufficient_credits",
            Error::AccountingUnavailable(_) => "accounting_unavailable",
            Error::Ledger(_) if error.status().is_server_error() => "ledger_unavailable",
            _ => return,
        };
        self.denied(reason);
    }

    /// Counts the denials among a check's outcomes.
    pub fn observe_check<T>(&self, result: &Result<T, Error>, sufficient: impl Fn(&T) -> bool) {
        match result {
            Ok(answer) if !sufficient(answer) => self.denied("insufficient_credits"),
            Ok(_) => {}
            Err(error) => self.denied_by(error),
        }
    }

    pub fn set_holds_open(&self, count: u64) {
        self.holds_open
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn reaped(&self, record: &UsageRecord) {
        let outcome = match record.outcome {
            UsageOutcome::Expired => "expired",
            _ => "reaped",
        };
        self.reaped.get_or_create(&OutcomeLabels { outcome }).inc();
        self.charged(record);
    }
}
