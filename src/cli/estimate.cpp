// shardopt estimate and shardopt plan: memory per rank from shapes alone (plan_memory).
#include <algorithm>
#include <cstdio>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "gpt.hpp"
#include "units.hpp"

namespace shardopt::cli {

namespace {

// The ZeRO paper's per-rank device bytes for a stage, generalised to any dtype and rule: p and g
// bytes per parameter for parameters and gradients in the compute dtype, K for what the optimizer
// keeps (fp32 master unless the compute dtype is fp32, plus 4 bytes per state). With optimizer
// offload K leaves the device (see offloaded_formula), with --offload-params the stage-3 p shard too.
double k_bytes(const Config& c) {
  // Compressed state: bf16 2 bytes per state, int8 1 byte plus a 4-byte scale per block.
  const double per_state = c.state_precision == StatePrecision::bf16   ? 2.0
                           : c.state_precision == StatePrecision::int8 ? 1.0 + 4.0 / double(c.quant_block)
                                                                        : 4.0;
  return (c.compute_dtype == DType::fp32 ? 0.0 : 4.0) + per_state * state_count(c.optimizer);
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

// --cuda-context: a reserve, at most 1 PiB (so that it never carries a sum past 64 bits).
std::uint64_t context_arg(const std::string& text) {
  if (text.empty()) throw UsageError("--cuda-context: empty (a size, e.g. 512MiB, or 0)");
  const std::uint64_t v = *size_arg(text, "--cuda-context");
  if (v > (std::uint64_t(1) << 50))
    throw UsageError("--cuda-context: '" + text + "' is more than any GPU holds (at most 1 PiB)");
  return v;
}

// 2^62: the most bytes any figure below may reach, so that sums of a few of them stay in 64 bits.
constexpr double kMaxFigureBytes = 4611686018427387904.0;

// The trainers' activations, refused by name when the shape makes them astronomically large
// (their own counts are size_t products that would wrap). The double is an upper bound of the
// same count (every term rounded up), so a shape that passes has an exact size_t count.
std::size_t mlp_activations(const mlp::Shape& s, int batch, DType compute) {
  const double L = s.layers, B = batch, H = s.hidden;
  const double bound = 4.0 * ((L + 1) * B * H + 8 * L * B * H + 20 * B * H + 2 * (8 * H * H + 5 * H));
  if (bound > kMaxFigureBytes)
    throw UsageError("--batch: the example trainer's activations at --batch " + std::to_string(batch) +
                     " and this shape exceed 2^62 bytes");
  return mlp::activation_bytes(s, batch, compute);
}

std::size_t gpt_activations(const gpt::Shape& s, int batch, int seq, DType compute, bool recompute) {
  const double N = double(batch) * seq, C = s.hidden, L = s.layers, V = s.vocab;
  const double per_layer = N * (15 * C + 4) + double(batch) * s.heads * double(seq) * seq;
  const double bound = 4.0 * ((L + 5) * N * C + (recompute ? 1 : L) * per_layer + 3 * N + N * V + 10 * N * C +
                              double(seq) * seq + 2 * (V * C + double(s.max_seq) * C + 12 * C * C + 13 * C) + 2 * N + 2);
  if (bound > kMaxFigureBytes)
    throw UsageError("--seq: the GPT trainer's activations at --seq " + std::to_string(seq) + " x --batch " +
                     std::to_string(batch) + " exceed 2^62 bytes");
  return gpt::activation_bytes(s, batch, seq, compute, recompute);
}

// The GPT of --preset or --layers/--hidden/--heads/--vocab/--positions, with `layers` layers
// when positive (the search of plan --largest).
gpt::Shape gpt_shape_of(const GptArgs& g, const ModelArgs& m, int layers = 0) {
  gpt::Shape s;
  if (!g.preset.empty()) {
    if ((g.layers_given && layers <= 0) || g.hidden_given)
      throw UsageError("--preset: give either a preset or --layers/--hidden, not both");
    s = gpt::preset(g.preset);
  } else {
    s = gpt::Shape{m.layers, g.heads, m.hidden, g.vocab, g.positions > 0 ? g.positions : g.seq};
    if (s.hidden % s.heads != 0)
      throw UsageError("--heads: hidden " + std::to_string(s.hidden) + " is not a multiple of " +
                       std::to_string(s.heads) + " heads");
  }
  if (layers > 0) s.layers = layers;
  if (g.seq > s.max_seq)
    throw UsageError("--seq: " + std::to_string(g.seq) + " is more than the model's " + std::to_string(s.max_seq) +
                     " positions");
  return s;
}

// The model a planning command works on, and what its trainer holds besides the engine.
struct Sized {
  Model model;
  std::uint64_t activations = 0;  // the trainer's, per rank
  std::string size_text;          // "37 layers", "1,234,567 params"
  std::string size_flags;         // the flags of train/estimate that give this model
};

std::uint64_t largest_tensor(const std::vector<BlockSpec>& blocks) {
  std::uint64_t m = 0;
  for (const auto& b : blocks)
    for (const auto& t : b.tensors) m = std::max<std::uint64_t>(m, numel(t.shape));
  return m;
}

// DeepSpeed's own estimator of model-state memory, reimplemented from its published formulas
// (DeepSpeed's "Memory Requirements" documentation: estimate_zero2_model_states_mem_needs_all_cold
// in deepspeed/runtime/zero/stage_1_and_2.py and estimate_zero3_model_states_mem_needs_all_cold
// in deepspeed/runtime/zero/stage3.py), for Ψ parameters on G GPUs of one node, its
// additional_buffer_factor of 1.5 on the CPU side, zero_init on, and its largest layer taken as
// the model's largest tensor. Its CPU figure is per node, its GPU figure per GPU; it counts model
// states only (no activations, no CUDA context) and assumes fp16/bf16 mixed precision with Adam.
Json deepspeed_estimate(double psi, std::uint64_t largest_layer, int gpus) {
  const double G = gpus, buf = 1.5, largest = double(largest_layer), layer = 4.0 * largest;
  auto row = [](const char* options, double gpu, double cpu) {
    return Json{{"options", options}, {"gpu_bytes", gpu}, {"cpu_bytes", cpu}};
  };
  Json j;
  j["source"] = "DeepSpeed estimate_zero2/zero3_model_states_mem_needs_all_cold (formulas reimplemented)";
  j["largest_layer_params"] = largest_layer;
  j["zero2_offload_optimizer"] = row("zero2, offload_optimizer=cpu", 2 * psi, psi * std::max(4 * G, 16.0) * buf);
  j["zero2"] = row("zero2, offload_optimizer=none", 4 * psi + 16 * psi / G, psi * 4 * G * buf);
  j["zero3_offload_all"] = row("zero3, offload_param=cpu, offload_optimizer=cpu, zero_init=1", layer, psi * 18 * buf);
  j["zero3_offload_optimizer"] =
      row("zero3, offload_param=none, offload_optimizer=cpu, zero_init=1", layer + 2 * psi / G, psi * 16 * buf);
  j["zero3"] = row("zero3, offload_param=none, offload_optimizer=none, zero_init=1", layer + 18 * psi / G,
                   largest * 4 * G * buf);
  return j;
}

// The DeepSpeed row matching a configuration of ours: stages 0-2 against its ZeRO-2 figures
// (it has no stage 0/1 estimator), stage 3 against ZeRO-3's with the same offload.
const char* deepspeed_row_for(int stage, bool offload, bool offload_params) {
  if (stage < 3) return offload ? "zero2_offload_optimizer" : "zero2";
  if (!offload) return "zero3";
  return offload_params ? "zero3_offload_all" : "zero3_offload_optimizer";
}

// --borrowed for estimate and plan: the text, kept for borrowed_arg, and that it was given.
void add_borrowed_option(CLI::App* sub, std::string& text, bool& given, const std::string& help) {
  sub->add_option_function<std::string>(
      "--borrowed",
      [&text, &given](const std::string& v) {
        text = v;
        given = true;
      },
      help);
}

}  // namespace

CLI::App* add_estimate(CLI::App& app, EstimateArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "estimate", "Predict the bytes per rank, by place and category, that the engine allocates (plan_memory)");
  add_model_options(sub, a.model, /*with_params=*/true, /*with_stage=*/true);
  add_gpt_shape_options(sub, a.gpt);
  sub->add_option("--world", a.world, "data-parallel ranks")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--backend", a.backend,
                  "cpu; cuda: the device total of the whole process, with the trainer's activations and the CUDA "
                  "context (--cuda-context)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  sub->add_option("--cuda-context", a.cuda_context,
                  "device memory of the CUDA context and libraries per process, not allocated by the engine or the "
                  "trainer (an assumption, not measured)")
      ->capture_default_str();
  add_borrowed_option(sub, a.borrowed, a.borrowed_given,
                      "the trainer lends its own memory for every tensor (Engine::borrow_parameters / "
                      "borrow_gradients): params, grads, or params,grads. The plan is the engine's with that memory "
                      "borrowed; what the trainer lends is printed apart from what the engine owns");
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  return sub;
}

