// shardopt estimate and shardopt plan: memory per rank from shapes alone (plan_memory).
#include <cstdio>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "units.hpp"

namespace shardopt::cli {

namespace {

// The ZeRO paper's per-rank bytes for a stage, generalised to any dtype and rule: p and g bytes
// per parameter for parameters and gradients in the compute dtype, K for what the optimizer keeps
// (fp32 master unless the compute dtype is fp32, plus 4 bytes per state).
double zero_formula(const Config& c, double psi, int world) {
  const double p = double(size_of(c.compute_dtype)), g = p;
  const double k = (c.compute_dtype == DType::fp32 ? 0.0 : 4.0) + 4.0 * state_count(c.optimizer);
  const double n = world;
  switch (c.stage) {
    case 0: return (p + g + k) * psi;
    case 1: return (p + g) * psi + k * psi / n;
    case 2: return p * psi + (g + k) * psi / n;
    default: return (p + g + k) * psi / n;
  }
}

std::string zero_formula_text(int stage) {
  switch (stage) {
    case 0: return "(p+g+K)Ψ";
    case 1: return "(p+g)Ψ + KΨ/N";
    case 2: return "pΨ + (g+K)Ψ/N";
    default: return "(p+g+K)Ψ/N";
  }
}

std::optional<std::uint64_t> size_arg(const std::string& text, const char* flag) {
  if (text.empty()) return std::nullopt;
  const auto v = parse_bytes(text);
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
  sub->add_option("--world", a.world, "data-parallel ranks")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  return sub;
}

int run_estimate(const EstimateArgs& a, Io& io) {
  check_offload(a.model);
  const Model model = build_model(a.model);
  const Config cfg = build_config(a.model, model);
  const MemoryPlan plan = plan_memory(cfg, model.blocks, a.world);
  const MemoryReport rep = plan.report();
  const double formula = zero_formula(cfg, double(model.params), a.world);
  const std::size_t act = model.example ? mlp::activation_bytes(model.shape, a.model.batch, cfg.compute_dtype) : 0;

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
    j["bytes"] = bytes_json(rep, /*peak=*/true);
    Json bufs = Json::array();
    for (const auto& b : plan.buffers)
      bufs.push_back({{"name", b.name}, {"bytes", b.bytes}, {"category", std::string(name_of(b.category))},
                      {"place", std::string(name_of(b.place))}});
    j["buffers"] = bufs;
    j["zero_formula_bytes"] = formula;
    if (model.example) j["activation_bytes_per_rank"] = act;
    j["not_included"] = Json(std::vector<std::string>(std::begin(kNotIncluded), std::end(kNotIncluded)));
    io.out << j.dump() << '\n';
    return 0;
  }
  std::ostream& os = io.out;
  os << "shardopt estimate: " << model.description << " (" << format_count(model.params) << " params), world "
     << a.world << ", stage " << cfg.stage << ", " << a.model.dtype << ", " << a.model.optimizer << ", bucket "
     << format_bytes(double(cfg.bucket_bytes)) << (cfg.stage == 3 ? ", prefetch " + std::to_string(cfg.prefetch_units) : "")
     << "\n\n"
     << bytes_table(rep, true) << "\nbuffers (per rank):\n";
  char line[200];
  for (const auto& b : plan.buffers) {
    std::snprintf(line, sizeof line, "  %-28s %12s  %-12s %s\n", b.name.c_str(), format_bytes(double(b.bytes)).c_str(),
                  std::string(name_of(b.place)).c_str(), std::string(name_of(b.category)).c_str());
    os << line;
  }
  os << "\nZeRO formula " << zero_formula_text(cfg.stage) << ": " << format_bytes(formula)
     << " (the plan adds padding, gradient buckets, gathered units and step scalars)\n";
  os << "not included:";
  for (const char* n : kNotIncluded) os << ' ' << n << ';';
  os << '\n';
  if (model.example)
    os << "the example trainer's activations at --batch " << a.model.batch << ": " << format_bytes(double(act))
       << " per rank\n";
  return 0;
}

CLI::App* add_plan(CLI::App& app, PlanArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "plan", "Find the cheapest configuration (lowest ZeRO stage, so least communication) that fits a GPU budget");
  a.model.dtype = "bf16";  // GPU training: 16-bit compute is the usual case
  add_model_options(sub, a.model, /*with_params=*/true, /*with_stage=*/false);
  sub->add_option("--gpus", a.gpus, "GPUs (data-parallel ranks), all on one machine")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--gpu-mem", a.gpu_mem, "memory per GPU, e.g. 80GiB")->required();
  sub->add_option("--host-mem", a.host_mem, "host memory of the machine, e.g. 512GiB (checked if given)");
  sub->add_option("--nvme", a.nvme, "NVMe space for --offload nvme (listed; offload is not in this build yet)");
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
    throw UsageError("--offload: plan considers offload itself (and it is not available in this build yet)");
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

