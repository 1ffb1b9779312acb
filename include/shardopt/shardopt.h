/* shardopt.h: the C interface of shardopt (C99; usable from C, C++, and any language with a C FFI:
 * Python ctypes, Rust, Zig, Go cgo).
 *
 * Conventions
 * - Every function returns a shardopt_status; SHARDOPT_SUCCESS is 0. On failure nothing the call
 *   would have changed is changed, and shardopt_last_error() returns the message (which names
 *   the argument, block, tensor, file or rank at fault). No C++ exception crosses this boundary.
 * - Objects are opaque handles created by *_create and released by *_destroy (destroying NULL is
 *   a no-op). A handle that others use must outlive them: backend and communicator outlive the
 *   engine; a group outlives its communicators.
 * - Strings passed in are copied; strings returned stay valid until the next call on the same
 *   thread (last error) or for the life of the library (status names, version).
 * - Thread safety: one engine is driven by one thread at a time; distinct engines (the ranks of
 *   an in-process group) are driven from distinct threads concurrently. The last error is kept
 *   per thread.
 * - Link: the shared library libshardopt_c (CMake target shardopt::shardopt_c, pkg-config
 *   shardopt_c) exports exactly these symbols.
 *
 * The calls mirror the C++ Engine (include/shardopt/engine.hpp), which documents the contracts in
 * full: the per-stage behaviour, the gradient contract, streams, and what is saved. */
#ifndef SHARDOPT_SHARDOPT_H
#define SHARDOPT_SHARDOPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SHARDOPT_C_API __attribute__((visibility("default")))
#else
#define SHARDOPT_C_API
#endif

/* The interface's version: raised whenever a declaration here changes incompatibly. A program
 * compiled against this header can check at run time that the library it loaded agrees. */
#define SHARDOPT_ABI_VERSION 1

typedef enum shardopt_status {
  SHARDOPT_SUCCESS = 0,
  SHARDOPT_INVALID_ARGUMENT = 1, /* a value passed is out of range or inconsistent */
  SHARDOPT_INVALID_STATE = 2,    /* the call is not allowed now (e.g. add_block after initialize) */
  SHARDOPT_OUT_OF_MEMORY = 3,    /* an allocation failed; the message names what and how much */
  SHARDOPT_IO_ERROR = 4,         /* a file operation failed; the message names the file */
  SHARDOPT_COMMUNICATION = 5,    /* a collective failed, timed out, or ranks disagree */
  SHARDOPT_UNSUPPORTED = 6,      /* valid, but this build or backend cannot serve it */
  SHARDOPT_INTERNAL = 7          /* a bug in shardopt; please report the message */
} shardopt_status;

/* Element types of views (the compute dtype of the configuration). */
typedef enum shardopt_dtype { SHARDOPT_FP32 = 0, SHARDOPT_BF16 = 1, SHARDOPT_FP16 = 2 } shardopt_dtype;

SHARDOPT_C_API int shardopt_abi_version(void);
SHARDOPT_C_API const char* shardopt_version(void);
SHARDOPT_C_API const char* shardopt_status_string(shardopt_status status);
/* The message of the last failed call on this thread ("" if none failed yet). */
SHARDOPT_C_API const char* shardopt_last_error(void);

/* ---- configuration ---------------------------------------------------------------------------
 * Created with the C++ defaults (stage 0, fp32, AdamW, lr 1e-3, ...). Values are given as text.
 * Every field of the C++ Config is a key, by its C++ member name, so this interface does not
 * change when a field is added:
 *   stage 0..3 | compute_dtype, master_dtype, reduce_dtype fp32|bf16|fp16 | bucket_bytes |
 *   alignment | optimizer (a rule's name, e.g. adamw, adam, sgd, lion) |
 *   lr, beta1, beta2, eps, weight_decay, momentum, dampening (numbers) | nesterov 0|1 |
 *   schedule constant|cosine|linear|inverse-sqrt | warmup_steps | total_steps | min_lr |
 *   loss_scaling none|fixed|dynamic | initial_scale | growth_factor | growth_interval | backoff |
 *   hysteresis | min_scale | max_grad_norm | accumulation_steps |
 *   offload_optimizer none|host|nvme | nvme_dir | offload_params 0|1 | pinned_fallback 0|1 | prefetch_units |
 *   persistence_threshold | gradient_buckets (0: one per unit) | state_precision fp32|bf16|int8 |
 *   quant_block (int8: 64..4096, a power of two)
 * An unknown key or a malformed value is SHARDOPT_INVALID_ARGUMENT naming it; ranges are checked
 * when the engine is created (the same checks as the C++ Config::validate). */
