// The CUDA backend: memory, streams, events, copies and the engine's kernels on one GPU.
//
// This translation unit is compiled with --fmad=false (cuda/CMakeLists.txt): nvcc would otherwise
// contract a*b+c into one fused multiply-add, which rounds once instead of twice, and the
// optimizer rules would then differ from the CPU build (compiled with -ffp-contract=off) in the
// last bit. Division and square root are IEEE-rounded (nvcc's defaults -prec-div=true,
// -prec-sqrt=true; rules.hpp uses __fsqrt_rn), denormals are kept (-ftz=false), so the fused
// update is bit-identical to the CPU backend's.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "comm/collective.hpp"
#include "core/compressed_update_check.hpp"
#include "core/pointer_check.hpp"
#include "core/step_control_check.hpp"
#include "cuda/cuda_internal.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/step_control.hpp"

namespace shardopt::cuda_impl {

// ---- errors, device guard, error slot -------------------------------------------------------

void check(cudaError_t status, const char* call, std::string_view doing, ErrorCode code,
           std::source_location where) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // a non-sticky error must not resurface in a later, unrelated check
  throw Error(code,
              std::string(call) + " failed while " + std::string(doing) + ": " + cudaGetErrorName(status) +
                  " (" + cudaGetErrorString(status) + ")",
              where);
}

DeviceGuard::DeviceGuard(int device, bool nothrow) {
  int current = -1;
  const cudaError_t st = cudaGetDevice(&current);
  if (st == cudaSuccess && current == device) return;  // nothing to switch or restore
  if (nothrow) {
    if (cudaSetDevice(device) == cudaSuccess) {
      previous_ = st == cudaSuccess ? current : -1;
      device_ = device;
    }
    (void)cudaGetLastError();
    return;
  }
  check(st, "cudaGetDevice", "finding the caller's current device");
  check(cudaSetDevice(device), "cudaSetDevice",
        "making CUDA device " + std::to_string(device) + " current for the shardopt backend");
  previous_ = current;
  device_ = device;
}

DeviceGuard::~DeviceGuard() {
  if (device_ >= 0 && previous_ >= 0 && previous_ != device_) {
    (void)cudaSetDevice(previous_);
    (void)cudaGetLastError();
  }
}

void ErrorSlot::set_once(std::exception_ptr e) {
  std::lock_guard<std::mutex> lock(mutex);
  if (!error) error = std::move(e);  // the first failure is the one worth reporting
}

void ErrorSlot::rethrow_once() {
  std::exception_ptr e;
  {
    std::lock_guard<std::mutex> lock(mutex);
    e = std::exchange(error, nullptr);
  }
  if (e) std::rethrow_exception(e);
}

// ---- streams and events ---------------------------------------------------------------------

CudaStream::CudaStream(std::string name, int device)
    : name_(std::move(name)), device_(device), errors_(std::make_shared<ErrorSlot>()) {
  DeviceGuard guard(device_);
  // Non-blocking: the legacy default stream (which a trainer may use) must not serialize with it.
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
        "creating stream '" + name_ + "'", ErrorCode::out_of_memory);
}

CudaStream::~CudaStream() {
  DeviceGuard guard(device_, true);
  // Drain first: the partials buffer is freed right after this body and may still be in use.
  (void)cudaStreamSynchronize(stream_);
  (void)cudaStreamDestroy(stream_);
  (void)cudaGetLastError();
}

unsigned long long capture_id(cudaStream_t stream, std::string_view name) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  check(cudaStreamGetCaptureInfo(stream, &status, &id), "cudaStreamGetCaptureInfo",
        "asking whether stream '" + std::string(name) + "' is being captured");
  return status == cudaStreamCaptureStatusActive ? id : 0;
}

CaptureMark capture_mark(cudaStream_t recorded_on, std::string_view name) {
  return {capture_id(recorded_on, name), recorded_on};
}

namespace {
// Whether the capture `recorded` names is still going on on the stream that recorded the event.
bool still_capturing(const CaptureMark& recorded) noexcept {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  if (cudaStreamGetCaptureInfo(recorded.origin, &status, &id) != cudaSuccess) {
    (void)cudaGetLastError();  // the stream is gone: so is its capture
    return false;
  }
  return status == cudaStreamCaptureStatusActive && id == recorded.id;
}
}  // namespace

void stream_wait(cudaStream_t stream, std::string_view name, cudaEvent_t event, const CaptureMark& recorded) {
  const unsigned long long capture = capture_id(stream, name);
  if (recorded.id != 0 && recorded.id != capture && !still_capturing(recorded)) return;  // its capture is over
  check(cudaStreamWaitEvent(stream, event, capture != 0 && recorded.id == 0 ? cudaEventWaitExternal : cudaEventWaitDefault),
        "cudaStreamWaitEvent", "making stream '" + std::string(name) + "' wait for an event");
}

void host_wait(cudaEvent_t event, const CaptureMark& recorded, std::string_view doing) {
  if (recorded.id != 0)
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize", std::string(doing) + " (an event last recorded in a CUDA-graph capture)");
  else
    check(cudaEventSynchronize(event), "cudaEventSynchronize", doing);
}

CudaStream& cuda_stream(Stream& stream, std::string_view what) {
  auto* s = dynamic_cast<CudaStream*>(&stream);
  if (s == nullptr)
    throw Error(ErrorCode::invalid_argument,
                std::string(what) + ": stream '" + stream.name() + "' does not belong to a CUDA backend");
  return *s;
}

