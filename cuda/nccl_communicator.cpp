// The NCCL communicator: the engine's collectives on GPU memory, enqueued on CUDA backend streams.
//
// NCCL reduces fp16/bf16 in their own 16-bit type, which loses the low bits of every partial sum.
// shardopt's contract is fp32 accumulation with one rounding, so sums and averages of 16-bit data
// go through an fp32 scratch buffer: cast up, reduce in fp32, divide (avg) and round once on the
// way back. `max` is exact in any type and runs natively. `avg` is always NCCL's sum followed by
// a division (ncclAvg would pre-multiply each input by 1/world, which is not the documented
// "divide the fp32 sum" for world sizes that are not powers of two).
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/collective.hpp"
#include "cuda/cuda_internal.hpp"
#include "shardopt/cuda.hpp"

#if defined(SHARDOPT_HAS_NCCL)
#include <nccl.h>

namespace shardopt::cuda_impl {
namespace {

static_assert(sizeof(ncclUniqueId) == sizeof(NcclUniqueId::bytes), "NcclUniqueId must hold an ncclUniqueId");

void check_nccl(ncclResult_t r, const char* call, std::string_view doing, ncclComm_t comm = nullptr) {
  if (r == ncclSuccess) return;
  std::string message = std::string(call) + " failed while " + std::string(doing) + ": " + ncclGetErrorString(r);
  const char* detail = ncclGetLastError(comm);
  if (detail != nullptr && *detail != '\0') message += " (" + std::string(detail) + ")";
  throw Error(ErrorCode::communication, message);
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::fp32: return ncclFloat32;
    case DType::fp16: return ncclFloat16;
    case DType::bf16: return ncclBfloat16;
  }
  return ncclFloat32;
}

constexpr std::size_t kScratchGranule = std::size_t(1) << 20;  // elements; limits regrowth

using Clock = std::chrono::steady_clock;

// How long a rank waits for its group to form, for a collective to complete, or for NCCL to
// finish a call, before it aborts the communicator: SHARDOPT_NCCL_TIMEOUT seconds, default 300.
std::chrono::milliseconds nccl_timeout() {
  double seconds = 300.0;
  if (const char* v = std::getenv("SHARDOPT_NCCL_TIMEOUT")) {
    const double parsed = std::strtod(v, nullptr);
    if (parsed > 0.0) seconds = parsed;
  }
  return std::chrono::milliseconds(static_cast<long long>(seconds * 1000.0));
}

std::string seconds_text(std::chrono::milliseconds t) {
  return std::to_string(static_cast<double>(t.count()) / 1000.0).substr(0, 6) + " s";
}

class NcclCommunicator final : public comm::CommunicatorBase {
 public:
  // The communicator is nonblocking (ncclConfig_t::blocking = 0): NCCL calls return at once, and
  // shardopt polls ncclCommGetAsyncError with a deadline, so neither a peer that never joins nor
  // one that fails mid-run can hang this rank. A watchdog thread polls the communicator's
  // asynchronous error and the completion of the collectives in flight; on an error or a
  // collective past the timeout it aborts the communicator (ncclCommAbort, which also stops the
  // rank's stuck NCCL kernels, so stream synchronizations return) and the failure becomes an
  // Error(communication) at the next synchronize of the streams that ran collectives and at
  // every later call of this communicator. Peers detect the same (their collectives stop
  // completing) within the timeout: every rank gets an Error, none hangs.
  NcclCommunicator(const NcclUniqueId& id, int rank, int world, Backend& backend)
      : CommunicatorBase("NCCL rank"),
        backend_(backend),
        device_(device_of(backend, "make_nccl_communicator")), rank_(rank), world_(world),
        timeout_(nccl_timeout()) {
    const std::string who = "rank " + std::to_string(rank_) + " of " + std::to_string(world_);
    DeviceGuard guard(device_);
    ncclUniqueId uid;
    std::memcpy(&uid, id.bytes.data(), sizeof uid);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, world_, uid, rank_, &config);
    if (comm_ != nullptr) r = settle(r, Clock::now() + timeout_);
    if (r != ncclSuccess) {
      const char* detail = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
      if (comm_ != nullptr) (void)ncclCommAbort(comm_);
      comm_ = nullptr;
      if (r == ncclInProgress)
        throw Error(ErrorCode::communication,
                    "ncclCommInitRankConfig: the NCCL group did not form within " + seconds_text(timeout_) + " (" + who +
                        "): a peer never joined (did a rank fail before creating its communicator?); "
                        "SHARDOPT_NCCL_TIMEOUT sets the timeout");
      std::string message = std::string("ncclCommInitRankConfig failed while joining the NCCL group as ") + who + ": " +
                            ncclGetErrorString(r);
      if (detail != nullptr && *detail != '\0') message += " (" + std::string(detail) + ")";
      throw Error(ErrorCode::communication, message);
    }
    try {
      check(cudaEventCreateWithFlags(&scratch_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags",
            "creating the NCCL scratch event of " + who);
      barrier_word_ = backend_.allocate(sizeof(float), Place::device, Category::communication,
                                        "NCCL barrier word of " + who);
      watchdog_ = std::thread([this] { watch(); });
    } catch (...) {
      if (scratch_free_ != nullptr) (void)cudaEventDestroy(scratch_free_);
      (void)ncclCommAbort(comm_);
      throw;
    }
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(watch_mutex_);
      stop_ = true;
    }
    watch_wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    DeviceGuard guard(device_, true);
    // The scratch buffer is freed after this body: its last user must be done with it (for a
    // user inside a captured graph, every launch so far: host_wait waits for the device).
    if (scratch_used_ && !aborted_) {
      try {
        host_wait(scratch_free_, scratch_capture_, "releasing the NCCL fp32 scratch");
      } catch (...) {
        // a destructor reports nothing; the device error resurfaces at the next checked call
      }
    }
    (void)cudaEventDestroy(scratch_free_);
    for (const InFlight& f : in_flight_) (void)cudaEventDestroy(f.done);
    for (cudaEvent_t e : spare_events_) (void)cudaEventDestroy(e);
    if (!aborted_) {
      // Finalize (waits for the operations still queued) with a deadline: a peer that is gone
      // must not hang the destructor. Past it, or on failure, abort instead.
      ncclResult_t r = settle(ncclCommFinalize(comm_), Clock::now() + timeout_);
      if (r == ncclSuccess)
        (void)ncclCommDestroy(comm_);
      else
        (void)ncclCommAbort(comm_);
    }
    (void)cudaGetLastError();
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return world_; }

