// Engine::step_async(): the step whose decisions (overflow, norm, clipping, loss scale, step
// scalars) are made by the backend in stream order. It must give the bits step() gives, and it
// must never make the host wait (that is what lets a GPU step be captured in a CUDA graph).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>

#include "engine_harness.hpp"
#include "shardopt/error.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

void expect_same_run(const RunResult& sync, const RunResult& async, int nstates) {
  for (std::size_t t = 0; t < sync.master.size(); ++t) {
    EXPECT_TRUE(same_bits(sync.master[t], async.master[t])) << sync.tensor_names[t];
    for (int k = 0; k < nstates; ++k)
      EXPECT_TRUE(same_bits(sync.state[k][t], async.state[k][t])) << "state " << k << " of " << sync.tensor_names[t];
    EXPECT_TRUE(same_bits(sync.params[t], async.params[t])) << "parameters of " << sync.tensor_names[t];
  }
  ASSERT_EQ(sync.scales_seen.size(), async.scales_seen.size());
  for (std::size_t r = 0; r < sync.scales_seen.size(); ++r) {
    EXPECT_EQ(sync.scales_seen[r], async.scales_seen[r]) << "loss scales read by rank " << r;
    // step(): the buffer the trainer reads holds what the StepResult says.
    ASSERT_EQ(sync.results[r].size(), sync.scales_seen[r].size());
    for (std::size_t s = 0; s < sync.results[r].size(); ++s)
      EXPECT_EQ(sync.results[r][s].loss_scale, sync.scales_seen[r][s]) << "rank " << r << " step " << s;
    // step_async(): last_result() is the last step's StepResult.
    ASSERT_EQ(async.results[r].size(), 1u);
    const StepResult& a = async.results[r][0];
    const StepResult& b = sync.results[r].back();
    EXPECT_EQ(a.applied, b.applied) << "rank " << r;
    EXPECT_EQ(a.step, b.step) << "rank " << r;
    EXPECT_EQ(a.loss_scale, b.loss_scale) << "rank " << r;
    EXPECT_EQ(a.grad_norm, b.grad_norm) << "rank " << r;
    EXPECT_EQ(a.clip_coefficient, b.clip_coefficient) << "rank " << r;
  }
}

// fp16 with a dynamic loss scale that grows (every 2 clean steps), an overflow on one rank, and
// clipping that is active on some steps.
RunSpec eventful_spec(int stage, int world, WorldKind where) {
  RunSpec spec;
  spec.world = world;
  spec.where = where;
  spec.cfg = base_config(stage, DType::fp16, OptimizerKind::adamw);
  spec.cfg.loss_scaling.mode = LossScaleMode::dynamic;
  spec.cfg.loss_scaling.initial_scale = 256.0f;
  spec.cfg.loss_scaling.growth_interval = 2;
  spec.cfg.max_grad_norm = 20.0f;
  spec.group1 = no_decay(spec.cfg);
  spec.steps = 6;
  spec.grad_factor = [world](int s, int micro, int rank) {
    if (s == 3 && rank == world - 1) return std::numeric_limits<float>::infinity();  // one rank overflows
    return s == 1 && micro == 0 ? 8.0f : 1.0f;  // a large gradient: clipped
  };
  return spec;
}

}  // namespace

TEST(AsyncStep, SameBitsAsStepAtEveryStageOnBothTransports) {
  for (WorldKind where : {WorldKind::cpu, WorldKind::cpu_kernels}) {
    for (int stage : {0, 1, 2, 3}) {
      for (int world : {1, 3}) {
        SCOPED_TRACE("stage " + std::to_string(stage) + ", world " + std::to_string(world) +
                     (where == WorldKind::cpu ? ", host_tasks" : ", backend_kernels"));
        RunSpec spec = eventful_spec(stage, world, where);
        const RunResult sync = run_training(spec);
        spec.async = true;
        const RunResult async = run_training(spec);
        expect_same_run(sync, async, 2);
        // The run was eventful: a skipped step, a grown scale and a clipped step.
        EXPECT_FALSE(sync.results[0][3].applied);
        EXPECT_EQ(sync.results[0][1].loss_scale, 512.0f);
        EXPECT_LT(sync.results[0][1].clip_coefficient, 1.0f);
      }
    }
  }
}

// A constant loss scale: the harness never waits for a step itself, so only the engine's own
// ordering keeps the next micro-step's gradient writes after the step that zeroes them. A large
// tensor keeps the step busy long enough for a missing wait to lose gradients.
TEST(AsyncStep, AccumulationAndBf16AndOtherRules) {
  const OptimizerKind rules_by_stage[] = {OptimizerKind::sgd, OptimizerKind::lion, OptimizerKind::adam,
                                          OptimizerKind::adamw};
  for (int stage : {0, 1, 2, 3}) {
    const OptimizerKind rule = rules_by_stage[stage];
    SCOPED_TRACE("stage " + std::to_string(stage) + ", " + std::string(name_of(rule)));
    RunSpec spec;
    spec.world = 2;
    spec.model.push_back({"large", {{"large.w", {1 << 18}, 0}}});
    spec.cfg = base_config(stage, DType::bf16, rule);
    spec.cfg.accumulation_steps = 3;
    spec.cfg.max_grad_norm = 1.0f;
    spec.group1 = no_decay(spec.cfg);
    spec.steps = 4;
    const RunResult sync = run_training(spec);
    spec.async = true;
    const RunResult async = run_training(spec);
    expect_same_run(sync, async, state_count(rule));
  }
}