typedef struct shardopt_config shardopt_config;
SHARDOPT_C_API shardopt_status shardopt_config_create(shardopt_config** out);
SHARDOPT_C_API void shardopt_config_destroy(shardopt_config* config);
SHARDOPT_C_API shardopt_status shardopt_config_set(shardopt_config* config, const char* key, const char* value);

/* ---- backends and communicators ------------------------------------------------------------- */
typedef struct shardopt_backend shardopt_backend;
/* The CPU backend; its kernels share one process-wide thread pool (threads = 0: one per core). */
SHARDOPT_C_API shardopt_status shardopt_backend_create_cpu(shardopt_backend** out);
/* The CUDA backend on `device`; SHARDOPT_UNSUPPORTED in a build without CUDA, without a GPU, or in
 * libshardopt_c (the CPU-only library: link libshardopt_c_full for CUDA and MPI). */
SHARDOPT_C_API shardopt_status shardopt_backend_create_cuda(int device, shardopt_backend** out);
SHARDOPT_C_API void shardopt_backend_destroy(shardopt_backend* backend);

/* N ranks as threads of this process. Every wait is bounded by `timeout_ms` (0: ten minutes). */
typedef struct shardopt_group shardopt_group;
SHARDOPT_C_API shardopt_status shardopt_group_create(int world_size, int64_t timeout_ms, shardopt_group** out);
SHARDOPT_C_API void shardopt_group_destroy(shardopt_group* group);
/* Fails every pending and future collective of the group (a rank that gives up calls it). */
SHARDOPT_C_API void shardopt_group_abort(shardopt_group* group, const char* why);

typedef struct shardopt_comm shardopt_comm;
SHARDOPT_C_API shardopt_status shardopt_comm_create_in_process(shardopt_group* group, int rank, shardopt_backend* backend,
                                                               shardopt_comm** out);
/* All processes of MPI_COMM_WORLD (MPI initialized with MPI_THREAD_MULTIPLE by the caller).
 * SHARDOPT_UNSUPPORTED in libshardopt_c (link libshardopt_c_full) or a build without MPI. */
SHARDOPT_C_API shardopt_status shardopt_comm_create_mpi(shardopt_backend* backend, shardopt_comm** out);
SHARDOPT_C_API void shardopt_comm_destroy(shardopt_comm* comm);

/* ---- the engine ------------------------------------------------------------------------------ */
typedef struct shardopt_engine shardopt_engine;

typedef struct shardopt_tensor_desc {
  const char* name;      /* unique across the model */
  int ndim;              /* 0..8 */
  const int64_t* shape;  /* ndim extents, row-major */
  int group;             /* parameter group (hyperparameters); 0 by default */
} shardopt_tensor_desc;

typedef struct shardopt_view {
  void* data;           /* host memory (CPU backend) or device memory (CUDA backend) */
  shardopt_dtype dtype; /* the compute dtype */
  size_t numel;
} shardopt_view;

typedef struct shardopt_step_result {
  int applied;            /* 0: skipped because a gradient was not finite on some rank */
  int64_t step;           /* updates applied so far */
  float loss_scale;       /* multiply the next loss by this */
  double grad_norm;       /* global L2 norm of the mean gradient, before clipping */
  float clip_coefficient; /* 1 when not clipped */
} shardopt_step_result;

/* Fills `count` fp32 values of tensor `tensor` (its index in registration order over all blocks,
 * `name` its name) from row-major element `begin`. Called only for the ranges this rank stores
 * (stage 0: every whole tensor; stages 1-3: each element on exactly one rank), possibly several
 * times per tensor, on the thread calling initialize and before it returns. `out` is host memory
 * on every backend. */
typedef void (*shardopt_init_fn)(void* user, int tensor, const char* name, size_t begin, size_t count, float* out);
/* Receives `count` fp32 values of tensor `tensor` from element `begin` (read_master). */
typedef void (*shardopt_values_fn)(void* user, int tensor, size_t begin, size_t count, const float* values);

SHARDOPT_C_API shardopt_status shardopt_engine_create(const shardopt_config* config, shardopt_backend* backend,
                                                      shardopt_comm* comm, shardopt_engine** out);
SHARDOPT_C_API void shardopt_engine_destroy(shardopt_engine* engine);
/* Before initialize. `block_index` (may be NULL) receives the block's index. */
SHARDOPT_C_API shardopt_status shardopt_engine_add_block(shardopt_engine* engine, const char* name, int ntensors,
                                                         const shardopt_tensor_desc* tensors, int* block_index);
