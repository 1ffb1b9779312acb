// The shardopt command line, run in-process: parsing errors name the flag, train learns and gives
// the same parameters at every stage, estimate predicts what train measures.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "cli_run.hpp"
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
  // And neither: nothing fits.
  std::tie(rc, j) = plan({"--host-mem", "64GiB", "--nvme", "100GB"});
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
