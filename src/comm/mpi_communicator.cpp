// MPI session and MPI communicator: N processes, host memory, collectives on backend streams.
//
// Why point-to-point and not MPI_Reduce_scatter/MPI_Allreduce: MPI leaves the order in which a
// reduction combines the ranks' contributions to the implementation (it may follow a tree or a
// ring), so the bits would differ from the in-process communicator and between MPI versions.
// Here every rank receives the raw blocks it must reduce and reduces them itself in rank order
// 0..N-1, accumulating in fp32 and rounding once, which is exactly what the in-process ranks do.
// all_reduce is a reduce-scatter of chunks (rank r reduces chunk r) followed by an all-gather of
// the reduced chunks, with the same chunk split as the in-process communicator.
//
// Why tags from sequence numbers: MPI matches collectives by call order per communicator, which
// two streams running collectives concurrently on different threads would scramble. Messages
// here are tagged with the collective's sequence number, taken at enqueue time (the same on
// every rank because all ranks enqueue the same collectives in the same order), so they match
// whatever order the stream threads run in.
//
// Why a descriptor exchange before each collective: it is what lets a disagreement (different
// count, dtype, kind), a rejected argument or a dropped task fail every rank with an Error
// instead of leaving peers blocked in a receive that never completes.
#include "shardopt/mpi.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/collective.hpp"
#include "shardopt/error.hpp"

#if SHARDOPT_HAS_MPI
#include <mpi.h>
#endif

namespace shardopt {

#if !SHARDOPT_HAS_MPI

bool mpi_built() noexcept { return false; }
MpiSession::MpiSession() : MpiSession(nullptr, nullptr) {}
MpiSession::MpiSession(int*, char***) {
  throw Error(ErrorCode::unsupported, "MpiSession: shardopt was built without MPI (find_package(MPI) failed at configure time)");
}
MpiSession::~MpiSession() = default;
std::unique_ptr<Communicator> make_mpi_communicator(Backend&, std::chrono::milliseconds) {
  throw Error(ErrorCode::unsupported, "make_mpi_communicator: shardopt was built without MPI (find_package(MPI) failed at configure time)");
}

#else

namespace detail_mpi {

std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, static_cast<std::size_t>(len));
}

void check_mpi(int rc, const std::string& what) {
  if (rc != MPI_SUCCESS) throw Error(ErrorCode::communication, what + " failed: " + mpi_error_text(rc));
}

}  // namespace detail_mpi

using detail_mpi::check_mpi;

bool mpi_built() noexcept { return true; }

MpiSession::MpiSession() : MpiSession(nullptr, nullptr) {}

MpiSession::MpiSession(int* argc, char*** argv) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  require(!finalized, ErrorCode::invalid_state, "MpiSession: MPI was already finalized in this process and cannot be initialized again");
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread(MPI_THREAD_MULTIPLE)");
    owns_ = true;
  }
  int level = 0;
  MPI_Query_thread(&level);
  thread_level_ = level == MPI_THREAD_MULTIPLE ? 3 : level == MPI_THREAD_SERIALIZED ? 2 : level == MPI_THREAD_FUNNELED ? 1 : 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

