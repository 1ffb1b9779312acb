#pragma once
// Engine::Impl (internal): the engine's state and its per-stage logic, shared by the files that
// implement Engine's calls (engine.cpp, and later checkpoint and offload code).
//
// Everything is planned in initialize(): the layout, every buffer, and the list of update ranges
// (contiguous runs of this rank's elements with one parameter group). step() only walks those
// lists. The element-wise arithmetic lives in the backend kernels; this file decides what runs
// where and in which order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <limits>
#include <map>
#include <string>
#include <unordered_set>

#include "engine/plan.hpp"
#include "offload/nvme_store.hpp"
#include "offload/offload_engine.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

namespace detail {
inline std::byte* at(const Buffer& b, std::size_t elem, DType t) {
  return static_cast<std::byte*>(b.data()) + elem * size_of(t);
}
}  // namespace detail
using detail::at;

struct Engine::Impl {
  // One contiguous run of this rank's elements that is updated with one group's hyperparameters.
  struct Range {
    int unit = 0;
    int group = 0;
    int slot = 0;  // index of the group in control_gids (its step-control slot)
    std::size_t unit_begin = 0;  // first element within the unit buffer
    std::size_t n = 0;
    float* master = nullptr;
    float* state[2] = {nullptr, nullptr};
    void* grad = nullptr;
    DType grad_dtype = DType::fp32;
    void* param_out = nullptr;
  };
  // A gathered-unit buffer (stage 3).
  struct Slot {
    Buffer buffer;
    int unit = -1;
    int refs = 0;            // blocks acquired and not yet released
    std::uint64_t last_use = 0;
    std::unique_ptr<Event> ready;  // gather finished
    std::unique_ptr<Event> idle;   // compute work reading it finished
  };
  // A gradient bucket (stages 2-3): the trainer writes one unit's gradients here.
  struct Bucket {
    Buffer buffer;
    int unit = -1;
    std::unique_ptr<Event> free;  // its last reduce-scatter finished and it is zero again
  };

  Config cfg;
  Backend& be;
  Communicator& comm;
  int rank = 0, world = 1;
  std::vector<BlockSpec> specs;
  std::map<int, Hyperparams> groups;
  std::map<int, StepScalars> step_scalars;  // per group: the host copy the offload update reads
  bool initialized = false;

  Layout layout;
  DType c = DType::fp32;   // compute
  DType r = DType::fp32;   // reduce (wire)
  DType gs = DType::fp32;  // sharded gradient (stages 1-3)
  // Stages 2-3 on one rank (no accumulation, no cast, no offload): a unit's gradient is its shard,
  // so backward adds straight into grad_shard (zeroed after each step) with no bucket, no
  // reduce-scatter copy and no bucket zeroing. unit_bucket holds kDirect for an open unit.
  bool direct_grads = false;
  static constexpr int kDirect = -2;
  int nstates = 2;
  std::size_t S = 0;      // shard elements
  std::vector<std::size_t> base;  // unit offset within the full (stage 0-2) buffers
  std::size_t P = 0;      // full padded elements

  std::unique_ptr<Stream> compute, side;  // side: communication and the optimizer step
  std::unique_ptr<Event> compute_done, side_done;
  std::unique_ptr<Event> step_done;     // recorded on side at the end of every step
  std::unique_ptr<Event> result_ready;  // the step's StepState has reached host_scalars
  // set_hyperparams(): the copy out of each staging slot (ctl.staging) has run once its event has.
  std::unique_ptr<Event> hyper_copied[detail::kHyperStagingSlots];
  bool hyper_slot_used[detail::kHyperStagingSlots] = {};
  int hyper_next = 0;

  Buffer params_full, grads_full, grads_reduced, master, states[2], param_shard, grad_shard;
  Buffer reduce_buf, rs_tmp, scalars, host_scalars, init_staging;
  std::vector<Slot> slots;
  std::vector<int> unit_slot;  // stage 3: slot holding each unit, -1 if none
  std::vector<Buffer> persistent;  // stage 3: units that stay gathered (empty Buffer if not)
  std::vector<Bucket> buckets;
  std::vector<int> unit_bucket;  // stages 2-3: bucket bound to each unit this micro-step
  std::vector<Range> ranges;
  std::vector<detail::BufferSpec> buffer_specs;
  // offload (see the offload section below); `offloader` is declared last so it is destroyed first
  detail::OffloadPlan oplan;
  Buffer host_grad, io_ring, param_upload;
  std::vector<Buffer> param_ring;
  std::unique_ptr<Event> reduced;  // recorded on side when a gradient is ready to go down

  // micro-step bookkeeping
  std::vector<char> block_ready;
  std::vector<int> unit_pending;  // blocks of the unit not yet ready this micro-step
  std::vector<int> block_acquired;
  int ready_blocks = 0;
  int micro_steps = 0;
  int last_unit = -1, direction = 1;
  std::uint64_t tick = 0;
  bool side_joined_iteration = false;  // stage 3: side waited on compute since the last step

  // Optimizer and loss-scaler state. The StepState in `scalars` (backend memory) is the truth:
  // every step updates it in stream order. `host_state` is its host copy, current when
  // result_pending is false (settle_state() makes it so).
  detail::ControlLayout ctl;
  std::vector<int> control_gids;  // group of each step-control slot
  StepState host_state;
  bool result_pending = false;  // a step ran since host_state was read
  bool result_captured = false;  // the last step was captured into a graph (settle_state)
  std::uint64_t eager_steps = 0;  // steps that ran eagerly (not captured): capture needs one
  bool step_in_flight = false;  // CPU backend: the host has not yet waited for the last step

  std::unique_ptr<float[]> nvme_view;
  std::unique_ptr<offload::OffloadEngine> offloader;

