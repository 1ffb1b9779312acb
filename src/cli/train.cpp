// shardopt train: the example trainer (examples/mlp) driven from the command line.
#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

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
                  "data-parallel ranks as threads of this process (under mpirun each process is one rank instead)")
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

// Bytes of one checkpoint of `params` fp32 values and the rule's states (the shard files; the
// manifest is small beside them).
long double checkpoint_bytes(std::uint64_t params, OptimizerKind rule) {
  return static_cast<long double>(params) * 4.0L * static_cast<long double>(1 + state_count(rule));
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

void check_train_outputs(const TrainArgs& a, std::uint64_t params, OptimizerKind rule, int first_step) {
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
  const long double one = checkpoint_bytes(params, rule);
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
  if (a.gpt.model == "gpt") {
    // The GPT trainer runs its ranks as threads of one process. Under a launcher each process
    // would run a whole job of its own (N copies writing the same outputs): refused, by name.
    const std::string launcher = launcher_of_this_process();
    if (!launcher.empty())
      throw UsageError("--model gpt: this process was started by " + launcher +
                       "; the GPT trainer runs its ranks in one process (--ranks N) and cannot be launched one "
                       "rank per process yet: run it without " + launcher);
    if (!resume_note.empty()) io.err << "shardopt train: " << resume_note << '\n';
    return run_train_gpt(a, io);
  }
  check_backend(a.backend, "the example trainer");
  check_offload(a.model);

  // Under a launcher every process is one rank of the launcher's world (MPI on the CPU);
  // --ranks (threads in one process) does not combine with that.
  const std::string launcher = launcher_of_this_process();
  std::unique_ptr<MpiSession> mpi;
  std::unique_ptr<Bootstrap> boot;
  if (!launcher.empty()) {
    if (a.ranks_given)
      throw UsageError("--ranks: this process was started by " + launcher +
                       ", whose world decides the ranks (one per process); --ranks is for in-process ranks "
                       "without a launcher");
    if (launcher != "mpirun")
      throw UsageError("--backend cpu across processes runs over MPI: launch with mpirun (or srun --mpi=pmix), "
                       "not " + launcher + " variables alone");
    if (!mpi_built()) throw UsageError("launched by mpirun, but this shardopt was built without MPI");
    mpi = std::make_unique<MpiSession>();
    boot = make_mpi_bootstrap();
  }
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
  check_train_outputs(a, model.params, o.config.optimizer, o.first_step);
  apply_optimizer_args(a, o.config, o.first_step);
  if (boot) {
    o.bootstrap = boot.get();
    o.make_communicator = [](Backend& be) { return make_mpi_communicator(be); };
    check_agreement(*boot, o.config, mlp::blocks(o.shape));
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
