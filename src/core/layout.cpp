#include "shardopt/layout.hpp"

#include <algorithm>
#include <climits>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "shardopt/error.hpp"

namespace shardopt {

namespace {

constexpr std::size_t kMax = std::numeric_limits<std::size_t>::max();

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

// Checked size arithmetic: a layout of a huge model must fail loudly rather than wrap around and
// hand out overlapping offsets. `what` names the tensor or unit whose size overflowed.
std::size_t add_checked(std::size_t a, std::size_t b, const std::string& what) {
  if (a > kMax - b) throw Error(ErrorCode::invalid_argument, "layout size overflows size_t at " + what);
  return a + b;
}

std::size_t round_up(std::size_t x, std::size_t multiple, const std::string& what) {
  const std::size_t rem = x % multiple;
  return rem == 0 ? x : add_checked(x, multiple - rem, what);
}

}  // namespace

std::size_t numel(const std::vector<std::int64_t>& shape) {
  // Negatives are rejected before a zero extent can short-circuit the product, so [0, -1] is an
  // error rather than an empty tensor.
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0)
      throw Error(ErrorCode::invalid_argument, "negative extent " + std::to_string(shape[i]) + " in dimension " +
                                                   std::to_string(i) + " of shape " + shape_text(shape));
  }
  std::size_t n = 1;
  for (std::int64_t e : shape) {
    const auto extent = static_cast<std::size_t>(e);
    if (extent == 0) return 0;  // later extents cannot overflow an empty product
  }
  for (std::int64_t e : shape) {
    const auto extent = static_cast<std::size_t>(e);
    if (n > kMax / extent)
      throw Error(ErrorCode::invalid_argument, "element count of shape " + shape_text(shape) + " overflows size_t");
    n *= extent;
  }
  return n;
}

Layout Layout::build(const std::vector<BlockSpec>& blocks, const LayoutOptions& options) {
  require(options.world_size >= 1, ErrorCode::invalid_argument,
          "LayoutOptions.world_size = " + std::to_string(options.world_size) + ": must be at least 1");
  require(options.alignment != 0, ErrorCode::invalid_argument, "LayoutOptions.alignment = 0: must be positive");
  require(options.bucket_elems != 0, ErrorCode::invalid_argument,
          "LayoutOptions.bucket_elems = 0: must be positive");
  const auto world = static_cast<std::size_t>(options.world_size);
  require(options.alignment <= kMax / world, ErrorCode::invalid_argument,
          "LayoutOptions.alignment = " + std::to_string(options.alignment) + " times world_size " +
              std::to_string(world) + " overflows size_t");
  const std::size_t unit_multiple = world * options.alignment;

  // Tensor and block indices are ints in the public structs; refuse counts they cannot hold.
  std::size_t tensor_total = 0;
  for (const BlockSpec& b : blocks) tensor_total += b.tensors.size();
  require(blocks.size() <= static_cast<std::size_t>(INT_MAX) && tensor_total <= static_cast<std::size_t>(INT_MAX),
          ErrorCode::invalid_argument, "too many blocks or tensors for a layout");

  Layout L;
  L.options_ = options;
  L.blocks_.reserve(blocks.size());
  L.tensors_.reserve(tensor_total);
  L.tensor_index_.reserve(tensor_total);
  L.block_index_.reserve(blocks.size());

  // The unit being filled: `cursor` is the end of its last tensor (its data_elems so far).
  UnitInfo open;
  bool unit_open = false;
  std::size_t cursor = 0;
  std::size_t shard_total = 0;

  auto close_unit = [&]() {
    const std::string what = "unit " + std::to_string(L.units_.size());
    open.data_elems = cursor;
    open.padded_elems = round_up(cursor, unit_multiple, what);
    open.slice_elems = open.padded_elems / world;
    open.shard_offset = shard_total;
    shard_total = add_checked(shard_total, open.slice_elems, what);
    L.units_.push_back(open);
    unit_open = false;
    cursor = 0;
  };

  for (std::size_t bi = 0; bi < blocks.size(); ++bi) {
    const BlockSpec& spec = blocks[bi];
    const int block_id = static_cast<int>(bi);
    if (!L.block_index_.emplace(spec.name, block_id).second)
      throw Error(ErrorCode::invalid_argument, "duplicate block name '" + spec.name + "' (blocks " +
                                                   std::to_string(L.block_index_.at(spec.name)) + " and " +
                                                   std::to_string(bi) + ")");
    if (!unit_open) {
      open = UnitInfo{};
      open.first_block = block_id;
      unit_open = true;
    }
    const int unit_id = static_cast<int>(L.units_.size());
    BlockInfo binfo;
    binfo.name = spec.name;
    binfo.unit = unit_id;
    binfo.first_tensor = static_cast<int>(L.tensors_.size());
    binfo.tensor_count = static_cast<int>(spec.tensors.size());

    for (std::size_t ti = 0; ti < spec.tensors.size(); ++ti) {
      const TensorSpec& ts = spec.tensors[ti];
      if (ts.name.empty())
        throw Error(ErrorCode::invalid_argument,
                    "empty tensor name (tensor " + std::to_string(ti) + " of block '" + spec.name + "')");
      const int tensor_id = static_cast<int>(L.tensors_.size());
      if (!L.tensor_index_.emplace(ts.name, tensor_id).second) {
        const TensorInfo& first = L.tensors_[static_cast<std::size_t>(L.tensor_index_.at(ts.name))];
        // The first holder may be in an earlier block or in this one (not yet in blocks_).
        const std::string& first_block = static_cast<std::size_t>(first.block) < L.blocks_.size()
                                             ? L.blocks_[static_cast<std::size_t>(first.block)].name
                                             : spec.name;
        throw Error(ErrorCode::invalid_argument, "duplicate tensor name '" + ts.name + "' (in block '" +
                                                     first_block + "' and block '" + spec.name + "')");
      }
      std::size_t n = 0;
      try {
        n = numel(ts.shape);
      } catch (const Error& e) {
        throw Error(e.code(), "tensor '" + ts.name + "' in block '" + spec.name + "': " + e.message());
      }
      TensorInfo info;
      info.name = ts.name;
      info.shape = ts.shape;
      info.group = ts.group;
      info.numel = n;
      info.block = block_id;
      info.unit = unit_id;
      info.index = static_cast<int>(L.tensors_.size());
      // Every tensor start is aligned, empty ones included, so "starts are aligned" needs no
      // exception; an empty tensor does not move the cursor, so it costs no space.
      info.unit_offset = round_up(cursor, options.alignment, "tensor '" + ts.name + "'");
      if (n != 0) cursor = add_checked(info.unit_offset, n, "tensor '" + ts.name + "'");
      L.total_numel_ = add_checked(L.total_numel_, n, "tensor '" + ts.name + "'");
      L.tensors_.push_back(std::move(info));
    }
    L.blocks_.push_back(std::move(binfo));
    ++open.block_count;
    // Greedy grouping: a unit ends at the first block boundary where it holds at least a bucket.
    if (cursor >= options.bucket_elems) close_unit();
  }
  // The last unit may be smaller than a bucket (or even empty, if its blocks hold no elements:
  // then padded and slice are 0 and every rank owns an empty slice).
  if (unit_open) close_unit();
  L.shard_elems_ = shard_total;
  return L;
}

