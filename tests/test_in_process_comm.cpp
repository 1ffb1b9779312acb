// The in-process communicator, gloo style: N ranks as threads of this test process, each with its
// own CPU backend and stream. Expected values are computed here in double (or, where the contract
// fixes the fp32 rank-order arithmetic, in float in rank order) and compared bit for bit.
//
// This file is built twice: test_in_process_comm runs it over the host_tasks transport and
// test_in_process_comm_kernels (SHARDOPT_TEST_BACKEND_KERNELS) over backend_kernels, the
// transport that serves several ranks on one GPU, here driven by the CPU backend's kernels and
// events. The expected bits are the same; where the two transports report a failure differently,
// the test says so.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace shardopt {
namespace {

using namespace std::chrono_literals;

#ifdef SHARDOPT_TEST_BACKEND_KERNELS
constexpr InProcessTransport kTransport = InProcessTransport::backend_kernels;
#else
constexpr InProcessTransport kTransport = InProcessTransport::host_tasks;
#endif

std::shared_ptr<ThreadPool> shared_pool() {
  static std::shared_ptr<ThreadPool> pool = make_thread_pool(2);
  return pool;
}

// N ranks: backend, two streams and a communicator each.
struct World {
  explicit World(int n, std::chrono::milliseconds timeout = kDefaultCollectiveTimeout)
      : group(make_in_process_group(n, kTransport, timeout)) {
    for (int r = 0; r < n; ++r) {
      CpuBackendOptions opt;
      opt.pool = shared_pool();
      backends.push_back(make_cpu_backend(opt));
      streams.push_back(backends.back()->create_stream("comm" + std::to_string(r)));
      side.push_back(backends.back()->create_stream("side" + std::to_string(r)));
      comms.push_back(make_in_process_communicator(group, r, *backends.back()));
    }
  }
  int size() const { return static_cast<int>(comms.size()); }
  Backend& backend(int r) { return *backends[static_cast<std::size_t>(r)]; }
  Stream& stream(int r) { return *streams[static_cast<std::size_t>(r)]; }
  Stream& side_stream(int r) { return *side[static_cast<std::size_t>(r)]; }
  Communicator& comm(int r) { return *comms[static_cast<std::size_t>(r)]; }

  std::shared_ptr<InProcessGroup> group;
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Stream>> streams;
  std::vector<std::unique_ptr<Stream>> side;
  std::vector<std::unique_ptr<Communicator>> comms;
};

// Runs fn(rank) on n threads. A hang is a failure of the code under test, but a hung thread cannot
// be joined, so past the deadline the whole test binary stops with a message instead of hanging CTest.
void run_ranks(int n, const std::function<void(int)>& fn, std::chrono::seconds timeout = 300s) {
  std::mutex m;
  std::condition_variable cv;
  int finished = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << " threw: " << e.what();
      }
      std::lock_guard<std::mutex> lock(m);
      ++finished;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(m);
    if (!cv.wait_for(lock, timeout, [&] { return finished == n; })) {
      std::fprintf(stderr, "FATAL: %d of %d ranks did not finish within %lld s (deadlock?)\n", n - finished, n,
                   static_cast<long long>(timeout.count()));
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  for (auto& t : threads) t.join();
}

// A host buffer of n elements of one dtype, with a guard zone after it that must stay untouched.
constexpr std::size_t kGuard = 5;
constexpr std::uint16_t kGuard16 = 0x7bcd;
constexpr std::uint32_t kGuard32 = 0x7f3c5a5au;  // a NaN pattern no computed result produces

struct Buf {
  Buf(DType t, std::size_t n) : dtype(t), size(n) {
    if (t == DType::fp32)
      f32.assign(n + kGuard, bits_float(kGuard32));
    else
      u16.assign(n + kGuard, kGuard16);
  }
  void* data() { return dtype == DType::fp32 ? static_cast<void*>(f32.data()) : static_cast<void*>(u16.data()); }
  void* at(std::size_t i) { return static_cast<unsigned char*>(data()) + i * size_of(dtype); }
  void set(std::size_t i, double v) { store_from_float(data(), dtype, i, static_cast<float>(v)); }
  std::uint32_t bits(std::size_t i) const {
    return dtype == DType::fp32 ? float_bits(f32[i]) : static_cast<std::uint32_t>(u16[i]);
  }
  bool guard_intact() const {
    for (std::size_t i = size; i < size + kGuard; ++i)
      if (bits(i) != (dtype == DType::fp32 ? kGuard32 : kGuard16)) return false;
    return true;
  }

