#include "mlp.hpp"

#include <cblas.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <span>
#include <stdexcept>
#include <thread>

namespace mlp {

using shardopt::BlockSpec;
using shardopt::DType;
using shardopt::Error;
using shardopt::ErrorCode;

namespace {

std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// std::vector<float>(n) for the trainer's own buffers, with an allocation failure (std::bad_alloc,
// or a count past max_size) reported as Error(out_of_memory) naming the buffer and its size.
std::vector<float> host_floats(std::size_t n, const char* what) {
  try {
    return std::vector<float>(n);
  } catch (const std::bad_alloc&) {
  } catch (const std::length_error&) {
  }
  const std::string bytes = n <= SIZE_MAX / sizeof(float) ? std::to_string(n * sizeof(float)) + " bytes"
                                                           : std::string("more than 2^64 bytes");
  throw Error(ErrorCode::out_of_memory,
              std::string("mlp: cannot allocate ") + what + ": " + std::to_string(n) + " floats (" + bytes + ")");
}

std::size_t block_params(int h) {
  const std::size_t H = static_cast<std::size_t>(h);
  return 8 * H * H + 5 * H;
}

}  // namespace

std::vector<BlockSpec> blocks(const Shape& s) {
  std::vector<BlockSpec> out;
  const std::int64_t h = s.hidden, f = 4 * std::int64_t(s.hidden);
  for (int l = 0; l < s.layers; ++l) {
    const std::string n = "block" + std::to_string(l);
    out.push_back({n + ".fc1", {{n + ".w1", {f, h}}, {n + ".b1", {f}, 1}}});
    out.push_back({n + ".fc2", {{n + ".w2", {h, f}}, {n + ".b2", {h}, 1}}});
  }
  return out;
}

std::size_t param_count(const Shape& s) { return static_cast<std::size_t>(s.layers) * block_params(s.hidden); }

std::size_t activation_bytes(const Shape& s, int batch, DType compute) {
  const std::size_t L = s.layers, B = batch, H = s.hidden;
  std::size_t floats = (L + 1) * B * H      // block inputs x_0..x_L
                       + 2 * L * B * 4 * H  // a and u of every block
                       + 3 * B * H          // dy, dx, target
                       + B * 4 * H          // da
                       + 2 * B * 4 * H + 2 * B * H;  // the teacher's forward scratch
  if (compute != DType::fp32) floats += 2 * block_params(s.hidden);  // fp32 params + grads of a block
  return floats * sizeof(float);
}

// ---- math ----------------------------------------------------------------------------------------

float gelu(float a) noexcept { return 0.5f * a * (1.0f + std::erf(a * 0.70710678118654752f)); }

float gelu_derivative(float a) noexcept {
  const float cdf = 0.5f * (1.0f + std::erf(a * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * std::exp(-0.5f * a * a);
  return cdf + a * pdf;
}

void block_forward(int B, int h, const BlockParams& p, const float* x, float* a, float* u, float* y) {
  const int f = 4 * h;
  // a = x W1^T + b1
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, f, h, 1.0f, x, h, p.w1, h, 0.0f, a, f);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < f; ++j) {
      float& v = a[std::size_t(b) * f + j];
      v += p.b1[j];
      u[std::size_t(b) * f + j] = gelu(v);
    }
  // y = x + u W2^T + b2
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < h; ++j) y[std::size_t(b) * h + j] = x[std::size_t(b) * h + j] + p.b2[j];
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, h, f, 1.0f, u, f, p.w2, f, 1.0f, y, h);
}

void block_backward(int B, int h, const BlockParams& p, const float* x, const float* a,
                    const float* u, const float* dy, float* dx, const BlockGrads& g, float* da) {
  const int f = 4 * h;
  // du = dy W2, then da = du * gelu'(a) in place
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, f, h, 1.0f, dy, h, p.w2, f, 0.0f, da, f);
  for (std::size_t i = 0, n = std::size_t(B) * f; i < n; ++i) da[i] *= gelu_derivative(a[i]);
  // dW2 += dy^T u, db2 += sum_b dy
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, h, f, B, 1.0f, dy, h, u, f, 1.0f, g.w2, f);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < h; ++j) g.b2[j] += dy[std::size_t(b) * h + j];
  // dW1 += da^T x, db1 += sum_b da
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, f, h, B, 1.0f, da, f, x, h, 1.0f, g.w1, h);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < f; ++j) g.b1[j] += da[std::size_t(b) * f + j];
  // dx = dy (residual path) + da W1
  std::memcpy(dx, dy, sizeof(float) * std::size_t(B) * h);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, h, f, 1.0f, da, f, p.w1, h, 1.0f, dx, h);
}

