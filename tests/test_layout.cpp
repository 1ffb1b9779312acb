// Layout property tests. The oracle is the contract in layout.hpp restated here: every data
// element is owned by exactly one (rank, shard offset), slices are equal and aligned, units end
// at the first block boundary past a bucket. Expected values are computed by the test from the
// specs it built, never read back from the layout under test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "shardopt/error.hpp"
#include "shardopt/layout.hpp"
#include "sanitized.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/engine.hpp"
#include <mutex>
#include <thread>

namespace {

using shardopt::BlockSpec;
using shardopt::Error;
using shardopt::ErrorCode;
using shardopt::Layout;
using shardopt::LayoutOptions;
using shardopt::TensorSpec;

std::size_t ref_numel(const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (std::int64_t e : shape) n *= static_cast<std::size_t>(e);
  return n;
}
std::size_t up(std::size_t x, std::size_t m) { return (x + m - 1) / m * m; }

std::string describe(const LayoutOptions& o) {
  return "world " + std::to_string(o.world_size) + " align " + std::to_string(o.alignment) + " bucket " +
         std::to_string(o.bucket_elems);
}

// Checks every documented property of `L` built from `specs` with `o`. With `elementwise`, also
// builds the explicit ownership map of every data element and locates each one.
void check_layout(const std::vector<BlockSpec>& specs, const LayoutOptions& o, const Layout& L, bool elementwise) {
  SCOPED_TRACE(describe(o));
  const std::size_t W = static_cast<std::size_t>(o.world_size);
  const std::size_t A = o.alignment;

  // Tensors and blocks: registration order, names, shapes, element counts.
  ASSERT_EQ(L.blocks().size(), specs.size());
  std::size_t total = 0, ti = 0;
  for (std::size_t b = 0; b < specs.size(); ++b) {
    const auto& bi = L.blocks()[b];
    ASSERT_EQ(bi.name, specs[b].name);
    ASSERT_EQ(bi.first_tensor, static_cast<int>(ti));
    ASSERT_EQ(bi.tensor_count, static_cast<int>(specs[b].tensors.size()));
    EXPECT_EQ(L.find_block(specs[b].name), static_cast<int>(b));
    for (const TensorSpec& ts : specs[b].tensors) {
      ASSERT_LT(ti, L.tensors().size());
      const auto& t = L.tensors()[ti];
      EXPECT_EQ(t.name, ts.name);
      EXPECT_EQ(t.shape, ts.shape);
      EXPECT_EQ(t.group, ts.group);
      EXPECT_EQ(t.numel, ref_numel(ts.shape)) << ts.name;
      EXPECT_EQ(t.block, static_cast<int>(b));
      EXPECT_EQ(t.unit, bi.unit) << ts.name;
      EXPECT_EQ(L.find_tensor(ts.name), static_cast<int>(ti));
      total += ref_numel(ts.shape);
      ++ti;
    }
  }
  ASSERT_EQ(L.tensors().size(), ti);
  EXPECT_EQ(L.total_numel(), total);
  EXPECT_EQ(L.find_tensor("no such tensor"), -1);
  EXPECT_EQ(L.find_block("no such block"), -1);
  EXPECT_EQ(L.world_size(), o.world_size);

  // Units: consecutive block ranges covering every block once, in order.
  const auto& units = L.units();
  if (specs.empty()) {
    EXPECT_TRUE(units.empty());
  }
  int next_block = 0;
  std::size_t shard = 0, max_padded = 0;
  for (std::size_t u = 0; u < units.size(); ++u) {
    SCOPED_TRACE("unit " + std::to_string(u));
    const auto& U = units[u];
    ASSERT_EQ(U.first_block, next_block);
    ASSERT_GE(U.block_count, 1);
    next_block += U.block_count;
    // Packing from the spec: tensors one after another in registration order, each non-empty one
    // at the first multiple of A at or past the previous end; grouping: the unit ends at the first
    // block boundary where its data reaches the bucket.
    std::size_t end = 0;
    for (int b = U.first_block; b < U.first_block + U.block_count; ++b) {
      ASSERT_EQ(L.blocks()[static_cast<std::size_t>(b)].unit, static_cast<int>(u));
      // Before this block closed, the unit must not already have been a full bucket.
      EXPECT_LT(end, b == U.first_block ? std::numeric_limits<std::size_t>::max() : o.bucket_elems)
          << "unit should have ended before block " << b;
      const auto& B = L.blocks()[static_cast<std::size_t>(b)];
      for (int t = B.first_tensor; t < B.first_tensor + B.tensor_count; ++t) {
        const auto& T = L.tensors()[static_cast<std::size_t>(t)];
        EXPECT_EQ(T.unit_offset % A, 0u) << T.name << " start not aligned";
        if (T.numel == 0) {
          EXPECT_GE(T.unit_offset, end) << T.name;  // never placed inside another tensor
        } else {
          EXPECT_EQ(T.unit_offset, up(end, A)) << T.name << " not packed";
          end = T.unit_offset + T.numel;
        }
      }
    }
    EXPECT_EQ(U.data_elems, end);
    if (u + 1 < units.size()) {
      EXPECT_GE(U.data_elems, o.bucket_elems) << "unit smaller than a bucket";
    }
    EXPECT_EQ(U.padded_elems, up(U.data_elems, W * A));
    EXPECT_EQ(U.slice_elems * W, U.padded_elems);
    EXPECT_EQ(U.slice_elems % A, 0u);
    EXPECT_EQ(U.shard_offset, shard);
    for (int b = U.first_block; b < U.first_block + U.block_count; ++b) {
      const auto& B = L.blocks()[static_cast<std::size_t>(b)];
      for (int t = B.first_tensor; t < B.first_tensor + B.tensor_count; ++t) {
        const auto& T = L.tensors()[static_cast<std::size_t>(t)];
        EXPECT_LE(T.unit_offset + T.numel, U.padded_elems) << T.name;
      }
    }
    shard += U.slice_elems;
    max_padded = std::max(max_padded, U.padded_elems);
  }
  EXPECT_EQ(next_block, static_cast<int>(specs.size()));
  EXPECT_EQ(L.shard_elems(), shard);
  EXPECT_EQ(L.max_unit_elems(), max_padded);

  // Pieces: per rank, in shard order, no overlap, inside the unit's slice, consistent with the
  // tensor's place in the unit; each tensor at most once per rank (a tensor lives in one unit).
  std::vector<std::vector<std::int32_t>> owner;  // owner[t][e] = rank, -1 if unowned
  std::vector<std::vector<std::size_t>> owner_off;
  if (elementwise) {
    owner.resize(L.tensors().size());
    owner_off.resize(L.tensors().size());
    for (std::size_t t = 0; t < L.tensors().size(); ++t) {
      owner[t].assign(L.tensors()[t].numel, -1);
      owner_off[t].assign(L.tensors()[t].numel, 0);
    }
  }
  std::size_t covered = 0;
  for (int r = 0; r < o.world_size; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const auto ps = L.pieces(r);
    std::vector<Layout::Piece> concat;
    for (std::size_t u = 0; u < units.size(); ++u) {
      const auto part = L.pieces(r, static_cast<int>(u));
      const auto& U = units[u];
      for (const auto& p : part) {
        ASSERT_GE(p.tensor, 0);
        ASSERT_LT(static_cast<std::size_t>(p.tensor), L.tensors().size());
        const auto& T = L.tensors()[static_cast<std::size_t>(p.tensor)];
        EXPECT_EQ(T.unit, static_cast<int>(u));
        ASSERT_GT(p.count, 0u);
        ASSERT_LE(p.tensor_offset + p.count, T.numel) << T.name;
        ASSERT_GE(p.shard_offset, U.shard_offset);
        ASSERT_LE(p.shard_offset + p.count, U.shard_offset + U.slice_elems) << T.name << " piece leaves the slice";
        // Where the piece sits in the unit, seen from the slice and from the tensor: must agree.
        const std::size_t from_slice = static_cast<std::size_t>(r) * U.slice_elems + (p.shard_offset - U.shard_offset);
        EXPECT_EQ(from_slice, T.unit_offset + p.tensor_offset) << T.name;
      }
      concat.insert(concat.end(), part.begin(), part.end());
    }
    ASSERT_EQ(concat.size(), ps.size());
    std::vector<int> seen(L.tensors().size(), 0);
    for (std::size_t i = 0; i < ps.size(); ++i) {
      EXPECT_EQ(ps[i].tensor, concat[i].tensor);
      EXPECT_EQ(ps[i].tensor_offset, concat[i].tensor_offset);
      EXPECT_EQ(ps[i].count, concat[i].count);
      EXPECT_EQ(ps[i].shard_offset, concat[i].shard_offset);
      if (i > 0) {
        EXPECT_GE(ps[i].shard_offset, ps[i - 1].shard_offset + ps[i - 1].count) << "pieces overlap";
      }
      EXPECT_LE(ps[i].shard_offset + ps[i].count, L.shard_elems());
      EXPECT_EQ(++seen[static_cast<std::size_t>(ps[i].tensor)], 1) << "tensor split into two pieces on one rank";
      covered += ps[i].count;
      if (elementwise) {
        const auto t = static_cast<std::size_t>(ps[i].tensor);
        for (std::size_t k = 0; k < ps[i].count; ++k) {
          auto& slot = owner[t][ps[i].tensor_offset + k];
          ASSERT_EQ(slot, -1) << L.tensors()[t].name << " element " << ps[i].tensor_offset + k << " owned twice";
          slot = r;
          owner_off[t][ps[i].tensor_offset + k] = ps[i].shard_offset + k;
        }
      }
    }
  }
  EXPECT_EQ(covered, total) << "pieces do not cover the data exactly once";

  if (elementwise) {
    for (std::size_t t = 0; t < L.tensors().size(); ++t) {
      const auto& T = L.tensors()[t];
      for (std::size_t e = 0; e < T.numel; ++e) {
        ASSERT_NE(owner[t][e], -1) << T.name << " element " << e << " unowned";
        const auto loc = L.locate(static_cast<int>(t), e);
        ASSERT_EQ(loc.rank, owner[t][e]) << T.name << " element " << e;
        ASSERT_EQ(loc.shard_offset, owner_off[t][e]) << T.name << " element " << e;
        ASSERT_EQ(loc.unit, T.unit);
        ASSERT_EQ(loc.unit_offset, T.unit_offset + e);
      }
      EXPECT_THROW((void)L.locate(static_cast<int>(t), T.numel), Error) << T.name;
    }
  }
}

std::vector<std::int64_t> random_shape(std::mt19937& rng) {
  std::uniform_int_distribution<int> kind(0, 19);
  const int k = kind(rng);
  if (k == 0) return {};                                           // scalar
  if (k == 1) return {std::uniform_int_distribution<int>(0, 3)(rng), 0, 5};  // a zero extent
  if (k == 2) return {std::uniform_int_distribution<std::int64_t>(100, 2500)(rng)};  // bigger than many buckets
  const int rank = std::uniform_int_distribution<int>(1, 3)(rng);
  std::vector<std::int64_t> s;
  for (int i = 0; i < rank; ++i) s.push_back(std::uniform_int_distribution<std::int64_t>(1, 9)(rng));
  return s;
}

std::vector<BlockSpec> random_model(std::mt19937& rng) {
  std::vector<BlockSpec> blocks(std::uniform_int_distribution<std::size_t>(0, 10)(rng));
  int id = 0;
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    blocks[b].name = "block" + std::to_string(b);
    const int n = std::uniform_int_distribution<int>(0, 5)(rng);
    for (int t = 0; t < n; ++t)
      blocks[b].tensors.push_back({"b" + std::to_string(b) + ".t" + std::to_string(id++), random_shape(rng),
                                   std::uniform_int_distribution<int>(0, 2)(rng)});
  }
  return blocks;
}

