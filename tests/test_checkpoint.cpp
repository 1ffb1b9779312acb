// Checkpoints: save at one world size/stage and load at another, bit-exact resume, crash safety
// under SIGKILL, every bad input, and the safetensors export read back by a reader written here.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "checkpoint/format.hpp"
#include "checkpoint/test_hooks.hpp"
#include "engine_harness.hpp"
#include "temp_dir.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/error.hpp"

using namespace shardopt;
using namespace shardopt::testing;
namespace fs = std::filesystem;

namespace {

using TmpDir = shardopt::test::TempDir;

// Full master and state values per tensor, assembled from every rank.
struct Snapshot {
  std::vector<std::vector<float>> field[3];
  bool operator==(const Snapshot& o) const {
    for (int f = 0; f < 3; ++f)
      if (field[f].size() != o.field[f].size()) return false;
    for (int f = 0; f < 3; ++f)
      for (std::size_t t = 0; t < field[f].size(); ++t)
        if (field[f][t].size() != o.field[f][t].size() ||
            (field[f][t].size() && std::memcmp(field[f][t].data(), o.field[f][t].data(), field[f][t].size() * 4) != 0))
          return false;
    return true;
  }
};

// Trains `steps` steps numbered from `first` (the synthetic gradient depends on the step number,
// so a resumed run sees the same gradients as an uninterrupted one). `scale`: the loss scale to
// use for the first step; updated from each StepResult.
std::vector<StepResult> train(Engine& e, int rank, int first, int steps, std::uint64_t seed, float& scale) {
  std::vector<StepResult> out;
  for (int s = first; s < first + steps; ++s) {
    synthetic_micro_step(e, rank, s, 0, seed, scale);
    out.push_back(e.step());
    scale = out.back().loss_scale;
  }
  return out;
}

void snapshot_into(Engine& e, Snapshot& snap, std::mutex& m) {
  const auto& L = e.layout();
  {
    std::lock_guard<std::mutex> lock(m);
    if (snap.field[0].empty())
      for (int f = 0; f < 3; ++f) {
        snap.field[f].resize(L.tensors().size());
        for (std::size_t t = 0; t < L.tensors().size(); ++t) snap.field[f][t].assign(L.tensors()[t].numel, std::nanf(""));
      }
  }
  auto put = [&](int f) {
    return [&, f](int t, std::size_t begin, std::size_t n, const float* v) {
      std::lock_guard<std::mutex> lock(m);
      std::memcpy(snap.field[f][t].data() + begin, v, n * 4);
    };
  };
  e.read_master(put(0));
  for (int k = 0; k < state_count(e.config().optimizer); ++k) e.read_state(k, put(1 + k));
}

// Runs fn(engine, rank) on a fresh world of `n` ranks whose engines are initialized from `seed`.
void with_world(int n, const Config& cfg, const std::function<void(Engine&, int)>& fn, std::uint64_t seed = 7,
                std::vector<BlockSpec> model = awkward_model()) {
  World w(n);
  w.run([&](int rank) {
    Engine e(cfg, *w.backends[rank], *w.comms[rank]);
    for (const auto& b : model) e.register_block(b);
    e.set_group(1, no_decay(cfg));
    e.initialize(seeded_init(seed));
    fn(e, rank);
  });
}

class Checkpoint : public ::testing::Test {
 protected:
  // Chunks of 64 elements: the test models span many, so partial-range reads are exercised.
  void SetUp() override { ckpt::set_chunk_elems_for_testing(64); }
  void TearDown() override { ckpt::set_chunk_elems_for_testing(0); }
};

struct Reshard {
  int n, m, stage_from, stage_to;
  DType dtype;
};

TEST_F(Checkpoint, LoadsAtAnyWorldSizeAndStage) {
  const Reshard cases[] = {{1, 4, 1, 1, DType::fp32}, {4, 1, 2, 2, DType::fp32}, {2, 3, 1, 1, DType::bf16},
                           {4, 4, 3, 3, DType::fp32}, {2, 2, 1, 3, DType::bf16}, {3, 2, 3, 0, DType::fp32},
                           {1, 3, 0, 2, DType::fp32}};
  for (const Reshard& rc : cases) {
    SCOPED_TRACE("world " + std::to_string(rc.n) + " stage " + std::to_string(rc.stage_from) + " -> world " +
                 std::to_string(rc.m) + " stage " + std::to_string(rc.stage_to) + " " + std::string(name_of(rc.dtype)));
    TmpDir dir;
    Snapshot saved, loaded;
    std::mutex mu;
    with_world(rc.n, base_config(rc.stage_from, rc.dtype, OptimizerKind::adamw), [&](Engine& e, int rank) {
      float scale = 1;
      train(e, rank, 0, 4, 7, scale);
      snapshot_into(e, saved, mu);
      e.save(dir.str("ck"));
    });
    std::vector<std::vector<float>> params;  // rank 0's acquired compute-dtype parameters
    with_world(rc.m, base_config(rc.stage_to, rc.dtype, OptimizerKind::adamw), [&](Engine& e, int rank) {
      e.load(dir.str("ck"));
      snapshot_into(e, loaded, mu);
      for (int b = 0; b < static_cast<int>(e.layout().blocks().size()); ++b) {
        BlockView v = e.acquire(b);
        if (rank == 0)
          for (const auto& tv : v.tensors) {
            params.emplace_back(tv.numel);
            for (std::size_t i = 0; i < tv.numel; ++i) params.back()[i] = load_as_float(tv.data, tv.dtype, i);
          }
        e.release(b);
      }
      float scale = 1;
      const auto r = train(e, rank, 4, 1, 7, scale);
      EXPECT_EQ(r[0].step, 5) << "the step count is restored";
    }, /*seed=*/99);  // a different initialization: everything must come from the checkpoint
    EXPECT_TRUE(saved == loaded) << "masters and states differ after load";
    for (std::size_t t = 0; t < params.size(); ++t)
      for (std::size_t i = 0; i < params[t].size(); ++i) {
        float expect = saved.field[0][t][i];
        std::uint16_t h;
        if (rc.dtype != DType::fp32) {
          store_from_float(&h, rc.dtype, 0, expect);
          expect = load_as_float(&h, rc.dtype, 0);
        }
        ASSERT_EQ(params[t][i], expect) << "compute parameter " << t << "[" << i << "] is not round(master)";
      }
  }
}

TEST_F(Checkpoint, ResumeIsBitExact) {
  for (int stage : {0, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    Config cfg = base_config(stage, DType::fp16, OptimizerKind::adamw);
    cfg.loss_scaling.mode = LossScaleMode::dynamic;  // 65536 overflows fp16 with |g| ~ 1: skips and regrowth
    cfg.loss_scaling.growth_interval = 3;
    cfg.max_grad_norm = 0.5;
    const int W = 2;
    std::vector<std::vector<StepResult>> full(W), resumed(W);
    Snapshot a, b;
    std::mutex mu;
    with_world(W, cfg, [&](Engine& e, int rank) {
      float scale = cfg.loss_scaling.initial_scale;
      full[rank] = train(e, rank, 0, 20, 3, scale);
      snapshot_into(e, a, mu);
    });
    TmpDir dir;
    std::vector<float> scale_at_save(W);
    with_world(W, cfg, [&](Engine& e, int rank) {
      float scale = cfg.loss_scaling.initial_scale;
      resumed[rank] = train(e, rank, 0, 10, 3, scale);
      scale_at_save[rank] = scale;
      e.save(dir.str());
    });
    with_world(W, cfg, [&](Engine& e, int rank) {
      e.load(dir.str());
      float scale = scale_at_save[rank];
      auto rest = train(e, rank, 10, 10, 3, scale);
      resumed[rank].insert(resumed[rank].end(), rest.begin(), rest.end());
      snapshot_into(e, b, mu);
    }, 1234);
    EXPECT_TRUE(a == b) << "masters/states after 10 + save/load + 10 steps differ from 20 steps";
    int skipped = 0;
    for (int r = 0; r < W; ++r)
      for (int s = 0; s < 20; ++s) {
        const StepResult &x = full[r][s], &y = resumed[r][s];
        skipped += !x.applied;
        EXPECT_EQ(x.applied, y.applied) << "step " << s;
        EXPECT_EQ(x.step, y.step) << "step " << s;
        EXPECT_EQ(x.loss_scale, y.loss_scale) << "step " << s;
        EXPECT_EQ(std::memcmp(&x.grad_norm, &y.grad_norm, sizeof(double)), 0) << "step " << s;
        EXPECT_EQ(x.clip_coefficient, y.clip_coefficient) << "step " << s;
      }
    EXPECT_GT(skipped, 0) << "the loss scaler never overflowed: the test does not cover its state";
  }
}

// ---------------------------------------------------------------- background saves
// save_async captures the state at the call; training goes on while the files are written; the
// checkpoint then holds exactly that state (bit for bit, loadable at another world size and
// stage), and resuming from it continues exactly like an uninterrupted run.
TEST_F(Checkpoint, AsyncSaveHoldsTheStateAtTheCallWhileTrainingGoesOn) {
  const Config cfg = base_config(2, DType::bf16, OptimizerKind::adamw);
  TmpDir dir;
  Snapshot at_save, at_end, reference_end, loaded, resumed_end;
  std::mutex mu;
  std::vector<std::size_t> staging_in_flight(2), staging_after(2), owned(2);
  // An uninterrupted run of 8 steps, for the resume comparison.
  with_world(2, cfg, [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 8, 9, scale);
    snapshot_into(e, reference_end, mu);
  });
  with_world(2, cfg, [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 5, 9, scale);
    snapshot_into(e, at_save, mu);
    const std::size_t before = e.memory_report().current_of(Category::other, Place::host);
    e.save_async(dir.str());
    EXPECT_TRUE(e.save_in_flight());
    staging_in_flight[rank] = e.memory_report().current_of(Category::other, Place::host) - before;
    e.read_master([&](int, std::size_t, std::size_t n, const float*) { owned[rank] += n; });
    train(e, rank, 5, 3, 9, scale);  // goes on while the writer runs
    e.wait_save();
    EXPECT_FALSE(e.save_in_flight());
    staging_after[rank] = e.memory_report().current_of(Category::other, Place::host) - before;
    snapshot_into(e, at_end, mu);
  });
  for (int r = 0; r < 2; ++r) {
    // Stage 2 owns a shard: the staging is that shard's master + 2 moments, nothing more.
    EXPECT_EQ(staging_in_flight[r], owned[r] * 3 * 4) << "rank " << r;
    EXPECT_EQ(staging_after[r], 0u) << "rank " << r << ": staging kept after wait_save";
  }
  EXPECT_FALSE(at_save == at_end) << "training did not change anything after the save";
  EXPECT_EQ(inspect_checkpoint(dir.str()).step, 5);
  EXPECT_NO_THROW(verify_checkpoint(dir.str()));
  with_world(3, base_config(3, DType::bf16, OptimizerKind::adamw), [&](Engine& e, int) {
    e.load(dir.str());
    snapshot_into(e, loaded, mu);
  });
  EXPECT_TRUE(loaded == at_save) << "the asynchronous checkpoint does not hold the state at save_async()";
  with_world(2, cfg, [&](Engine& e, int rank) {
    e.load(dir.str());
    float scale = 1;
    train(e, rank, 5, 3, 9, scale);
    snapshot_into(e, resumed_end, mu);
  }, 4321);
  EXPECT_TRUE(resumed_end == reference_end) << "5 steps + async save/load + 3 steps differ from 8 steps";
}

