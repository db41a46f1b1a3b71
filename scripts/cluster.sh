#!/usr/bin/env bash
# A real one-node Kubernetes 1.20 cluster on this machine, for end-to-end tests
# that need pods to run: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd (Debian's 1.6, run as a plain background process
# whose root, state and sockets live in DIR), one kubelet, and pod networking
# through the CNI bridge plugin on a private /24 of its own. The Kubernetes
# binaries come from Debian's kubernetes source package (scripts/test-env.sh
# install builds and caches them).
#
# What it is not: there is no kube-proxy and no cluster DNS, so Services get no
# ClusterIP routing. Reach pods by pod IP (the host routes the pod subnet over
# the bridge) or through the API server's proxy. The one exception is the
# `kubernetes` Service: the API server listens on that Service's ClusterIP
# itself (an address on the bridge), so pods' in-cluster configuration works.
# No registry either: images are loaded into containerd from docker-archive
# tarballs (`podman save --format docker-archive`); pods use them with
# `imagePullPolicy: Never` (or IfNotPresent).
#
#   scripts/cluster.sh install          idempotent: Debian packages, binaries, pause image
#   scripts/cluster.sh up DIR           start a cluster in DIR; writes DIR/env and DIR/kubeconfig
#   scripts/cluster.sh load DIR TAR...  load more docker-archive images into the running cluster
#   scripts/cluster.sh down DIR         stop it and leave the machine as `up` found it
#
# `up` loads every DIR/*.tar of PARLEY_CLUSTER_IMAGES (a directory), if set.
# DIR/env exports PARLEY_CLUSTER_KUBECONFIG, PARLEY_CLUSTER_NODE,
# PARLEY_CLUSTER_GATEWAY (the host's address on the pod bridge: host servers
# that pods must reach listen there, see PARLEY_TEST_BIND_ADDRESS in
# scripts/test-env.sh), PARLEY_CLUSTER_POD_CIDR, PARLEY_CLUSTER_API_SERVER,
# PARLEY_CLUSTER_CONTAINERD (the containerd socket, for `ctr`).
#
# Needs root. Several clusters can run side by side (each takes the first free
# bridge parley-cN with pods on 10.217.N.0/24 and its API server on 10.218.N.1).
# Changes outside DIR, all undone by `down`: the bridge and the pods' veths,
# the cgroup /parley-cluster-N in every cgroup v1 hierarchy, the sysctls the
# 1.20 kubelet sets at start (restored once the node is Ready and again on
# down), and the directories the kubelet and containerd's shims insist on
# (/var/log/pods, /var/log/containers, /var/lib/kubelet, /run/containerd/s),
# removed by the last cluster's `down` if the first one's `up` created them.
set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname "$0")" && pwd)"
CACHE_DIR="${PARLEY_CACHE_DIR:-/var/cache/parley}"
KUBE_BIN_DIR="$CACHE_DIR/kubernetes-1.20.2"
PAUSE_IMAGE="localhost/parley-pause:3.4"
PAUSE_ARCHIVE="$CACHE_DIR/parley-pause-3.4.tar"
CNI_BIN_DIR=/usr/lib/cni
# Machine-wide bookkeeping shared by the clusters running at the same time.
REGISTRY=/run/parley-cluster
REGISTRY_LOCK="$CACHE_DIR/.cluster.lock"
# The sysctls the 1.20 kubelet sets when it starts (it cannot be told not to).
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Directories outside DIR that the kubelet and containerd's shims create whatever they are told.
SHARED_DIRS=(/var/log/pods /var/log/containers /var/lib/kubelet /run/containerd)

LOG_NAME=cluster
# shellcheck source=scripts/common.sh
source "$SCRIPTS_DIR/common.sh"

require_root() { [ "$(id -u)" -eq 0 ] || die "run as root (containerd, the kubelet and the bridge need it)"; }

cmd_install() {
  require_root
  "$SCRIPTS_DIR/test-env.sh" install
  apt_install containerd runc podman containernetworking-plugins iproute2 openssl curl
  command -v kubectl >/dev/null || die "kubectl is missing (the machine image provides it)"
  (
    flock 9
    [ -f "$PAUSE_ARCHIVE" ] && exit 0
    # The pod sandbox image, from the pause binary test-env.sh built from the same source tree.
    local ctx
    ctx=$(mktemp -d /tmp/parley-pause.XXXXXX)
    cp "$KUBE_BIN_DIR/pause" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/Containerfile"
    podman build --runtime runc --pull=never -q -t "$PAUSE_IMAGE" "$ctx" >/dev/null
    podman save --quiet --format docker-archive -o "$PAUSE_ARCHIVE.partial" "$PAUSE_IMAGE"
    mv "$PAUSE_ARCHIVE.partial" "$PAUSE_ARCHIVE"
    rm -rf "$ctx"
    log "pause image cached at $PAUSE_ARCHIVE"
  ) 9>"$CACHE_DIR/.install.lock"
}

