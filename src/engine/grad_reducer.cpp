#include "engine/grad_reducer.hpp"

#include <algorithm>

#include "shardopt/error.hpp"
#include "engine/borrowed.hpp"

namespace shardopt::detail {

GradReducer::GradReducer(EngineContext& ctx, const std::vector<BufferSpec>& specs, StateStore& store)
    : ctx_(ctx), store_(store) {
  for (const auto& spec : specs) {
    switch (spec.kind) {
      case Buf::grads_full: grads_full_ = ctx.allocate(spec); break;
      case Buf::grads_reduced: grads_reduced_ = ctx.allocate(spec); break;
      case Buf::reduce_buf: reduce_buf_ = ctx.allocate(spec); break;
      case Buf::grad_shard: grad_shard_ = ctx.allocate(spec); break;
      case Buf::rs_tmp: rs_tmp_ = ctx.allocate(spec); break;
      case Buf::grad_staging_unit: staging_ = ctx.allocate(spec); break;
      case Buf::bucket:
        buckets_.push_back(Bucket{ctx.allocate(spec), ctx.be.create_event()});
        break;
      default: break;
    }
  }
  reduced_ = ctx.be.create_event();
  reduce_buf_free_ = ctx.be.create_event();
  norm_ranges_.resize(ctx.layout.units().size());
  open_bucket_.assign(ctx.layout.units().size(), -1);
  block_ready_.assign(ctx.layout.blocks().size(), 0);
  block_open_.assign(ctx.layout.blocks().size(), 0);
  block_reduced_.assign(ctx.layout.blocks().size(), 0);
  unit_partial_.assign(ctx.layout.units().size(), 0);
  unit_open_views_.assign(ctx.layout.units().size(), 0);
  unit_opened_at_.assign(ctx.layout.units().size(), 0);
  unit_pending_.resize(ctx.layout.units().size());
  reset_pending();
}

std::byte* GradReducer::open_unit(int b) {
  const auto& bi = ctx_.layout.blocks()[b];
  if (block_ready_[b])
    throw Error(ErrorCode::invalid_state,
                "gradients: block '" + bi.name + "' already reported grads_ready in this micro-step");
  const int u = bi.unit;
  const DType c = ctx_.compute_dtype;
  if (ctx_.placement.grads != GradFlow::bucketed) return at(grads_full_, ctx_.unit_base[u], c);
  if (ctx_.placement.grads_direct) {
    open_bucket_[u] = kDirect;
    return at(grad_shard_, ctx_.layout.units()[u].shard_offset, ctx_.placement.shard_grad_dtype);
  }
  if (open_bucket_[u] < 0) take_bucket(u, bi.name);
  if (!block_open_[b]) {
    block_open_[b] = 1;
    unit_open_views_[u]++;
  }
  return static_cast<std::byte*>(buckets_[open_bucket_[u]].buffer.data());
}

void GradReducer::take_bucket(int u, const std::string& block_name) {
  const int units = static_cast<int>(open_bucket_.size());
  int k = -1;
  for (int i = 0; i < static_cast<int>(buckets_.size()) && k < 0; ++i)
    if (std::find(open_bucket_.begin(), open_bucket_.end(), i) == open_bucket_.end()) k = i;
  if (k < 0) {
    // Every bucket holds a unit: flush the least recently opened one that no view points into.
    int victim = -1;
    for (int v = 0; v < units; ++v)
      if (open_bucket_[v] >= 0 && unit_open_views_[v] == 0 &&
          (victim < 0 || unit_opened_at_[v] < unit_opened_at_[victim]))
        victim = v;
    if (victim < 0) {
      std::string held;
      for (std::size_t x = 0; x < block_open_.size() && held.size() < 200; ++x)
        if (block_open_[x]) held += (held.empty() ? "" : ", ") + ctx_.layout.blocks()[x].name;
      throw Error(ErrorCode::invalid_state,
                  "gradients: block '" + block_name + "' opens a unit while all " + std::to_string(buckets_.size()) +
                      " gradient buckets hold units whose gradient views are still open (gradients() without "
                      "grads_ready: " + held + "); report grads_ready for those blocks first, or set "
                      "Config::gradient_buckets to 0 (one bucket per unit, " + std::to_string(units) + " here)");
    }
    k = open_bucket_[victim];
    reduce_partial(victim);
  }
  open_bucket_[u] = k;
  unit_opened_at_[u] = ++open_tick_;
  ctx_.consume(*buckets_[k].free);
}

void GradReducer::set_borrowed(std::vector<void*> grads) {
  borrowed_ = std::move(grads);
  bool any = false;
  for (void* p : borrowed_) any = any || p != nullptr;
  if (!any) {
    borrowed_.clear();
    return;
  }
  zero_borrowed(*ctx_.compute);
  ctx_.be.synchronize(*ctx_.compute);
  if (!ctx_.placement.grads_from_trainer) return;
  // Each unit's input, as reduce_scatter_pieces takes it: its tensors at their unit offsets.
  pieces_.resize(ctx_.layout.units().size());
  for (int u = 0; u < static_cast<int>(ctx_.layout.units().size()); ++u)
    for (int t : tensors_of_unit(ctx_.layout, u))
      if (ctx_.layout.tensors()[t].numel)
        pieces_[static_cast<std::size_t>(u)].push_back(
            {ctx_.layout.tensors()[t].unit_offset, ctx_.layout.tensors()[t].numel, borrowed_[t]});
}

bool GradReducer::block_borrowed(int b) const { return block_fully_borrowed(ctx_.layout, borrowed_, b); }

std::size_t GradReducer::borrowed_bytes() const {
  return borrowed_bytes_of(ctx_.layout, borrowed_, ctx_.compute_dtype);
}

void GradReducer::zero_borrowed(Stream& stream) {
  for (std::size_t t = 0; t < borrowed_.size(); ++t)
    if (borrowed_[t] && ctx_.layout.tensors()[t].numel)
      ctx_.be.fill(borrowed_[t], ctx_.compute_dtype, ctx_.layout.tensors()[t].numel, 0.0f, stream);
}

// The block's borrowed gradients into the buffer the trainer would otherwise have written, in
// order on compute (after the trainer's writes there). The host waits for the copies on the CPU
// backend, so the trainer may write its memory again as soon as grads_ready returns.
void GradReducer::copy_borrowed(int b) {
  const auto& bi = ctx_.layout.blocks()[b];
  std::byte* base = open_unit(b);
  const DType c = ctx_.compute_dtype;
  Stream& compute = *ctx_.compute;
  for (int t = bi.first_tensor; t < bi.first_tensor + bi.tensor_count; ++t) {
    const auto& ti = ctx_.layout.tensors()[t];
    if (!borrowed_[t] || ti.numel == 0) continue;
    ctx_.be.copy(base + ti.unit_offset * size_of(c), borrowed_[t], ti.numel * size_of(c), compute);
    if (ctx_.placement.grads == GradFlow::bucketed) ctx_.be.fill(borrowed_[t], c, ti.numel, 0.0f, compute);
  }
  if (ctx_.host_visible()) ctx_.be.synchronize(compute);
}

void GradReducer::block_ready(int b) {
  const auto& bi = ctx_.layout.blocks()[b];
  if (block_ready_[b])
    throw Error(ErrorCode::invalid_state, "grads_ready: block '" + bi.name + "' reported twice in one micro-step");
  if (micro_steps_ >= ctx_.cfg.accumulation_steps)
    throw Error(ErrorCode::invalid_state, "grads_ready: all " + std::to_string(ctx_.cfg.accumulation_steps) +
                                              " micro-steps of this step are complete; call step() first");
  bool borrows = false;
  for (int t = bi.first_tensor; t < bi.first_tensor + bi.tensor_count && !borrowed_.empty(); ++t)
    borrows = borrows || (borrowed_[t] && ctx_.layout.tensors()[t].numel);
  // (grads_borrowed: read at step(), where the trainer's arrays hold the sum of the micro-steps;
  // grads_from_trainer: read where they are when the unit is complete)
  const bool from_trainer = ctx_.placement.grads_from_trainer && !ctx_.placement.grads_borrowed;
  if (borrows && !ctx_.placement.grads_borrowed && !from_trainer) copy_borrowed(b);
  const int u = bi.unit;
  const bool bucketed = ctx_.placement.grads == GradFlow::bucketed && !from_trainer;
  bool has_elements = false;
  for (int t = bi.first_tensor; t < bi.first_tensor + bi.tensor_count; ++t)
    has_elements = has_elements || ctx_.layout.tensors()[t].numel != 0;
  if (bucketed && open_bucket_[u] == -1 && !unit_partial_[u] && has_elements)
    throw Error(ErrorCode::invalid_state,
                "grads_ready: block '" + bi.name + "' has no gradient buffer; call gradients() first");
  // A block of a flushed unit reported without gradients() (a zero gradient), or a block without
  // elements that opened nothing: the unit needs a bucket for the reduction that writes it.
  if (bucketed && open_bucket_[u] == -1 && !ctx_.placement.grads_direct) take_bucket(u, bi.name);
  if (bucketed && ctx_.placement.grads_direct && open_bucket_[u] == -1) open_bucket_[u] = kDirect;
  block_ready_[b] = 1;
  if (block_open_[b]) {
    block_open_[b] = 0;
    unit_open_views_[u]--;
  }
  ready_blocks_++;
  if (--unit_pending_[u] == 0 && bucketed) reduce_bucket(u);
  if (unit_pending_[u] == 0 && from_trainer) reduce_from_trainer(u);
  if (ready_blocks_ == static_cast<int>(ctx_.layout.blocks().size())) {
    // grads_from_trainer: the next micro-step's writes into the trainer's arrays come after the
    // reductions that read (and zeroed) them.
    if (from_trainer) {
      ctx_.be.record(*reduced_, *ctx_.side);
      ctx_.be.wait(*ctx_.compute, *reduced_);
      if (ctx_.host_visible()) ctx_.be.synchronize(*ctx_.side);
    }
    micro_steps_++;
    reset_pending();
  }
}

std::string GradReducer::progress() const {
  std::string missing;
  for (std::size_t b = 0; b < block_ready_.size() && missing.size() < 200; ++b)
    if (!block_ready_[b]) missing += (missing.empty() ? "" : ", ") + ctx_.layout.blocks()[b].name;
  return std::to_string(micro_steps_) + " of " + std::to_string(ctx_.cfg.accumulation_steps) +
         " micro-steps complete" + (ready_blocks_ ? "; blocks without grads_ready: " + missing : "");
}

// Bucketed: reduce-scatter one unit's bucket into this rank's gradient shard.
void GradReducer::reduce_bucket(int u) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype, gs = ctx_.placement.shard_grad_dtype;
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  ctx_.side_after_compute();  // the reduction reads what backward wrote on compute
  if (open_bucket_[u] == kDirect) {  // one rank: the gradient already is the shard
    open_bucket_[u] = -1;
    return;
  }
  if (unit_partial_[u]) {  // flushed before in this micro-step: write only the rest
    reduce_partial(u);
    return;
  }
  if (ctx_.placement.grads_to_host) {
    reduce_bucket_to_host(u);
    return;
  }
  Bucket& bk = buckets_[open_bucket_[u]];
  const void* src = bk.buffer.data();
  if (r != c) {
    be.cast(src, c, reduce_buf_.data(), r, info.padded_elems, side);
    src = reduce_buf_.data();
  }
  void* shard = at(grad_shard_, info.shard_offset, gs);
  if (ctx_.cfg.accumulation_steps == 1) {
    ctx_.comm.reduce_scatter(src, shard, info.slice_elems, r, ReduceOp::avg, side);
  } else {
    ctx_.comm.reduce_scatter(src, rs_tmp_.data(), info.slice_elems, r, ReduceOp::avg, side);
    be.accumulate(rs_tmp_.data(), r, static_cast<float*>(shard), info.slice_elems, side);
  }
  be.fill(bk.buffer.data(), c, info.padded_elems, 0.0f, side);
  be.record(*bk.free, side);
  open_bucket_[u] = -1;
  // Offload: the unit's reduced gradient goes down as soon as the last micro-step reduced it,
  // while backward goes on.
  if (store_.offload() && micro_steps_ == ctx_.cfg.accumulation_steps - 1 && info.slice_elems) {
    be.record(*reduced_, side);
    store_.offload()->download(shard, ctx_.state_offset(u, ctx_.slice_begin(u)), info.slice_elems, *reduced_);
  }
}

