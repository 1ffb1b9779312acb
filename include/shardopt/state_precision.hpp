#pragma once
// Compressed optimizer state: the precision the moments are stored in, and the element functions
// that encode and decode them. Master weights always stay fp32; only the rule's states (Adam's
// first and second moments, SGD's momentum buffer, Lion's momentum) are compressed.
//
//   fp32  4 bytes per state element (the uncompressed state; Backend::fused_update).
//   bf16  2 bytes per state element: float_to_bf16 of shardopt/dtype.hpp, round to nearest, ties
//         to even. Relative error per stored value |q(x) - x| <= 2^-8 |x| (half an ulp of an 8-bit
//         significand) for normal values; NaN/inf are kept.
//   int8  1 byte per state element plus one fp32 scale per block of B elements (B a power of two,
//         kMinQuantBlock <= B <= kMaxQuantBlock; kDefaultQuantBlock = 256, i.e. 1/64 byte of scale
//         per element). Each byte is a small floating-point code relative to its block's scale,
//         rounded stochastically with a deterministic dither (below).
//
// Why 8-bit floating codes and not a linear (absmax) code. A moment spans orders of magnitude
// within a block; a linear code has 127 steps of scale/127, so every element of a block smaller
// than about 1/254 of its largest one becomes 0. For the second moment v that is fatal: a zero v
// under a nonzero m gives a step of lr*m/eps. Like the dynamic quantization of 8-bit optimizers
// (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"), a code with an exponent keeps
// a relative precision over a wide range; the codes here are plain minifloats, so encoding is
// exact bit arithmetic (no table search) and vectorizes:
//
//   first moment (signed, SignedCode):    bit 7 sign, bits 6..0 an e3m4 magnitude
//   second moment (unsigned, UnsignedCode): bits 7..0 an e5m3 magnitude
//
// A magnitude code c with E exponent bits and M mantissa bits (Emax = 2^E - 1) stands for
//   r(c) = 2^(ce - Emax) * (1 + cf / 2^M)   for ce = c >> M in 1..Emax (cf = c mod 2^M),
//   r(c) = 2^(1 - Emax) * cf / 2^M          for ce = 0 (the "subnormal" codes, down to exact 0),
// so r covers [0, 2). The decoded value is r(c) * scale (and the sign bit for SignedCode).
// e3m4 keeps m to 2^-4 relative over 2^-6..2 of its scale; e5m3 keeps v to 2^-3 over 2^-30..2
// (2^-15 in sqrt(v)): v's range is far wider than m's, so an element whose quantized m is not 0
// in practice has a quantized v that is not 0 either, and a small m is dropped rather than
// divided by eps.
//
// The scale of a block is a power of two: round absmax = max |x| of the block's new values up to M
// mantissa bits and keep only its exponent. Dividing by a power of two is exact, so the only
// rounding is that of the code, and no |x| <= absmax rounds past the largest code of the block
// (no saturation, no clamp): the code of |x| is at most |x| rounded up, at most absmax rounded up.
// Special blocks: absmax == 0 or below 2^-126 (a float subnormal) gives scale 0, every code 0
// and every value 0; a NaN or infinite value in the block (or an absmax that rounds to infinity)
// gives scale NaN, so the whole block decodes as NaN: a non-finite moment stays visible.
//
// Rounding: stochastic, with a deterministic dither. Why not round to nearest: an exponential
// moving average x <- beta*x + (1-beta)*y moves x by a relative (1-beta)|y/x - 1| per step, and
// with beta2 = 0.999 that is far below half a code step (2^-4 relative for e5m3, 2^-9 even for an
// 8-bit linear code at its top): round to nearest returns the old code, so v stops following the
// gradients after a few dozen steps (measured: on the quadratic of tests/test_compressed_state.cpp
// the int8 AdamW loss then left the fp32-state one by 7% of the initial loss; with stochastic
// rounding by 0.2%). Stochastic rounding
// rounds up with probability equal to the fraction of the step, so the stored value is unbiased,
// E[q(x)] = x, and an EMA keeps its mean. The dither is not random state: it is
// dither(dither_key(seed, state), i), a hash of a per-step seed, the state (1 or 2) and the
// element's global index i, so every backend, instruction set, thread split and world size
// produces the same bytes, and a step can be recomputed exactly.
//   normal codes: add 23-M dither bits to the 23-M mantissa bits below the M kept ones and
//     truncate (integer arithmetic on the float's bits);
//   subnormal codes: x = r * 2^(Emax+M-1) in units of the code step, code = floor(x + u) with
//     u = a multiple of 2^(M-23) in [0, 1) from the dither (an exact float addition for every x
//     on the grid, within 2^(M-24) of a step otherwise).
//
// Error bound per element (derivation). Let r = |x| / scale (exact), q the decoded magnitude; q is
// one of the two grid values around r.
//   normal codes (r >= 2^(1-Emax)): the grid spacing in [2^k, 2^(k+1)) is 2^(k-M), so
//     |q - r| < 2^(k-M) <= 2^-M * r;
//   subnormal codes (r < 2^(1-Emax)): spacing 2^(1-Emax-M), so |q - r| < 2^(1-Emax-M).
// Hence |dequant(quant(x)) - x| < max(2^-M |x|, 2^(1-Emax-M) * scale), and the scale obeys
//   absmax / 2 < scale <= absmax * (1 + 2^-M).
//   SignedCode   (e3m4): |err| < max(2^-4 |x|, 2^-10 * scale)
//   UnsignedCode (e5m3): |err| < max(2^-3 |x|, 2^-33 * scale)
// and over the dither the error has mean 0 (normal codes exactly; subnormal codes within
// 2^(M-24) of a step).
// The second moment is never negative; a negative value given to the unsigned code encodes as 0.
// (A decoded value is r(c) * scale, one float multiply: exact unless it falls below 2^-126, where
// the float's own subnormal rounding adds at most 2^-150.)
//
// bf16 states round to nearest even (float_to_bf16): they have 2^-8 relative precision, so the
// same stagnation sets in only where (1-beta)|y/x - 1| < 2^-9.
//
// Blocks. Quantization blocks are defined on a tensor's global element index: block k holds
// elements [k*B, (k+1)*B) of the tensor (the last one may be shorter). A block never straddles a
// shard boundary: whoever slices a tensor into shards aligns the slices to B (the layout's unit
// alignment), so a block's scale never depends on world size or stage. A state of n elements in
// int8 holds n code bytes and quant_block_count(n, B) fp32 scales. An all-zero state (codes 0,
// scales 0) is the zero moment.
//
// Every function in namespace quant is usable in host code and in CUDA device code.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "shardopt/dtype.hpp"

