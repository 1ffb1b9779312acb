#include "offload/nvme_store.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "engine/plan.hpp"
#include "core/posix_io.hpp"
#include "offload/test_hooks.hpp"
#include "shardopt/error.hpp"

namespace shardopt::offload {
namespace {

constexpr std::uint64_t kMagic = 0x314e4f5444524853ull;  // "SHRDTON1"

struct Header {
  std::uint64_t magic, generation, active, cells, cell_bytes, checksum;
};

std::uint64_t checksum_of(const Header& h) {
  std::uint64_t x = 1469598103934665603ull;
  for (std::uint64_t v : {h.magic, h.generation, h.active, h.cells, h.cell_bytes}) x = (x ^ v) * 1099511628211ull;
  return x;
}

using io::errno_text;

// The fault hook: decides, per data read/write, whether to fail it or make it short.
enum class Fault { none, fail, short_io };
Fault next_fault(bool write) {
  TestHooks& h = test_hooks();
  const long n = (write ? h.writes : h.reads).fetch_add(1) + 1;
  std::atomic<long>& at = write ? h.fail_write_at : h.fail_read_at;
  if (at.load() != 0 && n == at.load()) {
    at.store(0);
    return h.short_io.load() ? Fault::short_io : Fault::fail;
  }
  return Fault::none;
}

// liburing is loaded at run time (dlopen), not linked: the core library's link interface then
// names no liburing, so a program that never asks for offload_optimizer=nvme neither links nor
// loads it. Only the library's exported functions go through these pointers; the header's inline
// helpers (io_uring_prep_*, io_uring_cqe_seen, ...) touch the shared rings directly and need none.
// io_uring_get_sqe is resolved too: liburing.h makes it inline in some versions and exported in
// others, and it is exported in all of them (LIBURING_2.0). The library is never unloaded.
struct Uring {
  int (*queue_init)(unsigned entries, io_uring* ring, unsigned flags) = nullptr;
  void (*queue_exit)(io_uring* ring) = nullptr;
  io_uring_sqe* (*get_sqe)(io_uring* ring) = nullptr;
  int (*submit)(io_uring* ring) = nullptr;
  int (*get_cqe)(io_uring* ring, io_uring_cqe** cqe, unsigned submit, unsigned wait_nr, sigset_t* sigmask) = nullptr;
  std::string error;  // empty when every pointer is set
};

const Uring& uring_library() {
  static Uring u;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = ::dlopen("liburing.so.2", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* why = ::dlerror();
      u.error = std::string("cannot load liburing.so.2 (") + (why ? why : "unknown reason") + "); install liburing2";
      return;
    }
    auto sym = [&](const char* name, auto& fn) {
      void* p = ::dlsym(h, name);
      if (p == nullptr && u.error.empty()) u.error = std::string("liburing.so.2 lacks ") + name;
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    sym("io_uring_queue_init", u.queue_init);
    sym("io_uring_queue_exit", u.queue_exit);
    sym("io_uring_get_sqe", u.get_sqe);
    sym("io_uring_submit", u.submit);
    sym("__io_uring_get_cqe", u.get_cqe);
  });
  return u;
}

// The loaded library, or Error(unsupported) naming the directory and why it could not be loaded.
const Uring& uring_for(const std::string& dir) {
  const Uring& u = uring_library();
  if (!u.error.empty())
    throw Error(ErrorCode::unsupported, "offload_optimizer=nvme (nvme_dir '" + dir + "'): " + u.error);
  return u;
}

struct AlignedFree {
  void operator()(void* p) const noexcept { std::free(p); }
};

}  // namespace

void NvmeStore::check_directory(const std::string& dir, int rank, std::size_t file_bytes) {
  (void)uring_for(dir);  // refused before anything is created when liburing cannot be loaded
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0)
    throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "': cannot use it: " + errno_text(errno));
  if (!S_ISDIR(st.st_mode)) throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "' is not a directory");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "' is not writable: " + errno_text(errno));
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) != 0)
    throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "': statvfs failed: " + errno_text(errno));
  const unsigned long long avail = static_cast<unsigned long long>(vfs.f_bavail) * vfs.f_frsize;
  if (avail < file_bytes)
    throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "' has " + std::to_string(avail) +
                                         " bytes free; rank " + std::to_string(rank) + " needs " +
                                         std::to_string(file_bytes) + " bytes for its optimizer state file");
}

