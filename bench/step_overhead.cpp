// The whole engine step against the optimizer update alone: how much of a step is not the update.
//
//   step_overhead [--params N] [--steps K] [--world4 0|1]
//
// Stage 2, bf16 parameters and gradients, fp32 master and AdamW moments, no offload, CPU backend,
// in-process ranks. Gradients stay zero and there is no trainer compute, so what is timed is the
// engine's own work. Reported per step (median of K after 2 warm-up steps):
//   update alone : Backend::fused_update over all n parameters on a stream (the kernel step() runs,
//                  through the same backend and thread pool), then a wait; timed between the
//                  steps of the same run, so both medians see the same machine load;
//   step, world 1: grads_ready of every block (the reduce-scatter of each bucket) + step()
//                  (non-finite check and norm, step control, update, all-gather, zeroing);
//                  goal: <= 1.3 x update alone;
//   step, world 4: the same on 4 in-process ranks (threads) sharing the machine's cores, against
//                  the floor "update of all 4 shards + the bytes the reduce-scatter and the
//                  all-gather must move, at the machine's measured copy bandwidth".
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.hpp"
#include "bench_util.hpp"
#include "shardopt/shardopt.hpp"

using namespace shardopt;
using bench::Clock;
using bench::median;
using bench::seconds_since;

namespace {

struct Args {
  std::size_t params = std::size_t(16) << 20;
  int steps = 7;
  bool world4 = true;
};

Config config() {
  Config c;
  c.stage = 2;
  c.compute_dtype = c.reduce_dtype = DType::bf16;
  c.bucket_bytes = std::size_t(8) << 20;
  return c;
}

// The update alone over n elements, through the backend as the engine calls it.
struct UpdateAlone {
  std::unique_ptr<Backend> be = make_cpu_backend();
  std::unique_ptr<Stream> s = be->create_stream("bench.update");
  Buffer master, m, v, g, p;
  std::size_t n;
  int calls = 0;
  explicit UpdateAlone(std::size_t elems) : n(elems) {
    master = be->allocate(4 * n, Place::device, Category::master_weights, "master");
    m = be->allocate(4 * n, Place::device, Category::optimizer_state, "m");
    v = be->allocate(4 * n, Place::device, Category::optimizer_state, "v");
    g = be->allocate(2 * n, Place::device, Category::gradients, "grad");
    p = be->allocate(2 * n, Place::device, Category::parameters, "params");
    for (Buffer* b : {&master, &m, &v, &g, &p}) std::memset(b->data(), 0, b->bytes());
  }
  double time_once() {
    UpdateArgs a;
    a.rule = OptimizerKind::adamw;
    a.scalars = make_step_scalars(OptimizerKind::adamw, Hyperparams{}, ++calls, 1.0f);
    a.master = master.as<float>();
    a.state1 = m.as<float>();
    a.state2 = v.as<float>();
    a.grad = g.data();
    a.grad_dtype = DType::bf16;
    a.param_out = p.data();
    a.param_dtype = DType::bf16;
    a.n = n;
    const auto t0 = Clock::now();
    be->fused_update(a, *s);
    be->synchronize(*s);
    return seconds_since(t0);
  }
};

// memcpy of a buffer of `bytes` into another, on this thread: bytes read + written per second.
double copy_bandwidth(std::size_t bytes) {
  std::vector<unsigned char> a(bytes, 1), b(bytes, 2);
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    if (i >= 2) t.push_back(seconds_since(t0));
    a[i] = b[bytes - 1 - i];  // keep the copies observable
  }
  return 2.0 * static_cast<double>(bytes) / median(t);
}

// One step as a trainer sees it, on `world` in-process ranks; rank 0's median. With `update`,
// rank 0 also times the update alone between steps (the other ranks wait at the barrier), so both
// medians come from the same minutes of a machine whose load may drift.
double time_steps(int world, const Args& a, UpdateAlone* update = nullptr, double* update_median = nullptr) {
  std::vector<double> u;
  auto group = make_in_process_group(world);
  std::vector<double> t;
  std::barrier sync(world);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world);
  for (int rank = 0; rank < world; ++rank)
    threads.emplace_back([&, rank] {
      try {
        auto be = make_cpu_backend();
        auto comm = make_in_process_communicator(group, rank, *be);
        Engine e(config(), *be, *comm);
        for (const auto& b : bench::flat_model(a.params)) e.register_block(b);
        e.initialize();
        const int nb = static_cast<int>(e.layout().blocks().size());
        for (int s = 0; s < a.steps + 2; ++s) {
          if (rank == 0 && update != nullptr) {
            const double tu = update->time_once();
            if (s >= 2) u.push_back(tu);
          }
          sync.arrive_and_wait();
          const auto t0 = Clock::now();
          for (int b = nb - 1; b >= 0; --b) {
            e.gradients(b);
            e.grads_ready(b);
          }
          e.step();
          if (rank == 0 && s >= 2) t.push_back(seconds_since(t0));
        }
      } catch (const std::exception& ex) {
        errors[rank] = ex.what();
      }
    });
  for (auto& th : threads) th.join();
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
  if (update_median != nullptr && !u.empty()) *update_median = median(u);
  return median(t);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--params") a.params = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "--steps") a.steps = std::max(1, std::atoi(v.c_str()));
    else if (k == "--world4") a.world4 = std::atoi(v.c_str()) != 0;
    else {
      std::fprintf(stderr, "step_overhead: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    const std::size_t n = a.params;
    std::printf("step_overhead: %zu parameters, stage 2, bf16 params/grads, AdamW, no offload, CPU backend, "
                "%u hardware threads, ISA %s, median of %d steps\n",
                n, std::max(1u, std::thread::hardware_concurrency()), cpu::name_of(cpu::active_isa()), a.steps);
    UpdateAlone update(n);
    double up = 0;
    const double step1 = time_steps(1, a, &update, &up);
    std::printf("update alone (%zu params):   %8.2f ms  (%.2f ns/param)\n", n, up * 1e3, up * 1e9 / n);
    std::printf("step, world 1:               %8.2f ms  = %.2f x update   (goal <= 1.30)\n", step1 * 1e3, step1 / up);
    if (a.world4) {
      const double bw = copy_bandwidth(std::size_t(256) << 20);
      // Reduce-scatter: every rank's bf16 bucket is read once (4 x 2n bytes over the group) and
      // each rank writes its quarter (2n); all-gather: each rank writes the full bf16 parameters
      // (4 x 2n) reading every rank's quarter (4 x 2n).
      const double bytes = 8.0 * n + 2.0 * n + 8.0 * n + 8.0 * n;
      double up4 = 0;
      const double step4 = time_steps(4, a, &update, &up4);
      const double floor4 = up4 + bytes / bw;
      std::printf("copy bandwidth (memcpy, one thread): %.1f GB/s (bytes read + written)\n", bw / 1e9);
      std::printf("step, world 4 (rank 0):      %8.2f ms  vs floor update (%.2f ms, timed between these steps) + "
                  "%.0f MB at that bandwidth = %.2f ms: %.2f x floor\n",
                  step4 * 1e3, up4 * 1e3, bytes / 1e6, floor4 * 1e3, step4 / floor4);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "step_overhead: %s\n", e.what());
    return 1;
  }
  return 0;
}
