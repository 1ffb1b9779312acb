#pragma once
// Token data and weight files for the GPT trainer.
//
// Token files use llm.c's format so data prepared with its scripts works unchanged: a header of
// 256 little-endian int32 (magic 20240520, version 1, token count, the rest zero), then the
// tokens as little-endian uint16.
//
// safetensors: the file format Hugging Face's `model.safetensors` uses (8-byte little-endian
// header length, a JSON header, then the tensors' bytes); read here tensor range by tensor range
// with pread, so each rank reads only the elements it owns.
//
// Errors: shardopt::Error(io_error or invalid_argument) naming the file and what is wrong.
// Thread safety: a TokenFile or SafetensorsFile may be read from several threads at once (pread
// only; no shared position).
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gpt {

constexpr std::int32_t kTokenMagic = 20240520;
constexpr std::int32_t kTokenVersion = 1;

// Writes `tokens` as a token file (atomically: a temporary name, then rename).
void write_token_file(const std::string& path, const std::vector<std::uint16_t>& tokens);
// Byte-level tokenization: every byte of `in` is one token (vocabulary 256). Returns the count.
std::size_t tokenize_bytes(const std::string& in, const std::string& out);

class TokenFile {
 public:
  // Opens and validates the header (magic, version, count against the file's size).
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  std::size_t size() const noexcept { return count_; }
  const std::string& path() const noexcept { return path_; }
  // Tokens [begin, begin + n) widened to int32. Error if the range is past the end.
  void read(std::size_t begin, std::size_t n, std::int32_t* out) const;
  // The largest token (one pass over the file), to check it against a vocabulary.
  std::uint16_t max_token() const;

 private:
  std::string path_;
  int fd_ = -1;
  std::size_t count_ = 0;
};

// Where the data of one micro-batch starts: the global batch of micro-step `micro` of optimizer
// step `step` is `ranks * batch` consecutive sequences of `seq` tokens (plus one for the last
// target); rank r reads the r-th contiguous slice of it. A function of the step alone, so a run
// resumed at step k reads what an uninterrupted run would have. Wraps around the file.
std::size_t batch_offset(std::size_t tokens_in_file, std::int64_t step, int micro, int micro_steps, int rank,
                         int ranks, int batch, int seq);

struct SafetensorsEntry {
  std::string dtype;                 // "F32", "BF16", "F16"
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // absolute byte offsets in the file
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, SafetensorsEntry>& tensors() const noexcept { return tensors_; }
  const std::string& path() const noexcept { return path_; }
  // The entry for `name`, also found without its "transformer." prefix (Hugging Face's GPT-2
  // files on the Hub name tensors without it); nullptr if neither exists.
  const SafetensorsEntry* find(const std::string& name) const;
  // Checks that `e` is F32, BF16 or F16 and holds exactly `numel` elements (Error naming `name`
  // and the file otherwise).
  void check(const SafetensorsEntry& e, const std::string& name, std::size_t numel) const;
  // Elements [begin, begin + count) of tensor `e`, converted to fp32.
  void read(const SafetensorsEntry& e, std::size_t begin, std::size_t count, float* out) const;

 private:
  std::string path_;
  int fd_ = -1;
  std::map<std::string, SafetensorsEntry> tensors_;
};

}  // namespace gpt
