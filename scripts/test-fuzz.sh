#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer on the stable toolchain (see
# fuzz/README.md): builds the targets of fuzz/ in the main target dir (only
# Parley's crates are instrumented and rebuilt; every dependency is the main
# build's), then runs each target for a while from its committed seeds.
# Fails when a target crashes (a panic, a broken property, a hang).
#
#   scripts/test-fuzz.sh                                 15 s per target (CI)
#   PARLEY_FUZZ_SECONDS=600 scripts/test-fuzz.sh         a longer run
#   PARLEY_FUZZ_TARGETS="jwt sse_frames" scripts/test-fuzz.sh
#
# New inputs and crash files land in $PARLEY_FUZZ_WORK (default: a temporary
# directory, printed); replay a crash with target/debug/fuzz_<target> FILE.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${PARLEY_FUZZ_SECONDS:-15}
targets=${PARLEY_FUZZ_TARGETS:-routes_file jwt sse_frames openai_stream openai_chunk bedrock_stream accounting_bodies}
work=${PARLEY_FUZZ_WORK:-$(mktemp -d /tmp/parley-fuzz.XXXXXX)}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
log() { printf '[fuzz] %s\n' "$*" >&2; }

command -v c++ >/dev/null || { log "libFuzzer is C++: install g++ (apt-get install g++)"; exit 1; }

# fuzz/Cargo.lock pins the main lockfile's versions; where they drifted the
# build compiles a second copy of those crates (slower, still correct).
python3 - <<'PY'
import tomllib
main = {p["name"]: p["version"] for p in tomllib.load(open("Cargo.lock", "rb"))["package"]}
fuzz = {p["name"]: p["version"] for p in tomllib.load(open("fuzz/Cargo.lock", "rb"))["package"]}
drift = sorted(f"{n} {fuzz[n]} (main {main[n]})" for n in fuzz.keys() & main.keys() if fuzz[n] != main[n])
if drift:
    print("[fuzz] warning: fuzz/Cargo.lock differs from Cargo.lock: " + ", ".join(drift)
          + "; refresh it: cp Cargo.lock fuzz/Cargo.lock && cargo update --manifest-path fuzz/Cargo.toml -w")
PY

started=$SECONDS
RUSTC_WRAPPER="$PWD/fuzz/rustc-wrapper.sh" CARGO_TARGET_DIR="$target_dir" \
  cargo build --locked --manifest-path fuzz/Cargo.toml --bins
log "built in $((SECONDS - started)) s"

failed=0
for target in $targets; do
  mkdir -p "$work/$target"
  # New inputs go to the first directory; the committed seeds stay as they are.
  if "$target_dir/debug/fuzz_$target" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
      -print_final_stats=1 -dict="fuzz/dict/$target.dict" -artifact_prefix="$work/$target-" \
      "$work/$target" "fuzz/corpus/$target" \
      >"$work/$target.log" 2>&1; then
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$target.log" | tail -1)
    log "$target: passed: $stats"
  else
    failed=1
    tail -60 "$work/$target.log"
    log "$target: FAILED; crash input and log in $work"
  fi
done
log "work dir: $work"
exit "$failed"
