// In-process communicator: N ranks as threads of one process, each with its own backend.
//
// Collectives are matched across ranks by the rank's sequence number (the same on every rank,
// because all ranks issue the same collectives in the same order) in a ring of slots. Both
// transports meet the same way: a rank publishes its arguments in the slot, waits until every rank
// has arrived, does its share reading (and for all_reduce writing) the other ranks' buffers, and
// waits once more until every rank has done its share, so that no rank lets its caller reuse its
// buffers while another rank still reads or writes them. They differ in where that happens:
//
//   host_tasks       inside a host task on the rank's stream, in stream order; the share is
//                    computed on the host.
//   backend_kernels  on the issuing thread, at enqueue time; the share is the backend's reduce and
//                    copy kernels on the rank's stream, made to wait for the peers' "ready" events
//                    (recorded where each peer issued the call), and the rank's stream then waits
//                    for the peers' "done" events. The host never waits for the device.
//
// Failure model: a disagreement between ranks, a bad argument or a failed enqueue aborts the whole
// group, like a NCCL communicator after an error. Ranks waiting for peers wake up and throw
// Error(communication) instead of hanging; later collectives on the group throw at once.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm/collective.hpp"
#include "core/components.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

namespace {

using comm::Call;
using comm::RunOnce;
using comm::bytes_of;
using comm::label;
using comm::overlap;
using comm::reduce;
using comm::reduces;
using comm::describe;

// reduce_scatter_pieces: rank `rank`'s block of the input cut where pieces begin and end:
// f(piece index, element of the input, length, element of recv) for each run, in order, with
// kGap as the index of a run no piece covers. Every rank's pieces have the same offsets
// (mismatch() checks it), so the runs are the same for every rank's input.
constexpr std::size_t kGap = ~std::size_t(0);
template <class F>
void for_each_piece_run(int rank, const Call& me, F&& f) {
  const std::size_t lo = static_cast<std::size_t>(rank) * me.count, hi = lo + me.count;
  std::size_t pos = lo;
  for (std::size_t i = 0; i < me.npieces && pos < hi; ++i) {
    const SendPiece& p = me.pieces[i];
    const std::size_t b = std::max(p.offset, lo), e = std::min(p.offset + p.count, hi);
    if (b >= e) continue;
    if (pos < b) f(kGap, pos, b - pos, pos - lo);
    f(i, b, e - b, b - lo);
    pos = e;
  }
  if (pos < hi) f(kGap, pos, hi - pos, pos - lo);
}
// Input element `at` of piece i of a rank's call (at lies in the piece).
const unsigned char* piece_at(const Call& c, std::size_t i, std::size_t at) noexcept {
  return bytes_of(c.pieces[i].data) + (at - c.pieces[i].offset) * size_of(c.dtype);
}

}  // namespace

class InProcessGroup {
 public:
  static constexpr std::size_t kSlots = 64;

  InProcessGroup(int world_size, InProcessTransport transport, std::chrono::milliseconds timeout)
      : size_(world_size), requested_(transport), timeout_(timeout), ring_(kSlots),
        seq_(new std::atomic<std::uint64_t>[static_cast<std::size_t>(world_size)]),
        bound_(static_cast<std::size_t>(world_size), false),
        left_at_(static_cast<std::size_t>(world_size), kNotLeft) {
    for (std::size_t i = 0; i < kSlots; ++i) {
      ring_[i].seq = i;
      ring_[i].present.resize(static_cast<std::size_t>(world_size), 0);
      ring_[i].calls.resize(static_cast<std::size_t>(world_size));
      ring_[i].ready.resize(static_cast<std::size_t>(world_size), nullptr);
      ring_[i].done_event.resize(static_cast<std::size_t>(world_size), nullptr);
    }
    for (int r = 0; r < world_size; ++r) seq_[r].store(0, std::memory_order_relaxed);
  }

  int size() const noexcept { return size_; }