  // reduce_scatter_pieces packs its input into the scratch (as fp32 for 16-bit sums and averages,
  // else in its own dtype, which takes no more): the same size as reserve's.
  void reserve_pieces(std::size_t count, DType) override { reserve(count, DType::bf16); }

  // 16-bit sums and averages go through the fp32 scratch: size it now, outside any capture.
  void reserve(std::size_t count, DType dtype) override {
    if (dtype == DType::fp32 || count == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    require_alive("reserve");
    if (count > scratch_elems_ && scratch_in_graph_)
      throw Error(ErrorCode::invalid_state, "reserve: a captured CUDA graph uses the NCCL fp32 scratch of rank " +
                                                std::to_string(rank_) + "; it cannot grow to " + std::to_string(count) +
                                                " elements");
    DeviceGuard guard(device_);
    grow_scratch(count);
  }

 private:
  // The collectives, after CommunicatorBase packed and checked the call (and before it counts it).
  void run(const comm::Call& c, std::uint64_t, Stream& stream) override {
    switch (c.kind) {
      case CollectiveKind::reduce_scatter: return run_reduce_scatter(c, stream);
      case CollectiveKind::all_gather: return run_all_gather(c.send, c.recv, c.count, c.dtype, stream);
      case CollectiveKind::all_reduce: return run_all_reduce(c.send, c.recv, c.count, c.dtype, c.op, stream);
      case CollectiveKind::broadcast: return run_broadcast(c.send, c.recv, c.count, c.dtype, c.root, stream);
      case CollectiveKind::barrier: return run_barrier(stream);
    }
  }

  // reduce_scatter_pieces (c.piecewise): the pieces are packed into the scratch first (zero where no
  // piece lies), cast to fp32 on the way where the sum goes through fp32, then reduced as one input.
  void run_reduce_scatter(const comm::Call& c, Stream& stream) {
    const void* send = c.send;
    void* recv = c.recv;
    const std::size_t recv_count = c.count;
    const DType dtype = c.dtype;
    const ReduceOp op = c.op;
    const std::size_t total = static_cast<std::size_t>(world_) * recv_count;
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "reduce_scatter");
    require_alive("reduce_scatter");
    DeviceGuard guard(device_);
    if (recv_count == 0) return barrier_locked(s);
    const std::string doing = "reduce-scattering " + std::to_string(recv_count) + " " + std::string(name_of(dtype)) +
                              " elements per rank on stream '" + s.name() + "'";
    if (c.piecewise && !needs_fp32(dtype, op)) {
      const std::size_t es = size_of(dtype);
      auto* a = reinterpret_cast<unsigned char*>(acquire_scratch((total * es + 3) / 4, s));
      backend_.fill(a, dtype, total, 0.0f, s);
      for (std::size_t i = 0; i < c.npieces; ++i)
        backend_.copy(a + c.pieces[i].offset * es, c.pieces[i].data, c.pieces[i].count * es, s);
      issue(s, ncclReduceScatter(a, recv, recv_count, nccl_type(dtype), nccl_op(op), comm_, s.handle()),
            "ncclReduceScatter", doing);
      finish_avg(recv, dtype, recv_count, op, s);
      release_scratch(s);
      return;
    }
    if (needs_fp32(dtype, op)) {
      float* a = acquire_scratch(total, s);
      if (c.piecewise) {
        backend_.fill(a, DType::fp32, total, 0.0f, s);
        for (std::size_t i = 0; i < c.npieces; ++i)
          backend_.cast(c.pieces[i].data, dtype, a + c.pieces[i].offset, DType::fp32, c.pieces[i].count, s);
      } else {
        backend_.cast(send, dtype, a, DType::fp32, total, s);
      }
      float* mine = a + static_cast<std::size_t>(rank_) * recv_count;
      // In place in the scratch: NCCL allows recvbuff == sendbuff + rank*recvcount.
      issue(s, ncclReduceScatter(a, mine, recv_count, ncclFloat32, ncclSum, comm_, s.handle()),
                 "ncclReduceScatter", doing);
      launch_divide_cast(mine, recv, dtype, recv_count, divisor(op), s.handle());
      release_scratch(s);
      return;
    }
    issue(s, ncclReduceScatter(send, recv, recv_count, nccl_type(dtype), nccl_op(op), comm_, s.handle()),
               "ncclReduceScatter", doing);
    finish_avg(recv, dtype, recv_count, op, s);
  }

