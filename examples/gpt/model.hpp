#pragma once
// GPT-2's architecture as engine blocks, and its forward and backward pass written once over
// gpt::Ops (ops.hpp), templated on the scalar.
//
//   x0 = wte[tokens] + wpe[positions]                                   block 0 "transformer.embed"
//   for each layer l:                                                   block 1+l "transformer.h.<l>"
//     x = x + c_proj(attention(c_attn(ln_1(x))))      causal, fused QKV, n_head heads
//     x = x + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(x))))                  4h hidden
//   logits = ln_f(x) · wteᵀ        (LM head tied to the token embedding) block L+1 "transformer.ln_f"
//   loss = mean cross-entropy of logits against the next tokens
//
// Tensor names, shapes and layouts are Hugging Face's GPT2LMHeadModel ones (Conv1D weights
// [in, out]), so a checkpoint's tensors are a `model.safetensors` that transformers loads.
// Weight matrices and embeddings are in parameter group 0 (weight decay); biases and LayerNorm
// weights in group 1.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ops.hpp"
#include "shardopt/shardopt.hpp"

namespace gpt {

struct Shape {
  int layers = 2;
  int heads = 2;
  int hidden = 64;     // C (n_embd); a multiple of heads
  int vocab = 256;     // V
  int max_seq = 128;   // positions (n_positions); the training sequence length is <= this
};

// "tiny" (tests and the demo: 4 layers, 4 heads, hidden 128, vocab 256, 256 positions),
// "small", "medium", "large", "xl" (GPT-2's: vocab 50257, 1024 positions). Error naming the
// preset if unknown.
Shape preset(const std::string& name);
// Throws shardopt::Error naming the field if a size is out of range.
void validate(const Shape& s);

std::vector<shardopt::BlockSpec> blocks(const Shape& s);
std::size_t param_count(const Shape& s);
std::size_t layer_param_count(const Shape& s);
// The block index of layer l, of the embeddings and of the final norm.
inline int embed_block() { return 0; }
inline int layer_block(int l) { return 1 + l; }
inline int final_block(const Shape& s) { return 1 + s.layers; }

// Initial values as GPT-2's reference: weights normal(0, 0.02), the residual projections
// (attn.c_proj and mlp.c_proj) normal(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm weights 1.
// Counter-based (seed, tensor name, element index), so independent of world size and stage.
shardopt::InitFn init(const Shape& s, std::uint64_t seed);

// Pointers into one transformer layer's tensors, in registration order.
template <class T>
struct Layer {
  T* ln1_w; T* ln1_b; T* qkv_w; T* qkv_b; T* proj_w; T* proj_b;
  T* ln2_w; T* ln2_b; T* fc_w;  T* fc_b;  T* fcproj_w; T* fcproj_b;
};
// Splits a contiguous layer (registration order) into its tensors.
template <class T>
Layer<T> layer_at(T* base, const Shape& s);

// What one layer's forward keeps for its backward, for a micro-batch of N = B * T rows.
template <class T>
struct LayerActs {
  T* ln1; T* ln1_mean; T* ln1_rstd; T* qkv; T* atty; T* att; T* res2;
  T* ln2; T* ln2_mean; T* ln2_rstd; T* fch; T* fch_gelu;
};
std::size_t layer_acts_elems(const Shape& s, int B, int Tn);
template <class T>
LayerActs<T> layer_acts_at(T* base, const Shape& s, int B, int Tn);
// Scratch one layer's backward needs (gradients of its intermediate activations).
std::size_t layer_scratch_elems(const Shape& s, int B, int Tn);

// x_out = layer(x_in); fills acts. x_out may not alias x_in.
template <class T>
void layer_forward(const Ops<T>& ops, const Shape& s, int B, int Tn, const Layer<const T>& p, const T* x_in,
                   const LayerActs<T>& a, T* x_out);
// Given dx_out, ADDS dL/dx_in into dx_in (which may not alias dx_out) and dL/dparams into g.
template <class T>
void layer_backward(const Ops<T>& ops, const Shape& s, int B, int Tn, const Layer<const T>& p, const Layer<T>& g,
                    const T* x_in, const LayerActs<T>& a, const T* dx_out, T* dx_in, T* scratch);

// layer_forward and layer_backward touch memory only through `ops`, so they run on whatever
// memory the ops work on (host for CpuOps, device for CudaOps).
//
// The whole model on flat parameters in registration order (no engine; host memory, CPU ops):
// the reference the tests differentiate, and what `generate` runs. tokens and targets are [B, Tn]. Returns the
// mean loss; with grads non-null ADDS the gradient of scale * mean loss into it. When logits is
// non-null the last position's logits [B, V] are copied there.
template <class T>
double model_forward_backward(const Ops<T>& ops, const Shape& s, int B, int Tn, const T* params, T* grads,
                              const std::int32_t* tokens, const std::int32_t* targets, double scale = 1.0,
                              T* last_logits = nullptr);

// Flops of one training token (forward + backward), by PaLM's accounting: 6 per parameter used
// in a matrix product (every parameter but the position embedding; the token embedding is the
// LM head) plus 12 * layers * hidden * seq for attention's two products.
double flops_per_token(const Shape& s, int seq);

}  // namespace gpt
