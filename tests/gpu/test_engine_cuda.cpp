// The engine on the CUDA backend: the oracle matrix of the CPU suite (test_engine_oracle) with
// every rank on the GPU.
//   - in-process ranks as threads, world 1-4 (and 8) on one GPU, over the backend_kernels transport;
//   - the NCCL communicator at world 1 (and one rank per GPU where there are more);
//   - the CUDA run bit for bit against the CPU run of the same spec: both backends run the same
//     rules.hpp arithmetic without FMA contraction and reduce in rank order in fp32.
//   - step_async() captured into a CUDA graph and replayed, bit for bit against eager steps.
//   - the trainer's own (cudaMalloc'd) memory borrowed, and any backward order, against the CPU run.
// Without a CUDA device every test skips with a message saying so.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine_oracle.hpp"
#include "gpu/gpu_required.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

constexpr const char* kNoDevice = "no CUDA device on this machine: the engine's GPU tests need one (compiled, not run)";

// NCCL is optional in a CUDA build: without it nccl_unique_id() throws Error(unsupported).
bool nccl_built() {
  try {
    (void)nccl_unique_id();
    return true;
  } catch (const Error& e) {
    if (e.code() == ErrorCode::unsupported) return false;
    throw;
  }
}

class CudaOracle : public ::testing::TestWithParam<OracleParam> {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  }
};

TEST_P(CudaOracle, InProcessRanksOnOneGpu) {
  const auto [stage, world, dtype, rule] = GetParam();
  const RunSpec spec = oracle_spec(stage, world, dtype, rule, WorldKind::cuda);
  expect_matches_reference(spec, run_training(spec));
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaOracle, oracle_matrix({1, 2, 3, 4, 8}), oracle_name);

class NcclOracle : public ::testing::TestWithParam<OracleParam> {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
    if (!nccl_built()) SHARDOPT_SKIP_OR_FAIL("this build has no NCCL communicator (NCCL was not found at configure time)");
    const int world = std::get<1>(GetParam());
    if (world > cuda_device_count())
      GTEST_SKIP() << "NCCL needs one GPU per rank: world " << world << " on " << cuda_device_count() << " device(s)";
  }
};

// NCCL sums in its own order, not rank order; with one rank there is nothing to reorder, and with
// more the bound (rounding of the reduced mean, not its order) still holds.
TEST_P(NcclOracle, NcclCommunicator) {
  const auto [stage, world, dtype, rule] = GetParam();
  const RunSpec spec = oracle_spec(stage, world, dtype, rule, WorldKind::cuda_nccl);
  expect_matches_reference(spec, run_training(spec));
}

INSTANTIATE_TEST_SUITE_P(Matrix, NcclOracle, oracle_matrix({1, 2}), oracle_name);

// The whole run, bits of master weights, both optimizer states and the compute-dtype parameters,
// against the CPU backend.
TEST(CudaEngine, SameBitsAsCpu) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 3})
      for (DType dtype : {DType::fp32, DType::bf16, DType::fp16}) {
        RunSpec spec = oracle_spec(stage, world, dtype, OptimizerKind::adamw);
        spec.steps = 8;
        const RunResult cpu = run_training(spec);
        spec.where = WorldKind::cuda;
        expect_bitwise_equal(cpu, run_training(spec), 2,
                             "CPU vs CUDA, stage " + std::to_string(stage) + " world " + std::to_string(world) + " " +
                                 std::string(name_of(dtype)));
      }
}

// Gradient accumulation over micro-steps and a 16-bit compute dtype reduced in fp32 on the GPU.
TEST(CudaEngine, AccumulationAndFp32Reduce) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  for (int stage : {0, 1, 2, 3}) {
    RunSpec spec = oracle_spec(stage, 3, DType::bf16, OptimizerKind::adamw, WorldKind::cuda);
    spec.cfg.reduce_dtype = DType::fp32;
    spec.cfg.accumulation_steps = 3;
    spec.steps = 6;
    SCOPED_TRACE("stage " + std::to_string(stage));
    expect_matches_reference(spec, run_training(spec));
  }
}

