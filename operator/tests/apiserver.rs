//! The operator against the real kube-apiserver (1.20, no controllers run
//! there: assertions are on the objects the operator writes). Each test uses
//! a fresh namespace and runs the controllers in-process as a user holding
//! only the operator's ClusterRole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::cluster::{self, Operator, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use kube::{Client, Resource, ResourceExt};
use parley_crds::{ChatDeployment, ModelRoute};
use parley_operator::discovery;
use serde_json::json;

/// The example ChatDeployment and routes, created in `namespace`.
async fn create_examples(client: &Client, namespace: &str) {
    let routes: Api<ModelRoute> = Api::namespaced(client.clone(), namespace);
    for file in ["model-route-default.yaml", "model-route-fast.yaml"] {
        let route: ModelRoute = common::example(file);
        routes.create(&PostParams::default(), &route).await.unwrap();
    }
    let chat: ChatDeployment = common::example("chat-deployment.yaml");
    Api::<ChatDeployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &chat)
        .await
        .unwrap();
}

fn condition<'a>(
    chat: &'a ChatDeployment,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    chat.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until the ChatDeployment's status says its routes are `aliases`.
async fn wait_routes(
    chats: &Api<ChatDeployment>,
    aliases: &'static [&'static str],
) -> ChatDeployment {
    wait_for(chats, "demo", move |chat: Option<&ChatDeployment>| {
        chat.and_then(|c| c.status.as_ref()).is_some_and(|status| {
            status
                .routes
                .iter()
                .map(|r| r.alias.as_str())
                .eq(aliases.iter().copied())
        })
    })
    .await
}

async fn resource_version<K>(client: &Client, namespace: &str, name: &str) -> String
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .unwrap()
        .resource_version()
        .unwrap()
}

/// resourceVersions of every object of the example installation.
async fn versions(client: &Client, namespace: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (
            "chatdeployment",
            resource_version::<ChatDeployment>(client, namespace, "demo").await,
        ),
        (
            "route/default",
            resource_version::<ModelRoute>(client, namespace, "default").await,
        ),
        (
            "route/fast",
            resource_version::<ModelRoute>(client, namespace, "fast").await,
        ),
        (
            "serviceaccount",
            resource_version::<ServiceAccount>(client, namespace, "demo").await,
        ),
        (
            "role",
            resource_version::<Role>(client, namespace, "demo").await,
        ),
        (
            "rolebinding",
            resource_version::<RoleBinding>(client, namespace, "demo").await,
        ),
        (
            "configmap",
            resource_version::<ConfigMap>(client, namespace, "demo-routes").await,
        ),
        (
            "service",
            resource_version::<Service>(client, namespace, "demo").await,
        ),
        (
            "deployment",
            resource_version::<Deployment>(client, namespace, "demo").await,
        ),
    ])
}

