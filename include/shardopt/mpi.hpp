#pragma once
// MPI: the session helper and the MPI communicator (collectives over processes, host memory).
//
// This header never includes <mpi.h>, so a trainer that does not use MPI itself needs no MPI
// headers. The functions here (and make_mpi_bootstrap in bootstrap.hpp) are the MPI component:
// link shardopt::mpi (find_package(shardopt COMPONENTS mpi)) to use them, and to let
// make_bootstrap_from_env see an MPI launch; the core library, shardopt::shardopt, links no MPI.
// In a build without MPI (find_package(MPI) failed when shardopt was configured) they throw
// Error(unsupported), mpi_built() is false, and no mpi component is installed.
//
// Threads. The communicator runs its collectives on the stream threads of the backend while the
// caller's thread may use MPI too (the MPI bootstrap, the trainer's own calls), so it needs
// MPI_THREAD_MULTIPLE. MpiSession asks for it; make_mpi_communicator checks what MPI provided.
#include <chrono>
#include <memory>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"

namespace shardopt {

// True if this build of shardopt has the MPI communicator and the MPI bootstrap. Never throws.
bool mpi_built() noexcept;

// RAII initialization of MPI: the constructor calls MPI_Init_thread(MPI_THREAD_MULTIPLE) unless
// MPI is already initialized (then it only records the thread level already provided); the
// destructor calls MPI_Finalize only if this session initialized MPI. Destroy every MPI
// communicator and MPI bootstrap before the session. argc/argv may be null.
// Throws Error(unsupported) without MPI, Error(invalid_state) if MPI was already finalized,
// Error(communication) if MPI_Init_thread fails.
class MpiSession {
 public:
  MpiSession();
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const noexcept { return rank_; }  // in MPI_COMM_WORLD
  int size() const noexcept { return size_; }
  // The thread level MPI provided (MPI_THREAD_SINGLE..MULTIPLE as 0..3).
  int thread_level() const noexcept { return thread_level_; }
  bool thread_multiple() const noexcept { return thread_level_ == 3; }

 private:
  bool owns_ = false;
  int rank_ = 0;
  int size_ = 1;
  int thread_level_ = 0;
};

// A communicator over all processes of MPI_COMM_WORLD (it works on a private duplicate, so its
// messages never mix with the trainer's). Collective: every process calls it, in the same order
// as its other MPI collectives. `backend` must be the CPU backend (host memory; use the NCCL
// communicator for GPU memory) and outlive the communicator; each collective runs as a
// host_task on the stream it is given.
//
// Results are bit-identical to the in-process communicator for the same inputs: every rank
// receives the raw blocks it reduces (point-to-point, no MPI reduction operator, whose order MPI
// leaves open) and reduces them in rank order 0..N-1 in fp32, rounding once, exactly as the
// in-process ranks do. 16-bit inputs therefore accumulate in fp32; `avg` divides the fp32 sum.
//
// Every collective first exchanges a small descriptor (kind, count, dtype, op, root, sequence
// number) with every peer. Ranks that disagree, a rank whose arguments were rejected, or a rank
// whose collective was dropped because its stream had failed, make the collective fail with
// Error(communication) on every rank (reported by the stream's synchronize) instead of hanging;
// after that the communicator is aborted and every later collective fails the same way.
// Messages are matched by the collective's sequence number, so collectives issued on different
// streams may run concurrently without MPI's call-order matching mixing them up.
//
// Bounded waits: a rank that waits longer than `timeout` for its peers' descriptors (a peer
// stalled, returned from main, or issued one collective fewer) aborts the communicator and
// fails with Error(communication) naming the collective and the ranks that did not arrive; its
// peers, if they later reach that collective, fail on the aborted descriptor or their own
// timeout. Once every rank has arrived the data moves without a deadline (a peer that dies
// then is the launcher's to handle: mpirun ends the job). MPI itself cannot be interrupted, so a
// trainer that catches such an error should leave through MPI_Abort (or exit non-zero under
// mpirun) rather than call further collectives.
//
// Throws Error(unsupported) without MPI, for a non-CPU backend, or if MPI does not provide
// MPI_THREAD_MULTIPLE; Error(invalid_state) if MPI is not initialized (create an MpiSession);
// Error(invalid_argument) for a timeout that is not positive.
std::unique_ptr<Communicator> make_mpi_communicator(
    Backend& backend, std::chrono::milliseconds timeout = kDefaultCollectiveTimeout);

}  // namespace shardopt
