// Memory accounting: the tracker, the report, Buffer ownership and Backend::allocate's errors.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/config.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/error.hpp"
#include "shardopt/memory.hpp"

namespace shardopt {
namespace {

// A backend that only allocates, counting raw allocations and frees so ownership bugs (double
// free, leak) show up as wrong counts rather than as crashes that may or may not happen.
class CountingBackend final : public Backend {
 public:
  int allocations = 0;
  int frees = 0;
  std::multiset<void*> freed;
  bool fail_next = false;

  BackendKind kind() const noexcept override { return BackendKind::cpu; }
  std::unique_ptr<Stream> create_stream(std::string) override { return nullptr; }
  std::unique_ptr<Event> create_event() override { return nullptr; }
  void record(Event&, Stream&) override {}
  void wait(Stream&, Event&) override {}
  void synchronize(Event&) override {}
  void synchronize(Stream&) override {}
  void copy(void*, const void*, std::size_t, Stream&) override {}
  void host_task(Stream&, std::function<void()>) override {}
  void fill(void*, DType, std::size_t, float, Stream&) override {}
  void cast(const void*, DType, void*, DType, std::size_t, Stream&) override {}
  void unscale_check(void*, DType, std::size_t, const float*, float*, Stream&) override {}
  void sum_squares(const void*, DType, std::size_t, float*, Stream&) override {}
  void fused_update(const UpdateArgs&, Stream&) override {}
  void accumulate(const void*, DType, float*, std::size_t, Stream&) override {}
  void reduce(const void* const*, int, void* const*, int, std::size_t, DType, ReduceOp, Stream&) override {}
  void step_totals(const float*, std::size_t, const float*, float*, Stream&) override {}
  void step_control(const StepControlArgs&, Stream&) override {}