Layout build_checked(const std::vector<BlockSpec>& blocks, const LayoutOptions& o) {
  Layout L = Layout::build(blocks, o);
  // Pure arithmetic: building again gives the same answer.
  const Layout again = Layout::build(blocks, o);
  EXPECT_EQ(again.shard_elems(), L.shard_elems());
  EXPECT_EQ(again.units().size(), L.units().size());
  return L;
}

constexpr std::size_t kAlignments[] = {1, 2, 3, 8, 64};

TEST(Layout, RandomModelsAllWorldSizesAlignmentsBuckets) {
  std::mt19937 rng(20240611u);
  const int iterations = shardopt::testing::kSanitized ? 30 : 120;
  for (int iter = 0; iter < iterations; ++iter) {
    const auto blocks = random_model(rng);
    for (int w = 1; w <= 8; ++w) {
      for (std::size_t a : kAlignments) {
        for (std::size_t bucket : {std::size_t(1), std::size_t(7), std::size_t(100), std::size_t(1000),
                                   std::size_t(1) << 40}) {
          const LayoutOptions o{w, a, bucket};
          const Layout L = build_checked(blocks, o);
          check_layout(blocks, o, L, /*elementwise=*/(iter % 4 == 0));
          if (::testing::Test::HasFatalFailure() || ::testing::Test::HasNonfatalFailure()) {
            FAIL() << "iteration " << iter << " " << describe(o);
          }
        }
      }
    }
  }
}

