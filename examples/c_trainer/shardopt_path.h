/* The shardopt side of the C trainer (shardopt_path.c): one rank's engine over the trainer's model. */
#ifndef C_TRAINER_SHARDOPT_PATH_H
#define C_TRAINER_SHARDOPT_PATH_H
#include "model.h"
#include "shardopt/shardopt.h"

typedef struct SoOptions {
  int stage;
  float lr, beta1, beta2, eps, weight_decay;
  long bucket_bytes; /* 0: the library's default */
} SoOptions;

typedef struct SoRank {
  shardopt_config* cfg;
  shardopt_backend* be;
  shardopt_comm* comm;
  shardopt_engine* e;
  int blocks;
} SoRank;

/* Creates rank `rank`'s engine in `group`, registers the model's blocks and takes the initial
 * values from m->params (collective: every rank calls it). 0 on success, -1 after printing why. */
int so_open(SoRank* r, shardopt_group* group, int rank, const SoOptions* o, Model* m);
/* After the trainer's backward pass: the blocks reported ready (the engine reads the borrowed
 * m->grads), one step (collective), which writes the updated parameters into the borrowed
 * m->params. */
int so_step(SoRank* r, Model* m, shardopt_step_result* result);
void so_close(SoRank* r);

#endif
