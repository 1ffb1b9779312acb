// The offload engine: optimizer state in pinned host memory or in a file (NVMe tier) must give
// the same bits as the engine without offload, under a slow pipeline too; NVMe faults must leave
// the previous state on disk; a bad directory is refused at initialize().
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <barrier>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>

#include "engine/plan.hpp"
#include "engine_harness.hpp"
#include "temp_dir.hpp"
#include "offload/offload_engine.hpp"
#include "offload/test_hooks.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

namespace fs = std::filesystem;

// A scratch directory on the build's filesystem (ext4 here: O_DIRECT works), removed at the end.
using shardopt::test::TempDir;

// Small cells, so that the test models span several of them and the ring wraps around.
struct SmallCells {
  SmallCells() { detail::set_offload_chunk_for_testing(1024); }
  ~SmallCells() {
    detail::set_offload_chunk_for_testing(0);
    offload::clear_test_hooks();
  }
};

// awkward_model plus a block of 6144 elements: several cells per rank up to world 4.
std::vector<BlockSpec> offload_model() {
  auto m = awkward_model();
  m.push_back({"wide", {{"wide.w", {96, 64}, 0}, {"wide.b", {96}, 1}}});
  return m;
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b, const char* what,
               const std::vector<std::string>& names) {
  if (a.size() != b.size()) {
    ADD_FAILURE() << what << ": tensor count differs";
    return false;
  }
  for (std::size_t t = 0; t < a.size(); ++t) {
    if (!shardopt::testing::same_bits(a[t], b[t])) {
      std::size_t i = 0;
      while (i < a[t].size() && i < b[t].size() && std::memcmp(&a[t][i], &b[t][i], 4) == 0) ++i;
      ADD_FAILURE() << what << " of " << names[t] << " differs first at element " << i << ": "
                    << (i < a[t].size() ? a[t][i] : NAN) << " vs " << (i < b[t].size() ? b[t][i] : NAN);
      return false;
    }
  }
  return true;
}

void expect_identical(const RunResult& none, const RunResult& got, int nstates) {
  EXPECT_TRUE(same_bits(none.master, got.master, "master", none.tensor_names));
  for (int k = 0; k < nstates; ++k) EXPECT_TRUE(same_bits(none.state[k], got.state[k], "state", none.tensor_names));
  EXPECT_TRUE(same_bits(none.params, got.params, "parameters", none.tensor_names));
  ASSERT_EQ(none.results.size(), got.results.size());
  for (std::size_t r = 0; r < none.results.size(); ++r)
    for (std::size_t s = 0; s < none.results[r].size(); ++s) {
      EXPECT_EQ(none.results[r][s].applied, got.results[r][s].applied) << "rank " << r << " step " << s;
      EXPECT_EQ(none.results[r][s].grad_norm, got.results[r][s].grad_norm) << "rank " << r << " step " << s;
    }
}

// The float64 reference bound of test_engine_oracle (AdamW / Adam: the step, at most ~3 lr, is off
// by the reduce dtype's relative error; plus a few fp32 ulps per update).
void expect_near_reference(const RunSpec& spec, const RunResult& got) {
  const ReferenceRun rr = run_reference(spec);
  const double T = spec.steps, lr = spec.cfg.hyper.lr, u32 = std::ldexp(1.0, -24);
  const double ur = unit_roundoff(spec.cfg.reduce_dtype);
  int bad = 0;
  for (std::size_t t = 0; t < got.master.size(); ++t)
    for (std::size_t i = 0; i < got.master[t].size(); ++i) {
      ASSERT_EQ(got.coverage[t][i], spec.cfg.stage == 0 ? spec.world : 1) << got.tensor_names[t] << "[" << i << "]";
      const double ref = rr.ref.p[t][i];
      const double tol = T * (3 * lr * 2.5 * ur + 8 * u32 * (std::fabs(ref) + 3 * lr)) + 1e-12;
      if (!(std::fabs(got.master[t][i] - ref) <= tol) && bad++ < 5)
        ADD_FAILURE() << got.tensor_names[t] << "[" << i << "]: " << got.master[t][i] << " vs reference " << ref;
    }
}

