// The MPI component's registrar (core/components.hpp): when shardopt::mpi is linked into a
// program, launcher detection in the core can see an initialized MPI and build the MPI bootstrap.
// The component's link interface names SHARDOPT_MPI_COMPONENT_ANCHOR (--undefined), which keeps
// this object, and so its static initializer, in the program.
#include <memory>

#include "bootstrap/internal.hpp"
#include "core/components.hpp"
#include "shardopt/bootstrap.hpp"

namespace {
const shardopt::detail::MpiComponent kMpi{&shardopt::mpi_initialized_here, &shardopt::make_mpi_bootstrap};
const bool kRegistered = (shardopt::detail::register_component(&kMpi), true);
}  // namespace

extern "C" {
// Referenced only by the linker (see above); the value is never read.
extern const int SHARDOPT_MPI_COMPONENT_ANCHOR;
const int SHARDOPT_MPI_COMPONENT_ANCHOR = kRegistered ? 1 : 0;
}
