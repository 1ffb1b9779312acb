// Compressed optimizer state (Config::state_precision bf16 / int8) through the engine:
//  - every step of a run, element by element, against a float64 step taken from the engine's own
//    decoded state before it: the master within the fp32 bounds of the oracle, each stored state
//    within the quantization error bound of shardopt/state_precision.hpp;
//  - sharding invariance: stages 1-3 and worlds 1, 2, 3, 4, 8 give the same bits;
//  - checkpoints: saved at one world size and stage, loaded at another, continued bit for bit as
//    an uninterrupted run; another precision or block size is refused naming both;
//  - the memory the state takes, byte for byte, and bad configurations.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "checkpoint/field_codec.hpp"
#include "checkpoint/format.hpp"
#include "checkpoint/test_hooks.hpp"
#include "engine/plan.hpp"
#include "engine_oracle.hpp"
#include "temp_dir.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/error.hpp"
#include "shardopt/state_precision.hpp"

using namespace shardopt;
using namespace shardopt::testing;
namespace fs = std::filesystem;

namespace {

constexpr std::size_t kBlock = 64;  // the smallest block: the test tensors span several

Config compressed_config(int stage, StatePrecision p, OptimizerKind rule, DType dtype = DType::fp32) {
  Config c = base_config(stage, dtype, rule);
  c.state_precision = p;
  c.quant_block = kBlock;
  return c;
}

// Master and decoded states of every tensor, assembled from every rank.
struct Fields {
  std::vector<std::vector<float>> f[3];
};

void read_fields(Engine& e, Fields& out, std::mutex& m) {
  const auto& L = e.layout();
  {
    std::lock_guard<std::mutex> lock(m);
    if (out.f[0].empty())
      for (auto& field : out.f) {
        field.resize(L.tensors().size());
        for (std::size_t t = 0; t < L.tensors().size(); ++t) field[t].assign(L.tensors()[t].numel, std::nanf(""));
      }
  }
  auto put = [&](int k) {
    return [&, k](int t, std::size_t begin, std::size_t n, const float* v) {
      std::lock_guard<std::mutex> lock(m);
      std::memcpy(out.f[k][t].data() + begin, v, n * 4);
    };
  };
  e.read_master(put(0));
  for (int k = 0; k < state_count(e.config().optimizer); ++k) e.read_state(k, put(1 + k));
}

bool same(const Fields& a, const Fields& b, std::string& where) {
  for (int k = 0; k < 3; ++k)
    for (std::size_t t = 0; t < a.f[k].size(); ++t)
      if (!same_bits(a.f[k][t], b.f[k][t])) {
        where = "field " + std::to_string(k) + " tensor " + std::to_string(t);
        return false;
      }
  return true;
}

// The quantization error bound of state_precision.hpp for a stored value of x (the fp32 value
// the kernel computed, known here as `x` within `slack`), in a block whose values have absmax
// `amax` (same slack, relative).
double state_bound(StatePrecision p, bool is_signed, double x, double slack, double amax) {
  const double ax = std::fabs(x) + slack;
  if (p == StatePrecision::bf16) return std::ldexp(ax, -8) + slack;
  const int M = is_signed ? quant::SignedCode::kMantBits : quant::UnsignedCode::kMantBits;
  const int Emax = is_signed ? quant::SignedCode::kEmax : quant::UnsignedCode::kEmax;
  const double scale_max = amax * (1.0 + 1e-6) * (1.0 + std::ldexp(1.0, -M));  // absmax/2 < scale <= absmax (1 + 2^-M)
  return std::max(std::ldexp(ax, -M), std::ldexp(scale_max, 1 - Emax - M)) + slack;
}

struct StepCase {
  StatePrecision precision;
  OptimizerKind rule;
  int stage, world;
  DType dtype;
};

std::string case_name(const ::testing::TestParamInfo<StepCase>& info) {
  const StepCase& c = info.param;
  return std::string(name_of(c.precision)) + "_" + std::string(name_of(c.rule)) + "_stage" + std::to_string(c.stage) +
         "_world" + std::to_string(c.world) + "_" + std::string(name_of(c.dtype));
}

class CompressedOracle : public ::testing::TestWithParam<StepCase> {};

// Every step s: from the engine's state after s steps (decoded), the float64 reference step with
// the mean gradient of step s gives p', m', v'; the engine's state after s + 1 steps must hold the
// master within the oracle's one-step bound of p', and each state within the quantization bound
// of m' (v'), the block's absmax taken from the reference values of the tensor's block.
TEST_P(CompressedOracle, EveryStepWithinTheQuantizationBound) {
  const StepCase& c = GetParam();
  RunSpec spec;
  spec.world = c.world;
  spec.steps = 12;
  spec.cfg = compressed_config(c.stage, c.precision, c.rule, c.dtype);
  spec.group1 = no_decay(spec.cfg);
  std::vector<Fields> before(spec.steps);
  std::mutex mu;
  spec.before_step = [&](Engine& e, int s) { read_fields(e, before[s], mu); };
  const RunResult got = run_training(spec);
  const int nst = state_count(c.rule);
  // The state after step s is before[s + 1], or the run's final one.
  auto after = [&](int s, int k, std::size_t t) -> const std::vector<float>& {
    if (s + 1 < spec.steps) return before[s + 1].f[k][t];
    return k == 0 ? got.master[t] : got.state[k - 1][t];
  };
  RunSpec one = spec;
  one.steps = 1;
  const double u32 = std::ldexp(1.0, -24);
  const ReferenceRun full = run_reference(spec);  // names, groups and keys of the reference tensors
  int bad = 0;
  std::size_t checked_blocks_nonzero = 0;
  for (int s = 0; s < spec.steps; ++s) {
    Reference ref = full.ref;
    ref.t = s;
    std::vector<std::vector<double>> g(ref.p.size());
    for (std::size_t t = 0; t < ref.p.size(); ++t) {
      const std::vector<float>& p0 = before[s].f[0][t];
      ref.p[t].assign(p0.begin(), p0.end());
      ref.m[t].assign(before[s].f[1][t].begin(), before[s].f[1][t].end());
      if (nst == 2) ref.v[t].assign(before[s].f[2][t].begin(), before[s].f[2][t].end());
      const std::uint64_t key = name_key(got.tensor_names[t]);
      g[t].resize(p0.size());
      for (std::size_t i = 0; i < p0.size(); ++i) {
        double acc = 0;
        for (int r = 0; r < spec.world; ++r) acc += synthetic_grad(spec.seed, s, 0, r, key, i, c.dtype);
        g[t][i] = acc / spec.world;
      }
    }
    const Reference old = ref;
    ref.apply(g);
    for (std::size_t t = 0; t < ref.p.size(); ++t) {
      const std::size_t n = ref.p[t].size();
      for (int k = 0; k < nst; ++k) {
        const std::vector<double>& want = k == 0 ? ref.m[t] : ref.v[t];
        const std::vector<double>& was = k == 0 ? old.m[t] : old.v[t];
        const std::vector<float>& have = after(s, 1 + k, t);
        for (std::size_t b = 0; b * kBlock < n; ++b) {
          const std::size_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
          double amax = 0;
          for (std::size_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(want[i]));
          checked_blocks_nonzero += amax > 0;
          for (std::size_t i = lo; i < hi; ++i) {
            // What the fp32 kernel computed differs from the float64 value by a few roundings of
            // the terms (and of the reduced gradient): far below any code step.
            // The reduced gradient itself is rounded to the reduce dtype (ur); Adam (L2) and SGD
            // add weight_decay * p to it.
            const Hyperparams& h = ref.groups.at(ref.group_of[t]);
            const double gi = std::fabs(g[t][i]) + std::fabs(h.weight_decay * old.p[t][i]);
            const double ur = unit_roundoff(spec.cfg.reduce_dtype);
            const double slack = 16 * u32 * (std::fabs(was[i]) + gi + gi * gi + std::fabs(want[i])) + 4 * ur * (gi + gi * gi);
            const double tol = state_bound(c.precision, k == 0, want[i], slack, amax + slack);
            const double err = std::fabs(static_cast<double>(have[i]) - want[i]);
            if (!(err <= tol) && bad++ < 10)
              ADD_FAILURE() << "step " << s << " " << got.tensor_names[t] << " state " << k << "[" << i << "]: engine "
                            << have[i] << " reference " << want[i] << " |err| " << err << " > bound " << tol;
          }
        }
      }
      const std::vector<float>& pm = after(s, 0, t);
      for (std::size_t i = 0; i < n; ++i) {
        const double tol = bound(one, std::fabs(ref.p[t][i]));
        const double err = std::fabs(static_cast<double>(pm[i]) - ref.p[t][i]);
        if (!(err <= tol) && bad++ < 10)
          ADD_FAILURE() << "step " << s << " " << got.tensor_names[t] << " master[" << i << "]: engine " << pm[i]
                        << " reference " << ref.p[t][i] << " |err| " << err << " > bound " << tol;
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_GT(checked_blocks_nonzero, 0u);
  for (const auto& per_rank : got.results)
    for (std::size_t s = 0; s < per_rank.size(); ++s) EXPECT_EQ(per_rank[s].step, static_cast<std::int64_t>(s + 1));
}

INSTANTIATE_TEST_SUITE_P(
    Engine, CompressedOracle,
    ::testing::Values(StepCase{StatePrecision::int8, OptimizerKind::adamw, 1, 3, DType::fp32},
                      StepCase{StatePrecision::int8, OptimizerKind::adam, 3, 2, DType::bf16},
                      StepCase{StatePrecision::int8, OptimizerKind::sgd, 2, 4, DType::fp32},
                      StepCase{StatePrecision::int8, OptimizerKind::lion, 0, 2, DType::fp32},
                      StepCase{StatePrecision::int8, OptimizerKind::adamw, 0, 1, DType::fp32},
                      StepCase{StatePrecision::bf16, OptimizerKind::adamw, 2, 3, DType::fp32},
                      StepCase{StatePrecision::bf16, OptimizerKind::sgd, 1, 2, DType::bf16},
                      StepCase{StatePrecision::bf16, OptimizerKind::lion, 3, 4, DType::fp32}),
    case_name);

// The bound above is not vacuous: int8 state differs from fp32 state after a few steps by more
// than fp32 rounding, and bf16 state too (otherwise the precision would not have been applied).
TEST(CompressedEngine, CompressedStateIsReallyStoredCompressed) {
  RunSpec spec;
  spec.world = 2;
  spec.steps = 4;
  spec.cfg = compressed_config(1, StatePrecision::fp32, OptimizerKind::adamw);
  spec.group1 = no_decay(spec.cfg);
  const RunResult f32 = run_training(spec);
  for (StatePrecision p : {StatePrecision::bf16, StatePrecision::int8}) {
    spec.cfg.state_precision = p;
    const RunResult r = run_training(spec);
    std::size_t off_grid = 0, total = 0;
    for (std::size_t t = 0; t < r.state[1].size(); ++t)
      for (std::size_t i = 0; i < r.state[1][t].size(); ++i) {
        ++total;
        // every stored bf16 value is a bf16 value; int8: at most 4 significant bits (e5m3: 3 + 1)
        const std::uint32_t bits = float_bits(r.state[1][t][i]);
        const std::uint32_t mask = p == StatePrecision::bf16 ? 0xffffu : 0xfffffu;
        EXPECT_EQ(bits & mask, 0u) << "state 1 of " << r.tensor_names[t] << "[" << i << "] = " << r.state[1][t][i]
                                   << " is not a " << name_of(p) << " value";
        off_grid += (float_bits(f32.state[1][t][i]) & mask) != 0;
      }
    EXPECT_GT(off_grid, total / 2) << "the fp32 run's state is mostly off the grid, so the check above can fail";
  }
}

// ---------------------------------------------------------------- checkpoints
using TmpDir = shardopt::test::TempDir;

// Every rank adds the same gradient (rank 0's synthetic one), so the mean over ranks is that
// gradient exactly at every world size (n equal values sum and divide by n exactly for these
// short-significand values): runs at different world sizes must then agree bit for bit.
void train(Engine& e, int /*rank*/, int first, int steps) {
  for (int s = first; s < first + steps; ++s) {
    synthetic_micro_step(e, 0, s, 0, 7, 1.0f);
    e.step();
  }
}

void with_world(int n, const Config& cfg, const std::function<void(Engine&, int)>& fn, std::uint64_t seed = 7) {
  World w(n);
  w.run([&](int rank) {
    Engine e(cfg, *w.backends[rank], *w.comms[rank]);
    for (const auto& b : awkward_model()) e.register_block(b);
    e.set_group(1, no_decay(cfg));
    e.initialize(seeded_init(seed));
    fn(e, rank);
  });
}

Fields run(const Config& cfg, int world, int steps) {
  Fields out;
  std::mutex mu;
  with_world(world, cfg, [&](Engine& e, int rank) {
    train(e, rank, 0, steps);
    read_fields(e, out, mu);
  });
  return out;
}

// ---------------------------------------------------------------- sharding invariance
TEST(CompressedEngine, StagesOneToThreeAndWorldsOneToEightGiveTheSameBits) {
  for (StatePrecision p : {StatePrecision::int8, StatePrecision::bf16}) {
    for (OptimizerKind rule : {OptimizerKind::adamw, OptimizerKind::sgd}) {
      SCOPED_TRACE(std::string(name_of(p)) + " " + std::string(name_of(rule)));
      Config cfg = compressed_config(1, p, rule, DType::bf16);
      const Fields ref = run(cfg, 1, 6);
      for (int stage : {1, 2, 3})
        for (int world : {1, 2, 3, 4, 8}) {
          if (stage == 1 && world == 1) continue;
          cfg.stage = stage;
          const Fields r = run(cfg, world, 6);
          std::string where;
          EXPECT_TRUE(same(ref, r, where)) << "stage " << stage << " world " << world << " differs from stage 1 world 1 at "
                                           << where;
        }
    }
  }
}

struct Reshard {
  int world_from, stage_from, world_to, stage_to;
  OffloadKind offload_from = OffloadKind::none, offload_to = OffloadKind::none;
};

// Saved after 5 steps at one world size and stage, loaded at another, 5 more steps: the same bits
// as 10 steps without a checkpoint (the dither's seed is the restored step counter).
TEST(CompressedEngine, CheckpointReshardsAndContinuesBitForBit) {
  const Reshard cases[] = {{4, 2, 3, 3},
                           {1, 0, 4, 1},
                           {3, 3, 2, 2},
                           {2, 2, 3, 3, OffloadKind::none, OffloadKind::nvme},
                           {3, 1, 2, 2, OffloadKind::nvme, OffloadKind::host}};
  for (StatePrecision p : {StatePrecision::int8, StatePrecision::bf16}) {
    const Config base = compressed_config(1, p, OptimizerKind::adamw, DType::bf16);
    const Fields uninterrupted = run(base, 1, 10);
    std::mutex mu;
    for (const Reshard& rc : cases) {
      SCOPED_TRACE(std::string(name_of(p)) + ": world " + std::to_string(rc.world_from) + " stage " +
                   std::to_string(rc.stage_from) + " offload " + std::string(name_of(rc.offload_from)) + " -> world " +
                   std::to_string(rc.world_to) + " stage " + std::to_string(rc.stage_to) + " offload " +
                   std::string(name_of(rc.offload_to)));
      TmpDir dir, nvme_dir;
      Fields saved, loaded, resumed;
      Config from = base, to = base;
      from.stage = rc.stage_from;
      to.stage = rc.stage_to;
      from.offload_optimizer = rc.offload_from;
      to.offload_optimizer = rc.offload_to;
      from.nvme_dir = rc.offload_from == OffloadKind::nvme ? nvme_dir.path.string() : "";
      to.nvme_dir = rc.offload_to == OffloadKind::nvme ? nvme_dir.path.string() : "";
      with_world(rc.world_from, from, [&](Engine& e, int rank) {
        train(e, rank, 0, 5);
        read_fields(e, saved, mu);
        e.save(dir.path.string());
      });
      const CheckpointInfo info = inspect_checkpoint(dir.path.string());
      EXPECT_EQ(info.state_precision, p);
      EXPECT_EQ(info.quant_block, p == StatePrecision::int8 ? kBlock : 0u);
      with_world(rc.world_to, to, [&](Engine& e, int rank) {
        e.load(dir.path.string());
        read_fields(e, loaded, mu);
        train(e, rank, 5, 5);
        read_fields(e, resumed, mu);
      }, /*seed=*/99);  // another initialization: everything must come from the checkpoint
      std::string where;
      EXPECT_TRUE(same(saved, loaded, where)) << "loaded state differs from the saved one at " << where;
      ASSERT_FALSE(loaded.f[0].empty());
      EXPECT_TRUE(same(uninterrupted, resumed, where)) << "5 + save/load + 5 steps differ from 10 at " << where;
    }
  }
}

TEST(CompressedEngine, ACheckpointOfAnotherPrecisionOrBlockSizeIsRefusedNamingBoth) {
  TmpDir dir;
  const Config int8 = compressed_config(2, StatePrecision::int8, OptimizerKind::adamw);
  with_world(2, int8, [&](Engine& e, int rank) {
    train(e, rank, 0, 2);
    e.save(dir.path.string());
  });
  struct Other {
    StatePrecision p;
    std::size_t block;
    const char* names;
  };
  for (const Other& o : {Other{StatePrecision::fp32, kBlock, "fp32"}, Other{StatePrecision::bf16, kBlock, "bf16"},
                         Other{StatePrecision::int8, 128, "quant_block 128"}}) {
    Config cfg = int8;
    cfg.state_precision = o.p;
    cfg.quant_block = o.block;
    with_world(2, cfg, [&](Engine& e, int rank) {
      Fields before, after;
      std::mutex mu;
      read_fields(e, before, mu);
      try {
        e.load(dir.path.string());
        ADD_FAILURE() << "loading an int8 checkpoint into " << o.names << " did not throw";
      } catch (const Error& err) {
        const std::string msg = err.message();
        EXPECT_NE(msg.find("int8"), std::string::npos) << msg;
        EXPECT_NE(msg.find(o.names), std::string::npos) << msg;
      }
      read_fields(e, after, mu);
      std::string where;
      EXPECT_TRUE(same(before, after, where)) << "a refused load changed the engine at " << where;
      train(e, rank, 0, 1);  // still usable
    });
  }
}

// ---------------------------------------------------------------- checkpoint files
// `steps` steps at `world` ranks, then a save into `dir`: the state saved.
Fields train_and_save(int world, const Config& cfg, int steps, const std::string& dir) {
  Fields saved;
  std::mutex mu;
  with_world(world, cfg, [&](Engine& e, int rank) {
    train(e, rank, 0, steps);
    read_fields(e, saved, mu);
    e.save(dir);
  });
  return saved;
}

// A load from `dir` into a fresh engine at `world` ranks (initialized otherwise): the state loaded.
Fields load_fresh(int world, const Config& cfg, const std::string& dir) {
  Fields loaded;
  std::mutex mu;
  with_world(world, cfg, [&](Engine& e, int) {
    e.load(dir);
    read_fields(e, loaded, mu);
  }, /*seed=*/99);
  return loaded;
}

// Compressed state is stored in its own precision (format 3, checkpoint/field_codec.hpp): per state
// element 4 bytes (fp32), 2 (bf16), or 1 plus one exponent byte per quantization block (int8).
// World 1 and the default chunk: one range and one checksum chunk per tensor and field, so the
// shard file holds exactly sum over tensors of 4 n (master) + states x stored(n).
TEST(CompressedEngine, CheckpointFilesHoldTheStateInItsOwnPrecision) {
  for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8}) {
    SCOPED_TRACE(std::string(name_of(p)));
    TmpDir dir;
    const Config cfg = compressed_config(1, p, OptimizerKind::adamw);
    with_world(1, cfg, [&](Engine& e, int rank) {
      train(e, rank, 0, 2);
      e.save(dir.path.string());
    });
    std::uint64_t expect = 0;
    for (const BlockSpec& b : awkward_model())
      for (const TensorSpec& t : b.tensors) {
        std::uint64_t n = 1;
        for (auto d : t.shape) n *= static_cast<std::uint64_t>(d);
        const std::uint64_t stored = p == StatePrecision::fp32   ? 4 * n
                                     : p == StatePrecision::bf16 ? 2 * n
                                                                 : n + (n + kBlock - 1) / kBlock;
        expect += 4 * n + 2 * (n ? stored : 0);
      }
    std::uint64_t bytes = 0;
    int files = 0;
    for (const auto& f : fs::directory_iterator(dir.path))
      if (f.path().extension() == ".bin") {
        bytes += fs::file_size(f.path());
        ++files;
      }
    EXPECT_EQ(files, 1);
    EXPECT_EQ(bytes, expect);
    // fp32 state keeps format 2, which older readers load; compressed state needs format 3.
    EXPECT_EQ(inspect_checkpoint(dir.path.string()).format_version, p == StatePrecision::fp32 ? 2 : 3);
  }
}

// Checksum chunks of 96 elements: smaller than a quantization block (256 here) and not a divisor
// of it, so blocks straddle chunks (their exponent is stored in both) and ranges end in partial
// chunks and partial blocks. Saved at world 3 stage 2, loaded at world 2 stage 3: the same state.
TEST(CompressedEngine, CheckpointChunksThatSplitBlocksRoundTrip) {
  struct ChunkOf96 {
    ChunkOf96() { ckpt::set_chunk_elems_for_testing(96); }
    ~ChunkOf96() { ckpt::set_chunk_elems_for_testing(0); }
  } chunk;
  for (StatePrecision p : {StatePrecision::int8, StatePrecision::bf16}) {
    SCOPED_TRACE(std::string(name_of(p)));
    TmpDir dir;
    Config from = compressed_config(2, p, OptimizerKind::adamw, DType::bf16);
    from.quant_block = 256;
    Config to = from;
    to.stage = 3;
    const Fields saved = train_and_save(3, from, 3, dir.str());
    const Fields loaded = load_fresh(2, to, dir.str());
    std::string where;
    EXPECT_TRUE(same(saved, loaded, where)) << "loaded state differs from the saved one at " << where;
    verify_checkpoint(dir.str());
  }
}

// A checkpoint of compressed state written before format 3 (one 32-bit word per state element)
// still loads. It is made here from a format-3 checkpoint: every chunk unpacked into words and
// written again, with version 2's offsets and checksums.
TEST(CompressedEngine, AFormatTwoCheckpointOfCompressedStateStillLoads) {
  for (StatePrecision p : {StatePrecision::int8, StatePrecision::bf16}) {
    SCOPED_TRACE(std::string(name_of(p)));
    TmpDir dir, old;
    const Config cfg = compressed_config(2, p, OptimizerKind::adamw, DType::bf16);
    const Fields saved = train_and_save(2, cfg, 3, dir.str());
    ckpt::Manifest m = ckpt::read_manifest(dir.path.string());
    ASSERT_EQ(m.format_version, 3);
    ckpt::Manifest v2 = m;
    v2.format_version = 2;
    v2.files = {ckpt::File{"g1.r0.bin", 0}};
    std::vector<unsigned char> out;
    for (std::size_t t = 0; t < m.tensors.size(); ++t)
      for (std::size_t f = 0; f < m.fields.size(); ++f) {
        const ckpt::FieldCodec codec = ckpt::codec_of(m, static_cast<int>(f));
        for (std::size_t ri = 0; ri < m.tensors[t].fields[f].size(); ++ri) {
          const ckpt::Range& r = m.tensors[t].fields[f][ri];
          ckpt::Range& w = v2.tensors[t].fields[f][ri];
          w.file = 0;
          w.offset = out.size();
          w.hashes.clear();
          std::ifstream in(dir.path / m.files[r.file].name, std::ios::binary);
          std::uint64_t at = r.offset;
          for (std::size_t c = 0; c * m.chunk < r.count; ++c) {
            const std::size_t cb = r.begin + c * m.chunk, cn = std::min(m.chunk, r.count - c * m.chunk);
            std::vector<unsigned char> bytes(ckpt::chunk_bytes(codec, cb, cn));
            in.seekg(static_cast<std::streamoff>(at));
            in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
            ASSERT_TRUE(in.good());
            at += bytes.size();
            std::vector<float> words(cn);
            ckpt::unpack(codec, cb, cn, bytes.data(), words.data());
            w.hashes.push_back(ckpt::xxh64(words.data(), cn * 4));
            const auto* wb = reinterpret_cast<const unsigned char*>(words.data());
            out.insert(out.end(), wb, wb + cn * 4);
          }
        }
      }
    v2.files[0].bytes = out.size();
    std::ofstream(old.path / "g1.r0.bin", std::ios::binary).write(reinterpret_cast<const char*>(out.data()),
                                                                   static_cast<std::streamsize>(out.size()));
    std::ofstream(old.path / ckpt::kManifestName) << ckpt::dump_manifest(v2);
    EXPECT_EQ(inspect_checkpoint(old.path.string()).format_version, 2);
    const Fields loaded = load_fresh(3, cfg, old.str());
    std::string where;
    EXPECT_TRUE(same(saved, loaded, where)) << "the format-2 checkpoint loaded other values at " << where;
  }
}

// ---------------------------------------------------------------- memory and bad input
TEST(CompressedEngine, StateBytesAreCountedByteForByte) {
  for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8}) {
    for (int stage : {0, 3}) {
      SCOPED_TRACE(std::string(name_of(p)) + " stage " + std::to_string(stage));
      RunSpec spec;
      spec.world = 3;
      spec.steps = 1;
      spec.cfg = compressed_config(stage, p, OptimizerKind::adamw, DType::bf16);
      spec.group1 = no_decay(spec.cfg);
      const RunResult r = run_training(spec);
      const MemoryPlan plan = plan_memory(spec.cfg, spec.model, spec.world);
      const Layout L = Layout::build(spec.model, detail::layout_options(spec.cfg, spec.world));
      std::size_t n = 0;  // state elements per rank: the shard (stages 1-3) or every unit
      for (const auto& u : L.units()) n += stage == 0 ? u.padded_elems : u.slice_elems;
      const std::size_t expect = 2 * state_bytes(p, n, kBlock);
      for (int rank = 0; rank < spec.world; ++rank) {
        const auto cat = static_cast<int>(Category::optimizer_state);
        EXPECT_EQ(r.memory[rank].current[cat][static_cast<int>(Place::device)], expect);
        EXPECT_EQ(plan.report().current[cat][static_cast<int>(Place::device)], expect);
      }
    }
  }
}

