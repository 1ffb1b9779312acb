#include "shardopt/backend.hpp"

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "shardopt/error.hpp"

namespace shardopt {

std::string_view name_of(BackendKind k) noexcept {
  switch (k) {
    case BackendKind::cpu: return "cpu";
    case BackendKind::cuda: return "cuda";
  }
  return "unknown";
}

Buffer::Buffer(Buffer&& o) noexcept
    : owner_(std::exchange(o.owner_, nullptr)),
      data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      place_(o.place_),
      category_(o.category_) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    place_ = o.place_;
    category_ = o.category_;
  }
  return *this;
}

Buffer::~Buffer() { reset(); }

void Buffer::reset() noexcept {
  if (data_ != nullptr && owner_ != nullptr) owner_->release(*this);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

namespace {
std::string size_text(std::size_t bytes) {
  std::string s = std::to_string(bytes) + " bytes";
  if (bytes >= 1024) {
    // The exact count is for tools, the rounded figure for people reading the message.
    static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = static_cast<double>(bytes) / 1024.0;
    int u = 0;
    while (v >= 1024.0 && u < 5) {
      v /= 1024.0;
      ++u;
    }
    char buf[48];
    std::snprintf(buf, sizeof buf, " (%.1f %s)", v, kUnits[u]);
    s += buf;
  }
  return s;
}
}  // namespace

Buffer Backend::allocate(std::size_t bytes, Place place, Category category, std::string_view what) {
  if (place == Place::disk)
    throw Error(ErrorCode::invalid_argument,
                "cannot allocate '" + std::string(what) + "' (" + size_text(bytes) +
                    ") at place 'disk': disk storage is managed by the offload engine, not a backend");
  if (bytes == 0) return Buffer();
  void* p = raw_allocate(bytes, place);
  if (p == nullptr)
    throw Error(ErrorCode::out_of_memory,
                "cannot allocate '" + std::string(what) + "': " + size_text(bytes) + " at place '" +
                    std::string(name_of(place)) + "' on the " + std::string(name_of(kind())) + " backend");
  if (reinterpret_cast<std::uintptr_t>(p) % 64 != 0) {
    raw_free(p, place);
    throw Error(ErrorCode::internal, "allocation of '" + std::string(what) + "' at place '" +
                                         std::string(name_of(place)) + "' is not 64-byte aligned");
  }
  // Tracked only once the memory exists, so a failed allocation leaves the report unchanged.
  memory_.on_allocate(category, place, bytes);
  return Buffer(this, p, bytes, place, category);
}

void Backend::release(Buffer& b) noexcept {
  raw_free(b.data_, b.place_);
  memory_.on_free(b.category_, b.place_, b.bytes_);
}

}  // namespace shardopt
