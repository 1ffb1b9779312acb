#pragma once
// Memory accounting: every buffer shardopt allocates is tagged by category and place.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace shardopt {

enum class Place : std::uint8_t { device, pinned_host, host, disk };
inline constexpr int kPlaceCount = 4;

enum class Category : std::uint8_t {
  parameters,
  gradients,
  master_weights,
  optimizer_state,
  communication,
  offload_staging,
  other
};
inline constexpr int kCategoryCount = 7;

std::string_view name_of(Place p) noexcept;
std::string_view name_of(Category c) noexcept;

struct MemoryReport {
  // True when the backend's Place::device is ordinary host memory (the CPU backend: its "device"
  // buffers are malloc'd RAM). place_name() and to_string() then say so instead of "device".
  bool device_is_host = false;
  // bytes[category][place]
  std::array<std::array<std::size_t, kPlaceCount>, kCategoryCount> current{};
  std::array<std::array<std::size_t, kPlaceCount>, kCategoryCount> peak{};
  // Peak of the total per place (not the sum of per-category peaks, which may never coexist).
  std::array<std::size_t, kPlaceCount> peak_total{};
  // Memory the engine uses but the trainer owns (Engine::borrow_gradients), per place; never part
  // of current, peak or peak_total.
  std::array<std::size_t, kPlaceCount> borrowed{};

  std::size_t current_total(Place p) const noexcept;
  std::size_t current_of(Category c, Place p) const noexcept {
    return current[static_cast<int>(c)][static_cast<int>(p)];
  }
  std::size_t peak_of(Category c, Place p) const noexcept {
    return peak[static_cast<int>(c)][static_cast<int>(p)];
  }
  // The place as this report's backend has it: name_of(p), except that Place::device of a backend
  // whose device memory is host memory is "host (CPU backend)".
  std::string_view place_name(Place p) const noexcept;
  // A fixed-width table: one row per category, one column per place (headed by place_name),
  // current and peak.
  std::string to_string() const;
};

// Thread-safe running totals. One tracker per rank (per backend instance).
class MemoryTracker {
 public:
  void on_allocate(Category c, Place p, std::size_t bytes) noexcept;
  void on_free(Category c, Place p, std::size_t bytes) noexcept;
  // Forget peaks: set every peak to the current value.
  void reset_peaks() noexcept;
  // Set by a backend whose Place::device is host memory (the CPU backend), before it allocates.
  void set_device_is_host(bool yes) noexcept;
  MemoryReport report() const;

 private:
  mutable std::mutex mutex_;
  MemoryReport r_;
};

}  // namespace shardopt
