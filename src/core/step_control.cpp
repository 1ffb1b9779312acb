#include <cmath>
#include <string>

#include "core/step_control_check.hpp"
#include "shardopt/error.hpp"

namespace shardopt::detail {

namespace {
[[noreturn]] void bad(const std::string& what) {
  throw Error(ErrorCode::invalid_argument, "step_control: " + what);
}
}  // namespace

void check_step_control(const StepControlArgs& a) {
  if (state_count(a.rule) == 0) bad("unknown OptimizerKind " + std::to_string(static_cast<int>(a.rule)));
  if (a.totals == nullptr) bad("'totals' is null");
  if (a.state == nullptr) bad("'state' is null");
  if (a.groups < 0) bad("groups = " + std::to_string(a.groups) + " (must be >= 0)");
  if (a.groups > 0 && a.hyper == nullptr) bad("'hyper' is null but groups = " + std::to_string(a.groups));
  if (a.groups > 0 && a.scalars == nullptr) bad("'scalars' is null but groups = " + std::to_string(a.groups));
  if (a.accumulation_steps < 1)
    bad("accumulation_steps = " + std::to_string(a.accumulation_steps) + " (must be >= 1)");
  if (!(std::isfinite(a.max_grad_norm) && a.max_grad_norm >= 0.0f))
    bad("max_grad_norm = " + std::to_string(a.max_grad_norm) + " (must be finite and >= 0)");
  const LossScaling& ls = a.loss_scaling;
  if (ls.mode != LossScaleMode::none && ls.mode != LossScaleMode::fixed && ls.mode != LossScaleMode::dynamic)
    bad("unknown LossScaleMode " + std::to_string(static_cast<int>(ls.mode)));
}

}  // namespace shardopt::detail
