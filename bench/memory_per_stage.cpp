// Memory per rank per ZeRO stage, measured through memory_report(), next to the ZeRO formulas.
// One model (residual-MLP shaped layers), N in-process ranks, bf16 compute, AdamW; prints a
// markdown table (device bytes are what the engine allocated; on the CPU backend "device" is host
// memory tagged as device).
//
//   memory_per_stage [ranks=4] [layers=8] [hidden=512]
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/shardopt.hpp"

int main(int argc, char** argv) {
  using namespace shardopt;
  const int N = argc > 1 ? std::atoi(argv[1]) : 4;
  const int layers = argc > 2 ? std::atoi(argv[2]) : 8;
  const int hidden = argc > 3 ? std::atoi(argv[3]) : 512;
  std::vector<BlockSpec> model;
  double psi = 0;
  for (int l = 0; l < layers; ++l) {
    const std::string p = "layer" + std::to_string(l);
    model.push_back({p, {{p + ".w1", {4 * hidden, hidden}}, {p + ".b1", {4 * hidden}, 1},
                         {p + ".w2", {hidden, 4 * hidden}}, {p + ".b2", {hidden}, 1}}});
    psi += 8.0 * hidden * hidden + 5.0 * hidden;
  }
  std::printf("model: %d layers, hidden %d, %.0f parameters; %d ranks; bf16 compute and reduce; AdamW\n\n", layers,
              hidden, psi, N);
  std::printf("| stage | formula | formula bytes | measured peak bytes (rank 0) | measured / formula | listed buffers (buckets, slots, scalars) | (measured - buffers) / formula |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  const char* names[] = {"16Ψ", "4Ψ + 12Ψ/N", "2Ψ + 14Ψ/N", "16Ψ/N"};
  const double formula[] = {16 * psi, 4 * psi + 12 * psi / N, 2 * psi + 14 * psi / N, 16 * psi / N};
  for (int stage = 0; stage <= 3; ++stage) {
    Config cfg;
    cfg.stage = stage;
    cfg.compute_dtype = cfg.reduce_dtype = DType::bf16;
    cfg.bucket_bytes = std::size_t(10) * hidden * hidden;  // about one layer per unit
    cfg.prefetch_units = 1;
    auto pool = make_thread_pool();
    auto group = make_in_process_group(N);
    std::vector<MemoryReport> reports(N);
    std::vector<std::thread> threads;
    std::mutex m;
    std::string error;
    for (int r = 0; r < N; ++r)
      threads.emplace_back([&, r] {
        try {
          auto backend = make_cpu_backend({pool});
          auto comm = make_in_process_communicator(group, r, *backend);
          Engine e(cfg, *backend, *comm);
          for (const auto& b : model) e.register_block(b);
          e.initialize();
          const int nb = static_cast<int>(model.size());
          for (int b = 0; b < nb; ++b) {
            e.acquire(b);
            e.release(b);
          }
          for (int b = nb - 1; b >= 0; --b) {
            e.acquire(b);
            e.gradients(b);
            e.grads_ready(b);
            e.release(b);
          }
          e.step();
          reports[r] = e.memory_report();
        } catch (const Error& ex) {
          std::lock_guard<std::mutex> lock(m);
          error = ex.what();
        }
      });
    for (auto& t : threads) t.join();
    if (!error.empty()) {
      std::fprintf(stderr, "stage %d: %s\n", stage, error.c_str());
      return 1;
    }
    const MemoryReport& rep = reports[0];
    const double peak = double(rep.peak_total[int(Place::device)]);
    // The buffers the formulas leave out, named by the plan: gradient buckets, gathered-unit slots,
    // reduce buffers and step scalars.
    double buffers = 0;
    for (const auto& b : plan_memory(cfg, model, N).buffers)
      if (b.place == Place::device &&
          (b.name.rfind("gradient bucket", 0) == 0 || b.name.rfind("gathered unit slot", 0) == 0 ||
           b.category == Category::communication || b.category == Category::other))
        buffers += double(b.bytes);
    std::printf("| %d | %s | %.0f | %.0f | %.4f | %.0f | %.4f |\n", stage, names[stage], formula[stage], peak,
                peak / formula[stage], buffers, (peak - buffers) / formula[stage]);
    if (stage == 3 || stage == 0) std::fprintf(stderr, "stage %d, rank 0:\n%s\n", stage, rep.to_string().c_str());
  }
  return 0;
}