  // Binds `rank` to `backend` and returns the transport the group runs on. The first rank bound
  // fixes the transport (automatic: host_tasks if the host can reach its backend's memory), the
  // backend kind and, for CUDA, the device; every later rank must agree.
  InProcessTransport bind(int rank, Backend& backend) {
    const BackendKind kind = backend.kind();
    int device = -1;
    if (kind == BackendKind::cuda) {
      // A CUDA backend exists only where shardopt::cuda is linked in, so the table is there.
      const detail::CudaComponent* cuda = detail::cuda_component();
      require(cuda != nullptr, ErrorCode::internal,
              "in-process communicator for rank " + std::to_string(rank) + ": a CUDA backend but no CUDA component registered");
      device = cuda->device_of(backend);
    }
    const InProcessTransport want =
        requested_ != InProcessTransport::automatic
            ? requested_
            : (backend.host_accessible() ? InProcessTransport::host_tasks : InProcessTransport::backend_kernels);
    const std::string who = "in-process communicator for rank " + std::to_string(rank);
    require(want != InProcessTransport::host_tasks || backend.host_accessible(), ErrorCode::unsupported,
            who + ": the host_tasks transport reads the peers' buffers on the host, which needs host memory (the "
                  "CPU backend), got the " + std::string(name_of(kind)) + " backend; use backend_kernels");
    require(want != InProcessTransport::backend_kernels || size_ <= Backend::kMaxReduceOperands,
            ErrorCode::unsupported,
            who + ": the backend_kernels transport serves at most " + std::to_string(Backend::kMaxReduceOperands) +
                " ranks (the reduce kernel's operands), the group has " + std::to_string(size_));
    std::lock_guard<std::mutex> lock(mutex_);
    require(!bound_[static_cast<std::size_t>(rank)], ErrorCode::invalid_argument,
            "rank " + std::to_string(rank) + " of the in-process group already has a communicator");
    if (bound_once_) {
      require(kind == kind_, ErrorCode::invalid_argument,
              who + ": its backend is " + std::string(name_of(kind)) + " but the group's ranks use " +
                  std::string(name_of(kind_)) + " backends (every rank of a group must use the same kind)");
      require(device == device_, ErrorCode::invalid_argument,
              who + ": its backend is on CUDA device " + std::to_string(device) + " but the group's ranks are on device " +
                  std::to_string(device_) + " (ranks on different GPUs need the NCCL communicator)");
    }
    bound_once_ = true;
    kind_ = kind;
    device_ = device;
    bound_[static_cast<std::size_t>(rank)] = true;
    left_at_[static_cast<std::size_t>(rank)] = kNotLeft;  // a communicator re-created for the rank goes on
    return want;
  }
  // The rank's communicator is gone. Collectives it already issued still run (their tasks hold the
  // group); any later one its peers wait for, or start, fails at once naming it, unless a new
  // communicator binds the rank first.
  //
  // With backend_kernels the peers wait on this rank's events (owned by its communicator) after
  // the rank itself is done with a collective, so before they go the rank waits until every peer
  // has left each of its last kSlots collectives (bounded by the timeout; a collective that
  // never had every rank arrive never references the events).
  void unbind(int rank, bool events_in_use) noexcept {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::uint64_t issued = seq_[rank].load(std::memory_order_relaxed);
    bound_[static_cast<std::size_t>(rank)] = false;
    left_at_[static_cast<std::size_t>(rank)] = issued;
    cv_.notify_all();
    if (!events_in_use) return;
    const auto settled = [&] {
      for (std::uint64_t k = issued > kSlots ? issued - kSlots : 0; k < issued; ++k) {
        const Slot& sl = ring_[k % kSlots];
        if (sl.seq > k) continue;                                // every rank left it
        if (sl.seq < k) continue;                                // the rank never got to publish in it
        if (sl.failed) continue;                                 // ranks disagreed: nobody went on
        if (sl.seq == k && sl.arrived < size_ && (aborted_ || sl.arrived == 0)) continue;  // never met
        return false;
      }
      return true;
    };
    (void)cv_.wait_until(lock, std::chrono::steady_clock::now() + timeout_, settled);
  }

