#pragma once
// The subcommands of the shardopt command line: their arguments and what runs them.
#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "mlp.hpp"
#include "shardopt/shardopt.hpp"

namespace shardopt::cli {

using Json = nlohmann::ordered_json;

// A mistake on the command line the parser cannot see (a flag's value valid alone but not with
// the others, or a feature this build lacks). The message starts with the flag at fault.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Validators for values CLI11's own checks let through. CLI11 parses an unsigned option with
// strtoull, which takes "-1" as 2^64-1 and "010" as octal 8; and its number checks pass nan
// (every comparison with it is false) and inf.
// A decimal integer without a sign, within 0..2^64-1.
const CLI::Validator& unsigned_integer();
// A finite number > 0 (positive_finite) or >= 0 (non_negative_finite).
const CLI::Validator& positive_finite();
const CLI::Validator& non_negative_finite();
// A non-empty path ("" would otherwise read as "not given").
const CLI::Validator& non_empty_path();

// The model and engine settings shared by train, estimate and plan.
struct ModelArgs {
  std::string params;      // a count ("1.3B"); empty: the example model (layers x hidden)
  int layers = 4;
  int hidden = 128;
  int blocks = 32;         // with --params: equal blocks
  int batch = 32;          // rows per micro-batch per rank (example model activations)
  std::string dtype = "fp32";
  std::string optimizer = "adamw";
  std::string bucket = "auto";
  int prefetch = 2;
  int stage = 0;
  int micro_steps = 1;
  std::string offload = "none";
  std::string nvme_dir;
  bool offload_params = false;  // --offload-params (train and estimate; stage 3 with offload)
  std::string state_precision = "fp32";  // --state-precision fp32|bf16|int8 (Config::state_precision)
  bool state_precision_given = false;    // --state-precision was on the command line (plan keeps it)
  std::size_t quant_block = 256;         // --quant-block: int8 block size (Config::quant_block)
};

struct Model {
  std::vector<BlockSpec> blocks;
  std::uint64_t params = 0;
  bool example = false;  // the example MLP (so its activations are known)
  mlp::Shape shape;
  std::string description;
};

// Adds --params/--layers/--hidden/--blocks/--dtype/--optimizer/--bucket/--prefetch/--stage/
// --micro-steps/--offload/--nvme-dir/--state-precision/--quant-block to `sub` (with_params: --params and --blocks too; with_stage:
// --stage and --offload-params).
void add_model_options(CLI::App* sub, ModelArgs& a, bool with_params, bool with_stage);
// The --optimizer choices: every rule of shardopt/rules/list.hpp, in list order.
std::vector<std::string> rule_choices();
// The learning rate a rule trains with when --lr is not given (its header's default_lr).
double default_lr(OptimizerKind k);
// The learning rate (--lr or the rule's default), weight decay, schedule and clipping of `train`. Without
// --decay-steps the schedule spans the whole run: a resumed run's first_step plus its --steps.
struct TrainArgs;
void apply_optimizer_args(const TrainArgs& a, Config& c, int first_step);
Model build_model(const ModelArgs& a);
// Checks --offload/--nvme-dir/--offload-params together: UsageError naming the flag at fault
// (--nvme-dir with and only with nvme; --offload-params at stage 3 with host or nvme offload).
void check_offload(const ModelArgs& a);
bool parse_offload(const std::string& text, OffloadKind& out);
Config build_config(const ModelArgs& a, const Model& m);
// "auto" bucket: 1/16 of the model's compute-dtype bytes (so a model spans ~16 units and stage 3
// holds a fraction of it), as a power of two within [64 KiB, 25 MiB] (25 MiB: the engine default).
std::size_t auto_bucket_bytes(std::uint64_t params, DType compute);

// Peak (or planned) bytes per place and category, with "total" per place.
Json bytes_json(const MemoryReport& r, bool peak);
// A table of bytes per category (rows) and place (columns holding anything).
std::string bytes_table(const MemoryReport& r, bool peak);

// train --model gpt (src/cli/gpt.cpp).
struct GptArgs {
  std::string model = "mlp";
  std::string preset;       // empty: --layers/--heads/--hidden/--vocab/--positions
  int heads = 4;
  int vocab = 256;
  int positions = 0;        // 0: --seq
  int seq = 64;
  std::string data, init_from;
  bool recompute = false;
  // Whether the shared flags were given (their defaults are the MLP's).
  bool batch_given = false, layers_given = false, hidden_given = false;
};

struct TrainArgs {
  ModelArgs model;
  GptArgs gpt;
  std::string backend = "cpu";
  int ranks = 4;
  bool ranks_given = false;  // --ranks on the command line (an error under a launcher)
  double lr = 0;  // 0: the optimizer's default
  std::string lr_schedule = "constant";
  std::int64_t warmup = 0;
  std::int64_t decay_steps = 0;  // 0: --steps
  double min_lr = 0.0;
  double weight_decay = 0.0;
  double clip = 0.0;
  int steps = 100;
  std::uint64_t seed = 1;
  unsigned threads = 0;
  std::string save, resume, metrics;
  int save_every = 0;  // 0: no background checkpoints
  int keep = 2;
  bool keep_given = false;
  bool json = false;
};
CLI::App* add_train(CLI::App& app, TrainArgs& a);
int run_train(const TrainArgs& a, Io& io);
// Flag combinations of train the parser cannot check (UsageError naming the flag).
void check_train_flags(const TrainArgs& a);
// --resume auto: sets a.resume to the newest complete checkpoint of --save DIR (DIR itself or
// DIR/step-NNNNNN, by the step its trainer record names), or clears it if there is none. Returns
// the line to tell the user ("" if --resume was not auto).
std::string resolve_resume_auto(TrainArgs& a);
// Before training: --save DIR is created if missing, probed with a write, and checked for room for
// this run's checkpoints (`params` master values and the rule's states in cfg's state precision); with --save-every, no
// complete step checkpoint of DIR may be ahead of `first_step` (another run's). UsageError naming
// the flag and the reason.
void check_train_outputs(const TrainArgs& a, std::uint64_t params, const Config& cfg, int first_step);

// Before any rank thread starts: under an address-space limit (ulimit -v, RLIMIT_AS), whether
// what is left of it holds what this process will map: the engine's buffers (`engine_bytes` per
// rank, plan_memory's sum), the trainer's own (`trainer_bytes` per rank, `shared_bytes` once),
// OpenBLAS's 128 MiB buffer for every thread that can be inside a product at once (OpenBLAS
// retries a refused mapping forever: a run short of address space would hang instead of
// failing), the threads' stacks and malloc's arenas. Error(out_of_memory) naming the limit, what
// is left and what the run needs, otherwise nothing. Under a limit it also caps glibc's malloc
// arenas (64 MiB of address space each, one per thread by default) so that the limit goes to
// memory that is used. No-op without a limit.
void check_address_space(std::uint64_t engine_bytes, std::uint64_t trainer_bytes, std::uint64_t shared_bytes,
                         int ranks_here);
// Across processes the trainers gather every master value through the bootstrap at the end (for
// the param_digest), and a bootstrap call carries at most 1 GiB (TCP) or 2 GiB (MPI's int
// counts): checked before training (UsageError naming `flag` and the sizes), not after it.
void check_master_gather(const Bootstrap& boot, std::uint64_t params, std::size_t tensors, const std::string& flag);
// One rank's engine bytes in memory (every buffer plan_memory plans, transient ones included; not
// the disk's), for check_address_space.
std::uint64_t planned_memory_bytes(const Config& config, const std::vector<BlockSpec>& blocks, int world);

// The job a launcher started this process in (mpirun, srun, torchrun-style variables): one rank
// per process, joined through the bootstrap. Without a launcher `bootstrap` is null and the
// trainer runs --ranks in-process ranks. Members are destroyed in reverse order: the MPI session
// (declared first) finalizes MPI after the bootstrap is gone.
struct LaunchedJob {
  std::string launcher;  // "mpirun", "srun", "torchrun"; empty: none
  std::unique_ptr<MpiSession> mpi;
  std::unique_ptr<Bootstrap> bootstrap;
  std::function<std::unique_ptr<Communicator>(Backend&)> make_communicator;
  // The threads each rank's matrix products get: the cores divided by the ranks on this machine
  // (the launcher's local size; the whole world if it does not say), as in-process ranks get
  // them, so that the products, and so the digest, are those of as many in-process ranks.
  int blas_threads = 0;
  // This process's rank among the job's processes on this machine (the launcher's local rank; the
  // global rank modulo ranks_on_this_machine if it does not say): with --backend cuda, its GPU is
  // local_rank modulo the visible devices.
  int local_rank = 0;
};
// Joins the launcher's job, if any: UsageError for --ranks under a launcher, for a launcher this
// build or `--backend` cannot serve; the bootstrap's own Error for a rendezvous that fails. `who`
// names the trainer in messages. With `cuda_supported` and --backend cuda the ranks' collectives are
// NCCL's, joined through the launcher's bootstrap (MPI under mpirun, TCP otherwise); else the CPU
// communicator of the launcher (MPI, or TCP).
void join_launched_job(const TrainArgs& a, LaunchedJob& job, const std::string& who, bool cuda_supported = false);

// --metrics FILE: opened (UsageError naming it if it cannot be) before training; one line per step,
// flushed. A write that fails is reported on `warn` once and stops the log, not the run; close()
// then throws Error(io_error) naming the file, so the run exits non-zero after its results.
class MetricsFile {
 public:
  explicit MetricsFile(std::string path);
  void write(const std::string& line, int step, std::ostream& warn);
  void close();

