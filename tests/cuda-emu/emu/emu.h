// A CPU stand-in for the parts of CUDA that the engine's kernels use, so that
// engine/src/cuda/kernels.cu compiles as C++ and runs on the host. Each CUDA
// thread of a block is an OS thread; `__syncthreads()` is a std::barrier over the
// block's threads; blocks run one after another; dynamic shared memory is one
// buffer per block. Only what kernels.cu uses is provided.
#pragma once

#include <math.h>

#include <barrier>
#include <cstdint>

struct uint3 {
  unsigned x, y, z;
};

// Per OS thread, so that launches from concurrent callers (cargo's test threads) do not mix.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local uint3 blockDim;
extern thread_local uint3 gridDim;

void emu_syncthreads();
void* emu_shared();

#define __global__
#define __syncthreads() emu_syncthreads()
#define __expf expf

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// A launch, laid out as the Rust side's `Launch` (tests/cuda-emu/src/lib.rs).
struct EmuLaunch {
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t shared_bytes;
};
