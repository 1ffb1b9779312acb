#pragma once
// The optional components (not installed). The core library (shardopt::shardopt) links neither
// CUDA, NCCL nor MPI, so a CPU-only program never needs them; the CUDA backend with the NCCL
// communicator (shardopt::cuda) and the MPI communicator with the MPI bootstrap (shardopt::mpi) are
// separate libraries. Where core code must reach into one of them (the in-process communicator
// asking a CUDA backend for its device, launcher detection asking whether MPI is initialized), it
// goes through the table below, which the component fills when it is linked into the program: its
// registrar runs at static initialization, and its link interface names the registrar's anchor
// symbol (SHARDOPT_*_COMPONENT_ANCHOR) so that the linker keeps that object even out of a static
// archive the program references nothing else from. An empty table means "not linked in".
#include <memory>

namespace shardopt {
class Backend;
class Bootstrap;
}  // namespace shardopt

namespace shardopt::detail {

struct CudaComponent {
  int (*device_of)(const Backend& backend);  // the CUDA device of a CUDA backend
};

struct MpiComponent {
  bool (*initialized_here)() noexcept;  // MPI initialized and not finalized in this process
  std::unique_ptr<Bootstrap> (*make_bootstrap)();
};

// Set once by the component's registrar; read by the core. Never null after registration.
void register_component(const CudaComponent* table) noexcept;
void register_component(const MpiComponent* table) noexcept;
const CudaComponent* cuda_component() noexcept;  // nullptr when shardopt::cuda is not linked in
const MpiComponent* mpi_component() noexcept;    // nullptr when shardopt::mpi is not linked in

}  // namespace shardopt::detail
