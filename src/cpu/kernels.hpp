#pragma once
// CPU element-wise kernels (internal). Each runs single-threaded over the range it is given; the
// CPU backend splits work across its thread pool in fixed-size chunks. The same source is compiled
// once per instruction set (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp include
// kernels_impl.inl) and every path gives bit-identical results.
#include <cstddef>

#include "shardopt/backend.hpp"
#include "shardopt/dtype.hpp"

namespace shardopt::cpu {

enum class Isa { scalar, avx2, avx512 };
const char* name_of(Isa isa) noexcept;

// The best instruction set this processor supports (checked at run time, never at build time).
Isa detect_isa() noexcept;
// The set the backend uses: detect_isa(), unless the environment variable SHARDOPT_ISA names a
// lower one ("scalar", "avx2") for testing.
Isa active_isa() noexcept;

// Kernel table for one instruction set.
struct Kernels {
  // args.scale_ptr / args.skip_ptr are read by the caller, not here; args.n elements from the
  // pointers as given.
  void (*fused_update)(const UpdateArgs& args);
  void (*fill)(void* dst, DType dtype, std::size_t n, float value);
  void (*cast)(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n);
  // data *= scale in place; returns true if any result is not finite.
  bool (*unscale_check)(void* data, DType dtype, std::size_t n, float scale);
  // Sum of squares accumulated in double in a fixed order (interleaved partial sums combined in a
  // fixed tree): the same bits on every instruction set and for every thread count.
  double (*sum_squares)(const void* data, DType dtype, std::size_t n);
};

const Kernels& kernels(Isa isa) noexcept;

// The fused update with compressed state (Backend::compressed_update), per instruction set; same
// bytes on every one. Runs single-threaded over the range given (for int8 the range starts at a
// quantization block boundary). compressed_impl.inl.
struct CompressedKernels {
  void (*update)(const CompressedUpdateArgs& args);
};
const CompressedKernels& compressed_kernels(Isa isa) noexcept;

// UpdateArgs for elements [begin, begin+count) of `a`.
UpdateArgs slice(const UpdateArgs& a, std::size_t begin, std::size_t count) noexcept;
// CompressedUpdateArgs for elements [begin, begin+count) of `a`; for int8, begin must be a
// multiple of a.block_size (the scales are offset by begin / block_size).
CompressedUpdateArgs slice(const CompressedUpdateArgs& a, std::size_t begin, std::size_t count) noexcept;

}  // namespace shardopt::cpu
