#include "cuda_ops.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <stdexcept>
#include <string>

namespace gpt {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("gpt::CudaOps: ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("gpt::CudaOps: ") + what + ": cuBLAS status " + std::to_string(int(s)));
}

constexpr int kThreads = 256;
constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluK = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

unsigned blocks_for(std::size_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

using BlockReduce = cub::BlockReduce<float, kThreads>;

// Sum (or max) over a block, broadcast to every thread.
__device__ float block_sum(float v, typename BlockReduce::TempStorage& tmp, float* shared) {
  const float r = BlockReduce(tmp).Sum(v);
  if (threadIdx.x == 0) *shared = r;
  __syncthreads();
  const float out = *shared;
  __syncthreads();
  return out;
}
__device__ float block_max(float v, typename BlockReduce::TempStorage& tmp, float* shared) {
  const float r = BlockReduce(tmp).Reduce(v, cuda::maximum<float>{});
  if (threadIdx.x == 0) *shared = r;
  __syncthreads();
  const float out = *shared;
  __syncthreads();
  return out;
}

__global__ void embed_forward_kernel(float* out, const std::int32_t* tok, const float* wte, const float* wpe, int Tn,
                                     int C, std::size_t total) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const std::size_t n = i / C;
  const int c = static_cast<int>(i % C), t = static_cast<int>(n % Tn);
  out[i] = wte[std::size_t(tok[n]) * C + c] + wpe[std::size_t(t) * C + c];
}

__global__ void embed_backward_kernel(float* dwte, float* dwpe, const float* dout, const std::int32_t* tok, int Tn,
                                      int C, std::size_t total) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const std::size_t n = i / C;
  const int c = static_cast<int>(i % C), t = static_cast<int>(n % Tn);
  atomicAdd(&dwte[std::size_t(tok[n]) * C + c], dout[i]);
  atomicAdd(&dwpe[std::size_t(t) * C + c], dout[i]);
}

__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* in, const float* w,
                                         const float* b, int C) {
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float shared;
  const float* x = in + std::size_t(blockIdx.x) * C;
  float s = 0;
  for (int i = threadIdx.x; i < C; i += blockDim.x) s += x[i];
  const float m = block_sum(s, tmp, &shared) / C;
  float v = 0;
  for (int i = threadIdx.x; i < C; i += blockDim.x) v += (x[i] - m) * (x[i] - m);
  const float r = rsqrtf(block_sum(v, tmp, &shared) / C + kLayerNormEps);
  float* o = out + std::size_t(blockIdx.x) * C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) o[i] = (x[i] - m) * r * w[i] + b[i];
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = m;
    rstd[blockIdx.x] = r;
  }
}

__global__ void layernorm_backward_input_kernel(float* din, const float* dout, const float* in, const float* w,
                                                const float* mean, const float* rstd, int C) {
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float shared;
  const std::size_t row = blockIdx.x;
  const float* x = in + row * C;
  const float* d = dout + row * C;
  const float m = mean[row], r = rstd[row];
  float a = 0, bsum = 0;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float dn = d[i] * w[i];
    a += dn;
    bsum += dn * (x[i] - m) * r;
  }
  const float dmean = block_sum(a, tmp, &shared) / C;
  const float dnorm_mean = block_sum(bsum, tmp, &shared) / C;
  float* di = din + row * C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float norm = (x[i] - m) * r;
    di[i] += r * (d[i] * w[i] - dmean - norm * dnorm_mean);
  }
}

// One thread per column: dw += sum_n norm * dout, db += sum_n dout (deterministic order).
__global__ void layernorm_backward_params_kernel(float* dw, float* db, const float* dout, const float* in,
                                                 const float* mean, const float* rstd, int N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0, sb = 0;
  for (int n = 0; n < N; ++n) {
    const float d = dout[std::size_t(n) * C + c];
    sw += (in[std::size_t(n) * C + c] - mean[n]) * rstd[n] * d;
    sb += d;
  }
  dw[c] += sw;
  db[c] += sb;
}

__global__ void broadcast_rows_kernel(float* out, const float* bias, int OC, std::size_t total) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i < total) out[i] = bias[i % OC];
}

__global__ void column_sum_kernel(float* dbias, const float* dout, int N, int OC) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= OC) return;
  float s = 0;
  for (int n = 0; n < N; ++n) s += dout[std::size_t(n) * OC + c];
  dbias[c] += s;
}