// grads_from_trainer: unit u's tensors in the trainer's arrays reduce-scattered into `out` (this
// rank's slice, in the reduce dtype), on side. The input is the unit's padded layout with its gaps
// zero, as a bucket (or a full gradient) holds it: the same bits. With the reduce dtype the compute
// dtype the collective reads them where they are; otherwise each is cast into the reduce buffer
// (its gaps zeroed first), as the bucket would have been, and reduced there.
void GradReducer::reduce_trainer_unit(int u, void* out) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  Stream& side = *ctx_.side;
  const std::vector<SendPiece>& pieces = pieces_[static_cast<std::size_t>(u)];
  if (r == c) {
    ctx_.comm.reduce_scatter_pieces(pieces.data(), pieces.size(), out, info.slice_elems, c, ReduceOp::avg, side);
    return;
  }
  std::byte* red = static_cast<std::byte*>(reduce_buf_.data());
  ctx_.be.fill(red, r, info.padded_elems, 0.0f, side);
  for (const SendPiece& p : pieces) ctx_.be.cast(p.data, c, red + p.offset * size_of(r), r, p.count, side);
  ctx_.comm.reduce_scatter(red, out, info.slice_elems, r, ReduceOp::avg, side);
}

// Stages 2-3, grads_from_trainer: unit u reduced from the trainer's arrays into the gradient shard
// (or, with micro-steps, the reduce-scatter slice added into it), on side after what backward
// wrote on compute; then zeroed there for the next micro-step.
void GradReducer::reduce_from_trainer(int u) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype, gs = ctx_.placement.shard_grad_dtype;
  Stream& side = *ctx_.side;
  ctx_.side_after_compute();
  void* shard = at(grad_shard_, info.shard_offset, gs);
  if (ctx_.cfg.accumulation_steps == 1) {
    reduce_trainer_unit(u, shard);
  } else {
    reduce_trainer_unit(u, rs_tmp_.data());
    ctx_.be.accumulate(rs_tmp_.data(), r, static_cast<float*>(shard), info.slice_elems, side);
  }
  for (const SendPiece& p : pieces_[static_cast<std::size_t>(u)])
    ctx_.be.fill(const_cast<void*>(p.data), c, p.count, 0.0f, side);
}

