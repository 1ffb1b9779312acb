#pragma once
// Checked POSIX file I/O (internal): the one place the library retries interrupted and partial
// reads and writes and turns a failed system call into an Error(io_error) naming the file. Used by
// the checkpoint format (checkpoint/), the NVMe store (offload/) and, for owning its sockets, the
// TCP bootstrap (bootstrap/).
//
// Thread safety: functions are safe to call concurrently on different descriptors; pread_exact
// and pwrite_all on one descriptor too (they never move its file position).
#include <cstddef>
#include <cstdint>
#include <string>

namespace shardopt::io {

// "<strerror(err)> (errno <err>)"
std::string errno_text(int err);
// "<what> '<path>': <strerror(errno)>", for the errno a failed call just left.
std::string sys_error(const std::string& what, const std::string& path);

// `dir`/`name`, with one slash between them ("" dir: name alone).
std::string join(const std::string& dir, const std::string& name);

// An owned file descriptor and the name it was opened by (a path, or what a socket connects to),
// for error messages. Move-only; the destructor closes it unchecked (read-only files, error
// paths); a writer calls close() to see write errors the kernel reports only there.
class Fd {
 public:
  Fd() = default;
  Fd(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  const std::string& path() const noexcept { return path_; }
  void reset() noexcept;  // unchecked close
  void close();           // checked close: Error(io_error) naming the path
 private:
  int fd_ = -1;
  std::string path_;
};

// Opens a regular file for reading; anything else (FIFO, device, directory) is Error(io_error)
// naming it, without blocking. A missing file's message says so. `what`: context for the error.
Fd open_read(const std::string& path, const std::string& what);
Fd create_write(const std::string& path);  // O_CREAT|O_TRUNC, mode 0644
std::uint64_t file_size(const Fd& f);

// Writes all `bytes` at the file position; a write that makes no progress (disk full) is an error.
void write_all(const Fd& f, const void* data, std::size_t bytes);
// Writes all `bytes` at `offset`; errors name `what`, the offset and the byte count.
void pwrite_all(const Fd& f, const void* data, std::size_t bytes, std::uint64_t offset, const std::string& what);
// Reads exactly `bytes` at `offset`; a short read is a truncated file (the message says so).
void pread_exact(const Fd& f, void* data, std::size_t bytes, std::uint64_t offset, const std::string& what);
void fsync_fd(const Fd& f);
void fdatasync_fd(const Fd& f, const std::string& what);  // errors name `what`
void fsync_dir(const std::string& dir);
void rename_file(const std::string& from, const std::string& to);
std::string read_text(const std::string& path, const std::string& what);
// tmp file + fsync + rename + fsync(dir): after return the file is durable under `name`.
void write_file_atomic(const std::string& dir, const std::string& name, const std::string& bytes);

}  // namespace shardopt::io
