#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_ops.hpp"

namespace gpt {

using shardopt::Error;
using shardopt::ErrorCode;

Shape preset(const std::string& name) {
  // GPT-2's published sizes (Radford et al. 2019; Hugging Face's gpt2, gpt2-medium, -large, -xl).
  if (name == "tiny") return {4, 4, 128, 256, 256};
  if (name == "small") return {12, 12, 768, 50257, 1024};
  if (name == "medium") return {24, 16, 1024, 50257, 1024};
  if (name == "large") return {36, 20, 1280, 50257, 1024};
  if (name == "xl") return {48, 25, 1600, 50257, 1024};
  throw Error(ErrorCode::invalid_argument,
              "preset: unknown GPT preset '" + name + "' (tiny, small, medium, large, xl)");
}

void validate(const Shape& s) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, what); };
  if (s.layers < 1) bad("layers must be >= 1, got " + std::to_string(s.layers));
  if (s.heads < 1) bad("heads must be >= 1, got " + std::to_string(s.heads));
  if (s.hidden < 1 || s.hidden % s.heads != 0)
    bad("hidden must be a positive multiple of heads (" + std::to_string(s.heads) + "), got " +
        std::to_string(s.hidden));
  if (s.vocab < 1 || s.vocab > 65536) bad("vocab must be in [1, 65536], got " + std::to_string(s.vocab));
  if (s.max_seq < 1) bad("max_seq must be >= 1, got " + std::to_string(s.max_seq));
}

std::size_t layer_param_count(const Shape& s) {
  const std::size_t C = s.hidden;
  return 12 * C * C + 13 * C;
}

std::size_t param_count(const Shape& s) {
  const std::size_t C = s.hidden;
  return std::size_t(s.vocab) * C + std::size_t(s.max_seq) * C + std::size_t(s.layers) * layer_param_count(s) +
         2 * C;
}

std::vector<shardopt::BlockSpec> blocks(const Shape& s) {
  const std::int64_t C = s.hidden;
  std::vector<shardopt::BlockSpec> out;
  out.push_back({"transformer.embed",
                 {{"transformer.wte.weight", {s.vocab, C}}, {"transformer.wpe.weight", {s.max_seq, C}}}});
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".";
    out.push_back({"transformer.h." + std::to_string(l),
                   {{p + "ln_1.weight", {C}, 1},
                    {p + "ln_1.bias", {C}, 1},
                    {p + "attn.c_attn.weight", {C, 3 * C}},
                    {p + "attn.c_attn.bias", {3 * C}, 1},
                    {p + "attn.c_proj.weight", {C, C}},
                    {p + "attn.c_proj.bias", {C}, 1},
                    {p + "ln_2.weight", {C}, 1},
                    {p + "ln_2.bias", {C}, 1},
                    {p + "mlp.c_fc.weight", {C, 4 * C}},
                    {p + "mlp.c_fc.bias", {4 * C}, 1},
                    {p + "mlp.c_proj.weight", {4 * C, C}},
                    {p + "mlp.c_proj.bias", {C}, 1}}});
  }
  out.push_back({"transformer.ln_f", {{"transformer.ln_f.weight", {C}, 1}, {"transformer.ln_f.bias", {C}, 1}}});
  return out;
}

