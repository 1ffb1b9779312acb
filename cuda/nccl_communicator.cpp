// The NCCL communicator: the engine's collectives on GPU memory, enqueued on CUDA backend streams.
//
// NCCL reduces fp16/bf16 in their own 16-bit type, which loses the low bits of every partial sum.
// shardopt's contract is fp32 accumulation with one rounding, so sums and averages of 16-bit data
// go through an fp32 scratch buffer: cast up, reduce in fp32, divide (avg) and round once on the
// way back. `max` is exact in any type and runs natively. `avg` is always NCCL's sum followed by
// a division (ncclAvg would pre-multiply each input by 1/world, which is not the documented
// "divide the fp32 sum" for world sizes that are not powers of two).
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

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

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const NcclUniqueId& id, int rank, int world, Backend& backend)
      : backend_(backend), device_(device_of(backend, "make_nccl_communicator")), rank_(rank), world_(world) {
    const std::string who = "rank " + std::to_string(rank_) + " of " + std::to_string(world_);
    DeviceGuard guard(device_);
    ncclUniqueId uid;
    std::memcpy(&uid, id.bytes.data(), sizeof uid);
    check_nccl(ncclCommInitRank(&comm_, world_, uid, rank_), "ncclCommInitRank", "joining the NCCL group as " + who);
    try {
      check(cudaEventCreateWithFlags(&scratch_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags",
            "creating the NCCL scratch event of " + who);
      barrier_word_ = backend_.allocate(sizeof(float), Place::device, Category::communication,
                                        "NCCL barrier word of " + who);
    } catch (...) {
      if (scratch_free_ != nullptr) (void)cudaEventDestroy(scratch_free_);
      (void)ncclCommDestroy(comm_);
      throw;
    }
  }

  ~NcclCommunicator() override {
    DeviceGuard guard(device_, true);
    // The scratch buffer is freed after this body: its last user must be done with it.
    if (scratch_used_) (void)cudaEventSynchronize(scratch_free_);
    (void)cudaEventDestroy(scratch_free_);
    (void)ncclCommDestroy(comm_);  // finalizes first, waiting for the operations still queued
    (void)cudaGetLastError();
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return world_; }

  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DType dtype, ReduceOp op,
                      Stream& stream) override {
    const std::size_t total = static_cast<std::size_t>(world_) * recv_count;
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "reduce_scatter");
    count(CollectiveKind::reduce_scatter, total * size_of(dtype));
    DeviceGuard guard(device_);
    if (recv_count == 0) return barrier_locked(s);
    const std::string doing = "reduce-scattering " + std::to_string(recv_count) + " " + std::string(name_of(dtype)) +
                              " elements per rank on stream '" + s.name() + "'";
    if (needs_fp32(dtype, op)) {
      float* a = acquire_scratch(total, s);
      backend_.cast(send, dtype, a, DType::fp32, total, s);
      float* mine = a + static_cast<std::size_t>(rank_) * recv_count;
      // In place in the scratch: NCCL allows recvbuff == sendbuff + rank*recvcount.
      check_nccl(ncclReduceScatter(a, mine, recv_count, ncclFloat32, ncclSum, comm_, s.handle()),
                 "ncclReduceScatter", doing, comm_);
      launch_divide_cast(mine, recv, dtype, recv_count, divisor(op), s.handle());
      release_scratch(s);
      return;
    }
    check_nccl(ncclReduceScatter(send, recv, recv_count, nccl_type(dtype), nccl_op(op), comm_, s.handle()),
               "ncclReduceScatter", doing, comm_);
    finish_avg(recv, dtype, recv_count, op, s);
  }

  void all_gather(const void* send, void* recv, std::size_t send_count, DType dtype, Stream& stream) override {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "all_gather");
    count(CollectiveKind::all_gather, static_cast<std::size_t>(world_) * send_count * size_of(dtype));
    DeviceGuard guard(device_);
    if (send_count == 0) return barrier_locked(s);
    check_nccl(ncclAllGather(send, recv, send_count, nccl_type(dtype), comm_, s.handle()), "ncclAllGather",
               "all-gathering " + std::to_string(send_count) + " " + std::string(name_of(dtype)) +
                   " elements per rank on stream '" + s.name() + "'",
               comm_);
  }

  void all_reduce(const void* send, void* recv, std::size_t n, DType dtype, ReduceOp op, Stream& stream) override {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "all_reduce");
    count(CollectiveKind::all_reduce, 2 * n * size_of(dtype));
    DeviceGuard guard(device_);
    if (n == 0) return barrier_locked(s);
    const std::string doing = "all-reducing " + std::to_string(n) + " " + std::string(name_of(dtype)) +
                              " elements on stream '" + s.name() + "'";
    if (needs_fp32(dtype, op)) {
      float* a = acquire_scratch(n, s);
      backend_.cast(send, dtype, a, DType::fp32, n, s);
      check_nccl(ncclAllReduce(a, a, n, ncclFloat32, ncclSum, comm_, s.handle()), "ncclAllReduce", doing, comm_);
      launch_divide_cast(a, recv, dtype, n, divisor(op), s.handle());
      release_scratch(s);
      return;
    }
    check_nccl(ncclAllReduce(send, recv, n, nccl_type(dtype), nccl_op(op), comm_, s.handle()), "ncclAllReduce", doing,
               comm_);
    finish_avg(recv, dtype, n, op, s);
  }

  void broadcast(const void* send, void* recv, std::size_t n, DType dtype, int root, Stream& stream) override {
    if (root < 0 || root >= world_)
      throw Error(ErrorCode::invalid_argument,
                  "broadcast: root " + std::to_string(root) + " is not a rank of a group of " + std::to_string(world_));
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "broadcast");
    count(CollectiveKind::broadcast, n * size_of(dtype));
    DeviceGuard guard(device_);
    if (n == 0) return barrier_locked(s);
    // NCCL reads sendbuff only on the root; elsewhere send may be anything, even null.
    const void* src = rank_ == root ? send : recv;
    check_nccl(ncclBroadcast(src, recv, n, nccl_type(dtype), root, comm_, s.handle()), "ncclBroadcast",
               "broadcasting " + std::to_string(n) + " " + std::string(name_of(dtype)) + " elements from rank " +
                   std::to_string(root) + " on stream '" + s.name() + "'",
               comm_);
  }

  // A barrier on the stream, not on the host: work enqueued after it on `stream` runs once every
  // rank has reached it. Synchronize the stream to make the host wait too.
  void barrier(Stream& stream) override {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaStream& s = own(stream, "barrier");
    count(CollectiveKind::barrier, 0);
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
    check_nccl(ncclAllReduce(barrier_word_.data(), barrier_word_.data(), 1, ncclFloat32, ncclSum, comm_, s.handle()),
               "ncclAllReduce", "running a barrier on stream '" + s.name() + "'", comm_);
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
  // it on the device. Growing it frees the old buffer, so the host waits for its last user first
  // (rare: the scratch only grows, in steps of kScratchGranule elements).
  float* acquire_scratch(std::size_t elems, CudaStream& s) {
    if (scratch_used_)
      check(cudaStreamWaitEvent(s.handle(), scratch_free_, wait_flags(s.handle(), s.name(), scratch_capture_)),
            "cudaStreamWaitEvent", "ordering the NCCL fp32 scratch on stream '" + s.name() + "'");
    if (elems > scratch_elems_) {
      if (scratch_used_)
        check(cudaEventSynchronize(scratch_free_), "cudaEventSynchronize", "waiting to grow the NCCL fp32 scratch");
      const std::size_t grown = (elems + kScratchGranule - 1) / kScratchGranule * kScratchGranule;
      scratch_.reset();
      scratch_elems_ = 0;
      scratch_ = backend_.allocate(grown * sizeof(float), Place::device, Category::communication,
                                   "NCCL fp32 reduction scratch of rank " + std::to_string(rank_) + " (" +
                                       std::to_string(grown) + " elements)");
      scratch_elems_ = grown;
    }
    return scratch_.as<float>();
  }

  void release_scratch(CudaStream& s) {
    check(cudaEventRecord(scratch_free_, s.handle()), "cudaEventRecord",
          "marking the NCCL fp32 scratch free on stream '" + s.name() + "'");
    scratch_capture_ = capture_id(s.handle(), s.name());
    scratch_used_ = true;
  }

  Backend& backend_;
  int device_;
  int rank_;
  int world_;
  ncclComm_t comm_ = nullptr;
  std::mutex mutex_;  // NCCL communicators are not safe for concurrent calls; guards the scratch too
  Buffer barrier_word_;
  Buffer scratch_;
  std::size_t scratch_elems_ = 0;
  cudaEvent_t scratch_free_ = nullptr;  // recorded after the scratch's last use
  bool scratch_used_ = false;
  unsigned long long scratch_capture_ = 0;  // the capture its last record joined (0: none)
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