using Param = std::tuple<int /*stage*/, int /*world*/, DType>;
class OffloadMatrix : public ::testing::TestWithParam<Param> {};

TEST_P(OffloadMatrix, HostAndNvmeBitIdenticalToNone) {
  const auto [stage, world, dtype] = GetParam();
  SmallCells cells;
  RunSpec spec;
  spec.world = world;
  spec.steps = 20;
  spec.model = offload_model();
  spec.cfg = base_config(stage, dtype, OptimizerKind::adamw);
  spec.group1 = no_decay(spec.cfg);
  const RunResult none = run_training(spec);

  RunSpec host = spec;
  host.cfg.offload_optimizer = OffloadKind::host;
  const RunResult got_host = run_training(host);
  expect_identical(none, got_host, 2);
  expect_near_reference(host, got_host);

  TempDir dir;
  RunSpec nvme = spec;
  nvme.cfg.offload_optimizer = OffloadKind::nvme;
  nvme.cfg.nvme_dir = dir.path.string();
  const RunResult got_nvme = run_training(nvme);
  expect_identical(none, got_nvme, 2);

  if (stage == 3) {  // the parameter shard in pinned host memory, gathered through one slice
    RunSpec params = host;
    params.cfg.offload_params = true;
    expect_identical(none, run_training(params), 2);
    params.cfg.offload_optimizer = OffloadKind::nvme;
    params.cfg.nvme_dir = dir.path.string();
    expect_identical(none, run_training(params), 2);
  }
}

std::string matrix_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [stage, world, dtype] = info.param;
  return "stage" + std::to_string(stage) + "_world" + std::to_string(world) + "_" + std::string(name_of(dtype));
}

INSTANTIATE_TEST_SUITE_P(Matrix, OffloadMatrix,
                         ::testing::Combine(::testing::Values(1, 2, 3), ::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(DType::fp32, DType::bf16)),
                         matrix_name);

// Other rules, stage 0, micro-steps, fp16 with skipped (overflowed) steps, clipping.
TEST(Offload, RulesAccumulationOverflowAndClipping) {
  SmallCells cells;
  TempDir dir;
  struct Case {
    int stage, world;
    DType dtype;
    OptimizerKind rule;
    int accumulation;
  };
  for (const Case& k : {Case{0, 2, DType::fp32, OptimizerKind::sgd, 1}, Case{1, 3, DType::bf16, OptimizerKind::lion, 2},
                        Case{2, 2, DType::fp16, OptimizerKind::adam, 2}, Case{3, 3, DType::fp16, OptimizerKind::adamw, 1}}) {
    SCOPED_TRACE("stage " + std::to_string(k.stage) + " world " + std::to_string(k.world));
    RunSpec spec;
    spec.world = k.world;
    spec.steps = 20;
    spec.model = offload_model();
    spec.cfg = base_config(k.stage, k.dtype, k.rule);
    spec.cfg.accumulation_steps = k.accumulation;
    spec.cfg.max_grad_norm = 0.5f;
    if (k.dtype == DType::fp16) {
      spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
      spec.cfg.loss_scaling.initial_scale = 1024.0f;
      spec.grad_factor = [](int step, int, int rank) { return step == 5 && rank == 0 ? INFINITY : 1.0f; };
    }
    spec.group1 = no_decay(spec.cfg);
    const RunResult none = run_training(spec);
    if (k.dtype == DType::fp16) {
      EXPECT_FALSE(none.results[0][5].applied);
    }
    for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
      RunSpec o = spec;
      o.cfg.offload_optimizer = kind;
      o.cfg.nvme_dir = dir.path.string();
      expect_identical(none, run_training(o), state_count(k.rule));
    }
  }
}

