#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian bookworm machine: installs
# the real test servers (cached after the first run), starts them on free
# loopback ports, runs the workspace's tests and then every further suite
# against them, and stops them. Every suite runs even when an earlier one
# failed; the summary at the end says which failed, and how long each took.
#   scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-env.sh install
if ! command -v cargo-nextest >/dev/null; then
  cargo install --locked cargo-nextest
fi

env_dir=$(mktemp -d /tmp/parley-test-env.XXXXXX)
cleanup() { scripts/test-env.sh stop "$env_dir"; rm -rf "$env_dir"; }
trap cleanup EXIT
scripts/test-env.sh start "$env_dir"
# shellcheck disable=SC1091
source "$env_dir/env"

# The smaller of the free space where cargo writes and where the tests do.
free_gib() {
  df -P --block-size=1G "${CARGO_TARGET_DIR:-.}" /tmp | awk 'NR > 1 {print $4}' | sort -n | head -1
}
# What a cold run of every suite takes at its peak: target/ (about 7 GiB),
# the images and the cluster's containers, the test servers' data.
needed_gib=12
if [ "$(free_gib)" -lt "$needed_gib" ]; then
  echo "WARNING: $(free_gib) GiB of disk free; a cold run needs about $needed_gib GiB" \
    "and fails in odd places (ENOSPC) without them" >&2
fi

summary=()
reasons=()
failed=0
# A failed suite's reasons are repeated in the summary: its own output may be long
# enough (a cluster's logs) to push them out of sight.
suite() { # name, command...
  local name=$1 started=$SECONDS status=passed
  shift
  echo "=== suite $name"
  "$@" 2>&1 | tee "$env_dir/suite-$name.log" || { status=FAILED; failed=1; }
  summary+=("$(printf '%-10s %-7s %5ss %5s GiB free' "$name" "$status" $((SECONDS - started)) "$(free_gib)")")
  if [ "$status" = FAILED ]; then
    while IFS= read -r line; do reasons+=("$name: $line"); done < <(
      grep -E 'FAILED|LEFTOVER|panicked at|^error|not ok|✖|Error:|failed' "$env_dir/suite-$name.log" \
        | grep -vE 'level=|^[IWE][0-9]{4} ' | tail -25)
  fi
}

# The end-to-end tests start the real binaries, which cargo builds with the
# tests (every package with a binary has integration tests): the later suites
# use the same builds (scripts/common.sh, build_test_binaries).
suite rust cargo nextest run --workspace --no-fail-fast "$@"
suite load scripts/test-load.sh
suite api-fuzz scripts/test-api-fuzz.sh
suite fuzz scripts/test-fuzz.sh
# After the rust suite: the images are made of the binaries it built.
suite images scripts/test-images.sh
suite charts scripts/test-charts.sh
# The pages in headless Chromium against the binary the rust suite built.
suite web scripts/test-web.sh
suite cluster scripts/test-cluster.sh
# Parley on that cluster: the images of the binaries the rust suite built.
suite rollout scripts/test-rollout.sh

echo "=== summary"
printf '%s\n' "${summary[@]}"
if [ "${#reasons[@]}" -gt 0 ]; then
  echo "=== why"
  printf '%s\n' "${reasons[@]}"
fi
exit "$failed"
