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
// Checkpoints read and write the state only through read_words()/write_words(). All four are
// synchronous (the host values are read or stored when they return) and run between steps; they
// order themselves after the side stream's work.
//
// Compressed optimizer state (Config::state_precision, shardopt/state_precision.hpp): fields
// 1 + i hold bf16 values, or int8 codes with one fp32 scale per Config::quant_block elements of
// state offset (block k is offsets [k*B, (k+1)*B); the layout aligns every tensor start and every
// slice to B, so this is the tensor's own block k'). address() is then nullptr for those fields;
// the update reaches them through state_codes() and state_scales().
//   read()        decoded fp32 values (bf16 widened, int8 code * its block's scale): exact.
//   write()       fp32 values; bf16 rounds to nearest even (exact for values read()); int8 is
//                 refused (encoding needs whole blocks and a dither: only the update encodes).
//   read_words()  the stored form, one 32-bit word per element, what checkpoints keep: fp32 and
//                 bf16 fields as their fp32 values (as read()); int8 as
//                 code | (biased exponent of the block's scale) << 8 (the scale is 0, a power of
//                 two, or NaN: its exponent field is all of it), so any run of elements carries
//                 its blocks' scales and a reload at another world size restores the same bytes.
//   write_words() the inverse: every word of a block must name the same scale.
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
  void read_words(int field, std::size_t offset, std::size_t n, float* out);
  void write_words(int field, std::size_t offset, std::size_t n, const float* in);
  StatePrecision precision() const noexcept { return ctx_.cfg.state_precision; }
  // Compressed state i (0-based) at `offset`: its codes (bf16 or int8), and the int8 scale of the
  // block holding `offset` (a multiple of the block size); nullptr where the tier has none.
  virtual void* state_codes(int, std::size_t) const { return nullptr; }
  virtual float* state_scales(int, std::size_t) const { return nullptr; }

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
  // Compressed fields (1 + i with precision != fp32); `words`: read_words()'s form.
  virtual void read_compressed(int, std::size_t, std::size_t, float*, bool /*words*/) {}
  virtual void write_compressed(int, std::size_t, std::size_t, const float*, bool /*words*/) {}
  bool compressed(int field) const noexcept { return field > 0 && precision() != StatePrecision::fp32; }
  // What the offload engine works on: the pinned buffers (host tier), nothing (nvme).
  virtual float* offload_field(int field) const = 0;

  EngineContext& ctx_;
  Buffer host_grad_, grad_staging_, io_ring_;
  std::vector<Buffer> param_ring_;
  std::unique_ptr<offload::OffloadEngine> offload_;
};

// Field 0 when the fp32 parameters are the master weights: runs of state offsets and where each
// starts in the parameters, in ascending order of state offset. A run lasts until the next one
// starts: one per unit (its owned elements in the engine's parameter buffers), or one per tensor
// when the parameters are the trainer's arrays (Placement::params_in_trainer; offsets in the
// alignment gap after a tensor then have no address, and no caller asks for them).
struct MasterRun {
  std::size_t state_begin = 0;
  float* params = nullptr;
};
using MasterAlias = std::vector<MasterRun>;

// Allocates the store the placement names (its planned buffers, zero-filled, on side).
std::unique_ptr<StateStore> make_state_store(EngineContext& ctx, const std::vector<BufferSpec>& specs,
                                             MasterAlias alias);

}  // namespace shardopt::detail
