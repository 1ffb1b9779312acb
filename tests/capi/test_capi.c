/* The C interface from a C program, compiled by a C compiler (C99, no C++ anywhere in this file).
 *
 * A small two-block model is trained through shardopt.h at stages 0-3 with one and two
 * in-process ranks (POSIX threads), and every master weight is compared element-wise with a
 * float64 AdamW written here from its definition, applied to the mean of the ranks' gradients.
 * Then the error paths: unknown keys, malformed values, a views array too small (the engine
 * unchanged and still usable), calls out of order, NULL handles, each a status and a message.
 * Ends with "N passed, N failed". */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shardopt/shardopt.h"

/* Counted from every rank thread: under a lock. */
static int g_passed = 0, g_failed = 0;
static pthread_mutex_t g_count_mu = PTHREAD_MUTEX_INITIALIZER;
static void count(int ok) {
  pthread_mutex_lock(&g_count_mu);
  if (ok) ++g_passed;
  else ++g_failed;
  pthread_mutex_unlock(&g_count_mu);
}

#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (cond) {                                              \
      count(1);                                              \
    } else {                                                 \
      count(0);                                              \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                          \
      fprintf(stderr, "\n");                                 \
    }                                                        \
  } while (0)

#define OK(call)                                                                                              \
  do {                                                                                                        \
    shardopt_status s_ = (call);                                                                              \
    if (s_ != SHARDOPT_SUCCESS) {                                                                             \
      count(0);                                                                                               \
      fprintf(stderr, "FAILED %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, shardopt_status_string(s_), \
              shardopt_last_error());                                                                         \
      return -1;                                                                                              \
    }                                                                                                         \
  } while (0)

/* ---- the model: block "b0" = {w0 [5,7], b0 [7] (group 1)}, block "b1" = {w1 [7,3]} ---- */
enum { NT = 3, STEPS = 4 };
static const char* const k_names[NT] = {"w0", "b0", "w1"};
static const int64_t k_shape[NT][2] = {{5, 7}, {7, 0}, {7, 3}};
static const int k_ndim[NT] = {2, 1, 2};
static const int k_group[NT] = {0, 1, 0};
static const size_t k_numel[NT] = {35, 7, 21};
static const int k_block_of[NT] = {0, 0, 1};

static const double k_lr = 0.01, k_beta1 = 0.9, k_beta2 = 0.99, k_eps = 1e-8;
static const double k_wd[2] = {0.1, 0.0}; /* group 0 decays, group 1 does not */

static double initial(int t, size_t i) { return 0.5 * sin(1.0 + 0.37 * (double)i + 1.9 * (double)t); }
/* Rank r's gradient of tensor t, element i, at step s: exact in fp32 (multiples of 1/64). */
static float grad_of(int rank, int t, size_t i, int s) {
  const int k = (int)((i * 7 + (size_t)t * 13 + (size_t)s * 5 + (size_t)rank * 11) % 29) - 14;
  return (float)k / 64.0f;
}

static void init_fn(void* user, int tensor, const char* name, size_t begin, size_t count, float* out) {
  int* bad = (int*)user;
  if (tensor < 0 || tensor >= NT || strcmp(name, k_names[tensor]) != 0) ++*bad;
  for (size_t i = 0; i < count; ++i) out[i] = (float)initial(tensor < 0 ? 0 : tensor, begin + i);
}

/* Float64 AdamW (decoupled weight decay, bias-corrected moments) over the mean gradient. */
static void reference(int world, double* out[NT]) {
  for (int t = 0; t < NT; ++t) {
    double* m = calloc(k_numel[t], sizeof(double));
    double* v = calloc(k_numel[t], sizeof(double));
    for (size_t i = 0; i < k_numel[t]; ++i) out[t][i] = (double)(float)initial(t, i);
    for (int s = 1; s <= STEPS; ++s) {
      const double bc1 = 1 - pow(k_beta1, s), bc2 = 1 - pow(k_beta2, s);
      for (size_t i = 0; i < k_numel[t]; ++i) {
        double g = 0;
        for (int r = 0; r < world; ++r) g += grad_of(r, t, i, s);
        g /= world;
        m[i] = k_beta1 * m[i] + (1 - k_beta1) * g;
        v[i] = k_beta2 * v[i] + (1 - k_beta2) * g * g;
        out[t][i] -= k_lr * k_wd[k_group[t]] * out[t][i];
        out[t][i] -= k_lr * (m[i] / bc1) / (sqrt(v[i] / bc2) + k_eps);
      }
    }
    free(m);
    free(v);
  }
}

typedef struct {
  shardopt_group* group;
  int rank, world, stage;
  float* master[NT]; /* assembled from every rank's pieces */
  pthread_mutex_t* mu;
  int init_bad;
  int result;
} RankJob;

static void collect(void* user, int tensor, size_t begin, size_t count, const float* values) {
  RankJob* j = (RankJob*)user;
  pthread_mutex_lock(j->mu);
  memcpy(j->master[tensor] + begin, values, count * sizeof(float));
  pthread_mutex_unlock(j->mu);
}

static int train_rank(RankJob* j) {
  shardopt_config* cfg = NULL;
  shardopt_backend* be = NULL;
  shardopt_comm* comm = NULL;
  shardopt_engine* e = NULL;
  char stage[8];
  snprintf(stage, sizeof stage, "%d", j->stage);
  OK(shardopt_config_create(&cfg));
  OK(shardopt_config_set(cfg, "stage", stage));
  OK(shardopt_config_set(cfg, "optimizer", "adamw"));
  OK(shardopt_config_set(cfg, "lr", "0.01"));
  OK(shardopt_config_set(cfg, "beta2", "0.99"));
  OK(shardopt_config_set(cfg, "weight_decay", "0.1"));
  OK(shardopt_config_set(cfg, "alignment", "4"));
  OK(shardopt_config_set(cfg, "bucket_bytes", "64")); /* several units: real bucketing */
  OK(shardopt_backend_create_cpu(&be));
  OK(shardopt_comm_create_in_process(j->group, j->rank, be, &comm));
  OK(shardopt_engine_create(cfg, be, comm, &e));
  for (int b = 0; b < 2; ++b) {
    shardopt_tensor_desc d[NT];
    int n = 0;
    for (int t = 0; t < NT; ++t)
      if (k_block_of[t] == b) {
        d[n].name = k_names[t];
        d[n].ndim = k_ndim[t];
        d[n].shape = k_shape[t];
        d[n].group = k_group[t];
        ++n;
      }
    int index = -1;
    OK(shardopt_engine_add_block(e, b == 0 ? "b0" : "b1", n, d, &index));
    CHECK(index == b, "block index %d, expected %d", index, b);
  }
  OK(shardopt_engine_set_group(e, 1, "weight_decay", "0"));
  { /* Borrowed gradients: bad ranges are refused and borrow nothing (this test trains in engine memory). */
    float scratch[64];
    CHECK(shardopt_engine_borrow_gradients_strided(e, 1, 2, 0, scratch, 8) == SHARDOPT_INVALID_ARGUMENT,
          "strided borrow past the last block accepted");
    CHECK(strstr(shardopt_last_error(), "outside") != NULL, "strided borrow error: %s", shardopt_last_error());
    CHECK(shardopt_engine_borrow_gradients_strided(e, 0, 2, 99, scratch, 8) == SHARDOPT_INVALID_ARGUMENT,
          "strided borrow of tensor 99 accepted");
    CHECK(shardopt_engine_borrow_gradients(e, NT, scratch) == SHARDOPT_INVALID_ARGUMENT,
          "borrow of tensor %d accepted", NT);
  }
  OK(shardopt_engine_initialize(e, init_fn, &j->init_bad, 0));
  int rank = -1, world = -1;
  OK(shardopt_engine_rank(e, &rank, &world));
  CHECK(rank == j->rank && world == j->world, "rank/world %d/%d", rank, world);

  for (int s = 1; s <= STEPS; ++s) {
    shardopt_view v[4];
    for (int b = 0; b < 2; ++b) { /* forward: parameters readable */
      OK(shardopt_engine_acquire(e, b, v, 4));
      CHECK(v[0].dtype == SHARDOPT_FP32 && v[0].data != NULL, "acquire view");
      OK(shardopt_engine_release(e, b));
    }
    for (int b = 1; b >= 0; --b) { /* backward, last block first */
      OK(shardopt_engine_acquire(e, b, v, 4));
      OK(shardopt_engine_gradients(e, b, v, 4));
      int k = 0;
      for (int t = 0; t < NT; ++t) {
        if (k_block_of[t] != b) continue;
        CHECK(v[k].numel == k_numel[t], "tensor %d numel %zu", t, v[k].numel);
        float* g = (float*)v[k].data;
        for (size_t i = 0; i < v[k].numel; ++i) g[i] += grad_of(j->rank, t, i, s);
        ++k;
      }
      OK(shardopt_engine_grads_ready(e, b));
      OK(shardopt_engine_release(e, b));
    }
    shardopt_step_result r;
    OK(shardopt_engine_step(e, &r));
    CHECK(r.applied == 1 && r.step == s, "step %d: applied %d step %lld", s, r.applied, (long long)r.step);
  }
  OK(shardopt_engine_read_master(e, collect, j));
  size_t cur = 0, peak = 0;
  OK(shardopt_engine_memory(e, 0, &cur, &peak));
  CHECK(cur > 0 && peak >= cur, "memory report %zu/%zu", cur, peak);
  size_t borrowed = 1;
  OK(shardopt_engine_memory_borrowed(e, 0, &borrowed));
  CHECK(borrowed == 0, "borrowed %zu bytes with nothing borrowed", borrowed);
  shardopt_engine_destroy(e);
  shardopt_comm_destroy(comm);
  shardopt_backend_destroy(be);
  shardopt_config_destroy(cfg);
  return 0;
}

static void* rank_thread(void* arg) {
  RankJob* j = (RankJob*)arg;
  j->result = train_rank(j);
  if (j->result != 0) shardopt_group_abort(j->group, "a rank of the C test failed");
  return NULL;
}

static void train_and_compare(int world, int stage) {
  shardopt_group* group = NULL;
  if (shardopt_group_create(world, 60000, &group) != SHARDOPT_SUCCESS) {
    CHECK(0, "group: %s", shardopt_last_error());
    return;
  }
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  float* master[NT];
  double* ref[NT];
  for (int t = 0; t < NT; ++t) {
    master[t] = malloc(k_numel[t] * sizeof(float));
    for (size_t i = 0; i < k_numel[t]; ++i) master[t][i] = NAN;
    ref[t] = malloc(k_numel[t] * sizeof(double));
  }
  RankJob jobs[2];
  pthread_t threads[2];
  for (int r = 0; r < world; ++r) {
    RankJob j = {group, r, world, stage, {master[0], master[1], master[2]}, &mu, 0, 0};
    jobs[r] = j;
    pthread_create(&threads[r], NULL, rank_thread, &jobs[r]);
  }
  for (int r = 0; r < world; ++r) pthread_join(threads[r], NULL);
  reference(world, ref);
  int bad = 0;
  double worst = 0;
  for (int t = 0; t < NT; ++t)
    for (size_t i = 0; i < k_numel[t]; ++i) {
      /* fp32 arithmetic against float64: a few roundings per step on values below 1, and the
       * division by sqrt(v) near zero, bounded by 1e-6 absolute plus 1e-6 relative (observed: below 1e-7). */
      const double err = fabs((double)master[t][i] - ref[t][i]);
      if (!(err <= 1e-6 + 1e-6 * fabs(ref[t][i]))) ++bad;
      if (err > worst || isnan(err)) worst = err;
    }
  for (int r = 0; r < world; ++r) {
    CHECK(jobs[r].result == 0, "world %d stage %d: rank %d failed", world, stage, r);
    CHECK(jobs[r].init_bad == 0, "world %d stage %d: the init callback got a wrong tensor index or name", world, stage);
  }
  CHECK(bad == 0, "world %d stage %d: %d elements off the float64 AdamW (worst %.3g)", world, stage, bad, worst);
  printf("world %d stage %d: largest difference from the float64 reference %.3g\n", world, stage, worst);
  for (int t = 0; t < NT; ++t) {
    free(master[t]);
    free(ref[t]);
  }
  shardopt_group_destroy(group);
}

static int contains(const char* s, const char* part) { return s && strstr(s, part) != NULL; }

static int error_paths(void) {
  CHECK(shardopt_abi_version() == SHARDOPT_ABI_VERSION, "ABI version %d", shardopt_abi_version());
  {
    /* libshardopt_c is the core alone (this test links it): the CUDA backend and the MPI
     * communicator are refused there, naming the library that has them. */
    shardopt_backend* gpu = NULL;
    CHECK(shardopt_backend_create_cuda(0, &gpu) == SHARDOPT_UNSUPPORTED && gpu == NULL, "CUDA backend in libshardopt_c");
    CHECK(contains(shardopt_last_error(), "libshardopt_c_full"), "CUDA refusal: %s", shardopt_last_error());
    shardopt_backend* cpu = NULL;
    shardopt_comm* mpi = NULL;
    if (shardopt_backend_create_cpu(&cpu) == SHARDOPT_SUCCESS) {
      CHECK(shardopt_comm_create_mpi(cpu, &mpi) == SHARDOPT_UNSUPPORTED && mpi == NULL, "MPI communicator in libshardopt_c");
      CHECK(contains(shardopt_last_error(), "libshardopt_c_full"), "MPI refusal: %s", shardopt_last_error());
      shardopt_backend_destroy(cpu);
    }
  }
  CHECK(strlen(shardopt_version()) >= 5, "version '%s'", shardopt_version());
  shardopt_config* cfg = NULL;
  OK(shardopt_config_create(&cfg));
  CHECK(shardopt_config_set(cfg, "stages", "2") == SHARDOPT_INVALID_ARGUMENT && contains(shardopt_last_error(), "stages"),
        "unknown key: %s", shardopt_last_error());
  CHECK(shardopt_config_set(cfg, "lr", "fast") == SHARDOPT_INVALID_ARGUMENT && contains(shardopt_last_error(), "lr"),
        "malformed value: %s", shardopt_last_error());
  CHECK(shardopt_config_set(cfg, "lr", "nan") == SHARDOPT_INVALID_ARGUMENT, "NaN lr accepted");
  CHECK(shardopt_config_set(cfg, "optimizer", "adagrad") == SHARDOPT_INVALID_ARGUMENT &&
            contains(shardopt_last_error(), "adagrad"),
        "unknown rule: %s", shardopt_last_error());
  CHECK(shardopt_config_set(NULL, "lr", "1") == SHARDOPT_INVALID_ARGUMENT && contains(shardopt_last_error(), "config"),
        "NULL config: %s", shardopt_last_error());
  OK(shardopt_config_set(cfg, "stage", "7")); /* ranges are checked when the engine is created */
  shardopt_backend* be = NULL;
  shardopt_group* group = NULL;
  shardopt_comm* comm = NULL;
  shardopt_engine* e = NULL;
  OK(shardopt_backend_create_cpu(&be));
  OK(shardopt_group_create(1, 0, &group));
  OK(shardopt_comm_create_in_process(group, 0, be, &comm));
  CHECK(shardopt_engine_create(cfg, be, comm, &e) == SHARDOPT_INVALID_ARGUMENT && e == NULL &&
            contains(shardopt_last_error(), "stage"),
        "stage 7: %s", shardopt_last_error());
  OK(shardopt_config_set(cfg, "stage", "2"));
  OK(shardopt_engine_create(cfg, be, comm, &e));
  const int64_t shape[1] = {10};
  shardopt_tensor_desc two[2] = {{"a", 1, shape, 0}, {"b", 1, shape, 0}};
  OK(shardopt_engine_add_block(e, "blk", 2, two, NULL));
  CHECK(shardopt_engine_add_block(e, "blk2", 1, two, NULL) == SHARDOPT_INVALID_ARGUMENT &&
            contains(shardopt_last_error(), "'a'"),
        "duplicate tensor: %s", shardopt_last_error());
  shardopt_view v[2];
  CHECK(shardopt_engine_acquire(e, 0, v, 2) == SHARDOPT_INVALID_STATE, "acquire before initialize: %s",
        shardopt_last_error());
  OK(shardopt_engine_initialize(e, NULL, NULL, 5));
  CHECK(shardopt_engine_add_block(e, "late", 1, two, NULL) == SHARDOPT_INVALID_STATE, "add_block after initialize: %s",
        shardopt_last_error());
  CHECK(shardopt_engine_acquire(e, 0, v, 1) == SHARDOPT_INVALID_ARGUMENT && contains(shardopt_last_error(), "2 tensors"),
        "small views array: %s", shardopt_last_error());
  CHECK(shardopt_engine_acquire(e, 5, v, 2) == SHARDOPT_INVALID_ARGUMENT, "block out of range: %s", shardopt_last_error());
  CHECK(shardopt_engine_step(e, NULL) != SHARDOPT_SUCCESS, "step without gradients went through");
  /* Still usable after every refusal: one full step. */
  OK(shardopt_engine_acquire(e, 0, v, 2));
  OK(shardopt_engine_gradients(e, 0, v, 2));
  for (int k = 0; k < 2; ++k)
    for (size_t i = 0; i < v[k].numel; ++i) ((float*)v[k].data)[i] = 1.0f;
  OK(shardopt_engine_grads_ready(e, 0));
  OK(shardopt_engine_release(e, 0));
  shardopt_step_result r;
  OK(shardopt_engine_step(e, &r));
  CHECK(r.applied == 1 && r.step == 1, "step after refusals");
  CHECK(shardopt_engine_save(e, "") == SHARDOPT_INVALID_ARGUMENT, "empty save dir");
  CHECK(shardopt_engine_load(e, "/nonexistent/shardopt-ckpt") == SHARDOPT_IO_ERROR &&
            contains(shardopt_last_error(), "manifest.json"),
        "load of a missing checkpoint: %s", shardopt_last_error());
  CHECK(shardopt_export_safetensors("/nonexistent", "/tmp/x.safetensors", "fp64") == SHARDOPT_INVALID_ARGUMENT,
        "bad export dtype: %s", shardopt_last_error());
  shardopt_engine_destroy(e);
  shardopt_comm_destroy(comm);
  shardopt_group_destroy(group);
  shardopt_backend_destroy(be);
  shardopt_config_destroy(cfg);
  shardopt_engine_destroy(NULL); /* no-ops */
  shardopt_config_destroy(NULL);
  return 0;
}

int main(void) {
  for (int world = 1; world <= 2; ++world)
    for (int stage = 0; stage <= 3; ++stage) train_and_compare(world, stage);
  error_paths();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
