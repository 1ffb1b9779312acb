// shardopt estimate and shardopt plan: memory per rank from shapes alone (plan_memory).
#include <cstdio>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "units.hpp"

namespace shardopt::cli {

namespace {

// The ZeRO paper's per-rank device bytes for a stage, generalised to any dtype and rule: p and g
// bytes per parameter for parameters and gradients in the compute dtype, K for what the optimizer
// keeps (fp32 master unless the compute dtype is fp32, plus 4 bytes per state). With optimizer
// offload K leaves the device (see offloaded_formula), with --offload-params the stage-3 p shard too.
double k_bytes(const Config& c) {
  return (c.compute_dtype == DType::fp32 ? 0.0 : 4.0) + 4.0 * state_count(c.optimizer);
}

double zero_formula(const Config& c, double psi, int world) {
  const double p = double(size_of(c.compute_dtype));
  // Offloaded, stages 2-3 keep no device gradient shard: each bucket goes down as it is reduced.
  const double g = c.offload_optimizer != OffloadKind::none && c.stage >= 2 ? 0.0 : p;
  const double k = c.offload_optimizer == OffloadKind::none ? k_bytes(c) : 0.0;
  const double p3 = c.offload_params ? 0.0 : p;
  const double n = world;
  switch (c.stage) {
    case 0: return (p + g + k) * psi;
    case 1: return (p + g) * psi + k * psi / n;
    case 2: return p * psi + (g + k) * psi / n;
    default: return (p3 + g + k) * psi / n;
  }
}

std::string zero_formula_text(const Config& c) {
  if (c.offload_optimizer == OffloadKind::none) {
    switch (c.stage) {
      case 0: return "(p+g+K)Ψ";
      case 1: return "(p+g)Ψ + KΨ/N";
      case 2: return "pΨ + (g+K)Ψ/N";
      default: return "(p+g+K)Ψ/N";
    }
  }
  switch (c.stage) {
    case 0:
    case 1: return "(p+g)Ψ";
    case 2: return "pΨ";
    default: return c.offload_params ? "0 (only the prefetch+1 gathered-unit slots and 2 buckets)" : "pΨ/N";
  }
}

// What optimizer offload moves off the device per rank: KΨ (stage 0) or KΨ/N, plus the stage-3
// parameter shard pΨ/N with --offload-params.
double offloaded_formula(const Config& c, double psi, int world) {
  if (c.offload_optimizer == OffloadKind::none) return 0.0;
  const double k = k_bytes(c) * (c.stage == 0 ? psi : psi / world);
  return k + (c.offload_params ? double(size_of(c.compute_dtype)) * psi / world : 0.0);
}

std::optional<std::uint64_t> size_arg(const std::string& text, const char* flag) {
  if (text.empty()) return std::nullopt;
  const auto v = parse_bytes(text);
  if (too_large(text, /*bytes=*/true))
    throw UsageError(std::string(flag) + ": '" + text + "' is too large (at most 2^63 bytes)");
  if (!v) throw UsageError(std::string(flag) + ": '" + text + "' is not a size (e.g. 80GiB, 512MB, 1e9)");
  return v;
}

const char* const kNotIncluded[] = {"the trainer's activations and workspace",
                                    "the communicator's own scratch",
                                    "allocator overhead and fragmentation", "the CUDA context (on a GPU)"};

}  // namespace

CLI::App* add_estimate(CLI::App& app, EstimateArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "estimate", "Predict the bytes per rank, by place and category, that the engine allocates (plan_memory)");
  add_model_options(sub, a.model, /*with_params=*/true, /*with_stage=*/true);
  add_gpt_shape_options(sub, a.gpt);
  sub->add_option("--world", a.world, "data-parallel ranks")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  return sub;
}