double mse_loss(std::size_t n, const float* y, const float* target, float scale, float* dy) {
  double sum = 0;
  const float k = 2.0f * scale / static_cast<float>(n);
  for (std::size_t i = 0; i < n; ++i) {
    const float d = y[i] - target[i];
    sum += double(d) * d;
    dy[i] = k * d;
  }
  return sum / static_cast<double>(n);
}

// ---- data ----------------------------------------------------------------------------------------

std::uint64_t stream_key(std::uint64_t seed, std::uint64_t a, std::uint64_t b, std::uint64_t c) noexcept {
  return mix(mix(mix(mix(seed) ^ a) ^ b) ^ c);
}

float normal(std::uint64_t key, std::uint64_t i) noexcept {
  // Box-Muller on two counter-based uniforms; u1 in (0, 1] so the log is finite.
  const double u1 = static_cast<double>((mix(key + 2 * i) >> 11) + 1) * (1.0 / 9007199254740992.0);
  const double u2 = static_cast<double>(mix(key + 2 * i + 1) >> 11) * (1.0 / 9007199254740992.0);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

Teacher::Teacher(const Shape& shape, std::uint64_t seed)
    : shape_(shape), w_(host_floats(param_count(shape), "the teacher's weights (a full fp32 copy of the model)")) {
  // Weights at the scale of a standard initialisation (variance 1/fan_in), biases small: the
  // teacher's function is then as far from the student's start as a typical init is from another.
  const std::size_t H = shape.hidden, F = 4 * H;
  const std::size_t sizes[4] = {F * H, F, H * F, H};
  const double scales[4] = {1.0 / std::sqrt(double(H)), 0.1, 1.0 / std::sqrt(double(F)), 0.1};
  std::size_t off = 0;
  for (int l = 0; l < shape.layers; ++l)
    for (int t = 0; t < 4; ++t) {
      const std::uint64_t key = stream_key(seed, 0x7eac4e7ull, std::uint64_t(l), std::uint64_t(t));
      for (std::size_t i = 0; i < sizes[t]; ++i) w_[off + i] = static_cast<float>(normal(key, i) * scales[t]);
      off += sizes[t];
    }
}

void Teacher::forward(int B, const float* x, float* y, std::vector<float>& scratch) const {
  const std::size_t H = shape_.hidden, F = 4 * H, rows = std::size_t(B);
  scratch.resize(2 * rows * F + 2 * rows * H);
  float* a = scratch.data();
  float* u = a + rows * F;
  float* cur = u + rows * F;
  float* next = cur + rows * H;
  std::memcpy(cur, x, sizeof(float) * rows * H);
  const float* w = w_.data();
  for (int l = 0; l < shape_.layers; ++l) {
    const BlockParams p{w, w + F * H, w + F * H + F, w + 2 * F * H + F};
    block_forward(B, shape_.hidden, p, cur, a, u, next);
    std::swap(cur, next);
    w += block_params(shape_.hidden);
  }
  std::memcpy(y, cur, sizeof(float) * rows * H);
}

std::uint64_t digest(const std::vector<std::vector<float>>& tensors) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const auto& t : tensors)
    for (float v : t) {
      std::uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int k = 0; k < 4; ++k) h = (h ^ ((bits >> (8 * k)) & 0xffu)) * 0x100000001b3ull;
    }
  return h;
}

// ---- the trainer ---------------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;

// What each rank leaves for the per-step summary; written before the barrier, read after it.
struct RankSlot {
  double loss = 0;
  shardopt::StepResult result;
  std::size_t bytes = 0;
};