  Impl(const Config& config, Backend& backend, Communicator& communicator)
      : cfg(config), be(backend), comm(communicator) {
    cfg.validate();
    world = comm.size();
    rank = comm.rank();
    require(world >= 1, ErrorCode::invalid_argument, "communicator world size must be >= 1");
    require(!cfg.offload_params || cfg.offload_optimizer != OffloadKind::none, ErrorCode::unsupported,
            "offload_params=true requires offload_optimizer=host or nvme (the parameter shard is updated by the CPU)");
    groups[0] = cfg.hyper;
    c = cfg.compute_dtype;
    r = cfg.reduce_dtype;
    nstates = state_count(cfg.optimizer);
    host_state.loss_scale = cfg.loss_scaling.mode == LossScaleMode::none ? 1.0f : cfg.loss_scaling.initial_scale;
    compute = be.create_stream("shardopt.compute.r" + std::to_string(rank));
    side = be.create_stream("shardopt.comm.r" + std::to_string(rank));
    compute_done = be.create_event();
    side_done = be.create_event();
    reduced = be.create_event();
    step_done = be.create_event();
    for (auto& e : hyper_copied) e = be.create_event();
    result_ready = be.create_event();
  }

  void require_initialized(const char* call) const {
    require(initialized, ErrorCode::invalid_state, std::string(call) + " before initialize()");
  }
  void check_block(int b, const char* call) const {
    require_initialized(call);
    if (b < 0 || b >= static_cast<int>(layout.blocks().size()))
      throw Error(ErrorCode::invalid_argument, std::string(call) + ": unknown block index " +
                                                   std::to_string(b) + " (" +
                                                   std::to_string(layout.blocks().size()) + " blocks registered)");
  }
  bool host_visible() const { return be.kind() == BackendKind::cpu; }

  // Makes work on `stream` (and, on the CPU backend, the caller) wait for `event`.
  void consume(Event& event) {
    be.wait(*compute, event);
    if (host_visible()) be.synchronize(event);
  }

  // ---------------------------------------------------------------- planning
  void plan() {
    detail::EnginePlan p = detail::plan_engine(cfg, specs, world);
    layout = std::move(p.layout);
    gs = p.shard_grad_dtype;
    direct_grads = cfg.stage >= 2 && world == 1 && cfg.accumulation_steps == 1 && r == c && gs == c &&
                   cfg.offload_optimizer == OffloadKind::none;
    for (const auto& info : layout.units()) direct_grads = direct_grads && info.slice_elems == info.padded_elems;
    oplan = p.offload;
    buffer_specs = std::move(p.buffers);
    ctl = p.control;
    control_gids = detail::control_groups(layout);
    for (const auto& t : layout.tensors())
      if (!groups.count(t.group)) groups[t.group] = groups[0];
    for (const auto& g : groups) step_scalars[g.first] = StepScalars{};
    S = layout.shard_elems();
    base.clear();
    P = 0;
    for (const auto& u : layout.units()) {
      base.push_back(P);
      P += u.padded_elems;
    }
  }

  // Allocates the planned buffers (zero-filled: padding must read as zero) and their events.
  void allocate() {
    using detail::Buf;
    const std::size_t units = layout.units().size();
    if (cfg.stage >= 2) {
      buckets.resize(2);
      unit_bucket.assign(units, -1);
    }
    if (cfg.stage == 3) {
      persistent.resize(units);
      unit_slot.assign(units, -1);
      slots.clear();
    }
    param_ring.clear();
    for (const auto& spec : buffer_specs) {
      if (spec.place == Place::disk) continue;  // the NVMe store reports its file itself
      Buffer b = be.allocate(spec.elems * size_of(spec.dtype), spec.place, spec.category,
                             spec.name + " (rank " + std::to_string(rank) + ")");
      // Host places are zeroed by the host: on CUDA a fill kernel may not reach pinned memory.
      if (b && spec.place != Place::device) std::memset(b.data(), 0, b.bytes());
      else if (b) be.fill(b.data(), spec.dtype, spec.elems, 0.0f, *side);
      switch (spec.kind) {
        case Buf::params_full: params_full = std::move(b); break;
        case Buf::param_shard: param_shard = std::move(b); break;
        case Buf::master: master = std::move(b); break;
        case Buf::state: states[spec.index] = std::move(b); break;
        case Buf::grads_full: grads_full = std::move(b); break;
        case Buf::grads_reduced: grads_reduced = std::move(b); break;
        case Buf::reduce_buf: reduce_buf = std::move(b); break;
        case Buf::grad_shard: grad_shard = std::move(b); break;
        case Buf::bucket:
          buckets[spec.index].buffer = std::move(b);
          buckets[spec.index].free = be.create_event();
          break;
        case Buf::rs_tmp: rs_tmp = std::move(b); break;
        case Buf::slot:
          slots.emplace_back();
          slots.back().buffer = std::move(b);
          slots.back().ready = be.create_event();
          slots.back().idle = be.create_event();
          break;
        case Buf::persistent: persistent[spec.index] = std::move(b); break;
        case Buf::scalars: scalars = std::move(b); break;
        case Buf::host_scalars: host_scalars = std::move(b); break;
        case Buf::init_staging: init_staging = std::move(b); break;
        case Buf::host_grad: host_grad = std::move(b); break;
        case Buf::param_ring: param_ring.push_back(std::move(b)); break;
        case Buf::io_ring: io_ring = std::move(b); break;
        case Buf::param_upload: param_upload = std::move(b); break;
        case Buf::nvme_file: break;
      }
    }
    be.fill(dev_floats() + 1, DType::fp32, 1, 1.0f, *side);
    // The step-control block: the initial StepState and every group's hyperparameters.
    for (std::size_t i = 0; i < control_gids.size(); ++i)
      host_control<Hyperparams>(ctl.hyper)[i] = groups.at(control_gids[i]);
    push_state();
  }