NvmeStore::NvmeStore(const std::string& dir, int rank, int world, std::size_t cells, std::size_t cell_bytes,
                     std::size_t file_bytes)
    : dir_(dir), cells_(cells), cell_bytes_(cell_bytes), file_bytes_(file_bytes) {
  check_directory(dir, rank, file_bytes);
  path_ = dir + (dir.empty() || dir.back() == '/' ? "" : "/") + "shardopt-optimizer-rank" + std::to_string(rank) +
          "-of" + std::to_string(world) + ".bin";
  const int flags = O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC;
  int fd = ::open(path_.c_str(), flags | O_DIRECT, 0600);
  int err = errno;
  if (fd >= 0) {
    direct_ = true;
  } else if (err == EINVAL) {
    fd = ::open(path_.c_str(), flags, 0600);
    err = errno;
    note_ = "the filesystem of '" + dir + "' refuses O_DIRECT (tmpfs does): using buffered I/O";
  }
  if (fd < 0) throw Error(ErrorCode::io_error, "nvme_dir '" + dir + "': cannot create '" + path_ + "': " + errno_text(err));
  fd_ = io::Fd(fd, path_);
  auto cleanup = [&] {
    fd_.reset();
    ::unlink(path_.c_str());
  };
  // Reserve the blocks now so a full disk is found at initialize(), not in the middle of a step.
  const int fa = ::posix_fallocate(fd_.get(), 0, static_cast<off_t>(file_bytes));
  if (fa != 0) {
    cleanup();
    throw Error(ErrorCode::io_error, "'" + path_ + "': reserving " + std::to_string(file_bytes) +
                                         " bytes (posix_fallocate) failed: " + errno_text(fa));
  }
  ring_ = new io_uring;
  const int qi = uring_for(dir_).queue_init(2 * kSlots, ring_, 0);
  if (qi < 0) {
    delete ring_;
    ring_ = nullptr;
    cleanup();
    throw Error(ErrorCode::io_error, "'" + path_ + "': io_uring_queue_init failed: " + errno_text(-qi));
  }
  if (!direct_ && !note_.empty()) std::fprintf(stderr, "shardopt: note: %s\n", note_.c_str());
}

NvmeStore::~NvmeStore() {
  drain();
  if (ring_) {
    uring_library().queue_exit(ring_);  // a ring exists only if the library loaded
    delete ring_;
  }
  if (fd_) {
    fd_.reset();
    ::unlink(path_.c_str());
  }
}

std::size_t NvmeStore::cell_offset(int half, std::size_t cell) const noexcept {
  return detail::kNvmeHeaderBytes + (static_cast<std::size_t>(half) * cells_ + cell) * cell_bytes_;
}

void NvmeStore::fail(const std::string& op, int err, std::size_t offset, std::size_t bytes) const {
  throw Error(ErrorCode::io_error, "'" + path_ + "': " + op + " of " + std::to_string(bytes) + " bytes at offset " +
                                       std::to_string(offset) + " failed: " + errno_text(err));
}

void NvmeStore::submit(bool write, std::size_t cell, void* buf, int slot) {
  if (slot < 0 || slot >= kSlots || cell >= cells_)
    throw Error(ErrorCode::internal, "'" + path_ + "': I/O slot " + std::to_string(slot) + " / cell " +
                                         std::to_string(cell) + " out of range");
  Op& op = ops_[write][slot];
  if (op.busy) throw Error(ErrorCode::internal, "'" + path_ + "': I/O slot " + std::to_string(slot) + " reused while busy");
  op = Op{};
  op.busy = true;
  op.want = cell_bytes_;
  op.offset = cell_offset(write ? 1 - active_ : active_, cell);
  unsigned len = static_cast<unsigned>(cell_bytes_);
  switch (next_fault(write)) {
    case Fault::fail:  // never reaches the disk
      op.done = true;
      op.result = -EIO;
      return;
    case Fault::short_io:  // really transfers only part: the half-written cell must not matter
      len = static_cast<unsigned>(std::max<std::size_t>(detail::kNvmeAlign, (cell_bytes_ / 2) / detail::kNvmeAlign * detail::kNvmeAlign));
      if (len >= cell_bytes_) len = static_cast<unsigned>(cell_bytes_ - detail::kNvmeAlign);
      break;
    case Fault::none: break;
  }
  io_uring_sqe* sqe = uring_library().get_sqe(ring_);
  if (sqe == nullptr) {
    op.busy = false;
    throw Error(ErrorCode::io_error, "'" + path_ + "': io_uring submission queue full");
  }
  if (write) io_uring_prep_write(sqe, fd_.get(), buf, len, static_cast<__u64>(op.offset));
  else io_uring_prep_read(sqe, fd_.get(), buf, len, static_cast<__u64>(op.offset));
  io_uring_sqe_set_data64(sqe, static_cast<__u64>(write) * kSlots + static_cast<__u64>(slot));
  const int s = uring_library().submit(ring_);
  if (s < 0) {
    op.busy = false;
    fail(write ? "io_uring_submit (write)" : "io_uring_submit (read)", -s, op.offset, cell_bytes_);
  }
  ++in_flight_;
}

