#pragma once
// Backend: memory by place, ordered streams, events, asynchronous copies, and the few kernels the
// engine needs. One Backend instance serves one rank.
//
// Streams and ordering. Every operation that takes a Stream& is enqueued on it and runs after
// everything enqueued before it on that stream; the call returns at once. Buffers passed to an
// enqueued operation must stay valid, and must not be written by the host, until the operation
// completes (synchronize on the stream or on an event recorded after it). Cross-stream ordering
// is by record(event, a) + wait(b, event).
//
// Thread safety. Enqueueing onto one stream from several host threads at once is not supported;
// different streams may be driven from different threads. allocate/free and the memory tracker
// are thread-safe.
//
// Pointers. On the CPU backend every place is ordinary host memory. On the CUDA backend `device`
// memory is GPU memory and the kernels read and write it; `pinned_host` is page-locked host memory.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "shardopt/communicator.hpp"
#include "shardopt/config.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/memory.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/state_precision.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt {

class Backend;

enum class BackendKind : std::uint8_t { cpu, cuda };
std::string_view name_of(BackendKind k) noexcept;

// An owning handle to backend memory. Move-only; frees itself (and updates the tracker).
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void* data() const noexcept { return data_; }
  template <class T>
  T* as() const noexcept {
    return static_cast<T*>(data_);
  }
  std::size_t bytes() const noexcept { return bytes_; }
  Place place() const noexcept { return place_; }
  Category category() const noexcept { return category_; }
  explicit operator bool() const noexcept { return data_ != nullptr; }
  void reset() noexcept;

 private:
  friend class Backend;
  Buffer(Backend* owner, void* data, std::size_t bytes, Place place, Category category) noexcept
      : owner_(owner), data_(data), bytes_(bytes), place_(place), category_(category) {}
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Place place_ = Place::host;
  Category category_ = Category::other;
};

class Stream {
 public:
  virtual ~Stream() = default;
  virtual const std::string& name() const noexcept = 0;
};

class Event {
 public:
  virtual ~Event() = default;
};

// Arguments of the fused optimizer update over n contiguous elements:
//   g = load(grad[i]) * s, where s = scalars.grad_scale * (scale_ptr ? *scale_ptr : 1) is formed once
//   per call (one rounding), then
//   rule(master[i], g, state1[i], state2[i]); param_out[i] = round(master[i]) if param_out
// If scalars_ptr is non-null, *scalars_ptr as it is when the kernel runs replaces `scalars`.
// If skip_ptr is non-null and *skip_ptr != 0 when the kernel runs, nothing is written (but the
// zeroing zero_grad asks for).
// zero_grad: the gradient is zeroed as it is read (grad must then be writable backend memory): the
// engine folds the zeroing for the next step into the update's pass instead of a separate fill.
// scalars_ptr, scale_ptr and skip_ptr point to backend (device) memory, so values computed by
// earlier work on the stream are used with no host round trip.
// master and the states are fp32. state2 is ignored by rules with one state.
// In-place rules: param_out may not alias master unless param_dtype is fp32 and it is the same
// pointer, in which case the store is skipped.
struct UpdateArgs {
  OptimizerKind rule = OptimizerKind::adamw;
  StepScalars scalars;
  const StepScalars* scalars_ptr = nullptr;
  float* master = nullptr;
  float* state1 = nullptr;
  float* state2 = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::fp32;
  void* param_out = nullptr;
  DType param_dtype = DType::fp32;
  std::size_t n = 0;
  const float* scale_ptr = nullptr;
  const float* skip_ptr = nullptr;
  bool zero_grad = false;
};

