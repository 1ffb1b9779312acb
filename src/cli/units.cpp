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

}  // namespace

std::optional<std::uint64_t> parse_bytes(std::string_view text) {
  double v = 0;
  std::string u;
  if (!split_number(text, v, u)) return std::nullopt;
  double k = 0;
  if (u.empty() || u == "b") k = 1;
  else if (u == "k" || u == "kb") k = 1e3;
  else if (u == "m" || u == "mb") k = 1e6;
  else if (u == "g" || u == "gb") k = 1e9;
  else if (u == "t" || u == "tb") k = 1e12;
  else if (u == "ki" || u == "kib") k = 1024.0;
  else if (u == "mi" || u == "mib") k = 1024.0 * 1024;
  else if (u == "gi" || u == "gib") k = 1024.0 * 1024 * 1024;
  else if (u == "ti" || u == "tib") k = 1024.0 * 1024 * 1024 * 1024;
  else return std::nullopt;
  return to_integer(v * k);
}

std::optional<std::uint64_t> parse_count(std::string_view text) {
  double v = 0;
  std::string u;
  if (!split_number(text, v, u)) return std::nullopt;
  double k = 0;
  if (u.empty()) k = 1;
  else if (u == "k") k = 1e3;
  else if (u == "m") k = 1e6;
  else if (u == "b" || u == "g") k = 1e9;
  else if (u == "t") k = 1e12;
  else if (u == "ki") k = 1024.0;
  else if (u == "mi") k = 1024.0 * 1024;
  else if (u == "gi") k = 1024.0 * 1024 * 1024;
  else return std::nullopt;
  return to_integer(v * k);
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
