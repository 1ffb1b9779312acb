// Step control (shardopt/step_control.hpp): the per-step decisions the backend makes in stream
// order. Checked against a model written here from the definitions (float64 norm and clipping, a
// dynamic loss scaler as documented in config.hpp, std::pow bias corrections), and on the CPU
// backend: run in stream order on values earlier work wrote, feeding fused_update by pointer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/error.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt {
namespace {

constexpr double kU = 0x1p-24;   // fp32 unit roundoff
constexpr double kUd = 0x1p-53;  // fp64 unit roundoff

// Field by field, bit for bit (the struct has padding that assignment need not copy).
void expect_same_scalars(const StepScalars& a, const StepScalars& b, const std::string& what) {
  const float fa[] = {a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.one_minus_beta1, a.one_minus_beta2,
                      a.bias_correction1, a.bias_correction2_sqrt, a.momentum, a.one_minus_dampening, a.grad_scale};
  const float fb[] = {b.lr, b.beta1, b.beta2, b.eps, b.weight_decay, b.one_minus_beta1, b.one_minus_beta2,
                      b.bias_correction1, b.bias_correction2_sqrt, b.momentum, b.one_minus_dampening, b.grad_scale};
  EXPECT_EQ(std::memcmp(fa, fb, sizeof fa), 0) << what;
  EXPECT_EQ(a.nesterov, b.nesterov) << what;
  EXPECT_EQ(a.first_step, b.first_step) << what;
}

TEST(PowInt, AgreesWithPowWithinItsRoundings) {
  for (double x : {0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.999999, 1.0, 1.5}) {
    for (std::int64_t n : {0, 1, 2, 3, 7, 64, 1000, 123457, 1 << 30}) {
      const double want = std::pow(x, static_cast<double>(n));
      const double got = rules::pow_int(x, n);
      if (want < 1e-300 || std::isinf(want)) {  // underflow / overflow: both at the limit
        EXPECT_EQ(std::isinf(got), std::isinf(want)) << x << "^" << n;
        EXPECT_LE(got, want < 1e-300 ? 1e-290 : INFINITY) << x << "^" << n;
        continue;
      }
      // A product of n factors, however parenthesized, is within n-1 roundings (relative) of the
      // exact power; pow() is within about one more.
      const double steps = static_cast<double>(n) + 1.0;
      EXPECT_LE(std::fabs(got - want), steps * kUd * want * 1.01) << x << "^" << n;
    }
  }
  EXPECT_EQ(rules::pow_int(0.0, 0), 1.0);
  EXPECT_EQ(rules::pow_int(0.9, 0), 1.0);
  EXPECT_EQ(rules::pow_int(0.9, 1), 0.9);
}

TEST(StepTotals, SumsInDoubleAndCarriesTheFlag) {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> u(0.0f, 1e6f);
  for (std::size_t count : {0u, 1u, 2u, 17u, 1000u}) {
    std::vector<float> partials(count);
    for (float& p : partials) p = u(rng);
    long double exact = 0;
    for (float p : partials) exact += p;
    const float flag = count % 2 ? 1.0f : 0.0f;
    float totals[2] = {-1.0f, -1.0f};
    rules::step_totals(partials.data(), count, &flag, totals);
    // double accumulation (count roundings of at most kUd each), then one rounding to float
    const double bound = static_cast<double>(exact) * (kU + count * kUd) * 1.01;
    EXPECT_LE(std::fabs(static_cast<double>(totals[0]) - static_cast<double>(exact)), bound) << count;
    EXPECT_EQ(totals[1], flag);
  }
}

// ---- step_control against a model ----------------------------------------------------------

struct Model {  // the documented behaviour, in double
  double scale;
  int good = 0, bad = 0;
  std::int64_t step = 0;
};

Hyperparams group_hyper(int g) {
  Hyperparams h;
  h.lr = 1e-3f * static_cast<float>(g + 1);
  h.beta1 = g ? 0.8f : 0.9f;
  h.beta2 = g ? 0.99f : 0.999f;
  h.eps = 1e-8f;
  h.weight_decay = g ? 0.0f : 0.1f;
  return h;
}

void expect_within(double got, double want, double rel, const std::string& what) {
  EXPECT_LE(std::fabs(got - want), std::fabs(want) * rel) << what << ": got " << got << ", want " << want;
}

TEST(StepControl, MatchesTheModelOverARandomRunOfStepsAndOverflows) {
  for (LossScaleMode mode : {LossScaleMode::dynamic, LossScaleMode::fixed, LossScaleMode::none}) {
    SCOPED_TRACE("mode " + std::to_string(static_cast<int>(mode)));
    StepControlArgs a;
    a.rule = OptimizerKind::adamw;
    a.accumulation_steps = 2;
    a.max_grad_norm = 1.5f;
    a.loss_scaling.mode = mode;
    a.loss_scaling.initial_scale = 8.0f;
    a.loss_scaling.growth_interval = 3;
    a.loss_scaling.growth_factor = 2.0f;
    a.loss_scaling.backoff = 0.25f;
    a.loss_scaling.hysteresis = 2;
    a.loss_scaling.min_scale = 1.0f;
    const int groups = 2;
    Hyperparams hyper[groups] = {group_hyper(0), group_hyper(1)};
    StepScalars scalars[groups];
    StepState st;
    st.loss_scale = mode == LossScaleMode::none ? 1.0f : 8.0f;
    a.hyper = hyper;
    a.scalars = scalars;
    a.groups = groups;
    a.state = &st;
    float totals[2];
    a.totals = totals;
    Model m{st.loss_scale};

    std::mt19937_64 rng(5);
    int skipped = 0, clipped = 0, backoffs = 0, growths = 0;
    for (int i = 0; i < 400; ++i) {
      const int kind = static_cast<int>(rng() % 10);
      // mostly finite; some steps flagged, some with an infinite or NaN sum
      totals[0] = kind == 8 ? INFINITY : kind == 9 ? NAN : static_cast<float>(std::ldexp(1.0 + (rng() % 1000) / 100.0, static_cast<int>(rng() % 12)));
      totals[1] = kind == 7 ? 1.0f : 0.0f;
      std::memset(static_cast<void*>(scalars), 0x5a, sizeof scalars);  // poison: a skip must not write them
      StepScalars poisoned[groups];
      std::memcpy(static_cast<void*>(poisoned), scalars, sizeof scalars);
      const double scale_before = m.scale;

      rules::step_control(a);

      const bool overflow = totals[1] != 0.0f || !std::isfinite(totals[0]);
      const std::string at = "step " + std::to_string(i);
      if (overflow) {
        ++skipped;
        EXPECT_EQ(st.applied, 0) << at;
        EXPECT_EQ(st.skip, 1.0f) << at;
        EXPECT_TRUE(std::isinf(st.grad_norm)) << at;
        EXPECT_EQ(std::memcmp(scalars, poisoned, sizeof scalars), 0) << at << ": scalars written on a skip";
        if (mode == LossScaleMode::dynamic) {
          m.good = 0;
          if (++m.bad >= 2) {
            m.scale = std::max(m.scale * 0.25, 1.0);
            m.bad = 0;
            ++backoffs;
          }
        }
      } else {
        ++m.step;
        const double norm = std::sqrt(static_cast<double>(totals[0])) / (scale_before * 2);
        const double clip = norm > 1.5 ? 1.5 / (norm + 1e-6) : 1.0;
        clipped += clip < 1.0;
        EXPECT_EQ(st.applied, 1) << at;
        EXPECT_EQ(st.skip, 0.0f) << at;
        expect_within(st.grad_norm, norm, 4 * kUd, at + " grad_norm");
        expect_within(st.clip_coefficient, clip, 1.01 * kU + 8 * kUd, at + " clip");
        for (int g = 0; g < groups; ++g) {
          const std::string w = at + " group " + std::to_string(g);
          const StepScalars& s = scalars[g];
          const double t = static_cast<double>(m.step);
          expect_within(s.grad_scale, clip / (scale_before * 2), 1.01 * kU + 8 * kUd, w + " grad_scale");
          expect_within(s.bias_correction1, 1.0 / (1.0 - std::pow(static_cast<double>(hyper[g].beta1), t)),
                        1.01 * kU, w + " bias_correction1");
          expect_within(s.bias_correction2_sqrt,
                        1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(hyper[g].beta2), t)), 1.01 * kU,
                        w + " bias_correction2_sqrt");
          EXPECT_EQ(s.lr, hyper[g].lr) << w;
          EXPECT_EQ(s.weight_decay, hyper[g].weight_decay) << w;
          EXPECT_EQ(s.beta1, hyper[g].beta1) << w;
        }
        if (mode == LossScaleMode::dynamic) {
          m.bad = 0;
          if (++m.good >= 3) {
            m.scale *= 2.0;
            m.good = 0;
            ++growths;
          }
        }
      }
      EXPECT_EQ(st.step, m.step) << at;
      EXPECT_EQ(static_cast<double>(st.loss_scale), m.scale) << at;
      EXPECT_EQ(st.good_steps, m.good) << at;
      EXPECT_EQ(st.overflow_run, m.bad) << at;
    }
    // The run exercised every branch.
    EXPECT_GT(skipped, 40);
    EXPECT_GT(clipped, 20);
    EXPECT_LT(clipped, 400 - skipped);
    if (mode == LossScaleMode::dynamic) {
      EXPECT_GT(backoffs, 5);
      EXPECT_GT(growths, 5);
    }
  }
}

