#include "data.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace gpt {

using shardopt::Error;
using shardopt::ErrorCode;

namespace {

[[noreturn]] void io_fail(const std::string& what) { throw Error(ErrorCode::io_error, what); }
[[noreturn]] void bad_file(const std::string& what) { throw Error(ErrorCode::invalid_argument, what); }

void pread_all(int fd, void* dst, std::size_t n, std::uint64_t off, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(off));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      io_fail(path + ": read of " + std::to_string(n) + " bytes at offset " + std::to_string(off) +
              (got == 0 ? " failed: unexpected end of file" : std::string(" failed: ") + std::strerror(errno)));
    p += got;
    n -= static_cast<std::size_t>(got);
    off += static_cast<std::uint64_t>(got);
  }
}

int open_read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io_fail(path + ": cannot open: " + std::strerror(errno));
  return fd;
}

std::uint64_t file_size(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) io_fail(path + ": cannot stat: " + std::strerror(errno));
  return static_cast<std::uint64_t>(st.st_size);
}

}  // namespace

void write_token_file(const std::string& path, const std::vector<std::uint16_t>& tokens) {
  if (tokens.size() > 0x7fffffffu) bad_file(path + ": " + std::to_string(tokens.size()) + " tokens exceed the format's int32 count");
  std::int32_t header[256] = {};
  header[0] = kTokenMagic;
  header[1] = kTokenVersion;
  header[2] = static_cast<std::int32_t>(tokens.size());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) io_fail(tmp + ": cannot open for writing");
    f.write(reinterpret_cast<const char*>(header), sizeof header);  // little-endian hosts only (x86, ARM)
    f.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 2));
    if (!f.flush()) io_fail(tmp + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) io_fail(path + ": cannot rename from " + tmp + ": " + std::strerror(errno));
}

std::size_t tokenize_bytes(const std::string& in, const std::string& out) {
  std::ifstream f(in, std::ios::binary);
  if (!f) io_fail(in + ": cannot open");
  std::vector<std::uint16_t> tokens;
  char buf[1 << 16];
  while (f) {
    f.read(buf, sizeof buf);
    for (std::streamsize i = 0; i < f.gcount(); ++i) tokens.push_back(static_cast<unsigned char>(buf[i]));
  }
  if (f.bad()) io_fail(in + ": read failed");
  write_token_file(out, tokens);
  return tokens.size();
}

