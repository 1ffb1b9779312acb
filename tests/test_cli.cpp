// The shardopt command line, run in-process: parsing errors name the flag, train learns and gives
// the same parameters at every stage, estimate predicts what train measures.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "cli_run.hpp"
#include "mlp.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/cuda.hpp"
#include "units.hpp"

namespace {

using nlohmann::json;

using Result = shardopt::testing::CliResult;
using shardopt::testing::last_json_line;
Result run(const std::vector<std::string>& args) { return shardopt::testing::run_cli(args); }

TEST(CliUnits, ParsesSizesAndCounts) {
  using shardopt::cli::parse_bytes;
  using shardopt::cli::parse_count;
  EXPECT_EQ(parse_bytes("80GiB"), 80ull << 30);
  EXPECT_EQ(parse_bytes("512MB"), 512000000ull);
  EXPECT_EQ(parse_bytes("1e9"), 1000000000ull);
  EXPECT_EQ(parse_bytes("1.5 KiB"), 1536ull);
  EXPECT_EQ(parse_bytes("4096"), 4096ull);
  EXPECT_EQ(parse_bytes("64k"), 64000ull);
  for (const char* bad : {"", "GiB", "80XB", "-1", "abc", "0x10", "inf", "0.3"}) EXPECT_FALSE(parse_bytes(bad)) << bad;
  EXPECT_EQ(parse_count("1.3B"), 1300000000ull);
  EXPECT_EQ(parse_count("350M"), 350000000ull);
  EXPECT_EQ(parse_count("16Mi"), 16ull << 20);
  EXPECT_EQ(parse_count("7e9"), 7000000000ull);
  for (const char* bad : {"", "1.5", "12X", "-3", "1e30"}) EXPECT_FALSE(parse_count(bad)) << bad;
  // Too large is told apart from malformed.
  using shardopt::cli::too_large;
  for (const char* big : {"1e30", "99999999999999999999999", "9.3e18", "10000000TiB"}) EXPECT_TRUE(too_large(big, true)) << big;
  for (const char* big : {"1e30", "99999999999999999999999", "10000000000T"}) EXPECT_TRUE(too_large(big, false)) << big;
  for (const char* ok : {"", "GiB", "80XB", "-1", "abc", "0x10", "1e18", "80GiB"}) EXPECT_FALSE(too_large(ok, true)) << ok;
  EXPECT_FALSE(too_large("1e30X", false));
}

// Sizes and counts past what the planner can represent say "too large" instead of wrapping
// around in 64-bit arithmetic (2^60 parameters once came out as "stage 0 fits in 464 B").
TEST(CliErrors, TooLargeSizesAndCountsSaySo) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"plan", "--params", "1152921504606846976", "--gpu-mem", "1GiB"}, "--params: '1152921504606846976' is too large"},
      {{"estimate", "--params", "300T"}, "--params: '300T' is too large"},
      {{"plan", "--params", "1B", "--gpu-mem", "1e30"}, "--gpu-mem: '1e30' is too large"},
      {{"plan", "--params", "1B", "--gpu-mem", "80GiB", "--host-mem", "99999999999999999999999"}, "--host-mem"},
      {{"train", "--steps", "1", "--bucket", "1e25"}, "--bucket: '1e25' is too large"},
  };
  for (const auto& [args, text] : cases) {
    std::string cmd;
    for (const auto& a : args) cmd += a + " ";
    const Result r = run(args);
    EXPECT_NE(r.rc, 0) << cmd;
    EXPECT_NE(r.err.find(text), std::string::npos) << cmd << "-> " << r.err;
    EXPECT_EQ(r.err.find("not a size"), std::string::npos) << cmd << "-> " << r.err;
  }
  // The largest accepted count still plans without overflow: every figure is finite and positive.
  const Result ok = run({"estimate", "--params", "281474976710656", "--stage", "3", "--world", "8", "--json"});
  ASSERT_EQ(ok.rc, 0) << ok.err;
}

TEST(CliErrors, ExitNonZeroNamingTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"train", "--no-such-flag"}, "--no-such-flag"},
      {{"train", "--stage", "5"}, "--stage"},
      {{"train", "--ranks", "0"}, "--ranks"},
      {{"train", "--steps", "abc"}, "--steps"},
      {{"train", "--lr", "-1"}, "--lr"},
      {{"train", "--dtype", "fp64"}, "--dtype"},
      {{"train", "--optimizer", "adagrad"}, "--optimizer"},
      {{"train", "--offload", "nvme"}, "--nvme-dir"},
      {{"train", "--offload", "host", "--nvme-dir", "/tmp"}, "--nvme-dir"},
      {{"train", "--offload", "disk"}, "--offload"},
      {{"train", "--stage", "2", "--offload", "host", "--offload-params"}, "--offload-params"},
      {{"train", "--stage", "3", "--offload-params"}, "--offload-params"},
      {{"estimate", "--stage", "1", "--offload", "host", "--offload-params"}, "--offload-params"},
      {{"plan", "--params", "1B", "--gpu-mem", "80GiB", "--offload", "host"}, "--offload"},
      {{"plan", "--params", "1B", "--gpu-mem", "80GiB", "--nvme", "lots"}, "--nvme"},
      {{"train", "--backend", "cuda"}, "--backend"},
      // checkpoints: a directory without a manifest is not one; export needs --out
      {{"train", "--steps", "1", "--resume", "/nonexistent-ckpt"}, "/nonexistent-ckpt/manifest.json"},
      {{"checkpoint", "export", "/nonexistent-ckpt"}, "--out"},
      {{"train", "--bucket", "lots"}, "--bucket"},
      {{"train", "--steps", "1", "--metrics", "/nonexistent-dir/m.jsonl"}, "--metrics"},
      {{"estimate", "--params", "many"}, "--params"},
      {{"estimate", "--params", "1B", "--layers", "3"}, "--params"},
      {{"estimate", "--world", "0"}, "--world"},
      {{"plan", "--params", "1B"}, "--gpu-mem"},
      {{"plan", "--params", "1B", "--gpu-mem", "80XB"}, "--gpu-mem"},
      {{"plan", "--params", "1B", "--gpu-mem", "80GiB", "--host-mem", "x"}, "--host-mem"},
      {{"bench", "update", "--params", "0"}, "--params"},
  };
  for (const auto& [args, flag] : cases) {
    std::string cmd;
    for (const auto& a : args) cmd += a + " ";
    const Result r = run(args);
    EXPECT_NE(r.rc, 0) << cmd;
    EXPECT_NE(r.err.find(flag), std::string::npos) << cmd << "-> " << r.err;
  }
}

