#!/usr/bin/env bash
# The Helm charts and the monitoring they ship, tested offline and live:
#   - both charts rendered with Helm as a library (helm-python-sdk) and
#     strictly linted, with default values, every opt-in on, and the
#     namespace-scoped mode; every rendered object validated against the
#     Kubernetes schemas (kubernetes-validate), ChatDeployment/ModelRoute
#     against their CRDs' schemas (from crdgen, run now), ServiceMonitor and
#     PrometheusRule against the prometheus-operator schemas; values.schema.json
#     refusing bad values;
#   - the alert rules and dashboard queries parsed by promtool, each alert
#     unit-tested with promtool, the dashboards checked as Grafana JSON;
#   - a real Prometheus scraping real parley-service and parley-operator
#     processes while real traffic flows: every dashboard, alert and
#     Prometheus Adapter expression returns data.
# (The charts applied to the test kube-apiserver and reconciled by the
# operator under the chart's RBAC is a Rust test: tests/tests/chart_install.rs.)
#
#   scripts/test-charts.sh [pytest arguments]
# Runs alone; scripts/test.sh runs it with its test servers. Without
# PARLEY_TEST_KUBECONFIG it starts (and stops) test servers of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${PARLEY_CACHE_DIR:-/var/cache/parley}"
scripts/test-env.sh install

# Prometheus and promtool from Debian (not the node exporter it recommends).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  (
    flock 9
    echo "[test-charts] apt-get install prometheus" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  ) 9>"$CACHE_DIR/.install.lock"
fi

# The binaries the live test runs, and crdgen, whose output the CRDs chart must render.
LOG_NAME=test-charts
# shellcheck source=scripts/common.sh
source scripts/common.sh
build_test_binaries

if [ -z "${PARLEY_TEST_KUBECONFIG:-}" ]; then
  env_dir=$(mktemp -d /tmp/parley-charts-env.XXXXXX)
  trap 'scripts/test-env.sh stop "$env_dir"; rm -rf "$env_dir"' EXIT
  scripts/test-env.sh start "$env_dir"
  # shellcheck disable=SC1091
  source "$env_dir/env"
fi

cd scripts/test_charts
"$PARLEY_TEST_PYTHON" -m pytest -q "$@"