TokenFile::TokenFile(const std::string& path) : path_(path), fd_(open_read(path)) {
  try {
    const std::uint64_t bytes = file_size(fd_, path);
    if (bytes < 1024) bad_file(path + ": not a token file (shorter than its 1024-byte header)");
    std::int32_t header[256];
    pread_all(fd_, header, sizeof header, 0, path);
    if (header[0] != kTokenMagic)
      bad_file(path + ": not a token file (magic " + std::to_string(header[0]) + ", expected " +
               std::to_string(kTokenMagic) + ")");
    if (header[1] != kTokenVersion)
      bad_file(path + ": token file version " + std::to_string(header[1]) + " is not supported (only " +
               std::to_string(kTokenVersion) + ": uint16 tokens)");
    if (header[2] < 0) bad_file(path + ": negative token count " + std::to_string(header[2]));
    count_ = static_cast<std::size_t>(header[2]);
    if (1024 + 2 * std::uint64_t(count_) != bytes)
      bad_file(path + ": header says " + std::to_string(count_) + " tokens but the file holds " +
               std::to_string((bytes - 1024) / 2));
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

TokenFile::~TokenFile() {
  if (fd_ >= 0) ::close(fd_);
}

void TokenFile::read(std::size_t begin, std::size_t n, std::int32_t* out) const {
  if (begin > count_ || n > count_ - begin)
    bad_file(path_ + ": tokens [" + std::to_string(begin) + ", " + std::to_string(begin + n) + ") past its " +
             std::to_string(count_) + " tokens");
  std::vector<std::uint16_t> raw(n);
  pread_all(fd_, raw.data(), 2 * n, 1024 + 2 * std::uint64_t(begin), path_);
  for (std::size_t i = 0; i < n; ++i) out[i] = raw[i];
}

std::uint16_t TokenFile::max_token() const {
  std::uint16_t mx = 0;
  std::vector<std::uint16_t> raw(1 << 16);
  for (std::size_t at = 0; at < count_; at += raw.size()) {
    const std::size_t n = std::min(raw.size(), count_ - at);
    pread_all(fd_, raw.data(), 2 * n, 1024 + 2 * std::uint64_t(at), path_);
    for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, raw[i]);
  }
  return mx;
}

std::size_t batch_offset(std::size_t n, std::int64_t step, int micro, int micro_steps, int rank, int ranks,
                         int batch, int seq) {
  const std::size_t per_rank = std::size_t(batch) * seq, global = per_rank * ranks;
  if (n < global + 1)
    throw Error(ErrorCode::invalid_argument, "data: " + std::to_string(n) + " tokens are fewer than one global batch (" +
                                                 std::to_string(global + 1) + " = ranks * batch * seq + 1)");
  const std::size_t batches = (n - 1) / global;  // whole global batches in the file: one epoch
  const std::size_t g = (static_cast<std::size_t>(step) * micro_steps + micro) % batches;
  return g * global + std::size_t(rank) * per_rank;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), fd_(open_read(path)) {
  try {
    const std::uint64_t bytes = file_size(fd_, path);
    std::uint64_t hlen = 0;
    if (bytes < 8) bad_file(path + ": not a safetensors file (shorter than 8 bytes)");
    pread_all(fd_, &hlen, 8, 0, path);
    if (hlen > bytes - 8 || hlen > (100u << 20))
      bad_file(path + ": not a safetensors file (header length " + std::to_string(hlen) + ")");
    std::string text(hlen, '\0');
    pread_all(fd_, text.data(), hlen, 8, path);
    const auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) bad_file(path + ": not a safetensors file (its header is not a JSON object)");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      const auto& v = it.value();
      if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
        bad_file(path + ": tensor '" + it.key() + "' lacks dtype, shape or data_offsets");
      SafetensorsEntry e;
      e.dtype = v["dtype"].get<std::string>();
      e.shape = v["shape"].get<std::vector<std::int64_t>>();
      const auto off = v["data_offsets"].get<std::vector<std::uint64_t>>();
      if (off.size() != 2 || off[0] > off[1] || 8 + hlen + off[1] > bytes)
        bad_file(path + ": tensor '" + it.key() + "' has data_offsets outside the file");
      e.begin = 8 + hlen + off[0];
      e.end = 8 + hlen + off[1];
      tensors_[it.key()] = e;
    }
  } catch (const nlohmann::json::exception& ex) {
    ::close(fd_);
    bad_file(path + ": malformed safetensors header: " + ex.what());
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end() && name.rfind("transformer.", 0) == 0) it = tensors_.find(name.substr(12));
  return it == tensors_.end() ? nullptr : &it->second;
}

namespace {
bool dtype_of(const std::string& name, shardopt::DType& dt) {
  if (name == "F32") dt = shardopt::DType::fp32;
  else if (name == "BF16") dt = shardopt::DType::bf16;
  else if (name == "F16") dt = shardopt::DType::fp16;
  else return false;
  return true;
}
}  // namespace

void SafetensorsFile::check(const SafetensorsEntry& e, const std::string& name, std::size_t numel) const {
  shardopt::DType dt;
  if (!dtype_of(e.dtype, dt))
    bad_file(path_ + ": tensor '" + name + "' has dtype " + e.dtype + " (supported: F32, BF16, F16)");
  if (e.end - e.begin != numel * shardopt::size_of(dt))
    bad_file(path_ + ": tensor '" + name + "' holds " + std::to_string(e.end - e.begin) + " bytes, its shape needs " +
             std::to_string(numel * shardopt::size_of(dt)));
}

void SafetensorsFile::read(const SafetensorsEntry& e, std::size_t begin, std::size_t count, float* out) const {
  shardopt::DType dt;
  if (!dtype_of(e.dtype, dt)) bad_file(path_ + ": tensor dtype " + e.dtype + " is not supported (F32, BF16, F16)");
  const std::size_t es = shardopt::size_of(dt);
  const std::uint64_t n = (e.end - e.begin) / es;
  if (begin > n || count > n - begin) bad_file(path_ + ": element range past a tensor's end");
  std::vector<unsigned char> raw(count * es);
  pread_all(fd_, raw.data(), raw.size(), e.begin + begin * es, path_);
  for (std::size_t i = 0; i < count; ++i) out[i] = shardopt::load_as_float(raw.data(), dt, i);
}

}  // namespace gpt
