#!/usr/bin/env bash
# Where the reply path's CPU goes: runs the gateway benchmark at 100 clients
# (release build) and samples the service process with perf while the
# clients stream through it, then prints the top symbols (with all of
# malloc's entry points counted as one). Needs perf (linux-perf) and root or
# kernel.perf_event_paranoid <= 1.
#   scripts/profile-gateway.sh            # 20 s per phase, 12 s sampled
#   PARLEY_BENCH_SERVICE=/path/to/build scripts/profile-gateway.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_NAME=profile-gateway
# shellcheck source=scripts/common.sh
. scripts/common.sh

command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
out=$(mktemp -d /tmp/parley-profile.XXXXXX)
start_gateway_bench 100 20 "$out/bench.txt"
perf record -F 499 -p "$service_pid" -o "$out/perf.data" -- sleep 12 >/dev/null 2>&1
wait "$bench"
cat "$out/bench.txt"
echo "=== top symbols of the service's threads ($out/perf.data)"
perf script -i "$out/perf.data" -F ip,sym,dso -G 2>/dev/null | python3 -c '
import collections, re, sys
counts, total = collections.Counter(), 0
for line in sys.stdin:
    found = re.match(r"\s*\S+\s+(.*)\s+\((.*)\)\s*$", line)
    if not found:
        continue
    symbol, library = found.group(1).split("+")[0], found.group(2).split("/")[-1]
    if re.search(r"malloc|free|realloc|unlink_chunk|consolidate|^_?mi_", symbol):
        symbol = "malloc and free (all entry points)"
    counts[(library, symbol)] += 1
    total += 1
for (library, symbol), count in counts.most_common(20):
    print(f"{100 * count / total:5.1f}%  {library[:16]:16}  {symbol[:90]}")
'
