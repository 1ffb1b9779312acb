// The GPT side of the command line, run in-process: tokenize, train --model gpt (errors naming
// the flag, learning, resume continuing the data), checkpoint export as a Hugging Face directory,
// generate.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "cli_run.hpp"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using Result = shardopt::testing::CliResult;
using shardopt::testing::last_json_line;
Result run(const std::vector<std::string>& args) { return shardopt::testing::run_cli(args); }

struct Fixture : ::testing::Test {
  fs::path dir;
  std::string data;
  void SetUp() override {
    dir = fs::temp_directory_path() /
          ("shardopt-cli-gpt-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream txt(dir / "in.txt");
    for (int i = 0; i < 400; ++i) txt << "the cat sat on the mat. the dog ran to the park. " << (i % 7) << "\n";
    txt.close();
    data = (dir / "in.bin").string();
    const Result r = run({"tokenize", "--bytes", (dir / "in.txt").string(), data});
    ASSERT_EQ(r.rc, 0) << r.err;
  }
  void TearDown() override { fs::remove_all(dir); }
  std::vector<std::string> small(int steps) const {
    return {"train", "--model", "gpt", "--layers", "2", "--heads", "2", "--hidden", "32", "--seq", "32",
            "--batch", "2", "--ranks", "2", "--steps", std::to_string(steps), "--data", data, "--lr", "3e-3"};
  }
};

TEST_F(Fixture, ErrorsNameTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"train", "--model", "gpt"}, "--data"},
      {{"train", "--model", "gpt", "--data", "/nonexistent.bin"}, "--data"},
      {{"train", "--model", "gpt", "--data", data, "--preset", "huge"}, "--preset"},
      {{"train", "--model", "gpt", "--data", data, "--preset", "tiny", "--layers", "3"}, "--preset"},
      {{"train", "--model", "gpt", "--data", data, "--heads", "3"}, "--heads"},
      {{"train", "--model", "gpt", "--data", data, "--seq", "64", "--positions", "32"}, "--seq"},
      {{"train", "--model", "gpt", "--data", data, "--init-from", "/nonexistent"}, "--init-from"},
      {{"train", "--model", "transformer"}, "--model"},
      {{"tokenize", "--bytes", "/nonexistent.txt", "/tmp/x.bin"}, "/nonexistent.txt"},
      {{"generate", "--checkpoint", "/nonexistent-ckpt", "--prompt", "a"}, "/nonexistent-ckpt"},
      {{"generate", "--checkpoint", "x", "--prompt", "1 two", "--ids"}, "--prompt"},
  };
  for (const auto& [args, flag] : cases) {
    std::string cmd;
    for (const auto& a : args) cmd += a + " ";
    const Result r = run(args);
    EXPECT_NE(r.rc, 0) << cmd;
    EXPECT_NE(r.err.find(flag), std::string::npos) << cmd << "-> " << r.err;
  }
}

TEST_F(Fixture, TrainsAndReportsThroughputAndMfu) {
  auto args = small(40);
  args.insert(args.end(), {"--stage", "3", "--json"});
  const Result r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  const json j = last_json_line(r.out);
  EXPECT_EQ(j["model"], "gpt");
  EXPECT_EQ(j["params"].get<std::size_t>(), 256u * 32 + 32u * 32 + 2 * (12u * 32 * 32 + 13 * 32) + 2 * 32);
  EXPECT_LT(j["loss_last"].get<double>(), 0.6 * j["loss_first"].get<double>());
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(j["mfu"].get<double>(), 0.0);
  EXPECT_LT(j["mfu"].get<double>(), 1.0);  // against a peak measured in the same run
  EXPECT_NE(r.err.find("tok/s"), std::string::npos);
  EXPECT_NE(r.err.find("MFU"), std::string::npos);
}