// One training iteration with no host wait: forward acquires every block and copies what it
// reads (the parameters) into `seen` on compute_stream(), backward copies a fixed device-resident
// gradient into every gradient view there, then step_async().
void device_iteration(Engine& e, Backend& be, const std::vector<Buffer>& grads, const std::vector<Buffer>& seen) {
  const Layout& L = e.layout();
  const int nblocks = static_cast<int>(L.blocks().size());
  for (int b = 0; b < nblocks; ++b) {
    const BlockView p = e.acquire(b);
    for (std::size_t i = 0; i < p.tensors.size(); ++i) {
      const TensorView& tv = p.tensors[i];
      if (tv.numel)
        be.copy(seen[L.blocks()[b].first_tensor + i].data(), tv.data, tv.numel * size_of(tv.dtype), e.compute_stream());
    }
    e.release(b);
  }
  for (int b = nblocks - 1; b >= 0; --b) {
    e.acquire(b);
    const BlockView g = e.gradients(b);
    for (std::size_t i = 0; i < g.tensors.size(); ++i) {
      const TensorView& tv = g.tensors[i];
      if (tv.numel) be.copy(tv.data, grads[L.blocks()[b].first_tensor + i].data(), tv.numel * size_of(tv.dtype), e.compute_stream());
    }
    e.grads_ready(b);
    e.release(b);
  }
  e.step_async();
}

// What a run leaves: master weights, the parameters the last forward read (compute dtype, as
// floats), and last_result().
struct GraphRun {
  std::vector<std::vector<float>> master, forward;
  StepResult result;
};

