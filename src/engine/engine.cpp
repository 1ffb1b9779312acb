// Engine's public calls: argument checks, then Impl (engine_impl.hpp) orchestrates the parts.
#include <algorithm>
#include <unordered_set>

#include "engine/engine_impl.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

// ---------------------------------------------------------------- Impl: the per-call work
void Engine::Impl::require_initialized(const char* call) const {
  require(initialized, ErrorCode::invalid_state, std::string(call) + " before initialize()");
}

void Engine::Impl::check_block(int b, const char* call) const {
  require_initialized(call);
  if (b < 0 || b >= static_cast<int>(ctx.layout.blocks().size()))
    throw Error(ErrorCode::invalid_argument, std::string(call) + ": unknown block index " + std::to_string(b) + " (" +
                                                 std::to_string(ctx.layout.blocks().size()) + " blocks registered)");
}

BlockView Engine::Impl::view_of(int b, std::byte* unit, DType t) const {
  BlockView v;
  v.block = b;
  const auto& bi = ctx.layout.blocks()[b];
  for (int i = 0; i < bi.tensor_count; ++i) {
    const auto& ti = ctx.layout.tensors()[bi.first_tensor + i];
    v.tensors.push_back(TensorView{unit ? unit + ti.unit_offset * size_of(t) : nullptr, t, ti.numel, &ti});
  }
  return v;
}

BlockView Engine::Impl::acquire(int b) {
  check_block(b, "acquire");
  runner->require_warm_for_capture("acquire");
  runner->settle_host();
  const auto& bi = ctx.layout.blocks()[b];
  // A block whose every tensor is borrowed is already in the trainer's memory: nothing to gather.
  void* unit = gatherer->block_borrowed(b) ? nullptr : gatherer->acquire_unit(bi.unit);
  block_acquired[b]++;
  BlockView v = view_of(b, static_cast<std::byte*>(unit), ctx.compute_dtype);
  for (int i = 0; i < bi.tensor_count; ++i)
    if (void* mine = gatherer->borrowed(bi.first_tensor + i)) v.tensors[static_cast<std::size_t>(i)].data = mine;
  return v;
}

void Engine::Impl::release(int b) {
  check_block(b, "release");
  if (block_acquired[b] == 0)
    throw Error(ErrorCode::invalid_state, "release: block '" + ctx.layout.blocks()[b].name + "' is not acquired");
  block_acquired[b]--;
  if (!gatherer->block_borrowed(b)) gatherer->release_unit(ctx.layout.blocks()[b].unit);
}

BlockView Engine::Impl::gradients(int b) {
  check_block(b, "gradients");
  runner->settle_host();
  const auto& bi = ctx.layout.blocks()[b];
  BlockView v;
  if (reducer->block_borrowed(b)) {  // every tensor in the trainer's memory: no engine buffer
    if (reducer->ready(b))
      throw Error(ErrorCode::invalid_state,
                  "gradients: block '" + bi.name + "' already reported grads_ready in this micro-step");
    v = view_of(b, nullptr, ctx.compute_dtype);
  } else {
    v = view_of(b, reducer->open_unit(b), ctx.compute_dtype);
  }
  for (int i = 0; i < bi.tensor_count; ++i)
    if (void* mine = reducer->borrowed(bi.first_tensor + i)) v.tensors[static_cast<std::size_t>(i)].data = mine;
  return v;
}

void Engine::Impl::grads_ready(int b) {
  check_block(b, "grads_ready");
  reducer->block_ready(b);
}

void Engine::Impl::step_async() {
  require_initialized("step");
  if (!reducer->complete()) throw Error(ErrorCode::invalid_state, "step: " + reducer->progress());
  if (ctx.placement.params_sharded)
    for (std::size_t b = 0; b < block_acquired.size(); ++b)
      if (block_acquired[b] && !gatherer->block_borrowed(static_cast<int>(b)))
        throw Error(ErrorCode::invalid_state, "step: block '" + ctx.layout.blocks()[b].name + "' is still acquired");
  runner->require_warm_for_capture("step");
  runner->run();
}

