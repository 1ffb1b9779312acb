#include "gpt.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <span>
#include <thread>

#include <nlohmann/json.hpp>

#include "../step_checkpoints.hpp"
#include "cpu_ops.hpp"
#include "data.hpp"
#include "shardopt/checkpoint.hpp"

namespace gpt {

using shardopt::DType;
using shardopt::Error;
using shardopt::ErrorCode;

namespace {

using Clock = std::chrono::steady_clock;

std::size_t max_block_params(const Shape& s) {
  const std::size_t C = s.hidden;
  return std::max(std::size_t(s.vocab) * C + std::size_t(s.max_seq) * C, layer_param_count(s));
}

std::string safetensors_path(const std::string& p) {
  namespace fs = std::filesystem;
  return fs::is_directory(p) ? (fs::path(p) / "model.safetensors").string() : p;
}

struct RankSlot {
  double loss = 0;
  shardopt::StepResult result;
  std::size_t bytes = 0;
};

struct Shared {
  const TrainOptions& opt;
  int world;  // ranks of the job: o.ranks in-process, the bootstrap's world size across processes
  int slot_of(int rank) const noexcept { return opt.bootstrap ? 0 : rank; }  // this process's slots
  const RankEnvFactory& make_env;
  const std::function<void(const StepRecord&)>& on_step;
  const TokenFile& data;
  const SafetensorsFile* init_file;
  std::shared_ptr<shardopt::ThreadPool> pool;
  std::shared_ptr<shardopt::InProcessGroup> group;
  std::vector<RankSlot> slots;
  TrainResult result;
  std::mutex mutex;
  std::exception_ptr error;
  int phase = 0;
  std::int64_t first_step = 0;  // a resumed run's step numbers go on from here (set by rank 0 before its first barrier)
  Clock::time_point last;
};

struct OnPhase {
  Shared* s;
  void operator()() noexcept {
    const auto now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - s->last).count();
    s->last = now;
    if (s->phase++ == 0 || s->error) return;
    StepRecord r;
    r.step = static_cast<int>(s->first_step) + s->phase - 1;
    for (const auto& slot : s->slots) r.loss += slot.loss;
    r.loss /= static_cast<double>(s->slots.size());
    r.step_ms = ms;
    r.applied = s->slots[0].result.applied;
    r.loss_scale = s->slots[0].result.loss_scale;
    r.grad_norm = s->slots[0].result.grad_norm;
    r.lr = s->slots[0].result.lr;
    r.rank_bytes = s->slots[0].bytes;
    if (!r.applied) ++s->result.skipped_steps;
    try {
      s->result.steps.push_back(r);
      if (s->on_step) s->on_step(r);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s->mutex);
      if (!s->error) s->error = std::current_exception();
    }
  }
};

// Per-tensor fp32 pointers of one block (tensors are aligned inside a unit, so not contiguous).
struct Ptrs {
  float* t[12] = {};
};

// How a block's 16-bit parameters become fp32 and its fp32 gradients go back into the engine's
// 16-bit buffers: host loops where the memory is the host's (the CPU), otherwise the backend's
// cast and accumulate kernels on the engine's compute stream, where the ops run too.
struct Widening {
  bool wide;                // fp32 compute: the engine's buffers are used as they are
  bool host;                // host memory: plain loops
  shardopt::Backend* backend;
  shardopt::Stream* stream;
  float* pw;                // the bounded fp32 workspace for one block's parameters
  float* gw;                // and for its gradients

  // fp32 pointers to an acquired block's parameters (tensors back to back in pw).
  Ptrs params(const shardopt::BlockView& v) const {
    Ptrs p;
    std::size_t off = 0;
    for (std::size_t k = 0; k < v.tensors.size(); ++k) {
      const auto& t = v.tensors[k];
      if (wide) {
        p.t[k] = t.as<float>();
        continue;
      }
      if (host)
        for (std::size_t i = 0; i < t.numel; ++i) pw[off + i] = shardopt::load_as_float(t.data, t.dtype, i);
      else if (t.numel)
        backend->cast(t.data, t.dtype, pw + off, DType::fp32, t.numel, *stream);
      p.t[k] = pw + off;
      off += t.numel;
    }
    return p;
  }

