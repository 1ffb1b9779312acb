// Multi-process tests, run by CTest under `mpirun -np N` (N = 2, 3, 4).
//
// Every check compares an MPI run with an in-process run of the same world size done inside
// rank 0 (tests/engine_harness.hpp), bit for bit: the MPI communicator reduces in rank order in
// fp32 exactly like the in-process one, so any difference is a bug, not rounding.
// Results travel to rank 0 through the MPI bootstrap. main() combines every rank's verdict, so
// a failure on any rank fails the run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine_harness.hpp"
#include "pieces_check.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"
#include "shardopt/mpi.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

MpiSession* g_session = nullptr;
Bootstrap* g_boot = nullptr;

int my_rank() { return g_boot->rank(); }
int world() { return g_boot->world_size(); }

std::vector<std::byte> to_bytes(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  return {b, b + n};
}

// Deterministic input of rank r for a case: values exact in every dtype's range, signs mixed,
// a NaN now and then for max.
std::vector<unsigned char> make_input(int r, std::size_t n, DType t, std::uint64_t salt) {
  std::vector<unsigned char> buf(n * size_of(t));
  for (std::size_t i = 0; i < n; ++i) {
    float v = static_cast<float>((unit_uniform(mix64(salt) ^ mix64(r * 1000003ull + i)) - 0.5) * 8.0);
    if (i % 97 == 13 && r == 1) v = std::nanf("");
    store_from_float(buf.data(), t, i, v);
  }
  return buf;
}

// One round of every collective on `comm`, outputs appended to `out` in a fixed order.
void one_round(Communicator& comm, Backend& be, Stream& s, int r, int n, std::size_t count, DType t, ReduceOp op,
               std::vector<unsigned char>& out) {
  const std::size_t es = size_of(t);
  auto rs_in = make_input(r, count * static_cast<std::size_t>(n), t, 1);
  std::vector<unsigned char> rs_out(count * es);
  comm.reduce_scatter(rs_in.data(), rs_out.data(), count, t, op, s);
  auto rs_inplace = make_input(r, count * static_cast<std::size_t>(n), t, 2);  // recv = send + r*count
  comm.reduce_scatter(rs_inplace.data(), rs_inplace.data() + static_cast<std::size_t>(r) * count * es, count, t, op, s);
  auto ar = make_input(r, count + 5, t, 3);  // in place, count not divisible by the world
  comm.all_reduce(ar.data(), ar.data(), count + 5, t, op, s);
  auto ag_in = make_input(r, count, t, 4);
  std::vector<unsigned char> ag_out(count * es * static_cast<std::size_t>(n));
  comm.all_gather(ag_in.data(), ag_out.data(), count, t, s);
  auto bc = make_input(r, count + 1, t, 5);
  comm.broadcast(bc.data(), bc.data(), count + 1, t, n - 1, s);
  std::vector<unsigned char> empty;
  comm.all_reduce(nullptr, nullptr, 0, t, op, s);  // zero counts still synchronize
  comm.barrier(s);
  be.synchronize(s);
  for (auto* v : {&rs_out, &rs_inplace, &ar, &ag_out, &bc}) out.insert(out.end(), v->begin(), v->end());
}

class MpiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend = make_cpu_backend();
    comm = make_mpi_communicator(*backend);
    stream = backend->create_stream("test.r" + std::to_string(my_rank()));
  }
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Stream> stream;
};

TEST_F(MpiTest, BootstrapKnowsRankWorldAndMovesBytes) {
  EXPECT_EQ(g_boot->kind(), "mpi");
  EXPECT_EQ(g_boot->rank(), g_session->rank());
  EXPECT_EQ(g_boot->world_size(), g_session->size());
  EXPECT_GE(g_boot->local_rank(), 0);
  EXPECT_LT(g_boot->local_rank(), world());
  EXPECT_TRUE(g_session->thread_multiple());
  EXPECT_EQ(detect_launch().source, LaunchEnv::Source::mpi);
  const std::string hello = "from rank " + std::to_string(my_rank());
  auto all = g_boot->all_gather_bytes(to_bytes(hello.data(), hello.size()));
  ASSERT_EQ(static_cast<int>(all.size()), world());
  for (int q = 0; q < world(); ++q)
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(all[q].data()), all[q].size()), "from rank " + std::to_string(q));
  const std::string root_says = "root is " + std::to_string(world() - 1);
  auto got = g_boot->broadcast_bytes(my_rank() == world() - 1 ? to_bytes(root_says.data(), root_says.size()) : std::vector<std::byte>{}, world() - 1);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.data()), got.size()), root_says);
  EXPECT_EQ(comm->rank(), my_rank());
  EXPECT_EQ(comm->size(), world());
}