namespace {

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(int device) : device_(device) {
    DeviceGuard guard(device_);
    // Timing disabled: cheaper to record and to wait on, and the engine only orders with events.
    check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreateWithFlags",
          "creating an event", ErrorCode::out_of_memory);
  }
  ~CudaEvent() override {
    DeviceGuard guard(device_, true);
    (void)cudaEventDestroy(event_);
    (void)cudaGetLastError();
  }
  cudaEvent_t handle() const noexcept { return event_; }
  // The error slot of the stream it was last recorded on, so synchronize(event) can report a
  // failed host task that ran before the record. Locked: one thread may record while another
  // synchronizes (a copy thread and the trainer's thread, say).
  void set_slot(std::shared_ptr<ErrorSlot> s) {
    std::lock_guard<std::mutex> lock(mutex_);
    slot_ = std::move(s);
  }
  std::shared_ptr<ErrorSlot> slot() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return slot_;
  }
  // The capture its last record joined (id 0: recorded outside any capture).
  void set_capture(const CaptureMark& mark) {
    std::lock_guard<std::mutex> lock(mutex_);
    capture_ = mark;
  }
  CaptureMark capture() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return capture_;
  }

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<ErrorSlot> slot_;
  CaptureMark capture_;
  int device_;
  cudaEvent_t event_ = nullptr;
};

CudaEvent& cuda_event(Event& event, std::string_view what) {
  auto* e = dynamic_cast<CudaEvent*>(&event);
  if (e == nullptr)
    throw Error(ErrorCode::invalid_argument, std::string(what) + ": the event does not belong to a CUDA backend");
  return *e;
}

struct HostTask {
  std::function<void()> fn;
  std::shared_ptr<ErrorSlot> slot;
  std::string stream_name;
};

// Runs on a CUDA driver thread. Nothing may escape into the driver, so every exception is kept
// for the next synchronize; anything that is not an Error is wrapped in one naming the stream.
void CUDART_CB run_host_task(void* data) {
  std::unique_ptr<HostTask> task(static_cast<HostTask*>(data));
  try {
    task->fn();
  } catch (const Error&) {
    task->slot->set_once(std::current_exception());
  } catch (const std::exception& e) {
    task->slot->set_once(std::make_exception_ptr(
        Error(ErrorCode::internal, "host task on stream '" + task->stream_name + "' threw: " + e.what())));
  } catch (...) {
    task->slot->set_once(std::make_exception_ptr(
        Error(ErrorCode::internal, "host task on stream '" + task->stream_name + "' threw a non-standard exception")));
  }
}

// ---- kernels --------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kMaxPartials = 1024;  // sum_squares: blocks of the first pass, slots per stream

template <DType T>
struct Storage {
  using type = std::uint16_t;
};
template <>
struct Storage<DType::fp32> {
  using type = float;
};
template <DType T>
using storage_t = typename Storage<T>::type;

template <DType T>
__device__ __forceinline__ float to_float(storage_t<T> x) {
  if constexpr (T == DType::fp32)
    return x;
  else if constexpr (T == DType::fp16)
    return fp16_to_float(x);
  else
    return bf16_to_float(x);
}

template <DType T>
__host__ __device__ __forceinline__ storage_t<T> from_float(float v) {
  if constexpr (T == DType::fp32)
    return v;
  else if constexpr (T == DType::fp16)
    return float_to_fp16(v);
  else
    return float_to_bf16(v);
}

__device__ __forceinline__ bool is_finite(float v) { return (float_bits(v) & 0x7f800000u) != 0x7f800000u; }

__device__ __forceinline__ std::size_t thread_index() {
  return static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::size_t grid_stride() {
  return static_cast<std::size_t>(gridDim.x) * blockDim.x;
}

template <DType T>
__global__ void __launch_bounds__(kThreads) fill_kernel(storage_t<T>* dst, std::size_t n, storage_t<T> value) {
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) dst[i] = value;
}

template <DType S, DType D>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const storage_t<S>* src, storage_t<D>* dst, std::size_t n) {
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) dst[i] = from_float<D>(to_float<S>(src[i]));
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    divide_cast_kernel(const float* src, storage_t<D>* dst, std::size_t n, float divisor) {
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) dst[i] = from_float<D>(src[i] / divisor);
}

template <DType S>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(const storage_t<S>* src, float* dst, std::size_t n) {
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) dst[i] = dst[i] + to_float<S>(src[i]);
}

// Backend::reduce. The pointer arrays travel by value in the kernel parameters (about 1 KiB), so the
// caller's arrays may go away as soon as the launch returns.
struct ReduceKernelArgs {
  const void* srcs[Backend::kMaxReduceOperands];
  void* dsts[Backend::kMaxReduceOperands];
  int nsrc;
  int ndst;
  std::size_t n;
  ReduceOp op;
};

// The arithmetic of comm::reduce_typed (the host communicators), element by element: fp32
// accumulation in source order, a true division for avg, one rounding. Each thread reads every
// source of element i before writing any destination of it, which makes the in-place form safe.
template <DType T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(ReduceKernelArgs a) {
  for (std::size_t i = thread_index(); i < a.n; i += grid_stride()) {
    float acc = to_float<T>(static_cast<const storage_t<T>*>(a.srcs[0])[i]);
    for (int q = 1; q < a.nsrc; ++q) {
      const float x = to_float<T>(static_cast<const storage_t<T>*>(a.srcs[q])[i]);
      if (a.op == ReduceOp::max)
        acc = (x > acc || x != x) ? x : acc;  // a NaN wins, as on the host
      else
        acc = acc + x;
    }
    if (a.op == ReduceOp::avg) acc = acc / static_cast<float>(a.nsrc);
    const storage_t<T> r = from_float<T>(acc);
    for (int q = 0; q < a.ndst; ++q) static_cast<storage_t<T>*>(a.dsts[q])[i] = r;
  }
}

// The non-finite check looks at the stored value: a finite product that rounds to infinity in
// fp16 is an overflow the optimizer would see.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    unscale_check_kernel(storage_t<T>* data, std::size_t n, const float* scale, float* found_nonfinite) {
  const float s = *scale;
  bool bad = false;
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) {
    const storage_t<T> r = from_float<T>(to_float<T>(data[i]) * s);
    data[i] = r;
    bad |= !is_finite(to_float<T>(r));
  }
  // Every writer stores the same 1.0f, so the unordered writes are benign; nobody clears it here.
  if (bad) *found_nonfinite = 1.0f;
}