// One block per score row (b, h, t): causal softmax over positions 0..t, zero after.
__global__ void causal_softmax_kernel(float* att, int Tn) {
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float shared;
  const std::size_t row = blockIdx.x;
  const int t = static_cast<int>(row % Tn);
  float* p = att + row * Tn;
  float mx = -INFINITY;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) mx = fmaxf(mx, p[u]);
  mx = block_max(mx, tmp, &shared);
  float s = 0;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) {
    const float e = expf(p[u] - mx);
    p[u] = e;
    s += e;
  }
  const float inv = 1.0f / block_sum(s, tmp, &shared);
  for (int u = threadIdx.x; u < Tn; u += blockDim.x) p[u] = u <= t ? p[u] * inv : 0.0f;
}

// dS = scale * P ⊙ (dP − rowsum(P ⊙ dP)), in place over dP; one block per row of one head.
__global__ void softmax_backward_kernel(float* dp, const float* p, int Tn, float scale) {
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float shared;
  const int t = blockIdx.x;
  const float* pr = p + std::size_t(t) * Tn;
  float* dr = dp + std::size_t(t) * Tn;
  float s = 0;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) s += pr[u] * dr[u];
  const float dot = block_sum(s, tmp, &shared);
  for (int u = threadIdx.x; u < Tn; u += blockDim.x) dr[u] = u <= t ? scale * pr[u] * (dr[u] - dot) : 0.0f;
}

__global__ void gelu_forward_kernel(float* out, const float* in, std::size_t n) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = in[i];
  out[i] = 0.5f * x * (1.0f + tanhf(kGeluK * (x + kGeluC * x * x * x)));
}

__global__ void gelu_backward_kernel(float* din, const float* in, const float* dout, std::size_t n) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = in[i];
  const float th = tanhf(kGeluK * (x + kGeluC * x * x * x));
  const float du = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
  din[i] += dout[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
}

__global__ void residual_kernel(float* out, const float* a, const float* b, std::size_t n) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = a[i] + b[i];
}

// One block per row: loss into *total (double atomics: the order of 8-byte additions of
// per-row losses changes the sum only far below float resolution); dlogits may alias logits.
__global__ void cross_entropy_kernel(float* dlogits, const float* logits, const std::int32_t* targets, int V,
                                     float k, double* total) {
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float shared;
  const std::size_t row = blockIdx.x;
  const float* z = logits + row * V;
  const int target = targets[row];
  const float zt = z[target];
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, z[v]);
  mx = block_max(mx, tmp, &shared);
  float s = 0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(z[v] - mx);
  const float sum = block_sum(s, tmp, &shared);  // ends with a barrier: every read of zt is done
  if (threadIdx.x == 0) atomicAdd(total, double(logf(sum)) + double(mx) - double(zt));
  if (!dlogits) return;
  float* d = dlogits + row * V;
  const float inv = 1.0f / sum;
  for (int v = threadIdx.x; v < V; v += blockDim.x) d[v] = k * (expf(z[v] - mx) * inv - (v == target ? 1.0f : 0.0f));
}

}  // namespace

