// What the ranks of one engine agree on at initialize(): the configuration, the model and every
// group's hyperparameters; at stage 0 the initial values; and a rank that fails on its own before
// the first collective fails every rank at once, with its error. Ranks are in-process threads whose
// group has a 60 s timeout: each case must end long before it, on every rank, by itself (no rank
// aborts the group here).
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine_harness.hpp"
#include "shardopt/shardopt.hpp"

using namespace shardopt;
using namespace shardopt::testing;
using Clock = std::chrono::steady_clock;

namespace {

struct Outcome {
  std::vector<std::string> errors;  // per rank; empty: initialize() returned
  std::vector<ErrorCode> codes;
  double seconds = 0;
};

// Two ranks; `setup(rank, config, blocks, engine_init)` adjusts what each rank brings.
Outcome initialize_two(const std::function<void(int, Config&, std::vector<BlockSpec>&, InitFn&)>& setup,
                       const std::function<void(int, Engine&)>& before_init = {}) {
  constexpr int n = 2;
  auto pool = make_thread_pool(0);
  auto group = make_in_process_group(n, InProcessTransport::host_tasks, std::chrono::seconds(60));
  Outcome out;
  out.errors.resize(n);
  out.codes.resize(n, ErrorCode::internal);
  const auto t0 = Clock::now();
  (void)run_on_threads(n, [&](int r) {
    CpuBackendOptions o;
    o.pool = pool;
    auto be = make_cpu_backend(o);
    auto comm = make_in_process_communicator(group, r, *be);
    Config cfg = base_config(0, DType::bf16, OptimizerKind::adamw);
    std::vector<BlockSpec> blocks = awkward_model();
    InitFn init = seeded_init(7);
    setup(r, cfg, blocks, init);
    try {
      Engine e(cfg, *be, *comm);
      for (const auto& b : blocks) e.register_block(b);
      if (before_init) before_init(r, e);
      e.initialize(init);
    } catch (const Error& err) {
      out.errors[r] = err.message();
      out.codes[r] = err.code();
    }
  });
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return out;
}

void expect_every_rank_fails(const Outcome& o, ErrorCode code, const std::string& says) {
  for (std::size_t r = 0; r < o.errors.size(); ++r) {
    EXPECT_NE(o.errors[r].find(says), std::string::npos) << "rank " << r << ": '" << o.errors[r] << "'";
    EXPECT_EQ(o.codes[r], code) << "rank " << r << ": " << o.errors[r];
  }
  EXPECT_LT(o.seconds, 20.0) << "the ranks waited for the group's timeout";
}

}  // namespace

TEST(Agreement, StageZeroRanksWithDifferentInitialValuesFailEveryRank) {
  // A seed per rank: at stage 0 each rank would train its own model, every step averaging the
  // gradients of different parameters.
  const Outcome o = initialize_two([](int r, Config&, std::vector<BlockSpec>&, InitFn& init) { init = seeded_init(100 + r); });
  expect_every_rank_fails(o, ErrorCode::communication, "initial values of the replicated parameters");
}

TEST(Agreement, StageZeroRanksWithTheSameInitialValuesInitialize) {
  const Outcome o = initialize_two([](int, Config&, std::vector<BlockSpec>&, InitFn&) {});
  for (const auto& e : o.errors) EXPECT_EQ(e, "");
}

TEST(Agreement, ShardedStagesComputeEachValueOnceSoSeedsMayDiffer) {
  // Stages 1-3: every element is initialized on exactly one rank; nothing can diverge.
  for (int stage : {1, 3}) {
    const Outcome o = initialize_two([&](int r, Config& c, std::vector<BlockSpec>&, InitFn& init) {
      c.stage = stage;
      init = seeded_init(100 + r);
    });
    for (const auto& e : o.errors) EXPECT_EQ(e, "") << "stage " << stage;
  }
}

TEST(Agreement, DifferentHyperparametersFailEveryRank) {
  const Outcome o = initialize_two([](int r, Config& c, std::vector<BlockSpec>&, InitFn&) {
    c.stage = 2;
    if (r == 1) c.hyper.lr *= 2;
  });
  expect_every_rank_fails(o, ErrorCode::communication, "ranks disagree: rank(s) 1 differ from rank 0");
}

