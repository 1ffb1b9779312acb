// The GPT's GPU ops (examples/gpt/cuda) against its CPU ops, op by op and through a whole
// transformer layer forward and backward. Products in full fp32 (GemmMode::fp32) must agree with
// the CPU's to float rounding of a different summation order; in bf16 (tensor cores, fp32
// accumulation) to bf16's 8-bit mantissa. Skips visibly without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "cpu_ops.hpp"
#include "cuda/cuda_ops.hpp"
#include "cuda/train_cuda.hpp"
#include "data.hpp"
#include "model.hpp"
#include "shardopt/cuda.hpp"

namespace {

#define SKIP_WITHOUT_DEVICE()                                                     \
  if (!gpt::cuda_ops_device_available()) GTEST_SKIP() << "no CUDA device"

std::vector<float> values(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  std::uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& e : v) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    e = scale * static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return v;
}

template <class T>
struct Dev {
  T* p = nullptr;
  std::size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    EXPECT_EQ(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

// Element-wise: |gpu - cpu| <= tol * (1 + max |cpu|) (a relative bound on the tensor's scale).
void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol, const char* what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double mx = 0;
  for (float v : cpu) mx = std::max(mx, double(std::fabs(v)));
  for (std::size_t i = 0; i < cpu.size(); ++i) ASSERT_NEAR(gpu[i], cpu[i], tol * (1 + mx)) << what << "[" << i << "]";
}

const gpt::CpuOps<float> cpu;

TEST(GptCudaOps, ElementWiseAndNormOpsMatchTheCpu) {
  SKIP_WITHOUT_DEVICE();
  const gpt::CudaOps gpu(nullptr, gpt::GemmMode::fp32);
  const int B = 2, T = 5, C = 37, N = B * T, V = 11;
  // embedding
  std::vector<std::int32_t> tok = {3, 1, 10, 0, 3, 7, 7, 2, 9, 3};
  auto wte = values(V * C, 1), wpe = values(T * C, 2), dout = values(N * C, 3);
  std::vector<float> out(N * C), dwte(V * C, 0.5f), dwpe(T * C, 0.25f);
  Dev<std::int32_t> dtok(tok);
  Dev<float> gwte(wte), gwpe(wpe), gout(out), gdout(dout), gdwte(dwte), gdwpe(dwpe);
  cpu.embed_forward(out.data(), tok.data(), wte.data(), wpe.data(), B, T, C);
  gpu.embed_forward(gout.p, dtok.p, gwte.p, gwpe.p, B, T, C);
  expect_close(gout.get(), out, 1e-7, "embed out");
  cpu.embed_backward(dwte.data(), dwpe.data(), dout.data(), tok.data(), B, T, C);
  gpu.embed_backward(gdwte.p, gdwpe.p, gdout.p, dtok.p, B, T, C);
  expect_close(gdwte.get(), dwte, 1e-6, "dwte");
  expect_close(gdwpe.get(), dwpe, 1e-6, "dwpe");
  // layernorm
  auto x = values(N * C, 4, 3.0f), w = values(C, 5), b = values(C, 6);
  std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C, 0.1f), dw(C, 0.2f), db(C, 0.3f);
  Dev<float> gx(x), gw(w), gb(b), gy(y), gmean(mean), grstd(rstd), gdx(dx), gdw(dw), gdb(db);
  cpu.layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
  gpu.layernorm_forward(gy.p, gmean.p, grstd.p, gx.p, gw.p, gb.p, N, C);
  expect_close(gy.get(), y, 1e-5, "layernorm out");
  expect_close(grstd.get(), rstd, 1e-5, "layernorm rstd");
  cpu.layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(),
                         N, C);
  gpu.layernorm_backward(gdx.p, gdw.p, gdb.p, gdout.p, gx.p, gw.p, gmean.p, grstd.p, N, C);
  expect_close(gdx.get(), dx, 1e-5, "layernorm dx");
  expect_close(gdw.get(), dw, 1e-5, "layernorm dw");
  expect_close(gdb.get(), db, 1e-5, "layernorm db");
  // gelu, residual
  auto g = gy.get();
  std::vector<float> ge(N * C), gd(N * C, 0.0f), r(N * C);
  Dev<float> gge(ge), ggd(gd), gr(r);
  cpu.gelu_forward(ge.data(), x.data(), ge.size());
  gpu.gelu_forward(gge.p, gx.p, ge.size());
  expect_close(gge.get(), ge, 1e-6, "gelu");
  cpu.gelu_backward(gd.data(), x.data(), dout.data(), gd.size());
  gpu.gelu_backward(ggd.p, gx.p, gdout.p, gd.size());
  expect_close(ggd.get(), gd, 1e-6, "gelu backward");
  cpu.residual_forward(r.data(), x.data(), dout.data(), r.size());
  gpu.residual_forward(gr.p, gx.p, gdout.p, r.size());
  expect_close(gr.get(), r, 0, "residual");
  // cross-entropy, in place
  auto logits = values(N * V, 7, 4.0f);
  std::vector<std::int32_t> tgt = {0, 1, 2, 3, 4, 5, 6, 7, 8, 10};
  Dev<float> glog(logits);
  Dev<std::int32_t> gtgt(tgt);
  const double lc = cpu.cross_entropy(logits.data(), logits.data(), tgt.data(), N, V, 2.0);
  const double lg = gpu.cross_entropy(glog.p, glog.p, gtgt.p, N, V, 2.0);
  EXPECT_NEAR(lg, lc, 1e-5 * lc);
  expect_close(glog.get(), logits, 1e-6, "dlogits");
}