// --backend cuda: without a device both commands say so; with one, bench update runs on it and
// train (whose model has no CUDA path) says that instead.
TEST(CliErrors, BackendCuda) {
  const Result train = run({"train", "--backend", "cuda", "--steps", "1"});
  EXPECT_NE(train.rc, 0);
  const Result bench = run({"bench", "update", "--backend", "cuda", "--params", "1M", "--iters", "2"});
  if (!shardopt::cuda_device_available()) {
    for (const Result* r : {&train, &bench}) {
      EXPECT_NE(r->rc, 0);
      EXPECT_NE(r->err.find("no CUDA device"), std::string::npos) << r->err;
    }
  } else {
    EXPECT_NE(train.err.find("CPU backend only"), std::string::npos) << train.err;
    EXPECT_EQ(bench.rc, 0) << bench.err;
    EXPECT_NE(bench.out.find("CUDA device 0"), std::string::npos) << bench.out;
  }
}

TEST(CliHelp, EverySubcommandHasHelp) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"train", "--help"}, {"estimate", "--help"}, {"plan", "--help"}, {"bench", "update", "--help"}}) {
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << args[0];
    EXPECT_NE(r.out.find("--"), std::string::npos) << args[0];
  }
  EXPECT_NE(run({"train", "--help"}).out.find("--stage"), std::string::npos);
}

// One small configuration for train and estimate: three blocks in three units (16 KiB buckets),
// so stages 2-3 cycle their two gradient buckets and stage 3 its gathered-unit slots.
std::vector<std::string> model_flags(int stage) {
  return {"--ranks", "4", "--stage", std::to_string(stage), "--layers", "3", "--hidden", "32", "--batch", "16",
          "--bucket", "16KiB", "--seed", "3"};
}

struct TrainRuns : ::testing::Test {
  static std::vector<json>& runs() {
    static std::vector<json> r;
    return r;
  }
  static void SetUpTestSuite() {
    for (int stage = 0; stage <= 3; ++stage) {
      auto args = model_flags(stage);
      args.insert(args.begin(), "train");
      for (const char* a : {"--steps", "50", "--json"}) args.push_back(a);
      const Result r = run(args);
      ASSERT_EQ(r.rc, 0) << r.err;
      runs().push_back(last_json_line(r.out));
    }
  }
};

TEST_F(TrainRuns, LossFallsAtEveryStage) {
  ASSERT_EQ(runs().size(), 4u);
  for (int stage = 0; stage <= 3; ++stage) {
    const json& j = runs()[stage];
    EXPECT_EQ(j["steps"], 50);
    EXPECT_EQ(j["skipped_steps"], 0);
    EXPECT_LT(j["loss_last"].get<double>(), 0.5 * j["loss_first"].get<double>()) << "stage " << stage;
    EXPECT_GT(j["comm_bytes_per_step"].get<double>(), 0);
    EXPECT_EQ(j["peak_bytes"].size(), 4u);
  }
}

// Every stage averages the same gradients in rank order and rounds once, and no clipping is on,
// so all four must agree bit for bit (README: "stages 1-3 (and 0 without clipping)").
TEST_F(TrainRuns, EveryStageGivesTheSameParameters) {
  ASSERT_EQ(runs().size(), 4u);
  EXPECT_EQ(runs()[0]["param_digest"], runs()[1]["param_digest"]);
  EXPECT_EQ(runs()[2]["param_digest"], runs()[1]["param_digest"]);
  EXPECT_EQ(runs()[3]["param_digest"], runs()[1]["param_digest"]);
  // The loss curve starts from the same parameters and data at every stage.
  EXPECT_EQ(runs()[0]["loss_first"], runs()[1]["loss_first"]);
}

// What estimate predicts is what the engine allocated: within 2 % per place and category.
TEST_F(TrainRuns, EstimateMatchesMeasuredPeaks) {
  ASSERT_EQ(runs().size(), 4u);
  for (int stage = 0; stage <= 3; ++stage) {
    auto args = model_flags(stage);
    args.resize(args.size() - 2);  // no --seed: memory does not depend on it
    args[0] = "--world";           // estimate's name for --ranks
    args.insert(args.begin(), "estimate");
    args.push_back("--json");
    const Result r = run(args);
    ASSERT_EQ(r.rc, 0) << r.err;
    const json predicted = last_json_line(r.out)["bytes"];
    for (const json& measured : runs()[stage]["peak_bytes"])
      for (const auto& [place, cats] : predicted.items())
        for (const auto& [cat, bytes] : cats.items()) {
          const double p = bytes.get<double>(), m = measured[place][cat].get<double>();
          EXPECT_LE(std::fabs(m - p), 0.02 * p) << "stage " << stage << " " << place << "/" << cat;
        }
  }
}

