#pragma once
// The engine oracle: a training run of the synthetic trainer checked element by element against
// the float64 reference, and two runs compared bit for bit. Shared by the CPU suite
// (test_engine_oracle) and the GPU suite (gpu/test_engine_cuda), which run the same cases on
// different worlds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "engine_harness.hpp"

namespace shardopt::testing {

// Element-wise bound for the fp32 master after `steps` updates, derived per rule:
//  - every reduced gradient carries a relative error <= u_r (rounding of the fp32 mean to the
//    reduce dtype; the synthetic gradients themselves are exact in the compute dtype), and the
//    local sum over A micro-steps in the compute dtype (stages 0-1) adds A*u_c;
//  - Adam(W): m and sqrt(v) each inherit that relative error (gradient signs are fixed per
//    element, so neither is near zero): the step lr*mhat/sqrt(vhat), at most ~3*lr here, is off
//    by <= 2x relative; SGD: the momentum buffer sums up to 1/(1-momentum) gradients; Lion: sign()
//    is exact, only fp32 rounding remains;
//  - fp32 arithmetic: a few ulps of |p| and of the step per update.
inline double bound(const RunSpec& spec, double p_abs) {
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
    default: grad_rel = 2.5 * ur; break;  // rules added later bound themselves (tests/rules/)
  }
  const double u32 = std::ldexp(1.0, -24);
  return T * (step_mag * grad_rel + 8 * u32 * (p_abs + step_mag)) + 1e-12;
}

// `other_rule`: the float64 step of a rule the harness's Reference does not spell out.
inline void expect_matches_reference(const RunSpec& spec, const RunResult& got, Reference::ElementStep other_rule = {}) {
  const ReferenceRun rr = run_reference(spec, {}, std::move(other_rule));
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

// The spec of one cell of the oracle matrix: fp16 runs with dynamic loss scaling; SGD varies
// Nesterov and dampening with the world size so every variant is covered.
inline RunSpec oracle_spec(int stage, int world, DType dtype, OptimizerKind rule, WorldKind where = WorldKind::cpu) {
  RunSpec spec;
  spec.world = world;
  spec.where = where;
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
  return spec;
}

using OracleParam = std::tuple<int /*stage*/, int /*world*/, DType, OptimizerKind>;

// stages x world sizes x dtypes x rules
inline auto oracle_matrix(const std::vector<int>& worlds) {
  return ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::ValuesIn(worlds),
                            ::testing::Values(DType::fp32, DType::bf16, DType::fp16),
                            ::testing::Values(OptimizerKind::adamw, OptimizerKind::adam, OptimizerKind::sgd,
                                              OptimizerKind::lion));
}

inline std::string oracle_name(const ::testing::TestParamInfo<OracleParam>& info) {
  const auto [stage, world, dtype, rule] = info.param;
  return "stage" + std::to_string(stage) + "_world" + std::to_string(world) + "_" + std::string(name_of(dtype)) + "_" +
         std::string(name_of(rule));
}

inline void expect_bitwise_equal(const RunResult& a, const RunResult& b, int nstates, const std::string& what) {
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

}  // namespace shardopt::testing
