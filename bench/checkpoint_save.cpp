// What a checkpoint costs the training loop: step time with a background save in flight next to
// step time without one, and the synchronous save for comparison.
//
//   checkpoint_save [--params N] [--steps K] [--dir PATH] [--ranks R]
//
// R in-process ranks (CPU backend), stage 2, bf16, AdamW, one model of N parameters in blocks of
// 2M. Reported (median over K steps after 2 warm-up steps, the slowest rank per step):
//   step        : grads_ready of every block + step(), with nothing else going on;
//   step+async  : the same steps taken right after save_async(), while the writer threads run;
//   save_async  : the time save_async() itself blocks the loop (lock, generation, snapshot copy);
//   wait_save   : what is left to wait for at wait_save() after those K steps (0 if done);
//   save        : a synchronous save() of the same state, for comparison;
// and the bytes written per save with the rate of the synchronous save.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "shardopt/shardopt.hpp"

using namespace shardopt;
using bench::Clock;
using bench::median;
using bench::seconds_since;

namespace {

struct Args {
  std::size_t params = std::size_t(16) << 20;
  int steps = 5;
  int ranks = 2;
  std::string dir = "/tmp";
};

// One step: every block's gradient (a constant, written in place) reported ready, then step().
void one_step(Engine& e, int nblocks) {
  for (int b = nblocks - 1; b >= 0; --b) {
    BlockView g = e.gradients(b);
    for (auto& t : g.tensors) {
      auto* p = t.as<std::uint16_t>();
      std::fill(p, p + t.numel, std::uint16_t(0x3c00));  // bf16 1.0
    }
    e.grads_ready(b);
  }
  e.step();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--params") a.params = static_cast<std::size_t>(std::atof(v.c_str()));
    else if (k == "--steps") a.steps = std::atoi(v.c_str());
    else if (k == "--ranks") a.ranks = std::atoi(v.c_str());
    else if (k == "--dir") a.dir = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (a.steps < 1 || a.ranks < 1 || a.params < 1) {
    std::fprintf(stderr, "--steps, --ranks and --params must be positive\n");
    return 2;
  }
  const std::string dir = a.dir + "/shardopt-bench-ckpt-" + std::to_string(::getpid());
  const auto blocks = bench::flat_model(a.params);
  const int nb = static_cast<int>(blocks.size());
  Config cfg;
  cfg.stage = 2;
  cfg.compute_dtype = cfg.reduce_dtype = DType::bf16;
  cfg.bucket_bytes = std::size_t(8) << 20;
  cfg.hyper.lr = 1e-4f;

  auto group = make_in_process_group(a.ranks);
  std::vector<std::vector<double>> plain(a.ranks), busy(a.ranks);
  std::vector<double> t_async(a.ranks), t_wait(a.ranks), t_sync(a.ranks);
  std::vector<std::thread> threads;
  std::mutex mu;
  std::string failure;
  for (int r = 0; r < a.ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        auto be = make_cpu_backend();
        auto comm = make_in_process_communicator(group, r, *be);
        Engine e(cfg, *be, *comm);
        for (const auto& b : blocks) e.register_block(b);
        e.initialize(seeded_init(1));
        for (int i = 0; i < 2; ++i) one_step(e, nb);
        for (int i = 0; i < a.steps; ++i) {
          const auto t0 = Clock::now();
          one_step(e, nb);
          plain[r].push_back(seconds_since(t0));
        }
        auto t0 = Clock::now();
        e.save_async(dir);
        t_async[r] = seconds_since(t0);
        for (int i = 0; i < a.steps; ++i) {
          const auto t1 = Clock::now();
          one_step(e, nb);
          busy[r].push_back(seconds_since(t1));
        }
        t0 = Clock::now();
        e.wait_save();
        t_wait[r] = seconds_since(t0);
        t0 = Clock::now();
        e.save(dir);
        t_sync[r] = seconds_since(t0);
      } catch (const std::exception& ex) {
        std::lock_guard<std::mutex> lock(mu);
        failure = ex.what();
        abort_in_process_group(*group, ex.what());
      }
    });
  for (auto& t : threads) t.join();
  std::uintmax_t bytes = 0;
  std::error_code ec;
  for (const auto& ent : std::filesystem::directory_iterator(dir, ec))
    if (ent.path().extension() == ".bin") bytes += ent.file_size();
  std::filesystem::remove_all(dir, ec);
  if (!failure.empty()) {
    std::fprintf(stderr, "checkpoint_save: %s\n", failure.c_str());
    return 1;
  }
  // The loop is as slow as its slowest rank: per step, the maximum over ranks.
  auto slowest = [&](const std::vector<std::vector<double>>& v) {
    std::vector<double> m(static_cast<std::size_t>(a.steps), 0);
    for (const auto& rank : v)
      for (std::size_t i = 0; i < rank.size(); ++i) m[i] = std::max(m[i], rank[i]);
    return median(m);
  };
  const double step = slowest(plain), step_busy = slowest(busy);
  const double sa = *std::max_element(t_async.begin(), t_async.end());
  const double ws = *std::max_element(t_wait.begin(), t_wait.end());
  const double ss = *std::max_element(t_sync.begin(), t_sync.end());
  std::printf("checkpoint_save: %zu params, %d in-process ranks, stage 2 bf16 AdamW, %d steps, dir %s\n", a.params,
              a.ranks, a.steps, a.dir.c_str());
  std::printf("  step              %8.1f ms\n", step * 1e3);
  std::printf("  step+async save   %8.1f ms  (%.2fx the step without a save in flight)\n", step_busy * 1e3,
              step_busy / step);
  std::printf("  save_async blocks %8.1f ms  (lock, generation, snapshot of the shard)\n", sa * 1e3);
  std::printf("  wait_save left    %8.1f ms  (after %d steps)\n", ws * 1e3, a.steps);
  std::printf("  save (sync)       %8.1f ms  (%.1f MB written, %.0f MB/s)\n", ss * 1e3, double(bytes) / 1e6,
              double(bytes) / 1e6 / ss);
  std::printf("RESULT step_ms=%.2f step_async_ms=%.2f save_async_ms=%.2f wait_ms=%.2f save_ms=%.2f bytes=%ju\n",
              step * 1e3, step_busy * 1e3, sa * 1e3, ws * 1e3, ss * 1e3, bytes);
  return 0;
}
