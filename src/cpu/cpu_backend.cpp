// The CPU backend: every place is ordinary host memory, every stream is a thread draining a FIFO
// queue, and kernels split their range over the shared ThreadPool in fixed-size chunks.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "comm/collective.hpp"
#include "core/compressed_update_check.hpp"
#include "core/pointer_check.hpp"
#include "core/step_control_check.hpp"
#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/error.hpp"

namespace shardopt {
namespace {

// Elements per kernel chunk. Fixed (not derived from the thread count) so that chunked reductions
// such as sum_squares add their partial sums in the same order on every machine.
constexpr std::size_t kKernelChunk = std::size_t(1) << 16;
// Copies below this size are one memcpy: splitting costs more than it saves.
constexpr std::size_t kParallelCopyMin = std::size_t(4) << 20;
constexpr std::size_t kCopyChunk = std::size_t(1) << 20;
// No x86-64 or AArch64 host can map more than 2^47 bytes of user space. Refusing larger requests
// here turns them into a clean out_of_memory instead of relying on the allocator, which under
// the sanitizers aborts on absurd sizes rather than returning null.
constexpr std::size_t kMaxHostAllocation = std::size_t(1) << 47;

struct Task {
  std::function<void()> fn;
  // Event markers and waits run even after a failure so that nobody waiting on them hangs.
  bool always_run = false;
};

std::exception_ptr as_error(const std::string& stream_name) {
  try {
    throw;
  } catch (const Error&) {
    return std::current_exception();
  } catch (const std::bad_alloc&) {
    return std::make_exception_ptr(
        Error(ErrorCode::out_of_memory, "a task on stream '" + stream_name + "' ran out of host memory"));
  } catch (const std::exception& e) {
    return std::make_exception_ptr(
        Error(ErrorCode::internal, "a task on stream '" + stream_name + "' threw: " + e.what()));
  } catch (...) {
    return std::make_exception_ptr(
        Error(ErrorCode::internal, "a task on stream '" + stream_name + "' threw a non-standard exception"));
  }
}

// The state of one stream, shared with events so that an event can report the error of the
// stream it was recorded on even after the Stream handle is gone.
struct StreamCore {
  explicit StreamCore(std::string n) : name(std::move(n)) {}

  const std::string name;
  std::thread::id worker_id;

  std::mutex mutex;
  std::condition_variable has_work;
  std::condition_variable progressed;
  std::deque<Task> queue;
  std::uint64_t submitted = 0;
  std::uint64_t finished = 0;
  std::exception_ptr error;  // first failure, until a synchronize takes it
  bool stopping = false;

  void enqueue(std::function<void()> fn, bool always_run) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      queue.push_back(Task{std::move(fn), always_run});
      ++submitted;
    }
    has_work.notify_one();
  }

  void run() {
    for (;;) {
      Task task;
      bool skip = false;
      {
        std::unique_lock<std::mutex> lock(mutex);
        has_work.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        task = std::move(queue.front());
        queue.pop_front();
        skip = error && !task.always_run;
      }
      if (!skip) {
        try {
          task.fn();
        } catch (...) {
          std::exception_ptr e;
          try {
            e = as_error(name);
          } catch (...) {
            e = std::current_exception();  // no memory left even for the message: keep that
          }
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::move(e);
        }
      }
      // Captures are destroyed before the task counts as finished, so whatever they own is gone
      // by the time a synchronize returns.
      task.fn = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex);
        ++finished;
      }
      progressed.notify_all();
    }
  }

  void check_not_worker(const char* what) const {
    if (std::this_thread::get_id() == worker_id)
      throw Error(ErrorCode::invalid_state,
                  std::string(what) + " called from a task on stream '" + name + "' would wait for itself");
  }

  void drain() {
    std::unique_lock<std::mutex> lock(mutex);
    const std::uint64_t target = submitted;
    progressed.wait(lock, [&] { return finished >= target; });
  }

  void rethrow_error() {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lock(mutex);
      e = std::exchange(error, nullptr);
    }
    if (e) std::rethrow_exception(e);
  }

  bool failed() {
    std::lock_guard<std::mutex> lock(mutex);
    return error != nullptr;
  }
};