// A checkpoint loads into an engine whose optimizer state lives on NVMe: the same values as a
// load without offload, and training from there gives the same bits (offload is bit-identical).
TEST_F(Checkpoint, LoadsIntoAnNvmeOffloadedEngine) {
  TmpDir dir, nvme;
  const Config plain = base_config(2, DType::bf16, OptimizerKind::adamw);
  Config on_nvme = plain;
  on_nvme.offload_optimizer = OffloadKind::nvme;
  on_nvme.nvme_dir = nvme.str();
  with_world(2, plain, [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 4, 5, scale);
    e.save(dir.str());
  });
  Snapshot loaded_plain, loaded_nvme, trained_plain, trained_nvme;
  std::mutex mu;
  for (const Config* cfg : {&plain, static_cast<const Config*>(&on_nvme)}) {
    const bool nv = cfg == &on_nvme;
    with_world(2, *cfg, [&](Engine& e, int rank) {
      e.load(dir.str());
      snapshot_into(e, nv ? loaded_nvme : loaded_plain, mu);
      float scale = 1;
      train(e, rank, 4, 3, 5, scale);
      snapshot_into(e, nv ? trained_nvme : trained_plain, mu);
    }, 99);
  }
  EXPECT_TRUE(loaded_nvme == loaded_plain) << "the NVMe-offloaded engine loaded other values";
  EXPECT_TRUE(trained_nvme == trained_plain) << "training after an NVMe load differs from training after a plain load";
}

