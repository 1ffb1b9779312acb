#include "engine/param_gatherer.hpp"

#include "shardopt/error.hpp"
#include "engine/borrowed.hpp"

namespace shardopt::detail {

// ---------------------------------------------------------------- SlotTable
void SlotTable::reset(int slots, std::vector<char> persistent) {
  entries_.assign(static_cast<std::size_t>(slots), Entry{});
  persistent_ = std::move(persistent);
  unit_slot_.assign(persistent_.size(), -1);
  tick_ = 0;
  last_unit_ = -1;
  direction_ = 1;
}

int SlotTable::choose(int unit) const {
  int best = -1;
  for (int i = 0; i < slots(); ++i) {
    const Entry& s = entries_[i];
    if (s.refs > 0 || s.unit == unit) continue;
    const Entry* b = best < 0 ? nullptr : &entries_[best];
    if (!b || (s.unit < 0 && b->unit >= 0) || ((s.unit < 0) == (b->unit < 0) && s.last_use < b->last_use)) best = i;
  }
  return best;
}

void SlotTable::bind(int slot, int unit) {
  Entry& s = entries_[slot];
  if (s.unit >= 0) unit_slot_[s.unit] = -1;
  s.unit = unit;
  s.last_use = ++tick_;
  unit_slot_[unit] = slot;
}

void SlotTable::hold(int slot) {
  entries_[slot].refs++;
  entries_[slot].last_use = ++tick_;
}

bool SlotTable::drop(int slot) {
  Entry& s = entries_[slot];
  if (s.refs == 0) return false;
  return --s.refs == 0;
}

int SlotTable::travel(int unit) {
  if (unit != last_unit_ && last_unit_ >= 0) direction_ = unit > last_unit_ ? 1 : -1;
  last_unit_ = unit;
  return direction_;
}

void SlotTable::forget_units() {
  for (auto& s : entries_) {
    if (s.unit >= 0) unit_slot_[s.unit] = -1;
    s.unit = -1;
  }
}

// ---------------------------------------------------------------- ParamGatherer
ParamGatherer::ParamGatherer(EngineContext& ctx, const std::vector<BufferSpec>& specs) : ctx_(ctx) {
  const std::size_t units = ctx.layout.units().size();
  persistent_.resize(units);
  for (const auto& spec : specs) {
    switch (spec.kind) {
      case Buf::params_full: params_full_ = ctx.allocate(spec); break;
      case Buf::param_shard: param_shard_ = ctx.allocate(spec); break;
      case Buf::persistent: persistent_[spec.index] = ctx.allocate(spec); break;
      case Buf::slot:
        slots_.push_back(Slot{ctx.allocate(spec), ctx.be.create_event(), ctx.be.create_event()});
        break;
      default: break;
    }
  }
  std::vector<char> kept(units);
  for (std::size_t u = 0; u < units; ++u) kept[u] = persistent_[u] ? 1 : 0;
  table_.reset(static_cast<int>(slots_.size()), std::move(kept));
}

void* ParamGatherer::acquire_unit(int u) {
  if (!ctx_.placement.params_sharded) return at(params_full_, ctx_.unit_base[u], ctx_.compute_dtype);
  if (persistent_[u]) return persistent_[u].data();
  int i = table_.slot_of(u);
  if (i < 0) {
    i = table_.choose(u);
    if (i < 0)
      throw Error(ErrorCode::invalid_state,
                  "acquire: all " + std::to_string(slots_.size()) + " gathered-unit slots are held by acquired blocks; "
                  "release blocks first or raise Config::prefetch_units");
    start_gather(u, i);
  }
  table_.hold(i);
  // Prefetch: the next units in the direction of travel that are neither kept nor gathered
  // (checked as each gather is started, since a gather may evict one of them).
  const int step = table_.travel(u);
  const int units = static_cast<int>(ctx_.layout.units().size());
  for (int k = 1, next = u + step; k <= ctx_.cfg.prefetch_units && next >= 0 && next < units; ++k, next += step) {
    if (table_.persistent(next) || table_.slot_of(next) >= 0) continue;
    const int j = table_.choose(u);
    if (j < 0) break;
    start_gather(next, j);
  }
  ctx_.consume(*slots_[i].ready);
  return slots_[i].buffer.data();
}

void ParamGatherer::release_unit(int u) {
  if (!ctx_.placement.params_sharded || persistent_[u]) return;
  const int i = table_.slot_of(u);
  if (i >= 0 && table_.drop(i)) ctx_.be.record(*slots_[i].idle, *ctx_.compute);
}

void ParamGatherer::start_gather(int u, int i) {
  table_.bind(i, u);
  // The first gather of an iteration makes side join compute: inside a CUDA-graph capture begun
  // on compute_stream() this is what puts side (and so the gathers) into the graph; without it
  // the gathers would run once, eagerly, at capture time and every replay would read stale slots.
  if (!side_joined_iteration_) {
    ctx_.side_after_compute();
    side_joined_iteration_ = true;
  }
  ctx_.be.wait(*ctx_.side, *slots_[i].idle);  // compute work still reading the old unit
  gather_unit(u, slots_[i].buffer.data());
  ctx_.be.record(*slots_[i].ready, *ctx_.side);
}

void ParamGatherer::gather_unit(int u, void* dst) {
  const auto& info = ctx_.layout.units()[u];
  const DType c = ctx_.compute_dtype;
  if (ctx_.placement.params_tier == Tier::pinned_host) {
    // The shard lives in pinned host memory: this rank's slice goes up straight into its place in
    // the destination, which is then gathered in place (as gather_updated does for full
    // parameters), so no upload staging is needed on the device.
    std::byte* mine = static_cast<std::byte*>(dst) + ctx_.slice_begin(u) * size_of(c);
    ctx_.be.copy(mine, at(param_shard_, info.shard_offset, c), info.slice_elems * size_of(c), *ctx_.side);
    ctx_.comm.all_gather(mine, dst, info.slice_elems, c, *ctx_.side);
    return;
  }
  ctx_.comm.all_gather(at(param_shard_, info.shard_offset, c), dst, info.slice_elems, c, *ctx_.side);
}

void* ParamGatherer::param_at(int u, std::size_t e) const {
  if (ctx_.placement.params_in_trainer) {  // e lies in a tensor: the ranges follow the tensors
    const int t = tensor_at(ctx_.layout, u, e);
    return static_cast<std::byte*>(borrowed_[t]) + (e - ctx_.layout.tensors()[t].unit_offset) * size_of(ctx_.compute_dtype);
  }
  if (!ctx_.placement.params_sharded) return at(params_full_, ctx_.full_offset(u, e), ctx_.compute_dtype);
  return at(param_shard_, ctx_.shard_offset(u, e), ctx_.compute_dtype);
}

void ParamGatherer::gather_updated() {
  const DType c = ctx_.compute_dtype;
  if (ctx_.placement.gather_after_update) {
    for (std::size_t u = 0; u < ctx_.layout.units().size(); ++u) {
      const auto& info = ctx_.layout.units()[u];
      std::byte* unit = at(params_full_, ctx_.unit_base[u], c);
      ctx_.comm.all_gather(unit + ctx_.slice_begin(static_cast<int>(u)) * size_of(c), unit, info.slice_elems, c,
                           *ctx_.side);
    }
  } else if (ctx_.placement.params_sharded) {
    for (std::size_t u = 0; u < ctx_.layout.units().size(); ++u)
      if (persistent_[u]) gather_unit(static_cast<int>(u), persistent_[u].data());
  }
  // (params_in_trainer: the update wrote this rank's elements into the trainer's arrays itself)
  if (ctx_.placement.params_in_trainer) {
    if (ctx_.placement.state_sharded && ctx_.world > 1) gather_into_trainer();
    return;
  }
  if (!borrowed_.empty()) write_borrowed();
}

// Stages 1-2 with every parameter in the trainer's arrays: each rank updated its slice of every
// unit there. Unit by unit, on side: this rank's elements are copied into their place in slot 0,
// the slot is all-gathered in place, and the other ranks' elements are copied out into the
// trainer's arrays (the slot's alignment gaps carry stale values, which nothing copies out).
void ParamGatherer::gather_into_trainer() {
  const DType c = ctx_.compute_dtype;
  const std::size_t es = size_of(c);
  const Layout& L = ctx_.layout;
  Stream& side = *ctx_.side;
  std::byte* slot = static_cast<std::byte*>(slots_[0].buffer.data());
  for (int u = 0; u < static_cast<int>(L.units().size()); ++u) {
    const auto& info = L.units()[u];
    const std::size_t lo = ctx_.slice_begin(u), hi = lo + info.slice_elems;
    for (int t : tensors_of_unit(L, u)) {
      const auto& ti = L.tensors()[t];
      const std::size_t b = std::max(ti.unit_offset, lo), e = std::min(ti.unit_offset + ti.numel, hi);
      if (b < e) ctx_.be.copy(slot + b * es, static_cast<std::byte*>(borrowed_[t]) + (b - ti.unit_offset) * es, (e - b) * es, side);
    }
    ctx_.comm.all_gather(slot + lo * es, slot, info.slice_elems, c, side);
    for (int t : tensors_of_unit(L, u)) {
      const auto& ti = L.tensors()[t];
      std::byte* dst = static_cast<std::byte*>(borrowed_[t]);
      const std::size_t end = ti.unit_offset + ti.numel;
      // [start, lo) and [hi, end) of the tensor: the parts other ranks updated.
      if (ti.unit_offset < std::min(lo, end))
        ctx_.be.copy(dst, slot + ti.unit_offset * es, (std::min(lo, end) - ti.unit_offset) * es, side);
      const std::size_t from = std::max(hi, ti.unit_offset);
      if (from < end) ctx_.be.copy(dst + (from - ti.unit_offset) * es, slot + from * es, (end - from) * es, side);
    }
  }
}

void ParamGatherer::drop_gathered() { table_.forget_units(); }

bool ParamGatherer::block_borrowed(int b) const { return block_fully_borrowed(ctx_.layout, borrowed_, b); }

std::size_t ParamGatherer::borrowed_bytes() const {
  return borrowed_bytes_of(ctx_.layout, borrowed_, ctx_.compute_dtype);
}

// The current parameters into the trainer's borrowed memory, on side, after the gathers above.
// Stage 3 gathers each unit holding a borrowed tensor into slot 0 in turn (in stream order, so
// one slot serves them all; the slot table forgets its units after a step anyway).
void ParamGatherer::write_borrowed() {
  const DType c = ctx_.compute_dtype;
  const Layout& L = ctx_.layout;
  for (int u = 0; u < static_cast<int>(L.units().size()); ++u) {
    const auto& info = L.units()[u];
    int first = L.blocks()[info.first_block].first_tensor, last = first;
    for (int b = info.first_block; b < info.first_block + info.block_count; ++b)
      last = L.blocks()[b].first_tensor + L.blocks()[b].tensor_count;
    bool any = false;
    for (int t = first; t < last; ++t) any = any || (borrowed_[t] && L.tensors()[t].numel);
    if (!any) continue;
    const std::byte* unit = nullptr;
    if (!ctx_.placement.params_sharded) {
      unit = at(params_full_, ctx_.unit_base[u], c);
    } else if (persistent_[u]) {
      unit = static_cast<const std::byte*>(persistent_[u].data());
    } else {
      ctx_.be.wait(*ctx_.side, *slots_[0].idle);  // compute work still reading its old unit
      gather_unit(u, slots_[0].buffer.data());
      unit = static_cast<const std::byte*>(slots_[0].buffer.data());
    }
    for (int t = first; t < last; ++t)
      if (borrowed_[t] && L.tensors()[t].numel)
        ctx_.be.copy(borrowed_[t], unit + L.tensors()[t].unit_offset * size_of(c), L.tensors()[t].numel * size_of(c),
                     *ctx_.side);
  }
}

}  // namespace shardopt::detail
