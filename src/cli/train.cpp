// shardopt train: the example trainer (examples/mlp) driven from the command line.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "units.hpp"

namespace shardopt::cli {

namespace fs = std::filesystem;

CLI::App* add_train(CLI::App& app, TrainArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "train", "Train the example model (residual MLP blocks learning a fixed teacher) over in-process ranks");
  sub->add_option("--backend", a.backend, "cpu (the example model's matrix products have no CUDA path)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  sub->add_option("--ranks", a.ranks,
                  "data-parallel ranks as threads of this process (under mpirun, srun or torchrun-style variables each "
                  "process is one rank instead)")
      ->check(CLI::Range(1, 1024))->capture_default_str();
  add_model_options(sub, a.model, /*with_params=*/false, /*with_stage=*/true);
  std::string lr_help = "learning rate (default:";
  for (const std::string& r : rule_choices()) {
    OptimizerKind k{};
    parse_optimizer(r, k);
    std::ostringstream os;
    os << (lr_help.back() == ':' ? " " : ", ") << default_lr(k) << " " << r;
    lr_help += os.str();
  }
  sub->add_option("--lr", a.lr, lr_help + ")")
      ->check(positive_finite());
  sub->add_option("--lr-schedule", a.lr_schedule,
                  "learning-rate schedule after the warm-up: constant, cosine or linear decay to --min-lr at "
                  "--decay-steps, inverse-sqrt (lr*sqrt(max(warmup,1)/step), not below --min-lr)")
      ->check(CLI::IsMember({"constant", "cosine", "linear", "inverse-sqrt"}))->capture_default_str();
  sub->add_option("--warmup", a.warmup, "linear warm-up steps (lr*step/N for the first N steps)")
      ->check(CLI::Range(std::int64_t(0), std::int64_t(1) << 40))->capture_default_str();
  sub->add_option("--decay-steps", a.decay_steps,
                  "cosine/linear: the step at which lr reaches --min-lr (default: --steps; when resuming, give "
                  "the whole run's length)")
      ->check(CLI::Range(std::int64_t(0), std::int64_t(1) << 40));
  sub->add_option("--min-lr", a.min_lr, "the schedule's floor (cosine, linear, inverse-sqrt)")
      ->check(non_negative_finite())->capture_default_str();
  sub->add_option("--weight-decay", a.weight_decay, "weight decay of the weight matrices (biases: none)")
      ->check(non_negative_finite())->capture_default_str();
  sub->add_option("--clip", a.clip, "global gradient-norm clipping (0: off)")->check(non_negative_finite())->capture_default_str();
  sub->add_option("--steps", a.steps, "optimizer steps")->check(CLI::Range(1, 100000000))->capture_default_str();
  sub->add_option("--seed", a.seed,
                  "seed of the student init, the teacher and the data (rank r reads seed + r), 0..2^64-1")
      ->check(unsigned_integer())->capture_default_str();
  sub->add_option("--threads", a.threads, "kernel threads shared by all ranks (0: all cores)")
      ->check(unsigned_integer())->capture_default_str();
  sub->add_option("--save", a.save,
                  "write a checkpoint to DIR after the last step (see shardopt checkpoint inspect); DIR is created "
                  "and checked for writing and space before training starts")
      ->check(non_empty_path());
  sub->add_option("--save-every", a.save_every,
                  "also checkpoint every N steps during the run, in the background, into DIR/step-NNNNNN "
                  "(DIR: --save), keeping the newest --keep of them")
      ->check(CLI::Range(1, 100000000));
  sub->add_option("--keep", a.keep, "--save-every: complete step checkpoints kept (older ones are deleted once a "
                                    "newer one is complete)")
      ->check(CLI::Range(1, 1000000))->capture_default_str();
  sub->add_option("--resume", a.resume,
                  "start from the checkpoint in DIR (any --ranks/--stage; same model and --optimizer); auto: the "
                  "newest complete checkpoint of --save DIR (DIR itself or DIR/step-NNNNNN), a fresh start if none")
      ->check(non_empty_path());
  sub->add_option("--metrics", a.metrics, "write one JSON line per step to FILE")->check(non_empty_path());
  sub->add_flag("--json", a.json, "print one JSON object with the results as the last line of stdout");
  add_gpt_train_options(sub, a.gpt);
  return sub;
}

