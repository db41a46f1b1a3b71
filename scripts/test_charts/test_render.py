"""Both charts rendered and linted offline with Helm as a library, every
rendered object validated against the Kubernetes schemas (custom resources
against their CRDs' schemas), values.schema.json rejecting bad values, and
what the charts must contain (RBAC from the operator's rules file, the CRDs
from crdgen, probes, security context, labels)."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from charts import (
    CHART,
    CRDS_CHART,
    CRDS_VALUE_SETS,
    NAMESPACE,
    REPO,
    STANDARD_LABELS,
    VALUE_SETS,
    WATCHED,
    crd_validators,
    crdgen_output,
    find,
    objects,
    prometheus_operator_validators,
    render_files,
)

# The oldest and newest Kubernetes whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# The chart's own custom resources and the Prometheus operator's.
CUSTOM_KINDS = {"ChatDeployment", "ModelRoute", "ServiceMonitor", "PrometheusRule"}


def all_renders() -> list[tuple[str, list[dict[str, Any]]]]:
    renders = [(f"parley-crds/{n}", objects(CRDS_CHART, v)) for n, v in CRDS_VALUE_SETS.items()]
    renders += [(f"parley/{n}", objects(CHART, v)) for n, v in VALUE_SETS.items()]
    return renders


@pytest.mark.parametrize(
    "chart,values",
    [(CRDS_CHART, v) for v in CRDS_VALUE_SETS.values()] + [(CHART, v) for v in VALUE_SETS.values()],
    ids=[f"parley-crds/{n}" for n in CRDS_VALUE_SETS] + [f"parley/{n}" for n in VALUE_SETS],
)
def test_strict_lint_passes(chart, values):
    for kube_version in ("v1.20.0", "v1.31.0"):
        report = helm.lint(chart, values, strict=True, namespace=NAMESPACE, kube_version=kube_version)
        # Severity 2 is a warning, 3 an error; strict lint fails on both.
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{chart.name} on {kube_version}: {problems}"


@pytest.mark.parametrize("name,objs", all_renders(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_object_is_valid_for_its_schema(name, objs):
    assert objs, f"{name} renders nothing"
    kinds = {o["kind"] for o in objs}
    for obj in objs:
        where = f"{name}: {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in ("ChatDeployment", "ModelRoute"):
            errors = [e.message for e in crd_validators()[obj["kind"]].iter_errors(obj)]
            assert not errors, f"{where} against its CRD: {errors}"
            continue
        if obj["kind"] in ("ServiceMonitor", "PrometheusRule"):
            errors = [e.message for e in prometheus_operator_validators()[obj["kind"]].iter_errors(obj)]
            assert not errors, f"{where} against the prometheus-operator schema: {errors}"
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                pytest.fail(f"{where}: no Kubernetes {version} schema for this kind")
    assert kinds <= CUSTOM_KINDS | {
        "CustomResourceDefinition", "Deployment", "ServiceAccount", "Service", "ClusterRole",
        "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "Secret",
    }, kinds


def test_custom_resource_checks_catch_mistakes():
    """The custom-resource validators are not vacuous."""
    objs = objects(CHART, VALUE_SETS["everything"])
    (chat,) = find(objs, "ChatDeployment")
    bad = copy.deepcopy(chat)
    bad["spec"]["replicas"]["min"] = 0
    assert not crd_validators()["ChatDeployment"].is_valid(bad)
    (monitor,) = find(objs, "ServiceMonitor")
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    assert not prometheus_operator_validators()["ServiceMonitor"].is_valid(bad)
    (rule,) = find(objs, "PrometheusRule")
    bad = copy.deepcopy(rule)
    del bad["spec"]["groups"][0]["rules"][0]["expr"]
    assert not prometheus_operator_validators()["PrometheusRule"].is_valid(bad)
    deployment = find(objs, "Deployment")[0]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name,objs", all_renders(), ids=lambda x: x if isinstance(x, str) else "")
def test_standard_labels_on_every_object_and_pod(name, objs):
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{name}: {obj['kind']} {obj['metadata']['name']} lacks {missing}"
        template = obj.get("spec", {}).get("template") if obj["kind"] == "Deployment" else None
        if template:
            missing = [label for label in STANDARD_LABELS if label not in template["metadata"]["labels"]]
            assert not missing, f"{name}: pods of {obj['metadata']['name']} lack {missing}"


# --- parley-crds ---------------------------------------------------------


def without_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = copy.deepcopy(crd)
    crd["metadata"].pop("labels", None)
    crd["metadata"].pop("annotations", None)
    return crd


def test_crds_chart_renders_exactly_what_crdgen_prints_now():
    generated = [doc for doc in yaml.safe_load_all(crdgen_output()) if doc]
    rendered = objects(CRDS_CHART, {})
    assert [without_chart_metadata(crd) for crd in rendered] == generated
    # And the committed file the chart links to is that output, byte for byte.
    assert (CRDS_CHART / "files/crds.yaml").read_text() == crdgen_output()


def test_crds_are_kept_on_uninstall_unless_asked_and_upgraded_as_templates():
    for crd in objects(CRDS_CHART, {}):
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    for crd in objects(CRDS_CHART, {"keepOnUninstall": False}):
        assert "annotations" not in crd["metadata"]
    # Helm never upgrades crds/; the CRDs must be templates.
    with helm.Chart.load(CRDS_CHART) as chart:
        assert chart.crds == []


# --- parley: the operator --------------------------------------------------


def operator_deployment(values):
    (deployment,) = find(objects(CHART, values), "Deployment")
    return deployment


def env_of(deployment) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_deployment_defaults():
    deployment = operator_deployment({})
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/parley-dev/parley-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8081, "protocol": "TCP"}]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = env_of(deployment)
    assert env["PARLEY_OPERATOR_LISTEN"] == "0.0.0.0:8081"
    assert env["PARLEY_OPERATOR_LEADER_ELECTION"] == "false"
    assert "PARLEY_OPERATOR_NAMESPACE" not in env
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_image_values_and_two_replicas_turn_on_leader_election():
    values = {"replicas": 2, "image": {"repository": "registry.local/op", "tag": "dev", "pullPolicy": "Never"}}
    deployment = operator_deployment(values)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == ("registry.local/op:dev", "Never")
    assert deployment["spec"]["replicas"] == 2
    assert env_of(deployment)["PARLEY_OPERATOR_LEADER_ELECTION"] == "true"
    assert env_of(operator_deployment({"leaderElection": True}))["PARLEY_OPERATOR_LEADER_ELECTION"] == "true"


def rules_file() -> list[dict[str, Any]]:
    return yaml.safe_load((REPO / "operator/rbac/cluster-role.yaml").read_text())["rules"]


def as_set(rules) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_cluster_rbac_is_the_operator_rules_file():
    objs = objects(CHART, {"replicas": 2})
    (cluster_role,) = find(objs, "ClusterRole")
    (lease_role,) = find(objs, "Role")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert as_set(cluster_role["rules"]) | as_set(lease_role["rules"]) == as_set(rules_file())
    assert {g for g, _, _ in as_set(lease_role["rules"])} == {"coordination.k8s.io"}
    (binding,) = find(objs, "ClusterRoleBinding")
    (account,) = find(objs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    # One replica without leader election needs no Lease rights at all.
    single = objects(CHART, {})
    assert find(single, "Role") == [] and find(single, "RoleBinding") == []
    (cluster_role,) = find(single, "ClusterRole")
    assert "coordination.k8s.io" not in {g for g, _, _ in as_set(cluster_role["rules"])}


def test_namespaced_mode_grants_a_role_in_the_watched_namespace_only():
    objs = objects(CHART, VALUE_SETS["namespaced"])
    assert find(objs, "ClusterRole") == [] and find(objs, "ClusterRoleBinding") == []
    roles = {r["metadata"]["namespace"]: r for r in find(objs, "Role")}
    assert set(roles) == {WATCHED, NAMESPACE}
    assert as_set(roles[WATCHED]["rules"]) | as_set(roles[NAMESPACE]["rules"]) == as_set(rules_file())
    bindings = {b["metadata"]["namespace"]: b for b in find(objs, "RoleBinding")}
    assert bindings[WATCHED]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[WATCHED]["metadata"]["name"]}
    assert bindings[WATCHED]["subjects"][0]["namespace"] == NAMESPACE
    assert env_of(find(objs, "Deployment")[0])["PARLEY_OPERATOR_NAMESPACE"] == WATCHED
    # The sample goes where the operator looks.
    (chat,) = find(objs, "ChatDeployment")
    assert chat["metadata"]["namespace"] == WATCHED


def test_metrics_service_selects_the_operator_pods():
    objs = objects(CHART, VALUE_SETS["everything"])
    (service,) = find(objs, "Service")
    deployment = find(objs, "Deployment")[0]
    selector = service["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    (monitor,) = find(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_opt_ins_are_off_by_default():
    kinds = sorted(o["kind"] for o in objects(CHART, {}))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]


def test_prometheus_adapter_rule_serves_active_streams_as_a_pods_metric():
    objs = objects(CHART, VALUE_SETS["everything"])
    (config_map,) = [c for c in find(objs, "ConfigMap") if "config.yaml" in c["data"]]
    assert config_map["metadata"]["namespace"] == "monitoring"
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # The name the ChatDeployment's HorizontalPodAutoscaler asks for (operator/src/build.rs).
    build = (REPO / "operator/src/build.rs").read_text()
    assert 'name: "parley_active_streams".to_owned()' in build
    assert rule["name"]["as"] == "parley_active_streams"
    assert rule["seriesQuery"].startswith("parley_active_streams{")
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_dashboards_are_sidecar_config_maps():
    objs = objects(CHART, VALUE_SETS["everything"])
    boards = [c for c in find(objs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(k for c in boards for k in c["data"]) == ["parley-operator.json", "parley-service.json"]
    for board in boards:
        assert board["metadata"]["annotations"] == {"grafana_folder": "Parley"}
        (text,) = board["data"].values()
        assert text == (CHART / "dashboards" / next(iter(board["data"]))).read_text().rstrip("\n")


def test_sample_is_a_chat_deployment_with_routes_on_the_simulated_model():
    objs = objects(CHART, VALUE_SETS["everything"])
    (chat,) = find(objs, "ChatDeployment")
    routes = find(objs, "ModelRoute")
    (secret,) = find(objs, "Secret")
    assert chat["spec"]["image"] == "ghcr.io/parley-dev/parley-service:0.1.0"
    assert chat["spec"]["auth"]["jwtSecretRef"] == {"name": secret["metadata"]["name"], "key": "secret"}
    assert "embedded" in chat["spec"]["storage"] and chat["spec"]["replicas"] == {"min": 1, "max": 1}
    selector = chat["spec"]["routeSelector"]["matchLabels"]
    assert all(selector.items() <= r["metadata"]["labels"].items() for r in routes)
    assert sorted(r["spec"]["alias"] for r in routes) == ["default", "fast"]
    assert chat["spec"]["defaultRoute"] == "default"
    assert {t["provider"] for r in routes for t in r["spec"]["targets"]} == {"simulated"}
    image = objects(CHART, {"sample": {"enabled": True}, "serviceImage": {"repository": "localhost/svc", "tag": "dev"}})
    assert find(image, "ChatDeployment")[0]["spec"]["image"] == "localhost/svc:dev"
    given = objects(CHART, {"sample": {"enabled": True, "jwtSecret": "x" * 32}})
    assert find(given, "Secret")[0]["data"]["secret"] == "eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHg="


def test_notes_tell_the_next_commands():
    notes = render_files(CHART, VALUE_SETS["everything"])["parley/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/parley" in notes
    assert "port-forward service/parley-sample 8080:80" in notes
    assert "parley-service token --sub alice" in notes
    notes = render_files(CHART, {})["parley/templates/NOTES.txt"]
    assert "--set sample.enabled=true" in notes
    # Offline there is no cluster to find the CRDs in: the notes say so.
    assert "helm install parley-crds" in notes


# --- values.schema.json --------------------------------------------------

BAD_VALUES = {
    "zero replicas": {"replicas": 0},
    "replicas as text": {"replicas": "two"},
    "unknown pull policy": {"image": {"repository": "r", "pullPolicy": "Sometimes"}},
    "empty image repository": {"image": {"repository": ""}},
    "misspelt top-level key": {"replica": 2},
    "misspelt nested key": {"sample": {"enable": True}},
    "invalid namespace": {"watchNamespace": "Team_A"},
    "short sample secret": {"sample": {"enabled": True, "jwtSecret": "too-short"}},
    "negative alert threshold": {"prometheusRule": {"alerts": {"fallbackStorm": {"enabled": True, "threshold": -1, "for": "5m", "severity": "page"}}}},
    "unknown severity": {"prometheusRule": {"alerts": {"reaperBacklog": {"enabled": True, "threshold": 1, "for": "5m", "severity": "urgent"}}}},
    "bad duration": {"serviceMonitor": {"interval": "30 seconds"}},
    "privileged port": {"metrics": {"port": 80}},
    "bad quantity": {"resources": {"requests": {"cpu": "lots"}}},
    "enabled as text": {"dashboards": {"enabled": "yes"}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_schema_rejects_bad_values_at_install(values):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.render(values, name="parley", namespace=NAMESPACE, is_install=True)


def test_crds_values_schema_rejects_bad_values():
    with helm.Chart.load(CRDS_CHART) as chart:
        for values in ({"keepOnUninstall": "no"}, {"keep": True}):
            with pytest.raises(helm.HelmValuesError):
                chart.render(values, name="parley-crds", namespace=NAMESPACE, is_install=True)