TEST(Layout, ManyTinyTensors) {
  // 1000 tiny tensors, both in one block and in 1000 blocks.
  std::vector<BlockSpec> one(1), many(1000);
  one[0].name = "all";
  for (int i = 0; i < 1000; ++i) {
    const std::int64_t n = 1 + i % 3;
    one[0].tensors.push_back({"t" + std::to_string(i), {n}, 0});
    many[static_cast<std::size_t>(i)].name = "blk" + std::to_string(i);
    many[static_cast<std::size_t>(i)].tensors.push_back({"t" + std::to_string(i), {n}, 0});
  }
  for (int w : {1, 3, 8}) {
    for (std::size_t a : kAlignments) {
      for (std::size_t bucket : {std::size_t(1), std::size_t(64), std::size_t(5000)}) {
        const LayoutOptions o{w, a, bucket};
        check_layout(one, o, build_checked(one, o), true);
        check_layout(many, o, build_checked(many, o), true);
      }
    }
  }
  // One block can never be split: a single unit however small the bucket.
  EXPECT_EQ(Layout::build(one, {4, 8, 1}).units().size(), 1u);
  // bucket 1: every non-empty block closes its own unit.
  EXPECT_EQ(Layout::build(many, {4, 8, 1}).units().size(), 1000u);
}

