#pragma once
// RAdam (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", 2020): Adam whose
// adaptive step is switched on only once the variance of 1/sqrt(v) is tractable, and then scaled
// by the rectification term r_t; before that, the step is momentum SGD on the bias-corrected first
// moment. The threshold rho_t > 5 is PyTorch's (torch.optim.RAdam). Weight decay is decoupled, as
// in AdamW (PyTorch's decoupled_weight_decay=True). eps is added to sqrt(v_hat), as in Adam.
//
//   m = b1*m + (1-b1)*g            v = b2*v + (1-b2)*g^2          m_hat = m / (1 - b1^t)
//   rho_inf = 2/(1-b2) - 1         rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
//   p -= lr*wd*p
//   rho_t > 5:  r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))
//               p -= lr * r_t * m_hat / (sqrt(v / (1 - b2^t)) + eps)
//   otherwise:  p -= lr * m_hat
//
// Step scalars beyond Adam's: extra[0] = r_t (0 while not rectified), extra[1] = 1 when rectified.
#include "shardopt/rules/rule.hpp"

namespace shardopt::rules {

struct RAdam {
  static constexpr const char* name = "radam";
  static constexpr int states = 2;
  static constexpr const char* state_names[states] = {"exp_avg", "exp_avg_sq"};
  static constexpr double default_lr = 1e-3;
  static constexpr const char* hyper_doc = "lr, beta1, beta2, eps, weight_decay (decoupled: p -= lr*wd*p)";

  static void validate(const Hyperparams& h, const HyperCheck& c) {
    c.beta(h.beta1, "hyper.beta1");
    c.beta(h.beta2, "hyper.beta2");
    c.positive(h.eps, "hyper.eps");
  }
  SHARDOPT_HD static void scalars(const Hyperparams& h, std::int64_t t, StepScalars& s) {
    adam_moment_scalars(h, t, s);
    // Only + - * / and sqrt in double (see rule.hpp), so host and device agree bit for bit.
    const double b2 = h.beta2;
    const double b2t = pow_int(b2, t);
    const double rho_inf = 2.0 / (1.0 - b2) - 1.0;
    const double rho_t = rho_inf - 2.0 * static_cast<double>(t) * b2t / (1.0 - b2t);
    const bool rectified = rho_t > 5.0;  // then rho_inf > rho_t > 5: every factor below is positive
    s.extra[0] = rectified ? static_cast<float>(sqrt_d((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                                       ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)))
                           : 0.0f;
    s.extra[1] = rectified ? 1.0f : 0.0f;
  }
  SHARDOPT_HD static void update(float& p, float g, float& m, float& v, const StepScalars& s) {
    g = g * s.grad_scale;
    m = s.beta1 * m + s.one_minus_beta1 * g;
    v = s.beta2 * v + s.one_minus_beta2 * (g * g);
    const float m_hat = m * s.bias_correction1;
    const float denom = sqrt_f(v) * s.bias_correction2_sqrt + s.eps;
    const float adaptive = s.extra[0] * m_hat / denom;
    p = p - s.lr * s.weight_decay * p;
    // A select, not a branch: both sides are computed, so the loop still vectorizes.
    p = p - s.lr * (s.extra[1] != 0.0f ? adaptive : m_hat);
  }
};

}  // namespace shardopt::rules
