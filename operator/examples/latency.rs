//! Measures, against the test kube-apiserver (PARLEY_TEST_KUBECONFIG), the
//! time from creating a ChatDeployment to all its children applied (its
//! status is written after the last child), and from a ModelRoute edit to
//! the routes ConfigMap holding the edit. Prints figures; asserts nothing.
//!
//! `cargo run -p parley-operator --example latency [rounds]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::{self, Operator, wait_for};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use parley_crds::{ChatDeployment, ModelRoute};
use serde_json::json;

fn summary(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} min={:.1} ms median={:.1} ms max={:.1} ms",
        samples.len(),
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    );
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(5, |n| n.parse().unwrap());
    let admin = cluster::admin().await;
    cluster::install_crds(&admin).await;
    let operator_client = cluster::operator_client(&admin).await;
    let (mut apply_to_children, mut edit_to_configmap) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
        let operator = Operator::start(operator_client.clone(), &namespace);
        let routes: Api<ModelRoute> = Api::namespaced(admin.clone(), &namespace);
        for file in ["model-route-default.yaml", "model-route-fast.yaml"] {
            let route: ModelRoute = common::example(file);
            routes.create(&PostParams::default(), &route).await.unwrap();
        }
        // Watches are running once the routes have been reconciled.
        let keys = ["default", "fast"].map(|name| format!("modelroute/{namespace}/{name}"));
        operator.wait_reconciled(&keys).await;

        let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), &namespace);
        let chat: ChatDeployment = common::example("chat-deployment.yaml");
        let started = Instant::now();
        chats.create(&PostParams::default(), &chat).await.unwrap();
        wait_for(&chats, "demo", |c: Option<&ChatDeployment>| {
            c.and_then(|c| c.status.as_ref())
                .is_some_and(|s| s.routes.len() == 2)
        })
        .await;
        apply_to_children.push(started.elapsed());

        let model = format!("simulated-round-{round}");
        let edit = json!({"spec": {"targets": [{"provider": "simulated", "model": model,
            "pricing": {"inputPer1k": 0.25, "outputPer1k": 0.5}, "maxOutputTokens": 256}]}});
        let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), &namespace);
        let started = Instant::now();
        routes
            .patch("fast", &PatchParams::default(), &Patch::Merge(&edit))
            .await
            .unwrap();
        wait_for(&configmaps, "demo-routes", move |cm: Option<&ConfigMap>| {
            cm.and_then(|cm| cm.data.as_ref()).is_some_and(|data| {
                data.get("routes.yaml")
                    .is_some_and(|doc| doc.contains(&model))
            })
        })
        .await;
        edit_to_configmap.push(started.elapsed());
        operator.stop().await;
    }
    summary(
        "ChatDeployment created -> all children applied",
        &mut apply_to_children,
    );
    summary(
        "ModelRoute edited -> routes ConfigMap updated",
        &mut edit_to_configmap,
    );
}
