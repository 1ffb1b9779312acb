#pragma once
// The CPU implementation of gpt::Ops: matrix products through CBLAS (sgemm for float, dgemm for
// double), everything else as plain loops. Templated on the scalar so that the double
// instantiation is the float path's test oracle: the same code, with rounding far below the
// float path's, checked itself against finite differences (tests/test_gpt.cpp).
//
// The loops run on the calling thread; only the BLAS calls may use more threads (the trainer
// sets OpenBLAS's thread count). Instantiated for float and double in cpu_ops.cpp.
#include "ops.hpp"

namespace gpt {

template <class T>
class CpuOps final : public Ops<T> {
 public:
  void embed_forward(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, int B, int Tn,
                     int C) const override;
  void embed_backward(T* dwte, T* dwpe, const T* dout, const std::int32_t* tokens, int B, int Tn,
                      int C) const override;
  void layernorm_forward(T* out, T* mean, T* rstd, const T* in, const T* w, const T* b, int N,
                         int C) const override;
  void layernorm_backward(T* din, T* dw, T* db, const T* dout, const T* in, const T* w, const T* mean,
                          const T* rstd, int N, int C) const override;
  void matmul_forward(T* out, const T* in, const T* w, const T* bias, int N, int C, int OC,
                      WeightLayout layout) const override;
  void matmul_backward(T* din, T* dw, T* dbias, const T* dout, const T* in, const T* w, int N, int C, int OC,
                       WeightLayout layout) const override;
  void attention_forward(T* out, T* att, const T* qkv, int B, int Tn, int C, int NH) const override;
  void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, T* scratch, int B, int Tn, int C,
                          int NH) const override;
  void gelu_forward(T* out, const T* in, std::size_t n) const override;
  void gelu_backward(T* din, const T* in, const T* dout, std::size_t n) const override;
  void zero(T* p, std::size_t n) const override;
  void copy(T* dst, const T* src, std::size_t n) const override;
  void residual_forward(T* out, const T* a, const T* b, std::size_t n) const override;
  double cross_entropy(T* dlogits, const T* logits, const std::int32_t* targets, int N, int V,
                       double scale) const override;
};

extern template class CpuOps<float>;
extern template class CpuOps<double>;

// Row-major GEMM C = alpha * op(A) · op(B) + beta * C with leading dimensions (CBLAS).
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc);
void gemm(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, int lda,
          const double* B, int ldb, double beta, double* C, int ldc);

// Sets the threads each BLAS call may use (OpenBLAS only; a no-op with another CBLAS).
void set_blas_threads(int threads);

}  // namespace gpt
