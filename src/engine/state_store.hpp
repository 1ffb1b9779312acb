#pragma once
// The state store (internal): this rank's fp32 master weights and optimizer state, addressed by
// field (0: master, 1 + i: optimizer state i) and state offset (EngineContext::state_offset: the
// position in this rank's shard, or in the full buffers when the state is not sharded).
//
// Three tiers, chosen by Placement::state_tier:
//   device       backend memory; the device update kernels address it directly. With
//                Placement::master_is_params (fp32 compute) field 0 is the parameters themselves.
//   pinned_host  pinned host memory, updated on the CPU by the offload engine (offload/).
//   nvme         a file on local NVMe behind the offload engine; not addressable: address()
//                returns nullptr and every access goes through read()/write().
// The offloaded tiers own the offload engine, since it is what holds and updates their state.
//
// Checkpoints read and write the state only through read()/write(). Both are synchronous (the
// host values are read or stored when they return) and run between steps; they order themselves
// after the side stream's work.
#include <cstddef>
#include <memory>
#include <vector>

#include "engine/context.hpp"
#include "offload/offload_engine.hpp"

namespace shardopt::detail {

class StateStore {
 public:
  explicit StateStore(EngineContext& ctx) : ctx_(ctx) {}
  virtual ~StateStore();
  StateStore(const StateStore&) = delete;
  StateStore& operator=(const StateStore&) = delete;

  int fields() const noexcept { return 1 + ctx_.state_count; }
  std::size_t elems() const noexcept { return ctx_.state_elems(); }

  // Memory the device update kernels may address, or nullptr where the tier has none (nvme).
  virtual float* address(int field, std::size_t offset) const = 0;
  // n values of `field` from `offset` to host memory, and back. Error on a field or range outside
  // the store (nothing is touched then).
  void read(int field, std::size_t offset, std::size_t n, float* out);
  void write(int field, std::size_t offset, std::size_t n, const float* in);

  // Offloaded tiers: the offload engine holding this state (nullptr on the device tier).
  // start_offload() creates it once the update's pieces are known (before any step).
  offload::OffloadEngine* offload() const noexcept { return offload_.get(); }
  void start_offload(const OffloadPlan& plan, const std::vector<BufferSpec>& specs,
                     std::vector<offload::Piece> pieces);
  // Drops the offload engine first (it may still copy from or to the buffers), then the buffers.
  virtual void release();

 protected:
  void check(const char* call, int field, std::size_t offset, std::size_t n) const;
  virtual void read_values(int field, std::size_t offset, std::size_t n, float* out) = 0;
  virtual void write_values(int field, std::size_t offset, std::size_t n, const float* in) = 0;
  // What the offload engine works on: the pinned buffers (host tier), nothing (nvme).
  virtual float* offload_field(int field) const = 0;

  EngineContext& ctx_;
  Buffer host_grad_, grad_staging_, io_ring_;
  std::vector<Buffer> param_ring_;
  std::unique_ptr<offload::OffloadEngine> offload_;
};

// Field 0 when the fp32 parameters are the master weights: where each unit's owned elements
// start in the parameter buffers, indexed by unit.
using MasterAlias = std::vector<float*>;

// Allocates the store the placement names (its planned buffers, zero-filled, on side).
std::unique_ptr<StateStore> make_state_store(EngineContext& ctx, const std::vector<BufferSpec>& specs,
                                             MasterAlias alias);

}  // namespace shardopt::detail
