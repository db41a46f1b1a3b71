#!/usr/bin/env bash
# Load with a fault (tests/tests/load_with_faults.rs): 200 users stream
# replies for 60 s while the upstream model server is unreachable for 10 s,
# then 50 users for 30 s on MongoDB while MongoDB is. Each prints a report
# and checks that failures were closed and documented, that the service
# recovered by itself, and that the ledger balances to the micro-credit.
# Runs alone, on the test servers:
#   scripts/test-env.sh start DIR && source DIR/env && scripts/test-load.sh
# Size of the first: PARLEY_LOAD_USERS, PARLEY_LOAD_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PARLEY_TEST_MONGODB_URI:?no test servers: run scripts/test-env.sh start DIR && source DIR/env}"
LOG_NAME=test-load
# shellcheck source=scripts/common.sh
source scripts/common.sh
build_test_binaries
# --workspace, not -p parley-e2e: the same features as every other test
# build, so nothing compiles twice; the profile picks the one binary.
cargo nextest run --workspace --profile load --no-capture
