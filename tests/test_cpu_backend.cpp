// The CPU backend: thread pool, streams, events, errors, copies, and kernels through the backend.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "sanitized.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/error.hpp"

namespace shardopt {
namespace {

using namespace std::chrono_literals;

// ---------------------------------------------------------------------------------------------
// ThreadPool

void check_cover(ThreadPool& pool, std::size_t n, std::size_t grain) {
  std::vector<std::atomic<int>> hits(n);
  std::mutex m;
  std::set<std::pair<std::size_t, std::size_t>> chunks;
  pool.parallel_for(n, grain, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(m);
    chunks.insert({b, e});
  });
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i << " of n=" << n;
  const std::size_t expected_chunks = (n + grain - 1) / grain;
  ASSERT_EQ(chunks.size(), expected_chunks) << "n=" << n;
  for (const auto& [b, e] : chunks) {
    EXPECT_EQ(b % grain, 0u);
    EXPECT_EQ(e, std::min(n, b + grain));
  }
}

TEST(ThreadPool, ParallelForCoversEveryIndexExactlyOnce) {
  const std::size_t grain = 64;
  for (unsigned threads : {1u, 2u, 4u}) {
    ThreadPool pool(threads);
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(7), grain - 1, grain, grain + 1,
                          std::size_t(100003)}) {
      SCOPED_TRACE("threads=" + std::to_string(threads) + " n=" + std::to_string(n));
      check_cover(pool, n, grain);
    }
  }
}

TEST(ThreadPool, ZeroElementsCallsNothing) {
  ThreadPool pool(2);
  bool called = false;
  pool.parallel_for(0, 16, [&](std::size_t, std::size_t) { called = true; });
  EXPECT_FALSE(called);
}

TEST(ThreadPool, ZeroGrainIsInvalidArgument) {
  ThreadPool pool(2);
  try {
    pool.parallel_for(10, 0, [](std::size_t, std::size_t) {});
    FAIL() << "grain 0 must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("grain"), std::string::npos);
  }
}

TEST(ThreadPool, ThreadCounts) {
  EXPECT_EQ(thread_count(*make_thread_pool(3)), 3u);
  EXPECT_EQ(thread_count(*make_thread_pool(1)), 1u);
  EXPECT_EQ(thread_count(*make_thread_pool(0)), std::max(1u, std::thread::hardware_concurrency()));
  EXPECT_THROW(ThreadPool(0), Error);
}

TEST(ThreadPool, OneThreadRunsEverythingOnTheCaller) {
  ThreadPool pool(1);
  const auto me = std::this_thread::get_id();
  bool all_on_caller = true;
  pool.parallel_for(1000, 10, [&](std::size_t, std::size_t) { all_on_caller &= std::this_thread::get_id() == me; });
  EXPECT_TRUE(all_on_caller);
}

TEST(ThreadPool, ChunksRunConcurrentlyOnTwoThreads) {
  // Two chunks that each wait for the other to start can only both finish if they run at once.
  ThreadPool pool(2);
  std::atomic<int> started{0};
  std::atomic<bool> timed_out{false};
  pool.parallel_for(2, 1, [&](std::size_t, std::size_t) {
    started.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (started.load() < 2) {
      if (std::chrono::steady_clock::now() > deadline) {
        timed_out = true;
        return;
      }
      std::this_thread::yield();
    }
  });
  EXPECT_FALSE(timed_out.load());
}