TEST_F(MpiTest, CollectivesMatchInProcessBitForBit) {
  const int n = world();
  for (DType t : {DType::fp32, DType::bf16, DType::fp16}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
      for (std::size_t count : {std::size_t(0), std::size_t(1), std::size_t(2500)}) {
        SCOPED_TRACE(std::string(name_of(t)) + " op " + std::to_string(int(op)) + " count " + std::to_string(count));
        std::vector<unsigned char> mine;
        one_round(*comm, *backend, *stream, my_rank(), n, count, t, op, mine);
        auto all = g_boot->all_gather_bytes(to_bytes(mine.data(), mine.size()));
        if (my_rank() != 0) continue;
        World w(n);
        std::vector<std::vector<unsigned char>> expect(static_cast<std::size_t>(n));
        w.run([&](int r) {
          auto s = w.backends[r]->create_stream("ref");
          one_round(*w.comms[r], *w.backends[r], *s, r, n, count, t, op, expect[r]);
        });
        for (int q = 0; q < n; ++q) {
          ASSERT_EQ(all[q].size(), expect[q].size()) << "rank " << q;
          EXPECT_EQ(std::memcmp(all[q].data(), expect[q].data(), expect[q].size()), 0) << "rank " << q << " differs from in-process";
        }
      }
    }
  }
  // Stats: the same accounting as the in-process communicator (counted at enqueue).
  comm->reset_stats();
  std::vector<float> x(8 * n, 1.0f), y(8);
  comm->reduce_scatter(x.data(), y.data(), 8, DType::fp32, ReduceOp::sum, *stream);
  comm->all_reduce(y.data(), y.data(), 8, DType::fp32, ReduceOp::sum, *stream);
  backend->synchronize(*stream);
  const CommStats st = comm->stats();
  EXPECT_EQ(st.calls[static_cast<int>(CollectiveKind::reduce_scatter)], 1u);
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::reduce_scatter)], 8u * 4u * static_cast<unsigned>(n));
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::all_reduce)], 2u * 8u * 4u);
  EXPECT_EQ(y[0], static_cast<float>(n * n));
}

// The pieces are packed before the exchange: the packed reduce_scatter's bits.
TEST_F(MpiTest, ReduceScatterPiecesEqualsThePackedReduceScatter) {
  EXPECT_EQ(shardopt::testing::reduce_scatter_pieces_mismatch(*comm, *backend, *stream), "");
}

