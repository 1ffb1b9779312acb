#pragma once
// Memory plan: every buffer the engine will allocate for a configuration, from shapes alone.
//
// The Engine allocates exactly this list in initialize(), so the prediction and memory_report()
// agree by construction; what the plan cannot see is memory outside the engine (the trainer's
// activations, the communicator's own scratch).
#include <cstddef>
#include <string>
#include <vector>

#include "shardopt/config.hpp"
#include "shardopt/layout.hpp"
#include "shardopt/memory.hpp"

namespace shardopt {

struct PlannedBuffer {
  std::string name;
  std::size_t bytes = 0;
  Category category = Category::other;
  Place place = Place::device;
  bool transient = false;  // freed at the end of initialize(): part of the peak, not of current
};

struct MemoryPlan {
  std::vector<PlannedBuffer> buffers;  // per rank (every rank plans the same sizes)
  // The report memory_report() will show right after initialize(): current holds the persistent
  // buffers, peak also the transient ones.
  MemoryReport report() const;
};

// Validates `config` and the blocks (as Engine would) and plans one rank's buffers.
// stream_scratch_bytes: what the backend allocates with each stream (Backend::stream_scratch_bytes(),
// 0 on the CPU backend), counted for each stream the engine creates (compute and communication;
// with optimizer offload also the offload engine's download and upload streams).
MemoryPlan plan_memory(const Config& config, const std::vector<BlockSpec>& blocks, int world_size,
                       std::size_t stream_scratch_bytes = 0);

}  // namespace shardopt
