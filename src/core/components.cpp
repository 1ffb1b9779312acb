// The component tables (core/components.hpp). Constant-initialized atomics: a registrar that runs
// during another translation unit's static initialization finds them already valid.
#include "core/components.hpp"

#include <atomic>

namespace shardopt::detail {
namespace {
std::atomic<const CudaComponent*> g_cuda{nullptr};
std::atomic<const MpiComponent*> g_mpi{nullptr};
}  // namespace

void register_component(const CudaComponent* table) noexcept { g_cuda.store(table, std::memory_order_release); }
void register_component(const MpiComponent* table) noexcept { g_mpi.store(table, std::memory_order_release); }
const CudaComponent* cuda_component() noexcept { return g_cuda.load(std::memory_order_acquire); }
const MpiComponent* mpi_component() noexcept { return g_mpi.load(std::memory_order_acquire); }

}  // namespace shardopt::detail
