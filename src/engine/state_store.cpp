#include "engine/state_store.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "shardopt/error.hpp"

namespace shardopt::detail {

StateStore::~StateStore() = default;

void StateStore::check(const char* call, int field, std::size_t offset, std::size_t n) const {
  if (field < 0 || field >= fields() || offset > elems() || n > elems() - offset)
    throw Error(ErrorCode::invalid_argument, std::string("state store ") + call + ": field " + std::to_string(field) +
                                                 " elements [" + std::to_string(offset) + ", " +
                                                 std::to_string(offset + n) + ") outside the " +
                                                 std::to_string(fields()) + " fields of " +
                                                 std::to_string(elems()) + " elements");
}

void StateStore::read(int field, std::size_t offset, std::size_t n, float* out) {
  check("read", field, offset, n);
  if (!n) return;
  if (compressed(field)) read_compressed(field, offset, n, out, false);
  else read_values(field, offset, n, out);
}

void StateStore::write(int field, std::size_t offset, std::size_t n, const float* in) {
  check("write", field, offset, n);
  if (compressed(field) && precision() == StatePrecision::int8)
    throw Error(ErrorCode::unsupported, "state store write: optimizer state " + std::to_string(field - 1) +
                                            " is int8 (blockwise codes): fp32 values cannot be stored exactly; "
                                            "only the update and write_words() (a checkpoint's stored form) write it");
  if (!n) return;
  if (compressed(field)) write_compressed(field, offset, n, in, false);
  else write_values(field, offset, n, in);
}

void StateStore::read_words(int field, std::size_t offset, std::size_t n, float* out) {
  check("read_words", field, offset, n);
  if (!n) return;
  if (compressed(field)) read_compressed(field, offset, n, out, true);
  else read_values(field, offset, n, out);
}

void StateStore::write_words(int field, std::size_t offset, std::size_t n, const float* in) {
  check("write_words", field, offset, n);
  if (!n) return;
  if (compressed(field)) write_compressed(field, offset, n, in, true);
  else write_values(field, offset, n, in);
}

void StateStore::start_offload(const OffloadPlan& plan, const std::vector<BufferSpec>& specs,
                               std::vector<offload::Piece> pieces) {
  const EngineContext& c = ctx_;
  offload::Setup st;
  st.backend = &c.be;
  st.kind = c.cfg.offload_optimizer;
  st.nvme_dir = c.cfg.nvme_dir;
  st.rank = c.rank;
  st.world = c.world;
  st.rule = c.cfg.optimizer;
  st.nstates = c.state_count;
  st.grad_dtype = plan.grad_dtype;
  st.param_dtype = c.compute_dtype;
  st.state_elems = plan.state_elems;
  st.chunk_elems = plan.chunk_elems;
  st.cells = plan.cells;
  st.cell_bytes = plan.cell_bytes;
  st.file_bytes = plan.file_bytes;
  st.ring = plan.ring;
  st.params_on_host = c.placement.params_tier == Tier::pinned_host;
  st.master = offload_field(0);
  for (int i = 0; i < c.state_count; ++i) st.states[i] = offload_field(1 + i);
  st.precision = c.cfg.state_precision;
  st.quant_block = c.cfg.quant_block;
  for (int i = 0; i < c.state_count; ++i) {
    st.codes[i] = state_codes(i, 0);
    st.scales[i] = state_scales(i, 0);
  }
  st.host_grad = host_grad_.data();
  st.grad_staging = grad_staging_.data();
  st.grad_staging_elems = grad_staging_ ? grad_staging_.bytes() / size_of(c.reduce_dtype) : 0;
  st.grad_staging_dtype = c.reduce_dtype;
  for (auto& b : param_ring_) st.param_ring.push_back(b.data());
  st.io_ring = io_ring_.data();
  st.io_ring_bytes = io_ring_.bytes();
  st.disk_bytes.assign(kCategoryCount, 0);
  for (const auto& spec : specs)
    if (spec.place == Place::disk) st.disk_bytes[static_cast<int>(spec.category)] += spec.elems * size_of(spec.dtype);
  offload_ = std::make_unique<offload::OffloadEngine>(std::move(st));
  offload_->set_pieces(std::move(pieces));
}

void StateStore::release() {
  offload_.reset();
  host_grad_.reset();
  grad_staging_.reset();
  io_ring_.reset();
  param_ring_.clear();
}

namespace {

std::size_t code_bytes_of(StatePrecision p) { return p == StatePrecision::bf16 ? 2 : 1; }

// Compressed state i, elements [offset, offset+n): codes (n * code bytes) and, for int8, the
// scales of blocks offset/B .. (offset+n-1)/B -> fp32 values, or read_words()'s words.
void decode_codes(StatePrecision p, int i, const std::byte* codes, const float* scales, std::size_t B,
                  std::size_t offset, std::size_t n, float* out, bool words) {
  if (p == StatePrecision::bf16) {
    for (std::size_t k = 0; k < n; ++k) {
      std::uint16_t h;
      std::memcpy(&h, codes + 2 * k, 2);
      out[k] = bf16_to_float(h);
    }
    return;
  }
  const std::size_t b0 = offset / B;
  for (std::size_t k = 0; k < n; ++k) {
    const auto code = static_cast<std::uint8_t>(codes[k]);
    const float scale = scales[(offset + k) / B - b0];
    if (words) {
      const std::uint32_t w = code | ((float_bits(scale) >> 23) & 0xffu) << 8;
      std::memcpy(out + k, &w, 4);
    } else {
      out[k] = i == 0 ? quant::decode_signed(code, scale) : quant::decode_unsigned(code, scale);
    }
  }
}

// The inverse: bf16 values rounded to nearest even, or int8 words (write() refuses int8 values
// before this is reached) checked to be a code and one scale per block.
void encode_words(StatePrecision p, int i, const float* in, std::size_t B, std::size_t offset, std::size_t n,
                  std::byte* codes, float* scales, bool /*words*/) {
  if (p == StatePrecision::bf16) {
    for (std::size_t k = 0; k < n; ++k) {
      const std::uint16_t h = float_to_bf16(in[k]);
      std::memcpy(codes + 2 * k, &h, 2);
    }
    return;
  }
  const std::size_t b0 = offset / B, b1 = (offset + n - 1) / B + 1;
  std::vector<char> seen(b1 - b0, 0);
  for (std::size_t k = 0; k < n; ++k) {
    std::uint32_t w;
    std::memcpy(&w, in + k, 4);
    const std::uint32_t e = (w >> 8) & 0xffu;
    const float scale = e == 0xffu ? bits_float(0x7fc00000u) : bits_float(e << 23);
    const std::size_t b = (offset + k) / B - b0;
    if (w > 0xffffu || (seen[b] && float_bits(scales[b]) != float_bits(scale)))
      throw Error(ErrorCode::invalid_argument,
                  "state store write_words: optimizer state " + std::to_string(i) + " element " +
                      std::to_string(offset + k) + ": word " + std::to_string(w) +
                      (w > 0xffffu ? " is not an int8 code and scale exponent"
                                   : " names another scale than the rest of its quantization block"));
    scales[b] = scale;
    seen[b] = 1;
    codes[k] = static_cast<std::byte>(w & 0xffu);
  }
}

// Device and pinned-host tiers: the fields are backend memory, copied on the side stream.
class MemoryStateStore final : public StateStore {
 public:
  MemoryStateStore(EngineContext& ctx, MasterAlias alias) : StateStore(ctx) {
    // Field 0 through the parameters: run i starts at state offset alias_begin_[i].
    for (const MasterRun& r : alias) {
      alias_begin_.push_back(r.state_begin);
      alias_.push_back(r.params);
    }
  }
  void adopt(const BufferSpec& spec, Buffer b) {
    switch (spec.kind) {
      case Buf::master: master_ = std::move(b); break;
      case Buf::state: states_[spec.index] = std::move(b); break;
      case Buf::state_scales: scales_[spec.index] = std::move(b); break;
      case Buf::host_grad: host_grad_ = std::move(b); break;
      case Buf::grad_staging: grad_staging_ = std::move(b); break;
      case Buf::param_ring: param_ring_.push_back(std::move(b)); break;
      default: break;
    }
  }
  void* state_codes(int i, std::size_t offset) const override {
    if (precision() == StatePrecision::fp32) return nullptr;
    return static_cast<std::byte*>(states_[i].data()) + offset * code_bytes_of(precision());
  }
  float* state_scales(int i, std::size_t offset) const override {
    if (precision() != StatePrecision::int8) return nullptr;
    return scales_[i].as<float>() + offset / ctx_.cfg.quant_block;
  }
  float* address(int field, std::size_t offset) const override {
    if (field > 0 && precision() != StatePrecision::fp32) return nullptr;
    if (field > 0) return states_[field - 1].as<float>() + offset;
    if (alias_.empty()) return master_.as<float>() + offset;
    // The run holding `offset`: the last one starting at or before it (a unit this rank owns
    // nothing of starts where the next one does, so taking the last skips it).
    const auto it = std::upper_bound(alias_begin_.begin(), alias_begin_.end(), offset);
    const std::size_t i = static_cast<std::size_t>(it - alias_begin_.begin()) - 1;
    return alias_[i] + (offset - alias_begin_[i]);
  }
  void release() override {
    StateStore::release();
    master_.reset();
    for (auto& s : states_) s.reset();
    for (auto& s : scales_) s.reset();
  }

