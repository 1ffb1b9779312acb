// The CUDA backend and the NCCL communicator, checked against the CPU backend.
//
// Every kernel runs on both backends over the same random inputs (never zeros, so a kernel that
// writes nothing or zeros cannot pass), with outputs poisoned beforehand (all bits set: a NaN in
// every dtype), for sizes 0, 1, 7 and 2^20+3 and for aligned and unaligned starts (the unaligned
// ones force the CUDA update off its vector path). Element-wise results must match bit for bit:
// both backends run the same rules.hpp arithmetic without FMA contraction. Without a CUDA device
// every GPU test skips with a message saying so.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpu/gpu_required.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt {
namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr const char* kNoDevice =
    "no CUDA device on this machine: the CUDA backend tests need a GPU (compiled, not run)";

const std::vector<std::size_t>& sizes() {
  static const std::vector<std::size_t> s = {0, 1, 7, (std::size_t(1) << 20) + 3};
  return s;
}

// Random values of `t` in [lo, hi), each at least 0.05 from zero.
Bytes random_array(DType t, std::size_t n, std::uint32_t seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Bytes out(n * size_of(t));
  for (std::size_t i = 0; i < n; ++i) {
    float x = dist(rng);
    if (std::fabs(x) < 0.05f) x = x < 0.0f ? x - 0.05f : x + 0.05f;
    store_from_float(out.data(), t, i, x);
  }
  return out;
}

Bytes poison(std::size_t bytes) { return Bytes(bytes, 0xff); }

// The same bytes on the GPU and on the CPU backend, each `offset` bytes past a 64-byte aligned
// allocation (so a non-zero offset makes the start unaligned).
struct Mirror {
  Buffer g, c;
  void* gp = nullptr;
  void* cp = nullptr;
  std::size_t bytes = 0;
};

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) SHARDOPT_SKIP_OR_FAIL(kNoDevice);
    gpu = make_cuda_backend(0);
    cpu = make_cpu_backend();
    gs = gpu->create_stream("gpu-test");
    cs = cpu->create_stream("cpu-test");
  }

  Mirror mirror(const Bytes& init, std::size_t offset = 0) {
    Mirror m;
    m.bytes = init.size();
    const std::size_t alloc = init.size() + offset + 64;
    m.g = gpu->allocate(alloc, Place::device, Category::other, "test mirror (gpu)");
    m.c = cpu->allocate(alloc, Place::device, Category::other, "test mirror (cpu)");
    m.gp = static_cast<std::uint8_t*>(m.g.data()) + offset;
    m.cp = static_cast<std::uint8_t*>(m.c.data()) + offset;
    if (!init.empty()) {
      gpu->copy(m.gp, init.data(), init.size(), *gs);
      std::memcpy(m.cp, init.data(), init.size());
    }
    gpu->synchronize(*gs);
    return m;
  }

  Bytes download(const void* device_ptr, std::size_t bytes) {
    Bytes out(bytes);
    if (bytes > 0) gpu->copy(out.data(), device_ptr, bytes, *gs);
    gpu->synchronize(*gs);
    return out;
  }

  void sync_both() {
    gpu->synchronize(*gs);
    cpu->synchronize(*cs);
  }

  // GPU bytes equal CPU bytes; on a mismatch names the first differing element.
  void expect_same(const Mirror& m, DType t, const std::string& what) {
    const Bytes g = download(m.gp, m.bytes);
    if (m.bytes == 0 || std::memcmp(g.data(), m.cp, m.bytes) == 0) return;
    const std::size_t n = m.bytes / size_of(t);
    for (std::size_t i = 0; i < n; ++i) {
      if (std::memcmp(g.data() + i * size_of(t), static_cast<const std::uint8_t*>(m.cp) + i * size_of(t),
                      size_of(t)) != 0) {
        ADD_FAILURE() << what << ": element " << i << " of " << n << " differs: gpu "
                      << load_as_float(g.data(), t, i) << " cpu " << load_as_float(m.cp, t, i);
        return;
      }
    }
  }

  // Declared first, destroyed last: streams and buffers go before their backend.
  std::unique_ptr<Backend> gpu, cpu;
  std::unique_ptr<Stream> gs, cs;
};

constexpr DType kDtypes[] = {DType::fp32, DType::fp16, DType::bf16};

std::string trace(std::size_t n, std::size_t off) {
  return "n=" + std::to_string(n) + " offset=" + std::to_string(off);
}

// ---- availability (runs everywhere) --------------------------------------------------------

TEST(CudaAvailability, MakeCudaBackendReportsWhatIsMissing) {
  if (!cuda_device_available()) {
    try {
      (void)make_cuda_backend(0);
      FAIL() << "make_cuda_backend succeeded without a device";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::unsupported) << e.what();
      EXPECT_NE(e.message().find("no CUDA device"), std::string::npos) << e.what();
    }
    return;
  }
  try {
    (void)make_cuda_backend(1 << 20);
    FAIL() << "device 2^20 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
  }
}

// ---- memory, streams, events, host tasks ---------------------------------------------------

TEST_F(CudaBackendTest, AllocatesEveryPlaceAndAccountsIt) {
  for (Place p : {Place::device, Place::pinned_host, Place::host}) {
    SCOPED_TRACE(std::string(name_of(p)));
    const std::size_t before = gpu->memory().report().current_of(Category::gradients, p);
    {
      Buffer b = gpu->allocate(1000, p, Category::gradients, "test buffer");
      ASSERT_TRUE(b);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 64, 0u);
      EXPECT_GE(gpu->memory().report().current_of(Category::gradients, p), before + 1000);
      const Bytes data = random_array(DType::fp32, 250, 1);
      gpu->copy(b.data(), data.data(), 1000, *gs);
      EXPECT_EQ(download(b.data(), 1000), data);
    }
    EXPECT_EQ(gpu->memory().report().current_of(Category::gradients, p), before);
  }
}

