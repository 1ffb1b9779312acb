/* c_trainer: the C trainer of model.h, with its own AdamW or with shardopt (shardopt_path.c).
 *
 *   c_trainer [--opt own|shardopt] [--stage S] [--ranks R] [--steps N] [--layers L] [--dim D]
 *             [--out O] [--batch B]
 *       trains and prints the loss per step, then the peak RSS of the process (getrusage) and,
 *       with shardopt, what the engine holds per rank (shardopt_engine_memory).
 *   c_trainer --check [same size options]
 *       trains with its own AdamW, then with shardopt at stages 0-3 on 1 and 2 in-process ranks,
 *       and compares the final parameters element-wise: exit status 0 only if every run agrees.
 *
 * R ranks are R threads of this process, each with its own model (its own params and grads
 * arrays) and 1/R of every step's batch, so one rank and two ranks see the same samples. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "model.h"
#include "shardopt_path.h"

typedef struct Run {
  Shape shape;
  int steps, batch, ranks, stage;
  SoOptions opt;
  double* losses;      /* steps, the mean over ranks */
  float* final_params; /* rank 0's parameters after the last step */
  int ranks_agree;     /* every rank ended with rank 0's parameters, bit for bit */
  size_t engine_bytes; /* peak bytes rank 0's engine held (every place) */
  size_t borrowed_bytes; /* the trainer's memory rank 0's engine used (its gradients) */
} Run;

static const float k_lr = 0.01f, k_beta1 = 0.9f, k_beta2 = 0.999f, k_eps = 1e-8f, k_wd = 0.01f;

/* ---- the trainer with its own optimizer ---- */
static int run_own(Run* run) {
  Model m;
  AdamW o;
  if (model_create(&m, run->shape, run->batch) != 0) return -1;
  if (adamw_create(&o, m.n_params, k_lr, k_beta1, k_beta2, k_eps, k_wd) != 0) {
    model_destroy(&m);
    return -1;
  }
  model_init(&m);
  for (int s = 0; s < run->steps; ++s) {
    model_data(&m, s, 0);
    run->losses[s] = model_forward(&m);
    model_backward(&m);
    adamw_step(&o, m.params, m.grads, m.n_params);
  }
  memcpy(run->final_params, m.params, m.n_params * sizeof(float));
  run->ranks_agree = 1;
  adamw_destroy(&o);
  model_destroy(&m);
  return 0;
}

/* ---- the same trainer through shardopt: one thread per rank ---- */
typedef struct RankJob {
  Run* run;
  shardopt_group* group;
  int rank;
  double* losses; /* this rank's, per step */
  float* params;  /* this rank's final parameters */
  size_t engine_bytes, borrowed_bytes;
  int result;
} RankJob;

static int train_rank(RankJob* j) {
  const Run* run = j->run;
  const int local = run->batch / run->ranks;
  Model m;
  SoRank r;
  if (model_create(&m, run->shape, local) != 0) return -1;
  model_init(&m);
  if (so_open(&r, j->group, j->rank, &run->opt, &m) != 0) {
    model_destroy(&m);
    return -1;
  }
  int rc = 0;
  for (int s = 0; s < run->steps && rc == 0; ++s) {
    model_data(&m, s, j->rank * local);
    j->losses[s] = model_forward(&m);
    model_backward(&m);
    shardopt_step_result res;
    rc = so_step(&r, &m, &res);
    if (rc == 0 && !res.applied) {
      fprintf(stderr, "c_trainer: rank %d: step %d was skipped (non-finite gradient)\n", j->rank, s);
      rc = -1;
    }
  }
  if (rc == 0) {
    memcpy(j->params, m.params, m.n_params * sizeof(float));
    for (int place = 0; place < 4; ++place) {
      size_t cur = 0, peak = 0;
      if (shardopt_engine_memory(r.e, place, &cur, &peak) == SHARDOPT_SUCCESS) j->engine_bytes += peak;
      if (shardopt_engine_memory_borrowed(r.e, place, &cur) == SHARDOPT_SUCCESS) j->borrowed_bytes += cur;
    }
  }
  so_close(&r);
  model_destroy(&m);
  return rc;
}

static void* rank_thread(void* arg) {
  RankJob* j = (RankJob*)arg;
  j->result = train_rank(j);
  if (j->result != 0) shardopt_group_abort(j->group, "a rank of the C trainer failed");
  return NULL;
}