TEST(CompressedEngine, BadConfigurationsAreNamedErrors) {
  Config c = compressed_config(1, StatePrecision::int8, OptimizerKind::adamw);
  for (std::size_t b : {std::size_t(0), std::size_t(32), std::size_t(100), std::size_t(8192)}) {
    c.quant_block = b;
    try {
      c.validate();
      ADD_FAILURE() << "quant_block " << b << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("quant_block = " + std::to_string(b)), std::string::npos) << e.message();
    }
  }
  c.quant_block = 100;
  c.state_precision = StatePrecision::bf16;
  EXPECT_NO_THROW(c.validate()) << "the block size is read only for int8";
  c.state_precision = static_cast<StatePrecision>(7);
  EXPECT_THROW(c.validate(), Error);
  c.state_precision = StatePrecision::int8;
  c.quant_block = 256;
  c.offload_optimizer = OffloadKind::host;
  EXPECT_NO_THROW(c.validate()) << "host offload keeps the compressed form";
  c.offload_optimizer = OffloadKind::nvme;
  c.nvme_dir = "/tmp";
  EXPECT_NO_THROW(c.validate()) << "so does the NVMe state file";
}

// ---------------------------------------------------------------- offload
// Host offload keeps the compressed form in pinned memory and updates it on the CPU with the same
// kernels and the same dither indices: the same bits as without offload, in cells of 1024
// elements (several per rank) so the pipeline's cell cuts are crossed.
TEST(CompressedEngine, HostOffloadGivesTheSameBitsAsNoOffload) {
  detail::set_offload_chunk_for_testing(1024);
  struct Case {
    int stage, world;
    bool params;
  };
  for (StatePrecision p : {StatePrecision::int8, StatePrecision::bf16})
    for (const Case& c : {Case{1, 1, false}, Case{2, 2, false}, Case{3, 3, true}, Case{0, 2, false}}) {
      SCOPED_TRACE(std::string(name_of(p)) + " stage " + std::to_string(c.stage) + " world " + std::to_string(c.world) +
                   (c.params ? " + parameters" : ""));
      Config cfg = compressed_config(c.stage, p, OptimizerKind::adamw, DType::bf16);
      const Fields plain = run(cfg, c.world, 6);
      cfg.offload_optimizer = OffloadKind::host;
      cfg.offload_params = c.params;
      const Fields off = run(cfg, c.world, 6);
      std::string where;
      EXPECT_TRUE(same(plain, off, where)) << "host offload differs at " << where;
      // NVMe: the state file's cells hold [master | codes, scales | codes, scales].
      TmpDir dir;
      cfg.offload_optimizer = OffloadKind::nvme;
      cfg.nvme_dir = dir.path.string();
      const Fields nvme = run(cfg, c.world, 6);
      EXPECT_TRUE(same(plain, nvme, where)) << "nvme offload differs at " << where;
    }
  detail::set_offload_chunk_for_testing(0);
}

