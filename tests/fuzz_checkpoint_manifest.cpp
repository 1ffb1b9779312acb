// libFuzzer target: the checkpoint manifest parser must turn every input into a Manifest or a
// shardopt::Error, never a crash, hang or other exception. Built and run by scripts/fuzz.sh (clang >= 16).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "checkpoint/format.hpp"
#include "shardopt/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const shardopt::ckpt::Manifest m =
        shardopt::ckpt::parse_manifest(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    // Whatever parses must survive a round trip.
    (void)shardopt::ckpt::parse_manifest(shardopt::ckpt::dump_manifest(m), "fuzz (round trip)");
  } catch (const shardopt::Error&) {
    // rejected cleanly
  }
  return 0;
}
