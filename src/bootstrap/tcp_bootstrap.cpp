// The TCP bootstrap: a star around rank 0 on master_addr:master_port.
//
// Rendezvous: rank 0 listens; every other rank connects (retrying while rank 0 is not up yet)
// and sends a hello {magic, version, rank, world_size}. Rank 0 waits until all world_size-1 ranks
// are there or the deadline passes, checks that they agree on the world size and are distinct,
// and answers each with OK or with an ERROR frame that carries the reason, so every rank that
// arrived throws the same message. A rank that cannot reach rank 0 before its deadline throws on
// its own. Every later call is a gather to rank 0 and a scatter back, each receive bounded by the
// timeout; a failure rank 0 sees is forwarded to every rank as an ERROR frame.
//
// Every socket is non-blocking and every wait is a poll() with the time left, so no call blocks
// past its deadline, including connect() to an address that does not answer.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/posix_io.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint32_t kMagic = 0x53485244;  // "SHRD"
constexpr std::uint32_t kVersion = 1;
enum Frame : std::uint32_t { kHello = 1, kOk = 2, kError = 3, kData = 4 };
constexpr std::uint64_t kMaxFrame = std::uint64_t(1) << 30;  // setup data, not tensors

struct FrameHeader {
  std::uint32_t type = 0;
  std::int32_t arg = 0;  // hello: rank; data: the root the sender names (-1: none)
  std::uint64_t length = 0;
};

// Owned socket descriptors: the library's one owning descriptor type (core/posix_io.hpp).
using io::Fd;

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

std::string sys_error(int err) { return std::string(std::strerror(err)); }

void set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// Thrown inside this file for "rank 0 sent an error frame": its text is already the message.
struct Remote {
  std::string message;
};

class Link {
 public:
  Link(Fd fd, std::string peer) : fd_(std::move(fd)), peer_(std::move(peer)) {}
  const std::string& peer() const noexcept { return peer_; }
  void set_peer(std::string peer) { peer_ = std::move(peer); }

  // Sends all of [p, p+n) before the deadline or throws.
  void send_all(const void* p, std::size_t n, Clock::time_point deadline, const std::string& what) {
    const auto* b = static_cast<const unsigned char*>(p);
    while (n > 0) {
      const ssize_t k = ::send(fd_.get(), b, n, MSG_NOSIGNAL);
      if (k > 0) {
        b += k;
        n -= static_cast<std::size_t>(k);
        continue;
      }
      if (k < 0 && errno == EINTR) continue;
      if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wait(POLLOUT, deadline, what);
        continue;
      }
      throw Error(ErrorCode::communication, what + ": sending to " + peer_ + " failed: " + sys_error(errno));
    }
  }
  void recv_all(void* p, std::size_t n, Clock::time_point deadline, const std::string& what) {
    auto* b = static_cast<unsigned char*>(p);
    while (n > 0) {
      const ssize_t k = ::recv(fd_.get(), b, n, 0);
      if (k > 0) {
        b += k;
        n -= static_cast<std::size_t>(k);
        continue;
      }
      if (k == 0) throw Error(ErrorCode::communication, what + ": " + peer_ + " closed the connection (it failed or exited)");
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait(POLLIN, deadline, what);
        continue;
      }
      throw Error(ErrorCode::communication, what + ": receiving from " + peer_ + " failed: " + sys_error(errno));
    }
  }

  void send_frame(Frame type, std::int32_t arg, const void* data, std::size_t n, Clock::time_point deadline, const std::string& what) {
    FrameHeader h{type, arg, n};
    send_all(&h, sizeof h, deadline, what);
    if (n) send_all(data, n, deadline, what);
  }
  // Receives one frame; an ERROR frame is thrown as Remote.
  std::vector<std::byte> recv_frame(Frame expected, std::int32_t* arg, Clock::time_point deadline, const std::string& what) {
    FrameHeader h;
    recv_all(&h, sizeof h, deadline, what);
    if (h.length > kMaxFrame)
      throw Error(ErrorCode::communication, what + ": " + peer_ + " sent a frame of " + std::to_string(h.length) + " bytes (corrupt stream or not a shardopt peer)");
    std::vector<std::byte> body(static_cast<std::size_t>(h.length));
    if (!body.empty()) recv_all(body.data(), body.size(), deadline, what);
    if (h.type == kError) throw Remote{std::string(reinterpret_cast<const char*>(body.data()), body.size())};
    if (h.type != expected)
      throw Error(ErrorCode::communication, what + ": " + peer_ + " sent frame type " + std::to_string(h.type) + ", expected " + std::to_string(expected));
    if (arg) *arg = h.arg;
    return body;
  }

  // Best effort, short deadline: the peer may be gone already. Then what the peer already sent,
  // and this rank will not read, is read and dropped: a socket closed with unread data resets the
  // connection, and the reset can discard the error frame before the peer has read it.
  void send_error(const std::string& message) noexcept {
    try {
      send_frame(kError, 0, message.data(), message.size(), Clock::now() + std::chrono::seconds(2), "error report");
    } catch (...) {
    }
    char sink[4096];
    for (int i = 0; i < (1 << 18); ++i) {  // at most 1 GiB, a frame's limit
      const ssize_t k = ::recv(fd_.get(), sink, sizeof sink, MSG_DONTWAIT);
      if (k > 0 || (k < 0 && errno == EINTR)) continue;
      break;
    }
  }

 private:
  void wait(short events, Clock::time_point deadline, const std::string& what) {
    for (;;) {
      const int left = ms_left(deadline);
      if (left == 0) throw Error(ErrorCode::communication, what + ": timed out waiting for " + peer_);
      pollfd p{fd_.get(), events, 0};
      const int rc = ::poll(&p, 1, left);
      if (rc > 0) return;
      if (rc < 0 && errno != EINTR) throw Error(ErrorCode::communication, what + ": poll on " + peer_ + " failed: " + sys_error(errno));
    }
  }

  Fd fd_;
  std::string peer_;
};

