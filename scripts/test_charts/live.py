"""Real processes for the live monitoring test: Parley's binaries, Redis,
Prometheus, and a small client of the test kube-apiserver."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from charts import REPO

# Bounds of waits on events (a process listening, a series appearing), not sleeps.
START_LIMIT = 60.0
DATA_LIMIT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], Any], limit: float = START_LIMIT, every: float = 0.2) -> Any:
    """Polls `check` until it returns something truthy; fails after `limit`."""
    deadline = time.monotonic() + limit
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as error:
            last_error = error
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {limit:.0f} s (last error: {last_error})")


def binary(name: str) -> Path:
    """A workspace binary, as `cargo build --workspace --bins --tests` left it."""
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    path = Path(json.loads(metadata.stdout)["target_directory"]) / "debug" / name
    assert path.exists(), f"{path} is not built: run `cargo build --workspace --bins --tests` (scripts/test-charts.sh does)"
    return path


class Process:
    """A child process whose output goes to a log file in the test's directory."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
        self.popen = subprocess.Popen(
            args, env=clean | env, stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        code = self.popen.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.output()[-3000:]}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Kube:
    """Server-side apply against the test kube-apiserver, as its admin."""

    PATHS = {
        "Namespace": "/api/v1/namespaces/{name}",
        "Secret": "/api/v1/namespaces/{namespace}/secrets/{name}",
        "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
        "ChatDeployment": "/apis/parley.dev/v1alpha1/namespaces/{namespace}/chatdeployments/{name}",
        "ModelRoute": "/apis/parley.dev/v1alpha1/namespaces/{namespace}/modelroutes/{name}",
    }

    def __init__(self, kubeconfig: Path):
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = config["users"][0]["user"]["token"]
        self.context = ssl.create_default_context(cafile=cluster["certificate-authority"])

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        request = urllib.request.Request(self.server + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:500]!r}") from None

    def path(self, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return self.PATHS[obj["kind"]].format(name=meta["name"], namespace=meta.get("namespace", ""))

    def apply(self, obj: dict[str, Any]) -> Any:
        query = "?fieldManager=parley-chart-tests&force=true"
        return self.request("PATCH", self.path(obj) + query, json.dumps(obj).encode(), "application/apply-patch+yaml")

    def get(self, obj: dict[str, Any]) -> Any:
        return self.request("GET", self.path(obj))


class Prometheus:
    def __init__(self, scrape: dict[str, list[tuple[str, dict[str, str]]]], workdir: Path):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics",
                 "static_configs": [{"targets": [target], "labels": labels} for target, labels in targets]}
                for job, targets in scrape.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        from charts import tool

        self.process = Process("prometheus", [
            tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
        ], {}, workdir)
        wait_until("Prometheus ready", lambda: http("GET", f"{self.url}/-/ready")[0] == 200)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = http("GET", f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def series(self, match: str) -> list[dict[str, str]]:
        status, body = http("GET", f"{self.url}/api/v1/series?" + urllib.parse.urlencode({"match[]": match}))
        assert status == 200, body
        return json.loads(body)["data"]

    def targets_up(self) -> bool:
        status, body = http("GET", f"{self.url}/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)


class Traffic:
    """Calls `step` over and over in a thread until stopped, so counters keep
    moving between scrapes while the test waits for its series."""

    def __init__(self, step: Callable[[], None]):
        self.step = step
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.step()
        except BaseException as error:  # reported by stop()
            self.error = error

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=60)
        if self.error:
            raise self.error