namespace {

std::string hex64(std::uint64_t v) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

void apply_optimizer_args(const TrainArgs& a, Config& c, int first_step) {
  c.hyper.lr = static_cast<float>(a.lr > 0 ? a.lr : default_lr(c.optimizer));
  c.hyper.weight_decay = static_cast<float>(a.weight_decay);
  if (!parse_lr_schedule(a.lr_schedule, c.hyper.schedule))
    throw UsageError("--lr-schedule: unknown schedule '" + a.lr_schedule + "'");
  c.hyper.warmup_steps = a.warmup;
  c.hyper.total_steps = a.decay_steps > 0 ? a.decay_steps : first_step + a.steps;  // the schedule spans the whole run
  c.hyper.min_lr = static_cast<float>(a.min_lr);
  c.max_grad_norm = static_cast<float>(a.clip);
}

namespace {

// Which launcher started this process, from the variables launchers set: mpirun (Open MPI, MPICH,
// PMIx), srun, or torchrun-style. Empty when none did.
std::string launcher_of_this_process() {
  if (started_by_mpirun()) return "mpirun";
  if (std::getenv("RANK") || std::getenv("WORLD_SIZE")) return "torchrun";
  if (std::getenv("SLURM_PROCID") && std::getenv("SLURM_NTASKS") && std::string(std::getenv("SLURM_NTASKS")) != "1")
    return "srun";
  return {};
}

// Writes, then removes, a one-byte file in `dir`: the cheapest proof that a save can create files
// there (permissions, a read-only mount, a full inode table), made before any training.
void probe_write(const std::string& flag, const std::string& dir) {
  static std::atomic<unsigned> counter{0};
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "host");
  // Unique among the processes of a job on several hosts writing into one shared directory.
  const std::string probe = (fs::path(dir) / (".shardopt-probe-" + std::string(host) + "-" +
                                               std::to_string(::getpid()) + "-" +
                                               std::to_string(counter.fetch_add(1)))).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) throw UsageError(flag + ": cannot write into '" + dir + "': " + std::strerror(errno));
  const char byte = 0;
  const ssize_t wrote = ::write(fd, &byte, 1);
  const int write_errno = errno;
  const int closed = ::close(fd);
  const int close_errno = errno;
  (void)::unlink(probe.c_str());  // best effort: a leftover probe is a one-byte dot file
  if (wrote != 1 || closed != 0)
    throw UsageError(flag + ": cannot write into '" + dir + "': " + std::strerror(wrote != 1 ? write_errno : close_errno));
}

// Creates `dir` (and missing parents) and probes it (see probe_write).
void check_dir_writable(const std::string& flag, const std::string& dir) {
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st) && !fs::is_directory(st)) throw UsageError(flag + ": '" + dir + "' exists and is not a directory");
  if (!fs::exists(st)) {
    fs::create_directories(dir, ec);
    if (ec) throw UsageError(flag + ": cannot create directory '" + dir + "': " + ec.message());
  }
  probe_write(flag, dir);
}

// Bytes of one checkpoint of `params` fp32 master values and the rule's states in their stored
// precision (the shard files, checkpoint/field_codec.hpp; the manifest is small beside them).
// int8 counts one exponent byte per block: a few more where blocks straddle checksum chunks.
long double checkpoint_bytes(std::uint64_t params, const Config& cfg) {
  long double state = 4.0L;
  if (cfg.state_precision == StatePrecision::bf16) state = 2.0L;
  if (cfg.state_precision == StatePrecision::int8) state = 1.0L + 1.0L / static_cast<long double>(cfg.quant_block);
  return static_cast<long double>(params) * (4.0L + state * static_cast<long double>(state_count(cfg.optimizer)));
}

}  // namespace

