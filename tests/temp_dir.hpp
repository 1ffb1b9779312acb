#pragma once
// A fresh directory for one test, removed with everything in it when the object goes: mkdtemp
// under `parent` (the system's temporary directory by default, /dev/shm where a test needs a
// filesystem without O_DIRECT), so parallel test processes never share one.
#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace shardopt::test {

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::filesystem::path& parent = std::filesystem::temp_directory_path()) {
    std::string tmpl = (parent / "shardopt-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed under " + parent.string());
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;  // a destructor must not throw; a leftover directory is only litter
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // The directory, or `sub` inside it.
  std::string str(const std::string& sub = "") const { return sub.empty() ? path.string() : (path / sub).string(); }
};

}  // namespace shardopt::test