TEST(AsyncStep, WithOffloadItIsSynchronousAndAgrees) {
  for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
    SCOPED_TRACE(kind == OffloadKind::host ? "host" : "nvme");
    const std::string dir = ::testing::TempDir() + "shardopt_async_nvme";
    std::filesystem::create_directories(dir);
    RunSpec spec = eventful_spec(2, 2, WorldKind::cpu);
    spec.cfg.offload_optimizer = kind;
    spec.cfg.nvme_dir = dir;
    const RunResult sync = run_training(spec);
    spec.async = true;
    const RunResult async = run_training(spec);
    expect_same_run(sync, async, 2);
    std::filesystem::remove_all(dir);
  }
}

// ------------------------------------------------------------------------------- host waits

namespace {

// A CPU backend that counts the calls that make the host wait for a stream (synchronize).
// Everything else is forwarded; memory comes from the wrapped backend.
class WaitCountingBackend final : public Backend {
 public:
  explicit WaitCountingBackend(std::shared_ptr<ThreadPool> pool) {
    CpuBackendOptions o;
    o.pool = std::move(pool);
    inner_ = make_cpu_backend(o);
  }
  std::atomic<int> waits{0};

  BackendKind kind() const noexcept override { return inner_->kind(); }
  std::unique_ptr<Stream> create_stream(std::string name) override { return inner_->create_stream(std::move(name)); }
  std::unique_ptr<Event> create_event() override { return inner_->create_event(); }
  void record(Event& e, Stream& s) override { inner_->record(e, s); }
  void wait(Stream& s, Event& e) override { inner_->wait(s, e); }
  void synchronize(Event& e) override {
    ++waits;
    inner_->synchronize(e);
  }
  void synchronize(Stream& s) override {
    ++waits;
    inner_->synchronize(s);
  }
  void copy(void* d, const void* s, std::size_t n, Stream& st) override { inner_->copy(d, s, n, st); }
  void host_task(Stream& s, std::function<void()> fn) override { inner_->host_task(s, std::move(fn)); }
  void fill(void* d, DType t, std::size_t n, float v, Stream& s) override { inner_->fill(d, t, n, v, s); }
  void cast(const void* s, DType st, void* d, DType dt, std::size_t n, Stream& q) override {
    inner_->cast(s, st, d, dt, n, q);
  }
  void unscale_check(void* d, DType t, std::size_t n, const float* sc, float* f, Stream& s) override {
    inner_->unscale_check(d, t, n, sc, f, s);
  }
  void sum_squares(const void* d, DType t, std::size_t n, float* o, Stream& s) override {
    inner_->sum_squares(d, t, n, o, s);
  }
  void fused_update(const UpdateArgs& a, Stream& s) override { inner_->fused_update(a, s); }
  void accumulate(const void* s, DType t, float* d, std::size_t n, Stream& q) override {
    inner_->accumulate(s, t, d, n, q);
  }
  void reduce(const void* const* s, int ns, void* const* d, int nd, std::size_t n, DType t, ReduceOp op,
              Stream& q) override {
    inner_->reduce(s, ns, d, nd, n, t, op, q);
  }
  void step_totals(const float* p, std::size_t n, const float* f, float* t, Stream& s) override {
    inner_->step_totals(p, n, f, t, s);
  }
  void step_control(const StepControlArgs& a, Stream& s) override { inner_->step_control(a, s); }

 protected:
  void* raw_allocate(std::size_t bytes, Place place) override {
    Buffer b = inner_->allocate(bytes, place, Category::other, "wrapped");
    void* p = b.data();
    std::lock_guard<std::mutex> lock(m_);
    held_[p] = std::move(b);
    return p;
  }
  void raw_free(void* p, Place) noexcept override {
    std::lock_guard<std::mutex> lock(m_);
    held_.erase(p);
  }

 private:
  std::unique_ptr<Backend> inner_;
  std::mutex m_;
  std::map<void*, Buffer> held_;
};

}  // namespace

