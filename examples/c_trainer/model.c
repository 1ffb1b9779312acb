/* The model, its data and its own AdamW (model.h). Plain C99, float32 throughout. */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

size_t model_numel(const Shape* s, int which) {
  const size_t D = (size_t)s->dim;
  return which == T_W ? D * D : which == T_B ? D : (size_t)s->out * D;
}

size_t model_offset(const Shape* s, int which, int l) {
  const size_t L = (size_t)s->layers, D = (size_t)s->dim;
  if (which == T_W) return (size_t)l * D * D;
  if (which == T_B) return L * D * D + (size_t)l * D;
  return L * D * D + L * D;
}

int model_create(Model* m, Shape s, int batch) {
  memset(m, 0, sizeof *m);
  m->s = s;
  m->batch = batch;
  m->n_params = model_offset(&s, T_OUT, 0) + model_numel(&s, T_OUT);
  const size_t B = (size_t)batch, D = (size_t)s.dim, L = (size_t)s.layers, O = (size_t)s.out;
  m->params = calloc(m->n_params, sizeof(float));
  m->grads = calloc(m->n_params, sizeof(float));
  m->x = calloc(B * D, sizeof(float));
  m->h = calloc((L + 1) * B * D, sizeof(float));
  m->z = calloc(L * B * D, sizeof(float));
  m->y = calloc(B * O, sizeof(float));
  m->t = calloc(B * O, sizeof(float));
  m->dh = calloc(B * D, sizeof(float));
  m->dt = calloc(D, sizeof(float));
  if (!m->params || !m->grads || !m->x || !m->h || !m->z || !m->y || !m->t || !m->dh || !m->dt) {
    model_destroy(m);
    return -1;
  }
  return 0;
}

void model_destroy(Model* m) {
  free(m->params);
  free(m->grads);
  free(m->x);
  free(m->h);
  free(m->z);
  free(m->y);
  free(m->t);
  free(m->dh);
  free(m->dt);
  memset(m, 0, sizeof *m);
}

/* A counter-based uniform in [-1, 1): the same value for the same (a, b, c) on every run. */
static float uniform3(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c * 0x94D049BB133111EBull;
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 29;
  x *= 0x9E3779B97F4A7C15ull;
  x ^= x >> 32;
  return (float)((double)(x >> 11) / 4503599627370496.0 - 1.0); /* 2^52 */
}

void model_init(Model* m) {
  const Shape* s = &m->s;
  const float a = 1.0f / sqrtf((float)s->dim);
  for (int l = 0; l < s->layers; ++l) {
    float* w = m->params + model_offset(s, T_W, l);
    for (size_t i = 0; i < model_numel(s, T_W); ++i) w[i] = 0.5f * a * uniform3(1, (uint64_t)l, i);
    memset(m->params + model_offset(s, T_B, l), 0, model_numel(s, T_B) * sizeof(float));
  }
  float* wo = m->params + model_offset(s, T_OUT, 0);
  for (size_t i = 0; i < model_numel(s, T_OUT); ++i) wo[i] = a * uniform3(2, 0, i);
}

void model_data(Model* m, int step, int first) {
  const int D = m->s.dim, O = m->s.out;
  for (int k = 0; k < m->batch; ++k) {
    const uint64_t sample = (uint64_t)step * 1000003u + (uint64_t)(first + k);
    float* x = m->x + (size_t)k * (size_t)D;
    for (int j = 0; j < D; ++j) x[j] = uniform3(3, sample, (uint64_t)j);
    /* The teacher: o-th target = sin of a fixed random projection of x. */
    for (int o = 0; o < O; ++o) {
      float acc = 0;
      for (int j = 0; j < D; ++j) acc += uniform3(4, (uint64_t)o, (uint64_t)j) * x[j];
      m->t[(size_t)k * (size_t)O + (size_t)o] = sinf(acc);
    }
  }
}