static int run_shardopt(Run* run) {
  enum { kMaxRanks = 8 };
  if (run->ranks < 1 || run->ranks > kMaxRanks || run->batch % run->ranks != 0) {
    fprintf(stderr, "c_trainer: --ranks must be 1..%d and divide --batch\n", kMaxRanks);
    return -1;
  }
  shardopt_group* group = NULL;
  if (shardopt_group_create(run->ranks, 120000, &group) != SHARDOPT_SUCCESS) {
    fprintf(stderr, "c_trainer: %s\n", shardopt_last_error());
    return -1;
  }
  const size_t n = model_offset(&run->shape, T_OUT, 0) + model_numel(&run->shape, T_OUT);
  RankJob jobs[kMaxRanks];
  pthread_t threads[kMaxRanks];
  int rc = 0;
  for (int k = 0; k < run->ranks; ++k) {
    memset(&jobs[k], 0, sizeof jobs[k]);
    jobs[k].run = run;
    jobs[k].group = group;
    jobs[k].rank = k;
    jobs[k].losses = calloc((size_t)run->steps, sizeof(double));
    jobs[k].params = calloc(n, sizeof(float));
    if (!jobs[k].losses || !jobs[k].params) rc = -1;
  }
  for (int k = 0; k < run->ranks && rc == 0; ++k) pthread_create(&threads[k], NULL, rank_thread, &jobs[k]);
  if (rc == 0)
    for (int k = 0; k < run->ranks; ++k) {
      pthread_join(threads[k], NULL);
      if (jobs[k].result != 0) rc = -1;
    }
  if (rc == 0) {
    for (int s = 0; s < run->steps; ++s) {
      double sum = 0;
      for (int k = 0; k < run->ranks; ++k) sum += jobs[k].losses[s];
      run->losses[s] = sum / run->ranks; /* equal slices: the mean over the whole batch */
    }
    memcpy(run->final_params, jobs[0].params, n * sizeof(float));
    run->ranks_agree = 1;
    for (int k = 1; k < run->ranks; ++k)
      if (memcmp(jobs[k].params, jobs[0].params, n * sizeof(float)) != 0) run->ranks_agree = 0;
    run->engine_bytes = jobs[0].engine_bytes;
    run->borrowed_bytes = jobs[0].borrowed_bytes;
  }
  for (int k = 0; k < run->ranks; ++k) {
    free(jobs[k].losses);
    free(jobs[k].params);
  }
  shardopt_group_destroy(group);
  return rc;
}

/* ---- command line ---- */
static int arg_int(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (strcmp(argv[i], name) == 0) return atoi(argv[i + 1]);
  return fallback;
}
static const char* arg_str(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}
static int has_flag(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i)
    if (strcmp(argv[i], name) == 0) return 1;
  return 0;
}

static int alloc_run(Run* run, size_t n) {
  run->losses = calloc((size_t)run->steps, sizeof(double));
  run->final_params = calloc(n, sizeof(float));
  return run->losses && run->final_params ? 0 : -1;
}
static void free_run(Run* run) {
  free(run->losses);
  free(run->final_params);
}

/* The largest |a - b| relative to the bound, over every parameter; > 1 fails. The bound is
 * float32 noise. Both sides run AdamW in float32 on the same data from the same initial values,
 * so the first step's gradients are identical; the update rounds differently (the engine's
 * kernels group its operations their own way; two ranks sum each gradient in another order),
 * and from then on every step feeds the rounding back through the model. Two terms per step:
 *   8 eps32 |b|        a few ulps of the value itself;
 *   2^-13 lr           AdamW divides each gradient element by its own running RMS, so a
 *                      relative rounding error r in an element becomes an error of about r lr in
 *                      its update, and r is large for elements whose gradient nears zero; 2^-13
 *                      is about 1000 float32 ulps of such relative error.
 * A wrong update moves a parameter by up to lr per step (a missing bias correction: ~10 lr at
 * step 1; a missing weight decay: 1e-4 |p| per step, 10 times the bound where |p| > 0.1). */
static double worst_ratio(const float* a, const float* b, size_t n, int steps, size_t* where) {
  const double eps32 = 1.1920928955078125e-07;
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const double bound = steps * (8.0 * eps32 * fabs((double)b[i]) + (double)k_lr / 8192.0);
    const double ratio = fabs((double)a[i] - (double)b[i]) / bound;
    if (!(ratio <= worst)) { /* NaN counts as worst */
      worst = isnan(ratio) ? INFINITY : ratio;
      *where = i;
    }
  }
  return worst;
}

static long peak_rss_kib(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss; /* KiB on Linux */
}

