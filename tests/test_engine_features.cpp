// Engine features beyond the plain update: loss scaling, clipping, accumulation, memory and
// communication accounting, and errors on misuse.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "engine_harness.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

double max_abs_diff(const RunResult& a, const ReferenceRun& rr) {
  double worst = 0;
  for (std::size_t t = 0; t < a.master.size(); ++t)
    for (std::size_t i = 0; i < a.master[t].size(); ++i)
      worst = std::max(worst, std::fabs(a.master[t][i] - rr.ref.p[t][i]));
  return worst;
}

void expect_same_bits(const RunResult& a, const RunResult& b, int nstates) {
  for (std::size_t t = 0; t < a.master.size(); ++t) {
    EXPECT_TRUE(same_bits(a.master[t], b.master[t])) << a.tensor_names[t];
    for (int k = 0; k < nstates; ++k)
      EXPECT_TRUE(same_bits(a.state[k][t], b.state[k][t]))
          << "state " << k << " of " << a.tensor_names[t];
  }
}

// ------------------------------------------------------------------------------- loss scaling

TEST(LossScaling, OverflowOnOneRankSkipsEverywhereAndBacksOff) {
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    RunSpec spec;
    spec.world = 3;
    spec.cfg = base_config(stage, DType::fp16, OptimizerKind::adamw);
    spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
    spec.cfg.loss_scaling.initial_scale = 1024.0f;
    spec.cfg.loss_scaling.growth_interval = 2;
    spec.cfg.loss_scaling.backoff = 0.5f;
    spec.group1 = no_decay(spec.cfg);

    // state after steps 0..2, no overflow
    spec.steps = 3;
    const RunResult before = run_training(spec);
    // steps 0..3 with an infinity written by rank 1 alone in step 3
    spec.steps = 4;
    spec.grad_factor = [](int s, int, int rank) {
      return s == 3 && rank == 1 ? std::numeric_limits<float>::infinity() : 1.0f;
    };
    const RunResult skipped = run_training(spec);
    for (int r = 0; r < spec.world; ++r) {
      EXPECT_FALSE(skipped.results[r][3].applied) << "rank " << r << " must skip";
      EXPECT_EQ(skipped.results[r][3].step, 3);
    }
    expect_same_bits(before, skipped, 2);

    // recovery and growth: scale 1024 -> 2048 after 2 clean steps, halves on the overflow, grows
    // again after 2 more clean steps
    spec.steps = 7;
    const RunResult run = run_training(spec);
    const float expected[] = {1024, 2048, 2048, 1024, 1024, 2048, 2048};
    for (int s = 0; s < 7; ++s) EXPECT_EQ(run.results[0][s].loss_scale, expected[s]) << "after step " << s;
    const ReferenceRun rr = run_reference(spec, {3});
    EXPECT_LT(max_abs_diff(run, rr), 7 * 3 * spec.cfg.hyper.lr * 2.5 * unit_roundoff(DType::fp16) + 1e-5);
  }
}

TEST(LossScaling, HysteresisDelaysBackoffAndMinScaleHolds) {
  RunSpec spec;
  spec.world = 2;
  spec.cfg = base_config(2, DType::fp16, OptimizerKind::sgd);
  spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
  spec.cfg.loss_scaling.initial_scale = 4.0f;
  spec.cfg.loss_scaling.growth_interval = 100;
  spec.cfg.loss_scaling.hysteresis = 2;
  spec.cfg.loss_scaling.min_scale = 2.0f;
  spec.group1 = no_decay(spec.cfg);
  spec.steps = 6;
  spec.grad_factor = [](int s, int, int rank) {
    return s >= 1 && s <= 4 && rank == 0 ? std::numeric_limits<float>::quiet_NaN() : 1.0f;
  };
  const RunResult run = run_training(spec);
  // overflows at steps 1..4: backoff on every second consecutive one, never below min_scale
  const float expected[] = {4, 4, 2, 2, 2, 2};
  const bool applied[] = {true, false, false, false, false, true};
  for (int s = 0; s < 6; ++s) {
    EXPECT_EQ(run.results[1][s].loss_scale, expected[s]) << "after step " << s;
    EXPECT_EQ(run.results[1][s].applied, applied[s]) << "step " << s;
  }
  EXPECT_EQ(run.results[1][5].step, 2);
}

// ------------------------------------------------------------------------------- clipping

