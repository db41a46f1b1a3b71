//! The real test kube-apiserver: clients, CRDs, RBAC, namespaces and an
//! in-process operator scoped to one namespace.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Client, Resource, ResourceExt};
use parley_operator::controller::{self, Reconciled, Settings};
use parley_operator::metrics::Metrics;
use parley_test_support::env::{kube_config, unique_name};
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(60);

/// A client with the kubeconfig's (cluster-admin) identity.
pub async fn admin() -> Client {
    Client::try_from(kube_config().await).unwrap()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap()
}

/// Applies crds/generated and waits until every CRD is Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for document in serde_yaml::Deserializer::from_str(&read("../crds/generated/crds.yaml")) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(document).unwrap();
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("parley-operator-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        wait_for(&crds, &name, conditions::is_crd_established()).await;
    }
}

/// A client that acts as a fresh user holding only operator/rbac/cluster-role.yaml.
pub async fn operator_client(admin: &Client) -> Client {
    let user = unique_name("parley-operator");
    let role: ClusterRole = serde_yaml::from_str(&read("rbac/cluster-role.yaml")).unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            &role.name_any(),
            &PatchParams::apply("parley-operator-test").force(),
            &Patch::Apply(&role),
        )
        .await
        .unwrap();
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(user.clone()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.name_any(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.clone(),
            namespace: None,
        }]),
    };
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let mut config = kube_config().await;
    config.auth_info.impersonate = Some(user);
    Client::try_from(config).unwrap()
}

/// Waits (on a watch, bounded by [`WAIT`]) until `condition` holds for `name`.
pub async fn wait_for<K>(api: &Api<K>, name: &str, condition: impl Condition<K>) -> K
where
    K: Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + 'static,
{
    let found = tokio::time::timeout(WAIT, await_condition(api.clone(), name, condition))
        .await
        .unwrap_or_else(|_| panic!("{name}: condition not reached within {WAIT:?}"))
        .unwrap();
    found.unwrap_or_else(|| panic!("{name} does not exist"))
}

/// The operator's controllers running in this process, scoped to one namespace.
pub struct Operator {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), parley_operator::Error>>,
    pub reconciled: Arc<Reconciled>,
}

impl Operator {
    pub fn start(client: Client, namespace: &str) -> Self {
        Self::start_with(client, namespace, controller::DISCOVERY_INTERVAL)
    }

    /// [`Operator::start`], running API discovery again every `discovery_interval`.
    pub fn start_with(client: Client, namespace: &str, discovery_interval: Duration) -> Self {
        let shutdown = CancellationToken::new();
        let settings = Settings {
            namespace: Some(namespace.to_owned()),
            discovery_interval,
            ..Settings::default()
        };
        let reconciled = settings.reconciled.clone();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(controller::run(
            client,
            settings,
            metrics,
            ready,
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task,
            reconciled,
        }
    }

    /// Waits until each of `keys` (`controller/namespace/name`) was reconciled.
    pub async fn wait_reconciled(&self, keys: &[String]) {
        let mut receiver = self.reconciled.subscribe();
        let done = receiver.wait_for(|counts| keys.iter().all(|key| counts.contains_key(key)));
        tokio::time::timeout(WAIT, done)
            .await
            .unwrap_or_else(|_| panic!("not all of {keys:?} reconciled within {WAIT:?}"))
            .unwrap();
    }

    /// Stops the controllers, letting running reconciliations finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
