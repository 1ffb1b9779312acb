// The GPT trainer (examples/gpt): every op's backward against central finite differences of its
// float64 forward; the float ops against the float64 instantiation; the whole tiny model's
// gradient against finite differences; the engine-driven trainer against the reference model
// (one SGD step is p - lr * gradient); agreement across stages, world sizes and recomputation;
// preset sizes; token files and safetensors initialisation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "cpu_ops.hpp"
#include "data.hpp"
#include "gpt.hpp"
#include "model.hpp"
#include "temp_dir.hpp"

namespace {

namespace fs = std::filesystem;

// Deterministic values in [-1, 1) (an LCG: no dependence on the standard library's generators).
std::vector<double> values(std::size_t n, std::uint64_t seed) {
  std::vector<double> v(n);
  std::uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& e : v) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    e = static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0;
  }
  return v;
}

const gpt::CpuOps<double> ops64;
const gpt::CpuOps<float> ops32;

// Central differences of f with respect to every element of x, compared element-wise with the
// analytic gradient g. In float64 the truncation error is O(eps^2) and the rounding error
// O(1e-16 / eps): 1e-7 relative is far above both and far below any real mistake.
void expect_fd(std::vector<double>& x, const std::vector<double>& g, const std::function<double()>& f,
               const char* what, double eps = 1e-5) {
  ASSERT_EQ(x.size(), g.size()) << what;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + eps;
    const double up = f();
    x[i] = keep - eps;
    const double down = f();
    x[i] = keep;
    const double ref = (up - down) / (2 * eps);
    EXPECT_NEAR(g[i], ref, 1e-7 * (1 + std::fabs(ref))) << what << "[" << i << "]";
  }
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ---- each op: loss = <op(x), R>, so dout = R ----------------------------------------------------

TEST(GptOps, LayerNormBackwardMatchesFiniteDifferences) {
  const int N = 3, C = 7;
  auto x = values(N * C, 1), w = values(C, 2), b = values(C, 3), R = values(N * C, 4);
  std::vector<double> out(N * C), mean(N), rstd(N);
  auto f = [&] {
    ops64.layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
    return dot(out, R);
  };
  f();
  std::vector<double> dx(N * C, 0.0), dw(C, 0.0), db(C, 0.0);
  ops64.layernorm_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean.data(), rstd.data(),
                           N, C);
  expect_fd(x, dx, f, "dx");
  expect_fd(w, dw, f, "dw");
  expect_fd(b, db, f, "db");
}

TEST(GptOps, MatmulBackwardMatchesFiniteDifferencesInBothLayouts) {
  const int N = 4, C = 5, OC = 6;
  for (auto layout : {gpt::WeightLayout::in_out, gpt::WeightLayout::out_in}) {
    auto x = values(N * C, 5), w = values(C * OC, 6), b = values(OC, 7), R = values(N * OC, 8);
    std::vector<double> out(N * OC);
    auto f = [&] {
      ops64.matmul_forward(out.data(), x.data(), w.data(), b.data(), N, C, OC, layout);
      return dot(out, R);
    };
    std::vector<double> dx(N * C, 0.0), dw(C * OC, 0.0), db(OC, 0.0);
    ops64.matmul_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), N, C, OC, layout);
    expect_fd(x, dx, f, "dx");
    expect_fd(w, dw, f, "dw");
    expect_fd(b, db, f, "db");
  }
  // The forward itself against a triple loop (in_out: w[c][o]; out_in: w[o][c]).
  auto x = values(N * C, 9), w = values(C * OC, 10);
  std::vector<double> a(N * OC), bt(N * OC);
  ops64.matmul_forward(a.data(), x.data(), w.data(), nullptr, N, C, OC, gpt::WeightLayout::in_out);
  ops64.matmul_forward(bt.data(), x.data(), w.data(), nullptr, N, C, OC, gpt::WeightLayout::out_in);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s1 = 0, s2 = 0;
      for (int c = 0; c < C; ++c) {
        s1 += x[n * C + c] * w[c * OC + o];
        s2 += x[n * C + c] * w[o * C + c];
      }
      EXPECT_NEAR(a[n * OC + o], s1, 1e-12);
      EXPECT_NEAR(bt[n * OC + o], s2, 1e-12);
    }
}

