// CPU element-wise kernels: fill, cast, unscale_check, sum_squares, on every instruction set this
// machine has, against references built from the format definitions (kernel_test_util.hpp), with
// guard bytes around every output and unaligned starts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.hpp"
#include "kernel_test_util.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace shardopt {
namespace {

using cpu::Isa;
using testing::available_isas;
using testing::bits;
using testing::decode;
using testing::expected_to16;
using testing::format_of;
using testing::from_bits;
using testing::Guarded;

constexpr DType kDtypes[] = {DType::fp32, DType::fp16, DType::bf16};
constexpr std::size_t kSizes[] = {0, 1, 7, 4096 + 3};
constexpr std::size_t kOffsets[] = {0, 1, 3};

std::string label(Isa isa, DType a, std::size_t n, std::size_t off) {
  return std::string(cpu::name_of(isa)) + " " + std::string(name_of(a)) + " n=" + std::to_string(n) +
         " offset=" + std::to_string(off);
}

// Expected bits of element i after storing float x as dtype t.
std::uint32_t expected_store(float x, DType t) {
  return t == DType::fp32 ? bits(x) : expected_to16(x, t);
}
// Raw bits of element i of a buffer of dtype t.
std::uint32_t raw(const void* p, DType t, std::size_t i) {
  if (t == DType::fp32) return bits(static_cast<const float*>(p)[i]);
  return static_cast<const std::uint16_t*>(p)[i];
}
// Value of element i as double from the independent format model.
double value_of(const void* p, DType t, std::size_t i) {
  if (t == DType::fp32) return static_cast<const float*>(p)[i];
  return decode(static_cast<const std::uint16_t*>(p)[i], format_of(t));
}

// A float mixture that exercises every conversion path: normal values of several magnitudes, fp16
// and float subnormals, exact rounding ties, values that overflow fp16, infinities, NaNs, zeros.
std::vector<float> mixed_floats(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 11);
  std::vector<float> v(n);
  for (auto& x : v) {
    switch (pick(rng)) {
      case 0: x = normal(rng) * 1e-6f; break;   // fp16 subnormal range
      case 1: x = normal(rng) * 1e-40f; break;  // float subnormal
      case 2: x = normal(rng) * 1e5f; break;    // beyond fp16 for some
      case 3: x = from_bits(0x3f808000u); break;  // bf16 tie, rounds to even (down)
      case 4: x = from_bits(0x3f818000u); break;  // bf16 tie, rounds up
      case 5: x = from_bits(0x3f801000u); break;  // fp16 tie
      case 6: x = -0.0f; break;
      default: x = normal(rng) * 3.0f; break;
    }
  }
  return v;
}

// ---- instruction-set selection ------------------------------------------------------------------

TEST(Isa, NamesAndTable) {
  EXPECT_STREQ(cpu::name_of(Isa::scalar), "scalar");
  EXPECT_STREQ(cpu::name_of(Isa::avx2), "avx2");
  EXPECT_STREQ(cpu::name_of(Isa::avx512), "avx512");
  for (Isa isa : available_isas()) {
    const cpu::Kernels& k = cpu::kernels(isa);
    EXPECT_NE(k.fused_update, nullptr);
    EXPECT_NE(k.fill, nullptr);
    EXPECT_NE(k.cast, nullptr);
    EXPECT_NE(k.unscale_check, nullptr);
    EXPECT_NE(k.sum_squares, nullptr);
  }
  // Different instruction sets must be different code, or the bit-identity tests prove nothing.
  if (cpu::detect_isa() == Isa::avx512) {
    EXPECT_NE(cpu::kernels(Isa::avx512).fused_update, cpu::kernels(Isa::scalar).fused_update);
  }
}

TEST(Isa, EnvironmentMayOnlyLower) {
  const char* old = std::getenv("SHARDOPT_ISA");
  const std::string saved = old ? old : "";
  const Isa best = cpu::detect_isa();
  auto with = [](const char* v) {
    setenv("SHARDOPT_ISA", v, 1);
    return cpu::active_isa();
  };
  EXPECT_EQ(with("scalar"), Isa::scalar);
  EXPECT_EQ(with("avx2"), static_cast<int>(best) >= 1 ? Isa::avx2 : Isa::scalar);
  EXPECT_EQ(with("avx512"), best);  // never above what the CPU has
  EXPECT_EQ(with("sse9000"), best);  // unknown: ignored
  EXPECT_EQ(with(""), best);
  unsetenv("SHARDOPT_ISA");
  EXPECT_EQ(cpu::active_isa(), best);
  if (old) setenv("SHARDOPT_ISA", saved.c_str(), 1);
}