int run_estimate(const EstimateArgs& a, Io& io) {
  check_offload(a.model);
  const bool gpt = a.gpt.model == "gpt";
  const Model model = gpt ? build_gpt_model(a.gpt, a.model) : build_model(a.model);
  const Config cfg = build_config(a.model, model);
  const MemoryPlan plan = plan_memory(cfg, model.blocks, a.world);
  const MemoryReport rep = plan.report();
  const double formula = zero_formula(cfg, double(model.params), a.world);
  const double offloaded = offloaded_formula(cfg, double(model.params), a.world);
  const std::size_t act = gpt ? gpt_activation_bytes(a.gpt, a.model, cfg.compute_dtype)
                          : model.example ? mlp::activation_bytes(model.shape, a.model.batch, cfg.compute_dtype)
                                          : 0;
  // What one rank's process holds in memory: the engine's buffers in every place but disk, plus
  // the trainer's activations and workspace (not the CUDA context, allocator slack, libraries).
  std::size_t in_memory = act;
  for (int p = 0; p < kPlaceCount; ++p)
    if (static_cast<Place>(p) != Place::disk) in_memory += rep.peak_total[p];

  if (a.json) {
    Json j;
    j["params"] = model.params;
    j["blocks"] = model.blocks.size();
    j["world"] = a.world;
    j["stage"] = cfg.stage;
    j["dtype"] = a.model.dtype;
    j["optimizer"] = a.model.optimizer;
    j["bucket_bytes"] = cfg.bucket_bytes;
    j["prefetch_units"] = cfg.prefetch_units;
    j["offload"] = a.model.offload;
    j["offload_params"] = cfg.offload_params;
    j["bytes"] = bytes_json(rep, /*peak=*/true);
    Json bufs = Json::array();
    for (const auto& b : plan.buffers)
      bufs.push_back({{"name", b.name}, {"bytes", b.bytes}, {"category", std::string(name_of(b.category))},
                      {"place", std::string(name_of(b.place))}});
    j["buffers"] = bufs;
    j["zero_formula_bytes"] = formula;  // device
    if (cfg.offload_optimizer != OffloadKind::none) j["zero_formula_offloaded_bytes"] = offloaded;
    if (model.example || gpt) {
      j["activation_bytes_per_rank"] = act;
      j["memory_bytes_per_rank"] = in_memory;  // engine (all places but disk) + activations
    }
    j["not_included"] = Json(std::vector<std::string>(std::begin(kNotIncluded), std::end(kNotIncluded)));
    io.out << j.dump() << '\n';
    return 0;
  }
  std::ostream& os = io.out;
  os << "shardopt estimate: " << model.description << " (" << format_count(model.params) << " params), world "
     << a.world << ", stage " << cfg.stage << ", " << a.model.dtype << ", " << a.model.optimizer << ", bucket "
     << format_bytes(double(cfg.bucket_bytes)) << (cfg.stage == 3 ? ", prefetch " + std::to_string(cfg.prefetch_units) : "")
     << (cfg.offload_optimizer == OffloadKind::none
             ? std::string()
             : ", offload " + a.model.offload + (cfg.offload_params ? " (+ parameters)" : ""))
     << "\n\n"
     << bytes_table(rep, true) << "\nbuffers (per rank):\n";
  char line[200];
  for (const auto& b : plan.buffers) {
    std::snprintf(line, sizeof line, "  %-28s %12s  %-12s %s\n", b.name.c_str(), format_bytes(double(b.bytes)).c_str(),
                  std::string(name_of(b.place)).c_str(), std::string(name_of(b.category)).c_str());
    os << line;
  }
  os << "\nZeRO formula " << zero_formula_text(cfg) << ": " << format_bytes(formula)
     << " on the device (the plan adds padding, gradient buckets, gathered units and step scalars)\n";
  if (cfg.offload_optimizer != OffloadKind::none)
    os << "offloaded: " << format_bytes(offloaded) << " (K" << (cfg.stage == 0 ? "Ψ" : "Ψ/N") << " to "
       << (cfg.offload_optimizer == OffloadKind::host ? "pinned_host" : "disk")
       << (cfg.offload_params ? ", the pΨ/N parameter shard to pinned_host" : "")
       << "; the plan adds host gradient copies, staging rings"
       << (cfg.offload_optimizer == OffloadKind::nvme ? " and the file's second generation" : "") << ")\n";
  os << "not included:";
  for (const char* n : kNotIncluded) os << ' ' << n << ';';
  os << '\n';
  if (model.example)
    os << "the example trainer's activations at --batch " << a.model.batch << ": " << format_bytes(double(act))
       << " per rank\n";
  if (gpt)
    os << "the GPT trainer's activations and workspace at --seq " << a.gpt.seq << " x --batch "
       << (a.gpt.batch_given ? a.model.batch : 4) << (a.gpt.recompute ? ", recompute" : "") << ": "
       << format_bytes(double(act)) << " per rank; with the engine's buffers in memory (all but disk): "
       << format_bytes(double(in_memory)) << " per rank\n";
  return 0;
}

