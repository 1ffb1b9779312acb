// Backend::compressed_update on the GPU: the fused update with bf16 or int8-blockwise state
// (shardopt/state_precision.hpp, CompressedUpdateArgs in shardopt/backend.hpp).
//
// Same bytes as the CPU kernels (src/cpu/compressed_impl.inl): the same element functions (the
// rule's update, quant::encode_* / decode_*, float_to_bf16), compiled with --fmad=false so no
// a*b+c is contracted, and a block's absmax is an integer max over float bits, exact in any order.
// int8: one quantization block per thread block (block-stride loop over blocks): each thread
// decodes, updates and keeps its elements' new states in shared memory (at most kMaxQuantBlock
// per state, 32 KiB for two), the block takes the max with atomicMax on shared memory, then each
// thread encodes its elements with the new scale.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/cuda_internal.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/rules.hpp"
#include "shardopt/state_precision.hpp"

namespace shardopt::cuda_impl {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGrid = 8192;  // block-stride loops cover the rest

template <DType T>
struct Storage {
  using type = std::uint16_t;
};
template <>
struct Storage<DType::fp32> {
  using type = float;
};
template <DType T>
using storage_t = typename Storage<T>::type;

template <DType T>
__device__ __forceinline__ float to_float(storage_t<T> x) {
  if constexpr (T == DType::fp32) return x;
  else if constexpr (T == DType::fp16) return fp16_to_float(x);
  else return bf16_to_float(x);
}
template <DType T>
__device__ __forceinline__ storage_t<T> from_float(float v) {
  if constexpr (T == DType::fp32) return v;
  else if constexpr (T == DType::fp16) return float_to_fp16(v);
  else return float_to_bf16(v);
}

// Everything a launch needs, by value in the kernel parameters.
struct KernelArgs {
  StepScalars scalars;
  const StepScalars* scalars_ptr;
  float* master;
  void* state1;
  void* state2;
  float* scales1;
  float* scales2;
  const void* grad;
  void* param_out;
  std::size_t n;
  std::size_t block;
  std::uint64_t first_index;
  std::uint32_t key1, key2;
  const std::int64_t* seed_ptr;  // when set: the keys come from *seed_ptr, read on the device
  const float* scale_ptr;
  const float* skip_ptr;
  bool zero_grad;
};

// Reads the step's scalars on the device (as fused_update does). False: the step is skipped.
template <DType G>
__device__ bool begin_step(const KernelArgs& a, StepScalars& s) {
  if (a.skip_ptr != nullptr && *a.skip_ptr != 0.0f) {
    if (a.zero_grad) {
      auto* grad = static_cast<storage_t<G>*>(const_cast<void*>(a.grad));
      const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
      for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n; i += stride)
        grad[i] = storage_t<G>(0);
    }
    return false;
  }
  s = a.scalars_ptr != nullptr ? *a.scalars_ptr : a.scalars;
  if (a.scale_ptr != nullptr) s.grad_scale = s.grad_scale * *a.scale_ptr;
  return true;
}

template <OptimizerKind R, DType G, DType P, bool Store>
__device__ __forceinline__ float step_element(const KernelArgs& a, std::size_t i, float& s1, float& s2,
                                              const StepScalars& s) {
  auto* grad = static_cast<storage_t<G>*>(const_cast<void*>(a.grad));
  float p = a.master[i];
  const float g = to_float<G>(grad[i]);
  if (a.zero_grad) grad[i] = storage_t<G>(0);
  rule_t<R>::update(p, g, s1, s2, s);
  a.master[i] = p;
  if constexpr (Store) static_cast<storage_t<P>*>(a.param_out)[i] = from_float<P>(p);
  return p;
}

