#include "engine/plan.hpp"

#include <algorithm>

#include "shardopt/error.hpp"

namespace shardopt::detail {

LayoutOptions layout_options(const Config& config, int world_size) {
  LayoutOptions lo;
  lo.world_size = world_size;
  lo.alignment = config.alignment;
  lo.bucket_elems = std::max<std::size_t>(1, config.bucket_bytes / size_of(config.compute_dtype));
  return lo;
}

EnginePlan plan_engine(const Config& cfg, const std::vector<BlockSpec>& blocks, int world) {
  cfg.validate();
  require(world >= 1, ErrorCode::invalid_argument, "world size must be >= 1, got " + std::to_string(world));
  EnginePlan p;
  p.layout = Layout::build(blocks, layout_options(cfg, world));
  const Layout& L = p.layout;
  const DType c = cfg.compute_dtype, r = cfg.reduce_dtype;
  const int stage = cfg.stage;
  // Stages 2-3 accumulate reduced micro-step gradients; a 16-bit accumulator would lose them.
  p.shard_grad_dtype = (stage >= 2 && cfg.accumulation_steps > 1) ? DType::fp32 : r;
  const DType gs = p.shard_grad_dtype;
  std::size_t P = 0, U = L.max_unit_elems(), max_slice = 0;
  for (const auto& u : L.units()) {
    P += u.padded_elems;
    max_slice = std::max(max_slice, u.slice_elems);
  }
  const std::size_t S = L.shard_elems();
  const std::size_t n_state = stage == 0 ? P : S;
  auto add = [&](Buf kind, int index, std::size_t elems, DType t, Category cat, std::string name,
                 Place place = Place::device) {
    p.buffers.push_back(BufferSpec{kind, index, elems, t, cat, place, std::move(name)});
  };

  if (stage <= 2) add(Buf::params_full, 0, P, c, Category::parameters, "full parameters");
  else add(Buf::param_shard, 0, S, c, Category::parameters, "parameter shard");
  if (c != DType::fp32) add(Buf::master, 0, n_state, DType::fp32, Category::master_weights, "master weights");
  for (int i = 0; i < state_count(cfg.optimizer); ++i)
    add(Buf::state, i, n_state, DType::fp32, Category::optimizer_state, "optimizer state " + std::to_string(i));
  if (stage <= 1) add(Buf::grads_full, 0, P, c, Category::gradients, "full gradients");
  if (stage == 0 && r != c) add(Buf::grads_reduced, 0, P, r, Category::communication, "gradients in reduce dtype");
  if (stage >= 1 && r != c) add(Buf::reduce_buf, 0, U, r, Category::communication, "reduce buffer");
  if (stage >= 1 && (stage >= 2 || r != c)) add(Buf::grad_shard, 0, S, gs, Category::gradients, "gradient shard");
  if (stage >= 2) {
    for (int i = 0; i < 2; ++i) add(Buf::bucket, i, U, c, Category::gradients, "gradient bucket " + std::to_string(i));
    if (cfg.accumulation_steps > 1) add(Buf::rs_tmp, 0, max_slice, r, Category::communication, "reduce-scatter slice");
  }
  if (stage == 3) {
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
  // [0] non-finite flag, [1] constant one, [2..3] the global (sumsq, flag) pair, then one partial
  // sum of squares per update range (at most one per tensor plus one per unit).
  p.scalar_count = 4 + L.tensors().size() + L.units().size();
  add(Buf::scalars, 0, p.scalar_count, DType::fp32, Category::other, "step scalars");
  add(Buf::host_scalars, 0, p.scalar_count, DType::fp32, Category::other, "step scalars (host copy)",
      Place::pinned_host);
  // Initial values are produced on the host in chunks of at most kInitChunk elements of one piece.
  // Sized by the largest piece any rank owns, so every rank plans (and allocates) the same.
  std::size_t largest = 0;
  if (stage == 0) {
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
  return p;
}

}  // namespace shardopt::detail

namespace shardopt {

MemoryReport MemoryPlan::report() const {
  MemoryReport r;
  for (const auto& b : buffers) {
    if (!b.transient) r.current[static_cast<int>(b.category)][static_cast<int>(b.place)] += b.bytes;
    r.peak[static_cast<int>(b.category)][static_cast<int>(b.place)] += b.bytes;
    r.peak_total[static_cast<int>(b.place)] += b.bytes;  // transient buffers coexist with the rest
  }
  return r;
}

MemoryPlan plan_memory(const Config& config, const std::vector<BlockSpec>& blocks, int world_size) {
  const detail::EnginePlan p = detail::plan_engine(config, blocks, world_size);
  MemoryPlan m;
  for (const auto& b : p.buffers) m.buffers.push_back({b.name, b.elems * size_of(b.dtype), b.category, b.place, b.transient});
  return m;
}

}  // namespace shardopt