// Optimizer offload moves the update to the CPU but must not change a bit of the result.
json train_few_steps(int stage, std::vector<std::string> extra) {
  auto args = model_flags(stage);
  args.insert(args.begin(), "train");
  for (const char* a : {"--steps", "5", "--json"}) args.push_back(a);
  args.insert(args.end(), extra.begin(), extra.end());
  const Result r = run(args);
  EXPECT_EQ(r.rc, 0) << r.err;
  if (r.rc != 0) return json::object();
  return last_json_line(r.out);
}

TEST(CliOffload, HostAtStage2GivesTheSameParameters) {
  const json none = train_few_steps(2, {"--offload", "none"});
  const json host = train_few_steps(2, {"--offload", "host"});
  ASSERT_TRUE(none.contains("param_digest") && host.contains("param_digest"));
  EXPECT_EQ(host["offload"], "host");
  EXPECT_EQ(host["param_digest"], none["param_digest"]);
  EXPECT_EQ(host["loss_last"], none["loss_last"]);
  // The master weights and moments live in pinned host memory.
  EXPECT_GT(host["peak_bytes"][0]["pinned_host"]["optimizer_state"].get<double>(), 0);
  EXPECT_EQ(none["peak_bytes"][0]["pinned_host"]["optimizer_state"].get<double>(), 0);
}

TEST(CliOffload, NvmeAtStage3GivesTheSameParameters) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/shardopt-cli-nvme-XXXXXX";
  ASSERT_NE(mkdtemp(pattern.data()), nullptr);
  const std::string dir = pattern;
  const json none = train_few_steps(3, {});
  const json nvme = train_few_steps(3, {"--offload", "nvme", "--nvme-dir", dir});
  const json nvme_params = train_few_steps(3, {"--offload", "nvme", "--nvme-dir", dir, "--offload-params"});
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(none.contains("param_digest") && nvme.contains("param_digest") && nvme_params.contains("param_digest"));
  EXPECT_EQ(nvme["offload"], "nvme");
  EXPECT_EQ(nvme["param_digest"], none["param_digest"]);
  EXPECT_EQ(nvme_params["param_digest"], none["param_digest"]);
  EXPECT_TRUE(nvme_params["offload_params"].get<bool>());
}

