// GPU optimizer update: the CUDA backend's fused AdamW (bf16 grads in, bf16 params out, fp32
// master weights and moments) over one flat shard, next to its floor measured in the same run: a
// device-to-device cudaMemcpy moving the same bytes. The update is memory-bound: per parameter it
// reads master, m, v (12 B) and the grad (2 B) and writes master, m, v (12 B) and the param (2 B),
// 28 B in all; the memcpy copies 14 B per parameter (14 B read + 14 B written).
//
//   bench_gpu_update [--params N] [--iters K] [--warmup W]
//
// N defaults to 1e9 (about 44 GB of device memory with the memcpy buffers); if that does not fit
// it is halved until it does. Times are CUDA events around K back-to-back launches after W
// warm-up launches. The last line, starting with RESULT, is for scripts (gpu-suite.sh).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "cuda/cuda_internal.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace {

using namespace shardopt;
using cuda_impl::check;

struct Options {
  std::size_t params = 1000000000;
  int iters = 20;
  int warmup = 5;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--params" && has_value)
      o.params = static_cast<std::size_t>(std::strtod(argv[++i], nullptr));
    else if (a == "--iters" && has_value)
      o.iters = std::atoi(argv[++i]);
    else if (a == "--warmup" && has_value)
      o.warmup = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--params N] [--iters K] [--warmup W]\n", argv[0]);
      std::exit(a == "--help" ? 0 : 2);
    }
  }
  if (o.params == 0 || o.iters < 1 || o.warmup < 0) {
    std::fprintf(stderr, "--params must be > 0, --iters >= 1, --warmup >= 0\n");
    std::exit(2);
  }
  return o;
}

struct Buffers {
  Buffer master, m, v, grad, param, copy_src, copy_dst;
};

Buffers allocate_all(Backend& gpu, std::size_t n) {
  Buffers b;
  b.master = gpu.allocate(4 * n, Place::device, Category::master_weights, "bench master");
  b.m = gpu.allocate(4 * n, Place::device, Category::optimizer_state, "bench m");
  b.v = gpu.allocate(4 * n, Place::device, Category::optimizer_state, "bench v");
  b.grad = gpu.allocate(2 * n, Place::device, Category::gradients, "bench grad");
  b.param = gpu.allocate(2 * n, Place::device, Category::parameters, "bench param");
  b.copy_src = gpu.allocate(14 * n, Place::device, Category::other, "bench memcpy source");
  b.copy_dst = gpu.allocate(14 * n, Place::device, Category::other, "bench memcpy destination");
  return b;
}

// Milliseconds per launch of `launch` over `iters` back-to-back launches after `warmup` ones.
template <class F>
double time_ms(cudaStream_t s, int warmup, int iters, F&& launch) {
  for (int i = 0; i < warmup; ++i) launch();
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate", "creating a timing event");
  check(cudaEventCreate(&stop), "cudaEventCreate", "creating a timing event");
  check(cudaEventRecord(start, s), "cudaEventRecord", "starting the timer");
  for (int i = 0; i < iters; ++i) launch();
  check(cudaEventRecord(stop, s), "cudaEventRecord", "stopping the timer");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize", "waiting for the timed work");
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime", "reading the timer");
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  return static_cast<double>(ms) / iters;
}

