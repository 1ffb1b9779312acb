// shardopt bench update: the fused optimizer update alone, through the public backend interface
// (CPU, or CUDA on device 0). Host-clock timing around a synchronize per iteration: for the GPU,
// bench/bench_gpu_update times with events against a copy floor measured in the same run.
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "commands.hpp"
#include "units.hpp"

namespace shardopt::cli {

CLI::App* add_bench(CLI::App& app, BenchArgs& a) {
  CLI::App* bench = app.add_subcommand("bench", "Micro-benchmarks");
  bench->require_subcommand(1);
  CLI::App* sub = bench->add_subcommand(
      "update", "Time the fused optimizer update (grad in, fp32 master and moments, params out) on the backend");
  sub->add_option("--params", a.params, "parameters updated per iteration, e.g. 16M, 1e8, 64Mi")->capture_default_str();
  sub->add_option("--threads", a.threads, "kernel threads (0: all cores)")->check(unsigned_integer())->capture_default_str();
  sub->add_option("--dtype", a.dtype, "dtype of the gradient read and the parameters written")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))->capture_default_str();
  sub->add_option("--optimizer", a.optimizer, "update rule")
      ->check(CLI::IsMember(rule_choices()))->capture_default_str();
  sub->add_option("--backend", a.backend, "cpu, or cuda (device 0)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  sub->add_option("--iters", a.iters, "timed iterations (after one warm-up)")->check(CLI::Range(1, 100000))->capture_default_str();
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  return sub;
}

int run_bench(const BenchArgs& a, Io& io) {
  check_backend(a.backend, "bench update", /*cuda_supported=*/true);
  const auto n64 = parse_count(a.params);
  if (!n64 || *n64 == 0) throw UsageError("--params: '" + a.params + "' is not a positive count (e.g. 16M, 1e8)");
  const std::size_t n = static_cast<std::size_t>(*n64);
  DType dt{};
  OptimizerKind rule{};
  if (!parse_dtype(a.dtype, dt)) throw UsageError("--dtype: unknown dtype '" + a.dtype + "'");
  if (!parse_optimizer(a.optimizer, rule)) throw UsageError("--optimizer: unknown rule '" + a.optimizer + "'");

  const bool on_gpu = a.backend == "cuda";
  CpuBackendOptions bo;
  if (!on_gpu) bo.pool = make_thread_pool(a.threads);
  const unsigned threads = on_gpu ? 0 : thread_count(*bo.pool);  // 0: not CPU threads
  auto backend = on_gpu ? make_cuda_backend(0) : make_cpu_backend(bo);
  auto stream = backend->create_stream("bench");
  const int states = state_count(rule);
  const bool fp32 = dt == DType::fp32;
  Buffer master = backend->allocate(n * 4, Place::device, Category::master_weights, "master weights");
  Buffer s1 = backend->allocate(n * 4, Place::device, Category::optimizer_state, "optimizer state 0");
  Buffer s2 = states > 1 ? backend->allocate(n * 4, Place::device, Category::optimizer_state, "optimizer state 1") : Buffer();
  Buffer grad = backend->allocate(n * size_of(dt), Place::device, Category::gradients, "gradients");
  // fp32 parameters are the master weights (updated in place, as the engine does).
  Buffer out = fp32 ? Buffer() : backend->allocate(n * size_of(dt), Place::device, Category::parameters, "parameters");
  // Every page written once before timing (through the backend's threads, as the engine would).
  backend->fill(master.data(), DType::fp32, n, 0.5f, *stream);
  backend->fill(s1.data(), DType::fp32, n, 0.0f, *stream);
  if (s2) backend->fill(s2.data(), DType::fp32, n, 0.0f, *stream);
  backend->fill(grad.data(), dt, n, 1e-3f, *stream);
  if (out) backend->fill(out.data(), dt, n, 0.0f, *stream);
  backend->synchronize(*stream);

  // Bytes that must cross the memory bus per parameter: the gradient read, master and every state
  // read and written, the 16-bit parameter copy written.
  const double bytes_per_param = double(size_of(dt)) + 8.0 + 8.0 * states + (fp32 ? 0.0 : double(size_of(dt)));
  Hyperparams h;
  std::vector<double> seconds;
  for (int it = 0; it <= a.iters; ++it) {
    UpdateArgs u;
    u.rule = rule;
    u.scalars = make_step_scalars(rule, h, it + 1, 1.0f);
    u.master = master.as<float>();
    u.state1 = s1.as<float>();
    u.state2 = s2 ? s2.as<float>() : nullptr;
    u.grad = grad.data();
    u.grad_dtype = dt;
    u.param_out = fp32 ? master.data() : out.data();
    u.param_dtype = dt;
    u.n = n;
    const auto t0 = std::chrono::steady_clock::now();
    backend->fused_update(u, *stream);
    backend->synchronize(*stream);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (it > 0) seconds.push_back(s);  // iteration 0 is the warm-up
  }
  std::sort(seconds.begin(), seconds.end());
  const double med = seconds[seconds.size() / 2], best = seconds.front();
  const double ns_med = med * 1e9 / double(n), ns_best = best * 1e9 / double(n);
  const double gbs_med = bytes_per_param * double(n) / med / 1e9, gbs_best = bytes_per_param * double(n) / best / 1e9;

  if (a.json) {
    Json j;
    j["backend"] = a.backend;
    j["params"] = n;
    j["threads"] = threads;
    j["dtype"] = a.dtype;
    j["optimizer"] = a.optimizer;
    j["iters"] = a.iters;
    j["bytes_per_param"] = bytes_per_param;
    j["ns_per_param_median"] = ns_med;
    j["ns_per_param_best"] = ns_best;
    j["gb_per_s_median"] = gbs_med;
    j["gb_per_s_best"] = gbs_best;
    io.out << j.dump() << '\n';
    return 0;
  }
  char line[256];
  std::snprintf(line, sizeof line,
                "fused %s update, %s params (%s), %s, %d iterations\n"
                "  bytes moved per parameter: %.0f (grad %zu read, master and %d state(s) read+written%s)\n"
                "  median %.3f ns/param  %.2f GB/s   best %.3f ns/param  %.2f GB/s\n",
                a.optimizer.c_str(), format_count(n).c_str(), a.dtype.c_str(),
                on_gpu ? "CUDA device 0" : (std::to_string(threads) + " threads").c_str(), a.iters, bytes_per_param,
                size_of(dt), states, fp32 ? ", fp32 params updated in place" : ", 16-bit params written", ns_med,
                gbs_med, ns_best, gbs_best);
  io.out << line;
  return 0;
}

}  // namespace shardopt::cli
