#include "offload/offload_engine.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "engine/plan.hpp"
#include "offload/nvme_store.hpp"
#include "offload/test_hooks.hpp"
#include "shardopt/error.hpp"

namespace shardopt::offload {
namespace {

// Elements per parallel_for chunk of the CPU update: the CPU backend's kernel chunk, so both
// split the same way (not that it matters for the bits: the update is element-wise).
constexpr std::size_t kUpdateGrain = std::size_t(1) << 16;
// The CPU backend's sum_squares chunk (its kKernelChunk): host_sum_squares adds the same partial
// sums in the same order, so it returns the same bits.
constexpr std::size_t kSumChunk = std::size_t(1) << 16;

std::byte* add_bytes(void* p, std::size_t elems, DType t) { return static_cast<std::byte*>(p) + elems * size_of(t); }

}  // namespace

// The CPU update runs on the backend's own pool (the CPU backend's), or on the process's default
// pool for a backend without one (CUDA): never on a pool of its own, which would double the
// threads competing for the cores with the backend's kernels.
OffloadEngine::OffloadEngine(Setup setup)
    : setup_(std::move(setup)),
      be_(*setup_.backend),
      pool_(be_.host_thread_pool() ? be_.host_thread_pool() : default_thread_pool()) {
  const std::string r = ".r" + std::to_string(setup_.rank);
  down_ = be_.create_stream("shardopt.offload.down" + r);
  up_ = be_.create_stream("shardopt.offload.up" + r);
  uploaded_ = be_.create_event();
  downloaded_ = be_.create_event();
  for (int i = 0; i < setup_.ring; ++i) slot_free_.push_back(be_.create_event());
  slot_used_.assign(setup_.ring, 0);
  if (setup_.kind == OffloadKind::nvme) {
    if (!setup_.io_ring || setup_.io_ring_bytes < setup_.ring * setup_.cell_bytes + detail::kNvmeAlign)
      throw Error(ErrorCode::internal, "offload: nvme I/O ring missing or too small");
    store_ = std::make_unique<NvmeStore>(setup_.nvme_dir, setup_.rank, setup_.world, setup_.cells,
                                         setup_.cell_bytes, setup_.file_bytes);
    for (std::size_t c = 0; c < setup_.disk_bytes.size(); ++c)
      if (setup_.disk_bytes[c]) be_.memory().on_allocate(static_cast<Category>(c), Place::disk, setup_.disk_bytes[c]);
  }
}

OffloadEngine::~OffloadEngine() {
  try {
    be_.synchronize(*down_);
  } catch (...) {
    // already reported by the step that failed; a destructor must not throw
  }
  try {
    be_.synchronize(*up_);
  } catch (...) {
  }
  if (store_) {
    store_.reset();
    for (std::size_t c = 0; c < setup_.disk_bytes.size(); ++c)
      if (setup_.disk_bytes[c]) be_.memory().on_free(static_cast<Category>(c), Place::disk, setup_.disk_bytes[c]);
  }
}

std::size_t OffloadEngine::cell_elems(std::size_t cell) const noexcept {
  return std::min(setup_.chunk_elems, setup_.state_elems - cell * setup_.chunk_elems);
}

void OffloadEngine::set_pieces(std::vector<Piece> pieces) {
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.off < b.off; });
  cell_first_.assign(setup_.cells + 1, pieces.size());
  std::size_t k = 0;
  for (std::size_t cell = 0; cell < setup_.cells; ++cell) {
    cell_first_[cell] = k;
    const std::size_t end = (cell + 1) * setup_.chunk_elems;
    while (k < pieces.size() && pieces[k].off < end) {
      if (pieces[k].off + pieces[k].n > end)
        throw Error(ErrorCode::internal, "offload: update piece at " + std::to_string(pieces[k].off) + " crosses cell " +
                                             std::to_string(cell));
      ++k;
    }
  }
  pieces_ = std::move(pieces);
}

void OffloadEngine::delay_copy(Stream& s) {
  if (const int us = test_hooks().copy_delay_us.load(); us > 0)
    be_.host_task(s, [us] { std::this_thread::sleep_for(std::chrono::microseconds(us)); });
}

void OffloadEngine::download(const void* device_grad, std::size_t off, std::size_t n, Event& after) {
  if (n == 0) return;
  be_.wait(*down_, after);
  delay_copy(*down_);
  be_.copy(add_bytes(setup_.host_grad, off, setup_.grad_dtype), device_grad, n * size_of(setup_.grad_dtype), *down_);
}

