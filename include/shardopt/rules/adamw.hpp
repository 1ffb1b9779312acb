#pragma once
// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, p -= lr*wd*p before the step.
#include "shardopt/rules/rule.hpp"

namespace shardopt::rules {

struct AdamW {
  static constexpr const char* name = "adamw";
  static constexpr int states = 2;
  static constexpr const char* state_names[states] = {"exp_avg", "exp_avg_sq"};
  static constexpr double default_lr = 1e-3;
  static constexpr const char* hyper_doc = "lr, beta1, beta2, eps, weight_decay (decoupled: p -= lr*wd*p)";

  static void validate(const Hyperparams& h, const HyperCheck& c) {
    c.beta(h.beta1, "hyper.beta1");
    c.beta(h.beta2, "hyper.beta2");
    // eps keeps the denominator away from 0 where the second moment is 0 (padding, dead weights).
    c.positive(h.eps, "hyper.eps");
  }
  SHARDOPT_HD static void scalars(const Hyperparams& h, std::int64_t t, StepScalars& s) { adam_moment_scalars(h, t, s); }
  SHARDOPT_HD static void update(float& p, float g, float& m, float& v, const StepScalars& s) {
    g = g * s.grad_scale;
    m = s.beta1 * m + s.one_minus_beta1 * g;
    v = s.beta2 * v + s.one_minus_beta2 * (g * g);
    const float denom = sqrt_f(v) * s.bias_correction2_sqrt + s.eps;
    p = p - s.lr * s.weight_decay * p;
    p = p - s.lr * (m * s.bias_correction1) / denom;
  }
};

}  // namespace shardopt::rules
