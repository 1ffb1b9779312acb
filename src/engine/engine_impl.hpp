#pragma once
// Engine::Impl (internal): the top of the engine. It checks the trainer's calls and orchestrates
// the parts, which follow the placement table the planner emits once at initialize()
// (plan.hpp), each in its own files and each calling only the ones below it:
//
//   Engine::Impl        the public calls; block bookkeeping; initialize (engine.cpp, engine_init.cpp)
//     StepRunner        step control, update, redistribution            (step_runner.*)
//     GradReducer       gradient buffers, micro-steps, reductions       (grad_reducer.*)
//     ParamGatherer     parameters, stage-3 slots and prefetch          (param_gatherer.*)
//     StateStore        master and optimizer state by field and offset  (state_store.*)
//     EngineContext     backend, communicator, streams, layout, placement, offsets (context.*)
//
// Checkpoints reach the engine only through CheckpointPort (checkpoint_port.hpp), which Impl
// implements (engine_init.cpp).
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/agreement.hpp"
#include "engine/checkpoint_port.hpp"
#include "engine/context.hpp"
#include "engine/grad_reducer.hpp"
#include "engine/param_gatherer.hpp"
#include "engine/state_store.hpp"
#include "engine/step_runner.hpp"
#include "shardopt/engine.hpp"

namespace shardopt {

struct Engine::Impl final : detail::CheckpointPort {
  Impl(const Config& config, Backend& backend, Communicator& communicator)
      : ctx(config, backend, communicator) {
    hyper_by_group[0] = ctx.cfg.hyper;
  }
  ~Impl() { release_all(); }

  detail::EngineContext ctx;
  std::vector<BlockSpec> specs;
  std::map<int, Hyperparams> hyper_by_group;  // every group a tensor uses, once initialized
  bool initialized = false;
  detail::EnginePlan plan;
  std::vector<int> block_acquired;
  std::vector<void*> borrowed_grads;  // per tensor in registration order (Engine::borrow_gradients)
  std::vector<void*> borrowed_params;  // per tensor in registration order (Engine::borrow_parameters)
  // The parts, bottom first (so destroyed top first: the offload engine in the store may still
  // write into the gatherer's parameters).
  std::unique_ptr<detail::ParamGatherer> gatherer;
  std::unique_ptr<detail::StateStore> store_;
  std::unique_ptr<detail::GradReducer> reducer;
  std::unique_ptr<detail::StepRunner> runner;
  Buffer init_staging;
  detail::AgreementBuffers agreement;  // initialize() only (transient)

  // engine_init.cpp
  void initialize(const InitFn& init);
  std::uint64_t set_initial_values(const InitFn& init);  // returns the fingerprint of the values when every rank computes every one (else 0)
  void set_initial_values_offloaded(const InitFn& fn);
  void release_all() noexcept;
  // Every tensor with elements is borrowed in `table` (borrowed_params or borrowed_grads), and
  // some tensor has elements.
  bool all_borrowed(const std::vector<void*>& table) const;

  // engine.cpp
  void require_initialized(const char* call) const;
  void check_block(int b, const char* call) const;
  BlockView view_of(int b, std::byte* unit, DType t) const;
  BlockView acquire(int b);
  void release(int b);
  BlockView gradients(int b);
  void grads_ready(int b);
  void step_async();
  StepResult step();
  void zero_grad();
  void set_hyperparams(int group, const Hyperparams& h);
  void read(int field, const std::function<void(int, std::size_t, std::size_t, const float*)>& fn);

  // detail::CheckpointPort (engine_init.cpp)
  const Config& config() const override { return ctx.cfg; }
  const Layout& layout() const override { return ctx.layout; }
  int rank() const override { return ctx.rank; }
  int world() const override { return ctx.world; }
  const std::map<int, Hyperparams>& groups() const override { return hyper_by_group; }
  bool state_sharded() const override { return ctx.placement.state_sharded; }
  std::size_t state_offset(int unit, std::size_t unit_elem) const override { return ctx.state_offset(unit, unit_elem); }
  std::vector<Piece> owned_pieces() const override;
  detail::StateStore& store() override { return *store_; }
  Buffer allocate_host(std::size_t bytes, const std::string& name) override {
    return ctx.be.allocate(bytes, Place::host, Category::other, name);
  }
  StepState quiesce(const char* call) override;
  void require_between_steps(const char* call) const override;
  void restore_state(const StepState& state) override;
  void reload_params(const std::vector<Piece>& pieces, const std::vector<std::vector<float>>& master) override;
  float agree_max(float value) override { return runner->agree_max(value); }
  void broadcast(void* host, std::size_t bytes, int root) override;
};

}  // namespace shardopt