  // Kept in the group, not the communicator, so a communicator re-created for a rank goes on
  // with the sequence its peers expect.
  std::uint64_t next_seq(int rank) noexcept { return seq_[rank].fetch_add(1, std::memory_order_relaxed); }

  void abort(const std::string& why) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    abort_locked(why);
  }

  // A collective's task was destroyed without running: its stream skips work after a failure
  // until synchronize, or went away. The peers would wait for this rank forever, so abort.
  void dropped(int rank, std::uint64_t seq, const Call& call) noexcept {
    std::string why;
    try {
      why = label("rank", rank, seq, call) + " was dropped without running (its stream had failed earlier or was destroyed)";
    } catch (...) {
      // No memory for the message: abort_locked still sets the flag, which is what unblocks peers.
    }
    abort(why);
  }

  // The body of one collective on one rank; runs on that rank's stream.
  void run(int rank, std::uint64_t seq, const Call& call) {
    Slot& s = ring_[seq % kSlots];
    std::unique_lock<std::mutex> lock(mutex_);
    // The slot may still serve collective seq - kSlots (other streams of some rank lagging).
    wait_for_slot(s, rank, seq, call, lock);

    s.calls[static_cast<std::size_t>(rank)] = call;
    arrive(s, rank, seq, call, lock);
    lock.unlock();
    compute(rank, s);
    lock.lock();

    if (call.kind != CollectiveKind::barrier) {
      if (++s.done == size_)
        cv_.notify_all();
      else
        cv_.wait(lock, [&] { return s.done == size_; });
    }
    leave(s, seq);
  }

  // One collective on one rank over the backend_kernels transport; runs on the issuing thread.
  // `ready` and `done` are this rank's events for the slot of `seq` (not re-recorded before every
  // rank has left that slot, so the peers' waits on them always see this collective's records).
  void run_kernels(int rank, std::uint64_t seq, const Call& call, Backend& be, Stream& st, Event& ready,
                   Event& done) {
    Slot& s = ring_[seq % kSlots];
    const auto me = static_cast<std::size_t>(rank);
    std::unique_lock<std::mutex> lock(mutex_);
    wait_for_slot(s, rank, seq, call, lock);
    lock.unlock();
    try {
      be.record(ready, st);  // this rank's inputs, and its earlier use of its outputs, are done here
    } catch (const std::exception& e) {
      abort(label("rank", rank, seq, call) + " could not be enqueued: " + e.what());
      throw;
    }
    lock.lock();
    s.calls[me] = call;
    s.ready[me] = &ready;
    s.done_event[me] = &done;
    arrive(s, rank, seq, call, lock);
    lock.unlock();

    std::string failure;
    try {
      for (int q = 0; q < size_; ++q)
        if (q != rank) be.wait(st, *s.ready[static_cast<std::size_t>(q)]);
      if (call.kind != CollectiveKind::barrier) {
        enqueue_share(rank, s, be, st);
        be.record(done, st);
      }
    } catch (const std::exception& e) {
      failure = label("rank", rank, seq, call) + " failed while enqueueing its share: " + e.what();
    }

    lock.lock();
    if (!failure.empty()) abort_locked(failure);
    if (call.kind != CollectiveKind::barrier) {
      if (++s.done == size_)
        cv_.notify_all();
      else
        cv_.wait(lock, [&] { return s.done == size_; });
      lock.unlock();
      // The caller may reuse this rank's buffers once its stream has passed this point: make it
      // wait until every peer's share (which reads, and for all_reduce writes, them) has run.
      if (failure.empty()) {
        try {
          for (int q = 0; q < size_; ++q)
            if (q != rank) be.wait(st, *s.done_event[static_cast<std::size_t>(q)]);
        } catch (const std::exception& e) {
          failure = label("rank", rank, seq, call) + " could not order its stream after its peers: " + e.what();
        }
      }
      lock.lock();
      if (!failure.empty()) abort_locked(failure);
    }
    leave(s, seq);
    if (!failure.empty()) throw Error(ErrorCode::communication, failure);
  }

 private:
  static constexpr std::uint64_t kNotLeft = ~std::uint64_t(0);

  struct Slot {
    std::uint64_t seq = 0;    // the collective this slot serves now
    std::vector<char> present;  // by rank: arrived at `seq`
    std::vector<Call> calls;  // by rank
    std::vector<Event*> ready;       // backend_kernels: by rank, recorded where the rank issued the call
    std::vector<Event*> done_event;  // backend_kernels: by rank, recorded after the rank's share
    int arrived = 0;
    int done = 0;
    int left = 0;
    bool failed = false;  // never cleared: a failure aborts the group
    std::string error;
  };

  // Called with the lock held by every rank once its call is published in slot `s`: counts it in
  // and waits until every rank has arrived; the last to arrive checks that all asked for the same
  // collective. Throws if they disagree or the group aborts first. Once all have arrived and
  // agreed the rank must go on to the end even if the group aborts meanwhile, because its peers
  // now read and write its buffers.
  void arrive(Slot& s, int rank, std::uint64_t seq, const Call& call, std::unique_lock<std::mutex>& lock) {
    s.present[static_cast<std::size_t>(rank)] = 1;
    if (++s.arrived == size_) {
      std::string why = mismatch(s, seq);
      if (!why.empty()) {
        s.failed = true;
        s.error = why;
        abort_locked(why);
      }
      cv_.notify_all();
    } else {
      const auto deadline = std::chrono::steady_clock::now() + timeout_;
      for (;;) {
        if (s.arrived == size_ || aborted_) break;
        if (std::string gone = departed(s, seq); !gone.empty()) {
          abort_locked(label("rank", rank, seq, call) + " cannot complete: " + gone);
          break;
        }
        if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && s.arrived != size_ && !aborted_) {
          abort_locked(label("rank", rank, seq, call) + " timed out after " + seconds(timeout_) + ": " + absent(s) +
                       " did not arrive");
          break;
        }
      }
    }
    if (s.failed) throw Error(ErrorCode::communication, s.error + "; seen by rank " + std::to_string(rank));
    if (s.arrived != size_) throw aborted_error(rank, seq, call);
  }

  // Called with the lock held by every rank as it finishes with slot `s`; the last one frees it
  // for collective seq + kSlots.
  void leave(Slot& s, std::uint64_t seq) {
    if (++s.left == size_) {
      s.arrived = s.done = s.left = 0;
      std::fill(s.present.begin(), s.present.end(), 0);
      s.seq = seq + kSlots;
      cv_.notify_all();
    }
  }

  // all_reduce's split of the work: rank r reduces elements [lo, lo + len) of every rank's buffers.
  std::pair<std::size_t, std::size_t> all_reduce_chunk(int rank, std::size_t n) const noexcept {
    const auto r = static_cast<std::size_t>(rank);
    const auto world = static_cast<std::size_t>(size_);
    const std::size_t chunk = n / world;
    const std::size_t rem = n % world;
    return {r * chunk + std::min(r, rem), chunk + (r < rem ? 1 : 0)};
  }

  // backend_kernels: this rank's share, enqueued on its stream (which already waits for every
  // peer's inputs). The same partition of the work as compute(), as kernels.
  void enqueue_share(int rank, const Slot& s, Backend& be, Stream& st) const {
    const Call& me = s.calls[static_cast<std::size_t>(rank)];
    const std::size_t es = size_of(me.dtype);
    const std::size_t n = me.count;
    if (n == 0) return;
    const auto& calls = s.calls;
    const void* srcs[Backend::kMaxReduceOperands];
    void* dsts[Backend::kMaxReduceOperands];
    switch (me.kind) {
      case CollectiveKind::reduce_scatter: {
        if (me.piecewise) {
          for_each_piece_run(rank, me, [&](std::size_t i, std::size_t lo, std::size_t len, std::size_t at) {
            if (i == kGap) {
              be.fill(bytes_of(me.recv) + at * es, me.dtype, len, 0.0f, st);
              return;
            }
            for (int q = 0; q < size_; ++q) srcs[q] = piece_at(calls[static_cast<std::size_t>(q)], i, lo);
            dsts[0] = bytes_of(me.recv) + at * es;
            be.reduce(srcs, size_, dsts, 1, len, me.dtype, me.op, st);
          });
          break;
        }
        const std::size_t off = static_cast<std::size_t>(rank) * n * es;
        for (int q = 0; q < size_; ++q) srcs[q] = bytes_of(calls[static_cast<std::size_t>(q)].send) + off;
        dsts[0] = me.recv;
        be.reduce(srcs, size_, dsts, 1, n, me.dtype, me.op, st);
        break;
      }
      case CollectiveKind::all_reduce: {
        const auto [lo, len] = all_reduce_chunk(rank, n);
        if (len == 0) break;
        for (int q = 0; q < size_; ++q) {
          srcs[q] = bytes_of(calls[static_cast<std::size_t>(q)].send) + lo * es;
          dsts[q] = bytes_of(calls[static_cast<std::size_t>(q)].recv) + lo * es;
        }
        be.reduce(srcs, size_, dsts, size_, len, me.dtype, me.op, st);
        break;
      }
      case CollectiveKind::all_gather: {
        for (int q = 0; q < size_; ++q) {
          unsigned char* dst = bytes_of(me.recv) + static_cast<std::size_t>(q) * n * es;
          const void* src = calls[static_cast<std::size_t>(q)].send;
          if (src != dst) be.copy(dst, src, n * es, st);
        }
        break;
      }
      case CollectiveKind::broadcast: {
        const void* src = calls[static_cast<std::size_t>(me.root)].send;
        if (src != me.recv) be.copy(me.recv, src, n * es, st);
        break;
      }
      case CollectiveKind::barrier: break;
    }
  }

  void abort_locked(const std::string& why) noexcept {
    if (!aborted_) {
      aborted_ = true;
      try {
        abort_reason_ = why.empty() ? std::string("reason unknown") : why;
      } catch (...) {
        // Out of memory while copying a message: the flag alone still stops every rank.
      }
    }
    cv_.notify_all();
  }

  Error aborted_error(int rank, std::uint64_t seq, const Call& call) const {
    return Error(ErrorCode::communication, "in-process group aborted (" + abort_reason_ + "); " +
                                               label("rank", rank, seq, call) + " cannot complete");
  }

  // Waits (lock held) until slot `s` serves collective `seq`; it may still serve seq - kSlots while
  // some rank lags. Bounded like every wait of the group.
  void wait_for_slot(Slot& s, int rank, std::uint64_t seq, const Call& call, std::unique_lock<std::mutex>& lock) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    while (s.seq != seq && !aborted_) {
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && s.seq != seq && !aborted_)
        abort_locked(label("rank", rank, seq, call) + " timed out after " + seconds(timeout_) +
                     " waiting for collective #" + std::to_string(seq - kSlots) + " to finish: " + absent(ring_[seq % kSlots]) +
                     " did not arrive there");
    }
    if (aborted_) throw aborted_error(rank, seq, call);
  }

  // The ranks not present in slot `s`, for a message ("rank 2", "ranks 1, 3").
  std::string absent(const Slot& s) const {
    std::string out;
    int n = 0;
    for (int q = 0; q < size_; ++q)
      if (!s.present[static_cast<std::size_t>(q)]) out += (n++ ? ", " : "") + std::to_string(q);
    return (n == 1 ? "rank " : "ranks ") + out;
  }

  // Non-empty if a rank that has not arrived at collective `seq` has left the group before
  // issuing it (its communicator was destroyed): it never will.
  std::string departed(const Slot& s, std::uint64_t seq) const {
    for (int q = 0; q < size_; ++q) {
      const auto i = static_cast<std::size_t>(q);
      if (!s.present[i] && left_at_[i] != kNotLeft && left_at_[i] <= seq)
        return "rank " + std::to_string(q) + " left the group (its communicator was destroyed) after issuing " +
               std::to_string(left_at_[i]) + " collectives, without joining this one";
    }
    return {};
  }

  static std::string seconds(std::chrono::milliseconds t) {
    return std::to_string(t.count() / 1000) + "." + std::to_string(t.count() % 1000 / 100) + " s";
  }

  std::string mismatch(const Slot& s, std::uint64_t seq) const {
    const Call& a = s.calls[0];
    for (int q = 1; q < size_; ++q) {
      const Call& b = s.calls[static_cast<std::size_t>(q)];
      bool same = a.kind == b.kind && a.count == b.count && a.dtype == b.dtype &&
                  (!reduces(a.kind) || a.op == b.op) &&
                  (a.kind != CollectiveKind::broadcast || a.root == b.root) &&
                  a.piecewise == b.piecewise && a.npieces == b.npieces;
      for (std::size_t i = 0; same && a.piecewise && i < a.npieces; ++i)
        same = a.pieces[i].offset == b.pieces[i].offset && a.pieces[i].count == b.pieces[i].count;
      if (!same && a.kind == b.kind && a.count == b.count && (a.piecewise || b.piecewise))
        return "ranks disagree on collective #" + std::to_string(seq) + ": rank 0 and rank " + std::to_string(q) +
               " issued reduce_scatter_pieces with different pieces (offsets and counts must be the same)";
      if (!same) {
        return "ranks disagree on collective #" + std::to_string(seq) + ": rank 0 issued " + describe(a) +
               " but rank " + std::to_string(q) + " issued " + describe(b);
      }
    }
    return {};
  }

  // This rank's part. Reads the published calls, which nobody writes until every rank has left.
  void compute(int rank, const Slot& s) const noexcept {
    const Call& me = s.calls[static_cast<std::size_t>(rank)];
    const std::size_t es = size_of(me.dtype);
    const std::size_t n = me.count;
    const auto& calls = s.calls;
    switch (me.kind) {
      case CollectiveKind::reduce_scatter: {
        if (me.piecewise) {  // each rank's pieces where they are; zero where no piece lies
          for_each_piece_run(rank, me, [&](std::size_t i, std::size_t lo, std::size_t len, std::size_t at) {
            if (i == kGap) {
              std::memset(bytes_of(me.recv) + at * es, 0, len * es);
              return;
            }
            reduce(
                size_, [&](int q) { return piece_at(calls[static_cast<std::size_t>(q)], i, lo); }, 1,
                [&](int) { return bytes_of(me.recv) + at * es; }, len, me.dtype, me.op);
          });
          break;
        }
        // Rank r reduces block r of every send into its own recv; blocks of different ranks are
        // disjoint, so the in-place form (recv inside this rank's send) only touches block r.
        const std::size_t off = static_cast<std::size_t>(rank) * n * es;
        reduce(
            size_, [&](int q) { return bytes_of(calls[static_cast<std::size_t>(q)].send) + off; }, 1,
            [&](int) { return me.recv; }, n, me.dtype, me.op);
        break;
      }
      case CollectiveKind::all_reduce: {
        // The work is split: rank r reduces chunk r of all sends and writes it into every rank's
        // recv, so the total work is N*count instead of N*N*count. Each element is still reduced
        // once in rank order, so every rank gets the same bits, and only rank r touches chunk r,
        // which keeps send == recv safe without scratch memory.
        const auto [lo, len] = all_reduce_chunk(rank, n);
        const std::size_t off = lo * es;
        reduce(
            size_, [&](int q) { return bytes_of(calls[static_cast<std::size_t>(q)].send) + off; }, size_,
            [&](int q) { return bytes_of(calls[static_cast<std::size_t>(q)].recv) + off; }, len, me.dtype,
            me.op);
        break;
      }
      case CollectiveKind::all_gather: {
        if (n == 0) break;
        for (int q = 0; q < size_; ++q) {
          unsigned char* dst = bytes_of(me.recv) + static_cast<std::size_t>(q) * n * es;
          const void* src = calls[static_cast<std::size_t>(q)].send;
          if (src != dst) std::memcpy(dst, src, n * es);  // equal in the in-place form
        }
        break;
      }
      case CollectiveKind::broadcast: {
        const void* src = calls[static_cast<std::size_t>(me.root)].send;
        if (n != 0 && src != me.recv) std::memcpy(me.recv, src, n * es);
        break;
      }
      case CollectiveKind::barrier: break;
    }
  }

  const int size_;
  const InProcessTransport requested_;
  const std::chrono::milliseconds timeout_;
  std::vector<Slot> ring_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> seq_;
  std::vector<bool> bound_;
  std::vector<std::uint64_t> left_at_;  // by rank: its sequence number when it left, or kNotLeft
  // Fixed by the first bind (under mutex_).
  bool bound_once_ = false;
  BackendKind kind_ = BackendKind::cpu;
  int device_ = -1;

  std::mutex mutex_;
  std::condition_variable cv_;
  bool aborted_ = false;
  std::string abort_reason_;
};