namespace {

std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t hash_name(const std::string& s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

bool ends_with(const std::string& s, const char* tail) {
  const std::size_t n = std::strlen(tail);
  return s.size() >= n && s.compare(s.size() - n, n, tail) == 0;
}

}  // namespace

shardopt::InitFn init(const Shape& s, std::uint64_t seed) {
  const double residual_std = 0.02 / std::sqrt(2.0 * s.layers);
  return [seed, residual_std](const shardopt::Layout::TensorInfo& t, std::size_t begin, std::size_t count,
                              float* out) {
    const bool matrix = t.shape.size() == 2;
    if (!matrix) {  // LayerNorm weights start at 1, every bias at 0
      const float v = ends_with(t.name, ".weight") ? 1.0f : 0.0f;
      std::fill(out, out + count, v);
      return;
    }
    const double sd = ends_with(t.name, "c_proj.weight") ? residual_std : 0.02;
    const std::uint64_t key = mix(mix(seed) ^ hash_name(t.name));
    for (std::size_t k = 0; k < count; ++k) {
      const std::uint64_t i = begin + k;
      // Box-Muller on two counter-based uniforms; u1 in (0, 1] so the log is finite.
      const double u1 = static_cast<double>((mix(key + 2 * i) >> 11) + 1) * (1.0 / 9007199254740992.0);
      const double u2 = static_cast<double>(mix(key + 2 * i + 1) >> 11) * (1.0 / 9007199254740992.0);
      out[k] = static_cast<float>(sd * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
  };
}

template <class T>
Layer<T> layer_at(T* p, const Shape& s) {
  const std::size_t C = s.hidden;
  Layer<T> l;
  l.ln1_w = p; p += C;
  l.ln1_b = p; p += C;
  l.qkv_w = p; p += 3 * C * C;
  l.qkv_b = p; p += 3 * C;
  l.proj_w = p; p += C * C;
  l.proj_b = p; p += C;
  l.ln2_w = p; p += C;
  l.ln2_b = p; p += C;
  l.fc_w = p; p += 4 * C * C;
  l.fc_b = p; p += 4 * C;
  l.fcproj_w = p; p += 4 * C * C;
  l.fcproj_b = p;
  return l;
}

std::size_t layer_acts_elems(const Shape& s, int B, int Tn) {
  const std::size_t N = std::size_t(B) * Tn, C = s.hidden;
  return N * (15 * C + 4) + std::size_t(B) * s.heads * Tn * Tn;
}

template <class T>
LayerActs<T> layer_acts_at(T* p, const Shape& s, int B, int Tn) {
  const std::size_t N = std::size_t(B) * Tn, C = s.hidden;
  LayerActs<T> a;
  a.ln1 = p; p += N * C;
  a.ln1_mean = p; p += N;
  a.ln1_rstd = p; p += N;
  a.qkv = p; p += 3 * N * C;
  a.atty = p; p += N * C;
  a.res2 = p; p += N * C;
  a.ln2 = p; p += N * C;
  a.ln2_mean = p; p += N;
  a.ln2_rstd = p; p += N;
  a.fch = p; p += 4 * N * C;
  a.fch_gelu = p; p += 4 * N * C;
  a.att = p;
  return a;
}

std::size_t layer_scratch_elems(const Shape& s, int B, int Tn) {
  const std::size_t N = std::size_t(B) * Tn, C = s.hidden;
  return 2 * N * C + 8 * N * C + std::size_t(Tn) * Tn;
}

template <class T>
void layer_forward(const Ops<T>& ops, const Shape& s, int B, int Tn, const Layer<const T>& p, const T* x,
                   const LayerActs<T>& a, T* y) {
  const int N = B * Tn, C = s.hidden;
  const std::size_t NC = std::size_t(N) * C;
  ops.layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, p.ln1_w, p.ln1_b, N, C);
  ops.matmul_forward(a.qkv, a.ln1, p.qkv_w, p.qkv_b, N, C, 3 * C, WeightLayout::in_out);
  ops.attention_forward(a.atty, a.att, a.qkv, B, Tn, C, s.heads);
  ops.matmul_forward(a.res2, a.atty, p.proj_w, p.proj_b, N, C, C, WeightLayout::in_out);
  ops.residual_forward(a.res2, a.res2, x, NC);
  ops.layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, p.ln2_w, p.ln2_b, N, C);
  ops.matmul_forward(a.fch, a.ln2, p.fc_w, p.fc_b, N, C, 4 * C, WeightLayout::in_out);
  ops.gelu_forward(a.fch_gelu, a.fch, 4 * NC);
  ops.matmul_forward(y, a.fch_gelu, p.fcproj_w, p.fcproj_b, N, 4 * C, C, WeightLayout::in_out);
  ops.residual_forward(y, y, a.res2, NC);
}

template <class T>
void layer_backward(const Ops<T>& ops, const Shape& s, int B, int Tn, const Layer<const T>& p, const Layer<T>& g,
                    const T* x, const LayerActs<T>& a, const T* dy, T* dx, T* scratch) {
  const int N = B * Tn, C = s.hidden;
  const std::size_t NC = std::size_t(N) * C;
  T* dres2 = scratch;
  T* dsmall = dres2 + NC;
  T* dbig = dsmall + NC;
  T* dbig2 = dbig + 4 * NC;
  T* dp = dbig2 + 4 * NC;
  // MLP half: y = res2 + c_proj(gelu(c_fc(ln_2(res2)))).
  ops.copy(dres2, dy, NC);
  ops.zero(dbig, 4 * NC);
  ops.matmul_backward(dbig, g.fcproj_w, g.fcproj_b, dy, a.fch_gelu, p.fcproj_w, N, 4 * C, C, WeightLayout::in_out);
  ops.zero(dbig2, 4 * NC);
  ops.gelu_backward(dbig2, a.fch, dbig, 4 * NC);
  ops.zero(dsmall, NC);
  ops.matmul_backward(dsmall, g.fc_w, g.fc_b, dbig2, a.ln2, p.fc_w, N, C, 4 * C, WeightLayout::in_out);
  ops.layernorm_backward(dres2, g.ln2_w, g.ln2_b, dsmall, a.res2, p.ln2_w, a.ln2_mean, a.ln2_rstd, N, C);
  // Attention half: res2 = x + c_proj(attention(c_attn(ln_1(x)))).
  ops.residual_forward(dx, dx, dres2, NC);
  ops.zero(dsmall, NC);
  ops.matmul_backward(dsmall, g.proj_w, g.proj_b, dres2, a.atty, p.proj_w, N, C, C, WeightLayout::in_out);
  ops.zero(dbig, 3 * NC);
  ops.attention_backward(dbig, dsmall, a.qkv, a.att, dp, B, Tn, C, s.heads);
  ops.zero(dsmall, NC);
  ops.matmul_backward(dsmall, g.qkv_w, g.qkv_b, dbig, a.ln1, p.qkv_w, N, C, 3 * C, WeightLayout::in_out);
  ops.layernorm_backward(dx, g.ln1_w, g.ln1_b, dsmall, x, p.ln1_w, a.ln1_mean, a.ln1_rstd, N, C);
}

template <class T>
double model_forward_backward(const Ops<T>& ops, const Shape& s, int B, int Tn, const T* params, T* grads,
                              const std::int32_t* tokens, const std::int32_t* targets, double scale,
                              T* last_logits) {
  const int N = B * Tn, C = s.hidden, V = s.vocab, L = s.layers;
  const std::size_t NC = std::size_t(N) * C, LP = layer_param_count(s);
  const std::size_t wpe_off = std::size_t(V) * C, layers_off = wpe_off + std::size_t(s.max_seq) * C;
  const std::size_t lnf_off = layers_off + L * LP;
  std::vector<T> xs((L + 1) * NC), acts(L * layer_acts_elems(s, B, Tn)), lnf(NC), stats(2 * N),
      logits(std::size_t(N) * V);
  const std::size_t AE = layer_acts_elems(s, B, Tn);
  auto layer_p = [&](int l) {
    const Layer<T> m = layer_at(const_cast<T*>(params) + layers_off + l * LP, s);
    return Layer<const T>{m.ln1_w, m.ln1_b, m.qkv_w, m.qkv_b, m.proj_w, m.proj_b,
                          m.ln2_w, m.ln2_b, m.fc_w,  m.fc_b,  m.fcproj_w, m.fcproj_b};
  };
  ops.embed_forward(xs.data(), tokens, params, params + wpe_off, B, Tn, C);
  for (int l = 0; l < L; ++l)
    layer_forward(ops, s, B, Tn, layer_p(l), &xs[l * NC], layer_acts_at(&acts[l * AE], s, B, Tn),
                  &xs[(l + 1) * NC]);
  ops.layernorm_forward(lnf.data(), stats.data(), stats.data() + N, &xs[L * NC], params + lnf_off,
                        params + lnf_off + C, N, C);
  ops.matmul_forward(logits.data(), lnf.data(), params, nullptr, N, C, V, WeightLayout::out_in);
  if (last_logits)
    for (int b = 0; b < B; ++b)
      std::copy_n(&logits[(std::size_t(b) * Tn + Tn - 1) * V], V, last_logits + std::size_t(b) * V);
  if (!targets) return 0.0;
  const double loss = ops.cross_entropy(grads ? logits.data() : nullptr, logits.data(), targets, N, V, scale) / N;
  if (!grads) return loss;

  std::vector<T> dl(NC, T(0)), dx((L + 1) * NC, T(0)), scratch(layer_scratch_elems(s, B, Tn));
  ops.matmul_backward(dl.data(), grads, nullptr, logits.data(), lnf.data(), params, N, C, V, WeightLayout::out_in);
  ops.layernorm_backward(&dx[L * NC], grads + lnf_off, grads + lnf_off + C, dl.data(), &xs[L * NC],
                         params + lnf_off, stats.data(), stats.data() + N, N, C);
  for (int l = L - 1; l >= 0; --l)
    layer_backward(ops, s, B, Tn, layer_p(l), layer_at(grads + layers_off + l * LP, s), &xs[l * NC],
                   layer_acts_at(&acts[l * AE], s, B, Tn), &dx[(l + 1) * NC], &dx[l * NC], scratch.data());
  ops.embed_backward(grads, grads + wpe_off, dx.data(), tokens, B, Tn, C);
  return loss;
}

double flops_per_token(const Shape& s, int seq) {
  const double matmul_params = double(param_count(s)) - double(s.max_seq) * s.hidden;
  return 6.0 * matmul_params + 12.0 * s.layers * s.hidden * double(seq);
}

#define SHARDOPT_GPT_INSTANTIATE(T)                                                                             \
  template Layer<T> layer_at<T>(T*, const Shape&);                                                              \
  template Layer<const T> layer_at<const T>(const T*, const Shape&);                                            \
  template LayerActs<T> layer_acts_at<T>(T*, const Shape&, int, int);                                           \
  template void layer_forward<T>(const Ops<T>&, const Shape&, int, int, const Layer<const T>&, const T*,        \
                                 const LayerActs<T>&, T*);                                                      \
  template void layer_backward<T>(const Ops<T>&, const Shape&, int, int, const Layer<const T>&, const Layer<T>&, \
                                  const T*, const LayerActs<T>&, const T*, T*, T*);                             \
  template double model_forward_backward<T>(const Ops<T>&, const Shape&, int, int, const T*, T*,                \
                                            const std::int32_t*, const std::int32_t*, double, T*);
SHARDOPT_GPT_INSTANTIATE(float)
SHARDOPT_GPT_INSTANTIATE(double)
#undef SHARDOPT_GPT_INSTANTIATE

}  // namespace gpt