# Waits until the command succeeds, and stops waiting as soon as the process is gone.
wait_for_process() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs)) pid
  pid=$(cat "$DIR/pids/$name.pid")
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "$name exited: $(tail -3 "$DIR/logs/$name.log")"
    [ $SECONDS -lt $deadline ] || die "$name did not come up within ${secs}s (log: $DIR/logs/$name.log)"
    sleep 0.2
  done
}

start_bg() { # name, command...: runs in the background, PID in DIR/pids, output in DIR/logs
  local name=$1; shift
  "$@" >"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}

# Stops one process this cluster started, by the PID it recorded, and only if that
# PID still runs something of DIR (a PID can be reused).
stop_pid() { # name
  local pidfile="$DIR/pids/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if ours "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

ours() { # pid: true when the process's command line names DIR
  { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | grep -qF "$DIR/"
}

kubectl_admin() { kubectl --kubeconfig "$DIR/kubeconfig" "$@"; }
ctr_k8s() { ctr --address "$DIR/containerd/containerd.sock" --namespace k8s.io "$@"; }

cgroup_hierarchies() { # every cgroup mount point (v1 controllers and the cgroup2 one)
  awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo
}

# The first index whose bridge name and subnets nobody uses; creating the bridge claims it.
claim_bridge() {
  local n
  for n in $(seq 0 63); do
    ip -o addr show | grep -qE " 10\.21[78]\.$n\." && continue
    ip route show | grep -qE "^10\.21[78]\.$n\." && continue
    if ip link add "parley-c$n" type bridge 2>/dev/null; then
      echo "$n"
      return 0
    fi
  done
  die "no free parley-cN bridge (64 clusters running?)"
}

registry_join() { # first member records the sysctls and which shared directories are missing
  mkdir -p "$(dirname "$REGISTRY_LOCK")"
  (
    flock 8
    if [ ! -d "$REGISTRY/members" ]; then
      mkdir -p "$REGISTRY/members"
      for key in "${KUBELET_SYSCTLS[@]}"; do echo "$key=$(sysctl -n "$key")"; done >"$REGISTRY/sysctls"
      for dir in "${SHARED_DIRS[@]}"; do [ -e "$dir" ] || echo "$dir"; done >"$REGISTRY/created-dirs"
    fi
    touch "$REGISTRY/members/$BRIDGE"
  ) 8>"$REGISTRY_LOCK"
}

restore_sysctls() {
  [ -f "$REGISTRY/sysctls" ] || return 0
  local line now
  while IFS= read -r line; do
    now=$(sysctl -n "${line%%=*}")
    [ "$now" = "${line#*=}" ] && continue
    sysctl -q -w "$line"
    log "restored $line (was $now)"
  done <"$REGISTRY/sysctls"
}

registry_leave() { # the last member removes the shared directories the first one found missing
  [ -d "$REGISTRY" ] || return 0
  (
    flock 8
    restore_sysctls
    rm -f "$REGISTRY/members/$BRIDGE"
    if [ -z "$(ls -A "$REGISTRY/members" 2>/dev/null)" ]; then
      local dir
      while IFS= read -r dir; do
        [ -e "$dir" ] || continue
        case "$dir" in
          /run/containerd)
            [ ! -d "$dir/s" ] || rmdir "$dir/s" 2>/dev/null || true
            rmdir "$dir" 2>/dev/null || log "kept $dir: not empty"
            ;;
          *) rm -rf "$dir" ;;
        esac
      done <"$REGISTRY/created-dirs"
      rm -rf "$REGISTRY"
    fi
  ) 8>"$REGISTRY_LOCK"
}

write_pki() {
  local pki="$DIR/pki"
  mkdir -p "$pki"
  # P-256 keys: generated at once, where RSA keys take seconds on a busy machine.
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  # SEC1 ("EC PRIVATE KEY"): the 1.20 API server reads no PKCS#8 EC key.
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key"
  # The kubelet accepts only clients with a certificate from this CA: the API server.
  openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=parley-cluster-kubelet-ca" \
    -keyout "$pki/kubelet-ca.key" -out "$pki/kubelet-ca.crt" 2>/dev/null
  openssl req "${ec[@]}" -subj "/O=system:masters/CN=kube-apiserver" \
    -keyout "$pki/apiserver-kubelet-client.key" -out "$pki/apiserver-kubelet-client.csr" 2>/dev/null
  openssl x509 -req -days 2 -in "$pki/apiserver-kubelet-client.csr" -CA "$pki/kubelet-ca.crt" \
    -CAkey "$pki/kubelet-ca.key" -CAcreateserial -out "$pki/apiserver-kubelet-client.crt" 2>/dev/null
  TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$TOKEN,parley-cluster-admin,parley-cluster-admin,system:masters" >"$pki/tokens.csv"
}

write_containerd_config() {
  local c="$DIR/containerd"
  mkdir -p "$c/root" "$c/state" "$c/runc" "$c/opt" "$DIR/cni/net.d" "$DIR/cni/ipam"
  cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$c/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Lowering a container's oom_score_adj needs CAP_SYS_RESOURCE, which this machine withholds.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$c/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$DIR/cni/net.d"
EOF
  # isGateway stays off: the bridge already carries the gateway address, and the plugin
  # would otherwise switch on the host's IP forwarding. No ipMasq: no iptables rules.
  cat >"$DIR/cni/net.d/10-parley.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$BRIDGE",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$DIR/cni/ipam"
      }
    }
  ]
}
EOF
}