  DType dtype;
  std::size_t size;
  std::vector<float> f32;
  std::vector<std::uint16_t> u16;
};

// The bits of v in dtype t. Only called with values exactly representable in t, where the
// conversion is exact and cannot hide a rounding difference.
std::uint32_t bits_of(DType t, double v) {
  const auto f = static_cast<float>(v);
  EXPECT_EQ(static_cast<double>(f), v) << "test bug: " << v << " is not exact in fp32";
  switch (t) {
    case DType::fp32: return float_bits(f);
    case DType::fp16: return float_to_fp16(f);
    default: return float_to_bf16(f);
  }
}

// Collects the first few mismatches of one rank so a failure names what went wrong.
struct Checker {
  explicit Checker(std::string w) : where(std::move(w)) {}
  Checker(const Checker&) = delete;
  Checker& operator=(const Checker&) = delete;
  std::string where;
  int mismatches = 0;
  std::string first;
  void expect(std::uint32_t got, std::uint32_t want, std::size_t i, const char* what) {
    if (got == want) return;
    if (++mismatches <= 3) {
      char line[160];
      std::snprintf(line, sizeof line, "  %s[%zu]: got 0x%x want 0x%x\n", what, i, got, want);
      first += line;
    }
  }
  void guard(const Buf& b, const char* what) {
    if (!b.guard_intact()) {
      ++mismatches;
      first += std::string("  ") + what + ": wrote past the end\n";
    }
  }
  ~Checker() { EXPECT_EQ(mismatches, 0) << where << "\n" << first; }
};

// Small integers, multiples of the world size n, with |v| <= 4n: a sum over n <= 8 ranks stays
// within +-256 (exact even in bf16) and is a multiple of n, so avg is an exact integer too.
double value(int q, std::size_t i, int n, int salt) {
  const auto k = static_cast<int>((i * 7 + static_cast<std::size_t>(q) * 3 + static_cast<std::size_t>(salt)) % 9);
  return static_cast<double>((k - 4) * n);
}

double fold(ReduceOp op, int n, const std::function<double(int)>& x) {
  double acc = x(0);
  for (int q = 1; q < n; ++q) acc = op == ReduceOp::max ? std::max(acc, x(q)) : acc + x(q);
  return op == ReduceOp::avg ? acc / n : acc;
}

const char* op_name(ReduceOp op) { return op == ReduceOp::sum ? "sum" : op == ReduceOp::avg ? "avg" : "max"; }

void expect_code(const std::function<void()>& fn, ErrorCode code, const std::string& context) {
  try {
    fn();
    ADD_FAILURE() << context << ": expected Error(" << to_string(code) << "), nothing was thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << context << ": " << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// The sweep: every op x dtype x count x in-place form, for one world size per test instance.

class Sweep : public ::testing::TestWithParam<int> {};

TEST_P(Sweep, EveryCollectiveBitExact) {
  const int n = GetParam();
  World w(n);
  const std::size_t counts[] = {0, 1, 7, 4096 + 3};
  const DType dtypes[] = {DType::fp32, DType::fp16, DType::bf16};
  const ReduceOp ops[] = {ReduceOp::sum, ReduceOp::avg, ReduceOp::max};

  run_ranks(n, [&](int r) {
    Backend& be = w.backend(r);
    Stream& st = w.stream(r);
    Communicator& comm = w.comm(r);
    EXPECT_EQ(comm.rank(), r);
    EXPECT_EQ(comm.size(), n);
    int salt = 0;
    for (DType t : dtypes) {
      for (std::size_t c : counts) {
        for (bool in_place : {false, true}) {
          const std::string tag = std::string(name_of(t)) + " count=" + std::to_string(c) + " world=" +
                                  std::to_string(n) + " rank=" + std::to_string(r) +
                                  (in_place ? " in place" : "");
          // reduce_scatter
          for (ReduceOp op : ops) {
            ++salt;
            Buf send(t, static_cast<std::size_t>(n) * c);
            for (std::size_t i = 0; i < send.size; ++i) send.set(i, value(r, i, n, salt));
            Buf recv(t, c);
            void* out = in_place ? send.at(static_cast<std::size_t>(r) * c) : recv.data();
            comm.reduce_scatter(send.data(), out, c, t, op, st);
            be.synchronize(st);
            Checker ck{"reduce_scatter " + std::string(op_name(op)) + " " + tag};
            const Buf& res = in_place ? send : recv;
            const std::size_t base = in_place ? static_cast<std::size_t>(r) * c : 0;
            for (std::size_t i = 0; i < c; ++i) {
              const double want = fold(op, n, [&](int q) { return value(q, static_cast<std::size_t>(r) * c + i, n, salt); });
              ck.expect(res.bits(base + i), bits_of(t, want), i, "recv");
            }
            // The rest of send is input only: it must be as it was.
            for (std::size_t i = 0; i < send.size; ++i) {
              if (in_place && i >= base && i < base + c) continue;
              ck.expect(send.bits(i), bits_of(t, value(r, i, n, salt)), i, "send");
            }
            ck.guard(send, "send");
            ck.guard(recv, "recv");
          }
          // all_gather
          {
            ++salt;
            Buf recv(t, static_cast<std::size_t>(n) * c);
            Buf send(t, c);
            Buf& src = in_place ? recv : send;
            const std::size_t base = in_place ? static_cast<std::size_t>(r) * c : 0;
            for (std::size_t i = 0; i < c; ++i) src.set(base + i, value(r, i, n, salt));
            comm.all_gather(src.at(base), recv.data(), c, t, st);
            be.synchronize(st);
            Checker ck{"all_gather " + tag};
            for (int q = 0; q < n; ++q)
              for (std::size_t i = 0; i < c; ++i)
                ck.expect(recv.bits(static_cast<std::size_t>(q) * c + i), bits_of(t, value(q, i, n, salt)),
                          static_cast<std::size_t>(q) * c + i, "recv");
            ck.guard(send, "send");
            ck.guard(recv, "recv");
          }
          // all_reduce
          for (ReduceOp op : ops) {
            ++salt;
            Buf send(t, c);
            for (std::size_t i = 0; i < c; ++i) send.set(i, value(r, i, n, salt));
            Buf recv(t, c);
            Buf& dst = in_place ? send : recv;
            comm.all_reduce(send.data(), dst.data(), c, t, op, st);
            be.synchronize(st);
            Checker ck{"all_reduce " + std::string(op_name(op)) + " " + tag};
            for (std::size_t i = 0; i < c; ++i) {
              const double want = fold(op, n, [&](int q) { return value(q, i, n, salt); });
              ck.expect(dst.bits(i), bits_of(t, want), i, "recv");
              if (!in_place) ck.expect(send.bits(i), bits_of(t, value(r, i, n, salt)), i, "send");
            }
            ck.guard(send, "send");
            ck.guard(recv, "recv");
          }
          // broadcast from every root
          for (int root = 0; root < n; ++root) {
            ++salt;
            Buf send(t, c);
            Buf recv(t, c);
            Buf& src = in_place ? recv : send;
            for (std::size_t i = 0; i < c; ++i) src.set(i, value(r, i, n, salt));
            comm.broadcast(src.data(), recv.data(), c, t, root, st);
            be.synchronize(st);
            Checker ck{"broadcast root=" + std::to_string(root) + " " + tag};
            for (std::size_t i = 0; i < c; ++i) {
              ck.expect(recv.bits(i), bits_of(t, value(root, i, n, salt)), i, "recv");
              if (!in_place) ck.expect(send.bits(i), bits_of(t, value(r, i, n, salt)), i, "send");
            }
            ck.guard(send, "send");
            ck.guard(recv, "recv");
          }
        }
      }
    }
    comm.barrier(st);
    be.synchronize(st);
  });
}

INSTANTIATE_TEST_SUITE_P(World, Sweep, ::testing::Range(1, 9), [](const ::testing::TestParamInfo<int>& p) {
  return "n" + std::to_string(p.param);
});

// ---------------------------------------------------------------------------------------------
// Arithmetic: rank order, fp32 accumulation of 16-bit inputs, NaN.

std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer: a fixed, portable pseudo-random stream
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Non-integer values of mixed magnitude, so fp32 sums round and the order of additions matters.
float noisy(int rank, std::size_t i) {
  const std::uint64_t h = mix((static_cast<std::uint64_t>(rank) << 40) ^ i);
  const double unit = static_cast<double>(h >> 11) / 9007199254740992.0;  // [0, 1)
  const int scale = static_cast<int>(h & 7) * 3 - 9;                     // 2^-9 .. 2^12
  return static_cast<float>((unit - 0.5) * std::ldexp(1.0, scale));
}

TEST(InProcessComm, DeterministicRankOrderFp32) {
  for (int n : {2, 3, 5, 8}) {
    World w(n);
    const std::size_t c = 3001;
    // Each rank's result from two identical runs, to compare across ranks afterwards.
    std::vector<std::vector<std::uint32_t>> first(static_cast<std::size_t>(n));
    run_ranks(n, [&](int r) {
      Backend& be = w.backend(r);
      Stream& st = w.stream(r);
      std::vector<float> send(c), a(c), b(c), rs_a(c), rs_b(c), rs_send(static_cast<std::size_t>(n) * c);
      for (std::size_t i = 0; i < c; ++i) send[i] = noisy(r, i);
      for (std::size_t i = 0; i < rs_send.size(); ++i) rs_send[i] = noisy(r + 100, i);
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg}) {
        w.comm(r).all_reduce(send.data(), a.data(), c, DType::fp32, op, st);
        w.comm(r).all_reduce(send.data(), b.data(), c, DType::fp32, op, st);
        w.comm(r).reduce_scatter(rs_send.data(), rs_a.data(), c, DType::fp32, op, st);
        w.comm(r).reduce_scatter(rs_send.data(), rs_b.data(), c, DType::fp32, op, st);
        be.synchronize(st);
        Checker ck{"fp32 rank order, world " + std::to_string(n) + " rank " + std::to_string(r) + " " + op_name(op)};
        for (std::size_t i = 0; i < c; ++i) {
          // The contract: fp32 additions in rank order 0..n-1, then (avg) one fp32 division.
          float acc = noisy(0, i);
          for (int q = 1; q < n; ++q) acc += noisy(q, i);
          if (op == ReduceOp::avg) acc /= static_cast<float>(n);
          ck.expect(float_bits(a[i]), float_bits(acc), i, "all_reduce");
          ck.expect(float_bits(b[i]), float_bits(a[i]), i, "all_reduce rerun");
          const std::size_t j = static_cast<std::size_t>(r) * c + i;
          float racc = noisy(100, j);
          for (int q = 1; q < n; ++q) racc += noisy(q + 100, j);
          if (op == ReduceOp::avg) racc /= static_cast<float>(n);
          ck.expect(float_bits(rs_a[i]), float_bits(racc), i, "reduce_scatter");
          ck.expect(float_bits(rs_b[i]), float_bits(rs_a[i]), i, "reduce_scatter rerun");
        }
        if (op == ReduceOp::sum) {
          auto& mine = first[static_cast<std::size_t>(r)];
          for (float v : a) mine.push_back(float_bits(v));
        }
      }
    });
    for (int r = 1; r < n; ++r) EXPECT_EQ(first[static_cast<std::size_t>(r)], first[0]) << "rank " << r << " differs from rank 0";
  }
}

TEST(InProcessComm, OrderMattersCaseFollowsRankOrder) {
  // (1e8 + 1) - 1e8 is 0 in fp32 (1e8 + 1 rounds back to 1e8); any other order gives 1.
  World w(3);
  const float in[3] = {1e8f, 1.0f, -1e8f};
  std::vector<float> out(3, -7.0f);
  run_ranks(3, [&](int r) {
    float send = in[r];
    w.comm(r).all_reduce(&send, &out[static_cast<std::size_t>(r)], 1, DType::fp32, ReduceOp::sum, w.stream(r));
    w.backend(r).synchronize(w.stream(r));
  });
  for (float v : out) EXPECT_EQ(float_bits(v), float_bits(0.0f));
}

TEST(InProcessComm, SixteenBitSumsAccumulateInFp32) {
  // bf16: 256 + 7 ones. Rounding after every addition keeps 256 (257 ties to even 256); the fp32
  // sum 263 rounded once is 264 (ties to even). avg: 263/8 = 32.875 -> 33; naive 256/8 = 32.
  // fp16: 2048 + 7 ones, spacing 2 at 2048: naive 2048, once-rounded 2055 -> 2056; avg 256.875 -> 257
  // (spacing 0.25 there, ties to even); naive 2048/8 = 256.
  struct Case {
    DType t;
    float big;
    std::uint16_t sum_bits, naive_sum_bits, avg_bits;
  };
  const Case cases[] = {
      {DType::bf16, 256.0f, 0x4384 /*264*/, 0x4380 /*256*/, 0x4204 /*33*/},
      {DType::fp16, 2048.0f, 0x6804 /*2056*/, 0x6800 /*2048*/, 0x5c04 /*257*/},
  };
  for (const Case& k : cases) {
    // The hard-coded bits were derived by hand; confirm them against the converters.
    ASSERT_EQ(k.t == DType::bf16 ? float_to_bf16(264.0f) : float_to_fp16(2056.0f), k.sum_bits);
    ASSERT_EQ(k.t == DType::bf16 ? float_to_bf16(k.big) : float_to_fp16(k.big), k.naive_sum_bits);
    ASSERT_EQ(k.t == DType::bf16 ? float_to_bf16(33.0f) : float_to_fp16(257.0f), k.avg_bits);
    const int n = 8;
    World w(n);
    std::vector<std::uint16_t> sum(n), avg(n), rs(n);
    run_ranks(n, [&](int r) {
      std::uint16_t x = k.t == DType::bf16 ? float_to_bf16(r == 0 ? k.big : 1.0f) : float_to_fp16(r == 0 ? k.big : 1.0f);
      // reduce_scatter with recv_count 1: every block holds the same values.
      std::vector<std::uint16_t> xs(n, x);
      auto& st = w.stream(r);
      const auto i = static_cast<std::size_t>(r);
      w.comm(r).all_reduce(&x, &sum[i], 1, k.t, ReduceOp::sum, st);
      w.comm(r).all_reduce(&x, &avg[i], 1, k.t, ReduceOp::avg, st);
      w.comm(r).reduce_scatter(xs.data(), &rs[i], 1, k.t, ReduceOp::sum, st);
      w.backend(r).synchronize(st);
    });
    for (int r = 0; r < n; ++r) {
      const auto i = static_cast<std::size_t>(r);
      EXPECT_EQ(sum[i], k.sum_bits) << name_of(k.t) << " rank " << r;
      EXPECT_NE(sum[i], k.naive_sum_bits);
      EXPECT_EQ(avg[i], k.avg_bits) << name_of(k.t) << " rank " << r;
      EXPECT_EQ(rs[i], k.sum_bits) << name_of(k.t) << " rank " << r;
    }
  }
}

TEST(InProcessComm, Random16BitMatchesFp32RankOrder) {
  const int n = 6;
  const std::size_t c = 2049;
  World w(n);
  for (DType t : {DType::bf16, DType::fp16}) {
    auto enc = [&](float v) { return t == DType::bf16 ? float_to_bf16(v) : float_to_fp16(v); };
    auto dec = [&](std::uint16_t h) { return t == DType::bf16 ? bf16_to_float(h) : fp16_to_float(h); };
    run_ranks(n, [&](int r) {
      std::vector<std::uint16_t> send(c), out(c);
      for (std::size_t i = 0; i < c; ++i) send[i] = enc(noisy(r, i) / 16.0f);
      w.comm(r).all_reduce(send.data(), out.data(), c, t, ReduceOp::avg, w.stream(r));
      w.backend(r).synchronize(w.stream(r));
      Checker ck{std::string(name_of(t)) + " avg rank " + std::to_string(r)};
      for (std::size_t i = 0; i < c; ++i) {
        float acc = dec(enc(noisy(0, i) / 16.0f));
        for (int q = 1; q < n; ++q) acc += dec(enc(noisy(q, i) / 16.0f));
        ck.expect(out[i], enc(acc / static_cast<float>(n)), i, "all_reduce");
      }
    });
  }
}

TEST(InProcessComm, MaxPropagatesNaN) {
  const int n = 4;
  World w(n);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // Element i: rank q contributes in[q][i]. Columns: NaN on the last rank, NaN on the first,
  // -inf everywhere but one finite value, all -0/+0 mix, plain.
  const float in[4][5] = {{1, nan, -inf, -0.0f, 3},
                          {2, 5, -inf, 0.0f, -4},
                          {3, 6, -2.5f, -0.0f, 9},
                          {nan, 7, -inf, 0.0f, 1}};
  for (DType t : {DType::fp32, DType::fp16, DType::bf16}) {
    std::vector<Buf> outs;
    for (int r = 0; r < n; ++r) outs.emplace_back(t, 5);
    run_ranks(n, [&](int r) {
      Buf send(t, 5);
      for (std::size_t i = 0; i < 5; ++i) send.set(i, in[r][i]);
      w.comm(r).all_reduce(send.data(), outs[static_cast<std::size_t>(r)].data(), 5, t, ReduceOp::max, w.stream(r));
      w.backend(r).synchronize(w.stream(r));
    });
    for (int r = 0; r < n; ++r) {
      const Buf& o = outs[static_cast<std::size_t>(r)];
      const float got0 = load_as_float(o.f32.empty() ? static_cast<const void*>(o.u16.data()) : o.f32.data(), t, 0);
      const float got1 = load_as_float(o.f32.empty() ? static_cast<const void*>(o.u16.data()) : o.f32.data(), t, 1);
      EXPECT_TRUE(std::isnan(got0)) << name_of(t);
      EXPECT_TRUE(std::isnan(got1)) << name_of(t);
      EXPECT_EQ(o.bits(2), bits_of(t, -2.5));
      EXPECT_EQ(load_as_float(o.f32.empty() ? static_cast<const void*>(o.u16.data()) : o.f32.data(), t, 3), 0.0f);
      EXPECT_EQ(o.bits(4), bits_of(t, 9));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Streams: many collectives queued without synchronizing, and two streams ordered by events.

TEST(InProcessComm, BackToBackWithoutSynchronizing) {
  for (int n : {2, 4, 7}) {
    World w(n);
    const std::size_t c = 257;
    const int rounds = 24;
    run_ranks(n, [&](int r) {
      Stream& st = w.stream(r);
      Communicator& comm = w.comm(r);
      const auto N = static_cast<std::size_t>(n);
      std::vector<std::vector<float>> a(rounds), s(rounds), g(rounds), b(rounds);
      for (int k = 0; k < rounds; ++k) {
        const auto K = static_cast<std::size_t>(k);
        a[K].resize(N * c);
        for (std::size_t i = 0; i < N * c; ++i) a[K][i] = static_cast<float>(value(r, i, n, k));
        s[K].assign(c, -1.0f);
        g[K].assign(N * c, -1.0f);
        b[K].resize(c);
        for (std::size_t i = 0; i < c; ++i) b[K][i] = static_cast<float>(value(r, i, n, 50 + k));
      }
      for (int k = 0; k < rounds; ++k) {
        const auto K = static_cast<std::size_t>(k);
        // all_gather reads what the reduce_scatter just wrote; all_reduce reads what the
        // broadcast wrote in place: stream order alone must make both see the new values.
        comm.reduce_scatter(a[K].data(), s[K].data(), c, DType::fp32, ReduceOp::sum, st);
        comm.all_gather(s[K].data(), g[K].data(), c, DType::fp32, st);
        comm.broadcast(b[K].data(), b[K].data(), c, DType::fp32, k % n, st);
        comm.all_reduce(b[K].data(), b[K].data(), c, DType::fp32, ReduceOp::sum, st);
      }
      w.backend(r).synchronize(st);
      Checker ck{"back to back, world " + std::to_string(n) + " rank " + std::to_string(r)};
      for (int k = 0; k < rounds; ++k) {
        const auto K = static_cast<std::size_t>(k);
        for (std::size_t j = 0; j < N * c; ++j) {
          const double want = fold(ReduceOp::sum, n, [&](int q) { return value(q, j, n, k); });
          ck.expect(float_bits(g[K][j]), bits_of(DType::fp32, want), j, "gathered");
        }
        for (std::size_t i = 0; i < c; ++i)
          ck.expect(float_bits(b[K][i]), bits_of(DType::fp32, n * value(k % n, i, n, 50 + k)), i, "bcast+sum");
      }
    });
  }
}

TEST(InProcessComm, TwoStreamsOrderedByEvents) {
  const int n = 5;
  World w(n);
  const std::size_t c = 4099;
  run_ranks(n, [&](int r) {
    Backend& be = w.backend(r);
    const auto N = static_cast<std::size_t>(n);
    std::vector<float> a(N * c), s(c, -1.0f), g(N * c, -1.0f), x(c), y(c), xo(c), yo(c);
    for (std::size_t i = 0; i < N * c; ++i) a[i] = static_cast<float>(value(r, i, n, 3));
    for (std::size_t i = 0; i < c; ++i) {
      x[i] = static_cast<float>(value(r, i, n, 4));
      y[i] = static_cast<float>(value(r, i, n, 5));
    }
    auto ev = be.create_event();
    // Dependent: the gather on the side stream must see the reduce_scatter of the main stream.
    w.comm(r).reduce_scatter(a.data(), s.data(), c, DType::fp32, ReduceOp::sum, w.stream(r));
    be.record(*ev, w.stream(r));
    be.wait(w.side_stream(r), *ev);
    w.comm(r).all_gather(s.data(), g.data(), c, DType::fp32, w.side_stream(r));
    // Independent: two collectives in flight at once, one per stream.
    w.comm(r).all_reduce(x.data(), xo.data(), c, DType::fp32, ReduceOp::max, w.stream(r));
    w.comm(r).all_reduce(y.data(), yo.data(), c, DType::fp32, ReduceOp::avg, w.side_stream(r));
    be.synchronize(w.side_stream(r));
    be.synchronize(w.stream(r));
    Checker ck{"two streams rank " + std::to_string(r)};
    for (std::size_t j = 0; j < N * c; ++j)
      ck.expect(float_bits(g[j]), bits_of(DType::fp32, fold(ReduceOp::sum, n, [&](int q) { return value(q, j, n, 3); })), j, "g");
    for (std::size_t i = 0; i < c; ++i) {
      ck.expect(float_bits(xo[i]), bits_of(DType::fp32, fold(ReduceOp::max, n, [&](int q) { return value(q, i, n, 4); })), i, "x");
      ck.expect(float_bits(yo[i]), bits_of(DType::fp32, fold(ReduceOp::avg, n, [&](int q) { return value(q, i, n, 5); })), i, "y");
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Stats

TEST(InProcessComm, StatsCountCallsAndZeroVolume) {
  EXPECT_EQ(name_of(CollectiveKind::reduce_scatter), "reduce_scatter");
  EXPECT_EQ(name_of(CollectiveKind::all_gather), "all_gather");
  EXPECT_EQ(name_of(CollectiveKind::all_reduce), "all_reduce");
  EXPECT_EQ(name_of(CollectiveKind::broadcast), "broadcast");
  EXPECT_EQ(name_of(CollectiveKind::barrier), "barrier");

  const int n = 3;
  World w(n);
  run_ranks(n, [&](int r) {
    Stream& st = w.stream(r);
    Communicator& comm = w.comm(r);
    std::vector<std::uint16_t> big(3 * 10), small(10);
    std::vector<float> f(12);
    comm.reduce_scatter(big.data(), small.data(), 10, DType::bf16, ReduceOp::sum, st);  // 3*10*2 = 60
    comm.reduce_scatter(big.data(), small.data(), 10, DType::fp16, ReduceOp::avg, st);  // 60
    comm.all_gather(small.data(), big.data(), 10, DType::bf16, st);                      // 60
    comm.all_reduce(f.data(), f.data(), 12, DType::fp32, ReduceOp::sum, st);             // 2*48 = 96
    comm.broadcast(f.data(), f.data(), 12, DType::fp32, 1, st);                          // 48
    comm.broadcast(f.data(), f.data(), 0, DType::fp32, 2, st);                           // 0
    comm.barrier(st);
    comm.barrier(st);
    const CommStats s = comm.stats();  // counted at enqueue: no synchronize needed first
    auto k = [](CollectiveKind c) { return static_cast<std::size_t>(c); };
    EXPECT_EQ(s.calls[k(CollectiveKind::reduce_scatter)], 2u);
    EXPECT_EQ(s.bytes[k(CollectiveKind::reduce_scatter)], 120u);
    EXPECT_EQ(s.calls[k(CollectiveKind::all_gather)], 1u);
    EXPECT_EQ(s.bytes[k(CollectiveKind::all_gather)], 60u);
    EXPECT_EQ(s.calls[k(CollectiveKind::all_reduce)], 1u);
    EXPECT_EQ(s.bytes[k(CollectiveKind::all_reduce)], 96u);
    EXPECT_EQ(s.calls[k(CollectiveKind::broadcast)], 2u);
    EXPECT_EQ(s.bytes[k(CollectiveKind::broadcast)], 48u);
    EXPECT_EQ(s.calls[k(CollectiveKind::barrier)], 2u);
    EXPECT_EQ(s.bytes[k(CollectiveKind::barrier)], 0u);
    EXPECT_EQ(s.total_bytes(), 120u + 60u + 96u + 48u);
    w.backend(r).synchronize(st);
    comm.reset_stats();
    const CommStats z = comm.stats();
    EXPECT_EQ(z.total_bytes(), 0u);
    for (auto v : z.calls) EXPECT_EQ(v, 0u);
  });
}

// ---------------------------------------------------------------------------------------------
// Failures: disagreements between ranks and bad arguments raise errors on every rank, never hang.

// A failure of the group reaches a rank from the collective call itself (backend_kernels, which
// meets the peers when the call is issued) or from the next synchronize of its stream
// (host_tasks, which meets them in stream order): expect it from exactly one of the two. The
// stream is drained either way (work issued before the failed call may still be running).
void expect_comm_failure(const std::function<void()>& issue, Backend& be, Stream& st, const std::string& context,
                         const std::string& must_mention = "") {
  int failures = 0;
  const auto check = [&](const Error& e, const char* from) {
    ++failures;
    EXPECT_EQ(e.code(), ErrorCode::communication) << context << " (" << from << "): " << e.what();
    if (!must_mention.empty()) {
      EXPECT_NE(e.message().find(must_mention), std::string::npos) << context << " (" << from << "): " << e.message();
    }
  };
  try {
    issue();
  } catch (const Error& e) {
    check(e, "the call");
  }
  try {
    be.synchronize(st);
  } catch (const Error& e) {
    check(e, "synchronize");
  }
  EXPECT_EQ(failures, 1) << context << ": expected one error, from the call or from the synchronize after it";
}

// Every rank runs `issue`; each must see a communication error naming `must_mention`.
// Afterwards the group is aborted: a further barrier fails too.
void expect_group_failure(int n, const std::function<void(World&, int)>& issue, const std::string& what,
                          const std::string& must_mention = "") {
  World w(n);
  run_ranks(
      n,
      [&](int r) {
        expect_comm_failure([&] { issue(w, r); }, w.backend(r), w.stream(r),
                            what + ": rank " + std::to_string(r), must_mention);
        expect_comm_failure([&] { w.comm(r).barrier(w.stream(r)); }, w.backend(r), w.stream(r),
                            what + ": barrier after the abort on rank " + std::to_string(r));
      },
      60s);
}

TEST(InProcessComm, MismatchedCountFailsEveryRank) {
  std::vector<float> bufs(8 * 16);
  expect_group_failure(
      4,
      [&](World& w, int r) {
        float* p = bufs.data() + r * 16;
        w.comm(r).all_reduce(p, p, r == 1 ? 8 : 7, DType::fp32, ReduceOp::sum, w.stream(r));
      },
      "count mismatch", "count=8");
}

TEST(InProcessComm, MismatchedDtypeOpKindRootFailEveryRank) {
  std::vector<float> bufs(8 * 64);
  auto p = [&](int r) { return bufs.data() + r * 64; };
  expect_group_failure(3, [&](World& w, int r) {
    w.comm(r).all_reduce(p(r), p(r), 4, r == 2 ? DType::bf16 : DType::fp32, ReduceOp::sum, w.stream(r));
  }, "dtype mismatch", "bf16");
  expect_group_failure(3, [&](World& w, int r) {
    w.comm(r).all_reduce(p(r), p(r), 4, DType::fp32, r == 0 ? ReduceOp::max : ReduceOp::sum, w.stream(r));
  }, "op mismatch", "max");
  expect_group_failure(3, [&](World& w, int r) {
    if (r == 0)
      w.comm(r).broadcast(p(r), p(r), 4, DType::fp32, 0, w.stream(r));
    else
      w.comm(r).all_reduce(p(r), p(r), 4, DType::fp32, ReduceOp::sum, w.stream(r));
  }, "kind mismatch", "broadcast");
  expect_group_failure(3, [&](World& w, int r) {
    w.comm(r).broadcast(p(r), p(r), 4, DType::fp32, r == 1 ? 2 : 0, w.stream(r));
  }, "root mismatch", "root=2");
  expect_group_failure(2, [&](World& w, int r) {
    if (r == 0)
      w.comm(r).barrier(w.stream(r));
    else
      w.comm(r).all_gather(p(r), p(r + 2), 0, DType::fp32, w.stream(r));
  }, "barrier vs all_gather");
}

TEST(InProcessComm, BadArgumentOnOneRankFailsThePeersInStreamOrder) {
  const int n = 4;
  const std::size_t c = 33;
  World w(n);
  run_ranks(
      n,
      [&](int r) {
        Stream& st = w.stream(r);
        std::vector<float> x(c, static_cast<float>(r + 1)), y(c, 0.0f);
        // An earlier collective that every rank issues correctly must still complete.
        w.comm(r).all_reduce(x.data(), y.data(), c, DType::fp32, ReduceOp::sum, st);
        if (r == 2) {
          try {
            w.comm(r).all_reduce(nullptr, x.data(), c, DType::fp32, ReduceOp::sum, st);
            ADD_FAILURE() << "null send was accepted";
          } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
            EXPECT_NE(e.message().find("rank 2"), std::string::npos) << e.message();
            EXPECT_NE(e.message().find("send is null"), std::string::npos) << e.message();
          }
          EXPECT_NO_THROW(w.backend(r).synchronize(st));
        } else {
          expect_comm_failure([&] { w.comm(r).all_reduce(x.data(), x.data(), c, DType::fp32, ReduceOp::sum, st); },
                              w.backend(r), st, "peer of the rank with a null pointer, rank " + std::to_string(r),
                              "send is null");
        }
        for (std::size_t i = 0; i < c; ++i) EXPECT_EQ(y[i], 10.0f) << "first all_reduce, rank " << r;
      },
      60s);
}

TEST(InProcessComm, BadArgumentsAreRejected) {
  expect_code([] { make_in_process_group(0); }, ErrorCode::invalid_argument, "world_size 0");
  expect_code([] { make_in_process_group(-3); }, ErrorCode::invalid_argument, "world_size -3");
  expect_code([] { make_in_process_group(1 << 30); }, ErrorCode::invalid_argument, "world_size 2^30");
  auto backend = make_cpu_backend(CpuBackendOptions{shared_pool()});
  auto group = make_in_process_group(2);
  expect_code([&] { make_in_process_communicator(nullptr, 0, *backend); }, ErrorCode::invalid_argument, "null group");
  expect_code([&] { make_in_process_communicator(group, -1, *backend); }, ErrorCode::invalid_argument, "rank -1");
  expect_code([&] { make_in_process_communicator(group, 2, *backend); }, ErrorCode::invalid_argument, "rank 2 of 2");
  {
    auto c0 = make_in_process_communicator(group, 0, *backend);
    expect_code([&] { make_in_process_communicator(group, 0, *backend); }, ErrorCode::invalid_argument,
                "a second communicator for rank 0");
  }
  // Once the first is gone the rank may be bound again.
  EXPECT_NO_THROW(make_in_process_communicator(group, 0, *backend));

  // Each refused call aborts its group (so peers cannot hang): one fresh world per case.
  const std::size_t c = 8;
  struct BadCall {
    const char* name;
    std::function<void(Communicator&, Stream&, float*, float*)> call;
  };
  const BadCall bad[] = {
      {"broadcast root 2", [](Communicator& m, Stream& s, float* a, float* b) { m.broadcast(a, b, c, DType::fp32, 2, s); }},
      {"broadcast root -1", [](Communicator& m, Stream& s, float* a, float* b) { m.broadcast(a, b, 0, DType::fp32, -1, s); }},
      {"reduce_scatter null recv", [](Communicator& m, Stream& s, float* a, float*) { m.reduce_scatter(a, nullptr, c, DType::fp32, ReduceOp::sum, s); }},
      {"all_gather null send", [](Communicator& m, Stream& s, float*, float* b) { m.all_gather(nullptr, b, c, DType::fp32, s); }},
      {"broadcast null recv", [](Communicator& m, Stream& s, float* a, float*) { m.broadcast(a, nullptr, c, DType::fp32, 0, s); }},
      {"all_reduce partial overlap", [](Communicator& m, Stream& s, float* a, float*) { m.all_reduce(a, a + 1, c, DType::fp32, ReduceOp::sum, s); }},
      {"reduce_scatter recv at the wrong block", [](Communicator& m, Stream& s, float* a, float*) { m.reduce_scatter(a, a + 1, c, DType::fp32, ReduceOp::sum, s); }},
      {"all_gather send at the wrong block", [](Communicator& m, Stream& s, float*, float* b) { m.all_gather(b + 1, b, c, DType::fp32, s); }},
  };
  for (const BadCall& b : bad) {
    World w(2);
    run_ranks(
        2,
        [&](int r) {
          std::vector<float> x(4 * c, 1.0f), y(4 * c, 0.0f);
          // Rank 0 makes the bad call; rank 1 a valid broadcast, and must fail instead of hanging.
          if (r == 0) {
            expect_code([&] { b.call(w.comm(0), w.stream(0), x.data(), y.data()); }, ErrorCode::invalid_argument, b.name);
            EXPECT_NO_THROW(w.backend(0).synchronize(w.stream(0))) << b.name;
          } else {
            expect_comm_failure([&] { w.comm(1).broadcast(x.data(), y.data(), c, DType::fp32, 0, w.stream(1)); },
                                w.backend(1), w.stream(1), std::string("peer of ") + b.name);
          }
        },
        60s);
  }
  // Zero counts accept null pointers.
  World w(2);
  run_ranks(2, [&](int r) {
    w.comm(r).all_reduce(nullptr, nullptr, 0, DType::bf16, ReduceOp::avg, w.stream(r));
    w.comm(r).reduce_scatter(nullptr, nullptr, 0, DType::fp16, ReduceOp::max, w.stream(r));
    w.comm(r).all_gather(nullptr, nullptr, 0, DType::fp32, w.stream(r));
    w.comm(r).broadcast(nullptr, nullptr, 0, DType::fp32, 1, w.stream(r));
    EXPECT_NO_THROW(w.backend(r).synchronize(w.stream(r)));
  });
}

// reduce_scatter_pieces against reduce_scatter of the same input packed into one buffer (zero
// where no piece lies), bit for bit: worlds 1-5, every dtype and op, counts 1 to 37 per rank, and
// piece layouts with gaps at the start, inside and at the end of blocks, pieces across block
// boundaries, one piece over everything, and no piece at all. Each piece lives in its own array.
TEST(InProcessComm, ReduceScatterPiecesEqualsThePackedReduceScatter) {
  for (int n : {1, 2, 3, 5})
    for (DType t : {DType::fp32, DType::bf16, DType::fp16})
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max})
        for (std::size_t c : {std::size_t(1), std::size_t(7), std::size_t(37)})
          for (int layout = 0; layout < 4; ++layout) {
            const std::string what = "world " + std::to_string(n) + " " + std::string(name_of(t)) + " op " +
                                     std::to_string(static_cast<int>(op)) + " count " + std::to_string(c) +
                                     " layout " + std::to_string(layout);
            const std::size_t total = static_cast<std::size_t>(n) * c;
            // The layout, the same on every rank: [offset, count) runs.
            std::vector<std::pair<std::size_t, std::size_t>> runs;
            if (layout == 1) runs.emplace_back(0, total);
            for (std::size_t pos = 1, k = 0; layout >= 2 && pos < total; ++k) {
              const std::size_t len = std::min(total - pos, 1 + (k * 5 + c) % (layout == 2 ? 4 : 13));
              runs.emplace_back(pos, len);
              pos += len + (k % 3);  // gaps of 0, 1 and 2 elements
            }
            World w(n);
            std::vector<std::vector<std::uint32_t>> got(n), want(n);
            run_ranks(n, [&](int r) {
              Buf packed(t, total);
              for (std::size_t i = 0; i < total; ++i) packed.set(i, 0.0);
              std::vector<Buf> arrays;
              std::vector<SendPiece> pieces;
              arrays.reserve(runs.size());
              for (std::size_t k = 0; k < runs.size(); ++k) {
                arrays.emplace_back(t, runs[k].second);
                for (std::size_t i = 0; i < runs[k].second; ++i) {
                  const double v = static_cast<double>((static_cast<int>(runs[k].first + i) * 7 + r * 3) % 17 - 8) / 8.0;
                  arrays.back().set(i, v);
                  packed.set(runs[k].first + i, v);
                }
              }
              for (std::size_t k = 0; k < runs.size(); ++k) pieces.push_back({runs[k].first, runs[k].second, arrays[k].data()});
              Buf a(t, c), b(t, c);
              w.comm(r).reduce_scatter(packed.data(), a.data(), c, t, op, w.stream(r));
              w.comm(r).reduce_scatter_pieces(pieces.data(), pieces.size(), b.data(), c, t, op, w.stream(r));
              w.backend(r).synchronize(w.stream(r));
              EXPECT_TRUE(b.guard_intact()) << what;
              for (std::size_t i = 0; i < c; ++i) {
                want[r].push_back(a.bits(i));
                got[r].push_back(b.bits(i));
              }
            });
            for (int r = 0; r < n; ++r) ASSERT_EQ(got[r], want[r]) << what << " rank " << r;
          }
}

TEST(InProcessComm, ReduceScatterPiecesRefusesBadPiecesAndRanksThatDisagree) {
  const std::size_t c = 8;
  std::vector<float> x(4 * c, 1.0f), y(c, 0.0f);
  struct Bad {
    const char* name;
    std::vector<SendPiece> pieces;
    const char* mention;
  };
  const Bad bad[] = {
      {"descending", {{4, 2, x.data()}, {1, 2, x.data() + 4}}, "ascend"},
      {"overlapping", {{0, 3, x.data()}, {2, 2, x.data() + 4}}, "ascend"},
      {"past the end", {{2 * c - 1, 2, x.data()}}, "outside"},
      {"no data", {{0, 2, nullptr}}, "no data"},
      {"empty piece", {{0, 0, x.data()}}, "no elements"},
      {"over recv", {{0, 4, y.data()}}, "overlaps recv"},
  };
  for (const Bad& b : bad) {
    World w(2);
    run_ranks(
        2,
        [&](int r) {
          if (r == 0) {
            try {
              w.comm(0).reduce_scatter_pieces(b.pieces.data(), b.pieces.size(), y.data(), c, DType::fp32, ReduceOp::sum,
                                              w.stream(0));
              ADD_FAILURE() << b.name << ": accepted";
            } catch (const Error& e) {
              EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << b.name << ": " << e.what();
              EXPECT_NE(e.message().find(b.mention), std::string::npos) << b.name << ": " << e.message();
            }
          } else {
            std::vector<float> z(c);
            expect_comm_failure([&] { w.comm(1).broadcast(z.data(), z.data(), c, DType::fp32, 0, w.stream(1)); },
                                w.backend(1), w.stream(1), std::string("peer of ") + b.name);
          }
        },
        60s);
  }
  // Ranks whose pieces differ (offsets or how many) fail every rank, naming it. (The pieces stay
  // valid until the collective has run, as the contract asks: it reads them in stream order.)
  std::vector<std::vector<float>> in(3, std::vector<float>(3 * c, 1.0f)), out(3, std::vector<float>(c));
  std::vector<std::vector<SendPiece>> p(3);
  for (int r = 0; r < 3; ++r) p[r] = {{0, 4, in[r].data()}, {r == 2 ? 6u : 5u, 4, in[r].data() + 8}};
  expect_group_failure(
      3,
      [&](World& w, int r) {
        w.comm(r).reduce_scatter_pieces(p[r].data(), p[r].size(), out[r].data(), c, DType::fp32, ReduceOp::sum,
                                        w.stream(r));
      },
      "pieces mismatch", "different pieces");
}

TEST(InProcessComm, FailedStreamDropsCollectiveAndPeersDoNotHang) {
  // A task that fails before the collective makes the CPU stream skip what follows it. With
  // host_tasks that is the collective itself: the peers must get an error rather than wait for a
  // rank that will never arrive. With backend_kernels the rank met its peers when it issued the
  // call, and only its own share is skipped: as with NCCL, the failure is that rank's alone, and
  // what matters is that nobody hangs.
  const int n = 3;
  World w(n);
  run_ranks(
      n,
      [&](int r) {
        std::vector<float> x(4, 1.0f);
        if (r == 1) w.backend(r).host_task(w.stream(r), [] { throw Error(ErrorCode::io_error, "injected failure"); });
        w.comm(r).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(r));
        if (kTransport == InProcessTransport::backend_kernels && r != 1) {
          EXPECT_NO_THROW(w.backend(r).synchronize(w.stream(r))) << "rank " << r;
          return;
        }
        try {
          w.backend(r).synchronize(w.stream(r));
          ADD_FAILURE() << "rank " << r << " synchronized without an error";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), r == 1 ? ErrorCode::io_error : ErrorCode::communication) << e.what();
        }
      },
      60s);
}

// No wait is unbounded: a rank that never issues a collective its peers wait for (it stalls, or
// stops issuing) makes them fail within the group's timeout, naming the collective and the rank.
TEST(InProcessComm, ARankThatNeverArrivesTimesOutEveryPeerNamingIt) {
  const int n = 3;
  World w(n, 300ms);
  std::vector<std::string> errors(n);
  std::vector<double> waited(n, 0);
  std::mutex mu;
  std::condition_variable cv;
  bool peers_done = false;
  run_ranks(
      n,
      [&](int r) {
        std::vector<float> x(4, 1.0f);
        w.comm(r).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(r));
        w.backend(r).synchronize(w.stream(r));
        if (r == 2) {
          // Stalls (never issues the second all_reduce) until the peers have given up.
          std::unique_lock<std::mutex> lock(mu);
          cv.wait_for(lock, 30s, [&] { return peers_done; });
          return;
        }
        const auto t0 = std::chrono::steady_clock::now();
        try {
          w.comm(r).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(r));
          w.backend(r).synchronize(w.stream(r));
        } catch (const Error& e) {
          errors[static_cast<std::size_t>(r)] = e.message();
          EXPECT_EQ(e.code(), ErrorCode::communication);
        }
        try {
          w.backend(r).synchronize(w.stream(r));  // drained either way
        } catch (const Error&) {
        }
        waited[static_cast<std::size_t>(r)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::lock_guard<std::mutex> lock(mu);
        if (r == 1) {
          peers_done = true;
          cv.notify_all();
        }
      },
      60s);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const std::string& e = errors[static_cast<std::size_t>(r)];
    // Rank 0 or 1 times out first and names the absent rank and the collective; the other is
    // woken by the abort, whose reason carries the same text.
    EXPECT_NE(e.find("timed out after 0.3 s"), std::string::npos) << e;
    EXPECT_NE(e.find("rank 2 did not arrive"), std::string::npos) << e;
    EXPECT_NE(e.find("collective #1"), std::string::npos) << e;
    EXPECT_NE(e.find("all_reduce"), std::string::npos) << e;
    EXPECT_LT(waited[static_cast<std::size_t>(r)], 20.0);
  }
  // The group is aborted: the stalled rank's next collective fails at once instead of waiting.
  std::vector<float> x(4, 1.0f);
  expect_comm_failure([&] { w.comm(2).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(2)); },
                      w.backend(2), w.stream(2), "the stalled rank after the abort", "timed out");
}

