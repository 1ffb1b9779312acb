#include "engine/plan.hpp"

#include <algorithm>
#include <atomic>
#include <numeric>

#include "shardopt/error.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt::detail {

namespace {
std::atomic<std::size_t> g_offload_chunk_override{0};
}
void set_offload_chunk_for_testing(std::size_t elems) noexcept { g_offload_chunk_override.store(elems); }

LayoutOptions layout_options(const Config& config, int world_size) {
  LayoutOptions lo;
  lo.world_size = world_size;
  lo.alignment = config.alignment;
  // int8 state: quantization blocks are cut on each tensor's own element index, so tensor starts
  // and rank slices are aligned to the block size: no block straddles a shard boundary.
  if (config.state_precision == StatePrecision::int8) lo.alignment = std::lcm(config.alignment, config.quant_block);
  lo.bucket_elems = std::max<std::size_t>(1, config.bucket_bytes / size_of(config.compute_dtype));
  return lo;
}

ControlLayout control_layout(std::size_t groups, std::size_t float_count) noexcept {
  const auto up = [](std::size_t b) { return (b + 63) / 64 * 64; };
  ControlLayout c;
  c.groups = groups;
  c.hyper = up(sizeof(StepState));
  c.scalars = c.hyper + up(groups * sizeof(Hyperparams));
  c.staging = c.scalars + up(groups * sizeof(StepScalars));
  c.floats = c.staging + up(kHyperStagingSlots * sizeof(Hyperparams));
  c.float_count = float_count;
  return c;
}

std::vector<int> control_groups(const Layout& layout) {
  std::vector<int> g{0};
  for (const auto& t : layout.tensors()) g.push_back(t.group);
  std::sort(g.begin(), g.end());
  g.erase(std::unique(g.begin(), g.end()), g.end());
  return g;
}