namespace {

using comm::Call;
using comm::RunOnce;
using comm::bytes_of;
using comm::describe;
using comm::overlap;
using comm::reduces;


// What every rank sends every peer before a collective. Sent as raw bytes: every process runs
// the same build, so the layout is the same everywhere.
struct Descriptor {
  std::uint64_t seq = 0;
  std::uint64_t count = 0;
  std::int32_t root = 0;
  std::uint8_t kind = 0, dtype = 0, op = 0;
  std::uint8_t aborted = 0;  // the sender's group is aborted: this collective fails everywhere
};

std::string describe(const Descriptor& d) {
  return describe(static_cast<CollectiveKind>(d.kind), d.count, static_cast<DType>(d.dtype), static_cast<ReduceOp>(d.op), d.root);
}

std::string label(int rank, std::uint64_t seq, const Call& c) { return comm::label("MPI rank", rank, seq, c); }

Descriptor descriptor_of(std::uint64_t seq, const Call& c, bool aborted) {
  Descriptor d;
  d.seq = seq;
  d.count = c.count;
  d.root = c.root;
  d.kind = static_cast<std::uint8_t>(c.kind);
  d.dtype = static_cast<std::uint8_t>(c.dtype);
  d.op = static_cast<std::uint8_t>(c.op);
  d.aborted = aborted ? 1 : 0;
  return d;
}

bool same_collective(const Descriptor& a, const Descriptor& b) noexcept {
  const auto k = static_cast<CollectiveKind>(a.kind);
  return a.seq == b.seq && a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && (!reduces(k) || a.op == b.op) &&
         (k != CollectiveKind::broadcast || a.root == b.root);
}

// The in-process communicator's reduction (comm/collective.hpp), into one destination: the same
// bits on both.
template <class Src>
void reduce(int nsrc, const Src& src, void* dst, std::size_t n, DType t, ReduceOp op) noexcept {
  comm::reduce(nsrc, src, 1, [dst](int) { return dst; }, n, t, op);
}

// MPI counts are int: large buffers travel as several messages of at most 1 GiB with the same
// tag, which MPI delivers in order between one pair of processes.
constexpr std::size_t kMaxMessage = std::size_t(1) << 30;

// The shared state of one MPI communicator; tasks hold it so it outlives a communicator that is
// destroyed while its collectives are still queued.
class MpiGroup {
 public:
  MpiGroup(MPI_Comm comm, int rank, int size, int tag_ub, std::chrono::milliseconds timeout)
      : comm_(comm), rank_(rank), size_(size), timeout_(timeout) {
    // Three tags per collective: descriptor, first data phase, second data phase.
    tag_span_ = static_cast<std::uint64_t>(tag_ub) / 3;
  }
  ~MpiGroup() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  std::uint64_t next_seq() noexcept { return seq_.fetch_add(1, std::memory_order_relaxed); }

