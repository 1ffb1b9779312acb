// RAdam (shardopt/rules/radam.hpp) against an independent float64 implementation of the published
// algorithm: its step scalars, the fused CPU update element by element (every instruction set, and
// bit for bit against each other), and the engine at every stage against the float64 reference
// optimizer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/format.hpp"
#include "cpu/kernels.hpp"
#include "engine_oracle.hpp"
#include "kernel_test_util.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace shardopt {
namespace {

constexpr double kU = 0x1p-24;  // fp32 unit roundoff

// The algorithm as published (Liu et al. 2020, Algorithm 2), with PyTorch's threshold rho_t > 5,
// decoupled weight decay and eps added to sqrt(v_hat), in double.
struct RhoRef {
  double rho_t, r;
  bool rectified;
};
RhoRef rho_ref(double b2, std::int64_t t) {
  const double td = static_cast<double>(t);
  const double rho_inf = 2.0 / (1.0 - b2) - 1.0;
  const double b2t = std::pow(b2, td);
  const double rho_t = rho_inf - 2.0 * td * b2t / (1.0 - b2t);
  RhoRef out{rho_t, 0.0, rho_t > 5.0};
  if (out.rectified) out.r = std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t));
  return out;
}

void radam_ref(double& p, double& m, double& v, double g, const Hyperparams& h, std::int64_t t) {
  const double b1 = h.beta1, b2 = h.beta2, lr = h.lr, wd = h.weight_decay, eps = h.eps;
  const double td = static_cast<double>(t);
  m = b1 * m + (1 - b1) * g;
  v = b2 * v + (1 - b2) * g * g;
  const double m_hat = m / (1 - std::pow(b1, td));
  p = p * (1 - lr * wd);
  const RhoRef rr = rho_ref(b2, t);
  if (rr.rectified) {
    const double v_hat = v / (1 - std::pow(b2, td));
    p -= lr * rr.r * m_hat / (std::sqrt(v_hat) + eps);
  } else {
    p -= lr * m_hat;
  }
}

TEST(RAdam, ListedEverywhere) {
  OptimizerKind k{};
  ASSERT_TRUE(parse_optimizer("radam", k));
  EXPECT_EQ(name_of(k), "radam");
  EXPECT_EQ(state_count(k), 2);
  EXPECT_NE(optimizer_names().find("radam"), std::string::npos);
  EXPECT_EQ(ckpt::field_names(k), (std::vector<std::string>{"master", "exp_avg", "exp_avg_sq"}));
}

TEST(RAdam, ConfigValidation) {
  Config c;
  c.optimizer = OptimizerKind::radam;
  EXPECT_NO_THROW(c.validate());
  c.hyper.momentum = -5.0f;  // a field RAdam does not read
  EXPECT_NO_THROW(c.validate());
  for (auto [field, set] : std::vector<std::pair<std::string, void (*)(Hyperparams&)>>{
           {"hyper.beta1", [](Hyperparams& h) { h.beta1 = 1.0f; }},
           {"hyper.beta2", [](Hyperparams& h) { h.beta2 = -0.1f; }},
           {"hyper.eps", [](Hyperparams& h) { h.eps = 0.0f; }}}) {
    Config bad = c;
    set(bad.hyper);
    try {
      bad.validate();
      ADD_FAILURE() << field << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find(field), std::string::npos) << e.message();
    }
  }
}

