#pragma once
// Engine: the one object a trainer talks to. The same calls work at every ZeRO stage.
//
// Lifecycle (per rank; every rank makes the same calls in the same order):
//   Engine e(config, backend, communicator);
//   e.register_block({"layer0", {{"w", {out, in}}, {"b", {out}, /*group*/ 1}}});   ...
//   e.set_group(1, no_decay_hyperparams);             // optional per-group hyperparameters
//   e.initialize();                                   // plans and allocates everything
//   for each step:
//     for each micro-step (config.accumulation_steps of them):
//       forward:  v = e.acquire(b); ... use v.params ...; e.release(b);
//       backward: v = e.acquire(b); g = e.gradients(b); ... g[i] += dL/dparam_i ...;
//                 e.grads_ready(b); e.release(b);        // blocks in any order, each once
//     StepResult r = e.step();
//
// Gradient contract. gradients(b) returns, for each tensor of block b, a buffer in the compute
// dtype into which the trainer ADDS the gradient of its micro-batch. It may already hold earlier
// micro-steps' sum (stages 0-1) or be zero (stages 2-3); with accumulation_steps == 1 it is always
// zero, so writing equals adding. The buffers are valid until grads_ready(b). The gradient the
// rule applies is the mean over ranks and micro-steps, divided by the loss scale.
//
// Memory and streams. On the CPU backend every view is host memory, usable by the caller as soon
// as the call returns. On a GPU backend views are device memory, ordered on compute_stream():
// acquire makes that stream wait for the gather; grads_ready records the trainer's writes on it.
//
// View addresses across calls and steps (what the engine does now; nothing beyond it is promised).
// Every buffer is allocated by initialize() and kept until the engine is destroyed.
//   acquire(b), stages 0-2: the view points into the engine's full compute-dtype parameter
//     buffer: the same addresses at every acquire for the engine's life. step() rewrites the
//     values in place (stage 0: the update; stages 1-2: the all-gather of the updated shards).
//   acquire(b), stage 3: a unit below persistence_threshold lives in a buffer of its own (same
//     addresses every time); any other unit is gathered into one of a few slots picked least
//     recently used, so the addresses may differ at every acquire, and step() invalidates every
//     slot (the next acquire gathers again). Such a view is valid only until release(b).
//   gradients(b), stages 0-1: the full gradient buffer: the same addresses every micro-step and
//     step. step() and zero_grad() zero it.
//   gradients(b), stages 2-3: one of Config::gradient_buckets bucket buffers, taken when the
//     unit's first block asks and freed when its gradients have been reduce-scattered, so the
//     address depends on the order of the calls and may change every micro-step. Valid until
//     grads_ready(b). (With one rank, one micro-step and no dtype change the view is the gradient
//     shard itself; do not rely on it.) Blocks may report in any order: see "Backward order".
//
// Backward order (stages 2-3). Any order of gradients()/grads_ready over the blocks works, with
// these costs:
//   - Cheapest: a unit's blocks all report grads_ready before more than gradient_buckets units
//     are open at once, e.g. blocks last to first as a layer-by-layer backward produces them. Each
//     unit is reduce-scattered once, overlapping the rest of backward.
//   - Any other order (blocks of many units reported interleaved): when a unit opens and every
//     bucket holds another unit, the least recently opened unit none of whose blocks still holds a
//     view (gradients() without grads_ready) is flushed: its bucket is reduce-scattered now and
//     the blocks reported so far are written into the shard; its later blocks take a fresh bucket
//     and are written by one more reduce-scatter. Cost per flush: one extra reduce-scatter of a
//     padded unit (the unit's bytes in the reduce dtype, as counted by comm_report()), and the
//     next gradients() waits until the flushed bucket is free. No extra memory. The result is bit
//     for bit the in-order one: each element is written by exactly one reduction per micro-step,
//     and a reduce-scatter's sum of one element does not depend on the others. (Under optimizer
//     offload with one micro-step, a step with a flush measures the gradient norm on the host
//     copy, which on the CPU backend gives the same bits.) Flushing depends only on the sequence
//     of calls, which every rank makes identically, so every rank flushes the same unit together.
//   - A backward that holds the views of more units than there are buckets (gradients() of
//     every block before any grads_ready, a single pass over the whole model) cannot be served by
//     flushing: gradients() then throws Error(invalid_state) naming the blocks whose views are
//     open. Set Config::gradient_buckets = 0 (one bucket per unit: the whole gradient, so stage 2
//     keeps only stage 1's memory for gradients) or enough buckets for the units it holds.
//   - Every tensor's gradient borrowed (borrow_gradients; no optimizer offload):
//     no buckets, so no flushes either: each unit is reduce-scattered from the trainer's arrays
//     once its last block reports ready, in whatever order the blocks come.
//   The trainer writes a gradient view only between gradients(b) and grads_ready(b), and reads or
//   writes a parameter view only between acquire(b) and release(b), even where the address is
//   stable: outside those brackets the engine's streams may be reading or writing it.
//
// Holding a block across step(). Every block must have reported grads_ready before step() (else
// Error(invalid_state) listing the blocks). An acquired block may stay acquired across step() at
// stages 0-2: its view stays valid and holds the updated parameters once step() returns (after
// step_async(), only after the next synchronizing call, or a fresh acquire(), which waits for
// the step on the CPU backend and orders after it on compute_stream() on a GPU). At stage 3
// step() refuses a block still acquired (Error(invalid_state) naming it): release every block
// first.
//
// Nothing is allocated after initialize(): step() and the per-block calls reuse planned buffers.
// Thread safety: one Engine is driven by one thread at a time.
// Errors: every misuse throws shardopt::Error naming the block, tensor or field; the engine state
// is unchanged and it stays usable.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/config.hpp"
#include "shardopt/layout.hpp"
#include "shardopt/memory.hpp"