  // Where backward adds a block's fp32 gradients: the engine's buffers in fp32, otherwise zeroed
  // segments of gw that add() then adds into the engine's 16-bit buffers.
  Ptrs grads(const shardopt::BlockView& g, const Ops<float>& ops) const {
    Ptrs p;
    std::size_t off = 0;
    for (std::size_t k = 0; k < g.tensors.size(); ++k) {
      const auto& t = g.tensors[k];
      if (wide) {
        p.t[k] = t.as<float>();
        continue;
      }
      ops.zero(gw + off, t.numel);
      p.t[k] = gw + off;
      off += t.numel;
    }
    return p;
  }

  // Adds gw into the engine's 16-bit gradient buffers of block view g (no-op in fp32).
  void add(const shardopt::BlockView& g) const {
    if (wide) return;
    std::size_t off = 0;
    for (const auto& t : g.tensors) {
      if (host) {
        for (std::size_t i = 0; i < t.numel; ++i)
          shardopt::store_from_float(t.data, t.dtype, i, shardopt::load_as_float(t.data, t.dtype, i) + gw[off + i]);
      } else if (t.numel) {
        backend->accumulate(t.data, t.dtype, gw + off, t.numel, *stream);  // gw += what the buffer holds
        backend->cast(gw + off, DType::fp32, t.data, t.dtype, t.numel, *stream);
      }
      off += t.numel;
    }
  }
};

template <class T>
Layer<T> layer_of(const Ptrs& p) {
  return Layer<T>{p.t[0], p.t[1], p.t[2], p.t[3], p.t[4], p.t[5], p.t[6], p.t[7], p.t[8], p.t[9], p.t[10], p.t[11]};
}

