/* The whole-network S4D step on flat state rows in place: a row at a time, or for a batch of
 * single steps layer by layer over tiles of rows (run_tiled).
 *
 * Why C: at large batches a step is memory bound, and a graph compiler's step reads and writes
 * each layer's state several times (new state, output reduction, the final concatenation); here
 * every row's state is read once and written once. Measured (session 20, reference network
 * 4 x 128, N=64, one thread, alternating builds): B=1024 41.5 / 41.7 ms a row at a time, 32.5 /
 * 35.5 ms in tiles of 8 rows (16 and 32: 32.7, 32.9; 4: 36.7); B=100 3.6-3.8 -> 3.3-3.4 ms.
 * Of a row's ~30 us (perf at B=8): the SSM 1/3, the output linear 30%, the new state's copy
 * from scratch and GELU/GLU a fifth each: compute, not memory, at this size; GELU/GLU were
 * scalar loops, vectorised since (-fno-trapping-math, model/native_step.py): B=1024 ~29 ms.
 * At B=1 a graph's per-call and per-kernel overheads dominate; here a call is one loop nest.
 *
 * Per row (model/network.py, RecurrentNetwork.step; model/recurrent.py, DiagonalRecurrence):
 *   x = encoder(u)
 *   per layer: z = prenorm ? LN(x) : x
 *              x_n' = Ā_n x_n + B̄_n z_h,   y_h = Re Σ_n 2 C_n x_n' + D_h z_h
 *              v = GLU(W GELU(y) + b)
 *              x = residual ? x + v : v,   postnorm: x = LN(x)
 *   pooled:   sum += x, count += 1, x = sum / count (float64)
 *   out = decoder(x)
 * A block of T samples (a chunk) is T such steps, the state kept in two scratch rows in turn.
 * The new state is written back only when the row's inputs and outputs are all finite (a
 * rejected frame leaves its session as it was, as the graph steps do).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const float *da_re, *da_im, *db_re, *db_im, *c_re, *c_nim; /* (Hc, N2) */
  const float *skip;                                         /* (Hc) */
  const float *w_t, *bias;   /* output linear, transposed: (Hc, 2H); bias (2H) */
  const float *ln_w, *ln_b;  /* LayerNorm (H) or NULL */
  long off_re, off_im;       /* the layer's state within a float32 row */
  const double *wa_re, *wa_im, *wb_re, *wb_im, *wc_re, *wc_nim; /* float64 tables (Hc, N2) */
} Layer;

typedef struct {
  int d_input, d_model, d_output, channels, n2, n_layers;
  int prenorm, residual, pooled;
  float ln_eps;
  const float *enc_w_t, *enc_b; /* (d_input, d_model), (d_model) or NULL: identity */
  const float *dec_w_t, *dec_b; /* (d_model, d_output), (d_output) or NULL: identity */
  long off_sum, off_count;      /* pooled state within a float64 row */
  long width32, width64;
  const Layer *layers;
} Net;

/* e^x for |x| <= 87 (callers clamp): 2^n e^r, r in [-ln2/2, ln2/2], degree-6 polynomial; NaN
 * goes through. Branch free so the loops that call it vectorise. */
static inline float exp_clamped(float x) {
  float n = nearbyintf(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-6f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

static inline float clamp87(float x) { return x > 87.f ? 87.f : (x < -87.f ? -87.f : x); }

/* erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7) */
static inline float erf_as(float x) {
  float a = fabsf(x);
  float t = 1.f / (1.f + 0.3275911f * a);
  float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
               t * (-1.453152027f + t * 1.061405429f))));
  float e = 1.f - poly * exp_clamped(clamp87(-a * a));
  return copysignf(e, x);
}

