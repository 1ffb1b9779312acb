#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "shardopt/cuda.hpp"
#include "units.hpp"

namespace shardopt::cli {

std::vector<std::string> rule_choices() {
  std::vector<std::string> out;
#define SHARDOPT_RULE_CHOICE(id, Rule) out.emplace_back(Rule::name);
  SHARDOPT_RULES(SHARDOPT_RULE_CHOICE)
#undef SHARDOPT_RULE_CHOICE
  return out;
}

namespace {

// The value as a double if all of `text` is one number (nan and inf included: they are told
// apart from malformed text by the callers).
std::optional<double> whole_number(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size()) return std::nullopt;
  return v;
}

}  // namespace

const CLI::Validator& unsigned_integer() {
  static const CLI::Validator v(
      [](std::string& text) -> std::string {
        const bool digits = !text.empty() && text.size() <= 20 &&
                            std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
        errno = 0;
        if (!digits || (std::strtoull(text.c_str(), nullptr, 10), errno == ERANGE))
          return "'" + text + "' is not an integer in 0.." + std::to_string(~std::uint64_t(0));
        return {};
      },
      "UINT");
  return v;
}

const CLI::Validator& positive_finite() {
  static const CLI::Validator v(
      [](std::string& text) -> std::string {
        const auto x = whole_number(text);
        if (!x) return "'" + text + "' is not a number";
        if (!std::isfinite(*x) || *x <= 0) return "must be a finite number > 0, not '" + text + "'";
        return {};
      },
      "POSITIVE");
  return v;
}

const CLI::Validator& non_negative_finite() {
  static const CLI::Validator v(
      [](std::string& text) -> std::string {
        const auto x = whole_number(text);
        if (!x) return "'" + text + "' is not a number";
        if (!std::isfinite(*x) || *x < 0) return "must be a finite number >= 0, not '" + text + "'";
        return {};
      },
      "NONNEGATIVE");
  return v;
}

const CLI::Validator& non_empty_path() {
  static const CLI::Validator v(
      [](std::string& text) -> std::string { return text.empty() ? "an empty path" : std::string(); }, "PATH");
  return v;
}

double default_lr(OptimizerKind k) {
  double lr = 1e-3;
  visit_rule(k, [&](auto kind) { lr = rule_t<decltype(kind)::value>::default_lr; });
  return lr;
}

void add_model_options(CLI::App* sub, ModelArgs& a, bool with_params, bool with_stage) {
  CLI::Option* layers = sub->add_option("--layers", a.layers, "residual MLP blocks of the example model")
                            ->check(CLI::Range(1, 100000))->capture_default_str();
  CLI::Option* hidden = sub->add_option("--hidden", a.hidden, "hidden size h of the example model (inner 4h)")
                            ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  if (with_params) {
    CLI::Option* params = sub->add_option("--params", a.params,
                                          "model size instead of --layers/--hidden: a count such as 1.3B, 350M, 7e9 "
                                          "(equal blocks of one tensor each)");
    params->excludes(layers)->excludes(hidden);
    sub->add_option("--blocks", a.blocks, "blocks the --params model is split into")
        ->check(CLI::Range(1, 1000000))->capture_default_str()->needs(params);
  }
  sub->add_option("--batch", a.batch, "rows per micro-batch per rank")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  sub->add_option("--dtype", a.dtype, "compute dtype of parameters and gradients (fp16 turns on dynamic loss scaling)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))->capture_default_str();
  sub->add_option("--optimizer", a.optimizer, "update rule")
      ->check(CLI::IsMember(rule_choices()))->capture_default_str();
  if (with_stage)
    sub->add_option("--stage", a.stage, "ZeRO stage: 0 DDP, 1 optimizer state, 2 + gradients, 3 + parameters")
        ->check(CLI::Range(0, 3))->capture_default_str();
  sub->add_option("--micro-steps", a.micro_steps, "micro-steps (gradient accumulation) per step")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--bucket", a.bucket,
                  "min bytes of a unit / gradient bucket, e.g. 4MiB; auto: model bytes/16 as a power of two "
                  "in [64 KiB, 25 MiB]")->capture_default_str();
  sub->add_option("--prefetch", a.prefetch, "stage 3: units gathered ahead")->check(CLI::Range(0, 64))->capture_default_str();
  sub->add_option("--offload", a.offload,
                  "optimizer offload: none; host (fp32 master weights and moments in pinned host memory, "
                  "updated on the CPU); nvme (the same in one file per rank under --nvme-dir)")
      ->check(CLI::IsMember({"none", "host", "nvme"}))->capture_default_str();
  sub->add_option("--nvme-dir", a.nvme_dir, "directory for the optimizer-state files of --offload nvme (required there)");
  if (with_stage)
    sub->add_flag("--offload-params", a.offload_params,
                  "stage 3 with --offload host|nvme: keep the parameter shard in pinned host memory too");
  sub->add_option("--state-precision", a.state_precision,
                  "how the optimizer's moments are stored (master weights stay fp32): fp32; bf16 (2 bytes, round to "
                  "nearest even); int8 (1 byte, blockwise 8-bit float codes with one fp32 scale per --quant-block "
                  "elements, stochastic rounding); kept in that form with --offload host|nvme and in checkpoints")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}))
      ->each([&a](const std::string&) { a.state_precision_given = true; })
      ->capture_default_str();
  sub->add_option("--quant-block", a.quant_block,
                  "--state-precision int8: elements per quantization block (a power of two in [64, 4096])")
      ->capture_default_str();
}