TEST(CliOffload, EstimateMovesStateOffTheDevice) {
  const std::vector<std::string> base = {"estimate", "--params", "100M", "--world", "4", "--stage", "2",
                                         "--dtype", "bf16", "--json"};
  auto with = [&](std::vector<std::string> extra) {
    auto args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    return r.rc == 0 ? last_json_line(r.out) : json::object();
  };
  const json none = with({}), host = with({"--offload", "host"}), nvme = with({"--offload", "nvme", "--nvme-dir", "/x"});
  ASSERT_TRUE(none.contains("bytes") && host.contains("bytes") && nvme.contains("bytes"));
  const double dev_none = none["bytes"]["device"]["total"].get<double>();
  const double dev_host = host["bytes"]["device"]["total"].get<double>();
  EXPECT_LT(dev_host, dev_none);
  // Without offload pinned host memory holds only a few step scalars.
  EXPECT_LT(none["bytes"]["pinned_host"]["total"].get<double>(), 4096);
  // fp32 master + two moments of the rank's quarter: 12 bytes per parameter / 4.
  EXPECT_GE(host["bytes"]["pinned_host"]["total"].get<double>(), 12.0 * 100e6 / 4);
  EXPECT_EQ(host["bytes"]["disk"]["total"].get<double>(), 0);
  // NVMe: the state goes to disk (two generations), not to pinned host memory.
  EXPECT_GE(nvme["bytes"]["disk"]["total"].get<double>(), 2 * 12.0 * 100e6 / 4);
  EXPECT_LT(nvme["bytes"]["device"]["total"].get<double>(), dev_none);
  // The table shows the places that hold anything.
  const Result text = run({"estimate", "--params", "100M", "--world", "4", "--stage", "2", "--offload", "host"});
  ASSERT_EQ(text.rc, 0) << text.err;
  EXPECT_NE(text.out.find("pinned_host"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("offload host"), std::string::npos) << text.out;
}

TEST(CliEstimate, ParamsSplitIntoEqualBlocksSummingToTheCount) {
  const Result r = run({"estimate", "--params", "1000003", "--blocks", "7", "--world", "3", "--stage", "3", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const json j = last_json_line(r.out);
  EXPECT_EQ(j["params"], 1000003);
  EXPECT_EQ(j["blocks"], 7);
  EXPECT_GT(j["bytes"]["device"]["total"].get<double>(), 0);
}

TEST(CliPlan, PicksTheLowestStageThatFitsOrSaysByHowMuchNot) {
  Result r = run({"plan", "--params", "7B", "--gpus", "8", "--gpu-mem", "80GiB", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  json j = last_json_line(r.out);
  EXPECT_TRUE(j["fits"].get<bool>());
  EXPECT_EQ(j["choice"]["stage"], 1);  // 7B bf16 AdamW: stage 0 needs 16 B/param = 104 GiB
  EXPECT_EQ(j["choice"]["offload"], "none");
  EXPECT_FALSE(j["offload_considered"].get<bool>());
  // Neither the GPUs nor (with offload) the host memory and NVMe space hold 70B.
  const std::vector<std::string> small = {"plan", "--params", "70B", "--gpus", "8", "--gpu-mem", "80GiB",
                                          "--host-mem", "256GiB", "--nvme", "500GB"};
  auto args = small;
  args.push_back("--json");
  r = run(args);
  EXPECT_EQ(r.rc, 3);
  j = last_json_line(r.out);
  EXPECT_FALSE(j["fits"].get<bool>());
  EXPECT_TRUE(j["offload_considered"].get<bool>());
  EXPECT_GT(j["over_by"].get<double>(), 0);
  EXPECT_GT(j["min_gpus_stage3"].get<int>(), 8);
  r = run(small);
  EXPECT_NE(r.out.find("does not fit"), std::string::npos) << r.out;
}

// 7B bf16 AdamW on one 40 GiB GPU: stage 3 alone needs 16 B/param there, but with the 12 B/param
// of fp32 state in host memory stage 2 needs ~4 B/param (≈ 26 GiB).
TEST(CliPlan, PicksHostOffloadWhenTheGpusAreTooSmall) {
  const std::vector<std::string> base = {"plan", "--params", "7B", "--gpus", "1", "--gpu-mem", "40GiB", "--json"};
  auto plan = [&](std::vector<std::string> extra) {
    auto args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    return std::make_pair(r.rc, last_json_line(r.out));
  };
  auto [rc, j] = plan({"--host-mem", "512GiB"});
  ASSERT_EQ(rc, 0);
  ASSERT_TRUE(j["fits"].get<bool>());
  for (const json& row : j["stages"])
    if (row["offload"] == "none") {
      EXPECT_FALSE(row["fits"].get<bool>()) << row.dump();
    }
  EXPECT_EQ(j["choice"]["offload"], "host");
  EXPECT_EQ(j["choice"]["stage"], 2);
  EXPECT_FALSE(j["choice"]["offload_params"].get<bool>());
  EXPECT_LE(j["choice"]["host_bytes_all_gpus"].get<double>(), 512.0 * (1ull << 30));
  EXPECT_GE(j["choice"]["host_bytes_all_gpus"].get<double>(), 12.0 * 7e9);
  // Too little host memory for the state: NVMe (checked against --nvme) instead.
  std::tie(rc, j) = plan({"--host-mem", "64GiB", "--nvme", "1TB"});
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(j["choice"]["offload"], "nvme");
  EXPECT_GE(j["choice"]["disk_bytes_all_gpus"].get<double>(), 2 * 12.0 * 7e9);
  // Neither with fp32 state (14 bytes per parameter in host memory with the gradient copy, 98 GB):
  // compressed state in host memory, bf16 moments (10 bytes per parameter, 70 GB) ...
  std::tie(rc, j) = plan({"--host-mem", "80GiB", "--nvme", "100GB"});
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(j["choice"]["offload"], "host");
  EXPECT_EQ(j["choice"]["state_precision"], "bf16");
  EXPECT_LE(j["choice"]["host_bytes_all_gpus"].get<double>(), 80.0 * (1ull << 30));
  EXPECT_GE(j["choice"]["host_bytes_all_gpus"].get<double>(), 10.0 * 7e9);
  // ... or int8 moments (4 + 2*(1 + 4/256) + 2 bytes per parameter, 56.2 GB) when bf16 does not fit.
  std::tie(rc, j) = plan({"--host-mem", "64GiB", "--nvme", "100GB"});
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(j["choice"]["offload"], "host");
  EXPECT_EQ(j["choice"]["state_precision"], "int8");
  EXPECT_GE(j["choice"]["host_bytes_all_gpus"].get<double>(), 8.0 * 7e9);
  EXPECT_LE(j["choice"]["host_bytes_all_gpus"].get<double>(), 64.0 * (1ull << 30));
  // And none: nothing fits.
  std::tie(rc, j) = plan({"--host-mem", "32GiB", "--nvme", "100GB"});
  EXPECT_EQ(rc, 3);
  EXPECT_FALSE(j["fits"].get<bool>());
  // The human-readable answer names the flags to use.
  const Result text = run({"plan", "--params", "7B", "--gpus", "1", "--gpu-mem", "40GiB", "--host-mem", "512GiB"});
  EXPECT_EQ(text.rc, 0);
  EXPECT_NE(text.out.find("--stage 2 --offload host"), std::string::npos) << text.out;
}

TEST(CliBench, UpdateReportsBandwidth) {
  const Result r = run({"bench", "update", "--params", "64Ki", "--iters", "2", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const json j = last_json_line(r.out);
  EXPECT_EQ(j["bytes_per_param"], 28.0);  // bf16 AdamW
  EXPECT_GT(j["gb_per_s_median"].get<double>(), 0);
}

}  // namespace

namespace {

std::vector<json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

// The cosine schedule with warm-up in float64 (shardopt/schedule.hpp's definition).
double cosine_lr(double base, double floor, double warmup, double total, double t) {
  if (t <= warmup) return base * t / warmup;
  const double q = t >= total ? 1.0 : (t - warmup) / (total - warmup);
  return floor + (base - floor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * q));
}

}  // namespace

// --lr-schedule: every --metrics line carries the lr its step applied, and a run resumed from a
// checkpoint continues the schedule from the saved step counter (to the floor and past it).
TEST(CliTrain, LrScheduleInMetricsAndResume) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/shardopt-cli-sched-XXXXXX";
  ASSERT_NE(mkdtemp(pattern.data()), nullptr);
  const std::string dir = pattern;
  const std::vector<std::string> sched{"--lr", "0.002", "--lr-schedule", "cosine", "--warmup", "3",
                                       "--decay-steps", "10", "--min-lr", "0.0002"};
  auto train = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"train", "--ranks", "2", "--stage", "2", "--layers", "2", "--hidden", "16",
                                  "--batch", "4", "--steps", "6"};
    args.insert(args.end(), sched.begin(), sched.end());
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
  };
  train({"--save", dir + "/ckpt", "--metrics", dir + "/first.jsonl"});
  train({"--resume", dir + "/ckpt", "--metrics", dir + "/second.jsonl"});
  const std::vector<json> first = read_jsonl(dir + "/first.jsonl"), second = read_jsonl(dir + "/second.jsonl");
  std::filesystem::remove_all(dir);
  ASSERT_EQ(first.size(), 6u);
  ASSERT_EQ(second.size(), 6u);
  for (int k = 0; k < 12; ++k) {
    const json& line = k < 6 ? first[k] : second[k - 6];
    ASSERT_TRUE(line.contains("lr")) << line.dump();
    ASSERT_TRUE(line["applied"].get<bool>());
    const double want = cosine_lr(double(0.002f), double(0.0002f), 3, 10, k + 1);
    EXPECT_LE(std::fabs(line["lr"].get<double>() - want), want * 0x1p-24 + 1e-18) << "update " << k + 1;
  }
  EXPECT_EQ(second.back()["lr"].get<double>(), double(0.0002f));  // past --decay-steps: the floor
}

// 10 steps, --save, then 10 steps with --resume is the same run as 20 steps, bit for bit: the
// data stream, the step numbers, the loss scaler and the schedule continue where they were.
TEST(CliTrain, ResumeContinuesBitForBit) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/shardopt-cli-resume-XXXXXX";
  ASSERT_NE(mkdtemp(pattern.data()), nullptr);
  const std::string dir = pattern;
  auto train = [&](const std::string& steps, std::vector<std::string> extra) {
    std::vector<std::string> args{"train", "--ranks", "2", "--stage", "2", "--layers", "2", "--hidden", "16",
                                  "--batch", "4", "--dtype", "fp16", "--micro-steps", "2", "--lr-schedule", "cosine",
                                  "--warmup", "3", "--decay-steps", "20", "--json", "--steps", steps};
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    return last_json_line(r.out);
  };
  const json whole = train("20", {"--metrics", dir + "/whole.jsonl"});
  train("10", {"--save", dir + "/ckpt"});
  const json resumed = train("10", {"--resume", dir + "/ckpt", "--metrics", dir + "/resumed.jsonl"});
  const std::vector<json> a = read_jsonl(dir + "/whole.jsonl"), b = read_jsonl(dir + "/resumed.jsonl");
  std::filesystem::remove_all(dir);
  EXPECT_EQ(resumed["param_digest"], whole["param_digest"]);
  EXPECT_EQ(resumed["first_step"], 11);
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 10u);
  for (std::size_t k = 0; k < 10; ++k) {
    EXPECT_EQ(b[k]["step"], a[10 + k]["step"]);
    EXPECT_EQ(b[k]["loss"].get<double>(), a[10 + k]["loss"].get<double>()) << "step " << 11 + k;
    EXPECT_EQ(b[k]["lr"].get<double>(), a[10 + k]["lr"].get<double>()) << "step " << 11 + k;
    EXPECT_EQ(b[k]["loss_scale"].get<double>(), a[10 + k]["loss_scale"].get<double>()) << "step " << 11 + k;
  }
}

