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

}  // namespace

StepScalars make_step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                              float grad_scale) {
  if (step < 1) throw Error(ErrorCode::invalid_argument, describe_step(kind, step));
  // NaN fails the comparison, so it is rejected together with negative values.
  if (!(std::isfinite(h.lr) && h.lr >= 0.0f)) throw Error(ErrorCode::invalid_argument, describe_lr(kind, h.lr));

  // Scalars are derived in double and rounded once to float, so each one carries at most about
  // half an ulp of error however large `step` grows (beta^t in float would lose digits).
  if (state_count(kind) > 0) return step_scalars(kind, h, step, grad_scale);
  throw Error(ErrorCode::invalid_argument,
              "make_step_scalars: unknown OptimizerKind " + std::to_string(static_cast<int>(kind)));
}

}  // namespace shardopt