// ---- conversions: every 16-bit input, a structured sweep of floats -----------------------------

TEST(Conversions, Every16BitValueToFloatAndAcross) {
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  for (Isa isa : available_isas()) {
    const auto& k = cpu::kernels(isa);
    for (DType src : {DType::fp16, DType::bf16}) {
      const auto& f = format_of(src);
      std::vector<float> out(all.size());
      k.cast(all.data(), src, out.data(), DType::fp32, all.size());
      for (std::size_t i = 0; i < all.size(); ++i) {
        const double want = decode(all[i], f);
        if (std::isnan(want)) {
          // Widening keeps the NaN exactly: sign, and the payload in the top significand bits.
          const std::uint32_t w = ((i & 0x8000u) << 16) | 0x7f800000u |
                                  ((i & ((1u << f.mant) - 1u)) << (23 - f.mant));
          ASSERT_EQ(bits(out[i]), w) << cpu::name_of(isa) << " " << name_of(src) << " 0x" << std::hex << i;
        } else {
          ASSERT_EQ(bits(out[i]), bits(static_cast<float>(want)))
              << cpu::name_of(isa) << " " << name_of(src) << " 0x" << std::hex << i;
        }
        // The kernels and dtype.hpp (what the CUDA kernels use) agree to the bit.
        ASSERT_EQ(bits(out[i]), bits(load_as_float(all.data(), src, i)));
      }
      const DType dst = src == DType::fp16 ? DType::bf16 : DType::fp16;
      std::vector<std::uint16_t> across(all.size());
      k.cast(all.data(), src, across.data(), dst, all.size());
      for (std::size_t i = 0; i < all.size(); ++i) {
        // Through float: exact widening (NaN payload kept), then one rounding.
        const float wide = testing::is_nan16(all[i], f)
                               ? from_bits(((i & 0x8000u) << 16) | 0x7f800000u |
                                           ((i & ((1u << f.mant) - 1u)) << (23 - f.mant)))
                               : static_cast<float>(decode(all[i], f));
        ASSERT_EQ(across[i], expected_to16(wide, dst))
            << cpu::name_of(isa) << " " << name_of(src) << "->" << name_of(dst) << " 0x" << std::hex << i;
      }
    }
  }
}

// Float -> 16 bit: all 2^16 upper halves combined with lower halves at every rounding boundary
// (bit k set, bits below k set, bit k plus one), which covers the ties and near-ties of both
// formats' normal and subnormal ranges, plus random bit patterns.
TEST(Conversions, FloatTo16BitSweep) {
  std::vector<std::uint32_t> lows{0u, 0xffffu};
  for (int kb = 0; kb < 16; ++kb) {
    lows.push_back(1u << kb);
    lows.push_back((1u << kb) - 1u);
    lows.push_back((1u << kb) + 1u);
  }
  std::vector<float> in;
  in.reserve(65536 * lows.size() + (1u << 20));
  for (std::uint32_t hi = 0; hi < 65536; ++hi)
    for (std::uint32_t lo : lows) in.push_back(from_bits((hi << 16) | lo));
  std::mt19937 rng(7);
  for (int i = 0; i < (1 << 20); ++i) in.push_back(from_bits(static_cast<std::uint32_t>(rng())));

  std::vector<std::uint16_t> out(in.size());
  for (Isa isa : available_isas()) {
    for (DType dst : {DType::fp16, DType::bf16}) {
      cpu::kernels(isa).cast(in.data(), DType::fp32, out.data(), dst, in.size());
      for (std::size_t i = 0; i < in.size(); ++i) {
        ASSERT_EQ(out[i], expected_to16(in[i], dst))
            << cpu::name_of(isa) << " " << name_of(dst) << " input 0x" << std::hex << bits(in[i]);
        const std::uint16_t ref = dst == DType::fp16 ? float_to_fp16(in[i]) : float_to_bf16(in[i]);
        ASSERT_EQ(out[i], ref) << "kernel and dtype.hpp disagree";
      }
    }
  }
}

// ---- fill ------------------------------------------------------------------------------------------

TEST(Kernels, Fill) {
  const float values[] = {0.0f, -0.0f, 1.0f, 0.1f, 3e-6f, 70000.0f, -INFINITY, NAN, from_bits(0x3f818000u)};
  for (Isa isa : available_isas())
    for (DType t : kDtypes)
      for (std::size_t n : kSizes)
        for (std::size_t off : kOffsets)
          for (float v : values) {
            Guarded g(n, size_of(t), off);
            cpu::kernels(isa).fill(g.data(), t, n, v);
            const std::uint32_t want = expected_store(v, t);
            for (std::size_t i = 0; i < n; ++i)
              ASSERT_EQ(raw(g.data(), t, i), want) << label(isa, t, n, off) << " value " << v << " i=" << i;
            ASSERT_TRUE(g.guards_intact()) << label(isa, t, n, off);
          }
}

