#pragma once
// The CUDA backend and the NCCL communicator.
//
// This header never includes CUDA headers, so a trainer can use it from plain C++ code. The
// functions here are the CUDA component: link shardopt::cuda (find_package(shardopt COMPONENTS
// cuda)) to use them; the core library, shardopt::shardopt, links no CUDA. In a build without
// CUDA (or without NCCL, for the communicator) they throw Error(unsupported) instead, and
// cuda_device_available() is false; such a build installs no cuda component.
//
// CUDA backend. `device` memory is allocated from a stream-ordered pool private to the backend
// (freed memory stays cached there until the backend is destroyed), `pinned_host` with
// cudaHostAlloc, `host` with an aligned malloc. Streams are non-blocking cudaStream_t, events are
// cudaEvent_t with timing disabled. Kernels read their pointer arguments on the device, so they
// take device memory (or pinned host memory, which the device can address). Every call sets the
// backend's device as current for its duration and restores the caller's afterwards. A function
// given to host_task runs on a CUDA driver thread and must not call CUDA; an Error it throws is
// rethrown by the next synchronize of that stream (or of an event recorded after it).
#include <array>
#include <memory>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"

namespace shardopt {

// True if this build has the CUDA backend and at least one CUDA device is usable. Never throws.
bool cuda_device_available() noexcept;
// How many CUDA devices this process can use (0 in a build without CUDA). Never throws.
int cuda_device_count() noexcept;

// The CUDA backend on device `device`. Throws Error(unsupported) if the library was built without
// CUDA or no CUDA device exists, Error(invalid_argument) if `device` is not a valid ordinal.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// The device ordinal of a CUDA backend. Throws Error(invalid_argument) if `backend` is not a
// CUDA backend (Error(unsupported) in a build without CUDA).
int cuda_device_of(const Backend& backend);

// The cudaStream_t behind a stream of a CUDA backend, as void* (cast it back), so a trainer can
// launch its own kernels on, say, Engine::compute_stream(), or capture a step into a CUDA graph.
// The stream stays owned by the backend. Throws Error(invalid_argument) if `stream` is not a CUDA
// backend's (Error(unsupported) in a build without CUDA).
void* cuda_stream_handle(Stream& stream);

// The opaque bootstrap token of an NCCL group: created by one rank, sent to all the others (over
// MPI, a file, a socket) and passed to make_nccl_communicator on each.
struct NcclUniqueId {
  std::array<char, 128> bytes{};
};

// A fresh unique id (ncclGetUniqueId). Throws Error(unsupported) without NCCL,
// Error(communication) if NCCL fails.
NcclUniqueId nccl_unique_id();

// Joins rank `rank` of `world` ranks to the NCCL group named by `id`. Blocks until every rank has
// joined (call it from each rank's own thread or process). `cuda_backend` must be a CUDA backend;
// the communicator uses its device and its streams, and must be destroyed before it.
// Collectives are enqueued on the stream passed to each call. Sums and averages of fp16/bf16 are
// upcast into an fp32 scratch buffer, reduced in fp32 and rounded once (NCCL would otherwise
// accumulate in 16 bits); `avg` divides the fp32 sum by the world size. The summation order is
// NCCL's (fixed for a given topology and NCCL version), not rank order.
// Failures never hang a rank. Joining waits at most SHARDOPT_NCCL_TIMEOUT seconds (default 300)
// for the other ranks (a rank that fails before joining makes the others throw). A watchdog
// thread polls NCCL's asynchronous error and the collectives in flight; on an error, or a
// collective not complete after the timeout (a peer died or stopped), it aborts the communicator
// (ncclCommAbort, which stops this rank's NCCL kernels) and the failure is an Error(communication)
// thrown by the next synchronize of every stream that ran a collective and by every later call of
// the communicator. Collectives enqueued inside a CUDA-graph capture are not watched.
// 16-bit sums and averages need an fp32 scratch of their full count: reserve() it before a
// CUDA-graph capture (Engine::initialize does); inside a capture, or once a captured graph uses
// it, it cannot grow (Error(invalid_state)).
// Throws Error(unsupported) without NCCL, Error(invalid_argument) for a bad rank/world or a
// backend that is not CUDA, Error(communication) if NCCL fails or the group does not form in time.
std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueId& id, int rank, int world,
                                                     Backend& cuda_backend);

}  // namespace shardopt
