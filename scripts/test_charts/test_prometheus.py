"""A real Prometheus scrapes real parley-service and parley-operator
processes on loopback while real traffic flows, and every expression of the
dashboards, the alert rules and the Prometheus Adapter rule returns data.

The traffic is made to produce every series the expressions use: replies on
the simulated model, a fallback (the first target is an OpenAI-compatible
server that is not there), a 402, a route's rate limit, an abandoned hold the
reaper closes, a ledger that cannot answer (external accounting that is
down), a rate limiter that cannot answer (its Redis stopped), and, for the
operator, a ChatDeployment that converges after every change and one whose
Service the API server rejects. The fail-closed, fallback and operator alerts
must then actually hold."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from charts import (
    CHART,
    CRDS_CHART,
    alert_rules,
    dashboard_queries,
    find,
    objects,
    promql,
    signal_and_threshold,
    tool,
)
from live import DATA_LIMIT, Kube, Process, Prometheus, Traffic, binary, free_port, http, wait_until

SERVICE_NAMESPACE = "parley-test"
OPERATOR_NAMESPACE = "parley-system"
SECRET = "charts-monitoring-test-secret-0123456789"
# Alerts the traffic makes true (their condition, not their `for`).
MUST_HOLD = {
    "ParleyLedgerFailingClosed", "ParleyRateLimiterFailingClosed", "ParleyFallbackStorm",
    "ParleyOperatorReconcileErrors", "ParleyOperatorStuck",
}

ROUTES = {
    "defaultRoute": "default",
    "routes": [
        {"alias": "default", "allowedRoles": ["user", "supervisor", "admin"], "fallbackOn": ["unavailable"],
         "targets": [
             {"provider": "openai", "model": "absent", "pricing": {"inputPer1k": 1, "outputPer1k": 2},
              "maxOutputTokens": 64, "timeoutSeconds": 5},
             {"provider": "simulated", "model": "simulated-small", "pricing": {"inputPer1k": 1, "outputPer1k": 2},
              "maxOutputTokens": 64},
         ]},
        {"alias": "pricey", "allowedRoles": ["user"],
         "targets": [{"provider": "simulated", "model": "simulated-gold",
                      "pricing": {"inputPer1k": 1000000, "outputPer1k": 1000000}, "maxOutputTokens": 64}]},
        {"alias": "policed", "allowedRoles": ["user"],
         "contentPolicy": {"rules": [{"name": "homework", "words": ["answer key"], "direction": "input"}]},
         "targets": [{"provider": "simulated", "model": "simulated-policed",
                      "pricing": {"inputPer1k": 1, "outputPer1k": 2}, "maxOutputTokens": 64}]},
        {"alias": "limited", "allowedRoles": ["user"], "limits": {"requestsPerMinute": 1},
         "targets": [{"provider": "simulated", "model": "simulated-small",
                      "pricing": {"inputPer1k": 1, "outputPer1k": 2}, "maxOutputTokens": 64}]},
    ],
}


def kubeconfig() -> Path:
    value = os.environ.get("PARLEY_TEST_KUBECONFIG")
    assert value, ("PARLEY_TEST_KUBECONFIG is not set: run scripts/test-charts.sh, or start the test servers "
                   "with `scripts/test-env.sh install && scripts/test-env.sh start .test-env && source .test-env/env`")
    return Path(value)


def start_service(name: str, logs: Path, env: dict[str, str]) -> tuple[Process, str]:
    port = free_port()
    data = logs / name
    data.mkdir()
    base = {
        "PARLEY_LISTEN": f"127.0.0.1:{port}", "PARLEY_DATA_DIR": str(data), "PARLEY_JWT_SECRET": SECRET,
        "PARLEY_SIMULATED_FIRST_TOKEN_MILLIS": "5", "PARLEY_SIMULATED_TOKENS_PER_SECOND": "0",
        "RUST_LOG": "info",
    }
    process = Process(name, [str(binary("parley-service"))], base | env, logs)
    url = f"http://127.0.0.1:{port}"
    wait_until(f"{name} serving", lambda: (process.check_running(), http("GET", f"{url}/health")[0] == 200)[1])
    return process, url


def mint_token(sub: str, role: str = "user") -> str:
    result = subprocess.run(
        [str(binary("parley-service")), "token", "--sub", sub, "--role", role],
        env={"PATH": os.environ.get("PATH", ""), "PARLEY_JWT_SECRET": SECRET},
        check=True, capture_output=True, text=True,
    )
    return result.stdout.strip()


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("monitoring")
    kube = Kube(kubeconfig())
    processes: list[Process] = []
    traffic = None
    try:
        # The operator, with the CRDs from the parley-crds chart and the
        # parley chart's sample in a namespace of its own.
        namespace = f"parley-charts-{os.getpid()}-{secrets.token_hex(3)}"
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for crd in objects(CRDS_CHART, {}):
            kube.apply(crd)
        wait_until("CRDs established", lambda: all(
            any(c["type"] == "Established" and c["status"] == "True" for c in kube.get(crd).get("status", {}).get("conditions", []))
            for crd in objects(CRDS_CHART, {})))
        sample = [o for o in objects(CHART, {"sample": {"enabled": True}}) if o["kind"] in ("Secret", "ChatDeployment", "ModelRoute")]
        for obj in sample:
            obj["metadata"]["namespace"] = namespace
            kube.apply(obj)
        (chat,) = find(sample, "ChatDeployment")
        # A Service name must start with a letter: the API server rejects
        # this one's Service, so its reconciliations fail.
        broken = copy.deepcopy(chat)
        broken["metadata"]["name"] = "1-broken"
        kube.apply(broken)
        operator_port = free_port()
        processes.append(Process("operator", [str(binary("parley-operator"))], {
            "KUBECONFIG": str(kubeconfig()), "PARLEY_OPERATOR_LISTEN": f"127.0.0.1:{operator_port}",
            "PARLEY_OPERATOR_NAMESPACE": namespace, "POD_NAMESPACE": namespace, "RUST_LOG": "info",
        }, logs))

        # The chat services.
        routes_file = logs / "routes.yaml"
        routes_file.write_text(yaml.safe_dump(ROUTES))
        no_limits = {"PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE": "0", "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE": "0",
                     "PARLEY_RATE_LIMIT_CONCURRENT_STREAMS": "0"}
        a, a_url = start_service("chat-a", logs, no_limits | {
            "PARLEY_ROUTES_FILE": str(routes_file), "PARLEY_INITIAL_CREDITS": "1000",
            "PARLEY_OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "PARLEY_HOLD_LEASE_SECONDS": "1", "PARLEY_REAPER_INTERVAL_SECONDS": "1",
        })
        processes.append(a)
        b, b_url = start_service("chat-b", logs, no_limits | {
            "PARLEY_ACCOUNTING_URL": f"http://127.0.0.1:{free_port()}", "PARLEY_ACCOUNTING_TIMEOUT_SECONDS": "1",
        })
        processes.append(b)
        redis_port = free_port()
        redis = Process("redis", [tool("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"], {}, logs)
        processes.append(redis)
        wait_until("redis", lambda: b"PONG" in subprocess.run(
            [tool("redis-cli"), "-p", str(redis_port), "ping"], capture_output=True).stdout)
        c, c_url = start_service("chat-c", logs, {"PARLEY_REDIS_URL": f"redis://127.0.0.1:{redis_port}"})
        processes.append(c)
        redis.stop()

        prometheus = Prometheus({
            "parley-service": [(url.removeprefix("http://"), {"namespace": SERVICE_NAMESPACE, "pod": pod})
                               for url, pod in ((a_url, "chat-a"), (b_url, "chat-b"), (c_url, "chat-c"))],
            "parley-operator": [(f"127.0.0.1:{operator_port}", {"namespace": OPERATOR_NAMESPACE, "pod": "operator-0"})],
        }, logs)
        processes.append(prometheus.process)
        wait_until("every target scraped", prometheus.targets_up)

        token = mint_token("alice")
        admin = mint_token("ada", "admin")
        sessions = {}
        for route in ("default", "pricey", "limited", "policed"):
            status, body = http("POST", f"{a_url}/api/chat/sessions", {"title": route, "route": route}, token)
            assert status == 201, body
            sessions[route] = json.loads(body)["sessionId"]
        status, body = http("POST", f"{b_url}/api/chat/sessions", {"title": "b"}, token)
        assert status == 201, body
        b_session = json.loads(body)["sessionId"]
        generations = itertools.count(1)
        seen: dict[str, set[int]] = {}

        def expect(what: str, status: int, allowed: set[int]) -> None:
            assert status in allowed, f"{what} answered {status}"
            seen.setdefault(what, set()).add(status)

        def step() -> None:
            for process in processes:
                if process is not redis:
                    process.check_running()
            reply = f"{a_url}/api/chat/sessions/{sessions['default']}"
            expect("reply with fallback", http("POST", f"{reply}/messages", {"message": "hello there"}, token)[0], {200})
            # An admin watches the streamed reply from before it starts to
            # its end, then leaves: observers, delivery lag, observations.
            observer = urllib.request.Request(f"{reply}/observe", headers={"Authorization": f"Bearer {admin}"})
            with urllib.request.urlopen(observer, timeout=30) as watching:
                expect("observation", watching.status, {200})
                expect("streamed reply", http("POST", f"{reply}/stream", {"message": "stream me"}, token)[0], {200})
                while b'"state":"ended"' not in watching.readline():
                    pass
            expect("unaffordable reply", http("POST", f"{a_url}/api/chat/sessions/{sessions['pricey']}/messages", {"message": "gold"}, token)[0], {402})
            expect("blocked message", http("POST", f"{a_url}/api/chat/sessions/{sessions['policed']}/messages", {"message": "the answer key please"}, token)[0], {400})
            expect("limited route", http("POST", f"{a_url}/api/chat/sessions/{sessions['limited']}/messages", {"message": "once"}, token)[0], {200, 429})
            expect("session create", http("POST", f"{a_url}/api/chat/sessions", {"title": "more"}, token)[0], {201})
            expect("missing session", http("GET", f"{a_url}/api/chat/sessions/{secrets.token_hex(12)}", None, token)[0], {404})
            held = {"sessionId": f"abandoned-{secrets.token_hex(6)}", "modelId": "simulated-small", "estimatedTokens": 20}
            expect("hold never settled", http("POST", f"{a_url}/api/streaming-sessions/initialize", held, token)[0], {200})
            expect("ledger down", http("POST", f"{b_url}/api/chat/sessions/{b_session}/messages", {"message": "pay"}, token)[0], {503})
            expect("rate limiter down", http("GET", f"{c_url}/api/chat/sessions", None, token)[0], {503})
            # A change to both ChatDeployments: one converges, one fails again.
            generation = next(generations)
            for obj in (chat, broken):
                changed = copy.deepcopy(obj)
                changed["metadata"]["namespace"] = namespace
                changed["spec"]["rateLimits"] = {"requestsPerMinute": 100 + generation}
                kube.apply(changed)

        traffic = Traffic(step)
        yield prometheus, traffic, seen
    finally:
        if traffic is not None:
            traffic.stopped.set()
            traffic.thread.join(timeout=60)
        for process in reversed(processes):
            process.stop()


def wait_for_data(prometheus: Prometheus, traffic: Traffic, expressions: dict[str, str]) -> dict[str, list]:
    """Waits until every expression returns a finite value; names those that never do."""
    results: dict[str, list] = {}

    def all_have_data() -> bool:
        if traffic.error:
            raise traffic.error
        for name, expr in expressions.items():
            if name not in results or not has_data(results[name]):
                results[name] = prometheus.query(expr)
        return all(has_data(r) for r in results.values())

    try:
        wait_until("every expression returning data", all_have_data, limit=DATA_LIMIT, every=1.0)
    except AssertionError:
        empty = [f"{name}: {expressions[name]}" for name, r in results.items() if not has_data(r)]
        raise AssertionError("no data after traffic for:\n" + "\n".join(empty)) from None
    return results


def test_every_dashboard_alert_and_adapter_expression_returns_data(stack):
    prometheus, traffic, seen = stack
    expressions = {}
    for index, (board, title, expr) in enumerate(dashboard_queries()):
        namespace = OPERATOR_NAMESPACE if "operator" in board else SERVICE_NAMESPACE
        expressions[f"{board}: {title} (target {index})"] = promql(expr, namespace=namespace)
    rules = alert_rules()
    for rule in rules:
        signal, _ = signal_and_threshold(rule["expr"])
        expressions[f"alert {rule['alert']} signal"] = signal
        if rule["alert"] in MUST_HOLD:
            expressions[f"alert {rule['alert']} condition"] = rule["expr"]
    assert MUST_HOLD <= {r["alert"] for r in rules}
    (adapter,) = [c for c in find(objects(CHART, {"prometheusAdapter": {"enabled": True}}), "ConfigMap")]
    (adapter_rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    # What the adapter sends for the HPA's pods metric in one namespace.
    expressions["adapter metricsQuery"] = (
        adapter_rule["metricsQuery"]
        .replace("<<.Series>>", "parley_active_streams")
        .replace("<<.LabelMatchers>>", f'namespace="{SERVICE_NAMESPACE}",pod=~"chat-a|chat-b|chat-c"')
        .replace("<<.GroupBy>>", "pod")
    )
    results = wait_for_data(prometheus, traffic, expressions)
    traffic.stop()
    # Every kind of answer the traffic was meant to produce happened.
    assert seen["limited route"] == {200, 429}, seen

    adapter_pods = {r["metric"]["pod"] for r in results["adapter metricsQuery"]}
    assert adapter_pods == {"chat-a", "chat-b", "chat-c"}
    series = prometheus.series(adapter_rule["seriesQuery"])
    assert {s["pod"] for s in series} == {"chat-a", "chat-b", "chat-c"}
    assert all(s["__name__"] == "parley_active_streams" for s in series)
