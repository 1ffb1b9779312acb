#include "shardopt/dtype.hpp"

namespace shardopt {

bool parse_dtype(std::string_view text, DType& out) noexcept {
  // Exact, case-sensitive names: one spelling per thing in configs and the CLI, plus the long
  // names frameworks use so a value copied from a PyTorch config is accepted too.
  if (text == "fp32" || text == "float32") {
    out = DType::fp32;
    return true;
  }
  if (text == "fp16" || text == "float16") {
    out = DType::fp16;
    return true;
  }
  if (text == "bf16" || text == "bfloat16") {
    out = DType::bf16;
    return true;
  }
  return false;
}

}  // namespace shardopt
