#pragma once
// SGD with momentum, PyTorch semantics: buf = g on the first step, then
// buf = momentum*buf + (1-dampening)*g; Nesterov steps along g + momentum*buf; L2 weight decay.
#include "shardopt/rules/rule.hpp"

namespace shardopt::rules {

struct Sgd {
  static constexpr const char* name = "sgd";
  static constexpr int states = 1;
  static constexpr const char* state_names[states] = {"momentum_buffer"};
  static constexpr double default_lr = 0.05;
  static constexpr const char* hyper_doc = "lr, momentum, dampening, nesterov, weight_decay (L2: g += wd*p)";

  static void validate(const Hyperparams& h, const HyperCheck& c) {
    c.not_negative(h.momentum, "hyper.momentum");
    c.require(h.dampening >= 0.0f && h.dampening <= 1.0f, "hyper.dampening", h.dampening, "must be in [0, 1]");
    // Nesterov momentum is defined only with a momentum buffer and without dampening.
    if (h.nesterov) {
      c.require(h.momentum > 0.0f, "hyper.momentum", h.momentum, "must be positive with hyper.nesterov");
      c.require(h.dampening == 0.0f, "hyper.dampening", h.dampening, "must be 0 with hyper.nesterov");
    }
  }
  SHARDOPT_HD static void scalars(const Hyperparams& h, std::int64_t t, StepScalars& s) {
    s.momentum = h.momentum;
    s.one_minus_dampening = one_minus(h.dampening);
    s.nesterov = h.nesterov;
    s.first_step = (t == 1);
  }
  // `first_step` and `nesterov` are the same for a whole call: the CPU kernels compile one loop per
  // combination with both constant (variant bit 0: first step, bit 1: nesterov).
  static constexpr int variants = 4;
  static int variant(const StepScalars& s) { return (s.first_step ? 1 : 0) | (s.nesterov ? 2 : 0); }
  static constexpr void pin(StepScalars& s, int v) {
    s.first_step = (v & 1) != 0;
    s.nesterov = (v & 2) != 0;
  }
  SHARDOPT_HD static void update(float& p, float g, float& buf, float& /*unused*/, const StepScalars& s) {
    g = g * s.grad_scale + s.weight_decay * p;
    buf = s.first_step ? g : s.momentum * buf + s.one_minus_dampening * g;
    const float d = s.nesterov ? g + s.momentum * buf : buf;
    p = p - s.lr * d;
  }
};

}  // namespace shardopt::rules