void GradReducer::reduce_partial(int u) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype, gs = ctx_.placement.shard_grad_dtype;
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  const bool to_host = ctx_.placement.grads_to_host;
  const int accumulation = ctx_.cfg.accumulation_steps;
  ctx_.side_after_compute();  // the reduction reads what backward wrote on compute
  Bucket& bk = buckets_[open_bucket_[u]];
  open_bucket_[u] = -1;
  if (!unit_partial_[u]) flushes_++;
  unit_partial_[u] = 1;
  flushed_step_ = true;
  // The unit elements this reduction writes: the blocks reported ready since the last one (each
  // block's span, adjacent spans merged; the alignment gaps inside are zero in every reduction).
  const std::size_t sb = ctx_.slice_begin(u), se = sb + info.slice_elems;
  std::vector<std::pair<std::size_t, std::size_t>> spans;
  for (int b = info.first_block; b < info.first_block + info.block_count; ++b) {
    if (!block_ready_[b] || block_reduced_[b]) continue;
    block_reduced_[b] = 1;
    const auto& blk = ctx_.layout.blocks()[b];
    if (blk.tensor_count == 0) continue;
    const auto& first = ctx_.layout.tensors()[blk.first_tensor];
    const auto& last = ctx_.layout.tensors()[blk.first_tensor + blk.tensor_count - 1];
    const std::size_t lo = std::max(first.unit_offset, sb), hi = std::min(last.unit_offset + last.numel, se);
    if (lo >= hi) continue;
    if (!spans.empty() && spans.back().second >= lo) spans.back().second = std::max(spans.back().second, hi);
    else spans.emplace_back(lo, hi);
  }
  std::byte* unit = static_cast<std::byte*>(bk.buffer.data());
  if (r != c) {
    if (to_host) be.wait(side, *reduce_buf_free_);  // the last download from it has read it
    be.cast(unit, c, reduce_buf_.data(), r, info.padded_elems, side);
    be.fill(unit, c, info.padded_elems, 0.0f, side);  // the bucket is free once cast
    be.record(*bk.free, side);
    unit = static_cast<std::byte*>(reduce_buf_.data());
  }
  std::byte* mine = unit + sb * size_of(r);
  ctx_.comm.reduce_scatter(unit, mine, info.slice_elems, r, ReduceOp::avg, side);
  if (to_host) {
    offload::OffloadEngine& off = *store_.offload();
    be.record(*reduced_, side);
    for (const auto& [lo, hi] : spans) {
      const std::byte* src = mine + (lo - sb) * size_of(r);
      if (accumulation == 1) off.download(src, ctx_.state_offset(u, lo), hi - lo, *reduced_);
      else off.download_add(src, r, ctx_.state_offset(u, lo), hi - lo, micro_steps_ == 0, *reduced_);
    }
    if (r != c) off.record_downloaded(*reduce_buf_free_, *reduced_);
    else off.zero_after_downloads(unit, c, info.padded_elems, *bk.free, *reduced_);
    return;
  }
  for (const auto& [lo, hi] : spans) {
    const std::byte* src = mine + (lo - sb) * size_of(r);
    std::byte* dst = at(grad_shard_, info.shard_offset + (lo - sb), gs);
    if (accumulation == 1) be.copy(dst, src, (hi - lo) * size_of(r), side);  // gs == r
    else be.accumulate(src, r, reinterpret_cast<float*>(dst), hi - lo, side);
  }
  if (r == c) {
    be.fill(unit, c, info.padded_elems, 0.0f, side);
    be.record(*bk.free, side);
  }
}