// The trainer's own record travels with the checkpoint (sync and async), is covered by the
// manifest checksum, and bad records are refused before anything is written.
TEST_F(Checkpoint, TrainerMetadataRoundTrips) {
  TmpDir a, b;
  const std::string meta = R"({"data_position": 1234567, "run": "ünïcode ok"})";
  std::vector<std::string> got_a(2), got_b(2), got_none(2), refused(2);
  with_world(2, base_config(2, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 1, 3, scale);
    e.save(a.str(), meta);
    e.save_async(b.str(), meta + " async");
    e.wait_save();
    try {
      e.save(a.str(), std::string("\xff\xfe not utf-8"));
    } catch (const Error& err) {
      refused[rank] = err.message();
    }
    got_a[rank] = e.load(a.str());
    got_b[rank] = e.load(b.str());
  });
  TmpDir c;
  with_world(2, base_config(1, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int rank) {
    e.save(c.str());
    got_none[rank] = e.load(c.str());
  }, 7);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(got_none[r], "");
    EXPECT_EQ(got_a[r], meta);
    EXPECT_EQ(got_b[r], meta + " async");
    EXPECT_NE(refused[r].find("UTF-8"), std::string::npos) << refused[r];
  }
  EXPECT_EQ(inspect_checkpoint(a.str()).trainer_metadata, meta);
  EXPECT_EQ(inspect_checkpoint(a.str()).generation, 1u) << "a refused save wrote a generation";
}