EnginePlan plan_engine(const Config& cfg, const std::vector<BlockSpec>& blocks, int world, bool params_borrowed,
                       bool grads_borrowed) {
  cfg.validate();
  require(world >= 1, ErrorCode::invalid_argument, "world size must be >= 1, got " + std::to_string(world));
  // The CPU update is what writes an offloaded parameter shard; without it the device update
  // kernels would have to write host memory.
  require(!cfg.offload_params || cfg.offload_optimizer != OffloadKind::none, ErrorCode::unsupported,
          "offload_params=true requires offload_optimizer=host or nvme (the parameter shard is updated by the CPU)");
  EnginePlan p;
  p.layout = Layout::build(blocks, layout_options(cfg, world));
  const Layout& L = p.layout;
  const DType c = cfg.compute_dtype, r = cfg.reduce_dtype;
  // The placement table: the only place the stage number is read.
  const int stage = cfg.stage;
  // Stages 2-3 accumulate reduced micro-step gradients; a 16-bit accumulator would lose them.
  const DType gs = (stage >= 2 && cfg.accumulation_steps > 1) ? DType::fp32 : r;
  const bool off = cfg.offload_optimizer != OffloadKind::none;
  const bool nvme = cfg.offload_optimizer == OffloadKind::nvme;
  Placement& pl = p.placement;
  // Stages 0-2 with the trainer's parameters borrowed: the trainer's arrays are the parameters;
  // the update writes this rank's elements there, and stages 1-2 gather each unit through one slot.
  pl.params_in_trainer = params_borrowed && stage <= 2;
  pl.params_sharded = stage == 3;
  pl.params_tier = cfg.offload_params ? Tier::pinned_host : Tier::device;
  pl.grads = stage == 0 ? GradFlow::all_reduce : stage == 1 ? GradFlow::reduce_scatter : GradFlow::bucketed;
  pl.shard_grad_dtype = gs;
  pl.grads_from_trainer = grads_borrowed && stage >= 1 && !off;
  pl.grads_direct = pl.grads == GradFlow::bucketed && world == 1 && cfg.accumulation_steps == 1 && r == c &&
                    gs == c && !off && !pl.grads_from_trainer;
  for (const auto& info : L.units()) pl.grads_direct = pl.grads_direct && info.slice_elems == info.padded_elems;
  pl.state_sharded = stage >= 1;
  pl.state_tier = nvme ? Tier::nvme : off ? Tier::pinned_host : Tier::device;
  pl.master_is_params = !off && c == DType::fp32;
  pl.gather_after_update = (stage == 1 || stage == 2) && !pl.params_in_trainer;
  pl.norm_across_ranks = pl.state_sharded && world > 1;
  pl.grads_to_host = off;
  pl.grads_borrowed = grads_borrowed && (stage == 0 || stage == 1);
  pl.grads_in_trainer = pl.grads_borrowed && stage == 0 && !off && r == c;
  std::size_t P = 0, U = L.max_unit_elems(), max_slice = 0;
  for (const auto& u : L.units()) {
    P += u.padded_elems;
    max_slice = std::max(max_slice, u.slice_elems);
  }
  const std::size_t S = L.shard_elems();
  const std::size_t n_state = pl.state_sharded ? S : P;
  auto add = [&](Buf kind, int index, std::size_t elems, DType t, Category cat, std::string name,
                 Place place = Place::device) {
    p.buffers.push_back(BufferSpec{kind, index, elems, t, cat, place, std::move(name)});
  };

  if (pl.params_in_trainer) {
    // (the trainer's arrays are the parameters: nothing of the engine's own)
  } else if (!pl.params_sharded) add(Buf::params_full, 0, P, c, Category::parameters, "full parameters");
  else if (cfg.offload_params) add(Buf::param_shard, 0, S, c, Category::parameters, "parameter shard (offloaded)", Place::pinned_host);
  else add(Buf::param_shard, 0, S, c, Category::parameters, "parameter shard");
  const int nst = state_count(cfg.optimizer);
  if (!off) {
    if (!pl.master_is_params) add(Buf::master, 0, n_state, DType::fp32, Category::master_weights, "master weights");
    for (int i = 0; i < nst; ++i) {
      const std::string name = "optimizer state " + std::to_string(i);
      switch (cfg.state_precision) {
        case StatePrecision::fp32: add(Buf::state, i, n_state, DType::fp32, Category::optimizer_state, name); break;
        case StatePrecision::bf16: add(Buf::state, i, n_state, DType::bf16, Category::optimizer_state, name + " (bf16)"); break;
        case StatePrecision::int8:
          // One code byte per element, planned as two-byte elements (BufferSpec has no one-byte
          // dtype): n_state is a multiple of the alignment, which int8 makes a multiple of the
          // block size (>= 64), so this is exactly n_state bytes. Zero codes are the zero moment.
          add(Buf::state, i, n_state / 2, DType::bf16, Category::optimizer_state, name + " (int8 codes)");
          add(Buf::state_scales, i, quant_block_count(n_state, cfg.quant_block), DType::fp32,
              Category::optimizer_state, name + " (int8 block scales)");
          break;
      }
    }
  } else {
    // Offloaded, the master is always its own fp32 copy (even for an fp32 compute dtype): the
    // device parameters are only the rounded output the pipeline copies up.
    OffloadPlan& o = p.offload;
    o.enabled = true;
    o.state_elems = n_state;
    const std::size_t want = g_offload_chunk_override.load() ? g_offload_chunk_override.load() : kOffloadChunk;
    const std::size_t capped = std::min(want, std::max<std::size_t>(n_state, 1));
    // int8 state: a cell is whole quantization blocks too (the pieces are cut at cells).
    const std::size_t cell_align =
        cfg.state_precision == StatePrecision::int8 ? std::lcm(kNvmeAlignElems, cfg.quant_block) : kNvmeAlignElems;
    o.chunk_elems = (capped + cell_align - 1) / cell_align * cell_align;
    o.cells = (n_state + o.chunk_elems - 1) / o.chunk_elems;
    // The gradient the update reads: stages 0-1 reduce at step() into the reduce dtype (or the
    // compute dtype, the same when they match); stages 2-3 into the shard gradient.
    o.grad_dtype = pl.grads == GradFlow::bucketed ? gs : r;
    const std::size_t state_cell = cell_state_bytes(cfg.state_precision, o.chunk_elems, cfg.quant_block);
    const std::size_t cell_data = o.chunk_elems * 4 + static_cast<std::size_t>(nst) * state_cell;
    o.cell_bytes = (cell_data + kNvmeAlign - 1) / kNvmeAlign * kNvmeAlign;
    o.file_bytes = kNvmeHeaderBytes + 2 * o.cells * o.cell_bytes;
    if (!nvme) {
      add(Buf::master, 0, n_state, DType::fp32, Category::master_weights, "master weights (offloaded)", Place::pinned_host);
      for (int i = 0; i < nst; ++i) {
        const std::string name = "optimizer state " + std::to_string(i);
        switch (cfg.state_precision) {
          case StatePrecision::fp32:
            add(Buf::state, i, n_state, DType::fp32, Category::optimizer_state, name + " (offloaded)", Place::pinned_host);
            break;
          case StatePrecision::bf16:
            add(Buf::state, i, n_state, DType::bf16, Category::optimizer_state, name + " (bf16, offloaded)",
                Place::pinned_host);
            break;
          case StatePrecision::int8:  // n_state bytes as two-byte elements: see the device case
            add(Buf::state, i, n_state / 2, DType::bf16, Category::optimizer_state, name + " (int8 codes, offloaded)",
                Place::pinned_host);
            add(Buf::state_scales, i, quant_block_count(n_state, cfg.quant_block), DType::fp32,
                Category::optimizer_state, name + " (int8 block scales, offloaded)", Place::pinned_host);
            break;
        }
      }
    } else {
      // Two generations of every field on disk (see offload/nvme_store.hpp): 2x the state.
      add(Buf::nvme_file, 0, 2 * o.cells * o.chunk_elems, DType::fp32, Category::master_weights,
          "master weights (nvme file)", Place::disk);
      // Compressed state: its bytes per cell (codes and int8 scales, an even count: chunk_elems is
      // a multiple of 1024) as two-byte elements; the cell's padding to kNvmeAlign as `other`.
      for (int i = 0; i < nst; ++i) {
        if (cfg.state_precision == StatePrecision::fp32)
          add(Buf::nvme_file, 1 + i, 2 * o.cells * o.chunk_elems, DType::fp32, Category::optimizer_state,
              "optimizer state " + std::to_string(i) + " (nvme file)", Place::disk);
        else
          add(Buf::nvme_file, 1 + i, o.cells * state_cell, DType::bf16, Category::optimizer_state,
              "optimizer state " + std::to_string(i) + " (" + std::string(name_of(cfg.state_precision)) + ", nvme file)",
              Place::disk);
      }
      if (o.cell_bytes > cell_data)
        add(Buf::nvme_file, 2 + nst, o.cells * (o.cell_bytes - cell_data), DType::bf16, Category::other,
            "nvme cell padding", Place::disk);
      add(Buf::nvme_file, 1 + nst, kNvmeHeaderBytes / 4, DType::fp32, Category::other, "nvme file header", Place::disk);
      // One buffer for the whole ring, plus slack to align it to kNvmeAlign for O_DIRECT.
      add(Buf::io_ring, 0, (o.ring * o.cell_bytes + kNvmeAlign) / 4, DType::fp32, Category::offload_staging,
          "nvme I/O ring", Place::pinned_host);
    }
    // Down: the whole reduced gradient (copied unit by unit as soon as it is reduced, during
    // backward at stages 2-3, so it cannot be a ring the update drains); it is the only copy of
    // the reduced gradient (Placement::grads_to_host). Micro-steps at stages 2-3 accumulate into
    // it on the host, each reduced slice coming down through one staging slice. Up: a ring of cells.
    add(Buf::host_grad, 0, n_state, o.grad_dtype, Category::offload_staging, "gradient (host copy)", Place::pinned_host);
    if (pl.grads == GradFlow::bucketed && cfg.accumulation_steps > 1)
      add(Buf::grad_staging, 0, max_slice, r, Category::offload_staging, "gradient download staging",
          Place::pinned_host);
    if (!cfg.offload_params)
      for (int i = 0; i < o.ring; ++i)
        add(Buf::param_ring, i, o.chunk_elems, c, Category::offload_staging, "parameter upload ring " + std::to_string(i),
            Place::pinned_host);
  }
  // (Stage 0 borrowed: none, or one unit under offload, where each unit is reduced there and sent
  // down. Stage 1 borrowed: none when it reduces straight from the trainer's arrays.)
  if (pl.grads_borrowed) {
    if ((pl.grads == GradFlow::reduce_scatter && !pl.grads_from_trainer) || pl.grads_to_host)
      add(Buf::grad_staging_unit, 0, U, c, Category::gradients, "gradient staging (1 unit)");
  } else if (pl.grads != GradFlow::bucketed)
    add(Buf::grads_full, 0, P, c, Category::gradients, "full gradients");
  // Under offload (grads_to_host) the reduced gradient has no device copy beyond one unit: the
  // reduce buffer (reduce dtype != compute dtype) or the bucket itself, reduced in place.
  if (pl.grads == GradFlow::all_reduce && r != c && !pl.grads_to_host)
    add(Buf::grads_reduced, 0, P, r, Category::communication, "gradients in reduce dtype");
  if (r != c && (pl.grads != GradFlow::all_reduce || pl.grads_to_host))
    add(Buf::reduce_buf, 0, U, r, Category::communication, "reduce buffer");
  // (Stage 1 reduces in place in the full gradients when the dtypes match; borrowed, there are none.)
  if (!pl.grads_to_host &&
      (pl.grads == GradFlow::bucketed || (pl.grads == GradFlow::reduce_scatter && (r != c || pl.grads_borrowed))))
    add(Buf::grad_shard, 0, S, gs, Category::gradients, "gradient shard");
  if (pl.grads == GradFlow::bucketed) {
    // Config::gradient_buckets of them (0: one per unit); none when the gradients are reduced
    // straight from the trainer's arrays.
    const int nb = pl.grads_from_trainer ? 0 : cfg.gradient_buckets > 0 ? cfg.gradient_buckets : static_cast<int>(L.units().size());
    for (int i = 0; i < nb; ++i) add(Buf::bucket, i, U, c, Category::gradients, "gradient bucket " + std::to_string(i));
    if (cfg.accumulation_steps > 1 && !pl.grads_to_host)
      add(Buf::rs_tmp, 0, max_slice, r, Category::communication, "reduce-scatter slice");
  }
  if (pl.params_in_trainer && stage >= 1 && world > 1) {
    // Named for the estimate table: one unit gathered on its way out to the borrowed parameters.
    add(Buf::slot, 0, U, c, Category::parameters, "parameter out-slot (1 unit)");
  } else if (pl.params_sharded) {
    bool any_sharded = false;
    for (std::size_t u = 0; u < L.units().size(); ++u) {
      if (L.units()[u].padded_elems < cfg.persistence_threshold)
        add(Buf::persistent, static_cast<int>(u), L.units()[u].padded_elems, c, Category::parameters,
            "persistent unit " + std::to_string(u));
      else
        any_sharded = true;
    }
    if (any_sharded)
      for (int i = 0; i <= cfg.prefetch_units; ++i)
        add(Buf::slot, i, U, c, Category::parameters, "gathered unit slot " + std::to_string(i));
  }
  // At most one update range per tensor plus one per unit.
  p.control = control_layout(control_groups(L).size(), 4 + L.tensors().size() + L.units().size());
  add(Buf::scalars, 0, p.control.total_floats(), DType::fp32, Category::other, "step scalars");
  add(Buf::host_scalars, 0, p.control.total_floats(), DType::fp32, Category::other, "step scalars (host copy)",
      Place::pinned_host);
  // Initial values are produced on the host in chunks of at most kInitChunk elements of one piece.
  // Sized by the largest piece any rank owns, so every rank plans (and allocates) the same.
  std::size_t largest = 0;
  if (!pl.state_sharded) {
    for (const auto& t : L.tensors()) largest = std::max(largest, t.numel);
  } else {
    for (int rk = 0; rk < world && largest < kInitChunk; ++rk)
      for (const auto& piece : L.pieces(rk)) largest = std::max(largest, piece.count);
  }
  if (largest > 0) {
    add(Buf::init_staging, 0, std::min(largest, kInitChunk), DType::fp32, Category::other, "initializer staging",
        Place::host);
    p.buffers.back().transient = true;
  }
  // What the ranks agree on in initialize() (engine/agreement.hpp): one record per rank and this
  // rank's own, on the device for the collective and in host memory to be read there.
  if (world > 1) {
    const std::size_t n = static_cast<std::size_t>(world + 1) * kAgreementRecordFloats;
    add(Buf::agreement, 0, n, DType::fp32, Category::other, "initialize agreement");
    p.buffers.back().transient = true;
    add(Buf::agreement, 1, n, DType::fp32, Category::other, "initialize agreement (host)", Place::host);
    p.buffers.back().transient = true;
  }
  return p;
}

}  // namespace shardopt::detail