// ---- cast ------------------------------------------------------------------------------------------

TEST(Kernels, CastAllPairs) {
  for (Isa isa : available_isas())
    for (DType src : kDtypes)
      for (DType dst : kDtypes)
        for (std::size_t n : kSizes)
          for (std::size_t off : kOffsets) {
            const std::vector<float> f = mixed_floats(n, static_cast<unsigned>(n * 31 + off));
            // The source holds values of its own dtype (rounded by the reference model).
            Guarded in(n, size_of(src), off);
            for (std::size_t i = 0; i < n; ++i) {
              if (src == DType::fp32) in.as<float>()[i] = f[i];
              else in.as<std::uint16_t>()[i] = expected_to16(f[i], src);
            }
            Guarded out(n, size_of(dst), (off + 1) % 4);
            cpu::kernels(isa).cast(in.data(), src, out.data(), dst, n);
            const std::string what = label(isa, src, n, off) + " -> " + std::string(name_of(dst));
            for (std::size_t i = 0; i < n; ++i) {
              const double v = value_of(in.data(), src, i);
              const std::uint32_t want = std::isnan(v) ? 0 : expected_store(static_cast<float>(v), dst);
              if (std::isnan(v)) {
                ASSERT_TRUE(std::isnan(value_of(out.data(), dst, i))) << what;
              } else {
                ASSERT_EQ(raw(out.data(), dst, i), want) << what << " i=" << i << " v=" << v;
              }
            }
            ASSERT_TRUE(in.guards_intact() && out.guards_intact()) << what;
          }
}

TEST(Kernels, CastSameBufferSameDtypeIsNoOp) {
  for (Isa isa : available_isas()) {
    std::vector<float> v = mixed_floats(100, 3);
    const std::vector<float> before = v;
    cpu::kernels(isa).cast(v.data(), DType::fp32, v.data(), DType::fp32, v.size());
    ASSERT_EQ(std::memcmp(v.data(), before.data(), v.size() * 4), 0);
    EXPECT_THROW(cpu::kernels(isa).cast(v.data(), DType::fp32, v.data(), DType::bf16, v.size()), Error);
  }
}

// ---- unscale_check -------------------------------------------------------------------------------

TEST(Kernels, UnscaleCheckFinite) {
  const float scale = 1.0f / 1024.0f * 0.73f;
  for (Isa isa : available_isas())
    for (DType t : kDtypes)
      for (std::size_t n : kSizes)
        for (std::size_t off : kOffsets) {
          std::mt19937 rng(static_cast<unsigned>(n + off));
          std::normal_distribution<float> d(0.0f, 100.0f);
          Guarded g(n, size_of(t), off);
          std::vector<double> in(n);
          for (std::size_t i = 0; i < n; ++i) {
            const float x = d(rng);
            if (t == DType::fp32) g.as<float>()[i] = x;
            else g.as<std::uint16_t>()[i] = expected_to16(x, t);
            in[i] = value_of(g.data(), t, i);
          }
          const bool bad = cpu::kernels(isa).unscale_check(g.data(), t, n, scale);
          EXPECT_FALSE(bad) << label(isa, t, n, off);
          for (std::size_t i = 0; i < n; ++i) {
            // data *= scale is one float multiply, then the store rounds to the dtype.
            const float prod = static_cast<float>(in[i]) * scale;
            ASSERT_EQ(raw(g.data(), t, i), expected_store(prod, t)) << label(isa, t, n, off) << " i=" << i;
          }
          ASSERT_TRUE(g.guards_intact()) << label(isa, t, n, off);
        }
}

TEST(Kernels, UnscaleCheckFindsOneNonFinite) {
  for (Isa isa : available_isas())
    for (DType t : kDtypes)
      for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(4096 + 3)})
        for (float special : {INFINITY, -INFINITY, NAN})
          for (std::size_t pos : {std::size_t(0), n / 2, n - 1, n - 2, n - 40}) {
            if (pos >= n) continue;
            Guarded g(n, size_of(t), 1);
            for (std::size_t i = 0; i < n; ++i) {
              const float x = i == pos ? special : 0.5f + static_cast<float>(i % 13);
              if (t == DType::fp32) g.as<float>()[i] = x;
              else g.as<std::uint16_t>()[i] = expected_to16(x, t);
            }
            const bool bad = cpu::kernels(isa).unscale_check(g.data(), t, n, 0.25f);
            ASSERT_TRUE(bad) << label(isa, t, n, 1) << " special at " << pos;
            // Everything is still scaled, the special included.
            const std::size_t j = pos == 0 ? 1 : 0;
            if (j < n) {
              ASSERT_EQ(value_of(g.data(), t, j), (0.5 + static_cast<double>(j % 13)) * 0.25);
            }
            const double sv = value_of(g.data(), t, pos);
            ASSERT_TRUE(std::isnan(special) ? std::isnan(sv) : sv == static_cast<double>(special));
            ASSERT_TRUE(g.guards_intact());
          }
}