TEST(Clipping, GlobalNormAndClippedUpdateMatchReference) {
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 3}) {
      SCOPED_TRACE("stage " + std::to_string(stage) + " world " + std::to_string(world));
      RunSpec spec;
      spec.world = world;
      spec.steps = 10;
      spec.cfg = base_config(stage, DType::fp32, OptimizerKind::sgd);
      spec.cfg.max_grad_norm = 5.0f;  // the synthetic gradient's norm is ~30: always clipped
      spec.group1 = no_decay(spec.cfg);
      const RunResult run = run_training(spec);
      const ReferenceRun rr = run_reference(spec);
      for (int s = 0; s < spec.steps; ++s) {
        ASSERT_GT(rr.norms[s], 5.0) << "the test needs clipping to happen";
        EXPECT_NEAR(run.results[0][s].grad_norm, rr.norms[s], rr.norms[s] * 1e-6);
        EXPECT_NEAR(run.results[0][s].clip_coefficient, 5.0 / (rr.norms[s] + 1e-6), 1e-6);
      }
      EXPECT_LT(max_abs_diff(run, rr), 1e-5);
      // without the clip the result is far away: the check above can fail
      spec.cfg.max_grad_norm = 0;
      EXPECT_GT(max_abs_diff(run_training(spec), rr), 1e-3);
    }
}

// ------------------------------------------------------------------------------- accumulation

TEST(Accumulation, FourMicroStepsEqualOneStepOnTheWholeBatch) {
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    RunSpec spec;
    spec.world = 3;
    spec.steps = 8;
    spec.cfg = base_config(stage, DType::fp32, OptimizerKind::adamw);
    spec.cfg.accumulation_steps = 4;
    spec.group1 = no_decay(spec.cfg);
    const RunResult run = run_training(spec);
    const ReferenceRun rr = run_reference(spec);
    EXPECT_LT(max_abs_diff(run, rr), 1e-5);
    for (int s = 0; s < spec.steps; ++s) EXPECT_NEAR(run.results[0][s].grad_norm, rr.norms[s], rr.norms[s] * 1e-5);

    // stages 0-1 communicate once per step whatever the micro-step count
    const CommStats& cs = run.comm_last_step[0];
    if (stage == 0) {
      EXPECT_EQ(cs.calls[int(CollectiveKind::reduce_scatter)], 0u);
      EXPECT_GT(cs.calls[int(CollectiveKind::all_reduce)], 0u);
    }
    RunSpec one = spec;
    one.cfg.accumulation_steps = 1;
    const RunResult single = run_training(one);
    const CommStats& c1 = single.comm_last_step[0];
    for (int k = 0; k < kCollectiveKindCount; ++k) {
      if (stage <= 1) {
        EXPECT_EQ(cs.calls[k], c1.calls[k]) << name_of(CollectiveKind(k)) << ": one reduction per step, not per micro-step";
        EXPECT_EQ(cs.bytes[k], c1.bytes[k]) << name_of(CollectiveKind(k));
      }
    }
    if (stage >= 2) {  // reduce-scatter per unit in every micro-step
      EXPECT_EQ(cs.calls[int(CollectiveKind::reduce_scatter)], 4 * c1.calls[int(CollectiveKind::reduce_scatter)]);
    }
  }
}

// ------------------------------------------------------------------------------- memory, comm

std::vector<BlockSpec> big_model() {
  std::vector<BlockSpec> blocks;
  for (int b = 0; b < 6; ++b)
    blocks.push_back({"layer" + std::to_string(b),
                      {{"layer" + std::to_string(b) + ".w", {256, 255}, 0}, {"layer" + std::to_string(b) + ".b", {256}, 1}}});
  return blocks;
}
double big_model_params() { return 6.0 * (256 * 255 + 256); }

// bf16 everywhere, one layer per unit, two gathered-unit slots at stage 3.
RunSpec big_model_spec(int stage, int world) {
  RunSpec spec;
  spec.world = world;
  spec.steps = 2;
  spec.model = big_model();
  spec.cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
  spec.cfg.bucket_bytes = 64 * 1024 * 2;
  spec.cfg.alignment = 64;
  spec.cfg.prefetch_units = 1;
  spec.group1 = no_decay(spec.cfg);
  return spec;
}

