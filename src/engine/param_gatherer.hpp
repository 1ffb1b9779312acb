#pragma once
// The parameter gatherer (internal): owns the compute-dtype parameters and hands out the unit a
// block reads. With Placement::params_sharded (stage 3) this rank keeps only its slices; acquire
// all-gathers a unit into one of Config::prefetch_units + 1 slots (and starts gathering the next
// units in the direction of travel), release lets the slot be reused, and units smaller than
// Config::persistence_threshold stay gathered. Otherwise the full parameters are simply there.
// After the update (and after a checkpoint load) gather_updated() re-assembles what the ranks
// hold from their updated slices.
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/context.hpp"

namespace shardopt::detail {

// Which slot holds which unit, and which slot a new gather takes.
//
// A gather is a collective: every rank must issue the same gathers in the same order, so every
// rank must pick the same slot. This class is what guarantees it: its choices are a function of
// the sequence of acquire/release calls alone (which every rank makes identically) and it holds
// nothing else — no events, no clock, no rank, no backend — so it cannot diverge between ranks.
class SlotTable {
 public:
  void reset(int slots, std::vector<char> persistent);
  bool persistent(int unit) const { return persistent_[unit] != 0; }
  int slot_of(int unit) const { return unit_slot_[unit]; }  // -1: not gathered
  int slots() const { return static_cast<int>(entries_.size()); }
  // A free slot, else the least recently used one nobody holds; never the one holding `unit`.
  // -1 when every slot is held.
  int choose(int unit) const;
  // `slot` now holds `unit` (its previous unit is no longer gathered).
  void bind(int slot, int unit);
  void hold(int slot);
  // Returns true when the last hold of `slot` went away (the slot may be reused after compute).
  bool drop(int slot);
  // The direction of travel (+1 or -1) once `unit` is acquired: prefetch goes that way.
  int travel(int unit);
  // Every slot empty (their contents are stale); use order is kept.
  void forget_units();

 private:
  struct Entry {
    int unit = -1;
    int refs = 0;  // blocks acquired and not yet released
    std::uint64_t last_use = 0;
  };
  std::vector<Entry> entries_;
  std::vector<int> unit_slot_;
  std::vector<char> persistent_;
  std::uint64_t tick_ = 0;
  int last_unit_ = -1, direction_ = 1;
};

class ParamGatherer {
 public:
  ParamGatherer(EngineContext& ctx, const std::vector<BufferSpec>& specs);

  // The parameters of unit u for compute (compute_stream() waits for a gather it needs).
  void* acquire_unit(int u);
  void release_unit(int u);
  // The compute-dtype parameter of unit element e, which this rank updates (in its slice when
  // the parameters are sharded).
  void* param_at(int u, std::size_t e) const;
  // After the parameters this rank owns changed: re-assemble the full parameters, or the
  // persistent units, from every rank's slices (on side); gathered slots are stale, so they are
  // dropped.
  void gather_updated();
  void drop_gathered();
  // Borrowed parameter memory (Engine::borrow_parameters): per tensor, the trainer's buffer or
  // nullptr. gather_updated() ends by writing every borrowed tensor's current values there (on
  // side): from the full parameters, or at stage 3 from each unit gathered into slot 0 (or its
  // persistent buffer). With Placement::params_in_trainer the update wrote this rank's elements
  // there itself, and at stages 1-2 gather_updated() gathers the rest through slot 0.
  void set_borrowed(std::vector<void*> params) { borrowed_ = std::move(params); }
  void* borrowed(int tensor) const { return borrowed_.empty() ? nullptr : borrowed_[tensor]; }
  // Borrowing is on and every tensor of the block with elements is borrowed (acquire needs no
  // gather).
  bool block_borrowed(int block) const;
  std::size_t borrowed_bytes() const;
  // The next gather joins side to compute again (see start_gather).
  void end_iteration() { side_joined_iteration_ = false; }

 private:
  void start_gather(int u, int slot);
  void write_borrowed();
  void gather_into_trainer();
  void gather_unit(int u, void* dst);

  struct Slot {
    Buffer buffer;
    std::unique_ptr<Event> ready;  // gather finished
    std::unique_ptr<Event> idle;   // compute work reading it finished
  };
  EngineContext& ctx_;
  Buffer params_full_, param_shard_;
  std::vector<Buffer> persistent_;  // per unit: kept gathered (empty Buffer if not)
  std::vector<Slot> slots_;
  SlotTable table_;
  bool side_joined_iteration_ = false;  // side waited on compute since the last step
  std::vector<void*> borrowed_;         // per tensor (empty: nothing borrowed)
};

}  // namespace shardopt::detail
