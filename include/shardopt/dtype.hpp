#pragma once
// Element types and their conversions.
//
// fp16 is IEEE 754 binary16, bf16 the upper half of an IEEE binary32. Conversions from float round
// to nearest, ties to even; NaN stays NaN (quiet), infinities and signed zeros are kept, fp16
// subnormals are produced and read exactly, and values beyond fp16's range become infinity.
// Every function here is usable in host code and in CUDA device code.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__CUDACC__)
#define SHARDOPT_HD __host__ __device__
#else
#define SHARDOPT_HD
#endif

namespace shardopt {

enum class DType : std::uint8_t { fp32, fp16, bf16 };

constexpr std::size_t size_of(DType t) noexcept { return t == DType::fp32 ? 4 : 2; }
constexpr std::string_view name_of(DType t) noexcept {
  return t == DType::fp32 ? "fp32" : t == DType::fp16 ? "fp16" : "bf16";
}
// Parses "fp32" | "fp16" | "bf16" (also "float32", "float16", "bfloat16"); false if unknown.
bool parse_dtype(std::string_view text, DType& out) noexcept;

SHARDOPT_HD inline std::uint32_t float_bits(float f) noexcept {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
SHARDOPT_HD inline float bits_float(std::uint32_t u) noexcept {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

SHARDOPT_HD inline float bf16_to_float(std::uint16_t h) noexcept {
  return bits_float(static_cast<std::uint32_t>(h) << 16);
}

SHARDOPT_HD inline std::uint16_t float_to_bf16(float f) noexcept {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; carries into the exponent correctly
  return static_cast<std::uint16_t>(u >> 16);
}

SHARDOPT_HD inline float fp16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan (payload kept)
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // subnormal: value = mant * 2^-24, exact in float
  int e = -1;
  do {
    mant <<= 1;
    ++e;
  } while ((mant & 0x400u) == 0);
  mant &= 0x3ffu;
  return bits_float(sign | (static_cast<std::uint32_t>(112 - e) << 23) | (mant << 13));
}

SHARDOPT_HD inline std::uint16_t float_to_fp16(float f) noexcept {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {  // normal fp16 (>= 2^-14)
    const std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return static_cast<std::uint16_t>(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): +-0
  // subnormal fp16: shift the full significand right, round to nearest even
  const std::uint32_t e = a >> 23;
  const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - e;  // 14..24 for e in 102..112
  const std::uint32_t half = 1u << (shift - 1);
  const std::uint32_t rem = m & ((1u << shift) - 1u);
  std::uint32_t q = m >> shift;
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<std::uint16_t>(sign | q);
}

// Load element i of a buffer of type t as float / store a float into it with rounding.
SHARDOPT_HD inline float load_as_float(const void* p, DType t, std::size_t i) noexcept {
  switch (t) {
    case DType::fp32: return static_cast<const float*>(p)[i];
    case DType::fp16: return fp16_to_float(static_cast<const std::uint16_t*>(p)[i]);
    default: return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
  }
}
SHARDOPT_HD inline void store_from_float(void* p, DType t, std::size_t i, float v) noexcept {
  switch (t) {
    case DType::fp32: static_cast<float*>(p)[i] = v; break;
    case DType::fp16: static_cast<std::uint16_t*>(p)[i] = float_to_fp16(v); break;
    default: static_cast<std::uint16_t*>(p)[i] = float_to_bf16(v); break;
  }
}

}  // namespace shardopt
