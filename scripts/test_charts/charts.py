"""Shared by the chart tests: rendering both charts with Helm as a library,
the value sets every test covers, and the schemas rendered objects are
checked against."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
CRDS_CHART = CHARTS / "parley-crds"
CHART = CHARTS / "parley"
RELEASE = "parley"
NAMESPACE = "parley-system"
WATCHED = "team-a"

# Every value set the charts are rendered, linted and validated with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "replicas": 2,
        "sample": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
        "prometheusAdapter": {"enabled": True, "namespace": "monitoring"},
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "Parley"}},
    },
    "namespaced": {
        "watchNamespace": WATCHED,
        "leaderElection": True,
        "sample": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
}

CRDS_VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "not-kept": {"keepOnUninstall": False},
}

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)


def render_files(
    chart: Path, values: dict[str, Any] | None, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path to rendered text, as `helm install` would render it."""
    return dict(_render(chart, json.dumps(values, sort_keys=True), release, namespace))


@functools.cache
def _render(chart: Path, values: str, release: str, namespace: str) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(json.loads(values), name=release, namespace=namespace, is_install=True)
    return tuple(sorted(rendered.items()))


def objects(
    chart: Path, values: dict[str, Any] | None, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders."""
    found = []
    for path, text in sorted(render_files(chart, values, release, namespace).items()):
        if path.endswith(".yaml"):
            found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


@functools.cache
def crdgen_output() -> str:
    """What crdgen prints now: the CRDs of the code, not a committed copy."""
    result = subprocess.run(
        ["cargo", "run", "--quiet", "-p", "parley-crds", "--bin", "crdgen"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    return result.stdout


@functools.cache
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    """Kind to a validator of the CRD's own openAPIV3Schema."""
    validators = {}
    for crd in yaml.safe_load_all(crdgen_output()):
        if not crd:
            continue
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def _no_unknown_fields(node: Any) -> Any:
    """Closes every object schema that lists its properties, so a misspelt
    field fails instead of being ignored (as the API server prunes it)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _no_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            _no_unknown_fields(value)
    return node


@functools.cache
def prometheus_operator_validators() -> dict[str, jsonschema.protocols.Validator]:
    """ServiceMonitor and PrometheusRule against the prometheus-operator
    CRDs' schemas (as generated into cloudcoil's models, v0.80)."""
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    return {
        model.__name__: jsonschema.Draft202012Validator(
            _no_unknown_fields(model.model_json_schema(by_alias=True, mode="validation"))
        )
        for model in (ServiceMonitor, PrometheusRule)
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards shipped in the chart, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) of every target."""
    found = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((name, panel["title"], target["expr"]))
    return found


def alert_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered PrometheusRule's rules."""
    merged = {"prometheusRule": {"enabled": True}} | (values or {})
    (rule,) = find(objects(CHART, merged), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def promql(expr: str, namespace: str = ".*", rate_interval: str = "1m") -> str:
    """A dashboard expression with Grafana's variables filled in, as
    Grafana sends it to Prometheus."""
    return expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace)


def tool(name: str) -> str:
    """Path of a program the tests need; fails naming what installs it."""
    import shutil

    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not installed: scripts/test-charts.sh installs it "
            "(apt-get install --no-install-recommends prometheus)"
        )
    return path


def signal_and_threshold(expr: str) -> tuple[str, float]:
    """Splits an alert expression `<signal> > <threshold>` (the chart's shape)."""
    import re

    match = re.fullmatch(r"(?s)(.*\S)\s*>\s*([0-9.eE+-]+)\s*", expr)
    assert match, f"alert expression is not `<signal> > <threshold>`: {expr}"
    return match.group(1), float(match.group(2))