TEST(Layout, HandComputedExample) {
  // world 2, alignment 4, bucket 10:
  //   unit 0: block a: x[3] at 0..3, y[5] at 4..9 -> data 9 < 10, continue; block b: z[2] at 12..14
  //           -> data 14 >= 10, close. padded = 16, slice 8: rank 0 owns 0..7, rank 1 owns 8..15.
  //   unit 1: block c: w[] (scalar) at 0 -> data 1; padded 8, slice 4.
  std::vector<BlockSpec> blocks = {
      {"a", {{"x", {3}, 0}, {"y", {5}, 1}}},
      {"b", {{"z", {2, 1}, 0}}},
      {"c", {{"w", {}, 0}}},
  };
  const Layout L = Layout::build(blocks, {2, 4, 10});
  ASSERT_EQ(L.units().size(), 2u);
  EXPECT_EQ(L.units()[0].data_elems, 14u);
  EXPECT_EQ(L.units()[0].padded_elems, 16u);
  EXPECT_EQ(L.units()[0].slice_elems, 8u);
  EXPECT_EQ(L.units()[1].data_elems, 1u);
  EXPECT_EQ(L.units()[1].padded_elems, 8u);
  EXPECT_EQ(L.units()[1].shard_offset, 8u);
  EXPECT_EQ(L.shard_elems(), 12u);
  EXPECT_EQ(L.total_numel(), 11u);
  EXPECT_EQ(L.tensors()[2].unit_offset, 12u);
  // rank 0: x[0..3) at 0, y[0..4) at 4 (y spans unit offsets 4..8, first four on rank 0), w at 8.
  const auto r0 = L.pieces(0);
  ASSERT_EQ(r0.size(), 3u);
  EXPECT_EQ(r0[0].tensor, 0);
  EXPECT_EQ(r0[0].count, 3u);
  EXPECT_EQ(r0[0].shard_offset, 0u);
  EXPECT_EQ(r0[1].tensor, 1);
  EXPECT_EQ(r0[1].tensor_offset, 0u);
  EXPECT_EQ(r0[1].count, 4u);
  EXPECT_EQ(r0[1].shard_offset, 4u);
  EXPECT_EQ(r0[2].tensor, 3);
  EXPECT_EQ(r0[2].shard_offset, 8u);
  // rank 1: y[4] at 0, z[0..2) at 4; nothing in unit 1.
  const auto r1 = L.pieces(1);
  ASSERT_EQ(r1.size(), 2u);
  EXPECT_EQ(r1[0].tensor, 1);
  EXPECT_EQ(r1[0].tensor_offset, 4u);
  EXPECT_EQ(r1[0].count, 1u);
  EXPECT_EQ(r1[0].shard_offset, 0u);
  EXPECT_EQ(r1[1].tensor, 2);
  EXPECT_EQ(r1[1].count, 2u);
  EXPECT_EQ(r1[1].shard_offset, 4u);
  EXPECT_TRUE(L.pieces(1, 1).empty());
  const auto loc = L.locate(1, 4);
  EXPECT_EQ(loc.rank, 1);
  EXPECT_EQ(loc.unit, 0);
  EXPECT_EQ(loc.unit_offset, 8u);
  EXPECT_EQ(loc.shard_offset, 0u);
  EXPECT_EQ(L.max_unit_elems(), 16u);
  check_layout(blocks, {2, 4, 10}, L, true);
}

