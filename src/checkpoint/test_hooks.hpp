#pragma once
// The checkpoint format's test hook (internal; nothing in the library calls it), kept out of
// format.hpp so the format's interface carries no test-only parts.
#include <cstddef>

namespace shardopt::ckpt {

// A small checksum chunk (chunk_elems(), format.hpp) makes tiny test models span several chunks;
// 0 restores the default. Affects checkpoints saved afterwards in this process.
void set_chunk_elems_for_testing(std::size_t elems) noexcept;

}  // namespace shardopt::ckpt
