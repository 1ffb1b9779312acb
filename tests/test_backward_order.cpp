// Any backward order at stages 2-3: a backward that opens more units than there are gradient
// buckets (blocks reported in an order that hops between units), and a single-pass backward that
// writes every block's gradient before any grads_ready (Config::gradient_buckets = 0), checked
// element-wise against the float64 oracle and bit for bit against the in-order run, with and
// without optimizer offload; and the same single pass into borrowed gradient memory (the
// trainer's own arrays) at every stage with the default buckets; stage 1 with every gradient
// borrowed, which keeps no full gradient of its own.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "engine_oracle.hpp"
#include "shardopt/error.hpp"
#include "engine/plan.hpp"
#include "shardopt/estimate.hpp"

using namespace shardopt;
using namespace shardopt::testing;

namespace {

struct Case {
  DType compute, reduce;
  int accumulation;
  OffloadKind offload;
};

std::string case_name(int stage, int world, const Case& c, BackwardOrder order) {
  return "stage " + std::to_string(stage) + " world " + std::to_string(world) + " " +
         std::string(name_of(c.compute)) + "/" + std::string(name_of(c.reduce)) + " accum " +
         std::to_string(c.accumulation) + " offload " + std::string(name_of(c.offload)) +
         (order == BackwardOrder::single_pass ? " single-pass" : " scattered");
}

RunSpec spec_for(int stage, int world, const Case& c) {
  RunSpec spec;
  spec.world = world;
  spec.steps = 5;
  spec.cfg = base_config(stage, c.compute, OptimizerKind::adamw);
  spec.cfg.reduce_dtype = c.reduce;
  spec.cfg.accumulation_steps = c.accumulation;
  spec.cfg.offload_optimizer = c.offload;
  spec.group1 = no_decay(spec.cfg);
  return spec;
}

// Stages 0-1 with borrowed gradients reduce at step(), from the sum of the micro-steps in the
// trainer's arrays: each dtype pair with and without micro-steps, and under host offload.
std::vector<Case> reduce_at_step_cases() {
  return {{DType::fp32, DType::fp32, 1, OffloadKind::none}, {DType::fp32, DType::fp32, 3, OffloadKind::none},
          {DType::bf16, DType::bf16, 1, OffloadKind::none}, {DType::bf16, DType::bf16, 3, OffloadKind::none},
          {DType::bf16, DType::fp32, 3, OffloadKind::none}, {DType::fp32, DType::fp32, 3, OffloadKind::host},
          {DType::bf16, DType::fp32, 1, OffloadKind::host}};
}

std::uint64_t reduce_scatters(const RunResult& r) {
  return r.comm_last_step[0].calls[static_cast<int>(CollectiveKind::reduce_scatter)];
}

void check_orders(const std::vector<Case>& cases) {
  for (int stage : {2, 3})
    for (int world : {1, 2, 3})
      for (const Case& c : cases) {
        RunSpec spec = spec_for(stage, world, c);
        const RunResult in_order = run_training(spec);
        for (BackwardOrder order : {BackwardOrder::scattered, BackwardOrder::single_pass}) {
          SCOPED_TRACE(case_name(stage, world, c, order));
          RunSpec other = spec;
          other.backward = order;
          // The single pass holds every unit's views at once: one bucket per unit.
          if (order == BackwardOrder::single_pass) other.cfg.gradient_buckets = 0;
          const RunResult got = run_training(other);
          expect_bitwise_equal(in_order, got, 2, "against the in-order backward");
          expect_matches_reference(other, got);
          for (int r = 0; r < world; ++r)
            for (std::size_t s = 0; s < got.results[r].size(); ++s)
              EXPECT_EQ(got.results[r][s].grad_norm, in_order.results[r][s].grad_norm) << "rank " << r << " step " << s;
          // The scattered order opens more units than the two buckets hold: units are flushed
          // early, each one more reduce-scatter than the in-order run's one per unit (nothing is
          // reduce-scattered when one rank adds straight into its shard; over one rank otherwise a
          // reduce-scatter is a copy, counted all the same).
          const bool direct = world == 1 && c.accumulation == 1 && c.compute == c.reduce && c.offload == OffloadKind::none;
          if (order == BackwardOrder::scattered && !direct) {
            EXPECT_GT(reduce_scatters(got), reduce_scatters(in_order));
          } else if (!direct) {
            EXPECT_EQ(reduce_scatters(got), reduce_scatters(in_order));
          }
        }
      }
}

}  // namespace

