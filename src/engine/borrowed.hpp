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

// The tensors of unit u, in order (a unit's blocks, hence its tensors, are consecutive).
struct TensorRange {
  int first = 0, last = 0;
  struct It {
    int t;
    int operator*() const { return t; }
    It& operator++() { ++t; return *this; }
    bool operator!=(const It& o) const { return t != o.t; }
  };
  It begin() const { return {first}; }
  It end() const { return {last}; }
};
inline TensorRange tensors_of_unit(const Layout& layout, int u) {
  const auto& info = layout.units()[u];
  const auto& first = layout.blocks()[info.first_block];
  const auto& last = layout.blocks()[info.first_block + info.block_count - 1];
  return {first.first_tensor, last.first_tensor + last.tensor_count};
}

// The tensor of unit u that holds unit element e (which must lie in one, not in an alignment gap).
inline int tensor_at(const Layout& layout, int u, std::size_t e) {
  for (int t : tensors_of_unit(layout, u)) {
    const auto& ti = layout.tensors()[t];
    if (e >= ti.unit_offset && e < ti.unit_offset + ti.numel) return t;
  }
  return -1;
}

// The bytes of the borrowed tensors, `dtype` per element.
inline std::size_t borrowed_bytes_of(const Layout& layout, const std::vector<void*>& borrowed, DType dtype) {
  std::size_t n = 0;
  for (std::size_t t = 0; t < borrowed.size(); ++t)
    if (borrowed[t]) n += layout.tensors()[t].numel * size_of(dtype);
  return n;
}

}  // namespace shardopt::detail
