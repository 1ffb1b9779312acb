// The fused update with compressed state (Backend::compressed_update): one source, compiled once
// per instruction set after kernels_impl.inl, in the same per-ISA namespace and under the same
// rules (no headers, `flatten` loops, failures through kernel_failure). It reuses that file's
// helpers (blocked, load/store, Out, OutStorage, bf16_load/bf16_store).
//
// int8: a quantization block is processed in passes over a stack buffer of its fp32 states (L1
// resident): decode the codes with the block's old scale, run the rule (writes master and
// param_out, leaves the new states in the buffer), take the absmax, encode with the new scale.
// The absmax is an integer max over the float bits of |x| (quant::abs_bits): max is exact and
// order-free, so every instruction set and every split of the range into blocks finds the same
// scale. Decoding and encoding are the branch-free bit arithmetic of shardopt/state_precision.hpp
// (in vector form on AVX2/AVX-512, below), the same bits on every path; the stochastic rounding's
// dither is a hash of the element's global index, so a split of the range changes nothing either.

// ---- int8: the block's decode, absmax and encode ---------------------------------------------
//
// In the AVX2 and AVX-512 builds these run on GCC vector types (vector_size) of 8 lanes, not on
// what the auto-vectorizer makes of the element functions: the encode (a murmur hash per element,
// two conversions, two selects) was then the bulk of the int8 update's time. Operations on vector
// types are element-wise by definition (a lane's +, *, shift, comparison or int<->float conversion
// is exactly the scalar operation on that element; -ffp-contract=off applies to them too), so each
// q_ function computes, lane by lane, the operations of its namesake in
// shardopt/state_precision.hpp in the same order, and the bits are those of the element functions
// the CUDA kernel shares. The few places where a q_ function reaches the same value by a shorter
// route say why it is the same. The scalar build runs the element functions themselves, so
// tests/test_compressed_state.cpp, which compares every instruction set with the scalar one byte
// for byte, compares this code with them. 8 lanes on AVX-512 too: the AVX2 form, tested here.
#if defined(__AVX2__)
#define SHARDOPT_QUANT_VECTORS 1
inline constexpr std::size_t kQuantLanes = 8;
typedef std::uint32_t QuantU __attribute__((vector_size(32)));
typedef std::int32_t QuantI __attribute__((vector_size(32)));
typedef float QuantF __attribute__((vector_size(32)));

SHARDOPT_KERNEL_INLINE QuantU q_bits(QuantF f) { return reinterpret_cast<QuantU>(f); }
SHARDOPT_KERNEL_INLINE QuantF q_float(QuantU u) { return reinterpret_cast<QuantF>(u); }
SHARDOPT_KERNEL_INLINE QuantI q_int(QuantU u) { return reinterpret_cast<QuantI>(u); }
// Comparisons give lanes of all ones (true) or zero; `m ? a : b` on vectors selects per lane.
SHARDOPT_KERNEL_INLINE QuantU q_select(QuantI m, QuantU a, QuantU b) { return m ? a : b; }