// A warm-up iteration and `iterations` more: run eagerly, or captured once into a CUDA graph
// (which does not run it) and launched `iterations` times.
GraphRun graph_or_eager_run(const Config& cfg, int iterations, bool graph) {
  auto be = make_cuda_backend(0);
  auto comm = make_nccl_communicator(nccl_unique_id(), 0, 1, *be);
  Engine e(cfg, *be, *comm);
  for (const auto& b : awkward_model()) e.register_block(b);
  e.initialize(seeded_init(4));
  const Layout& L = e.layout();
  std::vector<Buffer> grads, seen;
  for (const auto& t : L.tensors()) {
    seen.push_back(be->allocate(t.numel * size_of(cfg.compute_dtype), Place::device, Category::other, "forward " + t.name));
    std::vector<unsigned char> host(t.numel * size_of(cfg.compute_dtype));
    for (std::size_t i = 0; i < t.numel; ++i)
      store_from_float(host.data(), cfg.compute_dtype, i,
                       synthetic_grad(4, 0, 0, 0, name_key(t.name), i, cfg.compute_dtype) * 8.0f);
    grads.push_back(be->allocate(host.size(), Place::device, Category::other, "test gradient " + t.name));
    if (!host.empty()) be->copy(grads.back().data(), host.data(), host.size(), e.compute_stream());
    be->synchronize(e.compute_stream());
  }
  device_iteration(e, *be, grads, seen);  // warm-up: NCCL and anything lazily made is ready before a capture
  be->synchronize(e.compute_stream());
  const StepResult warm = e.last_result();
  if (!graph) {
    for (int i = 0; i < iterations + 2; ++i) device_iteration(e, *be, grads, seen);
  } else {
    auto cs = static_cast<cudaStream_t>(cuda_stream_handle(e.compute_stream()));
    cudaGraph_t g = nullptr;
    EXPECT_EQ(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    try {
      device_iteration(e, *be, grads, seen);
    } catch (const std::exception& ex) {
      ADD_FAILURE() << "capturing an iteration failed: " << ex.what();
    }
    const cudaError_t end = cudaStreamEndCapture(cs, &g);
    EXPECT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
    if (end != cudaSuccess || g == nullptr) return {};
    // Still the warm-up's result: the capture ran nothing.
    EXPECT_EQ(e.last_result().step, warm.step);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, g, 0);
    EXPECT_EQ(inst, cudaSuccess) << cudaGetErrorString(inst);
    for (int i = 0; i < iterations && inst == cudaSuccess; ++i) EXPECT_EQ(cudaGraphLaunch(exec, cs), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(cs), cudaSuccess);
    if (exec) cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    // An eager iteration after the launches (its waits on events last recorded in the capture),
    // then a second capture, launched once.
    device_iteration(e, *be, grads, seen);
    cudaGraph_t g2 = nullptr;
    EXPECT_EQ(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    try {
      device_iteration(e, *be, grads, seen);
    } catch (const std::exception& ex) {
      ADD_FAILURE() << "capturing a second iteration failed: " << ex.what();
    }
    const cudaError_t end2 = cudaStreamEndCapture(cs, &g2);
    EXPECT_EQ(end2, cudaSuccess) << cudaGetErrorString(end2);
    if (end2 != cudaSuccess || g2 == nullptr) return {};
    cudaGraphExec_t exec2 = nullptr;
    const cudaError_t inst2 = cudaGraphInstantiate(&exec2, g2, 0);
    EXPECT_EQ(inst2, cudaSuccess) << cudaGetErrorString(inst2);
    if (inst2 == cudaSuccess) {
      EXPECT_EQ(cudaGraphLaunch(exec2, cs), cudaSuccess);
    }
    EXPECT_EQ(cudaStreamSynchronize(cs), cudaSuccess);
    if (exec2) cudaGraphExecDestroy(exec2);
    cudaGraphDestroy(g2);
  }
  GraphRun run;
  run.result = e.last_result();
  run.master.resize(L.tensors().size());
  for (std::size_t t = 0; t < L.tensors().size(); ++t) run.master[t].assign(L.tensors()[t].numel, std::nanf(""));
  e.read_master([&](int t, std::size_t begin, std::size_t n, const float* v) {
    std::copy(v, v + n, run.master[static_cast<std::size_t>(t)].begin() + static_cast<std::ptrdiff_t>(begin));
  });
  for (std::size_t t = 0; t < L.tensors().size(); ++t) {
    std::vector<unsigned char> host(L.tensors()[t].numel * size_of(cfg.compute_dtype));
    if (!host.empty()) be->copy(host.data(), seen[t].data(), host.size(), e.compute_stream());
    be->synchronize(e.compute_stream());
    std::vector<float> values(L.tensors()[t].numel);
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = load_as_float(host.data(), cfg.compute_dtype, i);
    run.forward.push_back(std::move(values));
  }
  return run;
}

// The promise: with NCCL, step_async() never waits on the host, so a whole iteration
// (gathers, reduce-scatters, norm, clipping, loss scaler, update) can be captured and replayed:
// launches of the graph, then an eager iteration, then a second capture, give the bits of as many
// eager iterations, in the master weights and in what each forward reads; last_result() after
// launches is the last launch's.
TEST(CudaEngine, StepCapturedInACudaGraphReplaysLikeEagerSteps) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  if (!nccl_built()) SHARDOPT_SKIP_OR_FAIL("this build has no NCCL communicator (NCCL was not found at configure time)");
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    Config cfg = base_config(stage, DType::fp16, OptimizerKind::adamw);
    cfg.loss_scaling.mode = LossScaleMode::dynamic;
    cfg.loss_scaling.initial_scale = 8.0f;
    cfg.loss_scaling.growth_interval = 2;  // the scale changes between replays
    cfg.max_grad_norm = 1.0f;              // and the gradient is clipped
    const GraphRun eager = graph_or_eager_run(cfg, 4, false);
    const GraphRun replayed = graph_or_eager_run(cfg, 4, true);
    ASSERT_EQ(eager.master.size(), replayed.master.size());
    ASSERT_EQ(eager.forward.size(), replayed.forward.size());
    for (std::size_t t = 0; t < eager.master.size(); ++t) {
      EXPECT_TRUE(same_bits(eager.master[t], replayed.master[t])) << "master of tensor " << t;
      // What the last forward read: at stage 3 the gathered parameters, which a replay must gather
      // again (stale slots from an earlier launch would differ after 4 updates).
      EXPECT_TRUE(same_bits(eager.forward[t], replayed.forward[t])) << "parameters forward read, tensor " << t;
    }
    // last_result() after launches: the last launch's step.
    EXPECT_GT(eager.result.step, 0);
    EXPECT_EQ(replayed.result.step, eager.result.step);
    EXPECT_EQ(replayed.result.loss_scale, eager.result.loss_scale);
    EXPECT_EQ(replayed.result.grad_norm, eager.result.grad_norm);
    EXPECT_EQ(replayed.result.applied, eager.result.applied);
  }
}

// Compressed optimizer state (bf16, int8 blocks of 64) on the GPU: the same bits as the CPU
// backend, whole runs at stages 1 and 3.
TEST(CudaEngine, CompressedStateSameBitsAsCpu) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  for (StatePrecision p : {StatePrecision::bf16, StatePrecision::int8})
    for (int stage : {1, 3})
      for (int world : {1, 3}) {
        RunSpec spec = oracle_spec(stage, world, DType::bf16, OptimizerKind::adamw);
        spec.cfg.state_precision = p;
        spec.cfg.quant_block = 64;
        spec.steps = 6;
        const RunResult cpu = run_training(spec);
        spec.where = WorldKind::cuda;
        expect_bitwise_equal(cpu, run_training(spec), 2,
                             "CPU vs CUDA, " + std::string(name_of(p)) + " state, stage " + std::to_string(stage) +
                                 " world " + std::to_string(world));
      }
}