write_kubelet_config() {
  mkdir -p "$DIR/kubelet"
  cat >"$DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $KUBELET_PORT
# Report the node's status often, so that it shows Ready soon after the kubelet starts.
nodeStatusUpdateFrequency: 2s
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $DIR/pki/kubelet-ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
}

load_images() { # docker-archive tarballs
  local tar
  for tar in "$@"; do
    log "loading $(basename "$tar") into containerd"
    ctr_k8s images import "$tar" >/dev/null
  done
}

node_ready() {
  [ "$(kubectl_admin get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

default_token_exists() {
  [ -n "$(kubectl_admin get serviceaccount default -o jsonpath='{.secrets[0].name}')" ]
}

up_exited() {
  local status=$?
  [ "$status" -eq 0 ] && return 0
  log "up failed: tearing down"
  cmd_down "$DIR" || true
}

cmd_up() {
  require_root
  DIR=${1:?usage: up DIR}
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ -f "$DIR/cluster.env" ] && die "$DIR already holds a cluster: run scripts/cluster.sh down $DIR first"
  for bin in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [ -x "$KUBE_BIN_DIR/$bin" ] || die "$KUBE_BIN_DIR/$bin is missing: run scripts/cluster.sh install"
  done
  for cmd in containerd ctr runc etcd kubectl openssl; do
    command -v "$cmd" >/dev/null || die "$cmd is missing: run scripts/cluster.sh install"
  done
  if [ ! -x "$CNI_BIN_DIR/bridge" ] || [ ! -f "$PAUSE_ARCHIVE" ]; then
    die "not installed: run scripts/cluster.sh install"
  fi
  if [ -n "${PARLEY_CLUSTER_IMAGES:-}" ]; then
    [ -d "$PARLEY_CLUSTER_IMAGES" ] || die "PARLEY_CLUSTER_IMAGES=$PARLEY_CLUSTER_IMAGES is not a directory"
  fi
  local started=$SECONDS
  mkdir -p "$DIR/pids" "$DIR/logs"
  # A failed up takes down what it started.
  trap up_exited EXIT

  local index
  index=$(claim_bridge)
  BRIDGE="parley-c$index"
  GATEWAY="10.217.$index.1"
  POD_CIDR="10.217.$index.0/24"
  SERVICE_CIDR="10.218.$index.0/24"
  API_IP="10.218.$index.1"
  CGROUP_ROOT="parley-cluster-$index"
  NODE="parley-node-$index"
  KUBELET_PORT=$(free_port)
  KUBELET_HEALTHZ_PORT=$(free_port)
  local etcd_port etcd_peer
  etcd_port=$(free_port); etcd_peer=$(free_port)
  cat >"$DIR/cluster.env" <<EOF
BRIDGE=$BRIDGE
GATEWAY=$GATEWAY
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
API_IP=$API_IP
CGROUP_ROOT=$CGROUP_ROOT
NODE=$NODE
EOF
  ls -A /run/containerd/s 2>/dev/null >"$DIR/shim-sockets-before" || true
  registry_join

  # The bridge carries the pods' gateway and the API server's address (the `kubernetes`
  # Service's ClusterIP, so that pods reach it without kube-proxy).
  ip addr add "$GATEWAY/24" dev "$BRIDGE"
  ip addr add "$API_IP/32" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local hierarchy
  for hierarchy in $(cgroup_hierarchies); do mkdir -p "$hierarchy/$CGROUP_ROOT"; done

  write_pki
  log "[$((SECONDS - started))s] starting etcd on 127.0.0.1:$etcd_port"
  start_bg etcd etcd --name parley-cluster --data-dir "$DIR/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "parley-cluster=http://127.0.0.1:$etcd_peer"
  wait_for_process etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

  log "[$((SECONDS - started))s] starting kube-apiserver on $API_IP:443"
  start_bg kube-apiserver "$KUBE_BIN_DIR/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$API_IP" --secure-port 443 --insecure-port 0 --advertise-address "$API_IP" \
    --cert-dir "$DIR/pki" --token-auth-file "$DIR/pki/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/pki/sa.key" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --kubelet-client-certificate "$DIR/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$DIR/pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP
  wait_for_process kube-apiserver 90 curl -sf --cacert "$DIR/pki/apiserver.crt" -H "Authorization: Bearer $TOKEN" \
    "https://$API_IP:443/readyz"
  write_kubeconfig "$DIR/kubeconfig" parley-cluster "https://$API_IP:443" "$DIR/pki/apiserver.crt" "$TOKEN"

  log "[$((SECONDS - started))s] starting kube-controller-manager and kube-scheduler"
  start_bg kube-controller-manager "$KUBE_BIN_DIR/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
    --leader-elect=false --port 0 --secure-port 0 --use-service-account-credentials=false \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/apiserver.crt" \
    --controllers '*,-nodeipam,-cloud-node-lifecycle'
  start_bg kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" --kubeconfig "$DIR/kubeconfig" \
    --leader-elect=false --port 0 --secure-port 0

  log "[$((SECONDS - started))s] starting containerd"
  write_containerd_config
  start_bg containerd containerd --config "$DIR/containerd/config.toml"
  wait_for_process containerd 30 ctr --address "$DIR/containerd/containerd.sock" version
  load_images "$PAUSE_ARCHIVE"
  if [ -n "${PARLEY_CLUSTER_IMAGES:-}" ]; then
    local tars=()
    for tar in "$PARLEY_CLUSTER_IMAGES"/*.tar; do [ -f "$tar" ] && tars+=("$tar"); done
    load_images "${tars[@]}"
  fi

  log "[$((SECONDS - started))s] starting the kubelet (node $NODE, $GATEWAY)"
  write_kubelet_config
  start_bg kubelet "$KUBE_BIN_DIR/kubelet" --config "$DIR/kubelet/config.yaml" \
    --kubeconfig "$DIR/kubeconfig" --container-runtime remote \
    --container-runtime-endpoint "unix://$DIR/containerd/containerd.sock" \
    --root-dir "$DIR/kubelet/root" --cert-dir "$DIR/kubelet/pki" \
    --hostname-override "$NODE" --node-ip "$GATEWAY"
  wait_for_process kubelet 120 node_ready
  log "[$((SECONDS - started))s] node $NODE Ready"
  # The kubelet set its sysctls when it started; it does not look at them again.
  (flock 8; restore_sysctls) 8>"$REGISTRY_LOCK"
  # Pods need their namespace's service account and its token, which the controller
  # manager creates; until then the API server refuses them.
  wait_for "the token of service account default/default" 60 default_token_exists

  cat >"$DIR/env" <<EOF
export PARLEY_CLUSTER_KUBECONFIG=$DIR/kubeconfig
export PARLEY_CLUSTER_NODE=$NODE
export PARLEY_CLUSTER_GATEWAY=$GATEWAY
export PARLEY_CLUSTER_POD_CIDR=$POD_CIDR
export PARLEY_CLUSTER_API_SERVER=https://$API_IP:443
export PARLEY_CLUSTER_CONTAINERD=$DIR/containerd/containerd.sock
EOF
  trap - EXIT
  log "ready in $((SECONDS - started))s: source $DIR/env"
}

cmd_load() {
  require_root
  DIR=${1:?usage: load DIR TAR...}
  shift
  DIR=$(cd "$DIR" && pwd)
  [ -f "$DIR/env" ] || die "no running cluster in $DIR"
  load_images "$@"
}

pods_torn_down() { # no container or sandbox running, no veth left on the bridge
  [ -z "$(ctr_k8s tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"')" ] \
    && [ -z "$(ip -o link show master "$BRIDGE" 2>/dev/null)" ]
}

# Stops containers that outlived the kubelet, then containerd's shims, by PID.
stop_containers() {
  [ -S "$DIR/containerd/containerd.sock" ] || return 0
  local id
  for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
    ctr_k8s tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
    for _ in $(seq 1 50); do ctr_k8s tasks delete "$id" >/dev/null 2>&1 && break; sleep 0.1; done
  done
  for id in $(ctr_k8s containers ls -q 2>/dev/null); do
    ctr_k8s containers delete "$id" >/dev/null 2>&1 || true
  done
}

kill_shims() { # shims whose tasks are gone exit by themselves; these did not
  local pid
  for pid in $(pgrep -f -- "-address $DIR/containerd/containerd.sock" || true); do
    kill -9 "$pid" 2>/dev/null || true
  done
}

remove_cgroups() {
  local hierarchy pid
  for hierarchy in $(cgroup_hierarchies); do
    [ -d "$hierarchy/$CGROUP_ROOT" ] || continue
    # Anything still in a pod's cgroup is a container process of this cluster.
    find "$hierarchy/$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null \
      | while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done || true
    find "$hierarchy/$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "$hierarchy/$CGROUP_ROOT" ] && log "could not remove cgroup $hierarchy/$CGROUP_ROOT"
  done
  return 0
}

unmount_under_dir() {
  local mnt
  # Deepest first; mountinfo escapes spaces as \040, which DIR never contains.
  for mnt in $(awk -v d="$DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || log "could not unmount $mnt"
  done
}

# The kubelet removes a deleted pod's logs only at its next garbage collection: remove
# those of the pods this cluster still had (other clusters' pods log there too).
remove_pod_logs() {
  local uid link
  for uid in $(cat "$DIR/logs/pod-uids" 2>/dev/null); do
    rm -rf /var/log/pods/*_"$uid"
    for link in /var/log/containers/*.log; do
      [[ "$(readlink "$link")" == *"_$uid/"* ]] && rm -f "$link"
    done
  done
  return 0
}

remove_stale_shim_sockets() { # sockets our shims left, not the ones that were there before
  [ -d /run/containerd/s ] || return 0
  local sock
  for sock in /run/containerd/s/*; do
    [ -e "$sock" ] || continue
    grep -qxF "${sock##*/}" "$DIR/shim-sockets-before" 2>/dev/null && continue
    ss -xlH 2>/dev/null | grep -qF "$sock" && continue
    rm -f "$sock"
  done
}