TEST_F(Checkpoint, AsyncSaveErrorsReachEveryRankAndTheEngineGoesOn) {
  TmpDir dir;
  const std::string blocked = dir.str("file");
  std::ofstream(blocked) << "not a directory";
  std::vector<std::string> errors(2);
  with_world(2, base_config(1, DType::fp32, OptimizerKind::sgd), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 1, 3, scale);
    try {
      e.save_async(blocked + "/ckpt");  // a path under a regular file: mkdir fails on rank 0
    } catch (const Error& err) {
      errors[rank] = err.message();
    }
    EXPECT_FALSE(e.save_in_flight());
    train(e, rank, 1, 1, 3, scale);
    e.save_async(dir.str("ok"));  // a good save afterwards works
    e.wait_save();
  });
  for (int r = 0; r < 2; ++r) EXPECT_NE(errors[r].find("ckpt"), std::string::npos) << "rank " << r << ": " << errors[r];
  EXPECT_EQ(inspect_checkpoint(dir.str("ok")).step, 2);
}

TEST_F(Checkpoint, SavingAgainReplacesTheGenerationAndInspectDescribesIt) {
  TmpDir dir;
  with_world(2, base_config(1, DType::bf16, OptimizerKind::sgd), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 2, 7, scale);
    e.save(dir.str());
    train(e, rank, 2, 1, 7, scale);
    e.save(dir.str());
  });
  const CheckpointInfo info = inspect_checkpoint(dir.str());
  EXPECT_EQ(info.generation, 2u);
  EXPECT_EQ(info.world_size, 2);
  EXPECT_EQ(info.stage, 1);
  EXPECT_EQ(info.step, 3);
  EXPECT_EQ(info.optimizer, OptimizerKind::sgd);
  EXPECT_EQ(info.compute_dtype, DType::bf16);
  EXPECT_EQ(info.fields, (std::vector<std::string>{"master", "momentum_buffer"}));
  EXPECT_EQ(info.tensors.size(), 13u);
  EXPECT_EQ(info.files, 2u);
  std::vector<std::string> names;
  for (const auto& ent : fs::directory_iterator(dir.path)) names.push_back(ent.path().filename().string());
  std::sort(names.begin(), names.end());
  // "lock" is the saver's lock file (kept: removing a lock file others may have open races).
  EXPECT_EQ(names, (std::vector<std::string>{"g2.r0.bin", "g2.r1.bin", "lock", "manifest.json"}))
      << "old generation left behind";
  EXPECT_NO_THROW(verify_checkpoint(dir.str()));
}

// ---------------------------------------------------------------- crash safety
TEST_F(Checkpoint, SigkillDuringSaveAlwaysLeavesALoadableCheckpoint) {
  TmpDir dir;
  const Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
  with_world(2, cfg, [&](Engine& e, int) { e.save(dir.str()); });  // a first valid checkpoint
  // How long the child needs for start-up + load + one train-and-save cycle here (much longer under
  // a sanitizer): kill times are drawn around it so that some kills land after a commit and many
  // land inside a save, on any machine.
  const auto t0 = std::chrono::steady_clock::now();
  with_world(2, cfg, [&](Engine& e, int rank) {
    e.load(dir.str());
    float scale = 1;
    train(e, rank, 0, 1, 7, scale);
    e.save(dir.str());
  });
  const int cycle_us = static_cast<int>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
  std::mt19937 rng(12345);
  const std::int64_t parent_step = inspect_checkpoint(dir.str()).step;
  std::int64_t last_step = parent_step;
  int kills_during_save = 0;
  for (int round = 0; round < 30; ++round) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0) << std::strerror(errno);
    if (pid == 0) {
      // Child: train and save in a loop until killed. Nothing here returns to gtest.
      try {
        with_world(2, cfg, [&](Engine& e, int rank) {
          e.load(dir.str());
          float scale = 1;
          for (int s = 0;; ++s) {
            train(e, rank, s, 1, 7, scale);
            if (s % 2) {
              e.save(dir.str());
            } else {  // a background save with a step taken while it writes
              e.save_async(dir.str());
              train(e, rank, ++s, 1, 7, scale);
              e.wait_save();
            }
          }
        });
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    std::this_thread::sleep_for(
        std::chrono::microseconds(std::uniform_int_distribution<int>(cycle_us / 2, 4 * cycle_us + 2000)(rng)));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited by itself (status " << status << "): it failed";
    for (const auto& ent : fs::directory_iterator(dir.path))
      kills_during_save += ent.path().extension() == ".tmp" || (ent.path().extension() == ".json" &&
                                                                    ent.path().filename() != "manifest.json");
    ASSERT_NO_THROW(verify_checkpoint(dir.str())) << "round " << round;
    const CheckpointInfo info = inspect_checkpoint(dir.str());
    EXPECT_GE(info.step, last_step) << "a checkpoint went backwards";
    last_step = info.step;
    with_world(3, base_config(3, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int) { e.load(dir.str()); });
  }
  EXPECT_GT(last_step, parent_step) << "no child ever committed a save: the kills tested nothing";
  std::printf("[ crash    ] 30 kills, %d left partial files behind, last committed step %lld\n", kills_during_save,
              static_cast<long long>(last_step));
}

