#include "engine/step_runner.hpp"

#include <algorithm>
#include <string>
#include <tuple>

#include "shardopt/error.hpp"

namespace shardopt::detail {

StepRunner::StepRunner(EngineContext& ctx, const EnginePlan& plan, StateStore& store, GradReducer& reducer,
                       ParamGatherer& gatherer, const std::map<int, Hyperparams>& groups)
    : ctx_(ctx), store_(store), reducer_(reducer), gatherer_(gatherer), control_(plan.control),
      control_groups_(control_groups(ctx.layout)) {
  for (const auto& spec : plan.buffers) {
    if (spec.kind == Buf::scalars) scalars_ = ctx.allocate(spec);
    if (spec.kind == Buf::host_scalars) host_scalars_ = ctx.allocate(spec);
  }
  for (const auto& g : groups) step_scalars_[g.first] = StepScalars{};
  step_done_ = ctx.be.create_event();
  for (auto& e : hyper_copied_) e = ctx.be.create_event();
  result_ready_ = ctx.be.create_event();
  host_state_.loss_scale = ctx.cfg.loss_scaling.mode == LossScaleMode::none ? 1.0f : ctx.cfg.loss_scaling.initial_scale;
  ctx.be.fill(dev_floats() + 1, DType::fp32, 1, 1.0f, *ctx.side);
  // The step-control block: the initial StepState and every group's hyperparameters.
  for (std::size_t i = 0; i < control_groups_.size(); ++i)
    host_control<Hyperparams>(control_.hyper)[i] = groups.at(control_groups_[i]);
  push();
}

// ---------------------------------------------------------------- ranges
void StepRunner::plan_ranges() {
  ranges_.clear();
  const Layout& layout = ctx_.layout;
  const auto& tensors = layout.tensors();
  for (int u = 0; u < static_cast<int>(layout.units().size()); ++u) {
    const auto& info = layout.units()[u];
    const std::size_t lo = ctx_.owned_begin(u), hi = ctx_.owned_end(u);
    if (lo == hi) continue;
    // tensors of this unit in order; a range breaks where the group changes
    int first = layout.blocks()[info.first_block].first_tensor;
    int last = first;
    for (int b = info.first_block; b < info.first_block + info.block_count; ++b)
      last = layout.blocks()[b].first_tensor + layout.blocks()[b].tensor_count;
    int group = first < last ? tensors[first].group : 0;
    int tensor = first;  // the tensor holding `start` (or whose padding does)
    for (int t = first; t < last; ++t)
      if (tensors[t].unit_offset <= lo) {
        group = tensors[t].group;
        tensor = t;
      }
    // Compressed state: a range per tensor, so that its dither index is the tensor's own (the
    // int8 blocks are aligned to tensor starts and slices by the layout).
    const bool per_tensor = ctx_.cfg.state_precision != StatePrecision::fp32;
    std::size_t start = lo;
    auto emit = [&](std::size_t end) {
      if (end <= start) return;
      Range rg;
      rg.unit = u;
      rg.group = group;
      rg.unit_begin = start;
      rg.n = end - start;
      const std::size_t off = ctx_.state_offset(u, start);
      rg.master = store_.address(0, off);
      for (int i = 0; i < ctx_.state_count; ++i) rg.state[i] = store_.address(1 + i, off);
      for (int i = 0; i < ctx_.state_count; ++i) {
        rg.codes[i] = store_.state_codes(i, off);
        rg.scales[i] = store_.state_scales(i, off);
      }
      if (tensor < last && start >= tensors[tensor].unit_offset)
        rg.first_index = (static_cast<std::uint64_t>(tensor) << 40) + (start - tensors[tensor].unit_offset);
      std::tie(rg.grad, rg.grad_dtype) = reducer_.reduced_at(u, start);
      rg.param_out = gatherer_.param_at(u, start);
      ranges_.push_back(rg);
      start = end;
    };
    if (ctx_.placement.ranges_follow_tensors()) {
      // The trainer's memory holds each tensor on its own: a range per tensor, none over the
      // alignment gaps between them (zero in every buffer, and left zero by every rule).
      for (int t = first; t < last; ++t) {
        const std::size_t b = std::max(tensors[t].unit_offset, lo), e = std::min(tensors[t].unit_offset + tensors[t].numel, hi);
        if (b >= e) continue;
        group = tensors[t].group;
        tensor = t;
        start = b;
        emit(e);
      }
      continue;
    }
    for (int t = first; t < last; ++t) {
      const std::size_t off = tensors[t].unit_offset;
      if (off > lo && off < hi && (tensors[t].group != group || per_tensor)) {
        emit(off);
        group = tensors[t].group;
      }
      if (off < hi && off >= lo) tensor = t;
    }
    emit(hi);
  }
  for (Range& rg : ranges_)
    rg.slot = static_cast<int>(std::lower_bound(control_groups_.begin(), control_groups_.end(), rg.group) -
                               control_groups_.begin());
  // Ranges whose reduced gradient has no device copy (offload) are measured by the reducer as
  // their unit lands, into the same partial slots (unless the host copy sums micro-steps).
  if (!reducer_.host_accumulates()) {
    std::vector<std::vector<GradReducer::NormRange>> per_unit(layout.units().size());
    for (std::size_t i = 0; i < ranges_.size(); ++i)
      if (!ranges_[i].grad)
        per_unit[ranges_[i].unit].push_back({ranges_[i].unit_begin, ranges_[i].n, dev_floats() + 4 + i});
    reducer_.set_norm_ranges(std::move(per_unit));
  }
}

std::vector<offload::Piece> StepRunner::offload_pieces(std::size_t chunk_elems) const {
  std::vector<offload::Piece> pieces;
  for (const Range& rg : ranges_) {
    const std::size_t h = ctx_.state_offset(rg.unit, rg.unit_begin);
    for (std::size_t done = 0; done < rg.n;) {
      const std::size_t cell_end = ((h + done) / chunk_elems + 1) * chunk_elems;
      const std::size_t k = std::min(rg.n - done, cell_end - (h + done));
      pieces.push_back({rg.group, h + done, k, gatherer_.param_at(rg.unit, rg.unit_begin + done), rg.first_index + done});
      done += k;
    }
  }
  return pieces;
}

// ---------------------------------------------------------------- the step
void StepRunner::run() {
  Backend& be = ctx_.be;
  Stream& side = *ctx_.side;
  const bool captured = be.capturing(*ctx_.compute);
  offload::OffloadEngine* offload = store_.offload();
  // Offload: the step is synchronous anyway; the state before it is what a failed CPU update
  // restores.
  if (offload) settle();
  const StepState before = host_state_;
  // The step runs on side, after everything the trainer enqueued on compute (this also makes
  // side join a CUDA graph capture begun on compute_stream()).
  ctx_.side_after_compute();
  reducer_.reduce_at_step();
  // The side stream waits for the gradient downloads, on the device, not on the host, before it
  // goes on to what follows the step.
  if (offload) offload->downloads_before(side);
  measure_and_decide();
  if (offload) update_offloaded(before);
  else update_on_device();
  // A skipped step left the parameters as they were: gathering them again changes nothing (the
  // device does not tell the host it skipped, so the gathers are enqueued either way).
  if (!offload || host_state_.applied) gatherer_.gather_updated();
  gatherer_.drop_gathered();
  reducer_.finish_step();
  if (!offload) {
    be.copy(host_scalars_.data(), scalars_.data(), sizeof(StepState), side);
    be.record(*result_ready_, side);
    result_pending_ = true;
    result_captured_ = captured;
  }
  if (!captured) eager_steps_++;
  be.record(*step_done_, side);
  be.wait(*ctx_.compute, *step_done_);
  gatherer_.end_iteration();
  step_in_flight_ = true;
}

// Squared norm of the (still loss-scaled, micro-step-summed) gradient, summed over ranks, then
// the step's decisions: all in backend memory, in stream order. One pass over the gradient: a
// non-finite element makes the sum of squares non-finite (inf^2 = inf, NaN stays NaN, squares
// never cancel), and step_control already skips the step when the totals are not finite, so a
// separate check pass would decide nothing more. The unscaling is folded into the update's
// grad_scale. The non-finite flag (floats[0]) stays 0, for the totals' layout.
void StepRunner::measure_and_decide() {
  Stream& side = *ctx_.side;
  float* sc = dev_floats();
  ctx_.be.fill(sc, DType::fp32, 1, 0.0f, side);
  // Ranges without a device copy were measured as their unit landed (GradReducer::measure), or
  // are measured here on the host copy, where the micro-steps were summed.
  for (std::size_t i = 0; i < ranges_.size(); ++i)
    if (ranges_[i].grad) ctx_.be.sum_squares(ranges_[i].grad, ranges_[i].grad_dtype, ranges_[i].n, sc + 4 + i, side);
  if (reducer_.host_accumulates() && !ranges_.empty()) {
    offload::OffloadEngine& offload = *store_.offload();
    offload.finish_downloads();
    float* hs = host_floats();
    for (std::size_t i = 0; i < ranges_.size(); ++i)
      hs[4 + i] = offload.host_sum_squares(ctx_.state_offset(ranges_[i].unit, ranges_[i].unit_begin), ranges_[i].n);
    ctx_.be.copy(sc + 4, hs + 4, ranges_.size() * 4, side);
  }
  ctx_.be.step_totals(sc + 4, ranges_.size(), sc, sc + 2, side);
  if (ctx_.placement.norm_across_ranks) ctx_.comm.all_reduce(sc + 2, sc + 2, 2, DType::fp32, ReduceOp::sum, side);
  StepControlArgs ca;
  ca.rule = ctx_.cfg.optimizer;
  ca.totals = sc + 2;
  ca.state = dev_state();
  ca.hyper = dev_control<Hyperparams>(control_.hyper);
  ca.scalars = dev_control<StepScalars>(control_.scalars);
  ca.groups = static_cast<int>(control_groups_.size());
  ca.accumulation_steps = ctx_.cfg.accumulation_steps;
  ca.max_grad_norm = ctx_.cfg.max_grad_norm;
  ca.loss_scaling = ctx_.cfg.loss_scaling;
  ctx_.be.step_control(ca, side);
}

void StepRunner::update_on_device() {
  if (ctx_.cfg.state_precision != StatePrecision::fp32) return update_compressed();
  for (const Range& rg : ranges_) {
    UpdateArgs a;
    a.rule = ctx_.cfg.optimizer;
    a.scalars_ptr = dev_control<StepScalars>(control_.scalars) + rg.slot;
    a.skip_ptr = &dev_state()->skip;
    a.master = rg.master;
    a.state1 = rg.state[0];
    a.state2 = rg.state[1];
    a.grad = rg.grad;
    a.grad_dtype = rg.grad_dtype;
    a.param_out = rg.param_out;
    a.param_dtype = ctx_.compute_dtype;
    a.n = rg.n;
    a.zero_grad = reducer_.zeroed_by_update();  // the shard is the next step's gradient buffer
    ctx_.be.fused_update(a, *ctx_.side);
  }
}

// Compressed state: the same update with the states decoded and encoded around the rule. The
// dither's seed is the step counter as step_control left it (the number of this applied step),
// read by the kernel from backend memory, so a CUDA graph replays each step with its own seed and
// a run resumed from a checkpoint continues with the seeds it would have used.
void StepRunner::update_compressed() {
  for (const Range& rg : ranges_) {
    CompressedUpdateArgs a;
    a.rule = ctx_.cfg.optimizer;
    a.scalars_ptr = dev_control<StepScalars>(control_.scalars) + rg.slot;
    a.skip_ptr = &dev_state()->skip;
    a.seed_ptr = &dev_state()->step;
    a.precision = ctx_.cfg.state_precision;
    a.block_size = ctx_.cfg.quant_block;
    a.first_index = rg.first_index;
    a.master = rg.master;
    a.state1 = rg.codes[0];
    a.state2 = rg.codes[1];
    a.scales1 = rg.scales[0];
    a.scales2 = rg.scales[1];
    a.grad = rg.grad;
    a.grad_dtype = rg.grad_dtype;
    a.param_out = rg.param_out;
    a.param_dtype = ctx_.compute_dtype;
    a.n = rg.n;
    a.zero_grad = reducer_.zeroed_by_update();
    ctx_.be.compressed_update(a, *ctx_.side);
  }
}

void StepRunner::update_offloaded(const StepState& before) {
  Backend& be = ctx_.be;
  offload::OffloadEngine& offload = *store_.offload();
  be.copy(host_scalars_.data(), scalars_.data(), control_.staging, *ctx_.side);
  be.synchronize(*ctx_.side);
  host_state_ = *host_control<StepState>(0);
  result_pending_ = false;
  offload.finish_downloads();
  if (!host_state_.applied) return;
  // The CPU update reads the host copy of the (still loss-scaled) gradient; the device kernels
  // above only measured it, with a scale of one, so both copies hold the same values.
  const StepScalars* hsc = host_control<StepScalars>(control_.scalars);
  for (std::size_t i = 0; i < control_groups_.size(); ++i) step_scalars_[control_groups_[i]] = hsc[i];
  try {
    offload.update(step_scalars_, static_cast<std::uint64_t>(host_state_.step));
  } catch (...) {
    // nvme: the file still holds the previous step (see nvme_store.hpp); so does the state.
    host_state_ = before;
    push();
    throw;
  }
  be.wait(*ctx_.side, offload.uploaded());
}

// ---------------------------------------------------------------- control block
void StepRunner::set_hyperparams(int group, const Hyperparams& h) {
  const auto it = std::find(control_groups_.begin(), control_groups_.end(), group);
  if (it == control_groups_.end()) return;  // no tensor is in the group: no step reads it
  const std::size_t slot = static_cast<std::size_t>(it - control_groups_.begin());
  // A staging slot of the host copy that no pending copy still reads.
  const int k = hyper_next_;
  hyper_next_ = (k + 1) % kHyperStagingSlots;
  if (hyper_slot_used_[k]) ctx_.be.synchronize(*hyper_copied_[k]);
  Hyperparams* staged = host_control<Hyperparams>(control_.staging) + k;
  *staged = h;
  // The host image of the block too, which push() copies whole.
  host_control<Hyperparams>(control_.hyper)[slot] = h;
  ctx_.be.copy(dev_control<Hyperparams>(control_.hyper) + slot, staged, sizeof(Hyperparams), *ctx_.side);
  ctx_.be.record(*hyper_copied_[k], *ctx_.side);
  hyper_slot_used_[k] = true;
}

// host_state and the hyperparameters -> backend memory (in order on side; host_scalars_ is free
// to reuse when this returns).
void StepRunner::push() {
  *host_control<StepState>(0) = host_state_;
  ctx_.be.copy(scalars_.data(), host_scalars_.data(), control_.scalars, *ctx_.side);
  ctx_.be.synchronize(*ctx_.side);
  result_pending_ = false;
}

// Waits for the last step's result (not for its update). After a step captured into a CUDA
// graph, every launch of the graph copies its StepState to host_scalars_ (pinned memory): the
// state is read from there each time, after waiting for the device (result_ready_'s last record
// was a captured one, so synchronizing on it waits for every launch so far).
void StepRunner::settle() {
  if (!result_pending_ && !result_captured_) return;
  ctx_.be.synchronize(*result_ready_);
  host_state_ = *host_control<StepState>(0);
  result_pending_ = false;
}

void StepRunner::settle_host() {
  if (!step_in_flight_) return;
  if (ctx_.host_visible()) ctx_.be.synchronize(*step_done_);
  step_in_flight_ = false;
}

void StepRunner::wait_step() {
  ctx_.be.synchronize(*ctx_.side);
  step_in_flight_ = false;
}

void StepRunner::require_warm_for_capture(const char* call) const {
  if (eager_steps_ > 0 || !ctx_.be.capturing(*ctx_.compute)) return;
  throw Error(ErrorCode::invalid_state,
              std::string(call) + ": compute_stream() is being captured into a CUDA graph before any eager step; "
              "run one whole iteration (ending in step() or step_async()) eagerly first, then capture");
}

StepResult StepRunner::last_result() {
  settle();
  StepResult res;
  res.lr = host_state_.lr;
  res.applied = host_state_.applied != 0;
  res.step = host_state_.step;
  res.loss_scale = host_state_.loss_scale;
  res.grad_norm = host_state_.grad_norm;
  res.clip_coefficient = host_state_.clip_coefficient;
  return res;
}

float StepRunner::agree_max(float value) {
  float* hs = host_floats();
  float* sc = dev_floats();
  hs[2] = value;
  ctx_.be.copy(sc + 2, hs + 2, 4, *ctx_.side);
  ctx_.comm.all_reduce(sc + 2, sc + 2, 1, DType::fp32, ReduceOp::max, *ctx_.side);
  ctx_.be.copy(hs + 2, sc + 2, 4, *ctx_.side);
  ctx_.be.synchronize(*ctx_.side);
  return hs[2];
}

}  // namespace shardopt::detail
