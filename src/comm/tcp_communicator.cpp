// The TCP communicator: collectives of host-memory ranks in different processes without MPI
// (jobs started with torchrun-style variables, or srun without PMIx).
//
// Why every collective is one all-gather through rank 0: it reuses the TCP bootstrap's framing,
// deadlines and failure forwarding (a rank that dies closes its socket; rank 0 sees it and tells
// every other rank), so no new transport has to be made bounded. Each rank contributes what the
// others need (its whole input for a reduction) and reduces the ranks' copies itself in rank order
// with the in-process communicator's arithmetic (comm::reduce), so the bits equal in-process ranks'
// and the MPI communicator's. The price is traffic: every rank receives every rank's input, so the
// bytes grow with the square of the world size. It is the path for correctness and small jobs;
// mpirun (the MPI communicator) is the one for speed.
//
// Why a second rendezvous: the caller's bootstrap is not thread-safe, and the trainer uses it for
// its own exchanges while collectives run on stream threads. The communicator's traffic goes over
// a bootstrap of its own, on a port rank 0 picks and announces through the caller's bootstrap.
//
// Why collectives run in issue order: a bootstrap matches calls by their order, and a rank's
// streams may reach their collectives in any order. Each collective waits for its turn (its
// sequence number, the same on every rank) before it exchanges, so every process makes the
// bootstrap calls in the same order. An earlier collective always runs or is dropped (its task
// destroyed unrun), and both pass the turn on, so the wait ends; it is bounded by the timeout all
// the same.
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "comm/collective.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

namespace {

using comm::bytes_of;
using comm::Call;
using comm::RunOnce;

// What every rank sends ahead of its data. Raw bytes: every process runs the same build.
// Trivial (no initializers), so that it can be zeroed whole, padding included, before it is sent.
struct Header {
  std::uint64_t seq;
  std::uint64_t count;
  std::int32_t root;
  std::uint8_t kind, dtype, op;
  std::uint8_t aborted;  // the data is the sender's reason, and the collective fails everywhere
};

std::string label(int rank, std::uint64_t seq, const Call& c) { return comm::label("TCP rank", rank, seq, c); }

bool same_collective(const Header& a, const Header& b) noexcept {
  const auto k = static_cast<CollectiveKind>(a.kind);
  return a.seq == b.seq && a.kind == b.kind && a.count == b.count && a.dtype == b.dtype &&
         (!comm::reduces(k) || a.op == b.op) && (k != CollectiveKind::broadcast || a.root == b.root);
}

std::string describe(const Header& h) {
  return comm::describe(static_cast<CollectiveKind>(h.kind), h.count, static_cast<DType>(h.dtype),
                        static_cast<ReduceOp>(h.op), h.root);
}

class TcpGroup {
 public:
  TcpGroup(std::unique_ptr<Bootstrap> boot, std::chrono::milliseconds timeout)
      : boot_(std::move(boot)), rank_(boot_->rank()), size_(boot_->world_size()), timeout_(timeout) {}

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  std::uint64_t next_seq() noexcept { return seq_.fetch_add(1, std::memory_order_relaxed); }

  // Collective #seq, in turn. `refusal` non-null: this rank refused the call; the peers are told
  // and fail #seq too (this rank's caller already has its Error, so nothing is thrown here).
  void run(std::uint64_t seq, const Call& c, const std::string* refusal) {
    Turn turn(*this, seq, c);
    std::string reason;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (refusal && !aborted_) {
        aborted_ = true;
        reason_ = *refusal;
      }
      if (aborted_) reason = reason_;
    }
    // What this rank sends: the header, then its data (or, aborted, its reason).
    Header h;
    std::memset(&h, 0, sizeof h);  // the padding travels too
    h.seq = seq;
    h.count = c.count;
    h.root = c.root;
    h.kind = static_cast<std::uint8_t>(c.kind);
    h.dtype = static_cast<std::uint8_t>(c.dtype);
    h.op = static_cast<std::uint8_t>(c.op);
    h.aborted = reason.empty() ? 0 : 1;
    const std::size_t es = size_of(c.dtype);
    std::size_t data_bytes = 0;
    switch (c.kind) {
      case CollectiveKind::reduce_scatter: data_bytes = static_cast<std::size_t>(size_) * c.count * es; break;
      case CollectiveKind::all_gather:
      case CollectiveKind::all_reduce: data_bytes = c.count * es; break;
      case CollectiveKind::broadcast: data_bytes = rank_ == c.root ? c.count * es : 0; break;
      case CollectiveKind::barrier: break;
    }
    std::vector<std::byte> out(sizeof h + (h.aborted ? reason.size() : data_bytes));
    std::memcpy(out.data(), &h, sizeof h);
    if (h.aborted) std::memcpy(out.data() + sizeof h, reason.data(), reason.size());
    else if (c.piecewise && data_bytes) comm::pack_pieces(c, size_, out.data() + sizeof h);  // reduce_scatter_pieces
    else if (data_bytes) std::memcpy(out.data() + sizeof h, c.send, data_bytes);

