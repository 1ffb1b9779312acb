#include "shardopt/memory.hpp"

#include <algorithm>
#include <cstdio>
#include <string>

namespace shardopt {

std::string_view name_of(Place p) noexcept {
  switch (p) {
    case Place::device: return "device";
    case Place::pinned_host: return "pinned_host";
    case Place::host: return "host";
    case Place::disk: return "disk";
  }
  return "unknown";
}

std::string_view name_of(Category c) noexcept {
  switch (c) {
    case Category::parameters: return "parameters";
    case Category::gradients: return "gradients";
    case Category::master_weights: return "master_weights";
    case Category::optimizer_state: return "optimizer_state";
    case Category::communication: return "communication";
    case Category::offload_staging: return "offload_staging";
    case Category::other: return "other";
  }
  return "unknown";
}

std::size_t MemoryReport::current_total(Place p) const noexcept {
  std::size_t total = 0;
  for (const auto& row : current) total += row[static_cast<int>(p)];
  return total;
}

namespace {

// Bytes in a short human form (binary units, 1 decimal) so the table stays fixed-width.
std::string human(std::size_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  else
    std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string pad_left(const std::string& s, std::size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}
std::string pad_right(std::string_view s, std::size_t width) {
  std::string out(s);
  if (out.size() < width) out.append(width - out.size(), ' ');
  return out;
}

}  // namespace

std::string_view MemoryReport::place_name(Place p) const noexcept {
  if (p == Place::device && device_is_host) return "host (CPU backend)";
  return name_of(p);
}

std::string MemoryReport::to_string() const {
  // Each place gets one column pair "current / peak"; totals row uses peak_total, which is the
  // peak of the sum (what actually had to fit), not the sum of the per-category peaks.
  constexpr std::size_t kNameWidth = 16;
  constexpr std::size_t kCellWidth = 23;  // "1023.9 GiB / 1023.9 GiB"
  std::array<std::string, kPlaceCount> header;
  std::array<std::size_t, kPlaceCount> width{};
  for (int p = 0; p < kPlaceCount; ++p) {
    header[p] = std::string(place_name(static_cast<Place>(p))) + " cur / peak";
    width[p] = std::max(kCellWidth, header[p].size());
  }
  auto cell = [&](int p, std::size_t cur, std::size_t pk) {
    return pad_left(human(cur) + " / " + human(pk), width[p]);
  };
  std::string out = pad_right("category", kNameWidth);
  for (int p = 0; p < kPlaceCount; ++p) out += "  " + pad_left(header[p], width[p]);
  out += '\n';
  for (int c = 0; c < kCategoryCount; ++c) {
    out += pad_right(name_of(static_cast<Category>(c)), kNameWidth);
    for (int p = 0; p < kPlaceCount; ++p) out += "  " + cell(p, current[c][p], peak[c][p]);
    out += '\n';
  }
  out += pad_right("total", kNameWidth);
  for (int p = 0; p < kPlaceCount; ++p) out += "  " + cell(p, current_total(static_cast<Place>(p)), peak_total[p]);
  out += '\n';
  return out;
}

void MemoryTracker::on_allocate(Category c, Place p, std::size_t bytes) noexcept {
  const int ci = static_cast<int>(c), pi = static_cast<int>(p);
  std::lock_guard<std::mutex> lock(mutex_);
  auto& cur = r_.current[ci][pi];
  cur += bytes;
  r_.peak[ci][pi] = std::max(r_.peak[ci][pi], cur);
  r_.peak_total[pi] = std::max(r_.peak_total[pi], r_.current_total(p));
}

void MemoryTracker::on_free(Category c, Place p, std::size_t bytes) noexcept {
  const int ci = static_cast<int>(c), pi = static_cast<int>(p);
  std::lock_guard<std::mutex> lock(mutex_);
  auto& cur = r_.current[ci][pi];
  // A free larger than what is tracked is a bookkeeping bug elsewhere; clamping keeps the report
  // meaningful instead of wrapping to an absurd size (this function cannot report errors).
  cur -= std::min(cur, bytes);
}

void MemoryTracker::reset_peaks() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  r_.peak = r_.current;
  for (int p = 0; p < kPlaceCount; ++p) r_.peak_total[p] = r_.current_total(static_cast<Place>(p));
}

void MemoryTracker::set_device_is_host(bool yes) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  r_.device_is_host = yes;
}

MemoryReport MemoryTracker::report() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return r_;
}

}  // namespace shardopt
