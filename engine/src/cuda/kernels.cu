// The CUDA engine's kernels (CUDA C), compiled at run time by NVRTC: see kernels.rs.
// tests/cuda-emu also compiles this file as C++ and runs the kernels on the CPU.
extern "C" __global__ void embedding_gather(const long long* ids, const long long* types, const float* word,
    const float* pos, const float* type_emb, float* out, int seq_len, int hidden, int rows) {
  int row = blockIdx.x;
  if (row >= rows) return;
  long long id = ids[row], ty = types[row];
  int p = row % seq_len;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x)
    out[(long long)row * hidden + j] = word[id * hidden + j] + pos[(long long)p * hidden + j] + type_emb[ty * hidden + j];
}

// One block per row; blockDim.x is a power of two <= 1024.
extern "C" __global__ void layer_norm(float* x, const float* gamma, const float* beta, int dim, float eps) {
  extern __shared__ float red[];
  float* row = x + (long long)blockIdx.x * dim;
  float s = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) s += row[j];
  red[threadIdx.x] = s; __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) { if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o]; __syncthreads(); }
  float mean = red[0] / dim; __syncthreads();
  float v = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) { float d = row[j] - mean; v += d * d; }
  red[threadIdx.x] = v; __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) { if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o]; __syncthreads(); }
  float inv = rsqrtf(red[0] / dim + eps);
  for (int j = threadIdx.x; j < dim; j += blockDim.x) row[j] = (row[j] - mean) * inv * gamma[j] + beta[j];
}

extern "C" __global__ void bias_gelu(float* x, const float* bias, int width, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i] + bias[i % width];
  x[i] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

// scores: [batch*heads, L, L]; one block per (batch*heads, query row). Masked keys get no weight.
extern "C" __global__ void masked_softmax(float* scores, const long long* mask, int heads, int L, float scale) {
  int bh = blockIdx.x, q = blockIdx.y;
  int b = bh / heads;
  float* row = scores + ((long long)bh * L + q) * L;
  const long long* m = mask + (long long)b * L;
  float mx = -3.0e38f;
  for (int k = 0; k < L; ++k) if (m[k]) mx = fmaxf(mx, row[k] * scale);
  float sum = 0.f;
  for (int k = 0; k < L; ++k) { float e = m[k] ? __expf(row[k] * scale - mx) : 0.f; row[k] = e; sum += e; }
  float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int k = 0; k < L; ++k) row[k] *= inv;
}

// One block per sequence: masked mean over tokens then L2 normalization.
extern "C" __global__ void mean_pool_normalize(const float* x, const long long* mask, float* out, int L, int hidden) {
  extern __shared__ float red[];
  int b = blockIdx.x;
  float count = 0.f;
  for (int t = 0; t < L; ++t) count += mask[(long long)b * L + t] ? 1.f : 0.f;
  float part = 0.f;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    float s = 0.f;
    for (int t = 0; t < L; ++t) if (mask[(long long)b * L + t]) s += x[((long long)b * L + t) * hidden + j];
    s /= fmaxf(count, 1e-9f);
    out[(long long)b * hidden + j] = s;
    part += s * s;
  }
  red[threadIdx.x] = part; __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) { if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o]; __syncthreads(); }
  float inv = 1.f / fmaxf(sqrtf(red[0]), 1e-12f);
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) out[(long long)b * hidden + j] *= inv;
}

// act: 0 none, 1 relu, 2 relu6. x is [N, C, HW].
extern "C" __global__ void bias_act_nchw(float* x, const float* bias, int channels, int hw, int act, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i] + bias[(i / hw) % channels];
  if (act == 1) v = fmaxf(v, 0.f); else if (act == 2) v = fminf(fmaxf(v, 0.f), 6.f);
  x[i] = v;
}

// BN already folded into w/bias. One thread per output element of [N, C, Ho, Wo].
extern "C" __global__ void depthwise_conv(const float* x, const float* w, const float* bias, float* y,
    int C, int H, int W, int Ho, int Wo, int k, int stride, int pad, int act, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int ox = i % Wo; long long t = i / Wo; int oy = t % Ho; t /= Ho; int c = t % C; long long b = t / C;
  const float* src = x + (b * C + c) * (long long)H * W;
  const float* wc = w + (long long)c * k * k;
  float acc = bias[c];
  for (int ky = 0; ky < k; ++ky) { int iy = oy * stride + ky - pad; if (iy < 0 || iy >= H) continue;
    for (int kx = 0; kx < k; ++kx) { int ix = ox * stride + kx - pad; if (ix < 0 || ix >= W) continue;
      acc += src[iy * W + ix] * wc[ky * k + kx]; } }
  if (act == 1) acc = fmaxf(acc, 0.f); else if (act == 2) acc = fminf(fmaxf(acc, 0.f), 6.f);
  y[i] = acc;
}

// One image: cols [C*k*k, Ho*Wo].
extern "C" __global__ void im2col(const float* x, float* cols, int C, int H, int W, int Ho, int Wo, int k, int stride, int pad, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int ox = i % Wo; long long t = i / Wo; int oy = t % Ho; t /= Ho; int kx = t % k; t /= k; int ky = t % k; int c = t / k;
  int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
  cols[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((long long)c * H + iy) * W + ix] : 0.f;
}

extern "C" __global__ void u8_normalize(const unsigned char* x, float* y, float m0, float m1, float m2,
    float s0, float s1, float s2, int hw, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int c = (i / hw) % 3;
  float m = c == 0 ? m0 : (c == 1 ? m1 : m2), s = c == 0 ? s0 : (c == 1 ? s1 : s2);
  y[i] = (x[i] * (1.f / 255.f) - m) / s;
}

// One block per (n, c) plane.
extern "C" __global__ void global_avg_pool(const float* x, float* y, int hw) {
  extern __shared__ float red[];
  const float* p = x + (long long)blockIdx.x * hw;
  float s = 0.f;
  for (int j = threadIdx.x; j < hw; j += blockDim.x) s += p[j];
  red[threadIdx.x] = s; __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) { if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o]; __syncthreads(); }
  if (threadIdx.x == 0) y[blockIdx.x] = red[0] / hw;
}

extern "C" __global__ void add_inplace(float* x, const float* r, int relu, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i] + r[i];
  x[i] = relu ? fmaxf(v, 0.f) : v;
}