  // ---------------------------------------------------------------- step control block
  template <class T>
  T* host_control(std::size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(host_scalars.data()) + offset);
  }
  template <class T>
  T* dev_control(std::size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(scalars.data()) + offset);
  }
  float* dev_floats() const { return dev_control<float>(ctl.floats); }
  float* host_floats() const { return host_control<float>(ctl.floats); }
  StepState* dev_state() const { return dev_control<StepState>(0); }

  // host_state and the hyperparameters -> backend memory (in order on side; host_scalars is free
  // to reuse when this returns).
  void push_state() {
    *host_control<StepState>(0) = host_state;
    be.copy(scalars.data(), host_scalars.data(), ctl.scalars, *side);
    be.synchronize(*side);
    result_pending = false;
  }
  // Makes host_state current: waits for the last step's result (not for its update). After a
  // step captured into a CUDA graph, every launch of the graph copies its StepState to
  // host_scalars (pinned memory): the state is read from there each time, after waiting for the
  // device (result_ready's last record was a captured one, so synchronizing on it waits for every
  // launch so far).
  void settle_state() {
    if (!result_pending && !result_captured) return;
    be.synchronize(*result_ready);
    host_state = *host_control<StepState>(0);
    result_pending = false;
  }
  // A CUDA-graph capture begun before any eager step would capture work that is done only once,
  // at first use (NCCL's connections, lazily made buffers): refused, with the state left as it was.
  void require_warm_for_capture(const char* call) {
    if (eager_steps > 0 || !be.capturing(*compute)) return;
    throw Error(ErrorCode::invalid_state,
                std::string(call) + ": compute_stream() is being captured into a CUDA graph before any eager step; "
                "run one whole iteration (ending in step() or step_async()) eagerly first, then capture");
  }
  // CPU backend: the host reads and writes views directly, so it waits for the last step to end.
  // (On a GPU compute_stream() already waits for it.)
  void settle_host() {
    if (!step_in_flight) return;
    if (host_visible()) be.synchronize(*step_done);
    step_in_flight = false;
  }

  // ---------------------------------------------------------------- offload
  // With optimizer offload (host or nvme) master_at/state_at point into host memory: the pinned
  // buffers, or for nvme into nvme_view, an address range reserved (never touched) only so those
  // pointers stay distinct per field; read() decodes them (nvme_field) and reads the file.
  bool offloaded() const noexcept { return oplan.enabled; }
  bool on_nvme() const noexcept { return cfg.offload_optimizer == OffloadKind::nvme; }
  // Index of unit-element e of unit u in the state (master and moments): the shard at stages 1-3.
  std::size_t hoff(int u, std::size_t e) const {
    const auto& info = layout.units()[u];
    return cfg.stage == 0 ? base[u] + e : info.shard_offset + (e - rank * info.slice_elems);
  }
  float* state_base(int field) const {
    if (on_nvme()) return nvme_view.get() + static_cast<std::size_t>(field) * oplan.state_elems;
    return field == 0 ? master.as<float>() : states[field - 1].as<float>();
  }
  // nvme: which field (0 master, 1+i state i) and element a master_at/state_at pointer names.
  std::pair<int, std::size_t> nvme_field(const float* p) const {
    const std::size_t d = static_cast<std::size_t>(p - nvme_view.get());
    return {static_cast<int>(d / std::max<std::size_t>(oplan.state_elems, 1)), d % std::max<std::size_t>(oplan.state_elems, 1)};
  }
  // Reads n fp32 values of master/state at `src` (from master_at/state_at) into host memory.
  void read_values(const float* src, std::size_t n, float* out) {
    if (on_nvme()) {
      const auto [field, off_] = nvme_field(src);
      offloader->read(field, off_, n, out);
      return;
    }
    be.copy(out, src, n * 4, *side);
    be.synchronize(*side);
  }

  // The reverse of read_values: stores n fp32 values from host memory at `dst` (from
  // master_at/state_at). With offload the compute-dtype parameters are not touched: derive them
  // from the same host values (round them and copy to param_at).
  void write_values(float* dst, const float* src, std::size_t n) {
    if (on_nvme()) {
      const auto [field, off_] = nvme_field(dst);
      offloader->write(field, off_, n, src);
      return;
    }
    be.copy(dst, src, n * 4, *side);
    be.synchronize(*side);
  }

  void setup_offload() {
    if (!offloaded()) return;
    if (on_nvme()) {
      nvme_view.reset(new (std::nothrow) float[(1 + nstates) * std::max<std::size_t>(oplan.state_elems, 1)]);
      require(nvme_view != nullptr, ErrorCode::out_of_memory, "nvme offload: cannot reserve address space for the state view");
    }
    offload::Setup st;
    st.backend = &be;
    st.kind = cfg.offload_optimizer;
    st.nvme_dir = cfg.nvme_dir;
    st.rank = rank;
    st.world = world;
    st.rule = cfg.optimizer;
    st.nstates = nstates;
    st.grad_dtype = oplan.grad_dtype;
    st.param_dtype = c;
    st.state_elems = oplan.state_elems;
    st.chunk_elems = oplan.chunk_elems;
    st.cells = oplan.cells;
    st.cell_bytes = oplan.cell_bytes;
    st.file_bytes = oplan.file_bytes;
    st.ring = oplan.ring;
    st.params_on_host = cfg.offload_params;
    if (!on_nvme()) {
      st.master = master.as<float>();
      for (int i = 0; i < nstates; ++i) st.states[i] = states[i].as<float>();
    }
    st.host_grad = host_grad.data();
    for (auto& b : param_ring) st.param_ring.push_back(b.data());
    st.io_ring = io_ring.data();
    st.io_ring_bytes = io_ring.bytes();
    st.disk_bytes.assign(kCategoryCount, 0);
    for (const auto& spec : buffer_specs)
      if (spec.place == Place::disk) st.disk_bytes[static_cast<int>(spec.category)] += spec.elems * size_of(spec.dtype);
    offloader = std::make_unique<offload::OffloadEngine>(std::move(st));
    // The update's pieces: the ranges, cut at cell boundaries.
    std::vector<offload::Piece> pieces;
    for (const Range& rg : ranges) {
      const std::size_t h = hoff(rg.unit, rg.unit_begin);
      for (std::size_t done = 0; done < rg.n;) {
        const std::size_t cell_end = ((h + done) / oplan.chunk_elems + 1) * oplan.chunk_elems;
        const std::size_t k = std::min(rg.n - done, cell_end - (h + done));
        pieces.push_back({rg.group, h + done, k, param_at(rg.unit, rg.unit_begin + done)});
        done += k;
      }
    }
    offloader->set_pieces(std::move(pieces));
  }

  // Initial values with offload: the offload engine walks its cells and asks for the master values
  // of each (it rounds and uploads the parameters, and for nvme writes the file).
  void set_initial_values_offloaded(const InitFn& fn) {
    struct Owned {
      int tensor;
      std::size_t begin, n, off;
    };
    std::vector<Owned> owned;
    for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
      if (n) owned.push_back({t, begin, n, hoff(u, e)});
    });
    std::sort(owned.begin(), owned.end(), [](const Owned& a, const Owned& b) { return a.off < b.off; });
    std::size_t j = 0;
    offloader->initialize_values([&](std::size_t cell_begin, std::size_t n, float* m) {
      const std::size_t cell_end = cell_begin + n;
      while (j < owned.size() && owned[j].off + owned[j].n <= cell_begin) ++j;
      for (std::size_t k = j; k < owned.size() && owned[k].off < cell_end; ++k) {
        const std::size_t lo = std::max(cell_begin, owned[k].off);
        const std::size_t hi = std::min(cell_end, owned[k].off + owned[k].n);
        fn(layout.tensors()[owned[k].tensor], owned[k].begin + (lo - owned[k].off), hi - lo, m + (lo - cell_begin));
      }
    });
  }

  // Where this rank's master value of unit-element `e` of unit `u` lives (e within its slice,
  // or anywhere at stage 0).
  float* master_at(int u, std::size_t e) const {
    const auto& info = layout.units()[u];
    if (offloaded()) return state_base(0) + hoff(u, e);
    if (cfg.stage == 0)
      return c == DType::fp32 ? reinterpret_cast<float*>(at(params_full, base[u] + e, c))
                              : master.as<float>() + base[u] + e;
    const std::size_t so = info.shard_offset + (e - rank * info.slice_elems);
    if (c != DType::fp32) return master.as<float>() + so;
    if (cfg.stage == 3) return param_shard.as<float>() + so;
    return reinterpret_cast<float*>(at(params_full, base[u] + e, c));
  }
  void* param_at(int u, std::size_t e) const {
    const auto& info = layout.units()[u];
    if (cfg.stage <= 2) return at(params_full, base[u] + e, c);
    return at(param_shard, info.shard_offset + (e - rank * info.slice_elems), c);
  }
  float* state_at(int i, int u, std::size_t e) const {
    const auto& info = layout.units()[u];
    if (offloaded()) return state_base(1 + i) + hoff(u, e);
    if (cfg.stage == 0) return states[i].as<float>() + base[u] + e;
    return states[i].as<float>() + info.shard_offset + (e - rank * info.slice_elems);
  }
  // The reduced gradient of unit-element e, and its dtype.
  std::pair<void*, DType> grad_at(int u, std::size_t e) const {
    const auto& info = layout.units()[u];
    if (cfg.stage == 0)
      return r == c ? std::pair<void*, DType>{at(grads_full, base[u] + e, c), c}
                    : std::pair<void*, DType>{at(grads_reduced, base[u] + e, r), r};
    if (cfg.stage == 1 && r == c) return {at(grads_full, base[u] + e, c), c};
    return {at(grad_shard, info.shard_offset + (e - rank * info.slice_elems), gs), gs};
  }

  void plan_ranges() {
    ranges.clear();
    const auto& tensors = layout.tensors();
    for (int u = 0; u < static_cast<int>(layout.units().size()); ++u) {
      const auto& info = layout.units()[u];
      const std::size_t lo = cfg.stage == 0 ? 0 : rank * info.slice_elems;
      const std::size_t hi = cfg.stage == 0 ? info.padded_elems : lo + info.slice_elems;
      if (lo == hi) continue;
      // tensors of this unit in order; a range breaks where the group changes
      int first = layout.blocks()[info.first_block].first_tensor;
      int last = first;
      for (int b = info.first_block; b < info.first_block + info.block_count; ++b)
        last = layout.blocks()[b].first_tensor + layout.blocks()[b].tensor_count;
      int group = first < last ? tensors[first].group : 0;
      for (int t = first; t < last; ++t)
        if (tensors[t].unit_offset <= lo) group = tensors[t].group;
      std::size_t start = lo;
      auto emit = [&](std::size_t end) {
        if (end <= start) return;
        Range rg;
        rg.unit = u;
        rg.group = group;
        rg.unit_begin = start;
        rg.n = end - start;
        rg.master = master_at(u, start);
        for (int i = 0; i < nstates; ++i) rg.state[i] = state_at(i, u, start);
        auto [g, gt] = grad_at(u, start);
        rg.grad = g;
        rg.grad_dtype = gt;
        rg.param_out = param_at(u, start);
        ranges.push_back(rg);
        start = end;
      };
      for (int t = first; t < last; ++t) {
        const std::size_t off = tensors[t].unit_offset;
        if (off > lo && off < hi && tensors[t].group != group) {
          emit(off);
          group = tensors[t].group;
        }
      }
      emit(hi);
    }
    for (Range& rg : ranges)
      rg.slot = static_cast<int>(std::lower_bound(control_gids.begin(), control_gids.end(), rg.group) -
                                 control_gids.begin());
  }

  // ---------------------------------------------------------------- initialization
  template <class F>
  void for_each_owned_piece(F&& f) const {
    if (cfg.stage == 0) {
      for (int t = 0; t < static_cast<int>(layout.tensors().size()); ++t) {
        const auto& ti = layout.tensors()[t];
        if (ti.numel) f(t, std::size_t{0}, ti.numel, ti.unit, ti.unit_offset);
      }
      return;
    }
    for (const auto& p : layout.pieces(rank)) {
      const auto& ti = layout.tensors()[p.tensor];
      f(p.tensor, p.tensor_offset, p.count, ti.unit, ti.unit_offset + p.tensor_offset);
    }
  }

  void set_initial_values(const InitFn& init) {
    const InitFn fn = init ? init : seeded_init(0);
    if (offloaded()) {
      set_initial_values_offloaded(fn);
      init_staging.reset();
      return;
    }
    if (!init_staging) return;  // nothing to initialize: no element is owned by any rank
    const std::size_t kChunk = init_staging.bytes() / 4;
    float* host = init_staging.as<float>();
    for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
      for (std::size_t done = 0; done < n; done += kChunk) {
        const std::size_t k = std::min(kChunk, n - done);
        be.synchronize(*side);  // the staging buffer is reused
        fn(layout.tensors()[t], begin + done, k, host);
        be.copy(master_at(u, e + done), host, k * 4, *side);
        if (c != DType::fp32) be.cast(master_at(u, e + done), DType::fp32, param_at(u, e + done), c, k, *side);
      }
    });
    be.synchronize(*side);
    init_staging.reset();
  }

  void gather_full_params() {
    if (cfg.stage == 1 || cfg.stage == 2) {
      for (std::size_t u = 0; u < layout.units().size(); ++u) {
        const auto& info = layout.units()[u];
        std::byte* unit = at(params_full, base[u], c);
        comm.all_gather(unit + rank * info.slice_elems * size_of(c), unit, info.slice_elems, c, *side);
      }
    } else if (cfg.stage == 3) {
      for (std::size_t u = 0; u < layout.units().size(); ++u)
        if (persistent[u]) gather_unit(static_cast<int>(u), persistent[u].data());
    }
  }

  void gather_unit(int u, void* dst) {
    const auto& info = layout.units()[u];
    if (cfg.offload_params) {
      // The shard lives in pinned host memory: up to the device one slice at a time. The copy and
      // the gather are on the same stream, so the next unit's copy waits for this gather.
      be.copy(param_upload.data(), at(param_shard, info.shard_offset, c), info.slice_elems * size_of(c), *side);
      comm.all_gather(param_upload.data(), dst, info.slice_elems, c, *side);
      return;
    }
    comm.all_gather(at(param_shard, info.shard_offset, c), dst, info.slice_elems, c, *side);
  }

  void initialize(const InitFn& init) {
    require(!initialized, ErrorCode::invalid_state, "initialize() called twice");
    plan();
    // A bad NVMe directory is found before gigabytes are allocated for the other buffers.
    if (on_nvme()) offload::NvmeStore::check_directory(cfg.nvme_dir, rank, oplan.file_bytes);
    try {
      allocate();
      // Every gradient reduction is at most one padded unit of the reduce dtype: a communicator
      // that reduces through scratch memory sizes it now, never inside a step (or a capture).
      comm.reserve(layout.max_unit_elems(), r);
      // allocate() zero-fills on the side stream; initial values are written by the host and, with
      // offload, by other streams, which must not race with (and be wiped by) those fills.
      be.synchronize(*side);
      plan_ranges();
      setup_offload();
      set_initial_values(init);
      gather_full_params();
      be.synchronize(*side);
    } catch (...) {
      release_all();
      throw;
    }
    block_ready.assign(layout.blocks().size(), 0);
    block_acquired.assign(layout.blocks().size(), 0);
    unit_pending.resize(layout.units().size());
    reset_pending();
    initialized = true;
  }

  void release_all() {
    // Streams may still be filling the buffers below (allocate() zeroes device buffers on side).
    for (Stream* st : {side.get(), compute.get()}) {
      try {
        be.synchronize(*st);
      } catch (...) {
        // the failure being unwound is what the caller sees; the stream is drained either way
      }
    }
    offloader.reset();  // first: it may still be copying from or to the buffers below
    nvme_view.reset();
    for (auto* b : {&host_grad, &io_ring, &param_upload}) b->reset();
    param_ring.clear();
    for (auto* b : {&params_full, &grads_full, &grads_reduced, &master, &states[0], &states[1], &param_shard,
                    &grad_shard, &reduce_buf, &rs_tmp, &scalars, &host_scalars, &init_staging})
      b->reset();
    slots.clear();
    persistent.clear();
    buckets.clear();
    ranges.clear();
  }

  void reset_pending() {
    for (std::size_t u = 0; u < layout.units().size(); ++u) unit_pending[u] = layout.units()[u].block_count;
    std::fill(block_ready.begin(), block_ready.end(), 0);
    ready_blocks = 0;
  }

  // ---------------------------------------------------------------- per block
  BlockView view_of(int b, const std::function<void*(int tensor)>& where, DType t) const {
    BlockView v;
    v.block = b;
    const auto& bi = layout.blocks()[b];
    for (int i = 0; i < bi.tensor_count; ++i) {
      const auto& ti = layout.tensors()[bi.first_tensor + i];
      v.tensors.push_back(TensorView{where(bi.first_tensor + i), t, ti.numel, &ti});
    }
    return v;
  }

  int take_slot(int u) {
    // A free slot, else the least recently used one nobody holds. Every rank runs the same
    // sequence of calls, so every rank picks the same slot and issues the same gathers.
    int best = -1;
    for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
      const Slot& s = slots[i];
      if (s.refs > 0 || s.unit == u) continue;
      if (best < 0 || (s.unit < 0 && slots[best].unit >= 0) ||
          ((s.unit < 0) == (slots[best].unit < 0) && s.last_use < slots[best].last_use))
        best = i;
    }
    return best;
  }

  void start_gather(int u, int i) {
    Slot& s = slots[i];
    if (s.unit >= 0) unit_slot[s.unit] = -1;
    s.unit = u;
    s.last_use = ++tick;
    unit_slot[u] = i;
    // The first gather of an iteration makes side join compute: inside a CUDA-graph capture begun
    // on compute_stream() this is what puts side (and so the gathers) into the graph; without it
    // the gathers would run once, eagerly, at capture time and every replay would read stale slots.
    if (!side_joined_iteration) {
      be.record(*compute_done, *compute);
      be.wait(*side, *compute_done);
      side_joined_iteration = true;
    }
    be.wait(*side, *s.idle);  // compute work still reading the old unit
    gather_unit(u, s.buffer.data());
    be.record(*s.ready, *side);
  }

  void* unit_params_stage3(int u, bool prefetch_next) {
    if (persistent[u]) return persistent[u].data();
    int i = unit_slot[u];
    if (i < 0) {
      i = take_slot(u);
      if (i < 0)
        throw Error(ErrorCode::invalid_state,
                    "acquire: all " + std::to_string(slots.size()) + " gathered-unit slots are held by acquired blocks; "
                    "release blocks first or raise Config::prefetch_units");
      start_gather(u, i);
    }
    Slot& s = slots[i];
    s.refs++;
    s.last_use = ++tick;
    if (prefetch_next) {
      if (u != last_unit && last_unit >= 0) direction = u > last_unit ? 1 : -1;
      last_unit = u;
      const int units = static_cast<int>(layout.units().size());
      for (int k = 1, next = u + direction; k <= cfg.prefetch_units && next >= 0 && next < units; ++k, next += direction) {
        if (persistent[next] || unit_slot[next] >= 0) continue;
        const int j = take_slot(u);
        if (j < 0) break;
        start_gather(next, j);
      }
    }
    consume(*s.ready);
    return s.buffer.data();
  }

  BlockView acquire(int b) {
    check_block(b, "acquire");
    require_warm_for_capture("acquire");
    settle_host();
    const auto& bi = layout.blocks()[b];
    void* unit = cfg.stage == 3 ? unit_params_stage3(bi.unit, true) : at(params_full, base[bi.unit], c);
    block_acquired[b]++;
    const auto& tensors = layout.tensors();
    return view_of(b, [&](int t) -> void* { return static_cast<std::byte*>(unit) + tensors[t].unit_offset * size_of(c); }, c);
  }

  void release(int b) {
    check_block(b, "release");
    if (block_acquired[b] == 0)
      throw Error(ErrorCode::invalid_state, "release: block '" + layout.blocks()[b].name + "' is not acquired");
    block_acquired[b]--;
    if (cfg.stage == 3) {
      const int u = layout.blocks()[b].unit;
      const int i = unit_slot[u];
      if (i >= 0 && slots[i].refs > 0) {
        if (--slots[i].refs == 0) be.record(*slots[i].idle, *compute);
      }
    }
  }

  BlockView gradients(int b) {
    check_block(b, "gradients");
    settle_host();
    if (block_ready[b])
      throw Error(ErrorCode::invalid_state, "gradients: block '" + layout.blocks()[b].name +
                                                "' already reported grads_ready in this micro-step");
    const auto& bi = layout.blocks()[b];
    const int u = bi.unit;
    std::byte* unit;
    if (cfg.stage <= 1) {
      unit = at(grads_full, base[u], c);
    } else if (direct_grads) {
      unit = at(grad_shard, layout.units()[u].shard_offset, gs);
      unit_bucket[u] = kDirect;
    } else {
      int k = unit_bucket[u];
      if (k < 0) {
        for (int i = 0; i < 2 && k < 0; ++i) {
          bool taken = false;
          for (int v : unit_bucket) taken |= (v == i);
          if (!taken) k = i;
        }
        if (k < 0)
          throw Error(ErrorCode::invalid_state, "gradients: block '" + bi.name +
                                                    "' opens a third unit while two units' gradients are still open; "
                                                    "report grads_ready for every block of a unit before starting another two");
        unit_bucket[u] = k;
        consume(*buckets[k].free);
      }
      unit = static_cast<std::byte*>(buckets[k].buffer.data());
    }
    const auto& tensors = layout.tensors();
    return view_of(b, [&](int t) -> void* { return unit + tensors[t].unit_offset * size_of(c); }, c);
  }

  void grads_ready(int b) {
    check_block(b, "grads_ready");
    if (block_ready[b])
      throw Error(ErrorCode::invalid_state,
                  "grads_ready: block '" + layout.blocks()[b].name + "' reported twice in one micro-step");
    if (micro_steps >= cfg.accumulation_steps)
      throw Error(ErrorCode::invalid_state, "grads_ready: all " + std::to_string(cfg.accumulation_steps) +
                                                " micro-steps of this step are complete; call step() first");
    const int u = layout.blocks()[b].unit;
    if (cfg.stage >= 2 && unit_bucket[u] == -1)
      throw Error(ErrorCode::invalid_state, "grads_ready: block '" + layout.blocks()[b].name +
                                                "' has no gradient buffer; call gradients() first");
    block_ready[b] = 1;
    ready_blocks++;
    if (--unit_pending[u] == 0 && cfg.stage >= 2) reduce_unit_bucket(u);
    if (ready_blocks == static_cast<int>(layout.blocks().size())) {
      micro_steps++;
      reset_pending();
    }
  }

  // Stages 2-3: reduce-scatter one unit's bucket into this rank's gradient shard.
  void reduce_unit_bucket(int u) {
    const auto& info = layout.units()[u];
    be.record(*compute_done, *compute);
    be.wait(*side, *compute_done);  // the step reads what backward wrote on compute
    if (unit_bucket[u] == kDirect) {  // one rank: the gradient already is the shard
      unit_bucket[u] = -1;
      return;
    }
    Bucket& bk = buckets[unit_bucket[u]];
    const void* src = bk.buffer.data();
    if (r != c) {
      be.cast(src, c, reduce_buf.data(), r, info.padded_elems, *side);
      src = reduce_buf.data();
    }
    void* shard = at(grad_shard, info.shard_offset, gs);
    if (cfg.accumulation_steps == 1) {
      comm.reduce_scatter(src, shard, info.slice_elems, r, ReduceOp::avg, *side);
    } else {
      comm.reduce_scatter(src, rs_tmp.data(), info.slice_elems, r, ReduceOp::avg, *side);
      be.accumulate(rs_tmp.data(), r, static_cast<float*>(shard), info.slice_elems, *side);
    }
    be.fill(bk.buffer.data(), c, info.padded_elems, 0.0f, *side);
    be.record(*bk.free, *side);
    unit_bucket[u] = -1;
    // Offload: the unit's reduced gradient goes down as soon as the last micro-step reduced it,
    // while backward goes on.
    if (offloaded() && micro_steps == cfg.accumulation_steps - 1 && info.slice_elems) {
      be.record(*reduced, *side);
      offloader->download(at(grad_shard, info.shard_offset, gs), hoff(u, rank * info.slice_elems), info.slice_elems, *reduced);
    }
  }

  // ---------------------------------------------------------------- step
  void reduce_all_stage01() {
    be.record(*compute_done, *compute);
    be.wait(*side, *compute_done);
    for (std::size_t u = 0; u < layout.units().size(); ++u) {
      const auto& info = layout.units()[u];
      std::byte* g = at(grads_full, base[u], c);
      if (cfg.stage == 0) {
        if (r == c) {
          comm.all_reduce(g, g, info.padded_elems, c, ReduceOp::avg, *side);
        } else {
          void* red = at(grads_reduced, base[u], r);
          be.cast(g, c, red, r, info.padded_elems, *side);
          comm.all_reduce(red, red, info.padded_elems, r, ReduceOp::avg, *side);
        }
      } else if (r == c) {
        comm.reduce_scatter(g, g + rank * info.slice_elems * size_of(c), info.slice_elems, c, ReduceOp::avg, *side);
      } else {
        be.cast(g, c, reduce_buf.data(), r, info.padded_elems, *side);
        comm.reduce_scatter(reduce_buf.data(), at(grad_shard, info.shard_offset, r), info.slice_elems, r,
                            ReduceOp::avg, *side);
      }
    }
  }

  void zero_local_grads() {
    if (cfg.stage <= 1) be.fill(grads_full.data(), c, P, 0.0f, *side);
    // (direct_grads: the update zeroed the shard as it read it, also on a skipped step)
    if (cfg.stage >= 2 && cfg.accumulation_steps > 1) be.fill(grad_shard.data(), gs, S, 0.0f, *side);
  }

  // Enqueues a whole step on side and returns without waiting on the host, except with offload
  // (the CPU update needs the step's decisions on the host).
  void step_async() {
    require_initialized("step");
    if (micro_steps != cfg.accumulation_steps || ready_blocks != 0) {
      std::string missing;
      for (std::size_t b = 0; b < block_ready.size() && missing.size() < 200; ++b)
        if (!block_ready[b]) missing += (missing.empty() ? "" : ", ") + layout.blocks()[b].name;
      throw Error(ErrorCode::invalid_state,
                  "step: " + std::to_string(micro_steps) + " of " + std::to_string(cfg.accumulation_steps) +
                      " micro-steps complete" + (ready_blocks ? "; blocks without grads_ready: " + missing : ""));
    }
    for (std::size_t b = 0; b < block_acquired.size(); ++b)
      if (block_acquired[b] && cfg.stage == 3)
        throw Error(ErrorCode::invalid_state, "step: block '" + layout.blocks()[b].name + "' is still acquired");
    require_warm_for_capture("step");
    const bool captured = be.capturing(*compute);
    // Offload: the step is synchronous anyway; the state before it is what a failed CPU update
    // restores.
    if (offloaded()) settle_state();
    const StepState before = host_state;
    // The step runs on side, after everything the trainer enqueued on compute (this also makes
    // side join a CUDA graph capture begun on compute_stream()).
    be.record(*compute_done, *compute);
    be.wait(*side, *compute_done);

    if (cfg.stage <= 1) {
      reduce_all_stage01();
      if (offloaded()) {
        be.record(*reduced, *side);
        for (int u = 0; u < static_cast<int>(layout.units().size()); ++u) {
          const auto& info = layout.units()[u];
          const std::size_t lo = cfg.stage == 0 ? 0 : rank * info.slice_elems;
          const std::size_t n = cfg.stage == 0 ? info.padded_elems : info.slice_elems;
          offloader->download(grad_at(u, lo).first, hoff(u, lo), n, *reduced);
        }
      }
    }

    // The side stream waits for the gradient downloads, on the device, not on the host, before it
    // goes on to what follows the step.
    if (offloaded()) offloader->downloads_before(*side);
    // Squared norm of the (still loss-scaled, micro-step-summed) gradient, summed over ranks, then
    // the step's decisions: all in backend memory, in stream order. One pass over the gradient:
    // a non-finite element makes the sum of squares non-finite (inf^2 = inf, NaN stays NaN,
    // squares never cancel), and step_control already skips the step when the totals are not
    // finite, so a separate check pass (Backend::unscale_check, whose flag also meant a skip)
    // would decide nothing more. The unscaling is folded into the update's grad_scale. The
    // non-finite flag (sc[0]) stays 0, for the totals' layout.
    float* sc = dev_floats();
    be.fill(sc, DType::fp32, 1, 0.0f, *side);
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      const Range& rg = ranges[i];
      be.sum_squares(rg.grad, rg.grad_dtype, rg.n, sc + 4 + i, *side);
    }
    be.step_totals(sc + 4, ranges.size(), sc, sc + 2, *side);
    // Stage 0 reduced whole gradients: every rank already holds the global norm.
    if (cfg.stage >= 1 && world > 1) comm.all_reduce(sc + 2, sc + 2, 2, DType::fp32, ReduceOp::sum, *side);
    StepControlArgs ca;
    ca.rule = cfg.optimizer;
    ca.totals = sc + 2;
    ca.state = dev_state();
    ca.hyper = dev_control<Hyperparams>(ctl.hyper);
    ca.scalars = dev_control<StepScalars>(ctl.scalars);
    ca.groups = static_cast<int>(control_gids.size());
    ca.accumulation_steps = cfg.accumulation_steps;
    ca.max_grad_norm = cfg.max_grad_norm;
    ca.loss_scaling = cfg.loss_scaling;
    be.step_control(ca, *side);

    if (offloaded()) {
      be.copy(host_scalars.data(), scalars.data(), ctl.staging, *side);
      be.synchronize(*side);
      host_state = *host_control<StepState>(0);
      result_pending = false;
      offloader->finish_downloads();
      if (host_state.applied) {
        // The CPU update reads the host copy of the (still loss-scaled) gradient; the device
        // kernels above only measured it, with a scale of one, so both copies hold the same values.
        const StepScalars* hsc = host_control<StepScalars>(ctl.scalars);
        for (std::size_t i = 0; i < control_gids.size(); ++i) step_scalars[control_gids[i]] = hsc[i];
        try {
          offloader->update(step_scalars);
        } catch (...) {
          // nvme: the file still holds the previous step (see nvme_store.hpp); so does the state.
          host_state = before;
          push_state();
          throw;
        }
        be.wait(*side, offloader->uploaded());
      }
    } else {
      for (const Range& rg : ranges) {
        UpdateArgs a;
        a.rule = cfg.optimizer;
        a.scalars_ptr = dev_control<StepScalars>(ctl.scalars) + rg.slot;
        a.skip_ptr = &dev_state()->skip;
        a.master = rg.master;
        a.state1 = rg.state[0];
        a.state2 = rg.state[1];
        a.grad = rg.grad;
        a.grad_dtype = rg.grad_dtype;
        a.param_out = rg.param_out;
        a.param_dtype = c;
        a.n = rg.n;
        a.zero_grad = direct_grads;  // the shard is the next step's gradient buffer: zero it in this pass
        be.fused_update(a, *side);
      }
    }
    // A skipped step left the parameters as they were: gathering them again changes nothing (the
    // device does not tell the host it skipped, so the gathers are enqueued either way).
    if (!offloaded() || host_state.applied) gather_full_params();
    if (cfg.stage == 3) {
      for (auto& s : slots) {
        if (s.unit >= 0) unit_slot[s.unit] = -1;
        s.unit = -1;
      }
    }
    zero_local_grads();
    if (!offloaded()) {
      be.copy(host_scalars.data(), scalars.data(), sizeof(StepState), *side);
      be.record(*result_ready, *side);
      result_pending = true;
      result_captured = captured;
    }
    if (!captured) eager_steps++;
    be.record(*step_done, *side);
    be.wait(*compute, *step_done);
    side_joined_iteration = false;
    step_in_flight = true;
    micro_steps = 0;
  }

  // A group's new hyperparameters, for the steps enqueued from now on: copied into the
  // step-control block on the side stream, behind any step in flight, from a staging slot of the
  // host copy that no pending copy still reads.
  void set_hyperparams(int group, const Hyperparams& h) {
    groups[group] = h;
    if (!initialized) return;
    const auto it = std::find(control_gids.begin(), control_gids.end(), group);
    if (it == control_gids.end()) return;  // no tensor is in the group: no step reads it
    const std::size_t slot = static_cast<std::size_t>(it - control_gids.begin());
    const int k = hyper_next;
    hyper_next = (k + 1) % detail::kHyperStagingSlots;
    if (hyper_slot_used[k]) be.synchronize(*hyper_copied[k]);
    Hyperparams* staged = host_control<Hyperparams>(ctl.staging) + k;
    *staged = h;
    // The host image of the block too, which push_state() copies whole.
    host_control<Hyperparams>(ctl.hyper)[slot] = h;
    be.copy(dev_control<Hyperparams>(ctl.hyper) + slot, staged, sizeof(Hyperparams), *side);
    be.record(*hyper_copied[k], *side);
    hyper_slot_used[k] = true;
  }

  StepResult last_result() {
    require_initialized("last_result");
    settle_state();
    StepResult res;
    res.lr = host_state.lr;
    res.applied = host_state.applied != 0;
    res.step = host_state.step;
    res.loss_scale = host_state.loss_scale;
    res.grad_norm = host_state.grad_norm;
    res.clip_coefficient = host_state.clip_coefficient;
    return res;
  }

  StepResult step() {
    step_async();
    be.synchronize(*side);
    step_in_flight = false;
    return last_result();
  }

  void zero_grad() {
    require_initialized("zero_grad");
    be.synchronize(*side);
    if (offloaded()) offloader->finish_downloads();
    zero_local_grads();
    if (cfg.stage >= 2) {
      for (auto& bk : buckets) be.fill(bk.buffer.data(), c, layout.max_unit_elems(), 0.0f, *side);
      std::fill(unit_bucket.begin(), unit_bucket.end(), -1);
      if (cfg.accumulation_steps == 1) be.fill(grad_shard.data(), gs, S, 0.0f, *side);
    }
    be.synchronize(*side);
    micro_steps = 0;
    reset_pending();
  }

  void read(const std::function<float*(int u, std::size_t e)>& loc,
            const std::function<void(int, std::size_t, std::size_t, const float*)>& fn) {
    require_initialized("read");
    be.synchronize(*side);
    be.synchronize(*compute);
    std::vector<float> host;
    for_each_owned_piece([&](int t, std::size_t begin, std::size_t n, int u, std::size_t e) {
      host.resize(n);
      if (n) read_values(loc(u, e), n, host.data());
      fn(t, begin, n, host.data());
    });
  }
};


}  // namespace shardopt
