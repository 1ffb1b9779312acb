// `shardopt`: train the example model, estimate and plan memory, benchmark the update.
#include <unistd.h>

#include <iostream>

#include "cli.hpp"

int main(int argc, char** argv) {
  shardopt::cli::Io io{std::cout, std::cerr, isatty(STDOUT_FILENO) != 0, isatty(STDERR_FILENO) != 0};
  const int rc = shardopt::cli::run(argc, argv, io);
  std::cout.flush();
  return rc;
}
