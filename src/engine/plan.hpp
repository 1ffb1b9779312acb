#pragma once
// The engine's buffer plan (internal): which buffers a configuration needs, and how big. Shared by
// Engine::initialize (which allocates them) and plan_memory (which only adds them up).
#include <cstddef>
#include <string>
#include <vector>

#include "shardopt/config.hpp"
#include "shardopt/estimate.hpp"
#include "shardopt/layout.hpp"

namespace shardopt::detail {

enum class Buf : unsigned char {
  params_full,    // stages 0-2: every unit, compute dtype
  param_shard,    // stage 3: this rank's slices, compute dtype
  master,         // fp32 master weights (absent when the compute dtype is fp32)
  state,          // optimizer state `index` (fp32; bf16 or int8 codes with compressed state, see below)
  grads_full,     // stages 0-1: every unit, compute dtype
  grads_reduced,  // stage 0 with reduce dtype != compute, no offload: the all-reduced gradient
  reduce_buf,     // one unit in the reduce dtype (cast before reducing; with offload also stage 0)
  grad_shard,     // stages 1-3 without offload: this rank's reduced gradient
  grad_staging_unit,  // stages 0-1 with every gradient borrowed, under offload: one unit from the trainer's arrays
  bucket,         // stages 2-3: gradient bucket `index`
  rs_tmp,         // stages 2-3 with accumulation, no offload: one reduce-scatter slice
  slot,           // stage 3: gathered unit `index`
  persistent,     // stage 3: unit `index` kept gathered
  scalars,        // step control block and step scalars on the device (see ControlLayout)
  host_scalars,   // their host copy (pinned)
  init_staging,   // host staging for initial values (transient: freed by initialize)
  agreement,      // world > 1: initialize()'s agreement records, 0 on the device, 1 on the host (transient)
  // ---- offload (offload/): see offload/offload_engine.hpp for the pipeline these serve
  host_grad,      // optimizer offload: the reduced gradient copied down, one element per state element
  grad_staging,   // optimizer offload, stages 2-3 with accumulation: one reduced slice on its way into host_grad
  param_ring,     // optimizer offload: updated compute-dtype chunk `index` on its way up (ring)
  io_ring,        // nvme: aligned read/update/write buffers, all ring entries in one buffer
  nvme_file,      // nvme: bytes on disk (Place::disk, never allocated: the store reports them)
  // ---- compressed optimizer state (Config::state_precision; shardopt/state_precision.hpp)
  state_scales    // int8 state: the fp32 block scales of optimizer state `index`
};

// The floats of one rank's record in initialize()'s agreement (engine/agreement.cpp): a header of
// 7 values and up to 480 bytes of a failure's message, one byte per float.
inline constexpr std::size_t kAgreementRecordFloats = 7 + 480;

struct BufferSpec {
  Buf kind;
  int index = 0;
  std::size_t elems = 0;
  DType dtype = DType::fp32;
  Category category = Category::other;
  Place place = Place::device;
  std::string name;
  bool transient = false;
};

// How the offload engine walks the state: cells of `chunk_elems` state elements, `ring` of them
// in flight (read ahead / updated / written back or copied up).
struct OffloadPlan {
  bool enabled = false;
  std::size_t state_elems = 0;   // elements of master (and of each state): S, or P at stage 0
  std::size_t chunk_elems = 0;   // elements per cell; a multiple of kNvmeAlignElems
  std::size_t cells = 0;
  int ring = 3;                  // read i+1 | update i | write i-1
  DType grad_dtype = DType::fp32;
  std::size_t cell_bytes = 0;    // nvme: one cell on disk (master + states), 4 KiB aligned
  std::size_t file_bytes = 0;    // nvme: header + two generations of every cell
};

// The scalars buffers: first the step-control block (StepState, then each parameter group's
// Hyperparams, then each group's StepScalars, then kHyperStagingSlots Hyperparams that
// set_hyperparams() stages its copies in (used in the host copy only), every part 64-byte
// aligned), then `floats` fp32
// scalars: [0] non-finite flag, [1] constant one, [2..3] the totals (sum of squares, flag) that
// the ranks all-reduce, then one partial sum of squares per update range.
inline constexpr int kHyperStagingSlots = 8;
struct ControlLayout {
  std::size_t groups = 0;
  std::size_t hyper = 0;    // byte offsets
  std::size_t scalars = 0;
  std::size_t staging = 0;  // end of the step-control block proper
  std::size_t floats = 0;   // byte offset of the fp32 scalars
  std::size_t float_count = 0;
  std::size_t total_floats() const noexcept { return floats / 4 + float_count; }
};
ControlLayout control_layout(std::size_t groups, std::size_t float_count) noexcept;

// Parameter groups in the order of their step-control slots: group 0 and every group a tensor
// uses, ascending.
std::vector<int> control_groups(const Layout& layout);

// Where each kind of buffer lives: the stage, precision and offload settings turned into data,
// decided once by plan_engine. The engine's parts (state store, gradient reducer, parameter
// gatherer, step runner) read this table; none of them looks at Config::stage.
//
//   stage | parameters            | gradients                    | master and optimizer state
//   0     | full                  | full, all-reduced at step()  | full
//   1     | full, re-gathered     | full, reduce-scattered at step() | sharded
//   2     | full, re-gathered     | bucketed, reduce-scattered at grads_ready | sharded
//   3     | sharded, gathered per unit into slots | bucketed      | sharded
// and independently of the stage: the state on the device, in pinned host memory or on NVMe
// (offload_optimizer), the parameter shard on the device or in pinned host memory (offload_params).
enum class Tier : unsigned char { device, pinned_host, nvme };
enum class GradFlow : unsigned char {
  all_reduce,      // full gradients, all-reduced whole at step()
  reduce_scatter,  // full gradients, each unit reduce-scattered at step()
  bucketed         // per-unit buckets, reduce-scattered into the shard as each unit reports ready
};
struct Placement {
  bool params_sharded = false;  // only this rank's slices are kept; units are gathered on acquire
  Tier params_tier = Tier::device;
  GradFlow grads = GradFlow::all_reduce;
  // bucketed, one rank, no accumulation, no cast, no offload, every slice its whole unit: backward
  // adds straight into the gradient shard (no bucket, no copy; the update zeroes it as it reads).
  bool grads_direct = false;
  DType shard_grad_dtype = DType::fp32;  // the reduced gradient shard (fp32 when bucketed micro-steps accumulate)
  bool state_sharded = false;  // master and moments cover this rank's shard (else every element)
  Tier state_tier = Tier::device;
  // The fp32 parameters (the engine's, or the trainer's with params_in_trainer) are the master
  // weights (fp32 compute, state on the device): no copy.
  bool master_is_params = false;
  // After the update, the full parameters are re-assembled from every rank's updated slice.
  bool gather_after_update = false;
  // The gradient norm is a sum over ranks (each holds a part of the reduced gradient).
  bool norm_across_ranks = false;
  // Optimizer offload: each unit's reduced gradient goes down to the pinned host copy as soon as it
  // lands, and the device keeps no reduced copy of its own: no gradient shard (stages 1-3) and no
  // all-reduced copy in the reduce dtype (stage 0). The reduction runs in place in the bucket or in
  // the one-unit reduce buffer, which is reused once the download has read it; the partial norms
  // are measured there before that (or, with micro-steps at stages 2-3, on the host copy the
  // micro-steps accumulate into). Stages 0-1 with reduce dtype == compute dtype still reduce in
  // place in the full gradients, which the trainer needs anyway.
  bool grads_to_host = false;
  // Stages 0-1 with every tensor's gradient borrowed (Engine::borrow_gradients): the trainer's
  // arrays are the full gradient (micro-steps summed there), so the engine keeps no full gradient
  // buffer. Stage 1: at step(), unit by unit, the unit's borrowed tensors are reduce-scattered
  // into the gradient shard from the trainer's arrays (grads_from_trainer), or, under offload,
  // copied into one unit-sized staging buffer (its alignment gaps zero), cast into the reduce
  // buffer if the dtypes differ, reduced in place there and sent down before the next unit reuses
  // it: the values, and the one reduction per step, of the full-gradient path. Stage 0: each
  // tensor is all-reduced in place in the trainer's array, and the update reads it there
  // (grads_in_trainer); with a reduce dtype each tensor is cast into the all-reduced copy instead,
  // and under offload the staging unit serves as at stage 1.
  bool grads_borrowed = false;
  // Stage 0, grads_borrowed, no offload, reduce dtype == compute dtype: the update ranges follow
  // the tensors and read the all-reduced gradient in the trainer's arrays.
  bool grads_in_trainer = false;
  // Stages 1-3 with every tensor's gradient borrowed, no offload: each unit's tensors are
  // reduce-scattered from the trainer's arrays into the gradient shard, where they are
  // (Communicator::reduce_scatter_pieces) or, with a reduce dtype, each cast into the one-unit
  // reduce buffer (its gaps zero) and reduced there. Stages 2-3: no buckets; when a unit's last
  // block reports ready, and the tensors are then zeroed there, on side. Stage 1: at step(),
  // after the micro-steps summed there (grads_borrowed), with no staging unit.
  bool grads_from_trainer = false;
  // Stages 0-2 with every tensor's parameters borrowed (Engine::borrow_parameters): no parameters
  // of the engine's own, full or sharded; the update (or the offload engine's upload) writes this
  // rank's compute-dtype parameters straight into the trainer's arrays, and the update ranges
  // follow the tensors. With master_is_params (fp32 compute, state on the device) the trainer's
  // arrays are then the master weights themselves (this rank's elements of them). At stages 1-2
  // (world > 1) each unit is then all-gathered through one unit-sized slot: this rank's elements
  // copied in from the trainer's arrays, gathered in place, the others' copied out.
  bool params_in_trainer = false;
  // The update ranges are cut at every tensor and skip the alignment gaps between tensors (whose
  // elements are zero everywhere and stay zero): they address the trainer's per-tensor memory.
  bool ranges_follow_tensors() const noexcept { return grads_in_trainer || params_in_trainer; }
};

struct EnginePlan {
  Layout layout;
  Placement placement;
  ControlLayout control;
  std::vector<BufferSpec> buffers;
  OffloadPlan offload;
};

// Offload cells: 1 Mi elements by default (4 MiB per fp32 field). O_DIRECT wants 4 KiB-aligned
// offsets and sizes, so a cell is a multiple of 1024 fp32 elements.
inline constexpr std::size_t kOffloadChunk = std::size_t(1) << 20;
inline constexpr std::size_t kNvmeAlign = 4096;
inline constexpr std::size_t kNvmeAlignElems = kNvmeAlign / 4;
inline constexpr std::size_t kNvmeHeaderBytes = 2 * kNvmeAlign;  // two header slots (see nvme_store.hpp)
// Test-only: overrides the cell size (rounded up to kNvmeAlignElems; 0 restores the default) so
// that small test models span several cells and exercise the pipeline.
void set_offload_chunk_for_testing(std::size_t elems) noexcept;

// Bytes one optimizer state takes in one offload cell of `chunk` elements: fp32 4 per element;
// compressed (Config::state_precision) its codes, then (int8) the cell's chunk/block scales. An
// NVMe cell is [master (4*chunk) | state 0 | state 1], rounded up to kNvmeAlign.
inline constexpr std::size_t cell_state_bytes(StatePrecision p, std::size_t chunk, std::size_t block) noexcept {
  return p == StatePrecision::fp32   ? 4 * chunk
         : p == StatePrecision::bf16 ? 2 * chunk
                                     : chunk + 4 * (chunk / block);
}

inline constexpr std::size_t kInitChunk = std::size_t(1) << 20;

LayoutOptions layout_options(const Config& config, int world_size);
// params_borrowed: every tensor with elements has borrowed parameters (Engine::borrow_parameters).
// At stages 0-2 the engine then keeps no parameters of its own (Placement::params_in_trainer).
// grads_borrowed: every tensor with elements has borrowed gradients (Engine::borrow_gradients).
// At stages 0-1 the engine then keeps no full gradient buffer (Placement::grads_borrowed); at
// stages 2-3 no buckets, when nothing needs them (Placement::grads_from_trainer).
EnginePlan plan_engine(const Config& config, const std::vector<BlockSpec>& blocks, int world_size,
                       bool params_borrowed = false, bool grads_borrowed = false);

}  // namespace shardopt::detail