// ---------------------------------------------------------------- bad input
struct BadCase {
  std::string name;
  std::function<void(const fs::path& dir)> damage;  // applied to a copy of a valid checkpoint
  std::vector<std::string> expect;                  // substrings of the error message
  Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
  std::vector<BlockSpec> model = awkward_model();
};

fs::path file_of_rank(const fs::path& dir, int rank) {
  for (const auto& ent : fs::directory_iterator(dir)) {
    const std::string n = ent.path().filename().string();
    if (n.find(".r" + std::to_string(rank) + ".bin") != std::string::npos) return ent.path();
  }
  throw std::runtime_error("no shard file of rank " + std::to_string(rank));
}

void edit_manifest(const fs::path& dir, const std::function<void(nlohmann::json&)>& fn) {
  std::ifstream in(dir / "manifest.json");
  nlohmann::json j = nlohmann::json::parse(in);
  fn(j);
  std::ofstream(dir / "manifest.json", std::ios::trunc) << j.dump(1);
}

TEST_F(Checkpoint, BadInputIsAClearErrorAndLeavesTheEngineUsable) {
  TmpDir good;
  with_world(2, base_config(2, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 2, 5, scale);
    e.save(good.str());
  });
  std::vector<BadCase> cases;
  cases.push_back({"missing manifest", [](const fs::path& d) { fs::remove(d / "manifest.json"); }, {"manifest.json", "does not exist"}});
  cases.push_back({"unknown format version", [](const fs::path& d) { edit_manifest(d, [](auto& j) { j["format_version"] = 99; }); },
                   {"manifest.json", "format version 99"}});
  cases.push_back({"damaged manifest", [](const fs::path& d) { fs::resize_file(d / "manifest.json", 100); },
                   {"manifest.json", "not valid JSON"}});
  cases.push_back({"truncated file", [](const fs::path& d) { const auto f = file_of_rank(d, 1); fs::resize_file(f, fs::file_size(f) - 6); },
                   {"truncated file", ".r1.bin", "tensor '"}});
  cases.push_back({"checksum mismatch",
                   [](const fs::path& d) {
                     const auto f = file_of_rank(d, 0);
                     std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
                     io.seekg(static_cast<std::streamoff>(fs::file_size(f) / 2));
                     char ch = 0;
                     io.read(&ch, 1);
                     ch ^= 0x10;
                     io.seekp(static_cast<std::streamoff>(fs::file_size(f) / 2));
                     io.write(&ch, 1);
                   },
                   {"checksum mismatch", ".r0.bin", "tensor '"}});
  cases.push_back({"missing shard file", [](const fs::path& d) { fs::remove(file_of_rank(d, 1)); },
                   {"does not exist", ".r1.bin", "tensor '"}});
  // Edits the manifest's own checksum cannot miss: a field that changes meaning, and two
  // same-sized tensors' data ranges swapped (each range's data checksums still match its bytes).
  cases.push_back({"edited step", [](const fs::path& d) { edit_manifest(d, [](auto& j) { j["step"] = 9; }); },
                   {"manifest.json", "checksum does not match"}});
  cases.push_back({"swapped data ranges",
                   [](const fs::path& d) {
                     edit_manifest(d, [](auto& j) {
                       auto& t = j["tensors"];
                       for (std::size_t a = 0; a < t.size(); ++a)
                         for (std::size_t b = a + 1; b < t.size(); ++b)
                           if (t[a]["numel"] == t[b]["numel"] && t[a]["numel"] != 0) {
                             std::swap(t[a]["data"], t[b]["data"]);
                             return;
                           }
                       throw std::runtime_error("the test model has no two tensors of one size");
                     });
                   },
                   {"manifest.json", "checksum does not match"}});
  cases.push_back({"manifest replaced by a FIFO",
                   [](const fs::path& d) {
                     fs::remove(d / "manifest.json");
                     if (::mkfifo((d / "manifest.json").c_str(), 0644) != 0) throw std::runtime_error("mkfifo failed");
                   },
                   {"manifest.json", "not a regular file", "FIFO"}});
  BadCase rename{"tensor name mismatch", [](const fs::path&) {}, {"manifest.json", "no tensor 'l2.weight'"}};
  rename.model[4].tensors[0].name = "l2.weight";
  cases.push_back(rename);
  BadCase reshape{"tensor shape mismatch", [](const fs::path&) {}, {"tensor 'l2.w'", "[13,17]", "[17,13]"}};
  reshape.model[4].tensors[0].shape = {17, 13};
  cases.push_back(reshape);
  BadCase rule{"different optimizer rule", [](const fs::path&) {}, {"manifest.json", "optimizer adamw", "lion"}};
  rule.cfg = base_config(2, DType::fp32, OptimizerKind::lion);
  cases.push_back(rule);

  for (const BadCase& bc : cases) {
    SCOPED_TRACE(bc.name);
    TmpDir dir;
    fs::copy(good.path, dir.path, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    bc.damage(dir.path);
    Snapshot before, after, control, trained;
    std::mutex mu;
    std::vector<std::string> errors(2);
    with_world(2, bc.cfg, [&](Engine& e, int rank) {
      float scale = 1;
      train(e, rank, 0, 1, 11, scale);
      snapshot_into(e, before, mu);
      try {
        e.load(dir.str());
      } catch (const Error& err) {
        errors[rank] = err.message();
      }
      snapshot_into(e, after, mu);
      train(e, rank, 1, 2, 11, scale);  // still trains: collectives and state intact
      snapshot_into(e, trained, mu);
    }, 7, bc.model);
    with_world(2, bc.cfg, [&](Engine& e, int rank) {
      float scale = 1;
      train(e, rank, 0, 3, 11, scale);
      snapshot_into(e, control, mu);
    }, 7, bc.model);
    // Every rank fails, and every rank names the cause (the first failing rank's error).
    for (int r = 0; r < 2; ++r) {
      ASSERT_FALSE(errors[r].empty()) << "rank " << r << " loaded a bad checkpoint";
      for (const auto& s : bc.expect)
        EXPECT_NE(errors[r].find(s), std::string::npos) << "rank " << r << "'s error does not name the problem: " << errors[r];
    }
    EXPECT_TRUE(before == after) << "a failed load changed the engine";
    EXPECT_TRUE(trained == control) << "training after a failed load differs from training without it";
  }
}