int run(const Options& o) {
  if (!cuda_device_available()) {
    std::printf("bench_gpu_update: no CUDA device on this machine, nothing to measure\n");
    return 0;
  }
  auto gpu = make_cuda_backend(0);
  auto stream = gpu->create_stream("bench");
  const cudaStream_t s = cuda_impl::cuda_stream(*stream, "bench_gpu_update").handle();

  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties", "naming the device");

  std::size_t n = o.params;
  Buffers b;
  for (;;) {
    try {
      b = allocate_all(*gpu, n);
      break;
    } catch (const Error& e) {
      if (e.code() != ErrorCode::out_of_memory || n < (std::size_t(1) << 20)) throw;
      b = Buffers{};
      std::printf("%zu parameters do not fit (%s); trying %zu\n", n, e.message().c_str(), n / 2);
      n /= 2;
    }
  }

  gpu->fill(b.master.data(), DType::fp32, n, 0.5f, *stream);
  gpu->fill(b.m.data(), DType::fp32, n, 0.0f, *stream);
  gpu->fill(b.v.data(), DType::fp32, n, 0.0f, *stream);
  gpu->fill(b.grad.data(), DType::bf16, n, 1e-3f, *stream);
  gpu->fill(b.copy_src.data(), DType::fp32, 14 * n / 4, 1.0f, *stream);
  gpu->synchronize(*stream);

  Hyperparams h;
  h.weight_decay = 0.01f;
  UpdateArgs a;
  a.rule = OptimizerKind::adamw;
  a.scalars = make_step_scalars(OptimizerKind::adamw, h, 1, 1.0f);
  a.master = b.master.as<float>();
  a.state1 = b.m.as<float>();
  a.state2 = b.v.as<float>();
  a.grad = b.grad.data();
  a.grad_dtype = DType::bf16;
  a.param_out = b.param.data();
  a.param_dtype = DType::bf16;
  a.n = n;

  const double update_ms = time_ms(s, o.warmup, o.iters, [&] { gpu->fused_update(a, *stream); });
  const double copy_ms = time_ms(s, o.warmup, o.iters, [&] {
    check(cudaMemcpyAsync(b.copy_dst.data(), b.copy_src.data(), 14 * n, cudaMemcpyDeviceToDevice, s),
          "cudaMemcpyAsync", "timing the device-to-device copy");
  });
  gpu->synchronize(*stream);

  const double traffic = 28.0 * static_cast<double>(n);  // bytes read + written, both figures
  const double per_billion = update_ms * 1e9 / static_cast<double>(n);
  const double update_gbps = traffic / (update_ms * 1e-3) / 1e9;
  const double copy_gbps = traffic / (copy_ms * 1e-3) / 1e9;
  std::printf("device: %s, %zu parameters (asked %zu), %d iterations after %d warm-up\n", prop.name, n, o.params,
              o.iters, o.warmup);
  std::printf("fused AdamW, bf16 grad/param, fp32 master+m+v : %9.3f ms/step  %9.3f ms per 1B params  %7.1f GB/s  "
              "(28 B/param)\n",
              update_ms, per_billion, update_gbps);
  std::printf("floor: D2D cudaMemcpy of the same traffic     : %9.3f ms        %9.3f ms per 1B params  %7.1f GB/s\n",
              copy_ms, copy_ms * 1e9 / static_cast<double>(n), copy_gbps);
  std::printf("update time / memcpy time: %.3f (1.0 = at the memory-bandwidth floor)\n", update_ms / copy_ms);
  std::printf("RESULT params=%zu update_ms=%.4f ms_per_1B=%.4f update_gbps=%.2f memcpy_gbps=%.2f ratio=%.4f\n", n,
              update_ms, per_billion, update_gbps, copy_gbps, update_ms / copy_ms);

  // The same update with compressed moments (Backend::compressed_update, state_precision.hpp) in
  // the m and v buffers: bf16 moves 20 B per parameter, int8 (block 256, one fp32 scale per block
  // and moment) 16 B + 8 B/256; the time against the fp32 update and the bytes saved.
  const std::size_t blocks = (n + kDefaultQuantBlock - 1) / kDefaultQuantBlock;
  Buffer sc1 = gpu->allocate(4 * blocks, Place::device, Category::optimizer_state, "bench scales m");
  Buffer sc2 = gpu->allocate(4 * blocks, Place::device, Category::optimizer_state, "bench scales v");
  for (StatePrecision prec : {StatePrecision::bf16, StatePrecision::int8}) {
    const bool q = prec == StatePrecision::int8;
    check(cudaMemsetAsync(b.m.data(), 0, 4 * n, s), "cudaMemsetAsync", "clearing the compressed m");
    check(cudaMemsetAsync(b.v.data(), 0, 4 * n, s), "cudaMemsetAsync", "clearing the compressed v");
    gpu->fill(sc1.data(), DType::fp32, blocks, 1.0f, *stream);
    gpu->fill(sc2.data(), DType::fp32, blocks, 1.0f, *stream);
    CompressedUpdateArgs c;
    c.rule = OptimizerKind::adamw;
    c.scalars = a.scalars;
    c.precision = prec;
    c.seed = 1;
    c.master = a.master;
    c.state1 = b.m.data();
    c.state2 = b.v.data();
    c.scales1 = q ? sc1.as<float>() : nullptr;
    c.scales2 = q ? sc2.as<float>() : nullptr;
    c.grad = a.grad;
    c.grad_dtype = DType::bf16;
    c.param_out = a.param_out;
    c.param_dtype = DType::bf16;
    c.n = n;
    const double ms = time_ms(s, o.warmup, o.iters, [&] { gpu->compressed_update(c, *stream); });
    gpu->synchronize(*stream);
    const double bytes = q ? 16.0 + 16.0 / kDefaultQuantBlock : 20.0;
    std::printf("AdamW, %-4s moments                         : %9.3f ms/step  %9.3f ms per 1B params  %7.1f GB/s  "
                "(%.2f B/param; time %.3f of fp32's, bytes %.3f)\n",
                std::string(name_of(prec)).c_str(), ms, ms * 1e9 / static_cast<double>(n), bytes * n / (ms * 1e-3) / 1e9, bytes,
                ms / update_ms, bytes / 28.0);
    std::printf("RESULT state=%s params=%zu update_ms=%.4f ms_per_1B=%.4f gbps=%.2f time_vs_fp32=%.4f bytes_vs_fp32=%.4f\n",
                std::string(name_of(prec)).c_str(), n, ms, ms * 1e9 / static_cast<double>(n), bytes * n / (ms * 1e-3) / 1e9, ms / update_ms,
                bytes / 28.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_update: %s\n", e.what());
    return 1;
  }
}