  struct Row {
    int stage;
    std::uint64_t device, host, need;
    bool fits_gpu, fits_host;
  };
  auto evaluate = [&](int stage, int world) {
    Config c = cfg;
    c.stage = stage;
    const MemoryReport r = plan_memory(c, model.blocks, world).report();
    Row row{stage, r.peak_total[int(Place::device)],
            r.peak_total[int(Place::pinned_host)] + r.peak_total[int(Place::host)], 0, false, true};
    row.need = row.device + act;
    row.fits_gpu = double(row.need) <= usable;
    row.fits_host = !host_mem || row.host * std::uint64_t(world) <= *host_mem;
    return row;
  };
  std::vector<Row> rows;
  const Row* choice = nullptr;
  for (int s = 0; s <= 3; ++s) rows.push_back(evaluate(s, a.gpus));
  for (const auto& r : rows)
    if (r.fits_gpu && r.fits_host) {
      choice = &r;
      break;
    }
  // Not fitting: the fewest GPUs with which stage 3 would (its per-GPU bytes fall with the world
  // size down to the gathered units, buckets and activations, which do not).
  std::optional<int> min_gpus;
  if (!choice) {
    int hi = a.gpus;
    while (hi < (1 << 20) && !evaluate(3, hi).fits_gpu) hi *= 2;
    if (hi < (1 << 20)) {
      int lo = std::max(a.gpus, hi / 2);
      while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (evaluate(3, mid).fits_gpu) hi = mid;
        else lo = mid + 1;
      }
      min_gpus = hi;
    }
  }

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
      st.push_back({{"stage", r.stage}, {"offload", "none"}, {"device_bytes", r.device}, {"host_bytes", r.host},
                    {"need_per_gpu", r.need}, {"fits", r.fits_gpu && r.fits_host}});
    j["stages"] = st;
    j["offload"] = "host and nvme: not available in this build";
    j["fits"] = choice != nullptr;
    if (choice) {
      j["choice"] = {{"stage", choice->stage}, {"offload", "none"}, {"bucket_bytes", cfg.bucket_bytes},
                     {"prefetch_units", choice->stage == 3 ? cfg.prefetch_units : 0},
                     {"need_per_gpu", choice->need}};
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
  os << "\nactivations per GPU: " << format_bytes(double(act)) << " (" << act_note << ")\n\n";
  char line[200];
  std::snprintf(line, sizeof line, "%-6s %-8s %14s %14s %14s  %s\n", "stage", "offload", "engine/GPU", "need/GPU",
                "host (all)", "fits");
  os << line;
  for (const auto& r : rows) {
    std::snprintf(line, sizeof line, "%-6d %-8s %14s %14s %14s  %s\n", r.stage, "none",
                  format_bytes(double(r.device)).c_str(), format_bytes(double(r.need)).c_str(),
                  format_bytes(double(r.host * std::uint64_t(a.gpus))).c_str(),
                  r.fits_gpu && r.fits_host ? "yes" : (!r.fits_gpu ? "no (GPU)" : "no (host)"));
    os << line;
  }
  os << "host, nvme  offload: not available in this build yet" << (nvme ? " (--nvme noted)" : "") << "\n\n";
  if (choice) {
    os << "-> stage " << choice->stage << ", offload none, bucket " << format_bytes(double(cfg.bucket_bytes));
    if (choice->stage == 3) os << ", prefetch " << cfg.prefetch_units << " units";
    os << ": " << format_bytes(double(choice->need)) << " of " << format_bytes(usable) << " usable per GPU\n";
    return 0;
  }
  const Row& best = rows[3];
  os << "does not fit: ";
  if (!best.fits_gpu)
    os << "even stage 3 needs " << format_bytes(double(best.need)) << " per GPU, " << format_bytes(double(best.need) - usable)
       << " over the usable " << format_bytes(usable) << ". ";
  else
    os << "stage 3 fits the GPUs but needs " << format_bytes(double(best.host * std::uint64_t(a.gpus)))
       << " of host memory, more than --host-mem. ";
  if (min_gpus && *min_gpus > a.gpus) os << "Stage 3 fits with " << *min_gpus << " GPUs.";
  else if (!best.fits_gpu) os << "No GPU count helps: the gathered units, buckets and activations alone exceed it.";
  os << "\n";
  return 3;
}

}  // namespace shardopt::cli
