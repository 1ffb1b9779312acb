#pragma once
// What the CPU benchmarks share: wall-clock helpers, counts from the command line, the machine's
// threads, and the synthetic model the engine-level ones time (a flat list of 1-D tensors, one per
// block, 2 Mi elements each, the last one shorter).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/engine.hpp"

namespace shardopt::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The upper median (the middle element of an odd count); 0 for no samples.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// "32M", "1.5G", "4096": binary K/M/G suffixes.
inline std::size_t parse_count(const char* s) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (end && (*end == 'K' || *end == 'k')) v *= 1024.0;
  if (end && (*end == 'M' || *end == 'm')) v *= 1024.0 * 1024.0;
  if (end && (*end == 'G' || *end == 'g')) v *= 1024.0 * 1024.0 * 1024.0;
  return static_cast<std::size_t>(v);
}

inline unsigned all_threads() {
  const unsigned t = std::thread::hardware_concurrency();
  return t ? t : 1;
}

inline std::vector<BlockSpec> flat_model(std::size_t params) {
  const std::size_t per_block = std::size_t(2) << 20;
  std::vector<BlockSpec> blocks;
  for (std::size_t done = 0, b = 0; done < params; done += per_block, ++b) {
    const auto n = static_cast<std::int64_t>(std::min(per_block, params - done));
    blocks.push_back({"b" + std::to_string(b), {{"w" + std::to_string(b), {n}, 0}}});
  }
  return blocks;
}

}  // namespace shardopt::bench
