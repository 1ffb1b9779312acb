#include "shardopt/config.hpp"

#include <charconv>
#include <cmath>
#include <source_location>
#include <sstream>
#include <string>

#include "shardopt/error.hpp"

namespace shardopt {

std::string_view name_of(OptimizerKind k) noexcept {
#define SHARDOPT_RULE_NAME(id, Rule) \
  if (k == OptimizerKind::id) return Rule::name;
  SHARDOPT_RULES(SHARDOPT_RULE_NAME)
#undef SHARDOPT_RULE_NAME
  return "unknown";
}

bool parse_optimizer(std::string_view text, OptimizerKind& out) noexcept {
#define SHARDOPT_RULE_PARSE(id, Rule) \
  if (text == std::string_view(Rule::name)) {  \
    out = OptimizerKind::id;                   \
    return true;                               \
  }
  SHARDOPT_RULES(SHARDOPT_RULE_PARSE)
#undef SHARDOPT_RULE_PARSE
  return false;
}

std::string optimizer_names(std::string_view sep) {
  std::string out;
#define SHARDOPT_RULE_LIST_NAME(id, Rule) \
  out += (out.empty() ? std::string() : std::string(sep)) + Rule::name;
  SHARDOPT_RULES(SHARDOPT_RULE_LIST_NAME)
#undef SHARDOPT_RULE_LIST_NAME
  return out;
}

std::string_view name_of(LrSchedule s) noexcept {
  switch (s) {
    case LrSchedule::constant: return "constant";
    case LrSchedule::cosine: return "cosine";
    case LrSchedule::linear: return "linear";
    case LrSchedule::inverse_sqrt: return "inverse-sqrt";
  }
  return "unknown";
}

bool parse_lr_schedule(std::string_view text, LrSchedule& out) noexcept {
  for (LrSchedule s : {LrSchedule::constant, LrSchedule::cosine, LrSchedule::linear, LrSchedule::inverse_sqrt}) {
    if (text == name_of(s)) {
      out = s;
      return true;
    }
  }
  if (text == "inverse_sqrt") {
    out = LrSchedule::inverse_sqrt;
    return true;
  }
  return false;
}

std::string_view name_of(LossScaleMode m) noexcept {
  switch (m) {
    case LossScaleMode::none: return "none";
    case LossScaleMode::fixed: return "fixed";
    case LossScaleMode::dynamic: return "dynamic";
  }
  return "unknown";
}

std::string_view name_of(OffloadKind k) noexcept {
  switch (k) {
    case OffloadKind::none: return "none";
    case OffloadKind::host: return "host";
    case OffloadKind::nvme: return "nvme";
  }
  return "unknown";
}

namespace {

// Every message has the form "Config.<field> = <value>: <why>" so a user can find the field in
// their own config without reading shardopt's source.
template <class T>
std::string describe(std::string_view field, const T& value) {
  std::ostringstream os;
  os << "Config." << field << " = " << value;
  return os.str();
}
// Floats print as the shortest text that reads back to the same value: "1e-08", not
// "9.99999994e-09", so the message shows what the user wrote.
std::string describe(std::string_view field, float value) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, value);
  return "Config." + std::string(field) + " = " + std::string(buf, res.ptr);
}

// `where` is the caller's line, so the error points at the check that failed, not at this helper.
template <class T>
void check(bool ok, ErrorCode code, std::string_view field, const T& value, std::string_view why,
           std::source_location where = std::source_location::current()) {
  if (!ok) throw Error(code, describe(field, value) + ": " + std::string(why), where);
}

bool is_dtype(DType t) { return t == DType::fp32 || t == DType::fp16 || t == DType::bf16; }

// Enum fields are printed by name when they hold a known value and by number otherwise, so a value
// produced by a bad cast is still reported legibly.
std::string dtype_text(DType t) {
  return is_dtype(t) ? std::string(name_of(t)) : std::to_string(static_cast<int>(t));
}

void check_finite(float v, std::string_view field, std::source_location where = std::source_location::current()) {
  check(std::isfinite(v), ErrorCode::invalid_argument, field, v, "must be finite", where);
}


}  // namespace