TEST(ThreadPool, ConcurrentCallersOnATwoThreadPool) {
  ThreadPool pool(2);
  constexpr int kCallers = 8, kCalls = 200;
  constexpr std::size_t kN = 1000;
  std::vector<std::thread> callers;
  std::vector<int> ok(kCallers, 0);
  for (int c = 0; c < kCallers; ++c)
    callers.emplace_back([&, c] {
      std::vector<std::atomic<int>> hits(kN);
      for (int call = 0; call < kCalls; ++call) {
        pool.parallel_for(kN, 7 + static_cast<std::size_t>(c), [&](std::size_t b, std::size_t e) {
          for (std::size_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
        });
      }
      bool good = true;
      for (auto& h : hits) good &= h.load() == kCalls;
      ok[c] = good ? 1 : 0;
    });
  for (auto& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_EQ(ok[c], 1) << "caller " << c;
}

TEST(ThreadPool, NestedCallsDoNotDeadlock) {
  ThreadPool pool(2);
  std::atomic<std::size_t> total{0};
  pool.parallel_for(8, 1, [&](std::size_t, std::size_t) {
    pool.parallel_for(100, 3, [&](std::size_t b, std::size_t e) { total.fetch_add(e - b); });
  });
  EXPECT_EQ(total.load(), 800u);
}

TEST(ThreadPool, ExceptionPropagatesAndPoolStaysUsable) {
  for (unsigned threads : {1u, 2u, 3u}) {
    ThreadPool pool(threads);
    try {
      pool.parallel_for(10000, 10, [](std::size_t b, std::size_t e) {
        if (b <= 5003 && 5003 < e) throw Error(ErrorCode::io_error, "chunk with index 5003 failed");
      });
      FAIL() << "must rethrow";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::io_error);
      EXPECT_NE(e.message().find("5003"), std::string::npos);
    }
    EXPECT_THROW(pool.parallel_for(5, 1, [](std::size_t, std::size_t) { throw std::runtime_error("x"); }),
                 std::runtime_error);
    check_cover(pool, 1001, 10);
  }
}

// ---------------------------------------------------------------------------------------------
// Streams and events

std::unique_ptr<Backend> backend_with(unsigned threads) { return make_cpu_backend({make_thread_pool(threads)}); }

TEST(CpuStream, KindAndName) {
  auto b = backend_with(1);
  EXPECT_EQ(b->kind(), BackendKind::cpu);
  auto s = b->create_stream("compute");
  EXPECT_EQ(s->name(), "compute");
}

TEST(CpuStream, FifoOrder) {
  auto b = backend_with(2);
  auto s = b->create_stream("s");
  std::vector<int> order;  // touched only by the stream's thread until synchronize
  constexpr int kTasks = 5000;
  for (int i = 0; i < kTasks; ++i) b->host_task(*s, [&order, i] { order.push_back(i); });
  b->synchronize(*s);
  ASSERT_EQ(order.size(), static_cast<std::size_t>(kTasks));
  for (int i = 0; i < kTasks; ++i) ASSERT_EQ(order[i], i);
}

TEST(CpuStream, EnqueueReturnsBeforeTheTaskRuns) {
  auto b = backend_with(1);
  auto s = b->create_stream("s");
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  std::atomic<bool> ran{false};
  b->host_task(*s, [open] { open.wait(); });
  b->host_task(*s, [&] { ran = true; });
  EXPECT_FALSE(ran.load());
  gate.set_value();
  b->synchronize(*s);
  EXPECT_TRUE(ran.load());
}

TEST(CpuStream, CrossStreamWaitOrdersConsumerAfterProducer) {
  auto b = backend_with(2);
  auto producer = b->create_stream("producer");
  auto consumer = b->create_stream("consumer");
  auto ev = b->create_event();
  for (int round = 0; round < 5; ++round) {
    int value = 0;  // plain int: TSan reports a race if the event does not order the accesses
    int seen = -1;
    b->host_task(*producer, [&value, round] {
      std::this_thread::sleep_for(20ms);
      value = 42 + round;
    });
    b->record(*ev, *producer);
    b->wait(*consumer, *ev);
    b->host_task(*consumer, [&] { seen = value; });
    b->synchronize(*consumer);
    EXPECT_EQ(seen, 42 + round);
    b->synchronize(*producer);
  }
}

TEST(CpuEvent, WaitBindsToTheRecordCurrentWhenCalled) {
  auto b = backend_with(2);
  auto s1 = b->create_stream("s1");
  auto s2 = b->create_stream("s2");
  auto ev = b->create_event();
  int a = 0;
  int seen_a = -1;
  std::promise<void> consumer_ran;
  std::shared_future<void> consumer_done = consumer_ran.get_future().share();
  std::atomic<bool> deadlocked{false};

  b->host_task(*s1, [&] {
    std::this_thread::sleep_for(20ms);
    a = 1;
  });
  b->record(*ev, *s1);  // generation 1
  b->wait(*s2, *ev);    // must wait for generation 1 only
  b->host_task(*s2, [&] {
    seen_a = a;
    consumer_ran.set_value();
  });
  // Generation 2 is reached only after s2's task ran: if the wait above followed the re-record it
  // would wait for itself, which shows up as a timeout here rather than a hang.
  b->host_task(*s1, [&, consumer_done] {
    if (consumer_done.wait_for(10s) == std::future_status::timeout) deadlocked = true;
  });
  b->record(*ev, *s1);  // generation 2
  b->synchronize(*ev);
  EXPECT_FALSE(deadlocked.load());
  b->synchronize(*s2);
  EXPECT_EQ(seen_a, 1);
  b->synchronize(*s1);
}

TEST(CpuEvent, SynchronizeWaitsForTheLatestRecord) {
  auto b = backend_with(1);
  auto s1 = b->create_stream("s1");
  auto s2 = b->create_stream("s2");
  auto ev = b->create_event();
  int x = 0;
  b->host_task(*s1, [&] { x = 1; });
  b->record(*ev, *s1);
  b->synchronize(*ev);
  EXPECT_EQ(x, 1);
  // Re-recorded on another stream, behind a slow task: synchronize must follow the new record.
  b->host_task(*s2, [&] {
    std::this_thread::sleep_for(30ms);
    x = 2;
  });
  b->record(*ev, *s2);
  b->synchronize(*ev);
  EXPECT_EQ(x, 2);
}

TEST(CpuEvent, OutOfOrderGenerationsAcrossStreams) {
  // Generation 1 (slow stream) completes after generation 2 (fast stream); a wait bound to 1 must
  // still wait for the slow stream.
  auto b = backend_with(1);
  auto slow = b->create_stream("slow");
  auto fast = b->create_stream("fast");
  auto consumer = b->create_stream("consumer");
  auto ev = b->create_event();
  int slow_value = 0;
  int seen = -1;
  b->host_task(*slow, [&] {
    std::this_thread::sleep_for(50ms);
    slow_value = 7;
  });
  b->record(*ev, *slow);  // generation 1
  b->wait(*consumer, *ev);
  b->record(*ev, *fast);  // generation 2, reached almost at once
  b->host_task(*consumer, [&] { seen = slow_value; });
  b->synchronize(*consumer);
  EXPECT_EQ(seen, 7);
  b->synchronize(*slow);
}

TEST(CpuEvent, NeverRecordedEventIsAlreadyReached) {
  auto b = backend_with(1);
  auto s = b->create_stream("s");
  auto ev = b->create_event();
  b->synchronize(*ev);  // returns at once
  bool ran = false;
  b->wait(*s, *ev);  // no-op
  b->host_task(*s, [&] { ran = true; });
  b->synchronize(*s);
  EXPECT_TRUE(ran);
}

TEST(CpuEvent, EventOutlivingItsStreamAndStreamOutlivingItsEvent) {
  auto b = backend_with(1);
  auto ev = b->create_event();
  {
    auto s = b->create_stream("short-lived");
    b->host_task(*s, [] { std::this_thread::sleep_for(5ms); });
    b->record(*ev, *s);
  }
  b->synchronize(*ev);
  auto s2 = b->create_stream("s2");
  {
    auto ev2 = b->create_event();
    b->host_task(*s2, [] { std::this_thread::sleep_for(5ms); });
    b->record(*ev2, *s2);
    b->wait(*s2, *ev2);
  }
  b->synchronize(*s2);
}

TEST(CpuStream, ErrorIsReportedOnceSkipsLaterTasksAndStreamStaysUsable) {
  auto b = backend_with(1);
  auto s = b->create_stream("io");
  bool later_ran = false;
  b->host_task(*s, [] { throw Error(ErrorCode::io_error, "disk 'nvme0' is gone"); });
  b->host_task(*s, [&] { later_ran = true; });
  try {
    b->synchronize(*s);
    FAIL() << "synchronize must rethrow the task's error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io_error);
    EXPECT_NE(e.message().find("nvme0"), std::string::npos);
  }
  EXPECT_FALSE(later_ran);
  EXPECT_NO_THROW(b->synchronize(*s));  // once
  bool after = false;
  b->host_task(*s, [&] { after = true; });
  EXPECT_NO_THROW(b->synchronize(*s));
  EXPECT_TRUE(after);
}

TEST(CpuStream, ErrorReachesEventSynchronizeAndMarkersStillSignal) {
  auto b = backend_with(1);
  auto s = b->create_stream("failing");
  auto other = b->create_stream("other");
  auto ev = b->create_event();
  b->host_task(*s, [] { throw Error(ErrorCode::communication, "rank 3 disagrees"); });
  b->record(*ev, *s);
  bool other_ran = false;
  b->wait(*other, *ev);  // must not hang although s failed
  b->host_task(*other, [&] { other_ran = true; });
  EXPECT_NO_THROW(b->synchronize(*other));  // the error belongs to s, not to other
  EXPECT_TRUE(other_ran);
  try {
    b->synchronize(*ev);
    FAIL() << "synchronize(event) must rethrow the error of the stream it was recorded on";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication);
    EXPECT_NE(e.message().find("rank 3"), std::string::npos);
  }
  EXPECT_NO_THROW(b->synchronize(*s));  // already reported
  EXPECT_NO_THROW(b->synchronize(*ev));
}

TEST(CpuStream, EventRecordedBeforeTheFailureDoesNotReportIt) {
  auto b = backend_with(1);
  auto s = b->create_stream("s");
  auto ev = b->create_event();
  b->record(*ev, *s);
  b->host_task(*s, [] { throw Error(ErrorCode::internal, "late failure"); });
  EXPECT_NO_THROW(b->synchronize(*ev));
  EXPECT_THROW(b->synchronize(*s), Error);
}

TEST(CpuStream, NonErrorExceptionsBecomeErrors) {
  auto b = backend_with(1);
  auto s = b->create_stream("s");
  b->host_task(*s, [] { throw std::runtime_error("plain runtime_error"); });
  try {
    b->synchronize(*s);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("plain runtime_error"), std::string::npos);
    EXPECT_NE(e.message().find("'s'"), std::string::npos) << e.message();
  }
}

