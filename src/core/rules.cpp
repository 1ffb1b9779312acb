#include "shardopt/rules.hpp"

#include <cmath>
#include <sstream>
#include <string>

#include "shardopt/error.hpp"

namespace shardopt {

namespace {

std::string describe_step(OptimizerKind kind, std::int64_t step) {
  std::ostringstream os;
  os << "make_step_scalars(" << name_of(kind) << "): step = " << step
     << " (steps count from 1, the first applied update)";
  return os.str();
}

std::string describe_lr(OptimizerKind kind, float lr) {
  std::ostringstream os;
  os.precision(9);
  os << "make_step_scalars(" << name_of(kind) << "): Hyperparams.lr = " << lr
     << " (must be finite and >= 0)";
  return os.str();
}

// Scalars are derived in double and rounded once to float, so each one carries at most half an
// ulp of error however large `step` grows (beta^t in float would lose digits as t grows).
float to_float(double x) { return static_cast<float>(x); }

}  // namespace

StepScalars make_step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                              float grad_scale) {
  if (step < 1) throw Error(ErrorCode::invalid_argument, describe_step(kind, step));
  // NaN fails the comparison, so it is rejected together with negative values.
  if (!(std::isfinite(h.lr) && h.lr >= 0.0f)) throw Error(ErrorCode::invalid_argument, describe_lr(kind, h.lr));

  StepScalars s;
  s.lr = h.lr;
  s.weight_decay = h.weight_decay;
  s.grad_scale = grad_scale;
  const double t = static_cast<double>(step);

  switch (kind) {
    case OptimizerKind::adamw:
    case OptimizerKind::adam: {
      s.beta1 = h.beta1;
      s.beta2 = h.beta2;
      s.eps = h.eps;
      s.one_minus_beta1 = to_float(1.0 - static_cast<double>(h.beta1));
      s.one_minus_beta2 = to_float(1.0 - static_cast<double>(h.beta2));
      s.bias_correction1 = to_float(1.0 / (1.0 - std::pow(static_cast<double>(h.beta1), t)));
      s.bias_correction2_sqrt = to_float(1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(h.beta2), t)));
      break;
    }
    case OptimizerKind::sgd: {
      s.momentum = h.momentum;
      s.one_minus_dampening = to_float(1.0 - static_cast<double>(h.dampening));
      s.nesterov = h.nesterov;
      s.first_step = (step == 1);
      break;
    }
    case OptimizerKind::lion: {
      // Lion interpolates with beta1 for the update direction and with beta2 for the momentum it
      // keeps; it has no bias correction, so those stay 1.
      s.beta1 = h.beta1;
      s.beta2 = h.beta2;
      s.one_minus_beta1 = to_float(1.0 - static_cast<double>(h.beta1));
      s.one_minus_beta2 = to_float(1.0 - static_cast<double>(h.beta2));
      break;
    }
    default:
      throw Error(ErrorCode::invalid_argument,
                  "make_step_scalars: unknown OptimizerKind " + std::to_string(static_cast<int>(kind)));
  }
  return s;
}

}  // namespace shardopt