// int8 state in a captured step: the dither's seed is the step counter read on the device, so
// each launch of the graph rounds with its own step's seed, as eager steps do (a seed baked into
// the capture would give every launch the captured step's dither and other bits).
TEST(CudaEngine, CompressedStateStepCapturedReplaysLikeEagerSteps) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  if (!nccl_built()) SHARDOPT_SKIP_OR_FAIL("this build has no NCCL communicator (NCCL was not found at configure time)");
  for (int stage : {1, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    Config cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
    cfg.state_precision = StatePrecision::int8;
    cfg.quant_block = 64;
    const GraphRun eager = graph_or_eager_run(cfg, 4, false);
    const GraphRun replayed = graph_or_eager_run(cfg, 4, true);
    ASSERT_EQ(eager.master.size(), replayed.master.size());
    for (std::size_t t = 0; t < eager.master.size(); ++t)
      EXPECT_TRUE(same_bits(eager.master[t], replayed.master[t])) << "master of tensor " << t;
    EXPECT_EQ(replayed.result.step, eager.result.step);
  }
}

// A capture begun before any eager step is refused by the engine (acquire), with nothing changed.
TEST(CudaEngine, CaptureBeforeAnEagerStepIsRefused) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  auto be = make_cuda_backend(0);
  auto comm = make_in_process_communicator(make_in_process_group(1), 0, *be);
  Engine e(base_config(3, DType::bf16, OptimizerKind::adamw), *be, *comm);
  for (const auto& b : awkward_model()) e.register_block(b);
  e.initialize(seeded_init(4));
  auto cs = static_cast<cudaStream_t>(cuda_stream_handle(e.compute_stream()));
  ASSERT_EQ(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  try {
    (void)e.acquire(0);
    ADD_FAILURE() << "acquire accepted a capture before any eager step";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::invalid_state) << err.what();
  }
  cudaGraph_t g = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(cs, &g), cudaSuccess);
  if (g) cudaGraphDestroy(g);
  synthetic_micro_step(e, 0, 0, 0, 7, 1.0f, be.get());  // the engine is still usable
  EXPECT_EQ(e.step().step, 1);
}

// The CUDA backend refused where it cannot exist: without a device, any ordinal; with devices,
// an ordinal past the last one. A clear error either way, not a crash.
// Optimizer (and, at stage 3, parameter) offload on the GPU: the reduced gradient goes straight
// from the bucket to the pinned host copy (no device gradient shard) and the update runs on the
// host. Bit for bit the CUDA run without offload, with a reduce dtype other than the compute dtype
// and clipping, one micro-step and three; memory_report() equals plan_memory on every rank. (With
// micro-steps > 1 the host sums the downloaded slices and the norm is taken as they land.) The
// plan counts the CUDA backend's per-stream scratch (Backend::stream_scratch_bytes()).
TEST(CudaEngine, OffloadToHostSameBitsAsNoOffload) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  const std::size_t scratch = make_cuda_backend(0)->stream_scratch_bytes();
  auto expect_planned = [scratch](const RunSpec& s, const RunResult& r) {
    const MemoryReport planned = plan_memory(s.cfg, s.model, s.world, scratch).report();
    for (int rk = 0; rk < s.world; ++rk)
      for (int cat = 0; cat < kCategoryCount; ++cat)
        for (int pl = 0; pl < kPlaceCount; ++pl)
          EXPECT_EQ(r.memory[rk].current[cat][pl], planned.current[cat][pl])
              << "rank " << rk << ": " << name_of(static_cast<Category>(cat)) << " at "
              << name_of(static_cast<Place>(pl));
  };
  for (int stage : {0, 1, 2, 3})
    for (int accumulation : {1, 3}) {
      RunSpec spec = oracle_spec(stage, 3, DType::bf16, OptimizerKind::adamw, WorldKind::cuda);
      spec.cfg.reduce_dtype = DType::fp32;
      spec.cfg.accumulation_steps = accumulation;
      spec.cfg.max_grad_norm = 0.5f;
      spec.steps = 6;
      const std::string base = "stage " + std::to_string(stage) + " micro-steps " + std::to_string(accumulation);
      const RunResult none = run_training(spec);
      {
        SCOPED_TRACE(base + " no offload");
        expect_planned(spec, none);
      }
      for (bool params : {false, true}) {
        if (params && stage != 3) continue;
        RunSpec o = spec;
        o.cfg.offload_optimizer = OffloadKind::host;
        o.cfg.offload_params = params;
        const std::string what = base + (params ? " host offload + parameters" : " host offload");
        SCOPED_TRACE(what);
        const RunResult got = run_training(o);
        expect_bitwise_equal(none, got, 2, what);
        expect_planned(o, got);
      }
    }
}