// estimate --model gpt: the GPT's blocks (GPT-2 small's published count) and its trainer's
// activations, added to the engine's in-memory bytes for the whole process.
TEST_F(Fixture, EstimatesTheGptAndItsActivations) {
  const Result r = run({"estimate", "--model", "gpt", "--preset", "small", "--seq", "128", "--batch", "2", "--world",
                        "2", "--stage", "3", "--dtype", "bf16", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const json j = last_json_line(r.out);
  EXPECT_EQ(j["params"].get<std::size_t>(), 124439808u);
  EXPECT_EQ(j["blocks"].get<std::size_t>(), 14u);  // embeddings, 12 layers, final norm
  const std::size_t act = j["activation_bytes_per_rank"].get<std::size_t>();
  // At least the logits (seq * batch * vocab floats) and the residual stream of 13 layer inputs.
  EXPECT_GE(act, (128u * 2 * 50257 + 13u * 128 * 2 * 768) * 4);
  std::size_t engine = 0;
  for (const char* place : {"device", "pinned_host", "host"}) engine += j["bytes"][place]["total"].get<std::size_t>();
  EXPECT_EQ(j["memory_bytes_per_rank"].get<std::size_t>(), engine + act);
  const Result rc = run({"estimate", "--model", "gpt", "--preset", "small", "--seq", "128", "--recompute", "--json"});
  ASSERT_EQ(rc.rc, 0) << rc.err;
  EXPECT_LT(last_json_line(rc.out)["activation_bytes_per_rank"].get<std::size_t>(),
            last_json_line(run({"estimate", "--model", "gpt", "--preset", "small", "--seq", "128", "--json"}).out)
                ["activation_bytes_per_rank"].get<std::size_t>());
  EXPECT_NE(run({"estimate", "--model", "gpt", "--params", "1B"}).err.find("--params"), std::string::npos);
}

// Resuming continues the data, the step numbers and the schedule where it stopped: 3 + 3 steps
// give the 6-step run's losses and learning rates, and the resumed metrics count 4, 5, 6. The
// first part names the whole run's length (--decay-steps 6); the resumed part's default is its
// first step + --steps, the same 6.
TEST_F(Fixture, ResumeContinuesTheData) {
  const std::string ck = (dir / "ck").string();
  const std::vector<std::string> sched = {"--lr-schedule", "cosine", "--warmup", "2", "--min-lr", "1e-4"};
  auto with = [&](std::vector<std::string> v, std::initializer_list<std::string> more) {
    v.insert(v.end(), sched.begin(), sched.end());
    v.insert(v.end(), more);
    return v;
  };
  const std::string m_full = (dir / "full.jsonl").string(), m_resumed = (dir / "resumed.jsonl").string();
  const Result rf = run(with(small(6), {"--metrics", m_full, "--json"}));
  ASSERT_EQ(rf.rc, 0) << rf.err;
  const json a = last_json_line(rf.out);
  const Result r1 = run(with(small(3), {"--decay-steps", "6", "--save", ck, "--json"}));
  ASSERT_EQ(r1.rc, 0) << r1.err;
  const Result r2 = run(with(small(3), {"--resume", ck, "--metrics", m_resumed, "--json"}));
  ASSERT_EQ(r2.rc, 0) << r2.err;
  const json b = last_json_line(r2.out);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(b["losses"][i].get<double>(), a["losses"][3 + i].get<double>()) << i;
  auto lines = [](const std::string& path) {
    std::vector<json> v;
    std::ifstream in(path);
    for (std::string l; std::getline(in, l);) v.push_back(json::parse(l));
    return v;
  };
  const auto full = lines(m_full), resumed = lines(m_resumed);
  ASSERT_EQ(full.size(), 6u);
  ASSERT_EQ(resumed.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(resumed[i]["step"].get<int>(), 4 + i);
    EXPECT_EQ(resumed[i]["lr"].get<double>(), full[3 + i]["lr"].get<double>()) << "step " << 4 + i;
  }
}

// The checks of train's outputs apply to the GPT trainer too: --resume auto finds DIR's checkpoint
// (or starts afresh, saying so), and a --save that cannot be written fails before training.
TEST_F(Fixture, ResumeAutoAndDestinationChecks) {
  const std::string ck = (dir / "ck").string();
  auto full = small(4);
  full.push_back("--json");
  const json a = last_json_line(run(full).out);
  auto fresh = small(2);
  fresh.insert(fresh.end(), {"--resume", "auto", "--save", ck, "--json"});
  const Result r1 = run(fresh);
  ASSERT_EQ(r1.rc, 0) << r1.err;
  EXPECT_NE(r1.err.find("no complete checkpoint in '" + ck + "'; starting a fresh run"), std::string::npos) << r1.err;
  const Result r2 = run(fresh);
  ASSERT_EQ(r2.rc, 0) << r2.err;
  EXPECT_NE(r2.err.find("resuming from '" + ck + "' (step 2)"), std::string::npos) << r2.err;
  const json b = last_json_line(r2.out);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(b["losses"][i].get<double>(), a["losses"][2 + i].get<double>()) << i;

  std::ofstream(dir / "file") << "x";
  auto to_file = small(2);
  to_file.insert(to_file.end(), {"--save", (dir / "file").string()});
  const Result r3 = run(to_file);
  EXPECT_NE(r3.rc, 0);
  EXPECT_NE(r3.err.find("--save: '" + (dir / "file").string() + "' exists and is not a directory"), std::string::npos)
      << r3.err;
  EXPECT_EQ(r3.out.find("step 1/"), std::string::npos) << r3.out;
}

// --save-every in the GPT trainer: background step checkpoints, each loadable on its own (with
// its model_config.json), continuing the data from where it was taken.
TEST_F(Fixture, SaveEveryWritesResumableStepCheckpoints) {
  const std::string ck = (dir / "ck").string();
  auto full = small(5);
  full.push_back("--json");
  const json a = last_json_line(run(full).out);
  auto every = small(5);
  every.insert(every.end(), {"--save", ck, "--save-every", "2", "--keep", "1", "--json"});
  const Result r = run(every);
  ASSERT_EQ(r.rc, 0) << r.err;
  // Saving in the background changes nothing in the run.
  for (int i = 0; i < 5; ++i) EXPECT_EQ(last_json_line(r.out)["losses"][i].get<double>(), a["losses"][i].get<double>());
  // Saves after steps 2 and 4; the newest one kept; the final checkpoint is DIR itself.
  EXPECT_FALSE(fs::exists(dir / "ck" / "step-000002"));
  ASSERT_TRUE(fs::exists(dir / "ck" / "step-000004" / "manifest.json"));
  EXPECT_TRUE(fs::exists(dir / "ck" / "step-000004" / "model_config.json"));
  auto rest = small(1);
  rest.insert(rest.end(), {"--resume", (dir / "ck" / "step-000004").string(), "--json"});
  const Result r2 = run(rest);
  ASSERT_EQ(r2.rc, 0) << r2.err;
  EXPECT_EQ(last_json_line(r2.out)["losses"][0].get<double>(), a["losses"][4].get<double>());
  // The step checkpoint is a GPT checkpoint like any other: generate reads it.
  const Result g = run({"generate", "--checkpoint", (dir / "ck" / "step-000004").string(), "--prompt", "the ",
                        "--tokens", "4"});
  EXPECT_EQ(g.rc, 0) << g.err;
}

// The export is a Hugging Face GPT2LMHeadModel directory: every key transformers expects (no
// lm_head: it is tied), Conv1D [in, out] shapes, and a config.json with GPT2Config's fields.
TEST_F(Fixture, ExportsAHuggingFaceDirectoryAndGenerates) {
  const std::string ck = (dir / "ck").string(), hf = (dir / "hf").string();
  auto args = small(2);
  args.insert(args.end(), {"--save", ck});
  ASSERT_EQ(run(args).rc, 0);
  const Result e = run({"checkpoint", "export", ck, "--out", hf});
  ASSERT_EQ(e.rc, 0) << e.err;
  std::ifstream cfg_in(fs::path(hf) / "config.json");
  const json cfg = json::parse(cfg_in);
  EXPECT_EQ(cfg["model_type"], "gpt2");
  EXPECT_EQ(cfg["n_layer"], 2);
  EXPECT_EQ(cfg["n_head"], 2);
  EXPECT_EQ(cfg["n_embd"], 32);
  EXPECT_EQ(cfg["vocab_size"], 256);
  EXPECT_EQ(cfg["n_positions"], 32);
  EXPECT_EQ(cfg["activation_function"], "gelu_new");
  EXPECT_EQ(cfg["tie_word_embeddings"], true);

  std::ifstream st(fs::path(hf) / "model.safetensors", std::ios::binary);
  std::uint64_t n = 0;
  st.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, '\0');
  st.read(header.data(), static_cast<std::streamsize>(n));
  const json h = json::parse(header);
  std::map<std::string, std::vector<std::int64_t>> want = {{"transformer.wte.weight", {256, 32}},
                                                           {"transformer.wpe.weight", {32, 32}},
                                                           {"transformer.ln_f.weight", {32}},
                                                           {"transformer.ln_f.bias", {32}}};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".";
    want[p + "ln_1.weight"] = {32};
    want[p + "ln_1.bias"] = {32};
    want[p + "attn.c_attn.weight"] = {32, 96};
    want[p + "attn.c_attn.bias"] = {96};
    want[p + "attn.c_proj.weight"] = {32, 32};
    want[p + "attn.c_proj.bias"] = {32};
    want[p + "ln_2.weight"] = {32};
    want[p + "ln_2.bias"] = {32};
    want[p + "mlp.c_fc.weight"] = {32, 128};
    want[p + "mlp.c_fc.bias"] = {128};
    want[p + "mlp.c_proj.weight"] = {128, 32};
    want[p + "mlp.c_proj.bias"] = {32};
  }
  std::set<std::string> have;
  for (auto it = h.begin(); it != h.end(); ++it)
    if (it.key() != "__metadata__") have.insert(it.key());
  EXPECT_EQ(have.size(), want.size());
  for (const auto& [name, shape] : want) {
    ASSERT_TRUE(h.contains(name)) << name;
    EXPECT_EQ(h[name]["shape"].get<std::vector<std::int64_t>>(), shape) << name;
    EXPECT_EQ(h[name]["dtype"], "F32") << name;
  }
  EXPECT_EQ(h["__metadata__"]["format"], "pt");  // transformers refuses safetensors without it

  // --init-from the exported directory trains on.
  auto again = small(1);
  again.insert(again.end(), {"--init-from", hf, "--stage", "2"});
  const Result t = run(again);
  EXPECT_EQ(t.rc, 0) << t.err;

  const Result g = run({"generate", "--checkpoint", ck, "--prompt", "the cat", "--tokens", "12"});
  ASSERT_EQ(g.rc, 0) << g.err;
  EXPECT_EQ(g.out.rfind("the cat", 0), 0u) << g.out;
  EXPECT_GE(g.out.size(), std::strlen("the cat") + 1);
  const Result ids = run({"generate", "--checkpoint", ck, "--prompt", "116,104", "--ids", "--tokens", "5",
                          "--temperature", "0"});
  ASSERT_EQ(ids.rc, 0) << ids.err;
  std::istringstream in(ids.out);
  int count = 0, v = 0;
  while (in >> v) {
    EXPECT_GE(v, 0);
    EXPECT_LT(v, 256);
    ++count;
  }
  EXPECT_EQ(count, 5);
}

}  // namespace