TEST(Agreement, DifferentGroupHyperparametersFailEveryRank) {
  const Outcome o = initialize_two(
      [](int, Config& c, std::vector<BlockSpec>&, InitFn&) { c.stage = 1; },
      [](int r, Engine& e) {
        Hyperparams h = base_config(1, DType::bf16, OptimizerKind::adamw).hyper;
        h.weight_decay = r == 0 ? 0.0f : 0.01f;
        e.set_group(1, h);
      });
  expect_every_rank_fails(o, ErrorCode::communication, "ranks disagree");
}

TEST(Agreement, DifferentTensorNamesFailEveryRank) {
  const Outcome o = initialize_two([](int r, Config& c, std::vector<BlockSpec>& blocks, InitFn&) {
    c.stage = 3;
    if (r == 1) blocks[1].tensors[0].name = "l0.weight";
  });
  expect_every_rank_fails(o, ErrorCode::communication, "ranks disagree");
}

TEST(Agreement, ARankFailingBeforeTheFirstCollectiveFailsEveryRankWithItsError) {
  // NVMe offload, and only rank 1's directory is missing (directories are per machine, so they
  // are not part of the agreement): rank 0 must not wait in a collective rank 1 never reaches.
  const std::filesystem::path ok = std::filesystem::temp_directory_path() / "shardopt-agreement-nvme";
  std::filesystem::create_directories(ok);
  const std::string missing = (ok / "no" / "such" / "dir").string();
  const Outcome o = initialize_two([&](int r, Config& c, std::vector<BlockSpec>&, InitFn&) {
    c.stage = 2;
    c.offload_optimizer = OffloadKind::nvme;
    c.nvme_dir = r == 1 ? missing : ok.string();
  });
  std::filesystem::remove_all(ok);
  if (!o.errors[1].empty() && o.errors[1].find("unsupported") != std::string::npos) GTEST_SKIP() << o.errors[1];
  EXPECT_NE(o.errors[1].find(missing), std::string::npos) << o.errors[1];
  EXPECT_NE(o.errors[0].find("rank 1 failed in initialize()"), std::string::npos) << o.errors[0];
  EXPECT_NE(o.errors[0].find(missing), std::string::npos) << o.errors[0];
  EXPECT_EQ(o.codes[0], o.codes[1]);
  EXPECT_LT(o.seconds, 20.0);
}

TEST(Agreement, AThrowingInitFunctionOnOneRankFailsEveryRankAtOnce) {
  // After allocation: rank 1's init function throws (its own exception type, which rank 1 gets
  // back as it was thrown); rank 0 must not go on to wait in a collective rank 1 never reaches.
  for (int stage : {0, 1, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    constexpr int n = 2;
    auto group = make_in_process_group(n, InProcessTransport::host_tasks, std::chrono::seconds(60));
    std::vector<std::string> errors(n);
    std::vector<int> kinds(n, 0);  // 1: shardopt::Error, 2: std::runtime_error
    const auto t0 = Clock::now();
    (void)run_on_threads(n, [&](int r) {
      auto be = make_cpu_backend();
      auto comm = make_in_process_communicator(group, r, *be);
      Engine e(base_config(stage, DType::bf16, OptimizerKind::adamw), *be, *comm);
      for (const auto& b : awkward_model()) e.register_block(b);
      const InitFn fine = seeded_init(1);
      try {
        e.initialize([&](const Layout::TensorInfo& t, std::size_t begin, std::size_t count, float* out) {
          if (r == 1 && t.name == "big.w") throw std::runtime_error("the data for big.w is missing");
          fine(t, begin, count, out);
        });
      } catch (const Error& err) {
        errors[r] = err.message(), kinds[r] = 1;
      } catch (const std::runtime_error& err) {
        errors[r] = err.what(), kinds[r] = 2;
      }
    });
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 20.0);
    EXPECT_EQ(kinds[1], 2) << errors[1];
    EXPECT_EQ(errors[1], "the data for big.w is missing");
    EXPECT_EQ(kinds[0], 1) << errors[0];
    EXPECT_NE(errors[0].find("rank 1 failed in initialize()"), std::string::npos) << errors[0];
    EXPECT_NE(errors[0].find("the data for big.w is missing"), std::string::npos) << errors[0];
  }
}
