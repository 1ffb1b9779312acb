#pragma once
// The gradient reducer (internal): owns the gradient buffers the trainer adds into, the
// micro-step bookkeeping (which blocks reported grads_ready), and the reduction to the averaged
// gradient the update reads. Placement::grads says how:
//   all_reduce      full gradients, all-reduced at step() (in the reduce dtype if it differs);
//   reduce_scatter  full gradients, each unit reduce-scattered into this rank's slice at step();
//   bucketed        a unit's gradients go into one of Config::gradient_buckets buckets; when its
//                   last block reports ready the bucket is reduce-scattered into the gradient
//                   shard (summed over micro-steps in fp32) on side while backward goes on.
//                   grads_direct: one rank, nothing to reduce: backward adds straight into the shard.
//   grads_from_trainer (stages 1-3, every gradient in the trainer's memory, no offload) each
//                   unit's tensors are reduce-scattered into the shard where they are
//                   (Communicator::reduce_scatter_pieces), or cast into the reduce buffer first
//                   with a reduce dtype (reduce_trainer_unit). Stages 2-3: no buckets; when the
//                   unit's last block reports ready, and zeroed there. Stage 1: at step().
//   grads_borrowed  (stages 0-1, every gradient in the trainer's memory) no full gradient of its
//                   own: at step(), stage 1 reduces each unit from the trainer's arrays (under
//                   offload copied into one staging unit first: reduce_borrowed_units); stage 0
//                   all-reduces each tensor in place in the trainer's array, where the update reads
//                   it (reduce_borrowed_in_place; under offload the staging unit, all-reduced).
// Any backward order (bucketed): when a unit opens and every bucket is taken, the least recently
// opened unit none of whose blocks holds a gradient view (gradients() without grads_ready) is
// flushed: its bucket is reduce-scattered in place, and only the elements of the blocks reported
// ready since its last reduction are written (copied, added over micro-steps, or sent down under
// offload) into the shard; the bucket is reused. Its later blocks go into a fresh bucket and are
// written the same way. Every element is written by exactly one reduction per micro-step, and a
// reduce-scatter's sum of one element does not depend on the others, so the shard gets the bits of
// the in-order run. The choice of unit depends only on the call sequence, so every rank flushes
// the same unit at the same call (a flush is a collective). Under offload with one micro-step the
// norm of a step with a flush is measured on the host copy (as with micro-steps), whose bits the
// CPU backend's device measurement equals.
// With offload (Placement::grads_to_host), each unit's reduced gradient goes down to the state
// store's offload engine as soon as it lands, and no device copy of it is kept: the reduction runs
// in place in the bucket (or in the one-unit reduce buffer when the reduce dtype differs), which is
// reused only once the download has read it; its partial norms are measured there first
// (set_norm_ranges). Micro-steps at stages 2-3 are then summed on the host, into the host copy.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/context.hpp"
#include "engine/state_store.hpp"

namespace shardopt::detail {

class GradReducer {
 public:
  GradReducer(EngineContext& ctx, const std::vector<BufferSpec>& specs, StateStore& store);

  // The buffer of unit u the trainer adds block `block`'s gradients into (opens a bucket).
  std::byte* open_unit(int block);

  // Borrowed gradient memory (Engine::borrow_gradients): per tensor, the trainer's buffer or
  // nullptr. Set once at initialize(), which zeroes it. block_ready() copies a block's borrowed
  // gradients into the buffer open_unit() gives, on compute, then (stages 2-3) zeroes them there,
  // as a bucket is zero for the next micro-step; stages 0-1 zero them when the step has reduced
  // the full gradient (finish_step, zero). With Placement::grads_borrowed nothing is copied at
  // block_ready: the step reads the trainer's arrays unit by unit.
  void set_borrowed(std::vector<void*> grads);
  void* borrowed(int tensor) const { return borrowed_.empty() ? nullptr : borrowed_[tensor]; }
  // Borrowing is on and every tensor of the block with elements is borrowed (gradients() needs no
  // engine buffer).
  bool block_borrowed(int block) const;
  std::size_t borrowed_bytes() const;
  // grads_ready(block): checks, then reduces the unit once its last block is ready.
  void block_ready(int block);
  bool ready(int block) const { return block_ready_[block] != 0; }
  // All micro-steps of the step are complete and no block of a new one reported yet.
  bool complete() const { return micro_steps_ == ctx_.cfg.accumulation_steps && ready_blocks_ == 0; }
  bool idle() const { return micro_steps_ == 0 && ready_blocks_ == 0; }
  std::string progress() const;  // for step()'s error: micro-steps done, blocks missing

