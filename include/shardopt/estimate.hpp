#pragma once
// Memory plan: every buffer the engine will allocate for a configuration, from shapes alone.
//
// The Engine allocates exactly this list in initialize(), so the prediction and memory_report()
// agree by construction; what the plan cannot see is memory outside the engine (the trainer's
// activations, the communicator's own scratch).
#include <array>
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
  // The trainer's memory the engine will use (borrowed, not allocated: not in `buffers`), per
  // place, as memory_report().borrowed will show it.
  std::array<std::size_t, kPlaceCount> borrowed{};
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

// What the trainer lends the engine, for every tensor (Engine::borrow_parameters /
// borrow_gradients on each one): the plan of an engine that borrows it, and in
// MemoryPlan::borrowed its bytes (compute dtype, backend memory: `device`).
struct Borrowing {
  bool params = false;
  bool grads = false;
};
MemoryPlan plan_memory(const Config& config, const std::vector<BlockSpec>& blocks, int world_size,
                       const Borrowing& borrowed, std::size_t stream_scratch_bytes = 0);

}  // namespace shardopt