TEST(Layout, EdgeShapes) {
  const std::vector<std::vector<BlockSpec>> models = {
      {},                                                             // nothing registered
      {{"empty", {}}},                                                // a block with no tensors
      {{"zeros", {{"z0", {0}, 0}, {"z1", {4, 0}, 0}}}},              // only 0-element tensors
      {{"s", {{"scalar", {}, 0}}}},                                   // one scalar
      {{"small", {{"three", {3}, 0}}}},                               // fewer elements than ranks
      {{"big", {{"huge", {5000}, 0}}}, {"after", {{"tail", {1}, 0}}}},  // larger than a bucket
      {{"a", {{"e0", {0}, 0}, {"x", {5}, 0}, {"e1", {0}, 0}}}, {"b", {}}, {"c", {{"e2", {2, 0}, 0}}}},
  };
  for (const auto& m : models) {
    for (int w = 1; w <= 8; ++w)
      for (std::size_t a : kAlignments)
        for (std::size_t bucket : {std::size_t(1), std::size_t(64)}) check_layout(m, {w, a, bucket}, build_checked(m, {w, a, bucket}), true);
  }
  // Zero-element units: every rank gets an empty slice, no pieces, no shard.
  const Layout z = Layout::build(models[2], {4, 8, 16});
  ASSERT_EQ(z.units().size(), 1u);
  EXPECT_EQ(z.units()[0].padded_elems, 0u);
  EXPECT_EQ(z.units()[0].slice_elems, 0u);
  EXPECT_EQ(z.shard_elems(), 0u);
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(z.pieces(r).empty());
  EXPECT_THROW((void)z.locate(0, 0), Error);
  // A tensor larger than a bucket fills its own unit, then the next block starts a new one.
  const Layout big = Layout::build(models[5], {3, 8, 100});
  ASSERT_EQ(big.units().size(), 2u);
  EXPECT_EQ(big.units()[0].data_elems, 5000u);
  EXPECT_EQ(big.units()[0].padded_elems, 5016u);  // next multiple of 24
  // Fewer elements than ranks: ranks 0..2 own one element each, the others own padding only.
  const Layout small = Layout::build(models[4], {8, 1, 1});
  EXPECT_EQ(small.units()[0].slice_elems, 1u);
  EXPECT_EQ(small.pieces(0).size(), 1u);
  EXPECT_EQ(small.pieces(2).size(), 1u);
  EXPECT_TRUE(small.pieces(3).empty());
  EXPECT_EQ(small.locate(0, 2).rank, 2);
}