// r_t and the switch-over step against the closed form, for several beta2 (0.5: rho_inf = 3, so
// never rectified) and steps from the first through the switch to far out.
TEST(RAdam, StepScalarsMatchClosedForm) {
  Hyperparams h;
  h.lr = 3e-4f;
  h.beta1 = 0.9f;
  h.eps = 1e-8f;
  int rectified_seen = 0, plain_seen = 0;
  for (float b2 : {0.999f, 0.99f, 0.95f, 0.5f}) {
    h.beta2 = b2;
    std::vector<std::int64_t> steps;
    for (std::int64_t t = 1; t <= 40; ++t) steps.push_back(t);
    for (std::int64_t t : {100, 1000, 100000, 1000000000}) steps.push_back(t);
    for (std::int64_t t : steps) {
      const StepScalars s = make_step_scalars(OptimizerKind::radam, h, t, 0.25f);
      const RhoRef want = rho_ref(b2, t);
      const std::string what = "beta2 " + std::to_string(b2) + " step " + std::to_string(t);
      if (std::fabs(want.rho_t - 5.0) < 1e-9) continue;  // too close to the threshold to tell
      EXPECT_EQ(s.extra[1] != 0.0f, want.rectified) << what << " rho_t " << want.rho_t;
      if (want.rectified) {
        ++rectified_seen;
        EXPECT_LE(std::fabs(s.extra[0] - want.r), want.r * (kU + 1e-12)) << what;
      } else {
        ++plain_seen;
        EXPECT_EQ(s.extra[0], 0.0f) << what;
      }
      const double bc1 = 1.0 / (1.0 - std::pow(static_cast<double>(h.beta1), static_cast<double>(t)));
      EXPECT_LE(std::fabs(s.bias_correction1 - bc1), bc1 * kU * 1.0000001) << what;
      EXPECT_EQ(s.grad_scale, 0.25f);
      EXPECT_EQ(s.lr, h.lr);
    }
  }
  EXPECT_GT(rectified_seen, 50);
  EXPECT_GT(plain_seen, 10);
}

// Fused CPU update over 40 steps (beta2 = 0.99: through the switch-over at step 6) against the
// float64 reference, element by element. Gradients have a fixed sign per element and magnitude in [0.125, 1), as the engine oracle's, so the
// moments never cancel and the bound below is the error recurrences of tests/test_rules.cpp
// summed: m carries <= 3u/(1-b1) relative, v <= 4u/(1-b2), so the step lr*r*m_hat/denom carries
// <= rel_m + rel_v/2 + 8u; the decay and the subtraction add a few u of |p|. Twice that, as the
// other rule tests allow for the second-order terms.
TEST(RAdam, FusedUpdateMatchesFloat64) {
  Hyperparams h;
  h.lr = 1e-2f;
  h.beta1 = 0.9f;
  h.beta2 = 0.99f;
  h.eps = 1e-8f;
  h.weight_decay = 0.1f;
  const float gs = 0.5f;
  const std::size_t n = 1003;
  const int steps = 40;
  const double rel_m = 3 * kU / (1 - 0.9) + kU, rel_v = 4 * kU / (1 - 0.99) + kU;
  for (cpu::Isa isa : testing::available_isas())
    for (DType gdt : {DType::fp32, DType::bf16, DType::fp16}) {
      std::mt19937 rng(11);
      std::uniform_real_distribution<float> mag(0.125f, 1.0f);
      std::vector<float> master(n), s1(n, 0.0f), s2(n, 0.0f), sign(n);
      std::vector<double> P(n), M(n, 0.0), V(n, 0.0), E(n, 0.0);
      std::vector<std::uint16_t> out(n);
      for (std::size_t i = 0; i < n; ++i) {
        master[i] = mag(rng) * ((i % 3) ? 1.0f : -1.0f);
        P[i] = master[i];
        sign[i] = (i % 5 < 2) ? -1.0f : 1.0f;
      }
      std::vector<unsigned char> grad(n * size_of(gdt));
      for (int t = 1; t <= steps; ++t) {
        for (std::size_t i = 0; i < n; ++i) store_from_float(grad.data(), gdt, i, sign[i] * mag(rng));
        UpdateArgs a;
        a.rule = OptimizerKind::radam;
        a.scalars = make_step_scalars(OptimizerKind::radam, h, t, gs);
        a.master = master.data();
        a.state1 = s1.data();
        a.state2 = s2.data();
        a.grad = grad.data();
        a.grad_dtype = gdt;
        a.param_out = out.data();
        a.param_dtype = DType::bf16;
        a.n = n;
        cpu::kernels(isa).fused_update(a);
        const RhoRef rr = rho_ref(h.beta2, t);
        for (std::size_t i = 0; i < n; ++i) {
          const double g = static_cast<double>(load_as_float(grad.data(), gdt, i)) * gs;
          const double p0 = P[i];
          radam_ref(P[i], M[i], V[i], g, h, t);
          const double upd = std::fabs(p0 * (1 - h.lr * double(h.weight_decay)) - P[i]);
          const double rel = rr.rectified ? rel_m + rel_v / 2 + 8 * kU : rel_m + 3 * kU;
          E[i] += 2 * (upd * rel + 4 * kU * (std::fabs(P[i]) + upd)) + E[i] * h.lr * h.weight_decay;
        }
      }
      int bad = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const double err = std::fabs(master[i] - P[i]);
        if (!(err <= E[i]) && bad++ < 5)
          ADD_FAILURE() << cpu::name_of(isa) << " grad " << name_of(gdt) << " [" << i << "]: " << master[i]
                        << " vs float64 " << P[i] << " |err| " << err << " > bound " << E[i];
        // The 16-bit copy is the master rounded once.
        EXPECT_EQ(out[i], testing::expected_to16(master[i], DType::bf16)) << i;
      }
      EXPECT_EQ(bad, 0);
    }
}

