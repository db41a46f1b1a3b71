//! What the operator deploys is what the service reads: every environment
//! variable the operator sets is one the service declares, and the real
//! binary, holding only the RBAC the operator grants, reads and watches its
//! routes ConfigMap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use clap::CommandFactory;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::config::Kubeconfig;
use kube::{Api, Client, Resource};
use parley_crds::{AccountingMode, ChatDeployment, ModelRoute, ROUTES_CONFIGMAP_KEY, SecretRef};
use parley_e2e::{Process, logged_address};
use parley_operator::build::{Capabilities, Desired, build};
use parley_operator::routes::compile;
use parley_service::auth::{Principal, Role, mint_token};
use parley_test_support::env::{kube_config, kubeconfig_path, unique_name};
use serde_json::Value;

/// Read by the AWS SDK's standard chain, not by the service's own flags.
const READ_BY_THE_AWS_CHAIN: [&str; 4] = [
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];
/// Upper bound for the service to see a ConfigMap change; a bound, not a wait.
const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "operator-contract-test-secret";

fn example<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/examples")
        .join(file);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The example ChatDeployment as the API server would hand it over.
fn example_chat(namespace: &str) -> ChatDeployment {
    let mut chat: ChatDeployment = example("chat-deployment.yaml");
    chat.metadata.namespace = Some(namespace.to_owned());
    chat.metadata.uid = Some("5b1d0c3e-0000-4000-8000-000000000001".to_owned());
    chat
}

/// What the operator builds for `chat` and the example ModelRoutes.
fn desired(chat: &ChatDeployment) -> Desired {
    let namespace = chat.metadata.namespace.clone();
    let routes: Vec<ModelRoute> = ["model-route-default.yaml", "model-route-fast.yaml"]
        .into_iter()
        .map(|file| {
            let mut route: ModelRoute = example(file);
            route.metadata.namespace.clone_from(&namespace);
            route
        })
        .collect();
    let selected: Vec<&ModelRoute> = routes.iter().collect();
    build(chat, &compile(chat, &selected), Capabilities::CURRENT).unwrap()
}

