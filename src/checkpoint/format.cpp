// Checkpoint format: manifest JSON, checksums and checked file I/O (see format.hpp).
#include "checkpoint/format.hpp"
#include "checkpoint/field_codec.hpp"
#include "checkpoint/test_hooks.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <limits>
#include <type_traits>

// Header-only xxHash: nothing to link, so the installed package gains no dependency.
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <nlohmann/json.hpp>

#include "core/config_fields.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace shardopt::ckpt {

namespace {
std::atomic<std::size_t> g_chunk{std::size_t(1) << 20};  // 4 MiB of fp32 per checksum

using io::sys_error;

using Json = nlohmann::json;

// The manifest's checksum: xxh64 of its compact JSON with sorted keys, without the checksum
// member itself. Parsing and dumping is stable (shortest round-trip numbers), so the writer and
// every reader compute it over the same bytes whatever whitespace or key order the file has.
std::uint64_t manifest_checksum(Json j) {
  j.erase(kManifestChecksumKey);
  const std::string canonical = j.dump();
  return XXH64(canonical.data(), canonical.size(), 0);
}

[[noreturn]] void bad(const std::string& where, const std::string& msg) {
  throw Error(ErrorCode::invalid_argument, where + ": " + msg);
}

// Typed field access that turns every shape problem into an Error naming the file and key.
const Json& member(const Json& j, const char* key, const std::string& where, const std::string& ctx) {
  if (!j.is_object()) bad(where, ctx + " is not a JSON object");
  auto it = j.find(key);
  if (it == j.end()) bad(where, ctx + ": missing \"" + key + "\"");
  return *it;
}
std::uint64_t as_u64(const Json& j, const std::string& where, const std::string& ctx) {
  if (!j.is_number_unsigned()) bad(where, ctx + " must be a non-negative integer");
  return j.get<std::uint64_t>();
}
std::int64_t as_i64(const Json& j, const std::string& where, const std::string& ctx) {
  if (!j.is_number_integer()) bad(where, ctx + " must be an integer");
  return j.get<std::int64_t>();
}
int as_int(const Json& j, const std::string& where, const std::string& ctx, int lo, int hi) {
  const std::int64_t v = as_i64(j, where, ctx);
  if (v < lo || v > hi) bad(where, ctx + " = " + std::to_string(v) + " is out of range");
  return static_cast<int>(v);
}
float as_float(const Json& j, const std::string& where, const std::string& ctx) {
  if (!j.is_number()) bad(where, ctx + " must be a number");
  return j.get<float>();
}
const std::string& as_str(const Json& j, const std::string& where, const std::string& ctx) {
  if (!j.is_string()) bad(where, ctx + " must be a string");
  return j.get_ref<const std::string&>();
}

bool plain_name(const std::string& s) {
  if (s.empty() || s == "." || s == ".." || s.size() > 255) return false;
  for (char ch : s)
    if (ch == '/' || ch == '\0') return false;
  return true;
}

// A group's hyperparameters, every field of Hyperparams (core/config_fields.hpp) under its name;
// the schedule's fields inside a "schedule" object. Floats are JSON numbers, enums their names.
nlohmann::ordered_json dump_hyperparams(const Hyperparams& h) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  fields::for_each_field(h, [&](const fields::FieldInfo& info, const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    nlohmann::ordered_json& slot = info.section ? out[info.section][info.key] : out[info.name];
    if constexpr (std::is_enum_v<T>) slot = std::string(name_of(value));
    else slot = value;
  });
  return out;
}

