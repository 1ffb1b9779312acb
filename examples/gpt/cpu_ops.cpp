#include "cpu_ops.hpp"

#if !defined(SHARDOPT_EXAMPLE_NO_BLAS)
#include <cblas.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gpt {

#if defined(SHARDOPT_EXAMPLE_NO_BLAS)
namespace {
// The products without a BLAS (a build with no CLI, e.g. the GPU machine's check of the CUDA ops,
// where the CPU ops are only the reference): row-major C = alpha op(A) op(B) + beta C, each dot
// product summed in double. beta == 0 overwrites C (whatever it held), as BLAS does.
template <class T>
void loop_gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
               int ldc) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double acc = 0;
      for (int k = 0; k < K; ++k) {
        const double a = ta ? A[std::size_t(k) * lda + i] : A[std::size_t(i) * lda + k];
        const double b = tb ? B[std::size_t(j) * ldb + k] : B[std::size_t(k) * ldb + j];
        acc += a * b;
      }
      T& c = C[std::size_t(i) * ldc + j];
      c = beta == T(0) ? static_cast<T>(alpha * acc) : static_cast<T>(alpha * acc + double(beta) * double(c));
    }
}
}  // namespace
#endif

void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
          float beta, float* C, int ldc) {
#if defined(SHARDOPT_EXAMPLE_NO_BLAS)
  loop_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
#endif
}

void gemm(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda, const double* B, int ldb,
          double beta, double* C, int ldc) {
#if defined(SHARDOPT_EXAMPLE_NO_BLAS)
  loop_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
#endif
}

void set_blas_threads(int threads) {
#if defined(SHARDOPT_EXAMPLE_OPENBLAS)
  openblas_set_num_threads(std::max(1, threads));
#else
  (void)threads;
#endif
}

namespace {
constexpr double kLayerNormEps = 1e-5;                   // GPT2Config.layer_norm_epsilon
constexpr double kGeluK = 0.7978845608028654;            // sqrt(2 / pi)
constexpr double kGeluC = 0.044715;
}  // namespace

template <class T>
void CpuOps<T>::embed_forward(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, int B, int Tn,
                              int C) const {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < Tn; ++t) {
      T* o = out + (std::size_t(b) * Tn + t) * C;
      const T* e = wte + std::size_t(tokens[b * Tn + t]) * C;
      const T* p = wpe + std::size_t(t) * C;
      for (int i = 0; i < C; ++i) o[i] = e[i] + p[i];
    }
}

template <class T>
void CpuOps<T>::embed_backward(T* dwte, T* dwpe, const T* dout, const std::int32_t* tokens, int B, int Tn,
                               int C) const {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < Tn; ++t) {
      const T* d = dout + (std::size_t(b) * Tn + t) * C;
      T* e = dwte + std::size_t(tokens[b * Tn + t]) * C;
      T* p = dwpe + std::size_t(t) * C;
      for (int i = 0; i < C; ++i) {
        e[i] += d[i];
        p[i] += d[i];
      }
    }
}

template <class T>
void CpuOps<T>::layernorm_forward(T* out, T* mean, T* rstd, const T* in, const T* w, const T* b, int N,
                                  int C) const {
  for (int n = 0; n < N; ++n) {
    const T* x = in + std::size_t(n) * C;
    double m = 0;
    for (int i = 0; i < C; ++i) m += x[i];
    m /= C;
    double v = 0;
    for (int i = 0; i < C; ++i) v += (x[i] - m) * (x[i] - m);
    v /= C;
    const double s = 1.0 / std::sqrt(v + kLayerNormEps);
    T* o = out + std::size_t(n) * C;
    for (int i = 0; i < C; ++i) o[i] = static_cast<T>((x[i] - m) * s) * w[i] + b[i];
    mean[n] = static_cast<T>(m);
    rstd[n] = static_cast<T>(s);
  }
}

