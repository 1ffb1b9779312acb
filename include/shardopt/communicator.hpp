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

  CommStats stats() const;
  void reset_stats();

 protected:
  void count(CollectiveKind kind, std::uint64_t bytes);

 private:
  mutable std::mutex stats_mutex_;
  CommStats stats_;
};

// N ranks as threads of one process over host-addressable memory (the CPU backend).
// The group is shared by its communicators; create it once, then one communicator per rank,
// each bound to that rank's backend (whose streams run the collectives).
class InProcessGroup;
std::shared_ptr<InProcessGroup> make_in_process_group(int world_size);
std::unique_ptr<Communicator> make_in_process_communicator(std::shared_ptr<InProcessGroup> group,
                                                           int rank, Backend& backend);
// Fails every pending and future collective of the group with Error(communication) naming `why`
// (like ncclCommAbort). A rank that stops because of an error calls it so its peers, blocked in a
// collective it will never join, fail instead of waiting forever.
void abort_in_process_group(InProcessGroup& group, const std::string& why) noexcept;

}  // namespace shardopt
