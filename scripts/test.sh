#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian bookworm machine: installs
# the real test servers (cached after the first run), starts them on free
# loopback ports, runs the tests against them, and stops them again.
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

# The end-to-end tests start the real binaries.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
