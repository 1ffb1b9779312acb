// The TCP communicator (make_tcp_communicator), without MPI: the test spawns copies of itself on
// loopback, each given torchrun-style variables, and each child checks its results itself:
//   - against the in-process communicator, which the child also runs over the same inputs with
//     one thread per rank: the same bits (the contract: rank-order fp32 reduction, rounded once);
//   - against a float64 reference computed from every rank's inputs (each child can generate
//     them all): within a dtype-aware bound, so that both communicators being wrong alike fails.
// Failure cases: a rank that refuses a call, ranks that issue different collectives, and a rank
// that exits: every other rank's collective fails within seconds with an error naming it.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"
#include "pieces_check.hpp"

extern char** environ;

using namespace shardopt;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kOk = 0, kFailed = 1, kExpectedError = 3;

// Input element i of rank r for collective k: values whose fp32 sums round (not exact), signs mixed.
float input(int rank, int k, std::size_t i) {
  const std::uint64_t x = (std::uint64_t(rank) * 1000003u + std::uint64_t(k) * 7919u + i) * 0x9e3779b97f4a7c15ull;
  return static_cast<float>(static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0) * (1.0f + float(i % 7));
}

struct Case {
  CollectiveKind kind;
  DType dtype;
  ReduceOp op;
  std::size_t count;  // recv_count / send_count / count
};
// Counts not divisible by the world size, one larger than a reduction block (1024), zero.
const std::vector<Case> kCases = {
    {CollectiveKind::reduce_scatter, DType::fp32, ReduceOp::sum, 1537},
    {CollectiveKind::reduce_scatter, DType::bf16, ReduceOp::avg, 333},
    {CollectiveKind::all_reduce, DType::fp32, ReduceOp::avg, 2051},
    {CollectiveKind::all_reduce, DType::fp16, ReduceOp::sum, 77},
    {CollectiveKind::all_reduce, DType::fp32, ReduceOp::max, 129},
    {CollectiveKind::all_gather, DType::bf16, ReduceOp::sum, 101},
    {CollectiveKind::broadcast, DType::fp32, ReduceOp::sum, 64},
    {CollectiveKind::all_reduce, DType::fp32, ReduceOp::sum, 0},
    {CollectiveKind::barrier, DType::fp32, ReduceOp::sum, 0},
};

std::size_t send_elems(const Case& c, int world) {
  return c.kind == CollectiveKind::reduce_scatter ? c.count * world : c.count;
}
std::size_t recv_elems(const Case& c, int world) {
  return c.kind == CollectiveKind::all_gather ? c.count * world : c.count;
}

// The send buffer of rank r for case k (in c.dtype).
std::vector<std::byte> send_buffer(const Case& c, int k, int rank, int world) {
  const std::size_t n = send_elems(c, world);
  std::vector<std::byte> b(n * size_of(c.dtype) + 1);
  for (std::size_t i = 0; i < n; ++i) store_from_float(b.data(), c.dtype, i, input(rank, k, i));
  return b;
}

// The broadcast's root: not rank 0 where there is another (rank 0 is the bootstrap's hub).
int root_of(int world) { return world > 1 ? 1 : 0; }

void issue(Communicator& comm, const Case& c, const void* send, void* recv, Stream& s) {
  switch (c.kind) {
    case CollectiveKind::reduce_scatter: comm.reduce_scatter(send, recv, c.count, c.dtype, c.op, s); break;
    case CollectiveKind::all_gather: comm.all_gather(send, recv, c.count, c.dtype, s); break;
    case CollectiveKind::all_reduce: comm.all_reduce(send, recv, c.count, c.dtype, c.op, s); break;
    case CollectiveKind::broadcast: comm.broadcast(send, recv, c.count, c.dtype, root_of(comm.size()), s); break;
    case CollectiveKind::barrier: comm.barrier(s); break;
  }
}

// What rank `rank` receives, as the in-process communicator computes it (one thread per rank).
std::vector<std::vector<std::byte>> in_process_results(int rank, int world) {
  std::vector<std::vector<std::byte>> out(kCases.size());
  auto group = make_in_process_group(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      auto be = make_cpu_backend();
      auto comm = make_in_process_communicator(group, r, *be);
      auto s = be->create_stream("comm");
      for (std::size_t k = 0; k < kCases.size(); ++k) {
        const Case& c = kCases[k];
        const auto send = send_buffer(c, int(k), r, world);
        std::vector<std::byte> recv(recv_elems(c, world) * size_of(c.dtype) + 1);
        issue(*comm, c, send.data(), recv.data(), *s);
        be->synchronize(*s);
        if (r == rank) out[k] = recv;
      }
    });
  for (auto& t : threads) t.join();
  return out;
}

