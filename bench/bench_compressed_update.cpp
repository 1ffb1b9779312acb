// The fused CPU AdamW update with fp32, bf16 and int8-blockwise state, against the memory
// bandwidth floor measured in the same run.
//
// Mixed precision (bf16 gradients in, bf16 parameter copy out, fp32 master). Bytes per parameter:
//   fp32 state: grad 2 + master 4+4 + m 4+4 + v 4+4 + param 2                          = 28
//   bf16 state: grad 2 + master 4+4 + m 2+2 + v 2+2 + param 2                          = 20
//   int8 state: grad 2 + master 4+4 + m 1+1 + v 1+1 + param 2 + scales 2*(4+4)/B      = 16 + 16/B
// The floor is copy bandwidth: one large buffer copied into another (read + write, memcpy per
// chunk) on the same thread pool in the same chunks, best of several runs, measured before the
// benchmarks start. Each case reports ns/param and GB/s and, next to them, the floor for its bytes
// (floor_ns_per_param = bytes per param / copy bandwidth) and the fraction of it reached.
//
// N defaults to 32M parameters (about 0.5 GiB of buffers for the fp32 case). Other sizes:
//   bench_compressed_update --n=64M     or   SHARDOPT_BENCH_N=67108864 bench_compressed_update
// --block=B sets the int8 block size (default 256). Google Benchmark flags work as usual.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.hpp"
#include "bench_util.hpp"
#include "cpu/thread_pool.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/state_precision.hpp"