struct Shared {
  const TrainOptions& opt;
  int slot_of(int rank) const noexcept { return opt.bootstrap ? 0 : rank; }
  const std::function<void(const StepRecord&)>& on_step;
  const Teacher& teacher;
  std::shared_ptr<shardopt::ThreadPool> pool;
  std::shared_ptr<shardopt::InProcessGroup> group;
  std::vector<RankSlot> slots;
  TrainResult result;
  std::mutex mutex;
  std::exception_ptr error;
  int phase = 0;  // 0: every rank initialised; k: step k done
  Clock::time_point last;
};

// Runs on one thread when every rank reached the barrier: one StepRecord per step.
struct OnPhase {
  Shared* s;
  void operator()() noexcept {
    const auto now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - s->last).count();
    s->last = now;
    if (s->phase++ == 0 || s->error) return;
    StepRecord r;
    r.step = s->opt.first_step + s->phase - 1;
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

void run_rank(int rank, Shared& s, std::barrier<OnPhase>& barrier) {
  const TrainOptions& o = s.opt;
  const shardopt::Config& cfg = o.config;
  const int L = o.shape.layers, h = o.shape.hidden, f = 4 * h, B = o.batch;
  const std::size_t BH = std::size_t(B) * h, BF = std::size_t(B) * f;
  const bool wide = cfg.compute_dtype == DType::fp32;

  shardopt::CpuBackendOptions bo;
  bo.pool = s.pool;
  auto backend = shardopt::make_cpu_backend(bo);
  auto comm = o.bootstrap ? o.make_communicator(*backend) : shardopt::make_in_process_communicator(s.group, rank, *backend);
  const int slot = s.slot_of(rank);
  shardopt::Engine engine(cfg, *backend, *comm);
  for (const auto& b : blocks(o.shape)) engine.register_block(b);
  shardopt::Hyperparams no_decay = cfg.hyper;
  no_decay.weight_decay = 0.0f;  // biases
  engine.set_group(1, no_decay);
  engine.initialize(shardopt::seeded_init(o.seed));
  if (!o.resume_dir.empty()) engine.load(o.resume_dir);  // collective, like every engine call here

  // The trainer's own memory (activation_bytes() counts the same buffers).
  std::vector<float> xs = host_floats((L + 1) * BH, "the block inputs (activations)");
  std::vector<float> as = host_floats(L * BF, "the pre-activations (activations)");
  std::vector<float> us = host_floats(L * BF, "the GELU outputs (activations)");
  std::vector<float> dy = host_floats(BH, "dL/dy"), dx = host_floats(BH, "dL/dx"), target = host_floats(BH, "targets");
  std::vector<float> da = host_floats(BF, "dL/da");
  std::vector<float> teacher_scratch;
  std::vector<float> pw, gw;  // fp32 copies of one block's params / grads for 16-bit compute
  if (!wide) {
    pw = host_floats(block_params(h), "a block's widened parameters");
    gw = host_floats(block_params(h), "a block's widened gradients");
  }

  float scale = cfg.loss_scaling.mode == shardopt::LossScaleMode::none ? 1.0f : cfg.loss_scaling.initial_scale;
  // A resumed run goes on with the checkpoint's loss scale (the CPU backend's buffer is host memory).
  if (!o.resume_dir.empty() && cfg.loss_scaling.mode != shardopt::LossScaleMode::none) scale = *engine.loss_scale_buffer();

  // Layer l is two engine blocks, fc1 (w1, b1) = 2l and fc2 (w2, b2) = 2l + 1 (see blocks()); its
  // four tensors in order w1, b1, w2, b2.
  auto tensor_of = [](const shardopt::BlockView& fc1, const shardopt::BlockView& fc2, int t) -> const shardopt::TensorView& {
    return t < 2 ? fc1.tensors[static_cast<std::size_t>(t)] : fc2.tensors[static_cast<std::size_t>(t - 2)];
  };
  // Parameters of layer l as fp32 pointers: the engine's buffers, or widened copies.
  auto params_of = [&](const shardopt::BlockView& fc1, const shardopt::BlockView& fc2) {
    float* p[4];
    std::size_t off = 0;
    for (int t = 0; t < 4; ++t) {
      const shardopt::TensorView& v = tensor_of(fc1, fc2, t);
      if (wide) {
        p[t] = v.as<float>();
        continue;
      }
      p[t] = pw.data() + off;
      for (std::size_t i = 0; i < v.numel; ++i) p[t][i] = shardopt::load_as_float(v.data, v.dtype, i);
      off += v.numel;
    }
    return BlockParams{p[0], p[1], p[2], p[3]};
  };

  shardopt_examples::PeriodicSaver saver(o.save_every, o.keep, o.checkpoints_dir, rank);

  barrier.arrive_and_wait();
  for (int step = 0; step < o.steps; ++step) {
    if (step == o.steps - 1) engine.reset_comm_report();
    double loss = 0;
    for (int micro = 0; micro < cfg.accumulation_steps; ++micro) {
      const std::uint64_t key =
          stream_key(o.seed + std::uint64_t(rank), 0xda7aull, std::uint64_t(o.first_step + step), std::uint64_t(micro));
      for (std::size_t i = 0; i < BH; ++i) xs[i] = normal(key, i);
      s.teacher.forward(B, xs.data(), target.data(), teacher_scratch);

      for (int l = 0; l < L; ++l) {
        const shardopt::BlockView fc1 = engine.acquire(2 * l), fc2 = engine.acquire(2 * l + 1);
        block_forward(B, h, params_of(fc1, fc2), &xs[l * BH], &as[l * BF], &us[l * BF], &xs[(l + 1) * BH]);
        engine.release(2 * l + 1);
        engine.release(2 * l);
      }
      loss += mse_loss(BH, &xs[L * BH], target.data(), scale, dy.data());

      for (int l = L - 1; l >= 0; --l) {
        const shardopt::BlockView fc1 = engine.acquire(2 * l), fc2 = engine.acquire(2 * l + 1);
        const BlockParams p = params_of(fc1, fc2);
        const shardopt::BlockView g1 = engine.gradients(2 * l), g2 = engine.gradients(2 * l + 1);
        float* q[4];
        std::size_t off = 0;
        for (int t = 0; t < 4; ++t) {
          const shardopt::TensorView& g = tensor_of(g1, g2, t);
          q[t] = wide ? g.as<float>() : gw.data() + off;
          off += g.numel;
        }
        if (!wide) std::fill(gw.begin(), gw.end(), 0.0f);
        block_backward(B, h, p, &xs[l * BH], &as[l * BF], &us[l * BF], dy.data(), dx.data(),
                       BlockGrads{q[0], q[1], q[2], q[3]}, da.data());
        if (!wide)  // add, in the compute dtype, to what the engine's buffer already holds
          for (int t = 0; t < 4; ++t) {
            const shardopt::TensorView& g = tensor_of(g1, g2, t);
            for (std::size_t i = 0; i < g.numel; ++i)
              shardopt::store_from_float(g.data, g.dtype, i, shardopt::load_as_float(g.data, g.dtype, i) + q[t][i]);
          }
        // fc2 first: the order backward finishes them in, the one the engine reduces cheapest.
        engine.grads_ready(2 * l + 1);
        engine.grads_ready(2 * l);
        engine.release(2 * l + 1);
        engine.release(2 * l);
        std::swap(dy, dx);
      }
    }
    const shardopt::StepResult r = engine.step();
    if (cfg.loss_scaling.mode != shardopt::LossScaleMode::none) scale = r.loss_scale;
    const shardopt::MemoryReport m = engine.memory_report();
    std::size_t bytes = 0;
    for (int p = 0; p < shardopt::kPlaceCount; ++p) bytes += m.current_total(static_cast<shardopt::Place>(p));
    const double mean_loss = shardopt_examples::mean_over_processes(o.bootstrap, loss / cfg.accumulation_steps);
    s.slots[slot] = RankSlot{mean_loss, r, bytes};
    if (step == o.steps - 1) s.result.last_step_comm[slot] = engine.comm_report();
    barrier.arrive_and_wait();

    saver.after_step(engine, o.first_step + step + 1, step + 1 == o.steps, [](const std::string&) {});
  }

  if (!o.save_dir.empty()) engine.save(o.save_dir, checkpoint_record(o.first_step + o.steps));  // collective

  // Every rank contributes the master values it owns; together they cover every tensor.
  std::vector<std::byte> mine;  // multi-process: (tensor, begin, count, values...) records
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    engine.read_master([&](int t, std::size_t begin, std::size_t count, const float* values) {
      std::copy(values, values + count, s.result.master[t].begin() + static_cast<std::ptrdiff_t>(begin));
      if (o.bootstrap) shardopt_examples::append_master_record(mine, t, begin, count, values);
    });
    s.result.memory[slot] = engine.memory_report();
  }
  if (o.bootstrap) shardopt_examples::gather_master_records(*o.bootstrap, mine, s.result.master, "mlp");
}

