#!/usr/bin/env bash
# API fuzzing from the served OpenAPI document: Schemathesis (pinned in
# scripts/requirements-test.txt) against the real parley-service binary in
# local mode on a fresh data dir, every operation, every phase (examples,
# coverage, fuzzing, stateful through the document's links), once per kind
# of caller: a user, a supervisor, an admin, a forged token and no token.
# Fails on any failed check, and on a panic in the service's log.
#
#   scripts/test-api-fuzz.sh                                  bounded run (CI)
#   PARLEY_API_FUZZ_EXAMPLES=1000 scripts/test-api-fuzz.sh    a longer run
#   PARLEY_API_FUZZ_SEED=42 scripts/test-api-fuzz.sh          replay one seed
#
# It builds the binaries as the test suite does (CARGO_TARGET_DIR honoured) and finds the
# Python tools through PARLEY_TEST_PYTHON, or installs them with
# scripts/test-env.sh. Reports land in $PARLEY_API_FUZZ_REPORTS (default: a
# temporary directory, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

examples=${PARLEY_API_FUZZ_EXAMPLES:-30}
seed=${PARLEY_API_FUZZ_SEED:-$RANDOM$RANDOM}
reports=${PARLEY_API_FUZZ_REPORTS:-$(mktemp -d /tmp/parley-api-fuzz.XXXXXX)}
mkdir -p "$reports"
reports=$(cd "$reports" && pwd)

log() { printf '[api-fuzz] %s\n' "$*" >&2; }

python=${PARLEY_TEST_PYTHON:-}
if [ -z "$python" ]; then
  scripts/test-env.sh install
  python=$(scripts/test-env.sh python)
fi
schemathesis="$(dirname "$python")/schemathesis"
[ -x "$schemathesis" ] || { log "no schemathesis next to $python: run scripts/test-env.sh install"; exit 1; }

LOG_NAME=api-fuzz
# shellcheck source=scripts/common.sh
source scripts/common.sh
build_test_binaries
binary="${CARGO_TARGET_DIR:-target}/debug/parley-service"

data_dir=$(mktemp -d /tmp/parley-api-fuzz-data.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
base="http://127.0.0.1:$port"
service_log="$reports/service.log"
export PARLEY_DATA_DIR="$data_dir" PARLEY_LISTEN="127.0.0.1:$port" \
  PARLEY_INITIAL_CREDITS=1000000 \
  PARLEY_SIMULATED_FIRST_TOKEN_MILLIS=0 PARLEY_SIMULATED_TOKENS_PER_SECOND=0 \
  PARLEY_SIMULATED_REPLY_TOKENS=8 \
  PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE=0 PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE=0 \
  RUST_LOG=info
"$binary" >"$service_log" 2>&1 &
service_pid=$!
cleanup() {
  kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -sf "$base/health" >/dev/null && break
  kill -0 "$service_pid" 2>/dev/null || { cat "$service_log" >&2; log "the service exited"; exit 1; }
  sleep 0.1
done
curl -sf "$base/health" >/dev/null || { log "the service did not answer /health"; exit 1; }

# The document once, without a token: a forged token is refused on every
# /api/ path, the document's included.
curl -sf "$base/api/openapi.json" -o "$reports/openapi.json"

token() { "$binary" token --sub "$1" --role "$2" --cohort c1 --ttl 2h; }

config="$PWD/scripts/api-fuzz/schemathesis.toml"
failed=0
pass() { # name, extra schemathesis arguments...
  local name=$1 started=$SECONDS
  shift
  log "pass $name: $examples examples per operation, seed $seed"
  # From the reports dir: Schemathesis keeps its cache of failures in the working directory.
  # One worker: with two, Hypothesis builds ASTs on two threads at once, which
  # CPython 3.11 can fail with "SystemError: AST constructor recursion depth
  # mismatch" (python/cpython#106905); and on two cores one worker is no slower.
  if ! (cd "$reports" && "$schemathesis" --config-file "$config" run "$reports/openapi.json" --url "$base" \
      --max-examples "$examples" --seed "$seed" --workers 1 --no-color \
      --report junit --report-junit-path "$reports/$name.xml" "$@" >"$reports/$name.txt" 2>&1); then
    failed=1
    cat "$reports/$name.txt"
  fi
  log "pass $name: $(grep -E '^Test cases:' -A1 "$reports/$name.txt" | tail -1 | sed 's/^ *//') ($((SECONDS - started)) s)"
}

pass user -H "Authorization: Bearer $(token fuzz-user user)"
pass supervisor -H "Authorization: Bearer $(token fuzz-supervisor supervisor)"
pass admin -H "Authorization: Bearer $(token fuzz-admin admin)"
pass forged-token -H "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5Iiwicm9sZSI6ImFkbWluIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2lnbmF0dXJl"
pass no-token

if grep -n "panicked" "$service_log"; then
  log "the service panicked (log: $service_log)"
  failed=1
fi
server_errors=$(grep -c '"status":5[0-9][0-9]' "$service_log" || true)
log "reports and the service log: $reports; 5xx answers in the log: $server_errors"
[ "$server_errors" -eq 0 ] || failed=1
exit "$failed"
