// `shardopt`: train the example model, estimate and plan memory, benchmark the update.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "cli.hpp"

int main(int argc, char** argv) {
  shardopt::cli::Io io{std::cout, std::cerr, isatty(STDOUT_FILENO) != 0, isatty(STDERR_FILENO) != 0};
  const int rc = shardopt::cli::run(argc, argv, io);
  // std::cout writes through stdio's stdout: what its buffer still holds is written here, and a
  // failure (a full device) must still change the exit status. A failure run() saw itself it has
  // reported already (and exited non-zero).
  std::cout.flush();
  errno = 0;
  if ((std::fflush(stdout) != 0 || std::ferror(stdout)) && rc == 0) {
    std::fprintf(stderr, "shardopt: error: writing the output (stdout) failed%s%s\n", errno ? ": " : "",
                 errno ? std::strerror(errno) : "");
    return 1;
  }
  return rc;
}