TEST(Memory, PerRankBytesMatchZeroFormulas) {
  const int N = 4;
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    const RunSpec spec = big_model_spec(stage, N);
    const RunResult run = run_training(spec);
    const double psi = big_model_params();
    const double formula[] = {16 * psi, 4 * psi + 12 * psi / N, 2 * psi + 14 * psi / N, 16 * psi / N};
    const double unit_bytes = 2.0 * (256 * 255 + 256 + 64);  // padded unit in bf16, upper bound
    const double buffers = (stage >= 2 ? 2 * unit_bytes : 0)                   // gradient buckets
                           + (stage == 3 ? 2 * unit_bytes : 0)                 // gathered-unit slots
                           + 4096;                                             // step scalars
    for (int r = 0; r < N; ++r) {
      const MemoryReport& m = run.memory[r];
      const double peak = double(m.peak_total[int(Place::device)]);
      EXPECT_GE(peak, formula[stage] * 0.98) << "rank " << r << "\n" << m.to_string();
      EXPECT_LE(peak, formula[stage] * 1.02 + buffers) << "rank " << r << "\n" << m.to_string();
      const double grads = double(m.peak_of(Category::gradients, Place::device));
      if (stage >= 2) {
        EXPECT_LT(grads, 2 * psi) << "stage 2+ must never hold a full-size (2 bytes x psi) gradient buffer";
      }
      if (stage == 3) {
        EXPECT_LE(double(m.peak_of(Category::parameters, Place::device)), 2 * psi / N * 1.02 + 2 * unit_bytes)
            << "stage 3 holds its shard plus at most 1 + prefetch_units gathered units";
      }
      EXPECT_EQ(m.peak_of(Category::master_weights, Place::device),
                m.current_of(Category::master_weights, Place::device));
    }
  }
}

TEST(Comm, VolumePerStepMatchesZeroAccounting) {
  const int N = 4;
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    const RunResult run = run_training(big_model_spec(stage, N));
    const double psi = big_model_params();
    const CommStats& cs = run.comm_last_step[1];
    const double rs = double(cs.bytes[int(CollectiveKind::reduce_scatter)]);
    const double ag = double(cs.bytes[int(CollectiveKind::all_gather)]);
    const double ar = double(cs.bytes[int(CollectiveKind::all_reduce)]);
    const double elem = 2.0;  // bf16 everywhere
    const double small = 64;  // the norm/overflow all-reduce: two floats
    if (stage == 0) {
      EXPECT_NEAR(ar, 2 * psi * elem, 0.02 * 2 * psi * elem + small);
      EXPECT_EQ(rs + ag, 0.0);
    } else if (stage <= 2) {
      EXPECT_NEAR(rs, psi * elem, 0.02 * psi * elem);
      EXPECT_NEAR(ag, psi * elem, 0.02 * psi * elem);
      EXPECT_LE(ar, small);
    } else {
      // forward gathers every unit, backward every unit not still cached (at most the 2 slots)
      const double unit = 2.0 * (256 * 255 + 256 + 64);
      EXPECT_NEAR(rs, psi * elem, 0.02 * psi * elem);
      EXPECT_LE(ag, 2 * psi * elem * 1.02);
      EXPECT_GE(ag, 2 * psi * elem - 2 * unit);
      EXPECT_LE(ar, small);
    }
  }
}

// The plan from shapes alone is what the engine allocates, byte for byte, for every stage,
// dtype pairing, accumulation and world size; peaks include the transient initializer staging.
TEST(Memory, PlanMatchesMemoryReportExactly) {
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 3})
      for (DType reduce : {DType::bf16, DType::fp32})
        for (int accum : {1, 2}) {
          RunSpec spec;
          spec.world = world;
          spec.steps = 1;
          spec.cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
          spec.cfg.reduce_dtype = reduce;
          spec.cfg.accumulation_steps = accum;
          spec.cfg.persistence_threshold = stage == 3 ? 40 : 0;
          spec.group1 = no_decay(spec.cfg);
          const MemoryReport planned = plan_memory(spec.cfg, spec.model, world).report();
          const RunResult run = run_training(spec);
          for (int r = 0; r < world; ++r)
            for (int c = 0; c < kCategoryCount; ++c)
              for (int p = 0; p < kPlaceCount; ++p) {
                SCOPED_TRACE("stage " + std::to_string(stage) + " world " + std::to_string(world) + " reduce " +
                             std::string(name_of(reduce)) + " accum " + std::to_string(accum) + " " +
                             std::string(name_of(Category(c))) + "/" + std::string(name_of(Place(p))));
                EXPECT_EQ(run.memory[r].current[c][p], planned.current[c][p]);
                EXPECT_EQ(run.memory[r].peak[c][p], planned.peak[c][p]);
              }
        }
}

