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

summary=()
failed=0
suite() { # name, command...
  local name=$1 started=$SECONDS status=passed
  shift
  echo "=== suite $name"
  "$@" || { status=FAILED; failed=1; }
  summary+=("$(printf '%-10s %-7s %5ss' "$name" "$status" $((SECONDS - started)))")
}

# The end-to-end tests start the real binaries.
suite rust bash -c 'cargo build --workspace --bins && cargo nextest run --workspace --no-fail-fast "$@"' _ "$@"
suite api-fuzz scripts/test-api-fuzz.sh
suite fuzz scripts/test-fuzz.sh

echo "=== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
