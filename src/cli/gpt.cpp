// The GPT side of the command line: `train --model gpt` (the flags it adds to train, and its
// run), `generate`, `tokenize`, and the Hugging Face layout of `checkpoint export`.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "data.hpp"
#include "gpt.hpp"
#include "units.hpp"
#if defined(SHARDOPT_CLI_GPT_CUDA)
#include "cuda/train_cuda.hpp"
#endif

namespace shardopt::cli {

void add_gpt_shape_options(CLI::App* sub, GptArgs& g) {
  sub->add_option("--model", g.model, "mlp: the example residual MLP; gpt: GPT-2's architecture (see --preset)")
      ->check(CLI::IsMember({"mlp", "gpt"}))->capture_default_str();
  sub->add_option("--preset", g.preset, "gpt: tiny, small, medium, large, xl; empty: --layers/--heads/--hidden/--vocab")
      ->check(CLI::IsMember({"", "tiny", "small", "medium", "large", "xl"}));
  sub->add_option("--heads", g.heads, "gpt: attention heads")->check(CLI::Range(1, 4096))->capture_default_str();
  sub->add_option("--vocab", g.vocab, "gpt: vocabulary size")->check(CLI::Range(1, 65536))->capture_default_str();
  sub->add_option("--positions", g.positions, "gpt: learned positions (default: --seq)")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--seq", g.seq, "gpt: tokens per sequence")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_flag("--recompute", g.recompute, "gpt: activations of one layer at a time (see train --recompute)");
}

void add_gpt_train_options(CLI::App* sub, GptArgs& g) {
  sub->add_option("--model", g.model,
                  "mlp: residual MLP blocks learning a teacher (the minimal example); gpt: GPT-2's architecture "
                  "on a token file (--data)")
      ->check(CLI::IsMember({"mlp", "gpt"}))->capture_default_str();
  sub->add_option("--preset", g.preset,
                  "gpt: tiny (4 layers, hidden 128, vocab 256), small (124M), medium (350M), large (774M), xl (1.5B); "
                  "empty: --layers/--heads/--hidden/--vocab/--positions")
      ->check(CLI::IsMember({"", "tiny", "small", "medium", "large", "xl"}));
  sub->add_option("--heads", g.heads, "gpt: attention heads (hidden must be a multiple)")
      ->check(CLI::Range(1, 4096))->capture_default_str();
  sub->add_option("--vocab", g.vocab, "gpt: vocabulary size (256 for byte-level data)")
      ->check(CLI::Range(1, 65536))->capture_default_str();
  sub->add_option("--positions", g.positions, "gpt: learned positions (default: --seq)")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--seq", g.seq, "gpt: tokens per sequence")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--data", g.data, "gpt: token file (llm.c format; see shardopt tokenize)");
  sub->add_option("--init-from", g.init_from,
                  "gpt: start from a safetensors file, or a directory holding model.safetensors (Hugging Face GPT-2 "
                  "names); each rank reads only what it owns");
  sub->add_flag("--recompute", g.recompute, "gpt: keep only each layer's input; recompute its activations in backward");
}


gpt::Shape gpt_shape(const GptArgs& g, const ModelArgs& m, bool explicit_layers, bool explicit_hidden) {
  if (!g.preset.empty()) {
    if (explicit_layers || explicit_hidden)
      throw UsageError("--preset: give either a preset or --layers/--hidden, not both");
    return gpt::preset(g.preset);
  }
  gpt::Shape s{m.layers, g.heads, m.hidden, g.vocab, g.positions > 0 ? g.positions : g.seq};
  if (s.hidden % s.heads != 0)
    throw UsageError("--heads: hidden " + std::to_string(s.hidden) + " is not a multiple of " + std::to_string(s.heads) +
                     " heads");
  return s;
}

Model build_gpt_model(const GptArgs& g, const ModelArgs& m) {
  if (!m.params.empty()) throw UsageError("--params: not with --model gpt (its size is --preset or --layers/--hidden)");
  Model model;
  const gpt::Shape s = gpt_shape(g, m, g.layers_given, g.hidden_given);
  model.params = gpt::param_count(s);
  model.blocks = gpt::blocks(s);
  model.description = "GPT " + (g.preset.empty() ? std::string() : g.preset + " ") + std::to_string(s.layers) +
                      " layers, hidden " + std::to_string(s.hidden) + ", vocab " + std::to_string(s.vocab);
  return model;
}

