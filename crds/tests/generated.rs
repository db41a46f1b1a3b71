//! The committed CRD YAML is current, and the example custom resources are
//! valid against the CRDs' schemas (and invalid documents are not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use parley_crds::{ChatDeployment, ModelRoute, RouteLimits, RoutesFile, Storage};
use serde_json::Value;

fn crate_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(crate_path(relative))
        .unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
}

fn yaml_value(relative: &str) -> Value {
    serde_yaml::from_str(&read(relative)).unwrap()
}

/// The `openAPIV3Schema` of the committed CRD for `kind`.
fn committed_schema(kind: &str) -> Value {
    let committed = read("generated/crds.yaml");
    for document in serde_yaml::Deserializer::from_str(&committed) {
        let crd: Value = serde::Deserialize::deserialize(document).unwrap();
        if crd["spec"]["names"]["kind"] == kind {
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        }
    }
    panic!("no CRD for {kind} in crds/generated/crds.yaml");
}

fn validator(kind: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&committed_schema(kind)).unwrap()
}

fn schema_errors(validator: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    validator
        .iter_errors(doc)
        .map(|err| format!("{} at {}", err, err.instance_path))
        .collect()
}

#[test]
fn committed_crds_match_the_code() {
    let generated = parley_crds::crds_yaml().unwrap();
    let committed = read("generated/crds.yaml");
    assert!(
        generated == committed,
        "crds/generated/crds.yaml is stale; regenerate it with \
         `cargo run -p parley-crds --bin crdgen > crds/generated/crds.yaml`"
    );
}

#[test]
fn crds_have_status_printer_columns_and_short_names() {
    for crd in parley_crds::crds() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, "parley.dev");
        assert_eq!(version.name, "v1alpha1");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        assert!(
            !version
                .additional_printer_columns
                .as_ref()
                .unwrap()
                .is_empty()
        );
        let short_names = crd.spec.names.short_names.clone().unwrap();
        let expected = match crd.spec.names.kind.as_str() {
            "ChatDeployment" => ["chatdep", "cd"],
            "ModelRoute" => ["mroute", "mr"],
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(short_names, expected);
    }
}

#[test]
fn examples_are_valid_against_the_schema_and_the_types() {
    let chat = validator("ChatDeployment");
    let doc = yaml_value("examples/chat-deployment.yaml");
    assert_eq!(schema_errors(&chat, &doc), Vec::<String>::new());
    let typed: ChatDeployment = serde_json::from_value(doc).unwrap();
    assert!(matches!(
        typed.spec.storage.chosen(),
        Some(Storage::Mongodb(_))
    ));
    assert_eq!(typed.spec.replicas.max, 10);
    let cohort_policies = typed.spec.cohort_policies.clone();
    assert_eq!(cohort_policies[0].rules.len(), 2);
    // The example names no image: it runs this release's.
    assert_eq!(typed.spec.image, parley_crds::DEFAULT_SERVICE_IMAGE);
    assert_eq!(
        committed_schema("ChatDeployment")["properties"]["spec"]["properties"]["image"]["default"],
        parley_crds::DEFAULT_SERVICE_IMAGE
    );

    let route = validator("ModelRoute");
    let mut specs = Vec::new();
    for file in [
        "examples/model-route-default.yaml",
        "examples/model-route-fast.yaml",
    ] {
        let doc = yaml_value(file);
        assert_eq!(schema_errors(&route, &doc), Vec::<String>::new(), "{file}");
        let typed: ModelRoute = serde_json::from_value(doc).unwrap();
        typed.spec.validate().unwrap();
        specs.push(typed.spec);
    }
    assert_eq!(
        specs[1].limits,
        Some(RouteLimits {
            requests_per_minute: 30,
            tokens_per_minute: 0,
            concurrent_streams: 2,
        })
    );
    let providers: Vec<&str> = specs[0].providers().map(|p| p.as_str()).collect();
    assert_eq!(providers, ["bedrock", "openai", "simulated"]);
    assert_eq!(specs[0].content_policy.as_ref().unwrap().rules.len(), 3);
    RoutesFile {
        default_route: Some("default".into()),
        routes: specs,
        cohort_policies,
    }
    .validate()
    .unwrap();
}

/// What is wrong with a document, and how to make it so.
type Mutation = (&'static str, fn(&mut Value));

#[test]
fn schema_rejects_invalid_documents() {
    let route = validator("ModelRoute");
    let base = yaml_value("examples/model-route-default.yaml");
    let mutations: [Mutation; 10] = [
        ("unknown provider", |d| {
            d["spec"]["targets"][0]["provider"] = "gemini".into()
        }),
        ("negative price", |d| {
            d["spec"]["targets"][0]["pricing"]["inputPer1k"] = (-1).into()
        }),
        ("empty chain", |d| {
            d["spec"]["targets"] = serde_json::json!([])
        }),
        ("zero max output tokens", |d| {
            d["spec"]["targets"][1]["maxOutputTokens"] = 0.into()
        }),
        ("bad alias", |d| d["spec"]["alias"] = "Not An Alias".into()),
        ("unknown role", |d| {
            d["spec"]["allowedRoles"] = serde_json::json!(["root"])
        }),
        ("missing model", |d| {
            d["spec"]["targets"][0]
                .as_object_mut()
                .unwrap()
                .remove("model");
        }),
        ("unknown rule action", |d| {
            d["spec"]["contentPolicy"]["rules"][0]["action"] = "warn".into()
        }),
        ("bad rule name", |d| {
            d["spec"]["contentPolicy"]["rules"][0]["name"] = "No Spaces".into()
        }),
        ("zero breaker threshold", |d| {
            d["spec"]["targets"][0]["circuitBreaker"]["failureThreshold"] = 0.into()
        }),
    ];
    for (what, mutate) in mutations {
        let mut doc = base.clone();
        mutate(&mut doc);
        assert!(
            !route.is_valid(&doc),
            "schema accepted a ModelRoute with {what}"
        );
    }

    let chat = validator("ChatDeployment");
    let base = yaml_value("examples/chat-deployment.yaml");
    let mutations: [Mutation; 6] = [
        ("empty image", |d| d["spec"]["image"] = "".into()),
        ("zero min replicas", |d| {
            d["spec"]["replicas"]["min"] = 0.into()
        }),
        ("no storage", |d| {
            d["spec"].as_object_mut().unwrap().remove("storage");
        }),
        ("two storages", |d| {
            d["spec"]["storage"]["embedded"] = serde_json::json!({})
        }),
        ("unknown accounting mode", |d| {
            d["spec"]["accounting"]["mode"] = "free".into()
        }),
        ("cpu target over 100", |d| {
            d["spec"]["autoscaling"]["targetCpuUtilizationPercentage"] = 150.into()
        }),
    ];
    for (what, mutate) in mutations {
        let mut doc = base.clone();
        mutate(&mut doc);
        assert!(
            !chat.is_valid(&doc),
            "schema accepted a ChatDeployment with {what}"
        );
    }
}
