#!/usr/bin/env bash
# What a reply waits for before its first token: runs the gateway benchmark
# at one client (release build), records the service's socket and file
# system calls with perf tracepoints while replies stream through it, and
# prints, for the median reply, when each step happened after the service
# read the request: the response's head written, the hold's fsync, the model
# request written, the model's reply read, the first event written; then
# writes, page writes and fsyncs per reply. The steps overlap (the model is
# called while the hold is made durable), so the first event waits for the
# later of the two. Needs perf (linux-perf), ss (iproute2) and root or
# kernel.perf_event_paranoid <= 1.
#   scripts/timeline-gateway.sh                    # builds, then 20 s per phase, 3 s traced
#   PARLEY_BENCH_SERVICE=/path/to/build scripts/timeline-gateway.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_NAME=timeline-gateway
# shellcheck source=scripts/common.sh
. scripts/common.sh

for tool in perf ss; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
out=$(mktemp -d /tmp/parley-timeline.XXXXXX)
start_gateway_bench 1 0 "$out/bench.txt"
# The service's sockets: those on its listening port carry client requests,
# the others are its requests to the model.
ss -tnpH state listening | grep "pid=$service_pid," | awk '{print $3}' | sed 's/.*://' >"$out/ports"
ss -tnpH state established | grep "pid=$service_pid," >"$out/sockets"
perf record -e 'syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,syscalls:sys_enter_pwrite64' \
  -p "$service_pid" -o "$out/trace.data" -- sleep 3 >/dev/null 2>&1
wait "$bench"
cat "$out/bench.txt"
perf script -i "$out/trace.data" -F tid,time,event,trace 2>/dev/null >"$out/trace.txt"
echo "=== the median reply's steps, in ms after the service read its request ($out)"
python3 - "$out" <<'PY'
import re, statistics, sys
out = sys.argv[1]
ports = set(open(f"{out}/ports").read().split())
clients = set()
for line in open(f"{out}/sockets"):
    local = line.split()[2]
    if local.rsplit(":", 1)[1] in ports:
        clients.update(int(fd) for fd in re.findall(r"fd=(\d+)", line))
events, entered = [], {}
for line in open(f"{out}/trace.txt"):
    parsed = re.match(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(\w+):\s*(.*)", line)
    if not parsed:
        continue
    tid, at, call, args = int(parsed[1]), float(parsed[2]) * 1e3, parsed[3], parsed[4]
    fd = re.search(r"fd: (0x[0-9a-f]+)", args)
    fd = int(fd[1], 16) if fd else None
    if call == "enter_recvfrom":
        entered[tid] = fd
        continue
    if call == "exit_recvfrom":
        read = int(args.strip(), 16)
        if read >= 2**63 or read == 0:
            continue
        fd = entered.get(tid)
    events.append((at, call, fd))
requests = [i for i, (_, call, fd) in enumerate(events) if call == "exit_recvfrom" and fd in clients]
steps = {
    "response head written": lambda e, fd: e[1] == "enter_writev" and e[2] == fd,
    "hold's fsync begun": lambda e, fd: e[1] == "enter_fdatasync",
    "hold's fsync done": lambda e, fd: e[1] == "exit_fdatasync",
    "model request written": lambda e, fd: e[1] == "enter_writev" and e[2] not in clients,
    "model's reply read": lambda e, fd: e[1] == "exit_recvfrom" and e[2] not in clients,
}
found = {step: [] for step in [*steps, "first event written"]}
counts = {"writes": [], "page writes": [], "fsyncs": []}
for start, end in zip(requests, requests[1:]):
    at, fd = events[start][0], events[start][2]
    reply = events[start + 1 : end]
    for step, matches in steps.items():
        times = [e[0] - at for e in reply if matches(e, fd)]
        if times:
            found[step].append(times[0])
    written = [e[0] - at for e in reply if e[1] == "enter_writev" and e[2] == fd]
    if len(written) > 1:
        found["first event written"].append(written[1])
    counts["writes"].append(sum(e[1] == "enter_writev" for e in reply))
    counts["page writes"].append(sum(e[1] == "enter_pwrite64" for e in reply))
    counts["fsyncs"].append(sum(e[1] == "enter_fdatasync" for e in reply))
print(f"{len(requests) - 1} replies traced")
for step, times in sorted(found.items(), key=lambda item: statistics.median(item[1] or [0])):
    if times:
        print(f"  {statistics.median(times):6.3f}  {step}")
for what, values in counts.items():
    print(f"  {statistics.mean(values):6.1f}  {what} per reply")
PY
