#pragma once
// What checkpoints (src/checkpoint/) need from an engine, and all they may touch: its
// configuration and layout, the state store (read/write by field and state offset), the step
// counter and loss scaler, a collective to agree on outcomes, and one call that makes the
// compute-dtype parameters follow a loaded master. Engine::Impl implements it.
#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "engine/state_store.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt::detail {

class CheckpointPort {
 public:
  // A run of consecutive elements of one tensor whose state this rank holds.
  struct Piece {
    int tensor = 0;
    std::size_t begin = 0, count = 0;
    std::size_t offset = 0;  // state offset of `begin` (see StateStore)
  };

  virtual const Config& config() const = 0;
  virtual const Layout& layout() const = 0;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual const std::map<int, Hyperparams>& groups() const = 0;
  // Whether each rank holds only its shard of the state (else every element).
  virtual bool state_sharded() const = 0;
  virtual std::size_t state_offset(int unit, std::size_t unit_elem) const = 0;
  // The pieces of every tensor this rank holds the state of, in layout order.
  virtual std::vector<Piece> owned_pieces() const = 0;
  virtual StateStore& store() = 0;
  // Host memory of the checkpoint's own (an asynchronous save's snapshot), counted by
  // memory_report() as Category::other at Place::host while it lives.
  virtual Buffer allocate_host(std::size_t bytes, const std::string& name) = 0;

  // Throws Error(invalid_state) naming `call` before initialize(); then waits for all work and
  // returns the current step state.
  virtual StepState quiesce(const char* call) = 0;
  // Throws Error(invalid_state) naming `call` unless the engine is between steps (no micro-step
  // begun, no block acquired where acquiring gathers).
  virtual void require_between_steps(const char* call) const = 0;
  // Replaces the step state (step counter, loss scaler) from now on.
  virtual void restore_state(const StepState& state) = 0;
  // After the store's master values of `pieces` were replaced by `master` (host copies, one
  // vector per piece): the compute-dtype parameters become the master rounded, everywhere they
  // are held (gathered units included).
  virtual void reload_params(const std::vector<Piece>& pieces, const std::vector<std::vector<float>>& master) = 0;

  // Collectives, every rank in the same order: the largest `value` any rank passed; `bytes`
  // (a multiple of 4) of host memory from rank `root` to every rank. Stream-ordered on the
  // engine's side stream and synchronous.
  virtual float agree_max(float value) = 0;
  virtual void broadcast(void* host, std::size_t bytes, int root) = 0;

 protected:
  ~CheckpointPort() = default;
};

}  // namespace shardopt::detail
