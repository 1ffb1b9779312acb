#pragma once
// Helpers shared by test_rules.cpp and test_cpu_kernels.cpp: an independent model of the 16-bit
// formats (built from the IEEE definitions with double arithmetic, not from shardopt/dtype.hpp),
// the instruction sets this machine can run, and guarded ("poisoned") buffers.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.hpp"
#include "shardopt/dtype.hpp"

namespace shardopt::testing {

// A binary floating-point format with `mant` stored significand bits and exponents emin..emax.
struct Format {
  int mant;
  int emin;
  int emax;
  int bias;
  int exp_bits;
};
inline constexpr Format kFp16{10, -14, 15, 15, 5};
inline constexpr Format kBf16{7, -126, 127, 127, 8};
inline const Format& format_of(DType t) { return t == DType::fp16 ? kFp16 : kBf16; }

// Round x (finite or not) to the nearest value of `f`, ties to even, overflowing to infinity.
// nearbyint() rounds ties to even in the default rounding mode; x / quantum is exact (a power of
// two scaling of a double that holds a float).
inline double round_to(double x, const Format& f) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0) return x;
  const double a = std::fabs(x);
  int e = std::ilogb(a);
  if (e < f.emin) e = f.emin;  // subnormal range: fixed quantum 2^(emin-mant)
  const double quantum = std::ldexp(1.0, e - f.mant);
  double r = std::nearbyint(a / quantum) * quantum;
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -f.mant), f.emax);
  if (r > max_finite) r = INFINITY;
  return std::copysign(r, x);
}

// Bits of a value exactly representable in `f` (or +-inf). NaN is handled by the callers.
inline std::uint16_t encode(double v, const Format& f) {
  const std::uint32_t sign = std::signbit(v) ? 0x8000u : 0u;
  const std::uint32_t exp_all = (1u << f.exp_bits) - 1u;
  if (std::isinf(v)) return static_cast<std::uint16_t>(sign | (exp_all << f.mant));
  if (v == 0.0) return static_cast<std::uint16_t>(sign);
  const double a = std::fabs(v);
  const int e = std::ilogb(a);
  if (e < f.emin) {
    const auto m = static_cast<std::uint32_t>(a / std::ldexp(1.0, f.emin - f.mant));
    return static_cast<std::uint16_t>(sign | m);
  }
  const auto m = static_cast<std::uint32_t>(a / std::ldexp(1.0, e - f.mant) - std::ldexp(1.0, f.mant));
  return static_cast<std::uint16_t>(sign | (static_cast<std::uint32_t>(e + f.bias) << f.mant) | m);
}

inline double decode(std::uint16_t h, const Format& f) {
  const bool neg = (h & 0x8000u) != 0;
  const std::uint32_t exp_all = (1u << f.exp_bits) - 1u;
  const std::uint32_t ex = (h >> f.mant) & exp_all;
  const std::uint32_t m = h & ((1u << f.mant) - 1u);
  double v;
  if (ex == exp_all) v = m == 0 ? INFINITY : NAN;
  else if (ex == 0) v = std::ldexp(static_cast<double>(m), f.emin - f.mant);
  else v = std::ldexp(static_cast<double>((1u << f.mant) | m), static_cast<int>(ex) - f.bias - f.mant);
  return neg ? -v : v;
}

inline bool is_nan16(std::uint16_t h, const Format& f) {
  const std::uint32_t exp_all = (1u << f.exp_bits) - 1u;
  return ((h >> f.mant) & exp_all) == exp_all && (h & ((1u << f.mant) - 1u)) != 0;
}

// What float -> 16-bit must give per the contract in dtype.hpp, derived independently: finite and
// infinite values round to nearest even; a NaN stays a NaN with its sign, is quieted (top
// significand bit set) and keeps the top payload bits that fit.
inline std::uint16_t expected_to16(float x, DType t) {
  const Format& f = format_of(t);
  if (std::isnan(x)) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    const std::uint32_t payload = (u & 0x7fffffu) >> (23 - f.mant);
    const std::uint32_t exp_all = (1u << f.exp_bits) - 1u;
    return static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | (exp_all << f.mant) | payload |
                                      (1u << (f.mant - 1)));
  }
  return encode(round_to(static_cast<double>(x), f), f);
}

inline std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Every instruction set this processor can run, scalar first.
inline std::vector<cpu::Isa> available_isas() {
  std::vector<cpu::Isa> out{cpu::Isa::scalar};
  const cpu::Isa best = cpu::detect_isa();
  if (static_cast<int>(best) >= static_cast<int>(cpu::Isa::avx2)) out.push_back(cpu::Isa::avx2);
  if (best == cpu::Isa::avx512) out.push_back(cpu::Isa::avx512);
  return out;
}

// A byte buffer with guard bytes on both sides of the region under test; the region starts
// `offset_elems` elements past a 64-byte boundary so kernels see unaligned starts. Everything is
// filled with a poison byte, and guards_intact() tells whether a kernel wrote outside the region.
class Guarded {
 public:
  static constexpr std::size_t kGuard = 256;
  static constexpr unsigned char kPoison = 0xA5;
  Guarded(std::size_t n, std::size_t elem_size, std::size_t offset_elems)
      : bytes_(n * elem_size), offset_(kGuard + offset_elems * elem_size),
        storage_(bytes_ + offset_ + kGuard + 64, kPoison) {
    // Align the base so that offset_elems really is the misalignment.
    const auto addr = reinterpret_cast<std::uintptr_t>(storage_.data());
    shift_ = (64 - addr % 64) % 64;
  }
  void* data() { return storage_.data() + shift_ + offset_; }
  template <class T>
  T* as() {
    return static_cast<T*>(data());
  }
  bool guards_intact() const {
    const unsigned char* base = storage_.data() + shift_;
    for (std::size_t i = 0; i < offset_; ++i)
      if (base[i] != kPoison) return false;
    for (std::size_t i = 0; i < kGuard; ++i)
      if (base[offset_ + bytes_ + i] != kPoison) return false;
    return true;
  }

 private:
  std::size_t bytes_, offset_, shift_ = 0;
  std::vector<unsigned char> storage_;
};

}  // namespace shardopt::testing