// ------------------------------------------------------------------------------- bad input

struct OneRank {
  World w{1};
  Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
};

template <class F>
void expect_error(ErrorCode code, const std::string& needle, F&& f) {
  try {
    f();
    ADD_FAILURE() << "expected an Error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

void train_one_step(Engine& e) {
  const int n = static_cast<int>(e.layout().blocks().size());
  for (int b = n - 1; b >= 0; --b) {
    e.acquire(b);
    BlockView g = e.gradients(b);
    for (auto& tv : g.tensors)
      for (std::size_t i = 0; i < tv.numel; ++i) store_from_float(tv.data, tv.dtype, i, 0.5f);
    e.grads_ready(b);
    e.release(b);
  }
  EXPECT_TRUE(e.step().applied);
}

TEST(BadInput, RegistrationErrorsNameTheCulprit) {
  OneRank o;
  Engine e(o.cfg, *o.w.backends[0], *o.w.comms[0]);
  e.register_block({"a", {{"a.w", {4, 4}}}});
  expect_error(ErrorCode::invalid_argument, "a.w", [&] { e.register_block({"b", {{"a.w", {2}}}}); });
  expect_error(ErrorCode::invalid_argument, "'a'", [&] { e.register_block({"a", {{"x", {2}}}}); });
  expect_error(ErrorCode::invalid_argument, "bad", [&] { e.register_block({"c", {{"bad", {2, -1}}}}); });
  expect_error(ErrorCode::invalid_state, "initialize", [&] { e.acquire(0); });
  e.register_block({"b", {{"b.w", {3}}}});
  e.initialize();
  expect_error(ErrorCode::invalid_state, "after initialize", [&] { e.register_block({"late", {{"late.w", {2}}}}); });
  expect_error(ErrorCode::invalid_state, "twice", [&] { e.initialize(); });
  EXPECT_EQ(e.layout().tensors().size(), 2u);
  train_one_step(e);
}

TEST(BadInput, CallOrderErrorsLeaveTheEngineUsable) {
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    OneRank o;
    o.cfg.stage = stage;
    Engine e(o.cfg, *o.w.backends[0], *o.w.comms[0]);
    e.register_block({"a", {{"a.w", {40}}}});
    e.register_block({"b", {{"b.w", {30}}}});
    e.initialize();
    expect_error(ErrorCode::invalid_argument, "unknown block index 7", [&] { e.acquire(7); });
    expect_error(ErrorCode::invalid_argument, "unknown block 'zzz'", [&] { e.find_block("zzz"); });
    expect_error(ErrorCode::invalid_state, "not acquired", [&] { e.release(0); });
    // step before every block reported: names the missing block
    e.acquire(1);
    e.gradients(1);
    e.grads_ready(1);
    e.release(1);
    expect_error(ErrorCode::invalid_state, "a", [&] { e.step(); });
    expect_error(ErrorCode::invalid_state, "reported twice", [&] { e.grads_ready(1); });
    e.zero_grad();
    train_one_step(e);
    train_one_step(e);
  }
}

TEST(BadInput, ConfigErrors) {
  World w(1);
  auto make = [&](auto mutate) {
    Config c = base_config(1, DType::fp32, OptimizerKind::adamw);
    mutate(c);
    Engine e(c, *w.backends[0], *w.comms[0]);
  };
  expect_error(ErrorCode::invalid_argument, "stage", [&] { make([](Config& c) { c.stage = 5; }); });
  expect_error(ErrorCode::invalid_argument, "bucket", [&] { make([](Config& c) { c.bucket_bytes = 0; }); });
  expect_error(ErrorCode::unsupported, "master", [&] { make([](Config& c) { c.master_dtype = DType::bf16; }); });
  // parameter offload needs optimizer offload: refused, not quietly ignored
  expect_error(ErrorCode::unsupported, "offload", [&] { make([](Config& c) { c.stage = 3; c.offload_params = true; }); });
  EXPECT_THROW(make_in_process_group(0), Error);
}

}  // namespace