/* Before initialize: group `group`'s hyperparameters, starting from group 0's, with one key
 * (a hyperparameter key of shardopt_config_set: lr ... nesterov, schedule ... min_lr) set to
 * `value`. */
SHARDOPT_C_API shardopt_status shardopt_engine_set_group(shardopt_engine* engine, int group, const char* key,
                                                         const char* value);
/* Before initialize: tensor `tensor` (its index in registration order over all blocks) keeps its
 * gradient in the caller's memory at `grads` (numel elements of the compute dtype, contiguous; host
 * memory on the CPU backend, device memory on CUDA), valid and at this address for the engine's
 * life; the engine does not own it. NULL gives the tensor back to engine memory.
 * gradients() then returns `grads` for the tensor (a block whose every tensor is borrowed takes no
 * bucket, so a single-pass backward may write every block's gradient before any grads_ready with
 * the default buckets), and grads_ready(block) reads it (stages 2-3: with every tensor borrowed
 * and no optimizer offload, a unit is reduce-scattered straight from the caller's
 * memory once its last block is ready, and the engine keeps no buckets; otherwise into the unit's
 * bucket, reduce-scattered as usual; in any block order; stages 0-1 with some tensor not
 * borrowed: into the full gradient). The caller ADDS its gradient there; the engine zeroes
 * borrowed memory at initialize, after reading it at grads_ready (stages 2-3), at the end of step
 * (stages 0-1) and at zero_grad. Write it only between the end of a step and grads_ready(block)
 * (stages 0-1 with every tensor borrowed: and step, which reads it then; stages 2-3 reducing
 * from the caller's memory: with micro-steps, write a block again only after the micro-step's last
 * grads_ready, where the engine orders the compute stream after its reductions). Memory: at
 * stages 2-3 the only full gradient is the caller's; at stages 0-1 with every tensor's gradient
 * borrowed (on every rank) too: stage 1 reduce-scatters it unit by unit straight from the caller's
 * memory at step (through one unit-sized buffer under offload); stage 0 all-reduces each tensor in
 * place in the caller's memory and updates from there (so after grads_ready the memory holds engine values until step returns). Stages 0-1
 * with some tensor not borrowed keep the engine's own full gradient. Details: engine.hpp,
 * Engine::borrow_gradients. */
SHARDOPT_C_API shardopt_status shardopt_engine_borrow_gradients(shardopt_engine* engine, int tensor, void* grads);
/* The same for a tensor-major array (every layer's tensor of one kind stored one after another,
 * [L, ...]): tensor `tensor_in_block` of blocks first_block .. first_block+nblocks-1 gets the
 * slice base + k * stride_elems elements (k = 0 .. nblocks-1, elements of the compute dtype).
 * Every block must already be added; nothing is borrowed if any argument is out of range. */
SHARDOPT_C_API shardopt_status shardopt_engine_borrow_gradients_strided(shardopt_engine* engine, int first_block,
                                                                        int nblocks, int tensor_in_block, void* base,
                                                                        size_t stride_elems);
/* Before initialize: tensor `tensor`'s compute-dtype parameters are also kept in the caller's
 * memory at `params` (numel elements, contiguous, valid and at this address for the engine's
 * life; NULL undoes it). The engine writes the current values there at the end of initialize, of
 * every applied step and of load (before step returns on the CPU backend); the caller only reads
 * them. acquire returns `params`; a block whose every tensor is borrowed is never gathered at
 * acquire (stage 3 included). Stages 0-2 with every tensor borrowed (on every rank) keep no
 * parameters of their own: the update writes this rank's elements into the caller's memory
 * directly (with fp32 compute on the device that memory is the master weights: do not write it),
 * and stages 1-2 gather the other ranks' elements through one unit-sized slot. Stages 0-2 with
 * some tensor not borrowed keep the engine's own full parameters too and copy them out; stage 3
 * gathers each borrowed unit once per step to write it out. Details: engine.hpp,
 * Engine::borrow_parameters. */
SHARDOPT_C_API shardopt_status shardopt_engine_borrow_parameters(shardopt_engine* engine, int tensor, void* params);
/* As shardopt_engine_borrow_gradients_strided, for parameters. */
SHARDOPT_C_API shardopt_status shardopt_engine_borrow_parameters_strided(shardopt_engine* engine, int first_block,
                                                                         int nblocks, int tensor_in_block, void* base,
                                                                         size_t stride_elems);