// The reverse of dump_hyperparams. Every top-level field is required; the "schedule" object is
// optional as a whole (manifests written before schedules existed have none: the defaults, a
// constant schedule), but complete when present.
Hyperparams parse_hyperparams(const Json& v, const std::string& where, const std::string& ctx) {
  Hyperparams h;
  fields::for_each_field(h, [&](const fields::FieldInfo& info, auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    const Json* parent = &v;
    std::string pctx = ctx;
    const char* key = info.name;
    if (info.section) {
      if (!v.is_object() || !v.contains(info.section)) return;
      parent = &v.at(info.section);
      pctx = ctx + "." + info.section;
      key = info.key;
    }
    const std::string fctx = pctx + "." + key;
    const Json& j = member(*parent, key, where, pctx);
    if constexpr (std::is_same_v<T, bool>) {
      if (!j.is_boolean()) bad(where, fctx + " must be a boolean");
      value = j.get<bool>();
    } else if constexpr (std::is_same_v<T, float>) {
      value = as_float(j, where, fctx);
    } else if constexpr (std::is_same_v<T, std::int64_t>) {
      value = as_i64(j, where, fctx);
    } else if constexpr (std::is_enum_v<T>) {
      const std::string& name = as_str(j, where, fctx);
      if (!fields::parse_enum(name, value)) bad(where, fctx + ": unknown value '" + name + "'");
    } else {
      static_assert(sizeof(T) == 0, "a Hyperparams field type the manifest cannot store");
    }
  });
  return h;
}
}  // namespace

std::size_t chunk_elems() noexcept { return g_chunk.load(); }
void set_chunk_elems_for_testing(std::size_t elems) noexcept {
  g_chunk.store(elems ? elems : std::size_t(1) << 20);
}

int Manifest::find_tensor(const std::string& name) const {
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].info.name == name) return static_cast<int>(i);
  return -1;
}

std::vector<std::string> field_names(OptimizerKind rule) {
  std::vector<std::string> names{"master"};
  visit_rule(rule, [&](auto k) {
    using Rule = rule_t<decltype(k)::value>;
    for (const char* n : Rule::state_names) names.emplace_back(n);
  });
  return names;
}

std::uint64_t xxh64(const void* data, std::size_t bytes) noexcept { return XXH64(data, bytes, 0); }

std::string hex64(std::uint64_t v) {
  static const char* d = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[i] = d[v & 15];
  return s;
}
bool parse_hex64(std::string_view s, std::uint64_t& out) noexcept {
  if (s.size() != 16) return false;
  std::uint64_t v = 0;
  for (char ch : s) {
    int d;
    if (ch >= '0' && ch <= '9') d = ch - '0';
    else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
    else return false;
    v = (v << 4) | static_cast<std::uint64_t>(d);
  }
  out = v;
  return true;
}

