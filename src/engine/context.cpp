#include "engine/context.hpp"

#include <linux/capability.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace shardopt::detail {

EngineContext::EngineContext(const Config& config, Backend& backend, Communicator& communicator)
    : cfg(config), be(backend), comm(communicator) {
  cfg.validate();
  world = comm.size();
  rank = comm.rank();
  require(world >= 1, ErrorCode::invalid_argument, "communicator world size must be >= 1");
  require(!cfg.offload_params || cfg.offload_optimizer != OffloadKind::none, ErrorCode::unsupported,
          "offload_params=true requires offload_optimizer=host or nvme (the parameter shard is updated by the CPU)");
  compute_dtype = cfg.compute_dtype;
  reduce_dtype = cfg.reduce_dtype;
  state_count = shardopt::state_count(cfg.optimizer);
  compute = be.create_stream("shardopt.compute.r" + std::to_string(rank));
  side = be.create_stream("shardopt.comm.r" + std::to_string(rank));
  compute_done = be.create_event();
}

void EngineContext::plan(EnginePlan& p) {
  layout = std::move(p.layout);
  placement = p.placement;
  shard_elems = layout.shard_elems();
  unit_base.clear();
  full_elems = 0;
  for (const auto& u : layout.units()) {
    unit_base.push_back(full_elems);
    full_elems += u.padded_elems;
  }
}

void EngineContext::side_after_compute() {
  be.record(*compute_done, *compute);
  be.wait(*side, *compute_done);
}

void EngineContext::consume(Event& event) {
  be.wait(*compute, event);
  if (host_visible()) be.synchronize(event);
}

namespace {

// The locked-memory limit as it applies to the calling thread (which is the one that pins):
// RLIMIT_MEMLOCK's soft value and what the process has locked already (VmLck); not applied when
// infinite or when the thread holds CAP_IPC_LOCK in its effective set (e.g. root).
struct MemlockStatus {
  bool infinite = false, privileged = false;
  std::size_t limit = 0, locked = 0;
  bool limited() const { return !infinite && !privileged; }
};

MemlockStatus memlock_status() {
  MemlockStatus st;
  rlimit rl{};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) {
    st.infinite = true;
    return st;
  }
  st.limit = static_cast<std::size_t>(rl.rlim_cur);
  std::ifstream status("/proc/thread-self/status");  // capabilities are per thread
  if (!status) status.open("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) st.locked = std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
    if (line.rfind("CapEff:", 0) == 0) st.privileged = (std::strtoull(line.c_str() + 7, nullptr, 16) >> CAP_IPC_LOCK) & 1;
  }
  return st;
}

std::string bytes_text(std::size_t b) { return std::to_string(b) + " bytes"; }

std::string limit_text(const MemlockStatus& st) {
  if (st.infinite) return "the locked-memory limit (RLIMIT_MEMLOCK) is unlimited";
  return "the locked-memory limit (RLIMIT_MEMLOCK, ulimit -l) is " + bytes_text(st.limit) + ", " +
         bytes_text(st.locked) + " of it already locked by this process" +
         (st.privileged ? " (not applied: the thread holds CAP_IPC_LOCK)" : "");
}

constexpr const char* kFallbackHint =
    "; raise the limit, or set Config::pinned_fallback to use pageable host memory (slower transfers)";

}  // namespace

void EngineContext::check_pinned(const std::vector<BufferSpec>& specs) {
  pinned_pageable = false;
  if (!be.pinned_counts_against_memlock()) return;
  const MemlockStatus st = memlock_status();
  if (!st.limited()) return;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::size_t total = 0, count = 0;
  const BufferSpec* largest = nullptr;
  for (const auto& spec : specs) {
    if (spec.place != Place::pinned_host) continue;
    const std::size_t bytes = spec.elems * size_of(spec.dtype);
    total += (bytes + page - 1) / page * page;  // pages are what is locked
    count++;
    if (!largest || bytes > largest->elems * size_of(largest->dtype)) largest = &spec;
  }
  if (count == 0 || (st.locked <= st.limit && total <= st.limit - st.locked)) return;
  if (cfg.pinned_fallback) {
    pinned_pageable = true;
    return;
  }
  throw Error(ErrorCode::out_of_memory,
              "pinned host memory: the plan pins " + bytes_text(total) + " in " + std::to_string(count) +
                  " buffers (the largest '" + largest->name + "', " + bytes_text(largest->elems * size_of(largest->dtype)) +
                  ") but " + limit_text(st) + kFallbackHint);
}

Buffer EngineContext::allocate(const BufferSpec& spec) {
  const std::size_t bytes = spec.elems * size_of(spec.dtype);
  const std::string name = spec.name + " (rank " + std::to_string(rank) + ")";
  Place place = spec.place == Place::pinned_host && pinned_pageable ? Place::host : spec.place;
  Buffer b;
  try {
    b = be.allocate(bytes, place, spec.category, name);
  } catch (const Error& e) {
    if (place != Place::pinned_host || e.code() != ErrorCode::out_of_memory) throw;
    if (!cfg.pinned_fallback)
      throw Error(ErrorCode::out_of_memory, "pinned host memory: cannot pin '" + name + "' (" + bytes_text(bytes) +
                                                "): " + limit_text(memlock_status()) + " (" +
                                                e.message() + ")" + kFallbackHint);
    pinned_pageable = true;  // this one and every pinned buffer after it
    place = Place::host;
    b = be.allocate(bytes, place, spec.category, name + " (pageable)");
  }
  if (b && place != Place::device) std::memset(b.data(), 0, b.bytes());
  else if (b) be.fill(b.data(), spec.dtype, spec.elems, 0.0f, *side);
  return b;
}

}  // namespace shardopt::detail