std::string resolve_resume_auto(TrainArgs& a) {
  if (a.resume != "auto") return {};
  if (a.save.empty())
    throw UsageError("--resume auto: needs --save DIR (the directory whose newest complete checkpoint to resume)");
  // Candidates: DIR itself (a final --save) and DIR/step-NNNNNN (--save-every); the newest by the
  // step the trainer recorded (the manifest's update count for a checkpoint without a record).
  std::string best;
  std::int64_t best_step = -1;
  try {
    const CheckpointInfo info = inspect_checkpoint(a.save);
    best_step = info.trainer_metadata.empty() ? info.step : mlp::read_next_step(info.trainer_metadata);
    best = a.save;
  } catch (const std::exception&) {
    // No checkpoint in DIR itself (or one whose manifest does not verify): not a candidate.
  }
  for (const mlp::StepCheckpoint& c : mlp::list_step_checkpoints(a.save))
    if (c.complete && c.step > best_step) {
      best_step = c.step;
      best = c.dir;
    }
  if (best.empty()) {
    a.resume.clear();
    return "--resume auto: no complete checkpoint in '" + a.save + "'; starting a fresh run";
  }
  a.resume = best;
  return "--resume auto: resuming from '" + best + "' (step " + std::to_string(best_step) + ")";
}

void check_train_flags(const TrainArgs& a) {
  if (a.save_every > 0 && a.save.empty())
    throw UsageError("--save-every: needs --save DIR (the step checkpoints go to DIR/step-NNNNNN)");
  if (a.keep_given && a.save_every == 0) throw UsageError("--keep: only with --save-every");
}

void check_train_outputs(const TrainArgs& a, std::uint64_t params, const Config& cfg, int first_step) {
  if (a.save.empty()) return;
  check_dir_writable("--save", a.save);
  if (a.save_every > 0) {
    // A complete step checkpoint ahead of where this run starts belongs to another run: pruning
    // by step would keep it and delete this run's newer ones, and --resume auto would pick it.
    const mlp::StepCheckpoint* ahead = nullptr;  // the newest such one is named
    const std::vector<mlp::StepCheckpoint> listed = mlp::list_step_checkpoints(a.save);
    for (const mlp::StepCheckpoint& c : listed)
      if (c.complete && c.step > first_step) ahead = &c;
    if (ahead)
      throw UsageError("--save-every: '" + ahead->dir + "' is a checkpoint at step " + std::to_string(ahead->step) +
                       ", ahead of this run's start (step " + std::to_string(first_step) +
                       "): it belongs to another run; resume it (--resume auto) or save elsewhere");
  }
  // Space: a save writes its files beside the previous generation before deleting it, and
  // --save-every keeps up to --keep complete step checkpoints plus the one being written.
  const long double one = checkpoint_bytes(params, cfg);
  std::uint64_t count = 1;  // the final save
  if (a.save_every > 0) {
    const int planned = (first_step + a.steps - 1) / a.save_every - first_step / a.save_every;  // the last step excepted
    int existing = 0;
    for (const mlp::StepCheckpoint& c : mlp::list_step_checkpoints(a.save)) existing += c.complete ? 1 : 0;
    if (planned > 0) count += static_cast<std::uint64_t>(std::max(1, std::min(planned, a.keep + 1) - std::min(existing, a.keep)));
  }
  struct statvfs v {};
  if (::statvfs(a.save.c_str(), &v) == 0) {
    const long double avail = static_cast<long double>(v.f_bavail) * static_cast<long double>(v.f_frsize);
    const long double need = one * static_cast<long double>(count);
    if (avail < need)
      throw UsageError("--save: '" + a.save + "' has " + format_bytes(double(avail)) + " free; this run's " +
                       std::to_string(count) + " checkpoint" + (count == 1 ? "" : "s") + " need " +
                       format_bytes(double(need)) + " (" + format_bytes(double(one)) + " each)");
  }
}

namespace {

// What the process has mapped now (/proc/self/statm's first field), or 0 where that is unknown.
std::uint64_t mapped_bytes_now() {
  std::ifstream f("/proc/self/statm");
  std::uint64_t pages = 0;
  if (!(f >> pages)) return 0;
  const long page = ::sysconf(_SC_PAGESIZE);
  return pages * static_cast<std::uint64_t>(page > 0 ? page : 4096);
}

}  // namespace