void run_rank(int rank, Shared& s, std::barrier<OnPhase>& barrier) {
  const TrainOptions& o = s.opt;
  const shardopt::Config& cfg = o.config;
  const Shape& sh = o.shape;
  const int L = sh.layers, C = sh.hidden, V = sh.vocab, B = o.batch, Tn = o.seq, N = B * Tn;
  const std::size_t NC = std::size_t(N) * C, AE = layer_acts_elems(sh, B, Tn);
  const bool wide = cfg.compute_dtype == DType::fp32;

  const std::unique_ptr<RankEnv> env = s.make_env(rank, s.pool);
  auto backend = env->backend();
  auto comm = o.bootstrap ? o.make_communicator(*backend) : shardopt::make_in_process_communicator(s.group, rank, *backend);
  const int slot = s.slot_of(rank);
  shardopt::Engine engine(cfg, *backend, *comm);
  env->bind(engine);
  const Ops<float>& ops = env->ops();
  for (const auto& b : blocks(sh)) engine.register_block(b);
  shardopt::Hyperparams no_decay = cfg.hyper;
  no_decay.weight_decay = 0.0f;
  engine.set_group(1, no_decay);
  if (s.init_file) {
    const SafetensorsFile& f = *s.init_file;
    // Each rank reads only the element ranges it stores (pread at the range's offset).
    engine.initialize([&f](const shardopt::Layout::TensorInfo& t, std::size_t begin, std::size_t count,
                           float* out) { f.read(*f.find(t.name), begin, count, out); });
  } else {
    engine.initialize(init(sh, o.seed));
  }
  std::string record;  // the resumed checkpoint's trainer record
  if (!o.resume_dir.empty()) record = engine.load(o.resume_dir);

  // The trainer's memory (activation_bytes() counts the same buffers).
  // The buffers live where the ops work (host memory, or device memory on a GPU).
  std::vector<std::int32_t> tok(std::size_t(N) + 1);
  std::int32_t* const tok_dev = env->ints(tok.size());
  float* const xs = env->floats((L + 1) * NC);
  float* const acts = env->floats((o.recompute ? 1 : L) * AE);
  float* const lnf = env->floats(NC);
  float* const stats = env->floats(2 * std::size_t(N));
  float* const logits = env->floats(std::size_t(N) * V);
  float* const dl = env->floats(NC);
  float* const dxa = env->floats(NC);
  float* const dxb = env->floats(NC);
  float* const scratch = env->floats(layer_scratch_elems(sh, B, Tn));
  const Widening w{wide, env->host_memory(), backend.get(), &engine.compute_stream(),
                   wide ? nullptr : env->floats(max_block_params(sh)), wide ? nullptr : env->floats(max_block_params(sh))};
  auto acts_of = [&](int l) { return layer_acts_at(acts + (o.recompute ? 0 : l) * AE, sh, B, Tn); };
  const int E = embed_block(), F = final_block(sh);

  float scale = cfg.loss_scaling.mode == shardopt::LossScaleMode::none ? 1.0f : cfg.loss_scaling.initial_scale;
  std::int64_t first_step = 0;
  if (!o.resume_dir.empty())
    first_step = record.empty() ? engine.last_result().step : shardopt_examples::read_next_step(record);
  if (slot == 0) s.first_step = first_step;
  shardopt_examples::PeriodicSaver saver(o.save_every, o.keep, o.checkpoints_dir, rank);

  barrier.arrive_and_wait();
  for (int step = 0; step < o.steps; ++step) {
    double loss = 0;
    for (int micro = 0; micro < cfg.accumulation_steps; ++micro) {
      s.data.read(batch_offset(s.data.size(), first_step + step, micro, cfg.accumulation_steps, rank, s.world, B, Tn),
                  tok.size(), tok.data());
      env->upload(tok_dev, tok.data(), tok.size());
      const std::int32_t* inputs = tok_dev;
      const std::int32_t* targets = tok_dev + 1;

      // ---- forward
      {
        const Ptrs p = w.params(engine.acquire(E));
        ops.embed_forward(xs, inputs, p.t[0], p.t[1], B, Tn, C);
        engine.release(E);
      }
      for (int l = 0; l < L; ++l) {
        const Ptrs p = w.params(engine.acquire(layer_block(l)));
        layer_forward(ops, sh, B, Tn, layer_of<const float>(p), &xs[l * NC], acts_of(l), &xs[(l + 1) * NC]);
        engine.release(layer_block(l));
      }
      {
        const Ptrs p = w.params(engine.acquire(F));
        ops.layernorm_forward(lnf, stats, stats + N, &xs[L * NC], p.t[0], p.t[1], N, C);
        engine.release(F);
      }
      // ---- LM head (tied: block E again) and loss; its backward opens E's gradient buffer,
      // which stays open until the embedding's backward adds into it last.
      {
        const Ptrs p = w.params(engine.acquire(E));
        ops.matmul_forward(logits, lnf, p.t[0], nullptr, N, C, V, WeightLayout::out_in);
        loss += ops.cross_entropy(logits, logits, targets, N, V, scale) / N;
        const shardopt::BlockView g = engine.gradients(E);
        const Ptrs gp = w.grads(g, ops);
        ops.zero(dl, NC);
        ops.matmul_backward(dl, gp.t[0], nullptr, logits, lnf, p.t[0], N, C, V,
                            WeightLayout::out_in);
        w.add(g);
        engine.release(E);
      }
      // ---- backward
      float* dx = dxa;
      float* dnext = dxb;
      {
        const Ptrs p = w.params(engine.acquire(F));
        const shardopt::BlockView g = engine.gradients(F);
        const Ptrs gp = w.grads(g, ops);
        ops.zero(dx, NC);
        ops.layernorm_backward(dx, gp.t[0], gp.t[1], dl, &xs[L * NC], p.t[0], stats, stats + N,
                               N, C);
        w.add(g);
        engine.grads_ready(F);
        engine.release(F);
      }
      for (int l = L - 1; l >= 0; --l) {
        const int b = layer_block(l);
        const Layer<const float> p = layer_of<const float>(w.params(engine.acquire(b)));
        if (o.recompute) layer_forward(ops, sh, B, Tn, p, &xs[l * NC], acts_of(l), &xs[(l + 1) * NC]);
        const shardopt::BlockView g = engine.gradients(b);
        const Ptrs gp = w.grads(g, ops);
        ops.zero(dnext, NC);
        layer_backward(ops, sh, B, Tn, p, layer_of<float>(gp), &xs[l * NC], acts_of(l), dx, dnext, scratch);
        w.add(g);
        engine.grads_ready(b);
        engine.release(b);
        std::swap(dx, dnext);
      }
      {
        const shardopt::BlockView g = engine.gradients(E);
        const Ptrs gp = w.grads(g, ops);
        ops.embed_backward(gp.t[0], gp.t[1], dx, inputs, B, Tn, C);
        w.add(g);
        engine.grads_ready(E);
      }
    }
    const shardopt::StepResult r = engine.step();
    if (cfg.loss_scaling.mode != shardopt::LossScaleMode::none) scale = r.loss_scale;
    const shardopt::MemoryReport m = engine.memory_report();
    std::size_t bytes = 0;
    for (int p = 0; p < shardopt::kPlaceCount; ++p) bytes += m.current_total(static_cast<shardopt::Place>(p));
    const double mean_loss = shardopt_examples::mean_over_processes(o.bootstrap, loss / cfg.accumulation_steps);
    s.slots[slot] = RankSlot{mean_loss, r, bytes};
    barrier.arrive_and_wait();
    saver.after_step(engine, static_cast<int>(first_step) + step + 1, step + 1 == o.steps,
                     [&](const std::string& dir) { write_model_config(dir, sh); });
  }

  if (!o.save_dir.empty()) {
    engine.save(o.save_dir, shardopt_examples::checkpoint_record(static_cast<int>(first_step) + o.steps));
    if (rank == 0) write_model_config(o.save_dir, sh);
  }
  std::vector<std::byte> mine;  // multi-process: (tensor, begin, count, values...) records
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (o.collect_master)
      engine.read_master([&](int t, std::size_t begin, std::size_t count, const float* values) {
        std::copy(values, values + count, s.result.master[t].begin() + static_cast<std::ptrdiff_t>(begin));
        if (o.bootstrap) shardopt_examples::append_master_record(mine, t, begin, count, values);
      });
    s.result.memory[slot] = engine.memory_report();
  }
  if (o.bootstrap && o.collect_master) {
    // Every process makes this call (collect_master is the same everywhere): the ranks' records
    // together cover every tensor.
    shardopt_examples::gather_master_records(*o.bootstrap, mine, s.result.master, "gpt");
  }
}

}  // namespace