namespace {

using shardopt::DType;
using shardopt::StatePrecision;

std::size_t g_n = std::size_t(32) << 20;
std::size_t g_block = shardopt::kDefaultQuantBlock;
double g_copy_gbps[2] = {0.0, 0.0};  // [0]: one thread, [1]: all threads; measured in main()
constexpr std::size_t kGrain = std::size_t(1) << 16;  // elements per chunk, as the CPU backend

struct AlignedDelete {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};
using Mem = std::unique_ptr<unsigned char, AlignedDelete>;
Mem alloc(std::size_t bytes) {
  return Mem(static_cast<unsigned char*>(::operator new(bytes < 64 ? 64 : bytes, std::align_val_t(64))));
}

double bytes_per_param(StatePrecision p) {
  switch (p) {
    case StatePrecision::fp32: return 28.0;
    case StatePrecision::bf16: return 20.0;
    case StatePrecision::int8: return 16.0 + 16.0 / static_cast<double>(g_block);
  }
  return 0.0;
}

// Copy bandwidth (GB/s counting read + write bytes), best of `reps`.
double measure_copy_gbps(shardopt::ThreadPool& pool, std::size_t bytes, int reps) {
  Mem src = alloc(bytes), dst = alloc(bytes);
  pool.parallel_for(bytes, kGrain * 4, [&](std::size_t b, std::size_t e) {
    std::memset(src.get() + b, 1, e - b);
    std::memset(dst.get() + b, 0, e - b);
  });
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(bytes, kGrain * 4, [&](std::size_t b, std::size_t e) { std::memcpy(dst.get() + b, src.get() + b, e - b); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(bytes) / s * 1e-9);
  }
  return best;
}

void BM_Update(benchmark::State& state) {
  const auto prec = static_cast<StatePrecision>(state.range(0));
  const auto threads = static_cast<unsigned>(state.range(1));
  const std::size_t n = g_n;
  shardopt::ThreadPool pool(threads);
  const std::size_t sb = prec == StatePrecision::fp32 ? 4 : prec == StatePrecision::bf16 ? 2 : 1;
  const std::size_t blocks = shardopt::quant_block_count(n, g_block);
  Mem master = alloc(4 * n), m = alloc(sb * n), v = alloc(sb * n), grad = alloc(2 * n), out = alloc(2 * n);
  Mem sc1 = alloc(4 * blocks), sc2 = alloc(4 * blocks);
  // First touch by the pool's threads, as the real buffers would be.
  pool.parallel_for(n, kGrain, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) {
      reinterpret_cast<float*>(master.get())[i] = 1.0f + static_cast<float>(i % 7) * 0.01f;
      shardopt::store_from_float(grad.get(), DType::bf16, i, 0.001f * static_cast<float>(i % 13) - 0.006f);
    }
    std::memset(m.get() + b * sb, 0, (e - b) * sb);
    std::memset(v.get() + b * sb, 0, (e - b) * sb);
    std::memset(out.get() + 2 * b, 0, 2 * (e - b));
  });
  std::memset(sc1.get(), 0, 4 * blocks);
  std::memset(sc2.get(), 0, 4 * blocks);
  shardopt::Hyperparams h;
  h.weight_decay = 0.01f;
  const shardopt::StepScalars scalars = shardopt::make_step_scalars(shardopt::OptimizerKind::adamw, h, 10, 1.0f / 1024.0f);
  const shardopt::cpu::Isa isa = shardopt::cpu::active_isa();
  if (prec == StatePrecision::fp32) {
    shardopt::UpdateArgs a;
    a.scalars = scalars;
    a.master = reinterpret_cast<float*>(master.get());
    a.state1 = reinterpret_cast<float*>(m.get());
    a.state2 = reinterpret_cast<float*>(v.get());
    a.grad = grad.get();
    a.grad_dtype = DType::bf16;
    a.param_out = out.get();
    a.param_dtype = DType::bf16;
    a.n = n;
    const auto& k = shardopt::cpu::kernels(isa);
    for (auto _ : state) {
      pool.parallel_for(n, kGrain, [&](std::size_t b, std::size_t e) { k.fused_update(shardopt::cpu::slice(a, b, e - b)); });
      benchmark::ClobberMemory();
    }
  } else {
    shardopt::CompressedUpdateArgs a;
    a.scalars = scalars;
    a.precision = prec;
    a.block_size = g_block;
    a.master = reinterpret_cast<float*>(master.get());
    a.state1 = m.get();
    a.state2 = v.get();
    a.scales1 = reinterpret_cast<float*>(sc1.get());
    a.scales2 = reinterpret_cast<float*>(sc2.get());
    a.grad = grad.get();
    a.grad_dtype = DType::bf16;
    a.param_out = out.get();
    a.param_dtype = DType::bf16;
    a.n = n;
    const auto& k = shardopt::cpu::compressed_kernels(isa);
    for (auto _ : state) {
      pool.parallel_for(n, kGrain, [&](std::size_t b, std::size_t e) { k.update(shardopt::cpu::slice(a, b, e - b)); });
      benchmark::ClobberMemory();
    }
  }
  const double nd = static_cast<double>(n), bpp = bytes_per_param(prec);
  state.counters["ns_per_param"] =
      benchmark::Counter(nd * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["GB_per_s"] = benchmark::Counter(nd * bpp * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["B_per_param"] = bpp;
  const double copy = g_copy_gbps[threads == 1 ? 0 : 1];
  state.counters["copy_GB_per_s"] = copy;
  state.counters["floor_ns_per_param"] = bpp / copy;
  state.SetLabel(std::string(shardopt::name_of(prec)) + " state, isa=" + shardopt::cpu::name_of(isa) +
                 (prec == StatePrecision::int8 ? ", block=" + std::to_string(g_block) : std::string()));
}

void BM_Copy(benchmark::State& state) {
  const auto threads = static_cast<unsigned>(state.range(0));
  shardopt::ThreadPool pool(threads);
  const std::size_t bytes = g_n * 16;  // the size of the fp32 case's buffers
  Mem src = alloc(bytes), dst = alloc(bytes);
  pool.parallel_for(bytes, kGrain * 4, [&](std::size_t b, std::size_t e) {
    std::memset(src.get() + b, 1, e - b);
    std::memset(dst.get() + b, 0, e - b);
  });
  for (auto _ : state) {
    pool.parallel_for(bytes, kGrain * 4, [&](std::size_t b, std::size_t e) { std::memcpy(dst.get() + b, src.get() + b, e - b); });
    benchmark::ClobberMemory();
  }
  state.counters["GB_per_s"] =
      benchmark::Counter(2.0 * static_cast<double>(bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void register_all() {
  const unsigned all = shardopt::bench::all_threads();
  std::vector<long> thread_counts{1};
  if (all > 1) thread_counts.push_back(static_cast<long>(all));
  for (long t : thread_counts) {
    benchmark::RegisterBenchmark("copy_floor", BM_Copy)->Arg(t)->ArgName("threads")->UseRealTime()
        ->Unit(benchmark::kMillisecond)->MinTime(0.5);
    for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8})
      benchmark::RegisterBenchmark(("adamw_update/" + std::string(shardopt::name_of(p))).c_str(), BM_Update)
          ->Args({static_cast<long>(p), t})->ArgNames({"state", "threads"})->UseRealTime()
          ->Unit(benchmark::kMillisecond)->MinTime(0.5);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* env = std::getenv("SHARDOPT_BENCH_N")) g_n = shardopt::bench::parse_count(env);
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strncmp(argv[i], "--n=", 4) == 0) g_n = shardopt::bench::parse_count(argv[i] + 4);
    else if (i > 0 && std::strncmp(argv[i], "--block=", 8) == 0) g_block = shardopt::bench::parse_count(argv[i] + 8);
    else rest.push_back(argv[i]);
  }
  try {
    shardopt::check_quant_block(g_block, "--block");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  for (int k = 0; k < 2; ++k) {
    shardopt::ThreadPool pool(k == 0 ? 1 : shardopt::bench::all_threads());
    g_copy_gbps[k] = measure_copy_gbps(pool, g_n * 16, 5);
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::AddCustomContext("params", std::to_string(g_n));
  benchmark::AddCustomContext("int8_block", std::to_string(g_block));
  benchmark::AddCustomContext("copy_GB_per_s", "1 thread " + std::to_string(g_copy_gbps[0]) + ", all threads " + std::to_string(g_copy_gbps[1]));
  benchmark::AddCustomContext("bytes_per_param",
                              "fp32 28, bf16 20, int8 16+16/B (bf16 grads in, bf16 params out, fp32 master)");
  register_all();
  benchmark::Initialize(&rest_argc, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