 private:
  // Compressed fields go through host copies of their codes (and scales), converted by
  // decode_codes / encode_words.
  void read_compressed(int field, std::size_t offset, std::size_t n, float* out, bool words) override {
    const int i = field - 1;
    Stream& side = *ctx_.side;
    const std::size_t B = ctx_.cfg.quant_block, b0 = offset / B, b1 = (offset + n - 1) / B + 1;
    std::vector<std::byte> codes(n * code_bytes_of(precision()));
    std::vector<float> scales(precision() == StatePrecision::int8 ? b1 - b0 : 0);
    ctx_.be.copy(codes.data(), state_codes(i, offset), codes.size(), side);
    if (!scales.empty()) ctx_.be.copy(scales.data(), scales_[i].as<float>() + b0, scales.size() * 4, side);
    ctx_.be.synchronize(side);
    decode_codes(precision(), i, codes.data(), scales.data(), B, offset, n, out, words);
  }
  void write_compressed(int field, std::size_t offset, std::size_t n, const float* in, bool words) override {
    const int i = field - 1;
    Stream& side = *ctx_.side;
    const std::size_t B = ctx_.cfg.quant_block, b0 = offset / B, b1 = (offset + n - 1) / B + 1;
    std::vector<std::byte> codes(n * code_bytes_of(precision()));
    std::vector<float> scales(precision() == StatePrecision::int8 ? b1 - b0 : 0);
    encode_words(precision(), i, in, B, offset, n, codes.data(), scales.data(), words);
    ctx_.be.copy(state_codes(i, offset), codes.data(), codes.size(), side);
    if (!scales.empty()) ctx_.be.copy(scales_[i].as<float>() + b0, scales.data(), scales.size() * 4, side);
    ctx_.be.synchronize(side);
  }
  void read_values(int field, std::size_t offset, std::size_t n, float* out) override {
    for_each_run(field, offset, n, [&](float* where, std::size_t done, std::size_t k) {
      ctx_.be.copy(out + done, where, k * 4, *ctx_.side);
    });
    ctx_.be.synchronize(*ctx_.side);
  }
  void write_values(int field, std::size_t offset, std::size_t n, const float* in) override {
    for_each_run(field, offset, n, [&](float* where, std::size_t done, std::size_t k) {
      ctx_.be.copy(where, in + done, k * 4, *ctx_.side);
    });
    ctx_.be.synchronize(*ctx_.side);
  }
  // f(address, done, count) for each contiguous run of [offset, offset + n): the whole range,
  // except where field 0 is the parameters, whose units (or tensors) are not adjacent in memory.
  template <class F>
  void for_each_run(int field, std::size_t offset, std::size_t n, F&& f) const {
    if (field > 0 || alias_.empty()) {
      f(address(field, offset), std::size_t{0}, n);
      return;
    }
    for (std::size_t done = 0; done < n;) {
      const std::size_t pos = offset + done;
      const auto next = std::upper_bound(alias_begin_.begin(), alias_begin_.end(), pos);
      const std::size_t end = next == alias_begin_.end() ? elems() : *next;
      const std::size_t k = std::min(n - done, end - pos);
      f(address(0, pos), done, k);
      done += k;
    }
  }
  float* offload_field(int field) const override { return address(field, 0); }

