// What the engine does for a CUDA-graph capture, checked where the logic runs on the CPU backend:
//   - a capture begun before any eager step is refused with an Error, state untouched;
//   - stage 3: the first gather of an iteration is ordered after the work already enqueued on
//     compute_stream() (that join is what puts the gathers into a graph captured on it);
//   - initialize() reserves the communicator's reduction scratch for the largest reduction.
// The CPU backend never captures, so a thin wrapper around it says "capturing" on demand.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <string>
#include <vector>

#include "engine_harness.hpp"
#include "shardopt/error.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

// A CPU backend that reports capturing(compute stream) as the test says. Everything else is the
// inner CPU backend's (its streams and events), memory is plain aligned host memory.
class CaptureFlagBackend final : public Backend {
 public:
  std::atomic<bool> capture{false};
  std::unique_ptr<Backend> inner = make_cpu_backend();

  BackendKind kind() const noexcept override { return BackendKind::cpu; }
  std::unique_ptr<Stream> create_stream(std::string name) override { return inner->create_stream(std::move(name)); }
  std::unique_ptr<Event> create_event() override { return inner->create_event(); }
  void record(Event& e, Stream& s) override { inner->record(e, s); }
  void wait(Stream& s, Event& e) override { inner->wait(s, e); }
  void synchronize(Event& e) override { inner->synchronize(e); }
  void synchronize(Stream& s) override { inner->synchronize(s); }
  bool capturing(Stream&) override { return capture.load(); }
  void copy(void* d, const void* s, std::size_t n, Stream& st) override { inner->copy(d, s, n, st); }
  void host_task(Stream& s, std::function<void()> fn) override { inner->host_task(s, std::move(fn)); }
  void fill(void* d, DType t, std::size_t n, float v, Stream& s) override { inner->fill(d, t, n, v, s); }
  void cast(const void* src, DType st, void* dst, DType dt, std::size_t n, Stream& s) override {
    inner->cast(src, st, dst, dt, n, s);
  }
  void unscale_check(void* d, DType t, std::size_t n, const float* sc, float* f, Stream& s) override {
    inner->unscale_check(d, t, n, sc, f, s);
  }
  void sum_squares(const void* d, DType t, std::size_t n, float* out, Stream& s) override {
    inner->sum_squares(d, t, n, out, s);
  }
  void fused_update(const UpdateArgs& a, Stream& s) override { inner->fused_update(a, s); }
  void accumulate(const void* src, DType t, float* dst, std::size_t n, Stream& s) override {
    inner->accumulate(src, t, dst, n, s);
  }
  void reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n, DType t, ReduceOp op,
              Stream& s) override {
    inner->reduce(srcs, nsrc, dsts, ndst, n, t, op, s);
  }
  void step_totals(const float* p, std::size_t c, const float* f, float* t, Stream& s) override {
    inner->step_totals(p, c, f, t, s);
  }
  void step_control(const StepControlArgs& a, Stream& s) override { inner->step_control(a, s); }

 protected:
  void* raw_allocate(std::size_t bytes, Place) override { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); }
  void raw_free(void* p, Place) noexcept override { std::free(p); }
};

// A communicator that records reserve() and passes everything else to an in-process one.
class ReserveRecorder final : public Communicator {
 public:
  explicit ReserveRecorder(std::unique_ptr<Communicator> c) : inner(std::move(c)) {}
  std::unique_ptr<Communicator> inner;
  std::vector<std::pair<std::size_t, DType>> reserved;
  int rank() const noexcept override { return inner->rank(); }
  int size() const noexcept override { return inner->size(); }
  void reduce_scatter(const void* s, void* r, std::size_t n, DType t, ReduceOp op, Stream& st) override {
    inner->reduce_scatter(s, r, n, t, op, st);
  }
  void all_gather(const void* s, void* r, std::size_t n, DType t, Stream& st) override { inner->all_gather(s, r, n, t, st); }
  void all_reduce(const void* s, void* r, std::size_t n, DType t, ReduceOp op, Stream& st) override {
    inner->all_reduce(s, r, n, t, op, st);
  }
  void broadcast(const void* s, void* r, std::size_t n, DType t, int root, Stream& st) override {
    inner->broadcast(s, r, n, t, root, st);
  }
  void barrier(Stream& st) override { inner->barrier(st); }
  void reserve(std::size_t count, DType t) override { reserved.emplace_back(count, t); }
};

