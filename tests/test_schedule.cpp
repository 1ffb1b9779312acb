// Learning-rate schedules and hyperparameters that change during training:
//  - rules::scheduled_lr at every step of each schedule (warm-up edges, the last decay step and
//    beyond) against the closed forms in float64 (tests/engine_harness.hpp: reference_lr), within
//    one rounding to float;
//  - step control reports the applied lr and a skipped step does not advance the schedule;
//  - the engine with a schedule against the float64 reference optimizer (whose lr follows the same
//    closed forms) at every stage, and StepResult::lr at every step;
//  - set_lr() called before every step (with the previous step possibly in flight) gives the very
//    bits of the schedule evaluated by the backend, eagerly and with step_async();
//  - set_hyperparams() argument errors leave the engine as it was.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine_oracle.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt {
namespace {

using testing::reference_lr;

constexpr double kU = 0x1p-24;

Hyperparams schedule(LrSchedule kind, std::int64_t warmup, std::int64_t total, float lr, float min_lr) {
  Hyperparams h;
  h.lr = lr;
  h.schedule = kind;
  h.warmup_steps = warmup;
  h.total_steps = total;
  h.min_lr = min_lr;
  return h;
}

// Within one rounding to float of the float64 value (plus 2^-50 of the peak for the double
// arithmetic before that rounding).
void expect_lr(float got, double want, double base, const std::string& what) {
  EXPECT_LE(std::fabs(static_cast<double>(got) - want), std::fabs(want) * kU + base * 0x1p-50) << what;
}

TEST(Schedule, EveryStepMatchesClosedForm) {
  int checked = 0;
  for (LrSchedule kind : {LrSchedule::constant, LrSchedule::cosine, LrSchedule::linear, LrSchedule::inverse_sqrt})
    for (std::int64_t warmup : {0, 1, 7, 100})
      for (std::int64_t total : {101, 250, 1000}) {
        const Hyperparams h = schedule(kind, warmup, total, 3e-3f, 1e-4f);
        for (std::int64_t t = 1; t <= total + 20; ++t) {
          const std::string what = std::string(name_of(kind)) + " warmup " + std::to_string(warmup) + " total " +
                                   std::to_string(total) + " step " + std::to_string(t);
          const float got = rules::scheduled_lr(h, t);
          expect_lr(got, reference_lr(h, t), h.lr, what);
          ++checked;
          // The edges land exactly: the warm-up ends on the peak, the decays end on the floor.
          if (warmup > 0 && t == warmup) { EXPECT_EQ(got, h.lr) << what; }
          if (warmup > 0 && t == 1) { EXPECT_EQ(got, static_cast<float>(double(h.lr) / double(warmup))) << what; }
          if ((kind == LrSchedule::cosine || kind == LrSchedule::linear) && t >= total) { EXPECT_EQ(got, h.min_lr) << what; }
          if (kind == LrSchedule::constant && t > warmup) { EXPECT_EQ(got, h.lr) << what; }
          if (kind == LrSchedule::inverse_sqrt && t > warmup) { EXPECT_GE(got, h.min_lr) << what; }
        }
      }
  EXPECT_GT(checked, 10000);
}

// The cosine polynomial over a fine grid of q, against the C library (the schedule's only
// non-elementary operation).
TEST(Schedule, CosPiMatchesLibraryCos) {
  EXPECT_EQ(rules::cos_pi(0.0), 1.0);
  EXPECT_EQ(rules::cos_pi(0.5), 0.0);
  EXPECT_EQ(rules::cos_pi(1.0), -1.0);
  for (int i = 0; i <= 100000; ++i) {
    const double q = i / 100000.0;
    EXPECT_NEAR(rules::cos_pi(q), std::cos(3.14159265358979323846 * q), 4e-16) << q;
  }
}

TEST(Schedule, StepScalarsCarryTheScheduledLr) {
  const Hyperparams h = schedule(LrSchedule::cosine, 5, 50, 1e-2f, 1e-3f);
  for (OptimizerKind k : {OptimizerKind::adamw, OptimizerKind::sgd, OptimizerKind::lion})
    for (std::int64_t t : {1, 4, 5, 6, 27, 49, 50, 51})
      EXPECT_EQ(make_step_scalars(k, h, t, 1.0f).lr, rules::scheduled_lr(h, t)) << name_of(k) << " step " << t;
}

TEST(Schedule, ConfigValidation) {
  struct Case {
    const char* field;
    Hyperparams h;
  };
  const std::vector<Case> bad{
      {"hyper.warmup_steps", schedule(LrSchedule::constant, -1, 0, 1e-3f, 0.0f)},
      {"hyper.total_steps", schedule(LrSchedule::cosine, 10, 10, 1e-3f, 0.0f)},
      {"hyper.total_steps", schedule(LrSchedule::linear, 0, 0, 1e-3f, 0.0f)},
      {"hyper.min_lr", schedule(LrSchedule::cosine, 0, 10, 1e-3f, 2e-3f)},
      {"hyper.min_lr", schedule(LrSchedule::inverse_sqrt, 0, 0, 1e-3f, -1.0f)},
      {"hyper.schedule", schedule(static_cast<LrSchedule>(9), 0, 0, 1e-3f, 0.0f)},
  };
  for (const Case& c : bad) {
    Config cfg;
    cfg.hyper = c.h;
    try {
      cfg.validate();
      ADD_FAILURE() << c.field << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find(c.field), std::string::npos) << e.message();
    }
  }
  Config ok;
  ok.hyper = schedule(LrSchedule::inverse_sqrt, 0, 0, 1e-3f, 0.0f);  // needs no total
  EXPECT_NO_THROW(ok.validate());
  LrSchedule s{};
  for (const char* name : {"constant", "cosine", "linear", "inverse-sqrt"}) {
    ASSERT_TRUE(parse_lr_schedule(name, s)) << name;
    EXPECT_EQ(name_of(s), name);
  }
  EXPECT_FALSE(parse_lr_schedule("exponential", s));
}