StepResult Engine::Impl::step() {
  step_async();
  runner->wait_step();
  return runner->last_result();
}

void Engine::Impl::zero_grad() {
  require_initialized("zero_grad");
  reducer->zero();
}

void Engine::Impl::set_hyperparams(int group, const Hyperparams& h) {
  hyper_by_group[group] = h;
  if (initialized) runner->set_hyperparams(group, h);
}

void Engine::Impl::read(int field, const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
  require_initialized("read");
  ctx.be.synchronize(*ctx.side);
  ctx.be.synchronize(*ctx.compute);
  std::vector<float> host;
  ctx.for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
    host.resize(n);
    store_->read(field, ctx.state_offset(u, e), n, host.data());
    fn(t, begin, n, host.data());
  });
}

// ---------------------------------------------------------------- Engine

Engine::Engine(const Config& config, Backend& backend, Communicator& communicator)
    : impl_(std::make_unique<Impl>(config, backend, communicator)) {}
Engine::~Engine() {
  if (impl_) {
    try {
      impl_->ctx.be.synchronize(*impl_->ctx.side);
      impl_->ctx.be.synchronize(*impl_->ctx.compute);
    } catch (...) {
      // a failed operation was already reported, or will never be; destruction must not throw
    }
  }
}

int Engine::register_block(const BlockSpec& block) {
  require(!impl_->initialized, ErrorCode::invalid_state,
          "register_block('" + block.name + "') after initialize()");
  std::unordered_set<std::string> seen;
  for (const auto& b : impl_->specs) {
    require(b.name != block.name, ErrorCode::invalid_argument, "duplicate block name '" + block.name + "'");
    for (const auto& t : b.tensors) seen.insert(t.name);
  }
  for (const auto& t : block.tensors) {
    require(!t.name.empty(), ErrorCode::invalid_argument, "block '" + block.name + "' has a tensor with an empty name");
    require(seen.insert(t.name).second, ErrorCode::invalid_argument,
            "duplicate tensor name '" + t.name + "' in block '" + block.name + "'");
    require(t.group >= 0, ErrorCode::invalid_argument, "tensor '" + t.name + "' has a negative group");
    try {
      (void)numel(t.shape);  // validates extents
    } catch (const Error& e) {
      throw Error(e.code(), "tensor '" + t.name + "' in block '" + block.name + "': " + e.message());
    }
  }
  require(!block.name.empty(), ErrorCode::invalid_argument, "block name is empty");
  impl_->specs.push_back(block);
  return static_cast<int>(impl_->specs.size()) - 1;
}

namespace {
void borrow(std::vector<void*>& table, const std::vector<BlockSpec>& specs, bool initialized, const char* call,
            int tensor, void* memory) {
  require(!initialized, ErrorCode::invalid_state, std::string(call) + " after initialize()");
  int count = 0;
  for (const auto& b : specs) count += static_cast<int>(b.tensors.size());
  require(tensor >= 0 && tensor < count, ErrorCode::invalid_argument,
          std::string(call) + ": tensor index " + std::to_string(tensor) + " is outside [0, " + std::to_string(count) +
              ") (tensors registered so far, in registration order)");
  if (table.size() < static_cast<std::size_t>(count)) table.resize(static_cast<std::size_t>(count), nullptr);
  table[static_cast<std::size_t>(tensor)] = memory;
}
}  // namespace

void Engine::borrow_gradients(int tensor, void* grads) {
  borrow(impl_->borrowed_grads, impl_->specs, impl_->initialized, "borrow_gradients", tensor, grads);
}

void Engine::borrow_parameters(int tensor, void* params) {
  borrow(impl_->borrowed_params, impl_->specs, impl_->initialized, "borrow_parameters", tensor, params);
}