struct OneRank {
  CaptureFlagBackend be;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Engine> engine;
  explicit OneRank(int stage) {
    comm = make_in_process_communicator(make_in_process_group(1), 0, be);
    engine = std::make_unique<Engine>(base_config(stage, DType::bf16, OptimizerKind::adamw), be, *comm);
    for (const auto& b : awkward_model()) engine->register_block(b);
    engine->initialize(seeded_init(3));
  }
};

std::vector<float> masters(Engine& e) {
  std::vector<float> out;
  e.read_master([&](int, std::size_t, std::size_t n, const float* v) { out.insert(out.end(), v, v + n); });
  return out;
}

}  // namespace

TEST(Capture, BeforeAnyEagerStepIsRefusedAndChangesNothing) {
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    OneRank r(stage);
    Engine& e = *r.engine;
    const std::vector<float> before = masters(e);
    r.be.capture = true;
    try {
      (void)e.acquire(0);
      ADD_FAILURE() << "acquire accepted a capture before any eager step";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), ErrorCode::invalid_state) << err.what();
      EXPECT_NE(err.message().find("eager"), std::string::npos) << err.what();
    }
    r.be.capture = false;
    // Nothing was acquired: a whole eager iteration runs, and the capture after it is accepted.
    synthetic_micro_step(e, 0, 0, 0, 7, 1.0f);
    // The step itself refuses too, also when the capture began after the trainer's backward.
    r.be.capture = true;
    try {
      e.step_async();
      ADD_FAILURE() << "step_async accepted a capture before any eager step";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), ErrorCode::invalid_state) << err.what();
    }
    r.be.capture = false;
    EXPECT_EQ(masters(e), before) << "a refused capture changed the master weights";
    const StepResult first = e.step();
    EXPECT_EQ(first.step, 1);
    r.be.capture = true;  // warm: a "captured" iteration is accepted now
    synthetic_micro_step(e, 0, 1, 0, 7, 1.0f);
    e.step_async();
    r.be.capture = false;
    // After a captured step last_result() reads the state the step copied to host memory (on a
    // GPU: the copy each launch of the graph makes), every time it is asked.
    EXPECT_EQ(e.last_result().step, 2);
    EXPECT_EQ(e.last_result().step, 2);
  }
}

// Stage 3: a gather enqueued by the first acquire of an iteration runs after what the trainer
// enqueued on compute_stream() before it. (Inside a capture on compute_stream(), that join is what
// puts the gather into the graph; without it the gather would run eagerly, once, at capture time.)
TEST(Capture, Stage3FirstGatherOfAnIterationWaitsForComputeStream) {
  OneRank r(3);
  Engine& e = *r.engine;
  synthetic_micro_step(e, 0, 0, 0, 7, 1.0f);
  e.step_async();
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  r.be.host_task(e.compute_stream(), [open] { open.wait(); });  // compute is busy until the gate opens
  auto acquired = std::async(std::launch::async, [&] {
    e.acquire(0);
    e.release(0);
  });
  // The gather waits for the gated compute work, so acquire (which, on the CPU backend, waits for
  // its gather on the host) cannot finish before the gate opens.
  EXPECT_EQ(acquired.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout)
      << "the first gather of the iteration did not wait for work enqueued on compute_stream()";
  gate.set_value();
  acquired.get();
}

TEST(Capture, InitializeReservesTheLargestReduction) {
  for (int stage : {0, 1, 2, 3})
    for (DType r : {DType::bf16, DType::fp32}) {
      SCOPED_TRACE("stage " + std::to_string(stage) + " reduce " + std::string(name_of(r)));
      CaptureFlagBackend be;
      ReserveRecorder comm(make_in_process_communicator(make_in_process_group(1), 0, be));
      Config cfg = base_config(stage, DType::bf16, OptimizerKind::adamw);
      cfg.reduce_dtype = r;
      Engine e(cfg, be, comm);
      for (const auto& b : awkward_model()) e.register_block(b);
      e.initialize(seeded_init(1));
      std::size_t largest = 0;
      for (const auto& u : e.layout().units()) largest = std::max(largest, u.padded_elems);
      ASSERT_EQ(comm.reserved.size(), 1u);
      EXPECT_EQ(comm.reserved[0].first, largest);
      EXPECT_EQ(comm.reserved[0].second, r);
    }
}