TEST(BackwardOrder, AnyOrderEqualsInOrderBitForBitAndMatchesOracle) {
  check_orders({{DType::fp32, DType::fp32, 1, OffloadKind::none},
                {DType::bf16, DType::bf16, 1, OffloadKind::none},
                {DType::bf16, DType::fp32, 1, OffloadKind::none},
                {DType::bf16, DType::bf16, 2, OffloadKind::none}});
}

TEST(BackwardOrder, AnyOrderWithOptimizerOffload) {
  check_orders({{DType::fp32, DType::fp32, 1, OffloadKind::host},
                {DType::bf16, DType::fp32, 1, OffloadKind::host},
                {DType::bf16, DType::bf16, 2, OffloadKind::host}});
}

// Borrowed memory: a single pass writes every tensor's gradient into the trainer's own arrays
// before any grads_ready, with the default two buckets, at every stage; with borrowed parameters
// too (worlds 1 and 3), acquire() hands out the trainer's arrays, which the engine rewrites after
// every step (the run reads its final parameters through acquire, so they are checked too).
TEST(BorrowedMemory, SinglePassEqualsInOrderBitForBitAndMatchesOracle) {
  const std::vector<Case> cases = {{DType::fp32, DType::fp32, 1, OffloadKind::none},
                                   {DType::bf16, DType::fp32, 1, OffloadKind::none},
                                   {DType::bf16, DType::bf16, 2, OffloadKind::none},
                                   {DType::fp32, DType::fp32, 1, OffloadKind::host},
                                   {DType::bf16, DType::bf16, 2, OffloadKind::host}};
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 2, 3})
      for (const Case& c : cases) {
        SCOPED_TRACE(case_name(stage, world, c, BackwardOrder::single_pass) + " borrowed");
        RunSpec spec = spec_for(stage, world, c);
        const RunResult in_order = run_training(spec);
        RunSpec other = spec;
        other.backward = BackwardOrder::single_pass;
        other.borrow_gradients = true;
        other.borrow_parameters = world != 2;  // both kinds, and gradients alone
        const RunResult got = run_training(other);
        expect_bitwise_equal(in_order, got, 2, "against the in-order backward into engine memory");
        expect_matches_reference(other, got);
        std::size_t own = 0;
        for (const auto& b : spec.model)
          for (const auto& t : b.tensors) own += numel(t.shape) * size_of(c.compute);
        if (other.borrow_parameters) own *= 2;
        // What the engine allocates: its plan for borrowed memory, byte for byte; the same as
        // without borrowing, except at stages 1-2 with the parameters borrowed, where one slot
        // (none at world 1) replaces the full parameters, the gradients at stage 1, stage 0,
        // where the trainer's arrays replace the engine's (see the stage 0 test below), and at
        // stages 2-3 without offload, where the units are reduce-scattered from the trainer's
        // arrays and the two default buckets are gone.
        const MemoryReport planned =
            plan_memory(other.cfg, other.model, world, Borrowing{other.borrow_parameters, other.borrow_gradients}).report();
        const bool shard_only = other.borrow_parameters && (stage == 1 || stage == 2);
        const Layout L = Layout::build(spec.model, detail::layout_options(spec.cfg, world));
        std::size_t full = 0;
        for (const auto& u : L.units()) full += u.padded_elems;
        const int params = static_cast<int>(Category::parameters), dev = static_cast<int>(Place::device);
        const int grads = static_cast<int>(Category::gradients);
        const bool from_trainer = stage >= 2 && c.offload == OffloadKind::none;
        for (int r = 0; r < world; ++r) {
          EXPECT_EQ(got.memory[r].borrowed[dev], own);
          for (int k = 0; k < kCategoryCount; ++k)
            for (int p = 0; p < kPlaceCount; ++p) {
              EXPECT_EQ(got.memory[r].current[k][p], planned.current[k][p]);
              // (stage 1 with every gradient borrowed keeps no full gradient: see the test below)
              if ((!shard_only || k != params) && ((stage != 1 && !from_trainer) || k != grads) && stage != 0) {
                EXPECT_EQ(got.memory[r].current[k][p], in_order.memory[r].current[k][p]);
              }
            }
          if (from_trainer) {
            EXPECT_EQ(in_order.memory[r].current[grads][dev] - got.memory[r].current[grads][dev],
                      2 * L.max_unit_elems() * size_of(c.compute));
          }
          if (shard_only) {
            EXPECT_EQ(in_order.memory[r].current[params][dev], full * size_of(c.compute));
            EXPECT_EQ(got.memory[r].current[params][dev], (world > 1 ? L.max_unit_elems() : 0) * size_of(c.compute));
          }
        }
      }
}

