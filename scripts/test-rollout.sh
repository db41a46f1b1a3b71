#!/usr/bin/env bash
# Suite `rollout`: Parley on the real one-node cluster (scripts/cluster.sh).
# Builds both images (scripts/images.sh, the dev profile's binaries by default:
# what the rust suite built), starts a cluster with them loaded, starts the test
# MongoDB-wire server and Redis on the cluster bridge's gateway address (so pods
# reach them), and runs tests/tests/cluster.rs (`cargo nextest run --profile
# cluster`): the charts installed with two operator pods, a ChatDeployment's
# pods answering replies, a ModelRoute edit served by every pod, a rollout
# while 20 replies stream, a leader change mid-reconcile, the ChatDeployment
# deleted with its children. Prints the timings; always takes the cluster down.
#
# Needs root. Runs alone: scripts/test-rollout.sh (installs what it needs; a
# first run on a machine builds the Kubernetes binaries and the binaries).
#   PARLEY_TEST_IMAGES_PROFILE  cargo profile of the images' binaries (default dev)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test-rollout] %s\n' "$*"; }
timings=()
timing() { timings+=("$(printf '%-44s %ss' "$1" "$2")"); log "$1: $2s"; }
failure=""
fail() { failure="$*"; log "FAILED: $*" >&2; exit 1; }
trap 'failure=${failure:-"line $LINENO: $BASH_COMMAND"}' ERR

[ "$(id -u)" -eq 0 ] || fail "run as root (scripts/cluster.sh needs it)"
started=$SECONDS
scripts/cluster.sh install
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
timing "install (binaries built if cold)" $((SECONDS - started))

work=$(mktemp -d /tmp/parley-test-rollout.XXXXXX)
# Both images under a tag of this run, so that the pods cannot run an older build.
tag="rollout-${work##*.}"
cluster_dir="$work/cluster"
env_dir="$work/env"
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -f "$cluster_dir/kubeconfig" ]; then
    log "state of the failed run:" >&2
    # The node's conditions (disk or memory pressure keep pods Pending) and the latest events.
    kubectl --kubeconfig "$cluster_dir/kubeconfig" get nodes \
      -o jsonpath='{range .items[*].status.conditions[*]}{.type}={.status} {.message}{"\n"}{end}' >&2 || true
    kubectl --kubeconfig "$cluster_dir/kubeconfig" get events -A --sort-by=.lastTimestamp 2>&1 | tail -20 >&2 || true
    kubectl --kubeconfig "$cluster_dir/kubeconfig" get pods -A -o wide >&2 || true
    for pod in $(kubectl --kubeconfig "$cluster_dir/kubeconfig" get pods -A \
      -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null); do
      echo "--- logs of $pod (last 15 lines)" >&2
      kubectl --kubeconfig "$cluster_dir/kubeconfig" logs -n "${pod%%/*}" "${pod#*/}" --tail 15 >&2 2>&1 || true
    done
  fi
  scripts/test-env.sh stop "$env_dir" >/dev/null 2>&1 || true
  scripts/cluster.sh down "$cluster_dir" || true
  # This run's images are in the tarballs; podman keeps no copy of them.
  podman rmi --ignore "ghcr.io/parley-dev/parley-service:$tag" "ghcr.io/parley-dev/parley-operator:$tag" >/dev/null 2>&1 || true
  # Again after the logs, where it is seen.
  [ "$status" -eq 0 ] || log "FAILED: ${failure:-exit status $status}" >&2
  rm -rf "$work"
}
trap cleanup EXIT

started=$SECONDS
mkdir -p "$work/images"
profile=${PARLEY_TEST_IMAGES_PROFILE:-dev}
images_args=(--profile "$profile")
if [ "$profile" = dev ]; then
  # shellcheck source=scripts/common.sh
  (LOG_NAME=test-rollout && source scripts/common.sh && build_test_binaries)
  images_args+=(--prebuilt)
fi
scripts/images.sh "${images_args[@]}" --repository ghcr.io/parley-dev --tag "$tag" --save "$work/images" >/dev/null \
  || fail "scripts/images.sh could not build the images"
timing "images built and saved" $((SECONDS - started))

started=$SECONDS
PARLEY_CLUSTER_IMAGES="$work/images" scripts/cluster.sh up "$cluster_dir"
timing "cluster up (node Ready, images loaded)" $((SECONDS - started))
# shellcheck disable=SC1091
source "$cluster_dir/env"
PARLEY_TEST_BIND_ADDRESS="$PARLEY_CLUSTER_GATEWAY" scripts/test-env.sh start "$env_dir" >/dev/null
# shellcheck disable=SC1091
source "$env_dir/env"

started=$SECONDS
# --workspace, not -p parley-e2e: the features of every other test build,
# so nothing compiles twice; the profile picks the one binary.
PARLEY_IMAGE_TAG="$tag" cargo nextest run --workspace --profile cluster \
  --no-capture || fail "tests/tests/cluster.rs failed (its output is above)"
timing "cluster test (tests/tests/cluster.rs)" $((SECONDS - started))

echo "=== rollout timings"
printf '%s\n' "${timings[@]}"
