//! The Helm charts applied to the real test kube-apiserver, then the real
//! `parley-operator` binary, configured as the chart's Deployment configures
//! it and acting as the chart's ServiceAccount (impersonated: it holds only
//! the chart's RBAC), reconciles the chart's sample ChatDeployment to all its
//! children — with the ClusterRole and two replicas' leader election, and in
//! the namespace-scoped mode.
//!
//! The charts are rendered by Helm as a library (scripts/test_charts/render.py
//! in the Python test tools' venv). The 1.20 test server serves neither
//! autoscaling/v2 nor policy/v1 and runs no pods, so the autoscaler, the
//! disruption budget and a Ready rollout are not part of what is checked here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{apply_all, install_crds, one, render};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::{Client, Resource, ResourceExt};
use parley_crds::{ChatDeployment, ModelRoute};
use parley_e2e::Process;
use parley_test_support::env;
use serde_json::{Value, json};

/// Bound of every wait below (each waits for an event, polled).
const WAIT: Duration = Duration::from_secs(60);

async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually(what, WAIT, check).await
}

/// A kubeconfig for the test server that acts as `service_account` of
/// `namespace`, with the groups Kubernetes gives a ServiceAccount.
fn impersonating_kubeconfig(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(env::kubeconfig_path()).unwrap()).unwrap();
    let user = &mut config["users"][0]["user"];
    user["as"] = format!("system:serviceaccount:{namespace}:{service_account}").into();
    user["as-groups"] = serde_yaml::to_value([
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_owned(),
    ])
    .unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// The operator's environment from the chart's Deployment, with what the