void HyperCheck::require(bool ok, const char* field, float value, const char* why, std::source_location where) const {
  if (!ok) throw Error(ErrorCode::invalid_argument, describe(field, value) + ": " + why, where);
}

void Config::validate() const {
  check(stage >= 0 && stage <= 3, ErrorCode::invalid_argument, "stage", stage, "must be 0, 1, 2 or 3");

  check(is_dtype(compute_dtype), ErrorCode::invalid_argument, "compute_dtype", dtype_text(compute_dtype),
        "unknown dtype");
  check(is_dtype(master_dtype), ErrorCode::invalid_argument, "master_dtype", dtype_text(master_dtype),
        "unknown dtype");
  check(is_dtype(reduce_dtype), ErrorCode::invalid_argument, "reduce_dtype", dtype_text(reduce_dtype),
        "unknown dtype");
  check(master_dtype == DType::fp32, ErrorCode::unsupported, "master_dtype", dtype_text(master_dtype),
        "only fp32 master weights and optimizer state are supported");
  // Gradients travel either in fp32 or in the dtype they were computed in: converting bf16
  // gradients to fp16 (or fp32 ones to 16 bits) for the wire loses range or precision for no gain
  // in what the reduction can represent.
  check(reduce_dtype == DType::fp32 || reduce_dtype == compute_dtype, ErrorCode::unsupported, "reduce_dtype",
        dtype_text(reduce_dtype), "must be fp32 or equal to compute_dtype (" + dtype_text(compute_dtype) + ")");

  check(bucket_bytes != 0, ErrorCode::invalid_argument, "bucket_bytes", bucket_bytes, "must be positive");
  if (is_dtype(compute_dtype))
    check(bucket_bytes >= size_of(compute_dtype), ErrorCode::invalid_argument, "bucket_bytes", bucket_bytes,
          "must hold at least one compute_dtype element");
  check(alignment != 0, ErrorCode::invalid_argument, "alignment", alignment, "must be positive");

  const bool known_rule = state_count(optimizer) > 0;
  check(known_rule, ErrorCode::invalid_argument, "optimizer", static_cast<int>(optimizer), "unknown optimizer");

  // Hyperparameters: lr and weight_decay for every rule, then only the fields the chosen rule
  // reads (its header's validate()), so a value left over in an unused field (e.g. momentum with
  // adamw) does not block a valid configuration.
  check_finite(hyper.lr, "hyper.lr");
  check(hyper.lr >= 0.0f, ErrorCode::invalid_argument, "hyper.lr", hyper.lr, "must not be negative");
  check_finite(hyper.weight_decay, "hyper.weight_decay");
  // The learning-rate schedule (shardopt/schedule.hpp).
  const LrSchedule sched = hyper.schedule;
  const bool known_schedule = sched == LrSchedule::constant || sched == LrSchedule::cosine ||
                              sched == LrSchedule::linear || sched == LrSchedule::inverse_sqrt;
  check(known_schedule, ErrorCode::invalid_argument, "hyper.schedule", static_cast<int>(sched), "unknown schedule");
  check(hyper.warmup_steps >= 0, ErrorCode::invalid_argument, "hyper.warmup_steps", hyper.warmup_steps,
        "must not be negative");
  check(hyper.total_steps >= 0, ErrorCode::invalid_argument, "hyper.total_steps", hyper.total_steps,
        "must not be negative");
  if (sched == LrSchedule::cosine || sched == LrSchedule::linear)
    check(hyper.total_steps > hyper.warmup_steps, ErrorCode::invalid_argument, "hyper.total_steps",
          hyper.total_steps,
          "must exceed hyper.warmup_steps (" + std::to_string(hyper.warmup_steps) + ") for a decaying schedule");
  if (sched != LrSchedule::constant) {
    check(hyper.min_lr >= 0.0f && hyper.min_lr <= hyper.lr, ErrorCode::invalid_argument, "hyper.min_lr", hyper.min_lr,
          "must be in [0, hyper.lr]");
  }
  const HyperCheck hc;
#define SHARDOPT_RULE_VALIDATE(id, Rule) \
  if (optimizer == OptimizerKind::id) Rule::validate(hyper, hc);
  SHARDOPT_RULES(SHARDOPT_RULE_VALIDATE)
#undef SHARDOPT_RULE_VALIDATE

  const LossScaling& ls = loss_scaling;
  const bool known_mode =
      ls.mode == LossScaleMode::none || ls.mode == LossScaleMode::fixed || ls.mode == LossScaleMode::dynamic;
  check(known_mode, ErrorCode::invalid_argument, "loss_scaling.mode", static_cast<int>(ls.mode), "unknown mode");
  // With mode none the scaling fields are not read, so they are not checked either. Dynamic
  // scaling with fp32 compute is allowed: unusual, but harmless.
  if (ls.mode != LossScaleMode::none) {
    check(ls.initial_scale > 0.0f && std::isfinite(ls.initial_scale), ErrorCode::invalid_argument,
          "loss_scaling.initial_scale", ls.initial_scale, "must be positive and finite");
  }
  if (ls.mode == LossScaleMode::dynamic) {
    check(ls.growth_factor >= 1.0f && std::isfinite(ls.growth_factor), ErrorCode::invalid_argument,
          "loss_scaling.growth_factor", ls.growth_factor, "must be finite and at least 1");
    check(ls.backoff > 0.0f && ls.backoff <= 1.0f, ErrorCode::invalid_argument, "loss_scaling.backoff", ls.backoff,
          "must be in (0, 1]");
    check(ls.growth_interval >= 1, ErrorCode::invalid_argument, "loss_scaling.growth_interval", ls.growth_interval,
          "must be at least 1");
    check(ls.hysteresis >= 1, ErrorCode::invalid_argument, "loss_scaling.hysteresis", ls.hysteresis,
          "must be at least 1");
    check(ls.min_scale > 0.0f && std::isfinite(ls.min_scale), ErrorCode::invalid_argument, "loss_scaling.min_scale",
          ls.min_scale, "must be positive and finite");
  }

  // NaN fails the comparison: a NaN threshold would silently disable or poison clipping.
  check(max_grad_norm >= 0.0f && std::isfinite(max_grad_norm), ErrorCode::invalid_argument, "max_grad_norm",
        max_grad_norm, "must be finite and not negative (0 disables clipping)");
  check(accumulation_steps >= 1, ErrorCode::invalid_argument, "accumulation_steps", accumulation_steps,
        "must be at least 1");

  const bool known_offload = offload_optimizer == OffloadKind::none || offload_optimizer == OffloadKind::host ||
                             offload_optimizer == OffloadKind::nvme;
  check(known_offload, ErrorCode::invalid_argument, "offload_optimizer", static_cast<int>(offload_optimizer),
        "unknown offload kind");
  if (offload_optimizer == OffloadKind::nvme)
    check(!nvme_dir.empty(), ErrorCode::invalid_argument, "nvme_dir", "\"\"",
          "must name a directory when offload_optimizer is nvme");
  if (offload_params)
    check(stage == 3, ErrorCode::invalid_argument, "offload_params", "true",
          "requires stage 3 (stage is " + std::to_string(stage) + ")");
  check(prefetch_units >= 0, ErrorCode::invalid_argument, "prefetch_units", prefetch_units, "must not be negative");
  // Each prefetched unit is a device slot the size of the largest unit; far fewer already hide
  // the gathers, so a huge value is a mistake (it would plan billions of buffers).
  check(prefetch_units <= kMaxPrefetchUnits, ErrorCode::invalid_argument, "prefetch_units", prefetch_units,
        "must be at most " + std::to_string(kMaxPrefetchUnits));
  check(gradient_buckets >= 0 && gradient_buckets <= kMaxGradientBuckets, ErrorCode::invalid_argument,
        "gradient_buckets", gradient_buckets,
        "must be 0 (one per unit) or 1.." + std::to_string(kMaxGradientBuckets));

  const bool known_precision = state_precision == StatePrecision::fp32 || state_precision == StatePrecision::bf16 ||
                               state_precision == StatePrecision::int8;
  check(known_precision, ErrorCode::invalid_argument, "state_precision", static_cast<int>(state_precision),
        "unknown state precision (fp32, bf16 or int8)");
  if (state_precision == StatePrecision::int8) check_quant_block(quant_block, "Config.quant_block");
}

}  // namespace shardopt
