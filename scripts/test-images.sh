#!/usr/bin/env bash
# Suite `images`: builds both container images with scripts/images.sh (podman,
# on the base made here from Debian packages) and checks them by running them:
#   - labels: source, version (the workspace version), revision (this commit),
#     title, description, licenses; user 65532;
#   - no shell and no package manager in either image;
#   - the service with a read-only root filesystem (no writable /tmp either),
#     as uid 65532, its data dir on a tmpfs: /health, /ready, a session made
#     with a token from the image's own `parley-service token`, and a streamed
#     reply on the simulated model that reaches `complete`; then SIGTERM stops
#     it cleanly;
#   - the operator without any cluster configuration: a clear log line and a
#     non-zero exit, not a panic.
# The binaries are the dev profile's, by default: what scripts/test.sh's
# rust suite built and tested, so the suite compiles
# nothing (a cold release build costs about 25 CPU-minutes). Checking the
# release images, as published: PARLEY_TEST_IMAGES_PROFILE=release.
# Runs alone (as root on Debian; installs podman and runc when missing):
#   scripts/test-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test-images] %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
# This kind of machine: runc (crun refuses cgroup v1) and a nofile limit
# below podman's default request.
podman_run() {
  podman --runtime runc run --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 "$@"
}

started=$SECONDS
profile=${PARLEY_TEST_IMAGES_PROFILE:-dev}
images_args=(--profile "$profile")
if [ "$profile" = dev ]; then
  # shellcheck source=scripts/common.sh
  (LOG_NAME=test-images && source scripts/common.sh && build_test_binaries)
  images_args+=(--prebuilt)
fi
built=$(scripts/images.sh "${images_args[@]}")
log "images built in $((SECONDS - started))s; sizes with the $profile profile's binaries:"
printf '%s\n' "$built"
service_image=$(awk '$1 == "parley-service" {print $2}' <<<"$built")
operator_image=$(awk '$1 == "parley-operator" {print $2}' <<<"$built")
if [ -z "$service_image" ] || [ -z "$operator_image" ]; then fail "scripts/images.sh named no images"; fi

version=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "parley-service"))')
revision=$(git rev-parse HEAD)
git diff --quiet HEAD -- || revision="$revision-dirty"

check_labels() { # image title
  podman image inspect "$1" | python3 -c '
import json, sys
image, title, version, revision = sys.argv[1:]
config = json.load(sys.stdin)[0]["Config"]
labels = config.get("Labels") or {}
expected = {
    "org.opencontainers.image.source": "https://github.com/parley-dev/parley",
    "org.opencontainers.image.version": version,
    "org.opencontainers.image.revision": revision,
    "org.opencontainers.image.title": title,
    "org.opencontainers.image.licenses": "Apache-2.0",
}
wrong = {key: (labels.get(key), want) for key, want in expected.items() if labels.get(key) != want}
if wrong:
    sys.exit(f"{image}: labels (found, expected): {wrong}")
if not labels.get("org.opencontainers.image.description"):
    sys.exit(f"{image}: no description label")
user = config.get("User")
if user != "65532:65532":
    sys.exit(f"{image}: runs as {user!r}, not 65532:65532")
' "$1" "$2" "$version" "$revision" || fail "labels of $1"
  log "$1: labels and user 65532 ok"
}

check_no_shell() { # image
  local program status
  for program in sh bash dash busybox /bin/sh /usr/bin/sh apt-get apt dpkg; do
    status=0
    podman_run --rm --network none --entrypoint "$program" "$1" --version >/dev/null 2>&1 || status=$?
    # 127: podman found no such executable in the image.
    [ "$status" -eq 127 ] || fail "$1 has $program (running it exited $status)"
  done
  log "$1: no shell, no package manager"
}

check_labels "$service_image" parley-service
check_labels "$operator_image" parley-operator
check_no_shell "$service_image"
check_no_shell "$operator_image"

# The operator, with no in-cluster service account and no kubeconfig.
set +e
operator_output=$(podman_run --rm --network none --read-only "$operator_image" 2>&1)
operator_status=$?
set -e
printf '  | %s\n' "$operator_output" >&2
[ "$operator_status" -ne 0 ] || fail "the operator exited 0 without a cluster"
if grep -q 'panicked' <<<"$operator_output"; then fail "the operator panicked"; fi
grep -q '"level":"ERROR".*no Kubernetes cluster configured' <<<"$operator_output" \
  || fail "the operator did not log that no cluster is configured"
log "operator without a cluster: exit $operator_status and a clear error line"

# The service: read-only root, nothing writable but its data dir.
secret="images-test-secret-$RANDOM$RANDOM$RANDOM-0123456789"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
name="parley-test-images-$$"
token=$(podman_run --rm --network none --read-only --read-only-tmpfs=false --user 65532:65532 \
  -e PARLEY_JWT_SECRET="$secret" "$service_image" token --sub alice --role user --ttl 10m) \
  || fail "parley-service token failed in the image"
podman_run -d --name "$name" --read-only --read-only-tmpfs=false --user 65532:65532 \
  --tmpfs /var/lib/parley:rw,size=64m,mode=0700,U \
  -p "127.0.0.1:$port:8080" \
  -e PARLEY_JWT_SECRET="$secret" -e PARLEY_INITIAL_CREDITS=10 \
  -e PARLEY_SIMULATED_FIRST_TOKEN_MILLIS=10 \
  "$service_image" >/dev/null
cleanup() { podman rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
base="http://127.0.0.1:$port"

deadline=$((SECONDS + 60))
until curl -sf "$base/health" >/dev/null; do
  if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
    podman logs "$name" >&2
    fail "the service container stopped"
  fi
  [ $SECONDS -lt $deadline ] || { podman logs "$name" >&2; fail "no /health answer within 60s"; }
  sleep 0.2
done
curl -sf "$base/ready" >/dev/null || fail "/ready did not answer 200"
log "service: /health and /ready answer (read-only root, uid 65532)"

session=$(curl -sf -X POST "$base/api/chat/sessions" -H "authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"title":"images"}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["sessionId"])') \
  || fail "creating a session with the minted token"
message="hello from the image"
curl -sfN --max-time 60 -X POST "$base/api/chat/sessions/$session/stream" \
  -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"message\":\"$message\"}" \
  | python3 -c '
import json, sys
message = sys.argv[1]
events, event = [], {}
for line in sys.stdin.read().splitlines():
    if not line:
        if event:
            events.append(event)
        event = {}
    elif line.startswith("event:"):
        event["event"] = line[len("event:"):].strip()
    elif line.startswith("data:"):
        event["data"] = json.loads(line[len("data:"):])
names = [e.get("event") for e in events]
if "complete" not in names:
    sys.exit(f"the stream ended without complete: {events}")
text = "".join(e["data"]["text"] for e in events if e.get("event") == "chunk")
if text != message:
    sys.exit(f"the simulated model echoed {text!r}, not {message!r}")
print("  | events:", " ".join(names), "| charged:", events[names.index("complete")]["data"]["credits"]["charged"])
' "$message" >&2 || fail "the streamed reply"
log "service: session created with the image's own token; streamed reply reached complete"

podman stop -t 30 "$name" >/dev/null
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
[ "$exit_code" = 0 ] || { podman logs "$name" >&2; fail "the service exited $exit_code after SIGTERM"; }
log "service: stopped cleanly on SIGTERM"
log "all image checks passed in $((SECONDS - started))s"
