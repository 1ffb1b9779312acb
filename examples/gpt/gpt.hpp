#pragma once
// The GPT trainer: GPT-2's architecture (model.hpp) on token data (data.hpp), driven by the
// shardopt engine over in-process ranks on the CPU, or one rank per process under a launcher
// (TrainOptions::bootstrap).
//
// Each transformer layer is one engine block, the embeddings and the final LayerNorm are their
// own, so at stage 3 one block's parameters are gathered at a time (with prefetch). Forward
// acquires and releases block by block; backward adds each block's gradient into
// gradients(block) and reports grads_ready block by block, so stages 2-3 reduce-scatter while
// backward goes on. The token embedding is also the LM head: its block's gradient buffer stays
// open from the head's backward (first) to the embedding's (last).
//
// Memory the trainer itself holds per rank (activation_bytes()): the residual stream of every
// layer, each layer's saved activations (or one layer's with recompute), the logits, backward
// scratch and, with a 16-bit compute dtype, one block's parameters and gradients widened to fp32
// (the BLAS has no 16-bit GEMM). No copy of the model exists outside the engine.
//
// This file uses only shardopt's public API.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model.hpp"
#include "shardopt/shardopt.hpp"

namespace gpt {

struct TrainOptions {
  Shape shape;
  int seq = 64;       // tokens per sequence (<= shape.max_seq)
  int batch = 4;      // sequences per micro-batch per rank
  int ranks = 4;      // in-process ranks (threads)
  int steps = 100;
  std::uint64_t seed = 1;  // initial weights
  unsigned threads = 0;    // engine kernel threads shared by all ranks (0: the machine's)
  shardopt::Config config;
  std::string data;        // token file (data.hpp); required
  std::string init_from;   // safetensors file, or a directory holding model.safetensors
  // Engine::load after initialize. The data and step count go on from the checkpoint's trainer
  // record ({"next_step": N}, ../step_checkpoints.hpp), or its update count if it has none.
  std::string resume_dir;
  std::string save_dir;    // Engine::save after the last step (with the record), plus model_config.json
  // Background checkpoints every save_every steps into checkpoints_dir/step-NNNNNN (each with its
  // model_config.json), the newest `keep` complete ones kept: shardopt_examples::PeriodicSaver,
  // as in the MLP trainer (0: none).
  int save_every = 0;
  int keep = 2;
  std::string checkpoints_dir;
  bool recompute = false;  // keep only each layer's input; recompute its activations in backward
  bool collect_master = false;  // fill TrainResult::master (a full fp32 copy: tests, and the CLI's digest)
  // One rank per process (a launcher's job), as in the MLP trainer (../mlp/mlp.hpp): when set,
  // this process runs rank bootstrap->rank() of bootstrap->world_size() with the communicator
  // make_communicator returns for its backend, and `ranks` is ignored. The data a rank reads, the
  // step losses (exchanged through the bootstrap and averaged in rank order) and, with
  // collect_master, the full master (gathered through the bootstrap onto every process) are
  // those of the same number of in-process ranks; `memory` holds this process's rank only.
  shardopt::Bootstrap* bootstrap = nullptr;
  std::function<std::unique_ptr<shardopt::Communicator>(shardopt::Backend&)> make_communicator;
  int blas_threads = 0;  // as mlp::TrainOptions::blas_threads (0: cores / rank threads here)
  // Under a bootstrap: this process's rank on its machine. The CUDA trainer runs it on device
  // local_rank modulo the visible devices (in-process ranks all use device 0).
  int local_rank = 0;
};

struct StepRecord {
  int step = 0;                // 1-based
  double loss = 0;             // mean over ranks and micro-steps
  double step_ms = 0;          // wall time of the whole step (all ranks)
  bool applied = true;
  float loss_scale = 1;
  double grad_norm = 0;
  float lr = 0;                // the learning rate group 0's update applied (after the schedule)
  std::size_t rank_bytes = 0;  // rank 0's current engine bytes, all places
};

struct TrainResult {
  std::size_t params = 0;
  std::vector<StepRecord> steps;
  int skipped_steps = 0;
  std::vector<std::string> tensor_names;
  std::vector<std::vector<float>> master;        // with collect_master only
  std::vector<shardopt::MemoryReport> memory;    // per rank of this process, at the end
  std::size_t activation_bytes = 0;              // per rank, outside the engine
  std::size_t tokens_per_step = 0;               // all ranks and micro-steps
};

// The trainer's own bytes per rank (see the header comment).
std::size_t activation_bytes(const Shape& s, int batch, int seq, shardopt::DType compute, bool recompute);

// Validates every option (Error naming it: sizes, the data file and its largest token against
// the vocabulary, --init-from's tensors and shapes) before any rank starts, then runs the ranks.
// on_step is called once per step, in order, from one thread. Throws the first rank's Error.
// With a bootstrap every process calls train() with the same options (the bootstrap's world
// size replaces `ranks`).
TrainResult train(const TrainOptions& options, const std::function<void(const StepRecord&)>& on_step = {});

// Where one rank runs: its backend, its ops, and the memory they work on. train() uses the CPU
// (host memory, CpuOps, the CPU backend); cuda/train_cuda.hpp the GPU. Calls come in this order
// from the rank's own thread: backend(), bind(engine) once the engine exists, then ops(),
// floats(), ints() and upload() (buffers stay valid until the RankEnv is destroyed, after the
// engine). A 16-bit compute dtype needs host_memory() (the fp32 widening runs on the host).
class RankEnv {
 public:
  virtual ~RankEnv() = default;
  virtual std::unique_ptr<shardopt::Backend> backend() = 0;
  virtual void bind(shardopt::Engine& engine) = 0;
  virtual const Ops<float>& ops() const = 0;
  virtual float* floats(std::size_t n) = 0;
  virtual std::int32_t* ints(std::size_t n) = 0;
  // Copies n tokens from host memory to dst (the env's memory); src may be reused on return.
  virtual void upload(std::int32_t* dst, const std::int32_t* src, std::size_t n) = 0;
  virtual bool host_memory() const = 0;
};
using RankEnvFactory =
    std::function<std::unique_ptr<RankEnv>(int rank, std::shared_ptr<shardopt::ThreadPool> cpu_pool)>;
// train() with each rank's environment from `make_env` (same validation and results).
TrainResult train_with(const TrainOptions& options, const std::function<void(const StepRecord&)>& on_step,
                       const RankEnvFactory& make_env);

// model_config.json, written beside a checkpoint by train(): the shape, which the checkpoint's
// tensor shapes alone do not give (the number of heads).
void write_model_config(const std::string& dir, const Shape& s);
Shape read_model_config(const std::string& dir);
// Hugging Face's config.json for GPT2LMHeadModel with this shape (dropout off); torch_dtype names
// the exported tensors' type (fp32, bf16 or fp16).
void write_hf_config(const std::string& path, const Shape& s, shardopt::DType dtype = shardopt::DType::fp32);

// Samples `count` tokens after `prompt` from the model in checkpoint `dir` (its fp32 master
// weights): temperature 0 is greedy, otherwise softmax(logits / temperature), seeded. The
// context is the last max_seq tokens. Returns only the new tokens.
std::vector<std::int32_t> generate(const std::string& dir, const std::vector<std::int32_t>& prompt, int count,
                                   double temperature, std::uint64_t seed);

// Best GFLOP/s of an m x n x k sgemm over `reps` runs with `threads` BLAS threads: the GEMM peak
// MFU is measured against.
double measure_sgemm_gflops(int m, int n, int k, int threads, int reps);

}  // namespace gpt
