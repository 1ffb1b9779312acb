// The TCP bootstrap and launcher detection, without MPI: the test spawns copies of itself on
// loopback as separate processes, each given torchrun-style variables, and checks how they exit.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <span>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "engine_harness.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"

extern char** environ;

using namespace shardopt;
using Clock = std::chrono::steady_clock;

namespace {

// Exit codes of a child.
constexpr int kOk = 0, kFailed = 1, kTimedOut = 2, kDisagree = 3;

int child_main() {
  const char* mode = std::getenv("SHARDOPT_TEST_MODE");
  const int timeout_ms = std::atoi(std::getenv("SHARDOPT_TEST_TIMEOUT_MS"));
  try {
    auto boot = make_bootstrap_from_env(std::chrono::milliseconds(timeout_ms));
    const int rank = std::atoi(std::getenv("RANK"));
    const int world = std::atoi(std::getenv("WORLD_SIZE"));
    if (boot->rank() != rank || boot->world_size() != world || boot->local_rank() != std::atoi(std::getenv("LOCAL_RANK")) ||
        boot->kind() != "tcp") {
      std::fprintf(stderr, "child %d: wrong rank/world/local rank/kind\n", rank);
      return kFailed;
    }
    const std::string mine = "rank" + std::to_string(rank);
    auto all = boot->all_gather_bytes({reinterpret_cast<const std::byte*>(mine.data()), mine.size()});
    for (int q = 0; q < world; ++q)
      if (std::string(reinterpret_cast<const char*>(all[q].data()), all[q].size()) != "rank" + std::to_string(q)) return kFailed;
    const std::string id(128, static_cast<char>('a' + world));  // the size of an NCCL unique id
    auto got = boot->broadcast_bytes({reinterpret_cast<const std::byte*>(id.data()), rank == world - 1 ? id.size() : 0}, world - 1);
    if (std::string(reinterpret_cast<const char*>(got.data()), got.size()) != id) return kFailed;
    // A rank killed after the rendezvous (as torchrun's agent would see a SIGKILLed worker): the
    // survivors' next collective must fail, not wait for a rank that will never come.
    if (mode && std::string(mode) == "killed" && rank == world - 1) ::raise(SIGKILL);
    Config cfg = shardopt::testing::base_config(2, DType::bf16, OptimizerKind::adamw);
    if (mode && std::string(mode) == "config-mismatch" && rank == world - 1) cfg.hyper.lr *= 2;
    check_agreement(*boot, cfg, shardopt::testing::awkward_model());
    boot->barrier();
    return kOk;
  } catch (const Error& e) {
    std::fprintf(stderr, "child: %s\n", e.what());
    const std::string m = e.message();
    if (m.find("timed out") != std::string::npos) return kTimedOut;
    if (m.find("disagree") != std::string::npos) return kDisagree;
    return kFailed;
  }
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Child {
  pid_t pid = -1;
  int status = -1;
  double seconds = 0;
};

pid_t spawn(const std::map<std::string, std::string>& vars) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    const std::string s = *e;
    const std::string key = s.substr(0, s.find('='));
    if (!vars.count(key) && key != "RANK" && key != "WORLD_SIZE" && key.rfind("SLURM_", 0) != 0) env_strings.push_back(s);
  }
  for (const auto& [k, v] : vars) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string self = "/proc/self/exe", flag = "--child";
  char* argv[] = {self.data(), flag.data(), nullptr};
  pid_t pid = -1;
  EXPECT_EQ(::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()), 0);
  return pid;
}