fn container(desired: &Desired) -> &Container {
    &desired
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

/// Names of the variables the service's command line declares.
fn declared_by_the_service() -> BTreeSet<String> {
    parley_service::config::Cli::command()
        .get_arguments()
        .filter_map(|argument| argument.get_env())
        .map(|name| name.to_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_variable_the_operator_sets_is_read_by_the_service() {
    let declared = declared_by_the_service();
    // The example, and the example with every optional setting the operator
    // turns into a variable.
    let plain = example_chat("team-a");
    let mut everything = plain.clone();
    let spec = &mut everything.spec;
    spec.auth.jwks_url = Some("https://auth.example.edu/jwks".to_owned());
    spec.accounting.mode = AccountingMode::External;
    spec.accounting.external_url = Some("http://accounting:8080".to_owned());
    let bedrock = spec.providers.bedrock.as_mut().unwrap();
    bedrock.endpoint_url = Some("http://bedrock.local".to_owned());
    bedrock.credentials_secret_ref = Some(SecretRef {
        name: "aws".to_owned(),
    });
    let mut set = BTreeSet::new();
    for chat in [&plain, &everything] {
        let desired = desired(chat);
        for var in container(&desired).env.as_ref().unwrap() {
            set.insert(var.name.clone());
        }
    }
    for expected in [
        "PARLEY_JWKS_URL",
        "PARLEY_ACCOUNTING_URL",
        "AWS_ACCESS_KEY_ID",
    ] {
        assert!(set.contains(expected), "{expected} is not set: {set:?}");
    }
    let unread: Vec<&String> = set
        .iter()
        .filter(|name| !declared.contains(*name) && !READ_BY_THE_AWS_CHAIN.contains(&name.as_str()))
        .collect();
    assert!(
        unread.is_empty(),
        "the operator sets {unread:?}, which the service does not read"
    );
}

/// A kubeconfig for the test kube-apiserver acting as `user`.
fn kubeconfig_acting_as(user: &str, dir: &Path) -> std::path::PathBuf {
    let mut kubeconfig = Kubeconfig::read_from(kubeconfig_path()).unwrap();
    for named in &mut kubeconfig.auth_infos {
        named.auth_info.as_mut().unwrap().impersonate = Some(user.to_owned());
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

async fn create<K>(client: &Client, namespace: &str, object: &K)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), object)
        .await
        .unwrap();
}

/// Aliases of the routes an admin may use, as the service lists them.
async fn aliases(base: &str, token: &str) -> Vec<String> {
    let response = reqwest::Client::new()
        .get(format!("{base}/api/models"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["alias"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_service_watches_its_routes_configmap_with_only_the_operators_rbac() {
    let admin = Client::try_from(kube_config().await).unwrap();
    let namespace = unique_name("contract");
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let desired = desired(&example_chat(&namespace));
    create(&admin, &namespace, &desired.service_account).await;
    create(&admin, &namespace, &desired.role).await;
    create(&admin, &namespace, &desired.role_binding).await;
    create(&admin, &namespace, &desired.routes).await;

    // The chat pods' identity: the RBAC really applies to it.
    let service_account = format!(
        "system:serviceaccount:{namespace}:{}",
        desired.service_account.metadata.name.as_deref().unwrap()
    );
    let mut as_service_account = kube_config().await;
    as_service_account.auth_info.impersonate = Some(service_account.clone());
    let listed =
        Api::<ConfigMap>::namespaced(Client::try_from(as_service_account).unwrap(), &namespace)
            .list(&ListParams::default())
            .await;
    assert!(
        matches!(&listed, Err(kube::Error::Api(status)) if status.code == 403),
        "the service account may list every ConfigMap: {listed:?}"
    );

    // The binary with the routes variables of the operator's Deployment.
    let env = container(&desired).env.clone().unwrap();
    let configmap_name = env
        .iter()
        .find(|var| var.name == "PARLEY_ROUTES_CONFIGMAP")
        .and_then(|var| var.value.clone())
        .unwrap();
    let namespace_source = env
        .iter()
        .find(|var| var.name == "POD_NAMESPACE")
        .and_then(|var| var.value_from.as_ref()?.field_ref.as_ref())
        .unwrap();
    assert_eq!(namespace_source.field_path, "metadata.namespace");
    let dir = tempfile::tempdir().unwrap();
    let mut service = Process::start(
        "parley-service",
        &[],
        &[
            ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
            ("PARLEY_DATA_DIR", dir.path().display().to_string()),
            ("PARLEY_JWT_SECRET", SECRET.to_owned()),
            // The test polls /api/models.
            ("PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE", "0".to_owned()),
            (
                "KUBECONFIG",
                kubeconfig_acting_as(&service_account, dir.path())
                    .display()
                    .to_string(),
            ),
            ("PARLEY_ROUTES_CONFIGMAP", configmap_name.clone()),
            ("POD_NAMESPACE", namespace.clone()),
        ],
    );
    let serving = service.wait_for_line("\"serving\"").await;
    let base = format!("http://{}", logged_address(&serving));
    let admin_token = mint_token(
        SECRET.as_bytes(),
        &Principal {
            sub: "root".to_owned(),
            role: Role::Admin,
            cohorts: Vec::new(),
        },
        Duration::from_secs(600),
        None,
        None,
    )
    .unwrap();
    assert_eq!(aliases(&base, &admin_token).await, ["default", "fast"]);

    // A route edit reaches the running service through the watch.
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), &namespace);
    let mut configmap = configmaps.get(&configmap_name).await.unwrap();
    let document = configmap
        .data
        .as_mut()
        .unwrap()
        .get_mut(ROUTES_CONFIGMAP_KEY)
        .unwrap();
    *document = document.replace("alias: fast", "alias: quick");
    configmaps
        .replace(&configmap_name, &PostParams::default(), &configmap)
        .await
        .unwrap();
    let changed = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if aliases(&base, &admin_token).await == ["default", "quick"] {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, changed)
        .await
        .unwrap_or_else(|_| panic!("the edited routes did not reach the service within {WAIT:?}"));

    let status = service.terminate().await;
    assert!(status.success(), "parley-service exited with {status}");
}