std::vector<addrinfo> resolve(const std::string& host, int port, bool passive, std::string& canonical, const std::string& who) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0)
    throw Error(ErrorCode::communication, who + ": cannot resolve master address '" + host + "': " + ::gai_strerror(rc));
  std::vector<addrinfo> out;
  canonical = host + ":" + service;
  // The addrinfo list is copied out with its sockaddr storage kept alive by the static list
  // below; callers use each entry before the next resolve.
  thread_local std::vector<std::vector<unsigned char>> storage;
  storage.clear();
  for (addrinfo* a = res; a; a = a->ai_next) {
    storage.emplace_back(reinterpret_cast<unsigned char*>(a->ai_addr), reinterpret_cast<unsigned char*>(a->ai_addr) + a->ai_addrlen);
    addrinfo copy = *a;
    copy.ai_next = nullptr;
    copy.ai_canonname = nullptr;
    out.push_back(copy);
  }
  for (std::size_t i = 0; i < out.size(); ++i) out[i].ai_addr = reinterpret_cast<sockaddr*>(storage[i].data());
  ::freeaddrinfo(res);
  return out;
}

void tune(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // small frames, answered at once
}

class TcpBootstrap final : public Bootstrap {
 public:
  explicit TcpBootstrap(const TcpRendezvous& r) : r_(r) {
    who_ = "TCP bootstrap (rank " + std::to_string(r.rank) + " of " + std::to_string(r.world_size) + ", master " + r.master_addr + ":" +
           std::to_string(r.master_port) + ")";
    if (r_.world_size == 1) return;
    if (r_.rank == 0)
      listen_and_accept();
    else
      connect_to_master();
  }

  std::string_view kind() const noexcept override { return "tcp"; }
  int rank() const noexcept override { return r_.rank; }
  int world_size() const noexcept override { return r_.world_size; }
  int local_rank() const noexcept override { return r_.local_rank; }

  std::vector<std::vector<std::byte>> all_gather_bytes(std::span<const std::byte> data) override {
    return gather_scatter(data, -1, "all_gather_bytes");
  }