  void run_all_gather(const void* send, void* recv, std::size_t send_count, DType dtype, Stream& stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "all_gather");
    require_alive("all_gather");
    DeviceGuard guard(device_);
    if (send_count == 0) return barrier_locked(s);
    issue(s, ncclAllGather(send, recv, send_count, nccl_type(dtype), comm_, s.handle()), "ncclAllGather",
               "all-gathering " + std::to_string(send_count) + " " + std::string(name_of(dtype)) +
                   " elements per rank on stream '" + s.name() + "'");
  }

  void run_all_reduce(const void* send, void* recv, std::size_t n, DType dtype, ReduceOp op, Stream& stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "all_reduce");
    require_alive("all_reduce");
    DeviceGuard guard(device_);
    if (n == 0) return barrier_locked(s);
    const std::string doing = "all-reducing " + std::to_string(n) + " " + std::string(name_of(dtype)) +
                              " elements on stream '" + s.name() + "'";
    if (needs_fp32(dtype, op)) {
      float* a = acquire_scratch(n, s);
      backend_.cast(send, dtype, a, DType::fp32, n, s);
      issue(s, ncclAllReduce(a, a, n, ncclFloat32, ncclSum, comm_, s.handle()), "ncclAllReduce", doing);
      launch_divide_cast(a, recv, dtype, n, divisor(op), s.handle());
      release_scratch(s);
      return;
    }
    issue(s, ncclAllReduce(send, recv, n, nccl_type(dtype), nccl_op(op), comm_, s.handle()), "ncclAllReduce", doing);
    finish_avg(recv, dtype, n, op, s);
  }

  void run_broadcast(const void* send, void* recv, std::size_t n, DType dtype, int root, Stream& stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "broadcast");
    require_alive("broadcast");
    DeviceGuard guard(device_);
    if (n == 0) return barrier_locked(s);
    // NCCL reads sendbuff only on the root; elsewhere send may be anything, even null.
    const void* src = rank_ == root ? send : recv;
    issue(s, ncclBroadcast(src, recv, n, nccl_type(dtype), root, comm_, s.handle()), "ncclBroadcast",
               "broadcasting " + std::to_string(n) + " " + std::string(name_of(dtype)) + " elements from rank " +
                   std::to_string(root) + " on stream '" + s.name() + "'");
  }

  // A barrier on the stream, not on the host: work enqueued after it on `stream` runs once every
  // rank has reached it. Synchronize the stream to make the host wait too.
  void run_barrier(Stream& stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "barrier");
    require_alive("barrier");
    DeviceGuard guard(device_);
    barrier_locked(s);
  }

 private:
  CudaStream& own(Stream& stream, const char* op) {
    CudaStream& s = cuda_stream(stream, op);
    if (s.device() != device_)
      throw Error(ErrorCode::invalid_argument, std::string(op) + ": stream '" + s.name() + "' is on CUDA device " +
                                                   std::to_string(s.device()) + ", the communicator on device " +
                                                   std::to_string(device_));
    return s;
  }

  // A one-word all-reduce: completes on no rank before every rank has joined it. The word's
  // value is never read, so it needs no initialization.
  void barrier_locked(CudaStream& s) {
    issue(s, ncclAllReduce(barrier_word_.data(), barrier_word_.data(), 1, ncclFloat32, ncclSum, comm_, s.handle()),
               "ncclAllReduce", "running a barrier on stream '" + s.name() + "'");
  }

  // ---- failure detection (see the constructor) ----

  // Polls a nonblocking NCCL call that returned ncclInProgress until it completes, fails, or the
  // deadline passes (then ncclInProgress).
  ncclResult_t settle(ncclResult_t r, Clock::time_point deadline) {
    while (r == ncclInProgress) {
      if (Clock::now() > deadline) return ncclInProgress;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess) return ncclInternalError;
    }
    return r;
  }

  void require_alive(const char* op) const {
    if (aborted_)
      throw Error(ErrorCode::communication, std::string(op) + ": the NCCL communicator of rank " +
                                                std::to_string(rank_) + " was aborted: " + failure_);
  }

  // After enqueueing an NCCL call on `s`: waits for NCCL to accept it, turns a failure into an
  // abort and an Error, and hands the collective to the watchdog (not inside a capture: a captured
  // collective runs at graph launches, which the watchdog cannot see).
  void issue(CudaStream& s, ncclResult_t r, const char* call, std::string_view doing) {
    r = settle(r, Clock::now() + timeout_);
    if (r != ncclSuccess) {
      std::string message = std::string(call) + " failed while " + std::string(doing) + " on rank " +
                            std::to_string(rank_) + ": ";
      if (r == ncclInProgress) {
        message += "NCCL did not accept it within " + seconds_text(timeout_);
      } else {
        message += ncclGetErrorString(r);
        const char* detail = ncclGetLastError(comm_);
        if (detail != nullptr && *detail != '\0') message += " (" + std::string(detail) + ")";
      }
      // The peers would wait forever for this rank's share: abort, so they fail too.
      fail_locked(message);
      throw Error(ErrorCode::communication, message);
    }
    if (capture_id(s.handle(), s.name()) != 0) return;
    cudaEvent_t done = nullptr;
    if (!spare_events_.empty()) {
      done = spare_events_.back();
      spare_events_.pop_back();
    } else if (cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess) {
      (void)cudaGetLastError();
      return;  // unwatched, not wrong
    }
    if (cudaEventRecord(done, s.handle()) != cudaSuccess) {
      (void)cudaGetLastError();
      spare_events_.push_back(done);
      return;
    }
    in_flight_.push_back(InFlight{done, Clock::now(), std::string(call) + " (" + std::string(doing) + ")"});
    bool known = false;
    for (const auto& w : slots_) known |= w.lock() == s.errors();
    if (!known) slots_.push_back(s.errors());
  }

  // Aborts the communicator (ncclCommAbort stops this rank's NCCL kernels too, so waits on its
  // streams return) and leaves the Error where every later use of the rank finds it: the error
  // slots of the streams that ran collectives (rethrown by their next synchronize) and
  // require_alive. Caller holds mutex_.
  void fail_locked(const std::string& why) {
    if (aborted_) return;
    aborted_ = true;
    failure_ = why;
    (void)ncclCommAbort(comm_);
    const auto error = std::make_exception_ptr(Error(ErrorCode::communication, why));
    for (const auto& w : slots_)
      if (const auto slot = w.lock()) slot->set_once(error);
    for (const InFlight& f : in_flight_) spare_events_.push_back(f.done);
    in_flight_.clear();
  }

  void watch() {
    std::unique_lock<std::mutex> wl(watch_mutex_);
    while (!stop_) {
      watch_wake_.wait_for(wl, std::chrono::milliseconds(20));
      if (stop_) break;
      wl.unlock();
      poll_once();
      wl.lock();
    }
  }

  void poll_once() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    DeviceGuard guard(device_, true);
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
      std::string message = "NCCL reported an asynchronous error on rank " + std::to_string(rank_) + ": " +
                            ncclGetErrorString(async);
      const char* detail = ncclGetLastError(comm_);
      if (detail != nullptr && *detail != '\0') message += " (" + std::string(detail) + ")";
      fail_locked(message);
      return;
    }
    while (!in_flight_.empty()) {
      const InFlight& f = in_flight_.front();
      const cudaError_t q = cudaEventQuery(f.done);
      if (q == cudaErrorNotReady) {
        if (Clock::now() - f.issued > timeout_)
          fail_locked(f.what + " did not complete within " + seconds_text(timeout_) + " on rank " +
                      std::to_string(rank_) + ": a peer failed or stopped (SHARDOPT_NCCL_TIMEOUT sets the timeout)");
        return;
      }
      // Done (or a CUDA error, which the stream's own checks report): no longer watched.
      (void)cudaGetLastError();
      spare_events_.push_back(f.done);
      in_flight_.pop_front();
    }
  }

  static bool needs_fp32(DType t, ReduceOp op) { return t != DType::fp32 && op != ReduceOp::max; }
  static ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::max ? ncclMax : ncclSum; }
  float divisor(ReduceOp op) const { return op == ReduceOp::avg ? static_cast<float>(world_) : 1.0f; }

  // fp32 avg: NCCL summed into recv; divide there, in place. Dividing by 1 is the identity.
  void finish_avg(void* recv, DType dtype, std::size_t n, ReduceOp op, CudaStream& s) {
    if (op != ReduceOp::avg || world_ == 1) return;
    launch_divide_cast(static_cast<const float*>(recv), recv, dtype, n, divisor(op), s.handle());
  }

  // The scratch may be in use by a collective enqueued on another stream: the new user waits for
  // it on the device. Growing it frees the old buffer, so the host waits for its last user first.
  // reserve() (Engine::initialize) sizes it for every reduction the engine will issue, so it does
  // not grow later. It never grows inside a capture (no allocation or host wait is possible
  // there), nor once a captured graph uses it (the graph keeps its address): an Error instead.
  float* acquire_scratch(std::size_t elems, CudaStream& s) {
    if (scratch_used_) stream_wait(s.handle(), s.name(), scratch_free_, scratch_capture_);
    if (elems > scratch_elems_) {
      const std::string need = std::to_string(elems) + " elements of fp32 reduction scratch (" +
                               std::to_string(scratch_elems_) + " reserved) on rank " + std::to_string(rank_);
      if (capture_id(s.handle(), s.name()) != 0)
        throw Error(ErrorCode::invalid_state,
                    "a 16-bit NCCL reduction inside a CUDA-graph capture needs " + need +
                        ": reserve() it before the capture (Engine::initialize does, for the engine's reductions)");
      if (scratch_in_graph_)
        throw Error(ErrorCode::invalid_state,
                    "a 16-bit NCCL reduction needs " + need +
                        ", but a captured CUDA graph uses the scratch and it cannot move: reserve() it before capturing");
      grow_scratch(elems);
    }
    return scratch_.as<float>();
  }

  void grow_scratch(std::size_t elems) {
    if (elems <= scratch_elems_) return;
    if (scratch_used_) host_wait(scratch_free_, scratch_capture_, "waiting to grow the NCCL fp32 scratch");
    const std::size_t grown = (elems + kScratchGranule - 1) / kScratchGranule * kScratchGranule;
    scratch_.reset();
    scratch_elems_ = 0;
    scratch_ = backend_.allocate(grown * sizeof(float), Place::device, Category::communication,
                                 "NCCL fp32 reduction scratch of rank " + std::to_string(rank_) + " (" +
                                     std::to_string(grown) + " elements)");
    scratch_elems_ = grown;
  }

  void release_scratch(CudaStream& s) {
    check(cudaEventRecord(scratch_free_, s.handle()), "cudaEventRecord",
          "marking the NCCL fp32 scratch free on stream '" + s.name() + "'");
    scratch_capture_ = capture_mark(s.handle(), s.name());
    if (scratch_capture_.id != 0) scratch_in_graph_ = true;
    scratch_used_ = true;
  }

  struct InFlight {
    cudaEvent_t done;      // recorded right after the collective
    Clock::time_point issued;
    std::string what;
  };

  Backend& backend_;
  int device_;
  int rank_;
  int world_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  // Failure detection; guarded by mutex_ (the watchdog takes it too).
  bool aborted_ = false;
  std::string failure_;
  std::deque<InFlight> in_flight_;
  std::vector<cudaEvent_t> spare_events_;
  std::vector<std::weak_ptr<ErrorSlot>> slots_;  // of the streams that ran collectives
  std::thread watchdog_;
  std::mutex watch_mutex_;
  std::condition_variable watch_wake_;
  bool stop_ = false;  // guarded by watch_mutex_
  std::mutex mutex_;  // NCCL communicators are not safe for concurrent calls; guards the scratch too
  Buffer barrier_word_;
  Buffer scratch_;
  std::size_t scratch_elems_ = 0;
  cudaEvent_t scratch_free_ = nullptr;  // recorded after the scratch's last use
  bool scratch_used_ = false;
  bool scratch_in_graph_ = false;  // a capture has used the scratch: it may never move again
  CaptureMark scratch_capture_;  // the capture its last record joined (id 0: none)
};

}  // namespace
}  // namespace shardopt::cuda_impl

