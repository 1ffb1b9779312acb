#pragma once
// How one field's elements are laid out in a shard file (internal).
//
// Format 3 stores the optimizer-state fields in their own precision; formats 1-2 (and every
// master field) store one 32-bit word per element. The engine side always speaks words
// (StateStore::read_words/write_words): fp32 values, bf16 values widened exactly to fp32, int8 as
// code | (biased exponent of its block's power-of-two scale) << 8. A codec turns the words of one
// checksum chunk into the bytes on disk and back:
//   words  4 bytes per element, the word itself (little-endian, as the machine writes floats).
//   bf16   2 bytes per element: the word's high half (its low half is zero for a bf16 value).
//   int8   the chunk's codes, one byte per element, then one exponent byte per quantization block
//          the chunk touches (blocks of `block` elements of the tensor's own index, so a block
//          split between two chunks has its exponent in both).
// Chunks start at a range's begin and every `chunk` elements after it (ckpt::Range); their byte
// sizes depend only on (codec, first element, count), so a reader finds any chunk from the
// manifest alone.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/format.hpp"

namespace shardopt::ckpt {

struct FieldCodec {
  enum class Kind : std::uint8_t { words, bf16, int8 };
  Kind kind = Kind::words;
  std::size_t block = 0;  // int8: elements per quantization block
};

// The codec of field `field` (0 = master) of a checkpoint with this manifest.
FieldCodec codec_of(const Manifest& m, int field);

// Bytes on disk of the chunk holding elements [begin, begin + count) of a tensor.
std::uint64_t chunk_bytes(const FieldCodec& c, std::size_t begin, std::size_t count) noexcept;
// Byte offset of chunk `index` from the start of range r (chunks of `chunk` elements); the
// range's bytes for index = number of chunks.
std::uint64_t chunk_offset(const FieldCodec& c, std::size_t range_begin, std::size_t range_count, std::size_t chunk,
                           std::size_t index) noexcept;
std::uint64_t range_bytes(const FieldCodec& c, std::size_t range_begin, std::size_t range_count,
                          std::size_t chunk) noexcept;

// Words -> bytes of one chunk (out is resized to chunk_bytes). Error(internal) naming `what` if a
// word is not of the codec's form (a bf16 value with low bits, an int8 word above 16 bits, two
// exponents in one block): the engine never produces one, so this is a bug, never written.
void pack(const FieldCodec& c, std::size_t begin, std::size_t count, const float* words,
          std::vector<unsigned char>& out, const std::string& what);
// Bytes -> words of one chunk (in holds chunk_bytes(c, begin, count) bytes).
void unpack(const FieldCodec& c, std::size_t begin, std::size_t count, const unsigned char* in, float* words) noexcept;

}  // namespace shardopt::ckpt
