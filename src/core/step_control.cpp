#include <cmath>
#include <cstddef>
#include <cstdint>
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
  // Each pointer is dereferenced as its type on the device, which faults when it is not aligned.
  const auto misaligned = [](const void* p, std::size_t align) {
    return reinterpret_cast<std::uintptr_t>(p) % align != 0;
  };
  if (misaligned(a.totals, alignof(float))) bad("'totals' is not aligned for float");
  if (misaligned(a.state, alignof(StepState))) bad("'state' is not aligned for StepState");
  if (a.groups > 0 && misaligned(a.hyper, alignof(Hyperparams))) bad("'hyper' is not aligned for Hyperparams");
  if (a.groups > 0 && misaligned(a.scalars, alignof(StepScalars))) bad("'scalars' is not aligned for StepScalars");
  if (a.accumulation_steps < 1)
    bad("accumulation_steps = " + std::to_string(a.accumulation_steps) + " (must be >= 1)");
  if (!(std::isfinite(a.max_grad_norm) && a.max_grad_norm >= 0.0f))
    bad("max_grad_norm = " + std::to_string(a.max_grad_norm) + " (must be finite and >= 0)");
  const LossScaling& ls = a.loss_scaling;
  if (ls.mode != LossScaleMode::none && ls.mode != LossScaleMode::fixed && ls.mode != LossScaleMode::dynamic)
    bad("unknown LossScaleMode " + std::to_string(static_cast<int>(ls.mode)));
}

}  // namespace shardopt::detail