 protected:
  void* raw_allocate(std::size_t bytes, Place) override {
    if (fail_next) {
      fail_next = false;
      return nullptr;
    }
    ++allocations;
    return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  void raw_free(void* p, Place) noexcept override {
    ++frees;
    freed.insert(p);
    std::free(p);
  }
};

bool same(const MemoryReport& a, const MemoryReport& b) {
  return a.current == b.current && a.peak == b.peak && a.peak_total == b.peak_total;
}

TEST(MemoryNames, EveryPlaceAndCategoryHasADistinctName) {
  std::set<std::string_view> names;
  for (int p = 0; p < kPlaceCount; ++p) names.insert(name_of(static_cast<Place>(p)));
  EXPECT_EQ(names.size(), static_cast<std::size_t>(kPlaceCount));
  EXPECT_EQ(name_of(Place::pinned_host), "pinned_host");
  names.clear();
  for (int c = 0; c < kCategoryCount; ++c) names.insert(name_of(static_cast<Category>(c)));
  EXPECT_EQ(names.size(), static_cast<std::size_t>(kCategoryCount));
  EXPECT_EQ(name_of(Category::optimizer_state), "optimizer_state");
  EXPECT_EQ(name_of(BackendKind::cpu), "cpu");
  EXPECT_EQ(name_of(BackendKind::cuda), "cuda");
}

TEST(MemoryTracker, CurrentAndPeakPerCategoryAndPlace) {
  MemoryTracker t;
  t.on_allocate(Category::parameters, Place::device, 100);
  t.on_allocate(Category::parameters, Place::device, 50);
  t.on_allocate(Category::gradients, Place::host, 7);
  t.on_free(Category::parameters, Place::device, 100);
  const MemoryReport r = t.report();
  EXPECT_EQ(r.current_of(Category::parameters, Place::device), 50u);
  EXPECT_EQ(r.peak_of(Category::parameters, Place::device), 150u);
  EXPECT_EQ(r.current_of(Category::gradients, Place::host), 7u);
  EXPECT_EQ(r.peak_of(Category::gradients, Place::host), 7u);
  // Nothing leaks into other cells.
  EXPECT_EQ(r.current_of(Category::parameters, Place::host), 0u);
  EXPECT_EQ(r.current_of(Category::gradients, Place::device), 0u);
  EXPECT_EQ(r.peak_of(Category::master_weights, Place::pinned_host), 0u);
  EXPECT_EQ(r.current_total(Place::device), 50u);
  EXPECT_EQ(r.current_total(Place::host), 7u);
  EXPECT_EQ(r.current_total(Place::disk), 0u);
}

TEST(MemoryTracker, PeakTotalIsPeakOfSumsNotSumOfPeaks) {
  MemoryTracker t;
  // Two categories that never coexist: sum of peaks would be 300, the real peak is 200.
  t.on_allocate(Category::parameters, Place::device, 100);
  t.on_free(Category::parameters, Place::device, 100);
  t.on_allocate(Category::gradients, Place::device, 200);
  t.on_free(Category::gradients, Place::device, 200);
  t.on_allocate(Category::communication, Place::device, 30);
  const MemoryReport r = t.report();
  EXPECT_EQ(r.peak_of(Category::parameters, Place::device), 100u);
  EXPECT_EQ(r.peak_of(Category::gradients, Place::device), 200u);
  EXPECT_EQ(r.peak_total[static_cast<int>(Place::device)], 200u);
  EXPECT_EQ(r.current_total(Place::device), 30u);
  EXPECT_EQ(r.peak_total[static_cast<int>(Place::host)], 0u);
}

TEST(MemoryTracker, ResetPeaksSetsPeaksToCurrent) {
  MemoryTracker t;
  t.on_allocate(Category::optimizer_state, Place::pinned_host, 1000);
  t.on_free(Category::optimizer_state, Place::pinned_host, 600);
  t.reset_peaks();
  MemoryReport r = t.report();
  EXPECT_EQ(r.peak_of(Category::optimizer_state, Place::pinned_host), 400u);
  EXPECT_EQ(r.peak_total[static_cast<int>(Place::pinned_host)], 400u);
  t.on_allocate(Category::optimizer_state, Place::pinned_host, 10);
  r = t.report();
  EXPECT_EQ(r.peak_of(Category::optimizer_state, Place::pinned_host), 410u);
  EXPECT_EQ(r.peak_total[static_cast<int>(Place::pinned_host)], 410u);
}

TEST(MemoryTracker, ConcurrentUpdatesBalance) {
  MemoryTracker t;
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&t, i] {
      const auto c = static_cast<Category>(i % kCategoryCount);
      for (int k = 0; k < 2000; ++k) {
        t.on_allocate(c, Place::host, 16);
        t.on_free(c, Place::host, 16);
      }
      t.on_allocate(c, Place::host, 1);
    });
  for (auto& th : threads) th.join();
  const MemoryReport r = t.report();
  EXPECT_EQ(r.current_total(Place::host), 8u);
  EXPECT_GE(r.peak_total[static_cast<int>(Place::host)], 16u);
  EXPECT_LE(r.peak_total[static_cast<int>(Place::host)], 8u * 17u);
}

TEST(MemoryReport, ToStringIsATableNamingEveryCategoryAndPlace) {
  MemoryTracker t;
  t.on_allocate(Category::master_weights, Place::host, std::size_t(3) << 30);
  const std::string s = t.report().to_string();
  for (int c = 0; c < kCategoryCount; ++c)
    EXPECT_NE(s.find(name_of(static_cast<Category>(c))), std::string::npos) << s;
  for (int p = 0; p < kPlaceCount; ++p)
    EXPECT_NE(s.find(name_of(static_cast<Place>(p))), std::string::npos) << s;
  EXPECT_NE(s.find("total"), std::string::npos) << s;
  EXPECT_NE(s.find("3.0 GiB"), std::string::npos) << s;
  // Fixed width: every line has the same length.
  std::size_t start = 0, width = std::string::npos;
  int lines = 0;
  while (start < s.size()) {
    const std::size_t end = s.find('\n', start);
    ASSERT_NE(end, std::string::npos);
    if (width == std::string::npos) width = end - start;
    EXPECT_EQ(end - start, width) << s;
    start = end + 1;
    ++lines;
  }
  EXPECT_EQ(lines, kCategoryCount + 2);
}

TEST(Buffer, AllocateTracksAndAligns) {
  CountingBackend b;
  Buffer buf = b.allocate(100, Place::pinned_host, Category::offload_staging, "staging");
  ASSERT_TRUE(buf);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(buf.data()) % 64, 0u);
  EXPECT_EQ(buf.bytes(), 100u);
  EXPECT_EQ(buf.place(), Place::pinned_host);
  EXPECT_EQ(buf.category(), Category::offload_staging);
  EXPECT_EQ(b.memory().report().current_of(Category::offload_staging, Place::pinned_host), 100u);
  buf.reset();
  EXPECT_FALSE(buf);
  EXPECT_EQ(buf.bytes(), 0u);
  EXPECT_EQ(b.frees, 1);
  EXPECT_EQ(b.memory().report().current_of(Category::offload_staging, Place::pinned_host), 0u);
  EXPECT_EQ(b.memory().report().peak_of(Category::offload_staging, Place::pinned_host), 100u);
  buf.reset();  // resetting an empty buffer frees nothing
  EXPECT_EQ(b.frees, 1);
}