// Eight code bytes zero-extended to uint32 lanes, and back (codes are < 256: the packs are exact).
SHARDOPT_KERNEL_INLINE QuantU q_load_codes(const std::uint8_t* p) {
  return reinterpret_cast<QuantU>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
SHARDOPT_KERNEL_INLINE void q_store_codes(std::uint8_t* p, QuantU c) {
  const __m256i v = reinterpret_cast<__m256i>(c);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
// Sixteen codes from two vectors with one store: the packs work within 128-bit halves, so the
// dwords come out as a0-3 b0-3 | a4-7 b4-7 and a permute puts them in order.
SHARDOPT_KERNEL_INLINE void q_store_codes2(std::uint8_t* p, QuantU a, QuantU b) {
  const __m256i w = _mm256_packs_epi32(reinterpret_cast<__m256i>(a), reinterpret_cast<__m256i>(b));
  const __m256i bytes = _mm256_packus_epi16(w, w);
  const __m256i order = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(order));
}
SHARDOPT_KERNEL_INLINE QuantF q_load(const float* p) {
  QuantF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SHARDOPT_KERNEL_INLINE void q_store(float* p, QuantF v) { std::memcpy(p, &v, sizeof v); }

// quant::mix32 (uint32 arithmetic wraps alike in both).
SHARDOPT_KERNEL_INLINE QuantU q_mix32(QuantU x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// quant::decode_magnitude<F>. (c >> M) == 0 is written c < 2^M: c < 256, so a signed compare.
template <class F>
SHARDOPT_KERNEL_INLINE QuantF q_decode_magnitude(QuantU c) {
  constexpr int M = F::kMantBits;
  const QuantF normal = q_float((c + (static_cast<std::uint32_t>(127 - F::kEmax) << M)) << (23 - M));
  const float step = float_of(static_cast<std::uint32_t>(127 + 1 - F::kEmax - M) << 23);
  const QuantF sub = __builtin_convertvector(q_int(c), QuantF) * step;
  return q_float(q_select(q_int(c) < (1 << M), q_bits(sub), q_bits(normal)));
}
SHARDOPT_KERNEL_INLINE QuantF q_decode_signed(QuantU code, float scale) {
  const QuantF mag = q_decode_magnitude<quant::SignedCode>(code & 0x7fu) * scale;
  return q_float(q_bits(mag) | ((code & 0x80u) << 24));
}
SHARDOPT_KERNEL_INLINE QuantF q_decode_unsigned(QuantU code, float scale) {
  return q_decode_magnitude<quant::UnsignedCode>(code) * scale;
}

// quant::encode_magnitude<F> for r = (a value >= +0, or NaN) * inverse_scale: the only r the two
// encoders below pass. inverse_scale is +0 or positive and finite, so r is never negative or -0,
// and the scalar test (r >= 0 && r < 2) is false exactly when r < 2 is: r < 2 alone keeps the bits.
template <class F>
SHARDOPT_KERNEL_INLINE QuantU q_encode_magnitude(QuantF r, QuantU d) {
  constexpr int M = F::kMantBits;
  constexpr int kDrop = 23 - M;
  r = q_float(q_bits(r) & reinterpret_cast<QuantU>(r < 2.0f));  // else +0.0f, as the scalar select
  const QuantU u = q_bits(r);
  const QuantU normal = ((u + (d >> (32 - kDrop))) >> kDrop) - (static_cast<std::uint32_t>(127 - F::kEmax) << M);
  const QuantF x = r * float_of(static_cast<std::uint32_t>(127 + F::kEmax + M - 1) << 23);
  const QuantF frac = __builtin_convertvector(q_int(d >> (9 + M)), QuantF) *
                      float_of(static_cast<std::uint32_t>(127 + M - 23) << 23);
  const QuantU sub = reinterpret_cast<QuantU>(__builtin_convertvector(x + frac, QuantI));
  const float threshold = float_of(static_cast<std::uint32_t>(127 + 1 - F::kEmax) << 23);
  return q_select(r < threshold, sub, normal);
}
// quant::encode_signed. mag != 0 is written mag > 0: mag < 128, so a signed compare.
SHARDOPT_KERNEL_INLINE QuantU q_encode_signed(QuantF x, float inv_scale, QuantU dither) {
  const QuantU mag = q_encode_magnitude<quant::SignedCode>(q_float(q_bits(x) & 0x7fffffffu) * inv_scale, dither);
  const QuantU sign = (q_bits(x) >> 24) & 0x80u;
  return mag | (sign & reinterpret_cast<QuantU>(q_int(mag) > 0));
}
// quant::encode_unsigned.
SHARDOPT_KERNEL_INLINE QuantU q_encode_unsigned(QuantF x, float inv_scale, QuantU dither) {
  const QuantF kept = q_float(q_bits(x) & reinterpret_cast<QuantU>(x > 0.0f));  // x > 0 ? x : +0.0f
  return q_encode_magnitude<quant::UnsignedCode>(kept * inv_scale, dither);
}

// bf16 states: 16 values <-> bf16_load / bf16_store of kernels_impl.inl lane by lane (the NaN test
// (u & 0x7fffffff) > 0x7f800000 compares two numbers below 2^31, so a signed compare is the same).
SHARDOPT_KERNEL_INLINE void q_bf16_load16(const std::uint16_t* p, float* values) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16);
  const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(values), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + 8), hi);
}
SHARDOPT_KERNEL_INLINE QuantU q_bf16_store(QuantF f) {
  const QuantU u = q_bits(f);
  const QuantU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const QuantU quiet_nan = (u >> 16) | 0x0040u;
  return q_select(q_int(u & 0x7fffffffu) > 0x7f800000, quiet_nan, rounded);
}
SHARDOPT_KERNEL_INLINE void q_bf16_store16(std::uint16_t* p, const float* values) {
  // The pack works within 128-bit halves (a0-3 b0-3 | a4-7 b4-7); the qword permute orders them.
  const __m256i w = _mm256_packus_epi32(reinterpret_cast<__m256i>(q_bf16_store(q_load(values))),
                                        reinterpret_cast<__m256i>(q_bf16_store(q_load(values + 8))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(w, 0xd8));
}

// The bits of the largest |x| of values[0, len): an integer max of abs_bits, exact and order-free,
// so the scale is the same however the block is cut into lanes (a NaN's bits win the max, as in
// the scalar definition of the scale).
SHARDOPT_KERNEL_INLINE std::uint32_t q_absmax_bits(const float* __restrict values, std::size_t len) {
  std::uint32_t m = 0;
  std::size_t e = 0;
  QuantU top = {};
  for (; e + kQuantLanes <= len; e += kQuantLanes) {
    const QuantU a = q_bits(q_load(values + e)) & 0x7fffffffu;
    top = q_select(a > top, a, top);
  }
  for (std::size_t j = 0; j < kQuantLanes; ++j) m = m > top[j] ? m : top[j];
  for (; e < len; ++e) {
    const std::uint32_t a = quant::abs_bits(values[e]);
    m = m > a ? m : a;
  }
  return m;
}

// Codes of values[0, len) for the block that starts at global index `start` (dither key `key`);
// kSigned picks the code. Whole vectors, then the element functions for the rest: a partial
// block's tail, and a block whose index's low word wraps (never one that starts at a multiple of
// its size).
template <bool kSigned>
SHARDOPT_KERNEL_INLINE void q_encode_block(const float* __restrict values, std::uint8_t* __restrict codes,
                                           std::size_t len, float inv, std::uint64_t start, std::uint32_t key) {
  std::size_t e = 0;
  const auto lo = static_cast<std::uint32_t>(start);
  if (static_cast<std::uint64_t>(lo) + len <= (std::uint64_t(1) << 32)) {
    // quant::dither(key, i) = mix32(lo32(i) ^ mix32(hi32(i) ^ key)): the inner hash is the block's.
    const std::uint32_t h = quant::mix32(static_cast<std::uint32_t>(start >> 32) ^ key);
    QuantU low = {0, 1, 2, 3, 4, 5, 6, 7};
    low += lo;
    for (; e + 2 * kQuantLanes <= len; e += 2 * kQuantLanes, low += static_cast<std::uint32_t>(2 * kQuantLanes)) {
      const QuantU d0 = q_mix32(low ^ h);
      const QuantU d1 = q_mix32((low + static_cast<std::uint32_t>(kQuantLanes)) ^ h);
      const QuantF x0 = q_load(values + e);
      const QuantF x1 = q_load(values + e + kQuantLanes);
      if constexpr (kSigned) q_store_codes2(codes + e, q_encode_signed(x0, inv, d0), q_encode_signed(x1, inv, d1));
      else q_store_codes2(codes + e, q_encode_unsigned(x0, inv, d0), q_encode_unsigned(x1, inv, d1));
    }
    for (; e + kQuantLanes <= len; e += kQuantLanes, low += static_cast<std::uint32_t>(kQuantLanes)) {
      const QuantU d = q_mix32(low ^ h);
      const QuantF x = q_load(values + e);
      q_store_codes(codes + e, kSigned ? q_encode_signed(x, inv, d) : q_encode_unsigned(x, inv, d));
    }
  }
  for (; e < len; ++e) {
    const std::uint32_t d = quant::dither(key, start + e);
    codes[e] = kSigned ? quant::encode_signed(values[e], inv, d) : quant::encode_unsigned(values[e], inv, d);
  }
}

// codes[0, len) decoded with the block's old scale into values.
template <bool kSigned>
SHARDOPT_KERNEL_INLINE void q_decode_block(const std::uint8_t* __restrict codes, float* __restrict values,
                                           std::size_t len, float scale) {
  std::size_t e = 0;
  for (; e + kQuantLanes <= len; e += kQuantLanes) {
    const QuantU c = q_load_codes(codes + e);
    q_store(values + e, kSigned ? q_decode_signed(c, scale) : q_decode_unsigned(c, scale));
  }
  for (; e < len; ++e)
    values[e] = kSigned ? quant::decode_signed(codes[e], scale) : quant::decode_unsigned(codes[e], scale);
}
#endif  // SHARDOPT_QUANT_VECTORS

// The rule over n elements whose states are fp32 values in stack buffers s1/s2 (decoded before,
// encoded after): master and the parameter output (out + out_first, absent for Out::none) are
// written, the new states left in the buffers. update_loop's loop shape, so it vectorizes; the
// bf16 chunks and the int8 blocks of the vector builds share it.
template <OptimizerKind R, DType G, Out O>
SHARDOPT_KERNEL_INLINE void rule_over_states(float* __restrict pm, const storage_t<G>* __restrict pg,
                                             typename OutStorage<O>::type* out, std::size_t out_first,
                                             float* __restrict s1b, float* __restrict s2b, std::size_t n,
                                             const StepScalars& step_scalars) {
  using Rule = rule_t<R>;
  constexpr bool two_states = Rule::states == 2;
  // A local copy: the stores through pm/po could alias a referenced one, which the compiler would
  // then reload every element instead of keeping in registers.
  const StepScalars scalars = step_scalars;
  typename OutStorage<O>::type* __restrict po = nullptr;  // out is null for Out::none
  if constexpr (O != Out::none) po = out + out_first;
  blocked(n, [&](std::size_t i) {
    float p = pm[i];
    const float g = load<G>(pg[i]);
    float s1 = s1b[i];
    float s2 = 0.0f;
    if constexpr (two_states) s2 = s2b[i];
    Rule::update(p, g, s1, s2, scalars);
    pm[i] = p;
    s1b[i] = s1;
    if constexpr (two_states) s2b[i] = s2;
    if constexpr (O == Out::fp32) po[i] = p;
    else if constexpr (O == Out::fp16) po[i] = fp16_store(p);
    else if constexpr (O == Out::bf16) po[i] = bf16_store(p);
  });
}

// bf16: in the vector builds, chunks of kBf16Chunk elements go through a stack buffer of fp32
// states: widen, run the rule over floats (update_loop's loop shape), round back to bf16. The
// fused loop over 16-bit states and gradients vectorized with twice the registers per value and
// cost more than the memory it saves. The scalar build keeps the fused loop. Same bits either way.
inline constexpr std::size_t kBf16Chunk = 512;

template <OptimizerKind R, DType G, Out O, int V>
SHARDOPT_KERNEL_LOOP void compressed_bf16_loop(float* __restrict master, std::uint16_t* __restrict state1,
                                               std::uint16_t* __restrict state2, const storage_t<G>* __restrict grad,
                                               typename OutStorage<O>::type* __restrict out, std::size_t n,
                                               const StepScalars step_scalars) {
  using Rule = rule_t<R>;
  constexpr bool two_states = Rule::states == 2;
  StepScalars scalars = step_scalars;
  if constexpr (variant_count<Rule>() > 1) Rule::pin(scalars, V);
#if defined(SHARDOPT_QUANT_VECTORS)
  alignas(64) float buf1[kBf16Chunk];
  alignas(64) float buf2[two_states ? kBf16Chunk : 1];
  std::size_t first = 0;
  for (; first + kBf16Chunk <= n; first += kBf16Chunk) {
    for (std::size_t e = 0; e < kBf16Chunk; e += 16) {
      q_bf16_load16(state1 + first + e, buf1 + e);
      if constexpr (two_states) q_bf16_load16(state2 + first + e, buf2 + e);
    }
    rule_over_states<R, G, O>(master + first, grad + first, out, first, buf1, buf2, kBf16Chunk, scalars);
    for (std::size_t e = 0; e < kBf16Chunk; e += 16) {
      q_bf16_store16(state1 + first + e, buf1 + e);
      if constexpr (two_states) q_bf16_store16(state2 + first + e, buf2 + e);
    }
  }
  if (first == n) return;
  master += first;
  state1 += first;
  if constexpr (two_states) state2 += first;
  grad += first;
  if constexpr (O != Out::none) out += first;
  n -= first;
#endif
  blocked(n, [&](std::size_t i) {
    float p = master[i];
    const float g = load<G>(grad[i]);
    float s1 = bf16_load(state1[i]);
    float s2 = 0.0f;
    if constexpr (two_states) s2 = bf16_load(state2[i]);
    Rule::update(p, g, s1, s2, scalars);
    master[i] = p;
    state1[i] = bf16_store(s1);
    if constexpr (two_states) state2[i] = bf16_store(s2);
    if constexpr (O == Out::fp32) out[i] = p;
    else if constexpr (O == Out::fp16) out[i] = fp16_store(p);
    else if constexpr (O == Out::bf16) out[i] = bf16_store(p);
  });
}

// int8, vector builds: per quantization block, (1) decode the old codes into a stack buffer of
// fp32 states, (2) run the rule over the block (writes master and param_out, leaves the new states
// in the buffer: the same loop shape as update_loop's, which vectorizes), (3) find the absmax and
// the new power-of-two scale, (4) encode with it. The scalar build keeps the element functions in
// two passes (decode + rule + per-lane absmax, then encode), the form the vector one is tested
// against. The dither is a hash of the element's global index, so neither the split of the range
// nor the vector width changes a byte.
template <OptimizerKind R, DType G, Out O, int V>
SHARDOPT_KERNEL_LOOP void compressed_int8_loop(float* __restrict master, std::uint8_t* __restrict code1,
                                               std::uint8_t* __restrict code2, float* __restrict scales1,
                                               float* __restrict scales2, const storage_t<G>* __restrict grad,
                                               typename OutStorage<O>::type* __restrict out, std::size_t n,
                                               std::size_t block, std::uint64_t first_index,
                                               std::uint32_t key1, std::uint32_t key2, const StepScalars step_scalars) {
  using Rule = rule_t<R>;
  constexpr bool two_states = Rule::states == 2;
  StepScalars scalars = step_scalars;
  if constexpr (variant_count<Rule>() > 1) Rule::pin(scalars, V);
#if defined(SHARDOPT_QUANT_VECTORS)
  alignas(64) float new1[kMaxQuantBlock];
  alignas(64) float new2[two_states ? kMaxQuantBlock : 1];
  for (std::size_t first = 0, k = 0; first < n; first += block, ++k) {
    const std::size_t len = n - first < block ? n - first : block;
    q_decode_block<true>(code1 + first, new1, len, scales1[k]);
    if constexpr (two_states) q_decode_block<false>(code2 + first, new2, len, scales2[k]);
    rule_over_states<R, G, O>(master + first, grad + first, out, first, new1, new2, len, scalars);
    const std::uint64_t start = first_index + first;
    const float scale1 = quant::block_scale<quant::SignedCode>(q_absmax_bits(new1, len));
    scales1[k] = scale1;
    q_encode_block<true>(new1, code1 + first, len, quant::inverse_scale(scale1), start, key1);
    if constexpr (two_states) {
      const float scale2 = quant::block_scale<quant::UnsignedCode>(q_absmax_bits(new2, len));
      scales2[k] = scale2;
      q_encode_block<false>(new2, code2 + first, len, quant::inverse_scale(scale2), start, key2);
    }
  }
#else
  alignas(64) float new1[kMaxQuantBlock];
  alignas(64) float new2[two_states ? kMaxQuantBlock : 1];
  for (std::size_t first = 0, k = 0; first < n; first += block, ++k) {
    const std::size_t len = n - first < block ? n - first : block;
    const float old1 = scales1[k];
    const float old2 = two_states ? scales2[k] : 0.0f;
    float* __restrict pm = master + first;
    const storage_t<G>* __restrict pg = grad + first;
    std::uint8_t* __restrict c1 = code1 + first;
    std::uint8_t* __restrict c2 = two_states ? code2 + first : nullptr;
    std::uint32_t amax1[kBlock] = {};
    std::uint32_t amax2[kBlock] = {};
    auto update = [&](std::size_t i, std::size_t lane) {
      float p = pm[i];
      const float g = load<G>(pg[i]);
      float s1 = quant::decode_signed(c1[i], old1);
      float s2 = 0.0f;
      if constexpr (two_states) s2 = quant::decode_unsigned(c2[i], old2);
      Rule::update(p, g, s1, s2, scalars);
      pm[i] = p;
      if constexpr (O == Out::fp32) out[first + i] = p;
      else if constexpr (O == Out::fp16) out[first + i] = fp16_store(p);
      else if constexpr (O == Out::bf16) out[first + i] = bf16_store(p);
      new1[i] = s1;
      const std::uint32_t a1 = quant::abs_bits(s1);
      amax1[lane] = amax1[lane] > a1 ? amax1[lane] : a1;
      if constexpr (two_states) {
        new2[i] = s2;
        const std::uint32_t a2 = quant::abs_bits(s2);
        amax2[lane] = amax2[lane] > a2 ? amax2[lane] : a2;
      }
    };
    std::size_t i = 0;
    for (; i + kBlock <= len; i += kBlock)
      for (std::size_t j = 0; j < kBlock; ++j) update(i + j, j);
    for (std::size_t j = 0; i + j < len; ++j) update(i + j, j);
    std::uint32_t top1 = 0, top2 = 0;
    for (std::size_t j = 0; j < kBlock; ++j) {
      top1 = top1 > amax1[j] ? top1 : amax1[j];
      top2 = top2 > amax2[j] ? top2 : amax2[j];
    }
    const float scale1 = quant::block_scale<quant::SignedCode>(top1);
    const float inv1 = quant::inverse_scale(scale1);
    scales1[k] = scale1;
    // quant::dither(key, index) = mix32(lo32(index) ^ mix32(hi32(index) ^ key)): the inner hash
    // is the same for every index of the block unless its low words wrap (never, for a block at a
    // multiple of its size), so it is computed once; a wrapping block takes the general form.
    const std::uint64_t start = first_index + first;
    const auto lo = static_cast<std::uint32_t>(start);
    const bool one_high_word = static_cast<std::uint64_t>(lo) + len <= (std::uint64_t(1) << 32);
    if constexpr (two_states) {
      const float scale2 = quant::block_scale<quant::UnsignedCode>(top2);
      const float inv2 = quant::inverse_scale(scale2);
      scales2[k] = scale2;
      if (one_high_word) {
        const std::uint32_t h1 = quant::mix32(static_cast<std::uint32_t>(start >> 32) ^ key1);
        const std::uint32_t h2 = quant::mix32(static_cast<std::uint32_t>(start >> 32) ^ key2);
        blocked(len, [&](std::size_t e) {
          const std::uint32_t low = lo + static_cast<std::uint32_t>(e);
          c1[e] = quant::encode_signed(new1[e], inv1, quant::mix32(low ^ h1));
          c2[e] = quant::encode_unsigned(new2[e], inv2, quant::mix32(low ^ h2));
        });
      } else {
        for (std::size_t e = 0; e < len; ++e) {
          c1[e] = quant::encode_signed(new1[e], inv1, quant::dither(key1, start + e));
          c2[e] = quant::encode_unsigned(new2[e], inv2, quant::dither(key2, start + e));
        }
      }
    } else {
      if (one_high_word) {
        const std::uint32_t h1 = quant::mix32(static_cast<std::uint32_t>(start >> 32) ^ key1);
        blocked(len, [&](std::size_t e) {
          c1[e] = quant::encode_signed(new1[e], inv1, quant::mix32((lo + static_cast<std::uint32_t>(e)) ^ h1));
        });
      } else {
        for (std::size_t e = 0; e < len; ++e) c1[e] = quant::encode_signed(new1[e], inv1, quant::dither(key1, start + e));
      }
    }
  }
#endif
}

template <OptimizerKind R, DType G, Out O, int V>
void compressed_call(const CompressedUpdateArgs& a) {
  using OutT = typename OutStorage<O>::type;
  const auto* grad = static_cast<const storage_t<G>*>(a.grad);
  auto* out = static_cast<OutT*>(a.param_out);
  if (a.precision == StatePrecision::bf16)
    compressed_bf16_loop<R, G, O, V>(a.master, static_cast<std::uint16_t*>(a.state1),
                                     static_cast<std::uint16_t*>(a.state2), grad, out, a.n, a.scalars);
  else
    compressed_int8_loop<R, G, O, V>(a.master, static_cast<std::uint8_t*>(a.state1),
                                     static_cast<std::uint8_t*>(a.state2), a.scales1, a.scales2, grad, out, a.n,
                                     a.block_size, a.first_index, quant::dither_key(a.seed, 1),
                                     quant::dither_key(a.seed, 2), a.scalars);
}

template <OptimizerKind R, DType G, Out O, int... V>
void compressed_variant(const CompressedUpdateArgs& a, int v, std::integer_sequence<int, V...>) {
  ((v == V ? (compressed_call<R, G, O, V>(a), true) : false) || ...);
}

template <OptimizerKind R, DType G, Out O>
SHARDOPT_KERNEL_DISPATCH void compressed_typed(const CompressedUpdateArgs& a) {
  using Rule = rule_t<R>;
  if constexpr (variant_count<Rule>() > 1) {
    compressed_variant<R, G, O>(a, Rule::variant(a.scalars), std::make_integer_sequence<int, variant_count<Rule>()>{});
  } else {
    compressed_call<R, G, O, 0>(a);
  }
}

template <OptimizerKind R, DType G>
void compressed_out(const CompressedUpdateArgs& a) {
  if (a.param_out == nullptr ||
      (a.param_dtype == DType::fp32 && a.param_out == static_cast<void*>(a.master)))
    return compressed_typed<R, G, Out::none>(a);
  switch (a.param_dtype) {
    case DType::fp32: return compressed_typed<R, G, Out::fp32>(a);
    case DType::fp16: return compressed_typed<R, G, Out::fp16>(a);
    case DType::bf16: return compressed_typed<R, G, Out::bf16>(a);
  }
  kernel_failure("compressed_update: unknown param_dtype");
}

template <OptimizerKind R>
void compressed_grad(const CompressedUpdateArgs& a) {
  switch (a.grad_dtype) {
    case DType::fp32: return compressed_out<R, DType::fp32>(a);
    case DType::fp16: return compressed_out<R, DType::fp16>(a);
    case DType::bf16: return compressed_out<R, DType::bf16>(a);
  }
  kernel_failure("compressed_update: unknown grad_dtype");
}

// The checks here guard the kernel table called directly (tests, benchmarks); the backend checks
// every argument with named messages before it enqueues (core/compressed_update_check.hpp).
void compressed_update(const CompressedUpdateArgs& a) {
  if (a.n == 0) return;
  if (a.precision != StatePrecision::bf16 && a.precision != StatePrecision::int8)
    kernel_failure("compressed_update: precision must be bf16 or int8");
  if (a.precision == StatePrecision::int8 &&
      (a.block_size < kMinQuantBlock || a.block_size > kMaxQuantBlock || (a.block_size & (a.block_size - 1)) != 0))
    kernel_failure("compressed_update: block_size must be a power of two in [64, 4096]");
  if (a.master == nullptr || a.state1 == nullptr || a.grad == nullptr)
    kernel_failure("compressed_update: master, state1 or grad is null");
  if (state_count(a.rule) == 2 && a.state2 == nullptr)
    kernel_failure("compressed_update: state2 is null but the rule keeps two states");
  if (a.precision == StatePrecision::int8 &&
      (a.scales1 == nullptr || (state_count(a.rule) == 2 && a.scales2 == nullptr)))
    kernel_failure("compressed_update: the int8 scales are null");
  if (a.param_out == static_cast<void*>(a.master) && a.param_dtype != DType::fp32)
    kernel_failure("compressed_update: param_out aliases master but param_dtype is not fp32");
  switch (a.rule) {
#define SHARDOPT_RULE_CPU_COMPRESSED(id, Rule) \
  case OptimizerKind::id: return compressed_grad<OptimizerKind::id>(a);
    SHARDOPT_RULES(SHARDOPT_RULE_CPU_COMPRESSED)
#undef SHARDOPT_RULE_CPU_COMPRESSED
  }
  kernel_failure("compressed_update: unknown rule");
}

const CompressedKernels& compressed_table() noexcept {
  static constexpr CompressedKernels k{&compressed_update};
  return k;
}
