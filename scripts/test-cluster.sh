#!/usr/bin/env bash
# Proves scripts/cluster.sh on this machine: a real one-node cluster comes up and
# runs pods from a locally built image, and `down` leaves the machine as it was.
#   cluster up; a pod Running and answering HTTP on its pod IP (and through the
#   API server's proxy); kubectl logs and exec; a 2-replica Deployment available;
#   a pod reaching the test Redis and MongoDB-wire servers on the host through the
#   bridge's gateway address; an image loaded into the running cluster, whose pod
#   reaches the API server the way in-cluster clients (an operator) do; down; no
#   trace of the cluster left (scripts/machine-state.sh). Prints the timings.
# Needs root. Runs alone: scripts/test-cluster.sh (installs what it needs; the first
# run on a machine builds the Kubernetes binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

PROBE_IMAGE="localhost/parley-cluster-probe:1"
CLIENT_IMAGE="localhost/parley-cluster-kubectl:1"
timings=()
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1fs", b - a}'; }
timing() { timings+=("$(printf '%-34s %s' "$1" "$2")"); echo "[test-cluster] $1: $2"; }
failure=""
fail() { failure="$*"; echo "[test-cluster] FAILED: $*" >&2; exit 1; }
trap 'failure=${failure:-"line $LINENO: $BASH_COMMAND"}' ERR

t=$(now)
scripts/cluster.sh install
# The test image's userland: a static busybox runs on an empty base.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
timing "install (binaries built if cold)" "$(elapsed "$t")"