  void abort(const std::string& why) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!aborted_) {
      aborted_ = true;
      try {
        reason_ = why;
      } catch (...) {
        // The flag alone is what stops later collectives.
      }
    }
  }
  bool aborted() const noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    return aborted_;
  }
  std::string reason() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return reason_;
  }

  // The stream task's body.
  void run(std::uint64_t seq, const Call& call) {
    exchange_descriptors(seq, call);
    switch (call.kind) {
      case CollectiveKind::reduce_scatter: reduce_scatter(seq, call); break;
      case CollectiveKind::all_gather: all_gather(seq, call); break;
      case CollectiveKind::all_reduce: all_reduce(seq, call); break;
      case CollectiveKind::broadcast: broadcast(seq, call); break;
      case CollectiveKind::barrier: break;  // the descriptor exchange synchronized every rank
    }
  }

  // A refused call, in stream order: the descriptor exchange of collective #seq with this rank
  // marked aborted, so every peer fails #seq, and every peer's descriptor is received (a message
  // left unreceived could be matched by a later communicator that reuses the MPI context id).
  // Does not throw: the caller already got the Error when it enqueued the call.
  void refuse(std::uint64_t seq, const Call& call, const std::string& why) noexcept {
    abort(why);
    try {
      exchange_descriptors(seq, call);
    } catch (...) {
      // Expected: the exchange throws because this rank is aborted.
    }
  }

  // A task that will never run (its stream failed before it, or went away). This may run in a
  // destructor, so it must not wait for the peers: it posts the aborted descriptor and the
  // receives of the peers' descriptors and lets them complete on their own. The buffers stay
  // alive until the group goes away because MPI may use them after MPI_Request_free.
  void announce_abort(std::uint64_t seq, const Call& call, const std::string& why) noexcept {
    abort(why);
    try {
      std::lock_guard<std::mutex> lock(orphans_mutex_);
      orphans_.push_back(descriptor_of(seq, call, true));
      Descriptor* mine = &orphans_.back();
      for (int q = 0; q < size_; ++q) {
        if (q == rank_) continue;
        MPI_Request req;
        if (MPI_Isend(mine, sizeof *mine, MPI_BYTE, q, tag(seq, 0), comm_, &req) == MPI_SUCCESS) MPI_Request_free(&req);
        orphans_.emplace_back();
        if (MPI_Irecv(&orphans_.back(), sizeof(Descriptor), MPI_BYTE, q, tag(seq, 0), comm_, &req) == MPI_SUCCESS) MPI_Request_free(&req);
      }
    } catch (...) {
      // Without memory for the descriptors the peers cannot be told; nothing more can be done.
    }
  }

 private:
  int tag(std::uint64_t seq, int phase) const noexcept { return static_cast<int>((seq % tag_span_) * 3 + static_cast<std::uint64_t>(phase)); }

  // Requests in flight, each with its peer, so a timeout can say whom it waited for.
  struct Pending {
    std::vector<MPI_Request> reqs;
    std::vector<int> peer;
    std::vector<char> recv;  // 1: a receive (cancelled on timeout), 0: a send
    void reserve(std::size_t n) {
      reqs.reserve(n);
      peer.reserve(n);
      recv.reserve(n);
    }
  };

  void post_send(const void* p, std::size_t bytes, int peer, int t, Pending& pend) {
    for (std::size_t off = 0; off < bytes; off += kMaxMessage) {
      const int n = static_cast<int>(std::min(kMaxMessage, bytes - off));
      pend.reqs.emplace_back();
      pend.peer.push_back(peer);
      pend.recv.push_back(0);
      check(MPI_Isend(bytes_of(p) + off, n, MPI_BYTE, peer, t, comm_, &pend.reqs.back()), "MPI_Isend to rank " + std::to_string(peer));
    }
  }
  void post_recv(void* p, std::size_t bytes, int peer, int t, Pending& pend) {
    for (std::size_t off = 0; off < bytes; off += kMaxMessage) {
      const int n = static_cast<int>(std::min(kMaxMessage, bytes - off));
      pend.reqs.emplace_back();
      pend.peer.push_back(peer);
      pend.recv.push_back(1);
      check(MPI_Irecv(bytes_of(p) + off, n, MPI_BYTE, peer, t, comm_, &pend.reqs.back()), "MPI_Irecv from rank " + std::to_string(peer));
    }
  }
  // Waits for every request of `pend` within the group's timeout. Past it: the pending receives
  // are cancelled, the pending sends released, the group aborts, and this rank throws naming the
  // collective and the ranks it still waited for. A message that never had a peer to match it
  // is never read or written by MPI after that; buffers MPI may still touch are the caller's.
  void wait_all(Pending& pend, std::uint64_t seq, const Call& call, const char* what) {
    if (wait_all_until(pend.reqs, what)) {
      pend.peer.clear();
      pend.recv.clear();
      return;
    }
    std::vector<char> late(static_cast<std::size_t>(size_), 0);
    for (std::size_t i = 0; i < pend.reqs.size(); ++i) {
      MPI_Request& r = pend.reqs[i];
      if (r == MPI_REQUEST_NULL) continue;
      late[static_cast<std::size_t>(pend.peer[i])] = 1;
      if (pend.recv[i]) MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
    std::string missing;
    int n = 0;
    for (int q = 0; q < size_; ++q)
      if (late[static_cast<std::size_t>(q)]) missing += (n++ ? ", " : "") + std::to_string(q);
    const std::string why = label(rank_, seq, call) + " timed out after " + std::to_string(timeout_.count()) + " ms in its " +
                            what + ": " + (n == 1 ? "rank " : "ranks ") + missing +
                            " did not arrive (stalled, exited, or issued a different number of collectives)";
    abort(why);
    throw Error(ErrorCode::communication, "MPI " + why);
  }
  // MPI_Waitall with a deadline: tests the requests, sleeping a little longer each time (up to
  // 1 ms), until all completed (true; the requests are then MPI_REQUEST_NULL) or the group's
  // timeout passed (false; completed ones are MPI_REQUEST_NULL, pending ones left for the caller).
  bool wait_all_until(std::vector<MPI_Request>& reqs, const char* what) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    std::chrono::microseconds nap(1);
    for (;;) {
      int done = 0;
      check(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE), what);
      if (done) {
        reqs.clear();
        return true;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        // Testall leaves the array as it was when not all completed: find which did.
        for (MPI_Request& r : reqs) {
          int flag = 0;
          if (r != MPI_REQUEST_NULL) check(MPI_Test(&r, &flag, MPI_STATUS_IGNORE), what);
        }
        return false;
      }
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  void check(int rc, const std::string& what) {
    if (rc == MPI_SUCCESS) return;
    const std::string why = "MPI rank " + std::to_string(rank_) + ": " + what + " failed: " + detail_mpi::mpi_error_text(rc);
    abort(why);
    throw Error(ErrorCode::communication, why);
  }

  // Every rank's descriptor of collective #seq, within the timeout. This is where a rank that
  // never issues the collective (it stalled, returned, or issued one collective fewer) is seen:
  // past the deadline the group aborts and this rank throws, naming the ranks whose descriptors
  // never came. Their receives are cancelled; the descriptors (this rank's, which peers may still
  // receive, and the receive buffers) move to orphans_, which lives as long as the group.
  void exchange_descriptors(std::uint64_t seq, const Call& call) {
    const bool was_aborted = aborted();
    // [q]: rank q's; [size]: mine. On the heap so that, after a timeout, the buffers MPI may still
    // write (a cancel that lost the race) or read (a send not yet taken) stay where they are.
    auto owned = std::make_unique<std::vector<Descriptor>>(static_cast<std::size_t>(size_) + 1);
    std::vector<Descriptor>& box = *owned;
    Descriptor& mine = box.back();
    mine = descriptor_of(seq, call, was_aborted);
    Pending pend;
    pend.reserve(static_cast<std::size_t>(2 * size_));
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      post_recv(&box[static_cast<std::size_t>(q)], sizeof(Descriptor), q, tag(seq, 0), pend);
      post_send(&mine, sizeof(Descriptor), q, tag(seq, 0), pend);
    }
    try {
      wait_all(pend, seq, call, "descriptor exchange");
    } catch (...) {
      std::lock_guard<std::mutex> lock(orphans_mutex_);
      orphan_boxes_.push_back(std::move(owned));
      throw;
    }
    std::vector<Descriptor> theirs(box.begin(), box.end() - 1);
    theirs[static_cast<std::size_t>(rank_)] = mine;
    if (was_aborted)
      throw Error(ErrorCode::communication, "MPI communicator aborted (" + reason() + "); " + label(rank_, seq, call) + " cannot complete");
    for (int q = 0; q < size_; ++q) {
      const Descriptor& d = theirs[static_cast<std::size_t>(q)];
      if (d.aborted) {
        const std::string why = "MPI rank " + std::to_string(q) + " failed collective #" + std::to_string(seq) +
                                " (its communicator was aborted or its call was refused or dropped; see that rank's error); " +
                                label(rank_, seq, call) + " cannot complete";
        abort(why);
        throw Error(ErrorCode::communication, why);
      }
    }
    for (int q = 0; q < size_; ++q) {
      const Descriptor& d = theirs[static_cast<std::size_t>(q)];
      if (!same_collective(d, theirs[0])) {
        const std::string why = "MPI ranks disagree on collective #" + std::to_string(seq) + ": rank 0 issued " +
                                describe(theirs[0]) + " but rank " + std::to_string(q) + " issued " + describe(d) +
                                "; seen by rank " + std::to_string(rank_);
        abort(why);
        throw Error(ErrorCode::communication, why);
      }
    }
  }

  // Index of peer q's block in a scratch buffer of size-1 blocks (this rank needs no slot).
  std::size_t slot(int q) const noexcept { return static_cast<std::size_t>(q < rank_ ? q : q - 1); }

  // Per stream thread, reused across calls, so the steady state allocates nothing.
  static std::vector<unsigned char>& scratch(std::size_t bytes) {
    thread_local std::vector<unsigned char> buf;
    if (buf.size() < bytes) buf.resize(bytes);
    return buf;
  }

  void reduce_scatter(std::uint64_t seq, Call c) {
    const std::size_t bytes = c.count * size_of(c.dtype);
    if (bytes == 0) return;
    if (c.piecewise) {  // reduce_scatter_pieces: the pieces packed into one input first
      thread_local std::vector<unsigned char> packed;
      if (packed.size() < bytes * static_cast<std::size_t>(size_)) packed.resize(bytes * static_cast<std::size_t>(size_));
      comm::pack_pieces(c, size_, packed.data());
      c.send = packed.data();
    }
    unsigned char* tmp = scratch(bytes * static_cast<std::size_t>(size_ - 1)).data();
    Pending reqs;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      post_recv(tmp + slot(q) * bytes, bytes, q, tag(seq, 1), reqs);
      post_send(bytes_of(c.send) + static_cast<std::size_t>(q) * bytes, bytes, q, tag(seq, 1), reqs);
    }
    wait_all(reqs, seq, c, "reduce_scatter exchange");
    const unsigned char* own = bytes_of(c.send) + static_cast<std::size_t>(rank_) * bytes;
    reduce(size_, [&](int q) -> const void* { return q == rank_ ? own : tmp + slot(q) * bytes; }, c.recv, c.count, c.dtype, c.op);
  }

  void all_gather(std::uint64_t seq, const Call& c) {
    const std::size_t bytes = c.count * size_of(c.dtype);
    if (bytes == 0) return;
    Pending reqs;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      post_recv(bytes_of(c.recv) + static_cast<std::size_t>(q) * bytes, bytes, q, tag(seq, 1), reqs);
      post_send(c.send, bytes, q, tag(seq, 1), reqs);
    }
    unsigned char* mine = bytes_of(c.recv) + static_cast<std::size_t>(rank_) * bytes;
    if (c.send != mine) std::memcpy(mine, c.send, bytes);  // equal in the in-place form
    wait_all(reqs, seq, c, "all_gather exchange");
  }

  void all_reduce(std::uint64_t seq, const Call& c) {
    const std::size_t es = size_of(c.dtype);
    const std::size_t n = c.count;
    if (n == 0) return;
    const auto world = static_cast<std::size_t>(size_);
    // The in-process chunk split; any split gives the same bits, this one keeps the two alike.
    auto lo = [&](int q) {
      const auto r = static_cast<std::size_t>(q);
      return r * (n / world) + std::min(r, n % world);
    };
    auto len = [&](int q) { return n / world + (static_cast<std::size_t>(q) < n % world ? 1 : 0); };
    const std::size_t my_bytes = len(rank_) * es;
    unsigned char* tmp = scratch(my_bytes * (world - 1)).data();
    Pending reqs;
    // Phase 1: every rank sends chunk q of its input to rank q, which reduces it.
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      post_recv(tmp + slot(q) * my_bytes, my_bytes, q, tag(seq, 1), reqs);
      post_send(bytes_of(c.send) + lo(q) * es, len(q) * es, q, tag(seq, 1), reqs);
    }
    wait_all(reqs, seq, c, "all_reduce reduce phase");
    // The sends above have completed, so with send == recv chunks q != rank may now be
    // overwritten; this rank's chunk of send was never sent and is read before it is written.
    const unsigned char* own = bytes_of(c.send) + lo(rank_) * es;
    unsigned char* out = bytes_of(c.recv) + lo(rank_) * es;
    reduce(size_, [&](int q) -> const void* { return q == rank_ ? own : tmp + slot(q) * my_bytes; }, out, len(rank_), c.dtype, c.op);
    // Phase 2: every rank sends its reduced chunk to all.
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      post_recv(bytes_of(c.recv) + lo(q) * es, len(q) * es, q, tag(seq, 2), reqs);
      post_send(out, my_bytes, q, tag(seq, 2), reqs);
    }
    wait_all(reqs, seq, c, "all_reduce gather phase");
  }

  void broadcast(std::uint64_t seq, const Call& c) {
    const std::size_t bytes = c.count * size_of(c.dtype);
    if (bytes == 0) return;
    Pending reqs;
    if (rank_ == c.root) {
      for (int q = 0; q < size_; ++q)
        if (q != rank_) post_send(c.send, bytes, q, tag(seq, 1), reqs);
      if (c.send != c.recv) std::memcpy(c.recv, c.send, bytes);
    } else {
      post_recv(c.recv, bytes, c.root, tag(seq, 1), reqs);
    }
    wait_all(reqs, seq, c, "broadcast");
  }

  MPI_Comm comm_;
  const int rank_;
  const int size_;
  const std::chrono::milliseconds timeout_;
  std::uint64_t tag_span_ = 1;
  std::atomic<std::uint64_t> seq_{0};
  mutable std::mutex mutex_;
  bool aborted_ = false;
  std::string reason_;
  std::mutex orphans_mutex_;
  std::list<Descriptor> orphans_;  // a list: elements never move while MPI may read them
  std::vector<std::unique_ptr<std::vector<Descriptor>>> orphan_boxes_;  // timed-out exchanges
};