namespace shardopt {

namespace detail {
class CheckpointPort;  // internal (src/engine/checkpoint_port.hpp)
}

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::fp32;
  std::size_t numel = 0;
  const Layout::TensorInfo* info = nullptr;  // name, shape, group
  template <class T>
  T* as() const noexcept {
    return static_cast<T*>(data);
  }
};

struct BlockView {
  int block = -1;
  std::vector<TensorView> tensors;  // in registration order
};

struct StepResult {
  bool applied = false;       // false: skipped because a gradient was not finite on some rank
  std::int64_t step = 0;      // updates applied so far (the optimizer's step counter)
  float loss_scale = 1.0f;    // the scale to multiply the next loss by
  double grad_norm = 0.0;     // global L2 norm of the mean gradient, before clipping
  float clip_coefficient = 1; // factor applied to the gradient (1 when not clipped)
  float lr = 0.0f;            // learning rate group 0 applied (its schedule's value at `step`);
                              // a skipped step reports the last applied one
};

// Fills `count` consecutive fp32 elements of tensor `tensor` starting at `begin` (row-major
// element index). Called only for the ranges a rank stores, possibly several times per tensor.
// `tensor` is the layout's record: name, shape, group, block, and `index`, the tensor's position
// in registration order over all blocks (what the trainer's own arrays are usually indexed by).
// Stage 0: every rank gets every whole tensor; stages 1-3: each element goes to exactly one rank.
// `out` is host memory on every backend (a staging buffer; at most 2^20 elements per call); the
// values become the fp32 master weights, and the compute-dtype parameters are cast from them.
// Called on the thread that calls initialize(), before initialize() returns, never afterwards.
using InitFn = std::function<void(const Layout::TensorInfo& tensor, std::size_t begin,
                                  std::size_t count, float* out)>;