TEST(GptCudaOps, MatmulAndAttentionMatchTheCpu) {
  SKIP_WITHOUT_DEVICE();
  for (auto mode : {gpt::GemmMode::fp32, gpt::GemmMode::bf16}) {
    const gpt::CudaOps gpu(nullptr, mode);
    // bf16 inputs keep 8 mantissa bits: products of K terms agree to about 2^-8 of their scale.
    const double tol = mode == gpt::GemmMode::fp32 ? 2e-6 : 1e-2;
    const int N = 9, C = 40, OC = 24;
    for (auto layout : {gpt::WeightLayout::in_out, gpt::WeightLayout::out_in}) {
      auto x = values(N * C, 8), w = values(C * OC, 9), bias = values(OC, 10), dout = values(N * OC, 11);
      std::vector<float> y(N * OC), dx(N * C, 0.5f), dw(C * OC, 0.25f), db(OC, 1.0f);
      Dev<float> gx(x), gw(w), gbias(bias), gdout(dout), gy(y), gdx(dx), gdw(dw), gdb(db);
      cpu.matmul_forward(y.data(), x.data(), w.data(), bias.data(), N, C, OC, layout);
      gpu.matmul_forward(gy.p, gx.p, gw.p, gbias.p, N, C, OC, layout);
      expect_close(gy.get(), y, tol, "matmul out");
      cpu.matmul_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, C, OC, layout);
      gpu.matmul_backward(gdx.p, gdw.p, gdb.p, gdout.p, gx.p, gw.p, N, C, OC, layout);
      expect_close(gdx.get(), dx, tol, "matmul dx");
      expect_close(gdw.get(), dw, tol, "matmul dw");
      expect_close(gdb.get(), db, 1e-6, "matmul dbias");
    }
    const int B = 2, T = 7, AC = 12, NH = 3;
    auto qkv = values(B * T * 3 * AC, 12), dout = values(B * T * AC, 13);
    std::vector<float> out(B * T * AC), att(B * NH * T * T), dqkv(qkv.size(), 0.0f), scratch(T * T);
    Dev<float> gqkv(qkv), gdout(dout), gout(out), gatt(att), gdqkv(dqkv), gscratch(scratch);
    cpu.attention_forward(out.data(), att.data(), qkv.data(), B, T, AC, NH);
    gpu.attention_forward(gout.p, gatt.p, gqkv.p, B, T, AC, NH);
    expect_close(gatt.get(), att, tol, "attention probabilities");
    expect_close(gout.get(), out, tol, "attention out");
    cpu.attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), scratch.data(), B, T, AC, NH);
    gpu.attention_backward(gdqkv.p, gdout.p, gqkv.p, gatt.p, gscratch.p, B, T, AC, NH);
    expect_close(gdqkv.get(), dqkv, tol, "attention dqkv");
  }
}