void NvmeStore::reap_one() {
  io_uring_cqe* cqe = nullptr;
  int rc;
  do rc = uring_library().get_cqe(ring_, &cqe, 0, 1, nullptr);  // what io_uring_wait_cqe does
  while (rc == -EINTR);
  if (rc < 0) throw Error(ErrorCode::io_error, "'" + path_ + "': io_uring_wait_cqe failed: " + errno_text(-rc));
  const __u64 tag = io_uring_cqe_get_data64(cqe);
  const long res = cqe->res;
  io_uring_cqe_seen(ring_, cqe);
  Op& op = ops_[tag / kSlots][tag % kSlots];
  op.done = true;
  op.result = res;
  --in_flight_;
}

void NvmeStore::wait(bool write, int slot) {
  Op& op = ops_[write][slot];
  if (!op.busy) return;
  while (!op.done) reap_one();
  op.busy = false;
  const char* what = write ? "write" : "read";
  if (op.result < 0) fail(what, static_cast<int>(-op.result), op.offset, op.want);
  if (static_cast<std::size_t>(op.result) != op.want)
    throw Error(ErrorCode::io_error, "'" + path_ + "': short " + what + " at offset " + std::to_string(op.offset) +
                                         ": " + std::to_string(op.result) + " of " + std::to_string(op.want) +
                                         " bytes");
}

void NvmeStore::submit_read(std::size_t cell, void* buf, int slot) { submit(false, cell, buf, slot); }
void NvmeStore::submit_write(std::size_t cell, const void* buf, int slot) {
  submit(true, cell, const_cast<void*>(buf), slot);
}
void NvmeStore::wait_read(int slot) { wait(false, slot); }
void NvmeStore::wait_write(int slot) { wait(true, slot); }

void NvmeStore::drain() noexcept {
  try {
    while (in_flight_ > 0) reap_one();
  } catch (...) {
    // the ring itself failed: nothing more can be waited for
    in_flight_ = 0;
  }
  for (auto& side : ops_)
    for (Op& op : side) op.busy = false;
}

void NvmeStore::write_header(int slot, std::uint64_t generation, int active) {
  std::unique_ptr<void, AlignedFree> page(std::aligned_alloc(detail::kNvmeAlign, detail::kNvmeAlign));
  if (!page) throw Error(ErrorCode::out_of_memory, "'" + path_ + "': 4096 bytes for the header page");
  std::memset(page.get(), 0, detail::kNvmeAlign);
  Header h{kMagic, generation, static_cast<std::uint64_t>(active), cells_, cell_bytes_, 0};
  h.checksum = checksum_of(h);
  std::memcpy(page.get(), &h, sizeof h);
  const std::size_t off = static_cast<std::size_t>(slot) * detail::kNvmeAlign;
  std::size_t len = detail::kNvmeAlign;
  const Fault f = next_fault(true);
  if (f == Fault::fail) fail("header write", EIO, off, len);
  if (f == Fault::short_io) len /= 2;  // buffered only in effect; O_DIRECT refuses it (also an error)
  // One pwrite, not pwrite_all: under O_DIRECT a partial write cannot be continued at an unaligned
  // offset, and a header that is not written whole in one call is a failed commit anyway.
  const ssize_t w = ::pwrite(fd_.get(), page.get(), len, static_cast<off_t>(off));
  if (w < 0) fail("header write", errno, off, detail::kNvmeAlign);
  if (static_cast<std::size_t>(w) != detail::kNvmeAlign)
    throw Error(ErrorCode::io_error, "'" + path_ + "': short header write: " + std::to_string(w) + " of 4096 bytes");
  io::fdatasync_fd(fd_, "header");
}

void NvmeStore::commit() {
  // The data must be durable before a header names it.
  io::fdatasync_fd(fd_, "data");
  const int next_slot = 1 - header_slot_;
  write_header(next_slot, generation_ + 1, 1 - active_);
  header_slot_ = next_slot;
  ++generation_;
  active_ = 1 - active_;
}

void NvmeStore::read_committed(std::size_t cell, void* buf) const {
  io::pread_exact(fd_, buf, cell_bytes_, cell_offset(active_, cell), "cell " + std::to_string(cell));
}

void NvmeStore::write_committed(std::size_t cell, const void* buf) {
  io::pwrite_all(fd_, buf, cell_bytes_, cell_offset(active_, cell), "write of cell " + std::to_string(cell));
  io::fdatasync_fd(fd_, "cell " + std::to_string(cell));
}

}  // namespace shardopt::offload