TEST_F(CudaBackendTest, HugeAllocationIsOutOfMemoryNamingTheBuffer) {
  try {
    (void)gpu->allocate(std::size_t(1) << 50, Place::device, Category::parameters, "absurd buffer");
    FAIL() << "a petabyte was allocated";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_memory) << e.what();
    EXPECT_NE(std::string(e.what()).find("absurd buffer"), std::string::npos) << e.what();
  }
}

TEST_F(CudaBackendTest, HostTasksRunInStreamOrderAndErrorsSurfaceOnce) {
  Buffer pinned = gpu->allocate(4096, Place::pinned_host, Category::other, "pinned");
  Buffer dev = gpu->allocate(4096, Place::device, Category::other, "device");
  const Bytes data = random_array(DType::fp32, 1024, 2);
  std::memcpy(pinned.data(), data.data(), 4096);
  gpu->copy(dev.data(), pinned.data(), 4096, *gs);
  gpu->fill(pinned.data(), DType::fp32, 1024, 0.5f, *gs);  // the device writes pinned memory
  gpu->copy(pinned.data(), dev.data(), 4096, *gs);          // and gets the data back after it
  bool saw = false;
  gpu->host_task(*gs, [&] { saw = std::memcmp(pinned.data(), data.data(), 4096) == 0; });
  gpu->host_task(*gs, [] { throw Error(ErrorCode::io_error, "planned failure"); });
  try {
    gpu->synchronize(*gs);
    FAIL() << "the host task's error was not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io_error);
    EXPECT_EQ(e.message(), "planned failure");
  }
  EXPECT_TRUE(saw);
  EXPECT_NO_THROW(gpu->synchronize(*gs));  // reported once
}

TEST_F(CudaBackendTest, EventsOrderStreams) {
  auto other = gpu->create_stream("other");
  auto ev = gpu->create_event();
  EXPECT_NO_THROW(gpu->wait(*other, *ev));  // never recorded: no-op
  EXPECT_NO_THROW(gpu->synchronize(*ev));
  const std::size_t n = std::size_t(1) << 22;
  Buffer a = gpu->allocate(n * 4, Place::device, Category::other, "a");
  Buffer b = gpu->allocate(n * 4, Place::device, Category::other, "b");
  gpu->fill(a.data(), DType::fp32, n, 3.0f, *gs);
  gpu->record(*ev, *gs);
  gpu->wait(*other, *ev);
  gpu->copy(b.data(), a.data(), n * 4, *other);
  gpu->synchronize(*other);
  const Bytes out = download(b.data(), n * 4);
  for (std::size_t i = 0; i < n; i += 4099) ASSERT_EQ(load_as_float(out.data(), DType::fp32, i), 3.0f) << i;
  EXPECT_EQ(load_as_float(out.data(), DType::fp32, n - 1), 3.0f);
}

TEST_F(CudaBackendTest, RejectsStreamsOfOtherBackends) {
  Buffer a = gpu->allocate(64, Place::device, Category::other, "a");
  try {
    gpu->fill(a.data(), DType::fp32, 4, 1.0f, *cs);
    FAIL() << "a CPU stream was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("cpu-test"), std::string::npos) << e.what();
  }
}

// ---- kernels against the CPU backend ----------------------------------------------------------

TEST_F(CudaBackendTest, FillMatchesCpu) {
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), size_of(t)}) {
        SCOPED_TRACE(std::string(name_of(t)) + " " + trace(n, off));
        Mirror m = mirror(poison(n * size_of(t)), off);
        gpu->fill(m.gp, t, n, 0.3f, *gs);  // 0.3 is inexact in every dtype: checks the rounding
        cpu->fill(m.cp, t, n, 0.3f, *cs);
        sync_both();
        expect_same(m, t, "fill");
      }
}

TEST_F(CudaBackendTest, CastMatchesCpuForEveryPair) {
  std::uint32_t seed = 10;
  for (DType s : kDtypes)
    for (DType d : kDtypes)
      for (std::size_t n : sizes())
        for (std::size_t k : {std::size_t(0), std::size_t(1)}) {
          // Offsets of one element of each side's own type: a GPU cannot load an element that is
          // not aligned to its size (that is an Error, tested in MisalignedElementIsAnError).
          const std::size_t src_off = k * size_of(s), dst_off = k * size_of(d);
          SCOPED_TRACE(std::string(name_of(s)) + "->" + std::string(name_of(d)) + " " + trace(n, src_off) +
                       " dst offset " + std::to_string(dst_off));
          Mirror src = mirror(random_array(s, n, ++seed, -70000.0f, 70000.0f), src_off);  // overflows fp16
          Mirror dst = mirror(poison(n * size_of(d)), dst_off);
          gpu->cast(src.gp, s, dst.gp, d, n, *gs);
          cpu->cast(src.cp, s, dst.cp, d, n, *cs);
          sync_both();
          expect_same(dst, d, "cast");
          expect_same(src, s, "cast source untouched");
        }
}