  std::vector<std::byte> broadcast_bytes(std::span<const std::byte> data, int root) override {
    require(root >= 0 && root < r_.world_size, ErrorCode::invalid_argument,
            who_ + " broadcast_bytes: root " + std::to_string(root) + " is outside [0, " + std::to_string(r_.world_size) + ")");
    // Only the root's bytes travel; the others send an empty frame that names the root they
    // expect, which rank 0 checks.
    auto all = gather_scatter(r_.rank == root ? data : std::span<const std::byte>{}, root, "broadcast_bytes");
    return std::move(all[static_cast<std::size_t>(root)]);
  }

 private:
  void listen_and_accept() {
    const auto deadline = Clock::now() + r_.timeout;
    std::string where;
    const auto addrs = resolve(r_.master_addr, r_.master_port, true, where, who_);
    Fd listener;
    std::string last_error = "no address";
    for (const addrinfo& a : addrs) {
      Fd fd(::socket(a.ai_family, a.ai_socktype | SOCK_CLOEXEC, a.ai_protocol), "listening socket");
      if (!fd) {
        last_error = sys_error(errno);
        continue;
      }
      int one = 1;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);  // restarts within TIME_WAIT
      if (::bind(fd.get(), a.ai_addr, a.ai_addrlen) != 0 || ::listen(fd.get(), 128) != 0) {
        last_error = sys_error(errno);
        continue;
      }
      listener = std::move(fd);
      break;
    }
    if (!listener)
      throw Error(ErrorCode::communication, who_ + ": rank 0 cannot listen on " + where + ": " + last_error +
                                                " (is MASTER_PORT in use, or MASTER_ADDR not an address of this machine?)");
    set_nonblocking(listener.get());