// Seeded initializer independent of world size and stage: element i of tensor t gets
// uniform(-a, a) from a counter-based hash of (seed, t's name, i), a = 1/sqrt(last extent) for
// tensors of rank >= 2; tensors of rank <= 1 start at zero.
InitFn seeded_init(std::uint64_t seed);

class Engine {
 public:
  // config is validated here (Error on a bad field). backend and communicator must outlive the
  // engine; the communicator's size is the data-parallel world.
  Engine(const Config& config, Backend& backend, Communicator& communicator);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Before initialize(). Returns the block index. Names must be unique (blocks and tensors).
  int register_block(const BlockSpec& block);
  // Hyperparameters of a parameter group (group 0 defaults to config.hyper; other groups to
  // group 0's unless set). Before initialize().
  void set_group(int group, const Hyperparams& hyper);
  // Changes a group's hyperparameters (learning rate, schedule, betas, ...) during training. Before
  // initialize() it is set_group(). After, the values take effect at the next step enqueued, in
  // stream order: they are copied into the step-control block in backend memory on the engine's
  // side stream, behind any step in flight (which keeps the values it started with), so a step
  // captured in a CUDA graph reads them at every replay; call it outside a capture. Does not wait
  // for the step in flight (it waits only when more than 8 such copies are still queued). Throws
  // Error(invalid_argument), changing nothing, for a value set_group would refuse or, after
  // initialize(), a group no tensor uses and that was never set. Not thread-safe (like every call).
  void set_hyperparams(int group, const Hyperparams& hyper);
  // set_hyperparams() with only the (peak) learning rate changed.
  void set_lr(int group, float lr);
  // The group's current hyperparameters (group 0's for a group never set, before initialize()).
  Hyperparams hyperparams(int group) const;