template <class T>
void CpuOps<T>::layernorm_backward(T* din, T* dw, T* db, const T* dout, const T* in, const T* w, const T* mean,
                                   const T* rstd, int N, int C) const {
  for (int n = 0; n < N; ++n) {
    const T* x = in + std::size_t(n) * C;
    const T* d = dout + std::size_t(n) * C;
    const T m = mean[n], s = rstd[n];
    // din = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
    double dmean = 0, dnorm_mean = 0;
    for (int i = 0; i < C; ++i) {
      const T norm = (x[i] - m) * s;
      const T dn = d[i] * w[i];
      dmean += dn;
      dnorm_mean += dn * norm;
    }
    dmean /= C;
    dnorm_mean /= C;
    T* di = din + std::size_t(n) * C;
    for (int i = 0; i < C; ++i) {
      const T norm = (x[i] - m) * s;
      const T dn = d[i] * w[i];
      db[i] += d[i];
      dw[i] += norm * d[i];
      di[i] += s * static_cast<T>(dn - dmean - norm * dnorm_mean);
    }
  }
}

template <class T>
void CpuOps<T>::matmul_forward(T* out, const T* in, const T* w, const T* bias, int N, int C, int OC,
                               WeightLayout layout) const {
  if (bias)
    for (int n = 0; n < N; ++n) std::memcpy(out + std::size_t(n) * OC, bias, sizeof(T) * OC);
  const T beta = bias ? T(1) : T(0);
  if (layout == WeightLayout::in_out)
    gemm(false, false, N, OC, C, T(1), in, C, w, OC, beta, out, OC);
  else
    gemm(false, true, N, OC, C, T(1), in, C, w, C, beta, out, OC);
}

template <class T>
void CpuOps<T>::matmul_backward(T* din, T* dw, T* dbias, const T* dout, const T* in, const T* w, int N, int C,
                                int OC, WeightLayout layout) const {
  if (layout == WeightLayout::in_out) {
    if (din) gemm(false, true, N, C, OC, T(1), dout, OC, w, OC, T(1), din, C);  // din += dout · Wᵀ
    gemm(true, false, C, OC, N, T(1), in, C, dout, OC, T(1), dw, OC);           // dW += inᵀ · dout
  } else {
    if (din) gemm(false, false, N, C, OC, T(1), dout, OC, w, C, T(1), din, C);  // din += dout · W
    gemm(true, false, OC, C, N, T(1), dout, OC, in, C, T(1), dw, C);            // dW += doutᵀ · in
  }
  if (dbias)
    for (int n = 0; n < N; ++n) {
      const T* d = dout + std::size_t(n) * OC;
      for (int o = 0; o < OC; ++o) dbias[o] += d[o];
    }
}

template <class T>
void CpuOps<T>::attention_forward(T* out, T* att, const T* qkv, int B, int Tn, int C, int NH) const {
  const int hs = C / NH, C3 = 3 * C;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hs)));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h) {
      const T* q = qkv + std::size_t(b) * Tn * C3 + std::size_t(h) * hs;
      const T* k = q + C;
      const T* v = q + 2 * C;
      T* p = att + (std::size_t(b) * NH + h) * Tn * Tn;
      // Scores for every (t, t2) by one GEMM (the masked half is computed and discarded: a GEMM
      // on the full square is still faster than T small ones).
      gemm(false, true, Tn, Tn, hs, scale, q, C3, k, C3, T(0), p, Tn);
      for (int t = 0; t < Tn; ++t) {
        T* row = p + std::size_t(t) * Tn;
        T mx = row[0];
        for (int u = 1; u <= t; ++u) mx = std::max(mx, row[u]);
        double sum = 0;
        for (int u = 0; u <= t; ++u) {
          row[u] = static_cast<T>(std::exp(row[u] - mx));
          sum += row[u];
        }
        const T inv = static_cast<T>(1.0 / sum);
        for (int u = 0; u <= t; ++u) row[u] *= inv;
        for (int u = t + 1; u < Tn; ++u) row[u] = T(0);
      }
      gemm(false, false, Tn, hs, Tn, T(1), p, Tn, v, C3, T(0), out + std::size_t(b) * Tn * C + std::size_t(h) * hs,
           C);
    }
}

