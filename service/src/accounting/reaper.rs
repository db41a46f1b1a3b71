//! The reaper: on every replica, closes holds whose lease ended (their
//! replica died or their caller never finalized) and refreshes the open-holds
//! gauge. Safe to run everywhere at once: the ledger closes each hold once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::AccountingMetrics;
use crate::ledger::Ledger;

/// Runs a reap pass every `interval` until `shutdown` is cancelled.
pub async fn run(
    ledger: Arc<dyn Ledger>,
    metrics: AccountingMetrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => reap_once(ledger.as_ref(), &metrics).await,
        }
    }
    tracing::debug!("reaper stopped");
}

/// One pass; errors are logged and the next pass tries again.
pub async fn reap_once(ledger: &dyn Ledger, metrics: &AccountingMetrics) {
    match ledger.reap(chrono::Utc::now()).await {
        Ok(report) => {
            // The ledger logs each record; the metrics make them alertable.
            for record in report.settled.iter().chain(&report.released_without_usage) {
                metrics.reaped(record);
            }
        }
        Err(error) => tracing::warn!(%error, "reaping expired holds failed; retrying next pass"),
    }
    match ledger.open_holds().await {
        Ok(count) => metrics.set_holds_open(count),
        Err(error) => tracing::warn!(%error, "counting open holds failed"),
    }
}