// Arguments of the fused optimizer update with compressed state (shardopt/state_precision.hpp):
// the same update as UpdateArgs describes (the same rule element function, gradient scaling,
// scalars_ptr / scale_ptr / skip_ptr / zero_grad, param_out rules), with the rule's states stored
// in `precision` instead of fp32. Per element: decode the states to fp32, run the rule in fp32
// (master fp32), write master and param_out from that fp32 result, encode the new states.
//   bf16: state1/state2 hold n std::uint16_t each (round to nearest even on the way back).
//   int8: state1/state2 hold n std::uint8_t codes each; scales1/scales2 quant_block_count(n,
//         block_size) fp32 scales each. state1 is a signed code (first moment, momentum), state2
//         an unsigned one (second moment). A block's codes are decoded with its old scale, and
//         after the update the block gets a new scale from its new values, then new codes.
// `block_size` (int8 only) must be a power of two in [kMinQuantBlock, kMaxQuantBlock]. The n
// elements start at a block boundary of the tensor (its global index is a multiple of
// block_size): block k of the call is elements [k*block_size, (k+1)*block_size) of the range,
// the last block may be partial. The caller guarantees that alignment; the call cannot see it.
// state2 and scales2 are ignored by rules with one state. Buffers are backend memory and must not
// overlap each other (param_out == master with param_dtype fp32 is the one allowed alias).
// precision fp32 is refused: that is fused_update.
// int8 codes are rounded stochastically with a deterministic dither (state_precision.hpp): element
// i of the call uses quant::dither(quant::dither_key(seed, state), first_index + i). `first_index`
// is the element's global index (in the tensor, or any numbering that does not depend on how the
// state is sharded), `seed` must differ between steps (the step counter): the same seed and index
// give the same bytes on every backend, instruction set, thread split and world size.
// `seed_ptr`, when set, replaces `seed`: backend memory holding the seed (the engine's step
// counter), read when the work runs, like scalars_ptr, so that a captured CUDA graph replayed at a
// later step uses that step's seed rather than the one it was captured with.
struct CompressedUpdateArgs {
  OptimizerKind rule = OptimizerKind::adamw;
  StepScalars scalars;
  const StepScalars* scalars_ptr = nullptr;
  StatePrecision precision = StatePrecision::int8;
  std::size_t block_size = kDefaultQuantBlock;
  std::uint64_t seed = 0;
  const std::int64_t* seed_ptr = nullptr;
  std::uint64_t first_index = 0;
  float* master = nullptr;
  void* state1 = nullptr;
  void* state2 = nullptr;
  float* scales1 = nullptr;
  float* scales2 = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::fp32;
  void* param_out = nullptr;
  DType param_dtype = DType::fp32;
  std::size_t n = 0;
  const float* scale_ptr = nullptr;
  const float* skip_ptr = nullptr;
  bool zero_grad = false;
};