// Stage 1 with every gradient borrowed keeps no full gradient: at step() each unit is
// reduce-scattered from the trainer's arrays (in place, or cast into the reduce buffer with a
// reduce dtype), or, under offload, copied from them into one staging unit and reduced there. The
// same numerics as the full-gradient run (micro-steps summed in the trainer's memory, one
// reduction per step): bit for bit equal to the run in engine memory, and to the float64 oracle,
// with clipping on. Memory: the engine's plan has no full gradient; its device total is lower by
// P elements of the compute dtype, computed here from the layout, less the staging unit (U
// elements) under offload, or, with matching dtypes, less the gradient shard the reduction now
// writes to (the full-gradient run reduces in place there), and it is what memory_report() shows
// byte for byte.
TEST(BorrowedMemory, StageOneKeepsNoFullGradientAndMatchesBitForBit) {
  const std::vector<Case> cases = reduce_at_step_cases();
  for (int world : {1, 2, 3})
    for (const Case& c : cases) {
      SCOPED_TRACE(case_name(1, world, c, BackwardOrder::reverse) + " borrowed gradients");
      RunSpec spec = spec_for(1, world, c);
      spec.cfg.max_grad_norm = 0.5f;
      const RunResult own = run_training(spec);
      RunSpec other = spec;
      other.borrow_gradients = true;
      if (world == 2) {  // the trainer's arrays from its own allocator (as the GPU tests do with cudaMalloc)
        other.trainer_alloc = [](std::size_t bytes) { return std::malloc(bytes); };
        other.trainer_free = [](void* p) { std::free(p); };
      }
      const RunResult got = run_training(other);
      expect_bitwise_equal(own, got, 2, "against the run with the gradients in engine memory");
      expect_matches_reference(other, got);
      int clipped = 0;
      for (int r = 0; r < world; ++r)
        for (std::size_t s = 0; s < got.results[r].size(); ++s) {
          EXPECT_EQ(got.results[r][s].grad_norm, own.results[r][s].grad_norm) << "rank " << r << " step " << s;
          clipped += got.results[r][s].grad_norm > spec.cfg.max_grad_norm;
        }
      EXPECT_GT(clipped, 0) << "no step was clipped: the clip is not exercised";
      // step_async(): the next micro-step's gradients() waits for the step that reads the arrays.
      RunSpec async = other;
      async.async = true;
      expect_bitwise_equal(own, run_training(async), 2, "step_async() against step() in engine memory");
      // The plan, and what the engine allocated.
      const detail::EnginePlan borrowed = detail::plan_engine(other.cfg, other.model, world, false, true);
      const detail::EnginePlan plain = detail::plan_engine(spec.cfg, spec.model, world);
      std::size_t full_bufs = 0;
      for (const auto& b : borrowed.buffers) full_bufs += b.kind == detail::Buf::grads_full || b.name == "full gradients";
      EXPECT_EQ(full_bufs, 0u);
      const auto device_total = [](const detail::EnginePlan& p) {
        std::size_t n = 0;
        for (const auto& b : p.buffers)
          if (b.place == Place::device && !b.transient) n += b.elems * size_of(b.dtype);
        return n;
      };
      const Layout L = Layout::build(spec.model, detail::layout_options(spec.cfg, world));
      std::size_t P = 0, U = 0;
      for (const auto& u : L.units()) {
        P += u.padded_elems;
        U = std::max(U, u.padded_elems);
      }
      std::size_t saved = P * size_of(c.compute);
      if (c.offload != OffloadKind::none) saved -= U * size_of(c.compute);  // the staging unit
      else if (c.compute == c.reduce) saved -= L.shard_elems() * size_of(c.reduce);
      EXPECT_EQ(device_total(plain) - device_total(borrowed), saved);
      const MemoryReport planned = plan_memory(other.cfg, other.model, world, Borrowing{false, true}).report();
      for (int r = 0; r < world; ++r)
        for (int k = 0; k < kCategoryCount; ++k)
          for (int p = 0; p < kPlaceCount; ++p) {
            EXPECT_EQ(got.memory[r].current[k][p], planned.current[k][p]) << "category " << k << " place " << p;
            EXPECT_EQ(got.memory[r].peak[k][p], planned.peak[k][p]) << "category " << k << " place " << p;
          }
    }
}

