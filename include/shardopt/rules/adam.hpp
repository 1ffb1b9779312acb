#pragma once
// Adam (Kingma & Ba) with L2 regularisation folded into the gradient: g += wd*p.
#include "shardopt/rules/rule.hpp"

namespace shardopt::rules {

struct Adam {
  static constexpr const char* name = "adam";
  static constexpr int states = 2;
  static constexpr const char* state_names[states] = {"exp_avg", "exp_avg_sq"};
  static constexpr double default_lr = 1e-3;
  static constexpr const char* hyper_doc = "lr, beta1, beta2, eps, weight_decay (L2: g += wd*p)";

  static void validate(const Hyperparams& h, const HyperCheck& c) {
    c.beta(h.beta1, "hyper.beta1");
    c.beta(h.beta2, "hyper.beta2");
    c.positive(h.eps, "hyper.eps");
  }
  SHARDOPT_HD static void scalars(const Hyperparams& h, std::int64_t t, StepScalars& s) { adam_moment_scalars(h, t, s); }
  SHARDOPT_HD static void update(float& p, float g, float& m, float& v, const StepScalars& s) {
    g = g * s.grad_scale + s.weight_decay * p;
    m = s.beta1 * m + s.one_minus_beta1 * g;
    v = s.beta2 * v + s.one_minus_beta2 * (g * g);
    const float denom = sqrt_f(v) * s.bias_correction2_sqrt + s.eps;
    p = p - s.lr * (m * s.bias_correction1) / denom;
  }
};

}  // namespace shardopt::rules