void check_address_space(std::uint64_t engine_bytes, std::uint64_t trainer_bytes, std::uint64_t shared_bytes,
                         int ranks_here) {
  struct rlimit as {};
  if (::getrlimit(RLIMIT_AS, &as) != 0 || as.rlim_cur == RLIM_INFINITY) return;
  const std::uint64_t limit = as.rlim_cur;
  const std::uint64_t now = mapped_bytes_now();
  if (now == 0) return;  // no /proc: nothing to measure against
  constexpr std::uint64_t MiB = std::uint64_t(1) << 20;
  const std::uint64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const std::uint64_t ranks = static_cast<std::uint64_t>(std::max(1, ranks_here));
#if defined(__GLIBC__)
  // glibc gives each thread that allocates its own arena, reserving 64 MiB of address space for
  // it, up to 8 per core: on a small limit those reservations alone can take what OpenBLAS needs.
  constexpr int kArenas = 2;
  (void)::mallopt(M_ARENA_MAX, kArenas);
  const std::uint64_t arenas = (kArenas - 1) * 64 * MiB;  // the main arena grows the heap instead
#else
  const std::uint64_t arenas = 0;
#endif
  // OpenBLAS (x86-64 builds) maps one 128 MiB buffer per thread inside a product at once: each
  // rank thread, plus its own worker threads (at most one per core).
  const std::uint64_t blas_buffers = ranks + cores - 1;
  const std::uint64_t blas = blas_buffers * 128 * MiB;
  // Threads: each rank's own and its backend's streams (a few), the kernel pool and OpenBLAS's
  // workers (one per core each); a stack each, of RLIMIT_STACK's size (glibc's default).
  struct rlimit st {};
  const std::uint64_t stack = ::getrlimit(RLIMIT_STACK, &st) == 0 && st.rlim_cur != RLIM_INFINITY
                                  ? std::max<std::uint64_t>(st.rlim_cur, 2 * MiB)
                                  : 8 * MiB;
  const std::uint64_t stacks = (4 * ranks + 2 * cores) * stack;
  const std::uint64_t data = ranks * (engine_bytes + trainer_bytes) + shared_bytes;
  const std::uint64_t need = blas + stacks + arenas + data + 32 * MiB;  // 32 MiB: libraries' small mappings
  const std::uint64_t left = limit > now ? limit - now : 0;
  if (need <= left) return;
  throw Error(ErrorCode::out_of_memory,
              "the address-space limit (ulimit -v: " + format_bytes(double(limit)) + ", " + format_bytes(double(left)) +
                  " of it left) is too small for this run, which maps about " + format_bytes(double(need)) + " more: " +
                  std::to_string(blas_buffers) + " OpenBLAS buffers of 128 MiB (one per thread that can be inside a "
                  "matrix product at once: " + std::to_string(ranks) + " rank thread" + (ranks == 1 ? "" : "s") + " + " +
                  std::to_string(cores - 1) + " OpenBLAS worker" + (cores == 2 ? "" : "s") + "; OpenBLAS waits forever "
                  "for a buffer it cannot map), " + format_bytes(double(data)) + " of model, optimizer state and "
                  "activations, " + format_bytes(double(stacks + arenas)) + " of thread stacks and malloc arenas. "
                  "Raise ulimit -v to at least " + format_bytes(double(now + need)) + ", or train fewer --ranks in this "
                  "process");
}

void check_master_gather(const Bootstrap& boot, std::uint64_t params, std::size_t tensors, const std::string& flag) {
  const std::uint64_t limit = boot.kind() == "tcp" ? std::uint64_t(1) << 30 : std::uint64_t(INT32_MAX);
  // The values, a 24-byte record head per tensor range a rank owns, and 8 bytes per rank's entry.
  const std::uint64_t world = static_cast<std::uint64_t>(boot.world_size());
  const std::uint64_t need = params * 4 + 24 * static_cast<std::uint64_t>(tensors) * world + 8 * world;
  if (need > limit)
    throw UsageError(flag + ": across processes the trainer gathers every master value through the " +
                     std::string(boot.kind()) + " bootstrap for the param_digest, which carries at most " +
                     format_bytes(double(limit)) + " at once; this model's " + format_count(params) +
                     " parameters need " + format_bytes(double(need)));
}

std::uint64_t planned_memory_bytes(const Config& config, const std::vector<BlockSpec>& blocks, int world) {
  std::uint64_t sum = 0;
  for (const PlannedBuffer& b : plan_memory(config, blocks, world).buffers)
    if (b.place != Place::disk) sum += b.bytes;
  return sum;
}

