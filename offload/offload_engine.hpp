#pragma once
// The offload engine (internal): runs the optimizer update on the host for a rank whose fp32
// master weights and moments live in pinned host memory (OffloadKind::host) or in a file on local
// NVMe (OffloadKind::nvme).
//
// The engine's state store (src/engine/state_store.*) owns this class for the pinned-host and
// NVMe tiers; the engine decides what is reduced where and hands it
//   - the pieces of the update: runs of state elements with one parameter group, each with the
//     address its rounded compute-dtype output goes to (device memory, or the host parameter shard
//     under offload_params),
//   - the buffers planned by plan_engine (src/engine/plan.cpp) and allocated in initialize: the
//     host gradient copy, the upload ring, the NVMe I/O ring. Nothing is allocated here later.
//
// The step pipeline walks the state in cells of `chunk_elems` elements:
//   host tier: update cell i on the CPU (the shardopt::cpu kernels through a ThreadPool) while the
//              copy stream uploads cell i-1's parameters; an upload-ring slot is reused only after
//              the event of its previous upload (so the ring bounds the memory, not the speed).
//   nvme tier: read cell i+1 | update cell i | write cell i-1, all three in flight at once through
//              io_uring, into the other generation of the file, committed by a header flip at the
//              end (NvmeStore), so a failed step leaves the previous step's state on disk.
// The gradient comes down earlier: the gradient reducer enqueues download() (or download_add()
// with micro-steps) per unit as soon as it is reduced; the host copy is the only copy of the
// reduced gradient, so the device memory it came from is reused once the download has read it.
//
// Same kernels and same element-wise arithmetic as the backends' fused_update, so the results are
// bit-identical to the non-offloaded engine on the CPU backend.
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/config.hpp"
#include "shardopt/rules.hpp"

namespace shardopt {
class ThreadPool;
}

namespace shardopt::offload {

class NvmeStore;

// One run of state elements updated with one group's hyperparameters, within one cell.
struct Piece {
  int group = 0;
  std::size_t off = 0;  // first state element
  std::size_t n = 0;
  void* param = nullptr;  // where the rounded compute-dtype values go (device, or host under offload_params)
  // Compressed state: the dither index of the first element (StepRunner's numbering: the
  // tensor's own element index), so the host update gives the device update's bytes.
  std::uint64_t first_index = 0;
};

struct Setup {
  Backend* backend = nullptr;
  OffloadKind kind = OffloadKind::host;
  std::string nvme_dir;
  int rank = 0, world = 1;
  OptimizerKind rule = OptimizerKind::adamw;
  int nstates = 2;
  DType grad_dtype = DType::fp32, param_dtype = DType::fp32;
  std::size_t state_elems = 0, chunk_elems = 0, cells = 0, cell_bytes = 0, file_bytes = 0;
  int ring = 3;
  bool params_on_host = false;  // offload_params: pieces' param pointers are host memory, written in place
  // Buffers (owned by the state store): host tier master/states; always host_grad; upload ring unless
  // params_on_host; the I/O ring for nvme.
  float* master = nullptr;
  float* states[2] = {nullptr, nullptr};
  void* host_grad = nullptr;
  // Micro-steps at stages 2-3: one reduced slice (of grad_staging_dtype) on its way into host_grad.
  void* grad_staging = nullptr;
  std::size_t grad_staging_elems = 0;
  DType grad_staging_dtype = DType::fp32;
  std::vector<void*> param_ring;
  void* io_ring = nullptr;
  std::size_t io_ring_bytes = 0;
  std::vector<std::size_t> disk_bytes;  // per Category index: what the store reports at Place::disk
  // Compressed optimizer state (Config::state_precision): `states` are then null and the update
  // runs Backend::compressed_update's CPU kernels. Host tier: on these codes and int8 block scales
  // (block k of the scales covers state elements [k*quant_block, (k+1)*quant_block)). nvme: each
  // cell holds [master | codes 0, scales 0 | codes 1, scales 1] (detail::cell_state_bytes each).
  StatePrecision precision = StatePrecision::fp32;
  std::size_t quant_block = kDefaultQuantBlock;
  void* codes[2] = {nullptr, nullptr};
  float* scales[2] = {nullptr, nullptr};
};

class OffloadEngine {
 public:
  explicit OffloadEngine(Setup setup);  // nvme: checks the directory, creates the file (Error)
  ~OffloadEngine();
  OffloadEngine(const OffloadEngine&) = delete;
  OffloadEngine& operator=(const OffloadEngine&) = delete;

  // The update's pieces, sorted by `off` and never crossing a cell boundary. Before any step.
  void set_pieces(std::vector<Piece> pieces);

