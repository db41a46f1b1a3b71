//! The routes ConfigMap through the real kube-apiserver: read at start, every
//! later version applied, a bad version rejected (counted, the last good
//! routes stay), and the watch ends on shutdown. (tests/tests/routes_configmap.rs
//! runs the binary with only the RBAC the operator grants.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use parley_service::Error;
use parley_service::auth::Role;
use parley_service::model_routes::{Routes, RoutesCell, RoutesConfigMap};
use parley_test_support::env::kube_config;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Upper bound for the API server to deliver a change; a bound, not a wait.
const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "demo-routes";

fn routes_yaml(aliases: &[&str], model: &str) -> String {
    let mut text = String::from("routes:\n");
    for alias in aliases {
        text.push_str(&format!(
            "  - alias: {alias}\n    targets:\n      - provider: simulated\n        model: {model}\n        \
             pricing: {{inputPer1k: 1, outputPer1k: 2}}\n        maxOutputTokens: 100\n"
        ));
    }
    text
}

async fn admin() -> Client {
    Client::try_from(kube_config().await).unwrap()
}

/// A fresh namespace, and the ConfigMap API in it.
async fn fresh_namespace(client: &Client) -> (String, Api<ConfigMap>) {
    let name = parley_test_support::env::fresh_namespace(client, "routes").await;
    let configmaps = Api::namespaced(client.clone(), &name);
    (name, configmaps)
}

fn configmap(data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..ConfigMap::default()
    }
}

/// Replaces the ConfigMap's data (`replace` keeps the object, like the
/// operator's apply does).
async fn write(configmaps: &Api<ConfigMap>, data: &[(&str, &str)]) {
    let mut current = configmaps.get(NAME).await.unwrap();
    current.data = configmap(data).data;
    configmaps
        .replace(NAME, &PostParams::default(), &current)
        .await
        .unwrap();
}

/// Aliases and first-target model of every route, in order.
fn chains(routes: &Routes) -> Vec<(String, String)> {
    routes
        .usable_by(Role::Admin)
        .map(|route| (route.alias.clone(), route.targets[0].model.clone()))
        .collect()
}

fn chain(aliases: &[&str], model: &str) -> Vec<(String, String)> {
    aliases
        .iter()
        .map(|alias| ((*alias).to_owned(), model.to_owned()))
        .collect()
}

fn reload_failures(registry: &Registry) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("parley_routes_reload_failures_total "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Re-checks `condition` every 20 ms until it holds (bounded by [`WAIT`]).
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            if condition() {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"));
}

#[tokio::test]
async fn the_watch_applies_every_version_and_keeps_the_last_good_routes() {
    let client = admin().await;
    let (namespace, configmaps) = fresh_namespace(&client).await;
    let first = routes_yaml(&["default"], "sim-a");
    configmaps
        .create(
            &PostParams::default(),
            &configmap(&[("routes.yaml", &first)]),
        )
        .await
        .unwrap();
    let source = RoutesConfigMap::new(client.clone(), Some(&namespace), NAME);
    let routes = source.load().await.unwrap();
    assert_eq!(chains(&routes), chain(&["default"], "sim-a"));

    let mut registry = Registry::default();
    let cell = Arc::new(RoutesCell::new(routes, &mut registry));
    let shutdown = CancellationToken::new();
    let watch = tokio::spawn(source.watch(Arc::clone(&cell), shutdown.clone()));
    // A reply that started now holds this snapshot.
    let in_flight = cell.snapshot();

    // A new chain is used as soon as it arrives.
    write(
        &configmaps,
        &[("routes.yaml", &routes_yaml(&["default", "fast"], "sim-b"))],
    )
    .await;
    let updated = chain(&["default", "fast"], "sim-b");
    eventually("the updated routes", || chains(&cell.snapshot()) == updated).await;
    assert_eq!(chains(&in_flight), chain(&["default"], "sim-a"));
    assert_eq!(reload_failures(&registry), 0);

    // Invalid YAML, invalid routes, a missing key and a deleted ConfigMap are
    // each counted once, and the last good routes stay.
    let rejected: [&[(&str, &str)]; 3] = [
        &[("routes.yaml", "routes: [{alias: broken")],
        &[("routes.yaml", "routes: [{alias: empty, targets: []}]")],
        &[("other.yaml", "routes: []")],
    ];
    for (count, data) in (1..).zip(rejected) {
        write(&configmaps, data).await;
        eventually("the rejection to be counted", || {
            reload_failures(&registry) == count
        })
        .await;
        assert_eq!(chains(&cell.snapshot()), updated);
    }
    configmaps
        .delete(NAME, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deletion to be counted", || {
        reload_failures(&registry) == 4
    })
    .await;
    assert_eq!(chains(&cell.snapshot()), updated);

    // A recreated ConfigMap is picked up again.
    configmaps
        .create(
            &PostParams::default(),
            &configmap(&[("routes.yaml", &first)]),
        )
        .await
        .unwrap();
    eventually("the recreated routes", || {
        chains(&cell.snapshot()) == chain(&["default"], "sim-a")
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, watch)
        .await
        .expect("the watch did not end on shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_missing_or_bad_configmap_at_start_is_a_configuration_error() {
    let client = admin().await;
    let (namespace, configmaps) = fresh_namespace(&client).await;
    let source = RoutesConfigMap::new(client.clone(), Some(&namespace), NAME);
    let message = |result: Result<Routes, Error>| match result {
        Err(Error::Config(message)) => message,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    assert!(message(source.load().await).contains("does not exist"));

    configmaps
        .create(
            &PostParams::default(),
            &configmap(&[("other.yaml", "routes: []")]),
        )
        .await
        .unwrap();
    assert!(message(source.load().await).contains("no `routes.yaml` key"));

    write(
        &configmaps,
        &[("routes.yaml", "routes: [{alias: empty, targets: []}]")],
    )
    .await;
    assert!(message(source.load().await).contains("routes file"));
}