  // ---- borrowed gradient memory (the trainer's own gradient arrays)
  // Before initialize(): tensor `tensor` (its index in registration order over all blocks, as
  // Layout::TensorInfo::index) keeps its gradient in the trainer's memory at `grads`: numel
  // elements of the compute dtype, contiguous, in backend memory (host memory on the CPU backend,
  // device memory on a GPU backend). Tensor-major arrays ([L, ...]) are borrowed slice by slice:
  // layer l's tensor at base + l * stride. nullptr returns the tensor to engine memory. The
  // memory must stay valid, at this address, for the engine's life; the engine does not own it.
  // What changes:
  //   gradients(b) returns `grads` for the tensor (the same address every micro-step and step), and
  //     for a block whose every tensor is borrowed it takes no bucket: a backward may hold the
  //     views of every block at once (a single pass over the model) with the default buckets.
  //   grads_ready(b) reads the block's borrowed gradients, in order on compute_stream() (on the
  //     CPU backend before it returns): it copies them into the unit's bucket (stages 2-3 with
  //     some tensor not borrowed, or under optimizer offload; any backward order, see "Backward
  //     order") or the full gradient (stages 0-1 when some tensor's gradient is not borrowed). At
  //     stages 0-1 with every tensor's gradient borrowed grads_ready reads nothing: step() reads
  //     the trainer's arrays (below). At stages 2-3 with every tensor's gradient borrowed (no
  //     optimizer offload) nothing is copied: when the last block of a unit reports ready, the
  //     unit's tensors are reduce-scattered from where they are into the gradient shard
  //     (Communicator::reduce_scatter_pieces: the in-process communicator reads them in place;
  //     MPI, TCP and NCCL pack them into their own scratch first; with a reduce dtype other than
  //     the compute dtype each tensor is cast into the one-unit reduce buffer instead, which is
  //     reduced) on the engine's side stream, after compute_stream(), and then zeroed there. The
  //     trainer then writes a block's gradient for the next micro-step only after the last
  //     grads_ready of this one: compute_stream() waits there for these reductions (on the CPU
  //     backend the host does), so the next micro-step's forward does not overlap the last
  //     unit's reduction.
  //   The contract of the gradient stays: the trainer ADDS into it. The engine zeroes borrowed
  //   memory at initialize(), after reading it at grads_ready (stages 2-3, where every micro-step
  //   starts from zero), at the end of step() (stages 0-1, which sum micro-steps there), and at
  //   zero_grad(). The trainer writes it only between the end of a step (step() returned, or
  //   after step_async() in order on compute_stream()) and grads_ready(b), like a view.
  //   With every gradient borrowed at stages 0-1 nothing is read at grads_ready(b): step() reads
  //   the trainer's arrays (the sum of the micro-steps) on its side stream, after
  //   compute_stream(), and zeroes them; the trainer must not write them from step() until step()
  //   returned (after step_async(): until then in order on compute_stream()). Stage 0 also
  //   computes in them: the all-reduce runs in place there, so between step() and its end they
  //   hold the averaged gradient, which the trainer must not read either.
  // Memory, per stage:
  //   stages 2-3 with every tensor's gradient borrowed, no optimizer offload:
  //     no buckets at all (Config::gradient_buckets does not apply); the engine keeps the
  //     gradient shard only (and, with a reduce dtype, its one-unit reduce buffer). Otherwise at stages 2-3: no full gradient anywhere but in the
  //     trainer's memory (the engine's buckets and shard as before; a bucket copy per block at
  //     grads_ready).
  //   stage 1 with every tensor's gradient borrowed: no full gradient of the engine's own. The
  //     trainer's arrays are the full gradient (micro-steps summed there); step() reduce-scatters
  //     each unit's tensors straight from them into the gradient shard (the stage's one reduction
  //     per step, the same bits as from the engine's full gradient; with a reduce dtype other
  //     than the compute dtype each tensor is cast into the one-unit reduce buffer, reduced
  //     there). Engine memory: the shard (1/N) instead of the full gradient. Under optimizer
  //     offload each unit is first copied into one unit-sized staging buffer, reduced there and
  //     sent down (no shard). Every rank must borrow every tensor's gradient for this (checked at
  //     initialize()).
  //   stage 0 with every tensor's gradient borrowed: no full gradient of the engine's own. Each
  //     tensor is all-reduced in place in the trainer's array (one all-reduce per tensor instead
  //     of one per unit: more, smaller collectives), the norm is measured and the update reads it
  //     there. With a reduce dtype other than the compute dtype the engine still keeps the
  //     all-reduced copy in the reduce dtype (each tensor cast into it): the update reads the
  //     whole reduced gradient at once, after the global norm. Under optimizer offload each unit
  //     goes through one staging unit, all-reduced there and sent down. Every rank must borrow
  //     every tensor's gradient for this (checked at initialize()).
  //   stages 0-1 with some tensor not borrowed: the engine keeps its full gradient buffer, a copy
  //     of the borrowed tensors per micro-step.
  // memory_report().borrowed counts the borrowed bytes, apart from what the engine owns. Every
  // rank must borrow the same tensors' gradients and parameters (it decides which collectives run
  // when): initialize() checks it with the configuration and fails every rank with
  // Error(communication) otherwise. Throws Error(invalid_argument) for an unknown
  // tensor, and Error(invalid_state) after initialize().
  void borrow_gradients(int tensor, void* grads);