TEST(CpuStream, SynchronizeFromItsOwnTaskIsInvalidState) {
  auto b = backend_with(1);
  auto s = b->create_stream("self");
  Backend* raw = b.get();
  Stream* sp = s.get();
  b->host_task(*s, [raw, sp] { raw->synchronize(*sp); });
  try {
    b->synchronize(*s);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_state);
  }
}

TEST(CpuStream, DestructionDrainsTheQueue) {
  auto b = backend_with(1);
  std::atomic<int> count{0};
  {
    auto s = b->create_stream("s");
    for (int i = 0; i < 50; ++i)
      b->host_task(*s, [&] {
        std::this_thread::sleep_for(200us);
        count.fetch_add(1);
      });
  }
  EXPECT_EQ(count.load(), 50);
}

class ForeignStream final : public Stream {
 public:
  const std::string& name() const noexcept override { return name_; }
  std::string name_ = "foreign";
};

TEST(CpuStream, BadArgumentsAreRejectedAtEnqueue) {
  auto b = backend_with(1);
  auto s = b->create_stream("s");
  ForeignStream foreign;
  try {
    b->host_task(foreign, [] {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("foreign"), std::string::npos);
  }
  EXPECT_THROW(b->copy(nullptr, s.get(), 8, *s), Error);
  EXPECT_THROW(b->host_task(*s, std::function<void()>()), Error);
  float x = 0;
  EXPECT_THROW(b->fill(nullptr, DType::fp32, 4, 0.f, *s), Error);
  EXPECT_THROW(b->cast(&x, DType::fp32, &x, DType::bf16, 1, *s), Error);
  EXPECT_THROW(b->sum_squares(&x, DType::fp32, 1, nullptr, *s), Error);
  b->synchronize(*s);
}

TEST(CpuStream, CopiesRunInStreamOrder) {
  auto b = backend_with(2);
  auto s = b->create_stream("copy");
  for (std::size_t bytes : {std::size_t(1), std::size_t(1000), (std::size_t(4) << 20) + 13}) {
    Buffer src = b->allocate(bytes, Place::pinned_host, Category::offload_staging, "src");
    Buffer mid = b->allocate(bytes, Place::device, Category::offload_staging, "mid");
    Buffer dst = b->allocate(bytes, Place::host, Category::offload_staging, "dst");
    auto* sp = src.as<unsigned char>();
    b->host_task(*s, [sp, bytes] {
      for (std::size_t i = 0; i < bytes; ++i) sp[i] = static_cast<unsigned char>(i * 131 + 7);
    });
    b->copy(mid.data(), src.data(), bytes, *s);
    b->copy(dst.data(), mid.data(), bytes, *s);
    b->synchronize(*s);
    EXPECT_EQ(std::memcmp(dst.data(), src.data(), bytes), 0) << bytes;
  }
}

TEST(CpuStress, ManyRanksManyStreamsManyThreads) {
  auto pool = make_thread_pool(2);
  constexpr int kRanks = 4, kStreams = 3, kIters = 150;
  std::vector<int> results(kRanks, -1);
  std::vector<int> order_ok(kRanks, 0);
  std::vector<std::thread> hosts;
  for (int r = 0; r < kRanks; ++r)
    hosts.emplace_back([&, r] {
      auto b = make_cpu_backend({pool});
      std::vector<std::unique_ptr<Stream>> s;
      std::vector<std::unique_ptr<Event>> e;
      for (int i = 0; i < kStreams; ++i) {
        s.push_back(b->create_stream("rank" + std::to_string(r) + ".s" + std::to_string(i)));
        e.push_back(b->create_event());
      }
      // x passes around a ring of streams; events alone make the accesses sequential.
      int x = 0;
      bool good = true;
      constexpr std::size_t kBytes = (std::size_t(4) << 20) + 64;
      Buffer a = b->allocate(kBytes, Place::host, Category::other, "a");
      Buffer c = b->allocate(kBytes, Place::host, Category::other, "c");
      std::memset(a.data(), r + 1, kBytes);
      for (int it = 0; it < kIters; ++it) {
        for (int i = 0; i < kStreams; ++i) {
          const int prev = (i + kStreams - 1) % kStreams;
          if (it > 0 || i > 0) b->wait(*s[i], *e[prev]);
          b->host_task(*s[i], [&x, &good, i, it] {
            good &= x == it * 6 + (i == 0 ? 0 : i == 1 ? 1 : 3);
            x += i + 1;
          });
          if (it % 50 == 0 && i == 1) b->copy(c.data(), a.data(), kBytes, *s[i]);
          b->record(*e[i], *s[i]);
        }
      }
      for (auto& st : s) b->synchronize(*st);
      const auto* cp = c.as<unsigned char>();
      good &= cp[0] == r + 1 && cp[kBytes - 1] == r + 1;
      results[r] = x;
      order_ok[r] = good ? 1 : 0;
    });
  for (auto& h : hosts) h.join();
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(results[r], kIters * 6) << "rank " << r;
    EXPECT_EQ(order_ok[r], 1) << "rank " << r;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels through the backend equal the kernel table called directly.

const cpu::Kernels& table() { return cpu::kernels(cpu::active_isa()); }

std::vector<float> random_floats(std::size_t n, unsigned seed, float lo = -2.f, float hi = 2.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// Random data in `dtype`, as raw bytes.
std::vector<unsigned char> random_data(DType t, std::size_t n, unsigned seed) {
  const std::vector<float> f = random_floats(n, seed);
  std::vector<unsigned char> out(n * size_of(t) + 1);
  for (std::size_t i = 0; i < n; ++i) store_from_float(out.data(), t, i, f[i]);
  return out;
}

constexpr DType kDtypes[] = {DType::fp32, DType::fp16, DType::bf16};
constexpr std::size_t kOdd = (std::size_t(1) << 17) + 12345;  // several chunks, ragged end

TEST(CpuKernels, FillMatchesTable) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (DType t : kDtypes) {
    std::vector<unsigned char> got(kOdd * size_of(t), 0), want(kOdd * size_of(t), 0);
    b->fill(got.data(), t, kOdd, -1.7f, *s);
    b->synchronize(*s);
    table().fill(want.data(), t, kOdd, -1.7f);
    EXPECT_EQ(got, want) << name_of(t);
    EXPECT_EQ(load_as_float(got.data(), t, kOdd - 1), load_as_float(want.data(), t, 0));
  }
}

TEST(CpuKernels, CastMatchesTable) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (DType from : kDtypes)
    for (DType to : kDtypes) {
      const auto src = random_data(from, kOdd, 11);
      std::vector<unsigned char> got(kOdd * size_of(to), 0), want(kOdd * size_of(to), 0);
      b->cast(src.data(), from, got.data(), to, kOdd, *s);
      b->synchronize(*s);
      table().cast(src.data(), from, want.data(), to, kOdd);
      EXPECT_EQ(got, want) << name_of(from) << " -> " << name_of(to);
    }
}

TEST(CpuKernels, SumSquaresMatchesTableAndIgnoresThreadCount) {
  for (DType t : kDtypes) {
    const std::size_t n = (std::size_t(1) << 20) + 3;
    const auto data = random_data(t, n, 5);
    float one = -1, two = -1;
    {
      auto b = backend_with(1);
      auto s = b->create_stream("k");
      b->sum_squares(data.data(), t, n, &one, *s);
      b->synchronize(*s);
    }
    {
      auto b = backend_with(2);
      auto s = b->create_stream("k");
      b->sum_squares(data.data(), t, n, &two, *s);
      b->synchronize(*s);
    }
    EXPECT_EQ(float_bits(one), float_bits(two)) << name_of(t);
    const double direct = table().sum_squares(data.data(), t, n);
    EXPECT_NEAR(one, direct, std::abs(direct) * 1e-6) << name_of(t);

    // Within one chunk the order is the table's own.
    float small = -1;
    auto b = backend_with(2);
    auto s = b->create_stream("k");
    b->sum_squares(data.data(), t, 1000, &small, *s);
    b->synchronize(*s);
    EXPECT_EQ(small, static_cast<float>(table().sum_squares(data.data(), t, 1000)));
  }
  auto b = backend_with(1);
  auto s = b->create_stream("k");
  float out = 123;
  b->sum_squares(nullptr, DType::fp32, 0, &out, *s);
  b->synchronize(*s);
  EXPECT_EQ(out, 0.0f);
}

TEST(CpuKernels, SumSquaresOrderSensitiveDataIsReproducible) {
  // Chunk 0 sums to 1 + 2^-24, exactly halfway between two floats; every later chunk holds one
  // square of 2^-54, a quarter of a double ulp there. Added one by one after chunk 0 (chunk order)
  // each is lost and the float result ties to even: 1.0f. Any order that adds some of the small
  // ones together first (per-thread partial sums, completion order) lifts the sum past the
  // midpoint and gives the next float up.
  const std::size_t n = (std::size_t(1) << 20) + 3;
  std::vector<float> data(n, 0.0f);
  data[0] = 1.0f;
  data[1] = std::ldexp(1.0f, -12);
  for (std::size_t i = 65536 + 5; i < n; i += 65536) data[i] = std::ldexp(1.0f, -27);
  data[n - 1] = std::ldexp(1.0f, -27);
  float reference = -1;
  {
    auto b = backend_with(1);
    auto s = b->create_stream("k");
    b->sum_squares(data.data(), DType::fp32, n, &reference, *s);
    b->synchronize(*s);
  }
  EXPECT_EQ(reference, 1.0f);
  for (unsigned threads : {2u, 3u}) {
    auto b = backend_with(threads);
    auto s = b->create_stream("k");
    for (int rep = 0; rep < 50; ++rep) {
      float out = -1;
      b->sum_squares(data.data(), DType::fp32, n, &out, *s);
      b->synchronize(*s);
      ASSERT_EQ(float_bits(out), float_bits(reference)) << "threads " << threads << " rep " << rep;
    }
  }
}

TEST(CpuKernels, UnscaleCheckMatchesTableAndReadsScaleWhenItRuns) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (DType t : kDtypes) {
    auto got = random_data(t, kOdd, 3);
    auto want = got;
    float scale = 1.0f;
    float found = 0.0f;
    b->host_task(*s, [&scale] { scale = 0.25f; });  // the kernel must see this, not 1.0
    b->unscale_check(got.data(), t, kOdd, &scale, &found, *s);
    b->synchronize(*s);
    const bool bad = table().unscale_check(want.data(), t, kOdd, 0.25f);
    EXPECT_FALSE(bad);
    EXPECT_EQ(got, want) << name_of(t);
    EXPECT_EQ(found, 0.0f);

    // A non-finite value in the last chunk sets the flag...
    store_from_float(got.data(), t, kOdd - 2, std::numeric_limits<float>::infinity());
    b->unscale_check(got.data(), t, kOdd, &scale, &found, *s);
    b->synchronize(*s);
    EXPECT_EQ(found, 1.0f) << name_of(t);
    // ...and clean data never clears it.
    auto clean = random_data(t, 100, 4);
    b->unscale_check(clean.data(), t, 100, &scale, &found, *s);
    b->synchronize(*s);
    EXPECT_EQ(found, 1.0f);
  }
}