std::size_t gpt_activation_bytes(const GptArgs& g, const ModelArgs& m, DType compute) {
  const gpt::Shape s = gpt_shape(g, m, g.layers_given, g.hidden_given);
  return gpt::activation_bytes(s, g.batch_given ? m.batch : 4, g.seq, compute, g.recompute);
}

int run_train_gpt(const TrainArgs& a, Io& io, const std::string& resume_note) {
#if defined(SHARDOPT_CLI_GPT_CUDA)
  check_backend(a.backend, "the GPT trainer", /*cuda_supported=*/true);
#else
  check_backend(a.backend, "the GPT trainer");
#endif
  const bool cuda = a.backend == "cuda";
  check_offload(a.model);
  const GptArgs& g = a.gpt;
  if (g.data.empty()) throw UsageError("--data: required with --model gpt (a token file; see shardopt tokenize)");
  if (!std::filesystem::exists(g.data)) throw UsageError("--data: '" + g.data + "' does not exist");
  if (!g.init_from.empty() && !std::filesystem::exists(g.init_from))
    throw UsageError("--init-from: '" + g.init_from + "' does not exist");

  // Under a launcher every process is one rank of the launcher's world (as for the MLP trainer).
  LaunchedJob job;
  join_launched_job(a, job, "the GPT trainer", /*cuda_supported=*/cuda);
  Bootstrap* const boot = job.bootstrap.get();
  const int world = boot ? boot->world_size() : a.ranks;
  const bool lead = !boot || boot->rank() == 0;  // prints and writes the outputs

  gpt::TrainOptions o;
  o.shape = gpt_shape(g, a.model, g.layers_given, g.hidden_given);
  if (g.seq > o.shape.max_seq)
    throw UsageError("--seq: " + std::to_string(g.seq) + " is more than the model's " +
                     std::to_string(o.shape.max_seq) + " positions");
  o.seq = g.seq;
  o.batch = g.batch_given ? a.model.batch : 4;
  o.ranks = world;
  // The JSON's param_digest needs every master value in this process (a full fp32 copy of the
  // model, gathered from the ranks that own it): only when it is asked for.
  o.collect_master = a.json;
  o.steps = a.steps;
  o.seed = a.seed;
  o.threads = a.threads;
  o.data = g.data;
  o.init_from = g.init_from;
  o.recompute = g.recompute;
  o.resume_dir = a.resume;
  o.save_dir = a.save;
  o.save_every = a.save_every;
  o.keep = a.keep;
  o.checkpoints_dir = a.save;
  int first_step = 0;  // where a resumed run starts: its record, or (older checkpoints) its update count
  if (!a.resume.empty()) {
    const CheckpointInfo info = inspect_checkpoint(a.resume);
    first_step = info.trainer_metadata.empty() ? static_cast<int>(info.step) : mlp::read_next_step(info.trainer_metadata);
  }
  Model model;
  model.params = gpt::param_count(o.shape);
  model.blocks = gpt::blocks(o.shape);
  o.config = build_config(a.model, model);
  apply_optimizer_args(a, o.config, first_step);
  // Every destination is checked now, before anything trains (a run must not fail at its end).
  check_train_outputs(a, model.params, o.config, first_step);
  if (boot) {
    o.bootstrap = boot;
    o.make_communicator = job.make_communicator;
    o.blas_threads = job.blas_threads;
    o.local_rank = job.local_rank;
    check_agreement(*boot, o.config, gpt::blocks(o.shape));
    if (o.collect_master)
      check_master_gather(*boot, model.params, 12 * static_cast<std::size_t>(o.shape.layers) + 4,
                          "--json (its param_digest; leave --json out for a model this large)");
  }
  // Before any thread, and before the GEMM peak is measured: a run short of address space fails
  // now, naming the limit, instead of hanging in OpenBLAS.
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const int gm = std::min(1024, std::max(512, o.batch * o.seq)), gk = std::min(4096, std::max(512, o.shape.hidden));
  if (!cuda) {
    const std::uint64_t peak_matrices = (std::uint64_t(gm) * gk + 4ull * gk * gk + 4ull * gm * gk) * 4;
    check_address_space(planned_memory_bytes(o.config, model.blocks, world),
                        gpt::activation_bytes(o.shape, o.batch, o.seq, o.config.compute_dtype, o.recompute),
                        (o.collect_master ? std::uint64_t(model.params) * 4 * (boot ? 4 : 1) : 0) + peak_matrices,
                        boot ? 1 : world);
  }

  std::unique_ptr<MetricsFile> metrics;
  if (!a.metrics.empty() && lead) metrics = std::make_unique<MetricsFile>(a.metrics);
  std::ostringstream discard;  // the other processes of a launched job print nothing
  std::ostream& human = !lead ? discard : a.json ? io.err : io.out;
  const bool live = lead && (a.json ? io.err_tty : io.out_tty);
  if (!resume_note.empty() && lead) io.err << "shardopt train: " << resume_note << '\n';

  // The GEMM peak MFU is measured against: the best of an sgemm the size of the model's MLP
  // products (at least 512 x 2048 x 512), on every core, run before and after training in this
  // run (the better of the two: on a shared machine the other one may have been disturbed).
  auto measure_peak = [&] {
    if (!lead) return 0.0;  // only the printing process reports MFU (the others would compete for the cores)
#if defined(SHARDOPT_CLI_GPT_CUDA)
    if (cuda) return gpt::measure_cublas_gflops(std::max(gm, 4096), 4 * gk, gk, 8);
#endif
    return gpt::measure_sgemm_gflops(gm, 4 * gk, gk, static_cast<int>(hw), 8);
  };
  double peak = measure_peak();
  const double fpt = gpt::flops_per_token(o.shape, o.seq);
  const double tokens_per_step = double(world) * o.batch * o.seq * o.config.accumulation_steps;

  human << "shardopt train: GPT " << (g.preset.empty() ? "" : g.preset + " ") << o.shape.layers << " layers, "
        << o.shape.heads << " heads, hidden " << o.shape.hidden << ", vocab " << o.shape.vocab << " ("
        << format_count(model.params) << " params), seq " << o.seq << " x batch " << o.batch << " x " << world
        << (boot ? " ranks (" + std::string(boot->kind()) + ", one per process)" : std::string(" ranks")) << ", stage " << o.config.stage << ", " << a.model.dtype << ", " << a.model.optimizer << " lr "
        << o.config.hyper.lr << (o.recompute ? ", recompute" : "")
        << (a.model.offload == "none" ? "" : ", offload " + a.model.offload)
        << (a.model.state_precision == "fp32" ? "" : ", " + a.model.state_precision + " optimizer state") << ", "
        << a.steps << " steps\n"
        << (a.save_every > 0 ? "checkpoints every " + std::to_string(a.save_every) + " steps into " +
                                   (std::filesystem::path(a.save) / "step-NNNNNN").string() + " in the background (the newest " +
                                   std::to_string(a.keep) + " kept)\n"
                             : std::string())
        << "data " << g.data << (g.init_from.empty() ? "" : ", init from " + g.init_from) << "; " << (cuda ? "cuBLAS bf16" : "sgemm") << " peak "
        << static_cast<long>(peak) << " GFLOP/s (" << (cuda ? "CUDA device 0" : std::to_string(hw) + " threads")
        << ", measured now)\n";
  human.flush();

  const int every = std::max(1, a.steps / 10);
  const int last_step = first_step + a.steps;  // step numbers continue a resumed run
  auto on_step = [&](const gpt::StepRecord& s) {
    const double tps = s.step_ms > 0 ? tokens_per_step * 1000.0 / s.step_ms : 0.0;
    const double mfu = peak > 0 ? fpt * tps / (peak * 1e9) : 0.0;
    if (metrics) {
      Json j;
      j["step"] = s.step;
      j["loss"] = s.loss;
      j["step_ms"] = s.step_ms;
      j["tokens_per_s"] = tps;
      j["mfu"] = mfu;
      j["applied"] = s.applied;
      j["grad_norm"] = s.grad_norm;
      j["lr"] = s.lr;
      metrics->write(j.dump(), s.step, io.err);
    }
    char line[240];
    std::snprintf(line, sizeof line, "step %d/%d  loss %.4f  %.0f ms/step  %.0f tok/s  MFU %.1f%%  mem/rank %s%s",
                  s.step, last_step, s.loss, s.step_ms, tps, 100.0 * mfu, format_bytes(double(s.rank_bytes)).c_str(),
                  s.applied ? "" : "  (skipped: overflow)");
    if (live) {
      human << '\r' << line << "\x1b[K";
      if (s.step == last_step) human << '\n';
      human.flush();
    } else if (s.step % every == 0 || s.step == first_step + 1 || s.step == last_step) {
      human << line << '\n';
      human.flush();
    }
  };
#if defined(SHARDOPT_CLI_GPT_CUDA)
  const gpt::TrainResult r = cuda ? gpt::train_cuda(o, on_step) : gpt::train(o, on_step);
#else
  const gpt::TrainResult r = gpt::train(o, on_step);
#endif
  const double peak_after = measure_peak();
  if (peak_after > peak) {
    human << "GEMM peak after training " << static_cast<long>(peak_after) << " GFLOP/s (the live line used "
          << static_cast<long>(peak) << ")\n";
    peak = peak_after;
  }

  std::vector<double> ms;
  for (const auto& s : r.steps) ms.push_back(s.step_ms);
  const double med = median(ms);
  const double tps = med > 0 ? tokens_per_step * 1000.0 / med : 0.0;
  const double mfu = peak > 0 ? fpt * tps / (peak * 1e9) : 0.0;
  human << "loss " << r.steps.front().loss << " -> " << r.steps.back().loss << " over " << a.steps << " steps ("
        << r.skipped_steps << " skipped), median " << med << " ms/step, " << static_cast<long>(tps) << " tok/s, MFU "
        << 100.0 * mfu << "% of the measured GEMM peak\n"
        << "rank 0 memory (engine buffers; the trainer's activations and workspace, "
        << format_bytes(double(r.activation_bytes)) << " per rank, are outside it):\n"
        << r.memory[0].to_string();
  if (!a.save.empty()) human << "saved " << a.save << " (export: shardopt checkpoint export " << a.save << " --out DIR)\n";
  human.flush();
  if (a.json && lead) {
    Json j;
    j["model"] = "gpt";
    j["params"] = r.params;
    j["layers"] = o.shape.layers;
    j["heads"] = o.shape.heads;
    j["hidden"] = o.shape.hidden;
    j["vocab"] = o.shape.vocab;
    j["seq"] = o.seq;
    j["batch"] = o.batch;
    j["ranks"] = world;
    j["launcher"] = boot ? std::string(boot->kind()) : std::string("in-process");
    j["stage"] = o.config.stage;
    j["dtype"] = a.model.dtype;
    j["steps"] = a.steps;
    j["recompute"] = o.recompute;
    j["loss_first"] = r.steps.front().loss;
    j["loss_last"] = r.steps.back().loss;
    j["losses"] = [&] {
      Json l = Json::array();
      for (const auto& s : r.steps) l.push_back(s.loss);
      return l;
    }();
    j["skipped_steps"] = r.skipped_steps;
    {
      char hex[20];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(mlp::digest(r.master)));
      j["param_digest"] = "fnv1a64:" + std::string(hex);  // as train --model mlp: every master value, tensor order
    }
    j["step_ms_median"] = med;
    j["tokens_per_s"] = tps;
    j["flops_per_token"] = fpt;
    j["backend"] = a.backend;
    j["gemm_peak_gflops"] = peak;
    j["mfu"] = mfu;
    j["activation_bytes_per_rank"] = r.activation_bytes;
    Json peaks = Json::array();
    for (const auto& m : r.memory) peaks.push_back(bytes_json(m, /*peak=*/true));
    j["peak_bytes"] = peaks;
    io.out << j.dump() << '\n';
  }
  if (metrics) metrics->close();  // after the results: a failed log does not hide them
  return 0;
}

