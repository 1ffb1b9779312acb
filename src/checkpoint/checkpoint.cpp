// Engine::save and Engine::load (see engine.hpp for the contract, format.hpp for the format).
//
// The engine is reached only through detail::CheckpointPort (src/engine/checkpoint_port.hpp):
// its layout and configuration, the state store (read/write by field and state offset), the
// step state, a collective to agree on outcomes, and reload_params() after a load.
#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "checkpoint/field_codec.hpp"
#include "checkpoint/format.hpp"
#include "engine/checkpoint_port.hpp"
#include "shardopt/error.hpp"
#include "shardopt/engine.hpp"

#ifndef SHARDOPT_LIBRARY_VERSION
#define SHARDOPT_LIBRARY_VERSION "unknown"
#endif

namespace shardopt {

namespace {

using ckpt::join;
using detail::CheckpointPort;
// One run of consecutive elements of one tensor that this rank writes or loads, and the state
// offset of its first element.
using Piece = CheckpointPort::Piece;

std::string data_name(std::uint64_t gen, int rank) {
  return "g" + std::to_string(gen) + ".r" + std::to_string(rank) + ".bin";
}
std::string sidecar_name(std::uint64_t gen, int rank) {
  return "g" + std::to_string(gen) + ".r" + std::to_string(rank) + ".json";
}
// The generation a file of ours belongs to, if its name is one of ours ("g<gen>.r<rank>.<ext>").
std::optional<std::uint64_t> generation_of(const std::string& name) {
  if (name.size() < 6 || name[0] != 'g') return std::nullopt;
  std::size_t i = 1;
  std::uint64_t g = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i < 19) g = g * 10 + static_cast<std::uint64_t>(name[i++] - '0');
  if (i == 1 || name.compare(i, 2, ".r") != 0) return std::nullopt;
  i += 2;
  const std::size_t digits = i;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == digits) return std::nullopt;
  const std::string rest = name.substr(i);
  for (const char* ext : {".bin", ".json", ".bin.tmp", ".json.tmp"})
    if (rest == ext) return g;
  return std::nullopt;
}

// Collective: every rank learns the largest value any rank passed (0 or 1 for failure flags,
// small integers for generations: exact in fp32 below 2^24).
float agree_max(CheckpointPort& im, float value) { return im.agree_max(value); }

// After every rank tried a phase: if any failed, every rank throws, so no rank goes on into a
// collective the others skip. They all throw the error of the lowest-numbered rank that failed
// (its code and message, prefixed with its rank on the others), so a user who reads any one rank's
// output sees the cause. The message travels by a broadcast through a small buffer allocated only
// on this failure path (tagged Category::other); a longer message is cut.
void agree_or_throw(CheckpointPort& im, const std::optional<Error>& mine, const std::string& what) {
  const bool any = agree_max(im, mine ? 1.0f : 0.0f) != 0.0f;
  if (!any) return;
  const int world = im.world(), rank = im.rank();
  if (world == 1) throw *mine;
  const int first = world - static_cast<int>(agree_max(im, mine ? static_cast<float>(world - rank) : 0.0f));
  constexpr std::size_t kBytes = 1024;  // a multiple of 4: broadcast as fp32 words, bit for bit
  char h[kBytes] = {};
  if (rank == first) {
    const auto code = static_cast<std::uint32_t>(mine->code());
    std::memcpy(h, &code, 4);
    std::memcpy(h + 4, mine->message().data(), std::min(mine->message().size(), kBytes - 5));
  }
  im.broadcast(h, kBytes, first);
  if (rank == first) throw *mine;
  std::uint32_t code = 0;
  std::memcpy(&code, h, 4);
  h[kBytes - 1] = '\0';
  const bool known = code <= static_cast<std::uint32_t>(ErrorCode::internal);
  throw Error(known ? static_cast<ErrorCode>(code) : ErrorCode::io_error,
              what + " failed on rank " + std::to_string(first) + ": " + std::string(h + 4));
}

template <class F>
std::optional<Error> attempt(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  } catch (const std::exception& e) {
    return Error(ErrorCode::io_error, e.what());
  }
  return std::nullopt;
}

