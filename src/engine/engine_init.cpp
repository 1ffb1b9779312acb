// Engine::Impl: initialize() (plan, build the parts, initial values), teardown, and the
// CheckpointPort that checkpoints use.
#include <algorithm>
#include <cstring>
#include <exception>

#include "checkpoint/format.hpp"
#include "engine/agreement.hpp"
#include "engine/borrowed.hpp"
#include "engine/engine_impl.hpp"
#include "offload/nvme_store.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

void Engine::Impl::initialize(const InitFn& init) {
  require(!initialized, ErrorCode::invalid_state, "initialize() called twice");
  // What can fail on one rank alone fails every rank, before anything but the agreement's few KiB
  // is allocated: a rank that threw here would leave the others waiting in a collective.
  detail::RankStatus status;
  try {
    plan = detail::plan_engine(ctx.cfg, specs, ctx.world, all_borrowed(borrowed_params), all_borrowed(borrowed_grads));
    ctx.plan(plan);
    ctx.check_pinned(plan.buffers);  // pinned memory the locked-memory limit refuses: before any allocation
    for (const auto& t : ctx.layout.tensors())
      if (!hyper_by_group.count(t.group)) hyper_by_group[t.group] = hyper_by_group[0];
    // A bad NVMe directory is found before gigabytes are allocated for the other buffers.
    if (ctx.placement.state_tier == detail::Tier::nvme)
      offload::NvmeStore::check_directory(ctx.cfg.nvme_dir, ctx.rank, plan.offload.file_bytes);
    status.fingerprint = detail::config_fingerprint(ctx.cfg, specs, ctx.world, hyper_by_group);
    // Which tensors are borrowed decides collectives (a fully borrowed block is not gathered at
    // acquire and holds no bucket, which changes when units are flushed; borrowing every
    // tensor's parameters changes the plan at stages 1-2, every tensor's gradients at stage 1):
    // the ranks agree on it like on the configuration.
    for (std::size_t t = 0; t < std::max(borrowed_grads.size(), borrowed_params.size()); ++t) {
      const bool g = t < borrowed_grads.size() && borrowed_grads[t];
      const bool p = t < borrowed_params.size() && borrowed_params[t];
      if (g || p) status.fingerprint = (status.fingerprint ^ (t * 4 + (g ? 1 : 0) + (p ? 2 : 0) + 1)) * 0x100000001b3ull;
    }
    for (const auto& spec : plan.buffers)
      if (spec.kind == detail::Buf::agreement) (spec.index == 0 ? agreement.device : agreement.host) = ctx.allocate(spec);
  } catch (const Error& e) {
    status.failure = e.message();
    status.code = e.code();
  }
  try {
    detail::agree(ctx, "initialize() (configuration, model and hyperparameters)", status, agreement);
  } catch (...) {
    agreement = {};  // nothing else was allocated yet
    throw;
  }
  // Allocation and initial values: a rank that fails here (out of memory, an NVMe file it cannot
  // create, a throwing init function) takes part in the agreement below with its failure, so every
  // rank fails at once with its error. At stage 0 (every rank computes every initial value) the
  // ranks also agree on the values: a seed per rank would train different replicas, each step
  // averaging the gradients of different parameters.
  detail::RankStatus ready;
  std::exception_ptr own;
  try {
    // Bottom up. Every planned buffer is allocated zero-filled (on side for the device).
    gatherer = std::make_unique<detail::ParamGatherer>(ctx, plan.buffers);
    if (std::any_of(borrowed_params.begin(), borrowed_params.end(), [](void* p) { return p != nullptr; })) {
      std::vector<void*> params(ctx.layout.tensors().size(), nullptr);
      std::copy(borrowed_params.begin(), borrowed_params.end(), params.begin());
      gatherer->set_borrowed(std::move(params));
    }
    detail::MasterAlias alias;
    for (int u = 0; u < static_cast<int>(ctx.layout.units().size()) && ctx.placement.master_is_params; ++u) {
      if (!ctx.placement.params_in_trainer) {
        alias.push_back({ctx.state_offset(u, ctx.owned_begin(u)), static_cast<float*>(gatherer->param_at(u, ctx.owned_begin(u)))});
        continue;
      }
      // The trainer's arrays are the master weights: a run per tensor's owned part.
      for (int t : detail::tensors_of_unit(ctx.layout, u)) {
        const auto& ti = ctx.layout.tensors()[t];
        const std::size_t b = std::max(ti.unit_offset, ctx.owned_begin(u));
        if (b < std::min(ti.unit_offset + ti.numel, ctx.owned_end(u)))
          alias.push_back({ctx.state_offset(u, b), static_cast<float*>(gatherer->borrowed(t)) + (b - ti.unit_offset)});
      }
    }
    store_ = detail::make_state_store(ctx, plan.buffers, std::move(alias));
    reducer = std::make_unique<detail::GradReducer>(ctx, plan.buffers, *store_);
    if (!borrowed_grads.empty()) {
      std::vector<void*> grads(ctx.layout.tensors().size(), nullptr);
      std::copy(borrowed_grads.begin(), borrowed_grads.end(), grads.begin());
      reducer->set_borrowed(std::move(grads));
    }
    runner = std::make_unique<detail::StepRunner>(ctx, plan, *store_, *reducer, *gatherer, hyper_by_group);
    for (const auto& spec : plan.buffers)
      if (spec.kind == detail::Buf::init_staging) init_staging = ctx.allocate(spec);
    // Every gradient reduction is at most one padded unit of the reduce dtype: a communicator
    // that reduces through scratch memory sizes it now, never inside a step (or a capture).
    ctx.comm.reserve(ctx.layout.max_unit_elems(), ctx.reduce_dtype);
    if (ctx.placement.grads_from_trainer && ctx.reduce_dtype == ctx.compute_dtype)
      ctx.comm.reserve_pieces(ctx.layout.max_unit_elems(), ctx.reduce_dtype);
    // The zero-fills run on side; initial values are written by the host and, with offload, by
    // other streams, which must not race with (and be wiped by) those fills.
    ctx.be.synchronize(*ctx.side);
    runner->plan_ranges();
    if (plan.offload.enabled)
      store_->start_offload(plan.offload, plan.buffers, runner->offload_pieces(plan.offload.chunk_elems));
    ready.fingerprint = set_initial_values(init);
  } catch (const Error& e) {
    own = std::current_exception();
    ready.failure = e.message();
    ready.code = e.code();
  } catch (const std::exception& e) {
    own = std::current_exception();
    ready.failure = e.what();
    ready.code = ErrorCode::communication;  // what the peers see: this rank could not go on
  }
  try {
    detail::agree(ctx,
                  ctx.placement.state_sharded ? "initialize() (allocating and setting initial values)"
                                              : "initialize() (allocating, and the initial values of the replicated parameters)",
                  ready, agreement);
    agreement = {};
    gatherer->gather_updated();
    ctx.be.synchronize(*ctx.side);
  } catch (...) {
    release_all();
    if (own) std::rethrow_exception(own);  // this rank's own failure, as it was thrown
    throw;
  }
  block_acquired.assign(ctx.layout.blocks().size(), 0);
  initialized = true;
}

