#pragma once
// Fault and delay injection for the offload engine's tests (internal; nothing in the library sets
// these). Kept out of offload_engine.hpp so the engine's interface carries no test-only parts.
//
// The hooks are process-wide and apply to every offload engine. Delays: before each copy enqueued
// on its copy streams (as a host task on that stream) and after each cell's update. I/O faults
// count NVMe data reads and writes (and header writes) from the moment they are armed.
#include <atomic>

namespace shardopt::offload {

struct TestHooks {
  std::atomic<int> copy_delay_us{0};
  std::atomic<int> update_delay_us{0};
  std::atomic<long> fail_read_at{0};   // the Nth read from now fails (0: off)
  std::atomic<long> fail_write_at{0};  // the Nth write from now fails (0: off)
  std::atomic<bool> short_io{false};   // the armed fault comes back short instead of failing
  std::atomic<long> reads{0}, writes{0};
};
TestHooks& test_hooks() noexcept;
// Arms an I/O fault: the `nth` (1-based) read or write from now fails with EIO or, if `short_io`,
// transfers only half its bytes.
void arm_io_fault(bool write, long nth, bool short_io) noexcept;
void clear_test_hooks() noexcept;

}  // namespace shardopt::offload
