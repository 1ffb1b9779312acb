#include "engine/context.hpp"

#include <cstring>

#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace shardopt::detail {

EngineContext::EngineContext(const Config& config, Backend& backend, Communicator& communicator)
    : cfg(config), be(backend), comm(communicator) {
  cfg.validate();
  world = comm.size();
  rank = comm.rank();
  require(world >= 1, ErrorCode::invalid_argument, "communicator world size must be >= 1");
  require(!cfg.offload_params || cfg.offload_optimizer != OffloadKind::none, ErrorCode::unsupported,
          "offload_params=true requires offload_optimizer=host or nvme (the parameter shard is updated by the CPU)");
  compute_dtype = cfg.compute_dtype;
  reduce_dtype = cfg.reduce_dtype;
  state_count = shardopt::state_count(cfg.optimizer);
  compute = be.create_stream("shardopt.compute.r" + std::to_string(rank));
  side = be.create_stream("shardopt.comm.r" + std::to_string(rank));
  compute_done = be.create_event();
}

void EngineContext::plan(EnginePlan& p) {
  layout = std::move(p.layout);
  placement = p.placement;
  shard_elems = layout.shard_elems();
  unit_base.clear();
  full_elems = 0;
  for (const auto& u : layout.units()) {
    unit_base.push_back(full_elems);
    full_elems += u.padded_elems;
  }
}

void EngineContext::side_after_compute() {
  be.record(*compute_done, *compute);
  be.wait(*side, *compute_done);
}

void EngineContext::consume(Event& event) {
  be.wait(*compute, event);
  if (host_visible()) be.synchronize(event);
}

Buffer EngineContext::allocate(const BufferSpec& spec) {
  Buffer b = be.allocate(spec.elems * size_of(spec.dtype), spec.place, spec.category,
                         spec.name + " (rank " + std::to_string(rank) + ")");
  if (b && spec.place != Place::device) std::memset(b.data(), 0, b.bytes());
  else if (b) be.fill(b.data(), spec.dtype, spec.elems, 0.0f, *side);
  return b;
}

}  // namespace shardopt::detail