static void layer_norm(float *x, int n, const float *w, const float *b, float eps) {
  float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
  for (int i = 0; i < n; i++) mean += x[i];
  mean /= n;
#pragma omp simd reduction(+ : var)
  for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
  float inv = 1.f / sqrtf(var / n + eps);
#pragma omp simd
  for (int i = 0; i < n; i++) x[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* out (m) = bias + in (k) @ w_t (k, m). Outputs in tiles of TILE kept in registers across
 * the k inputs (an axpy over the whole of `out` would load and store it for every input). */
#define TILE 64
static void linear(const float *in, int k, const float *w_t, const float *bias, int m,
                   float *out) {
  int i0 = 0;
  for (; i0 + TILE <= m; i0 += TILE) {
    float acc[TILE];
    for (int i = 0; i < TILE; i++) acc[i] = bias[i0 + i];
    for (int j = 0; j < k; j++) {
      const float a = in[j], *row = w_t + (long)j * m + i0;
      for (int i = 0; i < TILE; i++) acc[i] += a * row[i];
    }
    for (int i = 0; i < TILE; i++) out[i0 + i] = acc[i];
  }
  for (int i = i0; i < m; i++) {
    float acc = bias[i];
    for (int j = 0; j < k; j++) acc += in[j] * w_t[(long)j * m + i];
    out[i] = acc;
  }
}

/* Eight floats, four doubles; loads and stores through them need no alignment. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef double v4 __attribute__((vector_size(32), aligned(8)));

static inline float hsum8(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline double hsum4(v4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

/* One layer's SSM on one row: reads `old`, writes `new` (both the row's re/im halves), in
 * scalar type T with LANES-wide vectors V over the tables named:
 * y_h = Re Σ_n 2 C_n x_n' + D_h z_h.
 * Explicit vectors: the output's sum over n stays in a register until the row ends (an
 * `omp simd` reduction spilled its lanes to the stack on every row). */
#define DEFINE_SSM(NAME, T, V, LANES, HSUM, A_RE, A_IM, B_RE, B_IM, C_RE, C_NIM)                \
  static void NAME(const Layer *l, int hc, int h, int n2, const float *z, const T *old, T *new,  \
                   float *y) {                                                                   \
    const T *xr = old + l->off_re, *xi = old + l->off_im;                                        \
    T *nr = new + l->off_re, *ni = new + l->off_im;                                              \
    const int nv = n2 - n2 % LANES;                                                              \
    for (int row = 0; row < hc; row++) {                                                         \
      const long o = (long)row * n2;                                                             \
      const T u = z[row % h];                                                                    \
      const T *ar = l->A_RE + o, *ai = l->A_IM + o, *br = l->B_RE + o, *bi = l->B_IM + o;        \
      const T *cr = l->C_RE + o, *ci = l->C_NIM + o;                                             \
      V acc = {0};                                                                               \
      for (int n = 0; n < nv; n += LANES) {                                                      \
        const V r = *(const V *)(xr + o + n), i = *(const V *)(xi + o + n);                      \
        const V a_r = *(const V *)(ar + n), a_i = *(const V *)(ai + n);                          \
        const V vr = r * a_r - i * a_i + u * *(const V *)(br + n);                               \
        const V vi = i * a_r + r * a_i + u * *(const V *)(bi + n);                               \
        *(V *)(nr + o + n) = vr;                                                                 \
        *(V *)(ni + o + n) = vi;                                                                 \
        acc += vr * *(const V *)(cr + n) + vi * *(const V *)(ci + n);                            \
      }                                                                                          \
      T sum = HSUM(acc);                                                                         \
      for (int n = nv; n < n2; n++) {                                                            \
        const T r = xr[o + n], i = xi[o + n];                                                    \
        const T vr = r * ar[n] - i * ai[n] + u * br[n];                                          \
        const T vi = i * ar[n] + r * ai[n] + u * bi[n];                                          \
        nr[o + n] = vr;                                                                          \
        ni[o + n] = vi;                                                                          \
        sum += vr * cr[n] + vi * ci[n];                                                          \
      }                                                                                          \
      y[row] = (float)sum + l->skip[row] * (float)u;                                             \
    }                                                                                            \
  }

DEFINE_SSM(ssm, float, v8, 8, hsum8, da_re, da_im, db_re, db_im, c_re, c_nim)

/* `ssm` with the state and the tables in float64: within a block of samples the state is
 * rounded to float32 once, at the end, not at every sample. A slow mode (|Ā| near 1, as for
 * audio at 16 kHz) carries each sample's rounding for thousands of samples: rounded per sample,
 * a 16 kHz stream's outputs drift ~7e-5 from the float64 reference over 1 s; per 20 ms block,
 * as the FFT chunk did, ~2e-5. */
DEFINE_SSM(ssm_wide, double, v4, 4, hsum4, wa_re, wa_im, wb_re, wb_im, wc_re, wc_nim)

/* GELU in place, then out (2H) = W y + b, then GLU into v (H). */
static void tail(const Layer *l, int hc, int h, float *y, float *out, float *v) {
#pragma omp simd
  for (int i = 0; i < hc; i++) y[i] = 0.5f * y[i] * (1.f + erf_as(y[i] * 0.70710678118654752f));
  linear(y, hc, l->w_t, l->bias, 2 * h, out);
#pragma omp simd
  for (int i = 0; i < h; i++) v[i] = out[i] / (1.f + exp_clamped(clamp87(-out[h + i])));
}

static int finite_all(const float *x, int n) {
  int bad = 0;
  for (int i = 0; i < n; i++) bad |= !isfinite(x[i]);
  return !bad;
}

/* Scratch per thread: two states (float64 and float32 parts) and the activations. */
static __thread double *scratch;
static __thread size_t scratch_bytes;

static double *scratch_for(size_t bytes) {
  if (bytes > scratch_bytes) {
    double *grown = realloc(scratch, bytes);
    if (!grown) return NULL;
    scratch = grown;
    scratch_bytes = bytes;
  }
  return scratch;
}

/* A sample's parts, so that rows can also go layer by layer (run_tiled): the encoder (x from u),
 * one layer (x and the state's part of layer i: s32 -> n32), and the end (pooled mean from s64
 * into n64, decoder). `act` holds the other activations. */
static void sample_begin(const Net *net, const float *u, float *x) {
  if (net->enc_w_t) linear(u, net->d_input, net->enc_w_t, net->enc_b, net->d_model, x);
  else memcpy(x, u, sizeof(float) * (size_t)net->d_model);
}

static void sample_layer(const Net *net, int i, float *x, const void *s32, void *n32, int wide,
                         float *act) {
  const int h = net->d_model, hc = net->channels * h;
  float *z = act, *ys = z + hc, *out = ys + hc, *v = out + 2 * h;
  const Layer *l = net->layers + i;
  memcpy(z, x, sizeof(float) * (size_t)h);
  if (net->prenorm && l->ln_w) layer_norm(z, h, l->ln_w, l->ln_b, net->ln_eps);
  if (wide) ssm_wide(l, hc, h, net->n2, z, s32, n32, ys);
  else ssm(l, hc, h, net->n2, z, s32, n32, ys);
  tail(l, hc, h, ys, out, v);
  if (net->residual) {
    for (int k = 0; k < h; k++) x[k] += v[k];
  } else {
    memcpy(x, v, sizeof(float) * (size_t)h);
  }
  if (!net->prenorm && l->ln_w) layer_norm(x, h, l->ln_w, l->ln_b, net->ln_eps);
}

static void sample_end(const Net *net, float *x, const double *s64, double *n64, float *y) {
  const int h = net->d_model;
  if (net->pooled) { /* the running mean, float64 so long streams keep it exact */
    const double count = s64[net->off_count] + 1.0;
    n64[net->off_count] = count;
    for (int k = 0; k < h; k++) {
      n64[net->off_sum + k] = s64[net->off_sum + k] + (double)x[k];
      x[k] = (float)(n64[net->off_sum + k] / count);
    }
  }
  if (net->dec_w_t) linear(x, h, net->dec_w_t, net->dec_b, net->d_output, y);
  else memcpy(y, x, sizeof(float) * (size_t)net->d_output);
}

/* One sample of one row: u (d_input) and the state (s32, s64) -> y (d_output) and the new
 * state (n32, n64); `act` holds the activations. `wide`: s32 and n32 hold the float32 part
 * of the state as float64. */
static void sample(const Net *net, const float *u, const void *s32, const double *s64,
                   void *n32, double *n64, int wide, float *act, float *y) {
  float *x = act;
  sample_begin(net, u, x);
  for (int i = 0; i < net->n_layers; i++)
    sample_layer(net, i, x, s32, n32, wide, x + net->d_model);
  sample_end(net, x, s64, n64, y);
}

/* Blocks of up to this many samples round the state to float32 at every sample, as steps do:
 * they cost exactly that many steps (float64 arithmetic costs ~25% more per sample), and a
 * stream of short frames behaves as one of single samples. Longer blocks (audio frames) keep
 * the state in float64 until their end. */
#define NARROW_STEPS 32
const long s4d_narrow_steps = NARROW_STEPS; /* read by model/native_step.py */

/* Advances `batch` rows by `steps` samples each: u (batch, steps, d_input), row b at
 * u + b * u_stride; state rows s32, s64 with row strides (row b at index rows[b] when
 * `rows` is given: a pool's rows stepped where they lie; distinct); y (batch, steps, d_output),
 * row b at y + b * y_stride (strides let a caller read its inputs from, and write its outputs
 * into, the records of a wire message). A block of more than NARROW_STEPS keeps the state in
 * float64 until its end. A row's state is replaced only when all its inputs and outputs are
 * finite (else it stays as it was, whole); `kept` (batch, or NULL) says which were.
 * Returns the number of rows replaced, -1 when scratch memory could not be had, -2 when a
 * row index is not in [0, n_rows) (nothing changed then). */
/* The end of a row's samples: whether its inputs u (nu floats) and outputs y (ny) are all
 * finite, into *kept when given; if so, its new state (n32, as float64 when `wide`, and n64;
 * n32 NULL: nothing computed, the row is its own result) replaces the row's. */
static int commit_row(const Net *net, const float *u, long nu, const float *y, long ny,
                      float *row32, const void *n32, int wide, double *row64, const double *n64,
                      uint8_t *kept) {
  const long w32 = net->width32, w64 = net->width64;
  const int fine = finite_all(u, (int)nu) && finite_all(y, (int)ny);
  if (kept) *kept = (uint8_t)fine;
  if (!fine || !n32) return fine;
  if (wide) {
    for (long k = 0; k < w32; k++) row32[k] = (float)((const double *)n32)[k];
  } else {
    memcpy(row32, n32, sizeof(float) * (size_t)w32);
  }
  if (w64) memcpy(row64, n64, sizeof(double) * (size_t)w64);
  return fine;
}

/* Rows per tile of run_tiled. */
#define TILE_ROWS 8

/* One sample for each of `batch` rows, layer by layer over tiles of TILE_ROWS rows: a layer's
 * tables and output linear (224 KB for 128 x N=64) are read from L2 for every row of the tile
 * instead of from L3 (a whole network's weights do not fit in L2 beside a row's state). Each
 * row's arithmetic is that of `sample`, in the same order: the same numbers bit for bit. The
 * tile's new states go to scratch and are copied to rows whose inputs and outputs are finite,
 * as run_rows does. Arguments as run_rows (steps 1). */
static long run_tiled(const Net *net, long batch, const float *u, long u_stride, float *s32,
                      long s32_stride, double *s64, long s64_stride, float *y, long y_stride,
                      const int64_t *rows, uint8_t *kept) {
  const int h = net->d_model, hc = net->channels * h;
  const long w32 = net->width32, w64 = net->width64;
  double *pool = scratch_for(sizeof(double) * (size_t)(TILE_ROWS * w64) +
                             sizeof(float) * ((size_t)TILE_ROWS * (w32 + h) + 5 * (size_t)h +
                                              2 * (size_t)hc));
  if (!pool) return -1;
  double *new64 = pool;
  float *new32 = (float *)(pool + TILE_ROWS * w64), *xs = new32 + TILE_ROWS * w32;
  float *act = xs + TILE_ROWS * h;
  long written = 0;
  for (long b0 = 0; b0 < batch; b0 += TILE_ROWS) {
    const int n = batch - b0 < TILE_ROWS ? (int)(batch - b0) : TILE_ROWS;
    float *row32[TILE_ROWS];
    double *row64[TILE_ROWS];
    for (int r = 0; r < n; r++) {
      const long at = rows ? (long)rows[b0 + r] : b0 + r;
      row32[r] = s32 + at * s32_stride;
      row64[r] = s64 + at * s64_stride;
      sample_begin(net, u + (b0 + r) * u_stride, xs + r * h);
    }
    for (int i = 0; i < net->n_layers; i++)
      for (int r = 0; r < n; r++)
        sample_layer(net, i, xs + r * h, row32[r], new32 + r * w32, 0, act);
    for (int r = 0; r < n; r++) {
      const long b = b0 + r;
      float *yb = y + b * y_stride;
      if (w64) memcpy(new64 + r * w64, row64[r], sizeof(double) * (size_t)w64);
      sample_end(net, xs + r * h, row64[r], new64 + r * w64, yb);
      written += commit_row(net, u + b * u_stride, net->d_input, yb, net->d_output, row32[r],
                            new32 + r * w32, 0, row64[r], new64 + r * w64,
                            kept ? kept + b : NULL);
    }
  }
  return written;
}

static long run_rows(const Net *net, long batch, long steps, const int64_t *steps_each,
                     const float *u, long u_stride, float *s32, long s32_stride, double *s64,
                     long s64_stride, float *y, long y_stride, const int64_t *rows, long n_rows,
                     uint8_t *kept) {
  const int h = net->d_model, hc = net->channels * h;
  const long w32 = net->width32, w64 = net->width64;
  double *pool = scratch_for(sizeof(double) * (2 * (size_t)w64 + 2 * (size_t)w32) +
                             sizeof(float) * (5 * (size_t)h + 2 * (size_t)hc));
  if (!pool) return -1;
  for (long b = 0; rows && b < batch; b++)
    if (rows[b] < 0 || rows[b] >= n_rows) return -2;
  for (long b = 0; steps_each && b < batch; b++)
    if (steps_each[b] < 0 || steps_each[b] > steps) return -4;
  if (!steps_each && steps == 1 && batch > 1)
    return run_tiled(net, batch, u, u_stride, s32, s32_stride, s64, s64_stride, y, y_stride,
                     rows, kept);
  double *pool_buf[2] = {pool, pool + w64};
  double *buf[2] = {pool + 2 * w64, pool + 2 * w64 + w32}; /* float or double states */
  float *act = (float *)(buf[1] + w32);
  long written = 0;
  for (long b = 0; b < batch; b++) {
    const long n = steps_each ? (long)steps_each[b] : steps;
    const int wide = n > NARROW_STEPS;
    const float *ub = u + b * u_stride;
    const long r = rows ? (long)rows[b] : b;
    float *row32 = s32 + r * s32_stride, *yb = y + b * y_stride;
    double *row64 = s64 + r * s64_stride;
    const void *cur32 = row32; /* read from the row, written to scratch: the row stays */
    const double *cur64 = row64;
    if (wide) {
      for (long k = 0; k < w32; k++) buf[1][k] = row32[k];
      cur32 = buf[1];
    }
    for (long t = 0; t < n; t++) {
      sample(net, ub + t * net->d_input, cur32, cur64, buf[t & 1], pool_buf[t & 1], wide, act,
             yb + t * net->d_output);
      cur32 = buf[t & 1];
      cur64 = pool_buf[t & 1];
    }
    written += commit_row(net, ub, n * net->d_input, yb, n * net->d_output, row32,
                          n ? cur32 : NULL, wide, row64, cur64, kept ? kept + b : NULL);
  }
  return written;
}

/* Advances `batch` rows by `steps` samples each: u (batch, steps, d_input), row b at
 * u + b * u_stride; state rows s32, s64 with row strides (row b at index rows[b] when
 * `rows` is given: a pool's rows stepped where they lie; distinct); y (batch, steps, d_output),
 * row b at y + b * y_stride (strides let a caller read its inputs from, and write its outputs
 * into, the records of a wire message). A block of more than NARROW_STEPS keeps the state in
 * float64 until its end. A row's state is replaced only when all its inputs and outputs are
 * finite (else it stays as it was, whole); `kept` (batch, or NULL) says which were.
 * Returns the number of rows replaced, -1 when scratch memory could not be had, -2 when a
 * row index is not in [0, n_rows) (nothing changed then). */
long s4d_network_run(const Net *net, long batch, long steps, const float *u, long u_stride,
                     float *s32, long s32_stride, double *s64, long s64_stride, float *y,
                     long y_stride, const int64_t *rows, long n_rows, uint8_t *kept) {
  return run_rows(net, batch, steps, NULL, u, u_stride, s32, s32_stride, s64, s64_stride, y,
                  y_stride, rows, n_rows, kept);
}

/* s4d_network_run with a number of samples per row: row b advances by steps_each[b] (at most
 * `steps`, the room its input and output rows have; -4 otherwise, nothing changed): the
 * queued one-sample frames of many sessions, each session's as one block. */
long s4d_network_run_each(const Net *net, long batch, long steps, const int64_t *steps_each,
                          const float *u, long u_stride, float *s32, long s32_stride,
                          double *s64, long s64_stride, float *y, long y_stride,
                          const int64_t *rows, long n_rows, uint8_t *kept) {
  return run_rows(net, batch, steps, steps_each, u, u_stride, s32, s32_stride, s64, s64_stride,
                  y, y_stride, rows, n_rows, kept);
}

/* s4d_network_run for one sample per row whose inputs lie in a byte buffer as received (the
 * records of a wire message): row b's input at base + offset + b * stride (bytes, whole
 * floats apart). Returns -3 when those inputs are not float-aligned, else as that function. */
long s4d_network_run_at(const Net *net, long batch, const char *base, long offset, long stride,
                        float *s32, long s32_stride, double *s64, long s64_stride, float *y,
                        long y_stride, const int64_t *rows, long n_rows, uint8_t *kept) {
  const char *u = base + offset;
  if ((uintptr_t)u % sizeof(float) || stride % (long)sizeof(float)) return -3;
  return s4d_network_run(net, batch, 1, (const float *)u, stride / (long)sizeof(float), s32,
                         s32_stride, s64, s64_stride, y, y_stride, rows, n_rows, kept);
}
