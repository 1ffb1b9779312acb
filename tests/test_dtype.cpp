// dtype conversions, checked exhaustively against references written here from the IEEE formats'
// definitions (bit fields and std::ldexp in double), never against the code under test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "shardopt/dtype.hpp"

namespace {

using shardopt::DType;

// ---- independent references -------------------------------------------------------------------

// A 16-bit floating format: 1 sign bit, `ebits` exponent bits, `mbits` mantissa bits.
struct Format {
  int ebits, mbits;
  const char* name;
  int bias() const { return (1 << (ebits - 1)) - 1; }
  std::uint32_t exp_all_ones() const { return (1u << ebits) - 1; }
  std::uint16_t sign_bit() const { return 0x8000; }
  std::uint16_t inf_bits() const { return static_cast<std::uint16_t>(exp_all_ones() << mbits); }
  std::uint16_t quiet_bit() const { return static_cast<std::uint16_t>(1u << (mbits - 1)); }
  std::uint16_t max_finite() const { return static_cast<std::uint16_t>(inf_bits() - 1); }
};
constexpr Format kFp16{5, 10, "fp16"};
constexpr Format kBf16{8, 7, "bf16"};

bool ref_is_nan(const Format& f, std::uint16_t h) {
  return ((h >> f.mbits) & f.exp_all_ones()) == f.exp_all_ones() && (h & ((1u << f.mbits) - 1)) != 0;
}

// The value of a 16-bit pattern from its fields: (-1)^s * 2^(e-bias) * 1.m, or 2^(1-bias) * 0.m for
// subnormals. Every such value is exact in double.
double ref_to_double(const Format& f, std::uint16_t h) {
  const bool neg = (h & 0x8000) != 0;
  const std::uint32_t e = (h >> f.mbits) & f.exp_all_ones();
  const std::uint32_t m = h & ((1u << f.mbits) - 1);
  double v;
  if (e == f.exp_all_ones()) {
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - f.bias() - f.mbits);
  } else {
    v = std::ldexp(static_cast<double>((1u << f.mbits) + m), static_cast<int>(e) - f.bias() - f.mbits);
  }
  return neg ? -v : v;  // negation also gives -0.0 for the negative zero pattern
}

// All non-negative finite values in pattern order (increasing), plus one virtual entry past the
// largest finite value: the value a wider exponent range would hold next (max + 1 ulp). Round to
// nearest treats it as the upper neighbour of max, and IEEE says anything that rounds to it
// becomes infinity; its pattern is exactly the infinity pattern, which is even.
struct Table {
  Format f;
  std::vector<double> values;  // index = pattern
  explicit Table(const Format& fmt) : f(fmt) {
    for (std::uint32_t p = 0; p <= fmt.max_finite(); ++p) values.push_back(ref_to_double(fmt, static_cast<std::uint16_t>(p)));
    const double max = values.back();
    const double ulp = max - values[values.size() - 2];
    values.push_back(max + ulp);
  }
};

// Round-to-nearest-even of a float to the format, by finding the two neighbouring representable
// values and choosing the nearer (the even pattern on a tie). Distances are exact in double
// (Sterbenz: the neighbours are within a factor of two of x, or the lower one is 0).
std::uint16_t ref_from_float(const Table& t, float x) {
  const Format& f = t.f;
  if (std::isnan(x)) return static_cast<std::uint16_t>(f.inf_bits() | f.quiet_bit());  // checked by class only
  const std::uint16_t sign = std::signbit(x) ? f.sign_bit() : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (std::isinf(a)) return static_cast<std::uint16_t>(sign | f.inf_bits());
  const std::vector<double>& v = t.values;
  if (a >= v.back()) return static_cast<std::uint16_t>(sign | f.inf_bits());
  // first index with value > a; its predecessor is <= a
  const auto it = std::upper_bound(v.begin(), v.end(), a);
  const std::size_t hi = static_cast<std::size_t>(it - v.begin());
  const std::size_t lo = hi - 1;
  const double dlo = a - v[lo], dhi = v[hi] - a;
  std::size_t pick;
  if (dlo < dhi) pick = lo;
  else if (dhi < dlo) pick = hi;
  else pick = (lo % 2 == 0) ? lo : hi;
  // pick == values.size()-1 is the virtual entry: the infinity pattern, by construction
  return static_cast<std::uint16_t>(sign | pick);
}

