// The CUDA entry points of a build without CUDA: they exist so a trainer links against any build
// of shardopt, and say at run time that this build cannot serve them.
#include "shardopt/cuda.hpp"
#include <string>

#include "shardopt/error.hpp"

namespace shardopt {

bool cuda_device_available() noexcept { return false; }
int cuda_device_count() noexcept { return 0; }

std::unique_ptr<Backend> make_cuda_backend(int device) {
  throw Error(ErrorCode::unsupported, "no CUDA device " + std::to_string(device) +
                                          ": shardopt was built without CUDA (configure with SHARDOPT_CUDA=ON)");
}

int cuda_device_of(const Backend&) {
  throw Error(ErrorCode::unsupported, "cuda_device_of: shardopt was built without CUDA, so no backend is a CUDA one");
}

void* cuda_stream_handle(Stream& stream) {
  throw Error(ErrorCode::unsupported, "cuda_stream_handle(stream '" + stream.name() +
                                          "'): shardopt was built without CUDA, so no stream is a CUDA one");
}

NcclUniqueId nccl_unique_id() {
  throw Error(ErrorCode::unsupported, "nccl_unique_id: shardopt was built without CUDA and NCCL");
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueId&, int rank, int, Backend&) {
  throw Error(ErrorCode::unsupported, "NCCL communicator for rank " + std::to_string(rank) +
                                          ": shardopt was built without CUDA and NCCL");
}

}  // namespace shardopt