// The synthetic trainer of run_training, one rank of it, over the given communicator; the
// masters, states and rank 0's parameters are gathered to rank 0 in the RunResult shape.
RunResult mpi_training(const RunSpec& spec, Communicator& comm, Backend& be) {
  const int rank = comm.rank();
  RunResult out;
  Engine e(spec.cfg, be, comm);
  for (const auto& b : spec.model) e.register_block(b);
  e.set_group(1, spec.group1);
  e.initialize(seeded_init(spec.seed));
  const Layout& L = e.layout();
  const int nblocks = static_cast<int>(L.blocks().size());
  const int ntensors = static_cast<int>(L.tensors().size());
  const DType c = spec.cfg.compute_dtype;
  std::vector<StepResult> results;
  for (int s = 0; s < spec.steps; ++s) {
    const float scale = results.empty() ? (spec.cfg.loss_scaling.mode == LossScaleMode::none ? 1.0f : spec.cfg.loss_scaling.initial_scale)
                                        : results.back().loss_scale;
    for (int micro = 0; micro < spec.cfg.accumulation_steps; ++micro)
      synthetic_micro_step(e, rank, s, micro, spec.seed, scale);
    results.push_back(e.step());
  }
  // Records: [which:int32][tensor:int32][begin:u64][count:u64][floats...]; which 0 master, 1-2 state, 3 params.
  std::vector<std::byte> rec;
  auto put = [&](int which, int t, std::size_t begin, std::size_t n, const float* v) {
    const std::int32_t hdr[2] = {which, t};
    const std::uint64_t bc[2] = {begin, n};
    auto a = to_bytes(hdr, sizeof hdr), b = to_bytes(bc, sizeof bc), d = to_bytes(v, n * sizeof(float));
    rec.insert(rec.end(), a.begin(), a.end());
    rec.insert(rec.end(), b.begin(), b.end());
    rec.insert(rec.end(), d.begin(), d.end());
  };
  e.read_master([&](int t, std::size_t b, std::size_t n, const float* v) { put(0, t, b, n, v); });
  for (int k = 0; k < state_count(spec.cfg.optimizer); ++k)
    e.read_state(k, [&](int t, std::size_t b, std::size_t n, const float* v) { put(1 + k, t, b, n, v); });
  for (int b = 0; b < nblocks; ++b) {
    BlockView v = e.acquire(b);
    if (rank == 0) {
      for (int i = 0; i < static_cast<int>(v.tensors.size()); ++i) {
        std::vector<float> f(v.tensors[i].numel);
        for (std::size_t k = 0; k < f.size(); ++k) f[k] = load_as_float(v.tensors[i].data, c, k);
        put(3, L.blocks()[b].first_tensor + i, 0, f.size(), f.data());
      }
    }
    e.release(b);
  }
  auto all = g_boot->all_gather_bytes(rec);
  out.master.resize(ntensors);
  out.state[0].resize(ntensors);
  out.state[1].resize(ntensors);
  out.params.resize(ntensors);
  out.coverage.resize(ntensors);
  for (int t = 0; t < ntensors; ++t) {
    const std::size_t n = L.tensors()[t].numel;
    out.master[t].assign(n, std::nanf(""));
    out.state[0][t].assign(n, std::nanf(""));
    out.state[1][t].assign(n, std::nanf(""));
    out.params[t].assign(n, std::nanf(""));
    out.coverage[t].assign(n, 0);
  }
  for (const auto& r : all) {
    std::size_t at = 0;
    while (at < r.size()) {
      std::int32_t hdr[2];
      std::uint64_t bc[2];
      std::memcpy(hdr, r.data() + at, sizeof hdr);
      std::memcpy(bc, r.data() + at + sizeof hdr, sizeof bc);
      at += sizeof hdr + sizeof bc;
      auto& dst = hdr[0] == 0 ? out.master : hdr[0] == 3 ? out.params : out.state[hdr[0] - 1];
      std::memcpy(dst[hdr[1]].data() + bc[0], r.data() + at, bc[1] * sizeof(float));
      if (hdr[0] == 0)
        for (std::size_t i = 0; i < bc[1]; ++i) out.coverage[hdr[1]][bc[0] + i]++;
      at += bc[1] * sizeof(float);
    }
  }
  out.results.push_back(results);
  return out;
}

struct EngineCase {
  int stage;
  DType dtype;
  OffloadKind offload = OffloadKind::none;
};

class MpiEngine : public MpiTest, public ::testing::WithParamInterface<EngineCase> {};

TEST_P(MpiEngine, FinalStateEqualsInProcessRunBitForBit) {
  const EngineCase ec = GetParam();
  RunSpec spec;
  spec.cfg = base_config(ec.stage, ec.dtype, OptimizerKind::adamw);
  spec.cfg.offload_optimizer = ec.offload;
  spec.cfg.max_grad_norm = 5.0f;  // the global-norm all-reduce takes part too
  spec.world = world();
  spec.steps = 4;
  spec.group1 = no_decay(spec.cfg);
  check_agreement(*g_boot, spec.cfg, spec.model);
  const RunResult got = mpi_training(spec, *comm, *backend);
  if (my_rank() != 0) return;
  const RunResult want = run_training(spec);
  ASSERT_EQ(got.master.size(), want.master.size());
  for (std::size_t t = 0; t < want.master.size(); ++t) {
    SCOPED_TRACE(want.tensor_names[t]);
    EXPECT_EQ(got.coverage[t], want.coverage[t]) << "ranks report the elements they own as in-process ranks do";
    EXPECT_TRUE(same_bits(got.master[t], want.master[t])) << "master differs from the in-process run";
    EXPECT_TRUE(same_bits(got.state[0][t], want.state[0][t])) << "first moment differs";
    EXPECT_TRUE(same_bits(got.state[1][t], want.state[1][t])) << "second moment differs";
    EXPECT_TRUE(same_bits(got.params[t], want.params[t])) << "parameters differ";
  }
  for (std::size_t s = 0; s < want.results[0].size(); ++s) {
    EXPECT_EQ(got.results[0][s].grad_norm, want.results[0][s].grad_norm) << "step " << s;
    EXPECT_EQ(got.results[0][s].applied, want.results[0][s].applied);
  }
}