struct CudaOps::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_FAST_16BF;
  double* total = nullptr;

  // Row-major C = alpha op(A) op(B) + beta C, `batch` times with the given element strides:
  // cuBLAS is column-major, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ on the same memory.
  void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, long long sa, const float* B,
            int ldb, long long sb, float beta, float* C, int ldc, long long sc, int batch = 1) const {
    check(cublasGemmStridedBatchedEx(handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                     &alpha, B, CUDA_R_32F, ldb, sb, A, CUDA_R_32F, lda, sa, &beta, C, CUDA_R_32F,
                                     ldc, sc, batch, compute, CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx");
  }
};

bool cuda_ops_device_available() noexcept {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

CudaOps::CudaOps(void* stream, GemmMode mode) : impl_(std::make_unique<Impl>()) {
  impl_->stream = static_cast<cudaStream_t>(stream);
  impl_->compute = mode == GemmMode::bf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
  check(cublasCreate(&impl_->handle), "cublasCreate");
  try {
    check(cublasSetStream(impl_->handle, impl_->stream), "cublasSetStream");
    check(cudaMalloc(&impl_->total, sizeof(double)), "cudaMalloc");
  } catch (...) {
    cublasDestroy(impl_->handle);
    throw;
  }
}

CudaOps::~CudaOps() {
  if (impl_->total) cudaFree(impl_->total);
  if (impl_->handle) cublasDestroy(impl_->handle);
}

void CudaOps::embed_forward(float* out, const std::int32_t* tokens, const float* wte, const float* wpe, int B, int Tn,
                            int C) const {
  const std::size_t total = std::size_t(B) * Tn * C;
  if (!total) return;
  embed_forward_kernel<<<blocks_for(total), kThreads, 0, impl_->stream>>>(out, tokens, wte, wpe, Tn, C, total);
  check(cudaGetLastError(), "embed_forward");
}

void CudaOps::embed_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens, int B, int Tn,
                             int C) const {
  const std::size_t total = std::size_t(B) * Tn * C;
  if (!total) return;
  embed_backward_kernel<<<blocks_for(total), kThreads, 0, impl_->stream>>>(dwte, dwpe, dout, tokens, Tn, C, total);
  check(cudaGetLastError(), "embed_backward");
}

void CudaOps::layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* w, const float* b,
                                int N, int C) const {
  if (N <= 0) return;
  layernorm_forward_kernel<<<N, kThreads, 0, impl_->stream>>>(out, mean, rstd, in, w, b, C);
  check(cudaGetLastError(), "layernorm_forward");
}

void CudaOps::layernorm_backward(float* din, float* dw, float* db, const float* dout, const float* in, const float* w,
                                 const float* mean, const float* rstd, int N, int C) const {
  if (N <= 0) return;
  layernorm_backward_input_kernel<<<N, kThreads, 0, impl_->stream>>>(din, dout, in, w, mean, rstd, C);
  layernorm_backward_params_kernel<<<blocks_for(C), kThreads, 0, impl_->stream>>>(dw, db, dout, in, mean, rstd, N, C);
  check(cudaGetLastError(), "layernorm_backward");
}

void CudaOps::matmul_forward(float* out, const float* in, const float* w, const float* bias, int N, int C, int OC,
                             WeightLayout layout) const {
  if (bias) {
    const std::size_t total = std::size_t(N) * OC;
    broadcast_rows_kernel<<<blocks_for(total), kThreads, 0, impl_->stream>>>(out, bias, OC, total);
    check(cudaGetLastError(), "matmul_forward bias");
  }
  const float beta = bias ? 1.0f : 0.0f;
  if (layout == WeightLayout::in_out)
    impl_->gemm(false, false, N, OC, C, 1.0f, in, C, 0, w, OC, 0, beta, out, OC, 0);
  else
    impl_->gemm(false, true, N, OC, C, 1.0f, in, C, 0, w, C, 0, beta, out, OC, 0);
}

void CudaOps::matmul_backward(float* din, float* dw, float* dbias, const float* dout, const float* in, const float* w,
                              int N, int C, int OC, WeightLayout layout) const {
  if (layout == WeightLayout::in_out) {
    if (din) impl_->gemm(false, true, N, C, OC, 1.0f, dout, OC, 0, w, OC, 0, 1.0f, din, C, 0);
    impl_->gemm(true, false, C, OC, N, 1.0f, in, C, 0, dout, OC, 0, 1.0f, dw, OC, 0);
  } else {
    if (din) impl_->gemm(false, false, N, C, OC, 1.0f, dout, OC, 0, w, C, 0, 1.0f, din, C, 0);
    impl_->gemm(true, false, OC, C, N, 1.0f, dout, OC, 0, in, C, 0, 1.0f, dw, C, 0);
  }
  if (dbias) {
    column_sum_kernel<<<blocks_for(OC), kThreads, 0, impl_->stream>>>(dbias, dout, N, OC);
    check(cudaGetLastError(), "matmul_backward bias");
  }
}

