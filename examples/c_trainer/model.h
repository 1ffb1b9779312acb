/* A small trainer written in C99, laid out the way plain-C trainers lay out their memory: every
 * parameter tensor is stored for all layers contiguously ([L, ...]) in one `params` array, the
 * gradients likewise in one `grads` array, and one backward pass writes every gradient.
 *
 * The model: h_0 = x; h_{l+1} = h_l + tanh(W_l h_l + b_l) for l < L; y = Wout h_L; the loss is
 * the mean squared error against a fixed teacher, on deterministic synthetic data.
 *
 *   params = [ W: L x D x D | b: L x D | Wout: O x D ]      (tensor-major, one allocation)
 *
 * Sample k of step s is a function of (s, k) only, so R ranks that split a batch of B samples
 * into R equal slices see exactly the samples one rank would. */
#ifndef C_TRAINER_MODEL_H
#define C_TRAINER_MODEL_H
#include <stddef.h>
#include <stdint.h>

typedef struct Shape {
  int layers, dim, out; /* L, D, O */
} Shape;

/* The three tensors, in the order they are registered with shardopt (per layer: W, b; then Wout). */
enum { T_W = 0, T_B = 1, T_OUT = 2 };

typedef struct Model {
  Shape s;
  size_t n_params;
  float* params; /* n_params, tensor-major */
  float* grads;  /* n_params, same layout */
  /* activations of the last forward pass, kept for the backward pass */
  int batch;
  float *x, *h, *z, *y, *t; /* x: B*D, h: (L+1)*B*D, z = tanh(..): L*B*D, y and t: B*O */
  float *dh, *dt;           /* backward scratch: B*D and D */
} Model;

/* Offset of tensor `which` (T_W, T_B, T_OUT) of layer `l` in params/grads, and its element count. */
size_t model_offset(const Shape* s, int which, int l);
size_t model_numel(const Shape* s, int which);

/* Allocates params, grads and activations for `batch` samples; NULL members on failure (returns -1). */
int model_create(Model* m, Shape s, int batch);
void model_destroy(Model* m);
/* The initial values, a function of the element's tensor and index only. */
void model_init(Model* m);
/* Samples [first, first + batch) of step `step` into m->x and their teacher targets into m->t. */
void model_data(Model* m, int step, int first);
/* Forward over the loaded batch; returns the mean squared error. */
double model_forward(Model* m);
/* One backward pass: writes (not adds) every gradient of the mean loss into m->grads. */
void model_backward(Model* m);

/* The trainer's own optimizer: AdamW with decoupled weight decay and bias correction. */
typedef struct AdamW {
  float lr, beta1, beta2, eps, weight_decay;
  int64_t t;
  float *m, *v;
} AdamW;
int adamw_create(AdamW* o, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay);
void adamw_step(AdamW* o, float* params, const float* grads, size_t n);
void adamw_destroy(AdamW* o);

#endif
