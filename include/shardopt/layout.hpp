#pragma once
// Layout: where every element lives. Pure arithmetic, no memory.
//
// Tensors are registered in blocks (what a trainer computes at a time, e.g. a layer). Consecutive
// blocks are grouped into units of at least `bucket_elems` elements (a block is never split). A unit
// is one flat buffer: its tensors one after another, each starting at a multiple of `alignment`,
// then zero padding up to a multiple of world_size*alignment, so each rank owns an equal, aligned,
// contiguous slice of it. A rank's shard is the concatenation of its slices of all units, in unit
// order. Padding is never part of a tensor.
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace shardopt {

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;  // empty shape: a scalar (1 element); any 0 extent: 0 elements
  int group = 0;                    // parameter group (hyperparameters)
};

struct BlockSpec {
  std::string name;
  std::vector<TensorSpec> tensors;
};

struct LayoutOptions {
  int world_size = 1;
  std::size_t alignment = 64;     // elements
  std::size_t bucket_elems = 1;  // minimum elements per unit (a unit ends at the first block boundary past it)
};

std::size_t numel(const std::vector<std::int64_t>& shape);  // throws on a negative extent

class Layout {
 public:
  struct TensorInfo {
    std::string name;
    std::vector<std::int64_t> shape;
    int group = 0;
    std::size_t numel = 0;
    int block = 0;
    int unit = 0;
    std::size_t unit_offset = 0;  // first element within the unit buffer
    int index = 0;                // position in tensors(): registration order over all blocks
  };
  struct BlockInfo {
    std::string name;
    int unit = 0;
    int first_tensor = 0, tensor_count = 0;
  };
  struct UnitInfo {
    int first_block = 0, block_count = 0;
    std::size_t data_elems = 0;    // end of the last tensor
    std::size_t padded_elems = 0;  // multiple of world_size*alignment, >= data_elems
    std::size_t slice_elems = 0;   // padded_elems / world_size
    std::size_t shard_offset = 0;  // where this unit's slice starts within every rank's shard
  };
  // A run of a rank's shard that holds consecutive elements of one tensor.
  struct Piece {
    int tensor = 0;
    std::size_t tensor_offset = 0;  // first element within the tensor
    std::size_t count = 0;
    std::size_t shard_offset = 0;   // first element within the rank's shard
  };
  struct Location {
    int unit = 0;
    std::size_t unit_offset = 0;
    int rank = 0;
    std::size_t shard_offset = 0;
  };

  // Throws Error(invalid_argument) for world_size < 1, alignment 0, bucket_elems 0, a negative
  // extent, an empty or duplicate tensor name, or a duplicate block name.
  static Layout build(const std::vector<BlockSpec>& blocks, const LayoutOptions& options);

  const LayoutOptions& options() const noexcept { return options_; }
  int world_size() const noexcept { return options_.world_size; }
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  const std::vector<BlockInfo>& blocks() const noexcept { return blocks_; }
  const std::vector<UnitInfo>& units() const noexcept { return units_; }
  std::size_t shard_elems() const noexcept { return shard_elems_; }  // same for every rank
  std::size_t total_numel() const noexcept { return total_numel_; }  // data elements, no padding
  std::size_t max_unit_elems() const noexcept;                       // largest padded unit

  int find_tensor(const std::string& name) const noexcept;  // -1 if unknown
  int find_block(const std::string& name) const noexcept;   // -1 if unknown

  // Where element `element` of tensor `tensor` lives. Throws on out-of-range arguments.
  Location locate(int tensor, std::size_t element) const;
  // Pieces of `rank`'s shard in shard order; shard elements not covered by a piece are padding.
  std::vector<Piece> pieces(int rank) const;
  // Pieces of one unit slice of `rank` (offsets still relative to the whole shard).
  std::vector<Piece> pieces(int rank, int unit) const;

 private:
  LayoutOptions options_;
  std::vector<TensorInfo> tensors_;
  std::vector<BlockInfo> blocks_;
  std::vector<UnitInfo> units_;
  std::size_t shard_elems_ = 0;
  std::size_t total_numel_ = 0;
  // Name -> index, built once by build() so find_tensor/find_block are O(1).
  std::unordered_map<std::string, int> tensor_index_;
  std::unordered_map<std::string, int> block_index_;
};

}  // namespace shardopt
