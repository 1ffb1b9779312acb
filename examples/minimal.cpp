// The smallest complete integration: a linear model y = W x learns a fixed teacher matrix with
// ZeRO stage 3 over 4 in-process ranks (threads), each rank on its own data.
//
//   shardopt_minimal [stage] [steps]
//
// What a trainer does is all here: register its tensors, initialize, then per step acquire the
// parameters, add gradients, report them, release, and step().
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "shardopt/shardopt.hpp"

int main(int argc, char** argv) {
  using namespace shardopt;
  const int stage = argc > 1 ? std::atoi(argv[1]) : 3;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 60;
  constexpr int kRanks = 4, kOut = 16, kIn = 32, kBatch = 8;

  Config cfg;
  cfg.stage = stage;
  cfg.optimizer = OptimizerKind::adamw;
  cfg.hyper.lr = 0.05f;
  cfg.bucket_bytes = 4096;

  auto pool = make_thread_pool();
  auto group = make_in_process_group(kRanks);
  std::vector<double> losses(steps);
  std::mutex mutex;
  std::vector<std::thread> ranks;
  int failures = 0;
  for (int rank = 0; rank < kRanks; ++rank) {
    ranks.emplace_back([&, rank] {
      try {
        auto backend = make_cpu_backend({pool});
        auto comm = make_in_process_communicator(group, rank, *backend);
        Engine engine(cfg, *backend, *comm);
        const int block = engine.register_block({"linear", {{"linear.w", {kOut, kIn}}}});
        engine.initialize(seeded_init(1));

        std::mt19937 rng(100 + rank);
        std::normal_distribution<float> normal;
        std::vector<float> teacher(kOut * kIn);
        std::mt19937 teacher_rng(7);  // the same teacher on every rank
        for (auto& t : teacher) t = normal(teacher_rng) / std::sqrt(float(kIn));

        for (int s = 0; s < steps; ++s) {
          std::vector<float> x(kBatch * kIn);
          for (auto& v : x) v = normal(rng);
          BlockView params = engine.acquire(block);
          const float* w = params.tensors[0].as<float>();
          BlockView grads = engine.gradients(block);
          float* gw = grads.tensors[0].as<float>();
          double loss = 0;
          for (int b = 0; b < kBatch; ++b)
            for (int o = 0; o < kOut; ++o) {
              float err = 0;
              for (int i = 0; i < kIn; ++i) err += (w[o * kIn + i] - teacher[o * kIn + i]) * x[b * kIn + i];
              loss += double(err) * err / (kBatch * kOut);
              for (int i = 0; i < kIn; ++i) gw[o * kIn + i] += 2.0f * err * x[b * kIn + i] / (kBatch * kOut);
            }
          engine.grads_ready(block);
          engine.release(block);
          engine.step();
          std::lock_guard<std::mutex> lock(mutex);
          losses[s] += loss / kRanks;
        }
        if (rank == 0) std::printf("rank 0 memory:\n%s", engine.memory_report().to_string().c_str());
      } catch (const Error& e) {
        std::lock_guard<std::mutex> lock(mutex);
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        ++failures;
      }
    });
  }
  for (auto& t : ranks) t.join();
  if (failures) return 1;
  for (int s = 0; s < steps; s += std::max(1, steps / 10)) std::printf("step %3d  loss %.6f\n", s, losses[s]);
  std::printf("stage %d, %d ranks: loss %.6f -> %.6f\n", stage, kRanks, losses.front(), losses.back());
  return losses.back() < 0.5 * losses.front() ? 0 : 2;
}
