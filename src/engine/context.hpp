#pragma once
// What every part of the engine shares (internal): the backend, the communicator, the two streams,
// the layout and the placement table, and the arithmetic that maps a unit element to its offset
// in full buffers and in this rank's shard. The parts (state_store, grad_reducer, param_gatherer,
// step_runner) hold a reference to one EngineContext, owned by Engine::Impl.
#include <cstddef>
#include <memory>
#include <string>

#include "engine/plan.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/config.hpp"
#include "shardopt/layout.hpp"

namespace shardopt::detail {

inline std::byte* at(const Buffer& b, std::size_t elem, DType t) {
  return static_cast<std::byte*>(b.data()) + elem * size_of(t);
}

struct EngineContext {
  EngineContext(const Config& config, Backend& backend, Communicator& communicator);

  Config cfg;
  Backend& be;
  Communicator& comm;
  int rank = 0, world = 1;
  DType compute_dtype = DType::fp32;
  DType reduce_dtype = DType::fp32;
  int state_count = 2;

  // compute: the trainer's work (compute_stream()); side: communication and the optimizer step.
  std::unique_ptr<Stream> compute, side;
  std::unique_ptr<Event> compute_done;

  // Set by plan(), at initialize().
  Layout layout;
  Placement placement;
  std::vector<std::size_t> unit_base;  // offset of each unit within the full buffers
  std::size_t full_elems = 0;          // all units, padded
  std::size_t shard_elems = 0;         // this rank's slices of all units
  // Takes the plan's layout (the plan keeps its buffers, offload and control layout).
  void plan(EnginePlan& p);

  // On the CPU backend the host reads views directly, so it must wait where a GPU only orders streams.
  bool host_visible() const { return be.host_accessible(); }
  // side waits for everything enqueued on compute so far.
  void side_after_compute();
  // compute (and, on the CPU backend, the caller) waits for `event`.
  void consume(Event& event);
  // Allocates a planned buffer, zero-filled (padding must read as zero): host places by the host
  // (on CUDA a fill kernel may not reach pinned memory), the device on side. A pinned buffer the
  // backend refuses is an Error naming it, its size and the locked-memory limit, or with
  // Config::pinned_fallback pageable host memory (and so is every pinned buffer after it).
  Buffer allocate(const BufferSpec& spec);
  // At initialize(), before allocating: where the backend's pinning counts against the
  // locked-memory limit, the pinned bytes of the plan must fit in what is left of it; if not, an
  // Error naming the largest pinned buffer, the plan's pinned bytes and the limit, or with
  // Config::pinned_fallback every pinned buffer becomes pageable.
  void check_pinned(const std::vector<BufferSpec>& specs);
  bool pinned_pageable = false;  // pinned buffers are allocated in pageable host memory

  // ---- where a unit element lives (unit u, element e of its padded buffer)
  std::size_t slice_begin(int u) const { return rank * layout.units()[u].slice_elems; }
  std::size_t full_offset(int u, std::size_t e) const { return unit_base[u] + e; }
  // e must lie in this rank's slice of u.
  std::size_t shard_offset(int u, std::size_t e) const {
    return layout.units()[u].shard_offset + (e - slice_begin(u));
  }
  // Offset of e in the master and optimizer state: the shard when sharded, else the full buffers.
  std::size_t state_offset(int u, std::size_t e) const {
    return placement.state_sharded ? shard_offset(u, e) : full_offset(u, e);
  }
  std::size_t state_elems() const { return placement.state_sharded ? shard_elems : full_elems; }
  // The unit elements this rank updates: its slice, or the whole unit when the state is not sharded.
  std::size_t owned_begin(int u) const { return placement.state_sharded ? slice_begin(u) : 0; }
  std::size_t owned_end(int u) const {
    const auto& info = layout.units()[u];
    return placement.state_sharded ? slice_begin(u) + info.slice_elems : info.padded_elems;
  }

  // f(tensor, begin within the tensor, count, unit, unit element of begin) for every run of
  // elements whose master and state this rank holds (every tensor whole when not sharded).
  template <class F>
  void for_each_owned_piece(F&& f) const {
    if (!placement.state_sharded) {
      for (int t = 0; t < static_cast<int>(layout.tensors().size()); ++t) {
        const auto& ti = layout.tensors()[t];
        if (ti.numel) f(t, std::size_t{0}, ti.numel, ti.unit, ti.unit_offset);
      }
      return;
    }
    for (const auto& p : layout.pieces(rank)) {
      const auto& ti = layout.tensors()[p.tensor];
      f(p.tensor, p.tensor_offset, p.count, ti.unit, ti.unit_offset + p.tensor_offset);
    }
  }
};

}  // namespace shardopt::detail