// ---- errors ---------------------------------------------------------------------------------

// Runs `f`, expects an Error with `code` whose message contains every string in `names`.
template <class F>
void expect_error(F&& f, ErrorCode code, std::initializer_list<std::string> names) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& n : names) EXPECT_NE(e.message().find(n), std::string::npos) << "'" << n << "' not in: " << e.message();
  }
}

TEST(Layout, BadOptions) {
  const std::vector<BlockSpec> m = {{"b", {{"t", {4}, 0}}}};
  expect_error([&] { (void)Layout::build(m, {0, 8, 1}); }, ErrorCode::invalid_argument, {"world_size"});
  expect_error([&] { (void)Layout::build(m, {-3, 8, 1}); }, ErrorCode::invalid_argument, {"world_size", "-3"});
  expect_error([&] { (void)Layout::build(m, {2, 0, 1}); }, ErrorCode::invalid_argument, {"alignment"});
  expect_error([&] { (void)Layout::build(m, {2, 8, 0}); }, ErrorCode::invalid_argument, {"bucket_elems"});
}

TEST(Layout, BadSpecsNameTheCulprit) {
  expect_error([] { (void)Layout::build({{"b0", {{"w", {3}, 0}}}, {"b1", {{"w", {2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"duplicate", "'w'", "b0", "b1"});
  expect_error([] { (void)Layout::build({{"b0", {{"w", {3}, 0}, {"w", {2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"duplicate", "'w'"});
  expect_error([] { (void)Layout::build({{"layer", {{"a", {3}, 0}}}, {"layer", {{"b", {2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"duplicate block", "layer"});
  expect_error([] { (void)Layout::build({{"layer7", {{"a", {3}, 0}, {"", {2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"empty tensor name", "layer7"});
  expect_error([] { (void)Layout::build({{"b", {{"proj.weight", {4, -2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"proj.weight", "-2"});
  // A negative extent after a zero one is still an error, not an empty tensor.
  expect_error([] { (void)Layout::build({{"b", {{"bias", {0, -1}, 0}}}}, {}); }, ErrorCode::invalid_argument,
               {"bias", "-1"});
}

TEST(Layout, OverflowIsAnError) {
  const std::int64_t half = std::int64_t(1) << 62;
  // Each tensor alone fits in size_t (2^63 elements); together they do not.
  expect_error([&] { (void)Layout::build({{"b", {{"p", {half, 2}, 0}, {"q", {half, 2}, 0}}}}, {}); },
               ErrorCode::invalid_argument, {"q"});
  // The product itself overflows.
  expect_error([&] { (void)Layout::build({{"b", {{"r", {half, 8}, 0}}}}, {}); }, ErrorCode::invalid_argument,
               {"r"});
  const std::int64_t max = std::numeric_limits<std::int64_t>::max();
  // Padding the unit overflows: 2^64 - 2 elements fit, their next multiple of 8 does not.
  expect_error([&] { (void)Layout::build({{"b", {{"s", {max, 2}, 0}}}}, {1, 8, 1}); }, ErrorCode::invalid_argument,
               {"overflow"});
}

TEST(Layout, OutOfRangeQueries) {
  const Layout L = Layout::build({{"b", {{"t", {10}, 0}}}}, {2, 1, 1});
  EXPECT_THROW((void)L.locate(-1, 0), Error);
  EXPECT_THROW((void)L.locate(1, 0), Error);
  EXPECT_THROW((void)L.locate(0, 10), Error);
  EXPECT_THROW((void)L.pieces(2), Error);
  EXPECT_THROW((void)L.pieces(-1), Error);
  EXPECT_THROW((void)L.pieces(0, 1), Error);
  EXPECT_THROW((void)L.pieces(0, -1), Error);
}

TEST(Numel, Shapes) {
  EXPECT_EQ(shardopt::numel({}), 1u);
  EXPECT_EQ(shardopt::numel({0}), 0u);
  EXPECT_EQ(shardopt::numel({7}), 7u);
  EXPECT_EQ(shardopt::numel({2, 3, 4}), 24u);
  EXPECT_EQ(shardopt::numel({5, 0, 3}), 0u);
  EXPECT_EQ(shardopt::numel({1, 1, 1, 1}), 1u);
  EXPECT_THROW((void)shardopt::numel({-1}), Error);
  EXPECT_THROW((void)shardopt::numel({3, -4}), Error);
  EXPECT_THROW((void)shardopt::numel({0, -4}), Error);
  const std::int64_t big = std::int64_t(1) << 40;
  EXPECT_EQ(shardopt::numel({big, 1 << 20}), std::size_t(1) << 60);
  EXPECT_THROW((void)shardopt::numel({big, big}), Error);
  EXPECT_EQ(shardopt::numel({big, big, 0}), 0u);  // empty whatever the other extents
}


// The init callback receives each tensor's index (its position in registration order over all
// blocks), on every rank and at every stage, so a trainer can look its own values up by index.
TEST(Layout, InitFnReceivesTheTensorIndex) {
  const std::vector<BlockSpec> blocks = {{"b0", {{"w0", {5, 7}}, {"bias0", {5}}}},
                                         {"b1", {{"w1", {3, 5}}}},
                                         {"b2", {{"w2", {2, 3}}, {"bias2", {2}}, {"s2", {1}}}}};
  std::map<std::string, int> expected;  // from the specs, not from the layout
  int k = 0;
  for (const auto& b : blocks)
    for (const auto& t : b.tensors) expected[t.name] = k++;
  for (int stage = 0; stage <= 3; ++stage) {
    constexpr int kWorld = 2;
    auto group = shardopt::make_in_process_group(kWorld);
    std::mutex m;
    std::vector<std::string> failures;
    std::vector<int> seen(static_cast<std::size_t>(k), 0);
    std::vector<std::thread> ranks;
    for (int r = 0; r < kWorld; ++r)
      ranks.emplace_back([&, r] {
        auto be = shardopt::make_cpu_backend();
        auto comm = shardopt::make_in_process_communicator(group, r, *be);
        shardopt::Config cfg;
        cfg.stage = stage;
        shardopt::Engine e(cfg, *be, *comm);
        for (const auto& b : blocks) e.register_block(b);
        e.initialize([&](const Layout::TensorInfo& t, std::size_t, std::size_t count, float* out) {
          std::fill(out, out + count, 0.0f);
          std::lock_guard<std::mutex> lock(m);
          if (t.index != expected.at(t.name))
            failures.push_back("stage " + std::to_string(stage) + ": " + t.name + " got index " + std::to_string(t.index));
          else
            seen[static_cast<std::size_t>(t.index)] += static_cast<int>(count);
        });
      });
    for (auto& t : ranks) t.join();
    EXPECT_TRUE(failures.empty()) << failures.front();
    // Across the ranks every element of every tensor was initialized exactly once (stages 1-3)
    // or once per rank (stage 0, every rank holds everything).
    k = 0;
    for (const auto& b : blocks)
      for (const auto& t : b.tensors) {
        std::int64_t n = 1;
        for (auto d : t.shape) n *= d;
        EXPECT_EQ(seen[static_cast<std::size_t>(k)], static_cast<int>(n) * (stage == 0 ? kWorld : 1)) << t.name << " stage " << stage;
        ++k;
      }
  }
}
}  // namespace
