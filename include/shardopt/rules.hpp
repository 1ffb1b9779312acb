#pragma once
// Optimizer rules: one element-wise update per rule, the same function on CPU and GPU.
//
// StepScalars holds everything a rule needs for one step, computed once per step (in double, then
// rounded to float) from the group's Hyperparams and the step number: on the host, or on the device
// by the step-control kernel (step_control.hpp); both run the same function and get the same bits. `grad_scale` folds loss
// unscaling and clipping into one multiply of the incoming gradient. The update functions take
// fp32 master weight and moments by reference and update them in place; they contain no branches
// on data, so a loop over them vectorizes.
#include <cmath>
#include <cstdint>

#include "shardopt/config.hpp"
#include "shardopt/dtype.hpp"

namespace shardopt {

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
};

// `step` counts from 1 (the first applied update). Throws Error(invalid_argument) for step < 1,
// an lr that is negative or not finite, or an unknown kind; then computes step_scalars() below.
StepScalars make_step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                              float grad_scale);

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

}  // namespace rules

// The scalars of step `step` (>= 1) without argument checks: what make_step_scalars returns, and
// what the step-control kernel computes on the device. An unknown kind leaves the rule fields at
// their defaults.
SHARDOPT_HD inline StepScalars step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                                            float grad_scale) {
  StepScalars s;
  s.lr = h.lr;
  s.weight_decay = h.weight_decay;
  s.grad_scale = grad_scale;
  switch (kind) {
    case OptimizerKind::adamw:
    case OptimizerKind::adam:
      s.beta1 = h.beta1;
      s.beta2 = h.beta2;
      s.eps = h.eps;
      s.one_minus_beta1 = rules::one_minus(h.beta1);
      s.one_minus_beta2 = rules::one_minus(h.beta2);
      s.bias_correction1 = static_cast<float>(1.0 / (1.0 - rules::pow_int(static_cast<double>(h.beta1), step)));
      s.bias_correction2_sqrt =
          static_cast<float>(1.0 / rules::sqrt_d(1.0 - rules::pow_int(static_cast<double>(h.beta2), step)));
      break;
    case OptimizerKind::sgd:
      s.momentum = h.momentum;
      s.one_minus_dampening = rules::one_minus(h.dampening);
      s.nesterov = h.nesterov;
      s.first_step = (step == 1);
      break;
    case OptimizerKind::lion:
      // Lion interpolates with beta1 for the update direction and with beta2 for the momentum it
      // keeps; it has no bias correction, so those stay 1.
      s.beta1 = h.beta1;
      s.beta2 = h.beta2;
      s.one_minus_beta1 = rules::one_minus(h.beta1);
      s.one_minus_beta2 = rules::one_minus(h.beta2);
      break;
  }
  return s;
}

namespace rules {

// AdamW: decoupled weight decay.
SHARDOPT_HD inline void adamw(float& p, float g, float& m, float& v, const StepScalars& s) {
  g = g * s.grad_scale;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * (g * g);
  const float denom = sqrt_f(v) * s.bias_correction2_sqrt + s.eps;
  p = p - s.lr * s.weight_decay * p;
  p = p - s.lr * (m * s.bias_correction1) / denom;
}

// Adam with L2 regularisation folded into the gradient.
SHARDOPT_HD inline void adam(float& p, float g, float& m, float& v, const StepScalars& s) {
  g = g * s.grad_scale + s.weight_decay * p;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * (g * g);
  const float denom = sqrt_f(v) * s.bias_correction2_sqrt + s.eps;
  p = p - s.lr * (m * s.bias_correction1) / denom;
}

// SGD with momentum (PyTorch semantics: buf = g on the first step, then
// buf = momentum*buf + (1-dampening)*g; nesterov uses g + momentum*buf). `first_step` and
// `nesterov` are uniform over a call, so these branches do not hinder vectorization.
SHARDOPT_HD inline void sgd(float& p, float g, float& buf, const StepScalars& s) {
  g = g * s.grad_scale + s.weight_decay * p;
  buf = s.first_step ? g : s.momentum * buf + s.one_minus_dampening * g;
  const float d = s.nesterov ? g + s.momentum * buf : buf;
  p = p - s.lr * d;
}

SHARDOPT_HD inline float sign_f(float x) { return (x > 0.0f) ? 1.0f : ((x < 0.0f) ? -1.0f : 0.0f); }

// Lion: sign of an interpolation of momentum and gradient; decoupled weight decay.
SHARDOPT_HD inline void lion(float& p, float g, float& m, const StepScalars& s) {
  g = g * s.grad_scale;
  const float c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p - s.lr * s.weight_decay * p;
  p = p - s.lr * sign_f(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

}  // namespace rules
}  // namespace shardopt
