#include "core/config_fields.hpp"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "shardopt/error.hpp"

namespace shardopt::fields {

namespace {

// "a, b or c" from the names of `values`.
template <class E, std::size_t N>
std::string choices_of(const E (&values)[N]) {
  std::string out;
  for (std::size_t i = 0; i < N; ++i) {
    if (i > 0) out += i + 1 == N ? " or " : ", ";
    out += name_of(values[i]);
  }
  return out;
}

template <class E, std::size_t N>
bool parse_of(const E (&values)[N], std::string_view text, E& out) noexcept {
  for (E v : values)
    if (text == name_of(v)) {
      out = v;
      return true;
    }
  return false;
}

constexpr DType kDTypes[] = {DType::fp32, DType::bf16, DType::fp16};
constexpr LossScaleMode kLossScaleModes[] = {LossScaleMode::none, LossScaleMode::fixed, LossScaleMode::dynamic};
constexpr OffloadKind kOffloadKinds[] = {OffloadKind::none, OffloadKind::host, OffloadKind::nvme};
constexpr StatePrecision kStatePrecisions[] = {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8};
constexpr LrSchedule kSchedules[] = {LrSchedule::constant, LrSchedule::cosine, LrSchedule::linear,
                                     LrSchedule::inverse_sqrt};

template <class T>
void parse_integer(std::string_view key, std::string_view text, T& out, const char* expected) {
  T v{};
  const char* b = text.data();
  const char* e = b + text.size();
  const auto [p, ec] = std::from_chars(b, e, v);
  if (text.empty() || p != e) {
    // A negative number for an unsigned field fails to parse at all: say what is wrong with it.
    if (std::is_unsigned_v<T> && !text.empty() && text[0] == '-') bad_value(key, text, "a size (it is negative)");
    bad_value(key, text, expected);
  }
  if (ec == std::errc::result_out_of_range) bad_value(key, text, std::string(expected) + " in range");
  out = v;
}

}  // namespace

bool parse_enum(std::string_view text, DType& out) noexcept { return parse_dtype(text, out); }
bool parse_enum(std::string_view text, OptimizerKind& out) noexcept { return parse_optimizer(text, out); }
bool parse_enum(std::string_view text, LrSchedule& out) noexcept { return parse_lr_schedule(text, out); }
bool parse_enum(std::string_view text, LossScaleMode& out) noexcept { return parse_of(kLossScaleModes, text, out); }
bool parse_enum(std::string_view text, OffloadKind& out) noexcept { return parse_of(kOffloadKinds, text, out); }
bool parse_enum(std::string_view text, StatePrecision& out) noexcept { return parse_of(kStatePrecisions, text, out); }

std::string enum_choices(DType) { return choices_of(kDTypes); }
std::string enum_choices(OptimizerKind) { return "a known rule (" + optimizer_names(", ") + ")"; }
std::string enum_choices(LrSchedule) { return choices_of(kSchedules); }
std::string enum_choices(LossScaleMode) { return choices_of(kLossScaleModes); }
std::string enum_choices(OffloadKind) { return choices_of(kOffloadKinds); }
std::string enum_choices(StatePrecision) { return choices_of(kStatePrecisions); }

void bad_value(std::string_view key, std::string_view text, const std::string& expected) {
  throw Error(ErrorCode::invalid_argument,
              "'" + std::string(key) + "': '" + std::string(text) + "' is not " + expected);
}

void parse_value(std::string_view key, std::string_view text, float& out) {
  // strtof needs a terminated string; its own locale-independent forms ("1e-3", "inf") are what
  // users write, and "nan"/"inf" are then refused as not finite.
  const std::string s(text);
  char* end = nullptr;
  errno = 0;
  const float f = std::strtof(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE || !std::isfinite(f))
    bad_value(key, text, "a finite number");
  out = f;
}
void parse_value(std::string_view key, std::string_view text, int& out) { parse_integer(key, text, out, "an integer"); }
void parse_value(std::string_view key, std::string_view text, std::int64_t& out) {
  parse_integer(key, text, out, "an integer");
}
void parse_value(std::string_view key, std::string_view text, std::size_t& out) {
  parse_integer(key, text, out, "a size");
}
void parse_value(std::string_view key, std::string_view text, bool& out) {
  if (text == "1" || text == "true") out = true;
  else if (text == "0" || text == "false") out = false;
  else bad_value(key, text, "0, 1, true or false");
}
void parse_value(std::string_view, std::string_view text, std::string& out) { out = std::string(text); }

std::string to_text(float v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", static_cast<double>(v));  // 9 digits: every float round-trips
  return b;
}
std::string to_text(int v) { return std::to_string(v); }
std::string to_text(std::int64_t v) { return std::to_string(v); }
std::string to_text(std::size_t v) { return std::to_string(v); }
std::string to_text(bool v) { return v ? "true" : "false"; }

}  // namespace shardopt::fields