namespace {

// The processes of this job on this machine, from the launcher's variables (torchrun, Open MPI,
// MPICH, SLURM), or `world` if none says.
int ranks_on_this_machine(int world) {
  for (const char* v : {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
                        "SLURM_STEP_TASKS_PER_NODE"}) {
    const char* text = std::getenv(v);
    if (!text) continue;
    char* end = nullptr;
    const long n = std::strtol(text, &end, 10);  // SLURM_STEP_TASKS_PER_NODE: "4(x2)": the leading count
    if (end != text && n >= 1 && n <= world) return static_cast<int>(n);
  }
  return world;
}

// This process's rank on its machine, from the launcher's variables, or -1 if none says.
int local_rank_from_env() {
  for (const char* v : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const char* text = std::getenv(v);
    if (!text) continue;
    char* end = nullptr;
    const long n = std::strtol(text, &end, 10);
    if (end != text && *end == '\0' && n >= 0 && n < (1L << 20)) return static_cast<int>(n);
  }
  return -1;
}

}  // namespace

void join_launched_job(const TrainArgs& a, LaunchedJob& job, const std::string& who, bool cuda_supported) {
  job.launcher = launcher_of_this_process();
  if (job.launcher.empty()) return;
  if (a.ranks_given)
    throw UsageError("--ranks: this process was started by " + job.launcher +
                     ", whose world decides the ranks (one per process); --ranks is for in-process ranks "
                     "without a launcher");
  const bool nccl = a.backend == "cuda" && cuda_supported;
  if (a.backend != "cpu" && !nccl)
    throw UsageError("--backend " + a.backend + ": " + who + " runs one rank per process on the CPU only (under " +
                     job.launcher + "); run --backend " + a.backend + " without a launcher, with --ranks");
  if (job.launcher == "mpirun") {
    if (!mpi_built()) throw UsageError("launched by mpirun, but this shardopt was built without MPI");
    job.mpi = std::make_unique<MpiSession>();
    job.bootstrap = make_mpi_bootstrap();
    if (!nccl) job.make_communicator = [](Backend& be) { return make_mpi_communicator(be); };
  } else {
    // torchrun-style variables, or srun without PMIx: the TCP bootstrap on MASTER_ADDR:MASTER_PORT
    // (detect_launch names what is missing), and collectives over TCP (correct, but slower than
    // MPI's as the world grows: bootstrap.hpp).
    const LaunchEnv env = detect_launch();
    job.bootstrap = make_bootstrap_from_env();
    Bootstrap* const boot = job.bootstrap.get();
    if (!nccl)
      job.make_communicator = [boot, addr = env.master_addr](Backend& be) { return make_tcp_communicator(*boot, addr, be); };
  }
  Bootstrap* const boot = job.bootstrap.get();
  // NCCL: rank 0 makes the unique id and the bootstrap carries it to every rank (bootstrap.hpp).
  if (nccl) job.make_communicator = [boot](Backend& be) { return make_nccl_communicator(*boot, be); };
  const int local = ranks_on_this_machine(boot->world_size());
  const int from_env = local_rank_from_env();
  job.local_rank = from_env >= 0 ? from_env : boot->rank() % local;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  job.blas_threads = static_cast<int>(std::max(1u, hw / static_cast<unsigned>(local)));
}
MetricsFile::MetricsFile(std::string path) : path_(std::move(path)) {
  errno = 0;
  out_.open(path_, std::ios::out | std::ios::trunc);
  if (!out_)
    throw UsageError("--metrics: cannot open '" + path_ + "' for writing" +
                     (errno ? std::string(": ") + std::strerror(errno) : std::string()));
}

void MetricsFile::write(const std::string& line, int step, std::ostream& warn) {
  if (failed_) return;
  errno = 0;
  // Flushed line by line: a full or failing device shows at the step it fails at (and the file
  // can be followed while the run goes on).
  out_ << line << '\n';
  out_.flush();
  if (!out_) {
    failed_ = true;
    reason_ = errno ? std::strerror(errno) : "the stream failed";
    warn << "shardopt train: warning: writing --metrics '" << path_ << "' failed at step " << step << " ("
         << reason_ << "); training goes on, and the run will exit non-zero\n";
    warn.flush();
  }
}

void MetricsFile::close() {
  if (!failed_) {
    errno = 0;
    out_.close();
    if (out_.fail()) {
      failed_ = true;
      reason_ = errno ? std::strerror(errno) : "closing failed";
    }
  }
  if (failed_) throw Error(ErrorCode::io_error, "--metrics: writing '" + path_ + "' failed: " + reason_);
}

