//! parley-operator binary: see the library for everything but signals.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = parley_operator::config::Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    // Failures are logged, not only returned: the JSON log is where a pod's
    // operator reads them.
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "no Kubernetes cluster configured: run in a pod with a service account, \
                 or point KUBECONFIG at a kubeconfig"
            );
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        parley_operator::shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    match parley_operator::app::run(args, client, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "parley-operator stopped");
            ExitCode::FAILURE
        }
    }
}
