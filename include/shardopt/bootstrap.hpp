#pragma once
// Bootstrap: how the processes of one training job find each other before any collective runs.
//
// A Bootstrap tells a process its rank, the world size and its rank on its machine (local rank,
// for picking a GPU), and moves small byte strings between processes: the NCCL unique id, and
// the configuration check that makes ranks started with different settings fail together.
// It is for setup, not for training traffic: calls are slow (a round trip through rank 0 for TCP)
// and carry kilobytes, not gigabytes.
//
// Implementations:
//   MPI         over MPI_COMM_WORLD (needs an MpiSession; see mpi.hpp);
//   TCP         rank 0 listens on master_addr:master_port, the others connect to it (retrying
//               until the timeout), and every later call goes through rank 0;
//   environment picks one of the above from what the launcher set (make_bootstrap_from_env).
//
// Every call is collective: all ranks make the same calls in the same order. No call hangs
// forever: TCP calls fail after the timeout, and a failure seen by rank 0 is sent to every
// connected rank, so each throws Error(communication) naming what went wrong. Not thread-safe:
// drive a Bootstrap from one thread.
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/config.hpp"
#include "shardopt/layout.hpp"

namespace shardopt {

class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  // "mpi", "tcp" — for messages and logs.
  virtual std::string_view kind() const noexcept = 0;
  virtual int rank() const noexcept = 0;
  virtual int world_size() const noexcept = 0;
  virtual int local_rank() const noexcept = 0;

  // Returns root's `data` on every rank (root included). `data` is ignored on other ranks. All
  // ranks must name the same root (TCP checks it).
  virtual std::vector<std::byte> broadcast_bytes(std::span<const std::byte> data, int root) = 0;
  // Every rank's `data`, indexed by rank, on every rank.
  virtual std::vector<std::vector<std::byte>> all_gather_bytes(std::span<const std::byte> data) = 0;
  // Returns when every rank has called it.
  void barrier() { (void)all_gather_bytes({}); }
};

using BootstrapTimeout = std::chrono::milliseconds;
inline constexpr BootstrapTimeout kDefaultBootstrapTimeout{std::chrono::seconds(300)};

// Over MPI_COMM_WORLD (a private duplicate of it). Collective. The local rank is the rank within
// MPI_COMM_TYPE_SHARED (the processes of one machine). Throws Error(unsupported) without MPI,
// Error(invalid_state) if MPI is not initialized. In the MPI component (link shardopt::mpi).
std::unique_ptr<Bootstrap> make_mpi_bootstrap();

struct TcpRendezvous {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";  // where rank 0 listens (a name or an address)
  int master_port = 29500;
  // Bounds the rendezvous and each later call. A rank that is missing when it expires makes
  // every rank that did arrive throw Error(communication) naming the missing ranks.
  BootstrapTimeout timeout = kDefaultBootstrapTimeout;
};
// Blocks until every rank has joined (or throws). Rank 0 checks that every rank announced the
// same world size and that ranks are distinct; a disagreement fails every rank.
std::unique_ptr<Bootstrap> make_tcp_bootstrap(const TcpRendezvous& rendezvous);

// What the launcher told this process, read from environment variables.
struct LaunchEnv {
  enum class Source { mpi, torchrun, slurm };
  Source source = Source::torchrun;
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;  // empty for mpi
  int master_port = 0;
};
std::string_view name_of(LaunchEnv::Source s) noexcept;

// Reads one environment variable; nullopt if unset. Tests pass their own.
using EnvLookup = std::function<std::optional<std::string>(const char* name)>;
EnvLookup process_env();

// Decides how this process was launched, in this order:
//   1. MPI is initialized in this process (an MpiSession exists)          -> mpi
//   2. RANK or WORLD_SIZE is set (torchrun and similar): needs RANK, WORLD_SIZE, LOCAL_RANK,
//      MASTER_ADDR, MASTER_PORT                                           -> torchrun
//   3. SLURM_PROCID is set (srun): needs SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address
//      is MASTER_ADDR or else the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, the
//      port MASTER_PORT or else 20000 + SLURM_JOB_ID % 10000 (the same on every task of a job)
//                                                                         -> slurm
// Throws Error(invalid_argument) naming the missing or malformed variables when a launcher's
// set is incomplete or inconsistent (rank outside the world, bad port), when nothing is found,
// and Error(invalid_state) when mpirun's variables are present but MPI is not initialized.
LaunchEnv detect_launch(const EnvLookup& env = process_env());
// True if mpirun (Open MPI, MPICH/PMI or PMIx) started this process, whether or not MPI is
// initialized yet: a program decides from it whether to create an MpiSession. Never throws.
bool started_by_mpirun(const EnvLookup& env = process_env()) noexcept;