// Stage 0 with every gradient (and, but at world 2, every parameter) borrowed: the engine keeps
// neither a full gradient nor full parameters of its own. Each tensor is all-reduced in place in
// the trainer's array and the update reads it there and writes the parameters straight into the
// trainer's arrays (under offload the gradient goes through one staging unit, and the upload
// writes the trainer's arrays). Bit for bit equal to the run in engine memory, and to the float64
// oracle. The engine's device memory is lower by what the rules of Engine::borrow_gradients and
// borrow_parameters promise, computed here from the layout, and is what memory_report() shows.
TEST(BorrowedMemory, StageZeroUsesTheTrainersArraysAndMatchesBitForBit) {
  const std::vector<Case> cases = reduce_at_step_cases();
  for (int world : {1, 2, 3})
    for (const Case& c : cases) {
      SCOPED_TRACE(case_name(0, world, c, BackwardOrder::reverse) + " borrowed");
      RunSpec spec = spec_for(0, world, c);
      const RunResult own = run_training(spec);
      RunSpec other = spec;
      other.borrow_gradients = true;
      other.borrow_parameters = world != 2;
      if (world == 3) {  // the trainer's arrays from its own allocator
        other.trainer_alloc = [](std::size_t bytes) { return std::malloc(bytes); };
        other.trainer_free = [](void* p) { std::free(p); };
      }
      const RunResult got = run_training(other);
      expect_bitwise_equal(own, got, 2, "against the run in engine memory");
      expect_matches_reference(other, got);
      for (int r = 0; r < world; ++r)
        for (std::size_t s = 0; s < got.results[r].size(); ++s)
          EXPECT_NEAR(got.results[r][s].grad_norm, own.results[r][s].grad_norm, 1e-6 * own.results[r][s].grad_norm)
              << "rank " << r << " step " << s;
      RunSpec async = other;
      async.async = true;
      expect_bitwise_equal(own, run_training(async), 2, "step_async() against step() in engine memory");
      // What the engine no longer holds: the full gradient (P elements of the compute dtype; one
      // staging unit stays under offload), and with the parameters borrowed the full parameters
      // (P of the compute dtype; with fp32 compute on the device they were the master weights, and
      // the trainer's arrays now are).
      const Layout L = Layout::build(spec.model, detail::layout_options(spec.cfg, world));
      std::size_t P = 0, U = 0;
      for (const auto& u : L.units()) {
        P += u.padded_elems;
        U = std::max(U, u.padded_elems);
      }
      const bool off = c.offload != OffloadKind::none;
      std::size_t saved = (P - (off ? U : 0)) * size_of(c.compute);
      if (other.borrow_parameters) saved += P * size_of(c.compute);
      const MemoryReport plain = plan_memory(spec.cfg, spec.model, world).report();
      const MemoryReport planned =
          plan_memory(other.cfg, other.model, world, Borrowing{other.borrow_parameters, true}).report();
      const int dev = static_cast<int>(Place::device);
      EXPECT_EQ(plain.peak_total[dev] - planned.peak_total[dev], saved);
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(got.memory[r].borrowed[dev], planned.borrowed[dev]);
        for (int k = 0; k < kCategoryCount; ++k)
          for (int p = 0; p < kPlaceCount; ++p) {
            EXPECT_EQ(got.memory[r].current[k][p], planned.current[k][p]) << "category " << k << " place " << p;
            EXPECT_EQ(got.memory[r].peak[k][p], planned.peak[k][p]) << "category " << k << " place " << p;
          }
      }
    }
}

