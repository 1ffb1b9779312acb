// The bootstrap's CUDA half: a rank's device from its local rank, and the NCCL communicator whose
// unique id travels through the bootstrap. Part of the CUDA component (shardopt::cuda); in a build
// without CUDA it is compiled into the in-tree stand-in, where both say the build has no CUDA.
#include <cstring>
#include <string>
#include <vector>

#include "shardopt/bootstrap.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/error.hpp"

#if SHARDOPT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace shardopt {

int cuda_device_for(const Bootstrap& bootstrap) {
#if SHARDOPT_WITH_CUDA
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0)
    throw Error(ErrorCode::unsupported, "cuda_device_for: rank " + std::to_string(bootstrap.rank()) + " sees no CUDA device (" +
                                            (rc != cudaSuccess ? std::string(cudaGetErrorString(rc)) : std::string("count 0")) + ")");
  if (bootstrap.local_rank() >= count)
    throw Error(ErrorCode::invalid_argument, "cuda_device_for: rank " + std::to_string(bootstrap.rank()) + " has local rank " +
                                                 std::to_string(bootstrap.local_rank()) + " but only " + std::to_string(count) +
                                                 " CUDA devices are visible: start at most one process per GPU on each machine");
  return bootstrap.local_rank();
#else
  throw Error(ErrorCode::unsupported, "cuda_device_for: rank " + std::to_string(bootstrap.rank()) + ": shardopt was built without CUDA");
#endif
}

std::unique_ptr<Communicator> make_nccl_communicator(Bootstrap& bootstrap, Backend& cuda_backend) {
  // Rank 0 sends a status byte before the id, so a failure to create it reaches every rank as
  // an error instead of leaving them waiting for an id that never comes.
  std::vector<std::byte> message;
  if (bootstrap.rank() == 0) {
    try {
      const NcclUniqueId id = nccl_unique_id();
      message.push_back(std::byte{1});
      const auto* p = reinterpret_cast<const std::byte*>(id.bytes.data());
      message.insert(message.end(), p, p + id.bytes.size());
    } catch (const Error& e) {
      message.assign(1, std::byte{0});
      const std::string why = e.message();
      const auto* p = reinterpret_cast<const std::byte*>(why.data());
      message.insert(message.end(), p, p + why.size());
    }
  }
  const std::vector<std::byte> got = bootstrap.broadcast_bytes(message, 0);
  if (got.empty() || got[0] != std::byte{1}) {
    const std::string why = got.size() > 1 ? std::string(reinterpret_cast<const char*>(got.data() + 1), got.size() - 1) : "no reason given";
    throw Error(ErrorCode::unsupported, "NCCL bootstrap: rank 0 could not create the NCCL unique id: " + why + "; seen by rank " +
                                            std::to_string(bootstrap.rank()));
  }
  NcclUniqueId id;
  require(got.size() == 1 + id.bytes.size(), ErrorCode::communication,
          "NCCL bootstrap: rank " + std::to_string(bootstrap.rank()) + " received a unique id of " + std::to_string(got.size() - 1) + " bytes, expected " +
              std::to_string(id.bytes.size()));
  std::memcpy(id.bytes.data(), got.data() + 1, id.bytes.size());
  return make_nccl_communicator(id, bootstrap.rank(), bootstrap.world_size(), cuda_backend);
}

}  // namespace shardopt
