#include <cmath>
#include <cstdint>
#include <string_view>

#include "shardopt/engine.hpp"

namespace shardopt {

namespace {

// splitmix64: a counter-based generator, so element i's value needs no state from element i-1 and
// every rank computes the same value for the same element whatever range it fills.
std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t hash_name(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

}  // namespace

InitFn seeded_init(std::uint64_t seed) {
  return [seed](const Layout::TensorInfo& t, std::size_t begin, std::size_t count, float* out) {
    if (t.shape.size() <= 1) {
      for (std::size_t i = 0; i < count; ++i) out[i] = 0.0f;
      return;
    }
    const double a = 1.0 / std::sqrt(static_cast<double>(t.shape.back() > 0 ? t.shape.back() : 1));
    const std::uint64_t key = mix(seed ^ hash_name(t.name));
    for (std::size_t i = 0; i < count; ++i) {
      const std::uint64_t r = mix(key + begin + i);
      const double u = static_cast<double>(r >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
      out[i] = static_cast<float>((2.0 * u - 1.0) * a);
    }
  };
}

}  // namespace shardopt
