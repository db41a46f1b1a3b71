//! Leader election on the real kube-apiserver: one leader at a time, and a
//! leader that shuts down hands over through the Lease.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::cluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;
use parley_operator::leader::{Election, LEASE_NAME, run_as_leader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn candidate(
    client: Client,
    namespace: &str,
    identity: &'static str,
    log: mpsc::UnboundedSender<String>,
) -> (
    CancellationToken,
    JoinHandle<Result<(), parley_operator::Error>>,
) {
    let shutdown = CancellationToken::new();
    let election = Election {
        namespace: namespace.to_owned(),
        identity: identity.to_owned(),
    };
    let standby_ready = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(run_as_leader(
        client,
        election,
        shutdown.clone(),
        standby_ready,
        move |leading| {
            let log = log.clone();
            async move {
                log.send(format!("{identity} leads")).unwrap();
                leading.cancelled().await;
                log.send(format!("{identity} stops")).unwrap();
                Ok(())
            }
        },
    ));
    (shutdown, task)
}

async fn next(log: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(30), log.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn one_leader_at_a_time_and_handover_on_shutdown() {
    let admin = cluster::admin().await;
    let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
    let client = cluster::operator_client(&admin).await;
    let (log_tx, mut log) = mpsc::unbounded_channel();

    let (stop_a, task_a) = candidate(client.clone(), &namespace, "a", log_tx.clone());
    assert_eq!(next(&mut log).await, "a leads");
    let (stop_b, task_b) = candidate(client, &namespace, "b", log_tx);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &namespace);
    let holder = |lease: Lease| lease.spec.unwrap().holder_identity;
    assert_eq!(
        holder(leases.get(LEASE_NAME).await.unwrap()).as_deref(),
        Some("a")
    );

    // b may only lead after a has stopped and released the Lease.
    stop_a.cancel();
    assert_eq!(next(&mut log).await, "a stops");
    task_a.await.unwrap().unwrap();
    assert_eq!(next(&mut log).await, "b leads");
    assert_eq!(
        holder(leases.get(LEASE_NAME).await.unwrap()).as_deref(),
        Some("b")
    );

    stop_b.cancel();
    assert_eq!(next(&mut log).await, "b stops");
    task_b.await.unwrap().unwrap();
    assert_eq!(
        holder(leases.get(LEASE_NAME).await.unwrap()),
        None,
        "released on shutdown"
    );
}
