#pragma once
// Config: everything that decides what the engine does, validated in one place.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "shardopt/dtype.hpp"
#include "shardopt/rules/list.hpp"
#include "shardopt/state_precision.hpp"

namespace shardopt {

// The optimizer rules, generated from shardopt/rules/list.hpp (one header per rule there says
// which Hyperparams fields it reads and how it validates them).
#define SHARDOPT_RULE_ENUMERATOR(id, Rule) id,
enum class OptimizerKind : std::uint8_t { SHARDOPT_RULES(SHARDOPT_RULE_ENUMERATOR) };
#undef SHARDOPT_RULE_ENUMERATOR
std::string_view name_of(OptimizerKind k) noexcept;
bool parse_optimizer(std::string_view text, OptimizerKind& out) noexcept;
// Every rule's name, in list order, separated by `sep` (for help texts and error messages).
std::string optimizer_names(std::string_view sep = "|");

// Number of fp32 state tensors (moments) a rule keeps per parameter; 0 for an unknown kind.
constexpr int state_count(OptimizerKind k) noexcept {
#define SHARDOPT_RULE_STATES(id, Rule) \
  if (k == OptimizerKind::id) return Rule::states;
  SHARDOPT_RULES(SHARDOPT_RULE_STATES)
#undef SHARDOPT_RULE_STATES
  return 0;
}

// Hyperparams (one parameter group's hyperparameters) is defined in shardopt/rules/rule.hpp, the
// learning-rate schedules (LrSchedule, name_of, parse_lr_schedule) in shardopt/schedule.hpp.

enum class LossScaleMode : std::uint8_t { none, fixed, dynamic };
std::string_view name_of(LossScaleMode m) noexcept;

// Loss scaling for fp16 training. With `dynamic`, a step whose gradients hold a non-finite value
// on any rank is skipped on every rank and the scale is multiplied by `backoff` (after `hysteresis`
// consecutive overflows, not below `min_scale`); after `growth_interval` clean steps in a row the
// scale is multiplied by `growth_factor`.
struct LossScaling {
  LossScaleMode mode = LossScaleMode::none;
  float initial_scale = 65536.0f;
  float growth_factor = 2.0f;
  int growth_interval = 2000;
  float backoff = 0.5f;
  int hysteresis = 1;
  float min_scale = 1.0f;
};

enum class OffloadKind : std::uint8_t { none, host, nvme };
std::string_view name_of(OffloadKind k) noexcept;

// Config::prefetch_units at most this (each prefetched unit is a slot of the largest unit's size).
inline constexpr int kMaxPrefetchUnits = 64;
// Config::gradient_buckets at most this (0 asks for one per unit, however many).
inline constexpr int kMaxGradientBuckets = 64;

struct Config {
  int stage = 0;  // 0: DDP baseline, 1: shard optimizer state, 2: + gradients, 3: + parameters
  DType compute_dtype = DType::fp32;  // parameters and gradients as the trainer sees them
  DType master_dtype = DType::fp32;   // master weights and moments; fp32 only for now
  DType reduce_dtype = DType::fp32;   // dtype gradients travel in; 16-bit sums accumulate in fp32
  std::size_t bucket_bytes = std::size_t(25) << 20;  // min size of a unit / gradient bucket (compute dtype bytes)
  std::size_t alignment = 64;  // elements; every rank's slice and every tensor start is a multiple of it

  OptimizerKind optimizer = OptimizerKind::adamw;
  Hyperparams hyper;  // group 0; further groups are set on the engine

  LossScaling loss_scaling;
  float max_grad_norm = 0.0f;  // global-norm clipping; 0 disables
  int accumulation_steps = 1;  // micro-steps per step()

  OffloadKind offload_optimizer = OffloadKind::none;
  std::string nvme_dir;         // for offload_optimizer == nvme
  bool offload_params = false;  // stage 3 only
  // Pinned host memory that cannot be had (the plan's pinned bytes above the locked-memory limit,
  // RLIMIT_MEMLOCK / `ulimit -l`, where the backend's pinning counts against it; or the pin call
  // failing, e.g. under a container's cap): false, initialize() fails with an Error naming the
  // buffer, its size and the limit; true, the engine uses pageable host memory for the pinned
  // buffers instead (memory_report() shows them at Place::host). Pageable memory costs transfer
  // throughput: host<->device copies go through the driver's staging buffer, at a fraction of the
  // pinned bandwidth, and stop overlapping with compute.
  bool pinned_fallback = false;

  int prefetch_units = 2;                 // stage 3: units gathered ahead (live units = 1 + this), 0..64
  std::size_t persistence_threshold = 0;  // stage 3: units with fewer elements stay gathered

  // Stages 2-3: gradient buckets, each the size of the largest unit (compute dtype). A unit takes
  // one when its first block asks for gradients() and gives it back when its gradients have been
  // reduce-scattered. When every bucket is taken and another unit opens, the least recently
  // opened unit whose gradient views are all reported ready is reduce-scattered early (its part
  // so far) and its bucket reused; its later blocks are reduced on their own and added in, with
  // the same bits (see engine.hpp, "Backward order"). A trainer that holds the gradient views of
  // more units than this at once (every gradients() before any grads_ready) needs one bucket per
  // unit: 0 means exactly that (the whole gradient in buckets: stage 2 then saves no gradient
  // memory), 1..kMaxGradientBuckets that many.
  int gradient_buckets = 2;

  // How the optimizer states (moments) are stored (shardopt/state_precision.hpp); master weights
  // stay fp32. bf16: 2 bytes per state element, round to nearest even. int8: 1 byte per element
  // plus one fp32 scale per `quant_block` elements of a tensor (a power of two in
  // [kMinQuantBlock, kMaxQuantBlock]; read only for int8). With int8 the layout aligns every
  // tensor start and every rank's slice to quant_block (the effective alignment is the least common
  // multiple of `alignment` and `quant_block`), so no block straddles a shard boundary and the
  // state's bytes do not depend on world size or stage. The stochastic rounding's seed is the step
  // counter, read by the update from backend memory (a captured CUDA graph replays correctly).
  // With optimizer offload the pinned host copy (host) or the state file (nvme) holds the
  // compressed form (int8 with fp32 master: 4 + 2*(1 + 4/B) bytes per element instead of 12).
  StatePrecision state_precision = StatePrecision::fp32;
  std::size_t quant_block = kDefaultQuantBlock;

  // Throws Error(invalid_argument / unsupported) naming the first offending field.
  void validate() const;
};

}  // namespace shardopt
