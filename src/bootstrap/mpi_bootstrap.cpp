// The MPI bootstrap: rank, world and local rank from MPI_COMM_WORLD, bytes moved with MPI.
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"

#if SHARDOPT_HAS_MPI
#include <mpi.h>
#endif

namespace shardopt {

#if !SHARDOPT_HAS_MPI

std::unique_ptr<Bootstrap> make_mpi_bootstrap() {
  throw Error(ErrorCode::unsupported, "make_mpi_bootstrap: shardopt was built without MPI (find_package(MPI) failed at configure time)");
}

bool mpi_initialized_here() noexcept { return false; }

#else

bool mpi_initialized_here() noexcept {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

namespace {

void check(int rc, const std::string& what, int rank) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(ErrorCode::communication, "MPI bootstrap, rank " + std::to_string(rank) + ": " + what + " failed: " + std::string(text, static_cast<std::size_t>(len)));
}

int as_count(std::size_t n, const char* what, int rank) {
  require(n <= static_cast<std::size_t>(std::numeric_limits<int>::max()), ErrorCode::invalid_argument,
          std::string("MPI bootstrap, rank ") + std::to_string(rank) + ": " + what + " of " + std::to_string(n) +
              " bytes exceeds what one MPI call carries (2 GiB); the bootstrap is for small setup data");
  return static_cast<int>(n);
}

class MpiBootstrap final : public Bootstrap {
 public:
  MpiBootstrap() {
    // A private duplicate, so the bootstrap's messages never meet the trainer's.
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup(MPI_COMM_WORLD)", -1);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)", rank_);
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_free(&node);
  }
  ~MpiBootstrap() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  std::string_view kind() const noexcept override { return "mpi"; }
  int rank() const noexcept override { return rank_; }
  int world_size() const noexcept override { return size_; }
  int local_rank() const noexcept override { return local_rank_; }

  std::vector<std::byte> broadcast_bytes(std::span<const std::byte> data, int root) override {
    require(root >= 0 && root < size_, ErrorCode::invalid_argument,
            "MPI bootstrap broadcast_bytes: root " + std::to_string(root) + " is outside [0, " + std::to_string(size_) + ")");
    std::uint64_t n = rank_ == root ? data.size() : 0;
    check(MPI_Bcast(&n, 1, MPI_UINT64_T, root, comm_), "MPI_Bcast (size)", rank_);
    std::vector<std::byte> out(static_cast<std::size_t>(n));
    if (rank_ == root && n) std::memcpy(out.data(), data.data(), out.size());
    check(MPI_Bcast(out.data(), as_count(out.size(), "broadcast", rank_), MPI_BYTE, root, comm_), "MPI_Bcast (data)", rank_);
    return out;
  }

  std::vector<std::vector<std::byte>> all_gather_bytes(std::span<const std::byte> data) override {
    const int mine = as_count(data.size(), "all_gather", rank_);
    std::vector<int> sizes(static_cast<std::size_t>(size_)), displs(static_cast<std::size_t>(size_));
    check(MPI_Allgather(&mine, 1, MPI_INT, sizes.data(), 1, MPI_INT, comm_), "MPI_Allgather (sizes)", rank_);
    std::size_t total = 0;
    for (int q = 0; q < size_; ++q) {
      displs[static_cast<std::size_t>(q)] = as_count(total, "all_gather total", rank_);
      total += static_cast<std::size_t>(sizes[static_cast<std::size_t>(q)]);
    }
    std::vector<std::byte> flat(total);
    check(MPI_Allgatherv(data.data(), mine, MPI_BYTE, flat.data(), sizes.data(), displs.data(), MPI_BYTE, comm_), "MPI_Allgatherv", rank_);
    std::vector<std::vector<std::byte>> out(static_cast<std::size_t>(size_));
    for (int q = 0; q < size_; ++q) {
      const auto* p = flat.data() + displs[static_cast<std::size_t>(q)];
      out[static_cast<std::size_t>(q)].assign(p, p + sizes[static_cast<std::size_t>(q)]);
    }
    return out;
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0;
};

}  // namespace

std::unique_ptr<Bootstrap> make_mpi_bootstrap() {
  require(mpi_initialized_here(), ErrorCode::invalid_state, "make_mpi_bootstrap: MPI is not initialized (create a shardopt::MpiSession first)");
  return std::make_unique<MpiBootstrap>();
}

#endif

}  // namespace shardopt
