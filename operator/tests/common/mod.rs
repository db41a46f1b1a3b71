//! Fixtures shared by the operator's test suites: the example CRs and the test cluster.
#![allow(dead_code)]

pub mod cluster;

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use parley_crds::{ChatDeployment, ModelRoute};

pub fn example<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/examples")
        .join(file);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The example ChatDeployment as the API server would hand it over.
pub fn chat(namespace: &str) -> ChatDeployment {
    let mut chat: ChatDeployment = example("chat-deployment.yaml");
    chat.metadata.namespace = Some(namespace.to_owned());
    chat.metadata.uid = Some("5b1d0c3e-0000-4000-8000-000000000001".to_owned());
    chat.metadata.generation = Some(1);
    chat
}

/// The two example ModelRoutes (`default`, `fast`), created a minute apart.
pub fn routes(namespace: &str) -> Vec<ModelRoute> {
    ["model-route-default.yaml", "model-route-fast.yaml"]
        .iter()
        .enumerate()
        .map(|(index, file)| {
            let mut route: ModelRoute = example(file);
            route.metadata.namespace = Some(namespace.to_owned());
            route.metadata.uid = Some(format!("5b1d0c3e-0000-4000-8000-00000000001{index}"));
            route.metadata.generation = Some(1);
            route.metadata.creation_timestamp = Some(created_at(index));
            route
        })
        .collect()
}

pub fn created_at(minutes: usize) -> Time {
    let seconds = 1_700_000_000 + 60 * i64::try_from(minutes).unwrap();
    Time(Timestamp::from_second(seconds).unwrap())
}
