// The fused CPU AdamW update against its memory-bandwidth floor.
//
// The update is memory-bound: per parameter it moves 28 bytes
//   fp32 params: grad 4 (read) + master 4+4 + m 4+4 + v 4+4 (read+write)       = 28 B
//   bf16 params: grad 2 (read) + master 8 + m 8 + v 8 + 16-bit param copy 2 (write) = 28 B
// (fp32 master and moments in both cases; the fp32 case updates the master in place, so there is
// no separate copy). The floor is a hand-written streaming loop that moves the same bytes in the
// same pattern (three read-modify-write fp32 streams, one read-only grad stream, plus the 16-bit
// write for bf16) with trivial arithmetic, split over the same thread pool in the same chunks; the
// floor reported is the best of a few variants of it (baseline ISA, AVX-512, unrolled).
//
// N defaults to 256M parameters (4 GiB of buffers per case). For a quick run:
//   bench_update --n=16M        or   SHARDOPT_BENCH_N=16777216 bench_update
// (suffixes K, M, G are powers of 1024). Google Benchmark flags work as usual.
#include <benchmark/benchmark.h>

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

namespace {

using shardopt::DType;

std::size_t g_n = std::size_t(256) << 20;
constexpr std::size_t kGrain = std::size_t(1) << 16;  // elements per chunk of the pool
constexpr double kBytesPerParam = 28.0;

struct AlignedDelete {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};
using Mem = std::unique_ptr<void, AlignedDelete>;
Mem alloc(std::size_t bytes) { return Mem(::operator new(bytes, std::align_val_t(64))); }

// Buffers of one case, first touched by the pool's threads (as the real update would).
struct Buffers {
  Mem master, m, v, grad, out;
  DType pdt;
  Buffers(std::size_t n, DType param_dtype, shardopt::ThreadPool& pool)
      : master(alloc(n * 4)), m(alloc(n * 4)), v(alloc(n * 4)),
        grad(alloc(n * shardopt::size_of(param_dtype))),
        out(param_dtype == DType::fp32 ? Mem() : alloc(n * 2)), pdt(param_dtype) {
    pool.parallel_for(n, kGrain, [&](std::size_t b, std::size_t e) {
      float* pm = static_cast<float*>(master.get());
      float* p1 = static_cast<float*>(m.get());
      float* p2 = static_cast<float*>(v.get());
      for (std::size_t i = b; i < e; ++i) {
        pm[i] = 1.0f + static_cast<float>(i % 7) * 0.01f;
        p1[i] = 0.01f;
        p2[i] = 0.0001f;
        shardopt::store_from_float(grad.get(), pdt, i, 0.001f * static_cast<float>(i % 13) - 0.006f);
        if (out) static_cast<std::uint16_t*>(out.get())[i] = 0;
      }
    });
  }
};

void set_counters(benchmark::State& state, std::size_t n) {
  const double nd = static_cast<double>(n);
  state.counters["ns_per_param"] =
      benchmark::Counter(nd * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["GB_per_s"] = benchmark::Counter(nd * kBytesPerParam * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["B_per_param"] = kBytesPerParam;
  state.counters["threads"] = static_cast<double>(state.range(1));
}

DType dtype_arg(const benchmark::State& state) { return state.range(0) == 0 ? DType::fp32 : DType::bf16; }

// ---- the fused update ---------------------------------------------------------------------------

void BM_FusedAdamW(benchmark::State& state) {
  const DType pdt = dtype_arg(state);
  const auto threads = static_cast<unsigned>(state.range(1));
  shardopt::ThreadPool pool(threads);
  Buffers b(g_n, pdt, pool);
  shardopt::Hyperparams h;
  h.weight_decay = 0.01f;
  shardopt::UpdateArgs a;
  a.rule = shardopt::OptimizerKind::adamw;
  a.scalars = shardopt::make_step_scalars(a.rule, h, 10, 1.0f / 1024.0f);
  a.master = static_cast<float*>(b.master.get());
  a.state1 = static_cast<float*>(b.m.get());
  a.state2 = static_cast<float*>(b.v.get());
  a.grad = b.grad.get();
  a.grad_dtype = pdt;  // gradients arrive in the parameter dtype
  a.param_out = pdt == DType::fp32 ? static_cast<void*>(a.master) : b.out.get();  // fp32: in place
  a.param_dtype = pdt;
  a.n = g_n;
  const shardopt::cpu::Isa isa = shardopt::cpu::active_isa();
  const auto& k = shardopt::cpu::kernels(isa);
  for (auto _ : state) {
    pool.parallel_for(g_n, kGrain, [&](std::size_t begin, std::size_t end) {
      k.fused_update(shardopt::cpu::slice(a, begin, end - begin));
    });
    benchmark::ClobberMemory();
  }
  set_counters(state, g_n);
  state.SetLabel(std::string(shardopt::name_of(pdt)) + " isa=" + shardopt::cpu::name_of(isa));
}

// ---- the bandwidth floor ------------------------------------------------------------------------

// Same streams and bytes as the update, the least arithmetic that keeps every load and store.
template <bool kBf16>
inline void floor_body(float* __restrict master, float* __restrict m, float* __restrict v,
                       const void* __restrict grad, std::uint16_t* __restrict out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    float g;
    if constexpr (kBf16) {
      const std::uint32_t u = static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(grad)[i]) << 16;
      std::memcpy(&g, &u, 4);
    } else {
      g = static_cast<const float*>(grad)[i];
    }
    const float p = master[i] + g;
    master[i] = p;
    m[i] = m[i] + g;
    v[i] = v[i] + g;
    if constexpr (kBf16) {
      std::uint32_t u;
      std::memcpy(&u, &p, 4);
      out[i] = static_cast<std::uint16_t>(u >> 16);
    }
  }
}

// Variant 0: baseline instruction set (SSE2), whatever -O2 makes of it.
template <bool kBf16>
__attribute__((noinline)) void floor_base(float* master, float* m, float* v, const void* grad, std::uint16_t* out,
                                          std::size_t n) {
  floor_body<kBf16>(master, m, v, grad, out, n);
}

// Variant 1: AVX-512 code generation, vectorization forced at any cost model.
template <bool kBf16>
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"),
               optimize("tree-vectorize,vect-cost-model=dynamic"))) void