// Every instruction set gives the scalar path's bits, and so does a plain loop over the header's
// element function (what the CUDA kernel runs), on both sides of the switch-over.
TEST(RAdam, EveryIsaSameBitsAsPlainLoop) {
  Hyperparams h;
  h.lr = 1e-2f;
  h.beta2 = 0.99f;
  h.weight_decay = 0.01f;
  for (std::int64_t t : {2, 6, 7, 50})
    for (std::size_t n : {std::size_t(1), std::size_t(31), std::size_t(33), std::size_t(1000)}) {
      std::mt19937 rng(static_cast<unsigned>(t * 1000 + n));
      std::normal_distribution<float> d(0.0f, 1.0f);
      std::vector<float> m0(n), a0(n), b0(n), g0(n);
      for (std::size_t i = 0; i < n; ++i) {
        m0[i] = d(rng);
        a0[i] = d(rng) * 0.1f;
        b0[i] = std::fabs(d(rng)) * 0.01f;
        g0[i] = d(rng);
      }
      const StepScalars sc = make_step_scalars(OptimizerKind::radam, h, t, 0.75f);
      auto plain_m = m0, plain_a = a0, plain_b = b0;
      for (std::size_t i = 0; i < n; ++i) rules::RAdam::update(plain_m[i], g0[i], plain_a[i], plain_b[i], sc);
      for (cpu::Isa isa : testing::available_isas()) {
        auto m = m0, a = a0, b = b0;
        UpdateArgs u;
        u.rule = OptimizerKind::radam;
        u.scalars = sc;
        u.master = m.data();
        u.state1 = a.data();
        u.state2 = b.data();
        u.grad = g0.data();
        u.grad_dtype = DType::fp32;
        u.n = n;
        cpu::kernels(isa).fused_update(u);
        const std::string what = std::string(cpu::name_of(isa)) + " step " + std::to_string(t) + " n " + std::to_string(n);
        EXPECT_TRUE(testing::same_bits(m, plain_m)) << what;
        EXPECT_TRUE(testing::same_bits(a, plain_a)) << what;
        EXPECT_TRUE(testing::same_bits(b, plain_b)) << what;
      }
    }
}

// The engine with RAdam: every stage, one and three ranks, fp32/bf16/fp16 (dynamic loss scaling),
// 20 steps (through the switch-over at step 6 for beta2 = 0.999), against the float64 reference
// optimizer; and stages 1-3 bit for bit.
TEST(RAdam, EngineMatchesFloat64Reference) {
  for (int stage = 0; stage <= 3; ++stage)
    for (int world : {1, 3})
      for (DType dtype : {DType::fp32, DType::bf16, DType::fp16}) {
        const testing::RunSpec spec = testing::oracle_spec(stage, world, dtype, OptimizerKind::radam);
        SCOPED_TRACE("stage " + std::to_string(stage) + " world " + std::to_string(world) + " " +
                     std::string(name_of(dtype)));
        testing::expect_matches_reference(spec, testing::run_training(spec), radam_ref);
      }
}

TEST(RAdam, StagesAgreeBitForBit) {
  testing::RunSpec spec = testing::oracle_spec(1, 3, DType::bf16, OptimizerKind::radam);
  const testing::RunResult s1 = testing::run_training(spec);
  for (int stage : {2, 3}) {
    spec.cfg.stage = stage;
    testing::expect_bitwise_equal(s1, testing::run_training(spec), 2, "stage 1 vs " + std::to_string(stage));
  }
}

}  // namespace
}  // namespace shardopt