    links_.resize(static_cast<std::size_t>(r_.world_size));
    std::vector<std::unique_ptr<Link>> pending;  // connected, hello not read yet
    int joined = 0;
    std::string failure;
    while (joined < r_.world_size - 1 && failure.empty()) {
      const int left = ms_left(deadline);
      if (left == 0) break;
      pollfd p{listener.get(), POLLIN, 0};
      const int rc = ::poll(&p, 1, std::min(left, 100));
      if (rc <= 0) continue;
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      Fd c(::accept4(listener.get(), reinterpret_cast<sockaddr*>(&ss), &len, SOCK_CLOEXEC | SOCK_NONBLOCK), "accepted socket");
      if (!c) continue;
      tune(c.get());
      auto link = std::make_unique<Link>(std::move(c), "a connecting process");
      struct Hello {
        std::uint32_t magic, version;
        std::int32_t rank, world;
      } hello{};
      try {
        // A hello is a few bytes sent right after connect; a peer that does not send it within a
        // second is not a shardopt rank (a port scanner, a stale process) and is dropped.
        link->recv_all(&hello, sizeof hello, std::min(deadline, Clock::now() + std::chrono::seconds(1)), who_ + " rendezvous");
      } catch (const Error&) {
        continue;
      }
      if (hello.magic != kMagic || hello.version != kVersion) continue;  // not ours
      const std::string peer = "rank " + std::to_string(hello.rank);
      if (hello.world != r_.world_size) {
        failure = "ranks disagree on the world size: rank 0 has WORLD_SIZE=" + std::to_string(r_.world_size) + " but " + peer +
                  " has " + std::to_string(hello.world);
      } else if (hello.rank <= 0 || hello.rank >= r_.world_size) {
        failure = "a process announced rank " + std::to_string(hello.rank) + ", outside [1, " + std::to_string(r_.world_size) + ")";
      } else if (links_[static_cast<std::size_t>(hello.rank)]) {
        failure = "two processes announced rank " + std::to_string(hello.rank);
      }
      if (!failure.empty()) {
        pending_failure_links_.push_back(std::move(link));
        break;
      }
      link->set_peer(peer);
      links_[static_cast<std::size_t>(hello.rank)] = std::move(link);
      ++joined;
    }
    if (failure.empty() && joined < r_.world_size - 1) {
      std::string missing;
      int shown = 0;
      for (int q = 1; q < r_.world_size; ++q)
        if (!links_[static_cast<std::size_t>(q)]) {
          if (shown++ < 16) missing += (missing.empty() ? "" : ", ") + std::to_string(q);
        }
      if (shown > 16) missing += ", ...";
      failure = "rendezvous timed out after " + std::to_string(r_.timeout.count()) + " ms: " + std::to_string(r_.world_size - 1 - joined) +
                " of " + std::to_string(r_.world_size) + " ranks never joined (missing: " + missing + ")";
    }
    if (!failure.empty()) {
      const std::string message = who_ + ": " + failure;
      for (auto& l : links_)
        if (l) l->send_error(message);
      for (auto& l : pending_failure_links_) l->send_error(message);
      throw Error(ErrorCode::communication, message);
    }
    for (int q = 1; q < r_.world_size; ++q) links_[static_cast<std::size_t>(q)]->send_frame(kOk, 0, nullptr, 0, deadline + r_.timeout, who_ + " rendezvous");
  }

  void connect_to_master() {
    // Rank 0 answers when everybody has joined or its own deadline passes, which can be up to
    // the launch skew later than ours: wait for the answer a little longer than the timeout.
    const auto start = Clock::now();
    const auto deadline = start + r_.timeout;
    const auto answer_deadline = deadline + std::max<BootstrapTimeout>(std::chrono::seconds(2), r_.timeout / 2);
    std::string where;
    std::string last_error = "no attempt";
    Fd fd;
    while (!fd) {
      if (Clock::now() >= deadline) break;
      const auto addrs = resolve(r_.master_addr, r_.master_port, false, where, who_);
      for (const addrinfo& a : addrs) {
        Fd s(::socket(a.ai_family, a.ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a.ai_protocol), "socket");
        if (!s) {
          last_error = sys_error(errno);
          continue;
        }
        int rc = ::connect(s.get(), a.ai_addr, a.ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
          pollfd p{s.get(), POLLOUT, 0};
          rc = ::poll(&p, 1, std::min(ms_left(deadline), 2000));
          int err = 0;
          socklen_t len = sizeof err;
          if (rc > 0 && ::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
            rc = 0;
          } else {
            errno = rc == 0 ? ETIMEDOUT : (err ? err : errno);
            rc = -1;
          }
        }
        if (rc == 0) {
          fd = std::move(s);
          break;
        }
        last_error = sys_error(errno);
      }
      if (!fd) std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50, ms_left(deadline))));
    }
    if (!fd)
      throw Error(ErrorCode::communication, who_ + ": rendezvous timed out after " + std::to_string(r_.timeout.count()) +
                                                " ms: could not reach rank 0 at " + where + " (last error: " + last_error + ")");
    tune(fd.get());
    master_ = std::make_unique<Link>(std::move(fd), "rank 0 (" + where + ")");
    struct {
      std::uint32_t magic, version;
      std::int32_t rank, world;
    } hello{kMagic, kVersion, r_.rank, r_.world_size};
    try {
      master_->send_all(&hello, sizeof hello, answer_deadline, who_ + " rendezvous");
      master_->recv_frame(kOk, nullptr, answer_deadline, who_ + " rendezvous");
    } catch (const Remote& e) {
      throw Error(ErrorCode::communication, e.message + "; seen by rank " + std::to_string(r_.rank));
    } catch (const Error& e) {
      throw Error(ErrorCode::communication, who_ + ": connected to rank 0 but the rendezvous did not complete: " + e.message());
    }
  }

  // Every rank sends its bytes (and the root it names) to rank 0; rank 0 checks the roots agree
  // and sends everyone the table (or only the root's entry when root >= 0).
  std::vector<std::vector<std::byte>> gather_scatter(std::span<const std::byte> data, int root, const char* op) {
    const std::string what = who_ + " " + op;
    std::vector<std::vector<std::byte>> table(static_cast<std::size_t>(r_.world_size));
    if (r_.world_size == 1) {
      table[0].assign(data.begin(), data.end());
      return table;
    }
    require(data.size() <= kMaxFrame, ErrorCode::invalid_argument, what + ": " + std::to_string(data.size()) + " bytes is more than the bootstrap carries (1 GiB)");
    const auto deadline = Clock::now() + r_.timeout;
    if (r_.rank != 0) {
      try {
        master_->send_frame(kData, root, data.data(), data.size(), deadline, what);
        auto flat = master_->recv_frame(kData, nullptr, deadline, what);
        return unpack(flat, what);
      } catch (const Remote& e) {
        throw Error(ErrorCode::communication, e.message + "; seen by rank " + std::to_string(r_.rank));
      }
    }
    std::string failure;
    table[0].assign(data.begin(), data.end());
    for (int q = 1; q < r_.world_size && failure.empty(); ++q) {
      try {
        std::int32_t their_root = 0;
        table[static_cast<std::size_t>(q)] = links_[static_cast<std::size_t>(q)]->recv_frame(kData, &their_root, deadline, what);
        if (their_root != root)
          failure = what + ": ranks disagree: rank 0 called it with root " + std::to_string(root) + " but rank " + std::to_string(q) +
                    " with root " + std::to_string(their_root) + " (-1: all_gather_bytes)";
      } catch (const Remote& e) {
        failure = e.message;
      } catch (const Error& e) {
        failure = e.message();
      }
    }
    if (!failure.empty()) {
      for (int q = 1; q < r_.world_size; ++q) links_[static_cast<std::size_t>(q)]->send_error(failure);
      throw Error(ErrorCode::communication, failure + "; seen by rank 0");
    }
    std::vector<std::byte> flat;
    if (root >= 0) {
      for (auto& t : table)
        if (&t != &table[static_cast<std::size_t>(root)]) t.clear();
    }
    pack(table, flat);
    for (int q = 1; q < r_.world_size; ++q) links_[static_cast<std::size_t>(q)]->send_frame(kData, root, flat.data(), flat.size(), deadline, what);
    return table;
  }

  static void pack(const std::vector<std::vector<std::byte>>& table, std::vector<std::byte>& flat) {
    for (const auto& t : table) {
      const std::uint64_t n = t.size();
      const auto* p = reinterpret_cast<const std::byte*>(&n);
      flat.insert(flat.end(), p, p + sizeof n);
      flat.insert(flat.end(), t.begin(), t.end());
    }
  }
  std::vector<std::vector<std::byte>> unpack(const std::vector<std::byte>& flat, const std::string& what) const {
    std::vector<std::vector<std::byte>> table(static_cast<std::size_t>(r_.world_size));
    std::size_t at = 0;
    for (auto& t : table) {
      std::uint64_t n = 0;
      if (flat.size() - at < sizeof n) throw Error(ErrorCode::communication, what + ": rank 0 sent a truncated table");
      std::memcpy(&n, flat.data() + at, sizeof n);
      at += sizeof n;
      if (flat.size() - at < n) throw Error(ErrorCode::communication, what + ": rank 0 sent a truncated table");
      t.assign(flat.begin() + static_cast<std::ptrdiff_t>(at), flat.begin() + static_cast<std::ptrdiff_t>(at + n));
      at += static_cast<std::size_t>(n);
    }
    return table;
  }

  TcpRendezvous r_;
  std::string who_;
  std::vector<std::unique_ptr<Link>> links_;  // rank 0: by rank (0 unused)
  std::vector<std::unique_ptr<Link>> pending_failure_links_;
  std::unique_ptr<Link> master_;  // other ranks
};

}  // namespace

std::unique_ptr<Bootstrap> make_tcp_bootstrap(const TcpRendezvous& r) {
  require(r.world_size >= 1, ErrorCode::invalid_argument, "TCP bootstrap: world_size must be at least 1, got " + std::to_string(r.world_size));
  require(r.rank >= 0 && r.rank < r.world_size, ErrorCode::invalid_argument,
          "TCP bootstrap: rank " + std::to_string(r.rank) + " is outside [0, " + std::to_string(r.world_size) + ")");
  require(r.local_rank >= 0, ErrorCode::invalid_argument, "TCP bootstrap: local_rank " + std::to_string(r.local_rank) + " is negative");
  require(r.master_port > 0 && r.master_port < 65536, ErrorCode::invalid_argument,
          "TCP bootstrap: master_port " + std::to_string(r.master_port) + " is outside [1, 65535]");
  require(!r.master_addr.empty(), ErrorCode::invalid_argument, "TCP bootstrap: master_addr is empty");
  require(r.timeout.count() > 0, ErrorCode::invalid_argument, "TCP bootstrap: timeout must be positive");
  return std::make_unique<TcpBootstrap>(r);
}

}  // namespace shardopt
