#pragma once
// shardopt's one error type.
//
// Every failure the library reports is a shardopt::Error: a category (ErrorCode), a message that
// names the thing that is wrong (the tensor, the file, the rank, the size asked), and the source
// location that raised it. Library code never exits, aborts or asserts; an operation that throws
// leaves the object it was called on as it was before the call unless its documentation says
// otherwise.
#include <cstdint>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>

namespace shardopt {

enum class ErrorCode : std::uint8_t {
  invalid_argument,  // a value the caller passed is out of range or inconsistent
  invalid_state,     // the call is not allowed now (e.g. register after initialize)
  out_of_memory,     // an allocation failed; the message names the size and what it was for
  io_error,          // a file or device operation failed; the message names the file
  communication,     // a collective failed or ranks disagree
  unsupported,       // a valid request this build or backend cannot serve
  internal           // a broken invariant inside shardopt: a bug, please report it
};

const char* to_string(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message,
        std::source_location where = std::source_location::current());

  ErrorCode code() const noexcept { return code_; }
  // The message without the "[code] file:line:" prefix that what() carries.
  const std::string& message() const noexcept { return message_; }
  const char* file() const noexcept { return file_; }
  std::uint32_t line() const noexcept { return line_; }

 private:
  ErrorCode code_;
  std::string message_;
  const char* file_;
  std::uint32_t line_;
};

// Throws Error(code, message) unless `condition` holds. A function, not a macro, so arguments
// are evaluated once; build the message only on the failing path where it is costly.
inline void require(bool condition, ErrorCode code, std::string_view message,
                    std::source_location where = std::source_location::current()) {
  if (!condition) throw Error(code, std::string(message), where);
}

}  // namespace shardopt