void OffloadEngine::download_add(const void* device_grad, DType dtype, std::size_t off, std::size_t n, bool first,
                                 Event& after) {
  if (n == 0) return;
  if (!setup_.grad_staging || n > setup_.grad_staging_elems || dtype != setup_.grad_staging_dtype ||
      setup_.grad_dtype != DType::fp32)
    throw Error(ErrorCode::internal, "offload: download_add of " + std::to_string(n) +
                                         " elements without a fitting staging buffer or an fp32 host copy");
  be_.wait(*down_, after);
  delay_copy(*down_);
  void* staging = setup_.grad_staging;
  be_.copy(staging, device_grad, n * size_of(dtype), *down_);
  float* dst = static_cast<float*>(setup_.host_grad) + off;
  // The staging buffer is reused by the next download, which is behind this task on the stream.
  be_.host_task(*down_, [pool = pool_, staging, dtype, dst, n, first] {
    pool->parallel_for(n, kUpdateGrain, [&](std::size_t b, std::size_t e) {
      if (first)
        for (std::size_t i = b; i < e; ++i) dst[i] = 0.0f + load_as_float(staging, dtype, i);
      else
        for (std::size_t i = b; i < e; ++i) dst[i] += load_as_float(staging, dtype, i);
    });
  });
}

void OffloadEngine::record_downloaded(Event& done, Event& after) {
  be_.wait(*down_, after);
  be_.record(done, *down_);
}

void OffloadEngine::zero_after_downloads(void* device, DType dtype, std::size_t n, Event& done, Event& after) {
  be_.wait(*down_, after);
  be_.fill(device, dtype, n, 0.0f, *down_);
  be_.record(done, *down_);
}

void OffloadEngine::finish_downloads() { be_.synchronize(*down_); }

float OffloadEngine::host_sum_squares(std::size_t off, std::size_t n) const {
  const cpu::Kernels& k = cpu::kernels(cpu::active_isa());
  const DType t = setup_.grad_dtype;
  const std::byte* data = add_bytes(setup_.host_grad, off, t);
  std::vector<double> partial((n + kSumChunk - 1) / kSumChunk, 0.0);
  pool_->parallel_for(n, kSumChunk, [&](std::size_t b, std::size_t e) {
    partial[b / kSumChunk] = k.sum_squares(data + b * size_of(t), t, e - b);
  });
  double total = 0.0;
  for (double p : partial) total += p;  // chunk order, as the CPU backend adds them
  return static_cast<float>(total);
}

void OffloadEngine::downloads_before(Stream& stream) {
  be_.record(*downloaded_, *down_);
  be_.wait(stream, *downloaded_);
}