// Stages 0-2 with compressed optimizer state and every tensor borrowed: the update ranges follow
// the tensors in the trainer's memory and leave out the alignment gaps, whose int8 block scales
// and codes stay zero, so the state's bytes are those of the run in engine memory.
TEST(BorrowedMemory, CompressedStateInTheTrainersArraysMatchesBitForBit) {
  for (int stage : {0, 1, 2})
  for (StatePrecision precision : {StatePrecision::bf16, StatePrecision::int8})
    for (int world : {1, 2}) {
      SCOPED_TRACE("stage " + std::to_string(stage) + " " + std::string(name_of(precision)) + " world " + std::to_string(world));
      RunSpec spec = spec_for(stage, world, {DType::bf16, DType::bf16, 2, OffloadKind::none});
      spec.cfg.state_precision = precision;
      spec.cfg.quant_block = 64;
      const RunResult own = run_training(spec);
      RunSpec other = spec;
      other.borrow_gradients = true;
      other.borrow_parameters = true;
      expect_bitwise_equal(own, run_training(other), 2, "against the run in engine memory");
    }
}

// Stage 0 with clipping: the norm is summed per tensor instead of per unit (a different grouping
// of the same squares), so it may differ from the run in engine memory in its last bits; the
// result is checked against the float64 oracle, with steps that clip.
TEST(BorrowedMemory, StageZeroClipsAsTheOracle) {
  for (int world : {1, 3})
    for (DType dt : {DType::fp32, DType::bf16}) {
      RunSpec spec = spec_for(0, world, {dt, dt, 2, OffloadKind::none});
      SCOPED_TRACE("world " + std::to_string(world) + " " + std::string(name_of(dt)));
      spec.cfg.max_grad_norm = 0.5f;
      spec.borrow_gradients = true;
      spec.borrow_parameters = true;
      const RunResult got = run_training(spec);
      expect_matches_reference(spec, got);
      int clipped = 0;
      for (const auto& s : got.results[0]) clipped += s.grad_norm > spec.cfg.max_grad_norm;
      EXPECT_GT(clipped, 0) << "no step was clipped: the clip is not exercised";
    }
}

// Stages 2-3 with every gradient borrowed (no offload): no buckets. When a unit's last block
// reports ready its tensors are reduce-scattered where the trainer keeps them
// (Communicator::reduce_scatter_pieces; with a reduce dtype, cast into the reduce buffer and
// reduced there) and zeroed there. Bit for bit the run
// in engine memory (with clipping on, micro-steps, step_async()), the oracle, one reduce-scatter
// per unit per micro-step as with buckets, and a plan without a bucket that memory_report() shows.
TEST(BorrowedMemory, StagesTwoAndThreeReduceStraightFromTheTrainersArrays) {
  const std::vector<Case> cases = {{DType::fp32, DType::fp32, 1, OffloadKind::none},
                                   {DType::fp32, DType::fp32, 3, OffloadKind::none},
                                   {DType::bf16, DType::bf16, 1, OffloadKind::none},
                                   {DType::bf16, DType::bf16, 3, OffloadKind::none},
                                   {DType::bf16, DType::fp32, 1, OffloadKind::none},
                                   {DType::bf16, DType::fp32, 3, OffloadKind::none}};
  for (int stage : {2, 3})
    for (int world : {1, 2, 3})
      for (const Case& c : cases) {
        SCOPED_TRACE(case_name(stage, world, c, BackwardOrder::reverse) + " borrowed gradients");
        RunSpec spec = spec_for(stage, world, c);
        spec.cfg.max_grad_norm = 0.5f;
        const RunResult own = run_training(spec);
        RunSpec other = spec;
        other.borrow_gradients = true;
        other.borrow_parameters = world == 3;
        const RunResult got = run_training(other);
        expect_bitwise_equal(own, got, 2, "against the run with buckets in engine memory");
        expect_matches_reference(other, got);
        RunSpec async = other;
        async.async = true;
        expect_bitwise_equal(own, run_training(async), 2, "step_async() against step() in engine memory");
        // (one rank without micro-steps: the run in engine memory adds straight into the shard
        // and reduces nothing; from the trainer's arrays each unit is copied in by the collective)
        if (world > 1 || c.accumulation > 1) {
          EXPECT_EQ(reduce_scatters(got), reduce_scatters(own));
        }
        const detail::EnginePlan plan = detail::plan_engine(other.cfg, other.model, world, other.borrow_parameters, true);
        EXPECT_TRUE(plan.placement.grads_from_trainer);
        for (const auto& b : plan.buffers) EXPECT_NE(b.kind, detail::Buf::bucket) << b.name;
        const MemoryReport planned =
            plan_memory(other.cfg, other.model, world, Borrowing{other.borrow_parameters, true}).report();
        for (int r = 0; r < world; ++r)
          for (int k = 0; k < kCategoryCount; ++k)
            for (int p = 0; p < kPlaceCount; ++p)
              EXPECT_EQ(got.memory[r].peak[k][p], planned.peak[k][p]) << "category " << k << " place " << p;
      }
}

