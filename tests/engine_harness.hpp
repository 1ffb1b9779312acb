#pragma once
// Test harness for the engine: N in-process ranks as threads, a synthetic trainer that writes
// known gradients, and a float64 reference optimizer written from the algorithms' definitions
// (not from shardopt's rules.hpp), applied to the mean gradient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/thread_pool.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/engine.hpp"

namespace shardopt::testing {

inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline double unit_uniform(std::uint64_t key) {  // [0, 1)
  return static_cast<double>(mix64(key) >> 11) * (1.0 / 9007199254740992.0);
}

// Where the ranks of a test world run and how they talk.
enum class WorldKind {
  cpu,          // CPU backends, in-process communicator over host tasks
  cpu_kernels,  // CPU backends, in-process communicator over the backends' kernels and events
  cuda,         // CUDA backends on device 0, in-process communicator over their kernels and events
  cuda_nccl,    // CUDA backends, NCCL communicator (rank r on device r mod the device count)
};

// Runs fn(rank) on one thread per rank; returns the first exception (null if none). `on_failure`
// runs on a failing rank's thread (to abort the group, so its peers do not wait for it).
inline std::exception_ptr run_on_threads(int n, const std::function<void(int)>& fn,
                                         const std::function<void(int)>& on_failure = {}) {
  std::vector<std::thread> threads;
  std::exception_ptr first;
  std::mutex m;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(m);
          if (!first) first = std::current_exception();
        }
        if (on_failure) on_failure(r);
      }
    });
  for (auto& t : threads) t.join();
  return first;
}

// N ranks, each with its own backend (CPU backends share one kernel pool) and communicator.
struct World {
  int n;
  std::shared_ptr<ThreadPool> pool;
  std::shared_ptr<InProcessGroup> group;  // null for NCCL
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> comms;

  // lock_pinned: CPU backends lock their pinned memory (CpuBackendOptions::lock_pinned).
  explicit World(int world_size, WorldKind kind = WorldKind::cpu, bool lock_pinned = false) : n(world_size) {
    const bool on_cuda = kind == WorldKind::cuda || kind == WorldKind::cuda_nccl;
    if (!on_cuda) pool = make_thread_pool(0);
    for (int r = 0; r < n; ++r) {
      if (on_cuda) {
        backends.push_back(make_cuda_backend(kind == WorldKind::cuda_nccl ? r % std::max(cuda_device_count(), 1) : 0));
      } else {
        CpuBackendOptions o;
        o.pool = pool;
        o.lock_pinned = lock_pinned;
        backends.push_back(make_cpu_backend(o));
      }
    }
    comms.resize(static_cast<std::size_t>(n));
    if (kind == WorldKind::cuda_nccl) {
      // Every rank joins from its own thread: make_nccl_communicator blocks until all have.
      const NcclUniqueId id = nccl_unique_id();
      if (std::exception_ptr e = run_on_threads(n, [&](int r) {
            comms[static_cast<std::size_t>(r)] = make_nccl_communicator(id, r, n, *backends[static_cast<std::size_t>(r)]);
          }))
        std::rethrow_exception(e);
      return;
    }
    group = make_in_process_group(
        n, kind == WorldKind::cpu ? InProcessTransport::host_tasks : InProcessTransport::backend_kernels);
    for (int r = 0; r < n; ++r)
      comms[static_cast<std::size_t>(r)] = make_in_process_communicator(group, r, *backends[static_cast<std::size_t>(r)]);
  }

  // Runs fn(rank) on one thread per rank; rethrows the first exception.
  void run(const std::function<void(int)>& fn) {
    std::exception_ptr first = run_on_threads(n, fn, [&](int r) {
      if (group) abort_in_process_group(*group, "rank " + std::to_string(r) + " failed");
    });
    if (first) std::rethrow_exception(first);
  }
};

// The elements of an engine view, read from the host whatever memory holds them. `be` is the
// engine's backend, or null when the views are host memory: then a memcpy, else a copy ordered on
// the engine's compute stream (the views of a GPU backend are device memory).
inline bool host_views(const Backend* be) { return be == nullptr || be->host_accessible(); }

inline std::vector<unsigned char> read_view(Backend* be, Engine& e, const TensorView& tv) {
  std::vector<unsigned char> host(tv.numel * size_of(tv.dtype));
  if (host.empty()) return host;
  if (host_views(be)) {
    std::memcpy(host.data(), tv.data, host.size());
  } else {
    be->copy(host.data(), tv.data, host.size(), e.compute_stream());
    be->synchronize(e.compute_stream());
  }
  return host;
}