  // step(): the reductions Placement::grads leaves to the step, then the offload downloads of
  // everything reduced at step(). On side, after compute.
  void reduce_at_step();
  // The reduced gradient of unit element e (which this rank updates), and its dtype. The pointer
  // is nullptr where the device keeps no copy (grads_to_host): the update reads the host copy and
  // the norm is measured as the unit lands, or on the host copy (host_accumulates()).
  std::pair<void*, DType> reduced_at(int u, std::size_t e) const;
  // grads_to_host with micro-steps at stages 2-3: the sum over micro-steps exists only in the
  // host copy, so the partial norms are measured there, at step().
  // Also true for a step in which a unit was flushed (its slices came down in parts).
  bool host_accumulates() const {
    return ctx_.placement.grads_to_host && ctx_.placement.grads == GradFlow::bucketed &&
           (ctx_.cfg.accumulation_steps > 1 || flushed_step_);
  }
  // Reduce-scatters done early to free a bucket since initialize() (each one extra collective).
  std::uint64_t flushes() const { return flushes_; }
  // Partial norms measured as each unit lands (grads_to_host, where reduced_at gives nullptr and
  // !host_accumulates()): for each update range of a unit, its first unit element, its length and
  // the backend float its sum of squares is written to (on side). Indexed by unit; set once,
  // before any step.
  struct NormRange {
    std::size_t unit_begin = 0, n = 0;
    float* out = nullptr;
  };
  void set_norm_ranges(std::vector<std::vector<NormRange>> per_unit) { norm_ranges_ = std::move(per_unit); }
  // grads_direct: the update zeroes the gradient shard as it reads it.
  bool zeroed_by_update() const { return ctx_.placement.grads_direct; }
  // After the update: zero what the next step accumulates into; a new step begins.
  void finish_step();
  // zero_grad(): drops the gradients of an unfinished step (synchronous).
  void zero();

 private:
  static constexpr int kDirect = -2;  // open_bucket_ of a unit written straight into the shard
  void reduce_bucket(int u);
  // A free bucket for unit u, flushing the least recently opened unit without open views if none.
  void take_bucket(int u, const std::string& block_name);
  // Reduce-scatters unit u's bucket and writes only the blocks reported ready since its last
  // reduction (a flush, or the last reduction of a unit flushed before); frees the bucket.
  void reduce_partial(int u);
  void reduce_bucket_to_host(int u);
  void reduce_units_to_host();
  void reduce_borrowed_units();
  void reduce_borrowed_in_place();
  void reduce_from_trainer(int u);
  void reduce_trainer_unit(int u, void* out);
  // Sums of squares of unit u's update ranges; `unit` holds unit element e at unit + e * size(t).
  void measure(int u, const void* unit, DType t);
  void zero_accumulators();
  void copy_borrowed(int block);
  void zero_borrowed(Stream& stream);
  void reset_pending();

  EngineContext& ctx_;
  StateStore& store_;
  Buffer grads_full_, grads_reduced_, reduce_buf_, grad_shard_, rs_tmp_;
  Buffer staging_;  // grads_borrowed under offload: one unit of the trainer's gradients, gathered at step()
  struct Bucket {
    Buffer buffer;
    std::unique_ptr<Event> free;  // its last reduce-scatter finished and it is zero again
  };
  std::vector<Bucket> buckets_;
  std::vector<int> open_bucket_;    // bucketed: bucket bound to each unit this micro-step, -1 if none
  std::unique_ptr<Event> reduced_;  // recorded on side when a gradient is ready to go down
  // grads_to_host: the downloads have read the reduce buffer (it may be cast into again), or, with
  // grads_borrowed and matching dtypes, the staging unit reduced in place.
  std::unique_ptr<Event> reduce_buf_free_;
  std::vector<std::vector<NormRange>> norm_ranges_;
  std::vector<void*> borrowed_;  // per tensor (empty: nothing borrowed)
  std::vector<std::vector<SendPiece>> pieces_;  // grads_from_trainer: per unit, its tensors' arrays
  std::vector<char> block_ready_;
  std::vector<int> unit_pending_;  // blocks of the unit not yet ready this micro-step
  // Any backward order (this micro-step): blocks holding a gradient view (gradients() without
  // grads_ready), blocks whose gradients a partial reduction already wrote, units reduced in part.
  std::vector<char> block_open_, block_reduced_, unit_partial_;
  std::vector<int> unit_open_views_;
  std::vector<std::uint64_t> unit_opened_at_;  // open_tick_ when the unit took its bucket
  std::uint64_t open_tick_ = 0;
  std::uint64_t flushes_ = 0;
  bool flushed_step_ = false;  // a unit was flushed in this step
  int ready_blocks_ = 0;
  int micro_steps_ = 0;
};

}  // namespace shardopt::detail