  // Copies `n` gradient elements from device memory to the host copy at state element `off`, on
  // the download stream, after `after` (recorded by the caller on the stream that reduced them).
  void download(const void* device_grad, std::size_t off, std::size_t n, Event& after);
  // Micro-steps: copies `n` reduced elements of `dtype` from device memory through the staging
  // buffer and adds them on the host into the fp32 host copy at state element `off`:
  //   host[i] = (first ? 0.0f : host[i]) + float(x[i])
  // in fp32, the arithmetic of Backend::accumulate into a zeroed accumulator, so the host copy has
  // the bits a device accumulator would have. In download order, on the download stream.
  void download_add(const void* device_grad, DType dtype, std::size_t off, std::size_t n, bool first, Event& after);
  // Records `done` after every download enqueued so far and after `after`: the device memory they
  // read may be written again once it has run.
  void record_downloaded(Event& done, Event& after);
  // After every download enqueued so far and after `after`, zeroes `n` elements of device memory
  // (a bucket the downloads read from) and records `done`, all on the download stream.
  void zero_after_downloads(void* device, DType dtype, std::size_t n, Event& done, Event& after);
  // Host waits until every download is done.
  void finish_downloads();
  // Sum of squares of `n` elements of the host copy from state element `off`, accumulated in
  // double per chunk of 2^16 elements and the chunks added in order: the CPU backend's
  // sum_squares, so the CPU backend gets the bits it would get on a device copy. Host, after
  // finish_downloads().
  float host_sum_squares(std::size_t off, std::size_t n) const;
  // Work enqueued on `stream` from now on waits for every download enqueued so far.
  void downloads_before(Stream& stream);

  // Initial values: `fill(cell_begin, n, master)` writes the master values of state elements
  // [cell_begin, cell_begin+n) (zeros elsewhere are already there) and this class rounds them and
  // uploads them through the pieces' param pointers; moments start at zero. nvme: written to the
  // file's first generation and committed.
  template <class F>
  void initialize_values(F&& fill) {
    for (std::size_t cell = 0; cell < setup_.cells; ++cell) {
      float* m = begin_init_cell(cell);
      fill(cell * setup_.chunk_elems, cell_elems(cell), m);
      end_init_cell(cell, m);
    }
    finish_init();
  }

  // The pipelined update: every piece with scalars.at(piece.group). Parameters are uploaded on
  // the upload stream; the caller makes its next work wait for `uploaded()`, recorded at the end.
  // nvme: on an I/O error throws Error naming the file; the file keeps the previous state.
  // `seed`: the dither seed of compressed state (the step counter after this step's decision).
  void update(const std::map<int, StepScalars>& scalars, std::uint64_t seed = 0);
  Event& uploaded() noexcept { return *uploaded_; }

  // Reads `n` elements of field `field` (0: master, 1 + i: state i) from state element `off`
  // into `out` (host memory). Host tier: a plain copy; nvme: from the committed generation.
  void read(int field, std::size_t off, std::size_t n, float* out) const;

  // The reverse of read(): replaces `n` elements of field `field` from `src` (host memory). Not
  // for use during a step (checkpoint load). nvme: read-modify-write of the committed cells.
  void write(int field, std::size_t off, std::size_t n, const float* src);
  // nvme, compressed state i: its codes of state elements [off, off+n) (n * code bytes) and the
  // int8 scales of the blocks they touch (blocks off/B .. (off+n-1)/B), read from / written to the
  // committed generation (read-modify-write of the cells). `off` and the cells are whole blocks.
  void read_codes(int i, std::size_t off, std::size_t n, void* codes, float* scales) const;
  void write_codes(int i, std::size_t off, std::size_t n, const void* codes, const float* scales);

 private:
  std::size_t cell_elems(std::size_t cell) const noexcept;
  float* begin_init_cell(std::size_t cell);
  void end_init_cell(std::size_t cell, float* master);
  void finish_init();
  void upload_cell(std::size_t cell, int slot, bool wait_slot);
  void run_pieces(std::size_t cell, float* master, float* s0, float* s1, std::size_t base, int slot,
                  const std::map<int, StepScalars>& scalars);
  // Compressed update of a cell whose master, codes and scales start at the given addresses.
  void run_compressed(std::size_t cell, int slot, const std::map<int, StepScalars>& scalars, std::uint64_t seed,
                      float* master, void* const codes[2], float* const scales[2]);
  // nvme: byte offset of state i's codes in a cell, and of its scales.
  std::size_t code_offset(int i) const noexcept;
  std::size_t code_bytes() const noexcept { return setup_.precision == StatePrecision::bf16 ? 2 : 1; }
  void delay_copy(Stream& s);

  Setup setup_;
  Backend& be_;
  std::shared_ptr<ThreadPool> pool_;
  std::unique_ptr<Stream> down_, up_;
  std::unique_ptr<Event> uploaded_, downloaded_;
  std::vector<std::unique_ptr<Event>> slot_free_;
  std::vector<char> slot_used_;
  std::vector<Piece> pieces_;
  std::vector<std::size_t> cell_first_;  // first piece of each cell (cells+1 entries)
  std::unique_ptr<NvmeStore> store_;
};

}  // namespace shardopt::offload