void GradReducer::measure(int u, const void* unit, DType t) {
  for (const NormRange& nr : norm_ranges_[u])
    ctx_.be.sum_squares(static_cast<const std::byte*>(unit) + nr.unit_begin * size_of(t), t, nr.n, nr.out, *ctx_.side);
}

// Offload, bucketed: reduce-scatter in place (in the bucket, or in the reduce buffer the bucket is
// cast into), measure, send this rank's slice down, and free the bucket once the download has read
// it. Each micro-step's slice goes down; the host copy sums them.
void GradReducer::reduce_bucket_to_host(int u) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  offload::OffloadEngine& off = *store_.offload();
  Bucket& bk = buckets_[open_bucket_[u]];
  open_bucket_[u] = -1;
  std::byte* unit = static_cast<std::byte*>(bk.buffer.data());
  if (r != c) {
    be.wait(side, *reduce_buf_free_);  // the last download from the reduce buffer has read it
    be.cast(unit, c, reduce_buf_.data(), r, info.padded_elems, side);
    be.fill(unit, c, info.padded_elems, 0.0f, side);  // the bucket is free once cast
    be.record(*bk.free, side);
    unit = static_cast<std::byte*>(reduce_buf_.data());
  }
  std::byte* mine = unit + ctx_.slice_begin(u) * size_of(r);
  ctx_.comm.reduce_scatter(unit, mine, info.slice_elems, r, ReduceOp::avg, side);
  const int accumulation = ctx_.cfg.accumulation_steps;
  if (accumulation == 1) measure(u, unit, r);
  be.record(*reduced_, side);
  const std::size_t at_state = ctx_.state_offset(u, ctx_.slice_begin(u));
  if (accumulation == 1) off.download(mine, at_state, info.slice_elems, *reduced_);
  else off.download_add(mine, r, at_state, info.slice_elems, micro_steps_ == 0, *reduced_);
  if (r != c) off.record_downloaded(*reduce_buf_free_, *reduced_);
  else off.zero_after_downloads(unit, c, info.padded_elems, *bk.free, *reduced_);
}

