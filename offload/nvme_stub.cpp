// NvmeStore without liburing: offload_optimizer=nvme is refused at initialize().
#include "offload/nvme_store.hpp"

#include "shardopt/error.hpp"

namespace shardopt::offload {

void NvmeStore::check_directory(const std::string& dir, int, std::size_t) {
  throw Error(ErrorCode::unsupported, "offload_optimizer=nvme (nvme_dir '" + dir +
                                          "'): this build has no liburing; install liburing-dev and rebuild");
}
NvmeStore::NvmeStore(const std::string& dir, int, int, std::size_t, std::size_t, std::size_t) {
  throw Error(ErrorCode::unsupported, "offload_optimizer=nvme (nvme_dir '" + dir +
                                          "'): this build has no liburing; install liburing-dev and rebuild");
}
NvmeStore::~NvmeStore() = default;
void NvmeStore::submit_read(std::size_t, void*, int) {}
void NvmeStore::submit_write(std::size_t, const void*, int) {}
void NvmeStore::wait_read(int) {}
void NvmeStore::wait_write(int) {}
void NvmeStore::drain() noexcept {}
void NvmeStore::commit() {}
void NvmeStore::read_committed(std::size_t, void*) const {}
void NvmeStore::write_committed(std::size_t, const void*) {}

}  // namespace shardopt::offload