// An element not aligned to its size would fault on the device (cudaErrorMisalignedAddress, which
// poisons the context for every later test): the backend refuses it first with an Error, as the
// CPU backend does, and the context stays usable.
TEST_F(CudaBackendTest, MisalignedElementIsAnError) {
  Mirror buf = mirror(poison(64 * 4));
  Mirror f = mirror(random_array(DType::fp32, 16, 3));
  auto* odd = static_cast<std::uint8_t*>(buf.gp) + 2;  // 2 mod 4: misaligned for fp32 only
  const auto refused = [&](const char* what, auto&& call) {
    try {
      call();
      ADD_FAILURE() << what << ": a misaligned pointer was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << what << ": " << e.what();
      EXPECT_NE(e.message().find("element size"), std::string::npos) << e.what();
    }
  };
  auto* fl = static_cast<float*>(f.gp);
  refused("fill", [&] { gpu->fill(odd, DType::fp32, 8, 1.0f, *gs); });
  refused("fill bf16 at 1", [&] { gpu->fill(odd - 1, DType::bf16, 8, 1.0f, *gs); });
  refused("cast src", [&] { gpu->cast(odd, DType::fp32, fl, DType::bf16, 8, *gs); });
  refused("cast dst", [&] { gpu->cast(fl, DType::bf16, odd, DType::fp32, 8, *gs); });
  refused("accumulate", [&] { gpu->accumulate(fl, DType::fp32, reinterpret_cast<float*>(odd), 8, *gs); });
  UpdateArgs a;
  a.master = reinterpret_cast<float*>(odd);
  a.state1 = fl;
  a.state2 = fl + 4;
  a.grad = fl + 8;
  a.n = 4;
  refused("fused_update", [&] { gpu->fused_update(a, *gs); });
  gpu->synchronize(*gs);  // no sticky error
  EXPECT_EQ(download(buf.gp, buf.bytes), poison(buf.bytes)) << "a refused call wrote memory";
  gpu->fill(odd + 2, DType::fp32, 8, 0.25f, *gs);  // element-aligned: fine
  const Bytes back = download(odd + 2, 32);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(load_as_float(back.data(), DType::fp32, i), 0.25f);
}

TEST_F(CudaBackendTest, UnscaleCheckMatchesCpu) {
  std::uint32_t seed = 100;
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), size_of(t)}) {
        SCOPED_TRACE(std::string(name_of(t)) + " " + trace(n, off));
        Bytes scale(4), flag(4);
        store_from_float(scale.data(), DType::fp32, 0, 0.37f);
        store_from_float(flag.data(), DType::fp32, 0, 0.0f);
        Mirror data = mirror(random_array(t, n, ++seed), off);
        Mirror s = mirror(scale), f = mirror(flag);
        gpu->unscale_check(data.gp, t, n, static_cast<const float*>(s.gp), static_cast<float*>(f.gp), *gs);
        cpu->unscale_check(data.cp, t, n, static_cast<const float*>(s.cp), static_cast<float*>(f.cp), *cs);
        sync_both();
        expect_same(data, t, "unscaled data");
        expect_same(f, DType::fp32, "found_nonfinite");
        EXPECT_EQ(load_as_float(download(f.gp, 4).data(), DType::fp32, 0), 0.0f);
      }
}

TEST_F(CudaBackendTest, UnscaleCheckFindsNonFinite) {
  for (DType t : kDtypes) {
    SCOPED_TRACE(std::string(name_of(t)));
    const std::size_t n = 100003;
    Bytes init = random_array(t, n, 7);
    Bytes scale(4), flag(4);
    store_from_float(scale.data(), DType::fp32, 0, 2.0f);
    store_from_float(flag.data(), DType::fp32, 0, 0.0f);
    Mirror s = mirror(scale);
    {  // one infinity in the input
      Bytes bad = init;
      store_from_float(bad.data(), t, n - 5, INFINITY);
      Mirror data = mirror(bad), f = mirror(flag);
      gpu->unscale_check(data.gp, t, n, static_cast<const float*>(s.gp), static_cast<float*>(f.gp), *gs);
      EXPECT_EQ(load_as_float(download(f.gp, 4).data(), DType::fp32, 0), 1.0f);
    }
    if (t == DType::fp16) {  // finite input whose scaled value overflows fp16 when stored
      Bytes big = init;
      store_from_float(big.data(), t, 17, 60000.0f);
      Mirror data = mirror(big), f = mirror(flag);
      gpu->unscale_check(data.gp, t, n, static_cast<const float*>(s.gp), static_cast<float*>(f.gp), *gs);
      EXPECT_EQ(load_as_float(download(f.gp, 4).data(), DType::fp32, 0), 1.0f);
    }
  }
}

TEST_F(CudaBackendTest, AccumulateMatchesCpu) {
  std::uint32_t seed = 200;
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), std::size_t(4)}) {
        SCOPED_TRACE(std::string(name_of(t)) + " " + trace(n, off));
        Mirror src = mirror(random_array(t, n, ++seed), off);
        Mirror dst = mirror(random_array(DType::fp32, n, ++seed), off);
        gpu->accumulate(src.gp, t, static_cast<float*>(dst.gp), n, *gs);
        cpu->accumulate(src.cp, t, static_cast<float*>(dst.cp), n, *cs);
        sync_both();
        expect_same(dst, DType::fp32, "accumulate");
      }
}

TEST_F(CudaBackendTest, SumSquaresMatchesCpuAndIsDeterministic) {
  std::uint32_t seed = 300;
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), size_of(t)}) {
        SCOPED_TRACE(std::string(name_of(t)) + " " + trace(n, off));
        Mirror data = mirror(random_array(t, n, ++seed), off);
        Mirror out = mirror(poison(4));
        gpu->sum_squares(data.gp, t, n, static_cast<float*>(out.gp), *gs);
        cpu->sum_squares(data.cp, t, n, static_cast<float*>(out.cp), *cs);
        sync_both();
        const Bytes first = download(out.gp, 4);
        const float g = load_as_float(first.data(), DType::fp32, 0);
        const float c = load_as_float(out.cp, DType::fp32, 0);
        // Both accumulate in double, in different orders: they may differ in float's last bit.
        EXPECT_NEAR(g, c, 1e-6 * std::fabs(c)) << "gpu " << g << " cpu " << c;
        if (n == 0) {
          EXPECT_EQ(g, 0.0f);
        }
        gpu->sum_squares(data.gp, t, n, static_cast<float*>(out.gp), *gs);
        EXPECT_EQ(download(out.gp, 4), first) << "two runs differ";
      }
}

// Fused update: every rule x grad dtype x param dtype (or none) x size x alignment, bit-identical
// to the CPU backend, with the scale read from device memory.
TEST_F(CudaBackendTest, FusedUpdateIsBitIdenticalToCpu) {
  Hyperparams h;
  h.lr = 1e-2f;
  h.weight_decay = 0.01f;
  h.nesterov = true;
  std::uint32_t seed = 1000;
  Bytes scale(4);
  store_from_float(scale.data(), DType::fp32, 0, 0.5f);
  Mirror scale_m = mirror(scale);
  const DType params[] = {DType::fp32, DType::fp16, DType::bf16, DType::fp32};  // last: no param_out
  for (OptimizerKind rule : {OptimizerKind::adamw, OptimizerKind::adam, OptimizerKind::sgd, OptimizerKind::lion})
    for (DType gt : kDtypes)
      for (int pi = 0; pi < 4; ++pi)
        for (std::size_t n : sizes())
          for (bool unaligned : {false, true}) {
            const DType pt = params[pi];
            const bool has_out = pi < 3;
            SCOPED_TRACE(std::string(name_of(rule)) + " grad " + std::string(name_of(gt)) + " param " +
                         (has_out ? std::string(name_of(pt)) : std::string("none")) + " n=" + std::to_string(n) +
                         (unaligned ? " unaligned" : " aligned"));
            // Different misalignments per array: the CUDA kernel must take its scalar path.
            const std::size_t o = unaligned ? 1 : 0;
            Mirror master = mirror(random_array(DType::fp32, n, ++seed), 4 * o);
            Mirror s1 = mirror(random_array(DType::fp32, n, ++seed, -0.1f, 0.1f), 8 * o);
            Mirror s2 = mirror(random_array(DType::fp32, n, ++seed, 0.001f, 0.5f), 12 * o);  // v >= 0
            Mirror grad = mirror(random_array(gt, n, ++seed), size_of(gt) * o);
            Mirror out = mirror(poison(n * size_of(pt)), 2 * size_of(pt) * o);
            UpdateArgs a;
            a.rule = rule;
            a.scalars = make_step_scalars(rule, h, 3, 0.7f);
            a.grad_dtype = gt;
            a.param_dtype = pt;
            a.n = n;
            UpdateArgs g = a, c = a;
            g.master = static_cast<float*>(master.gp), c.master = static_cast<float*>(master.cp);
            g.state1 = static_cast<float*>(s1.gp), c.state1 = static_cast<float*>(s1.cp);
            g.state2 = static_cast<float*>(s2.gp), c.state2 = static_cast<float*>(s2.cp);
            g.grad = grad.gp, c.grad = grad.cp;
            g.param_out = has_out ? out.gp : nullptr, c.param_out = has_out ? out.cp : nullptr;
            g.scale_ptr = static_cast<const float*>(scale_m.gp), c.scale_ptr = static_cast<const float*>(scale_m.cp);
            gpu->fused_update(g, *gs);
            cpu->fused_update(c, *cs);
            sync_both();
            expect_same(master, DType::fp32, "master");
            expect_same(s1, DType::fp32, "state1");
            expect_same(s2, DType::fp32, "state2");
            if (has_out) expect_same(out, pt, "param_out");
            if (HasFailure()) return;  // one clear failure, not hundreds
          }
}

TEST_F(CudaBackendTest, FusedUpdateSkipsOnDeviceFlagAndHandlesInPlaceFp32) {
  const std::size_t n = 4099;
  const Hyperparams h;
  Bytes flag(4);
  store_from_float(flag.data(), DType::fp32, 0, 1.0f);
  Mirror skip = mirror(flag);
  const Bytes init = random_array(DType::fp32, n, 5);
  Mirror master = mirror(init);
  Mirror s1 = mirror(random_array(DType::fp32, n, 6));
  Mirror s2 = mirror(random_array(DType::fp32, n, 7, 0.01f, 1.0f));
  Mirror grad = mirror(random_array(DType::bf16, n, 8));
  UpdateArgs a;
  a.scalars = make_step_scalars(OptimizerKind::adamw, h, 1, 1.0f);
  a.master = static_cast<float*>(master.gp);
  a.state1 = static_cast<float*>(s1.gp);
  a.state2 = static_cast<float*>(s2.gp);
  a.grad = grad.gp;
  a.grad_dtype = DType::bf16;
  a.n = n;
  a.skip_ptr = static_cast<const float*>(skip.gp);
  gpu->fused_update(a, *gs);
  EXPECT_EQ(download(master.gp, n * 4), init) << "skipped update wrote master";

  // In place: param_out is master itself (fp32), nothing else to store; same result as the CPU.
  UpdateArgs g = a, c = a;
  g.skip_ptr = nullptr;
  g.param_out = g.master;
  c.master = static_cast<float*>(master.cp), c.state1 = static_cast<float*>(s1.cp);
  c.state2 = static_cast<float*>(s2.cp), c.grad = grad.cp, c.param_out = c.master, c.skip_ptr = nullptr;
  gpu->fused_update(g, *gs);
  cpu->fused_update(c, *cs);
  sync_both();
  expect_same(master, DType::fp32, "in-place master");
  EXPECT_NE(download(master.gp, n * 4), init);

  g.param_dtype = DType::bf16;  // a 16-bit param_out may not alias master
  EXPECT_THROW(gpu->fused_update(g, *gs), Error);
}

// ---- step control: the step's decisions on the device, bit for bit ---------------------------

// A run of steps with random totals (finite, flagged, infinite, NaN) through step_totals and
// step_control on both backends, a dynamic loss scaler and clipping; after every step the state
// and the scalars of both groups must have the same bits, and an update fed by pointer must too.
TEST_F(CudaBackendTest, StepControlMatchesCpuBitForBit) {
  constexpr std::size_t kState = 0, kHyper = 256, kScalars = 512, kFloats = 1024;
  constexpr int kParts = 37, kGroups = 2;
  Bytes block(4096, 0);
  StepState init;
  init.loss_scale = 1024.0f;
  std::memcpy(block.data() + kState, &init, sizeof init);
  Hyperparams hyper[kGroups];
  hyper[1].beta1 = 0.8f, hyper[1].beta2 = 0.95f, hyper[1].lr = 3e-3f, hyper[1].weight_decay = 0.0f;
  std::memcpy(block.data() + kHyper, hyper, sizeof hyper);
  Mirror ctl = mirror(block);
  const std::size_t n = 5003;
  Mirror master = mirror(random_array(DType::fp32, n, 21));
  Mirror s1 = mirror(random_array(DType::fp32, n, 22, -0.01f, 0.01f));
  Mirror s2 = mirror(random_array(DType::fp32, n, 23, 0.0f, 1e-4f));
  Mirror grad = mirror(random_array(DType::fp16, n, 24, -64.0f, 64.0f));
  Mirror out = mirror(poison(n * 2));
  const auto at = [](const Mirror& m, bool on_gpu, std::size_t off) {
    return static_cast<std::uint8_t*>(on_gpu ? m.gp : m.cp) + off;
  };

  std::mt19937 rng(77);
  int skipped = 0;
  for (int step = 0; step < 200; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const int kind = static_cast<int>(rng() % 10);
    Bytes floats(4 * (3 + kParts));
    store_from_float(floats.data(), DType::fp32, 0, kind == 7 ? 1.0f : 0.0f);
    for (int k = 0; k < kParts; ++k) {
      const float v = kind == 8 && k == 3 ? INFINITY : kind == 9 && k == 5 ? NAN
                                                     : std::ldexp(static_cast<float>(rng() % 1000 + 1), static_cast<int>(rng() % 20));
      store_from_float(floats.data(), DType::fp32, 3 + k, v);
    }
    skipped += kind >= 7;
    for (bool on_gpu : {true, false}) {
      Backend& be = on_gpu ? *gpu : *cpu;
      Stream& st = on_gpu ? *gs : *cs;
      auto* fl = reinterpret_cast<float*>(at(ctl, on_gpu, kFloats));
      be.copy(fl, floats.data(), floats.size(), st);
      be.step_totals(fl + 3, kParts, fl, fl + 1, st);
      StepControlArgs a;
      a.rule = OptimizerKind::adamw;
      a.totals = fl + 1;
      a.state = reinterpret_cast<StepState*>(at(ctl, on_gpu, kState));
      a.hyper = reinterpret_cast<const Hyperparams*>(at(ctl, on_gpu, kHyper));
      a.scalars = reinterpret_cast<StepScalars*>(at(ctl, on_gpu, kScalars));
      a.groups = kGroups;
      a.accumulation_steps = 3;
      a.max_grad_norm = 40.0f;
      a.loss_scaling.mode = LossScaleMode::dynamic;
      a.loss_scaling.growth_interval = 4;
      a.loss_scaling.hysteresis = 2;
      be.step_control(a, st);
      UpdateArgs u;
      u.rule = OptimizerKind::adamw;
      u.scalars_ptr = a.scalars + (step % kGroups);
      u.skip_ptr = &a.state->skip;
      u.master = reinterpret_cast<float*>(at(master, on_gpu, 0));
      u.state1 = reinterpret_cast<float*>(at(s1, on_gpu, 0));
      u.state2 = reinterpret_cast<float*>(at(s2, on_gpu, 0));
      u.grad = at(grad, on_gpu, 0);
      u.grad_dtype = DType::fp16;
      u.param_out = at(out, on_gpu, 0);
      u.param_dtype = DType::bf16;
      u.n = n;
      be.fused_update(u, st);
    }
    sync_both();
    const Bytes g = download(ctl.gp, 4096);
    StepState gs_state, cs_state;
    std::memcpy(&gs_state, g.data() + kState, sizeof gs_state);
    std::memcpy(&cs_state, at(ctl, false, kState), sizeof cs_state);
    EXPECT_EQ(gs_state.step, cs_state.step);
    EXPECT_EQ(std::memcmp(&gs_state.grad_norm, &cs_state.grad_norm, 8), 0) << gs_state.grad_norm << " vs " << cs_state.grad_norm;
    EXPECT_EQ(gs_state.loss_scale, cs_state.loss_scale);
    EXPECT_EQ(std::memcmp(&gs_state.clip_coefficient, &cs_state.clip_coefficient, 4), 0);
    EXPECT_EQ(gs_state.good_steps, cs_state.good_steps);
    EXPECT_EQ(gs_state.overflow_run, cs_state.overflow_run);
    EXPECT_EQ(gs_state.skip, cs_state.skip);
    EXPECT_EQ(gs_state.applied, cs_state.applied);
    EXPECT_EQ(std::memcmp(g.data() + kFloats, at(ctl, false, kFloats), 12), 0) << "flag and totals";
    for (int k = 0; k < kGroups; ++k) {
      StepScalars a, b;
      std::memcpy(&a, g.data() + kScalars + k * sizeof(StepScalars), sizeof a);
      std::memcpy(&b, at(ctl, false, kScalars + k * sizeof(StepScalars)), sizeof b);
      if (cs_state.step == 0) continue;  // nothing applied yet: never written
      EXPECT_EQ(a.grad_scale, b.grad_scale) << "group " << k;
      EXPECT_EQ(a.bias_correction1, b.bias_correction1) << "group " << k;
      EXPECT_EQ(a.bias_correction2_sqrt, b.bias_correction2_sqrt) << "group " << k;
      EXPECT_EQ(a.one_minus_beta1, b.one_minus_beta1) << "group " << k;
      EXPECT_EQ(a.one_minus_beta2, b.one_minus_beta2) << "group " << k;
    }
    expect_same(master, DType::fp32, "master");
    expect_same(out, DType::bf16, "param_out");
    if (::testing::Test::HasFailure()) return;  // one step's report is enough
  }
  EXPECT_GT(skipped, 30);
}

// ---- reduce: the arithmetic of the host communicators, bit for bit --------------------------

constexpr ReduceOp kReduceOps[] = {ReduceOp::sum, ReduceOp::avg, ReduceOp::max};

std::string reduce_trace(DType t, ReduceOp op, int nsrc, std::size_t n, std::size_t off) {
  static const char* const kOpNames[] = {"sum", "avg", "max"};
  return std::string(name_of(t)) + " " + kOpNames[static_cast<int>(op)] + " nsrc=" + std::to_string(nsrc) + " " +
         trace(n, off);
}

// Runs the same reduce on both backends. The pointer arrays are scrubbed right after each call
// and before any synchronize: the backends must have taken copies.
void reduce_both(Backend& gpu, Stream& gs, Backend& cpu, Stream& cs, const std::vector<Mirror*>& srcs,
                 const std::vector<Mirror*>& dsts, std::size_t n, DType t, ReduceOp op) {
  const int nsrc = static_cast<int>(srcs.size()), ndst = static_cast<int>(dsts.size());
  std::vector<const void*> g_in, c_in;
  std::vector<void*> g_out, c_out;
  for (const Mirror* m : srcs) g_in.push_back(m->gp), c_in.push_back(m->cp);
  for (const Mirror* m : dsts) g_out.push_back(m->gp), c_out.push_back(m->cp);
  gpu.reduce(g_in.data(), nsrc, g_out.data(), ndst, n, t, op, gs);
  cpu.reduce(c_in.data(), nsrc, c_out.data(), ndst, n, t, op, cs);
  std::fill(g_in.begin(), g_in.end(), nullptr);
  std::fill(g_out.begin(), g_out.end(), nullptr);
  std::fill(c_in.begin(), c_in.end(), nullptr);
  std::fill(c_out.begin(), c_out.end(), nullptr);
}

TEST_F(CudaBackendTest, ReduceMatchesCpu) {
  std::uint32_t seed = 2000;
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), size_of(t)})
        for (int nsrc : {1, 3, 8}) {
          std::vector<Mirror> srcs;
          std::vector<Bytes> inputs;
          for (int q = 0; q < nsrc; ++q) {
            inputs.push_back(random_array(t, n, ++seed));
            // A different misalignment per source (the kernel must not assume any).
            srcs.push_back(mirror(inputs.back(), off * static_cast<std::size_t>(q % 3)));
          }
          std::vector<Mirror*> sp;
          for (Mirror& m : srcs) sp.push_back(&m);
          for (ReduceOp op : kReduceOps) {
            SCOPED_TRACE(reduce_trace(t, op, nsrc, n, off));
            Mirror d0 = mirror(poison(n * size_of(t)), off), d1 = mirror(poison(n * size_of(t)));
            reduce_both(*gpu, *gs, *cpu, *cs, sp, {&d0, &d1}, n, t, op);
            sync_both();
            expect_same(d0, t, "destination 0");
            expect_same(d1, t, "destination 1");
            for (int q = 0; q < nsrc; ++q)
              EXPECT_EQ(download(srcs[static_cast<std::size_t>(q)].gp, inputs[static_cast<std::size_t>(q)].size()),
                        inputs[static_cast<std::size_t>(q)])
                  << "source " << q << " was modified";
            if (HasFailure()) return;  // one clear failure, not hundreds
          }
        }
}

TEST_F(CudaBackendTest, ReduceInPlaceMatchesCpu) {
  std::uint32_t seed = 3000;
  for (DType t : kDtypes)
    for (std::size_t n : sizes())
      for (std::size_t off : {std::size_t(0), size_of(t)})
        for (int nsrc : {1, 3, 8}) {
          std::vector<Bytes> inputs;
          for (int q = 0; q < nsrc; ++q) inputs.push_back(random_array(t, n, ++seed));
          for (ReduceOp op : kReduceOps)
            for (bool all : {false, true}) {
              // all: destination q is source q (as all-reduce does); else the middle source is
              // the only destination besides a separate one.
              SCOPED_TRACE(reduce_trace(t, op, nsrc, n, off) + (all ? " every source in place" : " one in place"));
              std::vector<Mirror> srcs;
              for (const Bytes& in : inputs) srcs.push_back(mirror(in, off));
              Mirror extra = mirror(poison(n * size_of(t)), off);
              std::vector<Mirror*> sp, dp;
              for (Mirror& m : srcs) sp.push_back(&m);
              if (all)
                dp = sp;
              else
                dp = {&srcs[static_cast<std::size_t>(nsrc / 2)], &extra};
              reduce_both(*gpu, *gs, *cpu, *cs, sp, dp, n, t, op);
              sync_both();
              for (std::size_t d = 0; d < dp.size(); ++d) expect_same(*dp[d], t, "destination " + std::to_string(d));
              if (HasFailure()) return;
            }
        }
}

TEST_F(CudaBackendTest, ReduceMaxPropagatesNaNLikeCpu) {
  const std::size_t n = 100003;
  for (DType t : kDtypes) {
    SCOPED_TRACE(std::string(name_of(t)));
    std::vector<Bytes> inputs;
    for (int q = 0; q < 3; ++q) inputs.push_back(random_array(t, n, 4000 + static_cast<std::uint32_t>(q)));
    for (std::size_t i = 0; i < n; i += 5) store_from_float(inputs[0].data(), t, i, NAN);   // NaN accumulator
    for (std::size_t i = 0; i < n; i += 7) store_from_float(inputs[2].data(), t, i, -NAN);  // NaN operand
    for (std::size_t i = 0; i < n; i += 5) store_from_float(inputs[1].data(), t, i, 1000.0f);
    std::vector<Mirror> srcs;
    for (const Bytes& b : inputs) srcs.push_back(mirror(b));
    Mirror dst = mirror(poison(n * size_of(t)));
    reduce_both(*gpu, *gs, *cpu, *cs, {&srcs[0], &srcs[1], &srcs[2]}, {&dst}, n, t, ReduceOp::max);
    sync_both();
    expect_same(dst, t, "max with NaNs");
    const Bytes got = download(dst.gp, n * size_of(t));
    EXPECT_TRUE(std::isnan(load_as_float(got.data(), t, 0)));
    EXPECT_TRUE(std::isnan(load_as_float(got.data(), t, 7)));
  }
}

TEST_F(CudaBackendTest, ReduceRejectsBadArgumentsLikeCpu) {
  Mirror a = mirror(random_array(DType::fp32, 4, 1)), d = mirror(poison(16));
  std::vector<const void*> in(Backend::kMaxReduceOperands + 1, a.gp);
  std::vector<void*> out(Backend::kMaxReduceOperands + 1, d.gp);
  const auto expect_invalid = [&](const char* word, int nsrc, int ndst, std::size_t n) {
    try {
      gpu->reduce(in.data(), nsrc, out.data(), ndst, n, DType::fp32, ReduceOp::sum, *gs);
      ADD_FAILURE() << word << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
      EXPECT_NE(e.message().find(word), std::string::npos) << e.what();
    }
  };
  expect_invalid("nsrc", 0, 1, 4);
  expect_invalid("nsrc", Backend::kMaxReduceOperands + 1, 1, 4);
  expect_invalid("ndst", 1, 0, 4);
  expect_invalid("ndst", 1, Backend::kMaxReduceOperands + 1, 4);
  in[1] = nullptr;
  expect_invalid("srcs[1]", 2, 1, 4);
  gpu->reduce(in.data(), 2, out.data(), 1, 0, DType::fp32, ReduceOp::sum, *gs);  // n == 0: nothing
  in[1] = a.gp;
  out[0] = static_cast<std::uint8_t*>(a.gp) + 4;  // inside source 0 without being it
  expect_invalid("overlaps", 2, 1, 3);
  out[0] = nullptr;
  expect_invalid("dsts[0]", 2, 1, 4);
  gpu->synchronize(*gs);
  EXPECT_EQ(download(d.gp, 16), poison(16));
}

// ---- NCCL, world size 1 ----------------------------------------------------------------------

TEST_F(CudaBackendTest, NcclWorldOfOneRunsEveryCollective) {
  std::unique_ptr<Communicator> comm;
  try {
    comm = make_nccl_communicator(nccl_unique_id(), 0, 1, *gpu);
  } catch (const Error& e) {
    if (e.code() == ErrorCode::unsupported) SHARDOPT_SKIP_OR_FAIL(e.what());
    throw;
  }
  ASSERT_EQ(comm->rank(), 0);
  ASSERT_EQ(comm->size(), 1);
  std::uint32_t seed = 500;
  for (DType t : kDtypes)
    for (std::size_t n : sizes()) {
      SCOPED_TRACE(std::string(name_of(t)) + " n=" + std::to_string(n));
      const Bytes in = random_array(t, n, ++seed);
      const std::size_t bytes = in.size();
      Mirror send = mirror(in);
      // With one rank every collective is the identity (avg divides by 1, fp32 accumulation of
      // one 16-bit value rounds back to itself).
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
        Mirror recv = mirror(poison(bytes));
        comm->all_reduce(send.gp, recv.gp, n, t, op, *gs);
        EXPECT_EQ(download(recv.gp, bytes), in) << "all_reduce op " << static_cast<int>(op);
        Mirror rs = mirror(poison(bytes));
        comm->reduce_scatter(send.gp, rs.gp, n, t, op, *gs);
        EXPECT_EQ(download(rs.gp, bytes), in) << "reduce_scatter op " << static_cast<int>(op);
      }
      Mirror ag = mirror(poison(bytes));
      comm->all_gather(send.gp, ag.gp, n, t, *gs);
      EXPECT_EQ(download(ag.gp, bytes), in) << "all_gather";
      Mirror bc = mirror(poison(bytes));
      comm->broadcast(send.gp, bc.gp, n, t, 0, *gs);
      EXPECT_EQ(download(bc.gp, bytes), in) << "broadcast";
      Mirror inplace = mirror(in);
      comm->all_reduce(inplace.gp, inplace.gp, n, t, ReduceOp::avg, *gs);
      EXPECT_EQ(download(inplace.gp, bytes), in) << "in-place all_reduce";
    }
  comm->barrier(*gs);
  gpu->synchronize(*gs);
  const CommStats st = comm->stats();
  const auto k = [](CollectiveKind c) { return static_cast<int>(c); };
  const std::uint64_t per = 3 * sizes().size();  // dtypes x sizes
  EXPECT_EQ(st.calls[k(CollectiveKind::all_reduce)], per * 4);
  EXPECT_EQ(st.calls[k(CollectiveKind::reduce_scatter)], per * 3);
  EXPECT_EQ(st.calls[k(CollectiveKind::all_gather)], per);
  EXPECT_EQ(st.calls[k(CollectiveKind::broadcast)], per);
  EXPECT_EQ(st.calls[k(CollectiveKind::barrier)], 1u);
  EXPECT_THROW(comm->broadcast(nullptr, nullptr, 0, DType::fp32, 1, *gs), Error);
}

// A rank whose peers never join does not hang: the group's formation times out into an Error.
// World 2 with only rank 0 created (one GPU is enough: rank 1 never starts).
TEST_F(CudaBackendTest, NcclGroupThatNeverFormsIsAnErrorNotAHang) {
  NcclUniqueId id;
  try {
    id = nccl_unique_id();
  } catch (const Error& e) {
    if (e.code() == ErrorCode::unsupported) SHARDOPT_SKIP_OR_FAIL(e.what());
    throw;
  }
  ::setenv("SHARDOPT_NCCL_TIMEOUT", "3", 1);
  const auto start = std::chrono::steady_clock::now();
  try {
    auto comm = make_nccl_communicator(id, 0, 2, *gpu);
    ADD_FAILURE() << "a group of 2 formed with one rank";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication) << e.what();
    EXPECT_NE(e.message().find("did not form"), std::string::npos) << e.what();
  }
  ::unsetenv("SHARDOPT_NCCL_TIMEOUT");
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(waited, 30.0) << "the timeout was 3 s";
  // The device is still usable.
  Mirror after = mirror(poison(16));
  gpu->fill(after.gp, DType::fp32, 4, 1.0f, *gs);
  EXPECT_EQ(load_as_float(download(after.gp, 16).data(), DType::fp32, 3), 1.0f);
}

// The fp32 scratch of 16-bit NCCL reductions never grows inside a capture (no allocation or host
// wait is possible there) and never moves once a captured graph uses it: an Error each time;
// reserve() sizes it beforehand.
TEST_F(CudaBackendTest, NcclScratchIsReservedNeverGrownInACapture) {
  std::unique_ptr<Communicator> comm;
  try {
    comm = make_nccl_communicator(nccl_unique_id(), 0, 1, *gpu);
  } catch (const Error& e) {
    if (e.code() == ErrorCode::unsupported) SHARDOPT_SKIP_OR_FAIL(e.what());
    throw;
  }
  const std::size_t n = 3000;
  const Bytes in = random_array(DType::bf16, n, 77);
  Mirror send = mirror(in), recv = mirror(poison(in.size()));
  auto handle = static_cast<cudaStream_t>(cuda_stream_handle(*gs));
  const auto capture = [&](bool expect_refused) -> cudaGraph_t {
    EXPECT_EQ(cudaStreamBeginCapture(handle, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    try {
      comm->all_reduce(send.gp, recv.gp, n, DType::bf16, ReduceOp::avg, *gs);
      if (expect_refused) ADD_FAILURE() << "the scratch grew inside a capture";
    } catch (const Error& e) {
      if (!expect_refused) ADD_FAILURE() << e.what();
      EXPECT_EQ(e.code(), ErrorCode::invalid_state) << e.what();
    }
    cudaGraph_t g = nullptr;
    EXPECT_EQ(cudaStreamEndCapture(handle, &g), cudaSuccess);
    return g;
  };
  if (cudaGraph_t g = capture(true)) cudaGraphDestroy(g);
  comm->reserve(n, DType::bf16);
  cudaGraph_t g = capture(false);
  ASSERT_NE(g, nullptr);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
  EXPECT_EQ(cudaGraphLaunch(exec, handle), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(handle), cudaSuccess);
  EXPECT_EQ(download(recv.gp, in.size()), in) << "world 1: the average is the input";
  // The graph holds the scratch's address: it cannot move any more, not even outside a capture.
  // (The scratch grows in granules of 2^20 elements: a larger count than any one of those, since a
  // count that still fits what was reserved needs no move and is rightly accepted.)
  EXPECT_NO_THROW(comm->reserve(4 * n, DType::bf16));
  EXPECT_THROW(comm->reserve(std::size_t(1) << 22, DType::bf16), Error);
  comm->all_reduce(send.gp, recv.gp, n, DType::bf16, ReduceOp::avg, *gs);  // fits: fine eagerly
  gpu->synchronize(*gs);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
}

}  // namespace
}  // namespace shardopt