  Buffer master_, states_[2], scales_[2];
  std::vector<float*> alias_;
  std::vector<std::size_t> alias_begin_;
};

// NVMe tier: the fields live in the offload engine's file; only its buffers are here.
class NvmeStateStore final : public StateStore {
 public:
  using StateStore::StateStore;
  void adopt(const BufferSpec& spec, Buffer b) {
    switch (spec.kind) {
      case Buf::host_grad: host_grad_ = std::move(b); break;
      case Buf::grad_staging: grad_staging_ = std::move(b); break;
      case Buf::param_ring: param_ring_.push_back(std::move(b)); break;
      case Buf::io_ring: io_ring_ = std::move(b); break;
      default: break;
    }
  }
  float* address(int, std::size_t) const override { return nullptr; }

 private:
  void read_values(int field, std::size_t offset, std::size_t n, float* out) override {
    ctx_.be.synchronize(*ctx_.side);  // a step's update is finished (nvme: it is synchronous anyway)
    offload_->read(field, offset, n, out);
  }
  void write_values(int field, std::size_t offset, std::size_t n, const float* in) override {
    ctx_.be.synchronize(*ctx_.side);
    offload_->write(field, offset, n, in);
  }
  void read_compressed(int field, std::size_t offset, std::size_t n, float* out, bool words) override {
    ctx_.be.synchronize(*ctx_.side);
    const std::size_t B = ctx_.cfg.quant_block, b0 = offset / B, b1 = (offset + n - 1) / B + 1;
    std::vector<std::byte> codes(n * code_bytes_of(precision()));
    std::vector<float> scales(precision() == StatePrecision::int8 ? b1 - b0 : 0);
    offload_->read_codes(field - 1, offset, n, codes.data(), scales.data());
    decode_codes(precision(), field - 1, codes.data(), scales.data(), B, offset, n, out, words);
  }
  void write_compressed(int field, std::size_t offset, std::size_t n, const float* in, bool words) override {
    ctx_.be.synchronize(*ctx_.side);
    const std::size_t B = ctx_.cfg.quant_block, b0 = offset / B, b1 = (offset + n - 1) / B + 1;
    std::vector<std::byte> codes(n * code_bytes_of(precision()));
    std::vector<float> scales(precision() == StatePrecision::int8 ? b1 - b0 : 0);
    encode_words(precision(), field - 1, in, B, offset, n, codes.data(), scales.data(), words);
    offload_->write_codes(field - 1, offset, n, codes.data(), scales.data());
  }
  float* offload_field(int) const override { return nullptr; }
};

bool owned_by_store(Buf kind) {
  return kind == Buf::master || kind == Buf::state || kind == Buf::state_scales || kind == Buf::host_grad || kind == Buf::grad_staging ||
         kind == Buf::param_ring || kind == Buf::io_ring;
}

}  // namespace

std::unique_ptr<StateStore> make_state_store(EngineContext& ctx, const std::vector<BufferSpec>& specs,
                                             MasterAlias alias) {
  if (ctx.placement.state_tier == Tier::nvme) {
    auto store = std::make_unique<NvmeStateStore>(ctx);
    for (const auto& spec : specs)
      if (owned_by_store(spec.kind)) store->adopt(spec, ctx.allocate(spec));
    return store;
  }
  auto store = std::make_unique<MemoryStateStore>(ctx, ctx.placement.master_is_params ? std::move(alias) : MasterAlias{});
  for (const auto& spec : specs)
    if (owned_by_store(spec.kind)) store->adopt(spec, ctx.allocate(spec));
  return store;
}

}  // namespace shardopt::detail