#[tokio::test]
async fn children_are_owned_and_drift_is_repaired() {
    let admin = cluster::admin().await;
    cluster::install_crds(&admin).await;
    let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
    let operator_client = cluster::operator_client(&admin).await;

    // The test server predates autoscaling/v2 and policy/v1; discovery sees that.
    let capabilities = discovery::capabilities(&operator_client).await.unwrap();
    assert!(
        !capabilities.autoscaling_v2 && !capabilities.policy_v1,
        "{capabilities:?}"
    );

    // The operator's identity really is limited to its ClusterRole.
    let secrets: Api<Secret> = Api::namespaced(operator_client.clone(), &namespace);
    match secrets.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403),
        other => panic!("the operator may read Secrets: {other:?}"),
    }

    let operator = Operator::start(operator_client, &namespace);
    create_examples(&admin, &namespace).await;
    let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), &namespace);
    let chat = wait_routes(&chats, &["default", "fast"]).await;
    let uid = chat.uid().unwrap();
    let status = chat.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&chat, "RoutesValid").unwrap().status, "True");
    // No pods ever run on the test server.
    let ready = condition(&chat, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ReplicasNotReady")
    );

    let owners = |meta: &kube::api::ObjectMeta| {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ChatDeployment", uid.as_str())
        );
        assert_eq!(owner.controller, Some(true));
    };
    let ns = namespace.as_str();
    owners(
        &Api::<ServiceAccount>::namespaced(admin.clone(), ns)
            .get("demo")
            .await
            .unwrap()
            .metadata,
    );
    owners(
        &Api::<Role>::namespaced(admin.clone(), ns)
            .get("demo")
            .await
            .unwrap()
            .metadata,
    );
    owners(
        &Api::<RoleBinding>::namespaced(admin.clone(), ns)
            .get("demo")
            .await
            .unwrap()
            .metadata,
    );
    owners(
        &Api::<Service>::namespaced(admin.clone(), ns)
            .get("demo")
            .await
            .unwrap()
            .metadata,
    );
    let configmap = Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get("demo-routes")
        .await
        .unwrap();
    owners(&configmap.metadata);
    let routes_file =
        parley_crds::RoutesFile::from_yaml(&configmap.data.unwrap()["routes.yaml"]).unwrap();
    assert_eq!(routes_file.routes.len(), 2);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    let deployment = deployments.get("demo").await.unwrap();
    owners(&deployment.metadata);
    // Without an autoscaler here, the Deployment itself runs replicas.min.
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));

    // Deleted: recreated.
    deployments
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    let old_uid = deployment.uid().unwrap();
    wait_for(&deployments, "demo", move |d: Option<&Deployment>| {
        d.is_some_and(|d| d.uid().as_deref() != Some(old_uid.as_str()))
    })
    .await;

    // Changed by someone else: changed back.
    let tamper = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "parley", "image": "example.com/tampered:1"}]}}}});
    deployments
        .patch("demo", &PatchParams::default(), &Patch::Strategic(&tamper))
        .await
        .unwrap();
    wait_for(&deployments, "demo", |d: Option<&Deployment>| {
        d.and_then(|d| {
            d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .image
                .clone()
        })
        .is_some_and(|image| image == parley_crds::DEFAULT_SERVICE_IMAGE)
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn route_edits_change_only_the_configmap_and_bad_routes_are_reported() {
    let admin = cluster::admin().await;
    cluster::install_crds(&admin).await;
    let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
    let operator = Operator::start(cluster::operator_client(&admin).await, &namespace);
    create_examples(&admin, &namespace).await;
    let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), &namespace);
    wait_routes(&chats, &["default", "fast"]).await;
    let before = versions(&admin, &namespace).await;

    // Edit one route and add another; the status lists the new route only
    // after the reconcile that saw both changes applied every child.
    let routes: Api<ModelRoute> = Api::namespaced(admin.clone(), &namespace);
    let edit = json!({"spec": {"targets": [{"provider": "simulated", "model": "simulated-faster",
        "pricing": {"inputPer1k": 0.25, "outputPer1k": 0.5}, "maxOutputTokens": 256}]}});
    routes
        .patch("fast", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let mut extra: ModelRoute = common::example("model-route-fast.yaml");
    extra.metadata.name = Some("extra".into());
    extra.spec.alias = "extra".into();
    routes.create(&PostParams::default(), &extra).await.unwrap();
    wait_routes(&chats, &["default", "extra", "fast"]).await;

    let configmap = Api::<ConfigMap>::namespaced(admin.clone(), &namespace)
        .get("demo-routes")
        .await
        .unwrap();
    let document = &configmap.data.unwrap()["routes.yaml"];
    assert!(
        document.contains("simulated-faster") && document.contains("alias: extra"),
        "{document}"
    );
    let after = versions(&admin, &namespace).await;
    for (object, version) in &before {
        let changed = after[object] != *version;
        let expected = matches!(*object, "configmap" | "chatdeployment" | "route/fast");
        assert_eq!(
            changed, expected,
            "{object}: {version} -> {}",
            after[object]
        );
    }

    // A newer route claiming a taken alias is rejected, and the ChatDeployment says so.
    let mut copy: ModelRoute = common::example("model-route-fast.yaml");
    copy.metadata.name = Some("fast-copy".into());
    routes.create(&PostParams::default(), &copy).await.unwrap();
    let rejected = wait_for(&routes, "fast-copy", |route: Option<&ModelRoute>| {
        route
            .and_then(|r| r.status.as_ref())
            .is_some_and(|s| !s.conditions.is_empty())
    })
    .await;
    let accepted = &rejected.status.unwrap().conditions[0];
    assert_eq!(
        (accepted.type_.as_str(), accepted.status.as_str()),
        ("Accepted", "False")
    );
    assert_eq!(accepted.reason, "DuplicateAlias");
    assert!(
        accepted.message.contains("ModelRoute fast"),
        "{}",
        accepted.message
    );
    let chat = wait_for(&chats, "demo", |chat: Option<&ChatDeployment>| {
        chat.and_then(|c| condition(c, "RoutesValid"))
            .is_some_and(|c| c.status == "False")
    })
    .await;
    let routes_valid = condition(&chat, "RoutesValid").unwrap();
    assert_eq!(routes_valid.reason, "DuplicateAlias");
    assert!(
        routes_valid.message.contains("fast-copy"),
        "{}",
        routes_valid.message
    );
    // A price finer than a micro-credit passes the schema; the operator
    // rejects that route alone and keeps reading the others.
    let finer = json!({"apiVersion": "parley.dev/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": "finer", "labels": {"parley.dev/chat": "demo"}},
        "spec": {"alias": "finer", "targets": [{"provider": "simulated", "model": "sim",
            "pricing": {"inputPer1k": 0.0000001, "outputPer1k": 1}, "maxOutputTokens": 16}]}});
    routes
        .patch(
            "finer",
            &PatchParams::apply("parley-operator-test"),
            &Patch::Apply(&finer),
        )
        .await
        .unwrap();
    let rejected = wait_for(&routes, "finer", |route: Option<&ModelRoute>| {
        route
            .and_then(|r| r.status.as_ref())
            .is_some_and(|s| !s.conditions.is_empty())
    })
    .await;
    let accepted = &rejected.status.unwrap().conditions[0];
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "TooPrecise")
    );
    let chat = wait_for(&chats, "demo", |chat: Option<&ChatDeployment>| {
        chat.and_then(|c| condition(c, "RoutesValid"))
            .is_some_and(|c| c.message.contains("ModelRoute finer"))
    })
    .await;
    let aliases: Vec<&str> = chat
        .status
        .as_ref()
        .unwrap()
        .routes
        .iter()
        .map(|r| r.alias.as_str())
        .collect();
    assert_eq!(aliases, ["default", "extra", "fast"]);

    let original = routes.get("fast").await.unwrap();
    let condition = &original.status.unwrap().conditions[0];
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "Valid")
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_restarted_operator_writes_nothing() {
    let admin = cluster::admin().await;
    cluster::install_crds(&admin).await;
    let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
    let operator_client = cluster::operator_client(&admin).await;
    let keys = [
        "chatdeployment/{ns}/demo",
        "modelroute/{ns}/default",
        "modelroute/{ns}/fast",
    ]
    .map(|key| key.replace("{ns}", &namespace));

    let first = Operator::start(operator_client.clone(), &namespace);
    create_examples(&admin, &namespace).await;
    let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), &namespace);
    wait_routes(&chats, &["default", "fast"]).await;
    let routes: Api<ModelRoute> = Api::namespaced(admin.clone(), &namespace);
    for name in ["default", "fast"] {
        wait_for(&routes, name, |r: Option<&ModelRoute>| {
            r.and_then(|r| r.status.as_ref())
                .is_some_and(|s| !s.conditions.is_empty())
        })
        .await;
    }
    first.wait_reconciled(&keys).await;
    first.stop().await;
    let before = versions(&admin, &namespace).await;

    let second = Operator::start(operator_client, &namespace);
    second.wait_reconciled(&keys).await;
    second.stop().await;
    assert_eq!(versions(&admin, &namespace).await, before);
}