// A whole transformer layer through the model code (model.hpp), forward and backward, on device
// buffers: the GPU ops compose into the CPU path's layer.
TEST(GptCudaOps, TransformerLayerMatchesTheCpu) {
  SKIP_WITHOUT_DEVICE();
  const gpt::CudaOps gpu(nullptr, gpt::GemmMode::fp32);
  const gpt::Shape s{1, 4, 32, 50, 16};
  const int B = 2, T = 16, N = B * T;
  const std::size_t LP = gpt::layer_param_count(s), AE = gpt::layer_acts_elems(s, B, T),
                    SE = gpt::layer_scratch_elems(s, B, T), NC = std::size_t(N) * s.hidden;
  auto p = values(LP, 14, 0.2f), x = values(NC, 15), dy = values(NC, 16);
  std::vector<float> acts(AE), y(NC), g(LP, 0.0f), dx(NC, 0.0f), scratch(SE);
  Dev<float> gp(p), gx(x), gdy(dy), gacts(acts), gy(y), gg(g), gdx(dx), gscratch(scratch);
  auto as_const = [](const gpt::Layer<float>& m) {
    return gpt::Layer<const float>{m.ln1_w, m.ln1_b, m.qkv_w, m.qkv_b, m.proj_w, m.proj_b,
                                   m.ln2_w, m.ln2_b, m.fc_w,  m.fc_b,  m.fcproj_w, m.fcproj_b};
  };
  gpt::layer_forward<float>(cpu, s, B, T, as_const(gpt::layer_at(p.data(), s)), x.data(),
                            gpt::layer_acts_at(acts.data(), s, B, T), y.data());
  gpt::layer_backward<float>(cpu, s, B, T, as_const(gpt::layer_at(p.data(), s)), gpt::layer_at(g.data(), s), x.data(),
                             gpt::layer_acts_at(acts.data(), s, B, T), dy.data(), dx.data(), scratch.data());
  gpt::layer_forward<float>(gpu, s, B, T, as_const(gpt::layer_at(gp.p, s)), gx.p, gpt::layer_acts_at(gacts.p, s, B, T),
                            gy.p);
  gpt::layer_backward<float>(gpu, s, B, T, as_const(gpt::layer_at(gp.p, s)), gpt::layer_at(gg.p, s), gx.p,
                             gpt::layer_acts_at(gacts.p, s, B, T), gdy.p, gdx.p, gscratch.p);
  expect_close(gy.get(), y, 1e-5, "layer out");
  expect_close(gdx.get(), dx, 1e-5, "layer dx");
  expect_close(gg.get(), g, 1e-5, "layer dparams");
}

gpt::TrainOptions tiny_run(const std::string& data) {
  gpt::TrainOptions o;
  o.shape = {2, 2, 32, 128, 16};
  o.seq = 16;
  o.batch = 2;
  o.ranks = 2;
  o.steps = 3;
  o.data = data;
  o.config.stage = 3;
  o.config.bucket_bytes = 16 << 10;
  o.config.optimizer = shardopt::OptimizerKind::sgd;
  o.config.hyper.lr = 0.1f;
  o.collect_master = true;
  return o;
}

std::string token_file() {
  const auto path = std::filesystem::temp_directory_path() / "shardopt-gpt-cuda-test.bin";
  std::vector<std::uint16_t> t(4000);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<std::uint16_t>("the cat sat on the mat. "[i % 24]);
  gpt::write_token_file(path.string(), t);
  return path.string();
}

// Runs on every machine: without a device the CUDA trainer refuses before any rank starts.
TEST(GptCudaTrain, RefusesWithoutADevice) {
  if (shardopt::cuda_device_available()) GTEST_SKIP() << "a CUDA device exists";
  try {
    gpt::train_cuda(tiny_run(token_file()));
    FAIL() << "no error";
  } catch (const shardopt::Error& e) {
    EXPECT_EQ(e.code(), shardopt::ErrorCode::unsupported) << e.what();
  }
}

// Two ranks on one GPU at stage 3 against the CPU trainer on the same data, in fp32 and bf16
// compute: the same losses and parameters up to the bf16 rounding of the GPU's GEMM inputs.
TEST(GptCudaTrain, MatchesTheCpuTrainer) {
  SKIP_WITHOUT_DEVICE();
  for (auto dtype : {shardopt::DType::fp32, shardopt::DType::bf16}) {
    SCOPED_TRACE(shardopt::name_of(dtype));
    auto o = tiny_run(token_file());
    o.config.compute_dtype = o.config.reduce_dtype = dtype;
    const auto c = gpt::train(o);
    const auto g = gpt::train_cuda(o);
    ASSERT_EQ(g.steps.size(), c.steps.size());
    for (std::size_t i = 0; i < c.steps.size(); ++i)
      EXPECT_NEAR(g.steps[i].loss, c.steps[i].loss, 1e-2 * c.steps[i].loss);
    for (std::size_t t = 0; t < c.master.size(); ++t)
      expect_close(g.master[t], c.master[t], 1e-2, c.tensor_names[t].c_str());
    EXPECT_LT(g.steps.back().loss, g.steps.front().loss);
  }
}

}  // namespace