namespace shardopt {

enum class StatePrecision : std::uint8_t { fp32, bf16, int8 };

constexpr std::string_view name_of(StatePrecision p) noexcept {
  return p == StatePrecision::fp32 ? "fp32" : p == StatePrecision::bf16 ? "bf16" : "int8";
}
// Parses "fp32" | "bf16" | "int8"; false if unknown (out unchanged).
bool parse_state_precision(std::string_view text, StatePrecision& out) noexcept;

// Quantization block sizes (elements). 64 is the smallest: below it the 4-byte scale costs more
// than 1/16 byte per element and blocks stop covering whole vector registers of the CPU kernels.
// 4096 is the largest: a block's updated values are held in a fixed buffer (CPU: stack, GPU:
// shared memory, 32 KiB for both moments) between the update and the requantization. The default,
// 256, costs 1/64 byte of scale per element and state, keeps an outlier's influence (it sets the
// scale, hence the absolute error floor) to 256 neighbours, and is one CUDA thread block's width;
// the 8-bit optimizers paper found blocks of 2048 adequate, smaller blocks only more accurate.
inline constexpr std::size_t kMinQuantBlock = 64;
inline constexpr std::size_t kMaxQuantBlock = 4096;
inline constexpr std::size_t kDefaultQuantBlock = 256;

// Throws Error(invalid_argument) naming `what` and the value unless block is a power of two in
// [kMinQuantBlock, kMaxQuantBlock].
void check_quant_block(std::size_t block, std::string_view what);

// Blocks of `block` elements covering n elements (the last one may be partial); 0 for n == 0.
SHARDOPT_HD constexpr std::size_t quant_block_count(std::size_t n, std::size_t block) noexcept {
  return block == 0 ? 0 : (n + block - 1) / block;
}

// Bytes one state tensor of n elements takes in precision p (int8: codes plus fp32 scales).
constexpr std::size_t state_bytes(StatePrecision p, std::size_t n, std::size_t block) noexcept {
  switch (p) {
    case StatePrecision::fp32: return 4 * n;
    case StatePrecision::bf16: return 2 * n;
    case StatePrecision::int8: return n + 4 * quant_block_count(n, block);
  }
  return 4 * n;
}

namespace quant {

// A minifloat magnitude format: E exponent bits, M mantissa bits, values in [0, 2) (see above).
template <int E, int M>
struct MiniFloat {
  static constexpr int kExpBits = E;
  static constexpr int kMantBits = M;
  static constexpr int kEmax = (1 << E) - 1;
  static constexpr std::uint32_t kMaxMag = (1u << (E + M)) - 1u;
};
using SignedCode = MiniFloat<3, 4>;    // first moments: sign + e3m4
using UnsignedCode = MiniFloat<5, 3>;  // second moments: e5m3

// The float bits of |x| (NaN keeps bits above 0x7f800000): the integer max of these over a block
// is absmax, and a NaN wins the max, so it reaches block_scale.
SHARDOPT_HD inline std::uint32_t abs_bits(float x) noexcept { return float_bits(x) & 0x7fffffffu; }

// The power-of-two scale of a block whose absmax has bits `absmax_bits` (abs_bits of the largest
// magnitude): 0 for a zero (or float-subnormal) absmax, NaN for a non-finite one.
template <class F>
SHARDOPT_HD inline float block_scale(std::uint32_t absmax_bits) noexcept {
  if (absmax_bits > 0x7f800000u) return bits_float(0x7fc00000u);
  constexpr int kDrop = 23 - F::kMantBits;
  const std::uint32_t rounded = absmax_bits + ((1u << kDrop) - 1u);  // up to M mantissa bits
  const std::uint32_t e = rounded >> 23;
  if (e == 0) return 0.0f;
  if (e >= 255u) return bits_float(0x7fc00000u);
  return bits_float(e << 23);
}

// What encoding multiplies by: 1/scale for a usable scale, 0 for scale 0 or NaN (every code of
// such a block is 0, and decoding multiplies 0 by the scale: 0, or NaN).
SHARDOPT_HD inline float inverse_scale(float scale) noexcept {
  // 1/2^k is exact (also 2^-127, a float subnormal), whatever correctly rounded division computes it.
  return (scale > 0.0f && scale <= 3.0e38f) ? 1.0f / scale : 0.0f;
}

// The dither: murmur3's 32-bit finalizer (a bijection that spreads every input bit over the
// output) applied to the element's index and a per-call key.
SHARDOPT_HD inline std::uint32_t mix32(std::uint32_t x) noexcept {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}
// The key of one state (1: first, 2: second) for one seed (the caller's per-step value).
SHARDOPT_HD inline std::uint32_t dither_key(std::uint64_t seed, std::uint32_t state) noexcept {
  return mix32(static_cast<std::uint32_t>(seed) ^ mix32(static_cast<std::uint32_t>(seed >> 32) ^ mix32(state + 0x9e3779b9u)));
}
// The dither of the element with global index `index`.
SHARDOPT_HD inline std::uint32_t dither(std::uint32_t key, std::uint64_t index) noexcept {
  return mix32(static_cast<std::uint32_t>(index) ^ mix32(static_cast<std::uint32_t>(index >> 32) ^ key));
}

// The magnitude code of r (|x| * inverse_scale, expected in [0, 2)), rounded stochastically with
// dither d: up with probability (r - lower grid value) / step when d is uniform. r outside [0, 2)
// or NaN encodes as 0 (it can only occur in a block whose scale is 0 or NaN). Branch-free.
// d == 0 truncates; d == 0xffffffff rounds up every value off the grid (for subnormal codes:
// every value at least 2^(M-23) of a step above a grid value; the dither has 23-M bits there).
template <class F>
SHARDOPT_HD inline std::uint32_t encode_magnitude(float r, std::uint32_t d) noexcept {
  constexpr int M = F::kMantBits;
  constexpr int kDrop = 23 - M;
  r = (r >= 0.0f && r < 2.0f) ? r : 0.0f;
  const std::uint32_t u = float_bits(r);
  // Normal codes: add kDrop dither bits below the M kept mantissa bits and truncate (a carry steps
  // into the exponent, which is the next code), then rebias the exponent from 127 to Emax.
  const std::uint32_t normal = ((u + (d >> (32 - kDrop))) >> kDrop) - (static_cast<std::uint32_t>(127 - F::kEmax) << M);
  // Subnormal codes: x in units of the step 2^(1-Emax-M) is below 2^M; u in [0, 1) is a multiple
  // of 2^(M-23), the ulp of floats in [2^M, 2^(M+1)), so x + u is exact whenever x is on the grid.
  const float x = r * bits_float(static_cast<std::uint32_t>(127 + F::kEmax + M - 1) << 23);
  const float frac = static_cast<float>(static_cast<std::int32_t>(d >> (9 + M))) *
                     bits_float(static_cast<std::uint32_t>(127 + M - 23) << 23);
  const std::uint32_t sub = static_cast<std::uint32_t>(static_cast<std::int32_t>(x + frac));
  const float threshold = bits_float(static_cast<std::uint32_t>(127 + 1 - F::kEmax) << 23);
  return r < threshold ? sub : normal;
}

// r(c) for a magnitude code c (exact). Branch-free.
template <class F>
SHARDOPT_HD inline float decode_magnitude(std::uint32_t c) noexcept {
  constexpr int M = F::kMantBits;
  const float normal = bits_float((c + (static_cast<std::uint32_t>(127 - F::kEmax) << M)) << (23 - M));
  const float step = bits_float(static_cast<std::uint32_t>(127 + 1 - F::kEmax - M) << 23);  // 2^(1-Emax-M)
  const float sub = static_cast<float>(static_cast<std::int32_t>(c)) * step;
  return (c >> M) == 0 ? sub : normal;
}

// First moments: sign bit 7, magnitude bits 6..0. Zero is always the code 0 (never "-0").
SHARDOPT_HD inline std::uint8_t encode_signed(float x, float inv_scale, std::uint32_t dither) noexcept {
  const std::uint32_t mag = encode_magnitude<SignedCode>(bits_float(abs_bits(x)) * inv_scale, dither);
  const std::uint32_t sign = (float_bits(x) >> 24) & 0x80u;
  return static_cast<std::uint8_t>(mag | (mag != 0 ? sign : 0u));
}
SHARDOPT_HD inline float decode_signed(std::uint8_t code, float scale) noexcept {
  const float mag = decode_magnitude<SignedCode>(code & 0x7fu) * scale;
  return bits_float(float_bits(mag) | (static_cast<std::uint32_t>(code & 0x80u) << 24));
}

// Second moments: all eight bits are the magnitude; negative inputs encode as 0.
SHARDOPT_HD inline std::uint8_t encode_unsigned(float x, float inv_scale, std::uint32_t dither) noexcept {
  return static_cast<std::uint8_t>(encode_magnitude<UnsignedCode>((x > 0.0f ? x : 0.0f) * inv_scale, dither));
}
SHARDOPT_HD inline float decode_unsigned(std::uint8_t code, float scale) noexcept {
  return decode_magnitude<UnsignedCode>(code) * scale;
}

}  // namespace quant
}  // namespace shardopt