// float64 reference of element i of rank `rank`'s result, and its bound.
bool close_to_reference(const Case& c, int k, int rank, int world, std::size_t i, float got, std::string& why) {
  double ref = 0, mag = 0;
  auto in = [&](int q, std::size_t j) { return double(load_as_float(send_buffer(c, k, q, world).data(), c.dtype, j)); };
  switch (c.kind) {
    case CollectiveKind::reduce_scatter:
    case CollectiveKind::all_reduce: {
      const std::size_t j = c.kind == CollectiveKind::reduce_scatter ? std::size_t(rank) * c.count + i : i;
      ref = c.op == ReduceOp::max ? -INFINITY : 0;
      for (int q = 0; q < world; ++q) {
        const double v = in(q, j);
        ref = c.op == ReduceOp::max ? std::max(ref, v) : ref + v;
        mag += std::fabs(v);
      }
      if (c.op == ReduceOp::avg) ref /= world, mag /= world;
      break;
    }
    case CollectiveKind::all_gather: ref = in(int(i / c.count), i % c.count); break;
    case CollectiveKind::broadcast: ref = in(root_of(world), i); break;
    case CollectiveKind::barrier: return true;
  }
  // fp32 accumulation (world roundings) and one rounding to the dtype.
  const double unit = c.dtype == DType::fp32 ? 0x1p-24 : c.dtype == DType::bf16 ? 0x1p-8 : 0x1p-11;
  const double bound = (unit + world * 0x1p-24) * std::max(mag, std::fabs(ref)) + 1e-30;
  if (std::fabs(got - ref) <= bound) return true;
  why = "element " + std::to_string(i) + ": " + std::to_string(got) + ", float64 reference " + std::to_string(ref);
  return false;
}