struct UpdateData {
  std::vector<float> master, m, v;
  std::vector<unsigned char> grad, param;
};

UpdateData make_update_data(std::size_t n, DType grad_t, DType param_t) {
  UpdateData d;
  d.master = random_floats(n, 21);
  d.m = random_floats(n, 22, -0.1f, 0.1f);
  d.v = random_floats(n, 23, 0.0f, 0.01f);
  d.grad = random_data(grad_t, n, 24);
  d.param.assign(n * size_of(param_t) + 1, 0);
  return d;
}

UpdateArgs args_for(UpdateData& d, OptimizerKind rule, DType grad_t, DType param_t, std::size_t n) {
  UpdateArgs a;
  a.rule = rule;
  a.scalars.lr = 1e-3f;
  a.scalars.beta1 = 0.9f;
  a.scalars.beta2 = 0.999f;
  a.scalars.eps = 1e-8f;
  a.scalars.weight_decay = 0.01f;
  a.scalars.one_minus_beta1 = 0.1f;
  a.scalars.one_minus_beta2 = 0.001f;
  a.scalars.bias_correction1 = 1.0f / (1.0f - 0.9f * 0.9f);
  a.scalars.bias_correction2_sqrt = 1.0f / std::sqrt(1.0f - 0.999f * 0.999f);
  a.scalars.momentum = 0.9f;
  a.scalars.one_minus_dampening = 1.0f;
  a.scalars.grad_scale = 0.5f;
  a.master = d.master.data();
  a.state1 = d.m.data();
  a.state2 = d.v.data();
  a.grad = d.grad.data();
  a.grad_dtype = grad_t;
  a.param_out = d.param.data();
  a.param_dtype = param_t;
  a.n = n;
  return a;
}

// zero_grad: the same update bits, and the gradient is zero afterwards; on a skipped step nothing
// but the gradient is written.
TEST(CpuKernels, FusedUpdateZeroGrad) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (DType gt : kDtypes)
    for (float skip : {0.0f, 1.0f}) {
      SCOPED_TRACE(std::string("grad ") + std::string(name_of(gt)) + (skip != 0.0f ? " skipped" : ""));
      UpdateData got = make_update_data(kOdd, gt, DType::bf16);
      UpdateData want = got;
      UpdateArgs ga = args_for(got, OptimizerKind::adamw, gt, DType::bf16, kOdd);
      ga.zero_grad = true;
      ga.skip_ptr = &skip;
      b->fused_update(ga, *s);
      b->synchronize(*s);
      if (skip == 0.0f) table().fused_update(args_for(want, OptimizerKind::adamw, gt, DType::bf16, kOdd));
      EXPECT_EQ(got.master, want.master);
      EXPECT_EQ(got.m, want.m);
      EXPECT_EQ(got.v, want.v);
      EXPECT_EQ(got.param, want.param);
      EXPECT_TRUE(std::all_of(got.grad.begin(), got.grad.end(), [](unsigned char c) { return c == 0; }));
      EXPECT_FALSE(std::all_of(want.grad.begin(), want.grad.end(), [](unsigned char c) { return c == 0; }));
    }
}

