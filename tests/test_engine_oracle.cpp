// The engine against a float64 reference optimizer, over stages x world sizes x dtypes x rules,
// and stage against stage bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "engine_harness.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

// Element-wise bound for the fp32 master after `steps` updates, derived per rule:
//  - every reduced gradient carries a relative error <= u_r (rounding of the fp32 mean to the
//    reduce dtype; the synthetic gradients themselves are exact in the compute dtype), and the
//    local sum over A micro-steps in the compute dtype (stages 0-1) adds A*u_c;
//  - Adam(W): m and sqrt(v) each inherit that relative error (gradient signs are fixed per
//    element, so neither is near zero): the step lr*mhat/sqrt(vhat), at most ~3*lr here, is off
//    by <= 2x relative; SGD: the momentum buffer sums up to 1/(1-momentum) gradients; Lion: sign()
//    is exact, only fp32 rounding remains;
//  - fp32 arithmetic: a few ulps of |p| and of the step per update.
double bound(const RunSpec& spec, double p_abs) {
  const Config& c = spec.cfg;
  const double T = spec.steps;
  const double lr = c.hyper.lr;
  const double A = c.accumulation_steps;
  const double ur = unit_roundoff(c.reduce_dtype) + (c.stage <= 1 && A > 1 ? A * unit_roundoff(c.compute_dtype) : 0.0);
  double step_mag = 3.0 * lr, grad_rel = 0;
  switch (c.optimizer) {
    case OptimizerKind::adamw:
    case OptimizerKind::adam: grad_rel = 2.5 * ur; break;
    case OptimizerKind::sgd:
      step_mag = lr * (c.hyper.nesterov ? 2.0 : 1.0) / (1.0 - c.hyper.momentum);
      grad_rel = 1.5 * ur;
      break;
    case OptimizerKind::lion: step_mag = lr; grad_rel = 0; break;
  }
  const double u32 = std::ldexp(1.0, -24);
  return T * (step_mag * grad_rel + 8 * u32 * (p_abs + step_mag)) + 1e-12;
}

void expect_matches_reference(const RunSpec& spec, const RunResult& got) {
  const ReferenceRun rr = run_reference(spec);
  const DType c = spec.cfg.compute_dtype;
  int bad = 0;
  for (std::size_t t = 0; t < got.master.size(); ++t) {
    for (std::size_t i = 0; i < got.master[t].size(); ++i) {
      // stage 0 replicates everything; stages 1-3 give every element exactly one owner
      const int owners = spec.cfg.stage == 0 ? spec.world : 1;
      ASSERT_EQ(got.coverage[t][i], owners) << got.tensor_names[t] << "[" << i << "] reported by the wrong number of ranks";
      const double ref = rr.ref.p[t][i];
      const double tol = bound(spec, std::fabs(ref));
      const double err = std::fabs(got.master[t][i] - ref);
      if (!(err <= tol) && bad++ < 10)
        ADD_FAILURE() << got.tensor_names[t] << "[" << i << "]: engine " << got.master[t][i] << " reference " << ref
                      << " |err| " << err << " > bound " << tol;
      // the compute-dtype parameters are the master rounded once, exactly
      float expect;
      store_from_float(&expect, DType::fp32, 0, 0.0f);
      std::uint16_t h = 0;
      if (c == DType::fp32) expect = got.master[t][i];
      else {
        store_from_float(&h, c, 0, got.master[t][i]);
        expect = load_as_float(&h, c, 0);
      }
      if (got.params[t][i] != expect && bad++ < 10)
        ADD_FAILURE() << got.tensor_names[t] << "[" << i << "]: acquired parameter " << got.params[t][i]
                      << " is not round(master) = " << expect;
    }
  }
  EXPECT_EQ(bad, 0);
  for (const auto& per_rank : got.results)
    for (std::size_t s = 0; s < per_rank.size(); ++s) {
      EXPECT_TRUE(per_rank[s].applied) << "step " << s;
      EXPECT_EQ(per_rank[s].step, static_cast<std::int64_t>(s + 1));
      EXPECT_NEAR(per_rank[s].grad_norm, rr.norms[s], rr.norms[s] * (4 * unit_roundoff(spec.cfg.reduce_dtype) + 1e-6))
          << "global gradient norm at step " << s;
    }
}

using OracleParam = std::tuple<int /*stage*/, int /*world*/, DType, OptimizerKind>;

class Oracle : public ::testing::TestWithParam<OracleParam> {};

