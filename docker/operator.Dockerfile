# syntax=docker/dockerfile:1.7
# The tandem-operator image: the Rust binary on a distroless, non-root base.
#
#   docker build -f docker/operator.Dockerfile -t tandem-operator:0.1.0 .
#
# Build context: the repository root. Without Docker, scripts/images.sh builds the same image
# (same user, entrypoint, default argument, port, labels) from Debian packages with crane;
# see docs/images.md.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace is needed to resolve it; BuildKit caches the registry and target dir.
COPY . .
# Debug info is stripped (symbols stay, so backtraces keep function names).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile release-small -p tandem-operator \
 && install -d /out \
 && strip --strip-debug -o /out/tandem-operator target/release-small/tandem-operator

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="tandem-operator" \
      org.opencontainers.image.description="Tandem Kubernetes operator for InferencePipelines" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/tandem-operator /usr/local/bin/tandem-operator
# distroless "nonroot" is uid/gid 65532; the chart runs it with the same ids.
USER 65532:65532
# /metrics, /healthz, /readyz (the chart's metrics.port).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tandem-operator"]
CMD ["run"]
