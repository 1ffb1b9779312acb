#pragma once
// Skip or fail: what a GPU test does when what it needs is missing.
//
// On a machine without a GPU (CI, a laptop) the GPU tests skip visibly. On a machine that is
// supposed to have one (scripts/gpu-suite.sh exports SHARDOPT_REQUIRE_GPU=1) a missing device or
// a build without NCCL is a failure instead: a suite that passes by skipping proves nothing.
// Skips that no single-GPU machine can avoid (a world of 2 NCCL ranks on 1 GPU) stay skips.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string_view>

namespace shardopt::testing {

inline bool gpu_required() {
  const char* v = std::getenv("SHARDOPT_REQUIRE_GPU");
  return v != nullptr && *v != '\0' && std::string_view(v) != "0";
}

}  // namespace shardopt::testing

// Ends the current test (from a test body or SetUp): a failure when SHARDOPT_REQUIRE_GPU is set,
// a skip otherwise. `message` may be a << chain: SHARDOPT_SKIP_OR_FAIL("world " << w).
#define SHARDOPT_SKIP_OR_FAIL(message)                                  \
  do {                                                                  \
    if (::shardopt::testing::gpu_required())                            \
      GTEST_FAIL() << "SHARDOPT_REQUIRE_GPU is set, but " << message;   \
    else                                                                \
      GTEST_SKIP() << message;                                          \
  } while (0)