TEST(BorrowedMemory, BadIndexAndLateCallAreErrors) {
  World w(1);
  Engine e(base_config(2, DType::fp32, OptimizerKind::adamw), *w.backends[0], *w.comms[0]);
  for (const auto& b : awkward_model()) e.register_block(b);
  float x[4] = {};
  EXPECT_THROW(e.borrow_gradients(-1, x), Error);
  EXPECT_THROW(e.borrow_parameters(-1, x), Error);
  try {
    e.borrow_gradients(999, x);
    ADD_FAILURE() << "tensor 999 accepted";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(err.what()).find("999"), std::string::npos) << err.what();
  }
  e.initialize();
  try {
    e.borrow_gradients(0, x);
    ADD_FAILURE() << "borrow after initialize accepted";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::invalid_state);
  }
}

// Views of more units than buckets held at once cannot be served: a clear error naming the
// remedy, and the engine stays usable.
TEST(BackwardOrder, MoreOpenViewsThanBucketsIsAClearError) {
  World w(2);
  w.run([&](int rank) {
    Config cfg = base_config(2, DType::fp32, OptimizerKind::adamw);
    Engine e(cfg, *w.backends[rank], *w.comms[rank]);
    for (const auto& b : awkward_model()) e.register_block(b);
    e.initialize();
    const Layout& L = e.layout();
    ASSERT_GE(L.units().size(), 3u);
    // The first block of each of three units, views held.
    std::vector<int> firsts;
    for (const auto& u : L.units()) firsts.push_back(u.first_block);
    e.gradients(firsts[0]);
    e.gradients(firsts[1]);
    try {
      e.gradients(firsts[2]);
      ADD_FAILURE() << "a third unit's views with two buckets held";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), ErrorCode::invalid_state);
      EXPECT_NE(std::string(err.what()).find("gradient_buckets"), std::string::npos) << err.what();
      EXPECT_NE(std::string(err.what()).find(L.blocks()[firsts[2]].name), std::string::npos) << err.what();
    }
    e.zero_grad();
    synthetic_micro_step(e, rank, 0, 0, 7, 1.0f);
    EXPECT_TRUE(e.step().applied);
  });
}

// The plan counts the buckets Config::gradient_buckets asks for, byte for byte with what the
// engine allocates.
TEST(BackwardOrder, GradientBucketsInThePlan) {
  for (int buckets : {0, 1, 3})
    for (int stage : {2, 3}) {
      SCOPED_TRACE("gradient_buckets " + std::to_string(buckets) + " stage " + std::to_string(stage));
      RunSpec spec = spec_for(stage, 2, {DType::bf16, DType::bf16, 1, OffloadKind::none});
      spec.steps = 1;
      spec.cfg.gradient_buckets = buckets;
      const MemoryPlan plan = plan_memory(spec.cfg, spec.model, spec.world);
      const MemoryReport planned = plan.report();
      const Layout L = Layout::build(spec.model, {2, spec.cfg.alignment, spec.cfg.bucket_bytes / 2});
      std::size_t bucket_bytes = 0;
      for (const auto& b : plan.buffers)
        if (b.name.rfind("gradient bucket", 0) == 0) bucket_bytes += b.bytes;
      const std::size_t expect_count = buckets == 0 ? L.units().size() : static_cast<std::size_t>(buckets);
      EXPECT_EQ(bucket_bytes, expect_count * L.max_unit_elems() * 2);
      const RunResult run = run_training(spec);
      for (int c = 0; c < kCategoryCount; ++c)
        for (int p = 0; p < kPlaceCount; ++p) {
          EXPECT_EQ(run.memory[0].current[c][p], planned.current[c][p]);
          EXPECT_EQ(run.memory[0].peak[c][p], planned.peak[c][p]);
        }
    }
}