// "Must run exactly once": copying hands the duty to the copy (std::function may copy or move
// its target while it is queued), so only the object the stream finally holds is armed.

struct CollectiveTask {
  std::shared_ptr<MpiGroup> group;
  std::uint64_t seq = 0;
  Call call;
  RunOnce once;

  void operator()() const {
    once.disarm();
    group->run(seq, call);
  }
  ~CollectiveTask() {
    if (once.armed() && group) {
      std::string why;
      try {
        why = label(group->rank(), seq, call) + " was dropped without running (its stream had failed earlier or was destroyed)";
      } catch (...) {
      }
      group->announce_abort(seq, call, why);
    }
  }
};

// Enqueued in place of a refused call, so the peers fail collective #seq in stream order.
struct RefusedTask {
  std::shared_ptr<MpiGroup> group;
  std::uint64_t seq = 0;
  Call call;
  std::string why;
  RunOnce once;

  void operator()() const {
    once.disarm();
    group->refuse(seq, call, why);
  }
  ~RefusedTask() {
    if (once.armed() && group) group->announce_abort(seq, call, why);
  }
};

class MpiCommunicator final : public comm::CommunicatorBase {
 public:
  MpiCommunicator(std::shared_ptr<MpiGroup> group, Backend& backend)
      : CommunicatorBase("MPI rank"), group_(std::move(group)), backend_(backend) {}