bool Engine::Impl::all_borrowed(const std::vector<void*>& table) const {
  std::size_t t = 0;
  bool any = false;
  for (const auto& b : specs)
    for (const auto& ts : b.tensors) {
      if (numel(ts.shape) != 0) {
        if (t >= table.size() || !table[t]) return false;
        any = true;
      }
      ++t;
    }
  return any;
}

std::uint64_t Engine::Impl::set_initial_values(const InitFn& init) {
  const InitFn user = init ? init : seeded_init(0);
  // The fingerprint of the values, in the order they are produced (the same order on every rank
  // that owns the same elements); only needed, so only computed, when every rank owns every one.
  std::uint64_t digest = 0;
  const bool replicated = !ctx.placement.state_sharded && ctx.world > 1;
  const InitFn fn = !replicated ? user
                                : InitFn([&](const Layout::TensorInfo& t, std::size_t begin, std::size_t n, float* out) {
                                    user(t, begin, n, out);
                                    digest = digest * 0x100000001b3ull ^ ckpt::xxh64(out, n * 4);
                                  });
  if (store_->offload()) {
    set_initial_values_offloaded(fn);
    init_staging.reset();
    return digest;
  }
  if (!init_staging) return digest;  // nothing to initialize: no element is owned by any rank
  const std::size_t chunk = init_staging.bytes() / 4;
  float* host = init_staging.as<float>();
  const DType c = ctx.compute_dtype;
  ctx.for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
    for (std::size_t done = 0; done < n; done += chunk) {
      const std::size_t k = std::min(chunk, n - done);
      ctx.be.synchronize(*ctx.side);  // the staging buffer is reused
      fn(ctx.layout.tensors()[t], begin + done, k, host);
      float* master = store_->address(0, ctx.state_offset(u, e + done));
      ctx.be.copy(master, host, k * 4, *ctx.side);
      if (c != DType::fp32) ctx.be.cast(master, DType::fp32, gatherer->param_at(u, e + done), c, k, *ctx.side);
    }
  });
  ctx.be.synchronize(*ctx.side);
  init_staging.reset();
  return digest;
}