 private:
  std::string path_;
  std::ofstream out_;
  bool failed_ = false;
  std::string reason_;
};
void add_gpt_train_options(CLI::App* train, GptArgs& g);
// The GPT shape flags alone (--model --preset --heads --vocab --positions --seq --recompute).
void add_gpt_shape_options(CLI::App* sub, GptArgs& g);
// The model of --model gpt (UsageError naming the flag at fault) and its trainer's bytes per rank.
Model build_gpt_model(const GptArgs& g, const ModelArgs& m);
std::size_t gpt_activation_bytes(const GptArgs& g, const ModelArgs& m, DType compute);
// `resume_note`: resolve_resume_auto's line, printed by the process that prints.
int run_train_gpt(const TrainArgs& a, Io& io, const std::string& resume_note);

struct GenerateArgs {
  std::string checkpoint, prompt;
  int tokens = 200;
  double temperature = 0.8;
  std::uint64_t seed = 1;
  bool ids = false;
};
CLI::App* add_generate(CLI::App& app, GenerateArgs& a);
int run_generate(const GenerateArgs& a, Io& io);

struct TokenizeArgs {
  bool bytes = false;
  std::string in, out;
};
CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& a);
int run_tokenize(const TokenizeArgs& a, Io& io);

// A checkpoint written by train --model gpt (it has model_config.json beside its manifest).
bool is_gpt_checkpoint(const std::string& dir);
// Writes OUT/model.safetensors and OUT/config.json (Hugging Face GPT2LMHeadModel).
int run_gpt_export(const std::string& dir, const std::string& out, DType dtype, Io& io);

