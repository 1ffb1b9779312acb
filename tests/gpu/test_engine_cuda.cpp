// The engine on the CUDA backend: the oracle matrix of the CPU suite (test_engine_oracle) with
// every rank on the GPU.
//   - in-process ranks as threads, world 1-4 (and 8) on one GPU, over the backend_kernels transport;
//   - the NCCL communicator at world 1 (and one rank per GPU where there are more);
//   - the CUDA run bit for bit against the CPU run of the same spec: both backends run the same
//     rules.hpp arithmetic without FMA contraction and reduce in rank order in fp32.
// Without a CUDA device every test skips with a message saying so.
#include <gtest/gtest.h>

#include <string>

#include "engine_oracle.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"

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
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
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
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
    if (!nccl_built()) GTEST_SKIP() << "this build has no NCCL communicator (NCCL was not found at configure time)";
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
  if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
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
  if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
  for (int stage : {0, 1, 2, 3}) {
    RunSpec spec = oracle_spec(stage, 3, DType::bf16, OptimizerKind::adamw, WorldKind::cuda);
    spec.cfg.reduce_dtype = DType::fp32;
    spec.cfg.accumulation_steps = 3;
    spec.steps = 6;
    SCOPED_TRACE("stage " + std::to_string(stage));
    expect_matches_reference(spec, run_training(spec));
  }
}

// The CUDA backend refused where there is no device: a clear error, not a crash.
TEST(CudaEngine, NoDeviceIsAClearError) {
  if (cuda_device_available()) GTEST_SKIP() << "a CUDA device is present: nothing to refuse";
  try {
    (void)make_cuda_backend(0);
    ADD_FAILURE() << "make_cuda_backend succeeded without a device";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported) << e.what();
    EXPECT_NE(e.message().find("no CUDA device"), std::string::npos) << e.message();
  }
}

}  // namespace