int main(int argc, char** argv) {
  Run base;
  memset(&base, 0, sizeof base);
  base.shape.layers = arg_int(argc, argv, "--layers", 4);
  base.shape.dim = arg_int(argc, argv, "--dim", 32);
  base.shape.out = arg_int(argc, argv, "--out", 8);
  base.steps = arg_int(argc, argv, "--steps", 12);
  base.batch = arg_int(argc, argv, "--batch", 16);
  base.ranks = arg_int(argc, argv, "--ranks", 1);
  base.stage = arg_int(argc, argv, "--stage", 0);
  base.opt.lr = k_lr;
  base.opt.beta1 = k_beta1;
  base.opt.beta2 = k_beta2;
  base.opt.eps = k_eps;
  base.opt.weight_decay = k_wd;
  base.opt.bucket_bytes = arg_int(argc, argv, "--bucket", 0);
  if (base.shape.layers < 1 || base.shape.dim < 1 || base.shape.out < 1 || base.steps < 1 || base.batch < 1) {
    fprintf(stderr, "c_trainer: sizes and --steps must be positive\n");
    return 2;
  }
  const size_t n = model_offset(&base.shape, T_OUT, 0) + model_numel(&base.shape, T_OUT);

  if (has_flag(argc, argv, "--check")) {
    Run own = base;
    if (alloc_run(&own, n) != 0 || run_own(&own) != 0) return 1;
    printf("own AdamW: %zu parameters, loss %.6f -> %.6f\n", n, own.losses[0], own.losses[own.steps - 1]);
    int failed = 0;
    float* one_rank[4] = {NULL, NULL, NULL, NULL}; /* per stage: the 1-rank run's parameters */
    for (int ranks = 1; ranks <= 2; ++ranks)
      for (int stage = 0; stage <= 3; ++stage) {
        Run so = base;
        so.ranks = ranks;
        so.stage = stage;
        so.opt.stage = stage;
        so.opt.bucket_bytes = 4096; /* several units, so stages 2-3 really bucket and shard */
        if (alloc_run(&so, n) != 0 || run_shardopt(&so) != 0) return 1;
        size_t at = 0;
        const double r = worst_ratio(so.final_params, own.final_params, n, base.steps, &at);
        double loss_diff = 0;
        for (int s = 0; s < base.steps; ++s) loss_diff = fmax(loss_diff, fabs(so.losses[s] - own.losses[s]));
        /* Two ranks against one rank at the same stage: the same samples, summed in another order. */
        double r1 = 0;
        size_t at1 = 0;
        if (ranks == 1) {
          one_rank[stage] = so.final_params;
          so.final_params = NULL;
        } else {
          r1 = worst_ratio(so.final_params, one_rank[stage], n, base.steps, &at1);
        }
        const int ok = r <= 1.0 && r1 <= 1.0 && so.ranks_agree;
        const float* mine = ranks == 1 ? one_rank[stage] : so.final_params;
        printf("shardopt stage %d, %d rank(s): loss %.6f -> %.6f, max |loss - own| %.3g, worst parameter at %.3g of "
               "the bound (element %zu: %.9g vs own %.9g)",
               stage, ranks, so.losses[0], so.losses[so.steps - 1], loss_diff, r, at, (double)mine[at],
               (double)own.final_params[at]);
        if (ranks > 1) printf(", against 1 rank at %.3g of the bound", r1);
        printf("%s%s\n", so.ranks_agree ? "" : ", RANKS DISAGREE", ok ? "" : "  FAILED");
        failed += !ok;
        free_run(&so);
      }
    for (int stage = 0; stage < 4; ++stage) free(one_rank[stage]);
    free_run(&own);
    printf("%s\n", failed ? "c_trainer check FAILED" : "c_trainer check passed");
    return failed ? 1 : 0;
  }

  const char* opt = arg_str(argc, argv, "--opt", "own");
  Run run = base;
  run.opt.stage = base.stage;
  if (alloc_run(&run, n) != 0) return 1;
  const int shard = strcmp(opt, "shardopt") == 0;
  if (!shard && strcmp(opt, "own") != 0) {
    fprintf(stderr, "c_trainer: --opt is own or shardopt, not '%s'\n", opt);
    return 2;
  }
  if (!shard && run.ranks != 1) {
    fprintf(stderr, "c_trainer: the own optimizer runs one rank\n");
    return 2;
  }
  if ((shard ? run_shardopt(&run) : run_own(&run)) != 0) return 1;
  for (int s = 0; s < run.steps; ++s) printf("step %3d  loss %.6f\n", s, run.losses[s]);
  printf("parameters %zu  opt %s", n, opt);
  if (shard)
    printf("  stage %d  ranks %d  engine_peak_bytes_per_rank %zu  borrowed_bytes_per_rank %zu", run.stage, run.ranks,
           run.engine_bytes, run.borrowed_bytes);
  printf("  peak_rss_kib %ld\n", peak_rss_kib());
  free_run(&run);
  return 0;
}
