//! The real `parley-operator` binary against the test kube-apiserver: serves
//! its probes and metrics, and stops cleanly on SIGTERM; without any cluster
//! configuration, it says so in its log and exits non-zero.
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

#[tokio::test]
async fn without_a_cluster_the_operator_logs_why_and_exits_non_zero() {
    // No service account (no KUBERNETES_SERVICE_HOST) and an empty HOME: no
    // kubeconfig anywhere.
    let home = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(parley_e2e::binary("parley-operator"))
        .env_clear()
        .env("HOME", home.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exited {}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error: serde_json::Value = stdout
        .lines()
        .chain(stderr.lines())
        .filter_map(|line| serde_json::from_str(line).ok())
        .find(|log: &serde_json::Value| log["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR log line in:\n{stdout}{stderr}"));
    let message = error["fields"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("no Kubernetes cluster configured") && message.contains("KUBECONFIG"),
        "{message}"
    );
    assert!(
        error["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("kubeconfig"),
        "the cause is logged too: {error}"
    );
}
