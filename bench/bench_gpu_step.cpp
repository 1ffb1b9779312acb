// The whole engine step on a GPU, captured once in a CUDA graph and replayed, against the same
// iteration issued eagerly.
//
//   bench_gpu_step [--params N] [--blocks B] [--iters K] [--stage S]
//
// One rank (NCCL, world 1) on the CUDA backend, bf16 parameters and gradients, fp32 master and
// AdamW moments, N parameters (default 16M) in B blocks (default 32): small enough per block that
// the host's launch and bookkeeping cost shows. An iteration is what a trainer with device-resident
// gradients does: per block acquire + release (forward), then per block, last first, gradients + a
// device copy of a fixed gradient + grads_ready, then step_async(). Eager: K iterations back to
// back. Graph: one iteration captured after one eager warm-up, launched K times. Both are timed with
// CUDA events on compute_stream() around the K iterations (host enqueue time included: that is what
// a graph removes). The last line, starting with RESULT, is for scripts.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cuda/cuda_internal.hpp"
#include "shardopt/shardopt.hpp"

namespace {

using namespace shardopt;
using cuda_impl::check;

struct Options {
  std::size_t params = std::size_t(16) << 20;
  int blocks = 32;
  int iters = 50;
  int stage = 2;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--params") o.params = static_cast<std::size_t>(std::strtod(argv[i + 1], nullptr));
    else if (a == "--blocks") o.blocks = std::atoi(argv[i + 1]);
    else if (a == "--iters") o.iters = std::atoi(argv[i + 1]);
    else if (a == "--stage") o.stage = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: %s [--params N] [--blocks B] [--iters K] [--stage S]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.params == 0 || o.blocks < 1 || o.iters < 1 || o.stage < 0 || o.stage > 3) {
    std::fprintf(stderr, "--params, --blocks, --iters must be positive and --stage 0..3\n");
    std::exit(2);
  }
  return o;
}

struct Run {
  std::unique_ptr<Backend> be;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Engine> engine;
  std::vector<Buffer> grads;  // one fixed gradient per tensor, in device memory
};

Run make_run(const Options& o) {
  Run r;
  r.be = make_cuda_backend(0);
  r.comm = make_nccl_communicator(nccl_unique_id(), 0, 1, *r.be);
  Config cfg;
  cfg.stage = o.stage;
  cfg.compute_dtype = cfg.reduce_dtype = DType::bf16;
  cfg.hyper.lr = 1e-5f;
  cfg.bucket_bytes = std::size_t(8) << 20;
  r.engine = std::make_unique<Engine>(cfg, *r.be, *r.comm);
  const auto per_block = static_cast<std::int64_t>(o.params / static_cast<std::size_t>(o.blocks));
  for (int b = 0; b < o.blocks; ++b)
    r.engine->register_block({"b" + std::to_string(b), {{"w" + std::to_string(b), {per_block}}}});
  r.engine->initialize(seeded_init(1));
  std::vector<std::uint16_t> host(static_cast<std::size_t>(per_block), std::uint16_t(0x3c00));  // bf16 1/128
  for (int b = 0; b < o.blocks; ++b) {
    r.grads.push_back(r.be->allocate(host.size() * 2, Place::device, Category::other, "bench gradient"));
    r.be->copy(r.grads.back().data(), host.data(), host.size() * 2, r.engine->compute_stream());
    r.be->synchronize(r.engine->compute_stream());
  }
  return r;
}

void iteration(Run& r) {
  Engine& e = *r.engine;
  const int nb = static_cast<int>(r.grads.size());
  for (int b = 0; b < nb; ++b) {
    e.acquire(b);
    e.release(b);
  }
  for (int b = nb - 1; b >= 0; --b) {
    e.acquire(b);
    const BlockView g = e.gradients(b);
    r.be->copy(g.tensors[0].data, r.grads[static_cast<std::size_t>(b)].data(), g.tensors[0].numel * 2, e.compute_stream());
    e.grads_ready(b);
    e.release(b);
  }
  e.step_async();
}

// Milliseconds per iteration over `iters` calls of `body` on `stream`, by CUDA events.
template <class Body>
double time_per_iteration(cudaStream_t stream, int iters, Body&& body) {
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate", "bench");
  check(cudaEventCreate(&stop), "cudaEventCreate", "bench");
  check(cudaEventRecord(start, stream), "cudaEventRecord", "bench");
  for (int i = 0; i < iters; ++i) body();
  check(cudaEventRecord(stop, stream), "cudaEventRecord", "bench");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize", "bench");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime", "bench");
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  return ms / iters;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    if (!cuda_device_available()) {
      std::fprintf(stderr, "bench_gpu_step: no CUDA device\n");
      return 1;
    }
    Run eager = make_run(o);
    auto es = static_cast<cudaStream_t>(cuda_stream_handle(eager.engine->compute_stream()));
    for (int i = 0; i < 3; ++i) iteration(eager);
    check(cudaStreamSynchronize(es), "cudaStreamSynchronize", "bench warm-up");
    const double eager_ms = time_per_iteration(es, o.iters, [&] { iteration(eager); });

    Run graph = make_run(o);
    auto gs = static_cast<cudaStream_t>(cuda_stream_handle(graph.engine->compute_stream()));
    iteration(graph);  // the eager warm-up a capture needs
    check(cudaStreamSynchronize(gs), "cudaStreamSynchronize", "bench warm-up");
    cudaGraph_t g = nullptr;
    check(cudaStreamBeginCapture(gs, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture", "bench");
    iteration(graph);
    check(cudaStreamEndCapture(gs, &g), "cudaStreamEndCapture", "bench");
    cudaGraphExec_t exec = nullptr;
    check(cudaGraphInstantiate(&exec, g, 0), "cudaGraphInstantiate", "bench");
    for (int i = 0; i < 3; ++i) check(cudaGraphLaunch(exec, gs), "cudaGraphLaunch", "bench warm-up");
    check(cudaStreamSynchronize(gs), "cudaStreamSynchronize", "bench warm-up");
    const double graph_ms =
        time_per_iteration(gs, o.iters, [&] { check(cudaGraphLaunch(exec, gs), "cudaGraphLaunch", "bench"); });
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(g);

    std::printf("bench_gpu_step: %zu params in %d blocks, stage %d, bf16, AdamW, NCCL world 1, %d iterations\n",
                o.params, o.blocks, o.stage, o.iters);
    std::printf("eager iteration      : %8.3f ms\n", eager_ms);
    std::printf("captured, replayed   : %8.3f ms  (%.2fx faster)\n", graph_ms, eager_ms / graph_ms);
    std::printf("RESULT stage=%d params=%zu blocks=%d eager_ms=%.4f graph_ms=%.4f speedup=%.3f\n", o.stage, o.params,
                o.blocks, eager_ms, graph_ms, eager_ms / graph_ms);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_step: %s\n", e.what());
    return 1;
  }
}