  // ---- borrowed parameter memory (the trainer's own parameter arrays)
  // Before initialize(): tensor `tensor`'s compute-dtype parameters are (also) kept in the
  // trainer's memory at `params` (numel elements, contiguous, backend memory, valid and at this
  // address for the engine's life; nullptr undoes it). The engine writes the current values there
  // at the end of initialize(), of every step() that applied an update and of load(), in order on
  // its side stream before compute_stream() resumes (on the CPU backend: before step() returns,
  // or, after step_async(), before the next acquire()/gradients() returns). The trainer only reads
  // it; the engine overwrites whatever is written there.
  // acquire(b) returns `params` for the tensor (the same address for the engine's life); a block
  // whose every tensor is borrowed is not gathered at acquire (stage 3 included) and takes no
  // slot, so such blocks may also be read without acquire(), between steps.
  // What it costs and saves, per stage:
  //   stages 0-2 with every tensor's parameters borrowed: the engine keeps no compute-dtype
  //     parameters of its own, full or sharded: the update (or, under offload, the upload of each
  //     updated cell) writes this rank's elements straight into the trainer's arrays. Stage 0
  //     updates every element; stages 1-2 (N > 1 ranks) update their slices and then all-gather
  //     each unit through one unit-sized slot: this rank's elements are copied in from the
  //     trainer's arrays, the slot is gathered in place, the other ranks' elements are copied
  //     out (the stage's all-gather, plus a copy of the unit). Memory: one unit (none at stage 0
  //     or on one rank) instead of the full parameters or a shard. With fp32 compute and the
  //     state on the device the trainer's arrays are the master weights themselves (this rank's
  //     elements of them; the engine's state is then only the optimizer moments): the trainer
  //     must not write them, or it changes the master weights. Every rank must borrow every
  //     tensor (the ranks check it at initialize()).
  //   some tensor not borrowed at stages 0-2: the engine still holds its own full compute-dtype
  //     parameters (the update writes them; stages 1-2 all-gather them in place); every step
  //     copies the borrowed tensors out of them (no communication beyond the stage's).
  //   stage 3: the engine holds its shard and slots as usual; every step gathers each unit that
  //     holds a borrowed tensor once (into slot 0, in turn) and copies it out: the all-gather a
  //     layer-by-layer stage-3 forward would do, once per step instead of once per acquire. The
  //     trainer thereby keeps full parameters itself, which is what stage 3 exists to avoid: use
  //     it when the trainer's compute needs its own full arrays anyway.
  // So at every stage, with both parameters and gradients borrowed, the engine holds no
  // unsharded copy of either (buckets, slots and staging of one unit each aside; stage 0's
  // all-reduced copy when the reduce dtype differs); the trainer's own arrays are its only full
  // copies. Holding a block across step() is allowed for fully borrowed blocks at every stage
  // (their memory is the trainer's, rewritten when the step ends).
  // memory_report().borrowed counts these bytes too. Errors as borrow_gradients.
  void borrow_parameters(int tensor, void* params);

  // Plans the layout, allocates every buffer, and sets initial values (master weights from
  // `init`, or seeded_init(0) if empty). Collective: every rank calls it. The ranks agree first on
  // the configuration (all but nvme_dir), the model and every group's hyperparameters, and at
  // stage 0 (where every rank computes every initial value) on the initial values too: a
  // difference throws Error(communication) on every rank, naming the ranks that differ. A rank
  // that fails on its own (a configuration it cannot plan, an NVMe directory without room, an
  // allocation, a throwing `init`) makes every other rank throw Error("rank R failed in
  // initialize(): ...") at once instead of leaving them waiting; that rank gets its own exception
  // back as it was thrown. A failed initialize() leaves nothing allocated.
  void initialize(const InitFn& init = {});

  const Config& config() const noexcept;
  const Layout& layout() const;  // after initialize()
  int rank() const noexcept;
  int world_size() const noexcept;
  Stream& compute_stream() noexcept;

  int find_block(const std::string& name) const;  // throws if unknown

  // Full compute-dtype parameters of a block (stage 3: gathers its unit, prefetching the next).
  BlockView acquire(int block);
  void release(int block);
  // Where to add the block's gradients for this micro-step (see the gradient contract).
  BlockView gradients(int block);
  // The block's gradients for this micro-step are written. Stages 2-3 start the reduce-scatter
  // of a unit as soon as all its blocks are ready.
  void grads_ready(int block);

