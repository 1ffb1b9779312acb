#pragma once
// The example trainer: a stack of residual MLP blocks learning a fixed random teacher network.
//
//   block l:  y = x + W2 · gelu(W1 · x + b1) + b2      W1 [4h, h], b1 [4h], W2 [h, 4h], b2 [h]
//
// The student and the teacher have the same architecture; the teacher's weights come from a
// seeded hash (a different stream from the student's seeded_init), inputs are Gaussian, the loss
// is the mean squared error over batch and features. Everything is deterministic by seed: each
// rank draws its own inputs from a counter-based generator keyed by (seed + rank, step,
// micro-step), so a run does not depend on thread scheduling.
//
// Forward and backward are hand-written with fp32 GEMMs (cblas_sgemm) on the host. With a 16-bit
// compute dtype the acquired parameters are widened to fp32 for the GEMMs and the gradients are
// rounded back and added into the engine's gradient buffers (the gradient contract of engine.hpp).
//
// This file and mlp.cpp use only shardopt's public API: they are the model of how an existing
// C++ trainer plugs shardopt in.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../step_checkpoints.hpp"
#include "shardopt/shardopt.hpp"

namespace mlp {

struct Shape {
  int layers = 4;
  int hidden = 128;
};

// Blocks as the engine registers them: layer l is two blocks, "block<l>.fc1" (tensors
// "block<l>.w1", "block<l>.b1") and "block<l>.fc2" ("block<l>.w2", "block<l>.b2"), each linear
// layer its own block as FSDP wraps each module: a unit (and so a gradient bucket, a gathered
// slot at stage 3) is then half a layer, which halves the engine's bounded device buffers.
// Biases are in parameter group 1 (no weight decay).
std::vector<shardopt::BlockSpec> blocks(const Shape& shape);
std::size_t param_count(const Shape& shape);
// Bytes of fp32 activations and scratch one rank of train() keeps for micro-batches of `batch`
// rows, including the fp32 copies of one block's parameters and gradients that a 16-bit compute
// dtype needs (the trainer's own memory, outside the engine and its memory report).
std::size_t activation_bytes(const Shape& shape, int batch, shardopt::DType compute);

// ---- the math of one block, fp32, row-major, a batch of B rows ------------------------------
struct BlockParams {
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
};
struct BlockGrads {  // gradients are ADDED here
  float* w1;
  float* b1;
  float* w2;
  float* b2;
};

float gelu(float a) noexcept;
float gelu_derivative(float a) noexcept;

// x [B,h] -> y [B,h]; keeps a = W1 x + b1 and u = gelu(a) ([B,4h] each) for backward.
void block_forward(int B, int h, const BlockParams& p, const float* x, float* a, float* u, float* y);
// dy [B,h] -> dx [B,h]; adds dL/dparams into g. da is scratch [B,4h]. dx may not alias dy.
void block_backward(int B, int h, const BlockParams& p, const float* x, const float* a,
                    const float* u, const float* dy, float* dx, const BlockGrads& g, float* da);

// Mean squared error over B*h elements; writes dy = scale * dL/dy.
double mse_loss(std::size_t n, const float* y, const float* target, float scale, float* dy);

// ---- data --------------------------------------------------------------------------------------
// Standard normal values from a counter-based generator: value i of stream `key`. Written here
// rather than taken from <random> so that the data, and so the param digest, are the same with
// every standard library.
float normal(std::uint64_t key, std::uint64_t i) noexcept;
std::uint64_t stream_key(std::uint64_t seed, std::uint64_t a, std::uint64_t b, std::uint64_t c) noexcept;

// The fixed teacher (fp32, shared read-only by every rank).
class Teacher {
 public:
  Teacher(const Shape& shape, std::uint64_t seed);
  // x [B,h] -> y [B,h]. Thread-safe (const, scratch owned by the caller).
  void forward(int B, const float* x, float* y, std::vector<float>& scratch) const;
  const std::vector<float>& weights() const noexcept { return w_; }