namespace {


// The stream task of one collective. If the stream destroys it without running it, the group is
// aborted, so the peers do not wait for this rank forever.
struct CollectiveTask {
  std::shared_ptr<InProcessGroup> group;
  int rank = 0;
  std::uint64_t seq = 0;
  Call call;
  RunOnce once;

  void operator()() const {
    once.disarm();
    group->run(rank, seq, call);
  }
  ~CollectiveTask() {
    if (once.armed() && group) group->dropped(rank, seq, call);
  }
};

// The stream task that aborts the group in stream order after this rank refused a call; it aborts
// as well if the stream drops it, since the peers are waiting either way.
struct AbortTask {
  std::shared_ptr<InProcessGroup> group;
  std::string why;
  RunOnce once;

  void operator()() const {
    once.disarm();
    group->abort(why);
  }
  ~AbortTask() {
    if (once.armed() && group) group->abort(why);
  }
};

class InProcessCommunicator final : public comm::CommunicatorBase {
 public:
  InProcessCommunicator(std::shared_ptr<InProcessGroup> group, int rank, Backend& backend)
      : CommunicatorBase("rank"),
        group_(std::move(group)), rank_(rank), size_(group_->size()), backend_(backend) {
    transport_ = group_->bind(rank_, backend_);
    if (transport_ == InProcessTransport::backend_kernels) {
      try {
        for (std::size_t i = 0; i < InProcessGroup::kSlots; ++i) {
          ready_.push_back(backend_.create_event());
          done_.push_back(backend_.create_event());
        }
      } catch (...) {
        group_->unbind(rank_, false);
        throw;
      }
    }
  }
  ~InProcessCommunicator() override { group_->unbind(rank_, transport_ == InProcessTransport::backend_kernels); }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }

 private:
  // The group numbers the collectives: a rank whose communicator is made again continues there.
  std::uint64_t next_seq() noexcept override { return group_->next_seq(rank_); }

  void refused(const Call&, std::uint64_t, const std::string& why, Stream& stream) noexcept override {
    if (transport_ == InProcessTransport::backend_kernels) {
      // Everything this rank issued before is fully enqueued already: abort now, which wakes
      // the peers waiting for it at collective #seq.
      group_->abort(why);
      return;
    }
    // Abort in stream order, so this rank's earlier collectives still complete; the peers
    // waiting on #seq then throw instead of hanging.
    try {
      backend_.host_task(stream, AbortTask{group_, why, {}});
    } catch (...) {
      group_->abort(why);
    }
  }

  void run(const Call& c, std::uint64_t seq, Stream& stream) override {
    if (size_ == 1) {
      // One rank: a sum or mean of one term is that term, exactly (the rank-order reduction starts
      // from the first operand and divides by 1), and a gather or broadcast of one slice is that
      // slice, so the result is the input: one stream-ordered copy, or nothing in place. The
      // reduction kernel would read and convert every element for the same bits.
      if (c.piecewise) {
        const std::size_t es = size_of(c.dtype);
        for_each_piece_run(0, c, [&](std::size_t i, std::size_t lo, std::size_t len, std::size_t at) {
          if (i == kGap) backend_.fill(bytes_of(c.recv) + at * es, c.dtype, len, 0.0f, stream);
          else backend_.copy(bytes_of(c.recv) + at * es, piece_at(c, i, lo), len * es, stream);
        });
        return;
      }
      if (c.kind != CollectiveKind::barrier && c.send != c.recv && c.count != 0)
        backend_.copy(c.recv, c.send, c.count * size_of(c.dtype), stream);
      return;
    }
    if (transport_ == InProcessTransport::backend_kernels) {
      const std::size_t slot = seq % InProcessGroup::kSlots;
      group_->run_kernels(rank_, seq, c, backend_, stream, *ready_[slot], *done_[slot]);
    } else {
      try {
        backend_.host_task(stream, CollectiveTask{group_, rank_, seq, c, {}});
      } catch (const std::exception& e) {
        group_->abort(label("rank", rank_, seq, c) + " could not be enqueued: " + e.what());
        throw;
      }
    }
  }

