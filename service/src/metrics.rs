//! HTTP metrics on an injected registry (never a global one).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    /// The matched route template (`/api/chat/sessions/{id}`), never the raw
    /// path, so ids cannot explode the label cardinality.
    route: String,
    status: u16,
}

type DurationFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct HttpMetrics {
    request_duration: DurationFamily,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let request_duration: DurationFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (to the response head for streams)",
            request_duration.clone(),
        );
        Self { request_duration }
    }
}

/// Middleware recording `http_request_duration_seconds{method,route,status}`.
pub async fn track_requests(
    State(metrics): State<HttpMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics
        .request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Standard methods by name; anything else as `other`, to bound cardinality.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    /// `ok` or `error` (the call returned an error, whatever its kind).
    outcome: &'static str,
}

type OperationFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

/// Latency of the calls into one backend (the session store, the ledger),
/// by operation and outcome. The backends are instrumented from outside, by
/// wrappers around their trait objects, so no implementation needs to know.
#[derive(Clone)]
pub struct OperationMetrics {
    duration: OperationFamily,
}

impl OperationMetrics {
    /// Registers a histogram `name` (e.g. `parley_store_operation_duration_seconds`).
    pub fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let duration: OperationFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register(name, help, duration.clone());
        Self { duration }
    }

    /// Awaits `call` and records how long it took under `operation`.
    pub async fn time<T, E>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = call.await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.duration
            .get_or_create(&OperationLabels { operation, outcome })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}