    std::vector<std::vector<std::byte>> table;
    try {
      table = boot_->all_gather_bytes(out);
    } catch (const Error& e) {
      const std::string why = label(rank_, seq, c) + ": " + e.message();
      abort(why);
      throw Error(ErrorCode::communication, why);
    }
    if (refusal) return;
    // The first rank that failed, or that issued something else, fails every rank alike.
    std::vector<Header> hs(static_cast<std::size_t>(size_));
    for (int q = 0; q < size_; ++q) {
      const auto& t = table[static_cast<std::size_t>(q)];
      if (t.size() < sizeof(Header)) fail(seq, c, "rank " + std::to_string(q) + " sent a truncated collective header");
      std::memcpy(&hs[static_cast<std::size_t>(q)], t.data(), sizeof(Header));
    }
    for (int q = 0; q < size_; ++q)
      if (hs[static_cast<std::size_t>(q)].aborted) {
        const auto& t = table[static_cast<std::size_t>(q)];
        const std::string theirs(reinterpret_cast<const char*>(t.data()) + sizeof(Header), t.size() - sizeof(Header));
        fail(seq, c, q == rank_ ? theirs : "rank " + std::to_string(q) + " failed: " + theirs);
      }
    for (int q = 0; q < size_; ++q)
      if (!same_collective(hs[0], hs[static_cast<std::size_t>(q)]))
        fail(seq, c, "ranks disagree: rank 0 issued " + describe(hs[0]) + " as collective #" + std::to_string(hs[0].seq) +
                         ", rank " + std::to_string(q) + " issued " + describe(hs[static_cast<std::size_t>(q)]) +
                         " as collective #" + std::to_string(hs[static_cast<std::size_t>(q)].seq));
    auto data = [&](int q) { return table[static_cast<std::size_t>(q)].data() + sizeof(Header); };
    auto has = [&](int q, std::size_t n) {
      if (table[static_cast<std::size_t>(q)].size() - sizeof(Header) != n)
        fail(seq, c, "rank " + std::to_string(q) + " sent " + std::to_string(table[static_cast<std::size_t>(q)].size() - sizeof(Header)) +
                         " bytes, not " + std::to_string(n));
    };
    const std::size_t n = c.count * es;
    switch (c.kind) {
      case CollectiveKind::reduce_scatter: {
        for (int q = 0; q < size_; ++q) has(q, static_cast<std::size_t>(size_) * n);
        const std::size_t at = static_cast<std::size_t>(rank_) * n;
        comm::reduce(size_, [&](int q) -> const void* { return data(q) + at; }, 1, [&](int) { return c.recv; }, c.count, c.dtype, c.op);
        break;
      }
      case CollectiveKind::all_gather:
        for (int q = 0; q < size_; ++q) {
          has(q, n);
          if (n) std::memcpy(bytes_of(c.recv) + static_cast<std::size_t>(q) * n, data(q), n);
        }
        break;
      case CollectiveKind::all_reduce:
        for (int q = 0; q < size_; ++q) has(q, n);
        comm::reduce(size_, [&](int q) -> const void* { return data(q); }, 1, [&](int) { return c.recv; }, c.count, c.dtype, c.op);
        break;
      case CollectiveKind::broadcast:
        has(c.root, n);
        if (n) std::memcpy(c.recv, data(c.root), n);
        break;
      case CollectiveKind::barrier: break;
    }
  }

