# shellcheck shell=bash
# Helpers shared by the scripts that install and start test servers. Sourced, not
# run: the caller sets LOG_NAME first.

log() { printf '[%s] %s\n' "$LOG_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() { # Debian packages, only the missing ones
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
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

write_kubeconfig() { # file, name, server URL, CA file, bearer token
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $2
  cluster:
    server: $3
    certificate-authority: $4
users:
- name: $2-admin
  user:
    token: $5
contexts:
- name: $2
  context: {cluster: $2, user: $2-admin}
current-context: $2
EOF
}

# The workspace's binaries in target/debug, built as `cargo nextest run
# --workspace` builds them: with the features that the tests'
# dev-dependencies add (tokio's test-util among them). A plain
# `cargo build --bins` resolves features without those, so it compiles tokio
# and every crate above it a second time (minutes, and gigabytes of target/)
# and replaces the binaries the tests ran. After the rust suite it compiles
# nothing.
build_test_binaries() {
  cargo build --locked --workspace --bins --tests >&2
}

# Builds the release binaries and starts the gateway benchmark in the
# background (20 s per phase; PARLEY_BENCH_SERVICE, when set, names the build
# it runs), its output in a file; returns once the service's phase has begun,
# with the benchmark's pid in `bench` and the service's in `service_pid`.
start_gateway_bench() { # clients, replies in the long session, output file
  cargo build --release -p parley-service --bins --benches
  local service=${PARLEY_BENCH_SERVICE:-$PWD/target/release/parley-service}
  PARLEY_BENCH_SERVICE=$service PARLEY_BENCH_CONCURRENCY=$1 PARLEY_BENCH_SECONDS=20 \
    PARLEY_BENCH_SESSION_REPLIES=$2 \
    cargo bench -q -p parley-service --bench gateway >"$3" 2>&1 &
  bench=$!
  # pgrep matches the first 15 characters of a process's name.
  local name
  name=$(basename "$service" | cut -c1-15)
  service_pid=""
  for _ in $(seq 1 240); do
    service_pid=$(pgrep -n -x "$name" || true)
    [ -n "$service_pid" ] && break
    sleep 0.5
  done
  [ -n "$service_pid" ] || die "the benchmark's service did not start"
  # The benchmark first measures the mock alone (20 s), then through Parley.
  sleep 25
}
