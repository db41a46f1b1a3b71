//! Liveness, readiness and metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, ErrorBody};
use crate::state::AppState;

/// A readiness probe must answer within the probe's own timeout.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusView {
    status: &'static str,
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "The process serves requests", body = StatusView))
)]
pub async fn health() -> Json<StatusView> {
    Json(StatusView { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "The store answers", body = StatusView),
        (status = 503, description = "The store does not answer, or the replica is shutting down", body = ErrorBody),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<StatusView>, Error> {
    // A draining replica takes no new replies: load balancers move on.
    if state.replies.draining.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    match tokio::time::timeout(READY_PING_TIMEOUT, state.sessions.ping()).await {
        Ok(Ok(())) => Ok(Json(StatusView { status: "ready" })),
        Ok(Err(Error::StoreUnavailable(reason) | Error::Store(reason))) => {
            Err(Error::StoreUnavailable(reason))
        }
        Ok(Err(other)) => Err(other),
        Err(_) => Err(Error::StoreUnavailable("ping timed out".into())),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            [(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
            text,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