/* Collective. `init` NULL: the seeded initializer with `seed` (independent of world and stage). */
SHARDOPT_C_API shardopt_status shardopt_engine_initialize(shardopt_engine* engine, shardopt_init_fn init, void* user,
                                                          uint64_t seed);
SHARDOPT_C_API shardopt_status shardopt_engine_rank(const shardopt_engine* engine, int* rank, int* world_size);
SHARDOPT_C_API shardopt_status shardopt_engine_block_tensors(const shardopt_engine* engine, int block, int* ntensors);

/* The block's parameters (stage 3: gathered). `views` has room for `capacity` entries; the
 * block's tensor count must fit. Valid until release(block); at stages 0-2 the addresses are
 * the same for the engine's life, at stage 3 they may change at every acquire (except for units
 * below persistence_threshold) and are valid only until release. A tensor whose parameters are
 * borrowed (shardopt_engine_borrow_parameters) is the caller's memory, at every stage. A block may stay acquired across
 * step() at stages 0-2 (the views then hold the updated values when step returns); at stage 3
 * step() fails with SHARDOPT_INVALID_STATE while a block is acquired. Details: engine.hpp, "View
 * addresses" and "Holding a block across step()". */
SHARDOPT_C_API shardopt_status shardopt_engine_acquire(shardopt_engine* engine, int block, shardopt_view* views,
                                                       int capacity);
SHARDOPT_C_API shardopt_status shardopt_engine_release(shardopt_engine* engine, int block);
/* Where to ADD this micro-step's gradients (see engine.hpp's gradient contract); valid until
 * grads_ready(block). Stages 0-1: the same addresses every step; stages 2-3: one of
 * `gradient_buckets` buckets (config key; default 2), so the addresses may change every
 * micro-step. Blocks may report in any order (engine.hpp, "Backward order"): cheapest is each
 * unit's blocks reported before more than gradient_buckets units are open (last block first, as a
 * layer-by-layer backward goes); any other order costs one extra reduce-scatter of a unit per
 * unit flushed early, with the same result bits. Holding the views of more units than buckets at
 * once (every gradients() before any grads_ready) is SHARDOPT_INVALID_STATE unless
 * gradient_buckets is 0 (one bucket per unit). Every block reports grads_ready before step. */
SHARDOPT_C_API shardopt_status shardopt_engine_gradients(shardopt_engine* engine, int block, shardopt_view* views,
                                                         int capacity);
SHARDOPT_C_API shardopt_status shardopt_engine_grads_ready(shardopt_engine* engine, int block);
/* Collective. `result` may be NULL. */
SHARDOPT_C_API shardopt_status shardopt_engine_step(shardopt_engine* engine, shardopt_step_result* result);
SHARDOPT_C_API shardopt_status shardopt_engine_step_async(shardopt_engine* engine);
SHARDOPT_C_API shardopt_status shardopt_engine_last_result(shardopt_engine* engine, shardopt_step_result* result);
SHARDOPT_C_API shardopt_status shardopt_engine_zero_grad(shardopt_engine* engine);
/* This rank's fp32 master values, piece by piece (for checks and custom checkpoints). */
SHARDOPT_C_API shardopt_status shardopt_engine_read_master(shardopt_engine* engine, shardopt_values_fn fn, void* user);

/* Collective checkpoints (format and guarantees: include/shardopt/checkpoint.hpp). */
SHARDOPT_C_API shardopt_status shardopt_engine_save(shardopt_engine* engine, const char* dir);
SHARDOPT_C_API shardopt_status shardopt_engine_load(shardopt_engine* engine, const char* dir);
/* The checkpoint's master weights as one safetensors file; dtype "fp32", "bf16" or "fp16". */
SHARDOPT_C_API shardopt_status shardopt_export_safetensors(const char* checkpoint_dir, const char* out_file,
                                                           const char* dtype);

/* Bytes this rank's engine holds now and at most so far, summed over every category, at one
 * place: 0 device, 1 pinned host, 2 host, 3 disk. On the CPU backend place 0 is ordinary host
 * memory too (the backend's working memory: parameters, gradients, state). */
SHARDOPT_C_API shardopt_status shardopt_engine_memory(const shardopt_engine* engine, int place, size_t* current,
                                                      size_t* peak);
/* Bytes of the caller's memory the engine uses at `place` (borrowed gradients and parameters),
 * never counted by shardopt_engine_memory. */
SHARDOPT_C_API shardopt_status shardopt_engine_memory_borrowed(const shardopt_engine* engine, int place,
                                                               size_t* bytes);

#ifdef __cplusplus
}
#endif

#endif /* SHARDOPT_SHARDOPT_H */