std::size_t Layout::max_unit_elems() const noexcept {
  std::size_t m = 0;
  for (const UnitInfo& u : units_) m = std::max(m, u.padded_elems);
  return m;
}

int Layout::find_tensor(const std::string& name) const noexcept {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? -1 : it->second;
}

int Layout::find_block(const std::string& name) const noexcept {
  const auto it = block_index_.find(name);
  return it == block_index_.end() ? -1 : it->second;
}

Layout::Location Layout::locate(int tensor, std::size_t element) const {
  require(tensor >= 0 && static_cast<std::size_t>(tensor) < tensors_.size(), ErrorCode::invalid_argument,
          "locate: tensor index " + std::to_string(tensor) + " out of range (layout has " +
              std::to_string(tensors_.size()) + " tensors)");
  const TensorInfo& t = tensors_[static_cast<std::size_t>(tensor)];
  if (element >= t.numel)
    throw Error(ErrorCode::invalid_argument, "locate: element " + std::to_string(element) + " out of range for tensor '" +
                                                 t.name + "' with " + std::to_string(t.numel) + " elements");
  const UnitInfo& u = units_[static_cast<std::size_t>(t.unit)];
  Location loc;
  loc.unit = t.unit;
  loc.unit_offset = t.unit_offset + element;
  // slice_elems > 0 here: the unit holds at least this element.
  const std::size_t rank = loc.unit_offset / u.slice_elems;
  loc.rank = static_cast<int>(rank);
  loc.shard_offset = u.shard_offset + (loc.unit_offset - rank * u.slice_elems);
  return loc;
}

std::vector<Layout::Piece> Layout::pieces(int rank, int unit) const {
  require(rank >= 0 && rank < options_.world_size, ErrorCode::invalid_argument,
          "pieces: rank " + std::to_string(rank) + " out of range (world size " +
              std::to_string(options_.world_size) + ")");
  require(unit >= 0 && static_cast<std::size_t>(unit) < units_.size(), ErrorCode::invalid_argument,
          "pieces: unit " + std::to_string(unit) + " out of range (layout has " + std::to_string(units_.size()) +
              " units)");
  std::vector<Piece> out;
  const UnitInfo& u = units_[static_cast<std::size_t>(unit)];
  if (u.slice_elems == 0 || u.block_count == 0) return out;
  const std::size_t lo = static_cast<std::size_t>(rank) * u.slice_elems;
  const std::size_t hi = lo + u.slice_elems;

  const BlockInfo& fb = blocks_[static_cast<std::size_t>(u.first_block)];
  const BlockInfo& lb = blocks_[static_cast<std::size_t>(u.first_block + u.block_count - 1)];
  const auto first = tensors_.begin() + fb.first_tensor;
  const auto last = tensors_.begin() + (lb.first_tensor + lb.tensor_count);
  // Tensor ends never decrease within a unit, so the first tensor reaching into this slice is
  // found by bisection; a unit of thousands of small tensors stays cheap for every rank.
  auto it = std::partition_point(first, last,
                                 [lo](const TensorInfo& t) { return t.unit_offset + t.numel <= lo; });
  for (; it != last && it->unit_offset < hi; ++it) {
    if (it->numel == 0) continue;
    const std::size_t begin = std::max(it->unit_offset, lo);
    const std::size_t end = std::min(it->unit_offset + it->numel, hi);
    if (begin >= end) continue;
    Piece p;
    p.tensor = static_cast<int>(it - tensors_.begin());
    p.tensor_offset = begin - it->unit_offset;
    p.count = end - begin;
    p.shard_offset = u.shard_offset + (begin - lo);
    out.push_back(p);
  }
  return out;
}

std::vector<Layout::Piece> Layout::pieces(int rank) const {
  require(rank >= 0 && rank < options_.world_size, ErrorCode::invalid_argument,
          "pieces: rank " + std::to_string(rank) + " out of range (world size " +
              std::to_string(options_.world_size) + ")");
  std::vector<Piece> out;
  for (std::size_t u = 0; u < units_.size(); ++u) {
    std::vector<Piece> part = pieces(rank, static_cast<int>(u));
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

}  // namespace shardopt