// What this rank writes: its owned pieces (stages 1-3); at stage 0 every rank holds everything,
// so the ranks split the concatenation of all tensors into equal element ranges and each writes one.
std::vector<Piece> write_pieces(const CheckpointPort& im) {
  if (im.state_sharded()) return im.owned_pieces();
  std::vector<Piece> out;
  const auto& tensors = im.layout().tensors();
  const std::size_t total = im.layout().total_numel();
  const std::size_t lo = total * static_cast<std::size_t>(im.rank()) / static_cast<std::size_t>(im.world());
  const std::size_t hi = total * static_cast<std::size_t>(im.rank() + 1) / static_cast<std::size_t>(im.world());
  std::size_t flat = 0;
  for (int t = 0; t < static_cast<int>(tensors.size()); ++t) {
    const auto& ti = tensors[t];
    const std::size_t a = std::max(lo, flat), b = std::min(hi, flat + ti.numel);
    if (a < b) out.push_back({t, a - flat, b - a, im.state_offset(ti.unit, ti.unit_offset + (a - flat))});
    flat += ti.numel;
  }
  return out;
}

// Deletes our files of generations other than `keep`, our sidecars of `keep` (merged into the
// manifest) and stale temporaries. Runs after the commit: a failure leaves harmless garbage that
// the next save removes, so it is reported to no one.
void remove_stale(const std::string& dir, std::uint64_t keep) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;  // checked: nothing to clean if the directory cannot be listed
  std::vector<std::string> doomed;
  while (const dirent* ent = ::readdir(d)) {
    const std::string name = ent->d_name;
    if (name == std::string(ckpt::kManifestName) + ".tmp") {
      doomed.push_back(name);
      continue;
    }
    const auto g = generation_of(name);
    if (!g) continue;
    const bool sidecar = name.size() > 5 && name.compare(name.size() - 5, 5, ".json") == 0;
    const bool tmp = name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
    if (*g != keep || sidecar || tmp) doomed.push_back(name);
  }
  (void)::closedir(d);  // read-only handle; nothing to lose
  for (const auto& name : doomed) {
    if (::unlink(join(dir, name).c_str()) != 0 && errno != ENOENT) {
      // Deliberately ignored (see above): the checkpoint is already committed.
    }
  }
}

// What a second saver is told about the lock's holder.
std::string lock_holder() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "unknown host");
  const std::time_t now = std::time(nullptr);
  char when[32] = {};
  std::tm tm{};
  if (::gmtime_r(&now, &tm)) std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return "held by pid " + std::to_string(::getpid()) + " on " + host + " since " + when;
}

// Everything a save needs once the engine's values are captured: where, under which generation,
// the lock, what this rank writes, and the manifest's engine-wide fields as they were when the
// save began (an asynchronous save commits them after training went on).
struct SaveJob {
  std::string dir;
  std::uint64_t gen = 0;
  ckpt::DirLock lock;  // rank 0 only
  std::vector<std::string> fields;
  std::vector<Piece> pieces;
  std::size_t chunk = 0;
  ckpt::Manifest head;  // engine-wide fields; files and tensors are filled at the commit
  std::vector<Layout::TensorInfo> tensors;
  int rank = 0, world = 1;
};