namespace shardopt {

NcclUniqueId nccl_unique_id() {
  ncclUniqueId uid;
  cuda_impl::check_nccl(ncclGetUniqueId(&uid), "ncclGetUniqueId", "creating an NCCL unique id");
  NcclUniqueId id;
  std::memcpy(id.bytes.data(), &uid, sizeof uid);
  return id;
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueId& id, int rank, int world,
                                                     Backend& cuda_backend) {
  if (world < 1)
    throw Error(ErrorCode::invalid_argument, "make_nccl_communicator: world size " + std::to_string(world) + " < 1");
  if (rank < 0 || rank >= world)
    throw Error(ErrorCode::invalid_argument, "make_nccl_communicator: rank " + std::to_string(rank) +
                                                 " is outside 0.." + std::to_string(world - 1));
  return std::make_unique<cuda_impl::NcclCommunicator>(id, rank, world, cuda_backend);
}

}  // namespace shardopt

#else  // no NCCL in this build

namespace shardopt {

NcclUniqueId nccl_unique_id() {
  throw Error(ErrorCode::unsupported, "nccl_unique_id: shardopt was built without NCCL (nccl.h/libnccl not found)");
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueId&, int rank, int, Backend&) {
  throw Error(ErrorCode::unsupported, "NCCL communicator for rank " + std::to_string(rank) +
                                          ": shardopt was built without NCCL (nccl.h/libnccl not found)");
}

}  // namespace shardopt
#endif