// Offload, stages 0-1 with a reduce dtype: each unit cast into the reduce buffer, reduced there in
// place, measured and sent down before the next unit reuses the buffer.
void GradReducer::reduce_units_to_host() {
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  offload::OffloadEngine& off = *store_.offload();
  std::byte* red = static_cast<std::byte*>(reduce_buf_.data());
  for (int u = 0; u < static_cast<int>(ctx_.layout.units().size()); ++u) {
    const auto& info = ctx_.layout.units()[u];
    be.wait(side, *reduce_buf_free_);
    be.cast(at(grads_full_, ctx_.unit_base[u], c), c, red, r, info.padded_elems, side);
    if (ctx_.placement.grads == GradFlow::all_reduce)
      ctx_.comm.all_reduce(red, red, info.padded_elems, r, ReduceOp::avg, side);
    else
      ctx_.comm.reduce_scatter(red, red + ctx_.slice_begin(u) * size_of(r), info.slice_elems, r, ReduceOp::avg, side);
    measure(u, red, r);
    be.record(*reduced_, side);
    const std::size_t lo = ctx_.owned_begin(u);
    off.download(red + lo * size_of(r), ctx_.state_offset(u, lo), ctx_.owned_end(u) - lo, *reduced_);
    off.record_downloaded(*reduce_buf_free_, *reduced_);
  }
}