// Phase 0 and the generation: rank 0 takes the directory's lock (a second saver fails here, on
// every one of its ranks, before anything is written), then every rank agrees on the new
// generation: one past the committed one, read after the lock so two savers never pick the same.
SaveJob begin_save(CheckpointPort& im, const StepState& state, const std::string& dir, const std::string& metadata) {
  require(metadata.size() <= ckpt::kMaxTrainerMetadata, ErrorCode::invalid_argument,
          "save: trainer metadata of " + std::to_string(metadata.size()) + " bytes is too large (at most " +
              std::to_string(ckpt::kMaxTrainerMetadata) + ")");
  try {
    (void)nlohmann::json(metadata).dump();  // the manifest is JSON: its strings are UTF-8
  } catch (const nlohmann::json::exception&) {
    throw Error(ErrorCode::invalid_argument, "save: trainer metadata is not valid UTF-8 text");
  }
  SaveJob job;
  job.dir = dir;
  std::optional<Error> err;
  if (im.rank() == 0)
    err = attempt([&] {
      ckpt::make_dir(dir);
      job.lock = ckpt::lock_dir(dir, lock_holder());
    });
  agree_or_throw(im, err, "save into '" + dir + "'");
  std::uint64_t proposal = 1;
  try {
    proposal = ckpt::read_manifest(dir).generation + 1;
  } catch (const Error&) {
    proposal = 1;  // no valid checkpoint there yet: this save creates the first
  }
  require(proposal < (std::uint64_t(1) << 24), ErrorCode::unsupported,
          "save: checkpoint generation counter of '" + dir + "' exhausted; save into a new directory");
  job.gen = static_cast<std::uint64_t>(agree_max(im, static_cast<float>(proposal)));
  const Config& cfg = im.config();
  job.fields = ckpt::field_names(cfg.optimizer);
  job.pieces = write_pieces(im);
  job.chunk = ckpt::chunk_elems();
  job.rank = im.rank();
  job.world = im.world();
  ckpt::Manifest& m = job.head;
  m.library_version = SHARDOPT_LIBRARY_VERSION;
  m.generation = job.gen;
  m.world_size = im.world();
  m.stage = cfg.stage;
  m.compute_dtype = cfg.compute_dtype;
  m.master_dtype = DType::fp32;
  m.optimizer = cfg.optimizer;
  m.fields = job.fields;
  m.state_precision = cfg.state_precision;
  m.quant_block = cfg.state_precision == StatePrecision::int8 ? cfg.quant_block : 0;
  // Compressed state is stored in its own precision, which only version 3 readers know; fp32
  // state keeps version 2 so that older readers still load it.
  m.format_version = cfg.state_precision == StatePrecision::fp32 ? 2 : ckpt::kFormatVersion;
  m.groups = im.groups();
  m.step = state.step;
  m.loss_scale_mode = cfg.loss_scaling.mode;
  m.loss_scale = state.loss_scale;
  m.good_steps = state.good_steps;
  m.overflow_run = state.overflow_run;
  m.chunk = job.chunk;
  m.trainer_metadata = metadata;
  job.tensors = im.layout().tensors();
  return job;
}

// Phase 1, every rank, no collective (it may run on a writer thread): its shard file (fields one
// after another, each its pieces in order) and a sidecar describing it. `values(field, piece,
// offset, n, out)` supplies the data. Memory: one chunk.
template <class Values>
std::optional<Error> write_shard(const SaveJob& job, Values&& values) {
  const std::string file = data_name(job.gen, job.rank);
  const std::string tmp = join(job.dir, file + ".tmp");
  std::optional<Error> err = attempt([&] {
    if (job.rank != 0) ckpt::make_dir(job.dir);
    ckpt::Fd f = ckpt::create_write(tmp);
    std::vector<float> buf;
    std::vector<unsigned char> bytes;
    std::uint64_t offset = 0;
    nlohmann::json ranges = nlohmann::json::array();
    for (int fi = 0; fi < static_cast<int>(job.fields.size()); ++fi) {
      const ckpt::FieldCodec codec = ckpt::codec_of(job.head, fi);
      for (std::size_t pi = 0; pi < job.pieces.size(); ++pi) {
        const Piece& p = job.pieces[pi];
        nlohmann::json hashes = nlohmann::json::array();
        std::uint64_t range_bytes = 0;
        for (std::size_t done = 0; done < p.count; done += job.chunk) {
          const std::size_t k = std::min(job.chunk, p.count - done);
          buf.resize(k);
          values(fi, pi, done, k, buf.data());
          ckpt::pack(codec, p.begin + done, k, buf.data(), bytes,
                     "save: tensor '" + job.tensors[p.tensor].name + "' field '" + job.fields[fi] + "'");
          hashes.push_back(ckpt::hex64(ckpt::xxh64(bytes.data(), bytes.size())));
          ckpt::write_all(f, bytes.data(), bytes.size());
          range_bytes += bytes.size();
        }
        ranges.push_back({p.tensor, fi, p.begin, p.count, offset, hashes});
        offset += range_bytes;
      }
    }
    ckpt::fsync_fd(f);
    f.close();
    ckpt::rename_file(tmp, join(job.dir, file));
    nlohmann::json side = {{"file", file}, {"bytes", offset}, {"ranges", ranges}};
    // The sidecar is only read by rank 0 before the commit; it needs no fsync of its own, but the
    // atomic write keeps a half-written one from ever being parsed.
    ckpt::write_file_atomic(job.dir, sidecar_name(job.gen, job.rank), side.dump());
  });
  if (err) (void)::unlink(tmp.c_str());  // best effort: a leftover temporary is removed by the next save
  return err;
}