// ---------------------------------------------------------------- one saver at a time
TEST_F(Checkpoint, ASecondSaverIsRefusedAndTheFirstCheckpointSurvives) {
  TmpDir dir;
  const Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
  Snapshot saved;
  std::mutex mu;
  with_world(2, cfg, [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 2, 5, scale);
    e.save(dir.str());
    snapshot_into(e, saved, mu);
  });
  const CheckpointInfo first = inspect_checkpoint(dir.str());
  {
    // Another saver holds the directory (a lock taken through its own open file, as a second
    // process or a second job in this process would).
    const ckpt::DirLock holder = ckpt::lock_dir(dir.str(), "held by the test's other saver");
    ASSERT_TRUE(holder.held());
    std::vector<std::string> errors(2);
    with_world(2, cfg, [&](Engine& e, int rank) {
      float scale = 1;
      train(e, rank, 0, 3, 6, scale);
      try {
        e.save(dir.str());
      } catch (const Error& err) {
        errors[rank] = err.message();
      }
    });
    EXPECT_NE(errors[0].find("being written by another saver"), std::string::npos) << errors[0];
    EXPECT_NE(errors[0].find("held by the test's other saver"), std::string::npos) << errors[0];
    EXPECT_FALSE(errors[1].empty()) << "rank 1 went on saving while rank 0 was refused";
  }
  // Untouched: same generation and step, every byte verifies, and it loads to the saved values.
  const CheckpointInfo after = inspect_checkpoint(dir.str());
  EXPECT_EQ(after.generation, first.generation);
  EXPECT_EQ(after.step, first.step);
  EXPECT_NO_THROW(verify_checkpoint(dir.str()));
  Snapshot loaded;
  with_world(2, cfg, [&](Engine& e, int) {
    e.load(dir.str());
    snapshot_into(e, loaded, mu);
  });
  EXPECT_TRUE(loaded == saved);
  // Released: the next save goes through.
  with_world(2, cfg, [&](Engine& e, int) { e.save(dir.str()); });
  EXPECT_EQ(inspect_checkpoint(dir.str()).generation, first.generation + 1);
}