void CudaOps::attention_forward(float* out, float* att, const float* qkv, int B, int Tn, int C, int NH) const {
  const int hs = C / NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  const long long TT = static_cast<long long>(Tn) * Tn;
  for (int b = 0; b < B; ++b) {
    const float* q = qkv + std::size_t(b) * Tn * C3;
    float* p = att + std::size_t(b) * NH * TT;
    // Heads are hs apart in q, k, v and out, T*T apart in att: one strided batch per sequence.
    impl_->gemm(false, true, Tn, Tn, hs, scale, q, C3, hs, q + C, C3, hs, 0.0f, p, Tn, TT, NH);
  }
  if (B * NH * Tn > 0) {
    causal_softmax_kernel<<<B * NH * Tn, kThreads, 0, impl_->stream>>>(att, Tn);
    check(cudaGetLastError(), "attention_forward softmax");
  }
  for (int b = 0; b < B; ++b) {
    const float* v = qkv + std::size_t(b) * Tn * C3 + 2 * C;
    impl_->gemm(false, false, Tn, hs, Tn, 1.0f, att + std::size_t(b) * NH * TT, Tn, TT, v, C3, hs, 0.0f,
                out + std::size_t(b) * Tn * C, C, hs, NH);
  }
}

void CudaOps::attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, float* scratch,
                                 int B, int Tn, int C, int NH) const {
  const int hs = C / NH, C3 = 3 * C;
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h) {
      const std::size_t off = std::size_t(b) * Tn * C3 + std::size_t(h) * hs;
      const float* q = qkv + off;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + off;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      const float* p = att + (std::size_t(b) * NH + h) * Tn * Tn;
      const float* dO = dout + std::size_t(b) * Tn * C + std::size_t(h) * hs;
      impl_->gemm(false, true, Tn, Tn, hs, 1.0f, dO, C, 0, v, C3, 0, 0.0f, scratch, Tn, 0);  // dP = dO Vᵀ
      impl_->gemm(true, false, Tn, hs, Tn, 1.0f, p, Tn, 0, dO, C, 0, 1.0f, dv, C3, 0);       // dV += Pᵀ dO
      softmax_backward_kernel<<<Tn, kThreads, 0, impl_->stream>>>(scratch, p, Tn, scale);
      check(cudaGetLastError(), "attention_backward softmax");
      impl_->gemm(false, false, Tn, hs, Tn, 1.0f, scratch, Tn, 0, k, C3, 0, 1.0f, dq, C3, 0);  // dQ += dS K
      impl_->gemm(true, false, Tn, hs, Tn, 1.0f, scratch, Tn, 0, q, C3, 0, 1.0f, dk, C3, 0);   // dK += dSᵀ Q
    }
}

void CudaOps::gelu_forward(float* out, const float* in, std::size_t n) const {
  if (!n) return;
  gelu_forward_kernel<<<blocks_for(n), kThreads, 0, impl_->stream>>>(out, in, n);
  check(cudaGetLastError(), "gelu_forward");
}

void CudaOps::gelu_backward(float* din, const float* in, const float* dout, std::size_t n) const {
  if (!n) return;
  gelu_backward_kernel<<<blocks_for(n), kThreads, 0, impl_->stream>>>(din, in, dout, n);
  check(cudaGetLastError(), "gelu_backward");
}

void CudaOps::zero(float* p, std::size_t n) const {
  if (n) check(cudaMemsetAsync(p, 0, n * sizeof(float), impl_->stream), "zero");
}

void CudaOps::copy(float* dst, const float* src, std::size_t n) const {
  if (n) check(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, impl_->stream), "copy");
}

void CudaOps::residual_forward(float* out, const float* a, const float* b, std::size_t n) const {
  if (!n) return;
  residual_kernel<<<blocks_for(n), kThreads, 0, impl_->stream>>>(out, a, b, n);
  check(cudaGetLastError(), "residual_forward");
}

double CudaOps::cross_entropy(float* dlogits, const float* logits, const std::int32_t* targets, int N, int V,
                              double scale) const {
  check(cudaMemsetAsync(impl_->total, 0, sizeof(double), impl_->stream), "cross_entropy memset");
  if (N > 0) {
    cross_entropy_kernel<<<N, kThreads, 0, impl_->stream>>>(dlogits, logits, targets, V, static_cast<float>(scale / N),
                                                            impl_->total);
    check(cudaGetLastError(), "cross_entropy");
  }
  double total = 0;
  check(cudaMemcpyAsync(&total, impl_->total, sizeof(double), cudaMemcpyDeviceToHost, impl_->stream),
        "cross_entropy copy");
  check(cudaStreamSynchronize(impl_->stream), "cross_entropy synchronize");
  return total;
}

}  // namespace gpt