TEST(Buffer, MoveTransfersOwnershipAndFreesExactlyOnce) {
  CountingBackend b;
  void* p1 = nullptr;
  void* p2 = nullptr;
  {
    Buffer a = b.allocate(64, Place::device, Category::parameters, "a");
    p1 = a.data();
    Buffer moved(std::move(a));
    EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): the moved-from state is the contract
    EXPECT_EQ(a.bytes(), 0u);
    EXPECT_EQ(moved.data(), p1);
    EXPECT_EQ(b.frees, 0);

    Buffer other = b.allocate(128, Place::device, Category::gradients, "other");
    p2 = other.data();
    other = std::move(moved);  // frees other's old memory, takes moved's
    EXPECT_EQ(b.frees, 1);
    EXPECT_EQ(b.freed.count(p2), 1u);
    EXPECT_EQ(other.data(), p1);
    EXPECT_EQ(other.category(), Category::parameters);
    EXPECT_EQ(b.memory().report().current_of(Category::gradients, Place::device), 0u);
    EXPECT_EQ(b.memory().report().current_of(Category::parameters, Place::device), 64u);

    Buffer& self = other;
    other = std::move(self);  // self-move keeps the memory
    EXPECT_EQ(other.data(), p1);
    EXPECT_EQ(b.frees, 1);
  }
  EXPECT_EQ(b.allocations, 2);
  EXPECT_EQ(b.frees, 2);
  EXPECT_EQ(b.freed.count(p1), 1u);
  EXPECT_EQ(b.memory().report().current_total(Place::device), 0u);
}

TEST(Buffer, ZeroBytesGivesEmptyBufferAndNoTracking) {
  CountingBackend b;
  Buffer buf = b.allocate(0, Place::host, Category::other, "nothing");
  EXPECT_FALSE(buf);
  EXPECT_EQ(buf.bytes(), 0u);
  EXPECT_EQ(b.allocations, 0);
  EXPECT_TRUE(same(b.memory().report(), MemoryReport{}));
}

TEST(Buffer, DiskIsNotAllocatable) {
  CountingBackend b;
  try {
    (void)b.allocate(16, Place::disk, Category::optimizer_state, "moments");
    FAIL() << "allocating on disk must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("moments"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("disk"), std::string::npos) << e.message();
  }
  EXPECT_EQ(b.allocations, 0);
}