// Starts one child per entry of `ranks` (RANK, WORLD_SIZE given per child) and waits for all,
// killing any still running after `limit`.
std::vector<Child> run_children(const std::vector<std::pair<int, int>>& rank_world, int port, int timeout_ms, const std::string& mode,
                                std::chrono::seconds limit) {
  std::vector<Child> kids(rank_world.size());
  const auto start = Clock::now();
  for (std::size_t i = 0; i < rank_world.size(); ++i) {
    kids[i].pid = spawn({{"RANK", std::to_string(rank_world[i].first)},
                         {"WORLD_SIZE", std::to_string(rank_world[i].second)},
                         {"LOCAL_RANK", std::to_string(rank_world[i].first)},
                         {"MASTER_ADDR", "127.0.0.1"},
                         {"MASTER_PORT", std::to_string(port)},
                         {"SHARDOPT_TEST_MODE", mode},
                         {"SHARDOPT_TEST_TIMEOUT_MS", std::to_string(timeout_ms)}});
  }
  std::size_t left = kids.size();
  while (left > 0) {
    for (auto& k : kids) {
      if (k.pid <= 0 || k.status != -1) continue;
      int st = 0;
      if (::waitpid(k.pid, &st, WNOHANG) == k.pid) {
        k.status = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
        k.seconds = std::chrono::duration<double>(Clock::now() - start).count();
        --left;
      }
    }
    if (Clock::now() - start > limit) {
      for (auto& k : kids)
        if (k.status == -1) {
          ::kill(k.pid, SIGKILL);
          ::waitpid(k.pid, nullptr, 0);
          k.status = 99;  // hung
          --left;
        }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return kids;
}

TEST(TcpBootstrap, FourProcessesRendezvousOnLoopback) {
  const auto kids = run_children({{3, 4}, {1, 4}, {0, 4}, {2, 4}}, free_port(), 10000, "ok", std::chrono::seconds(20));
  for (std::size_t i = 0; i < kids.size(); ++i) EXPECT_EQ(kids[i].status, kOk) << "child " << i;
}

TEST(TcpBootstrap, MissingRankTimesOutOnEveryRankThatCame) {
  // World of 3, rank 2 never starts: ranks 0 and 1 must fail with "timed out", not hang.
  const auto kids = run_children({{0, 3}, {1, 3}}, free_port(), 1500, "ok", std::chrono::seconds(15));
  for (const auto& k : kids) {
    EXPECT_EQ(k.status, kTimedOut);
    EXPECT_LT(k.seconds, 8.0);
  }
}

TEST(TcpBootstrap, MissingRankZeroTimesOut) {
  const auto kids = run_children({{1, 2}}, free_port(), 1000, "ok", std::chrono::seconds(15));
  EXPECT_EQ(kids[0].status, kTimedOut);
  EXPECT_LT(kids[0].seconds, 6.0);
}

TEST(TcpBootstrap, WorldSizeDisagreementFailsEveryRank) {
  const auto kids = run_children({{0, 2}, {1, 3}}, free_port(), 5000, "ok", std::chrono::seconds(15));
  for (const auto& k : kids) EXPECT_EQ(k.status, kDisagree);
}

TEST(TcpBootstrap, ConfigDisagreementFailsEveryRank) {
  const auto kids = run_children({{0, 3}, {1, 3}, {2, 3}}, free_port(), 10000, "config-mismatch", std::chrono::seconds(20));
  for (const auto& k : kids) EXPECT_EQ(k.status, kDisagree);
}

TEST(TcpBootstrap, RankKilledAfterRendezvousFailsTheOthersBeforeTheirTimeout) {
  // Rank 2 of 3 dies by SIGKILL after two collectives; the survivors are in the agreement check's
  // exchange. Its socket closes with the process, so they must fail at once with an error (kFailed
  // or kTimedOut both end the run; a hang is status 99), well before their 30 s timeout.
  const auto kids = run_children({{0, 3}, {1, 3}, {2, 3}}, free_port(), 30000, "killed", std::chrono::seconds(60));
  EXPECT_EQ(kids[2].status, 100 + SIGKILL) << "the killed rank";
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(kids[i].status == kFailed || kids[i].status == kTimedOut) << "rank " << i << " status " << kids[i].status;
    EXPECT_LT(kids[i].seconds, 15.0) << "rank " << i << " waited for its timeout instead of seeing the peer gone";
  }
}

TEST(TcpBootstrap, SingleRankNeedsNoNetwork) {
  TcpRendezvous r;
  r.master_port = 1;  // never used for a world of one
  auto b = make_tcp_bootstrap(r);
  EXPECT_EQ(b->world_size(), 1);
  const std::byte x[3] = {std::byte{1}, std::byte{2}, std::byte{3}};
  EXPECT_EQ(b->broadcast_bytes(x, 0).size(), 3u);
  EXPECT_THROW(b->broadcast_bytes(x, 1), Error);
  r.rank = 2;
  EXPECT_THROW(make_tcp_bootstrap(r), Error);
}

EnvLookup fake(std::map<std::string, std::string> vars) {
  return [vars](const char* n) -> std::optional<std::string> {
    auto it = vars.find(n);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string error_of(const EnvLookup& env) {
  try {
    detect_launch(env);
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

TEST(LaunchEnv, Torchrun) {
  const LaunchEnv l = detect_launch(fake({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29400"}}));
  EXPECT_EQ(l.source, LaunchEnv::Source::torchrun);
  EXPECT_EQ(l.rank, 3);
  EXPECT_EQ(l.world_size, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.master_addr, "node7");
  EXPECT_EQ(l.master_port, 29400);
}

TEST(LaunchEnv, IncompleteOrBadVariablesAreNamed) {
  const std::string m = error_of(fake({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}));
  EXPECT_NE(m.find("MASTER_ADDR"), std::string::npos) << m;
  EXPECT_NE(m.find("MASTER_PORT"), std::string::npos) << m;
  EXPECT_NE(error_of(fake({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})).find("RANK=2"),
            std::string::npos);
  EXPECT_NE(error_of(fake({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "http"}})).find("MASTER_PORT"),
            std::string::npos);
  EXPECT_NE(error_of(fake({{"SLURM_PROCID", "0"}})).find("SLURM_NTASKS"), std::string::npos);
  EXPECT_NE(error_of(fake({})).find("no launcher"), std::string::npos);
  EXPECT_NE(error_of(fake({{"OMPI_COMM_WORLD_SIZE", "4"}})).find("MpiSession"), std::string::npos);
}

TEST(LaunchEnv, Slurm) {
  const LaunchEnv l = detect_launch(fake({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                                          {"SLURM_STEP_NODELIST", "gpu[03-05,9],login1"}, {"SLURM_JOB_ID", "123456"}}));
  EXPECT_EQ(l.source, LaunchEnv::Source::slurm);
  EXPECT_EQ(l.rank, 5);
  EXPECT_EQ(l.world_size, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.master_addr, "gpu03");
  EXPECT_EQ(l.master_port, 20000 + 123456 % 10000);
  EXPECT_EQ(first_slurm_host("node1,node2"), "node1");
  EXPECT_EQ(first_slurm_host("a[7]"), "a7");
  EXPECT_EQ(first_slurm_host("rack[1-2]-n"), "rack1-n");
  EXPECT_THROW(first_slurm_host("bad[1-2"), Error);
  EXPECT_THROW(first_slurm_host(""), Error);
}

// Two ranks as threads over an in-memory exchange: what check_agreement tells each about the
// other's configuration, without sockets.
class PairBootstrap final : public Bootstrap {
 public:
  struct Shared {
    std::mutex m;
    std::condition_variable cv;
    std::vector<std::byte> got[2];
    int arrived = 0;
  };
  PairBootstrap(Shared& s, int rank) : s_(s), rank_(rank) {}
  std::string_view kind() const noexcept override { return "pair"; }
  int rank() const noexcept override { return rank_; }
  int world_size() const noexcept override { return 2; }
  int local_rank() const noexcept override { return rank_; }
  std::vector<std::byte> broadcast_bytes(std::span<const std::byte>, int) override { return {}; }
  std::vector<std::vector<std::byte>> all_gather_bytes(std::span<const std::byte> data) override {
    std::unique_lock<std::mutex> lock(s_.m);
    s_.got[rank_].assign(data.begin(), data.end());
    ++s_.arrived;
    s_.cv.notify_all();
    s_.cv.wait(lock, [&] { return s_.arrived == 2; });
    return {s_.got[0], s_.got[1]};
  }

 private:
  Shared& s_;
  int rank_;
};

// Both ranks' errors name each field that differs with both values, and only those.
TEST(Agreement, DisagreementNamesTheFieldsThatDiffer) {
  const Config a = shardopt::testing::base_config(1, DType::bf16, OptimizerKind::adamw);
  Config b = a;
  b.hyper.beta2 = 0.5f;
  b.loss_scaling.hysteresis = 7;
  b.nvme_dir = "/elsewhere";  // local: never a disagreement
  PairBootstrap::Shared shared;
  std::string msg[2];
  std::thread t([&] {
    PairBootstrap boot(shared, 1);
    try {
      check_agreement(boot, b, shardopt::testing::awkward_model());
    } catch (const Error& e) {
      msg[1] = e.message();
    }
  });
  PairBootstrap boot(shared, 0);
  try {
    check_agreement(boot, a, shardopt::testing::awkward_model());
  } catch (const Error& e) {
    msg[0] = e.message();
  }
  t.join();
  char beta2[32];
  std::snprintf(beta2, sizeof beta2, "%.9g", static_cast<double>(a.hyper.beta2));
  const std::string want_beta2 = std::string("beta2=") + beta2 + " on rank 0, beta2=0.5 on rank 1";
  const std::string want_hyst =
      "hysteresis=" + std::to_string(a.loss_scaling.hysteresis) + " on rank 0, hysteresis=7 on rank 1";
  ASSERT_NE(a.loss_scaling.hysteresis, 7);
  for (const std::string& m : msg) {
    EXPECT_NE(m.find("disagree"), std::string::npos) << m;
    EXPECT_NE(m.find(want_beta2), std::string::npos) << m;
    EXPECT_NE(m.find(want_hyst), std::string::npos) << m;
    EXPECT_EQ(m.find("nvme_dir"), std::string::npos) << m;
    EXPECT_EQ(m.find("beta1"), std::string::npos) << m;
  }
  // The same configuration and another model: no field is named.
  PairBootstrap::Shared shared2;
  auto model = shardopt::testing::awkward_model();
  model[1].tensors[0].shape = {24, 36};
  std::thread t2([&] {
    PairBootstrap boot1(shared2, 1);
    EXPECT_THROW(check_agreement(boot1, a, model), Error);
  });
  PairBootstrap boot0(shared2, 0);
  try {
    check_agreement(boot0, a, shardopt::testing::awkward_model());
    ADD_FAILURE() << "different models agreed";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("models differ"), std::string::npos) << e.message();
  }
  t2.join();
}

TEST(Agreement, HashSeesEveryRelevantField) {
  const Config a = shardopt::testing::base_config(1, DType::bf16, OptimizerKind::adamw);
  const auto m = shardopt::testing::awkward_model();
  const auto h = agreement_hash(a, m, 4);
  EXPECT_EQ(h, agreement_hash(a, m, 4));
  EXPECT_NE(h, agreement_hash(a, m, 3));
  Config b = a;
  b.hyper.beta2 = 0.99f;
  EXPECT_NE(h, agreement_hash(b, m, 4));
  b = a;
  b.nvme_dir = "/local/scratch";  // a local path may differ per machine
  EXPECT_EQ(h, agreement_hash(b, m, 4));
  auto m2 = m;
  m2.back().tensors.back().group = 0;
  EXPECT_NE(h, agreement_hash(a, m2, 4));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--child") return child_main();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