// A rank whose communicator is destroyed (its thread returned, threw and caught, or simply
// stopped) leaves the group: a peer that issues one more collective than it fails at once,
// naming it, instead of waiting for the timeout.
TEST(InProcessComm, ARankThatLeavesFailsItsPeersAtOnceNamingIt) {
  const int n = 3;
  World w(n);  // the default ten-minute timeout: only the departure can end this test in time
  std::vector<std::string> errors(n);
  std::mutex mu;
  std::condition_variable cv;
  int left = 0;
  run_ranks(
      n,
      [&](int r) {
        std::vector<float> x(4, 1.0f);
        w.comm(r).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(r));
        w.backend(r).synchronize(w.stream(r));
        if (r == 1) {
          w.comms[1].reset();  // leaves after one collective
          std::lock_guard<std::mutex> lock(mu);
          ++left;
          cv.notify_all();
          return;
        }
        if (r == 2) {  // issues the extra collective only once rank 1 is gone
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return left == 1; });
        }
        try {
          w.comm(r).all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(r));
          w.backend(r).synchronize(w.stream(r));
        } catch (const Error& e) {
          errors[static_cast<std::size_t>(r)] = e.message();
        }
        try {
          w.backend(r).synchronize(w.stream(r));
        } catch (const Error&) {
        }
      },
      60s);
  for (int r : {0, 2}) {
    const std::string& e = errors[static_cast<std::size_t>(r)];
    EXPECT_NE(e.find("rank 1 left the group"), std::string::npos) << "rank " << r << ": " << e;
  }
  // A communicator created again for rank 1 is a new member: the aborted group stays aborted.
  EXPECT_THROW(
      {
        std::vector<float> x(4, 1.0f);
        auto again = make_in_process_communicator(w.group, 1, w.backend(1));
        again->all_reduce(x.data(), x.data(), 4, DType::fp32, ReduceOp::sum, w.stream(1));
        w.backend(1).synchronize(w.stream(1));
      },
      Error);
}

