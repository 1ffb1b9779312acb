#pragma once
// What the engine-level CPU benchmarks share: wall-clock helpers and the synthetic model they time
// (a flat list of 1-D tensors, one per block, 2 Mi elements each, the last one shorter).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
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
