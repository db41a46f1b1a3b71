//! /health, /ready and /metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use parley_operator::metrics::{ControllerLabels, FailureLabels, Metrics};
use prometheus_client::registry::Registry;
use tower::ServiceExt;

async fn get(app: &axum::Router, path: &str) -> (StatusCode, Option<String>, String) {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.missing_crds.set(2);
    let controller = "chatdeployment";
    metrics
        .reconcile_duration
        .get_or_create(&ControllerLabels { controller })
        .observe(0.25);
    metrics
        .reconcile_failures
        .get_or_create(&FailureLabels {
            controller,
            reason: "conflict",
        })
        .inc();
    let ready = Arc::new(AtomicBool::new(false));
    let app = parley_operator::http::router(Arc::new(registry), ready.clone());

    assert_eq!(get(&app, "/health").await.0, StatusCode::OK);
    assert_eq!(get(&app, "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get(&app, "/ready").await.0, StatusCode::OK);

    let (status, content_type, body) = get(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        content_type
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(body.contains("parley_operator_missing_crds 2"), "{body}");
    assert!(body.contains(
        "parley_operator_reconcile_duration_seconds_count{controller=\"chatdeployment\"} 1"
    ));
    assert!(body.contains(
        "parley_operator_reconcile_failures_total{controller=\"chatdeployment\",reason=\"conflict\"} 1"
    ), "{body}");
}