template <class T>
void CpuOps<T>::attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, T* scratch, int B, int Tn,
                                   int C, int NH) const {
  const int hs = C / NH, C3 = 3 * C;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hs)));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h) {
      const std::size_t off = std::size_t(b) * Tn * C3 + std::size_t(h) * hs;
      const T* q = qkv + off;
      const T* k = q + C;
      const T* v = q + 2 * C;
      T* dq = dqkv + off;
      T* dk = dq + C;
      T* dv = dq + 2 * C;
      const T* p = att + (std::size_t(b) * NH + h) * Tn * Tn;
      const T* dO = dout + std::size_t(b) * Tn * C + std::size_t(h) * hs;
      T* dp = scratch;
      gemm(false, true, Tn, Tn, hs, T(1), dO, C, v, C3, T(0), dp, Tn);  // dP = dO · Vᵀ
      gemm(true, false, Tn, hs, Tn, T(1), p, Tn, dO, C, T(1), dv, C3);  // dV += Pᵀ · dO
      // Softmax backward: dS = P ⊙ (dP − rowsum(P ⊙ dP)), times the score scale. P is zero
      // above the diagonal, so dS is too and the mask needs no separate step.
      for (int t = 0; t < Tn; ++t) {
        const T* pr = p + std::size_t(t) * Tn;
        T* dr = dp + std::size_t(t) * Tn;
        double dot = 0;
        for (int u = 0; u <= t; ++u) dot += pr[u] * dr[u];
        for (int u = 0; u <= t; ++u) dr[u] = scale * pr[u] * static_cast<T>(dr[u] - dot);
        for (int u = t + 1; u < Tn; ++u) dr[u] = T(0);
      }
      gemm(false, false, Tn, hs, Tn, T(1), dp, Tn, k, C3, T(1), dq, C3);  // dQ += dS · K
      gemm(true, false, Tn, hs, Tn, T(1), dp, Tn, q, C3, T(1), dk, C3);   // dK += dSᵀ · Q
    }
}

template <class T>
void CpuOps<T>::gelu_forward(T* out, const T* in, std::size_t n) const {
  for (std::size_t i = 0; i < n; ++i) {
    const T x = in[i];
    const T u = static_cast<T>(kGeluK) * (x + static_cast<T>(kGeluC) * x * x * x);
    out[i] = T(0.5) * x * (T(1) + std::tanh(u));
  }
}

template <class T>
void CpuOps<T>::gelu_backward(T* din, const T* in, const T* dout, std::size_t n) const {
  for (std::size_t i = 0; i < n; ++i) {
    const T x = in[i];
    const T u = static_cast<T>(kGeluK) * (x + static_cast<T>(kGeluC) * x * x * x);
    const T th = std::tanh(u);
    const T du = static_cast<T>(kGeluK) * (T(1) + T(3) * static_cast<T>(kGeluC) * x * x);
    din[i] += dout[i] * (T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * du);
  }
}

template <class T>
void CpuOps<T>::zero(T* p, std::size_t n) const {
  std::fill(p, p + n, T(0));
}

template <class T>
void CpuOps<T>::copy(T* dst, const T* src, std::size_t n) const {
  std::copy(src, src + n, dst);
}

template <class T>
void CpuOps<T>::residual_forward(T* out, const T* a, const T* b, std::size_t n) const {
  for (std::size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <class T>
double CpuOps<T>::cross_entropy(T* dlogits, const T* logits, const std::int32_t* targets, int N, int V,
                                double scale) const {
  double total = 0;
  const double k = scale / N;
  for (int n = 0; n < N; ++n) {
    const T* z = logits + std::size_t(n) * V;
    T mx = z[0];
    for (int v = 1; v < V; ++v) mx = std::max(mx, z[v]);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(z[v] - mx));
    const double lse = std::log(sum) + static_cast<double>(mx);
    total += lse - static_cast<double>(z[targets[n]]);
    if (dlogits) {
      T* d = dlogits + std::size_t(n) * V;
      const double inv = 1.0 / sum;
      for (int v = 0; v < V; ++v) {
        const double p = std::exp(static_cast<double>(z[v] - mx)) * inv;
        d[v] = static_cast<T>(k * (p - (v == targets[n] ? 1.0 : 0.0)));
      }
    }
  }
  return total;
}

template class CpuOps<float>;
template class CpuOps<double>;

}  // namespace gpt
