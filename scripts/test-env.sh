#!/usr/bin/env bash
# The real servers Parley's tests run against, set up by the project itself on a
# Debian bookworm machine as root:
#   kube-apiserver + etcd  (kube-apiserver built from Debian's source package, cached)
#   SecantusDB             (MongoDB wire protocol, from PyPI in a venv, cached)
#   redis-server           (Debian package)
#   Python test tools      (scripts/requirements-test.txt, pinned, in a cached venv)
# install also builds kubelet, kube-controller-manager, kube-scheduler and the pause
# binary for scripts/cluster.sh, in the same go build as kube-apiserver: CI needs all
# four, and one build of the packages they share costs far less than two.
#
#   scripts/test-env.sh install        idempotent; safe to re-run
#   scripts/test-env.sh start DIR      start everything on free loopback ports; writes DIR/env
#   scripts/test-env.sh stop DIR       stop everything started in DIR (apiserver before etcd)
#   scripts/test-env.sh python         print the interpreter of the Python test tools
#
# PARLEY_TEST_BIND_ADDRESS (default 127.0.0.1) is where `start` has SecantusDB and Redis
# listen, and what the URIs in DIR/env name: a cluster's PARLEY_CLUSTER_GATEWAY
# (scripts/cluster.sh) lets its pods reach them too. etcd and kube-apiserver stay on loopback.
set -euo pipefail

CACHE_DIR="${PARLEY_CACHE_DIR:-/var/cache/parley}"
KUBE_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_ORIG_TARBALL="kubernetes_1.20.5+really1.20.2.orig.tar.gz"
KUBE_VERSION="1.20.2"
# kube-apiserver, kubelet, kube-controller-manager, kube-scheduler and pause, built together.
KUBE_BIN_DIR="$CACHE_DIR/kubernetes-$KUBE_VERSION"
KUBE_APISERVER="$KUBE_BIN_DIR/kube-apiserver"
# Where checkouts older than KUBE_BIN_DIR look for (and otherwise build) kube-apiserver alone.
LEGACY_KUBE_APISERVER="$CACHE_DIR/kube-apiserver-$KUBE_VERSION/kube-apiserver"
PAUSE_VERSION="3.4"
SECANTUS_VERSION="0.7.0b3"
SECANTUS_VENV="$CACHE_DIR/secantusdb-$SECANTUS_VERSION"
SCRIPTS_DIR="$(cd "$(dirname "$0")" && pwd)"
TOOLS_REQUIREMENTS="$SCRIPTS_DIR/requirements-test.txt"

LOG_NAME=test-env
# shellcheck source=scripts/common.sh
source "$SCRIPTS_DIR/common.sh"

enable_deb_src() {
  local sources=/etc/apt/sources.list.d/parley-deb-src.sources
  [ -f "$sources" ] && return 0
  local main=/etc/apt/sources.list.d/debian.sources
  [ -f "$main" ] || die "no $main to copy the Debian mirror from"
  # The first stanza of debian.sources is the main archive: copy its URIs and Signed-By.
  local uris signed_by
  uris=$(awk '/^$/{exit} /^URIs:/{print $2}' "$main")
  signed_by=$(awk '/^$/{exit} /^Signed-By:/{print $2}' "$main")
  [ -n "$uris" ] || die "could not read URIs from $main"
  log "enabling deb-src from $uris"
  as_root tee "$sources" >/dev/null <<EOF
Types: deb-src
URIs: $uris
Suites: bookworm
Components: main
Signed-By: $signed_by
EOF
}

