#pragma once
// Runs the shardopt command line in this process (cli::run with string streams) for the CLI tests.
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace shardopt::testing {

struct CliResult {
  int rc = 0;
  std::string out, err;
};

inline CliResult run_cli(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  shardopt::cli::Io io{out, err, false, false};
  std::vector<const char*> argv{"shardopt"};
  for (const auto& a : args) argv.push_back(a.c_str());
  CliResult r;
  r.rc = shardopt::cli::run(static_cast<int>(argv.size()), argv.data(), io);
  r.out = out.str();
  r.err = err.str();
  return r;
}

// The last non-empty line of `out`, parsed (the --json result line).
inline nlohmann::json last_json_line(const std::string& out) {
  std::istringstream in(out);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return nlohmann::json::parse(last);
}

}  // namespace shardopt::testing
