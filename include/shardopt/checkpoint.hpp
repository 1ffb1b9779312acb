#pragma once
// Checkpoints written by Engine::save (see engine.hpp for save/load): reading one without an
// engine, verifying it, and exporting its parameters to a single .safetensors file.
//
// A checkpoint is a directory: one manifest (manifest.json, the commit point) and shard files
// written by the ranks that saved it. The manifest names every tensor and, for each of its fields
// (master weights and each optimizer state), the element ranges each file holds with an xxHash64
// checksum per chunk. Nothing in it depends on the world size that wrote it. The README's
// "Checkpoints" section documents the format.
//
// These functions only read the checkpoint directory; none of them needs a communicator or a
// backend, and all are safe to call from any thread on distinct outputs. Errors are
// shardopt::Error(io_error or invalid_argument) naming the file and, where one is at fault, the
// tensor.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "shardopt/config.hpp"
#include "shardopt/dtype.hpp"

namespace shardopt {

struct CheckpointTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::size_t numel = 0;
  int group = 0;
};

struct CheckpointInfo {
  std::string dir;
  int format_version = 0;
  std::string library_version;     // the shardopt that wrote it
  std::uint64_t generation = 0;    // increases by one per save into the same directory
  int world_size = 0;              // of the engine that wrote it (informational: load at any size)
  int stage = 0;                   // likewise
  DType compute_dtype = DType::fp32;
  DType master_dtype = DType::fp32;
  OptimizerKind optimizer = OptimizerKind::adamw;
  std::vector<std::string> fields;  // "master", then the rule's state names (e.g. "exp_avg")
  // How the optimizer states are stored (Config::state_precision); quant_block for int8, else 0.
  StatePrecision state_precision = StatePrecision::fp32;
  std::size_t quant_block = 0;
  std::int64_t step = 0;            // updates applied when saved
  float loss_scale = 1.0f;
  int good_steps = 0, overflow_run = 0;
  std::vector<CheckpointTensor> tensors;  // registration order
  std::size_t total_numel = 0;
  std::size_t files = 0;                  // shard files
  std::uint64_t bytes = 0;                // bytes of the shard files
  std::string trainer_metadata;           // what the trainer passed to save() ("" if nothing)
};

// Reads and validates the manifest of `dir` (not the shard files: see verify_checkpoint).
// Throws if there is no valid manifest: a directory without one is not a checkpoint.
CheckpointInfo inspect_checkpoint(const std::string& dir);

// Reads every range of every shard file and checks sizes and checksums. Memory: one chunk.
void verify_checkpoint(const std::string& dir);

// Writes the checkpoint's master weights as one safetensors file: an 8-byte little-endian header
// length, a JSON header ({"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}),
// then every tensor's data in manifest (registration) order, converted to `dtype` (fp32, bf16 or
// fp16, rounded to nearest even). Streaming: memory is one checksum chunk, whatever the model's
// size; every chunk is verified before it is written. The file appears atomically (written under
// a temporary name, fsynced, renamed); on error `out_file` is left as it was. An `out_file` inside
// `checkpoint_dir` (after resolving links) is refused with Error(invalid_argument).
void export_safetensors(const std::string& checkpoint_dir, const std::string& out_file,
                        DType dtype = DType::fp32);

}  // namespace shardopt