TEST(GptOps, AttentionBackwardMatchesFiniteDifferences) {
  const int B = 2, T = 5, C = 6, NH = 2;
  auto qkv = values(B * T * 3 * C, 11), R = values(B * T * C, 12);
  std::vector<double> out(B * T * C), att(B * NH * T * T), scratch(T * T);
  auto f = [&] {
    ops64.attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
    return dot(out, R);
  };
  f();
  std::vector<double> dqkv(qkv.size(), 0.0);
  ops64.attention_backward(dqkv.data(), R.data(), qkv.data(), att.data(), scratch.data(), B, T, C, NH);
  expect_fd(qkv, dqkv, f, "dqkv");
  // Causality: output position t depends on no later position (its value is unchanged when a
  // later token's q, k and v change).
  std::vector<double> before = out;
  for (int c = 0; c < 3 * C; ++c) qkv[(0 * T + T - 1) * 3 * C + c] += 0.5;  // batch 0, last position
  f();
  for (int t = 0; t < T - 1; ++t)
    for (int c = 0; c < C; ++c) EXPECT_EQ(out[(0 * T + t) * C + c], before[(0 * T + t) * C + c]) << t;
}

TEST(GptOps, GeluIsTheTanhApproximationAndItsBackwardMatches) {
  auto x = values(20, 13), R = values(20, 14);
  for (auto& v : x) v *= 4;
  std::vector<double> out(20);
  auto f = [&] {
    ops64.gelu_forward(out.data(), x.data(), x.size());
    return dot(out, R);
  };
  f();
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    EXPECT_NEAR(out[i], 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))), 1e-15);
  }
  std::vector<double> dx(20, 0.0);
  ops64.gelu_backward(dx.data(), x.data(), R.data(), x.size());
  expect_fd(x, dx, f, "dx");
}

TEST(GptOps, EmbeddingAndCrossEntropyBackwardMatchFiniteDifferences) {
  const int B = 2, T = 3, C = 4, V = 5;
  const std::vector<std::int32_t> tok = {4, 0, 4, 2, 1, 2};
  auto wte = values(V * C, 15), wpe = values(T * C, 16), R = values(B * T * C, 17);
  std::vector<double> out(B * T * C);
  auto f = [&] {
    ops64.embed_forward(out.data(), tok.data(), wte.data(), wpe.data(), B, T, C);
    return dot(out, R);
  };
  std::vector<double> dwte(V * C, 0.0), dwpe(T * C, 0.0);
  ops64.embed_backward(dwte.data(), dwpe.data(), R.data(), tok.data(), B, T, C);
  expect_fd(wte, dwte, f, "dwte");
  expect_fd(wpe, dwpe, f, "dwpe");

  const int N = 4;
  auto logits = values(N * V, 18);
  const std::vector<std::int32_t> tgt = {1, 4, 0, 1};
  std::vector<double> dl(N * V);
  const double scale = 3.0;
  auto loss = [&] { return scale * ops64.cross_entropy(nullptr, logits.data(), tgt.data(), N, V, 1.0) / N; };
  const double sum = ops64.cross_entropy(dl.data(), logits.data(), tgt.data(), N, V, scale);
  double ref = 0;  // the definition, directly
  for (int n = 0; n < N; ++n) {
    double z = 0;
    for (int v = 0; v < V; ++v) z += std::exp(logits[n * V + v]);
    ref += std::log(z) - logits[n * V + tgt[n]];
  }
  EXPECT_NEAR(sum, ref, 1e-12);
  expect_fd(logits, dl, loss, "dlogits");
}

// The float instantiation is the same code as the oracle; its error is float rounding only.
TEST(GptOps, FloatPathAgreesWithTheFloat64Oracle) {
  const gpt::Shape s{2, 2, 16, 23, 8};
  const int B = 2, T = 7;
  const std::size_t n = gpt::param_count(s);
  auto p64 = values(n, 19);
  for (auto& v : p64) v *= 0.3;
  std::vector<float> p32(p64.begin(), p64.end());
  std::vector<std::int32_t> tok(B * T), tgt(B * T);
  for (int i = 0; i < B * T; ++i) tok[i] = (i * 7 + 3) % s.vocab, tgt[i] = (i * 5 + 1) % s.vocab;
  std::vector<double> g64(n, 0.0);
  std::vector<float> g32(n, 0.0f);
  const double l64 = gpt::model_forward_backward<double>(ops64, s, B, T, p64.data(), g64.data(), tok.data(), tgt.data());
  const double l32 = gpt::model_forward_backward<float>(ops32, s, B, T, p32.data(), g32.data(), tok.data(), tgt.data());
  EXPECT_NEAR(l32, l64, 1e-6 * l64);
  double gmax = 0;
  for (double g : g64) gmax = std::max(gmax, std::fabs(g));
  for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(g32[i], g64[i], 1e-5 * gmax + 1e-4 * std::fabs(g64[i])) << i;
}