template <OptimizerKind R, DType G, DType P, bool Store>
__global__ void __launch_bounds__(kThreads) bf16_state_kernel(KernelArgs a) {
  StepScalars s;
  if (!begin_step<G>(a, s)) return;
  constexpr bool kTwo = rule_t<R>::states == 2;
  auto* st1 = static_cast<std::uint16_t*>(a.state1);
  auto* st2 = static_cast<std::uint16_t*>(a.state2);
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n; i += stride) {
    float s1 = bf16_to_float(st1[i]);
    float s2 = 0.0f;
    if constexpr (kTwo) s2 = bf16_to_float(st2[i]);
    step_element<R, G, P, Store>(a, i, s1, s2, s);
    st1[i] = float_to_bf16(s1);
    if constexpr (kTwo) st2[i] = float_to_bf16(s2);
  }
}

template <OptimizerKind R, DType G, DType P, bool Store>
__global__ void __launch_bounds__(kThreads) int8_state_kernel(KernelArgs a) {
  StepScalars s;
  if (!begin_step<G>(a, s)) return;
  constexpr bool kTwo = rule_t<R>::states == 2;
  __shared__ float new1[kMaxQuantBlock];
  __shared__ float new2[kTwo ? kMaxQuantBlock : 1];
  __shared__ unsigned amax[2];
  auto* code1 = static_cast<std::uint8_t*>(a.state1);
  auto* code2 = static_cast<std::uint8_t*>(a.state2);
  // The seed in backend memory (the step counter) is read here, so a graph replay uses the
  // current step's seed.
  std::uint32_t key1 = a.key1, key2 = a.key2;
  if (a.seed_ptr != nullptr) {
    const auto seed = static_cast<std::uint64_t>(*a.seed_ptr);
    key1 = quant::dither_key(seed, 1);
    key2 = quant::dither_key(seed, 2);
  }
  const std::size_t blocks = quant_block_count(a.n, a.block);
  for (std::size_t k = blockIdx.x; k < blocks; k += gridDim.x) {
    const std::size_t first = k * a.block;
    const std::size_t len = min(a.block, a.n - first);
    if (threadIdx.x == 0) amax[0] = amax[1] = 0u;
    __syncthreads();
    const float old1 = a.scales1[k];
    const float old2 = kTwo ? a.scales2[k] : 0.0f;
    unsigned top1 = 0, top2 = 0;
    for (std::size_t e = threadIdx.x; e < len; e += blockDim.x) {
      float s1 = quant::decode_signed(code1[first + e], old1);
      float s2 = 0.0f;
      if constexpr (kTwo) s2 = quant::decode_unsigned(code2[first + e], old2);
      step_element<R, G, P, Store>(a, first + e, s1, s2, s);
      new1[e] = s1;
      top1 = max(top1, quant::abs_bits(s1));
      if constexpr (kTwo) {
        new2[e] = s2;
        top2 = max(top2, quant::abs_bits(s2));
      }
    }
    atomicMax(&amax[0], top1);
    if constexpr (kTwo) atomicMax(&amax[1], top2);
    __syncthreads();
    const float scale1 = quant::block_scale<quant::SignedCode>(amax[0]);
    const float inv1 = quant::inverse_scale(scale1);
    float scale2 = 0.0f, inv2 = 0.0f;
    if constexpr (kTwo) {
      scale2 = quant::block_scale<quant::UnsignedCode>(amax[1]);
      inv2 = quant::inverse_scale(scale2);
    }
    for (std::size_t e = threadIdx.x; e < len; e += blockDim.x) {
      const std::uint64_t index = a.first_index + first + e;
      code1[first + e] = quant::encode_signed(new1[e], inv1, quant::dither(key1, index));
      if constexpr (kTwo) code2[first + e] = quant::encode_unsigned(new2[e], inv2, quant::dither(key2, index));
    }
    if (threadIdx.x == 0) {
      a.scales1[k] = scale1;
      if constexpr (kTwo) a.scales2[k] = scale2;
    }
    __syncthreads();  // amax and the shared values are reused by the next block
  }
}

