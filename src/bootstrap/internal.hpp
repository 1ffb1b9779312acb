#pragma once
// Shared between the bootstrap implementations; not installed.
namespace shardopt {
// True if MPI is built in, initialized and not finalized in this process. Never throws.
bool mpi_initialized_here() noexcept;
}  // namespace shardopt