std::size_t activation_bytes(const Shape& s, int batch, int seq, DType compute, bool recompute) {
  const std::size_t N = std::size_t(batch) * seq, C = s.hidden, L = s.layers;
  std::size_t floats = (L + 1) * N * C + (recompute ? 1 : L) * layer_acts_elems(s, batch, seq) +
                       N * C + 2 * N + N * std::size_t(s.vocab) + 3 * N * C + layer_scratch_elems(s, batch, seq);
  if (compute != DType::fp32) floats += 2 * max_block_params(s);
  return floats * sizeof(float) + 2 * (N + 1) * sizeof(std::int32_t);  // tokens read, and where the ops see them
}

namespace {

// The CPU: host memory, CpuOps<float>, the CPU backend on the shared kernel pool.
class CpuEnv final : public RankEnv {
 public:
  explicit CpuEnv(std::shared_ptr<shardopt::ThreadPool> pool) : pool_(std::move(pool)) {}
  std::unique_ptr<shardopt::Backend> backend() override {
    shardopt::CpuBackendOptions bo;
    bo.pool = pool_;
    return shardopt::make_cpu_backend(bo);
  }
  void bind(shardopt::Engine&) override {}
  const Ops<float>& ops() const override { return ops_; }
  float* floats(std::size_t n) override { return floats_.emplace_back(n).data(); }
  std::int32_t* ints(std::size_t n) override { return ints_.emplace_back(n).data(); }
  void upload(std::int32_t* dst, const std::int32_t* src, std::size_t n) override { std::copy(src, src + n, dst); }
  bool host_memory() const override { return true; }