// ---- on the CPU backend --------------------------------------------------------------------

TEST(StepControlOnCpu, RunsInStreamOrderAndFeedsTheUpdateByPointer) {
  auto be = make_cpu_backend();
  auto st = be->create_stream("s");
  const std::size_t n = 1003;
  const int nparts = 5;
  Buffer mem = be->allocate(4096, Place::device, Category::other, "control");
  auto* bytes = mem.as<unsigned char>();
  auto* state = reinterpret_cast<StepState*>(bytes);
  auto* hyper = reinterpret_cast<Hyperparams*>(bytes + 256);
  auto* scal = reinterpret_cast<StepScalars*>(bytes + 512);
  auto* fl = reinterpret_cast<float*>(bytes + 1024);  // [0] flag, [1..2] totals, [3..] partials
  *state = StepState{};
  state->loss_scale = 4.0f;
  *hyper = group_hyper(0);

  std::mt19937_64 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> grad(n), master0(n), m0(n), v0(n);
  for (std::size_t i = 0; i < n; ++i) {
    grad[i] = nd(rng) * 4.0f;
    master0[i] = nd(rng);
    m0[i] = nd(rng) * 0.01f;
    v0[i] = std::fabs(nd(rng)) * 1e-4f;
  }
  for (bool overflow : {false, true}) {
    SCOPED_TRACE(overflow ? "overflow" : "clean");
    std::vector<float> master = master0, m = m0, v = v0;
    // The partial sums and the flag are written by a task enqueued before the control: the
    // control must read them when it runs, not when it is enqueued.
    for (int k = 0; k < 3 + nparts; ++k) fl[k] = -7.0f;
    be->host_task(*st, [&, overflow] {
      fl[0] = overflow ? 1.0f : 0.0f;
      for (int k = 0; k < nparts; ++k) fl[3 + k] = 0.25f * static_cast<float>(k + 1);
    });
    be->step_totals(fl + 3, nparts, fl, fl + 1, *st);
    StepControlArgs a;
    a.totals = fl + 1;
    a.state = state;
    a.hyper = hyper;
    a.scalars = scal;
    a.groups = 1;
    a.max_grad_norm = 0.1f;
    be->step_control(a, *st);
    UpdateArgs u;
    u.rule = OptimizerKind::adamw;
    u.scalars_ptr = scal;
    u.skip_ptr = &state->skip;
    u.master = master.data();
    u.state1 = m.data();
    u.state2 = v.data();
    u.grad = grad.data();
    u.n = n;
    be->fused_update(u, *st);
    be->synchronize(*st);

    // The same decisions on the host, then the update with the scalars by value.
    StepState host_state{};
    host_state.loss_scale = 4.0f;
    host_state.step = overflow ? 1 : 0;  // the clean pass ran first and applied step 1
    StepScalars host_scal{};
    float host_totals[2];
    float parts[nparts];
    for (int k = 0; k < nparts; ++k) parts[k] = 0.25f * static_cast<float>(k + 1);
    const float flag = overflow ? 1.0f : 0.0f;
    rules::step_totals(parts, nparts, &flag, host_totals);
    StepControlArgs h = a;
    h.totals = host_totals;
    h.state = &host_state;
    h.hyper = hyper;
    h.scalars = &host_scal;
    rules::step_control(h);
    EXPECT_EQ(fl[1], host_totals[0]);
    EXPECT_EQ(state->step, host_state.step);
    EXPECT_EQ(state->grad_norm, host_state.grad_norm);
    EXPECT_EQ(state->applied, overflow ? 0 : 1);
    std::vector<float> want_master = master0, want_m = m0, want_v = v0;
    if (!overflow) {
      expect_same_scalars(*scal, host_scal, "step scalars");
      EXPECT_LT(host_scal.grad_scale, 0.25f * 0.999f);  // clipped: norm sqrt(3.75)/4 > 0.1
      UpdateArgs byval = u;
      byval.scalars = host_scal;
      byval.scalars_ptr = nullptr;
      byval.skip_ptr = nullptr;
      byval.master = want_master.data();
      byval.state1 = want_m.data();
      byval.state2 = want_v.data();
      be->fused_update(byval, *st);
      be->synchronize(*st);
      EXPECT_NE(std::memcmp(want_master.data(), master0.data(), n * 4), 0);  // it did update
    }
    EXPECT_EQ(std::memcmp(master.data(), want_master.data(), n * 4), 0);
    EXPECT_EQ(std::memcmp(m.data(), want_m.data(), n * 4), 0);
    EXPECT_EQ(std::memcmp(v.data(), want_v.data(), n * 4), 0);
  }
}

