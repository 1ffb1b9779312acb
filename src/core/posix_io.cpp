// Checked POSIX file I/O (see posix_io.hpp).
#include "core/posix_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "shardopt/error.hpp"

namespace shardopt::io {

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string sys_error(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    reset();  // replaced without a checked close: read-only or abandoned
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}
void Fd::reset() noexcept {
  // Unchecked on purpose: reached only for read-only files or on an error path that already
  // reports a failure; a successful write path calls close() and checks it.
  if (fd_ >= 0) (void)::close(fd_);
  fd_ = -1;
}
void Fd::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw Error(ErrorCode::io_error, sys_error("cannot close", path_));
}

Fd open_read(const std::string& path, const std::string& what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears. The
  // flag means nothing for the regular files that pass the check below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) throw Error(ErrorCode::io_error, "missing " + what + ": '" + path + "' does not exist");
    throw Error(ErrorCode::io_error, sys_error("cannot open " + what, path));
  }
  Fd f(fd, path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error(ErrorCode::io_error, sys_error("cannot stat", path));
  if (!S_ISREG(st.st_mode))
    throw Error(ErrorCode::io_error, "cannot read " + what + ": '" + path + "' is not a regular file (" +
                                         (S_ISDIR(st.st_mode)    ? "a directory"
                                          : S_ISFIFO(st.st_mode) ? "a FIFO"
                                          : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                          : S_ISSOCK(st.st_mode) ? "a socket"
                                                                 : "not a file") +
                                         ")");
  return f;
}

Fd create_write(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(ErrorCode::io_error, sys_error("cannot create", path));
  return Fd(fd, path);
}
std::uint64_t file_size(const Fd& f) {
  struct stat st {};
  if (::fstat(f.get(), &st) != 0) throw Error(ErrorCode::io_error, sys_error("cannot stat", f.path()));
  return static_cast<std::uint64_t>(st.st_size);
}
void write_all(const Fd& f, const void* data, std::size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes) {
    const ssize_t w = ::write(f.get(), p, bytes);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(ErrorCode::io_error, sys_error("cannot write", f.path()));
    }
    if (w == 0) throw Error(ErrorCode::io_error, "cannot write '" + f.path() + "': no progress (disk full?)");
    p += w;
    bytes -= static_cast<std::size_t>(w);
  }
}
void pwrite_all(const Fd& f, const void* data, std::size_t bytes, std::uint64_t offset, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (bytes) {
    const ssize_t w = ::pwrite(f.get(), p, bytes, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      throw Error(ErrorCode::io_error, "'" + f.path() + "': " + what + " of " + std::to_string(bytes) + " bytes at offset " +
                                           std::to_string(offset) + " failed: " +
                                           (w < 0 ? errno_text(errno) : std::string("no progress (disk full?)")));
    p += w;
    bytes -= static_cast<std::size_t>(w);
    offset += static_cast<std::uint64_t>(w);
  }
}
void pread_exact(const Fd& f, void* data, std::size_t bytes, std::uint64_t offset, const std::string& what) {
  char* p = static_cast<char*>(data);
  while (bytes) {
    const ssize_t r = ::pread(f.get(), p, bytes, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(ErrorCode::io_error, sys_error("cannot read " + what + " from", f.path()));
    }
    if (r == 0)
      throw Error(ErrorCode::io_error, "truncated file '" + f.path() + "': it ends at byte " + std::to_string(offset) +
                                           " inside " + what);
    p += r;
    bytes -= static_cast<std::size_t>(r);
    offset += static_cast<std::uint64_t>(r);
  }
}
void fsync_fd(const Fd& f) {
  if (::fsync(f.get()) != 0) throw Error(ErrorCode::io_error, sys_error("cannot fsync", f.path()));
}
void fdatasync_fd(const Fd& f, const std::string& what) {
  if (::fdatasync(f.get()) != 0)
    throw Error(ErrorCode::io_error, "'" + f.path() + "': fdatasync (" + what + ") failed: " + errno_text(errno));
}
void fsync_dir(const std::string& dir) {
  Fd d(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC), dir);
  if (d.get() < 0) throw Error(ErrorCode::io_error, sys_error("cannot open directory", dir));
  fsync_fd(d);
  d.close();
}
void rename_file(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw Error(ErrorCode::io_error, sys_error("cannot rename '" + from + "' to", to));
}

std::string read_text(const std::string& path, const std::string& what) {
  Fd f = open_read(path, what);
  const std::uint64_t n = file_size(f);
  if (n > (std::uint64_t(1) << 32)) throw Error(ErrorCode::io_error, "'" + path + "' is too large for a " + what);
  std::string s(static_cast<std::size_t>(n), '\0');
  if (n) pread_exact(f, s.data(), s.size(), 0, what);
  return s;
}
void write_file_atomic(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string tmp = join(dir, name + ".tmp");
  Fd f = create_write(tmp);
  write_all(f, bytes.data(), bytes.size());
  fsync_fd(f);
  f.close();
  rename_file(tmp, join(dir, name));
  fsync_dir(dir);
}

}  // namespace shardopt::io