work=$(mktemp -d /tmp/parley-test-cluster.XXXXXX)
cluster_dir="$work/cluster"
env_dir="$work/env"
cleanup() {
  local status=$?
  scripts/test-env.sh stop "$env_dir" >/dev/null 2>&1 || true
  scripts/cluster.sh down "$cluster_dir" || true
  if [ "$status" -ne 0 ]; then
    echo "[test-cluster] logs of the failed run:" >&2
    for f in "$cluster_dir"/logs/*.log; do
      [ -f "$f" ] && { echo "--- $f (last 15 lines)"; tail -15 "$f"; } >&2
    done
    # Again after the logs, where it is seen.
    echo "[test-cluster] FAILED: ${failure:-exit status $status}" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Images built here like the project's, with podman and without a registry, on an empty
# base: busybox's httpd, sh and nc; and kubectl (static), an in-cluster API client.
t=$(now)
mkdir -p "$work/probe/rootfs/bin" "$work/probe/rootfs/www" "$work/probe/rootfs/tmp" "$work/images" "$work/client"
cp /bin/busybox "$work/probe/rootfs/bin/busybox"
for applet in sh httpd nc hostname cat echo printf grep head; do
  ln -s busybox "$work/probe/rootfs/bin/$applet"
done
printf 'FROM scratch\nCOPY rootfs /\nENV PATH=/bin\n' >"$work/probe/Containerfile"
podman build --runtime runc --pull=never -q -t "$PROBE_IMAGE" "$work/probe" >/dev/null
podman save --quiet --format docker-archive -o "$work/images/probe.tar" "$PROBE_IMAGE"
cp -L "$(command -v kubectl)" "$work/client/kubectl"
printf 'FROM scratch\nCOPY kubectl /kubectl\nENTRYPOINT ["/kubectl"]\n' >"$work/client/Containerfile"
podman build --runtime runc --pull=never -q -t "$CLIENT_IMAGE" "$work/client" >/dev/null
podman save --quiet --format docker-archive -o "$work/kubectl.tar" "$CLIENT_IMAGE"
timing "test images built and saved" "$(elapsed "$t")"

scripts/machine-state.sh snapshot "$work/machine-before"

t=$(now)
PARLEY_CLUSTER_IMAGES="$work/images" scripts/cluster.sh up "$cluster_dir"
timing "cluster up (node Ready)" "$(elapsed "$t")"
# shellcheck disable=SC1091
source "$cluster_dir/env"
k() { kubectl --kubeconfig "$PARLEY_CLUSTER_KUBECONFIG" "$@"; }

# A container of the local image serving "hello from <pod name>" on port 8080, Ready once it answers.
web_container() { # name
  printf '{name: %s, image: %s, imagePullPolicy: Never, %s, %s}' "$1" "$PROBE_IMAGE" \
    "command: [sh, -c, 'echo \"hello from \$(hostname)\" >/www/index.html && echo serving on 8080 && exec httpd -f -p 8080 -h /www']" \
    'readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}'
}

# --- a pod from the local image, Running and answering on its pod IP
t=$(now)
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {containers: [$(web_container web)]}
EOF
k wait --for=condition=Ready pod/web --timeout=120s >/dev/null || fail "pod web did not become Ready"
timing "pod Running and Ready" "$(elapsed "$t")"
pod_ip=$(k get pod web -o jsonpath='{.status.podIP}')
answer=$(curl -sf --max-time 5 "http://$pod_ip:8080/") || fail "no HTTP answer from the pod at $pod_ip:8080"
[ "$answer" = "hello from web" ] || fail "pod at $pod_ip answered '$answer'"
echo "[test-cluster] pod web at $pod_ip answers: $answer"
answer=$(k get --raw "/api/v1/namespaces/default/pods/web:8080/proxy/") || fail "API server proxy to the pod failed"
[ "$answer" = "hello from web" ] || fail "the API server's proxy to pod web answered '$answer'"
echo "[test-cluster] through the API server's proxy: $answer"

# --- kubectl logs and exec
k logs web | grep -qx "serving on 8080" || fail "kubectl logs web lacks the start line: $(k logs web 2>&1)"
answer=$(k exec web -- sh -c 'echo "exec in $(hostname)"') || fail "kubectl exec failed"
[ "$answer" = "exec in web" ] || fail "kubectl exec answered '$answer'"
echo "[test-cluster] kubectl logs and exec work"

# --- a 2-replica Deployment, available, every replica answering on its pod IP
t=$(now)
k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec: {containers: [$(web_container echo)]}
EOF
k rollout status deployment/echo --timeout=120s >/dev/null || fail "deployment echo did not roll out"
available=$(k get deployment echo -o jsonpath='{.status.availableReplicas}')
[ "$available" = 2 ] || fail "deployment echo has $available available replicas, not 2"
timing "2-replica Deployment available" "$(elapsed "$t")"
for pod in $(k get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP}{"\n"}{end}'); do
  answer=$(curl -sf --max-time 5 "http://${pod#*=}:8080/") || fail "replica ${pod%%=*} does not answer"
  [ "$answer" = "hello from ${pod%%=*}" ] || fail "replica ${pod%%=*} answered '$answer'"
done
echo "[test-cluster] both replicas of deployment echo answer on their pod IPs"

# --- pods reach the host's test servers through the bridge's gateway address
PARLEY_TEST_BIND_ADDRESS="$PARLEY_CLUSTER_GATEWAY" scripts/test-env.sh start "$env_dir" >/dev/null
# shellcheck disable=SC1091
source "$env_dir/env"
redis_port=${PARLEY_TEST_REDIS_URL##*:}
answer=$(k exec web -- sh -c "printf 'PING\r\n' | nc -w 2 $PARLEY_CLUSTER_GATEWAY $redis_port") \
  || fail "the pod could not reach Redis at $PARLEY_CLUSTER_GATEWAY:$redis_port"
[[ "$answer" == "+PONG"* ]] || fail "Redis answered the pod '$answer'"
echo "[test-cluster] pod web -> Redis at $PARLEY_CLUSTER_GATEWAY:$redis_port: PING answered +PONG"
# A MongoDB wire-protocol hello (OP_MSG {hello: 1, $db: "admin"}), written as printf escapes.
hello=$(python3 - <<'EOF'
import struct
def cstr(s): return s.encode() + b"\0"
body = b"\x10" + cstr("hello") + struct.pack("<i", 1) + b"\x02" + cstr("$db") + struct.pack("<i", 6) + cstr("admin") + b"\0"
doc = struct.pack("<i", len(body) + 4) + body
msg = struct.pack("<i", 0) + b"\0" + doc
packet = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013) + msg
print("".join("\\%03o" % b for b in packet))
EOF
)
mongo_port=${PARLEY_TEST_MONGODB_URI##*:}
answer=$(k exec web -- sh -c "printf '$hello' | nc -w 2 $PARLEY_CLUSTER_GATEWAY $mongo_port | grep -c maxWireVersion") \
  || fail "the pod got no hello reply from SecantusDB at $PARLEY_CLUSTER_GATEWAY:$mongo_port"
echo "[test-cluster] pod web -> SecantusDB at $PARLEY_CLUSTER_GATEWAY:$mongo_port: hello answered"
scripts/test-env.sh stop "$env_dir" >/dev/null

# --- an image loaded into the running cluster, and an in-cluster client (like an operator
# pod): the API server listens on the `kubernetes` Service's ClusterIP, with a certificate
# for that address from the CA in the pod's service account secret.
scripts/cluster.sh load "$cluster_dir" "$work/kubectl.tar"
k create rolebinding client-view --clusterrole view --serviceaccount default:default >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  containers:
  - name: kubectl
    image: $CLIENT_IMAGE
    imagePullPolicy: Never
    args: [get, pod, web, -o, 'jsonpath={.metadata.name}']
EOF
k wait --for=jsonpath='{.status.phase}'=Succeeded pod/client --timeout=60s >/dev/null \
  || fail "kubectl in pod client did not succeed: $(k logs client 2>&1)"
answer=$(k logs client)
[ "$answer" = web ] || fail "kubectl in pod client got '$answer'"
echo "[test-cluster] pod client -> API server with its in-cluster configuration (TLS verified, service account token)"

t=$(now)
scripts/cluster.sh down "$cluster_dir"
timing "cluster down" "$(elapsed "$t")"
scripts/machine-state.sh snapshot "$work/machine-after"
scripts/machine-state.sh compare "$work/machine-before" "$work/machine-after" "$cluster_dir" \
  || fail "the cluster left traces on the machine (listed above)"

echo "=== cluster timings"
printf '%s\n' "${timings[@]}"