namespace {

std::string make_temp_dir(const std::string& tag) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/shardopt-cli-" + tag + "-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) return {};
  return pattern;
}

// The small fp16 run of ResumeContinuesBitForBit: loss scaling, accumulation and a schedule all
// have state that a resumed run must carry on.
Result train_small(const std::string& steps, const std::vector<std::string>& extra) {
  std::vector<std::string> args{"train", "--ranks", "2", "--stage", "2", "--layers", "2", "--hidden", "16",
                                "--batch", "4", "--dtype", "fp16", "--micro-steps", "2", "--lr-schedule", "cosine",
                                "--warmup", "3", "--decay-steps", "20", "--json", "--steps", steps};
  args.insert(args.end(), extra.begin(), extra.end());
  return run(args);
}

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

bool has_step_lines(const Result& r) {
  return r.out.find("step 1/") != std::string::npos || r.err.find("step 1/") != std::string::npos;
}

}  // namespace

// --save-every N: background checkpoints into DIR/step-NNNNNN after steps N, 2N, ... (not the
// last: --save DIR holds it); the newest --keep complete ones stay. Each holds the state as it was
// after its step: resuming one and training to the end gives the straight run's parameters.
TEST(CliCheckpoints, SaveEveryWritesStepCheckpointsAndKeepsTheNewest) {
  const std::string dir = make_temp_dir("every");
  ASSERT_FALSE(dir.empty());
  const std::string ck = dir + "/ck";
  const Result straight = train_small("13", {});
  const Result every = train_small("13", {"--save", ck, "--save-every", "3", "--keep", "2"});
  ASSERT_EQ(straight.rc, 0) << straight.err;
  ASSERT_EQ(every.rc, 0) << every.err;
  // Saving in the background changes nothing in the run itself.
  EXPECT_EQ(last_json_line(every.out)["param_digest"], last_json_line(straight.out)["param_digest"]);
  // Saves after steps 3, 6, 9, 12; the two newest kept; the final checkpoint is DIR itself.
  const std::vector<std::string> want{"g1.r0.bin", "g1.r1.bin", "lock", "manifest.json", "step-000009", "step-000012"};
  EXPECT_EQ(names_in(ck), want);
  EXPECT_EQ(shardopt::inspect_checkpoint(ck).trainer_metadata, "{\"next_step\": 13}");
  for (int step : {9, 12}) {
    const std::string sd = mlp::step_checkpoint_dir(ck, step);
    const shardopt::CheckpointInfo info = shardopt::inspect_checkpoint(sd);
    EXPECT_EQ(info.trainer_metadata, "{\"next_step\": " + std::to_string(step) + "}");
    EXPECT_NO_THROW(shardopt::verify_checkpoint(sd)) << sd;
    const Result rest = train_small(std::to_string(13 - step), {"--resume", sd});
    ASSERT_EQ(rest.rc, 0) << rest.err;
    EXPECT_EQ(last_json_line(rest.out)["param_digest"], last_json_line(straight.out)["param_digest"]) << sd;
    EXPECT_EQ(last_json_line(rest.out)["first_step"], step + 1);
  }
  std::filesystem::remove_all(dir);
}

