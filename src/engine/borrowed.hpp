#pragma once
// Borrowed trainer memory (Engine::borrow_gradients / borrow_parameters): one pointer per tensor,
// null where the engine keeps the tensor in its own memory, empty when nothing is borrowed. The
// gradient reducer and the parameter gatherer each hold such a table and ask the same two things.
#include <cstddef>
#include <vector>

#include "shardopt/dtype.hpp"
#include "shardopt/layout.hpp"

namespace shardopt::detail {

// Whether every tensor of block `b` is borrowed. A tensor without elements has nothing in engine
// memory to hand out once borrowing is on, so it counts as borrowed.
inline bool block_fully_borrowed(const Layout& layout, const std::vector<void*>& borrowed, int b) {
  if (borrowed.empty()) return false;
  const auto& bi = layout.blocks()[b];
  for (int t = bi.first_tensor; t < bi.first_tensor + bi.tensor_count; ++t)
    if (layout.tensors()[t].numel != 0 && !borrowed[t]) return false;
  return true;
}

// The bytes of the borrowed tensors, `dtype` per element.
inline std::size_t borrowed_bytes_of(const Layout& layout, const std::vector<void*>& borrowed, DType dtype) {
  std::size_t n = 0;
  for (std::size_t t = 0; t < borrowed.size(); ++t)
    if (borrowed[t]) n += layout.tensors()[t].numel * size_of(dtype);
  return n;
}

}  // namespace shardopt::detail