int child_main() {
  const std::string mode = std::getenv("SHARDOPT_TEST_MODE");
  const int rank = std::atoi(std::getenv("RANK"));
  const int world = std::atoi(std::getenv("WORLD_SIZE"));
  try {
    auto boot = make_bootstrap_from_env(std::chrono::seconds(20));
    auto be = make_cpu_backend();
    auto comm = make_tcp_communicator(*boot, "127.0.0.1", *be, std::chrono::seconds(20));
    if (comm->rank() != rank || comm->size() != world) return kFailed;
    // Two streams, collectives alternating between them: they must still run in issue order.
    auto s0 = be->create_stream("comm0");
    auto s1 = be->create_stream("comm1");
    if (mode == "ok") {
      const auto expected = in_process_results(rank, world);
      std::vector<std::vector<std::byte>> send(kCases.size()), recv(kCases.size());
      for (std::size_t k = 0; k < kCases.size(); ++k) {
        const Case& c = kCases[k];
        send[k] = send_buffer(c, int(k), rank, world);
        recv[k].assign(recv_elems(c, world) * size_of(c.dtype) + 1, std::byte{0});
        issue(*comm, c, send[k].data(), recv[k].data(), k % 2 ? *s1 : *s0);
      }
      be->synchronize(*s0);
      be->synchronize(*s1);
      if (const std::string why = shardopt::testing::reduce_scatter_pieces_mismatch(*comm, *be, *s0); !why.empty()) {
        std::fprintf(stderr, "%s\n", why.c_str());
        return kFailed;
      }
      for (std::size_t k = 0; k < kCases.size(); ++k) {
        const Case& c = kCases[k];
        if (recv[k] != expected[k]) {
          std::fprintf(stderr, "rank %d: case %zu differs from the in-process communicator\n", rank, k);
          return kFailed;
        }
        for (std::size_t i = 0; i < recv_elems(c, world); ++i) {
          std::string why;
          if (!close_to_reference(c, int(k), rank, world, i, load_as_float(recv[k].data(), c.dtype, i), why)) {
            std::fprintf(stderr, "rank %d: case %zu: %s\n", rank, k, why.c_str());
            return kFailed;
          }
        }
      }
      return kOk;
    }
    std::vector<float> a(64, 1.0f), b(64);
    if (mode == "refuse" && rank == 1) {
      try {
        comm->all_reduce(a.data(), nullptr, a.size(), DType::fp32, ReduceOp::sum, *s0);  // null recv: refused
      } catch (const Error& e) {
        if (e.code() != ErrorCode::invalid_argument) return kFailed;
      }
      be->synchronize(*s0);
      return kExpectedError;
    }
    if (mode == "exit" && rank == 1) std::_Exit(0);  // leaves without a word (its sockets close)
    const std::size_t n = mode == "disagree" && rank == 1 ? 32 : 64;
    comm->all_reduce(a.data(), b.data(), n, DType::fp32, ReduceOp::sum, *s0);
    be->synchronize(*s0);
    return kOk;
  } catch (const Error& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    const std::string m = e.message();
    if (mode == "refuse" && m.find("rank 1 failed") != std::string::npos) return kExpectedError;
    if (mode == "disagree" && m.find("disagree") != std::string::npos) return kExpectedError;
    // Rank 0 sees rank 1's connection close and forwards that to rank 2, then exits. Rank 2's data
    // that reaches rank 0 after it stopped reading makes the closed socket reset the connection,
    // which can discard the forwarded error before rank 2 reads it: rank 2 then fails on rank 0's
    // reset connection instead (rarely: rank 0 drops what had arrived before it forwarded).
    if (mode == "exit" && (m.find("rank 1") != std::string::npos || (rank == 2 && m.find("rank 0") != std::string::npos)))
      return kExpectedError;
    return kFailed;
  }
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// Runs `world` children in `mode`; returns their exit codes (99: still running after 30 s, killed).
std::vector<int> run_children(int world, const std::string& mode) {
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      const std::string s = *e;
      const std::string key = s.substr(0, s.find('='));
      if (key != "RANK" && key != "WORLD_SIZE" && key != "LOCAL_RANK" && key != "MASTER_ADDR" && key != "MASTER_PORT" &&
          key.rfind("SLURM_", 0) != 0 && key.rfind("OMPI_", 0) != 0 && key.rfind("PMI", 0) != 0)
        env.push_back(s);
    }
    for (const std::string& s : {"RANK=" + std::to_string(r), "WORLD_SIZE=" + std::to_string(world), "LOCAL_RANK=" + std::to_string(r),
                                 std::string("MASTER_ADDR=127.0.0.1"), "MASTER_PORT=" + std::to_string(port),
                                 "SHARDOPT_TEST_MODE=" + mode})
      env.push_back(s);
    std::vector<char*> envp;
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string self = "/proc/self/exe", flag = "--child";
    char* argv[] = {self.data(), flag.data(), nullptr};
    pid_t pid = -1;
    EXPECT_EQ(::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()), 0);
    pids.push_back(pid);
  }
  std::vector<int> codes(pids.size(), -1);
  const auto start = Clock::now();
  for (std::size_t left = pids.size(); left > 0;) {
    for (std::size_t i = 0; i < pids.size(); ++i) {
      int st = 0;
      if (codes[i] == -1 && ::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        codes[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
        --left;
      }
    }
    if (left > 0 && Clock::now() - start > std::chrono::seconds(30)) {
      for (std::size_t i = 0; i < pids.size(); ++i)
        if (codes[i] == -1) {
          ::kill(pids[i], SIGKILL);
          ::waitpid(pids[i], nullptr, 0);
          codes[i] = 99;
          --left;
        }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return codes;
}

TEST(TcpCommunicator, EveryCollectiveEqualsInProcessRanksBitForBit) {
  for (int world : {1, 3}) {
    const auto codes = run_children(world, "ok");
    for (int r = 0; r < world; ++r) EXPECT_EQ(codes[r], kOk) << "world " << world << ", rank " << r;
  }
}

TEST(TcpCommunicator, ARefusedCallFailsThePeersNamingTheRank) {
  const auto codes = run_children(3, "refuse");
  for (int r = 0; r < 3; ++r) EXPECT_EQ(codes[r], kExpectedError) << "rank " << r;
}

TEST(TcpCommunicator, DifferentCollectivesFailEveryRank) {
  const auto codes = run_children(3, "disagree");
  for (int r = 0; r < 3; ++r) EXPECT_EQ(codes[r], kExpectedError) << "rank " << r;
}

TEST(TcpCommunicator, ARankThatExitsFailsThePeersWithinTheirTimeout) {
  const auto start = Clock::now();
  const auto codes = run_children(3, "exit");
  EXPECT_EQ(codes[1], kOk);
  EXPECT_EQ(codes[0], kExpectedError);
  EXPECT_EQ(codes[2], kExpectedError);
  // The peers learn from the closed connection, not from their 20 s timeout.
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 15.0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--child") return child_main();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
