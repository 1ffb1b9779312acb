#include "offload/test_hooks.hpp"

namespace shardopt::offload {

TestHooks& test_hooks() noexcept {
  static TestHooks h;
  return h;
}
void arm_io_fault(bool write, long nth, bool short_io) noexcept {
  TestHooks& h = test_hooks();
  h.short_io = short_io;
  h.reads = 0;
  h.writes = 0;
  (write ? h.fail_write_at : h.fail_read_at) = nth;
}
void clear_test_hooks() noexcept {
  TestHooks& h = test_hooks();
  h.copy_delay_us = 0;
  h.update_delay_us = 0;
  h.fail_read_at = 0;
  h.fail_write_at = 0;
  h.short_io = false;
}

}  // namespace shardopt::offload