TEST(Kernels, UnscaleCheckOverflowOnRounding) {
  // 40000 * 2 = 80000 is finite as a float but overflows fp16: the stored value is inf.
  for (Isa isa : available_isas()) {
    std::vector<std::uint16_t> h(37, expected_to16(1.0f, DType::fp16));
    h[36] = expected_to16(40000.0f, DType::fp16);
    EXPECT_TRUE(cpu::kernels(isa).unscale_check(h.data(), DType::fp16, h.size(), 2.0f));
    EXPECT_EQ(h[36], 0x7c00u);
    std::vector<float> f(37, 1.0f);
    f[36] = 3e38f;
    EXPECT_TRUE(cpu::kernels(isa).unscale_check(f.data(), DType::fp32, f.size(), 2.0f));
    EXPECT_FALSE(cpu::kernels(isa).unscale_check(f.data(), DType::fp32, 36, 2.0f));
  }
}

// ---- sum_squares ---------------------------------------------------------------------------------

TEST(Kernels, SumSquares) {
  for (DType t : kDtypes)
    for (std::size_t n : kSizes)
      for (std::size_t off : kOffsets) {
        std::mt19937 rng(static_cast<unsigned>(n * 7 + off));
        std::normal_distribution<float> d(0.0f, 3.0f);
        Guarded g(n, size_of(t), off);
        for (std::size_t i = 0; i < n; ++i) {
          const float x = d(rng);
          if (t == DType::fp32) g.as<float>()[i] = x;
          else g.as<std::uint16_t>()[i] = expected_to16(x, t);
        }
        // Reference: plain sequential double sum. Both it and the kernel add n non-negative terms
        // (each square exact in double), so each is within (n-1)*2^-53*sum of the exact sum
        // (first-order bound for recursive summation in any order).
        double ref = 0;
        for (std::size_t i = 0; i < n; ++i) ref += value_of(g.data(), t, i) * value_of(g.data(), t, i);
        const double bound = 2.0 * static_cast<double>(n) * std::ldexp(1.0, -53) * ref * 1.01;
        double first = 0;
        for (Isa isa : available_isas()) {
          const double got = cpu::kernels(isa).sum_squares(g.data(), t, n);
          EXPECT_LE(std::fabs(got - ref), bound) << label(isa, t, n, off) << " got " << got << " ref " << ref;
          // A fixed summation order: every instruction set gives the same bits.
          if (isa == Isa::scalar) {
            first = got;
          } else {
            EXPECT_EQ(std::memcmp(&got, &first, 8), 0) << label(isa, t, n, off);
          }
        }
        ASSERT_TRUE(g.guards_intact());
      }
}

TEST(Kernels, SumSquaresNonFinite) {
  for (Isa isa : available_isas()) {
    std::vector<float> v(100, 1.0f);
    v[99] = INFINITY;
    EXPECT_TRUE(std::isinf(cpu::kernels(isa).sum_squares(v.data(), DType::fp32, v.size())));
    v[3] = NAN;
    EXPECT_TRUE(std::isnan(cpu::kernels(isa).sum_squares(v.data(), DType::fp32, v.size())));
  }
}

TEST(Kernels, NullPointersWithElementsAreErrors) {
  for (Isa isa : available_isas()) {
    const auto& k = cpu::kernels(isa);
    EXPECT_THROW(k.fill(nullptr, DType::fp32, 3, 1.0f), Error);
    EXPECT_THROW(k.sum_squares(nullptr, DType::bf16, 3), Error);
    EXPECT_THROW(k.unscale_check(nullptr, DType::fp16, 3, 1.0f), Error);
    // n == 0 touches nothing, so null is fine.
    EXPECT_NO_THROW(k.fill(nullptr, DType::fp32, 0, 1.0f));
    EXPECT_EQ(k.sum_squares(nullptr, DType::fp32, 0), 0.0);
  }
}

}  // namespace
}  // namespace shardopt