// NVMe: memory_report() at Place::disk is the state file, byte for byte (two generations of every
// cell: 4 bytes of master and the compressed state per element, the cell padded to 4 KiB, and the
// header), and the file on disk has that size.
TEST(CompressedEngine, NvmeFileHoldsTheCompressedBytes) {
  for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8}) {
    SCOPED_TRACE(name_of(p));
    TmpDir dir;
    Config cfg = compressed_config(3, p, OptimizerKind::adamw, DType::bf16);
    cfg.offload_optimizer = OffloadKind::nvme;
    cfg.nvme_dir = dir.path.string();
    const int world = 2;
    const Layout L = Layout::build(awkward_model(), detail::layout_options(cfg, world));
    const std::size_t n = L.shard_elems();
    const std::size_t C = (n + 1023) / 1024 * 1024;  // one cell (the default is 1 Mi elements)
    const std::size_t state_cell = p == StatePrecision::fp32 ? 4 * C : p == StatePrecision::bf16 ? 2 * C : C + 4 * (C / kBlock);
    const std::size_t cell = (4 * C + 2 * state_cell + 4095) / 4096 * 4096;
    std::vector<MemoryReport> got(world);
    std::vector<std::uintmax_t> file(world, 0);
    std::mutex mu;
    with_world(world, cfg, [&](Engine& e, int rank) {
      train(e, rank, 0, 2);
      std::lock_guard<std::mutex> lock(mu);
      got[rank] = e.memory_report();
      for (const auto& f : fs::directory_iterator(dir.path))
        if (f.is_regular_file() && f.path().filename().string().rfind("shardopt-optimizer-rank" + std::to_string(rank) + "-", 0) == 0)
          file[rank] = f.file_size();
    });
    const auto disk = static_cast<int>(Place::disk);
    const auto st = static_cast<int>(Category::optimizer_state);
    for (int rank = 0; rank < world; ++rank) {
      std::size_t total = 0;
      for (int c = 0; c < kCategoryCount; ++c) total += got[rank].current[c][disk];
      EXPECT_EQ(got[rank].current[st][disk], 2 * 2 * state_cell);
      EXPECT_EQ(total, 8192 + 2 * cell);
      EXPECT_EQ(file[rank], total) << "the state file of rank " << rank;
    }
  }
}

