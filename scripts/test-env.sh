#!/usr/bin/env bash
# The real servers Parley's tests run against, set up by the project itself on a
# Debian bookworm machine as root (see ../shared/TEST-INFRA.md for why each choice):
#   kube-apiserver + etcd  (kube-apiserver built from Debian's source package, cached)
#   SecantusDB             (MongoDB wire protocol, from PyPI in a venv, cached)
#   redis-server           (Debian package)
#   Python test tools      (scripts/requirements-test.txt, pinned, in a cached venv)
#
#   scripts/test-env.sh install        idempotent; safe to re-run
#   scripts/test-env.sh start DIR      start everything on free loopback ports; writes DIR/env
#   scripts/test-env.sh stop DIR       stop everything started in DIR (apiserver before etcd)
#   scripts/test-env.sh python         print the interpreter of the Python test tools
set -euo pipefail

CACHE_DIR="${PARLEY_CACHE_DIR:-/var/cache/parley}"
KUBE_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_ORIG_TARBALL="kubernetes_1.20.5+really1.20.2.orig.tar.gz"
KUBE_APISERVER="$CACHE_DIR/kube-apiserver-1.20.2/kube-apiserver"
SECANTUS_VERSION="0.7.0b3"
SECANTUS_VENV="$CACHE_DIR/secantusdb-$SECANTUS_VERSION"
SCRIPTS_DIR="$(cd "$(dirname "$0")" && pwd)"
TOOLS_REQUIREMENTS="$SCRIPTS_DIR/requirements-test.txt"

log() { printf '[test-env] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

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

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

build_kube_apiserver() {
  [ -x "$KUBE_APISERVER" ] && return 0
  enable_deb_src
  as_root apt-get update -qq
  apt_install golang-go etcd-server etcd-client rsync golang-github-modern-go-reflect2-dev
  local work
  work=$(mktemp -d /tmp/parley-kube-build.XXXXXX)
  log "building kube-apiserver from Debian's kubernetes source package in $work (about 5 minutes)"
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
      make WHAT=cmd/kube-apiserver GOLDFLAGS="-s -w" >"$work/build.log" 2>&1 \
      || { tail -50 "$work/build.log" >&2; exit 1; }
    as_root mkdir -p "$(dirname "$KUBE_APISERVER")"
    as_root install -m 0755 _output/local/bin/linux/*/kube-apiserver "$KUBE_APISERVER.tmp"
    as_root mv "$KUBE_APISERVER.tmp" "$KUBE_APISERVER"
  )
  rm -rf "$work"
  log "kube-apiserver cached at $KUBE_APISERVER"
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
  build_kube_apiserver
  log "installed"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not come up within ${secs}s"
    sleep 0.2
  done
}

cmd_start() {
  local dir=${1:?usage: start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -x "$KUBE_APISERVER" ] && [ -f "$SECANTUS_VENV/.complete" ] && [ -f "$(tools_venv)/.complete" ] \
    && command -v redis-server >/dev/null \
    || die "servers are not installed: run scripts/test-env.sh install"
  [ -f "$dir/env" ] && die "$dir already has a running environment: stop it first"

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
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: parley-test
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority: $dir/pki/apiserver.crt
users:
- name: parley-test-admin
  user:
    token: $token
contexts:
- name: parley-test
  context: {cluster: parley-test, user: parley-test-admin}
current-context: parley-test
EOF

  log "starting SecantusDB on 127.0.0.1:$mongo_port"
  mkdir -p "$dir/mongo"
  "$SECANTUS_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$mongo_port" --storage-path "$dir/mongo" \
    >"$dir/secantusdb.log" 2>&1 &
  echo $! >"$dir/secantusdb.pid"
  wait_for SecantusDB 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $mongo_port), 1)"

  log "starting redis on 127.0.0.1:$redis_port"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
  wait_for redis 20 redis-cli -p "$redis_port" ping

  cat >"$dir/env" <<EOF
export PARLEY_TEST_KUBECONFIG=$dir/kubeconfig
export PARLEY_TEST_MONGODB_URI=mongodb://127.0.0.1:$mongo_port
export PARLEY_TEST_REDIS_URL=redis://127.0.0.1:$redis_port
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