// Phase 2, rank 0: merge the sidecars into the manifest and commit it; then every rank learns
// the outcome.
void commit_save(CheckpointPort& im, SaveJob& job) {
  std::optional<Error> err;
  if (im.rank() == 0) {
    err = attempt([&] {
      ckpt::Manifest m = job.head;
      const auto& tensors = job.tensors;
      const int nfields = static_cast<int>(job.fields.size());
      for (const auto& ti : tensors) {
        ckpt::Tensor t;
        t.info = {ti.name, ti.shape, ti.numel, ti.group};
        t.fields.resize(job.fields.size());
        m.tensors.push_back(std::move(t));
      }
      for (int r = 0; r < job.world; ++r) {
        const std::string path = join(job.dir, sidecar_name(job.gen, r));
        nlohmann::json s = nlohmann::json::parse(ckpt::read_text(path, "rank " + std::to_string(r) + "'s save record"));
        const int fidx = static_cast<int>(m.files.size());
        m.files.push_back({s.at("file").get<std::string>(), s.at("bytes").get<std::uint64_t>()});
        for (const auto& rj : s.at("ranges")) {
          ckpt::Range rg;
          const int t = rj.at(0).get<int>();
          const int fi = rj.at(1).get<int>();
          require(t >= 0 && t < static_cast<int>(tensors.size()) && fi >= 0 && fi < nfields, ErrorCode::internal,
                  "save: '" + path + "' names an unknown tensor or field");
          rg.begin = rj.at(2).get<std::size_t>();
          rg.count = rj.at(3).get<std::size_t>();
          rg.offset = rj.at(4).get<std::uint64_t>();
          rg.file = fidx;
          for (const auto& h : rj.at(5)) {
            std::uint64_t v = 0;
            require(ckpt::parse_hex64(h.get<std::string>(), v), ErrorCode::internal, "save: bad checksum in '" + path + "'");
            rg.hashes.push_back(v);
          }
          m.tensors[t].fields[fi].push_back(std::move(rg));
        }
      }
      for (auto& t : m.tensors)
        for (auto& f : t.fields)
          std::sort(f.begin(), f.end(), [](const ckpt::Range& a, const ckpt::Range& b) { return a.begin < b.begin; });
      const std::string text = ckpt::dump_manifest(m);
      // Our own reader must accept what we commit (ranges tile every tensor, sizes agree).
      (void)ckpt::parse_manifest(text, join(job.dir, ckpt::kManifestName) + " (about to be written)");
      ckpt::write_file_atomic(job.dir, ckpt::kManifestName, text);  // the commit point
      remove_stale(job.dir, job.gen);
    });
  }
  agree_or_throw(im, err, "save into '" + job.dir + "'");
}

void save_impl(CheckpointPort& im, const std::string& dir, const std::string& metadata) {
  const StepState state = im.quiesce("save");
  require(!dir.empty(), ErrorCode::invalid_argument, "save: empty checkpoint directory");
  require(im.config().master_dtype == DType::fp32, ErrorCode::unsupported, "save: only fp32 master weights are supported");
  SaveJob job = begin_save(im, state, dir, metadata);
  const std::optional<Error> err = write_shard(job, [&](int fi, std::size_t pi, std::size_t done, std::size_t k, float* out) {
    im.store().read_words(fi, job.pieces[pi].offset + done, k, out);
  });
  agree_or_throw(im, err, "save into '" + dir + "'");
  commit_save(im, job);
}

