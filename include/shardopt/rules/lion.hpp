#pragma once
// Lion (Chen et al.): the sign of an interpolation of momentum and gradient; decoupled weight decay.
#include "shardopt/rules/rule.hpp"

namespace shardopt::rules {

struct Lion {
  static constexpr const char* name = "lion";
  static constexpr int states = 1;
  static constexpr const char* state_names[states] = {"exp_avg"};
  static constexpr double default_lr = 1e-4;
  static constexpr const char* hyper_doc = "lr, beta1, beta2, weight_decay (decoupled)";

  static void validate(const Hyperparams& h, const HyperCheck& c) {
    c.beta(h.beta1, "hyper.beta1");
    c.beta(h.beta2, "hyper.beta2");
  }
  // Lion interpolates with beta1 for the update direction and with beta2 for the momentum it
  // keeps; it has no bias correction, so those stay 1.
  SHARDOPT_HD static void scalars(const Hyperparams& h, std::int64_t, StepScalars& s) {
    s.beta1 = h.beta1;
    s.beta2 = h.beta2;
    s.one_minus_beta1 = one_minus(h.beta1);
    s.one_minus_beta2 = one_minus(h.beta2);
  }
  SHARDOPT_HD static void update(float& p, float g, float& m, float& /*unused*/, const StepScalars& s) {
    g = g * s.grad_scale;
    const float c = s.beta1 * m + s.one_minus_beta1 * g;
    p = p - s.lr * s.weight_decay * p;
    p = p - s.lr * sign_f(c);
    m = s.beta2 * m + s.one_minus_beta2 * g;
  }
};

}  // namespace shardopt::rules