// Pruning deletes a complete checkpoint only once a newer one is complete, and never one that is
// newer than the newest complete one (a save still being written).
TEST(CliCheckpoints, PruneKeepsTheNewestCompleteOne) {
  const std::string dir = make_temp_dir("prune");
  ASSERT_FALSE(dir.empty());
  const std::vector<std::string> model{"--ranks", "1", "--layers", "1", "--hidden", "8", "--batch", "2"};
  auto train = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"train"};
    args.insert(args.end(), model.begin(), model.end());
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
  };
  const std::string s3 = mlp::step_checkpoint_dir(dir, 3), s6 = mlp::step_checkpoint_dir(dir, 6);
  train({"--steps", "3", "--save", s3});
  // step-000006 as a save that has not committed yet: files but no manifest.
  std::filesystem::create_directories(s6);
  std::ofstream(s6 + "/g1.r0.bin.tmp") << "partial";
  auto listed = mlp::list_step_checkpoints(dir);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_TRUE(listed[0].complete);
  EXPECT_FALSE(listed[1].complete);
  EXPECT_TRUE(mlp::prune_step_checkpoints(dir, 1).empty());
  EXPECT_TRUE(std::filesystem::exists(s3));
  EXPECT_TRUE(std::filesystem::exists(s6));
  // A checkpoint whose record does not match its name is not one of this run's steps.
  train({"--steps", "2", "--save", mlp::step_checkpoint_dir(dir, 7)});  // records next_step 2
  EXPECT_FALSE(mlp::list_step_checkpoints(dir).back().complete);
  std::filesystem::remove_all(mlp::step_checkpoint_dir(dir, 7));
  // Once step 6 is complete, step 3 goes.
  train({"--steps", "3", "--resume", s3, "--save", s6});
  listed = mlp::list_step_checkpoints(dir);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_TRUE(listed[1].complete);
  EXPECT_EQ(mlp::prune_step_checkpoints(dir, 1), std::vector<std::string>{s3});
  EXPECT_FALSE(std::filesystem::exists(s3));
  EXPECT_TRUE(std::filesystem::exists(s6));
  std::filesystem::remove_all(dir);
}

// --resume auto: 10 steps with --save-every 5, then 10 more resumed from the newest complete
// checkpoint, are the 20-step run bit for bit, metrics steps going on at 11. A checkpoint whose
// manifest no longer verifies is passed over for the newest one that does; none at all is a fresh
// start, said on stderr.
TEST(CliCheckpoints, ResumeAutoPicksTheNewestCompleteCheckpoint) {
  const std::string dir = make_temp_dir("auto");
  ASSERT_FALSE(dir.empty());
  const std::string ck = dir + "/ck";
  const Result whole = train_small("20", {"--metrics", dir + "/whole.jsonl"});
  ASSERT_EQ(whole.rc, 0) << whole.err;
  const Result first = train_small("10", {"--save", ck, "--save-every", "5"});
  ASSERT_EQ(first.rc, 0) << first.err;
  const Result second =
      train_small("10", {"--resume", "auto", "--save", ck, "--save-every", "5", "--metrics", dir + "/second.jsonl"});
  ASSERT_EQ(second.rc, 0) << second.err;
  EXPECT_NE(second.err.find("resuming from '" + ck + "' (step 10)"), std::string::npos) << second.err;
  EXPECT_EQ(last_json_line(second.out)["param_digest"], last_json_line(whole.out)["param_digest"]);
  EXPECT_EQ(last_json_line(second.out)["first_step"], 11);
  const std::vector<json> a = read_jsonl(dir + "/whole.jsonl"), b = read_jsonl(dir + "/second.jsonl");
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 10u);
  for (std::size_t k = 0; k < 10; ++k) {
    EXPECT_EQ(b[k]["step"], a[10 + k]["step"]);
    EXPECT_EQ(b[k]["loss"].get<double>(), a[10 + k]["loss"].get<double>()) << "step " << 11 + k;
  }

  // DIR's own manifest edited (its checksum fails): step-000015, written in the background by the
  // second run, is the newest complete one; 5 steps from it end where the 20-step run ended.
  {
    std::ifstream in(ck + "/manifest.json");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto at = text.find("\"step\":");
    ASSERT_NE(at, std::string::npos);
    text.insert(at + 7, "1");
    std::ofstream(ck + "/manifest.json", std::ios::trunc) << text;
  }
  const Result third = train_small("5", {"--resume", "auto", "--save", ck});
  ASSERT_EQ(third.rc, 0) << third.err;
  EXPECT_NE(third.err.find("resuming from '" + mlp::step_checkpoint_dir(ck, 15) + "' (step 15)"), std::string::npos)
      << third.err;
  EXPECT_EQ(last_json_line(third.out)["param_digest"], last_json_line(whole.out)["param_digest"]);
  EXPECT_EQ(last_json_line(third.out)["first_step"], 16);

  // A new run (no --resume) must not mix its step checkpoints with the ones ahead of it.
  const Result fresh_into_old = train_small("10", {"--save", ck, "--save-every", "5"});
  EXPECT_NE(fresh_into_old.rc, 0);
  EXPECT_NE(fresh_into_old.err.find("step-000015"), std::string::npos) << fresh_into_old.err;
  EXPECT_FALSE(has_step_lines(fresh_into_old)) << fresh_into_old.out;

  // Nothing to resume: a fresh start, said on stderr.
  const Result fresh = train_small("3", {"--resume", "auto", "--save", dir + "/empty"});
  ASSERT_EQ(fresh.rc, 0) << fresh.err;
  EXPECT_NE(fresh.err.find("no complete checkpoint in '" + dir + "/empty'; starting a fresh run"), std::string::npos)
      << fresh.err;
  EXPECT_EQ(last_json_line(fresh.out)["first_step"], 1);
  // --resume auto needs to know where to look.
  const Result nowhere = train_small("3", {"--resume", "auto"});
  EXPECT_NE(nowhere.rc, 0);
  EXPECT_NE(nowhere.err.find("--resume auto: needs --save"), std::string::npos) << nowhere.err;
  std::filesystem::remove_all(dir);
}

