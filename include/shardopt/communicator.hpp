#pragma once
// Communicator: the collectives the engine needs, each enqueued on a stream of the rank's backend.
//
// Counts are elements of `dtype`. Sums of fp16/bf16 inputs accumulate in fp32 and round once;
// `avg` divides the fp32 sum by the world size before that rounding. Results are deterministic:
// every rank reduces in rank order 0..size-1, so equal inputs give equal bits on every call.
// Counts of 0 are valid and do nothing but still synchronize the ranks.
//
// In-place rules: reduce_scatter allows recv == send + rank*recv_count; all_gather allows
// send == recv + rank*send_count; all_reduce and broadcast allow send == recv.
// Every rank must issue the same collectives in the same order (as with MPI and NCCL).
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "shardopt/dtype.hpp"

namespace shardopt {

class Backend;
class Stream;

enum class ReduceOp : std::uint8_t { sum, avg, max };

enum class CollectiveKind : std::uint8_t { reduce_scatter, all_gather, all_reduce, broadcast, barrier };
inline constexpr int kCollectiveKindCount = 5;
std::string_view name_of(CollectiveKind k) noexcept;

// Per kind: number of calls and the data volume in the ZeRO accounting (bytes of the full
// buffer each call moves: reduce_scatter and all_gather count size*count elements, all_reduce 2x
// its count, broadcast its count). Counted at enqueue time, thread-safe.
struct CommStats {
  std::array<std::uint64_t, kCollectiveKindCount> calls{};
  std::array<std::uint64_t, kCollectiveKindCount> bytes{};
  std::uint64_t total_bytes() const noexcept;
};

// One run of a reduce_scatter input that does not lie in one buffer (reduce_scatter_pieces):
// elements [offset, offset + count) of the size() * recv_count input elements are at `data`.
struct SendPiece {
  std::size_t offset = 0;
  std::size_t count = 0;
  const void* data = nullptr;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;

  // send holds size()*recv_count elements; rank r receives the reduction of block r.
  virtual void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DType dtype,
                              ReduceOp op, Stream& stream) = 0;
  // recv holds size()*send_count elements; block r comes from rank r.
  virtual void all_gather(const void* send, void* recv, std::size_t send_count, DType dtype,
                          Stream& stream) = 0;
  virtual void all_reduce(const void* send, void* recv, std::size_t count, DType dtype,
                          ReduceOp op, Stream& stream) = 0;
  // root's send is copied into every rank's recv (root's recv too; send is ignored elsewhere).
  virtual void broadcast(const void* send, void* recv, std::size_t count, DType dtype, int root,
                         Stream& stream) = 0;
  virtual void barrier(Stream& stream) = 0;
  // reduce_scatter of an input that lies in pieces at separate addresses (a trainer's per-tensor
  // gradient arrays, say) instead of one buffer; the elements no piece covers are zero. The
  // pieces are in ascending order of offset, do not overlap, have elements, and lie inside
  // size() * recv_count; every rank passes the same offsets and counts (with its own addresses).
  // recv must not overlap a piece. `pieces` and what they point to must stay valid and unchanged
  // until the collective has run in stream order. The result is reduce_scatter's of the same
  // input packed into one buffer, bit for bit. The in-process communicator reads every piece where
  // it is; the MPI, TCP and NCCL communicators pack them first (into their own scratch, in stream
  // order: for NCCL one padded input of device memory, see reserve_pieces). Default:
  // Error(unsupported).
  virtual void reduce_scatter_pieces(const SendPiece* pieces, std::size_t npieces, void* recv,
                                     std::size_t recv_count, DType dtype, ReduceOp op, Stream& stream);