std::size_t auto_bucket_bytes(std::uint64_t params, DType compute) {
  const std::uint64_t bytes = params * size_of(compute) / 16;
  std::uint64_t b = std::uint64_t(64) << 10;
  while (b * 2 <= bytes && b * 2 <= (std::uint64_t(25) << 20)) b *= 2;
  return static_cast<std::size_t>(b);
}

Model build_model(const ModelArgs& a) {
  Model m;
  if (a.params.empty()) {
    m.example = true;
    m.shape = {a.layers, a.hidden};
    m.blocks = mlp::blocks(m.shape);
    m.params = mlp::param_count(m.shape);
    m.description = "example MLP, " + std::to_string(a.layers) + " blocks of hidden " + std::to_string(a.hidden);
    return m;
  }
  const auto n = parse_count(a.params);
  if (too_large(a.params, /*bytes=*/false) || (n && *n > kMaxParams))
    throw UsageError("--params: '" + a.params + "' is too large (at most " + format_count(kMaxParams) + " parameters)");
  if (!n || *n == 0)
    throw UsageError("--params: '" + a.params + "' is not a positive parameter count (e.g. 1.3B, 350M, 7e9)");
  m.params = *n;
  // Equal blocks (the first `rest` one element larger) so the sizes sum to exactly --params.
  const std::uint64_t nb = std::min<std::uint64_t>(static_cast<std::uint64_t>(a.blocks), *n);
  const std::uint64_t base = *n / nb, rest = *n % nb;
  for (std::uint64_t b = 0; b < nb; ++b) {
    const std::string name = "block" + std::to_string(b);
    const auto size = static_cast<std::int64_t>(base + (b < rest ? 1 : 0));
    m.blocks.push_back({name, {{name + ".w", {size}}}});
  }
  m.description = std::to_string(nb) + " equal blocks";
  return m;
}

void check_offload(const ModelArgs& a) {
  if (a.offload == "nvme" && a.nvme_dir.empty())
    throw UsageError("--nvme-dir: required with --offload nvme (the directory for the optimizer state)");
  if (!a.nvme_dir.empty() && a.offload != "nvme")
    throw UsageError("--nvme-dir: only used with --offload nvme");
  if (a.offload_params && a.stage != 3)
    throw UsageError("--offload-params: only at --stage 3 (the parameter shard exists there only; stage is " +
                     std::to_string(a.stage) + ")");
  if (a.offload_params && a.offload == "none")
    throw UsageError("--offload-params: needs --offload host or nvme (the CPU update writes the offloaded shard)");
}

bool parse_offload(const std::string& text, OffloadKind& out) {
  if (text == "none") out = OffloadKind::none;
  else if (text == "host") out = OffloadKind::host;
  else if (text == "nvme") out = OffloadKind::nvme;
  else return false;
  return true;
}