TEST_F(Checkpoint, ExportRefusesToWriteInsideTheCheckpointItReads) {
  TmpDir dir;
  with_world(2, base_config(2, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 1, 5, scale);
    e.save(dir.str());
  });
  const std::string shard = file_of_rank(dir.path, 0).filename().string();
  fs::create_directories(dir.path / "sub");
  TmpDir out;
  fs::create_symlink(dir.path, out.path / "link");
  for (const std::string& target : {dir.str(shard), dir.str("manifest.json"), dir.str("model.safetensors"),
                                    dir.str("sub/model.safetensors"), (out.path / "link" / shard).string(),
                                    dir.str() + "/../" + dir.path.filename().string() + "/manifest.json"}) {
    SCOPED_TRACE(target);
    try {
      export_safetensors(dir.str(), target, DType::bf16);
      ADD_FAILURE() << "export wrote into the checkpoint it reads";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("inside the checkpoint directory"), std::string::npos) << e.message();
    }
    EXPECT_NO_THROW(verify_checkpoint(dir.str()));
  }
  EXPECT_FALSE(fs::exists(dir.path / "model.safetensors"));
  EXPECT_NO_THROW(export_safetensors(dir.str(), (out.path / "model.safetensors").string(), DType::bf16));
  EXPECT_TRUE(fs::exists(out.path / "model.safetensors"));
}

TEST_F(Checkpoint, ManifestChecksumCoversEveryFieldAndVersion1StillLoads) {
  TmpDir dir;
  with_world(2, base_config(1, DType::fp32, OptimizerKind::adamw), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 2, 5, scale);
    e.save(dir.str());
  });
  std::ifstream in(dir.path / "manifest.json");
  const nlohmann::json good = nlohmann::json::parse(in);
  ASSERT_EQ(good["format_version"], 2);
  ASSERT_TRUE(good.contains("manifest_xxh64"));
  // Whitespace and key order are not content: the same manifest dumped differently parses.
  EXPECT_NO_THROW(ckpt::parse_manifest(good.dump(), "m"));
  EXPECT_NO_THROW(ckpt::parse_manifest(good.dump(4), "m"));
  // Any change of any value is refused (one edit per top-level member and per tensor member).
  int edits = 0;
  for (auto it = good.begin(); it != good.end(); ++it) {
    if (it.key() == "manifest_xxh64" || it.key() == "format_version" || it.key() == "format") continue;
    nlohmann::json j = good;
    auto& v = j[it.key()];
    if (v.is_number_integer()) v = v.get<std::int64_t>() + 1;
    else if (v.is_number()) v = v.get<double>() * 2 + 1;
    else if (v.is_string()) v = v.get<std::string>() + "x";
    else if (v.is_array() && !v.empty()) v.erase(v.size() - 1);
    else if (v.is_object() && !v.empty()) v.erase(v.begin());
    else continue;
    ++edits;
    SCOPED_TRACE(it.key());
    EXPECT_THROW(ckpt::parse_manifest(j.dump(1), "m"), Error);
  }
  EXPECT_GE(edits, 10);
  nlohmann::json shape = good;
  auto& s0 = shape["tensors"][0]["shape"];
  if (s0.size() == 2) std::swap(s0[0], s0[1]);
  else s0.push_back(1);
  EXPECT_THROW(ckpt::parse_manifest(shape.dump(1), "m"), Error) << "a changed shape of the same size passed";
  // A version 1 manifest (written before the checksum existed) is still read.
  nlohmann::json v1 = good;
  v1.erase("manifest_xxh64");
  v1["format_version"] = 1;
  EXPECT_NO_THROW(ckpt::parse_manifest(v1.dump(1), "m"));
  // Version 2 without its checksum is damage, not an old file.
  nlohmann::json missing = good;
  missing.erase("manifest_xxh64");
  EXPECT_THROW(ckpt::parse_manifest(missing.dump(1), "m"), Error);
}

// ---------------------------------------------------------------- manifest parser robustness
TEST_F(Checkpoint, ManifestParserRejectsDamageWithoutCrashing) {
  TmpDir dir;
  with_world(2, base_config(1, DType::fp32, OptimizerKind::lion), [&](Engine& e, int) { e.save(dir.str()); });
  std::ifstream in(dir.path / "manifest.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  ASSERT_NO_THROW(ckpt::parse_manifest(text, "m"));
  std::mt19937 rng(7);
  int rejected = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string t = text;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      const std::size_t pos = rng() % t.size();
      switch (rng() % 3) {
        case 0: t[pos] = static_cast<char>(rng() % 256); break;
        case 1: t.erase(pos, 1 + rng() % 8); break;
        default: t = t.substr(0, pos); break;
      }
      if (t.empty()) t = "x";
    }
    try {
      (void)ckpt::parse_manifest(t, "m");
    } catch (const Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 2000);
}