// A tiny training run with `extra` flags must fail before its first step, naming `flag` and
// `reason`.
const std::vector<std::string> kTinyTrain{"train", "--ranks", "1", "--layers", "1", "--hidden", "8", "--batch", "2",
                                          "--steps", "3"};
void expect_refused_before_training(const std::vector<std::string>& extra, const std::string& flag, const std::string& reason) {
  std::vector<std::string> args = kTinyTrain;
  args.insert(args.end(), extra.begin(), extra.end());
  const Result r = run(args);
  std::string cmd;
  for (const auto& a : extra) cmd += a + " ";
  EXPECT_NE(r.rc, 0) << cmd;
  EXPECT_NE(r.err.find(flag), std::string::npos) << cmd << "-> " << r.err;
  EXPECT_NE(r.err.find(reason), std::string::npos) << cmd << "-> " << r.err;
  EXPECT_FALSE(has_step_lines(r)) << cmd << "trained:\n" << r.out;
}

// Every place a run writes to is checked before it trains: a --save that is a file, lies under
// one, is read-only or lacks the room; a --metrics that cannot be created. Each fails at once with
// the flag and the reason, and no step runs.
TEST(CliCheckpoints, DestinationsAreCheckedBeforeTraining) {
  const std::string dir = make_temp_dir("dest");
  ASSERT_FALSE(dir.empty());
  std::ofstream(dir + "/file") << "x";
  expect_refused_before_training({"--save", dir + "/file"}, "--save", "exists and is not a directory");
  expect_refused_before_training({"--save", dir + "/file/ck"}, "--save", "cannot create directory");
  expect_refused_before_training({"--save", dir + "/ck", "--save-every", "2", "--metrics", dir + "/file/m.jsonl"}, "--metrics", "cannot open");
  expect_refused_before_training({"--metrics", dir}, "--metrics", "cannot open");
  expect_refused_before_training({"--save-every", "2"}, "--save-every", "needs --save");
  expect_refused_before_training({"--save", dir + "/ck2", "--keep", "2"}, "--keep", "only with --save-every");
  // 1000 layers of hidden 65536: about 400 TB of checkpoint, more than any test machine's disk.
  // The check comes before anything is allocated.
  {
    std::vector<std::string> args{"train", "--ranks", "1", "--layers", "1000", "--hidden", "65536", "--steps", "1",
                                  "--save", dir + "/huge"};
    const Result r = run(args);
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.err.find("--save: '" + dir + "/huge' has "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(" free; this run's 1 checkpoint need "), std::string::npos) << r.err;
  }
  // A missing parent that can be created is created: the engine's save makes only the last level.
  {
    std::vector<std::string> args = kTinyTrain;
    args.push_back("--save");
    args.push_back(dir + "/a/b/ck");
    const Result r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    EXPECT_NO_THROW(shardopt::verify_checkpoint(dir + "/a/b/ck"));
  }
  std::filesystem::remove_all(dir);
}

// Read-only destinations (a directory to create the checkpoint in, the checkpoint directory
// itself, the metrics file's directory) fail at once too, naming the reason.
TEST(CliCheckpoints, ReadOnlyDestinationsFailBeforeTraining) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root, which ignores permission bits";
  const std::string dir = make_temp_dir("ro");
  ASSERT_FALSE(dir.empty());
  std::filesystem::create_directory(dir + "/ro");
  std::filesystem::permissions(dir + "/ro", std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
  std::filesystem::create_directory(dir + "/ro_ck");
  std::filesystem::permissions(dir + "/ro_ck", std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
  expect_refused_before_training({"--save", dir + "/ro/ck"}, "--save", "Permission denied");
  expect_refused_before_training({"--save", dir + "/ro_ck"}, "--save", "cannot write into '" + dir + "/ro_ck': Permission denied");
  expect_refused_before_training({"--metrics", dir + "/ro/m.jsonl"}, "--metrics", "Permission denied");
  std::filesystem::permissions(dir + "/ro", std::filesystem::perms::owner_all);
  std::filesystem::permissions(dir + "/ro_ck", std::filesystem::perms::owner_all);
  std::filesystem::remove_all(dir);
}

// Values CLI11 alone lets through: nan and inf pass its number checks, and strtoull turns -1 into
// 2^64-1; an empty path read as "not given".
TEST(CliErrors, BadValuesNameTheOption) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"train", "--lr", "nan"}, "--lr"},
      {{"train", "--lr", "inf"}, "--lr"},
      {{"train", "--lr", "-0.1"}, "--lr"},
      {{"train", "--min-lr", "nan"}, "--min-lr"},
      {{"train", "--weight-decay", "inf"}, "--weight-decay"},
      {{"train", "--clip", "nan"}, "--clip"},
      {{"train", "--seed", "-1"}, "--seed"},
      {{"train", "--seed", "18446744073709551616"}, "--seed"},
      {{"train", "--seed", "0x10"}, "--seed"},
      {{"train", "--threads", "-1"}, "--threads"},
      {{"train", "--save", ""}, "--save"},
      {{"train", "--resume", ""}, "--resume"},
      {{"train", "--metrics", ""}, "--metrics"},
      {{"generate", "--checkpoint", "x", "--prompt", "a", "--seed", "-1"}, "--seed"},
      {{"generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "nan"}, "--temperature"},
      {{"bench", "update", "--threads", "-2"}, "--threads"},
  };
  for (const auto& [args, flag] : cases) {
    std::string cmd;
    for (const auto& a : args) cmd += "'" + a + "' ";
    const Result r = run(args);
    EXPECT_NE(r.rc, 0) << cmd;
    EXPECT_NE(r.err.find(flag), std::string::npos) << cmd << "-> " << r.err;
    EXPECT_FALSE(has_step_lines(r)) << cmd;
  }
  // The largest seed is still a seed.
  EXPECT_EQ(run({"train", "--ranks", "1", "--layers", "1", "--hidden", "8", "--batch", "2", "--steps", "1", "--seed",
                 "18446744073709551615"})
                .rc,
            0);
}