double model_forward(Model* m) {
  const Shape* s = &m->s;
  const size_t B = (size_t)m->batch, D = (size_t)s->dim, O = (size_t)s->out;
  memcpy(m->h, m->x, B * D * sizeof(float));
  for (int l = 0; l < s->layers; ++l) {
    const float* W = m->params + model_offset(s, T_W, l);
    const float* b = m->params + model_offset(s, T_B, l);
    const float* hin = m->h + (size_t)l * B * D;
    float* hout = m->h + (size_t)(l + 1) * B * D;
    float* z = m->z + (size_t)l * B * D;
    for (size_t k = 0; k < B; ++k)
      for (size_t i = 0; i < D; ++i) {
        float acc = b[i];
        for (size_t j = 0; j < D; ++j) acc += W[i * D + j] * hin[k * D + j];
        z[k * D + i] = tanhf(acc);
        hout[k * D + i] = hin[k * D + i] + z[k * D + i];
      }
  }
  const float* Wo = m->params + model_offset(s, T_OUT, 0);
  const float* hL = m->h + (size_t)s->layers * B * D;
  double loss = 0;
  for (size_t k = 0; k < B; ++k)
    for (size_t o = 0; o < O; ++o) {
      float acc = 0;
      for (size_t j = 0; j < D; ++j) acc += Wo[o * D + j] * hL[k * D + j];
      m->y[k * O + o] = acc;
      const double d = (double)acc - (double)m->t[k * O + o];
      loss += d * d;
    }
  return loss / (double)(B * O);
}

void model_backward(Model* m) {
  const Shape* s = &m->s;
  const size_t B = (size_t)m->batch, D = (size_t)s->dim, O = (size_t)s->out;
  memset(m->grads, 0, m->n_params * sizeof(float));
  float* dh = m->dh;
  float* dt = m->dt;
  memset(dh, 0, B * D * sizeof(float));
  /* loss = mean over B*O of (y - t)^2, so dL/dy = 2 (y - t) / (B O) */
  const float scale = 2.0f / (float)(B * O);
  const float* Wo = m->params + model_offset(s, T_OUT, 0);
  float* dWo = m->grads + model_offset(s, T_OUT, 0);
  const float* hL = m->h + (size_t)s->layers * B * D;
  for (size_t k = 0; k < B; ++k)
    for (size_t o = 0; o < O; ++o) {
      const float dy = scale * (m->y[k * O + o] - m->t[k * O + o]);
      for (size_t j = 0; j < D; ++j) {
        dWo[o * D + j] += dy * hL[k * D + j];
        dh[k * D + j] += dy * Wo[o * D + j];
      }
    }
  for (int l = s->layers - 1; l >= 0; --l) {
    const float* W = m->params + model_offset(s, T_W, l);
    float* dW = m->grads + model_offset(s, T_W, l);
    float* db = m->grads + model_offset(s, T_B, l);
    const float* hin = m->h + (size_t)l * B * D;
    const float* z = m->z + (size_t)l * B * D;
    for (size_t k = 0; k < B; ++k) {
      /* h_out = h_in + z: dh flows straight through, and through z = tanh(a) into a. */
      for (size_t i = 0; i < D; ++i) dt[i] = dh[k * D + i] * (1.0f - z[k * D + i] * z[k * D + i]);
      for (size_t i = 0; i < D; ++i) {
        db[i] += dt[i];
        for (size_t j = 0; j < D; ++j) {
          dW[i * D + j] += dt[i] * hin[k * D + j];
          dh[k * D + j] += W[i * D + j] * dt[i];
        }
      }
    }
  }
}

int adamw_create(AdamW* o, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay) {
  o->lr = lr;
  o->beta1 = beta1;
  o->beta2 = beta2;
  o->eps = eps;
  o->weight_decay = weight_decay;
  o->t = 0;
  o->m = calloc(n, sizeof(float));
  o->v = calloc(n, sizeof(float));
  return o->m && o->v ? 0 : -1;
}

void adamw_step(AdamW* o, float* params, const float* grads, size_t n) {
  o->t += 1;
  const float bc1 = 1.0f - powf(o->beta1, (float)o->t);
  const float bc2 = 1.0f - powf(o->beta2, (float)o->t);
  for (size_t i = 0; i < n; ++i) {
    const float g = grads[i];
    o->m[i] = o->beta1 * o->m[i] + (1.0f - o->beta1) * g;
    o->v[i] = o->beta2 * o->v[i] + (1.0f - o->beta2) * g * g;
    params[i] -= o->lr * o->weight_decay * params[i];
    params[i] -= o->lr * (o->m[i] / bc1) / (sqrtf(o->v[i] / bc2) + o->eps);
  }
}

void adamw_destroy(AdamW* o) {
  free(o->m);
  free(o->v);
  o->m = o->v = NULL;
}