  // Prepares for sum/avg reductions (reduce_scatter's full count, all_reduce's count) of up to
  // `count` elements of `dtype`, so that none of them allocates memory later: a communicator that
  // reduces through scratch memory (NCCL's fp32 accumulation of 16-bit data) allocates it here.
  // Engine::initialize() calls it with the largest reduction the engine issues. It matters for a
  // CUDA-graph capture, inside which nothing can be allocated, and after which the graph keeps
  // the scratch's address (so it never moves once captured). Calls with smaller counts are
  // no-ops. Not thread-safe against collectives in flight on the host. Default: nothing to do.
  virtual void reserve(std::size_t /*count*/, DType /*dtype*/) {}
  // The same for reduce_scatter_pieces of up to `count` input elements: a communicator that packs
  // the pieces into scratch memory allocates it here. Default: nothing to do.
  virtual void reserve_pieces(std::size_t /*count*/, DType /*dtype*/) {}

  CommStats stats() const;
  void reset_stats();

 protected:
  void count(CollectiveKind kind, std::uint64_t bytes);

 private:
  mutable std::mutex stats_mutex_;
  CommStats stats_;
};

// N ranks as threads of one process, each with its own backend. The group is shared by its
// communicators; create it once, then one communicator per rank, bound to that rank's backend
// (whose streams run the collectives). Every rank of a group uses the same transport:
//
//   host_tasks       each collective is a host task on the rank's stream that, once every rank
//                    has reached it, reads and writes the peers' buffers directly. Host memory
//                    only (the CPU backend).
//   backend_kernels  each collective is made of the backend's own copy and reduce kernels on the
//                    rank's stream, ordered against the peers' streams with events: the rank waits
//                    for the peers' inputs, computes its share, and does not go on until the peers
//                    are done with its buffers. Nothing runs on the host in stream order, so it
//                    serves device memory: several ranks on one GPU (CUDA backends on the same
//                    device; NCCL refuses two ranks on one device). At most
//                    Backend::kMaxReduceOperands ranks. The issuing thread blocks in each call
//                    until every rank has issued it (a rendezvous at enqueue time, not a device
//                    synchronization), so each rank must be driven by its own thread.
//   automatic        host_tasks for CPU backends, backend_kernels for CUDA backends.
//
// Both transports reduce in rank order with the same arithmetic, so they give the same bits.
// Failures of the group (a peer's refused argument, ranks that disagree on a collective, an abort)
// reach a rank through the next synchronize of its stream with host_tasks, and are thrown by the
// collective call itself with backend_kernels, which meets the peers when the call is issued. A
// stream that failed earlier on one rank skips that rank's collective with host_tasks (its peers
// then fail instead of waiting); with backend_kernels only that rank's share is lost and the
// error is that rank's alone, as with NCCL.
enum class InProcessTransport : std::uint8_t { automatic, host_tasks, backend_kernels };
std::string_view name_of(InProcessTransport t) noexcept;

// No wait of the group is unbounded: a rank that waits longer than `timeout` for its peers to
// reach a collective aborts the group, and every rank gets Error(communication) naming the
// collective (#sequence, kind, count) and the ranks that did not arrive. A rank whose
// communicator is destroyed leaves the group: the collectives it issued before still complete,
// and any later one fails on every peer at once, naming it (a communicator created again for
// that rank before then rejoins where it left off).
inline constexpr std::chrono::milliseconds kDefaultCollectiveTimeout{std::chrono::minutes(10)};

class InProcessGroup;
std::shared_ptr<InProcessGroup> make_in_process_group(
    int world_size, InProcessTransport transport = InProcessTransport::automatic,
    std::chrono::milliseconds timeout = kDefaultCollectiveTimeout);
std::unique_ptr<Communicator> make_in_process_communicator(std::shared_ptr<InProcessGroup> group,
                                                           int rank, Backend& backend);
// Fails every pending and future collective of the group with Error(communication) naming `why`
// (like ncclCommAbort). A rank that stops because of an error calls it so its peers, blocked in a
// collective it will never join, fail instead of waiting forever.
void abort_in_process_group(InProcessGroup& group, const std::string& why) noexcept;

}  // namespace shardopt