  int rank() const noexcept override { return group_->rank(); }
  int size() const noexcept override { return group_->size(); }

 private:
  std::uint64_t next_seq() noexcept override { return group_->next_seq(); }

  void refused(const Call& c, std::uint64_t seq, const std::string& why, Stream& stream) noexcept override {
    try {
      backend_.host_task(stream, RefusedTask{group_, seq, c, why, {}});
    } catch (...) {
      group_->announce_abort(seq, c, why);
    }
  }

  void run(const Call& c, std::uint64_t seq, Stream& stream) override {
    // A failed enqueue destroys the task unrun, whose destructor tells the peers.
    backend_.host_task(stream, CollectiveTask{group_, seq, c, {}});
  }

  std::shared_ptr<MpiGroup> group_;
  Backend& backend_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(Backend& backend, std::chrono::milliseconds timeout) {
  require(timeout.count() > 0, ErrorCode::invalid_argument,
          "make_mpi_communicator: timeout must be positive, got " + std::to_string(timeout.count()) + " ms");
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  require(initialized && !finalized, ErrorCode::invalid_state,
          "make_mpi_communicator: MPI is not initialized (create a shardopt::MpiSession first)");
  int level = 0;
  MPI_Query_thread(&level);
  require(level == MPI_THREAD_MULTIPLE, ErrorCode::unsupported,
          "make_mpi_communicator: MPI provides thread level " + std::to_string(level) +
              ", but the communicator runs collectives on stream threads and needs MPI_THREAD_MULTIPLE (" +
              std::to_string(MPI_THREAD_MULTIPLE) + "); initialize MPI with MPI_Init_thread(MPI_THREAD_MULTIPLE) or use MpiSession");
  require(backend.host_accessible(), ErrorCode::unsupported,
          "make_mpi_communicator needs a backend whose memory the host can address (the CPU backend), got " +
              std::string(name_of(backend.kind())) + "; use the NCCL communicator for GPU memory");
  MPI_Comm comm = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "make_mpi_communicator: MPI_Comm_dup(MPI_COMM_WORLD)");
  // Errors come back as return codes (turned into shardopt::Error) instead of aborting the job.
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int rank = 0, size = 1, flag = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int* tag_ub = nullptr;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &flag);
  const int ub = (flag && tag_ub) ? *tag_ub : 32767;  // 32767 is the least the standard allows
  auto group = std::make_shared<MpiGroup>(comm, rank, size, ub, timeout);
  return std::make_unique<MpiCommunicator>(std::move(group), backend);
}

#endif  // SHARDOPT_HAS_MPI

}  // namespace shardopt
