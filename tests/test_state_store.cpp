// The state store on its own (with only the engine context below it): values written by field
// and state offset read back unchanged, a range outside the store is refused with the store left
// as it was, and with fp32 parameters field 0 is the parameter memory itself.
#include <gtest/gtest.h>

#include <vector>

#include "engine/context.hpp"
#include "engine/state_store.hpp"
#include "shardopt/error.hpp"

namespace {

using namespace shardopt;

struct Fixture {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::shared_ptr<InProcessGroup> group = make_in_process_group(2);
  // Rank 1 of 2: its shard starts past rank 0's slices, so offsets are not trivially unit offsets.
  std::unique_ptr<Communicator> comm = make_in_process_communicator(group, 1, *backend);
  detail::EnginePlan plan;
  std::unique_ptr<detail::EngineContext> ctx;

  explicit Fixture(DType compute) {
    Config cfg;
    cfg.stage = 1;
    cfg.compute_dtype = compute;
    cfg.reduce_dtype = compute;
    cfg.alignment = 4;
    cfg.bucket_bytes = size_of(compute);  // every block its own unit
    std::vector<BlockSpec> blocks = {{"b0", {{"w0", {10}}}}, {"b1", {{"w1", {3}}, {"v1", {6}}}}};
    ctx = std::make_unique<detail::EngineContext>(cfg, *backend, *comm);
    plan = detail::plan_engine(cfg, blocks, 2);
    ctx->plan(plan);
  }
};

std::vector<float> pattern(std::size_t n, float base) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = base + 0.25f * static_cast<float>(i);
  return v;
}

TEST(StateStore, RoundTripByFieldAndOffsetAndRefusesOutOfRange) {
  Fixture f(DType::bf16);
  auto store = detail::make_state_store(*f.ctx, f.plan.buffers, {});
  ASSERT_EQ(store->fields(), 3);  // master and AdamW's two moments
  const std::size_t n = store->elems();
  ASSERT_EQ(n, f.ctx->layout.shard_elems());
  ASSERT_GT(n, 2u);
  for (int field = 0; field < 3; ++field) {
    const std::vector<float> v = pattern(n, 100.0f * static_cast<float>(field + 1));
    store->write(field, 0, n, v.data());
  }
  for (int field = 0; field < 3; ++field) {
    std::vector<float> back(n, -1.0f);
    store->read(field, 0, n, back.data());
    EXPECT_EQ(back, pattern(n, 100.0f * static_cast<float>(field + 1))) << "field " << field;
    // The device tier is addressable (host memory on the CPU backend): the same values.
    EXPECT_EQ(store->address(field, 2)[0], back[2]);
  }
  // A part of a field: only those elements change.
  const float two[2] = {-7.0f, -8.0f};
  store->write(2, 1, 2, two);
  std::vector<float> back(n);
  store->read(2, 0, n, back.data());
  std::vector<float> want = pattern(n, 300.0f);
  want[1] = -7.0f;
  want[2] = -8.0f;
  EXPECT_EQ(back, want);
  // Outside the store: an error, nothing written.
  const std::vector<float> junk(n + 1, 9.0f);
  EXPECT_THROW(store->write(3, 0, 1, junk.data()), Error);
  EXPECT_THROW(store->write(-1, 0, 1, junk.data()), Error);
  EXPECT_THROW(store->write(0, n - 1, 2, junk.data()), Error);
  EXPECT_THROW(store->read(1, n + 1, 0, back.data()), Error);
  store->read(0, 0, n, back.data());
  EXPECT_EQ(back, pattern(n, 100.0f));
  store->release();
}

TEST(StateStore, Fp32MasterIsTheParameterMemory) {
  Fixture f(DType::fp32);
  ASSERT_TRUE(f.ctx->placement.master_is_params);
  const auto& units = f.ctx->layout.units();
  ASSERT_EQ(units.size(), 2u);
  // Stand-in parameter memory: where each unit's owned run starts (as the gatherer would give).
  std::vector<float> params(f.ctx->full_elems, 0.0f);
  detail::MasterAlias alias;
  for (int u = 0; u < 2; ++u)
    alias.push_back({f.ctx->state_offset(u, f.ctx->owned_begin(u)), params.data() + f.ctx->full_offset(u, f.ctx->owned_begin(u))});
  auto store = detail::make_state_store(*f.ctx, f.plan.buffers, alias);
  const std::size_t n = store->elems();
  const std::vector<float> v = pattern(n, 1.0f);
  store->write(0, 0, n, v.data());
  // Every owned element of every unit went to its place in the full parameters (rank 1's slice).
  std::size_t k = 0;
  for (int u = 0; u < 2; ++u) {
    for (std::size_t e = f.ctx->owned_begin(u); e < f.ctx->owned_end(u); ++e, ++k) {
      EXPECT_EQ(params[f.ctx->full_offset(u, e)], v[f.ctx->state_offset(u, e)]) << "unit " << u << " element " << e;
      EXPECT_EQ(store->address(0, f.ctx->state_offset(u, e)), &params[f.ctx->full_offset(u, e)]);
    }
  }
  EXPECT_EQ(k, n);
  // Rank 0's slices are untouched.
  for (int u = 0; u < 2; ++u)
    for (std::size_t e = 0; e < f.ctx->owned_begin(u); ++e) EXPECT_EQ(params[f.ctx->full_offset(u, e)], 0.0f);
  store->release();
}

}  // namespace
