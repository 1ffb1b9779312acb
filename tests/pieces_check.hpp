#pragma once
// Communicator::reduce_scatter_pieces against reduce_scatter of the same input packed into one
// buffer, on one rank of a communicator whose ranks all call this: every dtype, sum/avg/max, pieces
// with gaps before, between and after them (some across block boundaries), each in its own array.
// Returns "" when every result is bit for bit the packed reduce_scatter's, else what differs. Every
// rank issues every collective whatever it finds (a rank that stopped early would leave its peers
// waiting).
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/dtype.hpp"

namespace shardopt::testing {

inline std::string reduce_scatter_pieces_mismatch(Communicator& comm, Backend& be, Stream& s) {
  const int rank = comm.rank(), world = comm.size();
  std::string why;
  for (DType t : {DType::fp32, DType::bf16, DType::fp16})
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
      const std::size_t count = 1000, total = count * static_cast<std::size_t>(world), es = size_of(t);
      std::vector<unsigned char> packed(total * es, 0);
      std::vector<std::vector<unsigned char>> arrays;
      std::vector<SendPiece> pieces;
      for (std::size_t pos = 3, k = 0; pos < total; ++k) {
        const std::size_t len = std::min(total - pos, 1 + (k * 389) % 700);
        arrays.emplace_back(len * es);
        for (std::size_t i = 0; i < len; ++i) {
          const float v = static_cast<float>(static_cast<int>((pos + i) * 13 + static_cast<std::size_t>(rank) * 5) % 29 - 14) / 16.0f;
          store_from_float(arrays.back().data(), t, i, v);
          store_from_float(packed.data(), t, pos + i, v);
        }
        pieces.push_back({pos, len, arrays.back().data()});
        pos += len + k % 4;
      }
      std::vector<unsigned char> want(count * es), got(count * es, 0xee);
      comm.reduce_scatter(packed.data(), want.data(), count, t, op, s);
      comm.reduce_scatter_pieces(pieces.data(), pieces.size(), got.data(), count, t, op, s);
      be.synchronize(s);
      if (std::memcmp(want.data(), got.data(), want.size()) != 0 && why.empty())
        why = "rank " + std::to_string(rank) + ": reduce_scatter_pieces differs from the packed reduce_scatter (" +
              std::string(name_of(t)) + ", op " + std::to_string(static_cast<int>(op)) + ")";
    }
  return why;
}

}  // namespace shardopt::testing