  std::shared_ptr<InProcessGroup> group_;
  const int rank_;
  const int size_;
  Backend& backend_;
  InProcessTransport transport_ = InProcessTransport::host_tasks;
  // backend_kernels: this rank's events, one pair per slot of the group's ring.
  std::vector<std::unique_ptr<Event>> ready_, done_;
};

}  // namespace

std::string_view name_of(InProcessTransport t) noexcept {
  switch (t) {
    case InProcessTransport::automatic: return "automatic";
    case InProcessTransport::host_tasks: return "host_tasks";
    case InProcessTransport::backend_kernels: return "backend_kernels";
  }
  return "unknown";
}

std::shared_ptr<InProcessGroup> make_in_process_group(int world_size, InProcessTransport transport,
                                                      std::chrono::milliseconds timeout) {
  require(timeout.count() > 0, ErrorCode::invalid_argument,
          "in-process group timeout must be positive, got " + std::to_string(timeout.count()) + " ms");
  require(world_size >= 1, ErrorCode::invalid_argument,
          "in-process group world_size must be at least 1, got " + std::to_string(world_size));
  // Each rank is a set of threads of this process and the group keeps world_size * 64 call
  // records, so an absurd size is a mistake better reported than attempted.
  constexpr int kMaxWorld = 4096;
  require(world_size <= kMaxWorld, ErrorCode::invalid_argument,
          "in-process group world_size " + std::to_string(world_size) + " exceeds the maximum of " +
              std::to_string(kMaxWorld) + " ranks (threads of one process)");
  require(transport == InProcessTransport::automatic || transport == InProcessTransport::host_tasks ||
              transport == InProcessTransport::backend_kernels,
          ErrorCode::invalid_argument,
          "in-process group: unknown transport " + std::to_string(static_cast<int>(transport)));
  return std::make_shared<InProcessGroup>(world_size, transport, timeout);
}

std::unique_ptr<Communicator> make_in_process_communicator(std::shared_ptr<InProcessGroup> group, int rank,
                                                           Backend& backend) {
  require(group != nullptr, ErrorCode::invalid_argument, "in-process communicator: group is null");
  require(rank >= 0 && rank < group->size(), ErrorCode::invalid_argument,
          "in-process communicator: rank " + std::to_string(rank) + " is outside [0, " +
              std::to_string(group->size()) + ")");
  return std::make_unique<InProcessCommunicator>(std::move(group), rank, backend);
}

void abort_in_process_group(InProcessGroup& group, const std::string& why) noexcept { group.abort(why); }

}  // namespace shardopt
