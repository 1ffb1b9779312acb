#pragma once
// Checkpoint format (internal): the manifest's in-memory form, its JSON parser and writer, and
// the file primitives save/load/export share (checksums, the directory lock; checked POSIX I/O and
// atomic replace come from core/posix_io.hpp).
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/posix_io.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/config.hpp"

namespace shardopt::ckpt {

// Version 2 added the manifest's own checksum; version 1 checkpoints (without it) still load.
// Version 3 stores compressed optimizer state in its own precision (checkpoint/field_codec.hpp);
// a checkpoint of fp32 state is still written as version 2, which older readers load.
inline constexpr int kFormatVersion = 3;
inline constexpr const char* kFormatName = "shardopt-checkpoint";
inline constexpr const char* kManifestName = "manifest.json";
inline constexpr const char* kManifestChecksumKey = "manifest_xxh64";
inline constexpr const char* kLockName = "lock";
// A trainer's own record (data position, run name, ...), kept small: it lives in the manifest.
inline constexpr std::size_t kMaxTrainerMetadata = std::size_t(1) << 20;

// Checksums cover chunks of this many elements, aligned to the start of each range, so a rank
// that owns part of a range reads only the chunks it overlaps.
std::size_t chunk_elems() noexcept;

// One run of consecutive elements of one (tensor, field), stored contiguously in a file, chunk by
// chunk, each chunk in its field's codec (checkpoint/field_codec.hpp; fp32 words but for
// compressed optimizer state from version 3).
struct Range {
  std::size_t begin = 0, count = 0;
  int file = 0;                // index into Manifest::files
  std::uint64_t offset = 0;    // byte offset in the file
  std::vector<std::uint64_t> hashes;  // xxh64 per chunk of `chunk_elems` elements
};

struct Tensor {
  CheckpointTensor info;
  std::vector<std::vector<Range>> fields;  // [field] -> ranges sorted by begin, tiling [0, numel)
};

struct File {
  std::string name;  // plain file name inside the checkpoint directory
  std::uint64_t bytes = 0;
};

struct Manifest {
  int format_version = kFormatVersion;
  std::string library_version;
  std::uint64_t generation = 0;
  int world_size = 1, stage = 0;
  DType compute_dtype = DType::fp32, master_dtype = DType::fp32;
  OptimizerKind optimizer = OptimizerKind::adamw;
  std::vector<std::string> fields;
  // The optimizer state's precision (absent from manifests before compressed state: fp32). Its
  // fields are stored as checkpoint/field_codec.hpp says: from version 3 in their own precision
  // (bf16: 2 bytes; int8: a code byte per element and an exponent byte per block of
  // `quant_block` elements of the tensor); in version 2 one 32-bit word per element
  // (StateStore::read_words). The master is always fp32.
  StatePrecision state_precision = StatePrecision::fp32;
  std::size_t quant_block = 0;  // int8 only
  std::map<int, Hyperparams> groups;
  std::int64_t step = 0;
  LossScaleMode loss_scale_mode = LossScaleMode::none;
  float loss_scale = 1.0f;
  int good_steps = 0, overflow_run = 0;
  std::size_t chunk = 0;
  std::string trainer_metadata;  // opaque to the library, at most kMaxTrainerMetadata bytes
  std::vector<File> files;
  std::vector<Tensor> tensors;

  int find_tensor(const std::string& name) const;  // -1 if absent
};

// Field names of a rule: "master", then its states in PyTorch's names.
std::vector<std::string> field_names(OptimizerKind rule);

// Parses and fully validates a manifest (ranges tile every tensor, checksums per chunk, files
// large enough, plain file names). `where` names the file in errors. Never crashes on any input:
// every problem is an Error(invalid_argument).
Manifest parse_manifest(std::string_view text, const std::string& where);
std::string dump_manifest(const Manifest& m);
// Reads <dir>/manifest.json and parses it; Error(io_error) naming the file if it is missing.
Manifest read_manifest(const std::string& dir);

CheckpointInfo info_of(const Manifest& m, const std::string& dir);

std::uint64_t xxh64(const void* data, std::size_t bytes) noexcept;
std::string hex64(std::uint64_t v);
bool parse_hex64(std::string_view s, std::uint64_t& out) noexcept;

// ---- checked POSIX I/O (every error names the path): core/posix_io.hpp, under the names the
// checkpoint code has always used.
using io::create_write;
using io::Fd;
using io::file_size;
using io::fsync_dir;
using io::fsync_fd;
using io::join;
using io::open_read;
using io::pread_exact;
using io::read_text;
using io::rename_file;
using io::write_all;
using io::write_file_atomic;

// An exclusive lock on <dir>/lock (flock), held while the object lives. `who` (pid, host, time) is
// written into the file so a second saver's error names the holder. Never blocks: a held lock is
// Error(io_error) naming the directory and the holder. The lock file stays after release.
class DirLock {
 public:
  DirLock() = default;
  explicit DirLock(Fd f) : fd_(std::move(f)) {}
  bool held() const noexcept { return fd_.get() >= 0; }
 private:
  Fd fd_;  // closing it releases the lock
};
DirLock lock_dir(const std::string& dir, const std::string& who);
void make_dir(const std::string& dir);  // mkdir -p of the last component; existing is fine

}  // namespace shardopt::ckpt
