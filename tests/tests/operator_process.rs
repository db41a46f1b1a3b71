//! The real `parley-operator` binary against the test kube-apiserver: serves
//! its probes and metrics, and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley_e2e::Process;
use parley_test_support::env;

#[tokio::test]
async fn operator_serves_probes_and_stops_on_sigterm() {
    // The operator binds the address it is given; reserve a free one.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut operator = Process::start(
        "parley-operator",
        &[],
        &[
            ("KUBECONFIG", env::kubeconfig_path().display().to_string()),
            ("PARLEY_OPERATOR_LISTEN", listen.to_string()),
        ],
    );
    operator.wait_for_line("serving /health").await;

    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{listen}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("# EOF"), "OpenMetrics text:\n{metrics}");

    let status = operator.terminate().await;
    assert!(
        status.success(),
        "parley-operator exited with {status} after SIGTERM"
    );
}