// ---- the whole model ------------------------------------------------------------------------------

TEST(GptModel, WholeModelGradientMatchesFiniteDifferences) {
  const gpt::Shape s{2, 2, 8, 11, 6};
  const int B = 2, T = 5;
  const std::size_t n = gpt::param_count(s);
  auto p = values(n, 21);
  for (auto& v : p) v *= 0.5;
  std::vector<std::int32_t> tok(B * T), tgt(B * T);
  for (int i = 0; i < B * T; ++i) tok[i] = (i * 3 + 1) % s.vocab, tgt[i] = (i * 7 + 2) % s.vocab;
  std::vector<double> g(n, 0.0);
  gpt::model_forward_backward<double>(ops64, s, B, T, p.data(), g.data(), tok.data(), tgt.data());
  expect_fd(p, g,
            [&] { return gpt::model_forward_backward<double>(ops64, s, B, T, p.data(), nullptr, tok.data(), tgt.data()); },
            "dparam");
}

TEST(GptModel, PresetParameterCountsArePublishedOnes) {
  EXPECT_EQ(gpt::param_count(gpt::preset("small")), 124439808u);
  EXPECT_EQ(gpt::param_count(gpt::preset("medium")), 354823168u);
  EXPECT_EQ(gpt::param_count(gpt::preset("large")), 774030080u);
  EXPECT_EQ(gpt::param_count(gpt::preset("xl")), 1557611200u);
  std::size_t sum = 0;
  for (const auto& b : gpt::blocks(gpt::preset("small")))
    for (const auto& t : b.tensors) sum += shardopt::numel(t.shape);
  EXPECT_EQ(sum, 124439808u);
  EXPECT_THROW(gpt::preset("huge"), shardopt::Error);
  EXPECT_THROW(gpt::validate({2, 3, 16, 10, 8}), shardopt::Error);  // hidden not a multiple of heads
}

// ---- data ---------------------------------------------------------------------------------------

using shardopt::test::TempDir;

// Text-like bytes with structure a tiny model learns quickly: repeated words.
std::string make_tokens(const fs::path& file, std::size_t n) {
  const char* words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ", "dogs ", "run ", "far. "};
  std::vector<std::uint16_t> t;
  std::uint64_t x = 7;
  while (t.size() < n) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    for (const char* c = words[(x >> 33) % 9]; *c && t.size() < n; ++c) t.push_back(static_cast<unsigned char>(*c));
  }
  gpt::write_token_file(file.string(), t);
  return file.string();
}

TEST(GptData, TokenFileRoundTripAndBadFiles) {
  TempDir d;
  const std::vector<std::uint16_t> t = {1, 65535, 3, 42};
  gpt::write_token_file((d.path / "a.bin").string(), t);
  const gpt::TokenFile f((d.path / "a.bin").string());
  ASSERT_EQ(f.size(), 4u);
  std::vector<std::int32_t> out(3);
  f.read(1, 3, out.data());
  EXPECT_EQ(out, (std::vector<std::int32_t>{65535, 3, 42}));
  EXPECT_EQ(f.max_token(), 65535);
  EXPECT_THROW(f.read(2, 3, out.data()), shardopt::Error);
  {  // wrong magic
    std::ofstream bad(d.path / "bad.bin", std::ios::binary);
    std::vector<std::int32_t> h(256, 0);
    h[0] = 1234;
    bad.write(reinterpret_cast<const char*>(h.data()), 1024);
  }
  try {
    gpt::TokenFile g((d.path / "bad.bin").string());
    FAIL() << "no error";
  } catch (const shardopt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("magic"), std::string::npos) << e.what();
  }
  // Byte-level tokenization: one token per byte.
  std::ofstream(d.path / "in.txt") << "hi!";
  EXPECT_EQ(gpt::tokenize_bytes((d.path / "in.txt").string(), (d.path / "in.bin").string()), 3u);
  const gpt::TokenFile h((d.path / "in.bin").string());
  h.read(0, 3, out.data());
  EXPECT_EQ(out, (std::vector<std::int32_t>{'h', 'i', '!'}));
}

