// The element-wise kernels compiled for the avx512 instruction set (flags in src/CMakeLists.txt).
// The source is kernels_impl.inl; see there for why it sits in a per-ISA namespace.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "cpu/kernels.hpp"
#include "shardopt/rules.hpp"

namespace shardopt::cpu {

// Defined in isa.cpp with the default flags: throws Error(invalid_argument, what).
[[noreturn]] void kernel_failure(const char* what);

namespace isa_avx512 {
#include "cpu/kernels_impl.inl"
#include "cpu/compressed_impl.inl"
}  // namespace isa_avx512

}  // namespace shardopt::cpu
