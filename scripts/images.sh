#!/usr/bin/env bash
# Builds Parley's two container images with podman (see Dockerfile): release
# binaries built on this host, copied into a distroless-style glibc base.
# Prints each image's size; can also save both as docker-archive tarballs, the
# format `ctr images import` and `kind load image-archive` read.
#
#   scripts/images.sh [--repository PREFIX] [--tag TAG] [--base IMAGE] [--save DIR] [--profile NAME] [--prebuilt]
#   scripts/images.sh [--profile NAME] --context-only DIR
#
#   --repository PREFIX  name prefix (env PARLEY_IMAGE_REPOSITORY; default ghcr.io/parley-dev)
#   --tag TAG            tag (env PARLEY_IMAGE_TAG; default: the workspace version)
#   --base IMAGE         base image (env PARLEY_BASE_IMAGE). Default: a base made
#                        here from this host's Debian packages, with what
#                        gcr.io/distroless/cc-debian12:nonroot holds that the
#                        binaries need (glibc, libgcc_s, CA certificates, tzdata,
#                        a nonroot user 65532, no shell); it needs no registry
#                        and is cached under /var/cache/parley, keyed by the
#                        package versions. Pass gcr.io/distroless/cc-debian12:nonroot
#                        to build on the published base.
#   --save DIR           also write DIR/parley-service.tar and DIR/parley-operator.tar
#   --profile NAME       cargo profile of the binaries (env PARLEY_IMAGES_PROFILE;
#                        default release, what is published). `dev` compiles
#                        little after a debug build, for Tilt; the images are
#                        larger and slower.
#   --prebuilt           package the binaries already in the profile's
#                        directory, without cargo: the test scripts build them
#                        first as the test suite does (scripts/common.sh).
#   --context-only DIR   build the binaries and lay out the build context in DIR
#                        (what the Tiltfile builds its images from); no image.
#                        Files that did not change are left alone, so that
#                        watchers see only real changes.
#
# Stdout has one line per image, `NAME REF SIZE` (logs go to stderr):
#   parley-service  ghcr.io/parley-dev/parley-service:0.1.0  31.2MB
# Needs root on Debian (it installs podman and runc with apt when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${PARLEY_CACHE_DIR:-/var/cache/parley}"
repository="${PARLEY_IMAGE_REPOSITORY:-ghcr.io/parley-dev}"
tag="${PARLEY_IMAGE_TAG:-}"
base="${PARLEY_BASE_IMAGE:-}"
save_dir=""
context_only=""
prebuilt=""
profile="${PARLEY_IMAGES_PROFILE:-release}"
BINARIES=(parley-service parley-operator)
# What the base holds: the shared libraries the binaries load (ldd: libc,
# libm, libgcc_s), CA certificates, time zones, /etc/services and os-release.
BASE_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libgcc-s1)
# Flags for this kind of machine: cgroup v1 (crun refuses it) and a hard
# nofile limit below podman's default request.
PODMAN_LIMITS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --repository) repository=${2:?--repository needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --base) base=${2:?--base needs a value}; shift 2 ;;
    --save) save_dir=${2:?--save needs a directory}; shift 2 ;;
    --context-only) context_only=${2:?--context-only needs a directory}; shift 2 ;;
    --profile) profile=${2:?--profile needs a cargo profile}; shift 2 ;;
    --prebuilt) prebuilt=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_tools() {
  local missing=()
  for pkg in podman runc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "install ${missing[*]} (this script installs them only on Debian)"
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

# `pkg=version` of every base package as apt would download it now.
base_package_versions() {
  local pkg version
  for pkg in "${BASE_PACKAGES[@]}"; do
    version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
    [ -n "$version" ] || return 1
    echo "$pkg=$version"
  done
}

# Unpacks the downloaded packages into ROOTFS without running their
# maintainer scripts (no shell or dpkg needed, none left behind), then adds
# what those scripts and distroless would have: the CA bundle, the users,
# the package list scanners read, and nothing of the docs but the copyrights.
make_base_rootfs() { # debs_dir rootfs
  local debs=$1 rootfs=$2 deb name
  mkdir -p "$rootfs/var/lib/dpkg/status.d"
  for deb in "$debs"/*.deb; do
    dpkg-deb -x "$deb" "$rootfs"
    name=$(dpkg-deb -f "$deb" Package)
    dpkg-deb -f "$deb" >"$rootfs/var/lib/dpkg/status.d/$name"
  done
  mkdir -p "$rootfs/etc/ssl/certs"
  cat "$rootfs"/usr/share/ca-certificates/*/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
  cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
EOF
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  # Scripts for a shell the image does not have.
  rm -rf "$rootfs/usr/sbin/update-ca-certificates" "$rootfs/etc/update-motd.d"
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,lintian,locale} "$rootfs"/usr/lib/*/gconv
  install -d -m 0700 "$rootfs/root"
  install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
  install -d -m 1777 "$rootfs/tmp"
}

# Makes (or finds in the cache) the local base image and prints its name.
local_base() {
  local versions key tarball ref work
  if ! versions=$(base_package_versions); then
    as_root apt-get update -qq
    versions=$(base_package_versions) || die "apt knows no candidate for one of: ${BASE_PACKAGES[*]}"
  fi
  key=$( { echo "$versions"; declare -f make_base_rootfs; } | sha256sum | cut -c1-16)
  ref="localhost/parley-base:$key"
  tarball="$CACHE_DIR/images/parley-base-$key.tar"
  if [ ! -f "$tarball" ]; then
    log "making the base from Debian packages: $(echo "$versions" | tr '\n' ' ')"
    work=$(mktemp -d /tmp/parley-base.XXXXXX)
    mkdir "$work/debs" "$work/rootfs"
    # One `pkg=version` word each.
    # shellcheck disable=SC2086
    (cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root $versions) \
      || die "apt-get download failed (apt-get update, then run again)"
    make_base_rootfs "$work/debs" "$work/rootfs"
    as_root mkdir -p "$CACHE_DIR/images"
    tar --sort=name --mtime=@0 --numeric-owner -C "$work/rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    echo "$versions" >"$CACHE_DIR/images/parley-base-$key.packages"
    rm -rf "$work"
  fi
  if ! podman image exists "$ref"; then
    # The same configuration as distroless's :nonroot images.
    podman import -q \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
      --change 'USER 65532:65532' \
      --change 'WORKDIR /home/nonroot' \
      "$tarball" "$ref" >/dev/null
  fi
  echo "$ref"
}

human_size() {
  awk -v bytes="$1" 'BEGIN { printf "%.1fMB", bytes / 1000000 }'
}

metadata=$(cargo metadata --format-version 1 --no-deps --locked)
read -r version target_dir < <(python3 -c '
import json, sys
meta = json.load(sys.stdin)
version = next(p["version"] for p in meta["packages"] if p["name"] == "parley-service")
print(version, meta["target_directory"])' <<<"$metadata")

# Cargo puts the dev profile's output in debug/, every other profile's in a
# directory of its name.
profile_dir="$target_dir/$([ "$profile" = dev ] && echo debug || echo "$profile")"

# The Dockerfile's build context: the two binaries and the empty directory
# that becomes the service's data directory.
build_context() { # dir
  if [ -z "$prebuilt" ]; then
    log "cargo build --profile $profile (${BINARIES[*]})"
    cargo build --profile "$profile" --locked -p parley-service -p parley-operator --bins >&2
  fi
  mkdir -p "$1/data"
  for binary in "${BINARIES[@]}"; do
    [ -x "$profile_dir/$binary" ] || die "no $profile_dir/$binary to package"
    cmp -s "$profile_dir/$binary" "$1/$binary" || cp "$profile_dir/$binary" "$1/$binary"
  done
}

if [ -n "$context_only" ]; then
  build_context "$context_only"
  exit 0
fi

install_tools
tag=${tag:-$version}
revision=$(git rev-parse HEAD)
git diff --quiet HEAD -- || revision="$revision-dirty"
context=$(mktemp -d /tmp/parley-images.XXXXXX)
trap 'rm -rf "$context"' EXIT
build_context "$context"

pull=(--pull=missing)
if [ -z "$base" ]; then
  # Several runs at once (worktrees, sessions) wait for each other here
  # rather than make the same base twice.
  as_root mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.images.lock"
  flock 9
  base=$(local_base)
  flock -u 9
  pull=(--pull=never)
fi
log "base image: $base"

for binary in "${BINARIES[@]}"; do
  ref="$repository/$binary:$tag"
  log "podman build $ref"
  # --no-cache: podman 4.3 reuses a cached LABEL layer whose build argument
  # (the revision) changed; without RUN steps a full build takes seconds.
  podman build -q --no-cache "${PODMAN_LIMITS[@]}" "${pull[@]}" -f Dockerfile --target "${binary#parley-}" \
    --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -t "$ref" "$context" >/dev/null
  if [ -n "$save_dir" ]; then
    mkdir -p "$save_dir"
    rm -f "$save_dir/$binary.tar"
    podman save -q --format docker-archive -o "$save_dir/$binary.tar" "$ref"
    log "saved $save_dir/$binary.tar"
  fi
  printf '%-16s %-48s %s\n' "$binary" "$ref" "$(human_size "$(podman image inspect --format '{{.Size}}' "$ref")")"
done