inline void write_view(Backend* be, Engine& e, const TensorView& tv, const std::vector<unsigned char>& host) {
  if (host.empty()) return;
  if (host_views(be)) {
    std::memcpy(tv.data, host.data(), host.size());
  } else {
    be->copy(tv.data, host.data(), host.size(), e.compute_stream());
    be->synchronize(e.compute_stream());  // `host` goes away when the caller returns
  }
}

// A model: blocks of tensors with awkward sizes. Group 1 holds 1-D tensors (no weight decay).
inline std::vector<BlockSpec> awkward_model() {
  return {
      {"embed", {{"embed.w", {37, 11}, 0}}},                           // 407: not divisible by anything useful
      {"l0", {{"l0.w", {24, 37}, 0}, {"l0.b", {24}, 1}, {"l0.empty", {0, 5}, 0}}},
      {"l1", {{"l1.w", {3}, 0}, {"l1.b", {1}, 1}, {"l1.s", {}, 1}}},  // smaller than the world size
      {"big", {{"big.w", {1500}, 0}}},                                  // larger than a bucket
      {"l2", {{"l2.w", {13, 17}, 0}, {"l2.b", {13}, 1}}},
      {"empty", {{"empty.w", {0}, 0}}},                                // a block with no elements
      {"head", {{"head.w", {5, 29}, 0}, {"head.b", {5}, 1}}},
  };
}

inline std::vector<BlockSpec> tiny_tensors_model(int count) {
  std::vector<BlockSpec> blocks;
  for (int b = 0; b < 10; ++b) {
    BlockSpec bs{"tiny" + std::to_string(b), {}};
    for (int i = 0; i < count / 10; ++i)
      bs.tensors.push_back({"t" + std::to_string(b) + "." + std::to_string(i), {1 + (i * 7 + b) % 5}, i % 2});
    blocks.push_back(bs);
  }
  return blocks;
}

