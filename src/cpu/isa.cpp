#include <cstdlib>
#include <string>
#include <string_view>

#include "cpu/kernels.hpp"
#include "shardopt/error.hpp"

namespace shardopt::cpu {

// Out of line and compiled with the default flags, so the kernel objects (built with ISA flags)
// never instantiate std::string or Error code of their own; see kernels_impl.inl.
[[noreturn]] void kernel_failure(const char* what) { throw Error(ErrorCode::invalid_argument, what); }

namespace isa_scalar {
const Kernels& table() noexcept;
const CompressedKernels& compressed_table() noexcept;
}
namespace isa_avx2 {
const Kernels& table() noexcept;
const CompressedKernels& compressed_table() noexcept;
}
namespace isa_avx512 {
const Kernels& table() noexcept;
const CompressedKernels& compressed_table() noexcept;
}

const char* name_of(Isa isa) noexcept {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

Isa detect_isa() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's checks include the OS side (XCR0 enables the ymm/zmm state), not just CPUID.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa active_isa() noexcept {
  const Isa best = detect_isa();
  // Read on every call (cheap next to any kernel) so a test can change it between backends.
  const char* env = std::getenv("SHARDOPT_ISA");
  if (env == nullptr) return best;
  const std::string_view want(env);
  Isa asked;
  if (want == "scalar") asked = Isa::scalar;
  else if (want == "avx2") asked = Isa::avx2;
  else if (want == "avx512") asked = Isa::avx512;
  else return best;  // unknown names are ignored rather than failing a whole run
  // The variable may only lower the set: asking for more than the CPU has would crash.
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

const Kernels& kernels(Isa isa) noexcept {
  switch (isa) {
    case Isa::avx512: return isa_avx512::table();
    case Isa::avx2: return isa_avx2::table();
    case Isa::scalar: break;
  }
  return isa_scalar::table();
}

const CompressedKernels& compressed_kernels(Isa isa) noexcept {
  switch (isa) {
    case Isa::avx512: return isa_avx512::compressed_table();
    case Isa::avx2: return isa_avx2::compressed_table();
    case Isa::scalar: break;
  }
  return isa_scalar::compressed_table();
}

CompressedUpdateArgs slice(const CompressedUpdateArgs& a, std::size_t begin, std::size_t count) noexcept {
  CompressedUpdateArgs s = a;
  const std::size_t state_bytes = a.precision == StatePrecision::bf16 ? 2 : 1;
  auto offset = [&](void* p) { return p ? static_cast<void*>(static_cast<unsigned char*>(p) + begin * state_bytes) : p; };
  s.master = a.master ? a.master + begin : nullptr;
  s.state1 = offset(a.state1);
  s.state2 = offset(a.state2);
  if (a.precision == StatePrecision::int8 && a.block_size != 0) {
    const std::size_t first_block = begin / a.block_size;
    s.scales1 = a.scales1 ? a.scales1 + first_block : nullptr;
    s.scales2 = a.scales2 ? a.scales2 + first_block : nullptr;
  }
  if (a.grad) s.grad = static_cast<const unsigned char*>(a.grad) + begin * size_of(a.grad_dtype);
  if (a.param_out) s.param_out = static_cast<unsigned char*>(a.param_out) + begin * size_of(a.param_dtype);
  s.first_index = a.first_index + begin;
  s.n = count;
  return s;
}

UpdateArgs slice(const UpdateArgs& a, std::size_t begin, std::size_t count) noexcept {
  UpdateArgs s = a;
  // Null pointers stay null: state2 is unused by one-state rules, param_out may be absent.
  auto offset_f = [&](float* p) { return p ? p + begin : p; };
  s.master = offset_f(a.master);
  s.state1 = offset_f(a.state1);
  s.state2 = offset_f(a.state2);
  if (a.grad) s.grad = static_cast<const unsigned char*>(a.grad) + begin * size_of(a.grad_dtype);
  if (a.param_out) s.param_out = static_cast<unsigned char*>(a.param_out) + begin * size_of(a.param_dtype);
  s.n = count;
  return s;
}

}  // namespace shardopt::cpu