TEST(CpuKernels, FusedUpdateMatchesTable) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (OptimizerKind rule : {OptimizerKind::adamw, OptimizerKind::adam, OptimizerKind::sgd, OptimizerKind::lion})
    for (DType gt : kDtypes)
      for (DType pt : {DType::fp32, DType::bf16}) {
        SCOPED_TRACE(std::string(name_of(rule)) + " grad " + std::string(name_of(gt)) + " param " +
                     std::string(name_of(pt)));
        UpdateData got = make_update_data(kOdd, gt, pt);
        UpdateData want = got;
        float scale = 4.0f;
        UpdateArgs ga = args_for(got, rule, gt, pt, kOdd);
        ga.scale_ptr = &scale;
        b->host_task(*s, [&scale] { scale = 0.125f; });  // read at execution time
        b->fused_update(ga, *s);
        b->synchronize(*s);
        UpdateArgs wa = args_for(want, rule, gt, pt, kOdd);
        wa.scalars.grad_scale *= 0.125f;
        table().fused_update(wa);
        EXPECT_EQ(got.master, want.master);
        EXPECT_EQ(got.m, want.m);
        if (state_count(rule) == 2) {
          EXPECT_EQ(got.v, want.v);
        }
        EXPECT_EQ(got.param, want.param);
        EXPECT_NE(got.master, make_update_data(kOdd, gt, pt).master);  // something did change
      }
}

TEST(CpuKernels, FusedUpdateSkipsWhenFlagIsSetAtExecution) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  UpdateData d = make_update_data(kOdd, DType::bf16, DType::bf16);
  const UpdateData before = d;
  float skip = 0.0f;
  UpdateArgs a = args_for(d, OptimizerKind::adamw, DType::bf16, DType::bf16, kOdd);
  a.skip_ptr = &skip;
  b->host_task(*s, [&skip] { skip = 1.0f; });
  b->fused_update(a, *s);
  b->synchronize(*s);
  EXPECT_EQ(d.master, before.master);
  EXPECT_EQ(d.m, before.m);
  EXPECT_EQ(d.v, before.v);
  EXPECT_EQ(d.param, before.param);
  skip = 0.0f;
  b->fused_update(a, *s);
  b->synchronize(*s);
  EXPECT_NE(d.master, before.master);
}

TEST(CpuKernels, AccumulateAddsConvertedSource) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  for (DType t : kDtypes) {
    const auto src = random_data(t, kOdd, 9);
    std::vector<float> dst = random_floats(kOdd, 10);
    std::vector<float> want = dst;
    for (std::size_t i = 0; i < kOdd; ++i) want[i] += load_as_float(src.data(), t, i);
    b->accumulate(src.data(), t, dst.data(), kOdd, *s);
    b->synchronize(*s);
    EXPECT_EQ(dst, want) << name_of(t);
  }
}

// A GPU faults on an element whose address is not a multiple of its size (a float at an address
// that is 2 mod 4, say), and that fault poisons the whole CUDA context. The CPU backend refuses
// such a pointer with an Error naming it, before enqueueing anything, so CPU tests catch this
// class of bug too; element-aligned offsets keep working.
TEST(CpuKernels, MisalignedElementPointerIsAnErrorAndWritesNothing) {
  auto b = backend_with(2);
  auto s = b->create_stream("k");
  constexpr std::size_t n = 16;
  Buffer buf = b->allocate(8 * n + 64, Place::device, Category::other, "buf");
  Buffer f32 = b->allocate(64, Place::device, Category::other, "floats");
  auto* base = buf.as<unsigned char>();
  auto* fl = f32.as<float>();
  for (std::size_t i = 0; i < buf.bytes(); ++i) base[i] = static_cast<unsigned char>(i * 37 + 1);
  std::fill(fl, fl + 16, 1.0f);
  const std::vector<unsigned char> before(base, base + buf.bytes());
  const std::vector<float> fl_before(fl, fl + 16);

  // Every op must throw invalid_argument naming `arg`.
  const auto refused = [&](const char* what, const char* arg, const std::function<void()>& call) {
    SCOPED_TRACE(what);
    try {
      call();
      ADD_FAILURE() << what << ": a misaligned '" << arg << "' was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
      EXPECT_NE(e.message().find(std::string("'") + arg + "'"), std::string::npos) << e.what();
      EXPECT_NE(e.message().find("element size"), std::string::npos) << e.what();
    }
  };
  for (DType t : kDtypes) {
    SCOPED_TRACE(std::string(name_of(t)));
    std::vector<std::size_t> offsets = {1};
    if (size_of(t) == 4) offsets.push_back(2);  // 2 mod 4: the offset the cast test once used
    for (std::size_t off : offsets) {
      void* p = base + off;
      refused("fill", "dst", [&] { b->fill(p, t, n, 0.5f, *s); });
      refused("cast src", "src", [&] { b->cast(p, t, fl, DType::fp32, 4, *s); });
      refused("cast dst", "dst", [&] { b->cast(fl, DType::fp32, p, t, 4, *s); });
      refused("unscale_check", "data", [&] { b->unscale_check(p, t, n, fl, fl + 1, *s); });
      refused("sum_squares", "data", [&] { b->sum_squares(p, t, n, fl, *s); });
      refused("accumulate", "src", [&] { b->accumulate(p, t, fl, 4, *s); });
      UpdateArgs a;
      a.master = fl;
      a.state1 = fl + 4;
      a.state2 = fl + 8;
      a.n = 4;
      a.grad = p;
      a.grad_dtype = t;
      refused("fused_update grad", "grad", [&] { b->fused_update(a, *s); });
      a.grad = fl + 12;
      a.grad_dtype = DType::fp32;
      a.param_out = p;
      a.param_dtype = t;
      refused("fused_update param_out", "param_out", [&] { b->fused_update(a, *s); });
      try {
        const void* srcs[1] = {p};
        void* dsts[1] = {p};
        b->reduce(srcs, 1, dsts, 1, n, t, ReduceOp::sum, *s);
        ADD_FAILURE() << "reduce accepted a misaligned pointer";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
        EXPECT_NE(e.message().find("srcs[0]"), std::string::npos) << e.what();
      }
    }
  }
  float* odd_float = reinterpret_cast<float*>(base + 2);
  refused("fused_update master", "master", [&] {
    UpdateArgs a;
    a.master = odd_float;
    a.state1 = fl;
    a.state2 = fl + 4;
    a.grad = fl + 8;
    a.n = 4;
    b->fused_update(a, *s);
  });
  refused("accumulate dst", "dst", [&] { b->accumulate(fl, DType::fp32, odd_float, 4, *s); });
  refused("sum_squares out", "out", [&] { b->sum_squares(fl, DType::fp32, 4, odd_float, *s); });
  refused("step_totals", "totals", [&] { b->step_totals(fl, 4, fl + 4, odd_float, *s); });
  b->synchronize(*s);
  EXPECT_EQ(std::vector<unsigned char>(base, base + buf.bytes()), before) << "a refused call wrote memory";
  EXPECT_EQ(std::vector<float>(fl, fl + 16), fl_before) << "a refused call wrote memory";

  // One element of the pointer's own type is aligned, whatever the buffer's alignment: accepted.
  for (DType t : kDtypes) {
    b->fill(base + size_of(t), t, n, 0.5f, *s);
    b->synchronize(*s);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(load_as_float(base + size_of(t), t, i), 0.5f) << name_of(t);
  }
}

