#pragma once
// The step runner (internal): owns the step-control block (StepState, every group's
// hyperparameters and step scalars, in backend memory) and the update ranges, and runs a step:
// the reductions left to the step (GradReducer), the squared norm of the gradient, the step's
// decisions in stream order on the backend (step_control: non-finite skip, clipping, loss scaler,
// schedules), the update (device kernels over the ranges, or the state store's offload engine),
// and the redistribution of the updated parameters (ParamGatherer). Nothing here depends on the
// stage beyond what the Placement table says.
#include <map>
#include <memory>
#include <vector>

#include "engine/grad_reducer.hpp"
#include "engine/param_gatherer.hpp"
#include "engine/state_store.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt::detail {

class StepRunner {
 public:
  StepRunner(EngineContext& ctx, const EnginePlan& plan, StateStore& store, GradReducer& reducer,
             ParamGatherer& gatherer, const std::map<int, Hyperparams>& groups);

  // The update's ranges (contiguous runs of this rank's elements with one parameter group), once
  // every part is allocated; and the same cut at the offload engine's cells.
  void plan_ranges();
  std::vector<offload::Piece> offload_pieces(std::size_t chunk_elems) const;

  // Enqueues a step on side, after everything on compute; returns without waiting on the host
  // except with offload (the CPU update needs the step's decisions on the host).
  void run();
  // A group's new hyperparameters for the steps enqueued from now on (in stream order on side).
  void set_hyperparams(int group, const Hyperparams& h);

  // host_state: current after settle(); push() writes it (and the hyperparameters) to the device.
  StepState& host_state() { return host_state_; }
  void settle();
  void push();
  // CPU backend: the host waits for the last step before reading views.
  void settle_host();
  void wait_step();  // the host waits for the last step's work on side
  // Refuses a CUDA-graph capture begun before any eager step (first uses would be captured).
  void require_warm_for_capture(const char* call) const;
  StepResult last_result();
  float* loss_scale_on_device() const { return &dev_state()->loss_scale; }

  // Collective: the largest `value` any rank passed, through the totals' scalars (free between
  // steps; used by checkpoints to agree on failures and generations).
  float agree_max(float value);

 private:
  template <class T>
  T* host_control(std::size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(host_scalars_.data()) + offset);
  }
  template <class T>
  T* dev_control(std::size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(scalars_.data()) + offset);
  }
  float* dev_floats() const { return dev_control<float>(control_.floats); }
  float* host_floats() const { return host_control<float>(control_.floats); }
  StepState* dev_state() const { return dev_control<StepState>(0); }
  void measure_and_decide();
  void update_on_device();
  void update_compressed();
  void update_offloaded(const StepState& before);

  struct Range {
    int unit = 0;
    int group = 0;
    int slot = 0;                // the group's step-control slot (index in control_groups_)
    std::size_t unit_begin = 0;  // first element within the unit
    std::size_t n = 0;
    float* master = nullptr;  // device tier only (nullptr for nvme)
    float* state[2] = {nullptr, nullptr};
    // Compressed state (Config::state_precision != fp32): codes, int8 block scales, and the dither
    // index of the range's first element, (tensor << 40) + its index in the tensor: a numbering
    // of the tensor's own elements, the same at every world size and stage.
    void* codes[2] = {nullptr, nullptr};
    float* scales[2] = {nullptr, nullptr};
    std::uint64_t first_index = 0;
    void* grad = nullptr;
    DType grad_dtype = DType::fp32;
    void* param_out = nullptr;
  };
  EngineContext& ctx_;
  StateStore& store_;
  GradReducer& reducer_;
  ParamGatherer& gatherer_;
  ControlLayout control_;
  std::vector<int> control_groups_;  // group of each step-control slot
  Buffer scalars_, host_scalars_;
  std::vector<Range> ranges_;
  std::map<int, StepScalars> step_scalars_;  // per group: the host copy the offload update reads

  // The StepState in scalars_ is the truth: every step updates it in stream order. host_state_
  // is its host copy, current when result_pending_ is false (settle() makes it so).
  StepState host_state_;
  bool result_pending_ = false;   // a step ran since host_state_ was read
  bool result_captured_ = false;  // the last step was captured into a graph
  std::uint64_t eager_steps_ = 0;  // steps that ran eagerly (not captured): capture needs one
  bool step_in_flight_ = false;   // CPU backend: the host has not yet waited for the last step
  std::unique_ptr<Event> step_done_;     // recorded on side at the end of every step
  std::unique_ptr<Event> result_ready_;  // the step's StepState has reached host_scalars_
  // set_hyperparams(): the copy out of each staging slot has run once its event has.
  std::unique_ptr<Event> hyper_copied_[kHyperStagingSlots];
  bool hyper_slot_used_[kHyperStagingSlots] = {};
  int hyper_next_ = 0;
};

}  // namespace shardopt::detail
