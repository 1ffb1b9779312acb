// shardopt estimate / plan: the whole process (the trainers' activations, the CUDA context) and
// plan --largest (the largest model of a shape that trains within a budget).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cli_run.hpp"
#include "commands.hpp"
#include "shardopt/estimate.hpp"

namespace {

using shardopt::testing::last_json_line;
using json = nlohmann::json;
using Result = shardopt::testing::CliResult;

Result run(const std::vector<std::string>& args) { return shardopt::testing::run_cli(args); }

json run_json(std::vector<std::string> args) {
  args.push_back("--json");
  const Result r = run(args);
  EXPECT_EQ(r.rc, 0) << r.err;
  return last_json_line(r.out);
}

constexpr std::uint64_t GiB = std::uint64_t(1) << 30;

// ---- the trainers' activations against a count made here from the architecture ------------

// The example MLP trainer (y = x + W2 gelu(W1 x + b1) + b2, inner width 4h) keeps for backward the
// input of every block and its pre-activation and GELU output; it works with dL/dy, dL/dx, the
// targets and dL/da; its teacher (the same architecture) needs two [B,4h] and two [B,h] rows to
// run forward; a 16-bit compute dtype widens one block's parameters and gradients to fp32.
std::uint64_t mlp_expected(std::uint64_t L, std::uint64_t B, std::uint64_t h, bool widened) {
  const std::uint64_t f = 4 * h;
  std::uint64_t floats = 0;
  floats += (L + 1) * B * h;     // block inputs x_0 .. x_L
  floats += L * (B * f + B * f); // a = W1 x + b1 and u = gelu(a), every block
  floats += 3 * B * h;           // dy, dx, targets
  floats += B * f;               // da
  floats += 2 * B * f + 2 * B * h;  // the teacher's forward
  const std::uint64_t block = f * h + f + h * f + h;
  if (widened) floats += 2 * block;
  return floats * 4;
}

TEST(CliPlanActivations, ExampleMlpMatchesACountFromItsShape) {
  for (const char* dtype : {"fp32", "bf16"}) {
    const json j = run_json({"estimate", "--layers", "3", "--hidden", "8", "--batch", "5", "--dtype", dtype});
    EXPECT_EQ(j["activation_bytes_per_rank"].get<std::uint64_t>(), mlp_expected(3, 5, 8, std::string(dtype) != "fp32"))
        << dtype;
  }
}

// GPT-2 (pre-norm blocks: x + attn(ln_1(x)), then + mlp(ln_2(.)), learned positions, tied LM
// head), as the example GPT trainer runs it on B sequences of T tokens (N = B*T rows, width C,
// H heads, vocabulary V, P positions):
//   kept for backward per layer (every layer, or one with recompute): ln_1's output and its
//   mean/rstd, q|k|v, the attention's output, the attention probabilities [B,H,T,T], the residual
//   after attention, ln_2's output and mean/rstd, c_fc's output and its GELU;
//   the residual stream (each layer's input and the last output), ln_f's output and mean/rstd,
//   the logits; dL/d(ln_f out) and two dL/dx buffers; one layer's backward scratch: dL/d(residual),
//   a [N,C] and two [N,4C] gradients of intermediates, and a [T,T] row block for attention;
//   the token ids (read, and where the ops see them: N+1 each, int32);
//   with a 16-bit compute dtype, fp32 copies of the largest block's parameters and gradients.
std::uint64_t gpt_expected(std::uint64_t L, std::uint64_t H, std::uint64_t C, std::uint64_t V, std::uint64_t P,
                           std::uint64_t B, std::uint64_t T, bool recompute, bool widened) {
  const std::uint64_t N = B * T, NC = N * C;
  const std::uint64_t per_layer = NC + 2 * N        // ln_1
                                  + 3 * NC          // qkv
                                  + NC              // attention output
                                  + B * H * T * T   // attention probabilities
                                  + NC              // residual after attention
                                  + NC + 2 * N      // ln_2
                                  + 4 * NC + 4 * NC;  // c_fc, gelu
  std::uint64_t floats = (recompute ? 1 : L) * per_layer;
  floats += (L + 1) * NC;                  // residual stream
  floats += NC + 2 * N;                    // ln_f
  floats += N * V;                         // logits
  floats += NC + 2 * NC;                   // dL/d(ln_f out), dx ping-pong
  floats += NC + NC + 4 * NC + 4 * NC + T * T;  // a layer's backward scratch
  if (widened) {
    const std::uint64_t embed = V * C + P * C, layer = 12 * C * C + 13 * C, final_norm = 2 * C;
    floats += 2 * std::max({embed, layer, final_norm});
  }
  return floats * 4 + 2 * (N + 1) * 4;
}

TEST(CliPlanActivations, GptMatchesACountFromItsShapeWithAndWithoutRecompute) {
  const std::uint64_t L = 3, H = 2, C = 16, V = 40, T = 8, B = 3;
  for (bool recompute : {false, true})
    for (const char* dtype : {"fp32", "bf16"}) {
      std::vector<std::string> args = {"estimate", "--model", "gpt", "--layers", "3", "--heads", "2", "--hidden", "16",
                                       "--vocab", "40", "--seq", "8", "--batch", "3", "--dtype", dtype};
      if (recompute) args.push_back("--recompute");
      const json j = run_json(args);
      EXPECT_EQ(j["activation_bytes_per_rank"].get<std::uint64_t>(),
                gpt_expected(L, H, C, V, /*P=*/T, B, T, recompute, std::string(dtype) != "fp32"))
          << dtype << (recompute ? " recompute" : "");
    }
}

// ---- the CUDA context ------------------------------------------------------------------------

TEST(CliPlanContext, CudaBackendAddsActivationsAndContextToTheDevice) {
  const std::vector<std::string> base = {"estimate", "--model", "gpt", "--preset", "tiny", "--seq", "64",
                                         "--world", "2", "--stage", "3", "--dtype", "bf16"};
  const json cpu = run_json(base);
  EXPECT_FALSE(cpu.contains("device_process_bytes_per_rank"));
  bool mentions_context = false;
  for (const auto& n : cpu["not_included"]) mentions_context |= n.get<std::string>().find("CUDA context") != std::string::npos;
  EXPECT_TRUE(mentions_context) << cpu["not_included"].dump();

  auto with = [&](std::vector<std::string> extra) {
    auto args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return run_json(args);
  };
  const json cuda = with({"--backend", "cuda"});
  const std::uint64_t device = cuda["bytes"]["device"]["total"].get<std::uint64_t>();
  const std::uint64_t act = cuda["activation_bytes_per_rank"].get<std::uint64_t>();
  EXPECT_EQ(cuda["cuda_context_bytes"].get<std::uint64_t>(), 512u << 20);  // the stated default
  EXPECT_EQ(cuda["device_process_bytes_per_rank"].get<std::uint64_t>(), device + act + (512u << 20));
  EXPECT_EQ(cuda["memory_bytes_per_rank"].get<std::uint64_t>(), cpu["memory_bytes_per_rank"].get<std::uint64_t>() + (512u << 20));
  const json big = with({"--backend", "cuda", "--cuda-context", "1GiB"});
  EXPECT_EQ(big["device_process_bytes_per_rank"].get<std::uint64_t>(), device + act + GiB);
}

// ---- plan --largest ----------------------------------------------------------------------------

// What estimate says one configuration of a model needs: the device total of the process, and
// the host memory of all GPUs' ranks.
struct Need {
  double device = 0, host = 0;
};
Need estimate_need(std::vector<std::string> model, int gpus, int stage, const std::string& offload, bool params,
                   const std::string& precision = "fp32") {
  std::vector<std::string> args = {"estimate", "--backend", "cuda", "--world", std::to_string(gpus), "--stage",
                                   std::to_string(stage), "--offload", offload, "--state-precision", precision};
  args.insert(args.end(), model.begin(), model.end());
  if (params) args.push_back("--offload-params");
  const json j = run_json(args);
  Need n;
  n.device = j["device_process_bytes_per_rank"].get<double>();
  n.host = (j["bytes"]["pinned_host"]["total"].get<double>() + j["bytes"]["host"]["total"].get<double>()) * gpus;
  return n;
}

struct Config {
  int stage;
  std::string offload;
  bool params;
  std::string precision = "fp32";
};
// Every configuration plan considers: fp32 state without and with offload, then compressed state.
const Config kAll[] = {{0, "none", false}, {1, "none", false}, {2, "none", false}, {3, "none", false},
                       {2, "host", false}, {3, "host", false}, {3, "host", true},
                       {1, "none", false, "bf16"}, {2, "none", false, "bf16"}, {3, "none", false, "bf16"},
                       {1, "none", false, "int8"}, {2, "none", false, "int8"}, {3, "none", false, "int8"},
                       {2, "host", false, "bf16"}, {3, "host", false, "bf16"}, {3, "host", true, "bf16"},
                       {2, "host", false, "int8"}, {3, "host", false, "int8"}, {3, "host", true, "int8"}};

// The answer fits with the configuration plan names, and one size more fits with none of the
// configurations (each checked by estimate, not by plan).
void expect_largest_consistent(const std::vector<std::string>& shape, const std::string& size_flag, int gpus,
                               double gpu_mem, double host_mem, const json& j) {
  ASSERT_TRUE(j["fits"].get<bool>()) << j.dump();
  ASSERT_FALSE(j["at_search_limit"].get<bool>()) << j.dump();
  const std::uint64_t n = j["size"].get<std::uint64_t>();
  const double usable = gpu_mem * 0.9;  // plan's default headroom
  auto model_of = [&](std::uint64_t size) {
    auto m = shape;
    m.push_back(size_flag);
    m.push_back(std::to_string(size));
    return m;
  };
  // The flags plan prints to train this model name its size.
  EXPECT_NE(j["flags"].get<std::string>().find(size_flag + " " + std::to_string(n) + " "), std::string::npos)
      << j["flags"];
  const json& c = j["choice"];
  const Need at = estimate_need(model_of(n), gpus, c["stage"].get<int>(), c["offload"].get<std::string>(),
                                c["offload_params"].get<bool>(), c["state_precision"].get<std::string>());
  EXPECT_LE(at.device, usable) << "size " << n;
  EXPECT_LE(at.host, host_mem) << "size " << n;
  EXPECT_DOUBLE_EQ(at.device, c["need_per_gpu"].get<double>());
  for (const Config& k : kAll) {
    const Need up = estimate_need(model_of(n + 1), gpus, k.stage, k.offload, k.params, k.precision);
    EXPECT_TRUE(up.device > usable || up.host > host_mem)
        << "size " << n + 1 << " fits at stage " << k.stage << " offload " << k.offload << (k.params ? "+p" : "");
  }
}

TEST(CliPlanLargest, ExampleMlpLayersAtAFixedWidth) {
  const std::vector<std::string> shape = {"--hidden", "512", "--batch", "8", "--dtype", "bf16"};
  std::vector<std::string> args = {"plan", "--largest", "layers", "--gpu-mem", "1GiB", "--host-mem", "2GiB"};
  args.insert(args.end(), shape.begin(), shape.end());
  const json j = run_json(args);
  expect_largest_consistent(shape, "--layers", 1, 1.0 * GiB, 2.0 * GiB, j);
  // A bigger budget never trains fewer layers.
  args[4] = "2GiB";
  EXPECT_GE(run_json(args)["size"].get<std::uint64_t>(), j["size"].get<std::uint64_t>());
}

TEST(CliPlanLargest, GptLayersAtAPresetsWidthWithRecompute) {
  const std::vector<std::string> shape = {"--model", "gpt", "--hidden", "64", "--heads", "4", "--vocab", "256",
                                          "--seq", "32", "--batch", "2", "--dtype", "bf16", "--recompute"};
  std::vector<std::string> args = {"plan", "--largest", "layers", "--gpu-mem", "768MiB", "--host-mem", "1GiB"};
  args.insert(args.end(), shape.begin(), shape.end());
  const json j = run_json(args);
  expect_largest_consistent(shape, "--layers", 1, 768.0 * (1 << 20), 1.0 * GiB, j);
  // Without recompute every layer's activations stay: fewer layers fit.
  args.pop_back();
  EXPECT_LT(run_json(args)["size"].get<std::uint64_t>(), j["size"].get<std::uint64_t>());
}

TEST(CliPlanLargest, ParamsOnTwoGpusAndTheNextSizeSaysWhy) {
  const std::vector<std::string> shape = {"--dtype", "bf16"};
  const json j = run_json({"plan", "--largest", "params", "--gpus", "2", "--gpu-mem", "4GiB", "--host-mem", "16GiB",
                           "--dtype", "bf16"});
  expect_largest_consistent(shape, "--params", 2, 4.0 * GiB, 16.0 * GiB, j);
  ASSERT_TRUE(j.contains("next")) << j.dump();
  EXPECT_FALSE(j["next"]["fits"].get<bool>());
  const json& same = j["next"]["same_configuration"];
  EXPECT_FALSE(same["fits_gpu"].get<bool>() && same["fits_host"].get<bool>()) << same.dump();
  const Result text = run({"plan", "--largest", "params", "--gpus", "2", "--gpu-mem", "4GiB", "--host-mem", "16GiB",
                           "--deepspeed"});
  ASSERT_EQ(text.rc, 0) << text.err;
  EXPECT_NE(text.out.find("largest that trains here"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("next size up"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("DeepSpeed"), std::string::npos) << text.out;
}

// Sizes at the edge of 64 bits: a budget of exabytes reaches the search's limit (2^48
// parameters) without wrapping; a GPU smaller than the CUDA context trains nothing.
TEST(CliPlanLargest, HugeAndTinyBudgets) {
  const json huge = run_json({"plan", "--largest", "params", "--gpu-mem", "9e18", "--host-mem", "9e18"});
  EXPECT_TRUE(huge["fits"].get<bool>());
  EXPECT_TRUE(huge["at_search_limit"].get<bool>());
  EXPECT_EQ(huge["params"].get<std::uint64_t>(), std::uint64_t(1) << 48);
  const Result tiny = run({"plan", "--largest", "layers", "--gpu-mem", "256MiB", "--json"});
  EXPECT_EQ(tiny.rc, 3) << tiny.out << tiny.err;
  EXPECT_FALSE(last_json_line(tiny.out)["fits"].get<bool>());
}

// ---- DeepSpeed's estimator, against figures it printed itself --------------------------------

// DeepSpeed's documentation and users quote its estimator's output. t5-small (60,506,624 params)
// on 1 GPU, ZeRO-3: per CPU 1.52 GB with parameter and optimizer offload, 1.35 GB with optimizer
// offload (its "GB" are 2^30 bytes, printed to 2 decimals). The 1.61B model on 1 GPU,
// ZeRO-2 with optimizer offload: GPU 3.0 GB, CPU 36.0 GB.
TEST(CliPlanDeepSpeed, ReproducesItsPublishedFigures) {
  const json t5 = run_json({"plan", "--params", "60506624", "--gpu-mem", "80GiB"})["deepspeed"];
  EXPECT_NEAR(t5["zero3_offload_all"]["cpu_bytes"].get<double>() / GiB, 1.52, 0.005);
  EXPECT_NEAR(t5["zero3_offload_optimizer"]["cpu_bytes"].get<double>() / GiB, 1.35, 0.005);
  const json m = run_json({"plan", "--layers", "12", "--hidden", "4096", "--gpu-mem", "80GiB"});
  EXPECT_EQ(m["params"].get<std::uint64_t>(), 12u * (8u * 4096 * 4096 + 5u * 4096));
  EXPECT_NEAR(m["deepspeed"]["zero2_offload_optimizer"]["gpu_bytes"].get<double>() / GiB, 3.0, 0.05);
  EXPECT_NEAR(m["deepspeed"]["zero2_offload_optimizer"]["cpu_bytes"].get<double>() / GiB, 36.0, 0.05);
}

// ---- bad input, named --------------------------------------------------------------------------

// ---- compressed optimizer state -----------------------------------------------------------------

// estimate counts the state in its precision: Adam's two moments at 4, 2 and 1 + 4/B bytes per
// parameter (a --params model of equal blocks, stage 0: every element, nothing sharded).
TEST(CliPlanCompressed, EstimateCountsTheStateInItsPrecision) {
  auto state_bytes = [](const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"estimate", "--params", "1M", "--blocks", "4", "--dtype", "bf16"};
    args.insert(args.end(), extra.begin(), extra.end());
    const json j = run_json(args);
    return j["bytes"]["device"]["optimizer_state"].get<double>();
  };
  // 4 blocks of 250000, each its own unit padded to world (4) x alignment (64; int8: 256).
  const double n = 1e6;
  const double f32 = state_bytes({});
  const double b16 = state_bytes({"--state-precision", "bf16"});
  const double i8 = state_bytes({"--state-precision", "int8", "--quant-block", "256"});
  EXPECT_GE(f32, 8 * n);
  EXPECT_LE(f32, 8 * n + 8 * 4 * 256);
  EXPECT_DOUBLE_EQ(b16, f32 / 2);
  EXPECT_GE(i8, 2 * n * (1 + 4.0 / 256));
  EXPECT_LE(i8, 2 * (n + 4 * 4 * 256) * (1 + 4.0 / 256));
}

// A model that fits one GPU with no fp32-state configuration (offload refused by a small host
// memory and NVMe) but with int8 state: plan proposes int8, and estimate agrees with its figure.
TEST(CliPlanCompressed, PlanProposesCompressedStateWhenThatIsWhatFits) {
  const std::vector<std::string> model = {"--params", "100M", "--dtype", "bf16"};
  // Adam, bf16 compute, stage 3 on one GPU: about 16 (fp32 state), 12 (bf16) and 10 (int8) bytes
  // per parameter, plus the default CUDA context (512 MiB); 90% of 1734 MiB is between int8 and bf16.
  std::vector<std::string> args = {"plan", "--gpu-mem", "1734MiB", "--host-mem", "64MiB", "--nvme", "64MiB"};
  args.insert(args.end(), model.begin(), model.end());
  const json j = run_json(args);
  ASSERT_TRUE(j["fits"].get<bool>()) << j.dump();
  for (const json& r : j["stages"])
    if (r["state_precision"] == "fp32" || r["state_precision"] == "bf16") {
      EXPECT_FALSE(r["fits"].get<bool>()) << r.dump();
    }
  const json& c = j["choice"];
  EXPECT_EQ(c["state_precision"], "int8") << j.dump();
  const Need at = estimate_need(model, 1, c["stage"].get<int>(), c["offload"].get<std::string>(),
                                c["offload_params"].get<bool>(), "int8");
  EXPECT_DOUBLE_EQ(at.device, c["need_per_gpu"].get<double>());
  EXPECT_LE(at.device, 0.9 * 1734 * 1048576.0);
  // An explicit --state-precision is kept: with fp32 asked for, nothing fits and nothing else is
  // proposed.
  args.insert(args.end(), {"--state-precision", "fp32", "--json"});
  const Result refused = run(args);
  EXPECT_NE(refused.rc, 0) << "a model that does not fit: " << refused.out;
  const json pinned = last_json_line(refused.out);
  EXPECT_FALSE(pinned["fits"].get<bool>()) << pinned.dump();
  for (const json& row : pinned["stages"]) EXPECT_EQ(row["state_precision"], "fp32") << row.dump();
}

TEST(CliPlanErrors, BadInputNamesTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"plan", "--params", "1B", "--gpu-mem", "0"}, "--gpu-mem"},
      {{"plan", "--largest", "params", "--gpu-mem", "0GiB"}, "--gpu-mem"},
      {{"plan", "--params", "1B", "--gpu-mem", "24GiB", "--host-mem", "nonsense"}, "--host-mem"},
      {{"plan", "--params", "1B", "--gpu-mem", "24GiB", "--host-mem", "0"}, "--host-mem"},
      {{"plan", "--params", "1B", "--gpu-mem", "24GiB", "--cuda-context", "lots"}, "--cuda-context"},
      {{"plan", "--params", "1B", "--gpu-mem", "24GiB", "--cuda-context", "9e18"}, "--cuda-context"},
      {{"plan", "--params", "1B", "--gpu-mem", "24GiB", "--cuda-context", ""}, "--cuda-context"},
      {{"plan", "--params", "1B", "--gpu-mem", ""}, "--gpu-mem"},
      {{"plan", "--largest", "bytes", "--gpu-mem", "24GiB"}, "--largest"},
      {{"plan", "--largest", "layers", "--layers", "4", "--gpu-mem", "24GiB"}, "--layers"},
      {{"plan", "--largest", "params", "--params", "1B", "--gpu-mem", "24GiB"}, "--params"},
      {{"plan", "--largest", "params", "--model", "gpt", "--gpu-mem", "24GiB"}, "--largest"},
      {{"plan", "--model", "gpt", "--preset", "small", "--seq", "2048", "--gpu-mem", "24GiB"}, "--seq"},
      {{"plan", "--model", "gpt", "--preset", "small", "--layers", "3", "--gpu-mem", "24GiB"}, "--preset"},
      {{"plan", "--layers", "100000", "--hidden", "1048576", "--batch", "16777216", "--gpu-mem", "24GiB"}, "--batch"},
      {{"estimate", "--model", "gpt", "--positions", "1048576", "--seq", "1048576", "--batch", "16777216"}, "--seq"},
      {{"estimate", "--cuda-context", "1GiB"}, "--cuda-context"},
      {{"estimate", "--backend", "tpu"}, "--backend"},
      {{"estimate", "--backend", "cuda", "--cuda-context", "-1"}, "--cuda-context"},
      {{"estimate", "--state-precision", "fp8"}, "--state-precision"},
      {{"estimate", "--state-precision", "int8", "--quant-block", "100"}, "--quant-block"},
      {{"estimate", "--state-precision", "int8", "--quant-block", "8192"}, "--quant-block"},
      {{"estimate", "--state-precision", "int8", "--quant-block", "0"}, "--quant-block"},
      {{"train", "--state-precision", "int8", "--quant-block", "32", "--steps", "1"}, "--quant-block"},
  };
  for (const auto& [args, flag] : cases) {
    const Result r = run(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_NE(r.rc, 0) << joined;
    EXPECT_NE(r.err.find(flag), std::string::npos) << joined << "\n" << r.err;
  }
}

