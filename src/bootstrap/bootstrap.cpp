// Launcher detection, the configuration agreement check, device choice and the NCCL bootstrap.
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "bootstrap/internal.hpp"
#include "core/components.hpp"
#include "core/config_fields.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"

namespace shardopt {

std::string_view name_of(LaunchEnv::Source s) noexcept {
  switch (s) {
    case LaunchEnv::Source::mpi: return "mpi";
    case LaunchEnv::Source::torchrun: return "torchrun";
    case LaunchEnv::Source::slurm: return "slurm";
  }
  return "unknown";
}

EnvLookup process_env() {
  return [](const char* name) -> std::optional<std::string> {
    const char* v = std::getenv(name);
    if (!v) return std::nullopt;
    return std::string(v);
  };
}

namespace {

// A whole-string decimal integer in [lo, hi], or an Error naming the variable.
int parse_int(const std::string& text, const char* name, int lo, int hi) {
  int v = 0;
  const char* b = text.data();
  const char* e = b + text.size();
  const auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e || text.empty())
    throw Error(ErrorCode::invalid_argument, std::string("launcher environment: ") + name + "='" + text + "' is not an integer");
  if (v < lo || v > hi)
    throw Error(ErrorCode::invalid_argument, std::string("launcher environment: ") + name + "=" + text + " is outside [" + std::to_string(lo) +
                                                 ", " + std::to_string(hi) + "]");
  return v;
}

std::string missing_list(const EnvLookup& env, std::initializer_list<const char*> names) {
  std::string out;
  for (const char* n : names)
    if (!env(n)) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

constexpr int kMaxRanks = 1 << 24;

}  // namespace

std::string first_slurm_host(std::string_view list) {
  // The first entry ends at the first comma outside brackets.
  std::size_t end = 0;
  int depth = 0;
  for (; end < list.size(); ++end) {
    if (list[end] == '[') ++depth;
    if (list[end] == ']') --depth;
    if (list[end] == ',' && depth == 0) break;
  }
  const std::string_view first = list.substr(0, end);
  const std::size_t open = first.find('[');
  std::string host;
  if (open == std::string_view::npos) {
    host = std::string(first);
  } else {
    const std::size_t close = first.find(']', open);
    if (close == std::string_view::npos)
      throw Error(ErrorCode::invalid_argument, "SLURM host list '" + std::string(list) + "': '[' without ']'");
    const std::string_view inside = first.substr(open + 1, close - open - 1);
    const std::size_t stop = inside.find_first_of(",-");
    host = std::string(first.substr(0, open)) + std::string(inside.substr(0, stop)) + std::string(first.substr(close + 1));
  }
  if (host.empty() || host.find_first_of("[]") != std::string::npos)
    throw Error(ErrorCode::invalid_argument, "SLURM host list '" + std::string(list) + "' has no parsable first host");
  return host;
}

namespace {
// The variable by which mpirun's launchers mark their processes, or nullptr.
const char* mpirun_variable(const EnvLookup& env) {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (env(v)) return v;
  return nullptr;
}
}  // namespace

LaunchEnv detect_launch(const EnvLookup& env) {
  LaunchEnv out;
  const detail::MpiComponent* mpi = detail::mpi_component();
  if (mpi != nullptr && mpi->initialized_here()) {
    out.source = LaunchEnv::Source::mpi;
    return out;  // rank and sizes come from MPI itself
  }
  if (env("RANK") || env("WORLD_SIZE")) {
    const std::string missing = missing_list(env, {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"});
    if (!missing.empty())
      throw Error(ErrorCode::invalid_argument, "launcher environment (torchrun style): RANK or WORLD_SIZE is set but " + missing +
                                                   (missing.find(',') == std::string::npos ? " is" : " are") + " not");
    out.source = LaunchEnv::Source::torchrun;
    out.world_size = parse_int(*env("WORLD_SIZE"), "WORLD_SIZE", 1, kMaxRanks);
    out.rank = parse_int(*env("RANK"), "RANK", 0, out.world_size - 1);
    out.local_rank = parse_int(*env("LOCAL_RANK"), "LOCAL_RANK", 0, out.world_size - 1);
    out.master_addr = *env("MASTER_ADDR");
    out.master_port = parse_int(*env("MASTER_PORT"), "MASTER_PORT", 1, 65535);
    if (out.master_addr.empty()) throw Error(ErrorCode::invalid_argument, "launcher environment: MASTER_ADDR is empty");
    return out;
  }
  if (env("SLURM_PROCID")) {
    const std::string missing = missing_list(env, {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"});
    if (!missing.empty())
      throw Error(ErrorCode::invalid_argument, "launcher environment (SLURM): SLURM_PROCID is set but " + missing + " not (run the program with srun)");
    out.source = LaunchEnv::Source::slurm;
    out.world_size = parse_int(*env("SLURM_NTASKS"), "SLURM_NTASKS", 1, kMaxRanks);
    out.rank = parse_int(*env("SLURM_PROCID"), "SLURM_PROCID", 0, out.world_size - 1);
    out.local_rank = parse_int(*env("SLURM_LOCALID"), "SLURM_LOCALID", 0, out.world_size - 1);
    if (auto a = env("MASTER_ADDR"); a && !a->empty()) {
      out.master_addr = *a;
    } else if (auto l = env("SLURM_STEP_NODELIST"); l && !l->empty()) {
      out.master_addr = first_slurm_host(*l);
    } else if (auto j = env("SLURM_JOB_NODELIST"); j && !j->empty()) {
      out.master_addr = first_slurm_host(*j);
    } else {
      throw Error(ErrorCode::invalid_argument,
                  "launcher environment (SLURM): no rendezvous address: set MASTER_ADDR or run under srun (SLURM_STEP_NODELIST)");
    }
    if (auto p = env("MASTER_PORT")) {
      out.master_port = parse_int(*p, "MASTER_PORT", 1, 65535);
    } else if (auto id = env("SLURM_JOB_ID")) {
      // Every task of the job computes the same port, and concurrent jobs on one node likely differ.
      out.master_port = 20000 + static_cast<int>(std::strtoull(id->c_str(), nullptr, 10) % 10000);
    } else {
      throw Error(ErrorCode::invalid_argument, "launcher environment (SLURM): no rendezvous port: set MASTER_PORT (SLURM_JOB_ID is not set either)");
    }
    return out;
  }
  if (started_by_mpirun(env))
    throw Error(ErrorCode::invalid_state, "launcher environment: started by mpirun (" + std::string(mpirun_variable(env)) +
                                              " is set) but MPI is not initialized in this process: create a "
                                              "shardopt::MpiSession before the bootstrap" +
                                              (mpi != nullptr ? ""
                                                              : " (and the MPI component, shardopt::mpi, is not linked into "
                                                                "this program)"));
  throw Error(ErrorCode::invalid_argument,
              "launcher environment: no launcher found: set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun "
              "style), start with srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), or start with mpirun and create a "
              "shardopt::MpiSession first");
}

bool started_by_mpirun(const EnvLookup& env) noexcept {
  try {
    return mpirun_variable(env) != nullptr;
  } catch (...) {
    return false;  // a lookup that throws finds nothing
  }
}

std::unique_ptr<Bootstrap> make_bootstrap_from_env(BootstrapTimeout timeout, const EnvLookup& env) {
  const LaunchEnv l = detect_launch(env);
  // detect_launch answers mpi only through the registered MPI component.
  if (l.source == LaunchEnv::Source::mpi) return detail::mpi_component()->make_bootstrap();
  TcpRendezvous r;
  r.rank = l.rank;
  r.world_size = l.world_size;
  r.local_rank = l.local_rank;
  r.master_addr = l.master_addr;
  r.master_port = l.master_port;
  r.timeout = timeout;
  return make_tcp_bootstrap(r);
}

// ---- agreement ------------------------------------------------------------------------------

namespace {

// FNV-1a, 64 bit: no dependency, and a fingerprint, not a defence against an adversary.
class Fnv {
 public:
  void bytes(const void* p, std::size_t n) noexcept {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ b[i]) * 1099511628211ull;
  }
  template <class T>
  void value(const T& v) noexcept {
    static_assert(std::is_arithmetic_v<T> || std::is_enum_v<T>);
    bytes(&v, sizeof v);
  }
  void text(std::string_view s) noexcept {
    value(static_cast<std::uint64_t>(s.size()));
    bytes(s.data(), s.size());
  }
  std::uint64_t get() const noexcept { return h_; }

 private:
  std::uint64_t h_ = 1469598103934665603ull;
};

// Every field of the config (core/config_fields.hpp), in declaration order, except the local
// ones (nvme_dir: a path that may differ per machine). Sizes are hashed as 64-bit values so the
// hash does not depend on the platform's size_t.
void hash_config(Fnv& f, const Config& c) {
  fields::for_each_field(c, [&](const fields::FieldInfo& info, const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    if (info.local) return;
    if constexpr (std::is_same_v<T, std::string>) f.text(value);
    else if constexpr (std::is_same_v<T, std::size_t>) f.value(static_cast<std::uint64_t>(value));
    else f.value(value);
  });
}

std::string summary(const Config& c, const std::vector<BlockSpec>& blocks, int world) {
  std::size_t tensors = 0, elements = 0;
  for (const auto& b : blocks)
    for (const auto& t : b.tensors) {
      ++tensors;
      try {
        elements += numel(t.shape);
      } catch (const Error&) {
      }
    }
  return "world_size=" + std::to_string(world) + " stage=" + std::to_string(c.stage) + " compute=" + std::string(name_of(c.compute_dtype)) +
         " reduce=" + std::string(name_of(c.reduce_dtype)) + " optimizer=" + std::string(name_of(c.optimizer)) + " lr=" + std::to_string(c.hyper.lr) +
         " weight_decay=" + std::to_string(c.hyper.weight_decay) +
         " bucket_bytes=" + std::to_string(c.bucket_bytes) + " alignment=" + std::to_string(c.alignment) +
         " accumulation_steps=" + std::to_string(c.accumulation_steps) + " offload=" + std::string(name_of(c.offload_optimizer)) +
         " blocks=" + std::to_string(blocks.size()) + " tensors=" + std::to_string(tensors) + " elements=" + std::to_string(elements);
}

// Every agreed field as "key=value" (core/config_fields.hpp), one per line: sent with the hash so
// that a rank that disagrees can be told which fields differ.
std::string fields_text(const Config& c) {
  std::string out;
  fields::for_each_field(c, [&](const fields::FieldInfo& info, const auto& value) {
    if (!info.local) out += std::string(info.name) + "=" + fields::to_text(value) + "\n";
  });
  return out;
}

// "key=a on rank 0, key=b on rank q; ..." for the lines of two fields_text that differ, or "".
std::string field_differences(const std::string& a, const std::string& b, int q) {
  auto lines = [](const std::string& t) {
    std::vector<std::string> v;
    for (std::size_t i = 0; i < t.size();) {
      const std::size_t e = std::min(t.find('\n', i), t.size());
      v.push_back(t.substr(i, e - i));
      i = e + 1;
    }
    return v;
  };
  const auto la = lines(a), lb = lines(b);
  std::string out;
  for (std::size_t i = 0; i < std::max(la.size(), lb.size()); ++i) {
    const std::string x = i < la.size() ? la[i] : "?", y = i < lb.size() ? lb[i] : "?";
    if (x != y) out += (out.empty() ? "" : "; ") + x + " on rank 0, " + y + " on rank " + std::to_string(q);
  }
  return out;
}

}  // namespace

std::uint64_t agreement_hash(const Config& c, const std::vector<BlockSpec>& blocks, int world_size) {
  // plan_memory validates the config and the blocks and derives the layout from them; hashing
  // its buffers covers anything the fields below might miss (a field added later that changes
  // a size still changes the plan).
  const MemoryPlan plan = plan_memory(c, blocks, world_size);
  Fnv f;
  f.text("shardopt agreement v1");
  f.value(world_size);
  hash_config(f, c);
  f.value(static_cast<std::uint64_t>(blocks.size()));
  for (const auto& b : blocks) {
    f.text(b.name);
    f.value(static_cast<std::uint64_t>(b.tensors.size()));
    for (const auto& t : b.tensors) {
      f.text(t.name);
      f.value(t.group);
      f.value(static_cast<std::uint64_t>(t.shape.size()));
      for (auto e : t.shape) f.value(e);
    }
  }
  f.value(static_cast<std::uint64_t>(plan.buffers.size()));
  for (const auto& b : plan.buffers) {
    f.text(b.name);
    f.value(static_cast<std::uint64_t>(b.bytes)), f.value(b.category), f.value(b.place), f.value(b.transient);
  }
  return f.get();
}

void check_agreement(Bootstrap& bootstrap, const Config& config, const std::vector<BlockSpec>& blocks) {
  // What this rank sends: "ok <hash> <summary>\nworld_size=<n>\n<fields_text>" or "invalid <why>". An invalid
  // config must not throw before the exchange, or the other ranks would wait for this one forever.
  std::string mine;
  try {
    const std::uint64_t h = agreement_hash(config, blocks, bootstrap.world_size());
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
    mine = std::string("ok ") + hex + " " + summary(config, blocks, bootstrap.world_size()) + "\nworld_size=" +
           std::to_string(bootstrap.world_size()) + "\n" + fields_text(config);
  } catch (const Error& e) {
    mine = "invalid " + e.message();
  }
  const auto* p = reinterpret_cast<const std::byte*>(mine.data());
  const auto all = bootstrap.all_gather_bytes({p, mine.size()});
  auto text = [&](int q) { return std::string(reinterpret_cast<const char*>(all[static_cast<std::size_t>(q)].data()), all[static_cast<std::size_t>(q)].size()); };
  const std::string me = "; seen by rank " + std::to_string(bootstrap.rank()) + " (" + std::string(bootstrap.kind()) + " bootstrap)";
  for (int q = 0; q < bootstrap.world_size(); ++q) {
    const std::string t = text(q);
    if (t.rfind("invalid ", 0) == 0)
      throw Error(ErrorCode::communication, "configuration check failed: rank " + std::to_string(q) + " cannot plan its configuration: " + t.substr(8) + me);
  }
  // "ok " + 16 hex digits + " " + summary, then "\n" and the fields.
  auto head = [](const std::string& t) { return t.substr(0, t.find('\n')); };
  auto tail = [](const std::string& t) { return t.find('\n') == std::string::npos ? std::string() : t.substr(t.find('\n') + 1); };
  const std::string first = text(0);
  for (int q = 1; q < bootstrap.world_size(); ++q) {
    const std::string t = text(q);
    if (t != first) {
      const std::string diff = field_differences(tail(first), tail(t), q);
      throw Error(ErrorCode::communication, "configuration check failed: ranks disagree on the configuration or model: rank 0 has hash " +
                                                head(first).substr(3, 16) + " (" + head(first).substr(20) + ") but rank " + std::to_string(q) + " has hash " +
                                                head(t).substr(3, 16) + " (" + head(t).substr(20) + "); " +
                                                (diff.empty() ? std::string("every configuration field agrees: the models differ (block or tensor names, shapes or "
                                                                          "groups), or the ranks run different builds of shardopt")
                                                              : "the fields that differ: " + diff) +
                                                me);
    }
  }
}

// cuda_device_for and make_nccl_communicator(Bootstrap&, ...) are in the CUDA component
// (bootstrap/nccl_bootstrap.cpp).

}  // namespace shardopt