 private:
  std::shared_ptr<shardopt::ThreadPool> pool_;
  CpuOps<float> ops_;
  std::vector<std::vector<float>> floats_;
  std::vector<std::vector<std::int32_t>> ints_;
};

}  // namespace

TrainResult train(const TrainOptions& o, const std::function<void(const StepRecord&)>& on_step) {
  return train_with(o, on_step, [](int, std::shared_ptr<shardopt::ThreadPool> pool) -> std::unique_ptr<RankEnv> {
    return std::make_unique<CpuEnv>(std::move(pool));
  });
}

TrainResult train_with(const TrainOptions& o, const std::function<void(const StepRecord&)>& on_step,
                       const RankEnvFactory& make_env) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, what); };
  validate(o.shape);
  if (o.seq < 1 || o.seq > o.shape.max_seq)
    bad("seq must be in [1, " + std::to_string(o.shape.max_seq) + "] (the model's positions), got " +
        std::to_string(o.seq));
  if (o.batch < 1) bad("batch must be >= 1, got " + std::to_string(o.batch));
  if (o.bootstrap && !o.make_communicator) bad("a bootstrap needs make_communicator");
  if (!o.bootstrap && o.ranks < 1) bad("ranks must be >= 1, got " + std::to_string(o.ranks));
  if (o.steps < 1) bad("steps must be >= 1, got " + std::to_string(o.steps));
  if (o.blas_threads < 0) bad("blas_threads must be >= 0, got " + std::to_string(o.blas_threads));
  if (o.data.empty()) bad("data: a token file is required");
  if (o.save_every < 0) bad("save_every must be >= 0, got " + std::to_string(o.save_every));
  if (o.save_every > 0 && o.checkpoints_dir.empty()) bad("save_every needs checkpoints_dir");
  if (o.save_every > 0 && o.keep < 1) bad("keep must be >= 1, got " + std::to_string(o.keep));
  const std::vector<shardopt::BlockSpec> specs = blocks(o.shape);
  const int world = o.bootstrap ? o.bootstrap->world_size() : o.ranks;
  const int threads_here = o.bootstrap ? 1 : o.ranks;  // rank threads in this process
  (void)shardopt::plan_memory(o.config, specs, world);

  const TokenFile data(o.data);
  (void)batch_offset(data.size(), 0, 0, o.config.accumulation_steps, 0, world, o.batch, o.seq);
  const std::uint16_t top = data.max_token();
  if (top >= o.shape.vocab)
    bad("data: " + o.data + " holds token " + std::to_string(top) + ", outside the vocabulary of " +
        std::to_string(o.shape.vocab));

  std::unique_ptr<SafetensorsFile> init_file;
  if (!o.init_from.empty()) {
    init_file = std::make_unique<SafetensorsFile>(safetensors_path(o.init_from));
    for (const auto& b : specs)
      for (const auto& t : b.tensors) {
        const SafetensorsEntry* e = init_file->find(t.name);
        if (!e) bad("init-from: " + init_file->path() + " has no tensor '" + t.name + "'");
        if (e->shape != t.shape) {
          std::string have, want;
          for (auto d : e->shape) have += (have.empty() ? "" : ",") + std::to_string(d);
          for (auto d : t.shape) want += (want.empty() ? "" : ",") + std::to_string(d);
          bad("init-from: tensor '" + t.name + "' in " + init_file->path() + " has shape [" + have +
              "], the model needs [" + want + "]");
        }
        // Every read the ranks make is then inside the tensor: a rank never fails alone.
        init_file->check(*e, t.name, shardopt::numel(t.shape));
      }
  }

  // Ranks are threads: each rank's GEMMs get the cores the ranks leave over. The count can change
  // the bits of large enough products (OpenBLAS picks its blocking by it), so a job launched one
  // rank per process passes the count its ranks would have here (blas_threads).
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  set_blas_threads(o.blas_threads > 0 ? o.blas_threads
                                      : static_cast<int>(std::max(1u, hw / static_cast<unsigned>(threads_here))));

  Shared s{o,
           world,
           make_env,
           on_step,
           data,
           init_file.get(),
           shardopt::make_thread_pool(o.threads),
           o.bootstrap ? nullptr : shardopt::make_in_process_group(o.ranks),
           std::vector<RankSlot>(static_cast<std::size_t>(threads_here)),
           TrainResult{},
           {},
           {},
           0,
           0,
           Clock::now()};
  s.result.params = param_count(o.shape);
  s.result.activation_bytes = activation_bytes(o.shape, o.batch, o.seq, o.config.compute_dtype, o.recompute);
  s.result.tokens_per_step = std::size_t(world) * o.batch * o.seq * o.config.accumulation_steps;
  s.result.memory.resize(static_cast<std::size_t>(threads_here));
  for (const auto& b : specs)
    for (const auto& t : b.tensors) {
      s.result.tensor_names.push_back(t.name);
      if (o.collect_master) s.result.master.emplace_back(shardopt::numel(t.shape), 0.0f);
    }

  std::barrier<OnPhase> barrier(threads_here, OnPhase{&s});
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_here; ++t)
    threads.emplace_back([&, t] {
      const int r = o.bootstrap ? o.bootstrap->rank() : t;
      try {
        run_rank(r, s, barrier);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(s.mutex);
          if (!s.error) s.error = std::current_exception();
        }
        // Peers inside a collective are released by the group's abort (this rank may have failed
        // before its communicator existed, so its departure alone would not tell them).
        if (s.group) shardopt::abort_in_process_group(*s.group, "rank " + std::to_string(r) + " failed: " + shardopt_examples::what_of(std::current_exception()));
        barrier.arrive_and_drop();
      }
    });
  for (auto& t : threads) t.join();
  if (s.error) std::rethrow_exception(s.error);
  return std::move(s.result);
}