// ---- estimate --borrowed: the trainer's memory lent to the engine -------------------------

// What the engine owns is its plan with that memory borrowed (plan_memory called here with the
// same borrowing, on the model the same flags give); what the trainer lends is every tensor's
// compute-dtype bytes per kind, counted here from the parameter count; and the plan drops the full
// copies (and, at stages 2-3, the gradient buckets) the stage no longer needs.
TEST(CliEstimateBorrowed, OwnedMatchesThePlanAndLentIsPrintedApart) {
  using namespace shardopt;
  const std::uint64_t n = 1000003;
  const int dev = static_cast<int>(Place::device);
  for (int stage : {0, 1, 2, 3})
    for (const std::string which : {"params", "grads", "params,grads", "grads,params"}) {
      SCOPED_TRACE("stage " + std::to_string(stage) + " --borrowed " + which);
      const json j = run_json({"estimate", "--params", std::to_string(n), "--blocks", "7", "--world", "3", "--stage",
                               std::to_string(stage), "--dtype", "bf16", "--borrowed", which});
      cli::ModelArgs m;
      m.params = std::to_string(n);
      m.blocks = 7;
      m.stage = stage;
      m.dtype = "bf16";
      const cli::Model model = cli::build_model(m);
      const shardopt::Config cfg = cli::build_config(m, model);
      Borrowing b;
      b.params = which.find("params") != std::string::npos;
      b.grads = which.find("grads") != std::string::npos;
      const MemoryReport planned = plan_memory(cfg, model.blocks, 3, b).report();
      const MemoryReport plain = plan_memory(cfg, model.blocks, 3).report();
      ASSERT_EQ(j["params"].get<std::uint64_t>(), n);
      EXPECT_EQ(j["bytes"]["device"]["total"].get<std::uint64_t>(), planned.peak_total[dev]);
      EXPECT_EQ(j["borrowed"]["params"].get<bool>(), b.params);
      EXPECT_EQ(j["borrowed"]["grads"].get<bool>(), b.grads);
      EXPECT_EQ(j["borrowed"]["device_bytes"].get<std::uint64_t>(), ((b.params ? 1 : 0) + (b.grads ? 1 : 0)) * n * 2);
      bool full_params = false, full_grads = false;
      for (const auto& buf : j["buffers"]) {
        full_params = full_params || buf["name"] == "full parameters";
        full_grads = full_grads || buf["name"] == "full gradients";
      }
      // (grads at stages 2-3: no buckets, the units reduced from the trainer's arrays)
      const bool drops_params = b.params && stage <= 2;
      const bool drops_grads = b.grads;
      bool buckets = false;
      for (const auto& buf : j["buffers"])
        buckets = buckets || buf["name"].get<std::string>().rfind("gradient bucket", 0) == 0;
      EXPECT_EQ(buckets, stage >= 2 && !b.grads);
      EXPECT_EQ(full_params, stage < 3 && !drops_params);
      EXPECT_EQ(full_grads, stage < 2 && !drops_grads);
      if (drops_params || drops_grads) {
        EXPECT_LT(planned.peak_total[dev], plain.peak_total[dev]);
      } else {
        EXPECT_EQ(planned.peak_total[dev], plain.peak_total[dev]);
      }
    }
  // The text: the engine's total and the trainer's lent bytes, apart.
  const Result r = run({"estimate", "--params", std::to_string(n), "--blocks", "7", "--world", "3", "--stage", "1",
                        "--dtype", "bf16", "--borrowed", "params,grads"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("the trainer lends its own parameters and gradients: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(" + std::to_string(4 * n) + " bytes) of backend memory"), std::string::npos) << r.out;
  // Bad values name the flag, the value and the choices.
  for (const char* bad : {"x", "params,x", "", "params,,grads"}) {
    const Result e = run({"estimate", "--borrowed", bad});
    EXPECT_NE(e.rc, 0) << bad;
    const std::string item = std::string(bad) == "params,x" ? "x" : std::string(bad) == "x" ? "x" : "";
    EXPECT_NE(e.err.find("--borrowed: unknown '" + item + "' (expected params, grads)"), std::string::npos)
        << bad << ": " << e.err;
  }
}

// ---- plan --borrowed: the trainer keeps its own arrays on the GPU and lends them -------------

// The engine's device bytes for one of plan's rows (its stage, offload and state precision) and
// what the trainer lends, both from plan_memory called here on `base` with that row's settings.
struct RowPlan {
  std::uint64_t engine = 0, lent = 0, host = 0;
};
RowPlan plan_row(const shardopt::Config& base, const std::vector<shardopt::BlockSpec>& blocks, int world, int stage,
                 const std::string& offload, bool offload_params, const std::string& precision,
                 const shardopt::Borrowing* borrowing) {
  using namespace shardopt;
  shardopt::Config c = base;  // (Config alone is this file's list of plan's configurations)
  c.stage = stage;
  c.offload_optimizer = offload == "none" ? OffloadKind::none : offload == "host" ? OffloadKind::host : OffloadKind::nvme;
  if (c.offload_optimizer == OffloadKind::nvme) c.nvme_dir = "/nonexistent";  // planning does not touch it
  c.offload_params = offload_params;
  EXPECT_TRUE(parse_state_precision(precision, c.state_precision)) << precision;
  const MemoryPlan p = borrowing ? plan_memory(c, blocks, world, *borrowing) : plan_memory(c, blocks, world);
  const MemoryReport r = p.report();
  RowPlan out;
  out.engine = r.peak_total[int(Place::device)];
  out.lent = p.borrowed[int(Place::device)];
  out.host = r.peak_total[int(Place::pinned_host)] + r.peak_total[int(Place::host)];
  return out;
}
RowPlan plan_row(const shardopt::Config& base, const std::vector<shardopt::BlockSpec>& blocks, int world,
                 const json& row, const shardopt::Borrowing* borrowing) {
  return plan_row(base, blocks, world, row["stage"].get<int>(), row["offload"].get<std::string>(),
                  row["offload_params"].get<bool>(), row["state_precision"].get<std::string>(), borrowing);
}

// Every row plan printed against plan_memory here: the engine's bytes are its borrowed plan's, the
// lent bytes are the model's full arrays (`lent`, counted by the caller from the parameter count),
// and the need per GPU adds them, the activations and the context; the choice is the first row
// whose need fits `usable` (no host or NVMe limit given, so the GPU decides).
void expect_borrowed_rows(const json& j, const shardopt::Config& cfg, const std::vector<shardopt::BlockSpec>& blocks,
                          int world, const shardopt::Borrowing& b, std::uint64_t lent, std::uint64_t act,
                          std::uint64_t context, double usable) {
  ASSERT_TRUE(j.contains("borrowed")) << j.dump();
  EXPECT_EQ(j["borrowed"]["params"].get<bool>(), b.params);
  EXPECT_EQ(j["borrowed"]["grads"].get<bool>(), b.grads);
  EXPECT_EQ(j["borrowed"]["device_bytes"].get<std::uint64_t>(), lent);
  int first_fit = -1;
  int i = 0;
  for (const json& row : j["stages"]) {
    SCOPED_TRACE(row.dump());
    const RowPlan p = plan_row(cfg, blocks, world, row, &b);
    EXPECT_EQ(p.lent, lent);
    EXPECT_EQ(row["device_bytes"].get<std::uint64_t>(), p.engine);
    EXPECT_EQ(row["lent_bytes"].get<std::uint64_t>(), lent);
    const std::uint64_t need = p.engine + lent + act + context;
    EXPECT_EQ(row["need_per_gpu"].get<std::uint64_t>(), need);
    EXPECT_EQ(row["fits"].get<bool>(), double(need) <= usable);
    if (first_fit < 0 && double(need) <= usable) first_fit = i;
    ++i;
  }
  EXPECT_EQ(j["fits"].get<bool>(), first_fit >= 0);
  if (first_fit < 0) return;
  const json& want = j["stages"][std::size_t(first_fit)];
  const json& c = j["choice"];
  EXPECT_EQ(c["stage"], want["stage"]);
  EXPECT_EQ(c["offload"], want["offload"]);
  EXPECT_EQ(c["offload_params"], want["offload_params"]);
  EXPECT_EQ(c["state_precision"], want["state_precision"]);
  EXPECT_EQ(c["need_per_gpu"], want["need_per_gpu"]);
  EXPECT_EQ(c["lent_bytes"].get<std::uint64_t>(), lent);
}

// The example MLP (its activations counted here from its shape, the CUDA context the stated
// default): with both arrays lent, each row's need is the borrowed plan's device total plus
// 2 x 2 bytes per parameter (bf16) plus the activations and the context; with the parameters
// alone, 2 bytes per parameter. A roomy GPU (stage 0 chosen) and one just too small for any stage
// without offload (offload rows considered) are both checked.
TEST(CliPlanBorrowed, EveryRowCountsTheBorrowedPlanTheLentArraysActivationsAndContext) {
  using namespace shardopt;
  const std::uint64_t L = 3, h = 64, B = 4;
  const int gpus = 3;
  cli::ModelArgs m;
  m.layers = int(L);
  m.hidden = int(h);
  m.batch = int(B);
  m.dtype = "bf16";
  const cli::Model model = cli::build_model(m);
  const shardopt::Config cfg = cli::build_config(m, model);
  const std::uint64_t params = L * (8 * h * h + 5 * h);  // W1 [4h,h], b1 [4h], W2 [h,4h], b2 [h] per block
  ASSERT_EQ(model.params, params);
  const std::uint64_t act = mlp_expected(L, B, h, /*widened=*/true);
  const std::uint64_t context = 512u << 20;
  for (const std::string which : {"params,grads", "params"}) {
    SCOPED_TRACE("--borrowed " + which);
    Borrowing b;
    b.params = true;
    b.grads = which == "params,grads";
    const std::uint64_t lent = (b.grads ? 2 : 1) * params * 2;
    // One byte less than the smallest need of the four fp32-state rows without offload (of a model
    // this small, not stage 3's: its gathered units outweigh the shards): offload is tried.
    std::uint64_t smallest = UINT64_MAX;
    for (int s = 0; s <= 3; ++s) {
      const RowPlan p = plan_row(cfg, model.blocks, gpus, s, "none", false, "fp32", &b);
      smallest = std::min(smallest, p.engine + p.lent + act + context);
    }
    const std::uint64_t tight = smallest - 1;
    for (const std::uint64_t gpu_mem : {std::uint64_t(80) * GiB, tight}) {
      SCOPED_TRACE("--gpu-mem " + std::to_string(gpu_mem));
      const std::vector<std::string> args = {"plan", "--layers", std::to_string(L), "--hidden", std::to_string(h),
                                             "--batch", std::to_string(B), "--gpus", std::to_string(gpus),
                                             "--gpu-mem", std::to_string(gpu_mem), "--headroom", "0",
                                             "--borrowed", which, "--json"};
      const Result r = run(args);
      ASSERT_TRUE(r.rc == 0 || r.rc == 3) << r.err;
      const json j = last_json_line(r.out);
      EXPECT_EQ(j["activation_bytes_per_gpu"].get<std::uint64_t>(), act);
      EXPECT_EQ(j["cuda_context_bytes"].get<std::uint64_t>(), context);
      expect_borrowed_rows(j, cfg, model.blocks, gpus, b, lent, act, context, double(gpu_mem));
      EXPECT_EQ(r.rc, j["fits"].get<bool>() ? 0 : 3);
      if (gpu_mem == tight) {
        EXPECT_TRUE(j["offload_considered"].get<bool>()) << j.dump();
      } else {
        EXPECT_EQ(j["choice"]["stage"].get<int>(), 0) << j.dump();
      }
    }
  }
}

// A GPU on which the plain plan picks a stage but the trainer's arrays leave no room for it: the
// budget is the plain plan's need at some stage k (from plan_memory here, with no headroom), picked
// so that no stage at or below k fits once the arrays are lent (checked here too). The borrowed plan
// must then pick a higher stage, offload or compressed state, or nothing (exit 3); without
// --borrowed the output has no borrowed figures at all.
TEST(CliPlanBorrowed, TheLentArraysPushTheChoiceUp) {
  using namespace shardopt;
  const std::uint64_t n = 100000007, act = GiB, context = 512u << 20;
  const int gpus = 4;
  cli::ModelArgs m;
  m.params = std::to_string(n);
  m.dtype = "bf16";
  const cli::Model model = cli::build_model(m);
  const shardopt::Config cfg = cli::build_config(m, model);
  ASSERT_EQ(model.params, n);
  Borrowing b;
  b.params = b.grads = true;
  std::uint64_t plain[4], borrowed[4];
  for (int s = 0; s <= 3; ++s) {
    const RowPlan p = plan_row(cfg, model.blocks, gpus, s, "none", false, "fp32", nullptr);
    const RowPlan q = plan_row(cfg, model.blocks, gpus, s, "none", false, "fp32", &b);
    EXPECT_EQ(p.lent, 0u);
    EXPECT_EQ(q.lent, 2 * n * 2);
    plain[s] = p.engine + act + context;
    borrowed[s] = q.engine + q.lent + act + context;
  }
  auto first_fit = [](const std::uint64_t (&need)[4], std::uint64_t budget) {
    for (int s = 0; s <= 3; ++s)
      if (need[s] <= budget) return s;
    return 4;
  };
  int k = -1;
  for (int s = 0; s <= 3 && k < 0; ++s)
    if (first_fit(borrowed, plain[s]) > first_fit(plain, plain[s])) k = s;
  ASSERT_GE(k, 0) << "no stage whose plain need leaves the borrowed plan without it";
  const std::uint64_t budget = plain[k];
  const int plain_stage = first_fit(plain, budget);
  std::vector<std::string> args = {"plan", "--params", std::to_string(n), "--gpus", std::to_string(gpus),
                                   "--gpu-mem", std::to_string(budget), "--headroom", "0", "--activations", "1GiB"};
  const json pj = run_json(args);
  ASSERT_TRUE(pj["fits"].get<bool>()) << pj.dump();
  EXPECT_EQ(pj["choice"]["stage"].get<int>(), plain_stage);
  EXPECT_EQ(pj["choice"]["offload"], "none");
  EXPECT_EQ(pj["choice"]["need_per_gpu"].get<std::uint64_t>(), plain[plain_stage]);
  EXPECT_FALSE(pj.contains("borrowed"));
  EXPECT_FALSE(pj["choice"].contains("lent_bytes"));
  for (const json& row : pj["stages"]) EXPECT_FALSE(row.contains("lent_bytes")) << row.dump();

  args.insert(args.end(), {"--borrowed", "params,grads", "--json"});
  const Result r = run(args);
  ASSERT_TRUE(r.rc == 0 || r.rc == 3) << r.err;
  const json bj = last_json_line(r.out);
  expect_borrowed_rows(bj, cfg, model.blocks, gpus, b, 2 * n * 2, act, context, double(budget));
  EXPECT_EQ(r.rc, bj["fits"].get<bool>() ? 0 : 3);
  if (r.rc == 0) {
    const json& c = bj["choice"];
    EXPECT_TRUE(c["stage"].get<int>() > plain_stage || c["offload"] != "none" || c["state_precision"] != "fp32")
        << c.dump();
  }

  // The text: the table has the lent column, the header says what is lent and how much; without
  // --borrowed neither appears.
  args.pop_back();
  const Result text = run(args);
  EXPECT_NE(text.out.find("lent/GPU"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("the trainer's own parameters and gradients lent to the engine (--borrowed) "),
            std::string::npos) << text.out;
  EXPECT_NE(text.out.find("(" + std::to_string(4 * n) + " bytes;"), std::string::npos) << text.out;
  args.resize(args.size() - 2);
  const Result plain_text = run(args);
  ASSERT_EQ(plain_text.rc, 0) << plain_text.err;
  EXPECT_EQ(plain_text.out.find("lent"), std::string::npos) << plain_text.out;
}

// --largest with --borrowed searches with the same accounting: the size it names fits with its
// configuration once the arrays are lent, one size more fits with none of plan's configurations
// (each checked with plan_memory here), and lending the arrays never trains a larger model.
TEST(CliPlanBorrowed, LargestUsesTheSameAccounting) {
  using namespace shardopt;
  const int gpus = 2;
  const double gpu_mem = 4.0 * GiB, host_mem = 16.0 * GiB, usable = gpu_mem * 0.9;
  const std::uint64_t context = 512u << 20;
  const std::vector<std::string> base = {"plan", "--largest", "params", "--gpus", "2", "--gpu-mem", "4GiB",
                                         "--host-mem", "16GiB"};
  auto with = [&](std::vector<std::string> extra) {
    auto args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return run_json(args);
  };
  const json plain = with({});
  const json j = with({"--borrowed", "params,grads"});
  ASSERT_TRUE(j["fits"].get<bool>()) << j.dump();
  ASSERT_FALSE(j["at_search_limit"].get<bool>());
  const std::uint64_t n = j["size"].get<std::uint64_t>();
  EXPECT_LT(n, plain["size"].get<std::uint64_t>());
  Borrowing b;
  b.params = b.grads = true;
  auto model_of = [](std::uint64_t size) {
    cli::ModelArgs m;
    m.params = std::to_string(size);
    m.dtype = "bf16";
    return m;
  };
  {
    const cli::ModelArgs m = model_of(n);
    const cli::Model model = cli::build_model(m);
    const shardopt::Config cfg = cli::build_config(m, model);
    EXPECT_EQ(j["borrowed"]["device_bytes"].get<std::uint64_t>(), 2 * n * 2);
    const json& c = j["choice"];
    const RowPlan p = plan_row(cfg, model.blocks, gpus, c, &b);
    EXPECT_EQ(c["lent_bytes"].get<std::uint64_t>(), 2 * n * 2);
    EXPECT_EQ(c["need_per_gpu"].get<std::uint64_t>(), p.engine + 2 * n * 2 + context);  // --params: no activations
    EXPECT_LE(double(p.engine + p.lent + context), usable);
    EXPECT_LE(double(p.host) * gpus, host_mem);
  }
  const cli::ModelArgs m = model_of(n + 1);
  const cli::Model model = cli::build_model(m);
  const shardopt::Config cfg = cli::build_config(m, model);
  for (const Config& k : kAll) {
    const RowPlan p = plan_row(cfg, model.blocks, gpus, k.stage, k.offload, k.params, k.precision, &b);
    EXPECT_EQ(p.lent, 2 * (n + 1) * 2);
    EXPECT_TRUE(double(p.engine + p.lent + context) > usable || double(p.host) * gpus > host_mem)
        << "size " << n + 1 << " fits at stage " << k.stage << " offload " << k.offload << (k.params ? "+p" : "")
        << " " << k.precision;
  }
}

TEST(CliPlanBorrowed, BadValuesNameTheFlag) {
  for (const char* bad : {"x", "params,x", "", "params,,grads", "grads,"}) {
    const Result e = run({"plan", "--params", "1B", "--gpu-mem", "24GiB", "--borrowed", bad});
    EXPECT_NE(e.rc, 0) << bad;
    const std::string item = std::string(bad) == "params,x" || std::string(bad) == "x" ? "x" : "";
    EXPECT_NE(e.err.find("--borrowed: unknown '" + item + "' (expected params, grads)"), std::string::npos)
        << bad << ": " << e.err;
  }
}

}  // namespace
