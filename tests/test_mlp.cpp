// The example trainer's math and its runs: the hand-written backward against central finite
// differences of a float64 forward written here from the definition, and stage 0 (all-reduce)
// against stage 1 (reduce-scatter) element-wise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mlp.hpp"

namespace {

constexpr int B = 3, H = 4, F = 4 * H;

// float64 forward of one block, loops only: y = x + W2 gelu(W1 x + b1) + b2, and the MSE loss
// against `t` (mean over B*H).
double loss64(const std::vector<double>& w, const std::vector<double>& x, const std::vector<double>& t) {
  const double* w1 = w.data();
  const double* b1 = w1 + F * H;
  const double* w2 = b1 + F;
  const double* b2 = w2 + H * F;
  double loss = 0;
  for (int b = 0; b < B; ++b) {
    double u[F];
    for (int j = 0; j < F; ++j) {
      double a = b1[j];
      for (int i = 0; i < H; ++i) a += w1[j * H + i] * x[b * H + i];
      u[j] = 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
    }
    for (int k = 0; k < H; ++k) {
      double y = x[b * H + k] + b2[k];
      for (int j = 0; j < F; ++j) y += w2[k * F + j] * u[j];
      loss += (y - t[b * H + k]) * (y - t[b * H + k]);
    }
  }
  return loss / (B * H);
}

TEST(MlpBackward, MatchesFiniteDifferencesOfAFloat64Forward) {
  const std::size_t n = mlp::param_count({1, H});
  std::vector<float> w(n), x(B * H), t(B * H);
  for (std::size_t i = 0; i < n; ++i) w[i] = 0.5f * mlp::normal(11, i);
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = mlp::normal(12, i);
    t[i] = mlp::normal(13, i);
  }
  const mlp::BlockParams p{w.data(), w.data() + F * H, w.data() + F * H + F, w.data() + 2 * F * H + F};
  std::vector<float> a(B * F), u(B * F), y(B * H), dy(B * H), dx(B * H), da(B * F), g(n, 0.0f);
  mlp::block_forward(B, H, p, x.data(), a.data(), u.data(), y.data());
  const double loss = mlp::mse_loss(y.size(), y.data(), t.data(), 1.0f, dy.data());
  mlp::block_backward(B, H, p, x.data(), a.data(), u.data(), dy.data(), dx.data(),
                      {g.data(), g.data() + F * H, g.data() + F * H + F, g.data() + 2 * F * H + F}, da.data());

  std::vector<double> w64(w.begin(), w.end()), x64(x.begin(), x.end()), t64(t.begin(), t.end());
  EXPECT_NEAR(loss, loss64(w64, x64, t64), 1e-5 * loss);
  const double eps = 1e-6;
  auto check = [&](std::vector<double>& v, const std::vector<float>& grad, const char* what) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      v[i] = keep + eps;
      const double up = loss64(w64, x64, t64);
      v[i] = keep - eps;
      const double down = loss64(w64, x64, t64);
      v[i] = keep;
      const double ref = (up - down) / (2 * eps);
      // fp32 GEMMs over at most 4h = 16 terms: a few ulps of the largest term.
      EXPECT_NEAR(grad[i], ref, 2e-5 + 1e-4 * std::fabs(ref)) << what << "[" << i << "]";
    }
  };
  check(w64, g, "dparam");
  check(x64, dx, "dx");
}

TEST(MlpBackward, AddsIntoTheGradientBuffers) {
  const std::size_t n = mlp::param_count({1, H});
  std::vector<float> w(n), x(B * H), t(B * H);
  for (std::size_t i = 0; i < n; ++i) w[i] = 0.5f * mlp::normal(21, i);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = mlp::normal(22, i), t[i] = mlp::normal(23, i);
  const mlp::BlockParams p{w.data(), w.data() + F * H, w.data() + F * H + F, w.data() + 2 * F * H + F};
  std::vector<float> a(B * F), u(B * F), y(B * H), dy(B * H), dx(B * H), da(B * F), g1(n, 0.0f), g2(n, 1.0f);
  mlp::block_forward(B, H, p, x.data(), a.data(), u.data(), y.data());
  mlp::mse_loss(y.size(), y.data(), t.data(), 1.0f, dy.data());
  auto grads = [&](std::vector<float>& g) {
    return mlp::BlockGrads{g.data(), g.data() + F * H, g.data() + F * H + F, g.data() + 2 * F * H + F};
  };
  mlp::block_backward(B, H, p, x.data(), a.data(), u.data(), dy.data(), dx.data(), grads(g1), da.data());
  mlp::block_backward(B, H, p, x.data(), a.data(), u.data(), dy.data(), dx.data(), grads(g2), da.data());
  for (std::size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(g2[i], 1.0f + g1[i]) << i;
}

mlp::TrainOptions small(int stage, shardopt::DType dtype = shardopt::DType::fp32) {
  mlp::TrainOptions o;
  o.shape = {3, 32};
  o.batch = 16;
  o.ranks = 4;
  o.steps = 50;
  o.seed = 5;
  o.config.stage = stage;
  o.config.compute_dtype = o.config.reduce_dtype = dtype;
  if (dtype == shardopt::DType::fp16) o.config.loss_scaling.mode = shardopt::LossScaleMode::dynamic;
  o.config.bucket_bytes = 16 << 10;
  o.config.hyper.lr = 1e-3f;
  return o;
}

TEST(MlpTrain, DeterministicBySeed) {
  const auto a = mlp::train(small(1)), b = mlp::train(small(1));
  EXPECT_EQ(mlp::digest(a.master), mlp::digest(b.master));
  ASSERT_EQ(a.steps.size(), 50u);
  EXPECT_LT(a.steps.back().loss, 0.5 * a.steps.front().loss);
}

// Stage 0 all-reduces the gradients where stage 1 reduce-scatters them; both average in rank
// order and round once, so without clipping the parameters must agree bit for bit. Compared
// element-wise (not only by digest) so a failure says where and by how much.
TEST(MlpTrain, StageZeroMatchesStageOneElementWise) {
  const auto s0 = mlp::train(small(0)), s1 = mlp::train(small(1));
  ASSERT_EQ(s0.master.size(), s1.master.size());
  double worst = 0;
  std::size_t differing = 0;
  for (std::size_t t = 0; t < s0.master.size(); ++t)
    for (std::size_t i = 0; i < s0.master[t].size(); ++i) {
      const double d = std::fabs(double(s0.master[t][i]) - double(s1.master[t][i]));
      worst = std::max(worst, d);
      differing += d != 0;
    }
  EXPECT_EQ(differing, 0u) << "max |stage0 - stage1| = " << worst;
  EXPECT_EQ(s0.steps.back().loss, s1.steps.back().loss);
}

TEST(MlpTrain, SixteenBitComputeLearns) {
  for (auto dt : {shardopt::DType::bf16, shardopt::DType::fp16}) {
    const auto r = mlp::train(small(3, dt));
    EXPECT_LT(r.steps.back().loss, 0.5 * r.steps.front().loss) << shardopt::name_of(dt);
    if (dt == shardopt::DType::fp16) {
      EXPECT_LT(r.skipped_steps, 10);  // a few overflows while the scale settles
    }
  }
}

TEST(MlpTrain, BadOptionsAreRefusedBeforeAnyRankStarts) {
  auto o = small(1);
  o.ranks = 0;
  EXPECT_THROW(mlp::train(o), shardopt::Error);
  o = small(7);
  EXPECT_THROW(mlp::train(o), shardopt::Error);
}

}  // namespace