// With offload the offload engine walks its cells and asks for the master values of each (it
// rounds and uploads the parameters, and for nvme writes the file).
void Engine::Impl::set_initial_values_offloaded(const InitFn& fn) {
  struct Owned {
    int tensor;
    std::size_t begin, n, off;
  };
  std::vector<Owned> owned;
  ctx.for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
    if (n) owned.push_back({t, begin, n, ctx.state_offset(u, e)});
  });
  std::sort(owned.begin(), owned.end(), [](const Owned& a, const Owned& b) { return a.off < b.off; });
  std::size_t j = 0;
  store_->offload()->initialize_values([&](std::size_t cell_begin, std::size_t n, float* m) {
    const std::size_t cell_end = cell_begin + n;
    while (j < owned.size() && owned[j].off + owned[j].n <= cell_begin) ++j;
    for (std::size_t k = j; k < owned.size() && owned[k].off < cell_end; ++k) {
      const std::size_t lo = std::max(cell_begin, owned[k].off);
      const std::size_t hi = std::min(cell_end, owned[k].off + owned[k].n);
      fn(ctx.layout.tensors()[owned[k].tensor], owned[k].begin + (lo - owned[k].off), hi - lo, m + (lo - cell_begin));
    }
  });
}

void Engine::Impl::release_all() noexcept {
  // Streams may still be filling the buffers (the parts zero device buffers on side).
  for (Stream* st : {ctx.side.get(), ctx.compute.get()}) {
    try {
      ctx.be.synchronize(*st);
    } catch (...) {
      // the failure being unwound is what the caller sees; the stream is drained either way
    }
  }
  // Top down; the store's offload engine first of all: it may still copy from or to the
  // gatherer's parameters.
  agreement = {};
  runner.reset();
  reducer.reset();
  if (store_) store_->release();
  store_.reset();
  gatherer.reset();
  init_staging.reset();
}

// ---------------------------------------------------------------- CheckpointPort
std::vector<detail::CheckpointPort::Piece> Engine::Impl::owned_pieces() const {
  std::vector<Piece> out;
  ctx.for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
    if (n) out.push_back({t, begin, n, ctx.state_offset(u, e)});
  });
  return out;
}

StepState Engine::Impl::quiesce(const char* call) {
  require_initialized(call);
  ctx.be.synchronize(*ctx.side);
  ctx.be.synchronize(*ctx.compute);
  runner->settle();
  return runner->host_state();
}

void Engine::Impl::require_between_steps(const char* call) const {
  require_initialized(call);
  require(reducer->idle(), ErrorCode::invalid_state,
          std::string(call) + ": a step is in progress (micro-steps or blocks with grads_ready since the last step()); "
          "call step() or zero_grad() first");
  if (ctx.placement.params_sharded)
    for (std::size_t b = 0; b < block_acquired.size(); ++b)
      require(!block_acquired[b] || gatherer->block_borrowed(static_cast<int>(b)), ErrorCode::invalid_state,
              std::string(call) + ": block '" + ctx.layout.blocks()[b].name + "' is still acquired");
}

void Engine::Impl::restore_state(const StepState& state) {
  runner->settle();
  runner->host_state() = state;
  runner->push();  // synchronizes side
}

void Engine::Impl::reload_params(const std::vector<Piece>& pieces, const std::vector<std::vector<float>>& master) {
  const DType c = ctx.compute_dtype;
  Backend& be = ctx.be;
  Stream& side = *ctx.side;
  std::vector<unsigned char> rounded;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    const Layout::TensorInfo& ti = ctx.layout.tensors()[p.tensor];
    void* param = gatherer->param_at(ti.unit, ti.unit_offset + p.begin);
    const float* stored = store_->address(0, p.offset);
    if (static_cast<const void*>(stored) == param) continue;  // fp32 compute: the master is the parameter
    if (stored) {
      // The master rounded, as initialize() and step() produce it.
      if (c == DType::fp32) be.copy(param, stored, p.count * 4, side);
      else be.cast(stored, DType::fp32, param, c, p.count, side);
      continue;
    }
    // Not addressable (nvme): rounded on the host as the update rounds.
    rounded.resize(p.count * size_of(c));
    for (std::size_t k = 0; k < p.count; ++k) store_from_float(rounded.data(), c, k, master[i][k]);
    be.copy(param, rounded.data(), rounded.size(), side);
    be.synchronize(side);  // `rounded` is reused for the next piece
  }
  be.synchronize(side);
  gatherer->gather_updated();
  gatherer->drop_gathered();  // gathered units hold the old values
}

void Engine::Impl::broadcast(void* host, std::size_t bytes, int root) {
  // Device memory for the collective (a GPU communicator cannot read host memory), with a pinned
  // staging copy; allocated here, on this rare path only, tagged Category::other.
  Buffer dev = ctx.be.allocate(bytes, Place::device, Category::other, "checkpoint broadcast");
  Buffer staging = ctx.be.allocate(bytes, Place::pinned_host, Category::other, "checkpoint broadcast (host)");
  std::memcpy(staging.data(), host, bytes);
  ctx.be.copy(dev.data(), staging.data(), bytes, *ctx.side);
  ctx.comm.broadcast(dev.data(), dev.data(), bytes / 4, DType::fp32, root, *ctx.side);
  ctx.be.copy(staging.data(), dev.data(), bytes, *ctx.side);
  ctx.be.synchronize(*ctx.side);
  std::memcpy(host, staging.data(), bytes);
}

}  // namespace shardopt