// Fixed-order tree reduction of one value per thread of a kThreads block; result in sh[0].
__device__ __forceinline__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  return sh[0];
}

// sum_squares, pass 1: each block writes the sum of its grid-stride share. The grid depends only
// on n (never on the device), and every sum is taken in a fixed order, so the result is the same
// on every run and every GPU. Accumulation is in double: float(v)^2 is exact in double.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    sum_squares_partial_kernel(const storage_t<T>* data, std::size_t n, double* partials) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (std::size_t i = thread_index(); i < n; i += grid_stride()) {
    const double v = to_float<T>(data[i]);
    acc += v * v;
  }
  const double total = block_sum(acc, sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// sum_squares, pass 2: one block adds the partials in a fixed order. count == 0 writes 0.
__global__ void __launch_bounds__(kThreads) sum_squares_final_kernel(const double* partials, int count, float* out) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kThreads) acc += partials[i];
  const double total = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = static_cast<float>(total);
}

// Step control (step_control.hpp): scalar work, one thread, so the result is the CPU backend's.
__global__ void step_totals_kernel(const float* partials, std::size_t count, const float* flag, float* totals) {
  rules::step_totals(partials, count, flag, totals);
}
__global__ void step_control_kernel(StepControlArgs a) { rules::step_control(a); }

struct UpdateKernelArgs {
  StepScalars scalars;
  const StepScalars* scalars_ptr;  // replaces `scalars` when set (computed by step_control_kernel)
  float* master;
  float* state1;
  float* state2;
  const void* grad;
  void* param_out;
  std::size_t n;
  const float* scale_ptr;
  const float* skip_ptr;
  bool vector;     // every pointer is aligned for 4-element vector access
  bool zero_grad;  // zero the gradient as it is read (UpdateArgs::zero_grad)
};

// The gradient zeroing of a skipped step (UpdateArgs::zero_grad): every element, grid-stride.
template <DType G>
__device__ void zero_grad_all(const UpdateKernelArgs& a) {
  auto* grad = static_cast<storage_t<G>*>(const_cast<void*>(a.grad));
  for (std::size_t i = thread_index(); i < a.n; i += grid_stride()) grad[i] = storage_t<G>(0);
}

// The very element functions the CPU backend runs (shardopt/rules/<rule>.hpp), so the arithmetic
// is the same.
template <OptimizerKind R>
__device__ __forceinline__ void apply_rule(float& p, float g, float& s1, float& s2, const StepScalars& s) {
  rule_t<R>::update(p, g, s1, s2, s);
}

// Four consecutive elements of a 16-bit buffer as one 8-byte load/store (little-endian: element 0
// is the low half of .x); fp32 buffers use 16-byte float4.
template <DType T>
__device__ __forceinline__ void load4(const storage_t<T>* base, std::size_t group, float (&out)[4]) {
  if constexpr (T == DType::fp32) {
    const float4 v = reinterpret_cast<const float4*>(base)[group];
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const uint2 v = reinterpret_cast<const uint2*>(base)[group];
    out[0] = to_float<T>(static_cast<std::uint16_t>(v.x & 0xffffu));
    out[1] = to_float<T>(static_cast<std::uint16_t>(v.x >> 16));
    out[2] = to_float<T>(static_cast<std::uint16_t>(v.y & 0xffffu));
    out[3] = to_float<T>(static_cast<std::uint16_t>(v.y >> 16));
  }
}

template <DType T>
__device__ __forceinline__ void store4(storage_t<T>* base, std::size_t group, const float (&in)[4]) {
  if constexpr (T == DType::fp32) {
    reinterpret_cast<float4*>(base)[group] = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    uint2 v;
    v.x = static_cast<std::uint32_t>(from_float<T>(in[0])) | (static_cast<std::uint32_t>(from_float<T>(in[1])) << 16);
    v.y = static_cast<std::uint32_t>(from_float<T>(in[2])) | (static_cast<std::uint32_t>(from_float<T>(in[3])) << 16);
    reinterpret_cast<uint2*>(base)[group] = v;
  }
}

// One kernel per (rule, grad dtype, param dtype, store?). Vector path: groups of 4 elements with
// 16-byte loads of the fp32 arrays, then a scalar tail; scalar path when any pointer is unaligned.
template <OptimizerKind R, DType G, DType P, bool Store>
__global__ void __launch_bounds__(kThreads) fused_update_kernel(UpdateKernelArgs a) {
  // Read on the device so an overflow found by an earlier kernel skips the step with no host
  // round trip.
  if (a.skip_ptr != nullptr && *a.skip_ptr != 0.0f) {
    if (a.zero_grad) zero_grad_all<G>(a);
    return;
  }
  StepScalars s = a.scalars_ptr != nullptr ? *a.scalars_ptr : a.scalars;
  if (a.scale_ptr != nullptr) s.grad_scale = s.grad_scale * *a.scale_ptr;
  constexpr bool kTwoStates = rule_t<R>::states == 2;
  const auto* grad = static_cast<const storage_t<G>*>(a.grad);
  auto* out = static_cast<storage_t<P>*>(a.param_out);
  const std::size_t stride = grid_stride();
  std::size_t scalar_begin = 0;
  if (a.vector) {
    const std::size_t groups = a.n / 4;
    for (std::size_t q = thread_index(); q < groups; q += stride) {
      float p[4], g[4], m[4], v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4<DType::fp32>(a.master, q, p);
      load4<DType::fp32>(a.state1, q, m);
      if constexpr (kTwoStates) load4<DType::fp32>(a.state2, q, v);
      load4<G>(grad, q, g);
      if (a.zero_grad) {
        const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        store4<G>(const_cast<storage_t<G>*>(grad), q, zero);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) apply_rule<R>(p[k], g[k], m[k], v[k], s);
      store4<DType::fp32>(a.master, q, p);
      store4<DType::fp32>(a.state1, q, m);
      if constexpr (kTwoStates) store4<DType::fp32>(a.state2, q, v);
      if constexpr (Store) store4<P>(out, q, p);
    }
    scalar_begin = groups * 4;
  }
  for (std::size_t i = scalar_begin + thread_index(); i < a.n; i += stride) {
    float p = a.master[i];
    float m = a.state1[i];
    float v = 0.0f;
    if constexpr (kTwoStates) v = a.state2[i];
    const float gi = to_float<G>(grad[i]);
    if (a.zero_grad) const_cast<storage_t<G>*>(grad)[i] = storage_t<G>(0);
    apply_rule<R>(p, gi, m, v, s);
    a.master[i] = p;
    a.state1[i] = m;
    if constexpr (kTwoStates) a.state2[i] = v;
    if constexpr (Store) out[i] = from_float<P>(p);
  }
}