namespace {

// --borrowed: a comma-separated list of params and grads.
Borrowing borrowed_arg(const std::string& text) {
  Borrowing b;
  std::size_t at = 0;
  while (true) {
    const std::size_t comma = text.find(',', at);
    const std::string item = text.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    if (item == "params") b.params = true;
    else if (item == "grads") b.grads = true;
    else throw UsageError("--borrowed: unknown '" + item + "' (expected params, grads)");
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return b;
}

std::string borrowed_text(const Borrowing& b) {
  return b.params && b.grads ? "parameters and gradients" : b.params ? "parameters" : "gradients";
}

}  // namespace

int run_estimate(const EstimateArgs& a, Io& io) {
  check_offload(a.model);
  const bool gpt = a.gpt.model == "gpt";
  const bool cuda = a.backend == "cuda";
  if (a.backend != "cpu" && !cuda) throw UsageError("--backend: '" + a.backend + "' is not cpu or cuda");
  const std::uint64_t context = cuda ? context_arg(a.cuda_context) : 0;
  if (!cuda && a.cuda_context != kCudaContextDefault)
    throw UsageError("--cuda-context: only with --backend cuda (a CPU process has no CUDA context)");
  const Model model = gpt ? build_gpt_model(a.gpt, a.model) : build_model(a.model);
  const Config cfg = build_config(a.model, model);
  const bool borrows = a.borrowed_given;
  const Borrowing borrowing = borrows ? borrowed_arg(a.borrowed) : Borrowing{};
  const MemoryPlan plan = plan_memory(cfg, model.blocks, a.world, borrowing);
  const MemoryReport rep = plan.report();
  const std::size_t lent = plan.borrowed[int(Place::device)];
  const double formula = zero_formula(cfg, double(model.params), a.world);
  const double offloaded = offloaded_formula(cfg, double(model.params), a.world);
  const int gpt_batch = a.gpt.batch_given ? a.model.batch : 4;
  const std::size_t act =
      gpt ? gpt_activations(gpt_shape_of(a.gpt, a.model), gpt_batch, a.gpt.seq, cfg.compute_dtype, a.gpt.recompute)
      : model.example ? mlp_activations(model.shape, a.model.batch, cfg.compute_dtype)
                      : 0;
  const bool act_known = gpt || model.example;
  // What one rank's process holds in memory: the engine's buffers in every place but disk, plus
  // the trainer's activations and workspace, plus (on a GPU) the CUDA context. Allocator slack and
  // the communicator's scratch stay outside.
  // (the trainer's lent arrays included: they are in this process's memory too)
  std::size_t in_memory = act + context + lent;
  for (int p = 0; p < kPlaceCount; ++p)
    if (static_cast<Place>(p) != Place::disk) in_memory += rep.peak_total[p];
  // On a GPU the trainer's activations live on the device (the GPT trainer's CUDA path allocates
  // them there; the example MLP trainer has no CUDA path, so its figure is what a GPU trainer of
  // the same shape would hold).
  const std::uint64_t device_process = rep.peak_total[int(Place::device)] + act + context + lent;
  std::vector<std::string> not_included = {"the communicator's own scratch", "allocator overhead and fragmentation"};
  if (!act_known) not_included.insert(not_included.begin(), "the trainer's activations and workspace");
  if (!cuda) not_included.push_back("the CUDA context (on a GPU: --backend cuda)");

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
    if (borrows)  // the trainer's own arrays the engine uses: not in "bytes" (what the engine owns)
      j["borrowed"] = {{"params", borrowing.params}, {"grads", borrowing.grads}, {"device_bytes", lent}};
    j["zero_formula_bytes"] = formula;  // device
    if (cfg.offload_optimizer != OffloadKind::none) j["zero_formula_offloaded_bytes"] = offloaded;
    if (act_known) {
      j["activation_bytes_per_rank"] = act;
      j["memory_bytes_per_rank"] = in_memory;  // engine (all places but disk) + activations (+ CUDA context, lent arrays)
    }
    j["backend"] = a.backend;
    if (cuda) {
      j["cuda_context_bytes"] = context;
      j["device_process_bytes_per_rank"] = device_process;  // engine device + activations + CUDA context + lent
    }
    j["not_included"] = Json(not_included);
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
  if (borrows)
    os << "\nthe engine owns " << format_bytes(double(rep.peak_total[int(Place::device)])) << " ("
       << rep.peak_total[int(Place::device)] << " bytes) on the device; the trainer lends its own "
       << borrowed_text(borrowing) << ": " << format_bytes(double(lent)) << " (" << lent
       << " bytes) of backend memory, not in the tables above\n";
  os << "\nZeRO formula " << (borrows ? "(nothing borrowed) " : "") << zero_formula_text(cfg) << ": "
     << format_bytes(formula)
     << " on the device (the plan adds padding, gradient buckets, gathered units and step scalars)\n";
  if (cfg.offload_optimizer != OffloadKind::none)
    os << "offloaded: " << format_bytes(offloaded) << " (K" << (cfg.stage == 0 ? "Ψ" : "Ψ/N") << " to "
       << (cfg.offload_optimizer == OffloadKind::host ? "pinned_host" : "disk")
       << (cfg.offload_params ? ", the pΨ/N parameter shard to pinned_host" : "")
       << "; the plan adds host gradient copies, staging rings"
       << (cfg.offload_optimizer == OffloadKind::nvme ? " and the file's second generation" : "") << ")\n";
  os << "not included:";
  for (const auto& n : not_included) os << ' ' << n << ';';
  os << '\n';
  if (model.example)
    os << "the example trainer's activations at --batch " << a.model.batch << ": " << format_bytes(double(act))
       << " per rank (it also holds its teacher's fp32 weights, 4 bytes per parameter per process: its data "
          "source, not counted)\n";
  if (gpt)
    os << "the GPT trainer's activations and workspace at --seq " << a.gpt.seq << " x --batch " << gpt_batch
       << (a.gpt.recompute ? ", recompute (one layer's activations, recomputed in backward)"
                           : ", every layer's activations kept for backward (--recompute: one layer's)")
       << ": " << format_bytes(double(act)) << " per rank\n";
  if (act_known || cuda)
    os << "the whole process, per rank: " << format_bytes(double(in_memory)) << " in memory (the engine's buffers "
       << "in all places but disk" << (act_known ? ", the activations" : "")
       << (cuda ? ", the CUDA context" : "") << (borrows ? ", the trainer's lent arrays" : "") << ")\n";
  if (cuda)
    os << "on the GPU: " << format_bytes(double(device_process)) << " = the engine's "
       << format_bytes(double(rep.peak_total[int(Place::device)])) << " + activations " << format_bytes(double(act))
       << " + CUDA context " << format_bytes(double(context)) << " (assumed, --cuda-context)"
       << (borrows ? " + the trainer's lent arrays " + format_bytes(double(lent)) : std::string()) << "\n";
  return 0;
}

CLI::App* add_plan(CLI::App& app, PlanArgs& a) {
  CLI::App* sub = app.add_subcommand(
      "plan", "Find the cheapest configuration (lowest ZeRO stage, so least communication; optimizer offload to "
              "host memory, then NVMe, only when no stage fits without it) that fits a GPU budget; with --largest, "
              "the largest model of a shape that trains there");
  a.model.dtype = "bf16";  // GPU training: 16-bit compute is the usual case
  add_model_options(sub, a.model, /*with_params=*/true, /*with_stage=*/false);
  add_gpt_shape_options(sub, a.gpt);
  sub->add_option("--gpus", a.gpus, "GPUs (data-parallel ranks), all on one machine")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--gpu-mem", a.gpu_mem, "memory per GPU, e.g. 80GiB")->required();
  sub->add_option("--host-mem", a.host_mem, "host memory of the machine, e.g. 512GiB (checked if given)");
  sub->add_option("--nvme", a.nvme,
                  "NVMe space of the machine for --offload nvme, e.g. 2TB (checked against the state files if given)");
  sub->add_option("--activations", a.activations,
                  "activation memory per GPU to allow for (default: the trainer's for the example MLP at --batch and "
                  "for --model gpt at --seq/--batch/--recompute; 0 for --params)");
  sub->add_option("--cuda-context", a.cuda_context,
                  "device memory of the CUDA context and libraries per GPU, not allocated by the engine or the "
                  "trainer (an assumption, not measured)")
      ->capture_default_str();
  sub->add_option("--headroom", a.headroom,
                  "fraction of each GPU kept free for allocator fragmentation and communicator workspaces")
      ->check(CLI::Range(0.0, 0.9))->capture_default_str();
  sub->add_option("--largest", a.largest,
                  "layers: the most layers of the example MLP at --hidden, or of the GPT at --preset's (or --hidden's) "
                  "width, that trains here; params: the largest --params model (32 equal blocks)")
      ->check(CLI::IsMember({"layers", "params"}));
  add_borrowed_option(sub, a.borrowed, a.borrowed_given,
         "the trainer keeps its own memory for every tensor on the GPU and lends it to the engine "
         "(Engine::borrow_parameters / borrow_gradients): params, grads, or params,grads. Every configuration is "
         "planned with that memory borrowed, and what the trainer lends (the full compute-dtype arrays, on every "
         "GPU) is counted in each GPU's need next to the activations and the CUDA context");
  sub->add_flag("--deepspeed", a.deepspeed,
                "also print DeepSpeed's own estimator's figures for the same model (its published ZeRO-2/ZeRO-3 "
                "formulas; always in --json)");
  sub->add_flag("--json", a.json, "print one JSON object as the last line");
  sub->footer("Exit status: 0 when a configuration fits, 3 when none does.");
  return sub;
}

namespace {

// One configuration of one model against the budget. Host and disk are per GPU (rank); the
// machine holds gpus times that.
struct Row {
  int stage = 0;
  OffloadKind offload = OffloadKind::none;
  bool offload_params = false;
  StatePrecision precision = StatePrecision::fp32;  // Config::state_precision of the row
  // need: device + lent + activations + CUDA context
  std::uint64_t device = 0, host = 0, disk = 0, need = 0;
  // With --borrowed: the trainer's own arrays the engine borrows (MemoryPlan::borrowed on the
  // device). They are the trainer's, not in `device` (what the engine owns), but on the same GPU.
  std::uint64_t lent = 0;
  bool fits_gpu = false, fits_host = true, fits_disk = true;
  bool fits() const { return fits_gpu && fits_host && fits_disk; }
};

struct Budget {
  int gpus = 1;
  std::uint64_t gpu_mem = 0;
  double usable = 0;  // per GPU, after the headroom
  std::uint64_t context = 0;
  std::optional<std::uint64_t> host_mem, nvme;
  // Compressed optimizer state may be proposed: --state-precision was not given (an explicit one,
  // fp32 included, is kept, as --dtype is).
  bool compressed_allowed = true;
  // --borrowed: every configuration is planned with this memory lent by the trainer.
  bool borrows = false;
  Borrowing borrowing;
};

// Every configuration plan considers for one model, in order of preference, and the first that
// fits. `nvme_allowed`: offload to NVMe is a candidate (without --nvme its space is not checked).
struct Assessment {
  std::vector<Row> rows;
  int choice = -1;
  bool tried_offload = false;
  bool tried_compressed = false;
  const Row* chosen() const { return choice < 0 ? nullptr : &rows[std::size_t(choice)]; }
};

Row evaluate(const Config& base, const std::vector<BlockSpec>& blocks, std::uint64_t act, const Budget& b, int stage,
             int world, OffloadKind offload, bool offload_params,
             std::optional<StatePrecision> precision = std::nullopt) {
  Config c = base;
  if (precision) c.state_precision = *precision;
  c.stage = stage;
  c.offload_optimizer = offload;
  c.offload_params = offload_params;
  if (offload == OffloadKind::nvme) c.nvme_dir = "(planned)";  // plan_memory does not touch it
  // The buffers' places are read from the plan, whatever buffers the engine makes.
  const MemoryPlan plan = b.borrows ? plan_memory(c, blocks, world, b.borrowing) : plan_memory(c, blocks, world);
  const MemoryReport r = plan.report();
  Row row;
  row.stage = stage;
  row.offload = offload;
  row.offload_params = offload_params;
  row.precision = c.state_precision;
  row.device = r.peak_total[int(Place::device)];
  row.host = r.peak_total[int(Place::pinned_host)] + r.peak_total[int(Place::host)];
  row.disk = r.peak_total[int(Place::disk)];
  row.lent = plan.borrowed[int(Place::device)];
  // need cannot wrap: the engine's bytes (and the lent arrays, 2 x 4 bytes per parameter at most)
  // for at most 2^48 parameters stay below 2^53, the activations below 2^63 (parse_bytes, or the
  // trainers' checked counts), the context below 2^50. The comparisons, and the products by the GPU
  // count, are made in double all the same, so no rounding of a huge figure can make it look small.
  row.need = row.device + row.lent + act + b.context;
  row.fits_gpu = double(row.device) + double(row.lent) + double(act) + double(b.context) <= b.usable;
  row.fits_host = !b.host_mem || double(row.host) * world <= double(*b.host_mem);
  row.fits_disk = !b.nvme || double(row.disk) * world <= double(*b.nvme);
  return row;
}

Assessment assess(const Config& base, const std::vector<BlockSpec>& blocks, std::uint64_t act, const Budget& b,
                  bool nvme_allowed) {
  Assessment out;
  for (int s = 0; s <= 3; ++s) out.rows.push_back(evaluate(base, blocks, act, b, s, b.gpus, OffloadKind::none, false));
  auto first_fit = [&] {
    for (std::size_t i = 0; i < out.rows.size(); ++i)
      if (out.rows[i].fits()) return int(i);
    return -1;
  };
  out.choice = first_fit();
  // Nothing fits on the GPUs alone: move the optimizer state off them, to host memory first (the
  // faster tier), then to NVMe; within a tier the lower stage (less communication) first, and the
  // parameter shard as well only as a last resort.
  out.tried_offload = out.choice < 0;
  if (out.tried_offload) {
    for (OffloadKind kind : {OffloadKind::host, OffloadKind::nvme}) {
      if (kind == OffloadKind::nvme && !nvme_allowed) continue;
      out.rows.push_back(evaluate(base, blocks, act, b, 2, b.gpus, kind, false));
      out.rows.push_back(evaluate(base, blocks, act, b, 3, b.gpus, kind, false));
      out.rows.push_back(evaluate(base, blocks, act, b, 3, b.gpus, kind, true));
    }
    out.choice = first_fit();
  }
  // Still nothing (and the precision was left at fp32): compressed optimizer state
  // (Config::state_precision), bf16 moments then int8 ones, 4 + 2*2 or 4 + 2*(1 + 4/B) bytes per
  // parameter of state instead of 4 + 2*4 for Adam: on the GPUs (lowest stage first), then in host
  // memory (host offload keeps the compressed form). With NVMe offload the state is on disk.
  out.tried_compressed = out.choice < 0 && base.state_precision == StatePrecision::fp32 && b.compressed_allowed;
  if (out.tried_compressed) {
    for (StatePrecision p : {StatePrecision::bf16, StatePrecision::int8})
      for (int s = 1; s <= 3; ++s) out.rows.push_back(evaluate(base, blocks, act, b, s, b.gpus, OffloadKind::none, false, p));
    for (StatePrecision p : {StatePrecision::bf16, StatePrecision::int8}) {
      out.rows.push_back(evaluate(base, blocks, act, b, 2, b.gpus, OffloadKind::host, false, p));
      out.rows.push_back(evaluate(base, blocks, act, b, 3, b.gpus, OffloadKind::host, false, p));
      out.rows.push_back(evaluate(base, blocks, act, b, 3, b.gpus, OffloadKind::host, true, p));
    }
    out.choice = first_fit();
  }
  return out;
}

std::string offload_text(const Row& r) {
  return std::string(name_of(r.offload)) + (r.offload_params ? "+p" : "") +
         (r.precision != StatePrecision::fp32 ? std::string(" ") + std::string(name_of(r.precision)) : std::string());
}

std::string flags_text(const Row& r) {
  std::string f = "--stage " + std::to_string(r.stage);
  if (r.offload == OffloadKind::host) f += " --offload host";
  if (r.offload == OffloadKind::nvme) f += " --offload nvme --nvme-dir DIR";
  if (r.offload_params) f += " --offload-params";
  if (r.precision != StatePrecision::fp32) f += " --state-precision " + std::string(name_of(r.precision));
  return f;
}

// `borrows` (--borrowed): each row also carries the trainer's lent bytes per GPU (in its need).
Json rows_json(const Assessment& as, bool borrows) {
  Json st = Json::array();
  for (const auto& r : as.rows) {
    Json row = {{"stage", r.stage}, {"offload", std::string(name_of(r.offload))},
                {"offload_params", r.offload_params}, {"state_precision", std::string(name_of(r.precision))},
                {"device_bytes", r.device}, {"host_bytes", r.host},
                {"disk_bytes", r.disk}, {"need_per_gpu", r.need}, {"fits", r.fits()}};
    if (borrows) row["lent_bytes"] = r.lent;
    st.push_back(std::move(row));
  }
  return st;
}

Json choice_json(const Row& c, const Config& cfg, int gpus, bool borrows) {
  Json j = {{"stage", c.stage}, {"offload", std::string(name_of(c.offload))}, {"offload_params", c.offload_params},
            {"state_precision", std::string(name_of(c.precision))}, {"bucket_bytes", cfg.bucket_bytes}, {"prefetch_units", c.stage == 3 ? cfg.prefetch_units : 0},
            {"need_per_gpu", c.need}, {"host_bytes_all_gpus", c.host * std::uint64_t(gpus)},
            {"disk_bytes_all_gpus", c.disk * std::uint64_t(gpus)}};
  if (borrows) j["lent_bytes"] = c.lent;
  return j;
}

// --borrowed in --json: what the trainer lends and its bytes per GPU (the same for every row: the
// full arrays of the model in the compute dtype, whatever the stage).
Json borrowed_json(const Budget& b, std::uint64_t lent) {
  return {{"params", b.borrowing.params}, {"grads", b.borrowing.grads}, {"device_bytes", lent}};
}

// `borrows`: a column for the trainer's lent bytes per GPU, which need/GPU includes.
void print_rows(std::ostream& os, const Assessment& as, int gpus, bool borrows) {
  char line[240];
  if (borrows)
    std::snprintf(line, sizeof line, "%-6s %-10s %14s %14s %14s %14s %14s  %s\n", "stage", "offload", "engine/GPU",
                  "lent/GPU", "need/GPU", "host (all)", "nvme (all)", "fits");
  else
    std::snprintf(line, sizeof line, "%-6s %-10s %14s %14s %14s %14s  %s\n", "stage", "offload", "engine/GPU",
                  "need/GPU", "host (all)", "nvme (all)", "fits");
  os << line;
  for (const auto& r : as.rows) {
    const char* verdict = r.fits() ? "yes" : !r.fits_gpu ? "no (GPU)" : !r.fits_host ? "no (host)" : "no (nvme)";
    if (borrows)
      std::snprintf(line, sizeof line, "%-6d %-10s %14s %14s %14s %14s %14s  %s\n", r.stage, offload_text(r).c_str(),
                    format_bytes(double(r.device)).c_str(), format_bytes(double(r.lent)).c_str(),
                    format_bytes(double(r.need)).c_str(), format_bytes(double(r.host) * gpus).c_str(),
                    format_bytes(double(r.disk) * gpus).c_str(), verdict);
    else
      std::snprintf(line, sizeof line, "%-6d %-10s %14s %14s %14s %14s  %s\n", r.stage, offload_text(r).c_str(),
                    format_bytes(double(r.device)).c_str(), format_bytes(double(r.need)).c_str(),
                    format_bytes(double(r.host) * gpus).c_str(), format_bytes(double(r.disk) * gpus).c_str(), verdict);
    os << line;
  }
}

void print_choice(std::ostream& os, const Row& c, const Config& cfg, const Budget& b, const std::string& size_flags = "") {
  os << "-> stage " << c.stage << ", offload " << offload_text(c) << ", bucket " << format_bytes(double(cfg.bucket_bytes));
  if (c.stage == 3) os << ", prefetch " << cfg.prefetch_units << " units";
  os << ": " << format_bytes(double(c.need)) << " of " << format_bytes(b.usable) << " usable per GPU";
  if (b.borrows) os << " (the trainer's lent " << format_bytes(double(c.lent)) << " included)";
  if (c.offload == OffloadKind::host) os << ", " << format_bytes(double(c.host) * b.gpus) << " of host memory";
  if (c.offload == OffloadKind::nvme) os << ", " << format_bytes(double(c.disk) * b.gpus) << " on NVMe";
  os << "\n   (" << (size_flags.empty() ? "" : size_flags + " ") << flags_text(c) << ")\n";
}

// Why a configuration does not fit: each resource it is over, and by how much.
std::string shortfall(const Row& r, const Budget& b) {
  std::string out;
  auto add = [&](const std::string& s) { out += (out.empty() ? "" : "; ") + s; };
  if (!r.fits_gpu)
    add("needs " + format_bytes(double(r.need)) + " per GPU, " + format_bytes(double(r.need) - b.usable) +
        " over the usable " + format_bytes(b.usable));
  if (!r.fits_host)
    add("needs " + format_bytes(double(r.host) * b.gpus) + " of host memory, " +
        format_bytes(double(r.host) * b.gpus - double(*b.host_mem)) + " over --host-mem");
  if (!r.fits_disk)
    add("needs " + format_bytes(double(r.disk) * b.gpus) + " on NVMe, " +
        format_bytes(double(r.disk) * b.gpus - double(*b.nvme)) + " over --nvme");
  return out;
}

Json shortfall_json(const Row& r, const Budget& b) {
  Json j = {{"stage", r.stage}, {"offload", std::string(name_of(r.offload))}, {"offload_params", r.offload_params},
            {"need_per_gpu", r.need}, {"host_bytes_all_gpus", double(r.host) * b.gpus},
            {"disk_bytes_all_gpus", double(r.disk) * b.gpus}, {"fits_gpu", r.fits_gpu}, {"fits_host", r.fits_host},
            {"fits_disk", r.fits_disk}};
  if (b.borrows) j["lent_bytes"] = r.lent;
  return j;
}

}  // namespace

int run_plan(const PlanArgs& a, Io& io) {
  if (a.model.offload != "none")
    throw UsageError("--offload: plan chooses the offload itself (host, then nvme, when no stage fits without it)");
  if (!a.model.nvme_dir.empty()) throw UsageError("--nvme-dir: not used by plan (see --nvme)");
  const bool gpt = a.gpt.model == "gpt";
  Budget b;
  b.gpus = a.gpus;
  if (a.gpu_mem.empty()) throw UsageError("--gpu-mem: empty (the memory of one GPU, e.g. 80GiB)");
  b.gpu_mem = *size_arg(a.gpu_mem, "--gpu-mem");
  if (b.gpu_mem == 0) throw UsageError("--gpu-mem: '" + a.gpu_mem + "' is no memory (give the GPU's size, e.g. 80GiB)");
  b.host_mem = size_arg(a.host_mem, "--host-mem");
  if (b.host_mem && *b.host_mem == 0)
    throw UsageError("--host-mem: '" + a.host_mem + "' is no memory (give the machine's, e.g. 512GiB)");
  b.nvme = size_arg(a.nvme, "--nvme");
  b.context = context_arg(a.cuda_context);
  b.usable = double(b.gpu_mem) * (1.0 - a.headroom);
  b.compressed_allowed = !a.model.state_precision_given;
  b.borrows = a.borrowed_given;
  if (b.borrows) b.borrowing = borrowed_arg(a.borrowed);
  const std::optional<std::uint64_t> act_given =
      a.activations.empty() ? std::nullopt : size_arg(a.activations, "--activations");
  const int gpt_batch = a.gpt.batch_given ? a.model.batch : 4;
  if (gpt && !a.model.params.empty())
    throw UsageError("--params: not with --model gpt (its size is --preset or --layers/--hidden)");
  if (a.largest == "params" && gpt) throw UsageError("--largest: params is for the --params model; gpt searches layers");
  if (a.largest == "params" && !a.model.params.empty())
    throw UsageError("--params: not with --largest params (the count is what it searches)");
  if (a.largest == "layers" && !a.model.params.empty())
    throw UsageError("--params: not with --largest layers (it searches the layers of the example MLP or the GPT)");
  if (a.largest == "layers" && a.gpt.layers_given)
    throw UsageError("--layers: not with --largest layers (the layer count is what it searches)");

  // The model of each size: the layer count (MLP or GPT) or the parameter count (equal blocks).
  auto sized = [&](std::optional<std::uint64_t> n) -> Sized {
    Sized out;
    ModelArgs m = a.model;
    if (a.largest == "params") m.params = std::to_string(*n);
    if (a.largest == "layers" && !gpt) m.layers = static_cast<int>(*n);
    const int layers = a.largest == "layers" ? static_cast<int>(*n) : 0;
    if (gpt) {
      const gpt::Shape s = gpt_shape_of(a.gpt, a.model, layers);
      out.model.params = gpt::param_count(s);
      out.model.blocks = gpt::blocks(s);
      out.model.description = "GPT " + (a.gpt.preset.empty() ? std::string() : a.gpt.preset + " ") +
                              std::to_string(s.layers) + " layers, hidden " + std::to_string(s.hidden) + ", " +
                              std::to_string(s.heads) + " heads, vocab " + std::to_string(s.vocab);
      DType dt = DType::bf16;
      if (!parse_dtype(m.dtype, dt)) throw UsageError("--dtype: unknown dtype '" + m.dtype + "'");
      out.activations = gpt_activations(s, gpt_batch, a.gpt.seq, dt, a.gpt.recompute);
      out.size_text = std::to_string(s.layers) + " layers";
      out.size_flags = "--model gpt --layers " + std::to_string(s.layers) + " --hidden " + std::to_string(s.hidden) +
                       " --heads " + std::to_string(s.heads) + " --vocab " + std::to_string(s.vocab) +
                       " --positions " + std::to_string(s.max_seq);
    } else {
      out.model = build_model(m);
      if (out.model.example) {
        DType dt = DType::bf16;
        if (!parse_dtype(m.dtype, dt)) throw UsageError("--dtype: unknown dtype '" + m.dtype + "'");
        out.activations = mlp_activations(out.model.shape, m.batch, dt);
      }
      out.size_text = out.model.example ? std::to_string(m.layers) + " layers" : format_count(out.model.params) + " params";
      out.size_flags = out.model.example ? "--layers " + std::to_string(m.layers) + " --hidden " + std::to_string(m.hidden)
                                         : "--params " + std::to_string(out.model.params) + " --blocks " +
                                               std::to_string(out.model.blocks.size());
    }
    if (act_given) out.activations = *act_given;
    return out;
  };
  const std::string act_note =
      act_given ? "given by --activations"
      : gpt ? "the GPT trainer's at --seq " + std::to_string(a.gpt.seq) + " x --batch " + std::to_string(gpt_batch) +
                  (a.gpt.recompute ? ", recompute: one layer's activations kept" : ", every layer's kept for backward")
      : a.largest != "params" && a.model.params.empty() ? "the example model's at --batch " + std::to_string(a.model.batch)
                                                        : "none allowed: pass --activations for your model";

  // `lent`: the trainer's lent bytes per GPU (--borrowed), the same in every row of the model.
  auto print_header = [&](std::ostream& os, const Sized& m, std::uint64_t act, std::uint64_t lent) {
    os << "shardopt plan: " << m.model.description << " (" << format_count(m.model.params) << " params), "
       << a.model.dtype << ", " << a.model.optimizer << "\nbudget: " << a.gpus << " GPU(s) x "
       << format_bytes(double(b.gpu_mem)) << ", usable " << format_bytes(b.usable) << " each after "
       << a.headroom * 100 << "% headroom";
    if (b.host_mem) os << ", host " << format_bytes(double(*b.host_mem));
    if (b.nvme) os << ", nvme " << format_bytes(double(*b.nvme));
    os << "\nper GPU besides the engine: activations " << format_bytes(double(act)) << " (" << act_note
       << "), CUDA context " << format_bytes(double(b.context)) << " (assumed, --cuda-context)";
    if (b.borrows)
      os << ",\n  the trainer's own " << borrowed_text(b.borrowing) << " lent to the engine (--borrowed) "
         << format_bytes(double(lent)) << " (" << lent
         << " bytes; lent/GPU, counted in need/GPU; engine/GPU is the engine's plan with them borrowed)";
    os << "\n\n";
  };
  auto deepspeed_of = [&](const Sized& m) {
    return deepspeed_estimate(double(m.model.params), largest_tensor(m.model.blocks), a.gpus);
  };
  auto print_deepspeed = [&](std::ostream& os, const Json& ds, const Row* c) {
    os << "DeepSpeed's estimator, same model (model states only; GPU per GPU, CPU per node; largest layer "
       << format_count(ds["largest_layer_params"].get<std::uint64_t>()) << " params):\n";
    for (const char* k : {"zero2", "zero2_offload_optimizer", "zero3", "zero3_offload_optimizer", "zero3_offload_all"}) {
      const Json& r = ds[k];
      const bool mine = c && std::string(k) == deepspeed_row_for(c->stage, c->offload != OffloadKind::none,
                                                                 c->offload_params);
      os << "  " << (mine ? "*" : " ") << " GPU " << format_bytes(r["gpu_bytes"].get<double>()) << ", CPU "
         << format_bytes(r["cpu_bytes"].get<double>()) << "  (" << r["options"].get<std::string>() << ")\n";
    }
    if (c) os << "  (* the options matching the configuration above)\n";
  };

  if (a.largest.empty()) {
    const Sized m = sized(std::nullopt);
    const Config cfg = build_config(a.model, m.model);
    const Assessment as = assess(cfg, m.model.blocks, m.activations, b, /*nvme_allowed=*/true);
    const Row* choice = as.chosen();
    // Not fitting: the fewest GPUs with which stage 3 without offload would (its per-GPU bytes fall
    // with the world size down to the gathered units, buckets and activations, which do not).
    std::optional<int> min_gpus;
    if (!choice) {
      auto fits3 = [&](int world) {
        return evaluate(cfg, m.model.blocks, m.activations, b, 3, world, OffloadKind::none, false).fits_gpu;
      };
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
    const Json ds = deepspeed_of(m);
    if (a.json) {
      Json j;
      j["params"] = m.model.params;
      j["model"] = m.model.description;
      j["dtype"] = a.model.dtype;
      j["optimizer"] = a.model.optimizer;
      j["budget"] = {{"gpus", a.gpus}, {"gpu_mem", b.gpu_mem}, {"usable_per_gpu", b.usable}, {"headroom", a.headroom}};
      if (b.host_mem) j["budget"]["host_mem"] = *b.host_mem;
      if (b.nvme) j["budget"]["nvme"] = *b.nvme;
      j["activation_bytes_per_gpu"] = m.activations;
      j["cuda_context_bytes"] = b.context;
      if (b.borrows) j["borrowed"] = borrowed_json(b, as.rows[0].lent);
      j["stages"] = rows_json(as, b.borrows);
      j["offload_considered"] = as.tried_offload;
      j["fits"] = choice != nullptr;
      if (choice) {
        j["choice"] = choice_json(*choice, cfg, a.gpus, b.borrows);
      } else {
        j["over_by"] = double(as.rows[3].need) - b.usable;
        if (min_gpus) j["min_gpus_stage3"] = *min_gpus;
      }
      j["deepspeed"] = ds;
      io.out << j.dump() << '\n';
      return choice ? 0 : 3;
    }
    std::ostream& os = io.out;
    print_header(os, m, m.activations, as.rows[0].lent);
    print_rows(os, as, a.gpus, b.borrows);
    if (!as.tried_offload)
      os << "offload (host, nvme): not needed, a stage fits without it\n";
    else if (!b.host_mem || !b.nvme)
      os << "(host and nvme bytes are checked only against --host-mem and --nvme when given)\n";
    os << '\n';
    if (a.deepspeed) print_deepspeed(os, ds, choice);
    if (choice) {
      print_choice(os, *choice, cfg, b);
      return 0;
    }
    const Row& best = as.rows[3];
    os << "does not fit, not even with offload: ";
    if (!best.fits_gpu)
      os << "stage 3 without offload needs " << format_bytes(double(best.need)) << " per GPU, "
         << format_bytes(double(best.need) - b.usable) << " over the usable " << format_bytes(b.usable) << ". ";
    else
      os << "stage 3 fits the GPUs but needs " << format_bytes(double(best.host) * a.gpus)
         << " of host memory, more than --host-mem. ";
    if (min_gpus && *min_gpus > a.gpus) os << "Stage 3 fits with " << *min_gpus << " GPUs.";
    else if (!best.fits_gpu)
      os << "No GPU count helps: the gathered units, buckets"
         << (b.borrows ? ", activations and the trainer's lent arrays (not sharded)" : " and activations")
         << " alone exceed it.";
    os << "\n";
    return 3;
  }

  // --largest: the size N is searched by doubling, then bisection, keeping "N fits" and "the upper
  // end does not"; each size is checked with every configuration plan considers. NVMe offload is a
  // candidate only with --nvme (unchecked disk space would make every size fit). The answer N
  // fits and N + 1 does not, whatever the shape of the curve between.
  const std::uint64_t limit = a.largest == "params" ? kMaxParams : 100000;  // --layers' own range
  const bool nvme_allowed = b.nvme.has_value();
  struct Probe {
    Sized m;
    Config cfg;
    Assessment as;
  };
  auto probe = [&](std::uint64_t n) {
    Sized m = sized(n);
    Config cfg = build_config(a.model, m.model);
    Assessment as = assess(cfg, m.model.blocks, m.activations, b, nvme_allowed);
    return Probe{std::move(m), std::move(cfg), std::move(as)};
  };
  auto fits = [&](std::uint64_t n) { return probe(n).as.choice >= 0; };
  std::optional<std::uint64_t> best;  // the largest size that fits
  std::uint64_t hi = 1;               // a size that does not fit (or limit + 1)
  if (fits(1)) {
    std::uint64_t lo = 1;
    hi = 2;
    while (hi <= limit && fits(hi)) {
      lo = hi;
      hi = hi > limit / 2 ? limit + 1 : hi * 2;
    }
    if (hi > limit) {
      if (fits(limit)) lo = limit;
      else hi = limit;
    }
    while (hi <= limit && hi - lo > 1) {
      const std::uint64_t mid = lo + (hi - lo) / 2;
      if (fits(mid)) lo = mid;
      else hi = mid;
    }
    best = lo;
    if (lo == limit) hi = limit + 1;
  }
  const std::string what = a.largest == "params" ? "params" : "layers";

  if (!best) {
    const Probe p = probe(1);
    if (a.json) {
      Json j;
      j["largest"] = what;
      j["fits"] = false;
      j["model"] = p.m.model.description;
      j["smallest_tried"] = {{"size", 1}, {"params", p.m.model.params}, {"stages", rows_json(p.as, b.borrows)}};
      if (b.borrows) j["borrowed"] = borrowed_json(b, p.as.rows[0].lent);
      io.out << j.dump() << '\n';
      return 3;
    }
    print_header(io.out, p.m, p.m.activations, p.as.rows[0].lent);
    print_rows(io.out, p.as, a.gpus, b.borrows);
    io.out << "\nnothing of this shape trains here: not even 1 " << (what == "params" ? "parameter" : "layer")
           << " fits (the activations" << (b.borrows ? ", CUDA context and the trainer's lent arrays" : " and CUDA context")
           << " alone: " << format_bytes(double(p.m.activations) + double(b.context) + double(p.as.rows[0].lent))
           << " per GPU)\n";
    return 3;
  }
  const Probe win = probe(*best);
  const Row& c = *win.as.chosen();
  std::optional<Probe> next;
  if (*best < limit) next = probe(*best + 1);
  // The configuration the winner uses, one size up: why the next size does not train here.
  const Row* next_same = nullptr;
  if (next)
    for (const auto& r : next->as.rows)
      if (r.stage == c.stage && r.offload == c.offload && r.offload_params == c.offload_params &&
          r.precision == c.precision)
        next_same = &r;
  const Json ds = deepspeed_of(win.m);

  if (a.json) {
    Json j;
    j["largest"] = what;
    j["fits"] = true;
    j["dtype"] = a.model.dtype;
    j["optimizer"] = a.model.optimizer;
    j["budget"] = {{"gpus", a.gpus}, {"gpu_mem", b.gpu_mem}, {"usable_per_gpu", b.usable}, {"headroom", a.headroom}};
    if (b.host_mem) j["budget"]["host_mem"] = *b.host_mem;
    if (b.nvme) j["budget"]["nvme"] = *b.nvme;
    j["cuda_context_bytes"] = b.context;
    j["size"] = *best;
    j["at_search_limit"] = *best == limit;
    j["params"] = win.m.model.params;
    j["model"] = win.m.model.description;
    j["activation_bytes_per_gpu"] = win.m.activations;
    if (b.borrows) j["borrowed"] = borrowed_json(b, c.lent);
    j["stages"] = rows_json(win.as, b.borrows);
    j["choice"] = choice_json(c, win.cfg, a.gpus, b.borrows);
    j["flags"] = win.m.size_flags + " " + flags_text(c);
    if (next) {
      j["next"] = {{"size", *best + 1}, {"params", next->m.model.params},
                   {"activation_bytes_per_gpu", next->m.activations}, {"fits", next->as.choice >= 0},
                   {"stages", rows_json(next->as, b.borrows)}};
      if (next_same) j["next"]["same_configuration"] = shortfall_json(*next_same, b);
    }
    j["deepspeed"] = ds;
    j["deepspeed_matching"] = deepspeed_row_for(c.stage, c.offload != OffloadKind::none, c.offload_params);
    io.out << j.dump() << '\n';
    return 0;
  }
  std::ostream& os = io.out;
  print_header(os, win.m, win.m.activations, c.lent);
  os << "largest that trains here: " << win.m.size_text << " (" << format_count(win.m.model.params) << " params)"
     << (*best == limit ? ", the search's limit" : "") << "\n";
  print_rows(os, win.as, a.gpus, b.borrows);
  os << '\n';
  print_choice(os, c, win.cfg, b, win.m.size_flags);
  if (next) {
    os << "next size up, " << next->m.size_text << " (" << format_count(next->m.model.params)
       << " params), does not train here: ";
    if (next_same) os << "stage " << next_same->stage << ", offload " << offload_text(*next_same) << " "
                      << shortfall(*next_same, b);
    os << "; no other stage or offload fits either";
    if (!nvme_allowed) os << " (NVMe offload considered only with --nvme)";
    os << "\n";
  }
  if (a.deepspeed) {
    os << '\n';
    print_deepspeed(os, ds, &c);
  }
  return 0;
}

}  // namespace shardopt::cli