std::string load_impl(CheckpointPort& im, const std::string& dir) {
  im.require_between_steps("load");
  StepState state = im.quiesce("load");
  const Config& cfg = im.config();
  const Layout& layout = im.layout();
  const int nfields = im.store().fields();
  const std::vector<Piece> pieces = im.owned_pieces();
  // staging[field][piece]: everything this rank will own, verified before anything is committed.
  std::vector<std::vector<std::vector<float>>> staging(nfields, std::vector<std::vector<float>>(pieces.size()));
  ckpt::Manifest m;

  std::optional<Error> err = attempt([&] {
    m = ckpt::read_manifest(dir);
    const std::string mpath = join(dir, ckpt::kManifestName);
    if (m.optimizer != cfg.optimizer)
      throw Error(ErrorCode::invalid_argument, "'" + mpath + "' was saved with optimizer " +
                                                   std::string(name_of(m.optimizer)) + "; this engine uses " +
                                                   std::string(name_of(cfg.optimizer)));
    // The stored form of the state is only meaningful in its own precision (and int8 block size):
    // converting would round (fp32 -> bf16/int8) or re-quantize, so another precision is refused.
    if (m.state_precision != cfg.state_precision || m.quant_block != (cfg.state_precision == StatePrecision::int8 ? cfg.quant_block : 0))
      throw Error(ErrorCode::invalid_argument,
                  "'" + mpath + "' holds optimizer state in " + std::string(name_of(m.state_precision)) +
                      (m.state_precision == StatePrecision::int8 ? " (quant_block " + std::to_string(m.quant_block) + ")" : std::string()) +
                      "; this engine uses state_precision " + std::string(name_of(cfg.state_precision)) +
                      (cfg.state_precision == StatePrecision::int8 ? " (quant_block " + std::to_string(cfg.quant_block) + ")" : std::string()) +
                      ": a checkpoint loads only into an engine of the same state precision");
    const auto& tensors = layout.tensors();
    std::vector<int> map(tensors.size());
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      const int k = m.find_tensor(tensors[t].name);
      if (k < 0) throw Error(ErrorCode::invalid_argument, "'" + mpath + "' has no tensor '" + tensors[t].name + "'");
      if (m.tensors[k].info.shape != tensors[t].shape) {
        auto str = [](const std::vector<std::int64_t>& s) {
          std::string o = "[";
          for (std::size_t i = 0; i < s.size(); ++i) o += (i ? "," : "") + std::to_string(s[i]);
          return o + "]";
        };
        throw Error(ErrorCode::invalid_argument, "'" + mpath + "': tensor '" + tensors[t].name + "' has shape " +
                                                     str(m.tensors[k].info.shape) + " in the checkpoint but " +
                                                     str(tensors[t].shape) + " in the engine");
      }
      map[t] = k;
    }
    for (const auto& mt : m.tensors)
      if (layout.find_tensor(mt.info.name) < 0)
        throw Error(ErrorCode::invalid_argument,
                    "'" + mpath + "': tensor '" + mt.info.name + "' is not registered in this engine");

    std::map<int, ckpt::Fd> open;
    auto file_of = [&](int fidx, const std::string& tname) -> const ckpt::Fd& {
      auto it = open.find(fidx);
      if (it != open.end()) return it->second;
      const ckpt::File& fe = m.files[fidx];
      ckpt::Fd f = ckpt::open_read(join(dir, fe.name), "shard file (holds tensor '" + tname + "')");
      const std::uint64_t size = ckpt::file_size(f);
      if (size != fe.bytes)
        throw Error(ErrorCode::io_error, (size < fe.bytes ? "truncated file '" : "wrong size of file '") + f.path() +
                                             "': " + std::to_string(size) + " bytes, the manifest says " +
                                             std::to_string(fe.bytes) + " (tensor '" + tname + "')");
      return open.emplace(fidx, std::move(f)).first->second;
    };

    std::vector<float> buf;
    std::vector<unsigned char> bytes;
    for (int fi = 0; fi < nfields; ++fi) {
      const ckpt::FieldCodec codec = ckpt::codec_of(m, fi);
      for (std::size_t pi = 0; pi < pieces.size(); ++pi) {
        const Piece& p = pieces[pi];
        const ckpt::Tensor& mt = m.tensors[map[p.tensor]];
        const std::string& tname = mt.info.name;
        std::vector<float>& dst = staging[fi][pi];
        dst.resize(p.count);
        const auto& ranges = mt.fields[fi];
        // First range that ends after p.begin (ranges tile the tensor in order).
        auto it = std::upper_bound(ranges.begin(), ranges.end(), p.begin,
                                   [](std::size_t v, const ckpt::Range& r) { return v < r.begin + r.count; });
        for (; it != ranges.end() && it->begin < p.begin + p.count; ++it) {
          const ckpt::Range& r = *it;
          const ckpt::Fd& f = file_of(r.file, tname);
          const std::size_t lo = std::max(p.begin, r.begin), hi = std::min(p.begin + p.count, r.begin + r.count);
          // Only the chunks overlapping [lo, hi) are read; each is verified whole.
          std::size_t c = (lo - r.begin) / m.chunk;
          std::uint64_t at = r.offset + ckpt::chunk_offset(codec, r.begin, r.count, m.chunk, c);
          for (; c * m.chunk + r.begin < hi; ++c) {
            const std::size_t cb = r.begin + c * m.chunk;
            const std::size_t cn = std::min(m.chunk, r.begin + r.count - cb);
            buf.resize(cn);
            bytes.resize(ckpt::chunk_bytes(codec, cb, cn));
            const std::string what = "tensor '" + tname + "' field '" + m.fields[fi] + "' elements [" +
                                     std::to_string(cb) + ", " + std::to_string(cb + cn) + ")";
            ckpt::pread_exact(f, bytes.data(), bytes.size(), at, what);
            at += bytes.size();
            if (ckpt::xxh64(bytes.data(), bytes.size()) != r.hashes[c])
              throw Error(ErrorCode::io_error, "checksum mismatch in '" + f.path() + "' for " + what);
            ckpt::unpack(codec, cb, cn, bytes.data(), buf.data());
            const std::size_t a = std::max(lo, cb), b = std::min(hi, cb + cn);
            std::memcpy(dst.data() + (a - p.begin), buf.data() + (a - cb), (b - a) * 4);
          }
        }
        // int8 state words (StateStore::read_words): a code and its block's scale exponent, the
        // same exponent across a block (blocks of the tensor's own index). Checked here, before
        // anything is committed, so a bad word never leaves the engine half loaded.
        if (fi > 0 && cfg.state_precision == StatePrecision::int8) {
          const std::size_t B = cfg.quant_block;
          std::uint32_t block_word = 0;
          for (std::size_t k = 0; k < p.count; ++k) {
            std::uint32_t w;
            std::memcpy(&w, dst.data() + k, 4);
            const bool first_of_block = k == 0 || (p.begin + k) % B == 0;
            if (w > 0xffffu || (!first_of_block && (w >> 8) != (block_word >> 8)))
              throw Error(ErrorCode::invalid_argument,
                          "'" + join(dir, ckpt::kManifestName) + "': tensor '" + tname + "' field '" + m.fields[fi] +
                              "' element " + std::to_string(p.begin + k) +
                              (w > 0xffffu ? " is not an int8 code with its scale exponent"
                                           : " names another scale than the rest of its quantization block"));
            if (first_of_block) block_word = w;
          }
        }
      }
    }
  });
  agree_or_throw(im, err, "load from '" + dir + "'");

  // Commit: every rank verified everything it needs. Into the state store (nvme: read-modify-
  // write of the committed cells of the rank's file, synced). An I/O error there leaves that file
  // partly loaded: the error says so, and the engine must not be trained on.
  try {
    for (int fi = 0; fi < nfields; ++fi)
      for (std::size_t pi = 0; pi < pieces.size(); ++pi)
        im.store().write_words(fi, pieces[pi].offset, pieces[pi].count, staging[fi][pi].data());
  } catch (const Error& e) {
    if (cfg.offload_optimizer != OffloadKind::nvme) throw;
    throw Error(e.code(), "load from '" + dir + "': writing the loaded state into this rank's NVMe file failed (" +
                              e.message() + "); the engine's state is now partly loaded: load again or start over");
  }
  // The compute-dtype parameters follow the loaded masters.
  im.reload_params(pieces, staging[0]);
  state.step = m.step;
  if (cfg.loss_scaling.mode != LossScaleMode::none && m.loss_scale_mode == cfg.loss_scaling.mode) {
    state.loss_scale = m.loss_scale;
    state.good_steps = m.good_steps;
    state.overflow_run = m.overflow_run;
  }
  im.restore_state(state);
  return m.trainer_metadata;
}

}  // namespace

