// One rank misbehaves under mpirun; every other rank must fail with a clear error within the
// communicator's timeout instead of hanging. Run by CTest as `mpirun -np 3 test_mpi_faults CASE`:
//
//   extra         rank 1 issues one collective more than its peers;
//   early-return  rank 2 stops issuing collectives (it caught an error and returned from its
//                 training loop, as a trainer's main would) while its peers go on;
//   stall         rank 0 sleeps past the timeout before its next collective.
//   init-throw    rank 2's initializer throws inside Engine::initialize(): the others must fail
//                 within the timeout instead of waiting in initialize's collectives.
//   kill DIR      engines train and save a checkpoint into DIR, then rank 1 SIGKILLs itself in
//                 the middle of a step. The job must end (mpirun takes it down; this binary
//                 exits non-zero) within the deadline, and the checkpoint in DIR stays intact:
//                 CTest runs it through a script that checks both.
//
// Each rank checks its own outcome (error or not, its text, how long it took); main() combines
// the verdicts over MPI_COMM_WORLD, which the aborted communicator (a duplicate) does not affect.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "shardopt/backend.hpp"
#include "shardopt/engine.hpp"
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
      } else if (which == "init-throw" || which == "kill") {
        Config cfg;
        cfg.stage = 2;
        std::vector<BlockSpec> model;
        for (int b = 0; b < 3; ++b) model.push_back({"b" + std::to_string(b), {{"w" + std::to_string(b), {64, 33}}}});
        const auto t0 = Clock::now();
        Outcome o;
        try {
          Engine e(cfg, *be, *comm);
          for (const auto& b : model) e.register_block(b);
          const InitFn base = seeded_init(3);
          e.initialize([&](const Layout::TensorInfo& t, std::size_t begin, std::size_t n, float* out) {
            if (which == "init-throw" && rank == 2) throw Error(ErrorCode::io_error, "rank 2 could not read its initial weights");
            base(t, begin, n, out);
          });
          for (int step = 1; step <= 6; ++step) {
            if (which == "kill" && step == 3) e.save(argc > 2 ? argv[2] : "faults-ckpt");
            for (int b = 2; b >= 0; --b) {
              BlockView g = e.gradients(b);
              for (auto& t : g.tensors) std::fill(t.as<float>(), t.as<float>() + t.numel, 0.25f * static_cast<float>(step));
              e.grads_ready(b);
              if (which == "kill" && step == 5 && rank == 1 && b == 1) ::raise(SIGKILL);  // mid-step, mid-backward
            }
            e.step();
          }
        } catch (const Error& e) {
          o.threw = true;
          o.message = e.message();
        }
        o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        if (which == "init-throw") {
          if (rank == 2) expect(o.threw && o.message.find("initial weights") != std::string::npos, rank, "own error: " + o.message);
          else expect_error(o, rank, {"rank 2"});
        } else {
          // Reached only if mpirun did not take the job down: the survivors must have failed.
          expect_error(o, rank, {"did not arrive"});
          ++failures;  // a killed job must end non-zero
        }
      } else {
        std::fprintf(stderr, "unknown case '%s' (extra, early-return, stall, init-throw, kill)\n", which.c_str());
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
