// Engine's public calls: argument checks, then Impl (engine_impl.hpp) does the work.
#include "engine/engine_impl.hpp"

namespace shardopt {

Engine::Engine(const Config& config, Backend& backend, Communicator& communicator)
    : impl_(std::make_unique<Impl>(config, backend, communicator)) {}
Engine::~Engine() {
  if (impl_) {
    try {
      impl_->be.synchronize(*impl_->side);
      impl_->be.synchronize(*impl_->compute);
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

void Engine::set_group(int group, const Hyperparams& hyper) {
  require(!impl_->initialized, ErrorCode::invalid_state, "set_group after initialize()");
  require(group >= 0, ErrorCode::invalid_argument, "set_group: negative group " + std::to_string(group));
  Config probe = impl_->cfg;
  probe.hyper = hyper;
  probe.validate();  // same checks as the config's own hyperparameters
  impl_->groups[group] = hyper;
}

void Engine::set_hyperparams(int group, const Hyperparams& hyper) {
  require(group >= 0, ErrorCode::invalid_argument, "set_hyperparams: negative group " + std::to_string(group));
  if (impl_->initialized)
    require(impl_->groups.count(group) != 0, ErrorCode::invalid_argument,
            "set_hyperparams: group " + std::to_string(group) + " is used by no tensor");
  Config probe = impl_->cfg;
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
  const auto it = impl_->groups.find(group);
  if (it != impl_->groups.end()) return it->second;
  require(!impl_->initialized && group >= 0, ErrorCode::invalid_argument,
          "hyperparams: group " + std::to_string(group) + " is used by no tensor");
  return impl_->groups.at(0);
}

void Engine::initialize(const InitFn& init) {
  require(!impl_->specs.empty(), ErrorCode::invalid_state, "initialize: no blocks registered");
  impl_->initialize(init);
}
const Config& Engine::config() const noexcept { return impl_->cfg; }
const Layout& Engine::layout() const {
  impl_->require_initialized("layout");
  return impl_->layout;
}
int Engine::rank() const noexcept { return impl_->rank; }
int Engine::world_size() const noexcept { return impl_->world; }
Stream& Engine::compute_stream() noexcept { return *impl_->compute; }
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
StepResult Engine::last_result() { return impl_->last_result(); }
const float* Engine::loss_scale_buffer() const {
  impl_->require_initialized("loss_scale_buffer");
  return &impl_->dev_state()->loss_scale;
}
void Engine::zero_grad() { impl_->zero_grad(); }

void Engine::read_master(const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
  impl_->read([this](int u, std::size_t e) { return impl_->master_at(u, e); }, fn);
}
void Engine::read_state(int which, const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
  require(which >= 0 && which < impl_->nstates, ErrorCode::invalid_argument,
          "read_state: state " + std::to_string(which) + " does not exist for optimizer " +
              std::string(name_of(impl_->cfg.optimizer)));
  impl_->read([this, which](int u, std::size_t e) { return impl_->state_at(which, u, e); }, fn);
}

MemoryReport Engine::memory_report() const { return impl_->be.memory().report(); }
CommStats Engine::comm_report() const { return impl_->comm.stats(); }
void Engine::reset_comm_report() { impl_->comm.reset_stats(); }

}  // namespace shardopt
