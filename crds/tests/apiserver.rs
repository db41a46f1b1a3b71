//! The generated CRDs against the real kube-apiserver: they install, become
//! Established, accept the examples (applying schema defaults, the service
//! image among them) and reject a schema-invalid resource with 422.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use parley_crds::{ChatDeployment, FallbackCondition, ModelRoute};
use parley_test_support::env::{fresh_namespace, kube_config};

async fn client() -> Client {
    Client::try_from(kube_config().await).unwrap()
}

fn example<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Applies the committed CRDs (what users install) and waits until each is Established.
async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("generated/crds.yaml"))
            .unwrap();
    for document in serde_yaml::Deserializer::from_str(&committed) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(document).unwrap();
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("parley-crds-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
            .unwrap();
    }
}

#[tokio::test]
async fn examples_round_trip_through_the_apiserver() {
    let client = client().await;
    install_crds(&client).await;
    let namespace = fresh_namespace(&client, "crds").await;

    let chats: Api<ChatDeployment> = Api::namespaced(client.clone(), &namespace);
    let chat: ChatDeployment = example("chat-deployment.yaml");
    chats.create(&PostParams::default(), &chat).await.unwrap();
    let stored = chats.get("demo").await.unwrap();
    assert_eq!(stored.spec, chat.spec);

    // A ChatDeployment that names no image runs this release's service image:
    // the server stores the schema's default.
    let imageless = serde_json::json!({
        "apiVersion": "parley.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": "imageless"},
        "spec": {"storage": {"embedded": {}}}
    });
    let created = dynamic::<ChatDeployment>(&client, &namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(imageless).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        created.data["spec"]["image"],
        parley_crds::DEFAULT_SERVICE_IMAGE
    );

    let routes: Api<ModelRoute> = Api::namespaced(client.clone(), &namespace);
    for file in ["model-route-default.yaml", "model-route-fast.yaml"] {
        let route: ModelRoute = example(file);
        routes.create(&PostParams::default(), &route).await.unwrap();
        let stored = routes.get(&route.name_any()).await.unwrap();
        assert_eq!(stored.spec, route.spec, "{file}");
    }

    // Fields the example omits get the schema's defaults from the server, so
    // the operator and kubectl users see the same values the types assume.
    let mut sparse = serde_json::json!({
        "apiVersion": "parley.dev/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": "sparse"},
        "spec": {"alias": "sparse", "targets": [{
            "provider": "simulated", "model": "sim",
            "pricing": {"inputPer1k": 0.5, "outputPer1k": 1}, "maxOutputTokens": 16}]}
    });
    let dynamic = dynamic::<ModelRoute>(&client, &namespace);
    let created = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(sparse.clone()).unwrap(),
        )
        .await
        .unwrap();
    let typed: ModelRoute = serde_json::from_value(serde_json::to_value(created).unwrap()).unwrap();
    assert_eq!(
        typed.spec.fallback_on,
        [
            FallbackCondition::Throttled,
            FallbackCondition::Unavailable,
            FallbackCondition::Timeout
        ]
    );
    assert_eq!(typed.spec.allowed_roles.len(), 3);
    assert_eq!(typed.spec.targets[0].timeout_seconds, 60);

    // Schema-invalid: an unknown provider is refused with 422 Unprocessable Entity.
    sparse["metadata"]["name"] = "invalid".into();
    sparse["spec"]["targets"][0]["provider"] = "gemini".into();
    let refused = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(sparse).unwrap(),
        )
        .await
        .unwrap_err();
    match refused {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("gemini"), "{}", status.message);
        }
        other => panic!("expected a 422 from the apiserver, got {other}"),
    }
}

/// Custom resources of kind `K` as plain JSON, so that a test sees exactly
/// what the server stored (typed reads would fill in serde's defaults).
fn dynamic<K: kube::Resource<DynamicType = ()>>(
    client: &Client,
    namespace: &str,
) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<K>(&());
    Api::namespaced_with(client.clone(), namespace, &resource)
}