void write_model_config(const std::string& dir, const Shape& s) {
  nlohmann::ordered_json j;
  j["model"] = "gpt2";
  j["n_layer"] = s.layers;
  j["n_head"] = s.heads;
  j["n_embd"] = s.hidden;
  j["vocab_size"] = s.vocab;
  j["n_positions"] = s.max_seq;
  const std::string path = (std::filesystem::path(dir) / "model_config.json").string();
  std::ofstream f(path, std::ios::trunc);
  f << j.dump(2) << '\n';
  if (!f.flush()) throw Error(ErrorCode::io_error, path + ": write failed");
}

Shape read_model_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "model_config.json").string();
  std::ifstream f(path);
  if (!f)
    throw Error(ErrorCode::io_error, path + ": cannot open (a GPT checkpoint written by shardopt train --model gpt "
                                            "has it beside its manifest)");
  try {
    const auto j = nlohmann::json::parse(f);
    Shape s{j.at("n_layer").get<int>(), j.at("n_head").get<int>(), j.at("n_embd").get<int>(),
            j.at("vocab_size").get<int>(), j.at("n_positions").get<int>()};
    validate(s);
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorCode::invalid_argument, path + ": malformed: " + e.what());
  }
}

void write_hf_config(const std::string& path, const Shape& s, DType dtype) {
  nlohmann::ordered_json j;
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  j["vocab_size"] = s.vocab;
  j["n_positions"] = s.max_seq;
  j["n_ctx"] = s.max_seq;
  j["n_embd"] = s.hidden;
  j["n_layer"] = s.layers;
  j["n_head"] = s.heads;
  j["n_inner"] = nullptr;  // 4 * n_embd
  j["activation_function"] = "gelu_new";  // GPT-2's tanh approximation
  j["layer_norm_epsilon"] = 1e-5;
  j["initializer_range"] = 0.02;
  j["resid_pdrop"] = 0.0;
  j["embd_pdrop"] = 0.0;
  j["attn_pdrop"] = 0.0;
  j["scale_attn_weights"] = true;
  j["tie_word_embeddings"] = true;
  j["bos_token_id"] = s.vocab - 1;
  j["eos_token_id"] = s.vocab - 1;
  j["torch_dtype"] = dtype == DType::bf16 ? "bfloat16" : dtype == DType::fp16 ? "float16" : "float32";
  std::ofstream f(path, std::ios::trunc);
  f << j.dump(2) << '\n';
  if (!f.flush()) throw Error(ErrorCode::io_error, path + ": write failed");
}