// Rank r of R reads the r-th slice of the global batch: the same tokens as one rank with R
// times the batch, and a function of the step (so a resumed run continues where it stopped).
TEST(GptData, RanksReadContiguousSlicesOfTheGlobalBatch) {
  const std::size_t n = 10000;
  for (std::int64_t step : {0, 1, 7, 1000})
    for (int micro : {0, 1}) {
      const std::size_t one = gpt::batch_offset(n, step, micro, 2, 0, 1, 6, 16);
      for (int r = 0; r < 3; ++r) EXPECT_EQ(gpt::batch_offset(n, step, micro, 2, r, 3, 2, 16), one + r * 2 * 16);
      EXPECT_LE(one + 6 * 16 + 1, n);
    }
  EXPECT_NE(gpt::batch_offset(n, 1, 0, 1, 0, 1, 6, 16), gpt::batch_offset(n, 0, 0, 1, 0, 1, 6, 16));
  EXPECT_THROW(gpt::batch_offset(50, 0, 0, 1, 0, 1, 6, 16), shardopt::Error);
}

// A safetensors file whose tensor holds fewer bytes than its shape needs, or an unsupported
// dtype, is refused naming the tensor; names resolve with or without "transformer.".
TEST(GptData, SafetensorsEntriesAreChecked) {
  TempDir d;
  const std::string header = R"({"wte.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]},)"
                             R"("h.0.attn.bias":{"dtype":"I64","shape":[1],"data_offsets":[20,28]}})";
  {
    std::ofstream f(d.path / "m.safetensors", std::ios::binary);
    const std::uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header << std::string(28, '\0');
  }
  const gpt::SafetensorsFile f((d.path / "m.safetensors").string());
  const gpt::SafetensorsEntry* e = f.find("transformer.wte.weight");
  ASSERT_NE(e, nullptr);
  try {
    f.check(*e, "transformer.wte.weight", 6);
    FAIL() << "no error";
  } catch (const shardopt::Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("transformer.wte.weight"), std::string::npos) << ex.what();
  }
  EXPECT_THROW(f.check(*f.find("h.0.attn.bias"), "h.0.attn.bias", 1), shardopt::Error);
  EXPECT_EQ(f.find("transformer.nothing"), nullptr);
}

// ---- the engine-driven trainer ------------------------------------------------------------------

gpt::TrainOptions tiny(const std::string& data, int stage, int ranks, int batch) {
  gpt::TrainOptions o;
  o.shape = {2, 2, 32, 128, 16};
  o.seq = 16;
  o.batch = batch;
  o.ranks = ranks;
  o.steps = 4;
  o.seed = 3;
  o.data = data;
  o.config.stage = stage;
  o.config.bucket_bytes = 16 << 10;  // several units, so stage 3 gathers and buckets really split
  o.config.hyper.lr = 1e-3f;
  o.collect_master = true;
  return o;
}

// Max |a - b| over every parameter, and how many differ at all.
std::pair<double, std::size_t> compare(const gpt::TrainResult& a, const gpt::TrainResult& b) {
  double worst = 0;
  std::size_t differing = 0;
  for (std::size_t t = 0; t < a.master.size(); ++t)
    for (std::size_t i = 0; i < a.master[t].size(); ++i) {
      const double d = std::fabs(double(a.master[t][i]) - double(b.master[t][i]));
      worst = std::max(worst, d);
      differing += d != 0;
    }
  return {worst, differing};
}

