#pragma once
// The GPU implementation of gpt::Ops<float> (ops.hpp): matrix products through cuBLAS, the rest
// as this project's own kernels (embedding, LayerNorm, GELU, causal softmax attention around
// cuBLAS products, cross-entropy), reductions through CUB.
//
// Every pointer an op takes is device memory (tokens and targets too). Every op is enqueued on
// the stream given at construction and returns without waiting, except cross_entropy, which
// returns the summed loss on the host and so waits for the stream.
//
// Precision: activations and parameters are fp32 in memory. With GemmMode::bf16 the products run
// on tensor cores with bf16 inputs and fp32 accumulation (cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF);
// GemmMode::fp32 computes them in full fp32 (what the tests compare with the CPU path).
// Parameter-gradient sums over rows (bias, LayerNorm weights, embedding rows) use one thread per
// column or float atomics: the embedding's backward is not bit-reproducible run to run.
//
// Thread safety: one CudaOps per stream; the object holds the cuBLAS handle and scratch.
// Errors: a failed CUDA or cuBLAS call throws std::runtime_error naming the call.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "ops.hpp"

namespace gpt {

enum class GemmMode { bf16, fp32 };

class CudaOps final : public Ops<float> {
 public:
  // stream: a cudaStream_t (void* so that this header needs no CUDA include); nullptr is the
  // default stream. Throws if no device can be used.
  explicit CudaOps(void* stream = nullptr, GemmMode mode = GemmMode::bf16);
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  void embed_forward(float* out, const std::int32_t* tokens, const float* wte, const float* wpe, int B, int Tn,
                     int C) const override;
  void embed_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens, int B, int Tn,
                      int C) const override;
  void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* w, const float* b,
                         int N, int C) const override;
  void layernorm_backward(float* din, float* dw, float* db, const float* dout, const float* in, const float* w,
                          const float* mean, const float* rstd, int N, int C) const override;
  void matmul_forward(float* out, const float* in, const float* w, const float* bias, int N, int C, int OC,
                      WeightLayout layout) const override;
  void matmul_backward(float* din, float* dw, float* dbias, const float* dout, const float* in, const float* w,
                       int N, int C, int OC, WeightLayout layout) const override;
  void attention_forward(float* out, float* att, const float* qkv, int B, int Tn, int C, int NH) const override;
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, float* scratch, int B,
                          int Tn, int C, int NH) const override;
  void gelu_forward(float* out, const float* in, std::size_t n) const override;
  void gelu_backward(float* din, const float* in, const float* dout, std::size_t n) const override;
  void zero(float* p, std::size_t n) const override;
  void copy(float* dst, const float* src, std::size_t n) const override;
  void residual_forward(float* out, const float* a, const float* b, std::size_t n) const override;
  double cross_entropy(float* dlogits, const float* logits, const std::int32_t* targets, int N, int V,
                       double scale) const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Whether a CUDA device is usable (tests skip without one).
bool cuda_ops_device_available() noexcept;

}  // namespace gpt
