//! parley-operator: turns ChatDeployment and ModelRoute resources into
//! running, autoscaled chat services with hot-reloaded routes.
//!
//! The pure parts ([`build`], [`routes`], [`status`]) compute desired
//! objects and status; [`controller`] applies them with server-side apply.

pub mod app;
pub mod build;
pub mod config;
pub mod controller;
pub mod discovery;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod routes;
pub mod status;

use std::time::Duration;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Routes(#[from] parley_crds::Error),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("object has no uid yet")]
    MissingUid,
    #[error("routeSelector is invalid: {message}")]
    InvalidSelector { message: String },
    #[error("serializing a child object: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("health server: {0}")]
    Serve(#[source] std::io::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                409 => "conflict",
                422 | 400 => "invalid",
                403 | 401 => "forbidden",
                404 => "not_found",
                429 => "throttled",
                _ => "api_server",
            },
            Error::Kube(_) => "transport",
            Error::Routes(_) | Error::Serialize(_) => "encoding",
            Error::MissingNamespace | Error::MissingUid | Error::InvalidSelector { .. } => {
                "invalid_object"
            }
            Error::Serve(_) => "io",
        }
    }

    /// How long to wait before retrying, by kind: conflicts clear at once,
    /// an overloaded or unreachable server needs a pause, and a request the
    /// server rejects needs a person (a change to the object re-triggers
    /// reconciliation anyway).
    pub fn retry_after(&self) -> Duration {
        match self.kind() {
            "conflict" => Duration::from_secs(1),
            "throttled" | "api_server" | "transport" | "not_found" => Duration::from_secs(10),
            "forbidden" => Duration::from_secs(60),
            _ => Duration::from_secs(300),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
