#pragma once
// Parsing and printing of the quantities the command line deals in: byte sizes and counts.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shardopt::cli {

// "80GiB", "512MB", "1.5TiB", "1e9", "4096", "64k": bytes. Decimal units (kB/K, MB/M, GB/G, TB/T)
// are powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of 1024; a bare number is bytes.
// Case-insensitive; spaces between number and unit are allowed. nullopt if malformed, negative,
// or beyond 2^63.
std::optional<std::uint64_t> parse_bytes(std::string_view text);

// "1.3B", "350M", "7e9", "16Mi", "125000": a count. K, M, B/G, T are powers of 1000; Ki, Mi, Gi
// powers of 1024. nullopt if malformed, negative, fractional after scaling, or beyond 2^63.
std::optional<std::uint64_t> parse_count(std::string_view text);

// True if `text` is a well-formed number with a unit that parse_bytes (bytes = true) or
// parse_count accepts, only too large to represent: the caller says "too large", not "malformed".
bool too_large(std::string_view text, bool bytes);

// The largest --params the planning commands accept (2^48): per-parameter byte counts of any
// stage then stay far below 2^64.
inline constexpr std::uint64_t kMaxParams = std::uint64_t(1) << 48;

// The median of `v` (the mean of the middle two for an even count); 0 if empty.
double median(std::vector<double> v);

// 1536 -> "1.5 KiB"; below 1 KiB in bytes ("512 B").
std::string format_bytes(double bytes);
// 1234567 -> "1,234,567".
std::string format_count(std::uint64_t n);

}  // namespace shardopt::cli