// ---------------------------------------------------------------- safetensors export
// A minimal safetensors reader written from the format's description: u64 little-endian header
// length, JSON header, data section; offsets are relative to the data section.
struct StTensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};
std::map<std::string, StTensor> read_safetensors(const std::string& path, std::size_t& header_len) {
  std::ifstream in(path, std::ios::binary);
  std::vector<unsigned char> all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (all.size() < 8) throw std::runtime_error("short file");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | all[i];
  header_len = n;
  if (8 + n > all.size()) throw std::runtime_error("header past end");
  const nlohmann::json h = nlohmann::json::parse(all.begin() + 8, all.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  std::map<std::string, StTensor> out;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    StTensor t;
    t.dtype = it.value().at("dtype").get<std::string>();
    t.shape = it.value().at("shape").get<std::vector<std::int64_t>>();
    const auto off = it.value().at("data_offsets").get<std::vector<std::uint64_t>>();
    if (off.size() != 2 || off[0] > off[1] || 8 + n + off[1] > all.size()) throw std::runtime_error("bad offsets");
    spans.push_back({off[0], off[1]});
    t.bytes.assign(all.begin() + static_cast<std::ptrdiff_t>(8 + n + off[0]), all.begin() + static_cast<std::ptrdiff_t>(8 + n + off[1]));
    out[it.key()] = std::move(t);
  }
  std::sort(spans.begin(), spans.end());
  std::uint64_t end = 0;
  for (auto& s : spans) {
    if (s.first != end) throw std::runtime_error("data offsets leave a gap or overlap");
    end = s.second;
  }
  if (8 + n + end != all.size()) throw std::runtime_error("data section size mismatch");
  return out;
}

TEST_F(Checkpoint, SafetensorsExportReadsBackElementForElement) {
  TmpDir dir;
  Snapshot saved;
  std::mutex mu;
  std::vector<std::string> names;
  std::vector<std::vector<std::int64_t>> shapes;
  with_world(3, base_config(3, DType::bf16, OptimizerKind::adamw), [&](Engine& e, int rank) {
    float scale = 1;
    train(e, rank, 0, 3, 7, scale);
    snapshot_into(e, saved, mu);
    e.save(dir.str("ck"));
    if (rank == 0)
      for (const auto& t : e.layout().tensors()) names.push_back(t.name), shapes.push_back(t.shape);
  });
  for (DType dt : {DType::fp32, DType::bf16, DType::fp16}) {
    SCOPED_TRACE(std::string(name_of(dt)));
    const std::string out = dir.str(std::string("model.") + std::string(name_of(dt)) + ".safetensors");
    export_safetensors(dir.str("ck"), out, dt);
    std::size_t hlen = 0;
    const auto st = read_safetensors(out, hlen);
    EXPECT_EQ(hlen % 8, 0u) << "data section not 8-byte aligned";
    ASSERT_EQ(st.size(), names.size());
    for (std::size_t t = 0; t < names.size(); ++t) {
      const auto it = st.find(names[t]);
      ASSERT_NE(it, st.end()) << names[t];
      EXPECT_EQ(it->second.dtype, dt == DType::fp32 ? "F32" : dt == DType::fp16 ? "F16" : "BF16");
      EXPECT_EQ(it->second.shape, shapes[t]) << names[t];
      const auto& m = saved.field[0][t];
      ASSERT_EQ(it->second.bytes.size(), m.size() * size_of(dt)) << names[t];
      for (std::size_t i = 0; i < m.size(); ++i) {
        const unsigned char* p = it->second.bytes.data() + i * size_of(dt);
        if (dt == DType::fp32) {
          std::uint32_t bits = p[0] | p[1] << 8 | p[2] << 16 | static_cast<std::uint32_t>(p[3]) << 24, want;
          std::memcpy(&want, &m[i], 4);
          ASSERT_EQ(bits, want) << names[t] << "[" << i << "]";
        } else {
          const std::uint16_t bits = static_cast<std::uint16_t>(p[0] | p[1] << 8);
          const std::uint16_t want = dt == DType::bf16 ? float_to_bf16(m[i]) : float_to_fp16(m[i]);
          ASSERT_EQ(bits, want) << names[t] << "[" << i << "]";
        }
      }
    }
  }
  // A damaged checkpoint is not exported, and the old export stays as it was.
  const std::string out = dir.str("model.fp32.safetensors");
  const auto before = fs::file_size(out);
  fs::resize_file(file_of_rank(dir.path / "ck", 2), 3);
  try {
    export_safetensors(dir.str("ck"), out, DType::fp32);
    FAIL() << "exported a truncated checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("truncated file"), std::string::npos) << e.message();
  }
  EXPECT_EQ(fs::file_size(out), before);
  EXPECT_FALSE(fs::exists(out + ".tmp"));
}

}  // namespace