  // Task `seq` will never run (its stream failed earlier or went away): the group is aborted, and
  // its turn passes, so the collectives after it still meet the peers (and fail there with the
  // reason). Does not block: this may run in a destructor on any thread.
  void drop(std::uint64_t seq, const std::string& why) noexcept {
    abort(why);
    std::lock_guard<std::mutex> lock(turn_mutex_);
    try {
      dropped_.insert(seq);
    } catch (...) {
      // Without memory the turn cannot pass; the later collectives then time out.
    }
    advance();
    turn_cv_.notify_all();
  }

  void abort(const std::string& why) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    aborted_ = true;
    try {
      reason_ = why;
    } catch (...) {
      reason_.clear();
    }
    if (reason_.empty()) reason_ = "a TCP rank's collective failed";
  }

 private:
  // Holds collective #seq's turn: waits for it on construction, passes it on on destruction.
  struct Turn {
    TcpGroup& g;
    std::uint64_t seq;
    Turn(TcpGroup& group, std::uint64_t s, const Call& c) : g(group), seq(s) {
      std::unique_lock<std::mutex> lock(g.turn_mutex_);
      if (!g.turn_cv_.wait_for(lock, g.timeout_, [&] { return g.turn_ == seq; })) {
        const std::uint64_t waiting_for = g.turn_;
        lock.unlock();
        const std::string why = label(g.rank_, seq, c) + " timed out after " + std::to_string(g.timeout_.count()) +
                                " ms waiting for this rank's collective #" + std::to_string(waiting_for) +
                                " to run first (its stream is blocked)";
        g.drop(seq, why);
        throw Error(ErrorCode::communication, why);
      }
    }
    ~Turn() {
      std::lock_guard<std::mutex> lock(g.turn_mutex_);
      ++g.turn_;
      g.advance();
      g.turn_cv_.notify_all();
    }
  };

  void fail(std::uint64_t seq, const Call& c, const std::string& what) {
    const std::string why = label(rank_, seq, c) + ": " + what;
    abort(why);
    throw Error(ErrorCode::communication, why);
  }

  // Skips dropped collectives at the turn (turn_mutex_ held).
  void advance() noexcept {
    for (auto it = dropped_.find(turn_); it != dropped_.end(); it = dropped_.find(turn_)) {
      dropped_.erase(it);
      ++turn_;
    }
  }

  std::unique_ptr<Bootstrap> boot_;
  const int rank_;
  const int size_;
  const std::chrono::milliseconds timeout_;
  std::atomic<std::uint64_t> seq_{0};
  std::mutex turn_mutex_;
  std::condition_variable turn_cv_;
  std::uint64_t turn_ = 0;
  std::set<std::uint64_t> dropped_;
  std::mutex mutex_;
  bool aborted_ = false;
  std::string reason_;
};

struct CollectiveTask {
  std::shared_ptr<TcpGroup> group;
  std::uint64_t seq = 0;
  Call call;
  RunOnce once;

  void operator()() const {
    once.disarm();
    group->run(seq, call, nullptr);
  }
  ~CollectiveTask() {
    if (once.armed() && group) {
      std::string why;
      try {
        why = label(group->rank(), seq, call) + " was dropped without running (its stream had failed earlier or was destroyed)";
      } catch (...) {
      }
      group->drop(seq, why);
    }
  }
};

// Enqueued in place of a refused call, so the peers fail collective #seq in stream order.
struct RefusedTask {
  std::shared_ptr<TcpGroup> group;
  std::uint64_t seq = 0;
  Call call;
  std::string why;
  RunOnce once;

  void operator()() const {
    once.disarm();
    try {
      group->run(seq, call, &why);
    } catch (...) {
      // The caller already got the refusal's Error when it issued the call.
    }
  }
  ~RefusedTask() {
    if (once.armed() && group) group->drop(seq, why);
  }
};

class TcpCommunicator final : public comm::CommunicatorBase {
 public:
  TcpCommunicator(std::shared_ptr<TcpGroup> group, Backend& backend)
      : CommunicatorBase("TCP rank"), group_(std::move(group)), backend_(backend) {}

