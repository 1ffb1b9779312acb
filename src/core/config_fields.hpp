#pragma once
// Config and Hyperparams field by field (internal): the one list of their fields, walked by
// everything that must see every field — the configuration agreement hash (bootstrap.cpp), the
// checkpoint manifest's hyperparameters (checkpoint/format.cpp) and the C API's text keys
// (capi.cpp). A field added to one of these structs and not to its table here fails to compile
// (the static_asserts below count the struct's members), so none of those can silently miss it.
//
// for_each_field(obj, v) calls v(info, value) for every leaf field in declaration order, where
// `info` is a FieldInfo and `value` a reference to the member (const if obj is). Config's nested
// structs (hyper, loss_scaling) are walked in place, so a visitor sees only scalars, enums and
// strings. Declaration order matters: the agreement hash hashes the fields in this order.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "shardopt/config.hpp"
#include "shardopt/rules.hpp"

namespace shardopt::fields {

struct FieldInfo {
  // The field's key: the C API's shardopt_config_set key and the manifest's key.
  const char* name = "";
  // A value that may differ per machine (a local path): left out of the agreement between ranks.
  bool local = false;
  // Where nested formats (the checkpoint manifest) keep the field: inside the object `section`
  // under `key`; top level under `name` when section is null.
  const char* section = nullptr;
  const char* key = nullptr;
};

template <class S, class T>
struct Field {
  FieldInfo info;
  T S::*member;
};
template <class S, class T>
constexpr Field<S, T> field(const char* name, T S::*member) {
  return {FieldInfo{name}, member};
}
template <class S, class T>
constexpr Field<S, T> local_field(const char* name, T S::*member) {
  return {FieldInfo{name, true}, member};
}
template <class S, class T>
constexpr Field<S, T> section_field(const char* name, T S::*member, const char* section, const char* key) {
  return {FieldInfo{name, false, section, key}, member};
}

// Every member of Hyperparams (shardopt/rules/rule.hpp). The schedule's fields live in the
// manifest's "schedule" object (absent from manifests written before schedules existed).
inline constexpr auto kHyperparamsFields = std::make_tuple(
    field("lr", &Hyperparams::lr), field("beta1", &Hyperparams::beta1), field("beta2", &Hyperparams::beta2),
    field("eps", &Hyperparams::eps), field("weight_decay", &Hyperparams::weight_decay),
    field("momentum", &Hyperparams::momentum), field("dampening", &Hyperparams::dampening),
    field("nesterov", &Hyperparams::nesterov), section_field("schedule", &Hyperparams::schedule, "schedule", "kind"),
    section_field("warmup_steps", &Hyperparams::warmup_steps, "schedule", "warmup_steps"),
    section_field("total_steps", &Hyperparams::total_steps, "schedule", "total_steps"),
    section_field("min_lr", &Hyperparams::min_lr, "schedule", "min_lr"));

// Every member of LossScaling; the mode is the key "loss_scaling" (the C API's name for it).
inline constexpr auto kLossScalingFields = std::make_tuple(
    field("loss_scaling", &LossScaling::mode), field("initial_scale", &LossScaling::initial_scale),
    field("growth_factor", &LossScaling::growth_factor), field("growth_interval", &LossScaling::growth_interval),
    field("backoff", &LossScaling::backoff), field("hysteresis", &LossScaling::hysteresis),
    field("min_scale", &LossScaling::min_scale));

// Every member of Config; `hyper` and `loss_scaling` are walked through their own tables.
inline constexpr auto kConfigFields = std::make_tuple(
    field("stage", &Config::stage), field("compute_dtype", &Config::compute_dtype),
    field("master_dtype", &Config::master_dtype), field("reduce_dtype", &Config::reduce_dtype),
    field("bucket_bytes", &Config::bucket_bytes), field("alignment", &Config::alignment),
    field("optimizer", &Config::optimizer), field("hyper", &Config::hyper),
    field("loss_scaling", &Config::loss_scaling), field("max_grad_norm", &Config::max_grad_norm),
    field("accumulation_steps", &Config::accumulation_steps), field("offload_optimizer", &Config::offload_optimizer),
    local_field("nvme_dir", &Config::nvme_dir), field("offload_params", &Config::offload_params),
    local_field("pinned_fallback", &Config::pinned_fallback),
    field("prefetch_units", &Config::prefetch_units), field("persistence_threshold", &Config::persistence_threshold),
    field("gradient_buckets", &Config::gradient_buckets), field("state_precision", &Config::state_precision),
    field("quant_block", &Config::quant_block));

template <class S>
struct TableOf;
template <>
struct TableOf<Hyperparams> {
  static constexpr const auto& fields = kHyperparamsFields;
};
template <>
struct TableOf<LossScaling> {
  static constexpr const auto& fields = kLossScalingFields;
};
template <>
struct TableOf<Config> {
  static constexpr const auto& fields = kConfigFields;
};

template <class T>
concept Nested = requires { TableOf<T>::fields; };

// The number of members of an aggregate: the most initializers T{...} accepts, each an object
// convertible to any type (so a nested aggregate member takes one, no brace elision).
namespace detail {
struct AnyValue {
  template <class T>
  constexpr operator T() const noexcept;  // never defined: only used unevaluated
};
template <class T, std::size_t... I>
constexpr bool takes(std::index_sequence<I...>) {
  return requires { T{(static_cast<void>(I), AnyValue{})...}; };
}
template <class T, std::size_t N = 0>
constexpr std::size_t member_count() {
  if constexpr (takes<T>(std::make_index_sequence<N + 1>{})) return member_count<T, N + 1>();
  else return N;
}
}  // namespace detail

static_assert(std::tuple_size_v<std::remove_cvref_t<decltype(kHyperparamsFields)>> ==
                  detail::member_count<Hyperparams>(),
              "a Hyperparams member is missing from kHyperparamsFields (src/core/config_fields.hpp)");
static_assert(std::tuple_size_v<std::remove_cvref_t<decltype(kLossScalingFields)>> ==
                  detail::member_count<LossScaling>(),
              "a LossScaling member is missing from kLossScalingFields (src/core/config_fields.hpp)");
static_assert(std::tuple_size_v<std::remove_cvref_t<decltype(kConfigFields)>> == detail::member_count<Config>(),
              "a Config member is missing from kConfigFields (src/core/config_fields.hpp)");

// Calls v(info, value) for every leaf field of `obj` (Config, Hyperparams or LossScaling, const or
// not), in declaration order.
template <class S, class V>
void for_each_field(S& obj, V&& v) {
  using Plain = std::remove_const_t<S>;
  std::apply(
      [&](const auto&... f) {
        (
            [&] {
              auto& value = obj.*(f.member);
              if constexpr (Nested<std::remove_cvref_t<decltype(value)>>) for_each_field(value, v);
              else v(f.info, value);
            }(),
            ...);
      },
      TableOf<Plain>::fields);
}

// ---- values as text (the C API)

// Enum values by name (name_of's inverse); false if `text` names none.
bool parse_enum(std::string_view text, DType& out) noexcept;
bool parse_enum(std::string_view text, OptimizerKind& out) noexcept;
bool parse_enum(std::string_view text, LrSchedule& out) noexcept;
bool parse_enum(std::string_view text, LossScaleMode& out) noexcept;
bool parse_enum(std::string_view text, OffloadKind& out) noexcept;
bool parse_enum(std::string_view text, StatePrecision& out) noexcept;
// The names an enum takes, "a, b or c" (for error messages).
std::string enum_choices(DType);
std::string enum_choices(OptimizerKind);
std::string enum_choices(LrSchedule);
std::string enum_choices(LossScaleMode);
std::string enum_choices(OffloadKind);
std::string enum_choices(StatePrecision);

// Parses `text` into `out` by out's type; on a malformed value throws Error(invalid_argument)
// "'<key>': '<text>' is not ..." and leaves `out` as it was. Numbers must be whole strings;
// floats finite; integers in the field type's range (sizes not negative); bools 0|1|true|false;
// enums by name.
void parse_value(std::string_view key, std::string_view text, float& out);
void parse_value(std::string_view key, std::string_view text, int& out);
void parse_value(std::string_view key, std::string_view text, std::int64_t& out);
void parse_value(std::string_view key, std::string_view text, std::size_t& out);
void parse_value(std::string_view key, std::string_view text, bool& out);
void parse_value(std::string_view key, std::string_view text, std::string& out);
[[noreturn]] void bad_value(std::string_view key, std::string_view text, const std::string& expected);
template <class E>
  requires std::is_enum_v<E>
void parse_value(std::string_view key, std::string_view text, E& out) {
  E v{};
  if (!parse_enum(text, v)) bad_value(key, text, enum_choices(E{}));
  out = v;
}

// A value as text that parse_value reads back to the same value (floats with 9 significant
// digits, enums by name, bools true/false).
std::string to_text(float v);
std::string to_text(int v);
std::string to_text(std::int64_t v);
std::string to_text(std::size_t v);
std::string to_text(bool v);
inline std::string to_text(const std::string& v) { return v; }
template <class E>
  requires std::is_enum_v<E>
std::string to_text(E v) {
  return std::string(name_of(v));
}

// Sets the field of `obj` named `key` from `text`; false (nothing changed) if no field is so named.
// Throws Error(invalid_argument) naming the key for a malformed value.
template <class S>
bool set_field(S& obj, std::string_view key, std::string_view text) {
  bool found = false;
  for_each_field(obj, [&](const FieldInfo& info, auto& value) {
    if (!found && key == info.name) {
      parse_value(key, text, value);
      found = true;
    }
  });
  return found;
}

// Every field name of S, separated by ", " (for error messages).
template <class S>
std::string field_names() {
  std::string out;
  S probe{};
  for_each_field(probe, [&](const FieldInfo& info, const auto&) {
    if (!out.empty()) out += ", ";
    out += info.name;
  });
  return out;
}

}  // namespace shardopt::fields
