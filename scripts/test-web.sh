#!/usr/bin/env bash
# The web suite: the pages' client library tests, the check that the
# committed build (web/dist) is what the sources build to, and the browser
# tests: headless Chromium (Debian's) driven by playwright-core against the
# real parley-service binary. It installs what it needs (apt: chromium; npm:
# the pinned packages of web/package-lock.json) and downloads nothing else.
# The browser tests rewrite the screenshots in docs/screenshots/.
#
#   scripts/test-web.sh          (after `cargo build -p parley-service`)
#
# PARLEY_SERVICE_BIN overrides the binary (default: the debug build in
# ${CARGO_TARGET_DIR:-target}); scripts/test.sh runs this after the rust suite.
set -euo pipefail
cd "$(dirname "$0")/.."

service_bin=${PARLEY_SERVICE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/parley-service}
if [[ ! -x $service_bin ]]; then
  echo "test-web: no parley-service binary at $service_bin; build it with 'cargo build -p parley-service'" >&2
  exit 1
fi
export PARLEY_SERVICE_BIN=$service_bin

if ! command -v chromium >/dev/null; then
  echo "test-web: installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "test-web: node and npm are needed (Node.js 20 or later)" >&2
  exit 1
fi

cd web
npm ci --no-audit --no-fund --loglevel=error
npm run --silent typecheck
npm run --silent test
npm run --silent check-dist
npm run --silent test:browser