Config build_config(const ModelArgs& a, const Model& m) {
  Config c;
  c.stage = a.stage;
  if (!parse_dtype(a.dtype, c.compute_dtype)) throw UsageError("--dtype: unknown dtype '" + a.dtype + "'");
  c.reduce_dtype = c.compute_dtype;
  if (c.compute_dtype == DType::fp16) c.loss_scaling.mode = LossScaleMode::dynamic;
  if (!parse_optimizer(a.optimizer, c.optimizer)) throw UsageError("--optimizer: unknown rule '" + a.optimizer + "'");
  if (a.bucket == "auto") {
    c.bucket_bytes = auto_bucket_bytes(m.params, c.compute_dtype);
  } else {
    const auto b = parse_bytes(a.bucket);
    if (too_large(a.bucket, /*bytes=*/true)) throw UsageError("--bucket: '" + a.bucket + "' is too large");
    if (!b || *b == 0) throw UsageError("--bucket: '" + a.bucket + "' is not a size (e.g. 4MiB, 25MB, auto)");
    c.bucket_bytes = static_cast<std::size_t>(*b);
  }
  c.prefetch_units = a.prefetch;
  c.accumulation_steps = a.micro_steps;
  if (!parse_offload(a.offload, c.offload_optimizer)) throw UsageError("--offload: unknown kind '" + a.offload + "'");
  c.nvme_dir = a.nvme_dir;
  c.offload_params = a.offload_params;
  if (!parse_state_precision(a.state_precision, c.state_precision))
    throw UsageError("--state-precision: unknown precision '" + a.state_precision + "' (fp32, bf16 or int8)");
  c.quant_block = a.quant_block;
  if (c.state_precision == StatePrecision::int8) {
    const std::size_t b = a.quant_block;
    if (b < kMinQuantBlock || b > kMaxQuantBlock || (b & (b - 1)) != 0)
      throw UsageError("--quant-block: " + std::to_string(b) + " is not a power of two in [" +
                       std::to_string(kMinQuantBlock) + ", " + std::to_string(kMaxQuantBlock) + "]");
  }
  return c;
}

void check_backend(const std::string& backend, const char* what, bool cuda_supported) {
  if (backend == "cpu") return;
  if (!cuda_device_available())
    throw UsageError("--backend cuda: no CUDA device (none was found, or this build has no CUDA backend); "
                     "use --backend cpu");
  if (!cuda_supported) throw UsageError(std::string("--backend cuda: ") + what + " runs on the CPU backend only");
}

Json bytes_json(const MemoryReport& r, bool peak) {
  Json out = Json::object();
  for (int p = 0; p < kPlaceCount; ++p) {
    Json place = Json::object();
    std::size_t sum = 0;
    for (int c = 0; c < kCategoryCount; ++c) {
      const std::size_t v = peak ? r.peak[c][p] : r.current[c][p];
      place[std::string(name_of(static_cast<Category>(c)))] = v;
      sum += v;
    }
    place["total"] = peak ? r.peak_total[p] : sum;
    out[std::string(name_of(static_cast<Place>(p)))] = place;
  }
  return out;
}

std::string bytes_table(const MemoryReport& r, bool peak) {
  std::vector<int> places;
  for (int p = 0; p < kPlaceCount; ++p)
    if (r.peak_total[p] > 0 || r.current_total(static_cast<Place>(p)) > 0) places.push_back(p);
  if (places.empty()) places.push_back(static_cast<int>(Place::device));
  std::ostringstream os;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%-18s", "bytes per rank");
  os << buf;
  for (int p : places) {
    std::snprintf(buf, sizeof buf, "%14s", std::string(name_of(static_cast<Place>(p))).c_str());
    os << buf;
  }
  os << '\n';
  for (int c = 0; c < kCategoryCount; ++c) {
    std::snprintf(buf, sizeof buf, "%-18s", std::string(name_of(static_cast<Category>(c))).c_str());
    os << buf;
    for (int p : places) {
      std::snprintf(buf, sizeof buf, "%14s", format_bytes(double(peak ? r.peak[c][p] : r.current[c][p])).c_str());
      os << buf;
    }
    os << '\n';
  }
  std::snprintf(buf, sizeof buf, "%-18s", "total");
  os << buf;
  for (int p : places) {
    const std::size_t t = peak ? r.peak_total[p] : r.current_total(static_cast<Place>(p));
    std::snprintf(buf, sizeof buf, "%14s", format_bytes(double(t)).c_str());
    os << buf;
  }
  os << '\n';
  return os.str();
}