Manifest parse_manifest(std::string_view text, const std::string& where) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad(where, "not valid JSON (a damaged or partial manifest)");
  if (!j.is_object()) bad(where, "the manifest is not a JSON object");
  Manifest m;
  try {
    const std::string& fmt = as_str(member(j, "format", where, "manifest"), where, "format");
    if (fmt != kFormatName) bad(where, "\"format\" is '" + fmt + "', not '" + kFormatName + "'");
    m.format_version = as_int(member(j, "format_version", where, "manifest"), where, "format_version", 0,
                              std::numeric_limits<int>::max());
    if (m.format_version < 1 || m.format_version > kFormatVersion)
      throw Error(ErrorCode::unsupported, where + ": unknown checkpoint format version " +
                                              std::to_string(m.format_version) + " (this shardopt reads versions 1 to " +
                                              std::to_string(kFormatVersion) + ")");
    // From version 2 the manifest carries a checksum of its own canonical content, so an edited
    // step, shape or range (which the data checksums cannot see) is caught. Version 1 had none.
    if (m.format_version >= 2) {
      const Json& sum = member(j, kManifestChecksumKey, where, "manifest");
      std::uint64_t stored = 0;
      if (!sum.is_string() || !parse_hex64(sum.get_ref<const std::string&>(), stored))
        bad(where, std::string("\"") + kManifestChecksumKey + "\" is not 16 lowercase hex digits");
      if (stored != manifest_checksum(j))
        bad(where, "the manifest's checksum does not match its content (the manifest was edited or damaged)");
    }
    m.library_version = as_str(member(j, "library_version", where, "manifest"), where, "library_version");
    m.generation = as_u64(member(j, "generation", where, "manifest"), where, "generation");
    m.world_size = as_int(member(j, "world_size", where, "manifest"), where, "world_size", 1, 1 << 24);
    m.stage = as_int(member(j, "stage", where, "manifest"), where, "stage", 0, 3);
    const std::string& cd = as_str(member(j, "compute_dtype", where, "manifest"), where, "compute_dtype");
    if (!parse_dtype(cd, m.compute_dtype)) bad(where, "unknown compute_dtype '" + cd + "'");
    const std::string& md = as_str(member(j, "master_dtype", where, "manifest"), where, "master_dtype");
    if (md != "fp32") bad(where, "master_dtype '" + md + "' is not supported (fp32 only)");
    const std::string& rule = as_str(member(j, "optimizer", where, "manifest"), where, "optimizer");
    if (!parse_optimizer(rule, m.optimizer)) bad(where, "unknown optimizer '" + rule + "'");
    m.fields = field_names(m.optimizer);
    const Json& fields = member(j, "fields", where, "manifest");
    if (!fields.is_array() || fields.size() != m.fields.size()) bad(where, "\"fields\" does not match optimizer " + rule);
    for (std::size_t f = 0; f < m.fields.size(); ++f)
      if (as_str(fields[f], where, "fields[]") != m.fields[f])
        bad(where, "\"fields\" does not match optimizer " + rule);

    if (j.contains("state_precision")) {  // optional: absent before compressed state (fp32)
      const std::string& sp = as_str(j.at("state_precision"), where, "state_precision");
      if (!parse_state_precision(sp, m.state_precision)) bad(where, "unknown state_precision '" + sp + "'");
      if (m.state_precision == StatePrecision::int8) {
        m.quant_block = as_u64(member(j, "quant_block", where, "manifest"), where, "quant_block");
        const bool pow2 = m.quant_block != 0 && (m.quant_block & (m.quant_block - 1)) == 0;
        if (!pow2 || m.quant_block < kMinQuantBlock || m.quant_block > kMaxQuantBlock)
          bad(where, "quant_block " + std::to_string(m.quant_block) + " is not a power of two in [" +
                         std::to_string(kMinQuantBlock) + ", " + std::to_string(kMaxQuantBlock) + "]");
      }
    }
    const Json& groups = member(j, "groups", where, "manifest");
    if (!groups.is_object()) bad(where, "\"groups\" must be an object");
    for (auto it = groups.begin(); it != groups.end(); ++it) {
      const std::string ctx = "groups." + it.key();
      int g = 0;
      try {
        std::size_t used = 0;
        g = std::stoi(it.key(), &used);
        if (used != it.key().size() || g < 0) throw std::invalid_argument("g");
      } catch (const std::exception&) {
        bad(where, ctx + ": group key is not a non-negative integer");
      }
      m.groups[g] = parse_hyperparams(it.value(), where, ctx);
    }
    m.step = as_i64(member(j, "step", where, "manifest"), where, "step");
    if (m.step < 0) bad(where, "\"step\" is negative");
    const Json& ls = member(j, "loss_scaler", where, "manifest");
    const std::string& mode = as_str(member(ls, "mode", where, "loss_scaler"), where, "loss_scaler.mode");
    if (!fields::parse_enum(mode, m.loss_scale_mode)) bad(where, "unknown loss_scaler.mode '" + mode + "'");
    m.loss_scale = as_float(member(ls, "scale", where, "loss_scaler"), where, "loss_scaler.scale");
    if (!(m.loss_scale > 0) || !std::isfinite(m.loss_scale)) bad(where, "loss_scaler.scale must be finite and > 0");
    m.good_steps = as_int(member(ls, "good_steps", where, "loss_scaler"), where, "loss_scaler.good_steps", 0,
                          std::numeric_limits<int>::max());
    m.overflow_run = as_int(member(ls, "overflow_run", where, "loss_scaler"), where, "loss_scaler.overflow_run", 0,
                            std::numeric_limits<int>::max());
    m.chunk = as_u64(member(j, "chunk_elems", where, "manifest"), where, "chunk_elems");
    if (j.contains("trainer_metadata")) {  // optional: absent in version 1 and when never given
      m.trainer_metadata = as_str(j.at("trainer_metadata"), where, "trainer_metadata");
      if (m.trainer_metadata.size() > kMaxTrainerMetadata) bad(where, "\"trainer_metadata\" is too large");
    }
    if (m.chunk == 0 || m.chunk > (std::size_t(1) << 30)) bad(where, "chunk_elems out of range");

    const Json& files = member(j, "files", where, "manifest");
    if (!files.is_array()) bad(where, "\"files\" must be an array");
    for (const Json& f : files) {
      File fe;
      fe.name = as_str(member(f, "name", where, "files[]"), where, "files[].name");
      if (!plain_name(fe.name) || fe.name == kManifestName) bad(where, "file name '" + fe.name + "' is not a plain file name");
      fe.bytes = as_u64(member(f, "bytes", where, "files[]"), where, "files[].bytes");
      m.files.push_back(std::move(fe));
    }

    const Json& tensors = member(j, "tensors", where, "manifest");
    if (!tensors.is_array()) bad(where, "\"tensors\" must be an array");
    for (const Json& t : tensors) {
      Tensor te;
      te.info.name = as_str(member(t, "name", where, "tensors[]"), where, "tensors[].name");
      const std::string ctx = "tensor '" + te.info.name + "'";
      if (te.info.name.empty()) bad(where, "a tensor has an empty name");
      if (m.find_tensor(te.info.name) >= 0) bad(where, ctx + " is listed twice");
      const Json& shape = member(t, "shape", where, ctx);
      if (!shape.is_array() || shape.size() > 64) bad(where, ctx + ": \"shape\" must be an array of at most 64 extents");
      std::size_t n = 1;
      for (const Json& e : shape) {
        const std::int64_t x = as_i64(e, where, ctx + " shape extent");
        if (x < 0 || x > (std::int64_t(1) << 48)) bad(where, ctx + ": shape extent out of range");
        te.info.shape.push_back(x);
        if (x != 0 && n > (std::size_t(1) << 48) / static_cast<std::size_t>(x)) bad(where, ctx + ": too many elements");
        n *= static_cast<std::size_t>(x);
      }
      te.info.numel = n;
      const std::uint64_t numel = as_u64(member(t, "numel", where, ctx), where, ctx + ".numel");
      if (numel != n) bad(where, ctx + ": numel " + std::to_string(numel) + " does not match its shape");
      te.info.group = as_int(member(t, "group", where, ctx), where, ctx + ".group", 0, std::numeric_limits<int>::max());
      const Json& data = member(t, "data", where, ctx);
      if (!data.is_object()) bad(where, ctx + ": \"data\" must be an object");
      te.fields.resize(m.fields.size());
      for (std::size_t f = 0; f < m.fields.size(); ++f) {
        const std::string fctx = ctx + " field '" + m.fields[f] + "'";
        const Json& rs = member(data, m.fields[f].c_str(), where, ctx + ".data");
        if (!rs.is_array()) bad(where, fctx + " must be an array of ranges");
        std::size_t next = 0;
        for (const Json& r : rs) {
          Range rg;
          rg.begin = as_u64(member(r, "begin", where, fctx), where, fctx + ".begin");
          rg.count = as_u64(member(r, "count", where, fctx), where, fctx + ".count");
          const std::uint64_t file = as_u64(member(r, "file", where, fctx), where, fctx + ".file");
          rg.offset = as_u64(member(r, "offset", where, fctx), where, fctx + ".offset");
          // Ranges tile the tensor in order: no gap, no overlap, nothing past its end.
          if (rg.begin != next || rg.count == 0 || rg.count > n - rg.begin)
            bad(where, fctx + ": ranges do not tile the tensor's " + std::to_string(n) + " elements (range at " +
                           std::to_string(rg.begin) + ")");
          next = rg.begin + rg.count;
          if (file >= m.files.size()) bad(where, fctx + ": file index " + std::to_string(file) + " out of range");
          rg.file = static_cast<int>(file);
          const Json& hs = member(r, "xxh64", where, fctx);
          const std::size_t chunks = (rg.count + m.chunk - 1) / m.chunk;
          if (!hs.is_array() || hs.size() != chunks)
            bad(where, fctx + ": expected " + std::to_string(chunks) + " checksums for the range at " +
                           std::to_string(rg.begin));
          for (const Json& h : hs) {
            std::uint64_t v = 0;
            if (!h.is_string() || !parse_hex64(h.get_ref<const std::string&>(), v))
              bad(where, fctx + ": checksum is not 16 lowercase hex digits");
            rg.hashes.push_back(v);
          }
          // After the checksum count, which bounds the chunks range_bytes walks.
          const std::uint64_t fb = m.files[rg.file].bytes;
          if (rg.offset > fb || range_bytes(codec_of(m, static_cast<int>(f)), rg.begin, rg.count, m.chunk) > fb - rg.offset)
            bad(where, fctx + ": range past the end of file '" + m.files[rg.file].name + "'");
          te.fields[f].push_back(std::move(rg));
        }
        if (next != n) bad(where, fctx + ": ranges cover " + std::to_string(next) + " of " + std::to_string(n) + " elements");
      }
      m.tensors.push_back(std::move(te));
    }
  } catch (const nlohmann::json::exception& e) {
    bad(where, std::string("malformed manifest: ") + e.what());
  }
  return m;
}