cmd_down() {
  require_root
  DIR=${1:?usage: down DIR}
  [ -d "$DIR" ] || return 0
  DIR=$(cd "$DIR" && pwd)
  [ -f "$DIR/cluster.env" ] || return 0
  # shellcheck disable=SC1091
  source "$DIR/cluster.env"
  local started=$SECONDS
  rm -f "$DIR/env"
  # Controllers first, so that nothing recreates the pods deleted next.
  stop_pid kube-controller-manager
  stop_pid kube-scheduler
  ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 >"$DIR/logs/veths-seen" || true
  if [ -f "$DIR/pids/kubelet.pid" ] && [ -f "$DIR/kubeconfig" ]; then
    kubectl_admin get pods --all-namespaces -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' \
      >"$DIR/logs/pod-uids" 2>/dev/null || true
    # The kubelet tears each pod down properly: containers stopped, then the sandbox and
    # its network (CNI DEL removes the veth). Waiting for the pod objects to go would take
    # up to a minute more: the kubelet deletes them only after its next garbage collection.
    kubectl_admin delete pods --all --all-namespaces --grace-period=1 --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 60))
    until pods_torn_down; do
      [ $SECONDS -lt $deadline ] || { log "pods were not all torn down within 60s"; break; }
      sleep 0.2
    done
  fi
  stop_pid kubelet
  remove_pod_logs
  # kube-apiserver hangs on shutdown when etcd is already gone.
  stop_pid kube-apiserver
  stop_pid etcd
  stop_containers
  stop_pid containerd
  kill_shims
  unmount_under_dir
  remove_cgroups
  local veth
  for veth in $(cat "$DIR/logs/veths-seen" 2>/dev/null); do ip link delete "$veth" 2>/dev/null || true; done
  ip link delete "$BRIDGE" 2>/dev/null || true
  remove_stale_shim_sockets
  registry_leave
  rm -rf "$DIR/containerd" "$DIR/kubelet/root" "$DIR/etcd" "$DIR/cni/ipam"
  # What this cluster was, for scripts/machine-state.sh compare.
  mv "$DIR/cluster.env" "$DIR/logs/cluster.env"
  log "down in $((SECONDS - started))s (logs kept in $DIR/logs)"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up "${2:-}" ;;
  load) shift; cmd_load "$@" ;;
  down) cmd_down "${2:-}" ;;
  *) echo "usage: $0 install | up DIR | load DIR TAR... | down DIR" >&2; exit 2 ;;
esac