// One SGD step (no momentum on the first step, no weight decay) is p - lr * g. With two ranks
// at stage 3 the engine-driven pass (blocks gathered one at a time, the tied embedding's
// gradient buffer open across the whole backward) must give the mean gradient over both ranks'
// slices, which is the float64 reference model's gradient on the whole global batch; with two
// micro-steps, on both global batches (the second follows the first in the file).
TEST(GptTrain, OneSgdStepIsTheReferenceGradientStep) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 5000);
  for (int micro : {1, 2})
    for (auto dtype : {shardopt::DType::fp32, shardopt::DType::bf16}) {
      SCOPED_TRACE("micro-steps " + std::to_string(micro) + ", " + std::string(shardopt::name_of(dtype)));
      auto o = tiny(data, 3, 2, 2);
      o.steps = 1;
      o.config.optimizer = shardopt::OptimizerKind::sgd;
      o.config.hyper.lr = 0.5f;
      o.config.hyper.weight_decay = 0.0f;
      o.config.accumulation_steps = micro;
      o.config.compute_dtype = o.config.reduce_dtype = dtype;
      const auto r = gpt::train(o);

      // The reference: the initial values (the same InitFn), the global batches' tokens. With
      // bf16 the engine computes from the master rounded to bf16: so does the reference.
      const gpt::Shape& s = o.shape;
      std::vector<double> p;
      const auto init = gpt::init(s, o.seed);
      for (const auto& b : gpt::blocks(s))
        for (const auto& t : b.tensors) {
          shardopt::Layout::TensorInfo info;
          info.name = t.name;
          info.shape = t.shape;
          info.numel = shardopt::numel(t.shape);
          std::vector<float> v(info.numel);
          init(info, 0, v.size(), v.data());
          p.insert(p.end(), v.begin(), v.end());
        }
      std::vector<double> p16 = p;
      if (dtype == shardopt::DType::bf16)
        for (auto& v : p16) {
          std::uint16_t h = 0;
          shardopt::store_from_float(&h, dtype, 0, static_cast<float>(v));
          v = shardopt::load_as_float(&h, dtype, 0);
        }
      const int B = o.ranks * o.batch * micro, T = o.seq;
      std::vector<std::int32_t> tok(B * T + 1);
      gpt::TokenFile(data).read(gpt::batch_offset(5000, 0, 0, micro, 0, 1, B / micro, T), tok.size(), tok.data());
      std::vector<double> g(p.size(), 0.0);
      const double loss =
          gpt::model_forward_backward<double>(ops64, s, B, T, p16.data(), g.data(), tok.data(), tok.data() + 1);
      const double loss_tol = dtype == shardopt::DType::fp32 ? 1e-5 : 1e-3;
      EXPECT_NEAR(r.steps[0].loss, loss, loss_tol * loss);

      std::size_t k = 0;
      double gmax = 0;
      for (double v : g) gmax = std::max(gmax, std::fabs(v));
      // fp32: float gradients, relative 1e-5 of the largest, times lr, plus the final rounding.
      // bf16: the activations are fp32 but each block's gradient is rounded to bf16 when added
      // into the engine's buffer (twice for the tied embedding, once per micro-step): 2^-8.
      const double rel = dtype == shardopt::DType::fp32 ? 1e-5 : 1.2e-2;
      for (std::size_t t = 0; t < r.master.size(); ++t)
        for (std::size_t i = 0; i < r.master[t].size(); ++i, ++k) {
          const double want = p[k] - double(o.config.hyper.lr) * g[k];
          ASSERT_NEAR(r.master[t][i], want, 0.5 * rel * gmax + 2e-7 * std::fabs(want))
              << r.tensor_names[t] << "[" << i << "]";
        }
      EXPECT_EQ(k, p.size());
    }
}

// Stages 0 and 1 average the gradients in rank order and round once (all-reduce against
// reduce-scatter of the same buffers), and so do stages 2 and 3 (the same buckets): the
// parameters agree bit for bit within each pair, and within float rounding across pairs.
TEST(GptTrain, StagesAgree) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 20000);
  std::vector<gpt::TrainResult> r;
  for (int stage = 0; stage <= 3; ++stage) r.push_back(gpt::train(tiny(data, stage, 3, 2)));
  for (int stage = 1; stage <= 3; ++stage) {
    const auto [worst, differing] = compare(r[0], r[stage]);
    EXPECT_LT(worst, 1e-6) << "stage " << stage;
    for (std::size_t i = 0; i < r[0].steps.size(); ++i)
      EXPECT_NEAR(r[stage].steps[i].loss, r[0].steps[i].loss, 1e-6 * r[0].steps[i].loss) << "stage " << stage;
  }
  EXPECT_EQ(compare(r[0], r[1]).second, 0u) << "stage 0 vs 1";
  EXPECT_EQ(compare(r[2], r[3]).second, 0u) << "stage 2 vs 3";
  EXPECT_LT(r[0].steps.back().loss, r[0].steps.front().loss);
}