TEST(CpuStress, KernelsFromManyRanksOnOneSmallPool) {
  auto pool = make_thread_pool(2);
  constexpr int kRanks = 4;
  const std::size_t n = (std::size_t(1) << 18) + 5;
  const auto data = random_data(DType::fp32, n, 77);
  const float expected = [&] {
    auto b = make_cpu_backend({make_thread_pool(1)});
    auto s = b->create_stream("ref");
    float out = 0;
    b->sum_squares(data.data(), DType::fp32, n, &out, *s);
    b->synchronize(*s);
    return out;
  }();
  std::vector<int> ok(kRanks, 0);
  std::vector<std::thread> hosts;
  for (int r = 0; r < kRanks; ++r)
    hosts.emplace_back([&, r] {
      auto b = make_cpu_backend({pool});
      auto s1 = b->create_stream("a");
      auto s2 = b->create_stream("b");
      auto ev = b->create_event();
      std::vector<float> buf(n);
      bool good = true;
      for (int it = 0; it < 4; ++it) {
        float out1 = 0, out2 = 0;
        b->copy(buf.data(), data.data(), n * 4, *s1);
        b->record(*ev, *s1);
        b->wait(*s2, *ev);
        b->sum_squares(buf.data(), DType::fp32, n, &out2, *s2);
        b->sum_squares(data.data(), DType::fp32, n, &out1, *s1);
        b->synchronize(*s1);
        b->synchronize(*s2);
        good &= float_bits(out1) == float_bits(expected) && float_bits(out2) == float_bits(expected);
        b->fill(buf.data(), DType::fp32, n, 0.0f, *s2);
        b->synchronize(*s2);
      }
      ok[r] = good ? 1 : 0;
    });
  for (auto& h : hosts) h.join();
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(ok[r], 1) << "rank " << r;
}

// ---------------------------------------------------------------------------------------------
// reduce, checked against two references written here from the contract in backend.hpp: a plain
// fp32 loop (the result must equal it bit for bit) and a float64 reduction (the result must lie
// within the error the fp32 accumulation and the final rounding allow).

using Bytes = std::vector<unsigned char>;

constexpr ReduceOp kReduceOps[] = {ReduceOp::sum, ReduceOp::avg, ReduceOp::max};
constexpr int kSourceCounts[] = {1, 2, 3, 8, 64};
// crosses kernel chunks, ragged end
constexpr std::size_t kReduceBig = (shardopt::testing::kSanitized ? 2 : 3) * (std::size_t(1) << 16) + 5;
constexpr std::size_t kReduceInPlace = (std::size_t(1) << 16) + 5;  // one chunk boundary

const char* op_text(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
  }
  return "?";
}

std::string reduce_trace(DType t, ReduceOp op, int nsrc, int ndst, std::size_t n) {
  return std::string(name_of(t)) + " " + op_text(op) + " nsrc=" + std::to_string(nsrc) +
         " ndst=" + std::to_string(ndst) + " n=" + std::to_string(n);
}

// Random values of `t` with magnitudes in [1/64, 2) and random signs: never zero, so a kernel that
// writes zeros or skips a source cannot pass. (splitmix64: the sources add up to tens of millions
// of values, where std::mt19937 with a distribution would dominate the test's time.)
Bytes random_nonzero(DType t, std::size_t n, unsigned seed) {
  std::uint64_t state = seed;
  Bytes out(n * size_of(t));
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float mag = 1.0f / 64 + static_cast<float>(z >> 40) * 0x1p-24f * (2.0f - 1.0f / 64);
    store_from_float(out.data(), t, i, (z & 1) != 0 ? -mag : mag);
  }
  return out;
}

std::vector<Bytes> random_sources(DType t, int nsrc, std::size_t n, unsigned seed) {
  std::vector<Bytes> srcs;
  for (int q = 0; q < nsrc; ++q) srcs.push_back(random_nonzero(t, n, seed + static_cast<unsigned>(q)));
  return srcs;
}

// The contract's arithmetic, element by element, in the most literal form.
Bytes plain_reduce(const std::vector<Bytes>& srcs, DType t, ReduceOp op, std::size_t n) {
  Bytes out(n * size_of(t));
  for (std::size_t i = 0; i < n; ++i) {
    float acc = load_as_float(srcs[0].data(), t, i);
    for (std::size_t q = 1; q < srcs.size(); ++q) {
      const float x = load_as_float(srcs[q].data(), t, i);
      if (op == ReduceOp::max)
        acc = (x > acc || x != x) ? x : acc;
      else
        acc = acc + x;
    }
    if (op == ReduceOp::avg) acc = acc / static_cast<float>(srcs.size());
    store_from_float(out.data(), t, i, acc);
  }
  return out;
}

double unit_roundoff(DType t) {
  switch (t) {
    case DType::fp32: return 0x1p-24;
    case DType::fp16: return 0x1p-11;
    case DType::bf16: return 0x1p-8;
  }
  return 1.0;
}

double half_min_subnormal(DType t) {
  switch (t) {
    case DType::fp32: return 0x1p-150;
    case DType::fp16: return 0x1p-25;
    case DType::bf16: return 0x1p-134;
  }
  return 1.0;
}

// What a reduction of `srcs` must give: the bits of the plain loop, and the float64 value with
// the error the fp32 accumulation and the final rounding allow (max rounds nothing: bound 0).
struct Expected {
  Bytes bits;
  std::vector<double> ref, bound;
};

Expected expect_reduction(const std::vector<Bytes>& srcs, DType t, ReduceOp op, std::size_t n) {
  Expected e{plain_reduce(srcs, t, op, n), std::vector<double>(n), std::vector<double>(n)};
  const double nsrc = static_cast<double>(srcs.size());
  const double u = unit_roundoff(t);
  for (std::size_t i = 0; i < n; ++i) {
    double sum = 0.0, abs_sum = 0.0, mx = -std::numeric_limits<double>::infinity();
    for (const Bytes& s : srcs) {
      const double x = load_as_float(s.data(), t, i);
      sum += x;
      abs_sum += std::fabs(x);
      mx = std::max(mx, x);
    }
    if (op == ReduceOp::max) {
      e.ref[i] = mx;
      e.bound[i] = 0.0;
      continue;
    }
    const double scale = op == ReduceOp::avg ? 1.0 / nsrc : 1.0;
    e.ref[i] = sum * scale;
    // nsrc - 1 fp32 additions (and one division) of at most 2^-24 of the partial sums each, then
    // one rounding to `t`.
    e.bound[i] = nsrc * 0x1p-24 * abs_sum * scale * (1.0 + u) + u * std::fabs(e.ref[i]) + half_min_subnormal(t);
  }
  return e;
}

