#pragma once
// The shardopt command line as a function, so tests can run it in-process.
#include <ostream>

namespace shardopt::cli {

struct Io {
  std::ostream& out;     // results (tables; with --json, only the JSON line)
  std::ostream& err;     // errors; with --json also the human-readable output
  bool out_tty = false;  // whether `out` / `err` is a terminal: live progress line or log lines
  bool err_tty = false;
};

// Parses the arguments and runs the subcommand. Returns the exit status (0 ok, non-zero with a
// message on io.err naming the flag at fault); never throws.
int run(int argc, const char* const* argv, Io& io);

}  // namespace shardopt::cli