class CpuStream final : public Stream {
 public:
  explicit CpuStream(std::string name) : core_(std::make_shared<StreamCore>(std::move(name))) {
    StreamCore* core = core_.get();
    try {
      thread_ = std::thread([core] { core->run(); });
    } catch (const std::system_error& e) {
      throw Error(ErrorCode::internal, "cannot start the thread of stream '" + core->name + "': " + e.what());
    }
    core_->worker_id = thread_.get_id();
  }
  ~CpuStream() override {
    {
      std::lock_guard<std::mutex> lock(core_->mutex);
      core_->stopping = true;
    }
    core_->has_work.notify_one();
    // The worker drains the queue before it sees `stopping` with nothing left.
    thread_.join();
  }
  const std::string& name() const noexcept override { return core_->name; }

  const std::shared_ptr<StreamCore>& core() const noexcept { return core_; }

 private:
  std::shared_ptr<StreamCore> core_;
  std::thread thread_;
};

// Generation counting: every record hands out the next generation; a wait or synchronize binds to
// the generation current when it is called, so re-recording later does not move its target.
// Generations recorded on different streams may complete out of order, hence done_ahead.
struct EventCore {
  std::mutex mutex;
  std::condition_variable reached;
  std::uint64_t recorded = 0;    // last generation handed out; 0: never recorded
  std::uint64_t contiguous = 0;  // every generation <= this one has been reached
  std::set<std::uint64_t> done_ahead;
  std::uint64_t failed_generation = 0;     // latest generation whose stream had failed by then
  std::weak_ptr<StreamCore> last_stream;   // stream of the generation `recorded`

  void complete(std::uint64_t g, bool stream_failed) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (g == contiguous + 1) {
        contiguous = g;
        for (auto it = done_ahead.begin(); it != done_ahead.end() && *it == contiguous + 1;) {
          ++contiguous;
          it = done_ahead.erase(it);
        }
      } else {
        done_ahead.insert(g);
      }
      if (stream_failed) failed_generation = std::max(failed_generation, g);
    }
    reached.notify_all();
  }

  bool is_done(std::uint64_t g) const { return g <= contiguous || done_ahead.count(g) != 0; }

  void wait_for(std::uint64_t g) {
    std::unique_lock<std::mutex> lock(mutex);
    reached.wait(lock, [&] { return is_done(g); });
  }
};

class CpuEvent final : public Event {
 public:
  CpuEvent() : core_(std::make_shared<EventCore>()) {}
  const std::shared_ptr<EventCore>& core() const noexcept { return core_; }

 private:
  std::shared_ptr<EventCore> core_;
};

const std::shared_ptr<StreamCore>& shared_core_of(Stream& s) {
  auto* cs = dynamic_cast<CpuStream*>(&s);
  if (cs == nullptr)
    throw Error(ErrorCode::invalid_argument, "stream '" + s.name() + "' was not created by a CPU backend");
  return cs->core();
}

StreamCore& core_of(Stream& s) { return *shared_core_of(s); }

const std::shared_ptr<EventCore>& core_of(Event& e) {
  auto* ce = dynamic_cast<CpuEvent*>(&e);
  if (ce == nullptr) throw Error(ErrorCode::invalid_argument, "event was not created by a CPU backend");
  return ce->core();
}

// Null or not element-aligned: an Error, as on the GPU (core/pointer_check.hpp says why).
using detail::require_elements;

template <class P>
P offset(P base, std::size_t elements, DType t) noexcept {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<P>>, const unsigned char, unsigned char>;
  return static_cast<P>(static_cast<Byte*>(base) + elements * size_of(t));
}