int run_train(const TrainArgs& args_in, Io& io) {
  check_train_flags(args_in);
  TrainArgs a_resolved = args_in;
  const std::string resume_note = resolve_resume_auto(a_resolved);  // --resume auto: a directory, or none
  const TrainArgs& a = a_resolved;
  if (a.gpt.model == "gpt") return run_train_gpt(a, io, resume_note);
  check_backend(a.backend, "the example trainer");
  check_offload(a.model);

  // Under a launcher every process is one rank of the launcher's world; --ranks (threads in one
  // process) does not combine with that.
  LaunchedJob job;
  join_launched_job(a, job, "the example trainer");
  Bootstrap* const boot = job.bootstrap.get();
  const int world = boot ? boot->world_size() : a.ranks;
  const bool lead = !boot || boot->rank() == 0;  // prints and writes the outputs

  const Model model = build_model(a.model);
  mlp::TrainOptions o;
  o.shape = model.shape;
  o.batch = a.model.batch;
  o.ranks = world;
  o.steps = a.steps;
  o.seed = a.seed;
  o.threads = a.threads;
  o.config = build_config(a.model, model);
  o.resume_dir = a.resume;
  o.save_dir = a.save;
  o.save_every = a.save_every;
  o.keep = a.keep;
  o.checkpoints_dir = a.save;
  // Resuming continues the data stream, the step numbers and the schedule where the checkpoint
  // left them (the trainer's record in the checkpoint says where).
  if (!a.resume.empty()) o.first_step = mlp::read_next_step(inspect_checkpoint(a.resume).trainer_metadata);
  // Every destination is checked now, before anything trains (a run must not fail at its end).
  check_train_outputs(a, model.params, o.config, o.first_step);
  apply_optimizer_args(a, o.config, o.first_step);
  if (boot) {
    o.bootstrap = boot;
    o.make_communicator = job.make_communicator;
    o.blas_threads = job.blas_threads;
    check_agreement(*boot, o.config, mlp::blocks(o.shape));
    check_master_gather(*boot, model.params, 4 * static_cast<std::size_t>(o.shape.layers),
                        "--layers/--hidden (the example trainer launched one rank per process)");
  }

  std::unique_ptr<MetricsFile> metrics;
  if (!a.metrics.empty() && lead) metrics = std::make_unique<MetricsFile>(a.metrics);

  // With --json stdout carries only the JSON line; the human-readable output goes to stderr.
  std::ostringstream discard;  // the other processes of a launched job print nothing
  std::ostream& human = !lead ? discard : a.json ? io.err : io.out;
  const bool live = lead && (a.json ? io.err_tty : io.out_tty);
  const double samples_per_step = double(world) * o.batch * o.config.accumulation_steps;
  human << "shardopt train: " << model.description << " (" << format_count(model.params) << " params), "
        << world << (boot ? " ranks (" + std::string(boot->kind()) + ", one per process)" : " ranks") << ", stage " << o.config.stage << ", " << a.model.dtype << ", " << a.model.optimizer
        << " lr " << o.config.hyper.lr << ", bucket " << format_bytes(double(o.config.bucket_bytes)) << ", "
        << (a.model.offload == "none" ? "" : "offload " + a.model.offload +
                                                 (a.model.offload_params ? " (+ parameters)" : "") + ", ")
        << (a.model.state_precision == "fp32" ? "" : a.model.state_precision + " optimizer state, ")
        << a.steps << " steps\n";
  if (!resume_note.empty() && lead) io.err << "shardopt train: " << resume_note << '\n';
  if (a.save_every > 0)
    human << "checkpoints every " << a.save_every << " steps into " << (fs::path(a.save) / "step-NNNNNN").string()
          << " in the background (the newest " << a.keep << " kept)\n";
  human.flush();

  const int every = std::max(1, a.steps / 10);
  const int last_step = o.first_step + a.steps;  // step numbers continue a resumed run
  auto on_step = [&](const mlp::StepRecord& s) {
    if (metrics) {
      Json j;
      j["step"] = s.step;
      j["loss"] = s.loss;
      j["step_ms"] = s.step_ms;
      j["applied"] = s.applied;
      j["loss_scale"] = s.loss_scale;
      j["grad_norm"] = s.grad_norm;
      j["lr"] = s.lr;
      metrics->write(j.dump(), s.step, io.err);
    }
    char line[200];
    std::snprintf(line, sizeof line, "step %d/%d  loss %.6f  %.2f ms/step  %.0f samples/s  mem/rank %s%s", s.step,
                  last_step, s.loss, s.step_ms, s.step_ms > 0 ? samples_per_step * 1000.0 / s.step_ms : 0.0,
                  format_bytes(double(s.rank_bytes)).c_str(), s.applied ? "" : "  (skipped: overflow)");
    if (live) {
      // \r and a clear-to-end-of-line rewrite the same terminal line every step.
      human << '\r' << line << "\x1b[K";
      if (s.step == last_step) human << '\n';
      human.flush();
    } else if (s.step % every == 0 || s.step == o.first_step + 1 || s.step == last_step) {
      human << line << '\n';
    }
  };
  // Before any thread: a run short of address space fails now, naming the limit (not hang).
  check_address_space(planned_memory_bytes(o.config, mlp::blocks(o.shape), world),
                      mlp::activation_bytes(o.shape, o.batch, o.config.compute_dtype),
                      // the teacher, and the gathered master (across processes: also the records)
                      std::uint64_t(model.params) * 4 * (boot ? 4 : 2), boot ? 1 : world);
  const mlp::TrainResult r = mlp::train(o, on_step);

  std::vector<double> ms;
  for (const auto& s : r.steps) ms.push_back(s.step_ms);
  const std::uint64_t digest = mlp::digest(r.master);
  const double loss_first = r.steps.front().loss, loss_last = r.steps.back().loss;
  human << "loss " << loss_first << " -> " << loss_last << " over " << a.steps << " steps (" << r.skipped_steps
        << " skipped), median " << median(ms) << " ms/step, param digest " << hex64(digest) << "\n"
        << "rank 0 memory (engine buffers; the trainer's activations, " << format_bytes(double(r.activation_bytes))
        << " per rank, are outside it):\n"
        << r.memory[0].to_string();
  human.flush();

  if (a.json && lead) {
    Json j;
    j["params"] = r.params;
    j["steps"] = a.steps;
    j["first_step"] = o.first_step + 1;
    j["ranks"] = world;
    j["launcher"] = boot ? std::string(boot->kind()) : std::string("in-process");
    j["stage"] = o.config.stage;
    j["dtype"] = a.model.dtype;
    j["optimizer"] = a.model.optimizer;
    j["layers"] = o.shape.layers;
    j["hidden"] = o.shape.hidden;
    j["batch"] = o.batch;
    j["micro_steps"] = o.config.accumulation_steps;
    j["lr"] = a.lr > 0 ? a.lr : default_lr(o.config.optimizer);
    j["seed"] = a.seed;
    j["bucket_bytes"] = o.config.bucket_bytes;
    j["offload"] = a.model.offload;
    j["offload_params"] = a.model.offload_params;
    j["state_precision"] = a.model.state_precision;
    j["loss_first"] = loss_first;
    j["loss_last"] = loss_last;
    j["skipped_steps"] = r.skipped_steps;
    j["param_digest"] = "fnv1a64:" + hex64(digest);
    j["step_ms_median"] = median(ms);
    j["samples_per_s"] = median(ms) > 0 ? samples_per_step * 1000.0 / median(ms) : 0.0;
    const CommStats& c = r.last_step_comm[0];
    j["comm_bytes_per_step"] = c.total_bytes();
    Json kinds = Json::object();
    for (int k = 0; k < kCollectiveKindCount; ++k)
      kinds[std::string(name_of(static_cast<CollectiveKind>(k)))] = c.bytes[k];
    j["comm_bytes_by_kind"] = kinds;
    j["activation_bytes_per_rank"] = r.activation_bytes;
    Json peaks = Json::array();
    for (const auto& m : r.memory) peaks.push_back(bytes_json(m, /*peak=*/true));
    j["peak_bytes"] = peaks;  // [rank][place][category], plus [place]["total"] (peak of the sum)
    io.out << j.dump() << '\n';
  }
  if (metrics) metrics->close();  // after the results: a failed log does not hide them
  return 0;
}

}  // namespace shardopt::cli