void Engine::set_group(int group, const Hyperparams& hyper) {
  require(!impl_->initialized, ErrorCode::invalid_state, "set_group after initialize()");
  require(group >= 0, ErrorCode::invalid_argument, "set_group: negative group " + std::to_string(group));
  Config probe = impl_->ctx.cfg;
  probe.hyper = hyper;
  probe.validate();  // same checks as the config's own hyperparameters
  impl_->hyper_by_group[group] = hyper;
}

void Engine::set_hyperparams(int group, const Hyperparams& hyper) {
  require(group >= 0, ErrorCode::invalid_argument, "set_hyperparams: negative group " + std::to_string(group));
  if (impl_->initialized)
    require(impl_->hyper_by_group.count(group) != 0, ErrorCode::invalid_argument,
            "set_hyperparams: group " + std::to_string(group) + " is used by no tensor");
  Config probe = impl_->ctx.cfg;
  probe.hyper = hyper;
  probe.validate();  // same checks as the config's own hyperparameters
  impl_->set_hyperparams(group, hyper);
}

void Engine::set_lr(int group, float lr) {
  Hyperparams h = hyperparams(group);
  h.lr = lr;
  set_hyperparams(group, h);
}

Hyperparams Engine::hyperparams(int group) const {
  const auto it = impl_->hyper_by_group.find(group);
  if (it != impl_->hyper_by_group.end()) return it->second;
  require(!impl_->initialized && group >= 0, ErrorCode::invalid_argument,
          "hyperparams: group " + std::to_string(group) + " is used by no tensor");
  return impl_->hyper_by_group.at(0);
}

void Engine::initialize(const InitFn& init) {
  require(!impl_->specs.empty(), ErrorCode::invalid_state, "initialize: no blocks registered");
  impl_->initialize(init);
}
const Config& Engine::config() const noexcept { return impl_->ctx.cfg; }
const Layout& Engine::layout() const {
  impl_->require_initialized("layout");
  return impl_->ctx.layout;
}
int Engine::rank() const noexcept { return impl_->ctx.rank; }
int Engine::world_size() const noexcept { return impl_->ctx.world; }
Stream& Engine::compute_stream() noexcept { return *impl_->ctx.compute; }
int Engine::find_block(const std::string& name) const {
  for (std::size_t b = 0; b < impl_->specs.size(); ++b)
    if (impl_->specs[b].name == name) return static_cast<int>(b);
  throw Error(ErrorCode::invalid_argument, "unknown block '" + name + "'");
}
BlockView Engine::acquire(int block) { return impl_->acquire(block); }
void Engine::release(int block) { impl_->release(block); }
BlockView Engine::gradients(int block) { return impl_->gradients(block); }
void Engine::grads_ready(int block) { impl_->grads_ready(block); }
StepResult Engine::step() { return impl_->step(); }
void Engine::step_async() { impl_->step_async(); }
StepResult Engine::last_result() {
  impl_->require_initialized("last_result");
  return impl_->runner->last_result();
}
const float* Engine::loss_scale_buffer() const {
  impl_->require_initialized("loss_scale_buffer");
  return impl_->runner->loss_scale_on_device();
}
void Engine::zero_grad() { impl_->zero_grad(); }

void Engine::read_master(const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
  impl_->read(0, fn);
}
void Engine::read_state(int which, const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
  require(which >= 0 && which < impl_->ctx.state_count, ErrorCode::invalid_argument,
          "read_state: state " + std::to_string(which) + " does not exist for optimizer " +
              std::string(name_of(impl_->ctx.cfg.optimizer)));
  impl_->read(1 + which, fn);
}

MemoryReport Engine::memory_report() const {
  MemoryReport r = impl_->ctx.be.memory().report();
  if (impl_->reducer)
    r.borrowed[static_cast<int>(Place::device)] = impl_->reducer->borrowed_bytes() + impl_->gatherer->borrowed_bytes();
  return r;
}
CommStats Engine::comm_report() const { return impl_->ctx.comm.stats(); }
void Engine::reset_comm_report() { impl_->ctx.comm.reset_stats(); }

detail::CheckpointPort& Engine::checkpoint_port() { return *impl_; }

}  // namespace shardopt
