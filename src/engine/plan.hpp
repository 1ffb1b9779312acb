#pragma once
// The engine's buffer plan (internal): which buffers a configuration needs, and how big. Shared by
// Engine::initialize (which allocates them) and plan_memory (which only adds them up).
#include <cstddef>
#include <string>
#include <vector>

#include "shardopt/config.hpp"
#include "shardopt/estimate.hpp"
#include "shardopt/layout.hpp"

namespace shardopt::detail {

enum class Buf : unsigned char {
  params_full,    // stages 0-2: every unit, compute dtype
  param_shard,    // stage 3: this rank's slices, compute dtype
  master,         // fp32 master weights (absent when the compute dtype is fp32)
  state,          // optimizer state `index`
  grads_full,     // stages 0-1: every unit, compute dtype
  grads_reduced,  // stage 0 with reduce dtype != compute: the all-reduced gradient
  reduce_buf,     // one unit in the reduce dtype (cast before reducing)
  grad_shard,     // stages 1-3: this rank's reduced gradient
  bucket,         // stages 2-3: gradient bucket `index`
  rs_tmp,         // stages 2-3 with accumulation: one reduce-scatter slice
  slot,           // stage 3: gathered unit `index`
  persistent,     // stage 3: unit `index` kept gathered
  scalars,        // step scalars on the device
  host_scalars,   // their host copy
  init_staging    // host staging for initial values (transient: freed by initialize)
};

struct BufferSpec {
  Buf kind;
  int index = 0;
  std::size_t elems = 0;
  DType dtype = DType::fp32;
  Category category = Category::other;
  Place place = Place::device;
  std::string name;
  bool transient = false;
};

struct EnginePlan {
  Layout layout;
  DType shard_grad_dtype = DType::fp32;
  std::size_t scalar_count = 0;
  std::vector<BufferSpec> buffers;
};

inline constexpr std::size_t kInitChunk = std::size_t(1) << 20;

LayoutOptions layout_options(const Config& config, int world_size);
EnginePlan plan_engine(const Config& config, const std::vector<BlockSpec>& blocks, int world_size);

}  // namespace shardopt::detail
