//! Wires the operator together: metrics, HTTP endpoints, controllers and
//! (optionally) leader election.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use kube::Client;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::config::Args;
use crate::controller::{self, Settings};
use crate::leader::{self, Election};
use crate::metrics::Metrics;

/// Runs the operator until `shutdown` is cancelled.
pub async fn run(args: Args, client: Client, shutdown: CancellationToken) -> Result<(), Error> {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind(args.listen).await.map_err(Error::Serve)?;
    tracing::info!(listen = %args.listen, "serving /health, /ready and /metrics");
    let app = crate::http::router(Arc::new(registry), ready.clone());
    let server = tokio::spawn(crate::http::serve(listener, app, shutdown.clone()));
    let settings = Settings {
        namespace: args.namespace,
        instance: Some(args.identity.clone()),
        discovery_interval: std::time::Duration::from_secs(args.discovery_seconds.max(1)),
        ..Settings::default()
    };
    let controllers = if args.leader_election {
        let election = Election {
            namespace: args.lease_namespace,
            identity: args.identity,
        };
        let standby_ready = ready.clone();
        leader::run_as_leader(
            client.clone(),
            election,
            shutdown.clone(),
            standby_ready,
            |leading| {
                controller::run(
                    client.clone(),
                    settings.clone(),
                    metrics.clone(),
                    ready.clone(),
                    leading,
                )
            },
        )
        .await
    } else {
        controller::run(client, settings, metrics, ready, shutdown.clone()).await
    };
    // The server stops with the controllers, also when they end in an error.
    shutdown.cancel();
    let served = server
        .await
        .map_err(|error| Error::Serve(std::io::Error::other(error)));
    controllers?;
    served?
}
