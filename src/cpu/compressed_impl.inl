// The fused update with compressed state (Backend::compressed_update): one source, compiled once
// per instruction set after kernels_impl.inl, in the same per-ISA namespace and under the same
// rules (no headers, `flatten` loops, failures through kernel_failure). It reuses that file's
// helpers (blocked, load/store, Out, OutStorage, bf16_load/bf16_store).
//
// int8: a quantization block is processed in two passes over a stack buffer of its new fp32
// states: pass 1 decodes the codes with the block's old scale, runs the rule, writes master and
// param_out, keeps the new states and their absmax; pass 2 encodes them with the new scale. The
// absmax is an integer max over the float bits of |x| (quant::abs_bits), kept per lane so the
// pass vectorizes; max is exact and order-free, so every instruction set and every split of the
// range into blocks finds the same scale. Decoding and encoding are the branch-free bit arithmetic
// of shardopt/state_precision.hpp, the same bits on every path; the stochastic rounding's dither
// is a hash of the element's global index, so a split of the range changes nothing either.

template <OptimizerKind R, DType G, Out O, int V>
SHARDOPT_KERNEL_LOOP void compressed_bf16_loop(float* __restrict master, std::uint16_t* __restrict state1,
                                               std::uint16_t* __restrict state2, const storage_t<G>* __restrict grad,
                                               typename OutStorage<O>::type* __restrict out, std::size_t n,
                                               const StepScalars step_scalars) {
  using Rule = rule_t<R>;
  constexpr bool two_states = Rule::states == 2;
  StepScalars scalars = step_scalars;
  if constexpr (variant_count<Rule>() > 1) Rule::pin(scalars, V);
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