TEST(StepControlOnCpu, BadArgumentsNameTheField) {
  auto be = make_cpu_backend();
  auto st = be->create_stream("s");
  StepState state;
  float totals[2] = {0, 0};
  Hyperparams h;
  StepScalars s;
  const auto expect_bad = [&](const StepControlArgs& a, const std::string& needle) {
    try {
      be->step_control(a, *st);
      ADD_FAILURE() << "accepted; expected an error naming " << needle;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  StepControlArgs good;
  good.totals = totals;
  good.state = &state;
  good.hyper = &h;
  good.scalars = &s;
  good.groups = 1;
  StepControlArgs a = good;
  a.totals = nullptr;
  expect_bad(a, "totals");
  a = good;
  a.state = nullptr;
  expect_bad(a, "state");
  a = good;
  a.hyper = nullptr;
  expect_bad(a, "hyper");
  a = good;
  a.scalars = nullptr;
  expect_bad(a, "scalars");
  a = good;
  a.groups = -1;
  expect_bad(a, "groups");
  a = good;
  a.accumulation_steps = 0;
  expect_bad(a, "accumulation_steps");
  a = good;
  a.max_grad_norm = std::numeric_limits<float>::quiet_NaN();
  expect_bad(a, "max_grad_norm");
  a = good;
  a.rule = static_cast<OptimizerKind>(9);
  expect_bad(a, "OptimizerKind");
  try {
    be->step_totals(nullptr, 3, totals, totals, *st);
    ADD_FAILURE() << "null partials accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("partials"), std::string::npos) << e.message();
  }
  // Nothing bad was enqueued: the stream is clean and a good call works.
  be->step_control(good, *st);
  be->synchronize(*st);
  EXPECT_EQ(state.step, 1);
}

}  // namespace
}  // namespace shardopt