CLI::App* add_plan(CLI::App& app, PlanArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "plan", "Find the cheapest configuration (lowest ZeRO stage, so least communication; optimizer offload to "
              "host memory, then NVMe, only when no stage fits without it) that fits a GPU budget");
  a.model.dtype = "bf16";  // GPU training: 16-bit compute is the usual case
  add_model_options(sub, a.model, /*with_params=*/true, /*with_stage=*/false);
  sub->add_option("--gpus", a.gpus, "GPUs (data-parallel ranks), all on one machine")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--gpu-mem", a.gpu_mem, "memory per GPU, e.g. 80GiB")->required();
  sub->add_option("--host-mem", a.host_mem, "host memory of the machine, e.g. 512GiB (checked if given)");
  sub->add_option("--nvme", a.nvme,
                  "NVMe space of the machine for --offload nvme, e.g. 2TB (checked against the state files if given)");
  sub->add_option("--activations", a.activations,
                  "activation memory per GPU to allow for (default: the example model's at --batch; 0 for --params)");
  sub->add_option("--headroom", a.headroom,
                  "fraction of each GPU kept free for the CUDA context, allocator fragmentation and "
                  "communicator workspaces")
      ->check(CLI::Range(0.0, 0.9))->capture_default_str();
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  sub->footer("Exit status: 0 when a configuration fits, 3 when none does.");
  return sub;
}