// tmpfs refuses O_DIRECT: the store falls back to buffered I/O and still gives the same bits.
TEST(Offload, NvmeOnTmpfsFallsBackToBufferedIo) {
  if (!fs::is_directory("/dev/shm")) GTEST_SKIP() << "no /dev/shm";
  SmallCells cells;
  TempDir dir("/dev/shm");
  RunSpec spec;
  spec.world = 2;
  spec.model = offload_model();
  spec.cfg = base_config(2, DType::bf16, OptimizerKind::adamw);
  spec.group1 = no_decay(spec.cfg);
  const RunResult none = run_training(spec);
  spec.cfg.offload_optimizer = OffloadKind::nvme;
  spec.cfg.nvme_dir = dir.path.string();
  expect_identical(none, run_training(spec), 2);
}

// A slow copy stream and a slow CPU update change the timing of every overlap, never the bits.
TEST(Offload, SlowCopiesAndSlowUpdateStillIdentical) {
  SmallCells cells;
  TempDir dir;
  for (int stage : {1, 2, 3}) {
    RunSpec spec;
    spec.world = 2;
    spec.steps = 20;
    spec.model = offload_model();
    spec.cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
    spec.group1 = no_decay(spec.cfg);
    const RunResult none = run_training(spec);
    offload::test_hooks().copy_delay_us = 300;
    offload::test_hooks().update_delay_us = 300;
    for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
      RunSpec o = spec;
      o.cfg.offload_optimizer = kind;
      o.cfg.nvme_dir = dir.path.string();
      o.cfg.offload_params = stage == 3;
      expect_identical(none, run_training(o), 2);
    }
    offload::clear_test_hooks();
  }
}

// One rank driven on this thread: register, initialize, and train steps [first, first+count).
struct Solo {
  World w{1};
  Config cfg;
  std::unique_ptr<Engine> e;
  explicit Solo(const Config& c) : cfg(c) {
    e = std::make_unique<Engine>(cfg, *w.backends[0], *w.comms[0]);
    for (const auto& b : offload_model()) e->register_block(b);
    e->set_group(1, no_decay(cfg));
    e->initialize(seeded_init(7));
  }
  void backward(int s) {
    const int nblocks = static_cast<int>(e->layout().blocks().size());
    for (int b = nblocks - 1; b >= 0; --b) {
      e->acquire(b);
      BlockView g = e->gradients(b);
      for (const TensorView& tv : g.tensors)
        for (std::size_t i = 0; i < tv.numel; ++i)
          store_from_float(tv.data, cfg.compute_dtype, i,
                           synthetic_grad(7, s, 0, 0, name_key(tv.info->name), i, cfg.compute_dtype));
      e->grads_ready(b);
      e->release(b);
    }
  }
  std::vector<float> snapshot() {  // master and both moments, flattened
    std::vector<float> out;
    auto add = [&](int, std::size_t, std::size_t n, const float* v) { out.insert(out.end(), v, v + n); };
    e->read_master(add);
    e->read_state(0, add);
    e->read_state(1, add);
    return out;
  }
};

struct FaultCase {
  bool write;
  long nth;
  bool short_io;
};

class NvmeFault : public ::testing::TestWithParam<FaultCase> {};

// A failed or short read/write in a step: Error naming the file, the state on disk is the previous
// step's (read back from the file), and after zero_grad the training goes on exactly as if the
// failed step had never been attempted.
TEST_P(NvmeFault, ErrorAndPreviousStateIntact) {
  const FaultCase f = GetParam();
  SmallCells cells;
  TempDir dir;
  Config cfg = base_config(2, DType::bf16, OptimizerKind::adamw);
  cfg.offload_optimizer = OffloadKind::nvme;
  cfg.nvme_dir = dir.path.string();

  Solo clean(cfg);
  for (int s = 0; s < 5; ++s) {
    clean.backward(s);
    clean.e->step();
  }
  const std::vector<float> want = clean.snapshot();
  clean.e.reset();

  Solo faulty(cfg);
  for (int s = 0; s < 3; ++s) {
    faulty.backward(s);
    faulty.e->step();
  }
  const std::vector<float> before = faulty.snapshot();
  faulty.backward(3);
  // nth < 0: the header write, which comes after the step's one data write per cell
  const long ncells = static_cast<long>((faulty.e->layout().shard_elems() + 1023) / 1024);
  offload::arm_io_fault(f.write, f.nth < 0 ? ncells + 1 : f.nth, f.short_io);
  try {
    faulty.e->step();
    ADD_FAILURE() << "step() succeeded despite the injected fault";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::io_error) << err.what();
    EXPECT_NE(err.message().find("shardopt-optimizer-rank0-of1.bin"), std::string::npos) << err.message();
    EXPECT_NE(err.message().find(f.short_io ? "short" : "failed"), std::string::npos) << err.message();
  }
  offload::clear_test_hooks();
  const std::vector<float> after = faulty.snapshot();
  ASSERT_EQ(before.size(), after.size());
  EXPECT_EQ(std::memcmp(before.data(), after.data(), before.size() * 4), 0) << "the failed step changed the state on disk";

  faulty.e->zero_grad();
  for (int s = 3; s < 5; ++s) {
    faulty.backward(s);
    EXPECT_EQ(faulty.e->step().step, s + 1);
  }
  const std::vector<float> got = faulty.snapshot();
  EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * 4), 0) << "training after the fault diverged";
}

