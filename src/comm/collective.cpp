#include "comm/collective.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "shardopt/backend.hpp"

namespace shardopt::comm {

const char* op_name(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
  }
  return "unknown";
}

bool reduces(CollectiveKind k) noexcept {
  return k == CollectiveKind::reduce_scatter || k == CollectiveKind::all_reduce;
}

std::string describe(CollectiveKind kind, std::size_t count, DType dtype, ReduceOp op, int root) {
  std::string s(name_of(kind));
  if (kind == CollectiveKind::barrier) return s + "()";
  s += "(count=" + std::to_string(count) + ", " + std::string(name_of(dtype));
  if (reduces(kind)) s += std::string(", ") + op_name(op);
  if (kind == CollectiveKind::broadcast) s += ", root=" + std::to_string(root);
  return s + ")";
}

std::string label(const char* who, int rank, std::uint64_t seq, const Call& c) {
  return std::string(who) + " " + std::to_string(rank) + ", " + describe(c) + " (collective #" + std::to_string(seq) + ")";
}

bool overlap(const void* a, std::size_t an, const void* b, std::size_t bn) noexcept {
  if (an == 0 || bn == 0) return false;
  const auto x = reinterpret_cast<std::uintptr_t>(a);
  const auto y = reinterpret_cast<std::uintptr_t>(b);
  return x < y + bn && y < x + an;
}

std::string check_reduce(const void* const* srcs, int nsrc, void* const* dsts, int ndst, std::size_t n, DType t) {
  const int most = Backend::kMaxReduceOperands;
  for (const auto& [count, name] : {std::pair{nsrc, "nsrc"}, std::pair{ndst, "ndst"}})
    if (count < 1 || count > most)
      return std::string("reduce: ") + name + " = " + std::to_string(count) + " is outside [1, " +
             std::to_string(most) + "]";
  if (n == 0) return {};
  const std::string tail = " is null but n = " + std::to_string(n);
  if (srcs == nullptr) return "reduce: srcs" + tail;
  if (dsts == nullptr) return "reduce: dsts" + tail;
  const auto name = [](const char* what, int q) { return std::string(what) + "[" + std::to_string(q) + "]"; };
  for (int q = 0; q < nsrc; ++q)
    if (srcs[q] == nullptr) return "reduce: " + name("srcs", q) + tail;
  for (int q = 0; q < ndst; ++q)
    if (dsts[q] == nullptr) return "reduce: " + name("dsts", q) + tail;
  // A GPU faults on an element not aligned to its size (core/pointer_check.hpp): refuse it on
  // every backend alike.
  const std::size_t es = size_of(t);
  const auto misaligned = [es](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % es != 0; };
  const std::string not_aligned = " is not a multiple of its element size (" + std::to_string(es) + " bytes)";
  for (int q = 0; q < nsrc; ++q)
    if (misaligned(srcs[q])) return "reduce: " + name("srcs", q) + not_aligned;
  for (int q = 0; q < ndst; ++q)
    if (misaligned(dsts[q])) return "reduce: " + name("dsts", q) + not_aligned;
  const std::size_t bytes = n * size_of(t);
  for (int d = 0; d < ndst; ++d) {
    for (int q = 0; q < nsrc; ++q)
      if (dsts[d] != srcs[q] && overlap(dsts[d], bytes, srcs[q], bytes))
        return "reduce: " + name("dsts", d) + " overlaps " + name("srcs", q) +
               " without being equal to it (the only in-place form allowed)";
    for (int e = d + 1; e < ndst; ++e)
      if (overlap(dsts[d], bytes, dsts[e], bytes))
        return "reduce: " + name("dsts", d) + " and " + name("dsts", e) + " overlap";
  }
  return {};
}

