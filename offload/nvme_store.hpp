#pragma once
// NvmeStore (internal): one rank's fp32 master weights and moments (fp32, or compressed: see
// Config::state_precision) in one file on local NVMe,
// read and written asynchronously through io_uring.
//
// File layout (every offset and size a multiple of 4 KiB, so O_DIRECT works):
//   [0, 4K)       header slot 0      } each: magic, generation, active half, geometry, checksum
//   [4K, 8K)      header slot 1      } the valid slot with the larger generation wins
//   half 0: cells * cell_bytes       one cell = [master | state 0 | state 1] of chunk_elems each
//                                    (compressed state: each state its codes then its int8 scales,
//                                    detail::cell_state_bytes; the cell padded to 4 KiB)
//   half 1: cells * cell_bytes
//
// Why two halves and two header slots: a step reads every cell from the committed half and
// writes the updated cell to the other half; only after every write completed and was synced is
// the header rewritten (into the slot not holding the current header) naming the other half.
// A failed or short read/write, a crash, or a torn header write therefore leaves the previous
// generation intact and selected: there is no state in which a half-updated half is committed.
//
// O_DIRECT is tried first; a filesystem that refuses it (tmpfs: EINVAL) gets buffered I/O, and a
// note on stderr says so. Every system call result is checked and turned into Error(io_error)
// naming the file, the operation, the offset and the byte count (synchronous I/O through
// core/posix_io.hpp).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/posix_io.hpp"

struct io_uring;

namespace shardopt::offload {

class NvmeStore {
 public:
  static constexpr int kSlots = 8;  // buffers that may have one read or write in flight each

  // Checks `dir`: exists, is a directory, writable, and statvfs shows file_bytes free; otherwise
  // Error(io_error) naming the directory. Cheap: the engine calls it before allocating anything.
  static void check_directory(const std::string& dir, int rank, std::size_t file_bytes);

  // check_directory, then creates the file and reserves its blocks; Error(io_error) naming the
  // directory or the file otherwise.
  NvmeStore(const std::string& dir, int rank, int world, std::size_t cells, std::size_t cell_bytes,
            std::size_t file_bytes);
  ~NvmeStore();  // drains I/O, closes and removes the file
  NvmeStore(const NvmeStore&) = delete;
  NvmeStore& operator=(const NvmeStore&) = delete;

  const std::string& path() const noexcept { return path_; }

  // Asynchronous, one operation per slot at a time. `buf` is 4 KiB aligned, cell_bytes long.
  void submit_read(std::size_t cell, void* buf, int slot);         // from the committed half
  void submit_write(std::size_t cell, const void* buf, int slot);  // to the other half
  // Waits for the slot's operation; Error if it failed or transferred fewer bytes than asked.
  void wait_read(int slot);
  void wait_write(int slot);
  // Waits for everything in flight, ignoring results (after an error, before buffers are reused).
  void drain() noexcept;
  // Makes the other half the committed one: fdatasync, then the header, then fdatasync.
  void commit();

  // Synchronous read of the committed half's cell (for read_master / checkpoints).
  void read_committed(std::size_t cell, void* buf) const;
  // Synchronous write of a whole cell into the committed half, then fdatasync (checkpoint load).
  // Not crash-atomic: loading a checkpoint replaces the state; an interrupted load is redone.
  void write_committed(std::size_t cell, const void* buf);

 private:
  struct Op {
    bool busy = false, done = false;
    long result = 0;
    std::size_t want = 0, offset = 0;
  };
  std::size_t cell_offset(int half, std::size_t cell) const noexcept;
  void submit(bool write, std::size_t cell, void* buf, int slot);
  void wait(bool write, int slot);
  void reap_one();
  [[noreturn]] void fail(const std::string& op, int err, std::size_t offset, std::size_t bytes) const;
  void write_header(int slot, std::uint64_t generation, int active);

  std::string dir_, path_, note_;
  io::Fd fd_;
  bool direct_ = false;
  io_uring* ring_ = nullptr;
  std::size_t cells_ = 0, cell_bytes_ = 0, file_bytes_ = 0;
  int active_ = 1;               // committed half (1 before the first commit: initial values go to half 0)
  std::uint64_t generation_ = 0;
  int header_slot_ = 1;          // slot holding the current header
  Op ops_[2][kSlots];            // [read, write][slot]
  int in_flight_ = 0;
};

}  // namespace shardopt::offload
