#pragma once
// The operations of a GPT-2 forward and backward pass, on raw pointers, behind one interface so
// that the model code (model.hpp) is written once and a CPU implementation (cpu_ops.hpp, BLAS)
// or a device implementation can run it.
//
// Conventions shared by every op:
// - Activations are row-major [N, C] with N = B * T rows (batch-major, then time).
// - Forward ops WRITE their outputs. Backward ops ADD into every gradient output (input gradients
//   and parameter gradients alike), so the caller zeroes an activation gradient before the first
//   op that contributes to it, and parameter gradients accumulate across micro-steps and across
//   the two uses of the tied token embedding.
// - A nullable pointer (bias, its gradient, an input gradient) means "absent": the op skips it.
// - Memory: every op works in the buffers it is given; ops allocate nothing. Where an op needs
//   scratch it takes it as an argument with its size documented.
// - Thread safety: an Ops object holds no mutable state; one object may serve several threads.
#include <cstddef>
#include <cstdint>

namespace gpt {

// How a weight matrix of a linear map from C inputs to OC outputs is stored.
enum class WeightLayout {
  in_out,  // [C, OC]: Hugging Face's Conv1D (c_attn, c_proj, c_fc); out = in · W
  out_in,  // [OC, C]: the token embedding used as the LM head; out = in · Wᵀ
};

template <class T>
class Ops {
 public:
  virtual ~Ops() = default;

  // out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]. tokens must be < V (checked by the caller).
  virtual void embed_forward(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, int B, int Tn,
                             int C) const = 0;
  virtual void embed_backward(T* dwte, T* dwpe, const T* dout, const std::int32_t* tokens, int B, int Tn,
                              int C) const = 0;

  // out = (in - mean) * rstd * w + b per row (eps 1e-5, GPT-2's); keeps mean and rstd [N].
  virtual void layernorm_forward(T* out, T* mean, T* rstd, const T* in, const T* w, const T* b, int N,
                                 int C) const = 0;
  virtual void layernorm_backward(T* din, T* dw, T* db, const T* dout, const T* in, const T* w, const T* mean,
                                  const T* rstd, int N, int C) const = 0;

  // out [N, OC] = in [N, C] · W + bias.
  virtual void matmul_forward(T* out, const T* in, const T* w, const T* bias, int N, int C, int OC,
                              WeightLayout layout) const = 0;
  virtual void matmul_backward(T* din, T* dw, T* dbias, const T* dout, const T* in, const T* w, int N, int C,
                               int OC, WeightLayout layout) const = 0;

  // Causal multi-head self-attention on a fused projection qkv [N, 3C] (q, k, v each [N, C],
  // heads of C / NH consecutive channels): out [N, C]; keeps the probabilities att [B, NH, T, T]
  // (zero above the diagonal) for backward.
  virtual void attention_forward(T* out, T* att, const T* qkv, int B, int Tn, int C, int NH) const = 0;
  // scratch: Tn * Tn elements.
  virtual void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, T* scratch, int B, int Tn,
                                  int C, int NH) const = 0;

  // GPT-2's GELU, the tanh approximation, element-wise over n values.
  virtual void gelu_forward(T* out, const T* in, std::size_t n) const = 0;
  virtual void gelu_backward(T* din, const T* in, const T* dout, std::size_t n) const = 0;

  // p[0, n) = 0, and dst[0, n) = src[0, n) (the model code never touches memory but through ops,
  // so it runs unchanged on device buffers).
  virtual void zero(T* p, std::size_t n) const = 0;
  virtual void copy(T* dst, const T* src, std::size_t n) const = 0;

  // out = a + b, element-wise (out may alias a or b).
  virtual void residual_forward(T* out, const T* a, const T* b, std::size_t n) const = 0;

  // Softmax cross-entropy of logits [N, V] against targets [N]; returns the SUM of the N losses
  // (in double whatever T is). With dlogits non-null, OVERWRITES logits' gradient into it
  // (dlogits may alias logits): dlogits = scale * (softmax - onehot) / N, i.e. the gradient of
  // scale * mean loss.
  virtual double cross_entropy(T* dlogits, const T* logits, const std::int32_t* targets, int N, int V,
                               double scale) const = 0;
};

}  // namespace gpt
