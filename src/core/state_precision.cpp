#include "shardopt/state_precision.hpp"

#include <string>

#include "shardopt/error.hpp"

// The state precisions' names and the block-size check (what config.cpp needs: kept free of the
// backend, so the manifest fuzzer links config.cpp with this file alone).
namespace shardopt {

bool parse_state_precision(std::string_view text, StatePrecision& out) noexcept {
  for (StatePrecision p : {StatePrecision::fp32, StatePrecision::bf16, StatePrecision::int8}) {
    if (text == name_of(p)) {
      out = p;
      return true;
    }
  }
  return false;
}

void check_quant_block(std::size_t block, std::string_view what) {
  const bool power_of_two = block != 0 && (block & (block - 1)) == 0;
  if (power_of_two && block >= kMinQuantBlock && block <= kMaxQuantBlock) return;
  throw Error(ErrorCode::invalid_argument,
              std::string(what) + " = " + std::to_string(block) + ": the int8 quantization block size must be " +
                  (power_of_two ? "" : "a power of two and ") + "in [" + std::to_string(kMinQuantBlock) + ", " +
                  std::to_string(kMaxQuantBlock) + "]");
}

}  // namespace shardopt