// An asynchronous save in flight: the values captured at save_async(), the job, and the thread
// writing this rank's shard file from them.
struct Engine::AsyncSave {
  SaveJob job;
  Buffer staging;                   // [field][piece] fp32, fields one after another
  std::vector<std::size_t> offset;  // start of each piece within one field's run
  std::size_t field_elems = 0;
  std::thread writer;
  std::optional<Error> err;  // the writer's outcome, read after join
};

void Engine::AsyncSaveDeleter::operator()(AsyncSave* a) const noexcept {
  // An engine destroyed with a save in flight: the shard file is finished (or abandoned on
  // error) but never committed, since the commit is collective. The previous checkpoint stays
  // the valid one; the next save removes the leftovers.
  if (a && a->writer.joinable()) a->writer.join();
  delete a;
}

void Engine::save(const std::string& dir, const std::string& trainer_metadata) {
  wait_save();
  save_impl(checkpoint_port(), dir, trainer_metadata);
}

void Engine::save_async(const std::string& dir, const std::string& metadata) {
  wait_save();
  CheckpointPort& im = checkpoint_port();
  const StepState state = im.quiesce("save_async");
  require(!dir.empty(), ErrorCode::invalid_argument, "save_async: empty checkpoint directory");
  require(im.config().master_dtype == DType::fp32, ErrorCode::unsupported, "save_async: only fp32 master weights are supported");
  std::unique_ptr<AsyncSave, AsyncSaveDeleter> a(new AsyncSave);
  a->job = begin_save(im, state, dir, metadata);
  // The snapshot: every value this rank writes, copied now so training may change them at once.
  // Staging is the one extra buffer (this rank's share of master and states), in host memory,
  // counted in memory_report() as "other" while the save is in flight.
  std::size_t n = 0;
  for (const Piece& p : a->job.pieces) {
    a->offset.push_back(n);
    n += p.count;
  }
  a->field_elems = n;
  const std::size_t nfields = a->job.fields.size();
  std::optional<Error> err = attempt([&] {
    a->staging = im.allocate_host(nfields * n * 4, "asynchronous checkpoint staging");
    float* st = a->staging.as<float>();
    for (std::size_t fi = 0; fi < nfields; ++fi)
      for (std::size_t pi = 0; pi < a->job.pieces.size(); ++pi) {
        const Piece& p = a->job.pieces[pi];
        im.store().read_words(static_cast<int>(fi), p.offset, p.count, st + fi * n + a->offset[pi]);
      }
  });
  agree_or_throw(im, err, "save_async into '" + dir + "'");
  AsyncSave* raw = a.get();
  raw->writer = std::thread([raw] {
    const float* st = raw->staging.as<float>();
    raw->err = write_shard(raw->job, [&](int fi, std::size_t pi, std::size_t done, std::size_t k, float* out) {
      std::memcpy(out, st + static_cast<std::size_t>(fi) * raw->field_elems + raw->offset[pi] + done, k * 4);
    });
  });
  async_save_ = std::move(a);
}

bool Engine::save_in_flight() const noexcept { return async_save_ != nullptr; }

void Engine::wait_save() {
  if (!async_save_) return;
  // Whatever happens below, this save is over: the staging and the lock go with it.
  std::unique_ptr<AsyncSave, AsyncSaveDeleter> a = std::move(async_save_);
  a->writer.join();
  CheckpointPort& im = checkpoint_port();
  agree_or_throw(im, a->err, "save_async into '" + a->job.dir + "'");
  commit_save(im, a->job);
}

std::string Engine::load(const std::string& dir) {
  wait_save();
  return load_impl(checkpoint_port(), dir);
}

}  // namespace shardopt
