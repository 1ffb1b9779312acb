#include "checkpoint/field_codec.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "shardopt/error.hpp"

namespace shardopt::ckpt {

FieldCodec codec_of(const Manifest& m, int field) {
  FieldCodec c;
  if (field == 0 || m.format_version < 3) return c;  // the master, and every field before format 3
  switch (m.state_precision) {
    case StatePrecision::fp32: break;
    case StatePrecision::bf16: c.kind = FieldCodec::Kind::bf16; break;
    case StatePrecision::int8:
      c.kind = FieldCodec::Kind::int8;
      c.block = m.quant_block;
      break;
  }
  return c;
}

namespace {
// Quantization blocks that elements [begin, begin + count) touch (count > 0).
std::size_t blocks_touched(std::size_t begin, std::size_t count, std::size_t block) noexcept {
  return (begin + count - 1) / block - begin / block + 1;
}
}  // namespace

std::uint64_t chunk_bytes(const FieldCodec& c, std::size_t begin, std::size_t count) noexcept {
  if (count == 0) return 0;
  switch (c.kind) {
    case FieldCodec::Kind::words: return std::uint64_t(4) * count;
    case FieldCodec::Kind::bf16: return std::uint64_t(2) * count;
    case FieldCodec::Kind::int8: return count + blocks_touched(begin, count, c.block);
  }
  return std::uint64_t(4) * count;
}

std::uint64_t chunk_offset(const FieldCodec& c, std::size_t range_begin, std::size_t range_count, std::size_t chunk,
                           std::size_t index) noexcept {
  if (c.kind != FieldCodec::Kind::int8) return chunk_bytes(c, range_begin, std::min(range_count, index * chunk));
  std::uint64_t off = 0;
  for (std::size_t k = 0; k < index && k * chunk < range_count; ++k)
    off += chunk_bytes(c, range_begin + k * chunk, std::min(chunk, range_count - k * chunk));
  return off;
}

std::uint64_t range_bytes(const FieldCodec& c, std::size_t range_begin, std::size_t range_count,
                          std::size_t chunk) noexcept {
  return chunk_offset(c, range_begin, range_count, chunk, (range_count + chunk - 1) / chunk);
}

void pack(const FieldCodec& c, std::size_t begin, std::size_t count, const float* words,
          std::vector<unsigned char>& out, const std::string& what) {
  out.resize(chunk_bytes(c, begin, count));
  switch (c.kind) {
    case FieldCodec::Kind::words: std::memcpy(out.data(), words, 4 * count); return;
    case FieldCodec::Kind::bf16:
      for (std::size_t k = 0; k < count; ++k) {
        std::uint32_t w;
        std::memcpy(&w, words + k, 4);
        if ((w & 0xffffu) != 0)
          throw Error(ErrorCode::internal, what + ": element " + std::to_string(begin + k) + " is not a bf16 value");
        const auto hi = static_cast<std::uint16_t>(w >> 16);
        std::memcpy(out.data() + 2 * k, &hi, 2);
      }
      return;
    case FieldCodec::Kind::int8: {
      unsigned char* exps = out.data() + count;
      const std::size_t first_block = begin / c.block;
      for (std::size_t k = 0; k < count; ++k) {
        std::uint32_t w;
        std::memcpy(&w, words + k, 4);
        const std::size_t b = (begin + k) / c.block - first_block;
        const bool first_here = k == 0 || (begin + k) % c.block == 0;
        if (w > 0xffffu || (!first_here && (w >> 8) != exps[b]))
          throw Error(ErrorCode::internal, what + ": element " + std::to_string(begin + k) +
                                               " is not an int8 code with its block's scale exponent");
        out[k] = static_cast<unsigned char>(w & 0xffu);
        if (first_here) exps[b] = static_cast<unsigned char>(w >> 8);
      }
      return;
    }
  }
}

void unpack(const FieldCodec& c, std::size_t begin, std::size_t count, const unsigned char* in, float* words) noexcept {
  switch (c.kind) {
    case FieldCodec::Kind::words: std::memcpy(words, in, 4 * count); return;
    case FieldCodec::Kind::bf16:
      for (std::size_t k = 0; k < count; ++k) {
        std::uint16_t hi;
        std::memcpy(&hi, in + 2 * k, 2);
        const std::uint32_t w = std::uint32_t(hi) << 16;
        std::memcpy(words + k, &w, 4);
      }
      return;
    case FieldCodec::Kind::int8: {
      const unsigned char* exps = in + count;
      const std::size_t first_block = begin / c.block;
      for (std::size_t k = 0; k < count; ++k) {
        const std::uint32_t w = in[k] | (std::uint32_t(exps[(begin + k) / c.block - first_block]) << 8);
        std::memcpy(words + k, &w, 4);
      }
      return;
    }
  }
}

}  // namespace shardopt::ckpt
