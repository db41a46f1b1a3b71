# Parley's two container images, one target each:
#   service   ghcr.io/parley-dev/parley-service:<version>
#   operator  ghcr.io/parley-dev/parley-operator:<version>
#
# No compiler runs in here: the release binaries are built on the host
#   cargo build --release --locked -p parley-service -p parley-operator --bins
# and copied into a distroless glibc base (no shell, no package manager, CA
# certificates). The build context is a directory holding just the two
# binaries and an empty `data/` directory; `scripts/images.sh` prepares it and
# builds both targets. By hand:
#   podman build -f Dockerfile --target service \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     -t ghcr.io/parley-dev/parley-service:0.1.0 CONTEXT_DIR
#
# The binaries link against the build host's glibc, so build them on Debian 12
# (glibc 2.36, as in the base) or on an older glibc.
#
# BASE_IMAGE is an argument so that the published images name their real base
# here, while a machine without registry access passes a base it made itself
# from Debian's packages (scripts/images.sh does, by default).
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BASE_IMAGE} AS parley
ARG VERSION
ARG REVISION
LABEL org.opencontainers.image.source="https://github.com/parley-dev/parley" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Parley"
# The base's `nonroot` user, by number so that runAsNonRoot can verify it.
USER 65532:65532

FROM parley AS service
LABEL org.opencontainers.image.title="parley-service" \
      org.opencontainers.image.description="Parley's chat service: metered, supervised LLM chat with replies streamed over SSE"
COPY parley-service /usr/local/bin/parley-service
# The data directory (embedded store, generated dev secret) is the only place
# the service writes, so the root filesystem can be read-only: mount a volume
# here. It belongs to 65532 so that a fresh named volume does too.
COPY --chown=65532:65532 data/ /var/lib/parley/
VOLUME ["/var/lib/parley"]
ENV PARLEY_LISTEN=0.0.0.0:8080 \
    PARLEY_DATA_DIR=/var/lib/parley
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/parley-service"]
CMD ["serve"]

FROM parley AS operator
LABEL org.opencontainers.image.title="parley-operator" \
      org.opencontainers.image.description="Parley's Kubernetes operator: reconciles ChatDeployment and ModelRoute resources"
COPY parley-operator /usr/local/bin/parley-operator
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/parley-operator"]
