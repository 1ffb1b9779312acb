#pragma once
// What every optimizer rule is made of: the hyperparameters of a parameter group, the scalars of
// one step, the exact-arithmetic helpers rules compute them with, and the check a rule validates
// its hyperparameters through.
//
// A rule is one header in this folder (adamw.hpp is the model to copy) defining a struct with:
//   name              CLI/checkpoint name, e.g. "adamw" (must match its entry in list.hpp)
//   states            fp32 state tensors kept per parameter: 1 or 2
//   state_names       checkpoint field name of each state
//   default_lr        learning rate the CLI uses when none is given
//   hyper_doc         which Hyperparams fields the rule reads (for help texts and docs)
//   validate(h, c)    checks the fields it reads through HyperCheck (host only)
//   scalars(h, t, s)  fills the rule's fields of StepScalars for step t >= 1 (host and device;
//                     only correctly rounded double arithmetic, so both give the same bits)
//   update(p, g, s1, s2, s)  the element function (host and device), branch-free on data
// and optionally, when the element function branches on a step scalar that is the same for a whole
// call (SGD's first step), `variants`, `variant(s)` and `pin(s, v)`: the CPU kernels then compile
// one loop per variant with that scalar a constant, which the compiler can vectorize.
// list.hpp names every rule once; everything that enumerates rules is generated from it.
#include <cmath>
#include <cstdint>
#include <source_location>

#include "shardopt/dtype.hpp"
#include "shardopt/schedule.hpp"

namespace shardopt {

// Hyperparameters of one parameter group. A rule reads a subset (its `hyper_doc` says which) and
// validates only that subset, so a value left in a field it does not read never blocks a config.
// Every rule reads lr through the learning-rate schedule (shardopt/schedule.hpp): `lr` is the peak
// value the schedule scales, and the last four fields choose the schedule.
struct Hyperparams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float momentum = 0.9f;
  float dampening = 0.0f;
  bool nesterov = false;
  LrSchedule schedule = LrSchedule::constant;
  std::int64_t warmup_steps = 0;  // linear warm-up over steps 1..warmup_steps (0: none)
  std::int64_t total_steps = 0;   // cosine, linear: the step at which lr reaches min_lr
  float min_lr = 0.0f;            // cosine, linear, inverse_sqrt: the floor
};

// Everything a rule's element function needs for one step, computed once per step (in double,
// rounded once to float) from the group's Hyperparams and the step number, on the host or on the
// device by step control (step_control.hpp). `grad_scale` folds loss unscaling and clipping into
// one multiply of the incoming gradient. The named fields serve the rules that exist; a rule that
// needs other per-step values keeps them in `extra` and says in its header what each slot holds.
struct StepScalars {
  float lr = 0;
  float beta1 = 0, beta2 = 0, eps = 0;
  float weight_decay = 0;
  float one_minus_beta1 = 0, one_minus_beta2 = 0;
  float bias_correction1 = 1;       // 1 / (1 - beta1^t)
  float bias_correction2_sqrt = 1;  // 1 / sqrt(1 - beta2^t)
  float momentum = 0, one_minus_dampening = 1;
  bool nesterov = false;
  bool first_step = false;  // sgd: momentum buffer is initialised to the gradient on step 1
  float grad_scale = 1;     // gradient multiplier: 1/loss_scale * clip coefficient
  float extra[4] = {0, 0, 0, 0};  // rule-defined (see the rule's header)
};

// Validation of hyperparameter fields, with messages of the form
// "Config.hyper.<field> = <value>: <why>" and the caller's source location. Defined in config.cpp.
struct HyperCheck {
  // Throws Error(invalid_argument) unless `ok`.
  void require(bool ok, const char* field, float value, const char* why,
               std::source_location where = std::source_location::current()) const;
  void finite(float v, const char* field, std::source_location where = std::source_location::current()) const {
    require(std::isfinite(v), field, v, "must be finite", where);
  }
  // [0, 1); NaN fails both comparisons, so it is rejected too.
  void beta(float v, const char* field, std::source_location where = std::source_location::current()) const {
    require(v >= 0.0f && v < 1.0f, field, v, "must be in [0, 1)", where);
  }
  void positive(float v, const char* field, std::source_location where = std::source_location::current()) const {
    require(v > 0.0f && std::isfinite(v), field, v, "must be positive and finite", where);
  }
  void not_negative(float v, const char* field, std::source_location where = std::source_location::current()) const {
    require(v >= 0.0f && std::isfinite(v), field, v, "must be finite and not negative", where);
  }
};

namespace rules {

SHARDOPT_HD inline float sqrt_f(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

SHARDOPT_HD inline double sqrt_d(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// x^n for n >= 0 by repeated squaring: only correctly rounded multiplications, so host and device
// agree bit for bit (a library pow() may differ between them in the last place). The result is
// within n-1 double roundings (relative) of the exact power. In a bias correction 1/(1 - b^n) that
// is a relative error of at most about 2^-53/(1-b) (below 2^-29 for any float b < 1), which the
// final rounding to float hides.
SHARDOPT_HD inline double pow_int(double x, std::int64_t n) {
  double r = 1.0;
  while (n > 0) {
    if (n & 1) r *= x;
    x *= x;
    n >>= 1;
  }
  return r;
}

SHARDOPT_HD inline float one_minus(float b) { return static_cast<float>(1.0 - static_cast<double>(b)); }

// The learning rate of step t >= 1 under h's schedule (the formulas: shardopt/schedule.hpp), in
// double and rounded once to float.
SHARDOPT_HD inline float scheduled_lr(const Hyperparams& h, std::int64_t t) {
  const double base = h.lr, floor = h.min_lr;
  const std::int64_t w = h.warmup_steps;
  if (w > 0 && t <= w) return static_cast<float>(base * static_cast<double>(t) / static_cast<double>(w));
  switch (h.schedule) {
    case LrSchedule::constant: return h.lr;
    case LrSchedule::cosine:
    case LrSchedule::linear: {
      const std::int64_t T = h.total_steps;
      const double q = t >= T ? 1.0 : static_cast<double>(t - w) / static_cast<double>(T - w);
      const double f = h.schedule == LrSchedule::cosine ? 0.5 * (1.0 + cos_pi(q)) : 1.0 - q;
      return static_cast<float>(floor + (base - floor) * f);
    }
    case LrSchedule::inverse_sqrt: {
      const double v = base * sqrt_d(static_cast<double>(w > 1 ? w : 1) / static_cast<double>(t));
      return static_cast<float>(v > floor ? v : floor);
    }
  }
  return h.lr;
}

SHARDOPT_HD inline float sign_f(float x) { return (x > 0.0f) ? 1.0f : ((x < 0.0f) ? -1.0f : 0.0f); }

// The Adam family's moment scalars: betas, 1 - betas, and the bias corrections of step t.
SHARDOPT_HD inline void adam_moment_scalars(const Hyperparams& h, std::int64_t t, StepScalars& s) {
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.one_minus_beta1 = one_minus(h.beta1);
  s.one_minus_beta2 = one_minus(h.beta2);
  s.bias_correction1 = static_cast<float>(1.0 / (1.0 - pow_int(static_cast<double>(h.beta1), t)));
  s.bias_correction2_sqrt = static_cast<float>(1.0 / sqrt_d(1.0 - pow_int(static_cast<double>(h.beta2), t)));
}

}  // namespace rules
}  // namespace shardopt
