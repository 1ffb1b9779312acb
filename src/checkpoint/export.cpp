// Reading a checkpoint without an engine: inspect, verify, and export to safetensors.
#include <climits>
#include <cstdlib>
#include <unistd.h>

#include <algorithm>
#include <map>

#include <nlohmann/json.hpp>

#include "checkpoint/field_codec.hpp"
#include "checkpoint/format.hpp"
#include "shardopt/error.hpp"

namespace shardopt {

namespace {

using ckpt::join;

// Streams the chunks of one (tensor, field) in element order, each verified, to `sink(values, n)`.
// Memory: one chunk. Files are opened once per call site through `files`.
template <class Sink>
void stream_field(const ckpt::Manifest& m, const std::string& dir, const ckpt::Tensor& t, int field,
                  std::map<int, ckpt::Fd>& files, std::vector<float>& buf, Sink&& sink) {
  std::vector<unsigned char> bytes;
  for (const ckpt::Range& r : t.fields[field]) {
    auto it = files.find(r.file);
    if (it == files.end()) {
      ckpt::Fd f = ckpt::open_read(join(dir, m.files[r.file].name), "shard file (holds tensor '" + t.info.name + "')");
      const std::uint64_t size = ckpt::file_size(f);
      if (size != m.files[r.file].bytes)
        throw Error(ErrorCode::io_error, (size < m.files[r.file].bytes ? "truncated file '" : "wrong size of file '") +
                                             f.path() + "': " + std::to_string(size) + " bytes, the manifest says " +
                                             std::to_string(m.files[r.file].bytes) + " (tensor '" + t.info.name + "')");
      it = files.emplace(r.file, std::move(f)).first;
    }
    const ckpt::FieldCodec codec = ckpt::codec_of(m, field);
    std::uint64_t at = r.offset;
    for (std::size_t c = 0; c * m.chunk < r.count; ++c) {
      const std::size_t cn = std::min(m.chunk, r.count - c * m.chunk);
      buf.resize(cn);
      bytes.resize(ckpt::chunk_bytes(codec, r.begin + c * m.chunk, cn));
      const std::string what = "tensor '" + t.info.name + "' field '" + m.fields[field] + "' elements [" +
                               std::to_string(r.begin + c * m.chunk) + ", " + std::to_string(r.begin + c * m.chunk + cn) + ")";
      ckpt::pread_exact(it->second, bytes.data(), bytes.size(), at, what);
      at += bytes.size();
      if (ckpt::xxh64(bytes.data(), bytes.size()) != r.hashes[c])
        throw Error(ErrorCode::io_error, "checksum mismatch in '" + it->second.path() + "' for " + what);
      ckpt::unpack(codec, r.begin + c * m.chunk, cn, bytes.data(), buf.data());
      sink(buf.data(), cn);
    }
  }
}

// The directory a path's file lives in, resolved (symbolic links, "..", relative paths); empty if
// it does not exist (then nothing can be written there anyway, and creating the file says so).
std::string resolved_parent(const std::string& file) {
  const std::size_t slash = file.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : file.substr(0, slash));
  char buf[PATH_MAX];
  return ::realpath(parent.c_str(), buf) ? std::string(buf) : std::string();
}

// Refuses an output file inside the checkpoint being read: a name like "g1.r0.bin" or
// "manifest.json" there would replace the data the export reads, and any other file would still
// be written into a directory the library owns.
void require_outside(const std::string& checkpoint_dir, const std::string& out_file) {
  char buf[PATH_MAX];
  if (!::realpath(checkpoint_dir.c_str(), buf)) return;  // read_manifest reports a missing directory
  const std::string ckpt_dir = buf;
  std::string where = resolved_parent(out_file);
  // An existing output that is a link into the checkpoint would be replaced through its target's
  // directory only if followed; rename() replaces the link itself, but refuse it all the same.
  if (::realpath(out_file.c_str(), buf)) {
    const std::string target = resolved_parent(buf);
    if (!target.empty() && (target == ckpt_dir || target.rfind(ckpt_dir + "/", 0) == 0)) where = target;
  }
  if (!where.empty() && (where == ckpt_dir || where.rfind(ckpt_dir + "/", 0) == 0))
    throw Error(ErrorCode::invalid_argument, "export: the output '" + out_file + "' is inside the checkpoint directory '" +
                                                 checkpoint_dir + "' it reads; write it somewhere else");
}

const char* safetensors_dtype(DType t) {
  return t == DType::fp32 ? "F32" : t == DType::fp16 ? "F16" : "BF16";
}

}  // namespace

CheckpointInfo inspect_checkpoint(const std::string& dir) { return ckpt::info_of(ckpt::read_manifest(dir), dir); }

void verify_checkpoint(const std::string& dir) {
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  std::map<int, ckpt::Fd> files;
  std::vector<float> buf;
  for (const ckpt::Tensor& t : m.tensors)
    for (int f = 0; f < static_cast<int>(m.fields.size()); ++f)
      stream_field(m, dir, t, f, files, buf, [](const float*, std::size_t) {});
}

void export_safetensors(const std::string& checkpoint_dir, const std::string& out_file, DType dtype) {
  require(!out_file.empty(), ErrorCode::invalid_argument, "export_safetensors: empty output file name");
  require_outside(checkpoint_dir, out_file);
  const ckpt::Manifest m = ckpt::read_manifest(checkpoint_dir);

  // Header: tensors in manifest order, back to back (safetensors wants the offsets to tile the
  // data section); the JSON is padded with spaces so the data starts 8-byte aligned.
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  h["__metadata__"] = {{"format", "pt"},
                       {"producer", "shardopt"},
                       {"shardopt_library_version", m.library_version},
                       {"shardopt_step", std::to_string(m.step)},
                       {"shardopt_optimizer", std::string(name_of(m.optimizer))}};
  std::uint64_t offset = 0;
  const std::size_t es = size_of(dtype);
  for (const ckpt::Tensor& t : m.tensors) {
    require(!h.contains(t.info.name), ErrorCode::invalid_argument,
            "export_safetensors: tensor name '" + t.info.name + "' is reserved in safetensors");
    const std::uint64_t bytes = static_cast<std::uint64_t>(t.info.numel) * es;
    h[t.info.name] = {{"dtype", safetensors_dtype(dtype)}, {"shape", t.info.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((static_cast<std::uint64_t>(header.size()) >> (8 * i)) & 0xff);

  const std::string tmp = out_file + ".tmp";
  try {
    ckpt::Fd out = ckpt::create_write(tmp);
    ckpt::write_all(out, len, 8);
    ckpt::write_all(out, header.data(), header.size());
    std::map<int, ckpt::Fd> files;
    std::vector<float> buf;
    std::vector<unsigned char> conv;
    for (const ckpt::Tensor& t : m.tensors)
      stream_field(m, checkpoint_dir, t, 0, files, buf, [&](const float* v, std::size_t n) {
        conv.resize(n * es);
        // Little-endian output, as safetensors specifies (the host is little-endian: x86/arm64).
        for (std::size_t i = 0; i < n; ++i) store_from_float(conv.data(), dtype, i, v[i]);
        ckpt::write_all(out, conv.data(), conv.size());
      });
    ckpt::fsync_fd(out);
    out.close();
    ckpt::rename_file(tmp, out_file);
    const std::size_t slash = out_file.find_last_of('/');
    ckpt::fsync_dir(slash == std::string::npos ? "." : (slash == 0 ? "/" : out_file.substr(0, slash)));
  } catch (...) {
    (void)::unlink(tmp.c_str());  // best effort: the error below is what matters
    throw;
  }
}

}  // namespace shardopt