TEST(InProcessComm, ATimeoutMustBePositive) {
  EXPECT_THROW(make_in_process_group(2, kTransport, std::chrono::milliseconds(0)), Error);
}

TEST(InProcessComm, TransportChoiceAndLimits) {
  EXPECT_EQ(name_of(InProcessTransport::automatic), "automatic");
  EXPECT_EQ(name_of(InProcessTransport::host_tasks), "host_tasks");
  EXPECT_EQ(name_of(InProcessTransport::backend_kernels), "backend_kernels");
  expect_code([] { make_in_process_group(2, static_cast<InProcessTransport>(9)); }, ErrorCode::invalid_argument,
              "unknown transport");
  auto backend = make_cpu_backend(CpuBackendOptions{shared_pool()});
  // The reduce kernel takes at most kMaxReduceOperands sources: a larger group is refused when a
  // rank binds, with a message naming the limit, instead of failing in the middle of a step.
  auto big = make_in_process_group(Backend::kMaxReduceOperands + 1, InProcessTransport::backend_kernels);
  try {
    make_in_process_communicator(big, 0, *backend);
    ADD_FAILURE() << "a backend_kernels group of " << Backend::kMaxReduceOperands + 1 << " ranks was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported) << e.what();
    EXPECT_NE(e.message().find(std::to_string(Backend::kMaxReduceOperands)), std::string::npos) << e.message();
  }
  // The same size over host_tasks is fine.
  auto big_host = make_in_process_group(Backend::kMaxReduceOperands + 1, InProcessTransport::host_tasks);
  EXPECT_NO_THROW(make_in_process_communicator(big_host, 0, *backend));
}

}  // namespace
}  // namespace shardopt