# One make for all four binaries, so that the packages they share compile once.
build_kubernetes() {
  [ -d "$KUBE_BIN_DIR" ] || {
    enable_deb_src
    as_root apt-get update -qq
    apt_install golang-go etcd-server etcd-client rsync golang-github-modern-go-reflect2-dev gcc libc6-dev
    local work started=$SECONDS
    work=$(mktemp -d /tmp/parley-kube-build.XXXXXX)
    log "building kube-apiserver, kubelet, kube-controller-manager, kube-scheduler from Debian's kubernetes source package in $work (about 10 CPU-minutes: 5 to 6 minutes on 2 idle cores)"
    (
      cd "$work"
      apt-get source --download-only "kubernetes=$KUBE_DEB_VERSION" >/dev/null
      mkdir -p gopath/src/k8s.io src
      tar -xzf "$KUBE_ORIG_TARBALL" -C src --strip-components=1
      # The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first custom-resource write.
      rm -rf src/vendor/github.com/modern-go/reflect2
      cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 src/vendor/github.com/modern-go/reflect2
      rm -f src/vendor/github.com/modern-go/reflect2/go.mod
      ln -s "$work/src" gopath/src/k8s.io/kubernetes
      cd gopath/src/k8s.io/kubernetes
      GOPATH="$work/gopath" GOCACHE="$work/gocache" CGO_ENABLED=0 GOPROXY=off \
        make WHAT="cmd/kube-apiserver cmd/kubelet cmd/kube-controller-manager cmd/kube-scheduler" \
        GOLDFLAGS="-s -w" >"$work/build.log" 2>&1 \
        || { tail -50 "$work/build.log" >&2; exit 1; }
      # The pod sandbox's pause process, as the source tree's build/pause/Makefile builds it.
      gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-debian-$KUBE_VERSION" \
        -o "$work/pause" build/pause/linux/pause.c
      # Renaming a finished directory into place keeps the cache all-or-nothing.
      local staging="$KUBE_BIN_DIR.partial"
      as_root rm -rf "$staging"
      as_root mkdir -p "$staging"
      as_root install -m 0755 _output/local/bin/linux/*/{kube-apiserver,kubelet,kube-controller-manager,kube-scheduler} \
        "$work/pause" "$staging/"
      as_root mv "$staging" "$KUBE_BIN_DIR"
    )
    rm -rf "$work"
    log "kubernetes binaries cached in $KUBE_BIN_DIR (built in $((SECONDS - started))s)"
  }
  if [ ! -x "$LEGACY_KUBE_APISERVER" ]; then
    as_root mkdir -p "$(dirname "$LEGACY_KUBE_APISERVER")"
    as_root ln -f "$KUBE_APISERVER" "$LEGACY_KUBE_APISERVER"
  fi
}

install_secantus() {
  [ -f "$SECANTUS_VENV/.complete" ] && return 0
  log "installing SecantusDB $SECANTUS_VERSION into $SECANTUS_VENV"
  as_root mkdir -p "$CACHE_DIR"
  rm -rf "$SECANTUS_VENV"
  python3 -m venv "$SECANTUS_VENV"
  "$SECANTUS_VENV/bin/pip" install -q --disable-pip-version-check "secantusdb==$SECANTUS_VERSION"
  [ -x "$SECANTUS_VENV/bin/secantusd-py" ] || die "secantusd-py missing after install"
  touch "$SECANTUS_VENV/.complete"
}

# The venv is keyed by the requirements file's content, so editing the file
# builds a fresh one and an unchanged file reuses the cached one.
tools_venv() {
  echo "$CACHE_DIR/pytools-$(sha256sum "$TOOLS_REQUIREMENTS" | cut -c1-12)"
}

install_python_tools() {
  local venv
  venv=$(tools_venv)
  [ -f "$venv/.complete" ] && return 0
  log "installing the Python test tools into $venv"
  as_root mkdir -p "$CACHE_DIR"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$TOOLS_REQUIREMENTS"
  touch "$venv/.complete"
}

cmd_install() {
  # Installs started at the same time (several worktrees, several sessions)
  # wait for each other instead of building the same thing twice.
  as_root mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.install.lock"
  flock 9
  apt_install etcd-server etcd-client redis-server openssl python3-venv curl
  install_secantus
  install_python_tools
  build_kubernetes
  log "installed"
}

cmd_start() {
  local dir=${1:?usage: start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -x "$KUBE_APISERVER" ] && [ -f "$SECANTUS_VENV/.complete" ] && [ -f "$(tools_venv)/.complete" ] \
    && command -v redis-server >/dev/null \
    || die "servers are not installed: run scripts/test-env.sh install"
  [ -f "$dir/env" ] && die "$dir already has a running environment: stop it first"

  local bind=${PARLEY_TEST_BIND_ADDRESS:-127.0.0.1}
  local etcd_port etcd_peer apiserver_port mongo_port redis_port
  etcd_port=$(free_port); etcd_peer=$(free_port); apiserver_port=$(free_port)
  mongo_port=$(free_port); redis_port=$(free_port)

  log "starting etcd on 127.0.0.1:$etcd_port"
  etcd --name parley-test --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "parley-test=http://127.0.0.1:$etcd_peer" >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  wait_for etcd 20 curl -sf "http://127.0.0.1:$etcd_port/health"

  log "starting kube-apiserver on 127.0.0.1:$apiserver_port"
  mkdir -p "$dir/pki"
  openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
  local token
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,parley-test-admin,parley-test-admin,system:masters" >"$dir/pki/tokens.csv"
  "$KUBE_APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 \
    --secure-port "$apiserver_port" --insecure-port 0 --cert-dir "$dir/pki" \
    --token-auth-file "$dir/pki/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$dir/pki/sa.key" --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --advertise-address 127.0.0.1 \
    --disable-admission-plugins ServiceAccount >"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
  wait_for kube-apiserver 60 curl -sf --cacert "$dir/pki/apiserver.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$apiserver_port/readyz"
  write_kubeconfig "$dir/kubeconfig" parley-test "https://127.0.0.1:$apiserver_port" "$dir/pki/apiserver.crt" "$token"

  log "starting SecantusDB on $bind:$mongo_port"
  mkdir -p "$dir/mongo"
  "$SECANTUS_VENV/bin/secantusd-py" --host "$bind" --port "$mongo_port" --storage-path "$dir/mongo" \
    >"$dir/secantusdb.log" 2>&1 &
  echo $! >"$dir/secantusdb.pid"
  wait_for SecantusDB 30 python3 -c "import socket; socket.create_connection(('$bind', $mongo_port), 1)"

  log "starting redis on $bind:$redis_port"
  # Redis refuses clients from other addresses than loopback unless protected mode is off;
  # any other bind address is a private bridge's.
  local protected=yes
  [ "$bind" = 127.0.0.1 ] || protected=no
  redis-server --port "$redis_port" --bind "$bind" --protected-mode "$protected" --save '' --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
  wait_for redis 20 redis-cli -h "$bind" -p "$redis_port" ping

  cat >"$dir/env" <<EOF
export PARLEY_TEST_KUBECONFIG=$dir/kubeconfig
export PARLEY_TEST_MONGODB_URI=mongodb://$bind:$mongo_port
export PARLEY_TEST_REDIS_URL=redis://$bind:$redis_port
export PARLEY_TEST_PYTHON=$(tools_venv)/bin/python
EOF
  log "ready: source $dir/env"
}

stop_pid() { # name, dir
  local pidfile="$2/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cmd_stop() {
  local dir=${1:?usage: stop DIR}
  [ -d "$dir" ] || return 0
  # kube-apiserver hangs on shutdown when etcd is already gone: stop it first.
  stop_pid kube-apiserver "$dir"
  stop_pid etcd "$dir"
  stop_pid secantusdb "$dir"
  stop_pid redis "$dir"
  rm -f "$dir/env"
  log "stopped servers in $dir"
}

# The Python interpreter of the installed test tools (for scripts run alone).
cmd_python() {
  local venv
  venv=$(tools_venv)
  [ -f "$venv/.complete" ] || die "the Python test tools are not installed: run scripts/test-env.sh install"
  echo "$venv/bin/python"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  python) cmd_python ;;
  *) echo "usage: $0 install | start DIR | stop DIR | python" >&2; exit 2 ;;
esac