INSTANTIATE_TEST_SUITE_P(Faults, NvmeFault,
                         ::testing::Values(FaultCase{false, 1, false}, FaultCase{false, 3, false},
                                           FaultCase{false, 2, true}, FaultCase{true, 1, false},
                                           FaultCase{true, 4, false}, FaultCase{true, 2, true},
                                           // the header write, after every data write of the step
                                           FaultCase{true, -1, false}, FaultCase{true, -1, true}),
                         [](const ::testing::TestParamInfo<FaultCase>& i) {
                           return std::string(i.param.write ? "write" : "read") +
                                  (i.param.nth < 0 ? std::string("_header") : std::to_string(i.param.nth)) +
                                  (i.param.short_io ? "_short" : "_fails");
                         });

void expect_init_error(const std::string& dir, const std::string& what) {
  Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
  cfg.offload_optimizer = OffloadKind::nvme;
  cfg.nvme_dir = dir;
  try {
    Solo s(cfg);
    ADD_FAILURE() << "initialize() accepted nvme_dir '" << dir << "' (" << what << ")";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io_error) << e.what();
    EXPECT_NE(e.message().find(dir), std::string::npos) << "error does not name the directory: " << e.message();
  }
}

TEST(Offload, BadNvmeDirectoryIsAnErrorAtInitialize) {
  TempDir dir;
  expect_init_error((dir.path / "missing").string(), "missing");
  const fs::path file = dir.path / "a-file";
  { std::ofstream(file.string()) << "x"; }
  expect_init_error(file.string(), "not a directory");
  if (::geteuid() == 0) {
    expect_init_error("/proc", "unwritable (root: a directory no file can be created in)");
  } else {
    const fs::path ro = dir.path / "read-only";
    fs::create_directory(ro);
    ::chmod(ro.c_str(), 0555);
    expect_init_error(ro.string(), "unwritable");
  }
}

// A state file larger than the free space: refused at initialize(), before anything is allocated
// (the model is sized from statvfs so that this holds on any disk).
TEST(Offload, NvmeDirectoryTooSmallIsAnErrorAtInitialize) {
  TempDir dir;
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs(dir.path.c_str(), &vfs), 0);
  const double avail = static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize);
  // 24 bytes per element on disk: fp32 master + 2 moments, two generations.
  const auto elems = static_cast<std::int64_t>(avail / 24.0) + (std::int64_t(1) << 24);
  Config cfg = base_config(1, DType::bf16, OptimizerKind::adamw);
  cfg.offload_optimizer = OffloadKind::nvme;
  cfg.nvme_dir = dir.path.string();
  World w(1);
  Engine e(cfg, *w.backends[0], *w.comms[0]);
  e.register_block({"huge", {{"huge.w", {elems}, 0}}});
  try {
    e.initialize();
    ADD_FAILURE() << "initialize() accepted a state file larger than the free space";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::io_error) << err.what();
    EXPECT_NE(err.message().find(cfg.nvme_dir), std::string::npos) << err.message();
    EXPECT_NE(err.message().find("bytes free"), std::string::npos) << err.message();
  }
  EXPECT_EQ(w.backends[0]->memory().report().peak_total[static_cast<int>(Place::device)], 0u) << "allocated before the check";
  EXPECT_TRUE(fs::is_empty(dir.path));
}