TEST_P(Oracle, MatchesFloat64Reference) {
  const auto [stage, world, dtype, rule] = GetParam();
  RunSpec spec;
  spec.world = world;
  spec.cfg = base_config(stage, dtype, rule);
  if (dtype == DType::fp16) {
    spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
    spec.cfg.loss_scaling.initial_scale = 1024.0f;
    spec.cfg.loss_scaling.growth_interval = 7;  // grows twice in 20 steps: 4096 stays finite
  }
  spec.group1 = no_decay(spec.cfg);
  if (rule == OptimizerKind::sgd && world % 2 == 1) spec.cfg.hyper.nesterov = true, spec.group1.nesterov = true;
  spec.cfg.hyper.dampening = rule == OptimizerKind::sgd && world == 4 ? 0.1f : 0.0f;
  spec.group1.dampening = spec.cfg.hyper.dampening;
  const RunResult got = run_training(spec);
  expect_matches_reference(spec, got);
}

std::string oracle_name(const ::testing::TestParamInfo<OracleParam>& info) {
  const auto [stage, world, dtype, rule] = info.param;
  return "stage" + std::to_string(stage) + "_world" + std::to_string(world) + "_" + std::string(name_of(dtype)) + "_" +
         std::string(name_of(rule));
}

INSTANTIATE_TEST_SUITE_P(Matrix, Oracle,
                         ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::Values(1, 2, 3, 4, 8),
                                            ::testing::Values(DType::fp32, DType::bf16, DType::fp16),
                                            ::testing::Values(OptimizerKind::adamw, OptimizerKind::adam,
                                                              OptimizerKind::sgd, OptimizerKind::lion)),
                         oracle_name);

// A 16-bit compute dtype whose gradients travel and are kept in fp32.
TEST(Oracle, Bf16ComputeFp32Reduce) {
  for (int stage = 0; stage <= 3; ++stage) {
    RunSpec spec;
    spec.world = 3;
    spec.cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
    spec.cfg.reduce_dtype = DType::fp32;
    spec.group1 = no_decay(spec.cfg);
    SCOPED_TRACE("stage " + std::to_string(stage));
    expect_matches_reference(spec, run_training(spec));
  }
}

TEST(Oracle, ThousandTinyTensors) {
  for (int stage : {0, 1, 2, 3}) {
    RunSpec spec;
    spec.world = 3;
    spec.steps = 5;
    spec.model = tiny_tensors_model(1000);
    spec.cfg = base_config(stage, DType::fp32, OptimizerKind::adamw);
    spec.group1 = no_decay(spec.cfg);
    SCOPED_TRACE("stage " + std::to_string(stage));
    expect_matches_reference(spec, run_training(spec));
  }
}

void expect_bitwise_equal(const RunResult& a, const RunResult& b, int nstates, const std::string& what) {
  ASSERT_EQ(a.master.size(), b.master.size());
  for (std::size_t t = 0; t < a.master.size(); ++t) {
    ASSERT_TRUE(same_bits(a.master[t], b.master[t]))
        << what << ": master of " << a.tensor_names[t];
    for (int k = 0; k < nstates; ++k)
      ASSERT_TRUE(same_bits(a.state[k][t], b.state[k][t]))
          << what << ": state " << k << " of " << a.tensor_names[t];
    ASSERT_TRUE(same_bits(a.params[t], b.params[t]))
        << what << ": parameters of " << a.tensor_names[t];
  }
}

// Stages 1, 2 and 3 reduce the same units in the same order: the same bits. Stage 0's all-reduce
// sums in the same rank order, so without clipping it agrees too.
TEST(StagesAgree, BitForBit) {
  for (DType dtype : {DType::fp32, DType::bf16})
    for (int world : {2, 3, 4}) {
      RunSpec spec;
      spec.world = world;
      spec.cfg = base_config(1, dtype, OptimizerKind::adamw);
      spec.group1 = no_decay(spec.cfg);
      const RunResult s1 = run_training(spec);
      for (int stage : {0, 2, 3}) {
        spec.cfg.stage = stage;
        expect_bitwise_equal(s1, run_training(spec), 2,
                             "stage 1 vs " + std::to_string(stage) + " world " + std::to_string(world) + " " +
                                 std::string(name_of(dtype)));
      }
    }
}

// Different world sizes see the same initial model (seeded initializer is world-size free).
TEST(StagesAgree, InitialValuesIndependentOfWorldAndStage) {
  RunSpec spec;
  spec.steps = 0;
  spec.cfg = base_config(0, DType::fp32, OptimizerKind::adamw);
  spec.group1 = no_decay(spec.cfg);
  const RunResult ref = run_training(spec);
  for (int stage : {1, 3})
    for (int world : {2, 5}) {
      spec.cfg.stage = stage;
      spec.world = world;
      expect_bitwise_equal(ref, run_training(spec), 2, "initial values");
    }
}

}  // namespace
