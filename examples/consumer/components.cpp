// Calls into each component the consumer asked for, so the link proves the component's library
// (and, through it, CUDA or MPI) is there. Needs no GPU and no mpirun: it only asks.
#include <cstdio>

#include "shardopt/shardopt.hpp"
#if SHARDOPT_CONSUMER_CUDA
#include "shardopt/cuda.hpp"
#endif
#if SHARDOPT_CONSUMER_MPI
#include "shardopt/mpi.hpp"
#endif

int main() {
#if SHARDOPT_CONSUMER_CUDA
  std::printf("cuda component: %d device(s) visible\n", shardopt::cuda_device_count());
#endif
#if SHARDOPT_CONSUMER_MPI
  std::printf("mpi component: built with MPI: %s\n", shardopt::mpi_built() ? "yes" : "no");
  if (!shardopt::mpi_built()) return 1;
#endif
  return 0;
}
