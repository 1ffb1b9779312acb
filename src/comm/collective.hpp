#pragma once
// What the communicators share (internal): the description of one collective call, the argument
// checks, the ZeRO volume accounting, the base class that packs the five collectives into one call
// with a sequence number, checks it and counts it (every communicator: in-process, MPI, NCCL), and
// the rank-order reduction whose bits the host-memory ones (in-process and MPI) must produce.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "shardopt/communicator.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace shardopt::comm {

// What one rank asked for in one collective. `count` is recv_count / send_count / count.
struct Call {
  CollectiveKind kind = CollectiveKind::barrier;
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t count = 0;
  DType dtype = DType::fp32;
  ReduceOp op = ReduceOp::sum;
  int root = 0;
  // reduce_scatter_pieces (piecewise): the input's pieces, possibly none (send is null then).
  const SendPiece* pieces = nullptr;
  std::size_t npieces = 0;
  bool piecewise = false;
};

// reduce_scatter_pieces' input packed into `dst` (size * count elements, host memory): zero where
// no piece lies. For the communicators that send one buffer (MPI, TCP).
void pack_pieces(const Call& c, int size, void* dst) noexcept;

const char* op_name(ReduceOp op) noexcept;
bool reduces(CollectiveKind k) noexcept;
std::string describe(CollectiveKind kind, std::size_t count, DType dtype, ReduceOp op, int root);
inline std::string describe(const Call& c) { return describe(c.kind, c.count, c.dtype, c.op, c.root); }
// "<who> <rank>, <call> (collective #<seq>)"
std::string label(const char* who, int rank, std::uint64_t seq, const Call& c);

inline const unsigned char* bytes_of(const void* p) noexcept { return static_cast<const unsigned char*>(p); }
inline unsigned char* bytes_of(void* p) noexcept { return static_cast<unsigned char*>(p); }

// True if [a, a+an) and [b, b+bn) share a byte. Compared as integers: the two pointers may point
// into different objects, where relational operators on pointers are unspecified.
bool overlap(const void* a, std::size_t an, const void* b, std::size_t bn) noexcept;

// What is wrong with rank `rank`'s own arguments in a world of `size`, or "" if nothing.
std::string check_call(const Call& c, int rank, int size);

// What is wrong with the operands of Backend::reduce (backend.hpp), or "" if nothing: counts
// outside [1, Backend::kMaxReduceOperands] (checked even for n == 0), null arrays or pointers,
// destinations that overlap a source without being exactly that source, or overlap each other.
std::string check_reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n, DType t);

// Bytes in the ZeRO accounting of communicator.hpp.
std::uint64_t volume(const Call& c, int world) noexcept;

// A communicator's scaffolding: each of the five collectives becomes one Call, numbered by
// next_seq() (taken even when the call is refused, so the rank stays in step with peers that issued
// it), checked by check_call, handed to run(), and once run() returned counted in the ZeRO volume
// accounting (communicator.hpp). A refused call goes to refused() (to tell the peers) and then is
// thrown as Error(invalid_argument) "<who> <rank>, <call> (collective #<seq>): <problem>".
class CommunicatorBase : public Communicator {
 public:
  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DType dtype, ReduceOp op,
                      Stream& stream) final {
    issue({CollectiveKind::reduce_scatter, send, recv, recv_count, dtype, op, 0}, stream);
  }
  void all_gather(const void* send, void* recv, std::size_t send_count, DType dtype, Stream& stream) final {
    issue({CollectiveKind::all_gather, send, recv, send_count, dtype, ReduceOp::sum, 0}, stream);
  }
  void all_reduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op, Stream& stream) final {
    issue({CollectiveKind::all_reduce, send, recv, count, dtype, op, 0}, stream);
  }
  void broadcast(const void* send, void* recv, std::size_t count, DType dtype, int root, Stream& stream) final {
    issue({CollectiveKind::broadcast, send, recv, count, dtype, ReduceOp::sum, root}, stream);
  }
  void barrier(Stream& stream) final { issue({}, stream); }
  void reduce_scatter_pieces(const SendPiece* pieces, std::size_t npieces, void* recv, std::size_t recv_count,
                             DType dtype, ReduceOp op, Stream& stream) final {
    issue({CollectiveKind::reduce_scatter, nullptr, recv, recv_count, dtype, op, 0, pieces, npieces, true}, stream);
  }

 protected:
  // `who` names this kind of rank in messages: "rank", "MPI rank", "NCCL rank".
  explicit CommunicatorBase(const char* who) noexcept : who_(who) {}
  const char* who() const noexcept { return who_; }

  // The number of the next collective. Default: a count of this communicator's own calls.
  virtual std::uint64_t next_seq() noexcept { return own_seq_.fetch_add(1, std::memory_order_relaxed); }
  // Enqueues the checked call `c` on `stream`; throws if it cannot (then it is not counted).
  virtual void run(const Call& c, std::uint64_t seq, Stream& stream) = 0;
  // The call was refused for `why` (already labelled): tell the peers waiting for collective #seq.
  // Must not throw. Default: nothing (a communicator whose peers learn of it otherwise).
  virtual void refused(const Call& /*c*/, std::uint64_t /*seq*/, const std::string& /*why*/,
                       Stream& /*stream*/) noexcept {}

 private:
  void issue(const Call& c, Stream& stream) {
    const std::uint64_t seq = next_seq();
    if (std::string problem = check_call(c, rank(), size()); !problem.empty()) {
      const std::string why = label(who_, rank(), seq, c) + ": " + problem;
      refused(c, seq, why, stream);
      throw Error(ErrorCode::invalid_argument, why);
    }
    run(c, seq, stream);
    count(c.kind, volume(c, size()));
  }

  const char* who_;
  std::atomic<std::uint64_t> own_seq_{0};  // only with the default next_seq()
};

