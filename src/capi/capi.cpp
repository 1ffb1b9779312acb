// The C interface (include/shardopt/shardopt.h): opaque handles over the C++ objects, every call
// wrapped so that no exception crosses into C, and a per-thread last-error message.
#include "shardopt/shardopt.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include "core/config_fields.hpp"
#include "shardopt/shardopt.hpp"

struct shardopt_config {
  shardopt::Config cfg;
};
struct shardopt_backend {
  std::unique_ptr<shardopt::Backend> be;
};
struct shardopt_group {
  std::shared_ptr<shardopt::InProcessGroup> group;
};
struct shardopt_comm {
  std::unique_ptr<shardopt::Communicator> comm;
};
struct shardopt_engine {
  std::unique_ptr<shardopt::Engine> engine;
  std::vector<int> block_tensors;  // per block, for the capacity checks
  std::map<int, shardopt::Hyperparams> groups;  // set through shardopt_engine_set_group
  std::map<std::string, int> tensor_index;      // name -> registration order, for the init callback
};

namespace {

using shardopt::ErrorCode;

thread_local std::string t_last_error;

shardopt_status status_of(ErrorCode c) noexcept {
  switch (c) {
    case ErrorCode::invalid_argument: return SHARDOPT_INVALID_ARGUMENT;
    case ErrorCode::invalid_state: return SHARDOPT_INVALID_STATE;
    case ErrorCode::out_of_memory: return SHARDOPT_OUT_OF_MEMORY;
    case ErrorCode::io_error: return SHARDOPT_IO_ERROR;
    case ErrorCode::communication: return SHARDOPT_COMMUNICATION;
    case ErrorCode::unsupported: return SHARDOPT_UNSUPPORTED;
    case ErrorCode::internal: return SHARDOPT_INTERNAL;
  }
  return SHARDOPT_INTERNAL;
}

shardopt_status fail(shardopt_status s, const char* message) noexcept {
  try {
    t_last_error = message;
  } catch (...) {
    // No memory for the message: the status alone must do.
  }
  return s;
}

// Runs `f` and turns whatever it throws into a status and the thread's last error.
template <class F>
shardopt_status guarded(F&& f) noexcept {
  try {
    f();
    return SHARDOPT_SUCCESS;
  } catch (const shardopt::Error& e) {
    return fail(status_of(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return fail(SHARDOPT_OUT_OF_MEMORY, "out of host memory");
  } catch (const std::exception& e) {
    return fail(SHARDOPT_INTERNAL, e.what());
  } catch (...) {
    return fail(SHARDOPT_INTERNAL, "unknown exception");
  }
}

void need(const void* p, const char* what) {
  if (!p) throw shardopt::Error(ErrorCode::invalid_argument, std::string(what) + " is NULL");
}

std::string text_of(const char* s, const char* what) {
  need(s, what);
  return s;
}

// One hyperparameter; false if `key` is not one.
bool set_hyper(shardopt::Hyperparams& h, const std::string& key, const std::string& v) {
  return shardopt::fields::set_field(h, key, v);
}

// Every Config field by its name (core/config_fields.hpp), hyperparameters included.
void set_config(shardopt::Config& c, const std::string& key, const std::string& v) {
  if (!shardopt::fields::set_field(c, key, v))
    throw shardopt::Error(ErrorCode::invalid_argument, "unknown configuration key '" + key + "' (the keys: " +
                                                           shardopt::fields::field_names<shardopt::Config>() + ")");
}

shardopt::Engine& engine_of(shardopt_engine* e) {
  need(e, "engine");
  return *e->engine;
}

// `views` has room for the block's tensors: check_views said so before the engine was called.
void fill_views(const shardopt::BlockView& v, shardopt_view* views) {
  const int n = static_cast<int>(v.tensors.size());
  for (int i = 0; i < n; ++i) {
    const auto& t = v.tensors[static_cast<std::size_t>(i)];
    views[i].data = t.data;
    views[i].dtype = t.dtype == shardopt::DType::fp32   ? SHARDOPT_FP32
                     : t.dtype == shardopt::DType::bf16 ? SHARDOPT_BF16
                                                        : SHARDOPT_FP16;
    views[i].numel = t.numel;
  }
}

// The checks a view call does before touching the engine, so a too-small array changes nothing
// (acquire at stage 3 would otherwise gather and hold the unit).
void check_views(shardopt_engine* e, int block, const shardopt_view* views, int capacity) {
  need(e, "engine");
  need(views, "views");
  if (block < 0 || block >= static_cast<int>(e->block_tensors.size()))
    throw shardopt::Error(ErrorCode::invalid_argument, "block index " + std::to_string(block) + " is out of range [0, " +
                                                           std::to_string(e->block_tensors.size()) + ")");
  const int n = e->block_tensors[static_cast<std::size_t>(block)];
  if (n > capacity)
    throw shardopt::Error(ErrorCode::invalid_argument, "block " + std::to_string(block) + " has " + std::to_string(n) +
                                                           " tensors but the views array holds " + std::to_string(capacity));
}

void put_result(const shardopt::StepResult& r, shardopt_step_result* out) {
  if (!out) return;
  out->applied = r.applied ? 1 : 0;
  out->step = r.step;
  out->loss_scale = r.loss_scale;
  out->grad_norm = r.grad_norm;
  out->clip_coefficient = r.clip_coefficient;
}

}  // namespace

namespace {
// Tensor `tensor_in_block` of blocks first_block .. first_block+nblocks-1 at base + k*stride.
template <class Borrow>
void borrow_strided(shardopt_engine* e, int first_block, int nblocks, int tensor_in_block, void* base,
                    size_t stride_elems, Borrow&& borrow) {
  shardopt::Engine& eng = engine_of(e);
  need(base, "base");
  const int blocks = static_cast<int>(e->block_tensors.size());
  if (first_block < 0 || nblocks < 0 || first_block > blocks - nblocks)
    throw shardopt::Error(ErrorCode::invalid_argument, "blocks [" + std::to_string(first_block) + ", " +
                                                           std::to_string(first_block) + " + " + std::to_string(nblocks) +
                                                           ") are outside the " + std::to_string(blocks) + " added");
  // Every block is checked before anything is borrowed, so a failure changes nothing.
  std::vector<int> index;
  for (int k = 0; k < nblocks; ++k) {
    const int b = first_block + k;
    if (tensor_in_block < 0 || tensor_in_block >= e->block_tensors[static_cast<std::size_t>(b)])
      throw shardopt::Error(ErrorCode::invalid_argument, "block " + std::to_string(b) + " has no tensor " +
                                                             std::to_string(tensor_in_block));
    int first = 0;
    for (int q = 0; q < b; ++q) first += e->block_tensors[static_cast<std::size_t>(q)];
    index.push_back(first + tensor_in_block);
  }
  const std::size_t elem = shardopt::size_of(eng.config().compute_dtype);
  for (int k = 0; k < nblocks; ++k)
    borrow(eng, index[static_cast<std::size_t>(k)],
           static_cast<unsigned char*>(base) + static_cast<std::size_t>(k) * stride_elems * elem);
}
}  // namespace

extern "C" {

int shardopt_abi_version(void) { return SHARDOPT_ABI_VERSION; }

const char* shardopt_version(void) {
#define SHARDOPT_STR2(x) #x
#define SHARDOPT_STR(x) SHARDOPT_STR2(x)
  return SHARDOPT_STR(SHARDOPT_VERSION_MAJOR) "." SHARDOPT_STR(SHARDOPT_VERSION_MINOR) "." SHARDOPT_STR(
      SHARDOPT_VERSION_PATCH);
#undef SHARDOPT_STR
#undef SHARDOPT_STR2
}

const char* shardopt_status_string(shardopt_status s) {
  switch (s) {
    case SHARDOPT_SUCCESS: return "success";
    case SHARDOPT_INVALID_ARGUMENT: return "invalid argument";
    case SHARDOPT_INVALID_STATE: return "invalid state";
    case SHARDOPT_OUT_OF_MEMORY: return "out of memory";
    case SHARDOPT_IO_ERROR: return "I/O error";
    case SHARDOPT_COMMUNICATION: return "communication error";
    case SHARDOPT_UNSUPPORTED: return "unsupported";
    case SHARDOPT_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char* shardopt_last_error(void) { return t_last_error.c_str(); }

shardopt_status shardopt_config_create(shardopt_config** out) {
  return guarded([&] {
    need(out, "out");
    *out = new shardopt_config{};
  });
}
void shardopt_config_destroy(shardopt_config* c) { delete c; }
shardopt_status shardopt_config_set(shardopt_config* c, const char* key, const char* value) {
  return guarded([&] {
    need(c, "config");
    const std::string k = text_of(key, "key"), v = text_of(value, "value");
    shardopt::Config copy = c->cfg;  // a failed set leaves the configuration as it was
    set_config(copy, k, v);
    c->cfg = copy;
  });
}

shardopt_status shardopt_backend_create_cpu(shardopt_backend** out) {
  return guarded([&] {
    need(out, "out");
    auto b = std::make_unique<shardopt_backend>();
    b->be = shardopt::make_cpu_backend();
    *out = b.release();
  });
}
#if defined(SHARDOPT_C_CORE_ONLY)
namespace {
// libshardopt_c is the core alone (src/capi/CMakeLists.txt): the CUDA and MPI components are not in
// its link, so a CPU-only program needs none of their libraries installed.
[[noreturn]] void not_in_this_library(const char* call, const char* what) {
  throw shardopt::Error(ErrorCode::unsupported,
                        std::string(call) + ": libshardopt_c is the C interface without CUDA, NCCL and MPI (" + what +
                            " is not in its link); link libshardopt_c_full instead (pkg-config shardopt_c_full)");
}
}  // namespace
#endif

shardopt_status shardopt_backend_create_cuda(int device, shardopt_backend** out) {
  return guarded([&] {
    need(out, "out");
#if defined(SHARDOPT_C_CORE_ONLY)
    (void)device;
    not_in_this_library("shardopt_backend_create_cuda", "the CUDA backend");
#else
    auto b = std::make_unique<shardopt_backend>();
    b->be = shardopt::make_cuda_backend(device);
    *out = b.release();
#endif
  });
}
void shardopt_backend_destroy(shardopt_backend* b) { delete b; }

shardopt_status shardopt_group_create(int world_size, int64_t timeout_ms, shardopt_group** out) {
  return guarded([&] {
    need(out, "out");
    if (timeout_ms < 0)
      throw shardopt::Error(ErrorCode::invalid_argument, "timeout_ms must not be negative, got " + std::to_string(timeout_ms));
    const auto timeout = timeout_ms == 0 ? shardopt::kDefaultCollectiveTimeout : std::chrono::milliseconds(timeout_ms);
    auto g = std::make_unique<shardopt_group>();
    g->group = shardopt::make_in_process_group(world_size, shardopt::InProcessTransport::automatic, timeout);
    *out = g.release();
  });
}
void shardopt_group_destroy(shardopt_group* g) { delete g; }
void shardopt_group_abort(shardopt_group* g, const char* why) {
  if (!g) return;
  try {
    shardopt::abort_in_process_group(*g->group, why ? why : "aborted through the C interface");
  } catch (...) {
    // abort_in_process_group is noexcept; only building the string could throw.
  }
}

shardopt_status shardopt_comm_create_in_process(shardopt_group* g, int rank, shardopt_backend* b, shardopt_comm** out) {
  return guarded([&] {
    need(g, "group");
    need(b, "backend");
    need(out, "out");
    auto c = std::make_unique<shardopt_comm>();
    c->comm = shardopt::make_in_process_communicator(g->group, rank, *b->be);
    *out = c.release();
  });
}
shardopt_status shardopt_comm_create_mpi(shardopt_backend* b, shardopt_comm** out) {
  return guarded([&] {
    need(b, "backend");
    need(out, "out");
#if defined(SHARDOPT_C_CORE_ONLY)
    not_in_this_library("shardopt_comm_create_mpi", "the MPI communicator");
#else
    auto c = std::make_unique<shardopt_comm>();
    c->comm = shardopt::make_mpi_communicator(*b->be);
    *out = c.release();
#endif
  });
}
void shardopt_comm_destroy(shardopt_comm* c) { delete c; }

shardopt_status shardopt_engine_create(const shardopt_config* c, shardopt_backend* b, shardopt_comm* m,
                                       shardopt_engine** out) {
  return guarded([&] {
    need(c, "config");
    need(b, "backend");
    need(m, "comm");
    need(out, "out");
    auto e = std::make_unique<shardopt_engine>();
    e->engine = std::make_unique<shardopt::Engine>(c->cfg, *b->be, *m->comm);
    *out = e.release();
  });
}
void shardopt_engine_destroy(shardopt_engine* e) { delete e; }

shardopt_status shardopt_engine_add_block(shardopt_engine* e, const char* name, int ntensors,
                                          const shardopt_tensor_desc* tensors, int* block_index) {
  return guarded([&] {
    shardopt::Engine& eng = engine_of(e);
    shardopt::BlockSpec spec;
    spec.name = text_of(name, "block name");
    if (ntensors < 0) throw shardopt::Error(ErrorCode::invalid_argument, "block '" + spec.name + "': negative tensor count");
    if (ntensors > 0) need(tensors, "tensors");
    for (int i = 0; i < ntensors; ++i) {
      const shardopt_tensor_desc& d = tensors[i];
      shardopt::TensorSpec t;
      t.name = text_of(d.name, "tensor name");
      if (d.ndim < 0 || d.ndim > 8)
        throw shardopt::Error(ErrorCode::invalid_argument, "tensor '" + t.name + "': ndim " + std::to_string(d.ndim) +
                                                               " is outside [0, 8]");
      if (d.ndim > 0) need(d.shape, "tensor shape");
      t.shape.assign(d.shape, d.shape + d.ndim);
      t.group = d.group;
      spec.tensors.push_back(std::move(t));
    }
    std::vector<std::string> names;
    for (const auto& t : spec.tensors) names.push_back(t.name);
    const int index = eng.register_block(spec);
    e->block_tensors.push_back(ntensors);
    for (const auto& n : names) e->tensor_index.emplace(n, static_cast<int>(e->tensor_index.size()));
    if (block_index) *block_index = index;
  });
}

shardopt_status shardopt_engine_set_group(shardopt_engine* e, int group, const char* key, const char* value) {
  return guarded([&] {
    shardopt::Engine& eng = engine_of(e);
    const std::string k = text_of(key, "key"), v = text_of(value, "value");
    // Start from what the group has: group 0's hyperparameters until it is set here.
    auto it = e->groups.find(group);
    shardopt::Hyperparams h = it != e->groups.end() ? it->second : eng.config().hyper;
    if (!set_hyper(h, k, v))
      throw shardopt::Error(ErrorCode::invalid_argument, "'" + k + "' is not a hyperparameter (" +
                                                             shardopt::fields::field_names<shardopt::Hyperparams>() + ")");
    eng.set_group(group, h);
    e->groups[group] = h;
  });
}

shardopt_status shardopt_engine_borrow_gradients(shardopt_engine* e, int tensor, void* grads) {
  return guarded([&] { engine_of(e).borrow_gradients(tensor, grads); });
}


shardopt_status shardopt_engine_borrow_gradients_strided(shardopt_engine* e, int first_block, int nblocks,
                                                         int tensor_in_block, void* base, size_t stride_elems) {
  return guarded([&] {
    borrow_strided(e, first_block, nblocks, tensor_in_block, base, stride_elems,
                   [](shardopt::Engine& eng, int t, void* p) { eng.borrow_gradients(t, p); });
  });
}

shardopt_status shardopt_engine_borrow_parameters(shardopt_engine* e, int tensor, void* params) {
  return guarded([&] { engine_of(e).borrow_parameters(tensor, params); });
}

shardopt_status shardopt_engine_borrow_parameters_strided(shardopt_engine* e, int first_block, int nblocks,
                                                          int tensor_in_block, void* base, size_t stride_elems) {
  return guarded([&] {
    borrow_strided(e, first_block, nblocks, tensor_in_block, base, stride_elems,
                   [](shardopt::Engine& eng, int t, void* p) { eng.borrow_parameters(t, p); });
  });
}

shardopt_status shardopt_engine_initialize(shardopt_engine* e, shardopt_init_fn init, void* user, uint64_t seed) {
  return guarded([&] {
    shardopt::Engine& eng = engine_of(e);
    if (!init) {
      eng.initialize(shardopt::seeded_init(seed));
      return;
    }
    // The callback gets the tensor's index: registration order, as the layout numbers them.
    const auto& index = e->tensor_index;
    eng.initialize([&index, init, user](const shardopt::Layout::TensorInfo& t, std::size_t begin, std::size_t count,
                                        float* out) {
      const auto it = index.find(t.name);
      init(user, it == index.end() ? -1 : it->second, t.name.c_str(), begin, count, out);
    });
  });
}

shardopt_status shardopt_engine_rank(const shardopt_engine* e, int* rank, int* world_size) {
  return guarded([&] {
    need(e, "engine");
    if (rank) *rank = e->engine->rank();
    if (world_size) *world_size = e->engine->world_size();
  });
}

shardopt_status shardopt_engine_block_tensors(const shardopt_engine* e, int block, int* ntensors) {
  return guarded([&] {
    need(e, "engine");
    need(ntensors, "ntensors");
    if (block < 0 || block >= static_cast<int>(e->block_tensors.size()))
      throw shardopt::Error(ErrorCode::invalid_argument, "block index " + std::to_string(block) + " is out of range");
    *ntensors = e->block_tensors[static_cast<std::size_t>(block)];
  });
}

shardopt_status shardopt_engine_acquire(shardopt_engine* e, int block, shardopt_view* views, int capacity) {
  return guarded([&] {
    check_views(e, block, views, capacity);
    fill_views(e->engine->acquire(block), views);
  });
}
shardopt_status shardopt_engine_release(shardopt_engine* e, int block) {
  return guarded([&] { engine_of(e).release(block); });
}
shardopt_status shardopt_engine_gradients(shardopt_engine* e, int block, shardopt_view* views, int capacity) {
  return guarded([&] {
    check_views(e, block, views, capacity);
    fill_views(e->engine->gradients(block), views);
  });
}
shardopt_status shardopt_engine_grads_ready(shardopt_engine* e, int block) {
  return guarded([&] { engine_of(e).grads_ready(block); });
}
shardopt_status shardopt_engine_step(shardopt_engine* e, shardopt_step_result* result) {
  return guarded([&] { put_result(engine_of(e).step(), result); });
}
shardopt_status shardopt_engine_step_async(shardopt_engine* e) {
  return guarded([&] { engine_of(e).step_async(); });
}
shardopt_status shardopt_engine_last_result(shardopt_engine* e, shardopt_step_result* result) {
  return guarded([&] {
    need(result, "result");
    put_result(engine_of(e).last_result(), result);
  });
}
shardopt_status shardopt_engine_zero_grad(shardopt_engine* e) {
  return guarded([&] { engine_of(e).zero_grad(); });
}
shardopt_status shardopt_engine_read_master(shardopt_engine* e, shardopt_values_fn fn, void* user) {
  return guarded([&] {
    if (!fn) throw shardopt::Error(ErrorCode::invalid_argument, "fn is NULL");
    engine_of(e).read_master([fn, user](int t, std::size_t begin, std::size_t count, const float* v) {
      fn(user, t, begin, count, v);
    });
  });
}

shardopt_status shardopt_engine_save(shardopt_engine* e, const char* dir) {
  return guarded([&] { engine_of(e).save(text_of(dir, "dir")); });
}
shardopt_status shardopt_engine_load(shardopt_engine* e, const char* dir) {
  return guarded([&] { engine_of(e).load(text_of(dir, "dir")); });
}
shardopt_status shardopt_export_safetensors(const char* checkpoint_dir, const char* out_file, const char* dtype) {
  return guarded([&] {
    shardopt::DType t{};
    shardopt::fields::parse_value("dtype", text_of(dtype, "dtype"), t);
    shardopt::export_safetensors(text_of(checkpoint_dir, "checkpoint_dir"), text_of(out_file, "out_file"), t);
  });
}

shardopt_status shardopt_engine_memory(const shardopt_engine* e, int place, size_t* current, size_t* peak) {
  return guarded([&] {
    need(e, "engine");
    if (place < 0 || place >= shardopt::kPlaceCount)
      throw shardopt::Error(ErrorCode::invalid_argument, "place " + std::to_string(place) + " is outside [0, " +
                                                             std::to_string(shardopt::kPlaceCount) + ")");
    const shardopt::MemoryReport r = e->engine->memory_report();
    const auto p = static_cast<shardopt::Place>(place);
    if (current) *current = r.current_total(p);
    if (peak) *peak = r.peak_total[static_cast<std::size_t>(place)];
  });
}

shardopt_status shardopt_engine_memory_borrowed(const shardopt_engine* e, int place, size_t* bytes) {
  return guarded([&] {
    need(e, "engine");
    need(bytes, "bytes");
    if (place < 0 || place >= shardopt::kPlaceCount)
      throw shardopt::Error(ErrorCode::invalid_argument, "place " + std::to_string(place) + " is outside [0, " +
                                                             std::to_string(shardopt::kPlaceCount) + ")");
    *bytes = e->engine->memory_report().borrowed[static_cast<std::size_t>(place)];
  });
}

}  // extern "C"