template <OptimizerKind R, DType G, DType P, bool Store>
void launch_typed(const KernelArgs& a, StatePrecision precision, cudaStream_t stream) {
  if (precision == StatePrecision::bf16) {
    const std::size_t want = (a.n + kThreads - 1) / kThreads;
    const unsigned grid = static_cast<unsigned>(std::min<std::size_t>(want, kMaxGrid));
    bf16_state_kernel<R, G, P, Store><<<grid, kThreads, 0, stream>>>(a);
  } else {
    // A skipped step with zero_grad zeroes every element through the grid-stride loop above, so
    // the grid is sized by blocks of quantization but covers the whole range either way.
    const std::size_t want = quant_block_count(a.n, a.block);
    const unsigned grid = static_cast<unsigned>(std::min<std::size_t>(want, kMaxGrid));
    int8_state_kernel<R, G, P, Store><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <OptimizerKind R, DType G>
void launch_out(const KernelArgs& a, StatePrecision precision, DType param_dtype, bool store, cudaStream_t s) {
  if (!store) return launch_typed<R, G, DType::fp32, false>(a, precision, s);
  switch (param_dtype) {
    case DType::fp32: return launch_typed<R, G, DType::fp32, true>(a, precision, s);
    case DType::fp16: return launch_typed<R, G, DType::fp16, true>(a, precision, s);
    case DType::bf16: return launch_typed<R, G, DType::bf16, true>(a, precision, s);
  }
}

template <OptimizerKind R>
void launch_grad(const KernelArgs& a, StatePrecision precision, DType grad_dtype, DType param_dtype, bool store,
                 cudaStream_t s) {
  switch (grad_dtype) {
    case DType::fp32: return launch_out<R, DType::fp32>(a, precision, param_dtype, store, s);
    case DType::fp16: return launch_out<R, DType::fp16>(a, precision, param_dtype, store, s);
    case DType::bf16: return launch_out<R, DType::bf16>(a, precision, param_dtype, store, s);
  }
}

}  // namespace

void launch_compressed_update(const CompressedUpdateArgs& args, cudaStream_t stream) {
  const bool two = state_count(args.rule) == 2;
  const bool store =
      args.param_out != nullptr && !(args.param_dtype == DType::fp32 && args.param_out == static_cast<void*>(args.master));
  KernelArgs a{};
  a.scalars = args.scalars;
  a.scalars_ptr = args.scalars_ptr;
  a.master = args.master;
  a.state1 = args.state1;
  a.state2 = two ? args.state2 : nullptr;
  a.scales1 = args.scales1;
  a.scales2 = two ? args.scales2 : nullptr;
  a.grad = args.grad;
  a.param_out = store ? args.param_out : nullptr;
  a.n = args.n;
  a.block = args.block_size;
  a.first_index = args.first_index;
  a.key1 = quant::dither_key(args.seed, 1);
  a.key2 = quant::dither_key(args.seed, 2);
  a.seed_ptr = args.seed_ptr;
  a.scale_ptr = args.scale_ptr;
  a.skip_ptr = args.skip_ptr;
  a.zero_grad = args.zero_grad;
  switch (args.rule) {
#define SHARDOPT_RULE_CUDA_COMPRESSED(id, Rule)                                                           \
  case OptimizerKind::id:                                                                                \
    launch_grad<OptimizerKind::id>(a, args.precision, args.grad_dtype, args.param_dtype, store, stream); \
    break;
    SHARDOPT_RULES(SHARDOPT_RULE_CUDA_COMPRESSED)
#undef SHARDOPT_RULE_CUDA_COMPRESSED
  }
  check(cudaGetLastError(), "compressed_update kernel",
        "updating " + std::to_string(args.n) + " parameters with " + std::string(name_of(args.rule)) + " and " +
            std::string(name_of(args.precision)) + " state");
}

}  // namespace shardopt::cuda_impl