std::string dump_manifest(const Manifest& m) {
  nlohmann::ordered_json j;
  j["format"] = kFormatName;
  j["format_version"] = m.format_version;
  j["library_version"] = m.library_version;
  j["generation"] = m.generation;
  j["world_size"] = m.world_size;
  j["stage"] = m.stage;
  j["compute_dtype"] = std::string(name_of(m.compute_dtype));
  j["master_dtype"] = std::string(name_of(m.master_dtype));
  j["optimizer"] = std::string(name_of(m.optimizer));
  j["fields"] = m.fields;
  if (m.state_precision != StatePrecision::fp32) {  // fp32 manifests stay as they were
    j["state_precision"] = std::string(name_of(m.state_precision));
    if (m.state_precision == StatePrecision::int8) j["quant_block"] = m.quant_block;
  }
  nlohmann::ordered_json groups = nlohmann::ordered_json::object();
  for (const auto& [g, h] : m.groups) groups[std::to_string(g)] = dump_hyperparams(h);
  j["groups"] = groups;
  j["step"] = m.step;
  j["loss_scaler"] = {{"mode", std::string(name_of(m.loss_scale_mode))},
                      {"scale", m.loss_scale},
                      {"good_steps", m.good_steps},
                      {"overflow_run", m.overflow_run}};
  j["chunk_elems"] = m.chunk;
  if (!m.trainer_metadata.empty()) j["trainer_metadata"] = m.trainer_metadata;
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  for (const File& f : m.files) files.push_back({{"name", f.name}, {"bytes", f.bytes}});
  j["files"] = files;
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  for (const Tensor& t : m.tensors) {
    nlohmann::ordered_json tj;
    tj["name"] = t.info.name;
    tj["shape"] = t.info.shape;
    tj["numel"] = t.info.numel;
    tj["dtype"] = std::string(name_of(m.master_dtype));
    tj["group"] = t.info.group;
    nlohmann::ordered_json data = nlohmann::ordered_json::object();
    for (std::size_t f = 0; f < m.fields.size(); ++f) {
      nlohmann::ordered_json rs = nlohmann::ordered_json::array();
      for (const Range& r : t.fields[f]) {
        nlohmann::ordered_json hs = nlohmann::ordered_json::array();
        for (std::uint64_t h : r.hashes) hs.push_back(hex64(h));
        rs.push_back({{"begin", r.begin}, {"count", r.count}, {"file", r.file}, {"offset", r.offset}, {"xxh64", hs}});
      }
      data[m.fields[f]] = rs;
    }
    tj["data"] = data;
    tensors.push_back(tj);
  }
  j["tensors"] = tensors;
  j[kManifestChecksumKey] = hex64(manifest_checksum(Json::parse(j.dump())));
  return j.dump(1) + "\n";
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = join(dir, kManifestName);
  return parse_manifest(read_text(path, "checkpoint manifest (a directory without one is not a checkpoint)"), path);
}