// Stages 0-1 with every gradient borrowed, under offload: unit by unit, the trainer's tensors into
// the staging unit (zeroed first: another unit's tensors may have left values where this one has
// alignment gaps), then the reduction the full gradient would have had, in place (in the staging
// unit, or cast into the reduce buffer if the reduce dtype differs): a reduce-scatter at stage 1,
// an all-reduce at stage 0. The unit's partial norms are measured there and its slice goes down,
// and the next unit waits for that download before it overwrites the buffer. The same reduction
// of the same values as from the full gradient: the same bits.
void GradReducer::reduce_borrowed_units() {
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  offload::OffloadEngine& off = *store_.offload();
  const Layout& L = ctx_.layout;
  std::byte* stage = static_cast<std::byte*>(staging_.data());
  std::byte* red = r != c ? static_cast<std::byte*>(reduce_buf_.data()) : stage;
  for (int u = 0; u < static_cast<int>(L.units().size()); ++u) {
    const auto& info = L.units()[u];
    be.wait(side, *reduce_buf_free_);  // the last download has read the buffer
    be.fill(stage, c, info.padded_elems, 0.0f, side);
    for (int b = info.first_block; b < info.first_block + info.block_count; ++b) {
      const auto& bi = L.blocks()[b];
      for (int t = bi.first_tensor; t < bi.first_tensor + bi.tensor_count; ++t) {
        const auto& ti = L.tensors()[t];
        if (ti.numel) be.copy(stage + ti.unit_offset * size_of(c), borrowed_[t], ti.numel * size_of(c), side);
      }
    }
    if (r != c) be.cast(stage, c, red, r, info.padded_elems, side);
    if (ctx_.placement.grads == GradFlow::all_reduce)  // stage 0: every rank updates the whole unit
      ctx_.comm.all_reduce(red, red, info.padded_elems, r, ReduceOp::avg, side);
    else
      ctx_.comm.reduce_scatter(red, red + ctx_.slice_begin(u) * size_of(r), info.slice_elems, r, ReduceOp::avg, side);
    measure(u, red, r);
    be.record(*reduced_, side);
    const std::size_t lo = ctx_.owned_begin(u);
    off.download(red + lo * size_of(r), ctx_.state_offset(u, lo), ctx_.owned_end(u) - lo, *reduced_);
    off.record_downloaded(*reduce_buf_free_, *reduced_);
  }
}