// ---- launch helpers -------------------------------------------------------------------------

// Grid for a grid-stride loop over `work` items: every SM filled with as many blocks as can be
// resident at once (`resident` for the whole device), never more than the work needs.
unsigned grid_for(std::size_t work, std::size_t resident) {
  const std::size_t needed = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<std::size_t>(1, std::min(needed, std::max<std::size_t>(resident, 1))));
}

constexpr int kCachedDevices = 64;

// Multiprocessors of `device`, asked once per device.
int sm_count_of(int device) {
  static std::array<std::atomic<int>, kCachedDevices> cache{};
  if (device < 0 || device >= kCachedDevices) return 1;
  int v = cache[static_cast<std::size_t>(device)].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
      (void)cudaGetLastError();
      v = 1;
    }
    cache[static_cast<std::size_t>(device)].store(v, std::memory_order_relaxed);
  }
  return v;
}

// The grid of `Kernel` over `work` items on the current device. How many blocks of kThreads fit
// on one SM depends on the kernel's registers (the fused updates use 36-40, so 6 blocks of 256
// threads fit on sm_90, not 8): the occupancy calculator says, once per kernel and device. A grid
// of exactly one full wave avoids a partial second wave.
template <auto Kernel>
unsigned grid_of(std::size_t work) {
  static std::array<std::atomic<int>, kCachedDevices> cache{};  // resident blocks per SM; 0: not asked
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kCachedDevices) {
    (void)cudaGetLastError();
    return grid_for(work, 1024);  // no device to ask: enough blocks for any current GPU
  }
  int per_sm = cache[static_cast<std::size_t>(device)].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0) != cudaSuccess || per_sm < 1) {
      (void)cudaGetLastError();
      per_sm = 1;
    }
    cache[static_cast<std::size_t>(device)].store(per_sm, std::memory_order_relaxed);
  }
  return grid_for(work, static_cast<std::size_t>(sm_count_of(device)) * static_cast<std::size_t>(per_sm));
}

void check_launch(const char* kernel, std::string_view doing) {
  check(cudaGetLastError(), kernel, doing);
}

bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <OptimizerKind R, DType G>
void launch_update_p(const UpdateKernelArgs& a, DType param_dtype, bool store, std::size_t work, cudaStream_t s) {
  if (!store) {
    constexpr auto k = fused_update_kernel<R, G, DType::fp32, false>;
    k<<<grid_of<k>(work), kThreads, 0, s>>>(a);
    return;
  }
  switch (param_dtype) {
    case DType::fp32: {
      constexpr auto k = fused_update_kernel<R, G, DType::fp32, true>;
      k<<<grid_of<k>(work), kThreads, 0, s>>>(a);
      break;
    }
    case DType::fp16: {
      constexpr auto k = fused_update_kernel<R, G, DType::fp16, true>;
      k<<<grid_of<k>(work), kThreads, 0, s>>>(a);
      break;
    }
    case DType::bf16: {
      constexpr auto k = fused_update_kernel<R, G, DType::bf16, true>;
      k<<<grid_of<k>(work), kThreads, 0, s>>>(a);
      break;
    }
  }
}

template <OptimizerKind R>
void launch_update_g(const UpdateKernelArgs& a, DType grad_dtype, DType param_dtype, bool store, std::size_t work,
                     cudaStream_t s) {
  switch (grad_dtype) {
    case DType::fp32: launch_update_p<R, DType::fp32>(a, param_dtype, store, work, s); break;
    case DType::fp16: launch_update_p<R, DType::fp16>(a, param_dtype, store, work, s); break;
    case DType::bf16: launch_update_p<R, DType::bf16>(a, param_dtype, store, work, s); break;
  }
}

template <DType T>
void launch_unscale(void* data, std::size_t n, const float* scale, float* found, cudaStream_t s) {
  constexpr auto k = unscale_check_kernel<T>;
  k<<<grid_of<k>(n), kThreads, 0, s>>>(static_cast<storage_t<T>*>(data), n, scale, found);
}

template <DType S>
void launch_cast_from(const void* src, void* dst, DType dst_dtype, std::size_t n, cudaStream_t s) {
  const auto* in = static_cast<const storage_t<S>*>(src);
  switch (dst_dtype) {
    case DType::fp32: {
      constexpr auto k = cast_kernel<S, DType::fp32>;
      k<<<grid_of<k>(n), kThreads, 0, s>>>(in, static_cast<float*>(dst), n);
      break;
    }
    case DType::fp16: {
      constexpr auto k = cast_kernel<S, DType::fp16>;
      k<<<grid_of<k>(n), kThreads, 0, s>>>(in, static_cast<std::uint16_t*>(dst), n);
      break;
    }
    case DType::bf16: {
      constexpr auto k = cast_kernel<S, DType::bf16>;
      k<<<grid_of<k>(n), kThreads, 0, s>>>(in, static_cast<std::uint16_t*>(dst), n);
      break;
    }
  }
}

std::string count_text(std::size_t n, DType t) {
  return std::to_string(n) + " " + std::string(name_of(t)) + " elements";
}

// Null or misaligned: an Error before anything is launched, never a misaligned-address fault
// that would poison the context (core/pointer_check.hpp).
using detail::require_elements;

