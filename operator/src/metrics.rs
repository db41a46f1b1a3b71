//! Operator metrics on an injected registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub missing_crds: Gauge,
    /// Objects whose last reconciliation failed, waiting for a retry.
    pub pending_objects: Family<ControllerLabels, Gauge>,
    /// From the first attempt at a change (a new generation, or a failed
    /// reconciliation) to the first reconciliation that succeeds after it.
    pub time_to_converge: Family<ControllerLabels, Histogram>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            reconcile_failures: Family::default(),
            missing_crds: Gauge::default(),
            pending_objects: Family::default(),
            time_to_converge: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            }),
        };
        registry.register(
            "parley_operator_reconcile_duration_seconds",
            "Time spent in one reconciliation",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "parley_operator_reconcile_failures",
            "Failed reconciliations by error kind",
            metrics.reconcile_failures.clone(),
        );
        registry.register(
            "parley_operator_missing_crds",
            "Parley CRDs the API server does not serve (the operator waits for them)",
            metrics.missing_crds.clone(),
        );
        registry.register(
            "parley_operator_pending_objects",
            "Objects whose last reconciliation failed and that wait for a retry",
            metrics.pending_objects.clone(),
        );
        registry.register(
            "parley_operator_time_to_converge_seconds",
            "From the first attempt at a change to the reconciliation that applied it, \
             retries included",
            metrics.time_to_converge.clone(),
        );
        metrics
    }
}