// Stage 0 with every gradient borrowed, no offload: the all-reduce of the full-gradient path,
// tensor by tensor in the trainer's arrays (the reduce dtype matches), or tensor by tensor cast
// into the all-reduced copy (whose alignment gaps stay zero) and all-reduced there unit by unit.
// Each element is averaged over the same ranks' values either way. The update then reads the
// trainer's arrays (reduced_at); finish_step zeroes them for the next step's micro-steps.
void GradReducer::reduce_borrowed_in_place() {
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  Stream& side = *ctx_.side;
  const Layout& L = ctx_.layout;
  for (int u = 0; u < static_cast<int>(L.units().size()); ++u) {
    const auto& info = L.units()[u];
    for (int t : tensors_of_unit(L, u)) {
      const auto& ti = L.tensors()[t];
      if (!ti.numel) continue;
      if (r == c) ctx_.comm.all_reduce(borrowed_[t], borrowed_[t], ti.numel, c, ReduceOp::avg, side);
      else ctx_.be.cast(borrowed_[t], c, at(grads_reduced_, ctx_.full_offset(u, ti.unit_offset), r), r, ti.numel, side);
    }
    if (r != c) {
      void* red = at(grads_reduced_, ctx_.unit_base[u], r);
      ctx_.comm.all_reduce(red, red, info.padded_elems, r, ReduceOp::avg, side);
    }
  }
}

void GradReducer::reduce_at_step() {
  const Placement& pl = ctx_.placement;
  if (pl.grads == GradFlow::bucketed) return;  // reduced as the units became ready
  if (pl.grads_borrowed) {
    if (pl.grads_from_trainer) {  // stage 1
      for (int u = 0; u < static_cast<int>(ctx_.layout.units().size()); ++u)
        reduce_trainer_unit(u, at(grad_shard_, ctx_.layout.units()[u].shard_offset, ctx_.reduce_dtype));
    } else if (pl.grads_to_host) {
      reduce_borrowed_units();
    } else {  // stage 0
      reduce_borrowed_in_place();
    }
    return;
  }
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  if (pl.grads_to_host && r != c) {
    reduce_units_to_host();
    return;
  }
  Stream& side = *ctx_.side;
  for (std::size_t u = 0; u < ctx_.layout.units().size(); ++u) {
    const auto& info = ctx_.layout.units()[u];
    std::byte* g = at(grads_full_, ctx_.unit_base[u], c);
    if (pl.grads == GradFlow::all_reduce) {
      if (r == c) {
        ctx_.comm.all_reduce(g, g, info.padded_elems, c, ReduceOp::avg, side);
      } else {
        void* red = at(grads_reduced_, ctx_.unit_base[u], r);
        ctx_.be.cast(g, c, red, r, info.padded_elems, side);
        ctx_.comm.all_reduce(red, red, info.padded_elems, r, ReduceOp::avg, side);
      }
    } else if (r == c) {
      ctx_.comm.reduce_scatter(g, g + ctx_.slice_begin(static_cast<int>(u)) * size_of(c), info.slice_elems, c,
                               ReduceOp::avg, side);
    } else {
      ctx_.be.cast(g, c, reduce_buf_.data(), r, info.padded_elems, side);
      ctx_.comm.reduce_scatter(reduce_buf_.data(), at(grad_shard_, info.shard_offset, r), info.slice_elems, r,
                               ReduceOp::avg, side);
    }
  }
  if (!store_.offload()) return;
  ctx_.be.record(*reduced_, side);
  for (int u = 0; u < static_cast<int>(ctx_.layout.units().size()); ++u) {
    const std::size_t lo = ctx_.owned_begin(u);
    store_.offload()->download(reduced_at(u, lo).first, ctx_.state_offset(u, lo), ctx_.owned_end(u) - lo, *reduced_);
  }
}