namespace shardopt {

MemoryReport MemoryPlan::report() const {
  MemoryReport r;
  r.borrowed = borrowed;
  for (const auto& b : buffers) {
    if (!b.transient) r.current[static_cast<int>(b.category)][static_cast<int>(b.place)] += b.bytes;
    r.peak[static_cast<int>(b.category)][static_cast<int>(b.place)] += b.bytes;
    r.peak_total[static_cast<int>(b.place)] += b.bytes;  // transient buffers coexist with the rest
  }
  return r;
}

MemoryPlan plan_memory(const Config& config, const std::vector<BlockSpec>& blocks, int world_size,
                       std::size_t stream_scratch_bytes) {
  return plan_memory(config, blocks, world_size, Borrowing{}, stream_scratch_bytes);
}

MemoryPlan plan_memory(const Config& config, const std::vector<BlockSpec>& blocks, int world_size,
                       const Borrowing& borrowed, std::size_t stream_scratch_bytes) {
  // (as Engine::Impl::all_borrowed: a model without elements borrows nothing)
  std::size_t elems = 0;
  for (const auto& b : blocks)
    for (const auto& t : b.tensors) elems += numel(t.shape);
  const bool params = borrowed.params && elems > 0, grads = borrowed.grads && elems > 0;
  const detail::EnginePlan p = detail::plan_engine(config, blocks, world_size, params, grads);
  MemoryPlan m;
  m.borrowed[static_cast<int>(Place::device)] = ((params ? 1 : 0) + (grads ? 1 : 0)) * elems * size_of(config.compute_dtype);
  for (const auto& b : p.buffers) m.buffers.push_back({b.name, b.elems * size_of(b.dtype), b.category, b.place, b.transient});
  // The backend's, not the engine's: allocated by create_stream() for each stream the engine's
  // context (engine/context.cpp) and offload engine (offload/offload_engine.cpp) create.
  if (stream_scratch_bytes > 0) {
    std::vector<const char*> streams{"compute", "comm"};
    if (config.offload_optimizer != OffloadKind::none) streams.insert(streams.end(), {"offload down", "offload up"});
    for (const char* s : streams)
      m.buffers.push_back({std::string("stream scratch (") + s + ")", stream_scratch_bytes, Category::other,
                           Place::device, false});
  }
  return m;
}

}  // namespace shardopt
