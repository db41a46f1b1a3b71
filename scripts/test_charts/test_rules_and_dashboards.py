"""The alert rules and dashboards offline: promtool parses every
expression, promtool's rule unit tests fire each alert on its condition
(with the description it will carry) and on nothing else, and the
dashboards are structurally valid Grafana JSON. (There is no Grafana
package to load them into; the structure checked here is what Grafana's
dashboard model and the sidecar need.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from charts import alert_rules, dashboard_queries, dashboards, promql, signal_and_threshold, tool


def promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def write_rules(path: Path, rules: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"groups": [{"name": "parley", "rules": rules}]}, sort_keys=False))


def test_alert_rules_pass_promtool_check(tmp_path):
    rules = alert_rules()
    assert len(rules) == 9
    write_rules(tmp_path / "rules.yaml", rules)
    promtool("check", "rules", "rules.yaml", cwd=tmp_path)


def test_every_alert_is_a_signal_above_a_threshold_from_values():
    values = {"prometheusRule": {"enabled": True, "alerts": {"fallbackStorm": {"enabled": True, "threshold": 0.4, "for": "3m", "severity": "warning"}}}}
    rules = {r["alert"]: r for r in alert_rules(values)}
    _, threshold = signal_and_threshold(rules["ParleyFallbackStorm"]["expr"])
    assert threshold == 0.4
    assert rules["ParleyFallbackStorm"]["for"] == "3m"
    assert rules["ParleyFallbackStorm"]["labels"] == {"severity": "warning"}
    for rule in rules.values():
        signal_and_threshold(rule["expr"])
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    off = {"prometheusRule": {"enabled": True, "alerts": {"reaperBacklog": {"enabled": False, "threshold": 1, "for": "1m", "severity": "page"}}}}
    assert "ParleyReaperBacklog" not in {r["alert"] for r in alert_rules(off)}


# Per alert: series that make it fire (for long enough), when to look, the
# labels it carries and what its description's placeholders become.
FIRING = {
    "ParleyLedgerFailingClosed": {
        "series": {'parley_ledger_denials_total{namespace="chat",reason="ledger_unavailable"}': "0+60x30",
                   'parley_ledger_denials_total{namespace="quiet",reason="insufficient_credits"}': "0+60x30"},
        "at": "15m", "labels": {"namespace": "chat"}, "value": "1"},
    "ParleyRateLimiterFailingClosed": {
        "series": {'parley_rate_limiter_unavailable_total{namespace="chat"}': "0+120x30",
                   'parley_rate_limiter_unavailable_total{namespace="quiet"}': "0x30"},
        "at": "15m", "labels": {"namespace": "chat"}, "value": "2"},
    "ParleyReaperBacklog": {
        "series": {'parley_credit_holds_open{namespace="chat",pod="a"}': "150x40",
                   'parley_active_streams{namespace="chat",pod="a"}': "20x40",
                   'parley_credit_holds_open{namespace="quiet",pod="b"}': "60x40",
                   'parley_active_streams{namespace="quiet",pod="b"}': "10x40"},
        "at": "25m", "labels": {"namespace": "chat"}, "value": "130"},
    "ParleyFallbackStorm": {
        "series": {'parley_fallbacks_total{namespace="chat",from="a",to="b",reason="throttled"}': "0+30x30",
                   'parley_streams_total{namespace="chat",route="default",model="b",outcome="completed"}': "0+60x30",
                   'parley_fallbacks_total{namespace="quiet",from="a",to="b",reason="throttled"}': "0+6x30",
                   'parley_streams_total{namespace="quiet",route="default",model="a",outcome="completed"}': "0+60x30"},
        "at": "20m", "labels": {"namespace": "chat"}, "value": "50%"},
    "ParleyTargetOpen": {
        "series": {'parley_target_state{namespace="chat",pod="a",route="default",model="m"}': "2x40",
                   'parley_target_state{namespace="chat",pod="a",route="default",model="n"}': "1x40",
                   'parley_target_state{namespace="quiet",pod="b",route="default",model="m"}': "0x40"},
        "at": "20m", "labels": {"namespace": "chat", "route": "default", "model": "m"}, "value": "2"},
    "ParleySlowFirstToken": {
        "series": {'parley_time_to_first_token_seconds_bucket{namespace="chat",le="1"}': "0x30",
                   'parley_time_to_first_token_seconds_bucket{namespace="chat",le="10"}': "0+60x30",
                   'parley_time_to_first_token_seconds_bucket{namespace="chat",le="+Inf"}': "0+60x30",
                   'parley_time_to_first_token_seconds_bucket{namespace="quiet",le="1"}': "0+60x30",
                   'parley_time_to_first_token_seconds_bucket{namespace="quiet",le="10"}': "0+60x30",
                   'parley_time_to_first_token_seconds_bucket{namespace="quiet",le="+Inf"}': "0+60x30"},
        "at": "20m", "labels": {"namespace": "chat"}, "value": "9.91s"},
    "ParleyOperatorReconcileErrors": {
        "series": {'parley_operator_reconcile_failures_total{namespace="op",controller="chatdeployment",reason="invalid"}': "0+60x40",
                   'parley_operator_reconcile_failures_total{namespace="op",controller="modelroute",reason="conflict"}': "5x40"},
        "at": "30m", "labels": {"namespace": "op", "controller": "chatdeployment"}, "value": "1"},
    "ParleyOperatorStuck": {
        "series": {'parley_operator_pending_objects{namespace="op",controller="chatdeployment"}': "1x50",
                   'parley_operator_pending_objects{namespace="op",controller="modelroute"}': "0x50"},
        "at": "40m", "labels": {"namespace": "op", "controller": "chatdeployment"}, "value": "1"},
    "ParleyOperatorMissingCrds": {
        "series": {'parley_operator_missing_crds{namespace="op"}': "2x30",
                   'parley_operator_missing_crds{namespace="ok"}': "0x30"},
        "at": "15m", "labels": {"namespace": "op"}, "value": "2"},
}


def expected_annotations(rule: dict, case: dict) -> dict:
    replacements = {
        "{{ $value | humanize }}": case["value"],
        "{{ $value | humanizePercentage }}": case["value"],
        "{{ $value | humanizeDuration }}": case["value"],
        "{{ $value }}": case["value"],
    }
    replacements.update({f"{{{{ $labels.{k} }}}}": v for k, v in case["labels"].items()})
    annotations = {}
    for key, text in rule["annotations"].items():
        for placeholder, value in replacements.items():
            text = text.replace(placeholder, value)
        assert "{{" not in text, f"{rule['alert']}: unexpected placeholder left in {text}"
        annotations[key] = text
    return annotations


def test_each_alert_fires_on_its_condition_only(tmp_path):
    rules = alert_rules()
    assert {r["alert"] for r in rules} == set(FIRING)
    write_rules(tmp_path / "rules.yaml", rules)
    tests = []
    for rule in rules:
        case = FIRING[rule["alert"]]
        series = [{"series": s, "values": v} for s, v in case["series"].items()]
        fired = {
            "exp_labels": {**case["labels"], "severity": rule["labels"]["severity"]},
            "exp_annotations": expected_annotations(rule, case),
        }
        # Not yet (the condition holds for less than `for`), then firing,
        # and only for the series that meet it.
        tests.append({
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": rule["alert"], "exp_alerts": []},
                {"eval_time": case["at"], "alertname": rule["alert"], "exp_alerts": [fired]},
            ],
        })
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)


def test_every_dashboard_expression_parses(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 25
    rules = [{"record": f"parley:dashboard:{i}", "expr": promql(expr)} for i, (_, _, expr) in enumerate(queries)]
    write_rules(tmp_path / "dashboards.yaml", rules)
    promtool("check", "rules", "dashboards.yaml", cwd=tmp_path)


REQUIRED_PANELS = {
    "parley-service.json": ["parley_streams_total", "parley_time_to_first_token_seconds_bucket",
                            "parley_active_streams", "parley_tokens_total", "parley_credits_charged_total",
                            "parley_fallbacks_total", "parley_rate_limited_total",
                            "parley_rate_limiter_unavailable_total", "parley_ledger_denials_total",
                            "parley_ledger_operation_duration_seconds_bucket",
                            "parley_store_operation_duration_seconds_bucket", "parley_credit_holds_open"],
    "parley-operator.json": ["parley_operator_reconcile_duration_seconds_count",
                             "parley_operator_reconcile_failures_total", "parley_operator_pending_objects",
                             "parley_operator_time_to_converge_seconds_bucket", "parley_operator_missing_crds"],
}


def test_dashboards_are_valid_grafana_json():
    boards = dashboards()
    assert set(boards) == set(REQUIRED_PANELS)
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert json.loads(json.dumps(board)) == board
        assert isinstance(board["schemaVersion"], int) and board["title"] and board["uid"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["namespace"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells = set()
        for panel in board["panels"]:
            where = f"{name}: {panel['title']}"
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps another panel"
                    cells.add((x, y))
            if panel["type"] == "row":
                continue
            assert panel["type"] in ("timeseries", "stat"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"], where
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert panel["targets"] and len(ref_ids) == len(set(ref_ids)), where
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"] and target["expr"], where
                assert 'namespace=~"$namespace"' in target["expr"], f"{where}: not filtered by namespace"
        exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
        for metric in REQUIRED_PANELS[name]:
            assert metric in exprs, f"{name} has no panel on {metric}"