// "Must run exactly once": copying hands the duty to the copy (std::function may copy or move
// its target while it is queued), so only the object the stream finally holds is armed.
class RunOnce {
 public:
  RunOnce() = default;
  RunOnce(const RunOnce& o) noexcept : armed_(std::exchange(o.armed_, false)) {}
  RunOnce& operator=(const RunOnce&) = delete;
  ~RunOnce() = default;
  bool armed() const noexcept { return armed_; }
  void disarm() const noexcept { armed_ = false; }

 private:
  mutable bool armed_ = true;
};

// Reduction over `nsrc` sources in rank order into `ndst` destinations, a block at a time: the
// block is accumulated in fp32 on the stack (no heap scratch), divided by N for avg, then rounded
// once and stored. Every source element of a block is read before any destination element of it is
// written, which is what makes the in-place forms (a destination equal to a source) safe.
inline constexpr std::size_t kReduceBlock = 1024;

template <DType T, class Src, class Dst>
void reduce_typed(int nsrc, const Src& src, int ndst, const Dst& dst, std::size_t n, ReduceOp op) noexcept {
  float acc[kReduceBlock];
  for (std::size_t b = 0; b < n; b += kReduceBlock) {
    const std::size_t len = std::min(kReduceBlock, n - b);
    const void* s0 = src(0);
    for (std::size_t i = 0; i < len; ++i) acc[i] = load_as_float(s0, T, b + i);
    for (int q = 1; q < nsrc; ++q) {
      const void* sq = src(q);
      if (op == ReduceOp::max) {
        // x != x picks up a NaN input; a NaN already in acc stays because x > NaN is false.
        for (std::size_t i = 0; i < len; ++i) {
          const float x = load_as_float(sq, T, b + i);
          acc[i] = (x > acc[i] || x != x) ? x : acc[i];
        }
      } else {
        for (std::size_t i = 0; i < len; ++i) acc[i] += load_as_float(sq, T, b + i);
      }
    }
    if (op == ReduceOp::avg) {
      // Divide (not multiply by 1/N) so the result is the correctly rounded fp32 quotient.
      const float d = static_cast<float>(nsrc);
      for (std::size_t i = 0; i < len; ++i) acc[i] = acc[i] / d;
    }
    for (int q = 0; q < ndst; ++q) {
      void* dq = dst(q);
      for (std::size_t i = 0; i < len; ++i) store_from_float(dq, T, b + i, acc[i]);
    }
  }
}

template <class Src, class Dst>
void reduce(int nsrc, const Src& src, int ndst, const Dst& dst, std::size_t n, DType t, ReduceOp op) noexcept {
  if (n == 0) return;
  switch (t) {
    case DType::fp32: reduce_typed<DType::fp32>(nsrc, src, ndst, dst, n, op); break;
    case DType::fp16: reduce_typed<DType::fp16>(nsrc, src, ndst, dst, n, op); break;
    case DType::bf16: reduce_typed<DType::bf16>(nsrc, src, ndst, dst, n, op); break;
  }
}

}  // namespace shardopt::comm