TEST(Buffer, RawFailureIsOutOfMemoryNamingBufferSizeAndPlace) {
  CountingBackend b;
  Buffer keep = b.allocate(256, Place::device, Category::parameters, "keep");
  const MemoryReport before = b.memory().report();
  b.fail_next = true;
  try {
    (void)b.allocate(12345, Place::device, Category::gradients, "grad bucket 3");
    FAIL() << "must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_memory);
    EXPECT_NE(e.message().find("grad bucket 3"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("12345"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("device"), std::string::npos) << e.message();
  }
  EXPECT_TRUE(same(b.memory().report(), before));
}

TEST(CpuBackendMemory, AbsurdSizeThrowsOutOfMemoryAndLeavesTrackerUnchanged) {
  auto backend = make_cpu_backend({make_thread_pool(1)});
  Buffer keep = backend->allocate(1000, Place::host, Category::master_weights, "master");
  const MemoryReport before = backend->memory().report();
  const std::size_t absurd = std::size_t(1) << 62;
  try {
    (void)backend->allocate(absurd, Place::pinned_host, Category::optimizer_state, "adam moments");
    FAIL() << "allocating 2^62 bytes must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_memory);
    EXPECT_NE(e.message().find("adam moments"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find(std::to_string(absurd)), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("pinned_host"), std::string::npos) << e.message();
  }
  EXPECT_TRUE(same(backend->memory().report(), before));
}

TEST(CpuBackendMemory, EveryPlaceIsUsableHostMemoryTrackedUnderItsPlace) {
  auto backend = make_cpu_backend({make_thread_pool(1)});
  std::vector<Buffer> bufs;
  for (Place p : {Place::device, Place::pinned_host, Place::host}) {
    for (std::size_t bytes : {std::size_t(1), std::size_t(63), std::size_t(64), std::size_t(1000)}) {
      Buffer b = backend->allocate(bytes, p, Category::communication, "comm");
      ASSERT_TRUE(b);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 64, 0u);
      std::memset(b.data(), 0xab, bytes);  // writable over its whole size (ASan checks the bound)
      bufs.push_back(std::move(b));
    }
  }
  const MemoryReport r = backend->memory().report();
  for (Place p : {Place::device, Place::pinned_host, Place::host})
    EXPECT_EQ(r.current_of(Category::communication, p), 1u + 63u + 64u + 1000u) << name_of(p);
  bufs.clear();
  EXPECT_EQ(backend->memory().report().current_total(Place::device), 0u);
  EXPECT_EQ(backend->memory().report().peak_total[static_cast<int>(Place::device)], 1128u);
}

}  // namespace
}  // namespace shardopt

namespace shardopt {
namespace {
// On the CPU backend Place::device is malloc'd RAM: the engine's report must name it host memory,
// not "device" (a trainer sizing its host RAM from the report would otherwise misread it).
TEST(MemoryNames, CpuBackendReportsItsDeviceMemoryAsHost) {
  MemoryTracker plain;
  plain.on_allocate(Category::parameters, Place::device, 1024);
  EXPECT_EQ(plain.report().place_name(Place::device), "device");
  EXPECT_NE(plain.report().to_string().find("device cur / peak"), std::string::npos);

  auto be = make_cpu_backend();
  auto comm = make_in_process_communicator(make_in_process_group(1), 0, *be);
  Config cfg;
  cfg.stage = 2;
  Engine e(cfg, *be, *comm);
  e.register_block({"b", {{"w", {4, 8}}}});
  e.initialize();
  const MemoryReport r = e.memory_report();
  EXPECT_TRUE(r.device_is_host);
  EXPECT_GT(r.current_of(Category::parameters, Place::device), 0u);  // where the engine puts them
  EXPECT_EQ(r.place_name(Place::device), "host (CPU backend)");
  EXPECT_EQ(r.place_name(Place::host), "host");
  const std::string table = r.to_string();
  EXPECT_NE(table.find("host (CPU backend) cur / peak"), std::string::npos) << table;
  EXPECT_EQ(table.find("device"), std::string::npos) << table;
  // Every row is as wide as the header: the wider column stays aligned.
  const std::size_t first = table.find('\n');
  for (std::size_t at = 0, next; (next = table.find('\n', at)) != std::string::npos; at = next + 1)
    EXPECT_EQ(next - at, first) << table;
}

}  // namespace
}  // namespace shardopt
