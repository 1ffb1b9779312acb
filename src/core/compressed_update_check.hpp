#pragma once
// Argument check of Backend::compressed_update, shared by every backend.
#include "shardopt/backend.hpp"

namespace shardopt::detail {

// Throws Error(invalid_argument) naming the first bad field of `args` (precision, block size,
// rule, dtypes, null or misaligned pointers, a param_out that aliases master in 16 bits). Returns
// without checking pointers when args.n == 0.
void check_compressed_update(const CompressedUpdateArgs& args);

}  // namespace shardopt::detail