TEST(CliErrors, UnknownSubcommandIsNamedWithTheChoices) {
  const Result r = run({"frobnicate", "--steps", "3"});
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.err.find("unknown subcommand 'frobnicate'"), std::string::npos) << r.err;
  for (const char* name : {"train", "generate", "tokenize", "estimate", "plan", "bench", "checkpoint"})
    EXPECT_NE(r.err.find(name), std::string::npos) << name << " not in: " << r.err;
  const Result nested = run({"checkpoint", "frob", "dir"});
  EXPECT_NE(nested.rc, 0);
  EXPECT_NE(nested.err.find("shardopt checkpoint: unknown subcommand 'frob'; the subcommands are inspect, export"),
            std::string::npos)
      << nested.err;
  // A subcommand's positional argument is not taken for one.
  EXPECT_EQ(run({"tokenize", "--bytes", "/nonexistent-in", "out"}).err.find("unknown subcommand"), std::string::npos);
}

namespace {

// A stream whose every write fails, as stdout on a full device does.
struct FailingBuf : std::streambuf {
  int overflow(int) override { return traits_type::eof(); }
  std::streamsize xsputn(const char*, std::streamsize) override { return 0; }
};

}  // namespace

// Output that cannot be written is a failure, with a message: the caller must not take a missing
// result for success.
TEST(CliErrors, OutputToAFullDeviceFails) {
  {
    FailingBuf buf;
    std::ostream out(&buf);
    std::ostringstream err;
    shardopt::cli::Io io{out, err, false, false};
    const char* argv[] = {"shardopt", "estimate", "--params", "1B", "--json"};
    EXPECT_NE(shardopt::cli::run(5, argv, io), 0);
    EXPECT_NE(err.str().find("writing the output (stdout) failed"), std::string::npos) << err.str();
  }
  if (!std::filesystem::exists("/dev/full")) GTEST_SKIP() << "no /dev/full on this system";
  const Result r = run({"train", "--ranks", "1", "--layers", "1", "--hidden", "8", "--batch", "2", "--steps", "3",
                        "--metrics", "/dev/full"});
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.err.find("--metrics: writing '/dev/full' failed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("failed at step 1"), std::string::npos) << r.err;
#if defined(SHARDOPT_CLI_EXE)
  // The program itself: stdout to /dev/full.
  const std::string dir = make_temp_dir("full");
  const std::string cmd =
      std::string("'") + SHARDOPT_CLI_EXE + "' estimate --params 1B --json >/dev/full 2>'" + dir + "/err'";
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << status;
  std::ifstream in(dir + "/err");
  const std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(err.find("writing the output (stdout) failed"), std::string::npos) << err;
  std::filesystem::remove_all(dir);
#endif
}

// A model that cannot fit is Error(out_of_memory) naming the buffer and its size, not a bare
// std::bad_alloc. The sizes here are past what this machine's allocator can give (tens of TiB),
// so the allocation fails at once without touching memory.
TEST(CliErrors, AModelThatCannotFitIsOutOfMemoryNamingTheBuffer) {
  using namespace shardopt;
  {
    // The library: one 2^44-element tensor (64 TiB of fp32 master weights).
    auto backend = make_cpu_backend({make_thread_pool(1)});
    auto comm = make_in_process_communicator(make_in_process_group(1), 0, *backend);
    Config c;
    Engine engine(c, *backend, *comm);
    engine.register_block({"huge", {{"huge.w", {std::int64_t(1) << 22, std::int64_t(1) << 22}}}});
    try {
      engine.initialize(seeded_init(1));
      FAIL() << "a 64 TiB model must not initialize";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::out_of_memory) << e.message();
      EXPECT_NE(e.message().find("cannot allocate '"), std::string::npos) << e.message();
      EXPECT_NE(e.message().find("TiB"), std::string::npos) << e.message();
    }
  }
  // The command line: the example trainer's own full-model buffers (2 blocks of hidden 200000:
  // 640 G parameters, 2.56 TB per fp32 copy).
  const Result r = run({"train", "--ranks", "1", "--layers", "2", "--hidden", "200000", "--batch", "1", "--steps", "1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("cannot allocate the teacher's weights (a full fp32 copy of the model): 640002000000 floats "
                       "(2560008000000 bytes) [out_of_memory]"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("bad_alloc"), std::string::npos) << r.err;
}
