#include "units.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace shardopt::cli {

namespace {

std::string lower(std::string_view s) {
  std::string out;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Splits "1.5GiB" into 1.5 and "gib". strtod accepts hex and "inf"/"nan": refused by hand.
bool split_number(std::string_view text, double& value, std::string& unit) {
  const std::string s = lower(text);
  if (s.empty() || !(std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '.')) return false;
  if (s.find('x') != std::string::npos) return false;
  char* end = nullptr;
  value = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || !std::isfinite(value) || value < 0) return false;
  unit = std::string(end);
  return true;
}

std::optional<std::uint64_t> to_integer(double v) {
  if (!(v >= 0) || v >= 9.2e18) return std::nullopt;
  const double r = std::round(v);
  // Sizes like "1.5KiB" are whole numbers; "0.3B" bytes is not a size.
  if (std::fabs(r - v) > 1e-6 * std::max(1.0, v)) return std::nullopt;
  return static_cast<std::uint64_t>(r);
}

// The multiplier of a unit, or 0 if it is not one (bytes: sizes; otherwise: counts).
double unit_scale(const std::string& u, bool bytes) {
  if (bytes) {
    if (u.empty() || u == "b") return 1;
    if (u == "k" || u == "kb") return 1e3;
    if (u == "m" || u == "mb") return 1e6;
    if (u == "g" || u == "gb") return 1e9;
    if (u == "t" || u == "tb") return 1e12;
    if (u == "ki" || u == "kib") return 1024.0;
    if (u == "mi" || u == "mib") return 1024.0 * 1024;
    if (u == "gi" || u == "gib") return 1024.0 * 1024 * 1024;
    if (u == "ti" || u == "tib") return 1024.0 * 1024 * 1024 * 1024;
    return 0;
  }
  if (u.empty()) return 1;
  if (u == "k") return 1e3;
  if (u == "m") return 1e6;
  if (u == "b" || u == "g") return 1e9;
  if (u == "t") return 1e12;
  if (u == "ki") return 1024.0;
  if (u == "mi") return 1024.0 * 1024;
  if (u == "gi") return 1024.0 * 1024 * 1024;
  return 0;
}

}  // namespace

bool too_large(std::string_view text, bool bytes) {
  double v = 0;
  std::string u;
  if (!split_number(text, v, u)) {
    // strtod gives inf for digits beyond double's range: still a number, only too large.
    const std::string s = lower(text);
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  }
  const double k = unit_scale(u, bytes);
  return k != 0 && v * k >= 9.2e18;
}

std::optional<std::uint64_t> parse_bytes(std::string_view text) {
  double v = 0;
  std::string u;
  if (!split_number(text, v, u)) return std::nullopt;
  const double k = unit_scale(u, /*bytes=*/true);
  if (k == 0) return std::nullopt;
  return to_integer(v * k);
}

std::optional<std::uint64_t> parse_count(std::string_view text) {
  double v = 0;
  std::string u;
  if (!split_number(text, v, u)) return std::nullopt;
  const double k = unit_scale(u, /*bytes=*/false);
  if (k == 0) return std::nullopt;
  return to_integer(v * k);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string format_bytes(double bytes) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int i = 0;
  double v = bytes;
  while (std::fabs(v) >= 1024.0 && i < 5) {
    v /= 1024.0;
    ++i;
  }
  char buf[48];
  if (i == 0) std::snprintf(buf, sizeof buf, "%.0f B", v);
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, units[i]);
  return buf;
}

std::string format_count(std::uint64_t n) {
  std::string digits = std::to_string(n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

}  // namespace shardopt::cli
