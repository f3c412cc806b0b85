# syntax=docker/dockerfile:1.7
# The tandem-worker image (both roles: preprocess and inference).
#
#   docker build -f docker/worker.Dockerfile -t tandem-worker:0.1.0 .                  # CUDA (default)
#   docker build -f docker/worker.Dockerfile --target cpu -t tandem-worker:0.1.0-cpu .  # CPU only
#
# The binary needs no CUDA to build: it loads libcuda, cuBLAS(Lt) and NVRTC at run time
# (cudarc `dynamic-loading`) and falls back to the CPU engine when they are absent.
# - `cuda` target: NVIDIA's CUDA *runtime* image ships cuBLAS, cuBLASLt and NVRTC; libcuda.so
#   (the driver) is NOT in the image: the NVIDIA container toolkit mounts the node's driver into
#   the container when the pod requests nvidia.com/gpu (NVIDIA device plugin / GPU operator).
#   Pick a CUDA 13.x tag the nodes' driver supports (CUDA 13 needs driver >= 580).
# - `cpu` target: distroless, for preprocess pods and device: CPU inference.
#
# Build context: the repository root. Not built in this project's CI (no Docker engine there);
# see docs/operations.md "Container images".

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG CPU_RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p tandem-worker \
 && install -D -m 0755 target/release/tandem-worker /out/tandem-worker

# CPU-only image: preprocess pods and CPU inference.
FROM ${CPU_RUNTIME_IMAGE} AS cpu
LABEL org.opencontainers.image.title="tandem-worker" \
      org.opencontainers.image.description="Tandem worker (CPU only)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/tandem-worker /usr/local/bin/tandem-worker
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tandem-worker"]

# CUDA image (default target): the same binary on NVIDIA's runtime image.
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
LABEL org.opencontainers.image.title="tandem-worker" \
      org.opencontainers.image.description="Tandem worker (CUDA: cuBLAS, NVRTC; driver from the node)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed non-root user with no shell and no home; models are read from mounted volumes.
RUN groupadd --system --gid 65532 tandem \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=build /out/tandem-worker /usr/local/bin/tandem-worker
# The toolkit injects the driver (libcuda.so) for these capabilities; NVRTC compiles kernels
# for the GPU at start-up, so no compiler or toolkit is needed beyond the runtime libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tandem-worker"]
