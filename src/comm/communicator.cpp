#include "shardopt/communicator.hpp"

#include "shardopt/error.hpp"

namespace shardopt {

std::string_view name_of(CollectiveKind k) noexcept {
  switch (k) {
    case CollectiveKind::reduce_scatter: return "reduce_scatter";
    case CollectiveKind::all_gather: return "all_gather";
    case CollectiveKind::all_reduce: return "all_reduce";
    case CollectiveKind::broadcast: return "broadcast";
    case CollectiveKind::barrier: return "barrier";
  }
  return "unknown";
}

std::uint64_t CommStats::total_bytes() const noexcept {
  std::uint64_t total = 0;
  for (std::uint64_t b : bytes) total += b;
  return total;
}

CommStats Communicator::stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return stats_;
}

void Communicator::reset_stats() {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_ = CommStats{};
}

void Communicator::reduce_scatter_pieces(const SendPiece*, std::size_t, void*, std::size_t, DType, ReduceOp, Stream&) {
  throw Error(ErrorCode::unsupported, "reduce_scatter_pieces: this communicator does not implement it");
}

void Communicator::count(CollectiveKind kind, std::uint64_t bytes) {
  const auto k = static_cast<std::size_t>(kind);
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.calls[k] += 1;
  stats_.bytes[k] += bytes;
}

}  // namespace shardopt