// ---- the backend ----------------------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceGuard guard(device_);
    const std::string where = "setting up the CUDA backend on device " + std::to_string(device_);
    check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "cudaDeviceGetAttribute",
          where);
    int pools = 0;
    check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device_), "cudaDeviceGetAttribute",
          where);
    check(cudaStreamCreateWithFlags(&alloc_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags", where);
    if (pools != 0) {
      // A pool of our own, not the device's default one, so keeping freed memory cached (release
      // threshold = max) changes nothing for the trainer's allocations.
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.handleTypes = cudaMemHandleTypeNone;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device_;
      const cudaError_t st = cudaMemPoolCreate(&pool_, &props);
      if (st != cudaSuccess) {
        (void)cudaStreamDestroy(alloc_stream_);
        check(st, "cudaMemPoolCreate", where);
      }
      std::uint64_t keep = UINT64_MAX;
      (void)cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep);
      (void)cudaGetLastError();
    }
  }

  ~CudaBackend() override {
    DeviceGuard guard(device_, true);
    (void)cudaStreamSynchronize(alloc_stream_);
    // With allocations still outstanding, CUDA defers the pool's release until they are freed.
    if (pool_ != nullptr) (void)cudaMemPoolDestroy(pool_);
    (void)cudaStreamDestroy(alloc_stream_);
    (void)cudaGetLastError();
  }

  BackendKind kind() const noexcept override { return BackendKind::cuda; }
  bool host_accessible() const noexcept override { return false; }
  int device() const noexcept { return device_; }

  std::size_t stream_scratch_bytes() const noexcept override { return kMaxPartials * sizeof(double); }

  std::unique_ptr<Stream> create_stream(std::string name) override {
    DeviceGuard guard(device_);
    auto s = std::make_unique<CudaStream>(name, device_);
    s->set_partials(allocate(stream_scratch_bytes(), Place::device, Category::other,
                             "sum_squares partial sums of stream '" + name + "'"));
    return s;
  }

  std::unique_ptr<Event> create_event() override { return std::make_unique<CudaEvent>(device_); }

  void record(Event& event, Stream& stream) override {
    CudaEvent& e = cuda_event(event, "record");
    CudaStream& s = own(stream, "record");
    DeviceGuard guard(device_);
    check(cudaEventRecord(e.handle(), s.handle()), "cudaEventRecord", "recording an event on stream '" + s.name() + "'");
    e.set_slot(s.errors());
    e.set_capture(capture_mark(s.handle(), s.name()));
  }

  // While `stream` is being captured into a CUDA graph, an event recorded outside any capture
  // (by earlier, eager work: the previous step's "bucket free", say) is waited on as an external
  // event node: at each launch the graph waits for that event's last real record. A plain wait
  // would be an error (CUDA does not let a capture depend on uncaptured work). A wait on an event
  // recorded in a capture still going on makes `stream` join it. An event last recorded in a
  // capture that is over has no real record: the wait is skipped, and synchronize(event) waits for
  // the device (stream_wait, host_wait in cuda_internal.hpp).
  void wait(Stream& stream, Event& event) override {
    CudaEvent& e = cuda_event(event, "wait");
    CudaStream& s = own(stream, "wait");
    DeviceGuard guard(device_);
    stream_wait(s.handle(), s.name(), e.handle(), e.capture());
  }

  void synchronize(Event& event) override {
    CudaEvent& e = cuda_event(event, "synchronize");
    DeviceGuard guard(device_);
    host_wait(e.handle(), e.capture(), "waiting for an event");
    if (const auto slot = e.slot()) slot->rethrow_once();
  }

  bool capturing(Stream& stream) override {
    CudaStream& s = own(stream, "capturing");
    DeviceGuard guard(device_);
    return capture_id(s.handle(), s.name()) != 0;
  }

  void synchronize(Stream& stream) override {
    CudaStream& s = own(stream, "synchronize");
    DeviceGuard guard(device_);
    check(cudaStreamSynchronize(s.handle()), "cudaStreamSynchronize", "draining stream '" + s.name() + "'");
    s.errors()->rethrow_once();
  }

  void copy(void* dst, const void* src, std::size_t bytes, Stream& stream) override {
    CudaStream& s = own(stream, "copy");
    if (bytes == 0) return;
    require_elements(dst, bytes, 1, "copy", "dst");
    require_elements(src, bytes, 1, "copy", "src");
    DeviceGuard guard(device_);
    // cudaMemcpyDefault: unified addressing tells the direction from the pointers themselves.
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s.handle()), "cudaMemcpyAsync",
          "copying " + std::to_string(bytes) + " bytes on stream '" + s.name() + "'");
  }

  void host_task(Stream& stream, std::function<void()> fn) override {
    CudaStream& s = own(stream, "host_task");
    DeviceGuard guard(device_);
    auto task = std::make_unique<HostTask>(HostTask{std::move(fn), s.errors(), s.name()});
    check(cudaLaunchHostFunc(s.handle(), run_host_task, task.get()), "cudaLaunchHostFunc",
          "enqueueing a host task on stream '" + s.name() + "'");
    (void)task.release();  // run_host_task owns it now
  }

  void fill(void* dst, DType dtype, std::size_t n, float value, Stream& stream) override {
    CudaStream& s = own(stream, "fill");
    if (n == 0) return;
    require_elements(dst, n, dtype, "fill", "dst");
    DeviceGuard guard(device_);
    switch (dtype) {
      case DType::fp32:
        fill_kernel<DType::fp32><<<grid_of<fill_kernel<DType::fp32>>(n), kThreads, 0, s.handle()>>>(static_cast<float*>(dst), n, value);
        break;
      case DType::fp16:
        fill_kernel<DType::fp16><<<grid_of<fill_kernel<DType::fp16>>(n), kThreads, 0, s.handle()>>>(static_cast<std::uint16_t*>(dst), n,
                                                                     float_to_fp16(value));
        break;
      case DType::bf16:
        fill_kernel<DType::bf16><<<grid_of<fill_kernel<DType::bf16>>(n), kThreads, 0, s.handle()>>>(static_cast<std::uint16_t*>(dst), n,
                                                                     float_to_bf16(value));
        break;
    }
    check_launch("fill_kernel", "filling " + count_text(n, dtype) + " on stream '" + s.name() + "'");
  }

  void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n, Stream& stream) override {
    CudaStream& s = own(stream, "cast");
    if (n == 0) return;
    require_elements(src, n, src_dtype, "cast", "src");
    require_elements(dst, n, dst_dtype, "cast", "dst");
    if (src == dst && src_dtype != dst_dtype)
      throw Error(ErrorCode::invalid_argument, "cast from " + std::string(name_of(src_dtype)) + " to " +
                                                   std::string(name_of(dst_dtype)) +
                                                   ": src and dst are the same pointer, which needs equal dtypes");
    DeviceGuard guard(device_);
    const std::string doing = "casting " + count_text(n, src_dtype) + " to " + std::string(name_of(dst_dtype)) +
                              " on stream '" + s.name() + "'";
    if (src_dtype == dst_dtype) {
      // Same type: a bit copy (keeps NaN payloads exactly), nothing to do in place.
      if (src != dst)
        check(cudaMemcpyAsync(dst, src, n * size_of(src_dtype), cudaMemcpyDefault, s.handle()), "cudaMemcpyAsync",
              doing);
      return;
    }
    switch (src_dtype) {
      case DType::fp32: launch_cast_from<DType::fp32>(src, dst, dst_dtype, n, s.handle()); break;
      case DType::fp16: launch_cast_from<DType::fp16>(src, dst, dst_dtype, n, s.handle()); break;
      case DType::bf16: launch_cast_from<DType::bf16>(src, dst, dst_dtype, n, s.handle()); break;
    }
    check_launch("cast_kernel", doing);
  }

  void unscale_check(void* data, DType dtype, std::size_t n, const float* scale, float* found_nonfinite,
                     Stream& stream) override {
    CudaStream& s = own(stream, "unscale_check");
    if (n == 0) return;
    require_elements(data, n, dtype, "unscale_check", "data");
    require_elements(scale, 1, DType::fp32, "unscale_check", "scale");
    require_elements(found_nonfinite, 1, DType::fp32, "unscale_check", "found_nonfinite");
    DeviceGuard guard(device_);
    switch (dtype) {
      case DType::fp32: launch_unscale<DType::fp32>(data, n, scale, found_nonfinite, s.handle()); break;
      case DType::fp16: launch_unscale<DType::fp16>(data, n, scale, found_nonfinite, s.handle()); break;
      case DType::bf16: launch_unscale<DType::bf16>(data, n, scale, found_nonfinite, s.handle()); break;
    }
    check_launch("unscale_check_kernel", "unscaling " + count_text(n, dtype) + " on stream '" + s.name() + "'");
  }

  void sum_squares(const void* data, DType dtype, std::size_t n, float* out, Stream& stream) override {
    CudaStream& s = own(stream, "sum_squares");
    require_elements(data, n, dtype, "sum_squares", "data");
    require_elements(out, 1, DType::fp32, "sum_squares", "out");
    DeviceGuard guard(device_);
    const std::string doing = "summing squares of " + count_text(n, dtype) + " on stream '" + s.name() + "'";
    // The grid is a function of n alone (not of the SM count): that is what makes the result the
    // same on every GPU.
    const std::size_t blocks = std::min<std::size_t>((n + kThreads - 1) / kThreads, kMaxPartials);
    if (blocks > 0) {
      const auto grid = static_cast<unsigned>(blocks);
      switch (dtype) {
        case DType::fp32:
          sum_squares_partial_kernel<DType::fp32>
              <<<grid, kThreads, 0, s.handle()>>>(static_cast<const float*>(data), n, s.partials());
          break;
        case DType::fp16:
          sum_squares_partial_kernel<DType::fp16>
              <<<grid, kThreads, 0, s.handle()>>>(static_cast<const std::uint16_t*>(data), n, s.partials());
          break;
        case DType::bf16:
          sum_squares_partial_kernel<DType::bf16>
              <<<grid, kThreads, 0, s.handle()>>>(static_cast<const std::uint16_t*>(data), n, s.partials());
          break;
      }
      check_launch("sum_squares_partial_kernel", doing);
    }
    sum_squares_final_kernel<<<1, kThreads, 0, s.handle()>>>(s.partials(), static_cast<int>(blocks), out);
    check_launch("sum_squares_final_kernel", doing);
  }

  void accumulate(const void* src, DType src_dtype, float* dst, std::size_t n, Stream& stream) override {
    CudaStream& s = own(stream, "accumulate");
    if (n == 0) return;
    require_elements(src, n, src_dtype, "accumulate", "src");
    require_elements(dst, n, DType::fp32, "accumulate", "dst");
    DeviceGuard guard(device_);
    switch (src_dtype) {
      case DType::fp32:
        accumulate_kernel<DType::fp32><<<grid_of<accumulate_kernel<DType::fp32>>(n), kThreads, 0, s.handle()>>>(static_cast<const float*>(src), dst, n);
        break;
      case DType::fp16:
        accumulate_kernel<DType::fp16>
            <<<grid_of<accumulate_kernel<DType::fp16>>(n), kThreads, 0, s.handle()>>>(static_cast<const std::uint16_t*>(src), dst, n);
        break;
      case DType::bf16:
        accumulate_kernel<DType::bf16>
            <<<grid_of<accumulate_kernel<DType::bf16>>(n), kThreads, 0, s.handle()>>>(static_cast<const std::uint16_t*>(src), dst, n);
        break;
    }
    check_launch("accumulate_kernel", "accumulating " + count_text(n, src_dtype) + " into fp32 on stream '" +
                                          s.name() + "'");
  }

  void reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n, DType dtype,
              ReduceOp op, Stream& stream) override {
    CudaStream& s = own(stream, "reduce");
    if (std::string problem = comm::check_reduce(srcs, nsrc, dsts, ndst, n, dtype); !problem.empty())
      throw Error(ErrorCode::invalid_argument, problem);
    if (n == 0) return;
    ReduceKernelArgs a{};
    std::copy(srcs, srcs + nsrc, a.srcs);
    std::copy(dsts, dsts + ndst, a.dsts);
    a.nsrc = nsrc;
    a.ndst = ndst;
    a.n = n;
    a.op = op;
    DeviceGuard guard(device_);
    switch (dtype) {
      case DType::fp32: reduce_kernel<DType::fp32><<<grid_of<reduce_kernel<DType::fp32>>(n), kThreads, 0, s.handle()>>>(a); break;
      case DType::fp16: reduce_kernel<DType::fp16><<<grid_of<reduce_kernel<DType::fp16>>(n), kThreads, 0, s.handle()>>>(a); break;
      case DType::bf16: reduce_kernel<DType::bf16><<<grid_of<reduce_kernel<DType::bf16>>(n), kThreads, 0, s.handle()>>>(a); break;
    }
    check_launch("reduce_kernel", std::string("reducing (") + comm::op_name(op) + ") " + std::to_string(nsrc) +
                                      " sources of " + count_text(n, dtype) + " into " + std::to_string(ndst) +
                                      " destinations on stream '" + s.name() + "'");
  }

  void step_totals(const float* partials, std::size_t count, const float* flag, float* totals,
                   Stream& stream) override {
    CudaStream& s = own(stream, "step_totals");
    require_elements(partials, count, DType::fp32, "step_totals", "partials");
    require_elements(flag, 1, DType::fp32, "step_totals", "flag");
    require_elements(totals, 2, DType::fp32, "step_totals", "totals");
    DeviceGuard guard(device_);
    step_totals_kernel<<<1, 1, 0, s.handle()>>>(partials, count, flag, totals);
    check_launch("step_totals_kernel", "adding " + std::to_string(count) + " partial sums of squares on stream '" +
                                           s.name() + "'");
  }

  void step_control(const StepControlArgs& args, Stream& stream) override {
    CudaStream& s = own(stream, "step_control");
    detail::check_step_control(args);
    DeviceGuard guard(device_);
    step_control_kernel<<<1, 1, 0, s.handle()>>>(args);
    check_launch("step_control_kernel", "deciding the step for " + std::to_string(args.groups) +
                                            " parameter groups on stream '" + s.name() + "'");
  }

  void fused_update(const UpdateArgs& args, Stream& stream) override {
    CudaStream& s = own(stream, "fused_update");
    if (args.n == 0) return;
    if (state_count(args.rule) == 0)
      throw Error(ErrorCode::invalid_argument,
                  "fused_update: unknown rule " + std::to_string(static_cast<int>(args.rule)));
    const bool two = state_count(args.rule) == 2;
    require_elements(args.master, args.n, DType::fp32, "fused_update", "master");
    require_elements(args.state1, args.n, DType::fp32, "fused_update", "state1");
    if (two) require_elements(args.state2, args.n, DType::fp32, "fused_update", "state2");
    require_elements(args.grad, args.n, args.grad_dtype, "fused_update", "grad");
    if (args.param_out != nullptr)
      require_elements(args.param_out, args.n, args.param_dtype, "fused_update", "param_out");
    // An fp32 param_out that is the master itself needs no store (the documented in-place case).
    const bool store =
        args.param_out != nullptr && !(args.param_dtype == DType::fp32 && args.param_out == static_cast<void*>(args.master));
    if (store && args.param_out == static_cast<void*>(args.master))
      throw Error(ErrorCode::invalid_argument, "fused_update: param_out aliases master but is " +
                                                   std::string(name_of(args.param_dtype)) + ", not fp32");

    UpdateKernelArgs a{};
    a.scalars = args.scalars;
    a.scalars_ptr = args.scalars_ptr;
    a.master = args.master;
    a.state1 = args.state1;
    a.state2 = two ? args.state2 : nullptr;
    a.grad = args.grad;
    a.param_out = store ? args.param_out : nullptr;
    a.n = args.n;
    a.scale_ptr = args.scale_ptr;
    a.skip_ptr = args.skip_ptr;
    a.zero_grad = args.zero_grad;
    // 4-element groups: 16 bytes of each fp32 array, 4 elements of grad and param_out.
    a.vector = aligned(a.master, 16) && aligned(a.state1, 16) && (!two || aligned(a.state2, 16)) &&
               aligned(a.grad, 4 * size_of(args.grad_dtype)) &&
               (!store || aligned(a.param_out, 4 * size_of(args.param_dtype)));

    DeviceGuard guard(device_);
    const std::size_t work = a.vector ? (a.n + 3) / 4 : a.n;
    switch (args.rule) {
#define SHARDOPT_RULE_CUDA_UPDATE(id, Rule)                                                                   \
  case OptimizerKind::id:                                                                                    \
    launch_update_g<OptimizerKind::id>(a, args.grad_dtype, args.param_dtype, store, work, s.handle()); \
    break;
      SHARDOPT_RULES(SHARDOPT_RULE_CUDA_UPDATE)
#undef SHARDOPT_RULE_CUDA_UPDATE
    }
    check_launch("fused_update_kernel", "updating " + std::to_string(args.n) + " parameters with " +
                                            std::string(name_of(args.rule)) + " on stream '" + s.name() + "'");
  }

  void compressed_update(const CompressedUpdateArgs& args, Stream& stream) override {
    CudaStream& s = own(stream, "compressed_update");
    detail::check_compressed_update(args);
    if (args.n == 0) return;
    DeviceGuard guard(device_);
    launch_compressed_update(args, s.handle());
  }

 protected:
  void* raw_allocate(std::size_t bytes, Place place) override {
    void* p = nullptr;
    switch (place) {
      case Place::device: {
        DeviceGuard guard(device_);
        const std::string doing = "allocating " + std::to_string(bytes) + " bytes of device memory";
        const cudaError_t st = pool_ != nullptr ? cudaMallocFromPoolAsync(&p, bytes, pool_, alloc_stream_)
                                                : cudaMalloc(&p, bytes);
        // Too large (out of memory, or a size the pool rejects outright): Backend::allocate
        // reports it as out_of_memory, naming the buffer. Anything else is a CUDA failure.
        if (st == cudaErrorMemoryAllocation || st == cudaErrorInvalidValue) {
          (void)cudaGetLastError();
          return nullptr;
        }
        check(st, pool_ != nullptr ? "cudaMallocFromPoolAsync" : "cudaMalloc", doing);
        // Stream-ordered allocation: once the allocation stream has reached this point the memory
        // is usable from any stream, and the caller may hand it to any of them.
        if (pool_ != nullptr) check(cudaStreamSynchronize(alloc_stream_), "cudaStreamSynchronize", doing);
        return p;  // at least 256-byte aligned
      }
      case Place::pinned_host: {
        DeviceGuard guard(device_);
        // Portable: pinned for every CUDA context, so copies from any device's streams are async.
        const cudaError_t st = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
        if (st == cudaErrorMemoryAllocation) {
          (void)cudaGetLastError();
          return nullptr;
        }
        check(st, "cudaHostAlloc", "allocating " + std::to_string(bytes) + " bytes of pinned host memory");
        return p;  // page aligned
      }
      case Place::host: {
        const std::size_t rounded = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple
        return std::aligned_alloc(64, rounded);
      }
      case Place::disk: return nullptr;
    }
    return nullptr;
  }

  void raw_free(void* p, Place place) noexcept override {
    if (p == nullptr) return;
    switch (place) {
      case Place::device: {
        DeviceGuard guard(device_, true);
        // The caller has synchronized every use (Backend's contract), so the memory may go back to
        // the pool now; later allocations on the allocation stream are ordered after this free.
        if (pool_ != nullptr)
          (void)cudaFreeAsync(p, alloc_stream_);
        else
          (void)cudaFree(p);
        (void)cudaGetLastError();
        break;
      }
      case Place::pinned_host: {
        DeviceGuard guard(device_, true);
        (void)cudaFreeHost(p);
        (void)cudaGetLastError();
        break;
      }
      case Place::host: std::free(p); break;
      case Place::disk: break;
    }
  }

 private:
  CudaStream& own(Stream& stream, const char* op) {
    CudaStream& s = cuda_stream(stream, op);
    if (s.device() != device_)
      throw Error(ErrorCode::invalid_argument, std::string(op) + ": stream '" + s.name() + "' belongs to CUDA device " +
                                                   std::to_string(s.device()) + ", not to this backend's device " +
                                                   std::to_string(device_));
    return s;
  }

  int device_;
  int sm_count_ = 1;
  cudaStream_t alloc_stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;  // null where memory pools are unsupported: plain cudaMalloc
};

}  // namespace

