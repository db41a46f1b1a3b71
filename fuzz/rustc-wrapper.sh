#!/bin/sh
# RUSTC_WRAPPER of scripts/test-fuzz.sh: instruments for libFuzzer (coverage
# counters, comparison tracing) only the crates under test — Parley's own,
# built with their `fuzzing` feature — and compiles every dependency as the
# main build does, so those are reused from the main target dir. All these
# flags are stable rustc options.
rustc=$1
shift
# A build script (parley-service embeds the web build) runs on the host and
# links no libFuzzer: it is compiled as usual.
for arg in "$@"; do
  [ "$arg" = build_script_build ] && exec "$rustc" "$@"
done
case "$CARGO_PKG_NAME" in
  parley-service | parley-crds | parley-fuzz)
    exec "$rustc" "$@" \
      -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares
    ;;
esac
exec "$rustc" "$@"
