/* The trainer's optimizer replaced by shardopt, through the C interface (shardopt.h).
 *
 * The trainer keeps its tensor-major arrays. Each layer's W and b are registered as tensors of
 * block "layer<l>", and Wout as block "head", and both arrays are borrowed slice by slice
 * (shardopt_engine_borrow_*_strided: W_l at base + l*D*D):
 *   - gradients: the single backward pass writes them where the engine reads them at grads_ready;
 *     the engine keeps no full gradient of its own at stages 2-3;
 *   - parameters: the engine writes the updated values into the trainer's `params` at the end of
 *     every step (its own copy, not an alias: 4 x P bytes copied per rank and step; stages 0-2
 *     still hold the engine's full parameters too, stage 3 gathers each unit once per step).
 * The adapter copies nothing itself. The initial values come from the trainer's params array,
 * looked up by the tensor index the init callback receives. */
#include "shardopt_path.h"

#include <stdio.h>
#include <string.h>

#define SO_TRY(call)                                                                                    \
  do {                                                                                                  \
    const shardopt_status s_ = (call);                                                                  \
    if (s_ != SHARDOPT_SUCCESS) {                                                                       \
      fprintf(stderr, "c_trainer: %s: %s: %s\n", #call, shardopt_status_string(s_), shardopt_last_error()); \
      return -1;                                                                                        \
    }                                                                                                   \
  } while (0)

/* Tensor index k (registration order: W_0, b_0, W_1, b_1, ..., Wout) -> where it lives in params. */
static size_t tensor_offset(const Shape* s, int k) {
  if (k >= 2 * s->layers) return model_offset(s, T_OUT, 0);
  return model_offset(s, k % 2 == 0 ? T_W : T_B, k / 2);
}

static void init_from_params(void* user, int tensor, const char* name, size_t begin, size_t count, float* out) {
  (void)name;
  const Model* m = (const Model*)user;
  memcpy(out, m->params + tensor_offset(&m->s, tensor) + begin, count * sizeof(float));
}

int so_open(SoRank* r, shardopt_group* group, int rank, const SoOptions* o, Model* m) {
  char text[32];
  memset(r, 0, sizeof *r);
  SO_TRY(shardopt_config_create(&r->cfg));
  snprintf(text, sizeof text, "%d", o->stage);
  SO_TRY(shardopt_config_set(r->cfg, "stage", text));
  SO_TRY(shardopt_config_set(r->cfg, "optimizer", "adamw"));
  snprintf(text, sizeof text, "%.9g", (double)o->lr);
  SO_TRY(shardopt_config_set(r->cfg, "lr", text));
  snprintf(text, sizeof text, "%.9g", (double)o->beta1);
  SO_TRY(shardopt_config_set(r->cfg, "beta1", text));
  snprintf(text, sizeof text, "%.9g", (double)o->beta2);
  SO_TRY(shardopt_config_set(r->cfg, "beta2", text));
  snprintf(text, sizeof text, "%.9g", (double)o->eps);
  SO_TRY(shardopt_config_set(r->cfg, "eps", text));
  snprintf(text, sizeof text, "%.9g", (double)o->weight_decay);
  SO_TRY(shardopt_config_set(r->cfg, "weight_decay", text));
  if (o->bucket_bytes > 0) {
    snprintf(text, sizeof text, "%ld", o->bucket_bytes);
    SO_TRY(shardopt_config_set(r->cfg, "bucket_bytes", text));
  }
  SO_TRY(shardopt_backend_create_cpu(&r->be));
  SO_TRY(shardopt_comm_create_in_process(group, rank, r->be, &r->comm));
  SO_TRY(shardopt_engine_create(r->cfg, r->be, r->comm, &r->e));
  const Shape* s = &m->s;
  const int64_t wshape[2] = {s->dim, s->dim}, bshape[1] = {s->dim}, oshape[2] = {s->out, s->dim};
  for (int l = 0; l < s->layers; ++l) {
    char wname[32], bname[32], block[32];
    snprintf(wname, sizeof wname, "W.%d", l);
    snprintf(bname, sizeof bname, "b.%d", l);
    snprintf(block, sizeof block, "layer%d", l);
    const shardopt_tensor_desc d[2] = {{wname, 2, wshape, 0}, {bname, 1, bshape, 0}};
    SO_TRY(shardopt_engine_add_block(r->e, block, 2, d, NULL));
  }
  const shardopt_tensor_desc head = {"Wout", 2, oshape, 0};
  SO_TRY(shardopt_engine_add_block(r->e, "head", 1, &head, NULL));
  r->blocks = s->layers + 1;
  /* The gradients live in the trainer's tensor-major array: layer l's W at grads + l*D*D, its b at
   * grads + L*D*D + l*D, Wout after them. */
  SO_TRY(shardopt_engine_borrow_gradients_strided(r->e, 0, s->layers, 0, m->grads + model_offset(s, T_W, 0),
                                                  (size_t)s->dim * (size_t)s->dim));
  SO_TRY(shardopt_engine_borrow_gradients_strided(r->e, 0, s->layers, 1, m->grads + model_offset(s, T_B, 0),
                                                  (size_t)s->dim));
  SO_TRY(shardopt_engine_borrow_gradients(r->e, 2 * s->layers, m->grads + model_offset(s, T_OUT, 0)));
  SO_TRY(shardopt_engine_borrow_parameters_strided(r->e, 0, s->layers, 0, m->params + model_offset(s, T_W, 0),
                                                   (size_t)s->dim * (size_t)s->dim));
  SO_TRY(shardopt_engine_borrow_parameters_strided(r->e, 0, s->layers, 1, m->params + model_offset(s, T_B, 0),
                                                   (size_t)s->dim));
  SO_TRY(shardopt_engine_borrow_parameters(r->e, 2 * s->layers, m->params + model_offset(s, T_OUT, 0)));
  SO_TRY(shardopt_engine_initialize(r->e, init_from_params, m, 0));
  return 0;
}

int so_step(SoRank* r, Model* m, shardopt_step_result* result) {
  (void)m; /* its arrays are borrowed: the engine reads m->grads and writes m->params */
  /* The backward pass wrote every gradient into the borrowed array: report the blocks, last first
   * (the cheapest order: each unit is reduce-scattered once). */
  for (int b = r->blocks - 1; b >= 0; --b) SO_TRY(shardopt_engine_grads_ready(r->e, b));
  /* Collective; when it returns the updated parameters are in m->params. */
  SO_TRY(shardopt_engine_step(r->e, result));
  return 0;
}

void so_close(SoRank* r) {
  shardopt_engine_destroy(r->e);
  shardopt_comm_destroy(r->comm);
  shardopt_backend_destroy(r->be);
  shardopt_config_destroy(r->cfg);
  memset(r, 0, sizeof *r);
}
