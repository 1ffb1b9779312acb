// Backend::compressed_update on the CUDA backend against the CPU backend: the same random inputs
// (random codes and power-of-two scales, some all-zero blocks, gradients over several orders of
// magnitude), outputs compared byte for byte (master, codes, scales, bf16 states, param_out,
// zeroed gradient). The CPU backend's result is itself checked against a float64 oracle in
// tests/test_compressed_state.cpp. Without a CUDA device every test skips saying so.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/gpu_required.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/state_precision.hpp"

namespace shardopt {
namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr const char* kNoDevice =
    "no CUDA device on this machine: the compressed-state GPU tests need a GPU (compiled, not run)";

struct Case {
  StatePrecision precision;
  OptimizerKind rule;
  DType grad_dtype;
  DType param_dtype;
  std::size_t block;
  std::size_t n;
  bool zero_grad;
};

// Host images of every buffer of one update.
struct Images {
  Bytes master, s1, s2, sc1, sc2, grad, out;
};

Images make_inputs(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> expo(-12.0, 2.0);
  std::uniform_int_distribution<int> byte(0, 255);
  Images im;
  const std::size_t n = c.n, sb = c.precision == StatePrecision::bf16 ? 2 : 1;
  const std::size_t blocks = quant_block_count(n, c.block);
  im.master.resize(4 * n);
  for (std::size_t i = 0; i < n; ++i) store_from_float(im.master.data(), DType::fp32, i, normal(rng));
  im.grad.resize(n * size_of(c.grad_dtype));
  for (std::size_t i = 0; i < n; ++i)
    store_from_float(im.grad.data(), c.grad_dtype, i, static_cast<float>(normal(rng) * std::exp2(expo(rng))));
  im.s1.resize(n * sb);
  im.s2.resize(n * sb);
  if (c.precision == StatePrecision::bf16) {
    for (std::size_t i = 0; i < n; ++i) {
      store_from_float(im.s1.data(), DType::bf16, i, static_cast<float>(normal(rng) * std::exp2(expo(rng))));
      store_from_float(im.s2.data(), DType::bf16, i, static_cast<float>(std::exp2(2 * expo(rng))));
    }
  } else {
    for (auto& b : im.s1) b = static_cast<std::uint8_t>(byte(rng));
    for (auto& b : im.s2) b = static_cast<std::uint8_t>(byte(rng));
    im.sc1.resize(4 * blocks);
    im.sc2.resize(4 * blocks);
    for (std::size_t k = 0; k < blocks; ++k) {
      const bool zero = k % 5 == 3;
      store_from_float(im.sc1.data(), DType::fp32, k, zero ? 0.0f : std::ldexp(1.0f, -(static_cast<int>(k) % 13)));
      store_from_float(im.sc2.data(), DType::fp32, k, zero ? 0.0f : std::ldexp(1.0f, -2 - (static_cast<int>(k) % 23)));
      if (zero)
        for (std::size_t i = k * c.block; i < std::min(n, (k + 1) * c.block); ++i) im.s1[i] = im.s2[i] = 0;
    }
  }
  im.out.assign(n * size_of(c.param_dtype), 0xff);
  return im;
}

// Runs the update on `backend` over copies of `in` in its memory, returns the host images after.
Images run(Backend& backend, const Case& c, const Images& in) {
  auto stream = backend.create_stream("compressed");
  std::vector<Buffer> bufs;
  Images out = in;
  Bytes* images[] = {&out.master, &out.s1, &out.s2, &out.sc1, &out.sc2, &out.grad, &out.out};
  void* ptrs[7] = {};
  for (int i = 0; i < 7; ++i) {
    if (images[i]->empty()) continue;
    bufs.push_back(backend.allocate(images[i]->size(), Place::device, Category::other, "test"));
    ptrs[i] = bufs.back().data();
    backend.copy(ptrs[i], images[i]->data(), images[i]->size(), *stream);
  }
  Hyperparams h;
  h.lr = 1e-2f;
  h.weight_decay = 0.1f;
  CompressedUpdateArgs a;
  a.rule = c.rule;
  a.scalars = make_step_scalars(c.rule, h, 5, 0.5f);
  a.precision = c.precision;
  a.block_size = c.block;
  a.master = static_cast<float*>(ptrs[0]);
  a.state1 = ptrs[1];
  a.state2 = ptrs[2];
  a.scales1 = static_cast<float*>(ptrs[3]);
  a.scales2 = static_cast<float*>(ptrs[4]);
  a.grad = ptrs[5];
  a.grad_dtype = c.grad_dtype;
  a.param_out = ptrs[6];
  a.param_dtype = c.param_dtype;
  a.n = c.n;
  a.zero_grad = c.zero_grad;
  backend.compressed_update(a, *stream);
  for (int i = 0; i < 7; ++i)
    if (ptrs[i]) backend.copy(images[i]->data(), ptrs[i], images[i]->size(), *stream);
  backend.synchronize(*stream);
  return out;
}

TEST(CompressedStateCuda, SameBytesAsTheCpuBackend) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  auto gpu = make_cuda_backend(0);
  auto cpu = make_cpu_backend();
  std::vector<Case> cases;
  for (StatePrecision p : {StatePrecision::bf16, StatePrecision::int8})
    for (OptimizerKind r : {OptimizerKind::adamw, OptimizerKind::adam, OptimizerKind::sgd, OptimizerKind::lion,
                            OptimizerKind::radam})
      for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(257), std::size_t(3 * 4096 + 77),
                            (std::size_t(1) << 20) + 3})
        cases.push_back({p, r, DType::bf16, DType::bf16, 256, n, false});
  for (std::size_t block : {std::size_t(64), std::size_t(4096)})
    for (DType g : {DType::fp32, DType::fp16})
      cases.push_back({StatePrecision::int8, OptimizerKind::adamw, g, DType::fp32, block, 100003, true});
  unsigned seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(name_of(c.precision)) + " " + std::string(name_of(c.rule)) + " n=" +
                 std::to_string(c.n) + " block=" + std::to_string(c.block));
    const Images in = make_inputs(c, ++seed);
    const Images want = run(*cpu, c, in);
    const Images got = run(*gpu, c, in);
    EXPECT_EQ(got.master, want.master);
    EXPECT_EQ(got.s1, want.s1);
    EXPECT_EQ(got.s2.size(), want.s2.size());
    if (state_count(c.rule) == 2) {
      EXPECT_EQ(got.s2, want.s2);
    }
    EXPECT_EQ(got.sc1, want.sc1);
    if (state_count(c.rule) == 2) {
      EXPECT_EQ(got.sc2, want.sc2);
    }
    EXPECT_EQ(got.out, want.out);
    EXPECT_EQ(got.grad, want.grad);
  }
}

TEST(CompressedStateCuda, BadBlockSizeIsRefusedBeforeLaunch) {
  if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
  auto gpu = make_cuda_backend(0);
  auto stream = gpu->create_stream("s");
  CompressedUpdateArgs a;
  a.block_size = 96;
  a.n = 10;
  try {
    gpu->compressed_update(a, *stream);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("block_size = 96"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardopt
