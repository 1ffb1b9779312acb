// Pinned host memory that cannot be had. The CPU backend's pinned memory is ordinary memory unless
// CpuBackendOptions::lock_pinned, which locks it with mlock so that RLIMIT_MEMLOCK applies as it
// does to a GPU driver's pinned pages. Under a lowered limit (and without CAP_IPC_LOCK, which
// lifts it: this process drops it for itself) initialize() must fail with an Error naming the
// buffer, the size and the limit, leaving nothing allocated; with Config::pinned_fallback it must
// use pageable host memory instead, say so in memory_report(), and train to the same bits.
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "engine_harness.hpp"
#include "sanitized.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

// CAP_IPC_LOCK in or out of the calling thread's effective set (threads it creates inherit it).
bool set_ipc_lock(bool on) {
  __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct d[2]{};
  if (::syscall(SYS_capget, &h, d) != 0) return false;
  const unsigned bit = 1u << CAP_IPC_LOCK;
  if (on && !(d[0].permitted & bit)) return false;
  d[0].effective = on ? (d[0].effective | bit) : (d[0].effective & ~bit);
  return ::syscall(SYS_capset, &h, d) == 0;
}

bool has_ipc_lock() {
  __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct d[2]{};
  return ::syscall(SYS_capget, &h, d) == 0 && (d[0].effective & (1u << CAP_IPC_LOCK));
}

// The soft RLIMIT_MEMLOCK lowered for the test's lifetime.
struct LoweredMemlock {
  rlimit old{};
  bool ok = false;
  explicit LoweredMemlock(std::size_t bytes) {
    if (::getrlimit(RLIMIT_MEMLOCK, &old) != 0) return;
    rlimit rl = old;
    rl.rlim_cur = bytes;
    ok = ::setrlimit(RLIMIT_MEMLOCK, &rl) == 0;
  }
  ~LoweredMemlock() {
    if (ok) (void)::setrlimit(RLIMIT_MEMLOCK, &old);
  }
};

constexpr std::size_t kLimit = 64 * 1024;

// About 30k parameters: each fp32 field of the offloaded state alone is above kLimit.
std::vector<BlockSpec> model() {
  auto m = awkward_model();
  m.push_back({"wide", {{"wide.w", {160, 128}, 0}, {"wide.b", {160}, 1}}});
  return m;
}

RunSpec offload_spec(int stage, int world) {
  RunSpec spec;
  spec.world = world;
  spec.steps = 6;
  spec.model = model();
  spec.cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
  spec.cfg.offload_optimizer = OffloadKind::host;
  spec.group1 = no_decay(spec.cfg);
  spec.lock_pinned = true;
  return spec;
}

std::size_t pinned_bytes(const MemoryPlan& plan) {
  std::size_t n = 0;
  for (const auto& b : plan.buffers)
    if (b.place == Place::pinned_host) n += b.bytes;
  return n;
}

std::size_t largest_pinned(const MemoryPlan& plan, std::string* name) {
  std::size_t n = 0;
  for (const auto& b : plan.buffers)
    if (b.place == Place::pinned_host && b.bytes > n) n = b.bytes, *name = b.name;
  return n;
}

class Pinned : public ::testing::Test {
 protected:
  void SetUp() override {
    had_ipc_lock_ = has_ipc_lock();
    ASSERT_TRUE(!had_ipc_lock_ || set_ipc_lock(false)) << "cannot drop CAP_IPC_LOCK";
  }
  void TearDown() override {
    if (had_ipc_lock_) set_ipc_lock(true);
  }
  bool had_ipc_lock_ = false;
};

// The plan's pinned bytes are above the limit: refused before anything is allocated, naming the
// largest pinned buffer, the plan's pinned total and the limit.
TEST_F(Pinned, PlanAboveTheLimitIsAnErrorAtInitialize) {
  LoweredMemlock limit(kLimit);
  ASSERT_TRUE(limit.ok);
  for (int world : {1, 2}) {
    const RunSpec spec = offload_spec(2, world);
    const MemoryPlan plan = plan_memory(spec.cfg, spec.model, world);
    std::string largest;
    const std::size_t largest_bytes = largest_pinned(plan, &largest);
    ASSERT_GT(pinned_bytes(plan), kLimit);
    try {
      run_training(spec);
      ADD_FAILURE() << "initialize() pinned " << pinned_bytes(plan) << " bytes under a " << kLimit << "-byte limit";
    } catch (const Error& e) {
      const std::string m = e.message();
      EXPECT_EQ(e.code(), ErrorCode::out_of_memory) << m;
      EXPECT_NE(m.find("RLIMIT_MEMLOCK"), std::string::npos) << m;
      EXPECT_NE(m.find("is " + std::to_string(kLimit) + " bytes"), std::string::npos) << m;
      EXPECT_NE(m.find("'" + largest + "', " + std::to_string(largest_bytes) + " bytes"), std::string::npos) << m;
      EXPECT_NE(m.find("pinned_fallback"), std::string::npos) << m;
    }
  }
  // Nothing stays locked behind the failure: the limit still has room for a small pin.
  std::unique_ptr<Backend> be = make_cpu_backend({nullptr, true});
  EXPECT_NO_THROW(be->allocate(4096, Place::pinned_host, Category::other, "probe"));
}

