//! Shared by the suites that install the Helm charts (chart_install.rs on
//! the test kube-apiserver, cluster.rs on the one-node cluster): rendering
//! with Helm as a library (scripts/test_charts/render.py in the Python test
//! tools' venv), server-side apply as an administrator, and waiting on a
//! condition.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, ResourceExt};
use parley_test_support::env;
use serde_json::{Value, json};

/// Field manager of what the tests apply.
pub const FIELD_MANAGER: &str = "parley-chart-test";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The objects `helm install` would create.
pub fn render(chart: &str, release: &str, namespace: &str, values: &Value) -> Vec<Value> {
    let output = std::process::Command::new(env::python())
        .arg(repo().join("scripts/test_charts/render.py"))
        .args([
            repo().join("charts").join(chart).to_str().unwrap(),
            release,
            namespace,
            &values.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "rendering {chart}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Polls `check` until it returns `Some`, for at most `bound`.
pub async fn eventually<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Server-side applies `objects` as an administrator would install them.
pub async fn apply_all(admin: &Client, objects: &[Value]) {
    for object in objects {
        let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", object["apiVersion"].as_str().unwrap()),
        };
        let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
        let (resource, capabilities) = pinned_kind(admin, &gvk).await.unwrap();
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).unwrap();
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                Api::namespaced_with(admin.clone(), &dynamic.namespace().unwrap(), &resource)
            }
            Scope::Cluster => Api::all_with(admin.clone(), &resource),
        };
        api.patch(
            &dynamic.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&dynamic),
        )
        .await
        .unwrap_or_else(|error| panic!("applying {} {}: {error}", gvk.kind, dynamic.name_any()));
    }
}

/// Installs the parley-crds chart and waits until both CRDs are served.
pub async fn install_crds(admin: &Client) {
    let crds = render("parley-crds", "parley-crds", "default", &json!({}));
    assert_eq!(crds.len(), 2);
    apply_all(admin, &crds).await;
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().unwrap();
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || async {
                let crd = api.get(name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// The one rendered object of `kind`.
pub fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}
