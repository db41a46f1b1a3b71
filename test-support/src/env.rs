//! Coordinates of the real servers that `scripts/test-env.sh` starts.
//!
//! A test that needs one of them and does not find it fails with a message
//! naming the command to run; it never skips.

use std::path::PathBuf;

const HOW_TO_START: &str = "run every test with `scripts/test.sh`, or start the servers \
     with `scripts/test-env.sh install && scripts/test-env.sh start .test-env && \
     source .test-env/env`";

const HOW_TO_START_CLUSTER: &str = "run `scripts/test-cluster.sh` (as root): it starts the \
     one-node cluster (scripts/cluster.sh), loads the images into it and starts the test \
     servers on the cluster's bridge";

fn required(var: &str) -> String {
    required_from(var, HOW_TO_START)
}

fn required_from(var: &str, how: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{var} is not set, and this test needs the real server it names: {how}"),
    }
}

/// `mongodb://` URI of the MongoDB-wire server (SecantusDB).
pub fn mongodb_uri() -> String {
    required("PARLEY_TEST_MONGODB_URI")
}

/// `redis://` URL of the Redis server.
pub fn redis_url() -> String {
    required("PARLEY_TEST_REDIS_URL")
}

/// The Python interpreter of the venv holding the pinned test tools
/// (`scripts/requirements-test.txt`).
pub fn python() -> PathBuf {
    PathBuf::from(required("PARLEY_TEST_PYTHON"))
}

/// Kubeconfig of the test kube-apiserver. A variable of its own, never
/// `KUBECONFIG`, so that tests cannot touch a developer's real cluster.
pub fn kubeconfig_path() -> PathBuf {
    PathBuf::from(required("PARLEY_TEST_KUBECONFIG"))
}

/// Client configuration for the test kube-apiserver, with the kubeconfig's
/// (cluster-admin) identity; set `auth_info.impersonate` to act as someone else.
pub async fn kube_config() -> kube::Config {
    kube_config_from(kubeconfig_path()).await
}

async fn kube_config_from(path: PathBuf) -> kube::Config {
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|error| panic!("using {}: {error}", path.display()))
}

/// Kubeconfig (cluster-admin) of the one-node cluster that `scripts/cluster.sh up`
/// starts, whose node runs pods.
pub fn cluster_kubeconfig_path() -> PathBuf {
    PathBuf::from(required_from(
        "PARLEY_CLUSTER_KUBECONFIG",
        HOW_TO_START_CLUSTER,
    ))
}

/// The containerd socket of that cluster, for `ctr`.
pub fn cluster_containerd() -> PathBuf {
    PathBuf::from(required_from(
        "PARLEY_CLUSTER_CONTAINERD",
        HOW_TO_START_CLUSTER,
    ))
}

/// Client configuration for the one-node cluster, as its administrator.
pub async fn cluster_kube_config() -> kube::Config {
    kube_config_from(cluster_kubeconfig_path()).await
}

/// Creates a namespace of its own (named from `prefix`) on the test
/// kube-apiserver; its name.
pub async fn fresh_namespace(client: &kube::Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let name = unique_name(prefix);
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    kube::Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|error| panic!("creating namespace {name}: {error}"));
    name
}

/// A name unique to this test run, for databases, namespaces and key prefixes,
/// so tests sharing one server never see each other's data.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