// Two ranks in one process share its limit: each rank's plan fits under it (both check before
// either allocates: the check is inside initialize()'s first agreement), both together do not, so
// one rank's pin call is refused part way. The Error names the buffer, its size and the limit,
// and every rank fails.
TEST_F(Pinned, RefusedPinCallIsAnErrorNamingTheBuffer) {
  // The sanitizers' runtime intercepts mlock() and returns success without locking anything, so no
  // pin call can be refused there (the plan check above needs no mlock and runs everywhere).
  if (kSanitized) GTEST_SKIP() << "under a sanitizer mlock() is intercepted as a no-op";
  const RunSpec spec = offload_spec(2, 2);
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::size_t per_rank = 0;
  for (const auto& b : plan_memory(spec.cfg, spec.model, 2).buffers)
    if (b.place == Place::pinned_host) per_rank += (b.bytes + page - 1) / page * page;
  const std::size_t lim = (per_rank + per_rank / 2) / page * page;
  LoweredMemlock limit(lim);
  ASSERT_TRUE(limit.ok);
  try {
    run_training(spec);
    ADD_FAILURE() << "two ranks pinned 2 x " << per_rank << " bytes under a " << lim << "-byte limit";
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("cannot pin '"), std::string::npos) << m;
    EXPECT_NE(m.find(" bytes): the locked-memory limit (RLIMIT_MEMLOCK, ulimit -l) is " + std::to_string(lim) + " bytes"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("pinned_fallback"), std::string::npos) << m;
  }
  // With the fallback, the rank refused goes on in pageable memory; between them the ranks hold
  // every planned pinned byte, pinned or pageable, and no more than the limit pinned.
  RunSpec fb = spec;
  fb.cfg.pinned_fallback = true;
  const MemoryReport planned = plan_memory(fb.cfg, fb.model, 2).report();
  const RunResult got = run_training(fb);
  std::size_t pinned = 0, pageable = 0;
  for (const MemoryReport& m : got.memory) {
    pinned += m.current_total(Place::pinned_host);
    pageable += m.current_total(Place::host) - planned.current_total(Place::host);
  }
  EXPECT_EQ(pinned + pageable, 2 * planned.current_total(Place::pinned_host));
  EXPECT_GT(pageable, 0u);
  EXPECT_LE(pinned, lim);
}

// Config::pinned_fallback: the pinned buffers are pageable host memory, memory_report() shows
// them at Place::host (none at pinned_host), and training gives the bits of the run without
// offload.
TEST_F(Pinned, FallbackUsesPageableMemoryAndKeepsTheBits) {
  for (int stage : {2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    RunSpec none = offload_spec(stage, 2);
    none.cfg.offload_optimizer = OffloadKind::none;
    none.lock_pinned = false;
    const RunResult want = run_training(none);

    RunSpec spec = offload_spec(stage, 2);
    spec.cfg.pinned_fallback = true;
    spec.cfg.offload_params = stage == 3;
    const MemoryPlan plan = plan_memory(spec.cfg, spec.model, 2);
    const MemoryReport planned = plan.report();
    LoweredMemlock limit(kLimit);
    ASSERT_TRUE(limit.ok);
    const RunResult got = run_training(spec);
    for (int rk = 0; rk < 2; ++rk) {
      const MemoryReport& m = got.memory[rk];
      EXPECT_EQ(m.current_total(Place::pinned_host), 0u);
      EXPECT_EQ(m.current_total(Place::host), planned.current_total(Place::host) + planned.current_total(Place::pinned_host));
      EXPECT_EQ(m.current_total(Place::device), planned.current_total(Place::device));
      for (int c = 0; c < kCategoryCount; ++c)
        EXPECT_EQ(m.current_of(static_cast<Category>(c), Place::host),
                  planned.current_of(static_cast<Category>(c), Place::host) +
                      planned.current_of(static_cast<Category>(c), Place::pinned_host))
            << name_of(static_cast<Category>(c));
    }
    for (std::size_t t = 0; t < want.master.size(); ++t) {
      EXPECT_TRUE(same_bits(want.master[t], got.master[t])) << want.tensor_names[t];
      EXPECT_TRUE(same_bits(want.params[t], got.params[t])) << want.tensor_names[t];
    }
  }
}

// The limit only applies where pinning locks pages: the CPU backend's default pinned memory is
// ordinary memory, so the same plan initializes under the same limit without a fallback.
TEST_F(Pinned, UnlockedPinnedMemoryIgnoresTheLimit) {
  LoweredMemlock limit(kLimit);
  ASSERT_TRUE(limit.ok);
  RunSpec spec = offload_spec(2, 1);
  spec.lock_pinned = false;
  spec.steps = 1;
  const RunResult got = run_training(spec);
  EXPECT_GT(got.memory[0].current_total(Place::pinned_host), kLimit);
}

}  // namespace