INSTANTIATE_TEST_SUITE_P(Stages, MpiEngine,
                         ::testing::Values(EngineCase{0, DType::fp32}, EngineCase{1, DType::fp32}, EngineCase{2, DType::fp32},
                                           EngineCase{3, DType::fp32}, EngineCase{0, DType::bf16}, EngineCase{1, DType::bf16},
                                           EngineCase{2, DType::bf16}, EngineCase{3, DType::bf16}, EngineCase{2, DType::bf16, OffloadKind::host},
                                           EngineCase{3, DType::fp32, OffloadKind::host}),
                         [](const auto& param_info) {
                           return "stage" + std::to_string(param_info.param.stage) + "_" + std::string(name_of(param_info.param.dtype)) +
                                  (param_info.param.offload == OffloadKind::host ? "_offload" : "");
                         });

TEST_F(MpiTest, RankWithDifferentConfigFailsEveryRankWithinTimeout) {
  Config cfg = base_config(2, DType::bf16, OptimizerKind::adamw);
  if (my_rank() == world() - 1) cfg.stage = 3;  // one rank started with another setting
  const auto start = std::chrono::steady_clock::now();
  try {
    check_agreement(*g_boot, cfg, awkward_model());
    ADD_FAILURE() << "rank " << my_rank() << " accepted a configuration another rank does not share";
  } catch (const shardopt::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication);
    EXPECT_NE(e.message().find("disagree"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("rank " + std::to_string(world() - 1)), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("stage=3"), std::string::npos) << e.message();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  // A model that differs (one tensor's shape) is caught too; the same config passes.
  Config same = base_config(2, DType::bf16, OptimizerKind::adamw);
  auto model = awkward_model();
  EXPECT_NO_THROW(check_agreement(*g_boot, same, model));
  if (my_rank() == 0) model[1].tensors[0].shape = {24, 36};
  EXPECT_THROW(check_agreement(*g_boot, same, model), shardopt::Error);
  // An invalid config on one rank fails every rank, not only that one.
  Config bad = same;
  if (my_rank() == 0) bad.stage = 7;
  EXPECT_THROW(check_agreement(*g_boot, bad, awkward_model()), shardopt::Error);
}

TEST_F(MpiTest, DisagreeingCollectiveFailsEveryRankInsteadOfHanging) {
  std::vector<float> a(world() * 8, 1.0f), b(8);
  const std::size_t count = my_rank() == 0 ? 7 : 8;
  comm->reduce_scatter(a.data(), b.data(), count, DType::fp32, ReduceOp::sum, *stream);
  try {
    backend->synchronize(*stream);
    ADD_FAILURE() << "mismatched counts went through";
  } catch (const shardopt::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication);
    EXPECT_NE(e.message().find("disagree"), std::string::npos) << e.message();
  }
  // The communicator is now aborted: later collectives fail on every rank, promptly.
  comm->barrier(*stream);
  EXPECT_THROW(backend->synchronize(*stream), shardopt::Error);
  // A fresh communicator works.
  auto fresh = make_mpi_communicator(*backend);
  std::vector<float> x(1, 1.0f);
  fresh->all_reduce(x.data(), x.data(), 1, DType::fp32, ReduceOp::sum, *stream);
  backend->synchronize(*stream);
  EXPECT_EQ(x[0], static_cast<float>(world()));
}

TEST_F(MpiTest, RefusedArgumentOnOneRankFailsThePeers) {
  std::vector<float> a(world() * 4, 1.0f), b(4);
  if (my_rank() == 0) {
    // The refusal is reported here, at the call; the stream then tells the peers.
    EXPECT_THROW(comm->reduce_scatter(nullptr, b.data(), 4, DType::fp32, ReduceOp::sum, *stream), shardopt::Error);
    EXPECT_NO_THROW(backend->synchronize(*stream));
  } else {
    comm->reduce_scatter(a.data(), b.data(), 4, DType::fp32, ReduceOp::sum, *stream);
    EXPECT_THROW(backend->synchronize(*stream), shardopt::Error);
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int rc = 1;
  {
    MpiSession session(&argc, &argv);
    auto boot = make_mpi_bootstrap();
    g_session = &session;
    g_boot = boot.get();
    // Only rank 0 prints the per-test lines; every rank prints failures (the default printer
    // does both, so the others get a listener that prints failures only).
    if (session.rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      struct Failures : ::testing::EmptyTestEventListener {
        int rank;
        explicit Failures(int r) : rank(r) {}
        void OnTestPartResult(const ::testing::TestPartResult& r) override {
          if (r.failed()) std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank, r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
        }
      };
      listeners.Append(new Failures(session.rank()));
    }
    const int mine = RUN_ALL_TESTS();
    int worst = 0;
    MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    rc = worst;
    if (session.rank() == 0) std::printf("mpi tests over %d ranks: %s\n", session.size(), worst == 0 ? "PASSED on every rank" : "FAILED on some rank");
    g_boot = nullptr;
  }
  return rc;
}
