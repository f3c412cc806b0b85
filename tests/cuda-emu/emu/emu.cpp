// The emulator's runtime and one C entry point per kernel (see emu.h).
#include "emu.h"

#include <cstring>
#include <thread>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local uint3 blockDim;
thread_local uint3 gridDim;

namespace {
thread_local std::barrier<>* block_barrier = nullptr;
thread_local void* block_shared = nullptr;
}  // namespace

void emu_syncthreads() { block_barrier->arrive_and_wait(); }
void* emu_shared() { return block_shared; }

// kernels.cu with `extern __shared__ T name[];` rewritten to `T* name = (T*)emu_shared();`
// by build.rs (an `extern` block-scope array cannot be given per-block storage otherwise).
#include "kernels_emu.cu"

namespace {
// Runs `kernel` for every block of `l`, one block at a time, one OS thread per CUDA thread.
template <class F>
void launch(const EmuLaunch& l, F kernel) {
  const uint3 grid = {l.grid[0], l.grid[1], l.grid[2]};
  const uint3 block = {l.block[0], l.block[1], l.block[2]};
  const unsigned threads = l.block[0] * l.block[1] * l.block[2];
  std::vector<unsigned char> shared(l.shared_bytes);
  for (unsigned gz = 0; gz < l.grid[2]; ++gz)
    for (unsigned gy = 0; gy < l.grid[1]; ++gy)
      for (unsigned gx = 0; gx < l.grid[0]; ++gx) {
        // Garbage, as on a GPU: a kernel must not read shared memory it has not written.
        std::memset(shared.data(), 0xA5, shared.size());
        std::barrier<> bar(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = {t % l.block[0], (t / l.block[0]) % l.block[1], t / (l.block[0] * l.block[1])};
            blockIdx = {gx, gy, gz};
            blockDim = block;
            gridDim = grid;
            block_barrier = &bar;
            block_shared = shared.data();
            kernel();
            // A finished thread takes no part in later barriers (as an exited CUDA thread).
            bar.arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
}
}  // namespace

extern "C" {
void emu_embedding_gather(EmuLaunch l, const long long* ids, const long long* types, const float* word,
                          const float* pos, const float* type_emb, float* out, int seq_len, int hidden,
                          int rows) {
  launch(l, [=] { embedding_gather(ids, types, word, pos, type_emb, out, seq_len, hidden, rows); });
}
void emu_layer_norm(EmuLaunch l, float* x, const float* gamma, const float* beta, int dim, float eps) {
  launch(l, [=] { layer_norm(x, gamma, beta, dim, eps); });
}
void emu_bias_gelu(EmuLaunch l, float* x, const float* bias, int width, long long n) {
  launch(l, [=] { bias_gelu(x, bias, width, n); });
}
void emu_masked_softmax(EmuLaunch l, float* scores, const long long* mask, int heads, int L, float scale) {
  launch(l, [=] { masked_softmax(scores, mask, heads, L, scale); });
}
void emu_mean_pool_normalize(EmuLaunch l, const float* x, const long long* mask, float* out, int L, int hidden) {
  launch(l, [=] { mean_pool_normalize(x, mask, out, L, hidden); });
}
void emu_bias_act_nchw(EmuLaunch l, float* x, const float* bias, int channels, int hw, int act, long long n) {
  launch(l, [=] { bias_act_nchw(x, bias, channels, hw, act, n); });
}
void emu_depthwise_conv(EmuLaunch l, const float* x, const float* w, const float* bias, float* y, int C, int H,
                        int W, int Ho, int Wo, int k, int stride, int pad, int act, long long n) {
  launch(l, [=] { depthwise_conv(x, w, bias, y, C, H, W, Ho, Wo, k, stride, pad, act, n); });
}
void emu_im2col(EmuLaunch l, const float* x, float* cols, int C, int H, int W, int Ho, int Wo, int k, int stride,
                int pad, long long n) {
  launch(l, [=] { im2col(x, cols, C, H, W, Ho, Wo, k, stride, pad, n); });
}
void emu_u8_normalize(EmuLaunch l, const unsigned char* x, float* y, float m0, float m1, float m2, float s0,
                      float s1, float s2, int hw, long long n) {
  launch(l, [=] { u8_normalize(x, y, m0, m1, m2, s0, s1, s2, hw, n); });
}
void emu_global_avg_pool(EmuLaunch l, const float* x, float* y, int hw) {
  launch(l, [=] { global_avg_pool(x, y, hw); });
}
void emu_add_inplace(EmuLaunch l, float* x, const float* r, int relu, long long n) {
  launch(l, [=] { add_inplace(x, r, relu, n); });
}
}