// One rank's NVMe state file truncated mid-run (a full disk's cleanup, an operator's mistake):
// that rank's step fails with an I/O error naming its file, and the other rank fails too, at once
// (the failing rank leaves the group), not at the group's 60 s timeout.
TEST(Offload, TruncatedNvmeStateFileMidRunFailsEveryRank) {
  TempDir dir;
  constexpr int n = 2;
  auto group = make_in_process_group(n, InProcessTransport::host_tasks, std::chrono::seconds(60));
  std::vector<std::string> errors(n);
  std::vector<ErrorCode> codes(n, ErrorCode::internal);
  std::vector<int> steps_done(n, 0);
  std::barrier sync(n);
  const auto t0 = std::chrono::steady_clock::now();
  (void)run_on_threads(n, [&](int r) {
    auto be = make_cpu_backend();
    auto comm = make_in_process_communicator(group, r, *be);
    Config cfg = base_config(2, DType::bf16, OptimizerKind::adamw);
    cfg.offload_optimizer = OffloadKind::nvme;
    cfg.nvme_dir = dir.path.string();
    try {
      Engine e(cfg, *be, *comm);
      for (const auto& b : awkward_model()) e.register_block(b);
      e.initialize(seeded_init(5));
      for (int s = 0; s < 4; ++s) {
        if (s == 2) {
          sync.arrive_and_wait();  // both ranks between steps
          if (r == 1) {
            const fs::path f = dir.path / "shardopt-optimizer-rank1-of2.bin";
            ASSERT_TRUE(fs::exists(f)) << "the state file is named differently: update this test";
            fs::resize_file(f, 0);
          }
          sync.arrive_and_wait();
        }
        synthetic_micro_step(e, r, s, 0, 5, 1.0f);
        e.step();
        ++steps_done[r];
      }
    } catch (const Error& err) {
      errors[r] = err.message();
      codes[r] = err.code();
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LE(steps_done[1], 2);
  EXPECT_EQ(codes[1], ErrorCode::io_error) << errors[1];
  EXPECT_NE(errors[1].find("shardopt-optimizer-rank1"), std::string::npos) << errors[1];
  EXPECT_NE(errors[0], "") << "rank 0 finished although rank 1 could not";
  EXPECT_LT(seconds, 20.0) << "rank 0 waited for the group's timeout: " << errors[0];
}

TEST(Offload, OffloadParamsRequiresOptimizerOffload) {
  Config cfg = base_config(3, DType::fp32, OptimizerKind::adamw);
  cfg.offload_params = true;
  World w(1);
  try {
    Engine e(cfg, *w.backends[0], *w.comms[0]);
    ADD_FAILURE() << "offload_params without optimizer offload accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(e.message().find("offload_params"), std::string::npos);
  }
}

// memory_report shows the new places and agrees with plan_memory; device bytes at stage 2 are
// the parameters plus bounded buffers.
TEST(Offload, MemoryReportShowsPinnedHostAndDisk) {
  SmallCells cells;
  TempDir dir;
  for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
    for (bool params : {false, true}) {
      Config cfg = base_config(params ? 3 : 2, DType::bf16, OptimizerKind::adamw);
      cfg.offload_optimizer = kind;
      cfg.nvme_dir = dir.path.string();
      cfg.offload_params = params;
      Solo s(cfg);
      const MemoryReport got = s.e->memory_report();
      const MemoryReport planned = plan_memory(cfg, offload_model(), 1).report();
      for (int c = 0; c < kCategoryCount; ++c)
        for (int p = 0; p < kPlaceCount; ++p)
          EXPECT_EQ(got.current[c][p], planned.current[c][p])
              << name_of(static_cast<Category>(c)) << " at " << name_of(static_cast<Place>(p));
      const std::size_t S = s.e->layout().shard_elems();
      auto cur = [&](Category c, Place p) { return got.current_of(c, p); };
      EXPECT_EQ(cur(Category::master_weights, Place::device), 0u);
      EXPECT_EQ(cur(Category::optimizer_state, Place::device), 0u);
      if (kind == OffloadKind::host) {
        EXPECT_EQ(cur(Category::master_weights, Place::pinned_host), 4 * S);
        EXPECT_EQ(cur(Category::optimizer_state, Place::pinned_host), 8 * S);
        EXPECT_EQ(cur(Category::master_weights, Place::disk), 0u);
      } else {
        EXPECT_EQ(cur(Category::master_weights, Place::pinned_host), 0u);
        EXPECT_GE(cur(Category::master_weights, Place::disk), 2 * 4 * S);  // two generations
        EXPECT_GE(cur(Category::optimizer_state, Place::disk), 2 * 8 * S);
      }
      if (params) {
        EXPECT_EQ(cur(Category::parameters, Place::pinned_host), 2 * S);
      }
      EXPECT_GT(cur(Category::offload_staging, Place::pinned_host), 0u);
      s.e.reset();
      if (kind == OffloadKind::nvme) {
        EXPECT_TRUE(fs::is_empty(dir.path)) << "the state file outlived its engine";
        const MemoryReport after = s.w.backends[0]->memory().report();
        EXPECT_EQ(after.current_total(Place::disk), 0u);
      }
    }
  }
}


// With optimizer offload the reduced gradient has no device copy: each bucket (stages 2-3) or
// reduced unit (stages 0-1) goes down to the pinned host copy as it lands. The device keeps the two
// gradient buckets (stages 2-3), the full gradients the trainer adds into (stages 0-1) and at most a
// one-unit reduce buffer; nothing else of the gradient, whatever the stage, reduce dtype or
// micro-steps. memory_report() after training equals plan_memory.
TEST(Offload, NoDeviceGradientShard) {
  SmallCells cells;
  struct Case {
    int stage, world;
    DType compute, reduce;
    int accumulation;
    bool params;
  };
  for (const Case& k : {Case{0, 2, DType::bf16, DType::fp32, 1, false}, Case{1, 3, DType::bf16, DType::fp32, 1, false},
                        Case{1, 2, DType::fp32, DType::fp32, 2, false}, Case{2, 1, DType::bf16, DType::bf16, 1, false},
                        Case{2, 3, DType::bf16, DType::fp32, 3, false}, Case{3, 2, DType::fp16, DType::fp16, 2, true},
                        Case{3, 1, DType::bf16, DType::bf16, 1, true}}) {
    SCOPED_TRACE("stage " + std::to_string(k.stage) + " world " + std::to_string(k.world) + " " +
                 std::string(name_of(k.compute)) + "/" + std::string(name_of(k.reduce)) + " micro-steps " +
                 std::to_string(k.accumulation));
    RunSpec spec;
    spec.world = k.world;
    spec.steps = 2;
    spec.model = offload_model();
    spec.cfg = base_config(k.stage, k.compute, OptimizerKind::adamw);
    spec.cfg.reduce_dtype = k.reduce;
    spec.cfg.accumulation_steps = k.accumulation;
    spec.cfg.offload_optimizer = OffloadKind::host;
    spec.cfg.offload_params = k.params;
    spec.group1 = no_decay(spec.cfg);
    const MemoryPlan plan = plan_memory(spec.cfg, spec.model, k.world);
    std::size_t device_grad_bytes = 0, bucket_bytes = 0, full_grad_bytes = 0, reduce_buf_bytes = 0;
    for (const auto& b : plan.buffers) {
      EXPECT_EQ(b.name.find("gradient shard"), std::string::npos) << b.name;
      EXPECT_EQ(b.name.find("reduce-scatter slice"), std::string::npos) << b.name;
      EXPECT_EQ(b.name.find("gradients in reduce dtype"), std::string::npos) << b.name;
      if (b.name.find("upload") != std::string::npos) {
        EXPECT_NE(b.place, Place::device) << b.name;  // no device staging
      }
      if (b.place != Place::device) continue;
      if (b.category == Category::gradients) device_grad_bytes += b.bytes;
      if (b.name.find("gradient bucket") == 0) bucket_bytes += b.bytes;
      if (b.name == "full gradients") full_grad_bytes += b.bytes;
      if (b.name == "reduce buffer") reduce_buf_bytes += b.bytes;
    }
    const Layout L = Layout::build(spec.model, detail::layout_options(spec.cfg, k.world));
    std::size_t P = 0;
    for (const auto& u : L.units()) P += u.padded_elems;
    const std::size_t U = L.max_unit_elems(), c = size_of(k.compute), r = size_of(k.reduce);
    if (k.stage >= 2) {
      EXPECT_EQ(bucket_bytes, 2 * U * c);
      EXPECT_EQ(device_grad_bytes, 2 * U * c);  // the buckets and nothing else
    } else {
      EXPECT_EQ(full_grad_bytes, P * c);
      EXPECT_EQ(device_grad_bytes, P * c);
    }
    EXPECT_EQ(reduce_buf_bytes, k.reduce != k.compute ? U * r : 0u);
    if (k.stage == 3 && k.params) {
      // Nothing on the device grows with the model beyond one unit: slots, buckets, scalars.
      std::size_t device = 0, slots = 0;
      for (const auto& b : plan.buffers)
        if (b.place == Place::device && !b.transient) {
          device += b.bytes;
          if (b.name.find("gathered unit slot") == 0) slots += b.bytes;
        }
      EXPECT_EQ(slots, static_cast<std::size_t>(spec.cfg.prefetch_units + 1) * U * c);
      std::size_t scalars = 0;
      for (const auto& b : plan.buffers)
        if (b.place == Place::device && b.name == "step scalars") scalars = b.bytes;
      EXPECT_EQ(device, slots + 2 * U * c + reduce_buf_bytes + scalars);
    }
    const RunResult got = run_training(spec);
    const MemoryReport planned = plan.report();
    for (int rk = 0; rk < k.world; ++rk)
      for (int cat = 0; cat < kCategoryCount; ++cat)
        for (int pl = 0; pl < kPlaceCount; ++pl)
          EXPECT_EQ(got.memory[rk].current[cat][pl], planned.current[cat][pl])
              << "rank " << rk << ": " << name_of(static_cast<Category>(cat)) << " at " << name_of(static_cast<Place>(pl));
  }
}

// Without a device shard the gradient is reduced in place, measured as it lands and, with
// micro-steps at stages 2-3, summed on the host: still the bits of the run without offload, with
// a reduce dtype other than the compute dtype, micro-steps, clipping, and fp16 loss scaling with a
// non-finite gradient (a skipped step).
TEST(Offload, GradientsToHostBitIdentical) {
  SmallCells cells;
  TempDir dir;
  struct Case {
    int stage, world;
    DType compute, reduce;
    int accumulation;
  };
  for (const Case& k : {Case{0, 2, DType::bf16, DType::fp32, 2}, Case{1, 3, DType::bf16, DType::fp32, 1},
                        Case{2, 1, DType::bf16, DType::bf16, 3}, Case{2, 3, DType::bf16, DType::fp32, 2},
                        Case{2, 2, DType::fp16, DType::fp16, 3}, Case{3, 3, DType::bf16, DType::fp32, 2},
                        Case{3, 2, DType::fp16, DType::fp16, 2}, Case{3, 1, DType::fp16, DType::fp16, 1}}) {
    SCOPED_TRACE("stage " + std::to_string(k.stage) + " world " + std::to_string(k.world) + " " +
                 std::string(name_of(k.compute)) + "/" + std::string(name_of(k.reduce)) + " micro-steps " +
                 std::to_string(k.accumulation));
    RunSpec spec;
    spec.world = k.world;
    spec.steps = 12;
    spec.model = offload_model();
    spec.cfg = base_config(k.stage, k.compute, OptimizerKind::adamw);
    spec.cfg.reduce_dtype = k.reduce;
    spec.cfg.accumulation_steps = k.accumulation;
    spec.cfg.max_grad_norm = 0.5f;
    if (k.compute == DType::fp16) {
      spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
      spec.cfg.loss_scaling.initial_scale = 1024.0f;
      // A non-finite gradient on the last micro-step of step 4 of the last rank.
      spec.grad_factor = [&k](int step, int micro, int rank) {
        return step == 4 && micro == k.accumulation - 1 && rank == k.world - 1 ? INFINITY : 1.0f;
      };
    }
    spec.group1 = no_decay(spec.cfg);
    const RunResult none = run_training(spec);
    if (k.compute == DType::fp16) {
      EXPECT_FALSE(none.results[0][4].applied);
      EXPECT_TRUE(none.results[0][5].applied);
    }
    std::vector<RunSpec> variants;
    for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
      RunSpec o = spec;
      o.cfg.offload_optimizer = kind;
      o.cfg.nvme_dir = dir.path.string();
      variants.push_back(o);
      if (k.stage == 3) {
        o.cfg.offload_params = true;
        variants.push_back(o);
      }
    }
    for (const RunSpec& o : variants) {
      SCOPED_TRACE(std::string(name_of(o.cfg.offload_optimizer)) + (o.cfg.offload_params ? " + parameters" : ""));
      const RunResult got = run_training(o);
      expect_identical(none, got, 2);
      if (k.compute == DType::fp16) {
        EXPECT_FALSE(got.results[0][4].applied);
      }
    }
  }
}

}  // namespace