int run(int argc, const char* const* argv, Io& io) {
  CLI::App app{"shardopt: ZeRO-style sharded optimizers. Train the example model, estimate and plan memory, "
               "benchmark the optimizer update.",
               "shardopt"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::to_string(SHARDOPT_VERSION_MAJOR) + "." +
                                        std::to_string(SHARDOPT_VERSION_MINOR) + "." +
                                        std::to_string(SHARDOPT_VERSION_PATCH));
  TrainArgs train;
  EstimateArgs estimate;
  PlanArgs plan;
  BenchArgs bench;
  CLI::App* train_cmd = add_train(app, train);
  CLI::App* estimate_cmd = add_estimate(app, estimate);
  CLI::App* plan_cmd = add_plan(app, plan);
  CLI::App* bench_cmd = add_bench(app, bench);
  CheckpointArgs checkpoint;
  const CheckpointCommands checkpoint_cmd = add_checkpoint(app, checkpoint);
  GenerateArgs generate;
  CLI::App* generate_cmd = add_generate(app, generate);
  TokenizeArgs tokenize;
  CLI::App* tokenize_cmd = add_tokenize(app, tokenize);

  // A word where a subcommand is expected that names none (CLI11 says only "A subcommand is
  // required") is named, with the list to choose from: at the top level and under the commands
  // that have subcommands of their own (checkpoint, bench).
  {
    CLI::App* level = &app;
    std::string path = "shardopt";
    for (int i = 1; i < argc && argv[i][0] != '-' && !level->get_subcommands([](CLI::App*) { return true; }).empty();
         ++i) {
      std::string names;
      CLI::App* next = nullptr;
      for (CLI::App* sub : level->get_subcommands([](CLI::App*) { return true; })) {
        names += (names.empty() ? "" : ", ") + sub->get_name();
        if (sub->check_name(argv[i])) next = sub;
      }
      if (!next) {
        io.err << path << ": unknown subcommand '" << argv[i] << "'; the subcommands are " << names
               << "\nRun with --help for more information.\n";
        return 2;
      }
      level = next;
      path += " " + next->get_name();
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e, io.out, io.err);
  }
  std::string which = "shardopt";
  const int rc = [&]() -> int {
    try {
      if (train_cmd->parsed()) {
        which += " train";
        train.gpt.batch_given = train_cmd->count("--batch") > 0;
        train.gpt.layers_given = train_cmd->count("--layers") > 0;
        train.gpt.hidden_given = train_cmd->count("--hidden") > 0;
        train.ranks_given = train_cmd->count("--ranks") > 0;
        train.keep_given = train_cmd->count("--keep") > 0;
        return run_train(train, io);
      }
      if (estimate_cmd->parsed()) {
        which += " estimate";
        estimate.gpt.batch_given = estimate_cmd->count("--batch") > 0;
        estimate.gpt.layers_given = estimate_cmd->count("--layers") > 0;
        estimate.gpt.hidden_given = estimate_cmd->count("--hidden") > 0;
        return run_estimate(estimate, io);
      }
      if (plan_cmd->parsed()) {
        which += " plan";
        plan.gpt.batch_given = plan_cmd->count("--batch") > 0;
        plan.gpt.layers_given = plan_cmd->count("--layers") > 0;
        plan.gpt.hidden_given = plan_cmd->count("--hidden") > 0;
        return run_plan(plan, io);
      }
      if (checkpoint_cmd.inspect->parsed()) {
        which += " checkpoint inspect";
        return run_checkpoint_inspect(checkpoint, io);
      }
      if (checkpoint_cmd.exporter->parsed()) {
        which += " checkpoint export";
        return run_checkpoint_export(checkpoint, io);
      }
      if (generate_cmd->parsed()) {
        which += " generate";
        return run_generate(generate, io);
      }
      if (tokenize_cmd->parsed()) {
        which += " tokenize";
        return run_tokenize(tokenize, io);
      }
      if (bench_cmd->parsed()) {
        which += " bench update";
        return run_bench(bench, io);
      }
    } catch (const UsageError& e) {
      io.err << which << ": error: " << e.what() << "\nRun with --help for more information.\n";
      return 2;
    } catch (const Error& e) {
      io.err << which << ": error: " << e.message() << " [" << to_string(e.code()) << "]\n";
      return 1;
    } catch (const std::bad_alloc&) {
      // The engine and the trainers report their own buffers by name (out_of_memory); this is
      // the last resort for an allocation elsewhere.
      io.err << which << ": error: out of memory (an allocation outside the engine's buffers failed) [out_of_memory]\n";
      return 1;
    } catch (const std::exception& e) {
      io.err << which << ": error: " << e.what() << '\n';
      return 1;
    }
    io.err << "shardopt: no subcommand\n";
    return 2;
  }();
  // Output that never reached its destination (stdout on a full device, a closed pipe) is a
  // failure too: the caller must not take a missing result line for success.
  io.out.flush();
  if (!io.out) {
    io.err << which << ": error: writing the output (stdout) failed\n";
    return rc != 0 ? rc : 1;
  }
  return rc;
}

}  // namespace shardopt::cli