// step_control: the applied lr is reported; an overflow neither applies nor advances the schedule.
TEST(Schedule, StepControlReportsLrAndSkipsDoNotAdvance) {
  Hyperparams hyper[2] = {schedule(LrSchedule::linear, 2, 10, 1e-2f, 0.0f), schedule(LrSchedule::constant, 0, 0, 5e-3f, 0.0f)};
  StepScalars scalars[2];
  StepState st;
  StepControlArgs a;
  a.rule = OptimizerKind::adamw;
  a.state = &st;
  a.hyper = hyper;
  a.scalars = scalars;
  a.groups = 2;
  float totals[2] = {4.0f, 0.0f};
  a.totals = totals;
  for (int i = 0; i < 6; ++i) {
    totals[1] = (i == 2) ? 1.0f : 0.0f;  // the third call overflows
    rules::step_control(a);
    const std::int64_t t = st.step;
    EXPECT_EQ(t, i < 2 ? i + 1 : i);
    EXPECT_EQ(st.lr, rules::scheduled_lr(hyper[0], t)) << i;
    expect_lr(st.lr, reference_lr(hyper[0], t), hyper[0].lr, "call " + std::to_string(i));
    EXPECT_EQ(scalars[1].lr, hyper[1].lr);
  }
}

// ---- the engine ----------------------------------------------------------------------------------

testing::RunSpec scheduled_spec(int stage, int world, DType dtype, OptimizerKind rule, LrSchedule kind) {
  testing::RunSpec spec = testing::oracle_spec(stage, world, dtype, rule);
  spec.steps = 16;
  for (Hyperparams* h : {&spec.cfg.hyper, &spec.group1}) {
    h->schedule = kind;
    h->warmup_steps = 3;
    h->total_steps = 12;  // the run goes past the end of the decay
    h->min_lr = h->lr * 0.1f;
  }
  return spec;
}

void expect_lr_per_step(const testing::RunSpec& spec, const testing::RunResult& got) {
  for (const auto& per_rank : got.results)
    for (std::size_t s = 0; s < per_rank.size(); ++s)
      expect_lr(per_rank[s].lr, reference_lr(spec.cfg.hyper, per_rank[s].step), spec.cfg.hyper.lr,
                "StepResult::lr at step " + std::to_string(per_rank[s].step));
}

TEST(ScheduleEngine, MatchesFloat64Reference) {
  for (LrSchedule kind : {LrSchedule::cosine, LrSchedule::linear, LrSchedule::inverse_sqrt})
    for (int stage : {0, 1, 2, 3})
      for (int world : {1, 3}) {
        const DType dtype = stage % 2 ? DType::bf16 : DType::fp32;
        const OptimizerKind rule = world == 1 ? OptimizerKind::adamw : OptimizerKind::sgd;
        const testing::RunSpec spec = scheduled_spec(stage, world, dtype, rule, kind);
        SCOPED_TRACE(std::string(name_of(kind)) + " stage " + std::to_string(stage) + " world " +
                     std::to_string(world));
        const testing::RunResult got = testing::run_training(spec);
        testing::expect_matches_reference(spec, got);
        expect_lr_per_step(spec, got);
      }
}