namespace {

// OffloadEngine::write/read (what checkpoint load and read_master use) across cell boundaries,
// on both tiers, straight on the class.
TEST(OffloadEngineDirect, WriteThenReadAcrossCells) {
  TempDir dir;
  for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
    auto be = make_cpu_backend();
    const std::size_t C = 1024, cells = 3, n = 2 * C + 100;
    std::vector<float> master(n, 0.0f), s0(n, 0.0f), s1(n, 0.0f), params(n, -1.0f);
    std::vector<std::uint16_t> grad(n, 0);
    const std::size_t cell_bytes = 3 * C * 4;
    Buffer io = be->allocate(3 * cell_bytes + 4096, Place::pinned_host, Category::offload_staging, "io");
    offload::Setup st;
    st.backend = be.get();
    st.kind = kind;
    st.nvme_dir = dir.path.string();
    st.grad_dtype = DType::bf16;
    st.param_dtype = DType::fp32;
    st.state_elems = n;
    st.chunk_elems = C;
    st.cells = cells;
    st.cell_bytes = cell_bytes;
    st.file_bytes = detail::kNvmeHeaderBytes + 2 * cells * cell_bytes;
    st.params_on_host = true;
    st.master = master.data();
    st.states[0] = s0.data();
    st.states[1] = s1.data();
    st.host_grad = grad.data();
    st.io_ring = io.data();
    st.io_ring_bytes = io.bytes();
    offload::OffloadEngine oe(st);
    std::vector<offload::Piece> pieces;
    for (std::size_t c = 0; c < cells; ++c)
      pieces.push_back({0, c * C, std::min(C, n - c * C), params.data() + c * C});
    oe.set_pieces(pieces);
    oe.initialize_values([](std::size_t begin, std::size_t k, float* m) {
      for (std::size_t i = 0; i < k; ++i) m[i] = static_cast<float>(begin + i);
    });
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(params[i], static_cast<float>(i)) << "rounded initial parameter " << i;
    std::vector<float> got(n), patch(1500);
    for (std::size_t i = 0; i < patch.size(); ++i) patch[i] = -static_cast<float>(i) - 0.5f;
    oe.write(2, C - 700, patch.size(), patch.data());  // state 1, spanning cells 0 and 1
    oe.read(0, 0, n, got.data());
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], static_cast<float>(i)) << name_of(kind) << " master " << i;
    oe.read(2, 0, n, got.data());
    for (std::size_t i = 0; i < n; ++i) {
      const bool in = i >= C - 700 && i < C - 700 + patch.size();
      ASSERT_EQ(got[i], in ? patch[i - (C - 700)] : 0.0f) << name_of(kind) << " state 1 element " << i;
    }
    oe.read(1, 0, n, got.data());
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], 0.0f) << name_of(kind) << " state 0 element " << i;
  }
}

}  // namespace