/// A minimal ServiceMonitor CRD, as the Prometheus operator installs it
/// (the schema keeps every field).
fn service_monitor_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": "servicemonitors", "singular": "servicemonitor",
                      "kind": "ServiceMonitor", "listKind": "ServiceMonitorList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))
    .unwrap()
}

/// Keeps a ServiceMonitor, and with it its CRD, from being deleted.
const HOLD: &str = "parley.dev/test-hold";

fn monitors(client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = parley_operator::build::service_monitor_resource();
    match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// What the operator did to `object`, by its managed fields.
fn operator_operations(object: &DynamicObject) -> Vec<String> {
    object
        .managed_fields()
        .iter()
        .filter(|entry| entry.manager.as_deref() == Some("parley-operator"))
        .filter_map(|entry| entry.operation.clone())
        .collect()
}

/// Lets go of every ServiceMonitor [`HOLD`] keeps.
async fn release_monitors(client: &Client) {
    let held = match monitors(client, None).list(&Default::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(status)) if status.code == 404 => return,
        Err(error) => panic!("listing ServiceMonitors: {error}"),
    };
    for monitor in held
        .iter()
        .filter(|m| m.finalizers().iter().any(|f| f == HOLD))
    {
        monitors(client, monitor.namespace().as_deref())
            .patch(
                &monitor.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
    }
}

/// Starts deleting the CRD named `name`; its uid, `None` when it is absent.
async fn delete_crd(crds: &Api<CustomResourceDefinition>, name: &str) -> Option<String> {
    match crds.delete(name, &DeleteParams::default()).await {
        Ok(either) => either.either(|crd| crd.uid(), |status| status.details.map(|d| d.uid)),
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(error) => panic!("deleting CRD {name}: {error}"),
    }
}

/// Waits (on a watch, bounded) until the object `name` with `uid` is gone.
async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let gone = kube::runtime::wait::await_condition(api.clone(), name, conditions::is_deleted(uid));
    tokio::time::timeout(cluster::WAIT, gone)
        .await
        .unwrap_or_else(|_| panic!("{name} not deleted within {:?}", cluster::WAIT))
        .unwrap();
}

