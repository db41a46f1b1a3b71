//! The Tiltfile, evaluated by a real Starlark interpreter (starlark-go, the
//! one Tilt embeds) with recording stand-ins for Tilt's functions
//! (`tests/tiltfile/evaluate.py`): it refuses any kube context but kind's,
//! builds both images from the cargo-built binaries, applies the CRDs
//! server-side, installs the chart with its sample, and forwards the ports.
//! What Tilt then does with these calls needs Tilt and a kind cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const SERVICE_IMAGE: &str = "ghcr.io/parley-dev/parley-service";
const OPERATOR_IMAGE: &str = "ghcr.io/parley-dev/parley-operator";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every Tilt call of the Tiltfile under `context`, and the error that
/// stopped it (`Value::Null` when it ran to the end).
fn evaluate(context: &str) -> (Vec<Value>, Value) {
    let repo = repo();
    let output = Command::new(parley_test_support::env::python())
        .arg(repo.join("tests/tiltfile/evaluate.py"))
        .arg(repo.join("Tiltfile"))
        .args(["--context", context, "--helm-render"])
        .arg(repo.join("tests/tiltfile/chart-render.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "evaluate.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    (
        result["calls"].as_array().unwrap().clone(),
        result["error"].clone(),
    )
}

fn calls_of<'a>(calls: &'a [Value], function: &str) -> Vec<&'a Value> {
    calls
        .iter()
        .filter(|call| call["function"] == function)
        .collect()
}

/// The one call of `function` whose first argument is `first`.
fn call<'a>(calls: &'a [Value], function: &str, first: &str) -> &'a Value {
    let found: Vec<_> = calls_of(calls, function)
        .into_iter()
        .filter(|call| call["args"][0] == first)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{function}({first:?}, ...) calls: {found:?}"
    );
    found[0]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|item| item.as_str().unwrap())
        .collect()
}

#[test]
fn any_context_but_kind_is_refused_before_anything_is_built_or_applied() {
    for context in ["production", "docker-desktop", "minikube", "kindly-prod"] {
        let (calls, error) = evaluate(context);
        let error = error.as_str().unwrap_or_else(|| {
            panic!("the Tiltfile ran to the end under context {context}: {calls:?}")
        });
        assert!(
            error.contains("runs only against a kind cluster") && error.contains(context),
            "{error}"
        );
        let functions: Vec<&str> = calls
            .iter()
            .map(|call| call["function"].as_str().unwrap())
            .collect();
        assert_eq!(functions, ["k8s_context", "fail"], "under {context}");
    }
}

#[test]
fn under_kind_it_builds_both_images_applies_the_crds_and_installs_the_chart() {
    let (calls, error) = evaluate("kind-parley");
    assert_eq!(error, Value::Null);
    assert_eq!(
        calls_of(&calls, "allow_k8s_contexts")[0]["args"],
        json!(["kind-parley"])
    );

    // The binaries: cargo, through the script that lays out the build
    // context, rebuilt when any source of the two binaries changes.
    let binaries = &call(&calls, "local_resource", "binaries")["kwargs"];
    let context_dir = binaries["cmd"]
        .as_str()
        .unwrap()
        .strip_prefix("scripts/images.sh --profile dev --context-only ")
        .expect("the binaries come from scripts/images.sh --profile dev --context-only DIR");
    let deps = strings(&binaries["deps"]);
    for source in ["Cargo.lock", "crds/src", "operator/src", "service/src"] {
        assert!(deps.contains(&source), "{source} not in {deps:?}");
    }

    // The images: the Dockerfile's targets, from those binaries.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for (image, target) in [(SERVICE_IMAGE, "service"), (OPERATOR_IMAGE, "operator")] {
        let build = call(&calls, "docker_build", image);
        assert_eq!(build["args"][1], context_dir, "{image}");
        assert_eq!(build["kwargs"]["dockerfile"], "Dockerfile");
        assert_eq!(build["kwargs"]["target"], target);
        assert!(
            dockerfile.contains(&format!(" AS {target}\n")),
            "the Dockerfile has no stage {target}"
        );
        assert!(strings(&build["kwargs"]["only"]).contains(&format!("parley-{target}").as_str()));
        assert_eq!(
            build["kwargs"]["build_args"]["VERSION"],
            env!("CARGO_PKG_VERSION")
        );
    }

    // The CRDs: server-side, from the generated file, into this context.
    let crds = &call(&calls, "local_resource", "crds")["kwargs"];
    let apply = crds["cmd"].as_str().unwrap();
    assert!(
        apply.starts_with(
            "kubectl --context kind-parley apply --server-side --field-manager parley-tilt \
             -f crds/generated/crds.yaml"
        ),
        "{apply}"
    );
    assert_eq!(strings(&crds["deps"]), ["crds/generated/crds.yaml"]);

    // The chart: with its sample, on the images built here, and applied.
    let chart = call(&calls, "helm", "charts/parley");
    let values = strings(&chart["kwargs"]["set"]);
    for value in [
        "sample.enabled=true",
        &format!("image.repository={OPERATOR_IMAGE}"),
        &format!("serviceImage.repository={SERVICE_IMAGE}"),
    ] {
        assert!(values.contains(&value), "{value} not in {values:?}");
    }
    let applied: Vec<&Value> = calls_of(&calls, "k8s_yaml")
        .iter()
        .map(|call| &call["args"][0])
        .collect();
    let render = std::fs::read_to_string(repo().join("tests/tiltfile/chart-render.yaml")).unwrap();
    assert!(
        applied.contains(&&json!(render)),
        "the chart is not applied"
    );
    let namespace = format!("name: {}", chart["kwargs"]["namespace"].as_str().unwrap());
    assert!(
        applied
            .iter()
            .any(|yaml| yaml.as_str().unwrap().contains("kind: Namespace")
                && yaml.as_str().unwrap().contains(&namespace)),
        "the chart's namespace is not created"
    );
    let kind = &call(&calls, "k8s_kind", "ChatDeployment")["kwargs"];
    assert_eq!(kind["image_json_path"], "{.spec.image}");

    // The resources, found by kind in the render, with their port-forwards.
    let operator = call(&calls, "k8s_resource", "chart-operator");
    assert_eq!(operator["kwargs"]["port_forwards"], json!(["8081:8081"]));
    let deps = strings(&operator["kwargs"]["resource_deps"]);
    assert!(
        deps.contains(&"binaries") && deps.contains(&"crds"),
        "{deps:?}"
    );
    let objects = strings(&operator["kwargs"]["objects"]);
    for object in [
        "chart-operator:serviceaccount",
        "chart-operator:clusterrole",
        "chart-operator:clusterrolebinding",
    ] {
        assert!(objects.contains(&object), "{object} not in {objects:?}");
    }
    let chat = call(&calls, "k8s_resource", "chart-sample");
    assert_eq!(chat["kwargs"]["port_forwards"], json!(["8080:8080"]));
    assert!(strings(&chat["kwargs"]["resource_deps"]).contains(&"operator"));
    assert_eq!(
        strings(&chat["kwargs"]["objects"]),
        [
            "chart-sample-default:modelroute",
            "chart-sample-fast:modelroute"
        ]
    );
}
