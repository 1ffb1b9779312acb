// shardopt train: the example trainer (examples/mlp) driven from the command line.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <cstdlib>
#include <sstream>

#include "commands.hpp"
#include "units.hpp"

namespace shardopt::cli {

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
      ->check(CLI::PositiveNumber);
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
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--weight-decay", a.weight_decay, "weight decay of the weight matrices (biases: none)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--clip", a.clip, "global gradient-norm clipping (0: off)")->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--steps", a.steps, "optimizer steps")->check(CLI::Range(1, 100000000))->capture_default_str();
  sub->add_option("--seed", a.seed, "seed of the student init, the teacher and the data (rank r reads seed + r)")
      ->capture_default_str();
  sub->add_option("--threads", a.threads, "kernel threads shared by all ranks (0: all cores)")->capture_default_str();
  sub->add_option("--save", a.save, "write a checkpoint to DIR after the last step (see shardopt checkpoint inspect)");
  sub->add_option("--resume", a.resume, "start from the checkpoint in DIR (any --ranks/--stage; same model and --optimizer)");
  sub->add_option("--metrics", a.metrics, "write one JSON line per step to FILE");
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

void apply_optimizer_args(const TrainArgs& a, Config& c) {
  c.hyper.lr = static_cast<float>(a.lr > 0 ? a.lr : default_lr(c.optimizer));
  c.hyper.weight_decay = static_cast<float>(a.weight_decay);
  if (!parse_lr_schedule(a.lr_schedule, c.hyper.schedule))
    throw UsageError("--lr-schedule: unknown schedule '" + a.lr_schedule + "'");
  c.hyper.warmup_steps = a.warmup;
  c.hyper.total_steps = a.decay_steps > 0 ? a.decay_steps : a.steps;
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

}  // namespace

int run_train(const TrainArgs& a, Io& io) {
  if (a.gpt.model == "gpt") return run_train_gpt(a, io);
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
  // Resuming continues the data stream, the step numbers and the schedule where the checkpoint
  // left them (the trainer's record in the checkpoint says where).
  if (!a.resume.empty()) o.first_step = mlp::read_next_step(inspect_checkpoint(a.resume).trainer_metadata);
  TrainArgs args = a;
  if (args.decay_steps == 0) args.decay_steps = o.first_step + a.steps;  // the schedule spans the whole run
  apply_optimizer_args(args, o.config);
  if (boot) {
    o.bootstrap = boot.get();
    o.make_communicator = [](Backend& be) { return make_mpi_communicator(be); };
    check_agreement(*boot, o.config, mlp::blocks(o.shape));
  }

  std::unique_ptr<std::ofstream> metrics;
  if (!a.metrics.empty() && lead) {
    metrics = std::make_unique<std::ofstream>(a.metrics);
    if (!*metrics) throw UsageError("--metrics: cannot open '" + a.metrics + "' for writing");
  }

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
      *metrics << j.dump() << '\n';
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
  if (metrics && !*metrics) throw UsageError("--metrics: writing '" + a.metrics + "' failed");

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
  return 0;
}

}  // namespace shardopt::cli