int device_of(const Backend& backend, std::string_view what) {
  const auto* b = dynamic_cast<const CudaBackend*>(&backend);
  if (b == nullptr)
    throw Error(ErrorCode::invalid_argument,
                std::string(what) + ": the backend is " + std::string(name_of(backend.kind())) + ", not CUDA");
  return b->device();
}

void launch_divide_cast(const float* src, void* dst, DType dst_dtype, std::size_t n, float divisor,
                        cudaStream_t stream) {
  if (n == 0) return;
  switch (dst_dtype) {
    case DType::fp32:
      divide_cast_kernel<DType::fp32><<<grid_of<divide_cast_kernel<DType::fp32>>(n), kThreads, 0, stream>>>(src, static_cast<float*>(dst), n, divisor);
      break;
    case DType::fp16:
      divide_cast_kernel<DType::fp16><<<grid_of<divide_cast_kernel<DType::fp16>>(n), kThreads, 0, stream>>>(src, static_cast<std::uint16_t*>(dst), n, divisor);
      break;
    case DType::bf16:
      divide_cast_kernel<DType::bf16><<<grid_of<divide_cast_kernel<DType::bf16>>(n), kThreads, 0, stream>>>(src, static_cast<std::uint16_t*>(dst), n, divisor);
      break;
  }
  check_launch("divide_cast_kernel", "rounding " + std::to_string(n) + " fp32 reduction results to " +
                                         std::string(name_of(dst_dtype)));
}

}  // namespace shardopt::cuda_impl