CLI::App* add_generate(CLI::App& app, GenerateArgs& a) {
  CLI::App* sub = app.add_subcommand("generate", "Sample tokens from a GPT checkpoint (shardopt train --model gpt --save)");
  sub->add_option("--checkpoint", a.checkpoint, "checkpoint directory")->required();
  sub->add_option("--prompt", a.prompt, "text (byte-level tokens), or token ids with --ids")->required();
  sub->add_option("--tokens", a.tokens, "tokens to sample")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--temperature", a.temperature, "softmax temperature (0: greedy)")
      ->check(non_negative_finite())->capture_default_str();
  sub->add_option("--seed", a.seed, "sampling seed")->check(unsigned_integer())->capture_default_str();
  sub->add_flag("--ids", a.ids, "--prompt is token ids separated by spaces or commas; print ids");
  return sub;
}

int run_generate(const GenerateArgs& a, Io& io) {
  std::vector<std::int32_t> prompt;
  if (a.ids) {
    std::string text = a.prompt;
    std::replace(text.begin(), text.end(), ',', ' ');
    std::istringstream in(text);
    std::string word;
    while (in >> word) {
      std::size_t used = 0;
      long v = -1;
      try {
        v = std::stol(word, &used);
      } catch (...) {
        used = 0;
      }
      if (used != word.size() || v < 0 || v > 65535)
        throw UsageError("--prompt: '" + word + "' is not a token id (0..65535)");
      prompt.push_back(static_cast<std::int32_t>(v));
    }
  } else {
    for (unsigned char c : a.prompt) prompt.push_back(c);
  }
  if (prompt.empty()) throw UsageError("--prompt: empty");
  const auto out = gpt::generate(a.checkpoint, prompt, a.tokens, a.temperature, a.seed);
  if (a.ids) {
    for (std::size_t i = 0; i < out.size(); ++i) io.out << (i ? " " : "") << out[i];
    io.out << '\n';
    return 0;
  }
  std::string text = a.prompt;
  for (auto t : out) {
    // Printable ASCII (and newline, tab) as text; any other token as <id>.
    if (t < 127 && (t >= 32 || t == '\n' || t == '\t')) text += static_cast<char>(t);
    else text += "<" + std::to_string(t) + ">";
  }
  io.out << text << '\n';
  return 0;
}

CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& a) {
  CLI::App* sub = app.add_subcommand("tokenize", "Write a token file (llm.c format) for shardopt train --model gpt");
  sub->add_flag("--bytes", a.bytes, "byte-level: every byte is one token (vocabulary 256); the only tokenizer built in")
      ->required();
  sub->add_option("in", a.in, "input text file")->required();
  sub->add_option("out", a.out, "output token file")->required();
  return sub;
}

int run_tokenize(const TokenizeArgs& a, Io& io) {
  if (!std::filesystem::exists(a.in)) throw UsageError("in: '" + a.in + "' does not exist");
  const std::size_t n = gpt::tokenize_bytes(a.in, a.out);
  io.out << "wrote " << a.out << " (" << format_count(n) << " byte-level tokens, vocabulary 256)\n";
  return 0;
}

bool is_gpt_checkpoint(const std::string& dir) {
  return std::filesystem::exists(std::filesystem::path(dir) / "model_config.json");
}

int run_gpt_export(const std::string& dir, const std::string& out, DType dtype, Io& io) {
  namespace fs = std::filesystem;
  const gpt::Shape s = gpt::read_model_config(dir);
  fs::create_directories(out);
  const std::string weights = (fs::path(out) / "model.safetensors").string();
  export_safetensors(dir, weights, dtype);
  gpt::write_hf_config((fs::path(out) / "config.json").string(), s, dtype);
  io.out << "wrote " << weights << " and " << (fs::path(out) / "config.json").string()
         << " (transformers.GPT2LMHeadModel.from_pretrained loads the directory)\n";
  return 0;
}

}  // namespace shardopt::cli
