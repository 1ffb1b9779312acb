#include "shardopt/error.hpp"

namespace shardopt {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::invalid_state: return "invalid_state";
    case ErrorCode::out_of_memory: return "out_of_memory";
    case ErrorCode::io_error: return "io_error";
    case ErrorCode::communication: return "communication";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::internal: return "internal";
  }
  return "unknown";
}

namespace {
const char* base_name(const char* path) noexcept {
  const char* last = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/' || *p == '\\') last = p + 1;
  return last;
}
}  // namespace

Error::Error(ErrorCode code, const std::string& message, std::source_location where)
    : std::runtime_error("shardopt " + std::string(to_string(code)) + " (" + base_name(where.file_name()) +
                         ":" + std::to_string(where.line()) + "): " + message),
      code_(code),
      message_(message),
      file_(where.file_name()),
      line_(where.line()) {}

}  // namespace shardopt