floor_avx512(float* master, float* m, float* v, const void* grad, std::uint16_t* out, std::size_t n) {
  floor_body<kBf16>(master, m, v, grad, out, n);
}

// Variant 2: AVX2 (256-bit registers), which on some cores streams better than 512-bit.
template <bool kBf16>
__attribute__((noinline, target("avx2,fma"), optimize("tree-vectorize,vect-cost-model=dynamic"))) void
floor_avx2(float* master, float* m, float* v, const void* grad, std::uint16_t* out, std::size_t n) {
  floor_body<kBf16>(master, m, v, grad, out, n);
}

void BM_Floor(benchmark::State& state) {
  const DType pdt = dtype_arg(state);
  const auto threads = static_cast<unsigned>(state.range(1));
  const int variant = static_cast<int>(state.range(2));
  if ((variant == 1 && shardopt::cpu::detect_isa() != shardopt::cpu::Isa::avx512) ||
      (variant == 2 && shardopt::cpu::detect_isa() == shardopt::cpu::Isa::scalar)) {
    state.SkipWithError("instruction set not available");
    return;
  }
  shardopt::ThreadPool pool(threads);
  Buffers b(g_n, pdt, pool);
  auto* master = static_cast<float*>(b.master.get());
  auto* m = static_cast<float*>(b.m.get());
  auto* v = static_cast<float*>(b.v.get());
  auto* out = static_cast<std::uint16_t*>(b.out.get());
  const std::size_t gsize = shardopt::size_of(pdt);
  for (auto _ : state) {
    pool.parallel_for(g_n, kGrain, [&](std::size_t begin, std::size_t end) {
      const std::size_t c = end - begin;
      const void* g = static_cast<const unsigned char*>(b.grad.get()) + begin * gsize;
      std::uint16_t* o = out ? out + begin : nullptr;
      const bool bf = pdt == DType::bf16;
      switch (variant) {
        case 0: bf ? floor_base<true>(master + begin, m + begin, v + begin, g, o, c)
                   : floor_base<false>(master + begin, m + begin, v + begin, g, o, c); break;
        case 1: bf ? floor_avx512<true>(master + begin, m + begin, v + begin, g, o, c)
                   : floor_avx512<false>(master + begin, m + begin, v + begin, g, o, c); break;
        default: bf ? floor_avx2<true>(master + begin, m + begin, v + begin, g, o, c)
                    : floor_avx2<false>(master + begin, m + begin, v + begin, g, o, c); break;
      }
    });
    benchmark::ClobberMemory();
  }
  set_counters(state, g_n);
  static const char* names[] = {"base", "avx512", "avx2"};
  state.SetLabel(std::string(shardopt::name_of(pdt)) + " floor variant=" + names[variant]);
}

void register_all() {
  const unsigned all = shardopt::bench::all_threads();
  std::vector<long> thread_counts{1};
  if (all > 1) thread_counts.push_back(static_cast<long>(all));
  for (long dt : {0L, 1L}) {
    for (long t : thread_counts) {
      benchmark::RegisterBenchmark(dt == 0 ? "fused_adamw/fp32" : "fused_adamw/bf16", BM_FusedAdamW)
          ->Args({dt, t})->ArgNames({"bf16", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond)
          ->MinTime(1.0);
      for (long var : {0L, 1L, 2L})
        benchmark::RegisterBenchmark(dt == 0 ? "floor/fp32" : "floor/bf16", BM_Floor)
            ->Args({dt, t, var})->ArgNames({"bf16", "threads", "variant"})->UseRealTime()
            ->Unit(benchmark::kMillisecond)->MinTime(1.0);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* env = std::getenv("SHARDOPT_BENCH_N")) g_n = shardopt::bench::parse_count(env);
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strncmp(argv[i], "--n=", 4) == 0) g_n = shardopt::bench::parse_count(argv[i] + 4);
    else rest.push_back(argv[i]);
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::AddCustomContext("params", std::to_string(g_n));
  benchmark::AddCustomContext("bytes_per_param", "28 (fp32: grad 4 + master 8 + m 8 + v 8; bf16: grad 2 + master 8 + m 8 + v 8 + param 2)");
  register_all();
  benchmark::Initialize(&rest_argc, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
