// The GPT trainer on one CUDA device (examples/gpt/cuda/train_cuda.hpp): time per step, tokens
// per second and MFU of a GPT-2 shape (default: GPT-2 small, 124M parameters, seq 1024), against
// the cuBLAS bf16 GEMM peak measured in the same run. A plain program (the GPU machine has no
// Google Benchmark). The data are random tokens: the figure is throughput, not learning.
//
//   bench_gpt_cuda [--preset small] [--seq 1024] [--batch 8] [--ranks 1] [--stage 1]
//                  [--dtype bf16|fp32] [--steps 8] [--recompute] [--offload none|host] [--offload-params]
// Step times are wall times of whole steps (the trainer synchronizes the device at each step's
// end, for its loss); the first two steps (cuBLAS plans, first touches) are left out of the median.
// Device memory: the most cudaMemGetInfo() showed in use at any step's end, less what was in use
// before training (the context, cuBLAS), next to the engine's memory_report() and the trainer's
// activation bytes. The CUDA backend keeps freed blocks in its pool, so the measured figure is an
// upper bound of what was live at once.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/train_cuda.hpp"
#include "data.hpp"
#include "gpt.hpp"
#include "model.hpp"
#include "shardopt/error.hpp"

int main(int argc, char** argv) {
  std::string preset = "small", dtype = "bf16";
  int seq = 1024, batch = 8, ranks = 1, stage = 1, steps = 8;
  bool recompute = false, offload_params = false;
  std::string offload = "none";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_gpt_cuda: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--preset") preset = next();
    else if (a == "--seq") seq = std::atoi(next().c_str());
    else if (a == "--batch") batch = std::atoi(next().c_str());
    else if (a == "--ranks") ranks = std::atoi(next().c_str());
    else if (a == "--stage") stage = std::atoi(next().c_str());
    else if (a == "--steps") steps = std::atoi(next().c_str());
    else if (a == "--dtype") dtype = next();
    else if (a == "--recompute") recompute = true;
    else if (a == "--offload") offload = next();
    else if (a == "--offload-params") offload_params = true;
    else {
      std::fprintf(stderr, "bench_gpt_cuda: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  try {
    gpt::TrainOptions o;
    o.shape = gpt::preset(preset);
    o.seq = seq;
    o.batch = batch;
    o.ranks = ranks;
    o.steps = std::max(3, steps);
    o.recompute = recompute;
    o.config.stage = stage;
    o.config.compute_dtype = o.config.reduce_dtype = dtype == "fp32" ? shardopt::DType::fp32 : shardopt::DType::bf16;
    o.config.optimizer = shardopt::OptimizerKind::adamw;
    o.config.hyper.lr = 1e-4f;
    o.config.offload_optimizer = offload == "host" ? shardopt::OffloadKind::host : shardopt::OffloadKind::none;
    o.config.offload_params = offload_params;
    const auto path = std::filesystem::temp_directory_path() / "shardopt-bench-gpt-cuda.bin";
    std::vector<std::uint16_t> tokens(std::size_t(ranks) * batch * (seq + 1) * (o.steps + 1));
    std::mt19937 rng(1);
    std::uniform_int_distribution<int> tok(0, o.shape.vocab - 1);
    for (auto& t : tokens) t = static_cast<std::uint16_t>(tok(rng));
    gpt::write_token_file(path.string(), tokens);
    o.data = path.string();

    const double peak = gpt::measure_cublas_gflops(4096, 4 * o.shape.hidden, o.shape.hidden, 8);
    auto used = [] {
      std::size_t free = 0, total = 0;
      return cudaMemGetInfo(&free, &total) == cudaSuccess ? total - free : 0;
    };
    const std::size_t before = used();
    std::size_t most = 0;
    const gpt::TrainResult r = gpt::train_cuda(o, [&](const gpt::StepRecord& s) {
      most = std::max(most, used());
      std::printf("step %d  loss %.4f  %.1f ms  engine %.3f GiB\n", s.step, s.loss, s.step_ms,
                  double(s.rank_bytes) / (1u << 30));
      std::fflush(stdout);
    });
    std::size_t engine_device = 0;
    for (int cat = 0; cat < shardopt::kCategoryCount; ++cat)
      engine_device += r.memory.at(0).current[cat][static_cast<int>(shardopt::Place::device)];
    std::filesystem::remove(path);
    std::vector<double> ms;
    for (std::size_t i = 2; i < r.steps.size(); ++i) ms.push_back(r.steps[i].step_ms);
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    const double tps = double(r.tokens_per_step) / (med / 1e3);
    const double fpt = gpt::flops_per_token(o.shape, o.seq);
    std::printf("RESULT gpt_cuda preset=%s params=%zu seq=%d batch=%d ranks=%d stage=%d dtype=%s recompute=%d "
                "offload=%s%s median_ms=%.1f tok_per_s=%.0f mfu=%.3f cublas_peak_gflops=%.0f engine_device_bytes=%zu "
                "activation_bytes=%zu measured_device_bytes=%zu\n",
                preset.c_str(), r.params, seq, batch, ranks, stage, dtype.c_str(), recompute ? 1 : 0, offload.c_str(),
                offload_params ? "+params" : "", med, tps, peak > 0 ? fpt * tps / (peak * 1e9) : 0.0, peak,
                engine_device, r.activation_bytes, most > before ? most - before : 0);
    return 0;
  } catch (const shardopt::Error& e) {
    std::fprintf(stderr, "bench_gpt_cuda: %s\n", e.what());
    return 1;
  }
}