  int rank() const noexcept override { return group_->rank(); }
  int size() const noexcept override { return group_->size(); }

 private:
  std::uint64_t next_seq() noexcept override { return group_->next_seq(); }

  void refused(const Call& c, std::uint64_t seq, const std::string& why, Stream& stream) noexcept override {
    try {
      backend_.host_task(stream, RefusedTask{group_, seq, c, why, {}});
    } catch (...) {
      group_->drop(seq, why);
    }
  }

  void run(const Call& c, std::uint64_t seq, Stream& stream) override {
    // A failed enqueue destroys the task unrun, whose destructor passes its turn on.
    backend_.host_task(stream, CollectiveTask{group_, seq, c, {}});
  }

  std::shared_ptr<TcpGroup> group_;
  Backend& backend_;
};

// A port of `host` that is free now (bound, read back, released), or 0 with `error` set.
int free_port(const std::string& host, std::string& error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), "0", &hints, &res); rc != 0) {
    error = "cannot resolve '" + host + "': " + ::gai_strerror(rc);
    return 0;
  }
  int port = 0;
  error = "no address to bind";
  for (addrinfo* a = res; a && port == 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      if (ss.ss_family == AF_INET) port = ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
      if (ss.ss_family == AF_INET6) port = ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port);
    } else {
      error = std::strerror(errno);
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return port;
}

}  // namespace

std::unique_ptr<Communicator> make_tcp_communicator(Bootstrap& bootstrap, const std::string& master_addr, Backend& backend,
                                                    std::chrono::milliseconds timeout) {
  // Checked alike on every rank (same arguments), so no rank leaves the others in the exchange.
  require(timeout.count() > 0, ErrorCode::invalid_argument,
          "make_tcp_communicator: timeout must be positive, got " + std::to_string(timeout.count()) + " ms");
  require(!master_addr.empty(), ErrorCode::invalid_argument, "make_tcp_communicator: master_addr is empty");
  // Every rank says whether it can serve (collective): a rank that cannot fails every rank at
  // once, rather than leaving the others in the rendezvous until the timeout.
  std::string problem;
  if (!backend.host_accessible())
    problem = "make_tcp_communicator needs a backend whose memory the host can address (the CPU backend), got " +
              std::string(name_of(backend.kind()));
  const auto problems = bootstrap.all_gather_bytes(std::as_bytes(std::span<const char>(problem.data(), problem.size())));
  for (int q = 0; q < bootstrap.world_size(); ++q) {
    const auto& p = problems[static_cast<std::size_t>(q)];
    if (!p.empty())
      throw Error(q == bootstrap.rank() ? ErrorCode::unsupported : ErrorCode::communication,
                  (q == bootstrap.rank() ? std::string() : "rank " + std::to_string(q) + ": ") +
                      std::string(reinterpret_cast<const char*>(p.data()), p.size()));
  }
  // Rank 0 picks the port of the communicator's own rendezvous and announces it.
  std::string announce;
  if (bootstrap.rank() == 0) {
    std::string error;
    const int port = free_port(master_addr, error);
    announce = port == 0 ? "error make_tcp_communicator: rank 0 found no free port on '" + master_addr + "': " + error
                         : "port " + std::to_string(port);
  }
  const auto got = bootstrap.broadcast_bytes(std::as_bytes(std::span<const char>(announce.data(), announce.size())), 0);
  const std::string text(reinterpret_cast<const char*>(got.data()), got.size());
  if (text.rfind("error ", 0) == 0) throw Error(ErrorCode::communication, text.substr(6));
  if (text.rfind("port ", 0) != 0) throw Error(ErrorCode::communication, "make_tcp_communicator: rank 0 announced '" + text + "'");
  TcpRendezvous r;
  r.rank = bootstrap.rank();
  r.world_size = bootstrap.world_size();
  r.local_rank = bootstrap.local_rank();
  r.master_addr = master_addr;
  r.master_port = std::atoi(text.c_str() + 5);
  r.timeout = timeout;
  auto group = std::make_shared<TcpGroup>(make_tcp_bootstrap(r), timeout);
  return std::make_unique<TcpCommunicator>(std::move(group), backend);
}

}  // namespace shardopt