std::vector<std::int32_t> generate(const std::string& dir, const std::vector<std::int32_t>& prompt, int count,
                                   double temperature, std::uint64_t seed) {
  const Shape s = read_model_config(dir);
  if (prompt.empty()) throw Error(ErrorCode::invalid_argument, "prompt: empty (give at least one token)");
  for (auto t : prompt)
    if (t < 0 || t >= s.vocab)
      throw Error(ErrorCode::invalid_argument,
                  "prompt: token " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(s.vocab));
  // The master weights through the streaming exporter, then into one flat array (generation
  // runs on one thread without an engine; the model is small enough to sample from).
  namespace fs = std::filesystem;
  static std::atomic<unsigned> calls{0};  // distinct files for concurrent calls in one process
  const fs::path tmp = fs::temp_directory_path() / ("shardopt-generate-" + std::to_string(::getpid()) + "-" +
                                                    std::to_string(calls.fetch_add(1)) + ".safetensors");
  shardopt::export_safetensors(dir, tmp.string(), DType::fp32);
  std::vector<float> params(param_count(s));
  try {
    const SafetensorsFile f(tmp.string());
    std::size_t off = 0;
    for (const auto& b : blocks(s))
      for (const auto& t : b.tensors) {
        const SafetensorsEntry* e = f.find(t.name);
        if (!e || e->shape != t.shape)
          throw Error(ErrorCode::invalid_argument, dir + ": tensor '" + t.name + "' missing or of another shape");
        const std::size_t n = shardopt::numel(t.shape);
        f.read(*e, 0, n, &params[off]);
        off += n;
      }
  } catch (...) {
    fs::remove(tmp);
    throw;
  }
  fs::remove(tmp);

  const CpuOps<float> ops;
  std::vector<std::int32_t> ctx = prompt, out;
  std::vector<float> logits(s.vocab);
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
  for (int i = 0; i < count; ++i) {
    const int n = std::min<int>(static_cast<int>(ctx.size()), s.max_seq);
    const std::int32_t* window = ctx.data() + ctx.size() - n;
    model_forward_backward<float>(ops, s, 1, n, params.data(), nullptr, window, nullptr, 1.0, logits.data());
    int next = 0;
    if (temperature <= 0) {
      next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    } else {
      const float mx = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      std::vector<double> p(s.vocab);
      for (int v = 0; v < s.vocab; ++v) sum += p[v] = std::exp((logits[v] - mx) / temperature);
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
      double u = static_cast<double>(state >> 11) * (1.0 / 9007199254740992.0) * sum;
      next = s.vocab - 1;
      for (int v = 0; v < s.vocab; ++v)
        if ((u -= p[v]) < 0) {
          next = v;
          break;
        }
    }
    ctx.push_back(next);
    out.push_back(next);
  }
  return out;
}

double measure_sgemm_gflops(int m, int n, int k, int threads, int reps) {
  std::vector<float> a(std::size_t(m) * k, 0.5f), b(std::size_t(k) * n, 0.25f), c(std::size_t(m) * n);
  set_blas_threads(threads);
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    gemm(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * m * n * k / s / 1e9);
  }
  return best;
}

}  // namespace gpt