CheckpointInfo info_of(const Manifest& m, const std::string& dir) {
  CheckpointInfo i;
  i.dir = dir;
  i.format_version = m.format_version;
  i.library_version = m.library_version;
  i.generation = m.generation;
  i.world_size = m.world_size;
  i.stage = m.stage;
  i.compute_dtype = m.compute_dtype;
  i.master_dtype = m.master_dtype;
  i.optimizer = m.optimizer;
  i.fields = m.fields;
  i.state_precision = m.state_precision;
  i.quant_block = m.quant_block;
  i.step = m.step;
  i.loss_scale = m.loss_scale;
  i.good_steps = m.good_steps;
  i.overflow_run = m.overflow_run;
  for (const Tensor& t : m.tensors) {
    i.tensors.push_back(t.info);
    i.total_numel += t.info.numel;
  }
  i.files = m.files.size();
  for (const File& f : m.files) i.bytes += f.bytes;
  i.trainer_metadata = m.trainer_metadata;
  return i;
}

// ---------------------------------------------------------------- I/O
DirLock lock_dir(const std::string& dir, const std::string& who) {
  const std::string path = join(dir, kLockName);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0644);
  if (fd < 0) throw Error(ErrorCode::io_error, sys_error("cannot open the checkpoint lock", path));
  Fd f(fd, path);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    throw Error(ErrorCode::io_error, "checkpoint lock '" + path + "' is not a regular file");
  // flock, not fcntl locks: flock locks belong to the open file, so two savers in one process
  // (in-process ranks of two jobs) exclude each other too.
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) {
      std::string holder(512, '\0');
      const ssize_t n = ::pread(fd, holder.data(), holder.size(), 0);
      holder.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) holder.pop_back();
      throw Error(ErrorCode::io_error, "checkpoint directory '" + dir + "' is being written by another saver (" +
                                           (holder.empty() ? std::string("holder unknown") : holder) +
                                           "); it was left untouched. Wait for that save, or save elsewhere");
    }
    throw Error(ErrorCode::io_error, sys_error("cannot lock", path));
  }
  // Who holds it, for the error a second saver gets. Best effort: the lock is what excludes.
  if (::ftruncate(fd, 0) == 0) {
    const std::string text = who + "\n";
    (void)!::pwrite(fd, text.data(), text.size(), 0);
  }
  return DirLock(std::move(f));
}
void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) throw Error(ErrorCode::io_error, sys_error("cannot stat", dir));
    if (!S_ISDIR(st.st_mode)) throw Error(ErrorCode::io_error, "checkpoint path '" + dir + "' exists and is not a directory");
    return;
  }
  throw Error(ErrorCode::io_error, sys_error("cannot create checkpoint directory", dir));
}
}  // namespace shardopt::ckpt