namespace {

// reduce_scatter_pieces: what is wrong with the pieces, or "".
std::string check_pieces(const Call& c, std::size_t world) {
  const std::size_t es = size_of(c.dtype), total = world * c.count;
  if (c.npieces && !c.pieces) return "pieces is null";
  if (total && !c.recv) return "recv is null";
  std::size_t end = 0;
  for (std::size_t i = 0; i < c.npieces; ++i) {
    const SendPiece& p = c.pieces[i];
    const std::string at = "piece " + std::to_string(i) + " ";
    if (!p.data) return at + "has no data";
    if (p.count == 0) return at + "has no elements";
    if (p.offset < end) return at + "starts at " + std::to_string(p.offset) + ", inside the piece before it (they must ascend)";
    if (p.offset > total || p.count > total - p.offset)
      return at + "[" + std::to_string(p.offset) + ", +" + std::to_string(p.count) + ") lies outside the " +
             std::to_string(total) + " input elements";
    if (overlap(c.recv, c.count * es, p.data, p.count * es)) return at + "overlaps recv";
    end = p.offset + p.count;
  }
  return {};
}

}  // namespace

void pack_pieces(const Call& c, int size, void* dst) noexcept {
  const std::size_t es = size_of(c.dtype);
  std::memset(dst, 0, static_cast<std::size_t>(size) * c.count * es);
  for (std::size_t i = 0; i < c.npieces; ++i)
    std::memcpy(bytes_of(dst) + c.pieces[i].offset * es, c.pieces[i].data, c.pieces[i].count * es);
}

std::string check_call(const Call& c, int rank, int size) {
  const std::size_t es = size_of(c.dtype);
  const auto world = static_cast<std::size_t>(size);
  const std::size_t n = c.count;
  const bool gathers = c.kind == CollectiveKind::reduce_scatter || c.kind == CollectiveKind::all_gather;
  if (gathers && n > SIZE_MAX / es / world)
    return "size() * count elements overflow the address space";
  if (c.kind != CollectiveKind::reduce_scatter && c.kind != CollectiveKind::all_gather && n > SIZE_MAX / es)
    return "count elements overflow the address space";
  switch (c.kind) {
    case CollectiveKind::reduce_scatter:
      if (c.piecewise) return check_pieces(c, world);
      if (n == 0) return {};
      if (!c.send || !c.recv) return !c.send ? "send is null" : "recv is null";
      if (overlap(c.recv, n * es, c.send, world * n * es) && c.recv != bytes_of(c.send) + rank * n * es)
        return "recv overlaps send but is not send + rank * recv_count (the only in-place form allowed)";
      return {};
    case CollectiveKind::all_gather:
      if (n == 0) return {};
      if (!c.send || !c.recv) return !c.send ? "send is null" : "recv is null";
      if (overlap(c.send, n * es, c.recv, world * n * es) && c.send != bytes_of(c.recv) + rank * n * es)
        return "send overlaps recv but is not recv + rank * send_count (the only in-place form allowed)";
      return {};
    case CollectiveKind::all_reduce:
      if (n == 0) return {};
      if (!c.send || !c.recv) return !c.send ? "send is null" : "recv is null";
      if (overlap(c.send, n * es, c.recv, n * es) && c.send != c.recv)
        return "send and recv overlap without being equal";
      return {};
    case CollectiveKind::broadcast:
      if (c.root < 0 || c.root >= size)
        return "root " + std::to_string(c.root) + " is outside [0, " + std::to_string(size) + ")";
      if (n == 0) return {};
      if (!c.recv) return "recv is null";
      if (rank == c.root && !c.send) return "send is null on the root";
      if (rank == c.root && overlap(c.send, n * es, c.recv, n * es) && c.send != c.recv)
        return "send and recv overlap without being equal";
      return {};
    case CollectiveKind::barrier: return {};
  }
  return {};
}

std::uint64_t volume(const Call& c, int world) noexcept {
  const std::uint64_t bytes = static_cast<std::uint64_t>(c.count) * size_of(c.dtype);
  switch (c.kind) {
    case CollectiveKind::reduce_scatter:
    case CollectiveKind::all_gather: return bytes * static_cast<std::uint64_t>(world);
    case CollectiveKind::all_reduce: return 2 * bytes;
    case CollectiveKind::broadcast: return bytes;
    case CollectiveKind::barrier: return 0;
  }
  return 0;
}

}  // namespace shardopt::comm