namespace shardopt {

int cuda_device_count() noexcept {
  int count = 0;
  const cudaError_t st = cudaGetDeviceCount(&count);
  if (st != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

bool cuda_device_available() noexcept { return cuda_device_count() > 0; }

int cuda_device_of(const Backend& backend) { return cuda_impl::device_of(backend, "cuda_device_of"); }

void* cuda_stream_handle(Stream& stream) {
  return static_cast<void*>(cuda_impl::cuda_stream(stream, "cuda_stream_handle").handle());
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int count = 0;
  const cudaError_t st = cudaGetDeviceCount(&count);
  if (st != cudaSuccess) {
    (void)cudaGetLastError();
    throw Error(ErrorCode::unsupported, "no CUDA device " + std::to_string(device) + ": cudaGetDeviceCount says " +
                                            cudaGetErrorName(st) + " (" + cudaGetErrorString(st) + ")");
  }
  if (count == 0)
    throw Error(ErrorCode::unsupported, "no CUDA device " + std::to_string(device) + ": the system reports none");
  if (device < 0 || device >= count)
    throw Error(ErrorCode::invalid_argument, "CUDA device " + std::to_string(device) + " does not exist: this system has " +
                                                 std::to_string(count) + " (0.." + std::to_string(count - 1) + ")");
  return std::make_unique<cuda_impl::CudaBackend>(device);
}

}  // namespace shardopt