// fp16 with dynamic loss scaling and an injected overflow: the skipped step keeps the schedule
// where it was (the reference skips it too). World 1 also covers the one-rank path, where the
// skipped update must still zero the gradient shard for the next step.
TEST(ScheduleEngine, SkippedStepDoesNotAdvance) {
  for (int world : {1, 2}) {
    SCOPED_TRACE("world " + std::to_string(world));
    testing::RunSpec spec = scheduled_spec(2, world, DType::fp16, OptimizerKind::adamw, LrSchedule::cosine);
    spec.grad_factor = [world](int step, int, int rank) { return step == 4 && rank == world - 1 ? INFINITY : 1.0f; };
    const testing::RunResult got = testing::run_training(spec);
    ASSERT_FALSE(got.results[0][4].applied);
    EXPECT_EQ(got.results[0][4].step, 4);
    EXPECT_EQ(got.results[0][4].lr, got.results[0][3].lr);  // the last applied step's
    EXPECT_EQ(got.results[0][5].step, 5);
    expect_lr_per_step(spec, got);
    const testing::ReferenceRun rr = testing::run_reference(spec, {4});
    for (std::size_t t = 0; t < got.master.size(); ++t)
      for (std::size_t i = 0; i < got.master[t].size(); ++i)
        ASSERT_LE(std::fabs(got.master[t][i] - rr.ref.p[t][i]), testing::bound(spec, std::fabs(rr.ref.p[t][i])))
            << got.tensor_names[t] << "[" << i << "]";
  }
}

// set_lr before every step, with the values the schedule would give, reproduces the scheduled
// run bit for bit: the new value reaches the next step, in stream order, and no earlier one.
TEST(ScheduleEngine, SetLrEveryStepGivesTheScheduleBits) {
  for (bool async : {false, true})
    for (int stage : {1, 3}) {
      const testing::RunSpec scheduled = scheduled_spec(stage, 2, DType::bf16, OptimizerKind::adamw, LrSchedule::cosine);
      testing::RunSpec manual = scheduled;
      manual.async = async;
      manual.cfg.hyper.schedule = LrSchedule::constant;
      manual.group1.schedule = LrSchedule::constant;
      manual.cfg.hyper.warmup_steps = manual.group1.warmup_steps = 0;
      manual.before_step = [&](Engine& e, int s) {
        // step s (from 0) is update s + 1: nothing is skipped in this run
        e.set_lr(0, rules::scheduled_lr(scheduled.cfg.hyper, s + 1));
        e.set_lr(1, rules::scheduled_lr(scheduled.group1, s + 1));
      };
      SCOPED_TRACE(std::string(async ? "step_async" : "step") + " stage " + std::to_string(stage));
      const testing::RunResult want = testing::run_training(scheduled);
      const testing::RunResult got = testing::run_training(manual);
      testing::expect_bitwise_equal(want, got, 2, "set_lr every step vs the cosine schedule");
      EXPECT_EQ(got.results[0].back().lr, want.results[0].back().lr);
    }
}

// A change between steps takes effect at the next step only: lr 0 from step 5 on freezes the
// parameters from there (adamw with no weight decay group 1 and decay 0.1 group 0: lr 0 stops both).
TEST(ScheduleEngine, SetHyperparamsTakesEffectAtTheNextStep) {
  testing::RunSpec spec = testing::oracle_spec(2, 2, DType::fp32, OptimizerKind::adamw);
  spec.steps = 5;
  const testing::RunResult five = testing::run_training(spec);
  spec.steps = 8;
  spec.before_step = [](Engine& e, int s) {
    if (s == 5) {
      Hyperparams h = e.hyperparams(0);
      h.lr = 0.0f;
      e.set_hyperparams(0, h);
      e.set_lr(1, 0.0f);
    }
  };
  const testing::RunResult eight = testing::run_training(spec);
  testing::expect_bitwise_equal(five, eight, 0, "steps 6-8 at lr 0");
  EXPECT_EQ(eight.results[0].back().lr, 0.0f);
  EXPECT_EQ(eight.results[0].back().step, 8);
}

TEST(ScheduleEngine, SetHyperparamsErrorsChangeNothing) {
  testing::RunSpec spec = testing::oracle_spec(1, 1, DType::fp32, OptimizerKind::adamw);
  spec.steps = 1;
  spec.before_step = [](Engine& e, int) {
    const Hyperparams before = e.hyperparams(0);
    Hyperparams bad = before;
    bad.beta1 = 1.5f;
    EXPECT_THROW(e.set_hyperparams(0, bad), Error);
    EXPECT_THROW(e.set_lr(0, -1.0f), Error);
    EXPECT_THROW(e.set_hyperparams(7, before), Error);  // no tensor is in group 7
    EXPECT_THROW(e.set_hyperparams(-1, before), Error);
    EXPECT_EQ(e.hyperparams(0).beta1, before.beta1);
    EXPECT_EQ(e.hyperparams(0).lr, before.lr);
  };
  const testing::RunResult got = testing::run_training(spec);
  testing::expect_matches_reference(spec, got);  // the step ran with the original values
}

}  // namespace
}  // namespace shardopt