// Bytes per element of state in pinned host memory with host offload and an fp32 master:
// 4 + 2 * 4 (fp32), 4 + 2 * 2 (bf16), 4 + 2 * (1 + 4/B) (int8), counted by memory_report() and
// predicted by plan_memory() byte for byte.
TEST(CompressedEngine, HostOffloadHoldsTheCompressedBytes) {
  for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8}) {
    SCOPED_TRACE(name_of(p));
    Config cfg = compressed_config(2, p, OptimizerKind::adamw, DType::bf16);
    cfg.offload_optimizer = OffloadKind::host;
    const int world = 2;
    const Layout L = Layout::build(awkward_model(), detail::layout_options(cfg, world));
    const std::size_t n = L.shard_elems();
    const std::size_t expect_state = 2 * state_bytes(p, n, kBlock);
    const MemoryPlan plan = plan_memory(cfg, awkward_model(), world);
    std::vector<MemoryReport> got(world);
    std::mutex mu;
    with_world(world, cfg, [&](Engine& e, int rank) {
      train(e, rank, 0, 1);
      std::lock_guard<std::mutex> lock(mu);
      got[rank] = e.memory_report();
    });
    const auto pinned = static_cast<int>(Place::pinned_host);
    const auto st = static_cast<int>(Category::optimizer_state), ma = static_cast<int>(Category::master_weights);
    for (const MemoryReport& r : got) {
      EXPECT_EQ(r.current[st][pinned], expect_state);
      EXPECT_EQ(r.current[ma][pinned], 4 * n);
      EXPECT_EQ(r.current[st][static_cast<int>(Place::device)], 0u);
      EXPECT_EQ(r.current[st][pinned], plan.report().current[st][pinned]);
    }
  }
}

}  // namespace