// OpenBLAS would start its own threads in every rank's GEMMs; ranks are threads already, so give
// it only the cores the ranks leave over. The count can change the bits of large enough products
// (OpenBLAS picks its blocking by it): a job launched one rank per process passes the count its
// ranks would have as threads of one process (TrainOptions::blas_threads).
void set_blas_threads(int ranks, int given) {
#if defined(SHARDOPT_EXAMPLE_OPENBLAS)
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  openblas_set_num_threads(given > 0 ? given : static_cast<int>(std::max(1u, hw / static_cast<unsigned>(ranks))));
#else
  (void)ranks;
  (void)given;
#endif
}

}  // namespace

TrainResult train(const TrainOptions& o, const std::function<void(const StepRecord&)>& on_step) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, what); };
  if (o.bootstrap && !o.make_communicator) bad("a bootstrap needs make_communicator");
  if (o.save_every < 0) bad("save_every must be >= 0, got " + std::to_string(o.save_every));
  if (o.save_every > 0 && o.checkpoints_dir.empty()) bad("save_every needs checkpoints_dir");
  if (o.save_every > 0 && o.keep < 1) bad("keep must be >= 1, got " + std::to_string(o.keep));
  if (o.first_step < 0) bad("first_step must be >= 0, got " + std::to_string(o.first_step));
  if (o.shape.layers < 1) bad("layers must be >= 1, got " + std::to_string(o.shape.layers));
  if (o.shape.hidden < 1) bad("hidden must be >= 1, got " + std::to_string(o.shape.hidden));
  if (o.batch < 1) bad("batch must be >= 1, got " + std::to_string(o.batch));
  if (o.ranks < 1) bad("ranks must be >= 1, got " + std::to_string(o.ranks));
  if (o.steps < 1) bad("steps must be >= 1, got " + std::to_string(o.steps));
  if (o.blas_threads < 0) bad("blas_threads must be >= 0, got " + std::to_string(o.blas_threads));
  // The same validation the engine does, here, before any rank thread exists: a rank failing
  // alone would leave its peers to find out through an aborted collective.
  const std::vector<BlockSpec> specs = blocks(o.shape);
  const int world = o.bootstrap ? o.bootstrap->world_size() : o.ranks;
  const int threads_here = o.bootstrap ? 1 : o.ranks;  // rank threads in this process
  (void)shardopt::plan_memory(o.config, specs, world);

  set_blas_threads(threads_here, o.blas_threads);
  const Teacher teacher(o.shape, o.seed);
  Shared s{o,
           on_step,
           teacher,
           shardopt::make_thread_pool(o.threads),
           o.bootstrap ? nullptr : shardopt::make_in_process_group(o.ranks),
           std::vector<RankSlot>(static_cast<std::size_t>(threads_here)),
           TrainResult{},
           {},
           {},
           0,
           Clock::now()};
  s.result.params = param_count(o.shape);
  s.result.activation_bytes = activation_bytes(o.shape, o.batch, o.config.compute_dtype);
  s.result.memory.resize(static_cast<std::size_t>(threads_here));
  s.result.last_step_comm.resize(static_cast<std::size_t>(threads_here));
  for (const auto& b : specs)
    for (const auto& t : b.tensors) {
      s.result.tensor_names.push_back(t.name);
      s.result.master.push_back(host_floats(shardopt::numel(t.shape), "the gathered master weights (for the digest)"));
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
        // Peers waiting at the step barrier must not wait for this rank; peers inside a
        // collective are released by the group's abort (this rank may have failed before its
        // communicator existed, e.g. creating its backend's threads, so its departure alone
        // would not tell them).
        if (s.group) shardopt::abort_in_process_group(*s.group, "rank " + std::to_string(r) + " failed: " + shardopt_examples::what_of(std::current_exception()));
        barrier.arrive_and_drop();
      }
    });
  for (auto& t : threads) t.join();
  if (s.error) std::rethrow_exception(s.error);
  return std::move(s.result);
}

}  // namespace mlp