std::uint32_t fbits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bitsf(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::string hex(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::uint16_t to16(const Format& f, float x) {
  return f.mbits == 10 ? shardopt::float_to_fp16(x) : shardopt::float_to_bf16(x);
}
float from16(const Format& f, std::uint16_t h) {
  return f.mbits == 10 ? shardopt::fp16_to_float(h) : shardopt::bf16_to_float(h);
}

const Table& table(const Format& f) {
  static const Table t16(kFp16), tb16(kBf16);
  return f.mbits == 10 ? t16 : tb16;
}

// Checks one float against the reference; returns false (after one gtest failure) on mismatch so
// the exhaustive loops stop reporting after a few failures instead of flooding the log.
bool check_round(const Format& f, float x) {
  const std::uint16_t got = to16(f, x);
  if (std::isnan(x)) {
    const bool ok = ref_is_nan(f, got) && (got & f.quiet_bit()) != 0;
    EXPECT_TRUE(ok) << f.name << ": NaN input " << hex(fbits(x)) << " gave " << hex(got);
    return ok;
  }
  const std::uint16_t want = ref_from_float(table(f), x);
  EXPECT_EQ(got, want) << f.name << ": float " << hex(fbits(x)) << " (" << static_cast<double>(x) << ")";
  return got == want;
}

// gtest prints the parameter in failure messages; show the format's name instead of raw bytes.
void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }

class Formats : public ::testing::TestWithParam<Format> {};

// ---- 16-bit -> float -------------------------------------------------------------------------

TEST_P(Formats, ToFloatIsExactForEveryPattern) {
  const Format f = GetParam();
  int failures = 0;
  for (std::uint32_t p = 0; p <= 0xffff && failures < 10; ++p) {
    const auto h = static_cast<std::uint16_t>(p);
    const float got = from16(f, h);
    const double want = ref_to_double(f, h);
    if (std::isnan(want)) {
      if (!std::isnan(got)) ++failures, ADD_FAILURE() << f.name << " " << hex(p) << " should be NaN";
      if (std::signbit(got) != ((p & 0x8000) != 0)) ++failures, ADD_FAILURE() << f.name << " " << hex(p) << " NaN sign";
      continue;
    }
    // Compare bits so that -0 vs +0 counts; the reference double is exact in float.
    const float wantf = static_cast<float>(want);
    ASSERT_EQ(static_cast<double>(wantf), want) << "reference not representable in float";
    if (fbits(got) != fbits(wantf)) {
      ++failures;
      ADD_FAILURE() << f.name << " " << hex(p) << ": got " << got << " want " << want;
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(Formats, RoundTripEveryPattern) {
  const Format f = GetParam();
  int failures = 0;
  for (std::uint32_t p = 0; p <= 0xffff && failures < 10; ++p) {
    const auto h = static_cast<std::uint16_t>(p);
    const float x = from16(f, h);
    const std::uint16_t back = to16(f, x);
    if (ref_is_nan(f, h)) {
      // NaN stays NaN through float and comes back quiet; a quiet NaN is quiet as a float too.
      const bool quiet_in = (h & f.quiet_bit()) != 0;
      const bool ok = std::isnan(x) && ref_is_nan(f, back) && (back & f.quiet_bit()) != 0 &&
                      (!quiet_in || (fbits(x) & 0x00400000u) != 0);
      if (!ok) ++failures, ADD_FAILURE() << f.name << " NaN " << hex(p) << " -> " << hex(fbits(x)) << " -> " << hex(back);
    } else if (back != h) {
      ++failures;
      ADD_FAILURE() << f.name << " " << hex(p) << " -> " << x << " -> " << hex(back);
    }
  }
  EXPECT_EQ(failures, 0);
}

// ---- float -> 16-bit -------------------------------------------------------------------------

// Every value exactly halfway between two neighbouring 16-bit values (including the one between
// max and the overflow threshold), both signs, plus the floats one step either side of each tie
// and the representable values themselves.
TEST_P(Formats, TiesAndTheirNeighboursRoundToNearestEven) {
  const Format f = GetParam();
  const std::vector<double>& v = table(f).values;
  int failures = 0;
  std::size_t checked = 0;
  for (std::size_t p = 0; p + 1 < v.size() && failures < 10; ++p) {
    const double mid = (v[p] + v[p + 1]) / 2;
    const float tie = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(tie), mid) << f.name << ": midpoint after pattern " << p << " not a float";
    for (float s : {1.0f, -1.0f}) {
      const float x = s * tie;
      const float exact = s * static_cast<float>(v[p]);
      for (float y : {x, std::nextafter(x, 0.0f), std::nextafter(x, s * std::numeric_limits<float>::infinity()), exact,
                      std::nextafter(exact, 0.0f), std::nextafter(exact, s * std::numeric_limits<float>::infinity())}) {
        if (!check_round(f, y)) ++failures;
        ++checked;
      }
    }
  }
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(checked, 6u * 2u * (v.size() - 1));
}

TEST_P(Formats, RandomFloatBitPatterns) {
  const Format f = GetParam();
  std::mt19937 rng(12345u + static_cast<unsigned>(f.mbits));
  int failures = 0;
  for (int i = 0; i < 4'000'000 && failures < 10; ++i) {
    if (!check_round(f, bitsf(static_cast<std::uint32_t>(rng())))) ++failures;
  }
  // Random bit patterns are mostly far outside fp16's range; also sweep the range that matters.
  std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
  for (int i = 0; i < 2'000'000 && failures < 10; ++i) {
    const float x = std::exp2(exponent(rng)) * ((i & 1) ? -1.0f : 1.0f);
    if (!check_round(f, x)) ++failures;
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(Formats, SpecialValues) {
  const Format f = GetParam();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(to16(f, inf), f.inf_bits());
  EXPECT_EQ(to16(f, -inf), f.inf_bits() | 0x8000);
  EXPECT_EQ(from16(f, f.inf_bits()), inf);
  EXPECT_EQ(from16(f, static_cast<std::uint16_t>(f.inf_bits() | 0x8000)), -inf);
  EXPECT_EQ(to16(f, 0.0f), 0x0000);
  EXPECT_EQ(to16(f, -0.0f), 0x8000);
  EXPECT_EQ(fbits(from16(f, 0x0000)), 0x00000000u);
  EXPECT_EQ(fbits(from16(f, 0x8000)), 0x80000000u);
  // NaNs of every kind: quiet, signalling with payload only in the low float bits (which a naive
  // truncation would turn into infinity), negative.
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7f802000u, 0xffc00000u, 0xff800001u, 0x7fffffffu}) {
    const std::uint16_t h = to16(f, bitsf(nan));
    EXPECT_TRUE(ref_is_nan(f, h)) << hex(nan) << " -> " << hex(h);
    EXPECT_NE(h & f.quiet_bit(), 0) << hex(nan) << " -> " << hex(h);
  }
  // Largest float rounds to infinity in both formats (it is past bf16's max + half ulp).
  EXPECT_EQ(to16(f, std::numeric_limits<float>::max()), f.inf_bits());
  EXPECT_EQ(to16(f, -std::numeric_limits<float>::max()), f.inf_bits() | 0x8000);
}

INSTANTIATE_TEST_SUITE_P(Dtype, Formats, ::testing::Values(kFp16, kBf16),
                         [](const ::testing::TestParamInfo<Format>& i) { return std::string(i.param.name); });

// ---- hand-checked constants (from the IEEE 754 tables, not from any code) ------------------------

TEST(Fp16, KnownValues) {
  EXPECT_EQ(shardopt::float_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(shardopt::float_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(shardopt::float_to_fp16(0.5f), 0x3800);
  EXPECT_EQ(shardopt::float_to_fp16(0.1f), 0x2e66);
  EXPECT_EQ(shardopt::float_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(shardopt::fp16_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(shardopt::fp16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(shardopt::fp16_to_float(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(shardopt::fp16_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(shardopt::fp16_to_float(0x7bff), 65504.0f);
}

TEST(Fp16, OverflowBoundaries) {
  EXPECT_EQ(shardopt::float_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(shardopt::float_to_fp16(65519.99f), 0x7bff);  // nearest float below 65520: still max
  EXPECT_EQ(shardopt::float_to_fp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(shardopt::float_to_fp16(65520.0f), 0x7c00);  // tie between max (odd) and 2^16: to inf
  EXPECT_EQ(shardopt::float_to_fp16(-65520.0f), 0xfc00);
  EXPECT_EQ(shardopt::float_to_fp16(65536.0f), 0x7c00);
  EXPECT_EQ(shardopt::float_to_fp16(1e30f), 0x7c00);
}

TEST(Fp16, UnderflowBoundaries) {
  const float sub_min = std::ldexp(1.0f, -24);
  const float half_sub = std::ldexp(1.0f, -25);
  EXPECT_EQ(shardopt::float_to_fp16(sub_min), 0x0001);
  EXPECT_EQ(shardopt::float_to_fp16(half_sub), 0x0000);  // tie: to even (zero)
  EXPECT_EQ(shardopt::float_to_fp16(-half_sub), 0x8000);
  EXPECT_EQ(shardopt::float_to_fp16(std::nextafter(half_sub, 1.0f)), 0x0001);
  EXPECT_EQ(shardopt::float_to_fp16(std::nextafter(half_sub, 0.0f)), 0x0000);
  EXPECT_EQ(shardopt::float_to_fp16(-std::nextafter(half_sub, 1.0f)), 0x8001);
  EXPECT_EQ(shardopt::float_to_fp16(3 * half_sub), 0x0002);  // tie between 1 and 2: to even (2)
  EXPECT_EQ(shardopt::float_to_fp16(std::numeric_limits<float>::denorm_min()), 0x0000);
  // Just below the smallest normal rounds up into it.
  EXPECT_EQ(shardopt::float_to_fp16(std::nextafter(std::ldexp(1.0f, -14), 0.0f)), 0x0400);
}

TEST(Bf16, KnownValues) {
  EXPECT_EQ(shardopt::float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(shardopt::float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(shardopt::float_to_bf16(3.14159265f), 0x4049);
  EXPECT_EQ(shardopt::bf16_to_float(0x7f7f), 0x1.fep127f);  // bf16 max
  EXPECT_EQ(shardopt::float_to_bf16(0x1.fep127f), 0x7f7f);
  // Halfway between bf16 max and 2^128 ties to the even pattern, which is infinity.
  EXPECT_EQ(shardopt::float_to_bf16(0x1.ffp127f), 0x7f80);
  EXPECT_EQ(shardopt::float_to_bf16(std::nextafter(0x1.ffp127f, 0.0f)), 0x7f7f);
  // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: to 1; 1 + 3*2^-8 goes up to 1 + 2^-6.
  EXPECT_EQ(shardopt::float_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(shardopt::float_to_bf16(1.0f + 0x3p-8f), 0x3f82);
  EXPECT_EQ(shardopt::float_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(shardopt::bf16_to_float(0x0001), 0x1p-133f);
}

// ---- buffer access --------------------------------------------------------------------------

TEST(Dtype, SizesAndNames) {
  EXPECT_EQ(shardopt::size_of(DType::fp32), 4u);
  EXPECT_EQ(shardopt::size_of(DType::fp16), 2u);
  EXPECT_EQ(shardopt::size_of(DType::bf16), 2u);
  EXPECT_EQ(shardopt::name_of(DType::fp32), "fp32");
  EXPECT_EQ(shardopt::name_of(DType::fp16), "fp16");
  EXPECT_EQ(shardopt::name_of(DType::bf16), "bf16");
}

TEST(Dtype, ParseDtype) {
  DType t = DType::fp32;
  ASSERT_TRUE(shardopt::parse_dtype("fp16", t));
  EXPECT_EQ(t, DType::fp16);
  ASSERT_TRUE(shardopt::parse_dtype("bfloat16", t));
  EXPECT_EQ(t, DType::bf16);
  ASSERT_TRUE(shardopt::parse_dtype("float32", t));
  EXPECT_EQ(t, DType::fp32);
  ASSERT_TRUE(shardopt::parse_dtype("float16", t));
  EXPECT_EQ(t, DType::fp16);
  ASSERT_TRUE(shardopt::parse_dtype("bf16", t));
  EXPECT_EQ(t, DType::bf16);
  ASSERT_TRUE(shardopt::parse_dtype("fp32", t));
  EXPECT_EQ(t, DType::fp32);
  // Every name_of() output parses back to itself.
  for (DType d : {DType::fp32, DType::fp16, DType::bf16}) {
    DType back = d == DType::fp32 ? DType::bf16 : DType::fp32;
    ASSERT_TRUE(shardopt::parse_dtype(shardopt::name_of(d), back));
    EXPECT_EQ(back, d);
  }
  // Unknown text fails and leaves the output alone.
  t = DType::bf16;
  for (const char* bad : {"", "FP16", "fp8", "float", "fp16 ", "half", "fp64"}) {
    EXPECT_FALSE(shardopt::parse_dtype(bad, t)) << bad;
    EXPECT_EQ(t, DType::bf16) << bad;
  }
}

TEST(Dtype, LoadAndStore) {
  const std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.5f, 0.1f, 65504.0f, 1e6f, 3e-6f,
                                     std::numeric_limits<float>::infinity(), 0x1p-24f, 1.0f + 0x1p-11f};
  const std::size_t n = values.size();
  // fp32: stored and loaded bit for bit, at the right index.
  std::vector<float> f32(n + 2, 7.0f);
  for (std::size_t i = 0; i < n; ++i) shardopt::store_from_float(f32.data(), DType::fp32, i + 1, values[i]);
  EXPECT_EQ(f32[0], 7.0f);
  EXPECT_EQ(f32[n + 1], 7.0f);
  for (std::size_t i = 0; i < n; ++i) {
    EXPECT_EQ(fbits(f32[i + 1]), fbits(values[i]));
    EXPECT_EQ(fbits(shardopt::load_as_float(f32.data(), DType::fp32, i + 1)), fbits(values[i]));
  }
  // 16-bit: the stored pattern is the reference rounding; loading gives the pattern's exact value.
  for (const Format& f : {kFp16, kBf16}) {
    const DType t = f.mbits == 10 ? DType::fp16 : DType::bf16;
    std::vector<std::uint16_t> buf(n + 2, 0xabcd);
    for (std::size_t i = 0; i < n; ++i) shardopt::store_from_float(buf.data(), t, i + 1, values[i]);
    EXPECT_EQ(buf[0], 0xabcd);
    EXPECT_EQ(buf[n + 1], 0xabcd);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t want = ref_from_float(table(f), values[i]);
      EXPECT_EQ(buf[i + 1], want) << f.name << " value " << values[i];
      const float loaded = shardopt::load_as_float(buf.data(), t, i + 1);
      EXPECT_EQ(fbits(loaded), fbits(static_cast<float>(ref_to_double(f, want)))) << f.name << " value " << values[i];
    }
  }
}

}  // namespace