void OffloadEngine::run_pieces(std::size_t cell, float* master, float* s0, float* s1, std::size_t base, int slot,
                               const std::map<int, StepScalars>& scalars) {
  const cpu::Kernels& k = cpu::kernels(cpu::active_isa());
  const DType c = setup_.param_dtype;
  for (std::size_t i = cell_first_[cell]; i < cell_first_[cell + 1]; ++i) {
    const Piece& p = pieces_[i];
    UpdateArgs a;
    a.rule = setup_.rule;
    a.scalars = scalars.at(p.group);
    a.master = master + (p.off - base);
    a.state1 = s0 + (p.off - base);
    a.state2 = s1 ? s1 + (p.off - base) : nullptr;
    a.grad = add_bytes(setup_.host_grad, p.off, setup_.grad_dtype);
    a.grad_dtype = setup_.grad_dtype;
    a.param_out = setup_.params_on_host ? p.param : add_bytes(setup_.param_ring[slot], p.off - base, c);
    a.param_dtype = c;
    a.n = p.n;
    pool_->parallel_for(p.n, kUpdateGrain, [&](std::size_t b, std::size_t e) { k.fused_update(cpu::slice(a, b, e - b)); });
  }
  if (const int us = test_hooks().update_delay_us.load(); us > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// Compressed state (host tier): the CPU kernels of Backend::compressed_update on each piece, split
// across the pool at multiples of kUpdateGrain (a multiple of every int8 block size, so no block
// is split and its scale does not depend on the split).
std::size_t OffloadEngine::code_offset(int i) const noexcept {
  return setup_.chunk_elems * 4 +
         static_cast<std::size_t>(i) * detail::cell_state_bytes(setup_.precision, setup_.chunk_elems, setup_.quant_block);
}

void OffloadEngine::run_compressed(std::size_t cell, int slot, const std::map<int, StepScalars>& scalars,
                                   std::uint64_t seed, float* master, void* const codes_at[2],
                                   float* const scales_at[2]) {
  static_assert(kUpdateGrain % kMaxQuantBlock == 0);
  const cpu::CompressedKernels& k = cpu::compressed_kernels(cpu::active_isa());
  const DType c = setup_.param_dtype;
  const std::size_t base = cell * setup_.chunk_elems;
  const std::size_t code_bytes = this->code_bytes();
  for (std::size_t i = cell_first_[cell]; i < cell_first_[cell + 1]; ++i) {
    const Piece& p = pieces_[i];
    CompressedUpdateArgs a;
    a.rule = setup_.rule;
    a.scalars = scalars.at(p.group);
    a.precision = setup_.precision;
    a.block_size = setup_.quant_block;
    a.seed = seed;
    a.first_index = p.first_index;
    a.master = master + (p.off - base);
    for (int s = 0; s < setup_.nstates; ++s) {
      void* codes = static_cast<std::byte*>(codes_at[s]) + (p.off - base) * code_bytes;
      float* sc = scales_at[s] ? scales_at[s] + (p.off - base) / setup_.quant_block : nullptr;
      (s == 0 ? a.state1 : a.state2) = codes;
      (s == 0 ? a.scales1 : a.scales2) = sc;
    }
    a.grad = add_bytes(setup_.host_grad, p.off, setup_.grad_dtype);
    a.grad_dtype = setup_.grad_dtype;
    a.param_out = setup_.params_on_host ? p.param : add_bytes(setup_.param_ring[slot], p.off - base, c);
    a.param_dtype = c;
    a.n = p.n;
    pool_->parallel_for(p.n, kUpdateGrain, [&](std::size_t b, std::size_t e) { k.update(cpu::slice(a, b, e - b)); });
  }
  if (const int us = test_hooks().update_delay_us.load(); us > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// Waits until ring slot `slot` is no longer being uploaded (its previous cell's copies are done).
void OffloadEngine::upload_cell(std::size_t cell, int slot, bool wait_slot) {
  if (setup_.params_on_host) return;
  if (wait_slot) {
    if (slot_used_[slot]) be_.synchronize(*slot_free_[slot]);
    return;
  }
  const std::size_t base = cell * setup_.chunk_elems;
  const DType c = setup_.param_dtype;
  delay_copy(*up_);
  for (std::size_t i = cell_first_[cell]; i < cell_first_[cell + 1]; ++i) {
    const Piece& p = pieces_[i];
    be_.copy(p.param, add_bytes(setup_.param_ring[slot], p.off - base, c), p.n * size_of(c), *up_);
  }
  be_.record(*slot_free_[slot], *up_);
  slot_used_[slot] = 1;
}

void OffloadEngine::update(const std::map<int, StepScalars>& scalars, std::uint64_t seed) {
  const std::size_t C = setup_.chunk_elems;
  const int R = setup_.ring;
  if (!store_) {
    for (std::size_t cell = 0; cell < setup_.cells; ++cell) {
      const int slot = static_cast<int>(cell % R);
      const std::size_t base = cell * C;
      upload_cell(cell, slot, true);
      if (setup_.precision != StatePrecision::fp32) {
        void* codes[2] = {nullptr, nullptr};
        float* sc[2] = {nullptr, nullptr};
        for (int s = 0; s < setup_.nstates; ++s) {
          codes[s] = static_cast<std::byte*>(setup_.codes[s]) + base * code_bytes();
          sc[s] = setup_.scales[s] ? setup_.scales[s] + base / setup_.quant_block : nullptr;
        }
        run_compressed(cell, slot, scalars, seed, setup_.master + base, codes, sc);
      } else
        run_pieces(cell, setup_.master + base, setup_.states[0] + base,
                   setup_.nstates > 1 ? setup_.states[1] + base : nullptr, base, slot, scalars);
      upload_cell(cell, slot, false);
    }
    be_.record(*uploaded_, *up_);
    return;
  }
  // nvme: buffer b of the I/O ring holds one cell, [master | state 0 | state 1] of C elements.
  const std::uintptr_t raw = reinterpret_cast<std::uintptr_t>(setup_.io_ring);
  std::byte* aligned = reinterpret_cast<std::byte*>((raw + detail::kNvmeAlign - 1) / detail::kNvmeAlign * detail::kNvmeAlign);
  auto buf = [&](int b) { return reinterpret_cast<float*>(aligned + static_cast<std::size_t>(b) * setup_.cell_bytes); };
  try {
    if (setup_.cells > 0) store_->submit_read(0, buf(0), 0);
    for (std::size_t cell = 0; cell < setup_.cells; ++cell) {
      const int b = static_cast<int>(cell % R);
      if (cell + 1 < setup_.cells) {
        const int nb = static_cast<int>((cell + 1) % R);
        store_->wait_write(nb);  // cell+1-R's write used that buffer
        store_->submit_read(cell + 1, buf(nb), nb);
      }
      store_->wait_read(b);
      const int slot = static_cast<int>(cell % R);
      upload_cell(cell, slot, true);
      float* m = buf(b);
      if (setup_.precision != StatePrecision::fp32) {
        void* codes[2] = {nullptr, nullptr};
        float* sc[2] = {nullptr, nullptr};
        for (int s = 0; s < setup_.nstates; ++s) {
          codes[s] = reinterpret_cast<std::byte*>(m) + code_offset(s);
          if (setup_.precision == StatePrecision::int8)
            sc[s] = reinterpret_cast<float*>(reinterpret_cast<std::byte*>(m) + code_offset(s) + C);
        }
        run_compressed(cell, slot, scalars, seed, m, codes, sc);
      } else {
        run_pieces(cell, m, m + C, setup_.nstates > 1 ? m + 2 * C : nullptr, cell * C, slot, scalars);
      }
      upload_cell(cell, slot, false);
      store_->submit_write(cell, m, b);
    }
    for (int b = 0; b < R; ++b) store_->wait_write(b);
    store_->commit();
  } catch (...) {
    store_->drain();  // nothing may still write into the ring once the caller moves on
    be_.record(*uploaded_, *up_);
    throw;
  }
  be_.record(*uploaded_, *up_);
}

float* OffloadEngine::begin_init_cell(std::size_t cell) {
  if (!store_) return setup_.master + cell * setup_.chunk_elems;  // zero-filled at allocation
  const std::uintptr_t raw = reinterpret_cast<std::uintptr_t>(setup_.io_ring);
  auto* aligned = reinterpret_cast<float*>((raw + detail::kNvmeAlign - 1) / detail::kNvmeAlign * detail::kNvmeAlign);
  std::memset(aligned, 0, setup_.cell_bytes);
  return aligned;
}

void OffloadEngine::end_init_cell(std::size_t cell, float* master) {
  const cpu::Kernels& k = cpu::kernels(cpu::active_isa());
  const std::size_t base = cell * setup_.chunk_elems;
  const DType c = setup_.param_dtype;
  for (std::size_t i = cell_first_[cell]; i < cell_first_[cell + 1]; ++i) {
    const Piece& p = pieces_[i];
    if (setup_.params_on_host) {
      k.cast(master + (p.off - base), DType::fp32, p.param, c, p.n);
    } else {
      k.cast(master + (p.off - base), DType::fp32, setup_.param_ring[0], c, p.n);
      be_.copy(p.param, setup_.param_ring[0], p.n * size_of(c), *up_);
      be_.synchronize(*up_);  // the ring slot is reused by the next piece
    }
  }
  if (store_) {
    store_->submit_write(cell, master, 0);
    store_->wait_write(0);
  }
}

void OffloadEngine::finish_init() {
  if (store_) store_->commit();
}

void OffloadEngine::read(int field, std::size_t off, std::size_t n, float* out) const {
  if (n == 0) return;
  if (field < 0 || field > setup_.nstates || off + n > setup_.state_elems)
    throw Error(ErrorCode::invalid_argument, "offload read: field " + std::to_string(field) + " elements [" +
                                                 std::to_string(off) + ", " + std::to_string(off + n) + ") out of range");
  if (!store_) {
    const float* src = field == 0 ? setup_.master : setup_.states[field - 1];
    std::memcpy(out, src + off, n * 4);
    return;
  }
  struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, Free> tmp(std::aligned_alloc(detail::kNvmeAlign, setup_.cell_bytes));
  if (!tmp) throw Error(ErrorCode::out_of_memory, "offload read: " + std::to_string(setup_.cell_bytes) + " bytes");
  const std::size_t C = setup_.chunk_elems;
  while (n > 0) {
    const std::size_t cell = off / C, in = off % C, k = std::min(n, C - in);
    store_->read_committed(cell, tmp.get());
    std::memcpy(out, static_cast<const float*>(tmp.get()) + static_cast<std::size_t>(field) * C + in, k * 4);
    off += k;
    out += k;
    n -= k;
  }
}

void OffloadEngine::write(int field, std::size_t off, std::size_t n, const float* src) {
  if (n == 0) return;
  if (field < 0 || field > setup_.nstates || off + n > setup_.state_elems)
    throw Error(ErrorCode::invalid_argument, "offload write: field " + std::to_string(field) + " elements [" +
                                                 std::to_string(off) + ", " + std::to_string(off + n) + ") out of range");
  if (!store_) {
    float* dst = field == 0 ? setup_.master : setup_.states[field - 1];
    std::memcpy(dst + off, src, n * 4);
    return;
  }
  struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, Free> tmp(std::aligned_alloc(detail::kNvmeAlign, setup_.cell_bytes));
  if (!tmp) throw Error(ErrorCode::out_of_memory, "offload write: " + std::to_string(setup_.cell_bytes) + " bytes");
  const std::size_t C = setup_.chunk_elems;
  while (n > 0) {
    const std::size_t cell = off / C, in = off % C, k = std::min(n, C - in);
    store_->read_committed(cell, tmp.get());
    std::memcpy(static_cast<float*>(tmp.get()) + static_cast<std::size_t>(field) * C + in, src, k * 4);
    store_->write_committed(cell, tmp.get());
    off += k;
    src += k;
    n -= k;
  }
}

// Compressed state on NVMe: the codes (and int8 scales) of state i, cell by cell from the committed
// generation. Scales: cell c's blocks start at block c*C/B; [off, off+n) touches blocks off/B ..
// (off+n-1)/B, stored in `scales` from index 0.
void OffloadEngine::read_codes(int i, std::size_t off, std::size_t n, void* codes, float* scales) const {
  if (n == 0) return;
  struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, Free> tmp(std::aligned_alloc(detail::kNvmeAlign, setup_.cell_bytes));
  if (!tmp) throw Error(ErrorCode::out_of_memory, "offload read: " + std::to_string(setup_.cell_bytes) + " bytes");
  const std::size_t C = setup_.chunk_elems, B = setup_.quant_block, cb = code_bytes();
  const std::size_t first_block = off / B;
  auto* out = static_cast<std::byte*>(codes);
  while (n > 0) {
    const std::size_t cell = off / C, in = off % C, k = std::min(n, C - in);
    store_->read_committed(cell, tmp.get());
    const std::byte* at = static_cast<const std::byte*>(tmp.get()) + code_offset(i);
    std::memcpy(out, at + in * cb, k * cb);
    if (setup_.precision == StatePrecision::int8) {
      const std::size_t b0 = in / B, b1 = (in + k - 1) / B + 1;
      std::memcpy(scales + (cell * C / B + b0 - first_block), at + C + b0 * 4, (b1 - b0) * 4);
    }
    off += k;
    out += k * cb;
    n -= k;
  }
}

void OffloadEngine::write_codes(int i, std::size_t off, std::size_t n, const void* codes, const float* scales) {
  if (n == 0) return;
  struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, Free> tmp(std::aligned_alloc(detail::kNvmeAlign, setup_.cell_bytes));
  if (!tmp) throw Error(ErrorCode::out_of_memory, "offload write: " + std::to_string(setup_.cell_bytes) + " bytes");
  const std::size_t C = setup_.chunk_elems, B = setup_.quant_block, cb = code_bytes();
  const std::size_t first_block = off / B;
  const auto* src = static_cast<const std::byte*>(codes);
  while (n > 0) {
    const std::size_t cell = off / C, in = off % C, k = std::min(n, C - in);
    store_->read_committed(cell, tmp.get());
    std::byte* at = static_cast<std::byte*>(tmp.get()) + code_offset(i);
    std::memcpy(at + in * cb, src, k * cb);
    if (setup_.precision == StatePrecision::int8) {
      const std::size_t b0 = in / B, b1 = (in + k - 1) / B + 1;
      std::memcpy(at + C + b0 * 4, scales + (cell * C / B + b0 - first_block), (b1 - b0) * 4);
    }
    store_->write_committed(cell, tmp.get());
    off += k;
    src += k * cb;
    n -= k;
  }
}

}  // namespace shardopt::offload