// One, two and three ranks on the same global batch (6 sequences): the same gradient up to the
// order of the sums, so SGD (whose update is linear in the gradient) ends within float rounding.
TEST(GptTrain, WorldSizesAgree) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 20000);
  std::vector<gpt::TrainResult> r;
  for (int ranks : {1, 2, 3}) {
    auto o = tiny(data, 3, ranks, 6 / ranks);
    o.config.optimizer = shardopt::OptimizerKind::sgd;
    o.config.hyper.lr = 0.1f;
    r.push_back(gpt::train(o));
  }
  for (int k = 1; k < 3; ++k) {
    EXPECT_LT(compare(r[0], r[k]).first, 1e-6) << "world " << k + 1;
    for (std::size_t i = 0; i < r[0].steps.size(); ++i)
      EXPECT_NEAR(r[k].steps[i].loss, r[0].steps[i].loss, 1e-5 * r[0].steps[i].loss) << "world " << k + 1;
  }
}

TEST(GptTrain, RecomputeGivesTheSameBits) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 20000);
  auto o = tiny(data, 3, 2, 2);
  const auto a = gpt::train(o);
  o.recompute = true;
  const auto b = gpt::train(o);
  EXPECT_EQ(compare(a, b).second, 0u);
  EXPECT_LT(b.activation_bytes, a.activation_bytes);
}

TEST(GptTrain, SixteenBitComputeLearns) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 40000);
  auto o = tiny(data, 3, 2, 4);
  o.steps = 30;
  o.collect_master = false;
  o.config.hyper.lr = 3e-3f;
  o.config.compute_dtype = o.config.reduce_dtype = shardopt::DType::bf16;
  const auto r = gpt::train(o);
  EXPECT_LT(r.steps.back().loss, 0.8 * r.steps.front().loss);
  EXPECT_TRUE(r.master.empty());  // no copy of the model unless asked
}

TEST(GptTrain, BadOptionsAreRefusedBeforeAnyRankStarts) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 5000);
  auto o = tiny(data, 1, 2, 2);
  o.seq = 17;  // more than the model's 16 positions
  EXPECT_THROW(gpt::train(o), shardopt::Error);
  o = tiny((d.path / "missing.bin").string(), 1, 2, 2);
  EXPECT_THROW(gpt::train(o), shardopt::Error);
  o = tiny(data, 1, 2, 2);
  o.shape.vocab = 100;  // the data holds 't' = 116
  try {
    gpt::train(o);
    FAIL() << "no error";
  } catch (const shardopt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocabulary"), std::string::npos) << e.what();
  }
  o = tiny(data, 1, 2, 2);
  o.init_from = (d.path / "none.safetensors").string();
  EXPECT_THROW(gpt::train(o), shardopt::Error);
}

// A checkpoint's export is a safetensors file --init-from reads back: with lr 0 nothing moves,
// so the parameters after one step are the file's, at another world size and stage.
TEST(GptTrain, InitFromAnExportedCheckpoint) {
  TempDir d;
  const std::string data = make_tokens(d.path / "t.bin", 20000);
  auto o = tiny(data, 1, 2, 2);
  o.save_dir = (d.path / "ck").string();
  const auto a = gpt::train(o);
  EXPECT_EQ(gpt::read_model_config(o.save_dir).hidden, o.shape.hidden);
  shardopt::export_safetensors(o.save_dir, (d.path / "m.safetensors").string());
  auto b = tiny(data, 3, 3, 2);
  b.init_from = (d.path / "m.safetensors").string();
  b.config.hyper.lr = 0.0f;
  b.steps = 1;
  const auto r = gpt::train(b);
  EXPECT_EQ(compare(a, r).second, 0u);
  // A shape mismatch names the tensor.
  b.shape.hidden = 16;
  b.shape.heads = 2;
  try {
    gpt::train(b);
    FAIL() << "no error";
  } catch (const shardopt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("transformer.wte.weight"), std::string::npos) << e.what();
  }
}

}  // namespace