/// kubelet would fill in (pod name and namespace) and a loopback address.
fn operator_env(
    deployment: &Value,
    namespace: &str,
    listen: &str,
    kubeconfig: &Path,
) -> Vec<(&'static str, String)> {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut vars: Vec<(&'static str, String)> = vec![
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("PARLEY_OPERATOR_LISTEN", listen.to_owned()),
    ];
    for var in container["env"].as_array().unwrap() {
        let name: &'static str = match var["name"].as_str().unwrap() {
            "PARLEY_OPERATOR_LISTEN" => continue,
            "PARLEY_OPERATOR_NAMESPACE" => "PARLEY_OPERATOR_NAMESPACE",
            "PARLEY_OPERATOR_LEADER_ELECTION" => "PARLEY_OPERATOR_LEADER_ELECTION",
            "POD_NAME" => "POD_NAME",
            "POD_NAMESPACE" => "POD_NAMESPACE",
            "RUST_LOG" => "RUST_LOG",
            other => panic!("the chart sets {other}, which this test does not know"),
        };
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => "parley-operator-chart-test-0".to_owned(),
            Some("metadata.namespace") => namespace.to_owned(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => var["value"].as_str().unwrap().to_owned(),
        };
        vars.push((name, value));
    }
    vars
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Installs both charts with `values`, runs the operator as the chart's
/// ServiceAccount and checks the sample is reconciled. `scope_operator`
/// keeps a cluster-wide operator to the sample's namespace (by
/// PARLEY_OPERATOR_NAMESPACE), so that it leaves other tests' objects on the
/// shared test server alone; its rights are still the chart's ClusterRole.
async fn install_and_reconcile(values: Value, watched: Option<&str>, release_namespace: &str) {
    let admin = Client::try_from(env::kube_config().await).unwrap();
    install_crds(&admin).await;
    let release = release_namespace;
    let objects = render("parley", release, release_namespace, &values);
    apply_all(&admin, &objects).await;

    let chat_namespace = watched.unwrap_or(release_namespace);
    let chat = one(&objects, "ChatDeployment");
    let chat_name = chat["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(chat["metadata"]["namespace"], chat_namespace);
    let service_account = one(&objects, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let deployment = one(&objects, "Deployment");

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), release_namespace, &service_account);
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut envs = operator_env(deployment, release_namespace, &listen, &kubeconfig);
    let leader_election = envs.contains(&("PARLEY_OPERATOR_LEADER_ELECTION", "true".to_owned()));
    if watched.is_none() {
        assert!(
            !envs
                .iter()
                .any(|(name, _)| *name == "PARLEY_OPERATOR_NAMESPACE")
        );
        envs.push(("PARLEY_OPERATOR_NAMESPACE", chat_namespace.to_owned()));
    }
    let mut operator = Process::start("parley-operator", &[], &envs);
    if leader_election {
        operator.wait_for_line("became leader").await;
    }
    operator.wait_for_line("starting controllers").await;

    // The sample is reconciled: status written, routes compiled, every child applied.
    let chats: Api<ChatDeployment> = Api::namespaced(admin.clone(), chat_namespace);
    let status = eventually("the sample's status", || async {
        let chat = chats.get(&chat_name).await.ok()?;
        let status = chat.status?;
        (status.observed_generation == chat.metadata.generation
            && condition(&status.conditions, "RoutesValid").is_some())
        .then_some(status)
    })
    .await;
    let routes_valid = condition(&status.conditions, "RoutesValid").unwrap();
    assert_eq!(
        (routes_valid.status.as_str(), routes_valid.reason.as_str()),
        ("True", "RoutesCompiled"),
        "{status:?}"
    );
    let degraded = condition(&status.conditions, "Degraded").unwrap();
    assert_eq!(degraded.status, "False", "{status:?}");
    let mut aliases: Vec<&str> = status.routes.iter().map(|r| r.alias.as_str()).collect();
    aliases.sort_unstable();
    assert_eq!(aliases, ["default", "fast"]);

    let owned_by_chat = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.owner_references.as_ref().is_some_and(|owners| {
            owners
                .iter()
                .any(|o| o.kind == "ChatDeployment" && o.name == chat_name)
        })
    };
    async fn child<K>(client: &Client, namespace: &str, name: &str) -> K
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        Api::<K>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"))
    }
    let account: ServiceAccount = child(&admin, chat_namespace, &chat_name).await;
    let role: Role = child(&admin, chat_namespace, &chat_name).await;
    let binding: RoleBinding = child(&admin, chat_namespace, &chat_name).await;
    let routes: ConfigMap = child(&admin, chat_namespace, &format!("{chat_name}-routes")).await;
    let service: Service = child(&admin, chat_namespace, &chat_name).await;
    let pods: Deployment = child(&admin, chat_namespace, &chat_name).await;
    for meta in [
        &account.metadata,
        &role.metadata,
        &binding.metadata,
        &routes.metadata,
        &service.metadata,
        &pods.metadata,
    ] {
        assert!(
            owned_by_chat(meta),
            "{:?} is not owned by the sample",
            meta.name
        );
    }
    let routes_yaml = &routes.data.unwrap()["routes.yaml"];
    assert!(routes_yaml.contains("alias: default") && routes_yaml.contains("alias: fast"));
    let container = &pods.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), chat["spec"]["image"].as_str());

    let model_routes: Api<ModelRoute> = Api::namespaced(admin.clone(), chat_namespace);
    for route in model_routes.list(&ListParams::default()).await.unwrap() {
        let route_name = route.name_any();
        eventually(&format!("ModelRoute {route_name} accepted"), || async {
            let route = model_routes.get(&route_name).await.ok()?;
            condition(&route.status?.conditions, "Accepted")
                .is_some_and(|c| c.status == "True")
                .then_some(())
        })
        .await;
    }

    if leader_election {
        let lease = Api::<Lease>::namespaced(admin.clone(), release_namespace)
            .get(parley_operator::leader::LEASE_NAME)
            .await
            .unwrap();
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some("parley-operator-chart-test-0")
        );
    }
    let ready = reqwest::get(format!("http://{listen}/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The identity the operator ran as really is confined to the chart's RBAC.
    let confined = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let secrets = Api::<Secret>::namespaced(confined.clone(), chat_namespace)
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(&secrets, Err(kube::Error::Api(status)) if status.code == 403),
        "the operator must not read Secrets: {secrets:?}"
    );
    if watched.is_some() {
        let everywhere = Api::<ChatDeployment>::all(confined)
            .list(&ListParams::default())
            .await;
        assert!(
            matches!(&everywhere, Err(kube::Error::Api(status)) if status.code == 403),
            "a namespace-scoped operator must not list other namespaces: {everywhere:?}"
        );
    }

    let exit = operator.terminate().await;
    assert!(exit.success(), "parley-operator exited with {exit}");
}

#[tokio::test]
async fn cluster_wide_chart_with_two_replicas_reconciles_its_sample_under_its_own_rbac() {
    let admin = Client::try_from(env::kube_config().await).unwrap();
    let namespace = env::fresh_namespace(&admin, "parley-chart").await;
    let values = json!({"replicas": 2, "sample": {"enabled": true}});
    install_and_reconcile(values, None, &namespace).await;
}

#[tokio::test]
async fn namespace_scoped_chart_reconciles_its_sample_in_the_watched_namespace() {
    let admin = Client::try_from(env::kube_config().await).unwrap();
    let namespace = env::fresh_namespace(&admin, "parley-chart").await;
    let watched = env::fresh_namespace(&admin, "parley-chart-watched").await;
    let values = json!({"watchNamespace": watched, "sample": {"enabled": true}});
    install_and_reconcile(values, Some(&watched), &namespace).await;
}