 private:
  Shape shape_;
  std::vector<float> w_;  // per block: w1, b1, w2, b2
};

// ---- the multi-rank trainer ------------------------------------------------------------------
struct TrainOptions {
  Shape shape;
  int batch = 32;  // rows per micro-batch per rank
  int ranks = 4;   // in-process ranks (threads)
  int steps = 100;
  std::uint64_t seed = 1;
  unsigned threads = 0;  // kernel threads shared by all ranks (0: the machine's)
  shardopt::Config config;  // stage, dtypes, optimizer, accumulation_steps, ...
  std::string resume_dir;   // non-empty: Engine::load from this checkpoint after initialize
  std::string save_dir;     // non-empty: Engine::save into this directory after the last step
  // The first step's number (0 for a new run). A resumed run passes the checkpoint's next_step
  // (read_next_step): the data stream is a function of the step number, so 10 steps, a save and
  // 10 resumed steps see the same batches as 20 steps. Saves record first_step + steps.
  int first_step = 0;
  // Background checkpoints during the run (0: none): after every step whose number (first_step +
  // steps taken) is a multiple of save_every, save_async into step_checkpoint_dir(checkpoints_dir,
  // N), the last step excepted (save_dir covers it). One save is in flight at a time: it is
  // committed (wait_save) max(1, save_every / 2) steps later, or before the next save or the end
  // of the run if sooner. After each commit the newest `keep` complete step checkpoints are kept
  // and older ones deleted (prune_step_checkpoints), so one complete checkpoint exists at all
  // times once the first is committed. A save that fails throws from train() on every rank.
  int save_every = 0;
  int keep = 2;
  std::string checkpoints_dir;
  // One rank per process (a launcher's job): when set, this process runs rank bootstrap->rank()
  // of bootstrap->world_size(), with the communicator make_communicator returns for its backend,
  // and `ranks` is ignored. Losses and the full master (for the digest) are exchanged through the
  // bootstrap, so every process gets the same TrainResult but for `memory` and
  // `last_step_comm`, which hold this process's rank only.
  shardopt::Bootstrap* bootstrap = nullptr;
  std::function<std::unique_ptr<shardopt::Communicator>(shardopt::Backend&)> make_communicator;
  // Threads each rank's matrix products may use (OpenBLAS only). 0: the machine's cores divided
  // by the rank threads of this process. The count can change the products' bits for large
  // enough matrices, so a job launched one rank per process gives the count its ranks would have
  // as threads of one process on the same machine (cores / ranks per machine) to reproduce them.
  int blas_threads = 0;
};

// The trainer's record in its checkpoints ({"next_step": N}) and its reading; 0 for a checkpoint
// without one. Throws Error(invalid_argument) for a record that is not the trainer's.
using shardopt_examples::checkpoint_record;
using shardopt_examples::read_next_step;

// Step checkpoints (../step_checkpoints.hpp): DIR/step-NNNNNN, listed and pruned.
using shardopt_examples::list_step_checkpoints;
using shardopt_examples::prune_step_checkpoints;
using shardopt_examples::step_checkpoint_dir;
using shardopt_examples::StepCheckpoint;

struct StepRecord {
  int step = 0;                // 1-based
  double loss = 0;             // mean over ranks and micro-steps
  double step_ms = 0;          // wall time of the whole step (all ranks)
  bool applied = true;
  float loss_scale = 1;
  double grad_norm = 0;
  float lr = 0;                // learning rate the step applied (group 0; the last applied if skipped)
  std::size_t rank_bytes = 0;  // rank 0's current engine bytes, all places
};

struct TrainResult {
  std::size_t params = 0;
  std::vector<StepRecord> steps;
  int skipped_steps = 0;
  std::vector<std::string> tensor_names;
  std::vector<std::vector<float>> master;    // full fp32 master values per tensor, from all ranks
  std::vector<shardopt::MemoryReport> memory;  // per rank, at the end
  std::vector<shardopt::CommStats> last_step_comm;  // per rank, traffic of the last step
  std::size_t activation_bytes = 0;           // per rank, outside the engine
};

// Validates the options (Error naming the field) before starting any thread, then runs every
// rank on its own thread. on_step (optional) is called once per step, in order, from one thread,
// after every rank finished the step. Throws the first rank's Error if a rank fails.
TrainResult train(const TrainOptions& options,
                  const std::function<void(const StepRecord&)>& on_step = {});

// FNV-1a 64 over the bit patterns of the values, tensor after tensor (little-endian bytes).
std::uint64_t digest(const std::vector<std::vector<float>>& tensors) noexcept;

}  // namespace mlp