  // Reduces (as needed), checks for overflow, clips, updates and redistributes parameters.
  // Requires exactly accumulation_steps complete micro-steps. Collective.
  // step() is step_async(), then a wait for the step's work to finish, then last_result():
  // when it returns, the update and the parameter gathers have run.
  StepResult step();
  // The same step, enqueued without waiting on the host: the non-finite check, the gradient norm
  // (all-reduced across ranks), the clip coefficient, the loss scaler and every group's step
  // scalars are computed by the backend in stream order (include/shardopt/step_control.hpp), and
  // the update kernels read them, and the skip flag, from backend memory. compute_stream() is
  // made to wait for the whole step, so work the trainer enqueues there afterwards sees the new
  // parameters; on the CPU backend the next acquire()/gradients() waits for it on the host. With
  // no offload, and a communicator whose collectives are stream work (NCCL), a step on a GPU has
  // no host synchronization and can be captured in a CUDA graph. With optimizer offload the CPU
  // update needs the decisions on the host, so step_async() waits for them (and for the update).
  // Errors of enqueued work surface at the next synchronizing call (step(), last_result(),
  // save(), read_master(), ...). Same preconditions and argument errors as step().
  //
  // CUDA graphs. Capture one whole iteration (acquire ... grads_ready ... step_async()) with
  // cudaStreamBeginCapture on cuda_stream_handle(compute_stream()), and launch the graph on that
  // same stream. At least one whole iteration must have run eagerly first (NCCL connections and
  // anything made at first use are not capturable): a capture before it is refused with
  // Error(invalid_state) by acquire() or step_async(), state untouched. The graph owns nothing:
  // it uses the engine's buffers, events and the communicator's reduction scratch (reserved at
  // initialize(), and never moved once captured), so the engine must outlive it. Eager calls
  // after launches are fine (they order themselves after compute_stream(), where the graph runs),
  // and so is a second capture.
  void step_async();
  // The StepResult of the last step (applied = false and step = 0 before the first one). Waits
  // only until that step's decisions are known, not for its update. After a captured step it
  // waits for the device and returns the result of the last launch of the graph (each launch
  // copies its StepState to host memory), every time it is called; not during a capture.
  StepResult last_result();
  // Backend memory holding the current loss scale (one float) for a loss kernel to read in stream
  // order: each step rewrites it on the engine's side stream, before compute_stream() resumes.
  // Stays valid for the engine's lifetime. After initialize().
  const float* loss_scale_buffer() const;
  // Drops the gradients accumulated so far (the micro-step count restarts).
  void zero_grad();

  // Current fp32 master values of the elements this rank owns, through `fn(tensor, begin, count,
  // values)` for each piece of its shard (for checkpoints and tests).
  void read_master(const std::function<void(int tensor, std::size_t begin, std::size_t count,
                                            const float* values)>& fn);
  // Same for optimizer state `which` (0 or 1, up to state_count(rule)-1).
  void read_state(int which, const std::function<void(int tensor, std::size_t begin,
                                                      std::size_t count, const float* values)>& fn);

