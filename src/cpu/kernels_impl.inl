// The CPU element-wise kernels: one source, compiled once per instruction set.
//
// Each kernels_<isa>.cpp includes its headers, then includes this file inside its own namespace
// (shardopt::cpu::isa_<name>), so every function and template here has a distinct name per
// instruction set. That matters: an inline function with external linkage compiled with
// -mavx512f in one object and without it in another is an ODR violation the linker resolves by
// picking either copy, which can put AVX-512 code on a machine without it. So this file
//   - never includes headers (it sits inside a namespace),
//   - marks every loop function `flatten`, so the shardopt inline helpers it calls (each rule's
//     update(), rules::sqrt_f) are inlined and never emitted out of line from this object (and `noinline`,
//     so each (rule, dtype) loop stays one function that objdump can show),
//   - never builds a std::string or an Error: failures go through kernel_failure(), defined out of
//     line in isa.cpp with the default flags.
//
// Vectorization. GCC's -O2 ("very cheap" cost model) only vectorizes a loop whose vector code
// replaces the scalar loop entirely, i.e. whose trip count is a known multiple of the vector
// width. Every hot loop is therefore written as blocks of kBlock elements (an inner loop with a
// constant trip count, vectorized into whole registers) followed by a scalar tail that runs the
// very same per-element code. Because -ffp-contract=off, and +,-,*,/,sqrt are correctly rounded
// in scalar and vector form alike, every instruction set gives the same bits.
//
// 16-bit conversions are written here branch-free (selects, no early returns, no loops) so that
// they vectorize; they are bit-identical to the reference conversions in shardopt/dtype.hpp
// (tests/test_cpu_kernels.cpp checks all 65536 16-bit inputs and a structured sweep of floats).

#ifndef SHARDOPT_KERNEL_LOOP
#define SHARDOPT_KERNEL_LOOP __attribute__((flatten, noinline))
#define SHARDOPT_KERNEL_INLINE inline __attribute__((always_inline))
// A dispatch function that calls a rule's own helpers (Rule::variant): inlined into it, so they
// are never emitted out of line from this object either.
#define SHARDOPT_KERNEL_DISPATCH __attribute__((flatten))
#endif

// 32 elements: one AVX-512 register of 16-bit values (two of floats). The vectorizer gives all
// types of a loop the same register width, so with a block of 16 a loop that touches fp16/bf16
// would fall back to 256-bit registers.
inline constexpr std::size_t kBlock = 32;

template <DType D>
struct Storage {
  using type = std::uint16_t;
};
template <>
struct Storage<DType::fp32> {
  using type = float;
};
template <DType D>
using storage_t = typename Storage<D>::type;

SHARDOPT_KERNEL_INLINE std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
SHARDOPT_KERNEL_INLINE float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }

// fp16 -> float. Normal and inf/NaN inputs are a re-bias of the exponent field; a subnormal
// (exponent field 0) is mant * 2^-24, which the int->float conversion and the power-of-two
// multiply produce exactly (and +-0 for mant == 0).
SHARDOPT_KERNEL_INLINE float fp16_load(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;
  const std::uint32_t normal = (em << 13) + (112u << 23);
  const std::uint32_t inf_nan = (em << 13) | 0x7f800000u;
  const std::uint32_t sub = bits_of(static_cast<float>(static_cast<std::int32_t>(em)) * 0x1p-24f);
  std::uint32_t r = em >= 0x7c00u ? inf_nan : normal;
  r = em < 0x0400u ? sub : r;
  return float_of(sign | r);
}