/// The ChatDeployment's status lists `kinds` as its off children.
fn off_kinds(chat: Option<&ChatDeployment>) -> Vec<String> {
    chat.and_then(|chat| chat.status.as_ref())
        .map(|status| {
            status
                .off_children
                .iter()
                .map(|child| child.kind.clone())
                .collect()
        })
        .unwrap_or_default()
}

// This test installs and removes a cluster-wide CRD; `.config/nextest.toml`
// keeps it from running beside the tests whose status it would change.
#[tokio::test]
async fn a_service_monitor_crd_installed_after_start_is_used_without_a_restart() {
    let admin = cluster::admin().await;
    cluster::install_crds(&admin).await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = service_monitor_crd();
    // Left by an earlier run on the same server: start without it.
    if let Some(uid) = delete_crd(&crds, &crd.name_any()).await {
        release_monitors(&admin).await;
        wait_deleted(&crds, &crd.name_any(), &uid).await;
    }

    let namespace = parley_test_support::env::fresh_namespace(&admin, "op").await;
    let operator = Operator::start_with(
        cluster::operator_client(&admin).await,
        &namespace,
        std::time::Duration::from_millis(200),
    );
    create_examples(&admin, &namespace).await;
    let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), &namespace);
    // The 1.20 test server serves neither autoscaling/v2 nor policy/v1 either.
    let chat = wait_for(&chats, "demo", |chat: Option<&ChatDeployment>| {
        off_kinds(chat).contains(&"ServiceMonitor".to_owned())
    })
    .await;
    let off = &chat.status.unwrap().off_children;
    let monitor_off = off.iter().find(|c| c.kind == "ServiceMonitor").unwrap();
    assert_eq!(monitor_off.reason, "ApiNotServed");

    // Installed while the operator runs: a ServiceMonitor appears for the
    // existing ChatDeployment, and the status stops listing it as off.
    crds.create(&PostParams::default(), &crd).await.unwrap();
    wait_for(&crds, &crd.name_any(), conditions::is_crd_established()).await;
    let monitors = monitors(&admin, Some(&namespace));
    // Created, then its fields handed from the create to the operator's apply.
    let monitor = wait_for(&monitors, "demo", |m: Option<&DynamicObject>| {
        m.is_some_and(|m| operator_operations(m) == ["Apply"])
    })
    .await;
    assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor.metadata.owner_references.unwrap()[0].kind,
        "ChatDeployment"
    );
    wait_for(&chats, "demo", |chat: Option<&ChatDeployment>| {
        !off_kinds(chat).contains(&"ServiceMonitor".to_owned())
    })
    .await;

    // When the CRD goes, its finalizer deletes every monitor and waits until
    // none is left; `hold` keeps it waiting. A reconcile meanwhile must not
    // bring `demo` back, which would hold the CRD's deletion up.
    let hold = serde_json::from_value(json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": "hold", "finalizers": [HOLD]}, "spec": {},
    }))
    .unwrap();
    monitors
        .create(&PostParams::default(), &hold)
        .await
        .unwrap();
    let crd_uid = delete_crd(&crds, &crd.name_any()).await.unwrap();
    let demo_uid = monitor.metadata.uid.unwrap();
    wait_deleted(&monitors, "demo", &demo_uid).await;
    let key = format!("chatdeployment/{namespace}/demo");
    let mut reconciled = operator.reconciled.subscribe();
    let before = reconciled
        .borrow_and_update()
        .get(&key)
        .copied()
        .unwrap_or_default();
    chats
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/touched": "1"}}})),
        )
        .await
        .unwrap();
    let after = reconciled.wait_for(|counts| counts.get(&key).is_some_and(|&n| n > before));
    tokio::time::timeout(cluster::WAIT, after)
        .await
        .unwrap()
        .unwrap();
    assert!(
        monitors.get_opt("demo").await.unwrap().is_none(),
        "a monitor was created while its CRD was being deleted"
    );

    // Let go, and the operator stops using the CRD and says so.
    release_monitors(&admin).await;
    wait_deleted(&crds, &crd.name_any(), &crd_uid).await;
    wait_for(&chats, "demo", |chat: Option<&ChatDeployment>| {
        off_kinds(chat).contains(&"ServiceMonitor".to_owned())
    })
    .await;
    operator.stop().await;
}
