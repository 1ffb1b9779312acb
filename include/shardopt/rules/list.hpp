#pragma once
// The optimizer rules shardopt knows: the one list everything that enumerates rules is generated
// from (the OptimizerKind enum, parsing and names, state counts, dispatch to the CPU kernels of
// every instruction set and to the CUDA kernels, checkpoint field names, CLI choices).
//
// Adding an element-wise rule with at most two fp32 states: write its header next to these (see
// rule.hpp for what it defines), include it here and add one X(...) line, and add its test against
// a float64 reference under tests/rules/. Entries are never reordered or removed: the enum value
// is the position in this list.
#include "shardopt/rules/adam.hpp"
#include "shardopt/rules/adamw.hpp"
#include "shardopt/rules/lion.hpp"
#include "shardopt/rules/radam.hpp"
#include "shardopt/rules/sgd.hpp"

// X(enumerator, rule type); the enumerator is the rule's `name`.
#define SHARDOPT_RULES(X)   \
  X(adamw, ::shardopt::rules::AdamW) \
  X(adam, ::shardopt::rules::Adam)   \
  X(sgd, ::shardopt::rules::Sgd)     \
  X(lion, ::shardopt::rules::Lion)   \
  X(radam, ::shardopt::rules::RAdam)
