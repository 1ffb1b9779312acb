#pragma once
// Optimizer rules: one element-wise update per rule, the same function on CPU and GPU.
//
// Each rule is one header in shardopt/rules/ (what a rule defines: shardopt/rules/rule.hpp) and
// one line of shardopt/rules/list.hpp; this header turns that list into what the library
// dispatches on. StepScalars (rules/rule.hpp) holds everything a rule needs for one step, computed
// once per step (in double, then rounded to float) from the group's Hyperparams and the step
// number: on the host, or on the device by the step-control kernel (step_control.hpp); both run
// the same function and get the same bits. The update functions take fp32 master weight and
// moments by reference and update them in place; they contain no branches on data, so a loop over
// them vectorizes.
#include <cstdint>
#include <type_traits>
#include <utility>

#include "shardopt/config.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/rules/list.hpp"

namespace shardopt {

// The rule type of each OptimizerKind: rule_t<OptimizerKind::adamw> is rules::AdamW.
template <OptimizerKind K>
struct RuleOf;
#define SHARDOPT_RULE_OF(id, Rule)          \
  template <>                               \
  struct RuleOf<OptimizerKind::id> {        \
    using type = Rule;                      \
  };
SHARDOPT_RULES(SHARDOPT_RULE_OF)
#undef SHARDOPT_RULE_OF
template <OptimizerKind K>
using rule_t = typename RuleOf<K>::type;

template <OptimizerKind K>
using kind_constant = std::integral_constant<OptimizerKind, K>;

// Calls f(kind_constant<K>{}) for the K equal to `kind` and returns true, or returns false for an
// unknown kind. The host's way to reach a rule's compile-time definition from a run-time kind.
template <class F>
bool visit_rule(OptimizerKind kind, F&& f) {
#define SHARDOPT_RULE_VISIT(id, Rule)          \
  if (kind == OptimizerKind::id) {             \
    f(kind_constant<OptimizerKind::id>{});     \
    return true;                               \
  }
  SHARDOPT_RULES(SHARDOPT_RULE_VISIT)
#undef SHARDOPT_RULE_VISIT
  return false;
}

// Rules whose element function branches on a per-call constant declare `variants` (see
// rules/rule.hpp); the rest have one.
template <class Rule>
constexpr int variant_count() {
  if constexpr (requires { Rule::variants; }) return Rule::variants;
  else return 1;
}

// `step` counts from 1 (the first applied update). Throws Error(invalid_argument) for step < 1,
// an lr that is negative or not finite, or an unknown kind; then computes step_scalars() below
// (whose lr is the schedule's value at `step`, rules::scheduled_lr).
StepScalars make_step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                              float grad_scale);

// The scalars of step `step` (>= 1) without argument checks: what make_step_scalars returns, and
// what the step-control kernel computes on the device. An unknown kind leaves the rule fields at
// their defaults.
SHARDOPT_HD inline StepScalars step_scalars(OptimizerKind kind, const Hyperparams& h, std::int64_t step,
                                            float grad_scale) {
  StepScalars s;
  s.lr = rules::scheduled_lr(h, step);
  s.weight_decay = h.weight_decay;
  s.grad_scale = grad_scale;
  switch (kind) {
#define SHARDOPT_RULE_SCALARS(id, Rule) \
  case OptimizerKind::id: Rule::scalars(h, step, s); break;
    SHARDOPT_RULES(SHARDOPT_RULE_SCALARS)
#undef SHARDOPT_RULE_SCALARS
  }
  return s;
}

namespace rules {

// The element functions under the names they had before rules became plug-ins.
SHARDOPT_HD inline void adamw(float& p, float g, float& m, float& v, const StepScalars& s) { AdamW::update(p, g, m, v, s); }
SHARDOPT_HD inline void adam(float& p, float g, float& m, float& v, const StepScalars& s) { Adam::update(p, g, m, v, s); }
SHARDOPT_HD inline void sgd(float& p, float g, float& buf, const StepScalars& s) {
  float unused = 0.0f;
  Sgd::update(p, g, buf, unused, s);
}
SHARDOPT_HD inline void lion(float& p, float g, float& m, const StepScalars& s) {
  float unused = 0.0f;
  Lion::update(p, g, m, unused, s);
}

}  // namespace rules
}  // namespace shardopt
