#pragma once
// Argument check of Backend::step_control, shared by every backend.
#include "shardopt/step_control.hpp"

namespace shardopt::detail {

// Throws Error(invalid_argument) naming the first bad field of `args`.
void check_step_control(const StepControlArgs& args);

}  // namespace shardopt::detail