class ThreadPool;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual BackendKind kind() const noexcept = 0;
  // Whether the host may read and write this backend's memory of every place directly (plain
  // loads and stores, memcpy): true on the CPU backend; false on the CUDA backend, whose `device`
  // memory only its kernels and copies reach. Ask this, not kind(), before touching memory on the
  // host (a host-memory communicator, a host view of a buffer). The default answers from kind(),
  // for backends that wrap one of the two.
  virtual bool host_accessible() const noexcept { return kind() == BackendKind::cpu; }
  // The thread pool this backend's host kernels run on (the CPU backend's), or null for a backend
  // that runs none (CUDA). Host-side work done for this backend elsewhere (the offload engine's
  // CPU update) shares it, so one process never runs two machine-sized pools.
  virtual std::shared_ptr<ThreadPool> host_thread_pool() const noexcept { return nullptr; }
  // Whether Place::pinned_host allocations lock pages that count against the process's
  // locked-memory limit (RLIMIT_MEMLOCK): then the engine checks the bytes it plans to pin against
  // that limit at initialize(). False by default: the CPU backend's pinned memory is ordinary
  // memory unless CpuBackendOptions::lock_pinned; the CUDA driver pins cudaHostAlloc memory
  // without charging that limit, so there a refusal shows up as the pin call failing, which the
  // engine reports the same way.
  virtual bool pinned_counts_against_memlock() const noexcept { return false; }
  // Device bytes create_stream() allocates with each stream, for the stream's own reductions
  // (tagged Category::other, named after the stream): 0 on the CPU backend, the CUDA backend's
  // sum_squares partial sums there. plan_memory() counts them for each stream the engine creates.
  virtual std::size_t stream_scratch_bytes() const noexcept { return 0; }

  // Allocates `bytes` (64-byte aligned, contents undefined) at `place`, tagged `category`.
  // `what` names the buffer in the error raised when the allocation fails (out_of_memory, with
  // the size asked). bytes == 0 gives an empty Buffer. Place::disk is not allocatable here.
  Buffer allocate(std::size_t bytes, Place place, Category category, std::string_view what);

  MemoryTracker& memory() noexcept { return memory_; }
  const MemoryTracker& memory() const noexcept { return memory_; }

  virtual std::unique_ptr<Stream> create_stream(std::string name) = 0;
  virtual std::unique_ptr<Event> create_event() = 0;
  // Marks `event` as reached once everything enqueued on `stream` so far has run.
  virtual void record(Event& event, Stream& stream) = 0;
  // Work enqueued on `stream` after this call waits for the last record of `event` (no-op if the
  // event was never recorded).
  virtual void wait(Stream& stream, Event& event) = 0;
  // Host blocks until the event's last record is reached / until the stream is drained.
  // If an enqueued operation failed, these rethrow its Error (once).
  virtual void synchronize(Event& event) = 0;
  virtual void synchronize(Stream& stream) = 0;
  // True while work enqueued on `stream` is recorded into a graph instead of running (CUDA stream
  // capture; cudaStreamBeginCapture on cuda_stream_handle(stream), or on a stream it joined).
  // The CPU backend never captures. After the capture, an event last recorded inside it marks
  // work that runs at every launch of the graph: waiting on it is a no-op and synchronizing on it
  // waits for the whole device (see shardopt/cuda.hpp).
  virtual bool capturing(Stream& /*stream*/) { return false; }

  // Copies bytes between any two places of this backend.
  virtual void copy(void* dst, const void* src, std::size_t bytes, Stream& stream) = 0;
  // Runs `fn` on the host in stream order (like cudaLaunchHostFunc). fn may throw Error: it is
  // reported by the next synchronize of that stream.
  virtual void host_task(Stream& stream, std::function<void()> fn) = 0;

  // Kernels. n counts elements.
  virtual void fill(void* dst, DType dtype, std::size_t n, float value, Stream& stream) = 0;
  // dst = round(src) to dst_dtype; src and dst may be the same pointer only when dtypes match.
  virtual void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n,
                    Stream& stream) = 0;
  // data *= scale, in place; *found_nonfinite is set to 1.0f if any result is not finite (it is
  // never cleared here: zero it with fill first). scale and found_nonfinite are backend memory.
  virtual void unscale_check(void* data, DType dtype, std::size_t n, const float* scale,
                             float* found_nonfinite, Stream& stream) = 0;
  // *out = sum of data[i]^2 (as float, accumulated in at least fp32 in a fixed order that does
  // not depend on thread count, so results are reproducible). A non-finite element makes *out
  // non-finite (squares never cancel): the engine's overflow check is this sum. out is backend
  // memory.
  virtual void sum_squares(const void* data, DType dtype, std::size_t n, float* out,
                           Stream& stream) = 0;
  virtual void fused_update(const UpdateArgs& args, Stream& stream) = 0;
  // The fused update with compressed state (CompressedUpdateArgs). Arguments are checked before
  // anything is enqueued: Error(invalid_argument) naming the bad one (precision, block size,
  // pointers). The CPU backend gives the same bytes on every instruction set and thread count;
  // the CUDA backend gives the same bytes as the CPU backend. A backend without it (the default)
  // throws Error(unsupported).
  virtual void compressed_update(const CompressedUpdateArgs& args, Stream& stream);
  // dst[i] += src[i] (src converted to float, sum rounded to fp32). Accumulates reduced gradient
  // slices across micro-steps. dst and src must not overlap.
  virtual void accumulate(const void* src, DType src_dtype, float* dst, std::size_t n,
                          Stream& stream) = 0;
  // Element-wise reduction across buffers: the kernel behind collectives whose ranks share one
  // backend address space (in-process ranks on one GPU). For every i < n:
  //   acc = float(srcs[0][i]); then for q = 1..nsrc-1 in that order:
  //     sum/avg: acc = acc + float(srcs[q][i])            (fp32 additions, one rounding each)
  //     max:     acc = (x > acc || x != x) ? x : acc       (x = float(srcs[q][i]); a NaN wins)
  //   avg: acc = acc / nsrc (a division, not a multiplication by 1/nsrc);
  //   the value round(acc) to `dtype` is stored into dsts[0][i], ..., dsts[ndst-1][i].
  // These are the bits the host communicators produce. Every source element i is read before any
  // destination element i is written, so a destination may be one of the sources (in place);
  // otherwise destinations overlap neither the sources nor each other. The pointer arrays
  // themselves are read during the call and may go away when it returns.
  // 1 <= nsrc, ndst <= kMaxReduceOperands; n == 0 does nothing.
  static constexpr int kMaxReduceOperands = 64;
  virtual void reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n,
                      DType dtype, ReduceOp op, Stream& stream) = 0;
  // The step-control functions of step_control.hpp, run in stream order on backend memory:
  // rules::step_totals(partials, count, flag, totals) (totals: 2 floats; count may be 0) and
  // rules::step_control(args). Every pointer is backend memory and is read when the work runs.
  virtual void step_totals(const float* partials, std::size_t count, const float* flag, float* totals,
                           Stream& stream) = 0;
  virtual void step_control(const StepControlArgs& args, Stream& stream) = 0;

 protected:
  virtual void* raw_allocate(std::size_t bytes, Place place) = 0;  // nullptr on failure
  virtual void raw_free(void* p, Place place) noexcept = 0;

 private:
  friend class Buffer;
  void release(Buffer& b) noexcept;
  MemoryTracker memory_;
};

// A pool of worker threads shared by every CPU backend (rank) of a process, so N ranks and their
// streams never run more kernel threads than there are cores.
std::shared_ptr<ThreadPool> make_thread_pool(unsigned threads = 0);  // 0: hardware concurrency
unsigned thread_count(const ThreadPool& pool) noexcept;
// The process's one default pool, sized to the machine: what a CPU backend made without a pool
// uses, and what the offload engine's CPU update uses on a backend without a pool (CUDA). Made
// on first use and shared while anything holds it; thread-safe.
std::shared_ptr<ThreadPool> default_thread_pool();

struct CpuBackendOptions {
  std::shared_ptr<ThreadPool> pool;  // null: default_thread_pool()
  // Place::pinned_host memory is locked with mlock (as a GPU driver's pinned memory would be), so
  // it counts against RLIMIT_MEMLOCK and fails where the limit refuses it. Off: ordinary memory.
  bool lock_pinned = false;
};
std::unique_ptr<Backend> make_cpu_backend(CpuBackendOptions options = {});

}  // namespace shardopt