// Which tensors are borrowed decides collectives (gathers skipped, flushes): ranks that borrow
// differently fail initialize() together instead of hanging in a collective.
TEST(BorrowedMemory, RanksThatBorrowDifferentlyFailInitialize) {
  World w(2);
  std::vector<int> codes(2, -1);
  std::vector<std::vector<float>> mem(2, std::vector<float>(64 * 64));
  (void)run_on_threads(2, [&](int rank) {
    Engine e(base_config(2, DType::fp32, OptimizerKind::adamw), *w.backends[rank], *w.comms[rank]);
    for (const auto& b : awkward_model()) e.register_block(b);
    if (rank == 0) e.borrow_gradients(0, mem[rank].data());  // embed.w: 407 elements
    try {
      e.initialize();
    } catch (const Error& err) {
      codes[rank] = static_cast<int>(err.code());
    }
  });
  for (int r = 0; r < 2; ++r) EXPECT_EQ(codes[r], static_cast<int>(ErrorCode::communication)) << "rank " << r;
}

// load() rewrites the borrowed parameters: a fresh engine started from other values holds, after
// loading a checkpoint, the checkpoint's master weights in the trainer's arrays on every rank
// (at stage 0 the load writes them there directly: the engine has no parameters of its own).
TEST(BorrowedMemory, LoadWritesTheTrainersParameters) {
  for (int stage : {0, 1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    const std::string dir = (std::filesystem::temp_directory_path() /
                             ("shardopt_borrow_load_" + std::to_string(::getpid()) + "_" + std::to_string(stage)))
                                .string();
    World w(2);
    const Config cfg = base_config(stage, DType::fp32, OptimizerKind::adamw);
    const std::vector<BlockSpec> model = awkward_model();
    std::vector<std::vector<std::vector<float>>> params(2);  // [rank][tensor]: the trainer's arrays
    std::vector<std::vector<std::vector<float>>> master(2);  // [rank][tensor]: what it owns, else NaN
    w.run([&](int rank) {
      auto borrow_all = [&](Engine& e) {
        int t = 0;
        params[rank].clear();
        for (const auto& b : model)
          for (const auto& ts : b.tensors) params[rank].emplace_back(numel(ts.shape), -7.0f);
        for (auto& p : params[rank]) {
          if (!p.empty()) e.borrow_parameters(t, p.data());
          ++t;
        }
      };
      {
        Engine a(cfg, *w.backends[rank], *w.comms[rank]);
        for (const auto& b : model) a.register_block(b);
        borrow_all(a);
        a.initialize(seeded_init(3));
        for (int s = 0; s < 2; ++s) {
          synthetic_micro_step(a, rank, s, 0, 3, 1.0f);
          a.step();
        }
        a.save(dir);
      }
      Engine e(cfg, *w.backends[rank], *w.comms[rank]);
      for (const auto& b : model) e.register_block(b);
      borrow_all(e);
      e.initialize(seeded_init(99));
      e.load(dir);
      master[rank].resize(params[rank].size());
      for (std::size_t t = 0; t < params[rank].size(); ++t) master[rank][t].assign(params[rank][t].size(), std::nanf(""));
      e.read_master([&](int t, std::size_t begin, std::size_t n, const float* v) {
        for (std::size_t i = 0; i < n; ++i) master[rank][t][begin + i] = v[i];
      });
    });
    std::filesystem::remove_all(dir);
    int checked = 0;
    for (std::size_t t = 0; t < params[0].size(); ++t)
      for (std::size_t i = 0; i < params[0][t].size(); ++i) {
        ASSERT_EQ(params[0][t][i], params[1][t][i]) << "tensor " << t << "[" << i << "]: ranks differ";
        for (int r = 0; r < 2; ++r)
          if (!std::isnan(master[r][t][i])) {
            ASSERT_EQ(params[0][t][i], master[r][t][i]) << "tensor " << t << "[" << i << "]";
            ++checked;
          }
      }
    std::size_t total = 0;
    for (const auto& p : params[0]) total += p.size();
    // every element owned by exactly one rank (stage 0: by both)
    EXPECT_EQ(checked, static_cast<int>(total) * (stage == 0 ? 2 : 1));
  }
}
