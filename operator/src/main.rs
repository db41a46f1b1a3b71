//! parley-operator binary: see the library for everything but signals.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parley_operator::config::Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let client = kube::Client::try_default()
        .await
        .context("loading the kube config")?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        parley_operator::shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    parley_operator::app::run(args, client, shutdown).await?;
    Ok(())
}