// float -> fp16, round to nearest even. For results below 2^-14 (fp16 subnormals and zero) the
// rounding is done by the FPU: |f| + 0.5 has an ulp of 2^-24, the fp16 subnormal spacing, so the
// addition rounds |f| to the nearest multiple of 2^-24 (ties to even) and the low mantissa bits
// of the sum are the fp16 result; a carry to 2^-14 lands on the smallest normal's encoding.
SHARDOPT_KERNEL_INLINE std::uint16_t fp16_store(float f) {
  const std::uint32_t u = bits_of(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  const std::uint32_t sub = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
  std::uint32_t r = a >= 0x38800000u ? normal : sub;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // rounds to >= 65520: infinity
  r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;  // NaN: quiet, top payload bits kept
  return static_cast<std::uint16_t>(sign | r);
}

SHARDOPT_KERNEL_INLINE float bf16_load(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }

SHARDOPT_KERNEL_INLINE std::uint16_t bf16_store(float f) {
  const std::uint32_t u = bits_of(f);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

template <DType D>
SHARDOPT_KERNEL_INLINE float load(storage_t<D> x) {
  if constexpr (D == DType::fp32) return x;
  else if constexpr (D == DType::fp16) return fp16_load(x);
  else return bf16_load(x);
}

template <DType D>
SHARDOPT_KERNEL_INLINE storage_t<D> store(float f) {
  if constexpr (D == DType::fp32) return f;
  else if constexpr (D == DType::fp16) return fp16_store(f);
  else return bf16_store(f);
}

// A value stored as D is infinite or NaN (tested on the stored bits, so a float that overflows
// fp16 on rounding counts).
template <DType D>
SHARDOPT_KERNEL_INLINE std::uint32_t nonfinite(storage_t<D> x) {
  if constexpr (D == DType::fp32) return (bits_of(x) & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
  else if constexpr (D == DType::fp16) return (x & 0x7c00u) == 0x7c00u ? 1u : 0u;
  else return (x & 0x7f80u) == 0x7f80u ? 1u : 0u;
}

// Calls `body(i)` for every i in [0, n): whole blocks first (vectorized), then the tail.
template <class Body>
SHARDOPT_KERNEL_INLINE void blocked(std::size_t n, Body&& body) {
  std::size_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    for (std::size_t j = 0; j < kBlock; ++j) body(i + j);
  for (; i < n; ++i) body(i);
}

// ---- fused optimizer update -------------------------------------------------------------------

// What happens to the 16-bit (or fp32) parameter copy.
enum class Out { none, fp32, fp16, bf16 };

template <Out O>
struct OutStorage {
  using type = std::uint16_t;
};
template <>
struct OutStorage<Out::fp32> {
  using type = float;
};
template <>
struct OutStorage<Out::none> {
  using type = float;
};

// One pass over memory: reads grad, master and the states once, writes master, the states and the
// parameter copy once. The pointers are restrict: the caller guarantees no overlap (param_out ==
// master is mapped to Out::none before we get here).
// V is the rule's variant (rules/rule.hpp): the per-call flags its element function branches on,
// pinned here as compile-time constants. GCC at -O2 neither unswitches the loop on such a flag nor
// if-converts the branch, and would leave that loop scalar.
template <OptimizerKind R, DType G, Out O, int V>
SHARDOPT_KERNEL_LOOP void update_loop(float* __restrict master, float* __restrict state1,
                                      float* __restrict state2, const storage_t<G>* __restrict grad,
                                      typename OutStorage<O>::type* __restrict out, std::size_t n,
                                      const StepScalars step_scalars) {
  using Rule = rule_t<R>;
  constexpr bool two_states = Rule::states == 2;
  StepScalars scalars = step_scalars;
  if constexpr (variant_count<Rule>() > 1) Rule::pin(scalars, V);
  blocked(n, [&](std::size_t i) {
    float p = master[i];
    const float g = load<G>(grad[i]);
    float s1 = state1[i];
    float s2 = 0.0f;
    if constexpr (two_states) s2 = state2[i];
    Rule::update(p, g, s1, s2, scalars);
    master[i] = p;
    state1[i] = s1;
    if constexpr (two_states) state2[i] = s2;
    if constexpr (O == Out::fp32) out[i] = p;
    else if constexpr (O == Out::fp16) out[i] = fp16_store(p);
    else if constexpr (O == Out::bf16) out[i] = bf16_store(p);
  });
}

template <OptimizerKind R, DType G, Out O, int V>
void update_call(const UpdateArgs& a) {
  update_loop<R, G, O, V>(a.master, a.state1, a.state2, static_cast<const storage_t<G>*>(a.grad),
                          static_cast<typename OutStorage<O>::type*>(a.param_out), a.n, a.scalars);
}

template <OptimizerKind R, DType G, Out O, int... V>
void update_variant(const UpdateArgs& a, int v, std::integer_sequence<int, V...>) {
  ((v == V ? (update_call<R, G, O, V>(a), true) : false) || ...);
}

template <OptimizerKind R, DType G, Out O>
SHARDOPT_KERNEL_DISPATCH void update_typed(const UpdateArgs& a) {
  using Rule = rule_t<R>;
  if constexpr (variant_count<Rule>() > 1) {
    update_variant<R, G, O>(a, Rule::variant(a.scalars), std::make_integer_sequence<int, variant_count<Rule>()>{});
  } else {
    update_call<R, G, O, 0>(a);
  }
}

template <OptimizerKind R, DType G>
void update_out(const UpdateArgs& a) {
  if (a.param_out == nullptr ||
      (a.param_dtype == DType::fp32 && a.param_out == static_cast<void*>(a.master)))
    return update_typed<R, G, Out::none>(a);
  switch (a.param_dtype) {
    case DType::fp32: return update_typed<R, G, Out::fp32>(a);
    case DType::fp16: return update_typed<R, G, Out::fp16>(a);
    case DType::bf16: return update_typed<R, G, Out::bf16>(a);
  }
  kernel_failure("fused_update: unknown param_dtype");
}

template <OptimizerKind R>
void update_grad(const UpdateArgs& a) {
  switch (a.grad_dtype) {
    case DType::fp32: return update_out<R, DType::fp32>(a);
    case DType::fp16: return update_out<R, DType::fp16>(a);
    case DType::bf16: return update_out<R, DType::bf16>(a);
  }
  kernel_failure("fused_update: unknown grad_dtype");
}

void fused_update(const UpdateArgs& a) {
  if (a.n == 0) return;
  if (a.master == nullptr) kernel_failure("fused_update: master is null");
  if (a.state1 == nullptr) kernel_failure("fused_update: state1 is null");
  if (state_count(a.rule) == 2 && a.state2 == nullptr)
    kernel_failure("fused_update: state2 is null but the rule keeps two states");
  if (a.grad == nullptr) kernel_failure("fused_update: grad is null");
  if (a.param_out == static_cast<void*>(a.master) && a.param_dtype != DType::fp32)
    kernel_failure("fused_update: param_out aliases master but param_dtype is not fp32");
  switch (a.rule) {
#define SHARDOPT_RULE_CPU_UPDATE(id, Rule) \
  case OptimizerKind::id: return update_grad<OptimizerKind::id>(a);
    SHARDOPT_RULES(SHARDOPT_RULE_CPU_UPDATE)
#undef SHARDOPT_RULE_CPU_UPDATE
  }
  kernel_failure("fused_update: unknown rule");
}

// ---- fill --------------------------------------------------------------------------------------

template <DType D>
SHARDOPT_KERNEL_LOOP void fill_loop(storage_t<D>* __restrict dst, std::size_t n, float value) {
  const storage_t<D> v = store<D>(value);  // rounded once, like the reference store_from_float
  blocked(n, [&](std::size_t i) { dst[i] = v; });
}

void fill(void* dst, DType dtype, std::size_t n, float value) {
  if (n == 0) return;
  if (dst == nullptr) kernel_failure("fill: dst is null");
  switch (dtype) {
    case DType::fp32: return fill_loop<DType::fp32>(static_cast<float*>(dst), n, value);
    case DType::fp16: return fill_loop<DType::fp16>(static_cast<std::uint16_t*>(dst), n, value);
    case DType::bf16: return fill_loop<DType::bf16>(static_cast<std::uint16_t*>(dst), n, value);
  }
  kernel_failure("fill: unknown dtype");
}

// ---- cast --------------------------------------------------------------------------------------

// Every pair goes through float, which holds fp16 and bf16 exactly, so fp16 <-> bf16 rounds once.
template <DType S, DType D>
SHARDOPT_KERNEL_LOOP void cast_loop(const storage_t<S>* __restrict src, storage_t<D>* __restrict dst,
                                    std::size_t n) {
  blocked(n, [&](std::size_t i) { dst[i] = store<D>(load<S>(src[i])); });
}

template <DType S>
void cast_from(const void* src, void* dst, DType dst_dtype, std::size_t n) {
  const auto* s = static_cast<const storage_t<S>*>(src);
  switch (dst_dtype) {
    case DType::fp32: return cast_loop<S, DType::fp32>(s, static_cast<float*>(dst), n);
    case DType::fp16: return cast_loop<S, DType::fp16>(s, static_cast<std::uint16_t*>(dst), n);
    case DType::bf16: return cast_loop<S, DType::bf16>(s, static_cast<std::uint16_t*>(dst), n);
  }
  kernel_failure("cast: unknown dst_dtype");
}

void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n) {
  if (n == 0) return;
  if (src == nullptr || dst == nullptr) kernel_failure("cast: src or dst is null");
  if (src_dtype == dst_dtype) {
    // Same dtype: a copy, and the documented in-place case (src == dst) is a no-op.
    if (src != dst) std::memcpy(dst, src, n * size_of(src_dtype));
    return;
  }
  if (src == dst) kernel_failure("cast: src and dst are the same buffer but the dtypes differ");
  switch (src_dtype) {
    case DType::fp32: return cast_from<DType::fp32>(src, dst, dst_dtype, n);
    case DType::fp16: return cast_from<DType::fp16>(src, dst, dst_dtype, n);
    case DType::bf16: return cast_from<DType::bf16>(src, dst, dst_dtype, n);
  }
  kernel_failure("cast: unknown src_dtype");
}

// ---- unscale with a non-finite check ----------------------------------------------------------

// One flag per lane instead of one scalar flag: an OR reduction across lanes would be a
// loop-carried dependency the cheap vectorizer refuses; a lane array is plain element-wise work.
template <DType D>
SHARDOPT_KERNEL_LOOP bool unscale_loop(storage_t<D>* __restrict data, std::size_t n, float scale) {
  std::uint32_t bad[kBlock] = {};
  std::size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (std::size_t j = 0; j < kBlock; ++j) {
      const storage_t<D> y = store<D>(load<D>(data[i + j]) * scale);
      data[i + j] = y;
      bad[j] |= nonfinite<D>(y);
    }
  }
  for (std::size_t j = 0; i + j < n; ++j) {
    const storage_t<D> y = store<D>(load<D>(data[i + j]) * scale);
    data[i + j] = y;
    bad[j] |= nonfinite<D>(y);
  }
  std::uint32_t any = 0;
  for (std::size_t j = 0; j < kBlock; ++j) any |= bad[j];
  return any != 0;
}

bool unscale_check(void* data, DType dtype, std::size_t n, float scale) {
  if (n == 0) return false;
  if (data == nullptr) kernel_failure("unscale_check: data is null");
  switch (dtype) {
    case DType::fp32: return unscale_loop<DType::fp32>(static_cast<float*>(data), n, scale);
    case DType::fp16: return unscale_loop<DType::fp16>(static_cast<std::uint16_t*>(data), n, scale);
    case DType::bf16: return unscale_loop<DType::bf16>(static_cast<std::uint16_t*>(data), n, scale);
  }
  kernel_failure("unscale_check: unknown dtype");
}

// ---- sum of squares ----------------------------------------------------------------------------

// Accumulated in double in a fixed order that is the same on every instruction set: lane j
// (j < kBlock) sums elements j, j+kBlock, j+2*kBlock, ... of the range in order (the tail's
// elements go to lanes 0, 1, ...), then the lanes are added pairwise (lane j += lane j+16, then j+8, j+4, j+2, j+1).
// A single running sum would be one long dependency chain of double adds (~4 cycles each), far
// slower than the memory it reads; lanes vectorize without reassociating anything. Each square of
// a float is exact in double (24+24 significant bits < 53), so only the additions round.
template <DType D>
SHARDOPT_KERNEL_LOOP double sum_squares_loop(const storage_t<D>* __restrict data, std::size_t n) {
  double acc[kBlock] = {};
  std::size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (std::size_t j = 0; j < kBlock; ++j) {
      const double x = static_cast<double>(load<D>(data[i + j]));
      acc[j] += x * x;
    }
  }
  for (std::size_t j = 0; i + j < n; ++j) {
    const double x = static_cast<double>(load<D>(data[i + j]));
    acc[j] += x * x;
  }
  for (std::size_t w = kBlock / 2; w > 0; w /= 2)
    for (std::size_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

double sum_squares(const void* data, DType dtype, std::size_t n) {
  if (n == 0) return 0.0;
  if (data == nullptr) kernel_failure("sum_squares: data is null");
  switch (dtype) {
    case DType::fp32: return sum_squares_loop<DType::fp32>(static_cast<const float*>(data), n);
    case DType::fp16: return sum_squares_loop<DType::fp16>(static_cast<const std::uint16_t*>(data), n);
    case DType::bf16: return sum_squares_loop<DType::bf16>(static_cast<const std::uint16_t*>(data), n);
  }
  kernel_failure("sum_squares: unknown dtype");
}

const Kernels& table() noexcept {
  static constexpr Kernels k{&fused_update, &fill, &cast, &unscale_check, &sum_squares};
  return k;
}