// Every destination holds the expected reduction; reports the first bad element of each.
void check_reduced(const Expected& want, const std::vector<const unsigned char*>& dsts, DType t, std::size_t n) {
  const std::size_t es = size_of(t);
  for (std::size_t d = 0; d < dsts.size(); ++d) {
    SCOPED_TRACE("destination " + std::to_string(d));
    for (std::size_t i = 0; i < n; ++i) {
      if (std::memcmp(dsts[d] + i * es, want.bits.data() + i * es, es) != 0) {
        ADD_FAILURE() << "element " << i << " of " << n << ": got " << load_as_float(dsts[d], t, i)
                      << ", the plain fp32 loop gives " << load_as_float(want.bits.data(), t, i);
        break;
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      const double got = load_as_float(dsts[d], t, i);
      if (!(std::fabs(got - want.ref[i]) <= want.bound[i])) {
        ADD_FAILURE() << "element " << i << " of " << n << ": got " << got << ", float64 reference "
                      << want.ref[i] << ", allowed error " << want.bound[i];
        break;
      }
    }
  }
}

void check_reduced(const std::vector<Bytes>& srcs, const std::vector<const unsigned char*>& dsts, DType t,
                   ReduceOp op, std::size_t n) {
  check_reduced(expect_reduction(srcs, t, op, n), dsts, t, n);
}

// Holds a stream until released (or destroyed), so that whatever is enqueued behind it runs only
// after the test has done something on the host.
class Gate {
 public:
  Gate(Backend& b, Stream& s) {
    std::shared_future<void> opened = open_.get_future().share();
    b.host_task(s, [opened] { opened.wait(); });
  }
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  ~Gate() { release(); }
  void release() {
    if (!released_) open_.set_value();
    released_ = true;
  }

 private:
  std::promise<void> open_;
  bool released_ = false;
};

enum class InPlace { none, one, all };

// Reduces copies of `srcs` into `ndst` destinations poisoned with 0xff (NaN in every dtype), then
// checks them. in_place: none: separate destinations; one: destination 0 is the middle source;
// all: destination q is source q (all-reduce, ndst == nsrc). The pointer arrays are overwritten
// with pointers to a decoy before the stream may run the task, so a task that reads the caller's
// arrays instead of its own copies writes the decoy and leaves the poison in the destinations.
void run_reduce(Backend& b, Stream& s, const std::vector<Bytes>& srcs, const Expected& want, int ndst, DType t,
                ReduceOp op, std::size_t n, InPlace in_place) {
  const int nsrc = static_cast<int>(srcs.size());
  SCOPED_TRACE(reduce_trace(t, op, nsrc, ndst, n));
  std::vector<Bytes> work = srcs;  // what the call reduces; some may be destinations too
  std::vector<int> source_of(static_cast<std::size_t>(ndst), -1);  // the source a destination is
  if (in_place == InPlace::one) source_of[0] = nsrc / 2;
  if (in_place == InPlace::all)
    for (int d = 0; d < ndst; ++d) source_of[static_cast<std::size_t>(d)] = d;
  std::vector<Bytes> own;  // destinations that are not sources
  for (int q : source_of)
    if (q < 0) own.emplace_back(n * size_of(t), 0xff);
  std::vector<unsigned char*> dst_bytes;
  std::vector<bool> written(srcs.size(), false);
  std::size_t k = 0;
  for (int q : source_of) {
    if (q >= 0) written[static_cast<std::size_t>(q)] = true;
    dst_bytes.push_back(q >= 0 ? work[static_cast<std::size_t>(q)].data() : own[k++].data());
  }
  std::vector<const void*> src_ptrs;
  std::vector<void*> dst_ptrs;
  for (Bytes& w : work) src_ptrs.push_back(w.data());
  for (unsigned char* p : dst_bytes) dst_ptrs.push_back(p);

  Bytes decoy(n * size_of(t) + 1, 0);
  {
    Gate gate(b, s);
    b.reduce(src_ptrs.data(), nsrc, dst_ptrs.data(), ndst, n, t, op, s);
    std::fill(src_ptrs.begin(), src_ptrs.end(), decoy.data());
    std::fill(dst_ptrs.begin(), dst_ptrs.end(), decoy.data());
  }
  b.synchronize(s);
  check_reduced(want, {dst_bytes.begin(), dst_bytes.end()}, t, n);
  for (std::size_t q = 0; q < srcs.size(); ++q) {
    if (!written[q]) {
      EXPECT_TRUE(work[q] == srcs[q]) << "source " << q << " was modified";
    }
  }
}

// Every dtype x size x source count x op, destinations 1 and 3 (or, for InPlace::all, one per
// source), the sources drawn afresh per case from `seed`.
void reduce_sweep(InPlace mode, std::initializer_list<std::size_t> sizes, unsigned seed) {
  auto b = backend_with(2);
  auto s = b->create_stream("reduce");
  for (DType t : kDtypes)
    for (std::size_t n : sizes)
      for (int nsrc : kSourceCounts) {
        seed += 100;
        // Under sanitizers 64 sources run at the small sizes only (they were half of this sweep).
        if (shardopt::testing::kSanitized && nsrc > 8 && n > 7) continue;
        const auto srcs = random_sources(t, nsrc, n, seed);
        for (ReduceOp op : kReduceOps) {
          const Expected want = expect_reduction(srcs, t, op, n);
          if (mode == InPlace::all)
            run_reduce(*b, *s, srcs, want, nsrc, t, op, n, mode);
          else
            for (int ndst : {1, 3}) run_reduce(*b, *s, srcs, want, ndst, t, op, n, mode);
        }
        if (::testing::Test::HasFailure()) return;  // the first failing case, not hundreds
      }
}

TEST(CpuReduce, MatchesPlainLoopAndFloat64Reference) {
  reduce_sweep(InPlace::none, {std::size_t(0), std::size_t(1), std::size_t(7), kReduceBig}, 1000);
}

TEST(CpuReduce, InPlaceIntoOneOfTheSources) { reduce_sweep(InPlace::one, {std::size_t(7), kReduceInPlace}, 2000); }

TEST(CpuReduce, InPlaceEveryDestinationIsItsSourceAsAllReduceDoes) {
  reduce_sweep(InPlace::all, {std::size_t(7), kReduceInPlace}, 3000);
}

TEST(CpuReduce, MaxPropagatesNaNFromAnySource) {
  auto b = backend_with(2);
  auto s = b->create_stream("reduce");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (DType t : kDtypes)
    for (int nsrc : {2, 3, 8}) {
      auto srcs = random_sources(t, nsrc, kReduceBig, 4000 + static_cast<unsigned>(nsrc));
      // A NaN first (a NaN accumulator must stay), last (a NaN operand must win), in the middle,
      // and a large value after a NaN (it must not replace it).
      for (std::size_t i = 0; i < kReduceBig; i += 5) store_from_float(srcs.front().data(), t, i, nan);
      for (std::size_t i = 0; i < kReduceBig; i += 7) store_from_float(srcs.back().data(), t, i, -nan);
      for (std::size_t i = 3; i < kReduceBig; i += 11)
        store_from_float(srcs[static_cast<std::size_t>(nsrc / 2)].data(), t, i, nan);
      for (std::size_t i = 0; i < kReduceBig; i += 5) store_from_float(srcs.back().data(), t, i, 1000.0f);
      Bytes out(kReduceBig * size_of(t), 0xff);
      std::vector<const void*> in;
      for (const Bytes& x : srcs) in.push_back(x.data());
      void* dst = out.data();
      b->reduce(in.data(), nsrc, &dst, 1, kReduceBig, t, ReduceOp::max, *s);
      b->synchronize(*s);
      SCOPED_TRACE(reduce_trace(t, ReduceOp::max, nsrc, 1, kReduceBig));
      std::size_t wrong = 0, nans = 0;
      for (std::size_t i = 0; i < kReduceBig; ++i) {
        bool any_nan = false;
        for (const Bytes& x : srcs) any_nan |= std::isnan(load_as_float(x.data(), t, i));
        const bool got_nan = std::isnan(load_as_float(out.data(), t, i));
        nans += got_nan ? 1 : 0;
        if (got_nan != any_nan && wrong++ == 0)
          ADD_FAILURE() << "element " << i << ": a NaN among the sources is " << any_nan << ", the result is "
                        << load_as_float(out.data(), t, i);
      }
      EXPECT_EQ(wrong, 0u);
      EXPECT_GT(nans, kReduceBig / 5);
      EXPECT_TRUE(out == plain_reduce(srcs, t, ReduceOp::max, kReduceBig)) << "NaN bits differ from the plain loop";
    }
}

TEST(CpuReduce, PointerArraysMayBeFreedWhenTheCallReturns) {
  auto b = backend_with(2);
  auto s = b->create_stream("reduce");
  const DType t = DType::bf16;
  const int nsrc = 8, ndst = 3;
  const auto srcs = random_sources(t, nsrc, kReduceBig, 5000);
  std::vector<Bytes> dsts(ndst, Bytes(kReduceBig * size_of(t), 0xff));
  {
    Gate gate(*b, *s);
    // Heap arrays freed before the task can run: under AddressSanitizer a task that kept the
    // caller's arrays is a use after free.
    auto in = std::make_unique<const void*[]>(nsrc);
    auto out = std::make_unique<void*[]>(ndst);
    for (int q = 0; q < nsrc; ++q) in[static_cast<std::size_t>(q)] = srcs[static_cast<std::size_t>(q)].data();
    for (int q = 0; q < ndst; ++q) out[static_cast<std::size_t>(q)] = dsts[static_cast<std::size_t>(q)].data();
    b->reduce(in.get(), nsrc, out.get(), ndst, kReduceBig, t, ReduceOp::avg, *s);
    in.reset();
    out.reset();
  }
  b->synchronize(*s);
  check_reduced(srcs, {dsts[0].data(), dsts[1].data(), dsts[2].data()}, t, ReduceOp::avg, kReduceBig);
}

TEST(CpuReduce, ZeroElementsDoNothing) {
  auto b = backend_with(2);
  auto s = b->create_stream("reduce");
  Bytes src(16, 0x3c), dst(16, 0xff);
  const void* in[] = {src.data(), nullptr};
  void* out[] = {dst.data()};
  b->reduce(in, 2, out, 1, 0, DType::fp16, ReduceOp::sum, *s);
  b->reduce(nullptr, 1, nullptr, 1, 0, DType::fp32, ReduceOp::avg, *s);  // null is fine with n == 0
  b->synchronize(*s);
  EXPECT_TRUE(dst == Bytes(16, 0xff));
}

TEST(CpuReduce, BadArgumentsAreInvalidArgumentNamingTheProblem) {
  auto b = backend_with(2);
  auto s = b->create_stream("reduce");
  const std::size_t n = 5;
  std::vector<Bytes> srcs(Backend::kMaxReduceOperands + 1, random_nonzero(DType::fp32, n, 6000));
  Bytes dst(n * 4, 0xff);
  std::vector<const void*> in;
  for (const Bytes& x : srcs) in.push_back(x.data());
  std::vector<void*> out(Backend::kMaxReduceOperands + 1, dst.data());
  const auto expect_invalid = [&](const std::string& what, const std::vector<std::string>& named,
                                  const auto& call) {
    SCOPED_TRACE(what);
    try {
      call();
      ADD_FAILURE() << what << " did not throw";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
      for (const std::string& word : named) EXPECT_NE(e.message().find(word), std::string::npos) << e.what();
    }
  };
  const DType f = DType::fp32;
  const ReduceOp sum = ReduceOp::sum;
  expect_invalid("nsrc 0", {"nsrc", "0"}, [&] { b->reduce(in.data(), 0, out.data(), 1, n, f, sum, *s); });
  expect_invalid("nsrc 65", {"nsrc", "65"}, [&] { b->reduce(in.data(), 65, out.data(), 1, n, f, sum, *s); });
  expect_invalid("nsrc -1", {"nsrc", "-1"}, [&] { b->reduce(in.data(), -1, out.data(), 1, n, f, sum, *s); });
  expect_invalid("ndst 0", {"ndst", "0"}, [&] { b->reduce(in.data(), 2, out.data(), 0, n, f, sum, *s); });
  expect_invalid("ndst 65", {"ndst", "65"}, [&] { b->reduce(in.data(), 2, out.data(), 65, n, f, sum, *s); });
  expect_invalid("nsrc 0 with n 0", {"nsrc"}, [&] { b->reduce(in.data(), 0, out.data(), 1, 0, f, sum, *s); });
  in[1] = nullptr;
  expect_invalid("null source", {"srcs[1]", "null"}, [&] { b->reduce(in.data(), 3, out.data(), 1, n, f, sum, *s); });
  in[1] = srcs[1].data();
  out[2] = nullptr;
  expect_invalid("null destination", {"dsts[2]", "null"},
                 [&] { b->reduce(in.data(), 3, out.data(), 3, n, f, sum, *s); });
  out[2] = dst.data();
  expect_invalid("null source array", {"srcs", "null"}, [&] { b->reduce(nullptr, 3, out.data(), 1, n, f, sum, *s); });
  expect_invalid("null destination array", {"dsts", "null"},
                 [&] { b->reduce(in.data(), 3, nullptr, 1, n, f, sum, *s); });
  // A destination may be exactly one of the sources, but not overlap one partially, and
  // destinations may not overlap each other (the result would depend on the order of stores).
  {
    Bytes wide((n + 1) * 4, 0xff);
    std::vector<const void*> two = {wide.data(), srcs[1].data()};
    std::vector<void*> shifted = {wide.data() + 4};
    expect_invalid("destination inside a source", {"dsts[0]", "srcs[0]", "overlaps"},
                   [&] { b->reduce(two.data(), 2, shifted.data(), 1, n, f, sum, *s); });
    std::vector<void*> pair = {dst.data(), dst.data()};
    expect_invalid("two equal destinations", {"dsts[0]", "dsts[1]", "overlap"},
                   [&] { b->reduce(in.data(), 2, pair.data(), 2, n, f, sum, *s); });
    pair = {wide.data(), wide.data() + 4};
    expect_invalid("overlapping destinations", {"dsts[0]", "dsts[1]", "overlap"},
                   [&] { b->reduce(in.data(), 2, pair.data(), 2, n, f, sum, *s); });
  }
  ForeignStream foreign;
  expect_invalid("foreign stream", {"foreign"}, [&] { b->reduce(in.data(), 2, out.data(), 1, n, f, sum, foreign); });
  // Nothing was enqueued, and the limits themselves are accepted.
  b->synchronize(*s);
  EXPECT_TRUE(dst == Bytes(n * 4, 0xff));
  b->reduce(in.data(), Backend::kMaxReduceOperands, out.data(), 1, n, f, sum, *s);
  b->synchronize(*s);
  check_reduced(std::vector<Bytes>(srcs.begin(), srcs.begin() + Backend::kMaxReduceOperands), {dst.data()}, f, sum,
                n);
}

}  // namespace
}  // namespace shardopt
