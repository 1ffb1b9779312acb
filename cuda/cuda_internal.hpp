#pragma once
// Internals of the CUDA backend shared by cuda_backend.cu, nccl_communicator.cpp and the GPU
// benchmark. Host code only (plain C++ can include it); the kernels live in cuda_backend.cu.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <exception>
#include <memory>
#include <source_location>
#include <mutex>
#include <string>
#include <string_view>

#include "shardopt/backend.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace shardopt::cuda_impl {

// Enqueues Backend::compressed_update's kernel on `stream` (compressed_update.cu). The arguments
// have been checked (detail::check_compressed_update) and n > 0; the caller has made the device
// current. Throws Error if the launch fails.
void launch_compressed_update(const CompressedUpdateArgs& args, cudaStream_t stream);

// Throws Error(code) naming the CUDA call, CUDA's error string and what was being done, unless
// `status` is cudaSuccess. Also clears CUDA's last-error slot so a non-sticky error does not
// resurface in an unrelated later check.
void check(cudaError_t status, const char* call, std::string_view doing,
           ErrorCode code = ErrorCode::internal,
           std::source_location where = std::source_location::current());

// Makes `device` current for the lifetime of the guard and restores the caller's device after, so
// the backend can be driven from any host thread without disturbing the trainer's own setting.
// Throws Error if the device cannot be made current, unless `nothrow` (for destructors).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device, bool nothrow = false);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_ = -1;
};

// Where a host_task's exception waits for the next synchronize. Shared with the events recorded
// on the stream so synchronize(event) can report it even after the stream is gone.
struct ErrorSlot {
  std::mutex mutex;
  std::exception_ptr error;
  void set_once(std::exception_ptr e);
  void rethrow_once();
};

class CudaStream final : public Stream {
 public:
  CudaStream(std::string name, int device);
  ~CudaStream() override;
  const std::string& name() const noexcept override { return name_; }
  int device() const noexcept { return device_; }
  cudaStream_t handle() const noexcept { return stream_; }
  const std::shared_ptr<ErrorSlot>& errors() const noexcept { return errors_; }
  // Scratch for the per-block partial sums of sum_squares: owned by the stream so that concurrent
  // sum_squares on different streams never share it, and work on one stream is ordered.
  double* partials() const noexcept { return partials_.as<double>(); }
  void set_partials(Buffer b) noexcept { partials_ = std::move(b); }

 private:
  std::string name_;
  int device_;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<ErrorSlot> errors_;
  Buffer partials_;
};

// The cudaStream_t behind a Stream of a CUDA backend; Error(invalid_argument) naming the stream
// if it belongs to another backend.
CudaStream& cuda_stream(Stream& stream, std::string_view what);

// CUDA graph capture. capture_id: the id of the capture `stream` is part of, 0 if it is not being
// captured.
unsigned long long capture_id(cudaStream_t stream, std::string_view name);

// Where an event's last record went: the capture it joined (id 0: outside any capture) and the
// stream it was recorded on, whose capture status tells whether that capture is still going on.
struct CaptureMark {
  unsigned long long id = 0;
  cudaStream_t origin = nullptr;
};
CaptureMark capture_mark(cudaStream_t recorded_on, std::string_view name);

// Waits on an event whose last record is `recorded`:
//   recorded outside any capture: cudaStreamWaitEvent; while `stream` is being captured the wait
//     is an external event node (cudaEventWaitExternal): at each launch the graph waits for the
//     event's last real record (a capture may not depend on uncaptured work otherwise);
//   recorded in a capture still going on: a plain wait, which makes `stream` join that capture
//     (CUDA's fork/join: the engine's side stream joins a capture begun on compute_stream());
//   recorded in a capture that is over: CUDA keeps no real record of it, so the wait is skipped.
//     The work it marked runs inside graph launches, and the engine makes every stream that later
//     uses such an event join the stream graphs are launched on (compute_stream()) first.
// host_wait: cudaEventSynchronize, or for an event recorded in a capture, a wait for the whole
// device (every graph launched so far). Neither may be called from a thread that is capturing,
// except stream_wait on a stream that is or joins that capture.
void stream_wait(cudaStream_t stream, std::string_view name, cudaEvent_t event, const CaptureMark& recorded);
void host_wait(cudaEvent_t event, const CaptureMark& recorded, std::string_view doing);

// The device ordinal of a CUDA backend; Error(invalid_argument) if `backend` is not one.
int device_of(const Backend& backend, std::string_view what);

// dst[i] = round_to(dst_dtype, src[i] / divisor) for i < n (divisor 1: a plain rounding cast).
// dst may equal src when dst_dtype is fp32. Used by the NCCL communicator to finish fp32
// reductions. Enqueued on `stream`; the caller has made the right device current.
void launch_divide_cast(const float* src, void* dst, DType dst_dtype, std::size_t n, float divisor,
                        cudaStream_t stream);

}  // namespace shardopt::cuda_impl
