// The compressed update's default (a backend without one) and its argument checks, shared by the
// backends (core/compressed_update_check.hpp).
#include <string>

#include "core/compressed_update_check.hpp"
#include "core/pointer_check.hpp"
#include "shardopt/backend.hpp"
#include "shardopt/error.hpp"
#include "shardopt/state_precision.hpp"

namespace shardopt {

void Backend::compressed_update(const CompressedUpdateArgs& /*args*/, Stream& /*stream*/) {
  throw Error(ErrorCode::unsupported, "compressed_update: the " + std::string(name_of(kind())) +
                                          " backend has no update with compressed state");
}

namespace detail {

void check_compressed_update(const CompressedUpdateArgs& a) {
  constexpr const char* op = "compressed_update";
  if (a.precision == StatePrecision::fp32)
    throw Error(ErrorCode::invalid_argument,
                "compressed_update: precision is fp32 (uncompressed state): use fused_update");
  if (a.precision != StatePrecision::bf16 && a.precision != StatePrecision::int8)
    throw Error(ErrorCode::invalid_argument, "compressed_update: unknown precision " +
                                                 std::to_string(static_cast<int>(a.precision)));
  if (a.precision == StatePrecision::int8) check_quant_block(a.block_size, "compressed_update: block_size");
  const int states = state_count(a.rule);
  if (states == 0)
    throw Error(ErrorCode::invalid_argument,
                "compressed_update: unknown rule " + std::to_string(static_cast<int>(a.rule)));
  auto known = [](DType t) { return t == DType::fp32 || t == DType::fp16 || t == DType::bf16; };
  if (!known(a.grad_dtype)) throw Error(ErrorCode::invalid_argument, "compressed_update: unknown grad_dtype");
  if (!known(a.param_dtype)) throw Error(ErrorCode::invalid_argument, "compressed_update: unknown param_dtype");
  if (a.n == 0) return;
  const std::size_t state_bytes = a.precision == StatePrecision::bf16 ? 2 : 1;
  require_elements(a.master, a.n, DType::fp32, op, "master");
  require_elements(a.state1, a.n, state_bytes, op, "state1");
  if (states == 2) require_elements(a.state2, a.n, state_bytes, op, "state2");
  if (a.precision == StatePrecision::int8) {
    const std::size_t blocks = quant_block_count(a.n, a.block_size);
    require_elements(a.scales1, blocks, DType::fp32, op, "scales1");
    if (states == 2) require_elements(a.scales2, blocks, DType::fp32, op, "scales2");
  }
  require_elements(a.grad, a.n, a.grad_dtype, op, "grad");
  if (a.param_out != nullptr) require_elements(a.param_out, a.n, a.param_dtype, op, "param_out");
  if (a.seed_ptr != nullptr) require_elements(a.seed_ptr, 1, sizeof(std::int64_t), op, "seed_ptr");
  if (a.param_out != nullptr && a.param_out == static_cast<void*>(a.master) && a.param_dtype != DType::fp32)
    throw Error(ErrorCode::invalid_argument, "compressed_update: param_out aliases master but param_dtype is " +
                                                 std::string(name_of(a.param_dtype)) + ", not fp32");
}

}  // namespace detail
}  // namespace shardopt