std::pair<void*, DType> GradReducer::reduced_at(int u, std::size_t e) const {
  const DType c = ctx_.compute_dtype, r = ctx_.reduce_dtype;
  const GradFlow flow = ctx_.placement.grads;
  if (ctx_.placement.grads_to_host && (flow == GradFlow::bucketed || r != c || ctx_.placement.grads_borrowed))
    return {nullptr, flow == GradFlow::bucketed ? ctx_.placement.shard_grad_dtype : r};
  if (ctx_.placement.grads_in_trainer) {  // e lies in a tensor: the ranges follow the tensors
    const int t = tensor_at(ctx_.layout, u, e);
    return {static_cast<std::byte*>(borrowed_[t]) + (e - ctx_.layout.tensors()[t].unit_offset) * size_of(c), c};
  }
  if (flow == GradFlow::all_reduce)
    return r == c ? std::pair<void*, DType>{at(grads_full_, ctx_.full_offset(u, e), c), c}
                  : std::pair<void*, DType>{at(grads_reduced_, ctx_.full_offset(u, e), r), r};
  if (flow == GradFlow::reduce_scatter && r == c && !ctx_.placement.grads_borrowed)
    return {at(grads_full_, ctx_.full_offset(u, e), c), c};
  return {at(grad_shard_, ctx_.shard_offset(u, e), ctx_.placement.shard_grad_dtype), ctx_.placement.shard_grad_dtype};
}

void GradReducer::zero_accumulators() {
  Stream& side = *ctx_.side;
  if (ctx_.placement.grads != GradFlow::bucketed) {
    if (grads_full_) ctx_.be.fill(grads_full_.data(), ctx_.compute_dtype, ctx_.full_elems, 0.0f, side);
    zero_borrowed(side);  // the running sum over micro-steps the trainer added into
  }
  // (grads_direct: the update zeroed the shard as it read it, also on a skipped step)
  // (grads_to_host: the first micro-step's download overwrites the host copy)
  if (ctx_.placement.grads == GradFlow::bucketed && ctx_.cfg.accumulation_steps > 1 && grad_shard_)
    ctx_.be.fill(grad_shard_.data(), ctx_.placement.shard_grad_dtype, ctx_.shard_elems, 0.0f, side);
}

void GradReducer::finish_step() {
  zero_accumulators();
  micro_steps_ = 0;
  flushed_step_ = false;
}

void GradReducer::zero() {
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  be.synchronize(side);
  if (store_.offload()) store_.offload()->finish_downloads();
  zero_accumulators();
  zero_borrowed(side);  // (stages 0-1: zero_accumulators did it already; twice is harmless)
  if (ctx_.placement.grads == GradFlow::bucketed) {
    for (auto& bk : buckets_) be.fill(bk.buffer.data(), ctx_.compute_dtype, ctx_.layout.max_unit_elems(), 0.0f, side);
    std::fill(open_bucket_.begin(), open_bucket_.end(), -1);
    if (ctx_.cfg.accumulation_steps == 1 && grad_shard_)
      be.fill(grad_shard_.data(), ctx_.placement.shard_grad_dtype, ctx_.shard_elems, 0.0f, side);
  }
  be.synchronize(side);
  micro_steps_ = 0;
  flushed_step_ = false;
  reset_pending();
}

void GradReducer::reset_pending() {
  for (std::size_t u = 0; u < ctx_.layout.units().size(); ++u) unit_pending_[u] = ctx_.layout.units()[u].block_count;
  std::fill(block_ready_.begin(), block_ready_.end(), 0);
  std::fill(block_open_.begin(), block_open_.end(), 0);
  std::fill(block_reduced_.begin(), block_reduced_.end(), 0);
  std::fill(unit_partial_.begin(), unit_partial_.end(), 0);
  std::fill(unit_open_views_.begin(), unit_open_views_.end(), 0);
  ready_blocks_ = 0;
}

}  // namespace shardopt::detail