TEST(AsyncStep, NeverWaitsOnTheHostWithoutOffload) {
  for (InProcessTransport transport : {InProcessTransport::host_tasks, InProcessTransport::backend_kernels}) {
    for (int stage : {0, 1, 2, 3}) {
      SCOPED_TRACE("stage " + std::to_string(stage) + ", " + std::string(name_of(transport)));
      const int world = 2;
      auto pool = make_thread_pool(0);
      auto group = make_in_process_group(world, transport);
      std::vector<std::unique_ptr<WaitCountingBackend>> backends;
      std::vector<std::unique_ptr<Communicator>> comms;
      for (int r = 0; r < world; ++r) {
        backends.push_back(std::make_unique<WaitCountingBackend>(pool));
        comms.push_back(make_in_process_communicator(group, r, *backends.back()));
      }
      std::vector<int> async_waits(world, -1), step_waits(world, -1), offload_free(world, 0);
      std::vector<std::int64_t> steps(world, -1);
      const std::exception_ptr err = run_on_threads(world, [&](int r) {
        Config cfg = base_config(stage, DType::fp16, OptimizerKind::adamw);
        cfg.loss_scaling.mode = LossScaleMode::dynamic;
        cfg.max_grad_norm = 1.0f;
        Engine e(cfg, *backends[r], *comms[r]);
        for (const auto& b : awkward_model()) e.register_block(b);
        e.initialize(seeded_init(3));
        int in_async = 0;
        for (int s = 0; s < 3; ++s) {
          synthetic_micro_step(e, r, s, 0, 3, 1.0f, backends[r].get());
          const int before = backends[r]->waits.load();
          e.step_async();
          in_async += backends[r]->waits.load() - before;
        }
        async_waits[r] = in_async;
        steps[r] = e.last_result().step;
        // The synchronous step does wait: the counter can see a wait.
        synthetic_micro_step(e, r, 3, 0, 3, 1.0f, backends[r].get());
        const int before = backends[r]->waits.load();
        e.step();
        step_waits[r] = backends[r]->waits.load() - before;
      }, [&](int r) { abort_in_process_group(*group, "rank " + std::to_string(r) + " failed"); });
      if (err) std::rethrow_exception(err);
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(async_waits[r], 0) << "rank " << r << ": host waits inside step_async()";
        EXPECT_GT(step_waits[r], 0) << "rank " << r;
        EXPECT_EQ(steps[r], 3) << "rank " << r;
      }
    }
  }
}

// ------------------------------------------------------------------------------- the result

TEST(AsyncStep, LastResultBeforeAnyStepAndBeforeInitialize) {
  World w(1);
  Config cfg = base_config(1, DType::fp16, OptimizerKind::adamw);
  cfg.loss_scaling.mode = LossScaleMode::dynamic;
  cfg.loss_scaling.initial_scale = 128.0f;
  Engine e(cfg, *w.backends[0], *w.comms[0]);
  for (const auto& b : awkward_model()) e.register_block(b);
  EXPECT_THROW(e.last_result(), Error);
  EXPECT_THROW(e.loss_scale_buffer(), Error);
  EXPECT_THROW(e.step_async(), Error);
  e.initialize(seeded_init(1));
  const StepResult r = e.last_result();
  EXPECT_FALSE(r.applied);
  EXPECT_EQ(r.step, 0);
  EXPECT_EQ(r.loss_scale, 128.0f);
  EXPECT_EQ(*e.loss_scale_buffer(), 128.0f);  // CPU backend: host memory
  // step_async() with no micro-step done: the same error as step(), and the engine goes on.
  try {
    e.step_async();
    FAIL() << "step_async() before any micro-step must throw";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::invalid_state);
    EXPECT_NE(std::string(err.what()).find("0 of 1 micro-steps"), std::string::npos) << err.what();
  }
  synthetic_micro_step(e, 0, 0, 0, 1, 128.0f);
  e.step_async();
  const StepResult after = e.last_result();
  EXPECT_TRUE(after.applied);
  EXPECT_EQ(after.step, 1);
}

// save() right after step_async() (no last_result in between) records that step's state.
TEST(AsyncStep, SaveAfterAsyncStepsRecordsTheirState) {
  const std::string dir = ::testing::TempDir() + "shardopt_async_ckpt";
  std::filesystem::remove_all(dir);
  Config cfg = base_config(2, DType::fp16, OptimizerKind::adamw);
  cfg.loss_scaling.mode = LossScaleMode::dynamic;
  cfg.loss_scaling.initial_scale = 64.0f;
  cfg.loss_scaling.growth_interval = 2;
  StepResult saved;
  {
    World w(2);
    w.run([&](int r) {
      Engine e(cfg, *w.backends[r], *w.comms[r]);
      for (const auto& b : awkward_model()) e.register_block(b);
      e.initialize(seeded_init(5));
      for (int s = 0; s < 5; ++s) {
        synthetic_micro_step(e, r, s, 0, 5, s == 2 ? std::numeric_limits<float>::infinity() : 64.0f);
        e.step_async();
      }
      e.save(dir);
      if (r == 0) saved = e.last_result();
    });
  }
  // steps 0, 1 apply (scale 64 -> 128), 2 overflows (-> 64), 3, 4 apply (-> 128)
  EXPECT_EQ(saved.step, 4);
  EXPECT_EQ(saved.loss_scale, 128.0f);
  World w(1);
  Engine e(cfg, *w.backends[0], *w.comms[0]);
  for (const auto& b : awkward_model()) e.register_block(b);
  e.initialize(seeded_init(6));
  e.load(dir);
  const StepResult loaded = e.last_result();
  EXPECT_EQ(loaded.step, 4);
  EXPECT_EQ(loaded.loss_scale, 128.0f);
  EXPECT_EQ(*e.loss_scale_buffer(), 128.0f);
  std::filesystem::remove_all(dir);
}
