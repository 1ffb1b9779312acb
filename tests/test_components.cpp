// The optional components register themselves when linked (src/core/components.hpp). This binary
// links shardopt::cuda and shardopt::mpi (as every in-tree test does) but calls nothing in them
// before the checks, so only the registrar kept by each one's --undefined anchor can fill the
// tables: without the anchor the linker drops the registrar's object from the static archive and
// launcher detection would never see MPI, nor the in-process communicator a CUDA device.
#include <gtest/gtest.h>

#include "core/components.hpp"
#include "shardopt/mpi.hpp"

namespace shardopt {
namespace {

TEST(Components, MpiRegistersItselfWhenLinkedAndBuilt) {
  const detail::MpiComponent* mpi = detail::mpi_component();
  if (!mpi_built()) {
    EXPECT_EQ(mpi, nullptr) << "a build without MPI links the stand-in, which registers nothing";
    return;
  }
  ASSERT_NE(mpi, nullptr);
  ASSERT_NE(mpi->initialized_here, nullptr);
  ASSERT_NE(mpi->make_bootstrap, nullptr);
  EXPECT_FALSE(mpi->initialized_here());  // nothing initialized MPI in this process
}

TEST(Components, CudaRegistersItselfWhenLinkedAndBuilt) {
  const detail::CudaComponent* cuda = detail::cuda_component();
#if SHARDOPT_WITH_CUDA
  ASSERT_NE(cuda, nullptr);
  EXPECT_NE(cuda->device_of, nullptr);
#else
  EXPECT_EQ(cuda, nullptr) << "a build without CUDA links the stand-in, which registers nothing";
#endif
}

}  // namespace
}  // namespace shardopt
