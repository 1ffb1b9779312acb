#pragma once
// Whether this test binary is built with a sanitizer (SHARDOPT_SANITIZE). Under ThreadSanitizer or
// AddressSanitizer+UBSan the code runs 5-20x slower, and a race, an out-of-bounds access or an
// undefined operation shows up in the first cases of a sweep as surely as in the last. So the few
// slowest sweeps (random layouts, the large reductions, the oracle's world sizes) run a smaller
// sample there; the main build runs every case.
namespace shardopt::testing {
#if defined(SHARDOPT_TESTS_SANITIZED)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
}  // namespace shardopt::testing
