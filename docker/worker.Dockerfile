# syntax=docker/dockerfile:1.7
# The tandem-worker image (both roles: preprocess and inference).
#
#   docker build -f docker/worker.Dockerfile -t tandem-worker:0.1.0 .                  # CUDA (default)
#   docker build -f docker/worker.Dockerfile --target cpu -t tandem-worker:0.1.0-cpu .  # no CUDA libraries
#
# The binary needs no CUDA to build: it is built with tandem-engine's `cuda` feature, and
# cudarc (`dynamic-loading`) opens libcuda, cuBLAS(Lt) and NVRTC with dlopen only when the
# inference stage runs with `--device cuda`; with `--device cpu` they are never touched.
# Without the libraries `--device cuda` fails with a clear error (or runs on the CPU with
# `--allow-cpu-fallback`).
# - `cuda` target: NVIDIA's CUDA *runtime* image ships cuBLAS, cuBLASLt and NVRTC; libcuda.so
#   (the driver) is NOT in the image: the NVIDIA container toolkit mounts the node's driver into
#   the container when the pod requests nvidia.com/gpu (NVIDIA device plugin / GPU operator).
#   Pick a CUDA 13.x tag the nodes' driver supports (CUDA 13 needs driver >= 580).
# - `cpu` target: distroless, for preprocess pods and `--device cpu` inference (or CUDA with the
#   libraries mounted; see docs/images.md).
#
# Build context: the repository root. Without Docker, scripts/images.sh builds the `cpu` image
# (tandem-worker:<version>-cpu: same binary features, user, entrypoint, ports, labels) from
# Debian packages with crane.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG CPU_RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
# libjpeg-turbo (turbojpeg-sys) is built from source with cmake; nasm assembles its x86-64 SIMD
# code, and the build fails without it (`require-simd`) rather than produce a slow decoder.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Debug info is stripped (symbols stay, so backtraces keep function names).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p tandem-worker --features tandem-engine/cuda \
 && install -d /out \
 && strip --strip-debug -o /out/tandem-worker target/release/tandem-worker

# No CUDA libraries: preprocess pods and CPU inference.
FROM ${CPU_RUNTIME_IMAGE} AS cpu
LABEL org.opencontainers.image.title="tandem-worker" \
      org.opencontainers.image.description="Tandem worker (preprocess and inference; CUDA libraries not included)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/tandem-worker /usr/local/bin/tandem-worker
USER 65532:65532
# OIP v2 HTTP, OIP v2 gRPC, metrics, control (the operator's worker pod ports).
EXPOSE 8000 8001 9090 9091
ENTRYPOINT ["/usr/local/bin/tandem-worker"]

# CUDA image (default target): the same binary on NVIDIA's runtime image.
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
LABEL org.opencontainers.image.title="tandem-worker" \
      org.opencontainers.image.description="Tandem worker (CUDA: cuBLAS, NVRTC; driver from the node)" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same non-root user as the distroless images (uid/gid 65532, "nonroot"), no shell, no home;
# models are read from mounted volumes.
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/tandem-worker /usr/local/bin/tandem-worker
# The toolkit injects the driver (libcuda.so) for these capabilities; NVRTC compiles kernels
# for the GPU at start-up, so no compiler or toolkit is needed beyond the runtime libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 8000 8001 9090 9091
ENTRYPOINT ["/usr/local/bin/tandem-worker"]