// The Bootstrap for detect_launch(env): MPI, or TCP on master_addr:master_port with `timeout`.
// An MPI launch is recognised only in a program that links the MPI component (shardopt::mpi);
// without it, a process started by mpirun gets Error(invalid_state) saying so.
std::unique_ptr<Bootstrap> make_bootstrap_from_env(BootstrapTimeout timeout = kDefaultBootstrapTimeout,
                                                   const EnvLookup& env = process_env());

// First host name of a SLURM host list ("gpu[03-05,9],login1" -> "gpu03"); throws
// Error(invalid_argument) if it cannot be parsed.
std::string first_slurm_host(std::string_view nodelist);

// A 64-bit fingerprint of everything that must be equal on every rank: every Config field that
// decides the layout and the arithmetic (not nvme_dir, a local path that may differ per machine),
// the blocks (names, shapes, groups), the world size and the memory plan (plan_memory) derived
// from them. Throws like plan_memory for an invalid config.
std::uint64_t agreement_hash(const Config& config, const std::vector<BlockSpec>& blocks, int world_size);

// Collective. Every rank sends its agreement_hash (and a short description of its config) to
// every other; if any differ, or a rank's config is invalid, every rank throws
// Error(communication) naming the first rank that differs from rank 0 and both descriptions.
void check_agreement(Bootstrap& bootstrap, const Config& config, const std::vector<BlockSpec>& blocks);

// Collectives between processes without MPI, for host-memory backends (the CPU backend): what a
// job launched with torchrun-style variables, or srun without PMIx, trains with on the CPU.
// Collective over `bootstrap` (every rank calls it, once per communicator): rank 0 picks a free
// port on `master_addr` (the address the peers reach it at, as for the TCP bootstrap) and the
// communicator rendezvouses there on a TCP bootstrap of its own, so its traffic never mixes with
// the caller's later bootstrap calls. `bootstrap` is not used after the call returns.
//
// Every collective is an all-gather through rank 0 of what each rank contributes (its whole input
// for a reduction); every rank reduces in rank order with the in-process communicator's
// arithmetic, so the results are bit for bit those of in-process ranks and of the MPI
// communicator. Every rank receives every rank's input: the bytes grow with the square of the
// world size, so this is for small jobs and tests; use mpirun (make_mpi_communicator) for speed.
// Collectives run in the order they were issued. Each wait is bounded by `timeout`; a rank that
// fails, refuses a call or exits makes every rank's next collective fail with Error(communication)
// naming it. Throws Error(unsupported) for a backend whose memory the host cannot address (every
// rank fails together), Error(communication) if the rendezvous fails. Thread safety as for
// Communicator.
std::unique_ptr<Communicator> make_tcp_communicator(Bootstrap& bootstrap, const std::string& master_addr,
                                                    Backend& backend,
                                                    std::chrono::milliseconds timeout = kDefaultCollectiveTimeout);

// The CUDA device for this process: its local rank, checked against the number of visible
// devices (one process per GPU). Throws Error(unsupported) without CUDA or without a device,
// Error(invalid_argument) if the local rank has no device of its own. In the CUDA component.
int cuda_device_for(const Bootstrap& bootstrap);

// NCCL over any bootstrap: rank 0 creates the unique id, the bootstrap broadcasts it, every rank
// joins with make_nccl_communicator (cuda.hpp). If rank 0 cannot create the id (no NCCL in this
// build, an NCCL error), every rank throws that error instead of waiting for the id. In the CUDA
// component (link shardopt::cuda).
std::unique_ptr<Communicator> make_nccl_communicator(Bootstrap& bootstrap, Backend& cuda_backend);

}  // namespace shardopt