// Borrowed memory on the GPU: the trainer's parameter and gradient arrays in its own cudaMalloc'd
// device memory, written by a single-pass backward (every block's gradient before any
// grads_ready), at stages 0-3: bit for bit the CPU backend's run of the same spec (host arrays),
// and memory_report() equals the plan of the borrowing engine with what the trainer lends counted
// apart. Then any backward order at stages 2-3 (blocks hopping between units, flushing buckets
// early; and the single pass with one bucket per unit, in engine memory): bit for bit the CPU run.
TEST(CudaEngine, BorrowedMemoryAndAnyBackwardOrderSameBitsAsCpu) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  const std::size_t scratch = make_cuda_backend(0)->stream_scratch_bytes();
  auto device_alloc = [](std::size_t bytes) -> void* {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) throw Error(ErrorCode::out_of_memory, "cudaMalloc of the trainer's array");
    return p;
  };
  auto device_free = [](void* p) { (void)cudaFree(p); };
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 3})
      for (DType dtype : {DType::fp32, DType::bf16})
        for (int accumulation : {1, 3}) {
          const std::string what = "stage " + std::to_string(stage) + " world " + std::to_string(world) + " " +
                                   std::string(name_of(dtype)) + " micro-steps " + std::to_string(accumulation);
          SCOPED_TRACE(what + " borrowed parameters and gradients");
          RunSpec spec = oracle_spec(stage, world, dtype, OptimizerKind::adamw);
          spec.steps = 6;
          spec.cfg.accumulation_steps = accumulation;
          spec.cfg.max_grad_norm = 0.5f;
          spec.backward = BackwardOrder::single_pass;
          spec.borrow_gradients = spec.borrow_parameters = true;
          const RunResult cpu = run_training(spec);
          RunSpec gpu = spec;
          gpu.where = WorldKind::cuda;
          gpu.trainer_alloc = device_alloc;
          gpu.trainer_free = device_free;
          const RunResult got = run_training(gpu);
          expect_bitwise_equal(cpu, got, 2, "CPU vs CUDA, borrowed memory, " + what);
          const MemoryReport planned =
              plan_memory(gpu.cfg, gpu.model, world, Borrowing{true, true}, scratch).report();
          for (int rk = 0; rk < world; ++rk) {
            EXPECT_EQ(got.memory[rk].borrowed[static_cast<int>(Place::device)],
                      planned.borrowed[static_cast<int>(Place::device)]);
            for (int cat = 0; cat < kCategoryCount; ++cat)
              for (int pl = 0; pl < kPlaceCount; ++pl)
                EXPECT_EQ(got.memory[rk].current[cat][pl], planned.current[cat][pl])
                    << "rank " << rk << ": " << name_of(static_cast<Category>(cat)) << " at "
                    << name_of(static_cast<Place>(pl));
          }
        }
  for (int stage : {2, 3})
    for (int world : {1, 3})
      for (DType dtype : {DType::fp32, DType::bf16})
        for (BackwardOrder order : {BackwardOrder::scattered, BackwardOrder::single_pass}) {
          const std::string what = "stage " + std::to_string(stage) + " world " + std::to_string(world) + " " +
                                   std::string(name_of(dtype)) +
                                   (order == BackwardOrder::scattered ? " scattered" : " single-pass") + " backward";
          SCOPED_TRACE(what);
          RunSpec spec = oracle_spec(stage, world, dtype, OptimizerKind::adamw);
          spec.steps = 6;
          spec.cfg.accumulation_steps = 2;
          spec.backward = order;
          if (order == BackwardOrder::single_pass) spec.cfg.gradient_buckets = 0;  // every unit's views at once
          const RunResult cpu = run_training(spec);
          spec.where = WorldKind::cuda;
          expect_bitwise_equal(cpu, run_training(spec), 2, "CPU vs CUDA, " + what);
        }
}

TEST(CudaEngine, NoDeviceOrBadOrdinalIsAClearError) {
  const bool have = cuda_device_available();
  try {
    (void)make_cuda_backend(have ? cuda_device_count() : 0);
    ADD_FAILURE() << "make_cuda_backend succeeded for a device that does not exist";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), have ? ErrorCode::invalid_argument : ErrorCode::unsupported) << e.what();
    if (!have) {
      EXPECT_NE(e.message().find("no CUDA device"), std::string::npos) << e.message();
    }
  }
}

}  // namespace
