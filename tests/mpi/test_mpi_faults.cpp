// One rank misbehaves under mpirun; every other rank must fail with a clear error within the
// communicator's timeout instead of hanging. Run by CTest as `mpirun -np 3 test_mpi_faults CASE`:
//
//   extra         rank 1 issues one collective more than its peers;
//   early-return  rank 2 stops issuing collectives (it caught an error and returned from its
//                 training loop, as a trainer's main would) while its peers go on;
//   stall         rank 0 sleeps past the timeout before its next collective.
//
// Each rank checks its own outcome (error or not, its text, how long it took); main() combines
// the verdicts over MPI_COMM_WORLD, which the aborted communicator (a duplicate) does not affect.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/error.hpp"
#include "shardopt/mpi.hpp"

using namespace shardopt;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::chrono::milliseconds kTimeout{1500};
// What "within the deadline" means here: the timeout plus generous slack for a loaded machine.
constexpr double kDeadlineSeconds = 1.5 + 20.0;

struct Outcome {
  bool threw = false;
  std::string message;
  double seconds = 0;
};

// One all_reduce on `comm`, waited for; the error, if any, and how long it took.
Outcome one_collective(Communicator& comm, Backend& be, Stream& st) {
  std::vector<float> x(16, 1.0f);
  const auto t0 = Clock::now();
  Outcome o;
  try {
    comm.all_reduce(x.data(), x.data(), x.size(), DType::fp32, ReduceOp::sum, st);
    be.synchronize(st);
  } catch (const Error& e) {
    o.threw = true;
    o.message = e.message();
  }
  o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return o;
}

int failures = 0;
void expect(bool ok, int rank, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "[rank %d] FAILED: %s\n", rank, what.c_str());
  }
}
void expect_error(const Outcome& o, int rank, const std::vector<std::string>& mentions) {
  expect(o.threw, rank, "expected a communication error, the collective completed");
  for (const auto& m : mentions)
    expect(o.message.find(m) != std::string::npos, rank, "error does not mention '" + m + "': " + o.message);
  expect(o.seconds < kDeadlineSeconds, rank, "took " + std::to_string(o.seconds) + " s, past the deadline");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "";
  int rc = 1;
  {
    MpiSession session(&argc, &argv);
    const int rank = session.rank();
    if (session.size() != 3) {
      std::fprintf(stderr, "run under mpirun -np 3\n");
      return 2;
    }
    auto be = make_cpu_backend();
    auto st = be->create_stream("faults.r" + std::to_string(rank));
    {
      auto comm = make_mpi_communicator(*be, kTimeout);
      for (int i = 0; i < 3; ++i) expect(!one_collective(*comm, *be, *st).threw, rank, "a healthy collective failed");
      if (which == "extra") {
        if (rank == 1) expect_error(one_collective(*comm, *be, *st), rank, {"timed out", "ranks 0, 2 did not arrive", "collective #3"});
      } else if (which == "early-return") {
        if (rank != 2) expect_error(one_collective(*comm, *be, *st), rank, {"timed out", "rank 2 did not arrive", "collective #3"});
      } else if (which == "stall") {
        if (rank == 0) std::this_thread::sleep_for(2 * kTimeout);
        const Outcome o = one_collective(*comm, *be, *st);
        // The peers time out naming rank 0; rank 0, arriving late, finds them gone.
        expect_error(o, rank, {"timed out", rank == 0 ? "ranks 1, 2 did not arrive" : "rank 0 did not arrive"});
      } else {
        std::fprintf(stderr, "unknown case '%s' (extra, early-return, stall)\n", which.c_str());
        ++failures;
      }
    }
    int worst = 0;
    MPI_Allreduce(&failures, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) std::printf("mpi fault case '%s': %s\n", which.c_str(), worst == 0 ? "every rank failed cleanly in time" : "FAILED");
    rc = worst == 0 ? 0 : 1;
  }
  return rc;
}
