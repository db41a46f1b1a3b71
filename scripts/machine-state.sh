#!/usr/bin/env bash
# Proves that `scripts/cluster.sh down` leaves the machine as `up` found it:
# snapshot the machine before `up` and after `down`, then compare.
#
#   scripts/machine-state.sh snapshot OUT          processes, mounts, links, addresses, routes,
#                                                  cgroups, sysctls, directories, shim sockets,
#                                                  iptables rules (read only)
#   scripts/machine-state.sh compare BEFORE AFTER DIR
#
# compare prints every difference and fails when one belongs to the cluster that ran
# in DIR: it names DIR, the cluster's bridge, veths, cgroup or subnets (from
# DIR/logs/cluster.env, which `down` leaves), or it is one of the sysctls, shared
# directories or shim sockets only a cluster changes. Other differences come from
# other work on the machine; they are listed but do not fail.
set -euo pipefail

# The sysctls the 1.20 kubelet sets at start, and the one the CNI bridge plugin would.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward)
DIRS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/kubelet/device-plugins
  /run/containerd /run/containerd/s /opt/containerd /var/lib/containerd /etc/kubernetes /run/netns)

die() { printf '[machine-state] error: %s\n' "$*" >&2; exit 1; }

snapshot() {
  local proc args cgroup
  for proc in /proc/[0-9]*; do
    args=$({ tr '\0\n' '  ' <"$proc/cmdline"; } 2>/dev/null | cut -c1-300) || continue
    # Kernel threads have no command line; this script's own processes do not count.
    if [ -z "$args" ] || [[ "$args" == *machine-state.sh* ]]; then continue; fi
    cgroup=$({ awk -F: '$2 == "pids" {print $3}' "$proc/cgroup"; } 2>/dev/null) || continue
    echo "process cgroup=$cgroup $args"
  done
  awk '{print "mount " $5 " " $9 " " $10}' /proc/self/mountinfo
  ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print "link " $2}'
  ip -o addr show | awk '{print "addr " $2 " " $4}'
  ip route show table all | sed 's/^/route /'
  local hierarchy
  for hierarchy in $(awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo); do
    find "$hierarchy" -mindepth 1 -maxdepth 2 -type d | sed 's/^/cgroup /'
  done
  local key
  for key in "${SYSCTLS[@]}"; do echo "sysctl $key=$(sysctl -n "$key")"; done
  local dir
  for dir in "${DIRS[@]}"; do
    if [ -e "$dir" ]; then echo "dir $dir"; fi
  done
  if [ -d /run/containerd/s ]; then ls -A /run/containerd/s | sed 's|^|socket /run/containerd/s/|'; fi
  if command -v iptables-save >/dev/null; then
    iptables-save | grep -v '^#' | sed -e 's/\[[0-9]*:[0-9]*\]//' -e 's/^/iptables /' || true
  fi
  return 0
}

compare() {
  local before=$1 after=$2 dir=$3
  [ -f "$dir/logs/cluster.env" ] || die "$dir/logs/cluster.env is missing: did scripts/cluster.sh down run?"
  local BRIDGE GATEWAY API_IP CGROUP_ROOT
  # shellcheck disable=SC1091
  source "$dir/logs/cluster.env"
  local pod_net=${GATEWAY%.*}. api_net=${API_IP%.*}.
  local markers=("$dir/" "$BRIDGE" "/$CGROUP_ROOT" "$pod_net" "$api_net")
  local veth
  for veth in $(cat "$dir/logs/veths-seen" 2>/dev/null); do markers+=("$veth"); done

  local ours=0 line mark attributed kind
  rm -f "$after.others"
  declare -A others=()
  while IFS= read -r line; do
    attributed=no
    kind=$(awk '{print $3}' <<<"$line")
    kind=${kind:-blank}
    case "$kind" in
      sysctl | dir | socket) attributed=yes ;;
    esac
    for mark in "${markers[@]}"; do
      [[ "$line" == *"$mark"* ]] && attributed=yes
    done
    if [ "$attributed" = yes ]; then
      echo "CLUSTER LEFTOVER  $line"
      ours=$((ours + 1))
    else
      echo "$line" >>"$after.others"
      others[$kind]=$((${others[$kind]:-0} + 1))
    fi
  done < <(comm -3 <(sort -u "$before") <(sort -u "$after") \
    | awk '/^\t/ {sub(/^\t/, ""); print "after only:  " $0; next} {print "before only: " $0}')
  local summary=""
  for kind in "${!others[@]}"; do summary+=" $kind:${others[$kind]}"; done
  echo "[machine-state] $ours difference(s) from the cluster; from other work on this machine:${summary:- none}${summary:+ (listed in $after.others)}"
  [ "$ours" -eq 0 ]
}

case "${1:-}" in
  snapshot) snapshot >"${2:?usage: snapshot OUT}" ;;
  compare) compare "${2:?usage: compare BEFORE AFTER DIR}" "${3:?}" "${4:?}" ;;
  *) echo "usage: $0 snapshot OUT | compare BEFORE AFTER DIR" >&2; exit 2 ;;
esac