int run_plan(const PlanArgs& a, Io& io) {
  if (a.model.offload != "none")
    throw UsageError("--offload: plan chooses the offload itself (host, then nvme, when no stage fits without it)");
  if (!a.model.nvme_dir.empty()) throw UsageError("--nvme-dir: not used by plan (see --nvme)");
  const std::uint64_t gpu_mem = *size_arg(a.gpu_mem, "--gpu-mem");
  const std::optional<std::uint64_t> host_mem = size_arg(a.host_mem, "--host-mem");
  const std::optional<std::uint64_t> nvme = size_arg(a.nvme, "--nvme");
  const Model model = build_model(a.model);
  Config cfg = build_config(a.model, model);
  std::uint64_t act = 0;
  std::string act_note;
  if (!a.activations.empty()) {
    act = *size_arg(a.activations, "--activations");
    act_note = "given by --activations";
  } else if (model.example) {
    act = mlp::activation_bytes(model.shape, a.model.batch, cfg.compute_dtype);
    act_note = "the example model's at --batch " + std::to_string(a.model.batch);
  } else {
    act_note = "none allowed: pass --activations for your model";
  }
  const double usable = double(gpu_mem) * (1.0 - a.headroom);

  // host and disk are per GPU (rank); the machine holds gpus times that.
  struct Row {
    int stage;
    OffloadKind offload;
    bool offload_params;
    std::uint64_t device, host, disk, need;
    bool fits_gpu, fits_host, fits_disk;
    bool fits() const { return fits_gpu && fits_host && fits_disk; }
  };
  auto evaluate = [&](int stage, int world, OffloadKind offload, bool offload_params) {
    Config c = cfg;
    c.stage = stage;
    c.offload_optimizer = offload;
    c.offload_params = offload_params;
    if (offload == OffloadKind::nvme) c.nvme_dir = "(planned)";  // plan_memory does not touch it
    const MemoryReport r = plan_memory(c, model.blocks, world).report();
    Row row{stage, offload, offload_params, r.peak_total[int(Place::device)],
            r.peak_total[int(Place::pinned_host)] + r.peak_total[int(Place::host)], r.peak_total[int(Place::disk)],
            0, false, true, true};
    row.need = row.device + act;
    row.fits_gpu = double(row.need) <= usable;
    row.fits_host = !host_mem || row.host * std::uint64_t(world) <= *host_mem;
    row.fits_disk = !nvme || row.disk * std::uint64_t(world) <= *nvme;
    return row;
  };
  std::vector<Row> rows;
  for (int s = 0; s <= 3; ++s) rows.push_back(evaluate(s, a.gpus, OffloadKind::none, false));
  auto first_fit = [&]() -> const Row* {
    for (const auto& r : rows)
      if (r.fits()) return &r;
    return nullptr;
  };
  const Row* choice = first_fit();
  // Nothing fits on the GPUs alone: move the optimizer state off them, to host memory first (the
  // faster tier), then to NVMe; within a tier the lower stage (less communication) first, and the
  // parameter shard as well only as a last resort.
  const bool tried_offload = choice == nullptr;
  if (tried_offload) {
    for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
      rows.push_back(evaluate(2, a.gpus, kind, false));
      rows.push_back(evaluate(3, a.gpus, kind, false));
      rows.push_back(evaluate(3, a.gpus, kind, true));
    }
    choice = first_fit();
  }
  // Not fitting: the fewest GPUs with which stage 3 without offload would (its per-GPU bytes fall
  // with the world size down to the gathered units, buckets and activations, which do not).
  std::optional<int> min_gpus;
  if (!choice) {
    auto fits3 = [&](int world) { return evaluate(3, world, OffloadKind::none, false).fits_gpu; };
    int hi = a.gpus;
    while (hi < (1 << 20) && !fits3(hi)) hi *= 2;
    if (hi < (1 << 20)) {
      int lo = std::max(a.gpus, hi / 2);
      while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (fits3(mid)) hi = mid;
        else lo = mid + 1;
      }
      min_gpus = hi;
    }
  }
  auto offload_text = [](const Row& r) {
    return std::string(name_of(r.offload)) + (r.offload_params ? "+p" : "");
  };
  auto flags_text = [](const Row& r) {
    std::string f = "--stage " + std::to_string(r.stage);
    if (r.offload == OffloadKind::host) f += " --offload host";
    if (r.offload == OffloadKind::nvme) f += " --offload nvme --nvme-dir DIR";
    if (r.offload_params) f += " --offload-params";
    return f;
  };

  if (a.json) {
    Json j;
    j["params"] = model.params;
    j["dtype"] = a.model.dtype;
    j["optimizer"] = a.model.optimizer;
    j["budget"] = {{"gpus", a.gpus}, {"gpu_mem", gpu_mem}, {"usable_per_gpu", usable}, {"headroom", a.headroom}};
    if (host_mem) j["budget"]["host_mem"] = *host_mem;
    if (nvme) j["budget"]["nvme"] = *nvme;
    j["activation_bytes_per_gpu"] = act;
    Json st = Json::array();
    for (const auto& r : rows)
      st.push_back({{"stage", r.stage}, {"offload", std::string(name_of(r.offload))},
                    {"offload_params", r.offload_params}, {"device_bytes", r.device}, {"host_bytes", r.host},
                    {"disk_bytes", r.disk}, {"need_per_gpu", r.need}, {"fits", r.fits()}});
    j["stages"] = st;
    j["offload_considered"] = tried_offload;
    j["fits"] = choice != nullptr;
    if (choice) {
      j["choice"] = {{"stage", choice->stage}, {"offload", std::string(name_of(choice->offload))},
                     {"offload_params", choice->offload_params}, {"bucket_bytes", cfg.bucket_bytes},
                     {"prefetch_units", choice->stage == 3 ? cfg.prefetch_units : 0},
                     {"need_per_gpu", choice->need}, {"host_bytes_all_gpus", choice->host * std::uint64_t(a.gpus)},
                     {"disk_bytes_all_gpus", choice->disk * std::uint64_t(a.gpus)}};
    } else {
      j["over_by"] = double(rows[3].need) - usable;
      if (min_gpus) j["min_gpus_stage3"] = *min_gpus;
    }
    io.out << j.dump() << '\n';
    return choice ? 0 : 3;
  }
  std::ostream& os = io.out;
  os << "shardopt plan: " << model.description << " (" << format_count(model.params) << " params), "
     << a.model.dtype << ", " << a.model.optimizer << "\nbudget: " << a.gpus << " GPU(s) x " << format_bytes(double(gpu_mem))
     << ", usable " << format_bytes(usable) << " each after " << a.headroom * 100 << "% headroom";
  if (host_mem) os << ", host " << format_bytes(double(*host_mem));
  if (nvme) os << ", nvme " << format_bytes(double(*nvme));
  os << "\nactivations per GPU: " << format_bytes(double(act)) << " (" << act_note << ")\n\n";
  char line[220];
  std::snprintf(line, sizeof line, "%-6s %-8s %14s %14s %14s %14s  %s\n", "stage", "offload", "engine/GPU", "need/GPU",
                "host (all)", "nvme (all)", "fits");
  os << line;
  for (const auto& r : rows) {
    const char* verdict = r.fits() ? "yes" : !r.fits_gpu ? "no (GPU)" : !r.fits_host ? "no (host)" : "no (nvme)";
    std::snprintf(line, sizeof line, "%-6d %-8s %14s %14s %14s %14s  %s\n", r.stage, offload_text(r).c_str(),
                  format_bytes(double(r.device)).c_str(), format_bytes(double(r.need)).c_str(),
                  format_bytes(double(r.host * std::uint64_t(a.gpus))).c_str(),
                  format_bytes(double(r.disk * std::uint64_t(a.gpus))).c_str(), verdict);
    os << line;
  }
  if (!tried_offload)
    os << "offload (host, nvme): not needed, a stage fits without it\n";
  else if (!host_mem || !nvme)
    os << "(host and nvme bytes are checked only against --host-mem and --nvme when given)\n";
  os << '\n';
  if (choice) {
    os << "-> stage " << choice->stage << ", offload " << offload_text(*choice) << ", bucket "
       << format_bytes(double(cfg.bucket_bytes));
    if (choice->stage == 3) os << ", prefetch " << cfg.prefetch_units << " units";
    os << ": " << format_bytes(double(choice->need)) << " of " << format_bytes(usable) << " usable per GPU";
    if (choice->offload == OffloadKind::host)
      os << ", " << format_bytes(double(choice->host * std::uint64_t(a.gpus))) << " of host memory";
    if (choice->offload == OffloadKind::nvme)
      os << ", " << format_bytes(double(choice->disk * std::uint64_t(a.gpus))) << " on NVMe";
    os << "\n   (" << flags_text(*choice) << ")\n";
    return 0;
  }
  const Row& best = rows[3];
  os << "does not fit, not even with offload: ";
  if (!best.fits_gpu)
    os << "stage 3 without offload needs " << format_bytes(double(best.need)) << " per GPU, "
       << format_bytes(double(best.need) - usable) << " over the usable " << format_bytes(usable) << ". ";
  else
    os << "stage 3 fits the GPUs but needs " << format_bytes(double(best.host * std::uint64_t(a.gpus)))
       << " of host memory, more than --host-mem. ";
  if (min_gpus && *min_gpus > a.gpus) os << "Stage 3 fits with " << *min_gpus << " GPUs.";
  else if (!best.fits_gpu) os << "No GPU count helps: the gathered units, buckets and activations alone exceed it.";
  os << "\n";
  return 3;
}

}  // namespace shardopt::cli