std::size_t chunk_count(std::size_t n) noexcept { return n / kKernelChunk + (n % kKernelChunk != 0 ? 1 : 0); }

class CpuBackend final : public Backend {
 public:
  CpuBackend(std::shared_ptr<ThreadPool> pool, bool lock_pinned)
      : pool_(std::move(pool)),
        k_(&cpu::kernels(cpu::active_isa())),
        ck_(&cpu::compressed_kernels(cpu::active_isa())),
        lock_pinned_(lock_pinned) {
    memory().set_device_is_host(true);  // Place::device here is malloc'd RAM: reports say so
  }

  BackendKind kind() const noexcept override { return BackendKind::cpu; }
  bool host_accessible() const noexcept override { return true; }
  std::shared_ptr<ThreadPool> host_thread_pool() const noexcept override { return pool_; }
  bool pinned_counts_against_memlock() const noexcept override { return lock_pinned_; }

  std::unique_ptr<Stream> create_stream(std::string name) override {
    return std::make_unique<CpuStream>(std::move(name));
  }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CpuEvent>(); }

  void record(Event& event, Stream& stream) override {
    const std::shared_ptr<EventCore>& ev = core_of(event);
    const std::shared_ptr<StreamCore>& sc = shared_core_of(stream);
    std::uint64_t g;
    {
      std::lock_guard<std::mutex> lock(ev->mutex);
      g = ++ev->recorded;
      ev->last_stream = sc;
    }
    StreamCore* raw = sc.get();  // the marker runs on this stream's worker, so the core is alive
    try {
      sc->enqueue([ev, g, raw] { ev->complete(g, raw->failed()); }, /*always_run=*/true);
    } catch (...) {
      ev->complete(g, false);  // a generation with no marker would block its waiters forever
      throw;
    }
  }

  void wait(Stream& stream, Event& event) override {
    StreamCore& sc = core_of(stream);
    const std::shared_ptr<EventCore>& ev = core_of(event);
    std::uint64_t g;
    {
      std::lock_guard<std::mutex> lock(ev->mutex);
      g = ev->recorded;
    }
    if (g == 0) return;
    // Runs even on a failed stream: skipping it could let a later task run early if the error
    // is cleared while this wait is still queued; it cannot hang because markers always run.
    sc.enqueue([ev, g] { ev->wait_for(g); }, /*always_run=*/true);
  }

  void synchronize(Event& event) override {
    const std::shared_ptr<EventCore>& ev = core_of(event);
    std::uint64_t g;
    std::shared_ptr<StreamCore> sc;
    {
      std::lock_guard<std::mutex> lock(ev->mutex);
      g = ev->recorded;
      sc = ev->last_stream.lock();
    }
    if (g == 0) return;
    if (sc) sc->check_not_worker("synchronize(event)");
    ev->wait_for(g);
    bool failed;
    {
      std::lock_guard<std::mutex> lock(ev->mutex);
      failed = ev->failed_generation >= g;
    }
    if (failed && sc) sc->rethrow_error();
  }

  void synchronize(Stream& stream) override {
    StreamCore& sc = core_of(stream);
    sc.check_not_worker("synchronize(stream)");
    sc.drain();
    sc.rethrow_error();
  }

  void copy(void* dst, const void* src, std::size_t bytes, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    if (bytes == 0) return;
    require_elements(dst, bytes, 1, "copy", "dst");
    require_elements(src, bytes, 1, "copy", "src");
    if (dst == src) return;
    std::shared_ptr<ThreadPool> pool = pool_;
    sc.enqueue(
        [pool, dst, src, bytes] {
          if (bytes < kParallelCopyMin) {
            std::memcpy(dst, src, bytes);
            return;
          }
          pool->parallel_for(bytes, kCopyChunk, [&](std::size_t b, std::size_t e) {
            std::memcpy(static_cast<unsigned char*>(dst) + b, static_cast<const unsigned char*>(src) + b, e - b);
          });
        },
        false);
  }

  void host_task(Stream& stream, std::function<void()> fn) override {
    StreamCore& sc = core_of(stream);
    if (!fn) throw Error(ErrorCode::invalid_argument, "host_task on stream '" + sc.name + "': empty function");
    sc.enqueue(std::move(fn), false);
  }

  void fill(void* dst, DType dtype, std::size_t n, float value, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(dst, n, dtype, "fill", "dst");
    if (n == 0) return;
    sc.enqueue(
        [pool = pool_, k = k_, dst, dtype, n, value] {
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            k->fill(offset(dst, b, dtype), dtype, e - b, value);
          });
        },
        false);
  }

  void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n,
            Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(src, n, src_dtype, "cast", "src");
    require_elements(dst, n, dst_dtype, "cast", "dst");
    if (n == 0) return;
    if (src == dst && src_dtype != dst_dtype)
      throw Error(ErrorCode::invalid_argument, "cast: src and dst are the same pointer but the dtypes differ (" +
                                                   std::string(name_of(src_dtype)) + " -> " +
                                                   std::string(name_of(dst_dtype)) + ")");
    sc.enqueue(
        [pool = pool_, k = k_, src, src_dtype, dst, dst_dtype, n] {
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            k->cast(offset(src, b, src_dtype), src_dtype, offset(dst, b, dst_dtype), dst_dtype, e - b);
          });
        },
        false);
  }

  void unscale_check(void* data, DType dtype, std::size_t n, const float* scale, float* found_nonfinite,
                     Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(data, n, dtype, "unscale_check", "data");
    require_elements(scale, 1, DType::fp32, "unscale_check", "scale");
    require_elements(found_nonfinite, 1, DType::fp32, "unscale_check", "found_nonfinite");
    if (n == 0) return;
    sc.enqueue(
        [pool = pool_, k = k_, data, dtype, n, scale, found_nonfinite] {
          // Read when the task runs: an earlier task on the stream may compute the scale.
          const float s = *scale;
          std::atomic<bool> bad{false};
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            if (k->unscale_check(offset(data, b, dtype), dtype, e - b, s)) bad.store(true, std::memory_order_relaxed);
          });
          if (bad.load(std::memory_order_relaxed)) *found_nonfinite = 1.0f;
        },
        false);
  }

  void sum_squares(const void* data, DType dtype, std::size_t n, float* out, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(data, n, dtype, "sum_squares", "data");
    require_elements(out, 1, DType::fp32, "sum_squares", "out");
    sc.enqueue(
        [pool = pool_, k = k_, data, dtype, n, out] {
          std::vector<double> partial(chunk_count(n), 0.0);
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            partial[b / kKernelChunk] = k->sum_squares(offset(data, b, dtype), dtype, e - b);
          });
          // Chunk order, not completion order: the result must not depend on the thread count.
          double total = 0.0;
          for (double p : partial) total += p;
          *out = static_cast<float>(total);
        },
        false);
  }

  void fused_update(const UpdateArgs& args, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    const std::size_t n = args.n;
    require_elements(args.master, n, DType::fp32, "fused_update", "master");
    require_elements(args.state1, n, DType::fp32, "fused_update", "state1");
    if (state_count(args.rule) == 2) require_elements(args.state2, n, DType::fp32, "fused_update", "state2");
    require_elements(args.grad, n, args.grad_dtype, "fused_update", "grad");
    if (args.param_out != nullptr) require_elements(args.param_out, n, args.param_dtype, "fused_update", "param_out");
    if (n == 0) return;
    if (args.param_out != nullptr && args.param_out == static_cast<void*>(args.master) &&
        args.param_dtype != DType::fp32)
      throw Error(ErrorCode::invalid_argument, "fused_update: param_out aliases master but param_dtype is " +
                                                   std::string(name_of(args.param_dtype)) + ", not fp32");
    sc.enqueue(
        [pool = pool_, k = k_, a = args] {
          if (a.skip_ptr != nullptr && *a.skip_ptr != 0.0f) {
            if (a.zero_grad)
              pool->parallel_for(a.n, kKernelChunk, [&](std::size_t b, std::size_t e) {
                k->fill(static_cast<std::byte*>(const_cast<void*>(a.grad)) + b * size_of(a.grad_dtype), a.grad_dtype,
                        e - b, 0.0f);
              });
            return;
          }
          UpdateArgs run = a;
          if (run.scalars_ptr != nullptr) run.scalars = *run.scalars_ptr;
          if (run.scale_ptr != nullptr) run.scalars.grad_scale *= *run.scale_ptr;
          run.scalars_ptr = nullptr;
          run.scale_ptr = nullptr;
          run.skip_ptr = nullptr;
          pool->parallel_for(run.n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            const UpdateArgs part = cpu::slice(run, b, e - b);
            k->fused_update(part);
            // The chunk's gradient was just read: zeroing it now writes cache-resident lines.
            if (run.zero_grad) k->fill(const_cast<void*>(part.grad), run.grad_dtype, part.n, 0.0f);
          });
        },
        false);
  }

  void compressed_update(const CompressedUpdateArgs& args, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    detail::check_compressed_update(args);
    if (args.n == 0) return;
    // kKernelChunk is a multiple of every int8 block size (a power of two <= kMaxQuantBlock), so
    // each chunk starts on a block boundary and the split does not change any block's scale.
    static_assert(kKernelChunk % kMaxQuantBlock == 0);
    sc.enqueue(
        [pool = pool_, k = ck_, fill = k_->fill, a = args] {
          auto zero = [&](std::size_t b, std::size_t e) {
            fill(static_cast<std::byte*>(const_cast<void*>(a.grad)) + b * size_of(a.grad_dtype), a.grad_dtype, e - b,
                 0.0f);
          };
          if (a.skip_ptr != nullptr && *a.skip_ptr != 0.0f) {
            if (a.zero_grad) pool->parallel_for(a.n, kKernelChunk, zero);
            return;
          }
          CompressedUpdateArgs run = a;
          if (run.scalars_ptr != nullptr) run.scalars = *run.scalars_ptr;
          if (run.seed_ptr != nullptr) run.seed = static_cast<std::uint64_t>(*run.seed_ptr);
          run.seed_ptr = nullptr;
          if (run.scale_ptr != nullptr) run.scalars.grad_scale *= *run.scale_ptr;
          run.scalars_ptr = nullptr;
          run.scale_ptr = nullptr;
          run.skip_ptr = nullptr;
          pool->parallel_for(run.n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            k->update(cpu::slice(run, b, e - b));
            if (run.zero_grad) zero(b, e);
          });
        },
        false);
  }

  void step_totals(const float* partials, std::size_t count, const float* flag, float* totals,
                   Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(partials, count, DType::fp32, "step_totals", "partials");
    require_elements(flag, 1, DType::fp32, "step_totals", "flag");
    require_elements(totals, 2, DType::fp32, "step_totals", "totals");
    sc.enqueue([partials, count, flag, totals] { rules::step_totals(partials, count, flag, totals); }, false);
  }

  void step_control(const StepControlArgs& args, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    detail::check_step_control(args);
    sc.enqueue([a = args] { rules::step_control(a); }, false);
  }

  void accumulate(const void* src, DType src_dtype, float* dst, std::size_t n, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    require_elements(src, n, src_dtype, "accumulate", "src");
    require_elements(dst, n, DType::fp32, "accumulate", "dst");
    if (n == 0) return;
    sc.enqueue(
        [pool = pool_, src, src_dtype, dst, n] {
          // Not in the kernel table: it runs once per micro-step over a gradient slice, and the
          // conversion loop below vectorizes well enough for a memory-bound pass.
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            switch (src_dtype) {
              case DType::fp32: {
                const float* s = static_cast<const float*>(src);
                for (std::size_t i = b; i < e; ++i) dst[i] += s[i];
                break;
              }
              case DType::bf16: {
                const auto* s = static_cast<const std::uint16_t*>(src);
                for (std::size_t i = b; i < e; ++i) dst[i] += bf16_to_float(s[i]);
                break;
              }
              case DType::fp16: {
                const auto* s = static_cast<const std::uint16_t*>(src);
                for (std::size_t i = b; i < e; ++i) dst[i] += fp16_to_float(s[i]);
                break;
              }
            }
          });
        },
        false);
  }

  void reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n, DType dtype,
              ReduceOp op, Stream& stream) override {
    StreamCore& sc = core_of(stream);
    if (std::string problem = comm::check_reduce(srcs, nsrc, dsts, ndst, n, dtype); !problem.empty())
      throw Error(ErrorCode::invalid_argument, problem);
    if (n == 0) return;
    // The caller's pointer arrays may be gone by the time the task runs: the task owns copies.
    sc.enqueue(
        [pool = pool_, in = std::vector<const void*>(srcs, srcs + nsrc),
         out = std::vector<void*>(dsts, dsts + ndst), n, dtype, op] {
          const int ni = static_cast<int>(in.size());
          const int no = static_cast<int>(out.size());
          // Elements are independent, so chunking changes nothing in the bits.
          pool->parallel_for(n, kKernelChunk, [&](std::size_t b, std::size_t e) {
            comm::reduce(
                ni, [&](int q) { return offset(in[static_cast<std::size_t>(q)], b, dtype); }, no,
                [&](int q) { return offset(out[static_cast<std::size_t>(q)], b, dtype); }, e - b, dtype, op);
          });
        },
        false);
  }

 protected:
  void* raw_allocate(std::size_t bytes, Place place) override {
    if (bytes > kMaxHostAllocation) return nullptr;
    if (lock_pinned_ && place == Place::pinned_host) {
      // Whole pages of its own, so that unlocking one buffer never unlocks a page of another.
      const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
      const std::size_t rounded = (bytes + page - 1) / page * page;
      void* p = std::aligned_alloc(page, rounded);
      if (p == nullptr) return nullptr;
      if (::mlock(p, rounded) != 0) {
        std::free(p);  // the lock was refused (RLIMIT_MEMLOCK): reported as the allocation failing
        return nullptr;
      }
      std::lock_guard<std::mutex> lock(locked_mutex_);
      locked_[p] = rounded;
      return p;
    }
    // aligned_alloc wants a multiple of the alignment; no overflow thanks to the cap above.
    const std::size_t rounded = (bytes + 63) & ~std::size_t(63);
    return std::aligned_alloc(64, rounded);
  }
  void raw_free(void* p, Place place) noexcept override {
    if (p != nullptr && lock_pinned_ && place == Place::pinned_host) {
      std::lock_guard<std::mutex> lock(locked_mutex_);
      const auto it = locked_.find(p);
      if (it != locked_.end()) {
        (void)::munlock(p, it->second);
        locked_.erase(it);
      }
    }
    std::free(p);
  }

 private:
  std::shared_ptr<ThreadPool> pool_;
  const cpu::Kernels* k_;
  const cpu::CompressedKernels* ck_;
  bool lock_pinned_ = false;
  std::mutex locked_mutex_;
  std::unordered_map<void*, std::size_t> locked_;  // lock_pinned: bytes locked per buffer
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(CpuBackendOptions options) {
  std::shared_ptr<ThreadPool> pool = options.pool ? std::move(options.pool) : default_thread_pool();
  return std::make_unique<CpuBackend>(std::move(pool), options.lock_pinned);
}

}  // namespace shardopt