// The device memory a CUDA process holds that no allocation of the engine or the trainer shows:
// the context (its code, its kernels' modules, the driver's tables) and the libraries' handles
// and workspaces (cuBLAS). Not measured here: an assumption, about what a CUDA 12 context with
// lazy module loading and one cuBLAS handle take on a current data-centre GPU; --cuda-context
// replaces it.
inline constexpr const char* kCudaContextDefault = "512MiB";

struct EstimateArgs {
  ModelArgs model;
  GptArgs gpt;  // --model gpt: the GPT's blocks, and its trainer's activations at --seq/--batch
  int world = 4;
  std::string backend = "cpu";  // cuda: the device total adds the activations and the CUDA context
  std::string cuda_context = kCudaContextDefault;
  std::string borrowed;  // --borrowed: "params", "grads" or both, comma-separated
  bool borrowed_given = false;  // (an empty --borrowed is an error, not "nothing borrowed")
  bool json = false;
};
CLI::App* add_estimate(CLI::App& app, EstimateArgs& a);
int run_estimate(const EstimateArgs& a, Io& io);

struct PlanArgs {
  ModelArgs model;
  GptArgs gpt;  // --model gpt: the GPT's blocks and its trainer's activations
  int gpus = 1;
  std::string gpu_mem, host_mem, nvme, activations;
  std::string cuda_context = kCudaContextDefault;
  std::string largest;  // "layers" or "params": search the largest model of the shape that fits
  double headroom = 0.10;
  // --borrowed: "params", "grads" or both, comma-separated: the trainer keeps these arrays itself
  // (on the GPU) and lends them to the engine; every configuration is planned with them borrowed.
  std::string borrowed;
  bool borrowed_given = false;  // (an empty --borrowed is an error, not "nothing borrowed")
  bool deepspeed = false;  // print DeepSpeed's estimator's figures for the same model
  bool json = false;
};
CLI::App* add_plan(CLI::App& app, PlanArgs& a);
int run_plan(const PlanArgs& a, Io& io);

struct BenchArgs {
  std::string params = "16M";
  unsigned threads = 0;
  std::string dtype = "bf16";
  std::string optimizer = "adamw";
  std::string backend = "cpu";
  int iters = 10;
  bool json = false;
};
CLI::App* add_bench(CLI::App& app, BenchArgs& a);
int run_bench(const BenchArgs& a, Io& io);

struct CheckpointArgs {
  std::string dir, out;
  std::string dtype = "fp32";
  bool verify = false;
  bool json = false;
};
struct CheckpointCommands {
  CLI::App* inspect = nullptr;
  CLI::App* exporter = nullptr;
};
CheckpointCommands add_checkpoint(CLI::App& app, CheckpointArgs& a);
int run_checkpoint_inspect(const CheckpointArgs& a, Io& io);
int run_checkpoint_export(const CheckpointArgs& a, Io& io);

// The CUDA backend check shared by train and bench (UsageError naming --backend).
// Refuses --backend cuda with a usage error saying why: no device, or `what` has no CUDA path.
void check_backend(const std::string& backend, const char* what, bool cuda_supported = false);

}  // namespace shardopt::cli