  // ---- checkpoints (the format: include/shardopt/checkpoint.hpp and the README)
  // Writes this engine's state into directory `dir` (created if missing). Collective: every rank
  // calls it with the same path, on a file system all ranks share. Saved: the fp32 master weights
  // and every optimizer state, element for element; the step count; the loss-scaler state
  // (scale, good_steps, overflow_run); and, for the record, world size, stage, dtypes, the rule
  // and every group's hyperparameters. Not saved: gradients accumulated in an unfinished step
  // (save between steps to resume bit for bit), the compute-dtype parameters (they are the
  // master rounded, and load recomputes them).
  // Every rank writes the elements it owns into its own file, in parallel (stage 0: the ranks
  // split the model into equal element ranges); rank 0 then writes the manifest, last.
  // Atomic: files are written under temporary names, fsynced and renamed, and the manifest,
  // replaced by rename, is the commit point. Saving into a directory that already holds a
  // checkpoint writes a new generation of files beside it and removes the old generation only
  // after the new manifest is durable, so a crash at any point leaves the previous checkpoint or
  // the new one, never a mix. Synchronous: returns after the commit on every rank.
  // One saver at a time: rank 0 holds an exclusive lock (flock on `dir`/lock) for the whole save;
  // a second job saving into the same directory meanwhile gets Error(io_error) naming the holder
  // (pid, host, since when) on every one of its ranks, before it writes anything. The manifest
  // carries a checksum of its own content (format version 2), so an edited manifest is refused.
  // Compressed optimizer state (Config::state_precision) is stored in its own precision (format
  // version 3: 2 bytes per bf16 element, 1 per int8 element plus one per quantization block).
  // Errors (Error(io_error) naming the file) are thrown on every rank; the engine is unchanged
  // and the previous checkpoint in `dir`, if any, is still the valid one.
  // `trainer_metadata`: a record of the trainer's own (its data position, a run name; UTF-8 text
  // of at most 1 MiB, e.g. JSON) kept in the manifest, covered by its checksum, and returned by
  // load(). Rank 0's is the one kept.
  void save(const std::string& dir, const std::string& trainer_metadata = {});
  // Replaces this engine's master weights, optimizer states, step count and (if both use the same
  // loss-scaling mode) loss-scaler state with the checkpoint's. Collective. The checkpoint may
  // come from any world size and stage and any compute dtype; each rank reads (pread) only the
  // byte ranges it now owns, verifies their checksums, and commits only when every rank has
  // verified everything it needs. The engine's own hyperparameters are kept (the checkpoint's are
  // informational). Requires: initialize() done, no step in progress (no grads_ready since the
  // last step()/zero_grad()), the same tensors (names and shapes) as the checkpoint, the same
  // optimizer rule. With offload_optimizer=nvme the verified values are written into the rank's
  // NVMe state file; an I/O error during that write (after every rank verified the checkpoint)
  // leaves the state partly loaded, and the error says so.
  // Errors: a missing manifest, unknown format version, truncated or missing shard file, checksum
  // mismatch, tensor name/shape mismatch or different rule throws Error naming the file and the
  // tensor on every rank, and leaves the engine exactly as it was and usable.
  // Returns the trainer metadata the checkpoint was saved with ("" if none).
  std::string load(const std::string& dir);

  // Background checkpoints. save_async(dir) does what save(dir) does, but returns as soon as this
  // rank's values are captured: it takes the lock and agrees on the generation (collective, as
  // save), copies this rank's share of the master weights and optimizer states into one host
  // staging buffer (memory_report() counts it as Category::other at Place::host while the save is
  // in flight: (1 + states) x 4 bytes per owned element), and a thread of its own writes the
  // shard file from that copy while training goes on. wait_save() (collective) waits for the
  // writers and commits the manifest on rank 0; until then the previous checkpoint in `dir`
  // stays the valid one, with the same crash guarantees as save(). save(), save_async(), load()
  // and the destructor first finish a save in flight (the destructor without committing it).
  // The checkpoint holds the state as it was at save_async(): steps taken meanwhile are not in
  // it. Errors of the write surface at wait_save(), on every rank.
  void save_async(const std::string& dir, const std::string& trainer_metadata = {});
  void wait_save();
  bool save_in_flight() const noexcept;

  // What the engine allocated (current, peak), and in `borrowed` the trainer memory it uses.
  MemoryReport memory_report() const;
  // Collective traffic since the last reset, per kind (see CommStats for the accounting).
  CommStats comm_report() const;
  void reset_comm_report();

 private:
  struct Impl;
  struct AsyncSave;
  // Checkpoints (save, load) reach the engine's state only through this interface.
  detail::CheckpointPort& checkpoint_port();
  struct AsyncSaveDeleter {
    void operator()(AsyncSave* a) const noexcept;
  };
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<AsyncSave, AsyncSaveDeleter> async_save_;  // after impl_: destroyed first
};

}  // namespace shardopt
