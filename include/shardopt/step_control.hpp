#pragma once
// Step control: the scalar decisions of one optimizer step, made in stream order by the backend
// (on a GPU by one device thread), so that Engine::step_async() never waits on the host.
//
// By the time the update runs, the engine has in backend memory the squared norm of the reduced,
// still loss-scaled gradient and a non-finite flag, both summed over ranks (the "totals"). From
// them and the StepState, step_control() decides whether the step applies, the clip coefficient,
// every group's StepScalars (with the learning rate its schedule gives for the step) and the next
// loss scale. Both backends run these functions: the CPU
// one as a stream task (the reference), the CUDA one as a one-thread kernel. They use only
// correctly rounded operations (+ - * / and sqrt in double, no library pow), so the two give the
// same bits.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "shardopt/config.hpp"
#include "shardopt/rules.hpp"

namespace shardopt {

// The optimizer's step counter, the loss-scaler state, and what the last step decided.
struct StepState {
  std::int64_t step = 0;          // updates applied so far
  double grad_norm = 0.0;         // last step: global L2 norm of the mean gradient (inf: overflow)
  float loss_scale = 1.0f;        // the scale to multiply the next loss by
  float clip_coefficient = 1.0f;  // last step: factor applied to the gradient
  std::int32_t good_steps = 0;    // clean steps in a row since the scale last changed
  std::int32_t overflow_run = 0;  // overflows in a row (see LossScaling::hysteresis)
  float skip = 0.0f;              // 1 if the last step was skipped: fused_update's skip_ptr
  std::int32_t applied = 0;       // 1 if the last step applied its update
  float lr = 0.0f;                // the learning rate group 0 applied at the last applied step
};

struct StepControlArgs {
  OptimizerKind rule = OptimizerKind::adamw;
  // [0]: sum over ranks of the squared L2 norm of the reduced gradient (still multiplied by the
  // loss scale and summed over micro-steps); [1]: nonzero if any rank found a non-finite value.
  const float* totals = nullptr;
  StepState* state = nullptr;          // read and updated in place
  const Hyperparams* hyper = nullptr;  // one per parameter group
  StepScalars* scalars = nullptr;      // out: one per group, written only when the step applies
  int groups = 0;
  int accumulation_steps = 1;
  float max_grad_norm = 0.0f;  // 0: no clipping
  LossScaling loss_scaling;
};

namespace rules {

// totals = {the partial sums of squares added in double in index order and rounded to float,
// the local non-finite flag}: this rank's share of the totals, before they are summed over ranks.
SHARDOPT_HD inline void step_totals(const float* partials, std::size_t count, const float* flag, float* totals) {
  double sum = 0.0;
  for (std::size_t i = 0; i < count; ++i) sum += static_cast<double>(partials[i]);
  totals[0] = static_cast<float>(sum);
  totals[1] = *flag;
}

SHARDOPT_HD inline bool finite_d(double x) { return x - x == 0.0; }  // false for inf and NaN

SHARDOPT_HD inline double infinity_d() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0x7ff0000000000000ll);
#else
  const std::uint64_t bits = 0x7ff0000000000000ull;
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// The dynamic loss scaler: back off after `hysteresis` overflows in a row, grow after
// `growth_interval` clean steps in a row. Other modes keep the scale.
SHARDOPT_HD inline void advance_loss_scale(const LossScaling& ls, bool overflow, StepState& st) {
  if (ls.mode != LossScaleMode::dynamic) return;
  if (overflow) {
    st.good_steps = 0;
    if (++st.overflow_run >= ls.hysteresis) {
      const float backed = st.loss_scale * ls.backoff;
      st.loss_scale = backed > ls.min_scale ? backed : ls.min_scale;
      st.overflow_run = 0;
    }
  } else {
    st.overflow_run = 0;
    if (++st.good_steps >= ls.growth_interval) {
      st.loss_scale *= ls.growth_factor;
      st.good_steps = 0;
    }
  }
}

// One step's decisions. The gradient the rule applies is g * grad_scale with
// grad_scale = clip / (loss_scale * accumulation_steps), formed in double and rounded once.
SHARDOPT_HD inline void step_control(const StepControlArgs& a) {
  StepState& st = *a.state;
  const double sumsq = static_cast<double>(a.totals[0]);
  const bool overflow = a.totals[1] != 0.0f || !finite_d(sumsq);
  const double inv = 1.0 / (static_cast<double>(st.loss_scale) * a.accumulation_steps);
  st.grad_norm = overflow ? infinity_d() : sqrt_d(sumsq) * inv;
  st.clip_coefficient = 1.0f;
  if (overflow) {
    st.skip = 1.0f;
    st.applied = 0;
    advance_loss_scale(a.loss_scaling, true, st);
    return;
  }
  double clip = 1.0;
  if (a.max_grad_norm > 0.0f && st.grad_norm > a.max_grad_norm) clip = a.max_grad_norm / (st.grad_norm + 1e-6);
  st.clip_coefficient = static_cast<float>(clip);
  st.step += 1;
  for (int g = 0; g < a.groups; ++g)
    a.scalars[g] = step_scalars(a.rule, a.hyper[g], st.step, static_cast<float>(inv * clip));
  if (a.groups > 0) st.lr = a.scalars[0].lr;
  st.skip = 0.0f;
  st.applied = 1;
  advance_loss_scale(a.loss_scaling, false, st);
}

}  // namespace rules
}  // namespace shardopt
