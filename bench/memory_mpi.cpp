// Real memory per process: one ZeRO stage, one process per rank under mpirun, each process's
// peak resident set (getrusage ru_maxrss) next to what the engine says it allocated.
//
//   mpirun -np 4 --oversubscribe --allow-run-as-root --mca btl self,vader memory_mpi <stage> [layers=12] [hidden=2048]
//
// Run it once per stage: ru_maxrss is a high-water mark of the whole process, so stages must not
// share a process. The model is `layers` blocks shaped like an MLP layer
// (w {4h, h}, b {4h}); 12 x 2048 gives 201M parameters. bf16 compute and reduce, AdamW, so the
// ZeRO formulas apply: 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N bytes per rank. One full step runs
// (forward, backward with constant gradients, step) so every buffer is touched and resident.
// Rank 0 prints one markdown row per rank.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "shardopt/bootstrap.hpp"
#include "shardopt/mpi.hpp"
#include "shardopt/shardopt.hpp"

int main(int argc, char** argv) {
  using namespace shardopt;
  try {
    MpiSession session(&argc, &argv);
    if (argc < 2) {
      if (session.rank() == 0) std::fprintf(stderr, "usage: memory_mpi <stage 0-3> [layers=12] [hidden=2048]\n");
      return 2;
    }
    const int stage = std::atoi(argv[1]);
    const int layers = argc > 2 ? std::atoi(argv[2]) : 12;
    const int hidden = argc > 3 ? std::atoi(argv[3]) : 2048;
    auto boot = make_mpi_bootstrap();
    std::vector<BlockSpec> model;
    std::size_t psi = 0;
    for (int l = 0; l < layers; ++l) {
      const std::string p = "layer" + std::to_string(l);
      model.push_back({p, {{p + ".w", {4 * hidden, hidden}}, {p + ".b", {4 * hidden}, 1}}});
      psi += std::size_t(4) * hidden * hidden + std::size_t(4) * hidden;
    }
    Config cfg;
    cfg.stage = stage;
    cfg.compute_dtype = cfg.reduce_dtype = DType::bf16;
    cfg.bucket_bytes = std::size_t(2) * 4 * hidden * hidden;  // one layer per unit
    cfg.prefetch_units = 1;
    check_agreement(*boot, cfg, model);

    CpuBackendOptions bo;
    bo.pool = make_thread_pool(1);  // the processes share the cores; one kernel thread each
    auto backend = make_cpu_backend(bo);
    auto comm = make_mpi_communicator(*backend);
    rusage before{};
    getrusage(RUSAGE_SELF, &before);  // MPI, libraries, buffers of the bootstrap: not the engine
    const auto t0 = std::chrono::steady_clock::now();
    Engine e(cfg, *backend, *comm);
    for (const auto& b : model) e.register_block(b);
    e.initialize();
    const int nblocks = static_cast<int>(model.size());
    for (int b = 0; b < nblocks; ++b) {
      e.acquire(b);
      e.release(b);
    }
    for (int b = nblocks - 1; b >= 0; --b) {
      e.acquire(b);
      BlockView g = e.gradients(b);
      for (const TensorView& tv : g.tensors) {
        auto* p = static_cast<std::uint16_t*>(tv.data);
        const std::uint16_t v = float_to_bf16(1e-3f * static_cast<float>(comm->rank() + 1));
        for (std::size_t i = 0; i < tv.numel; ++i) p[i] = v;
      }
      e.grads_ready(b);
      e.release(b);
    }
    const StepResult r = e.step();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    const MemoryReport m = e.memory_report();
    auto peak_all = [&](Category c) {
      std::size_t s = 0;
      for (int p = 0; p < kPlaceCount; ++p) s += m.peak_of(c, static_cast<Place>(p));
      return s;
    };
    std::size_t engine_peak = 0;
    for (int p = 0; p < kPlaceCount; ++p) engine_peak += m.peak_total[p];
    char row[512];
    const double MiB = 1024.0 * 1024.0;
    std::snprintf(row, sizeof row, "| %d | %d | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f |", stage, comm->rank(),
                  static_cast<double>(before.ru_maxrss) / 1024.0, static_cast<double>(ru.ru_maxrss) / 1024.0, engine_peak / MiB, peak_all(Category::parameters) / MiB,
                  peak_all(Category::gradients) / MiB, (peak_all(Category::master_weights) + peak_all(Category::optimizer_state)) / MiB,
                  peak_all(Category::communication) / MiB, (peak_all(Category::other) + peak_all(Category::offload_staging)) / MiB, seconds);
    const auto rows = boot->all_gather_bytes({reinterpret_cast<const std::byte*>(row), std::strlen(row)});
    if (session.rank() == 0) {
      std::printf("model: %d layers, hidden %d, %zu parameters (Ψ); %d processes; bf16 compute, AdamW; step applied: %s\n", layers,
                  hidden, psi, session.size(), r.applied ? "yes" : "no");
      std::printf("| stage | rank | RSS before engine MiB | peak RSS MiB (ru_maxrss) | engine peak MiB | params | grads | master + optimizer state | comm | other | s |\n");
      std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
      for (const auto& x : rows) std::printf("%.*s\n", static_cast<int>(x.size()), reinterpret_cast<const char*>(x.data()));
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "memory_mpi: %s\n", ex.what());
    return 1;
  }
}
