#pragma once
// Pointer checks shared by every backend's kernels.
//
// A GPU loads a float only from an address that is a multiple of 4 (a 16-bit element from a
// multiple of 2): anything else faults with cudaErrorMisalignedAddress, an error that poisons the
// CUDA context for the rest of the process. Both backends therefore refuse an element pointer
// that is not a multiple of its element size before they enqueue anything, so the CPU backend,
// which would otherwise read such memory without complaint, catches the same bug as the GPU.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "shardopt/dtype.hpp"
#include "shardopt/error.hpp"

namespace shardopt::detail {

inline bool element_aligned(const void* p, std::size_t element_bytes) noexcept {
  return element_bytes <= 1 || reinterpret_cast<std::uintptr_t>(p) % element_bytes == 0;
}

// Throws Error(invalid_argument) when `p` is null or not a multiple of `element_bytes` while
// `n` > 0 elements are to be accessed through it. `op` and `arg` name the call and the argument.
inline void require_elements(const void* p, std::size_t n, std::size_t element_bytes, const char* op,
                             const char* arg) {
  if (n == 0) return;
  if (p == nullptr)
    throw Error(ErrorCode::invalid_argument,
                std::string(op) + ": '" + arg + "' is null but n = " + std::to_string(n));
  if (!element_aligned(p, element_bytes)) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", p);
    throw Error(ErrorCode::invalid_argument,
                std::string(op) + ": '" + arg + "' (" + addr + ") is not a multiple of its element size (" +
                    std::to_string(element_bytes) + " bytes): a GPU cannot load such elements");
  }
}

inline void require_elements(const void* p, std::size_t n, DType t, const char* op, const char* arg) {
  require_elements(p, n, size_of(t), op, arg);
}

}  // namespace shardopt::detail