// The gradient rank `rank` contributes for (step, micro, tensor name, element): representable in
// `dtype` exactly, magnitude in [0.125, 1), sign fixed per element (so Lion's sign() never sits at
// zero), and varying across steps and ranks.
inline float synthetic_grad(std::uint64_t seed, int step, int micro, int rank, std::uint64_t tensor_key,
                            std::size_t i, DType dtype) {
  const double sign = (mix64(tensor_key * 31 + i) & 1) ? 1.0 : -1.0;
  const double mag = 0.125 + 0.875 * unit_uniform(seed ^ mix64(tensor_key + 977 * i) ^ mix64(step * 131 + micro * 7 + rank * 100003));
  const float v = static_cast<float>(sign * mag);
  switch (dtype) {
    case DType::fp16: return fp16_to_float(float_to_fp16(v));
    case DType::bf16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

// Bit equality of two float vectors (memcmp may not be handed the null data() of an empty one).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

inline std::uint64_t name_key(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// The learning rate of step t >= 1 under h's schedule, in float64 from the closed forms (the
// library's definitions: shardopt/schedule.hpp), with the C library's cos and sqrt.
inline double reference_lr(const Hyperparams& h, std::int64_t t) {
  const double base = h.lr, floor = h.min_lr, w = static_cast<double>(h.warmup_steps), td = static_cast<double>(t);
  if (h.warmup_steps > 0 && t <= h.warmup_steps) return base * td / w;
  const double T = static_cast<double>(h.total_steps);
  const double q = t >= h.total_steps ? 1.0 : (td - w) / (T - w);
  switch (h.schedule) {
    case LrSchedule::constant: return base;
    case LrSchedule::cosine: return floor + (base - floor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * q));
    case LrSchedule::linear: return floor + (base - floor) * (1.0 - q);
    case LrSchedule::inverse_sqrt: return std::max(floor, base * std::sqrt(std::max(w, 1.0) / td));
  }
  return base;
}

// float64 reference optimizer over a flat list of tensors.
struct Reference {
  // The float64 element step of a rule this file does not spell out (a rule's own oracle test,
  // tests/rules/, passes it): p, m, v, the mean gradient, the group's hyperparameters, step t >= 1.
  using ElementStep = std::function<void(double& p, double& m, double& v, double g, const Hyperparams& h,
                                         std::int64_t t)>;
  OptimizerKind kind;
  ElementStep other_rule;
  std::map<int, Hyperparams> groups;
  std::vector<std::vector<double>> p, m, v;
  std::vector<int> group_of;
  std::int64_t t = 0;

  void apply(const std::vector<std::vector<double>>& grad) {
    ++t;
    for (std::size_t k = 0; k < p.size(); ++k) {
      const Hyperparams& h = groups.at(group_of[k]);
      const double lr = reference_lr(h, t), b1 = h.beta1, b2 = h.beta2, eps = h.eps, wd = h.weight_decay;
      for (std::size_t i = 0; i < p[k].size(); ++i) {
        double& P = p[k][i];
        double& M = m[k][i];
        double& V = v[k][i];
        double g = grad[k][i];
        switch (kind) {
          case OptimizerKind::adamw: {
            M = b1 * M + (1 - b1) * g;
            V = b2 * V + (1 - b2) * g * g;
            const double mh = M / (1 - std::pow(b1, double(t)));
            const double vh = V / (1 - std::pow(b2, double(t)));
            P = P * (1 - lr * wd) - lr * mh / (std::sqrt(vh) + eps);
            break;
          }
          case OptimizerKind::adam: {
            g += wd * P;
            M = b1 * M + (1 - b1) * g;
            V = b2 * V + (1 - b2) * g * g;
            const double mh = M / (1 - std::pow(b1, double(t)));
            const double vh = V / (1 - std::pow(b2, double(t)));
            P = P - lr * mh / (std::sqrt(vh) + eps);
            break;
          }
          case OptimizerKind::sgd: {
            g += wd * P;
            M = (t == 1) ? g : h.momentum * M + (1 - h.dampening) * g;
            P = P - lr * (h.nesterov ? g + h.momentum * M : M);
            break;
          }
          case OptimizerKind::lion: {
            const double c = b1 * M + (1 - b1) * g;
            P = P * (1 - lr * wd) - lr * (c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0));
            M = b2 * M + (1 - b2) * g;
            break;
          }
          default:
            if (!other_rule) throw std::logic_error("Reference: no float64 step for rule " + std::string(name_of(kind)));
            other_rule(P, M, V, g, h, t);
            break;
        }
      }
    }
  }
};

// The order in which the synthetic trainer's backward reports gradients.
enum class BackwardOrder {
  reverse,      // block by block, last first: acquire, gradients, write, grads_ready, release
  single_pass,  // gradients() and the write of every block (last first), then grads_ready of each
  scattered,    // block by block, hopping between units: even blocks ascending, then odd descending
};

// One micro-step of the synthetic trainer on this rank: forward acquires and releases every block,
// backward adds the rank's synthetic gradient times `scale` (the loss scale, and any injected
// factor) into each block's gradient view, in `order`. `be`: as for read_view.
inline void synthetic_micro_step(Engine& e, int rank, int step, int micro, std::uint64_t seed, float scale,
                                 Backend* be = nullptr, BackwardOrder order = BackwardOrder::reverse) {
  const DType c = e.config().compute_dtype;
  const int nblocks = static_cast<int>(e.layout().blocks().size());
  for (int b = 0; b < nblocks; ++b) {
    e.acquire(b);
    e.release(b);
  }
  auto write = [&](int b) {
    BlockView g = e.gradients(b);
    for (const TensorView& tv : g.tensors) {
      const std::uint64_t key = name_key(tv.info->name);
      std::vector<unsigned char> host = read_view(be, e, tv);
      for (std::size_t i = 0; i < tv.numel; ++i) {
        const float v = synthetic_grad(seed, step, micro, rank, key, i, c) * scale;
        store_from_float(host.data(), c, i, load_as_float(host.data(), c, i) + v);
      }
      write_view(be, e, tv, host);
    }
  };
  if (order == BackwardOrder::single_pass) {
    for (int b = nblocks - 1; b >= 0; --b) write(b);
    for (int b = nblocks - 1; b >= 0; --b) e.grads_ready(b);
    return;
  }
  std::vector<int> blocks;
  if (order == BackwardOrder::reverse) {
    for (int b = nblocks - 1; b >= 0; --b) blocks.push_back(b);
  } else {
    for (int b = 0; b < nblocks; b += 2) blocks.push_back(b);
    for (int b = nblocks - 1 - (nblocks % 2 == 0 ? 0 : 1); b >= 0; b -= 2) blocks.push_back(b);
  }
  for (int b : blocks) {
    e.acquire(b);
    write(b);
    e.grads_ready(b);
    e.release(b);
  }
}

// One training run of the synthetic trainer on every rank, and what it left behind.
struct RunSpec {
  Config cfg;
  int world = 1;
  int steps = 20;
  std::vector<BlockSpec> model = awkward_model();
  Hyperparams group1;  // hyperparameters of group 1 (1-D tensors)
  std::uint64_t seed = 7;
  // Optional: extra factor on the gradient rank `rank` writes at (step, micro); returning a
  // non-finite value injects an overflow.
  std::function<float(int step, int micro, int rank)> grad_factor;
  WorldKind where = WorldKind::cpu;
  // Optional: called on every rank before the micro-steps of step `step` (from 0), e.g. to change
  // hyperparameters while the previous step may still be in flight.
  std::function<void(Engine& e, int step)> before_step;
  // Drive the steps with step_async(): the loss scale for the next step comes from
  // loss_scale_buffer() (read in stream order), and last_result() is asked for after the last
  // step only (results then holds that one StepResult per rank).
  bool async = false;
  // CPU backends lock their pinned memory (CpuBackendOptions::lock_pinned).
  bool lock_pinned = false;
  BackwardOrder backward = BackwardOrder::reverse;
  // Every tensor's gradient in memory of the trainer's (Engine::borrow_gradients).
  bool borrow_gradients = false;
  // Every tensor's parameters in memory of the trainer's (Engine::borrow_parameters).
  bool borrow_parameters = false;
  // Where the trainer's borrowed arrays live: host vectors when unset (CPU worlds); on a GPU
  // world, device memory from these (cudaMalloc/cudaFree in the GPU tests; this header has no CUDA).
  std::function<void*(std::size_t bytes)> trainer_alloc;
  std::function<void(void*)> trainer_free;
};

struct RunResult {
  std::vector<std::vector<float>> master;     // per tensor, assembled from every rank's shard
  std::vector<std::vector<float>> state[2];
  std::vector<std::vector<int>> coverage;     // how many ranks reported each element
  std::vector<std::vector<float>> params;     // per tensor, compute-dtype values rank 0 acquires, as float
  std::vector<std::vector<StepResult>> results;  // [rank][step]
  std::vector<std::vector<float>> scales_seen;    // [rank][step]: loss_scale_buffer() after the step
  std::vector<MemoryReport> memory;           // per rank, after the run
  std::vector<CommStats> comm_last_step;      // per rank, traffic of the last step alone
  std::vector<std::string> tensor_names;
};

inline Config base_config(int stage, DType dtype, OptimizerKind rule) {
  Config c;
  c.stage = stage;
  c.compute_dtype = dtype;
  c.reduce_dtype = dtype;
  c.optimizer = rule;
  c.bucket_bytes = 512 * size_of(dtype);  // several units, and "big.w" larger than a bucket
  c.alignment = 4;
  c.prefetch_units = 1;
  c.hyper.lr = 1e-2f;
  c.hyper.weight_decay = 0.1f;
  c.hyper.momentum = 0.9f;
  if (rule == OptimizerKind::lion) c.hyper.lr = 1e-3f, c.hyper.beta2 = 0.99f;
  return c;
}

inline Hyperparams no_decay(const Config& c) {
  Hyperparams h = c.hyper;
  h.weight_decay = 0.0f;
  return h;
}

inline RunResult run_training(const RunSpec& spec) {
  World w(spec.world, spec.where, spec.lock_pinned);
  RunResult out;
  const int ntensors = [&] {
    int n = 0;
    for (const auto& b : spec.model) n += static_cast<int>(b.tensors.size());
    return n;
  }();
  out.master.resize(ntensors);
  out.state[0].resize(ntensors);
  out.state[1].resize(ntensors);
  out.coverage.resize(ntensors);
  out.params.resize(ntensors);
  out.results.resize(spec.world);
  out.scales_seen.resize(spec.world);
  out.memory.resize(spec.world);
  out.comm_last_step.resize(spec.world);
  std::mutex m;
  w.run([&](int rank) {
    Engine e(spec.cfg, *w.backends[rank], *w.comms[rank]);
    for (const auto& b : spec.model) e.register_block(b);
    e.set_group(1, spec.group1);
    // The trainer's own gradient arrays, filled with garbage the engine must zero first.
    std::vector<std::vector<unsigned char>> own_grads, own_params;
    // (spec.trainer_alloc: the arrays in its memory instead, freed when the rank is done)
    struct OwnDevice {
      std::vector<void*> ptrs;
      std::function<void(void*)> free_fn;
      ~OwnDevice() {
        for (void* p : ptrs) free_fn(p);
      }
    } own_device{{}, spec.trainer_free};
    auto trainer_array = [&](std::vector<unsigned char>& host) -> void* {
      if (host.empty() || !spec.trainer_alloc) return host.data();
      void* p = spec.trainer_alloc(host.size());
      own_device.ptrs.push_back(p);
      w.backends[rank]->copy(p, host.data(), host.size(), e.compute_stream());
      w.backends[rank]->synchronize(e.compute_stream());
      return p;
    };
    {
      int t = 0;
      for (const auto& b : spec.model)
        for (const auto& ts : b.tensors) {
          own_grads.emplace_back(numel(ts.shape) * size_of(spec.cfg.compute_dtype), 0x5a);
          own_params.emplace_back(numel(ts.shape) * size_of(spec.cfg.compute_dtype), 0x5a);
          if (!own_grads.back().empty() && spec.borrow_gradients) e.borrow_gradients(t, trainer_array(own_grads.back()));
          if (!own_params.back().empty() && spec.borrow_parameters)
            e.borrow_parameters(t, trainer_array(own_params.back()));
          ++t;
        }
    }
    e.initialize(seeded_init(spec.seed));
    const Layout& L = e.layout();
    const int nblocks = static_cast<int>(L.blocks().size());
    {
      std::lock_guard<std::mutex> lock(m);
      if (out.tensor_names.empty()) {
        for (int t = 0; t < ntensors; ++t) {
          out.tensor_names.push_back(L.tensors()[t].name);
          out.master[t].assign(L.tensors()[t].numel, std::nanf(""));
          out.state[0][t].assign(L.tensors()[t].numel, std::nanf(""));
          out.state[1][t].assign(L.tensors()[t].numel, std::nanf(""));
          out.coverage[t].assign(L.tensors()[t].numel, 0);
        }
      }
    }
    const DType c = spec.cfg.compute_dtype;
    Backend& be = *w.backends[rank];
    for (int s = 0; s < spec.steps; ++s) {
      const float scale = out.scales_seen[rank].empty() ? (spec.cfg.loss_scaling.mode == LossScaleMode::none ? 1.0f : spec.cfg.loss_scaling.initial_scale)
                                                        : out.scales_seen[rank].back();
      if (s == spec.steps - 1) e.reset_comm_report();
      if (spec.before_step) spec.before_step(e, s);
      for (int micro = 0; micro < spec.cfg.accumulation_steps; ++micro)
        synthetic_micro_step(e, rank, s, micro, spec.seed,
                             scale * (spec.grad_factor ? spec.grad_factor(s, micro, rank) : 1.0f), &be,
                             spec.backward);
      if (spec.async) {
        e.step_async();
      } else {
        out.results[rank].push_back(e.step());
      }
      // The documented way to read the scale on any backend: in order on compute_stream(). An
      // asynchronous run with a constant scale does not read it, so nothing but the engine's own
      // ordering makes the next micro-step wait for this step.
      float seen = scale;
      if (!spec.async || spec.cfg.loss_scaling.mode == LossScaleMode::dynamic) {
        be.copy(&seen, e.loss_scale_buffer(), sizeof seen, e.compute_stream());
        be.synchronize(e.compute_stream());
      }
      out.scales_seen[rank].push_back(seen);
    }
    if (spec.async && spec.steps > 0) out.results[rank].push_back(e.last_result());
    const CommStats cs = e.comm_report();
    auto collect = [&](std::vector<std::vector<float>>& dst, bool count) {
      return [&dst, &out, count, &m](int t, std::size_t begin, std::size_t n, const float* v) {
        std::lock_guard<std::mutex> lock(m);
        for (std::size_t i = 0; i < n; ++i) {
          dst[t][begin + i] = v[i];
          if (count) out.coverage[t][begin + i]++;
        }
      };
    };
    e.read_master(collect(out.master, true));
    for (int k = 0; k < state_count(spec.cfg.optimizer); ++k) e.read_state(k, collect(out.state[k], false));
    for (int b = 0; b < nblocks; ++b) {  // acquire is collective at stage 3: every rank calls it
      BlockView v = e.acquire(b);
      if (rank == 0) {
        for (int i = 0; i < static_cast<int>(v.tensors.size()); ++i) {
          const int t = L.blocks()[b].first_tensor + i;
          const std::vector<unsigned char> host = read_view(w.backends[rank].get(), e, v.tensors[i]);
          out.params[t].resize(v.tensors[i].numel);
          for (std::size_t k = 0; k < v.tensors[i].numel; ++k) out.params[t][k] = load_as_float(host.data(), c, k);
        }
      }
      e.release(b);
    }
    std::lock_guard<std::mutex> lock(m);
    out.memory[rank] = e.memory_report();
    out.comm_last_step[rank] = cs;
  });
  return out;
}

// The float64 reference run of the same spec: initial values from the same seeded initializer,
// gradient = mean over ranks and micro-steps of the synthetic gradients, optional clipping.
struct ReferenceRun {
  Reference ref;
  std::vector<double> norms;  // global gradient norm per step
};

inline ReferenceRun run_reference(const RunSpec& spec, const std::vector<int>& skip_steps = {},
                                  Reference::ElementStep other_rule = {}) {
  ReferenceRun rr;
  rr.ref.kind = spec.cfg.optimizer;
  rr.ref.other_rule = std::move(other_rule);
  rr.ref.groups[0] = spec.cfg.hyper;
  rr.ref.groups[1] = spec.group1;
  InitFn init = seeded_init(spec.seed);
  std::vector<std::string> names;
  for (const auto& b : spec.model)
    for (const auto& t : b.tensors) {
      Layout::TensorInfo ti;
      ti.name = t.name;
      ti.shape = t.shape;
      ti.numel = numel(t.shape);
      std::vector<float> v(ti.numel);
      if (ti.numel) init(ti, 0, ti.numel, v.data());
      rr.ref.p.emplace_back(v.begin(), v.end());
      rr.ref.m.emplace_back(ti.numel, 0.0);
      rr.ref.v.emplace_back(ti.numel, 0.0);
      rr.ref.group_of.push_back(t.group);
      names.push_back(t.name);
    }
  const DType c = spec.cfg.compute_dtype;
  const int A = spec.cfg.accumulation_steps;
  const bool sum_in_compute_dtype = spec.cfg.stage <= 1 && A > 1 && c != DType::fp32;
  for (int s = 0; s < spec.steps; ++s) {
    bool skip = false;
    for (int k : skip_steps) skip |= (k == s);
    std::vector<std::vector<double>> g(rr.ref.p.size());
    double sumsq = 0;
    for (std::size_t k = 0; k < g.size(); ++k) {
      g[k].assign(rr.ref.p[k].size(), 0.0);
      const std::uint64_t key = name_key(names[k]);
      for (std::size_t i = 0; i < g[k].size(); ++i) {
        double acc = 0;
        for (int r = 0; r < spec.world; ++r) {
          // Stages 0-1 sum a rank's micro-steps in its gradient buffer, in the compute dtype (the
          // engine's contract): each addition is rounded there, as a trainer's add is.
          float local = 0.0f;
          for (int micro = 0; micro < A; ++micro) {
            const float v = synthetic_grad(spec.seed, s, micro, r, key, i, c);
            if (sum_in_compute_dtype) {
              unsigned char b[4];
              store_from_float(b, c, 0, local + v);
              local = load_as_float(b, c, 0);
            } else {
              acc += v;
            }
          }
          if (sum_in_compute_dtype) acc += local;
        }
        g[k][i] = acc / (spec.world * A);
        sumsq += g[k][i] * g[k][i];
      }
    }
    rr.norms.push_back(std::sqrt(sumsq));
    if (skip) continue;
    if (spec.cfg.max_grad_norm > 0 && rr.norms.back() > spec.cfg.max_grad_norm) {
      const double coef = spec.cfg.max_grad_norm / (rr.norms.back() + 1e-6);
      for (auto& t : g)
        for (auto& x : t) x *= coef;
    }
    rr.ref.apply(g);
  }
  return rr;
}

inline double unit_roundoff(DType t) {
  return t == DType::fp32 ? std::ldexp(1.0, -24) : t == DType::fp16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

}  // namespace shardopt::testing
