/* The whole-network S4D step on flat state rows in place: a row at a time, or for a batch of
 * single steps layer by layer over tiles of rows (run_tiled).
 *
 * Why C: at large batches a step is memory bound, and a graph compiler's step reads and writes
 * each layer's state several times (new state, output reduction, the final concatenation); here
 * every row's state is read once and written once (a batch of single steps: where it lies; a
 * block of samples: through two scratch rows). Measured (session 20,
 * reference network 4 x 128, N=64, one thread, alternating builds): B=1024 41.5 / 41.7 ms a row
 * at a time, 32.5 / 35.5 ms in tiles of 8 rows; GELU/GLU vectorised (-fno-trapping-math) ~29 ms.
 * Session 21 (the two builds in one process, alternating, medians of 12 rounds): 28.5 -> 21.5
 * ms (B=96: 2.71 -> 1.88 ms) from the tile's states advanced in place (the old values kept on
 * their way through the registers, instead of new states written to scratch and copied back),
 * the output linear over four rows at once, and the next layer's state asked for ahead. What
 * is left is arithmetic: with every row of a batch on one state row (all in cache) a step takes
 * ~85% as long; perf puts 55% in the SSM (its six tables stream from L2 for every row: blocks of
 * channels across the tile's rows, to reuse them from L1, were 1.1-1.6x slower) and 30% in the
 * output linear.
 * Session 24: a server's rows are not in cache (each session comes back every 10 ms, after
 * megabytes of other work), and perf put half the step on the loads of the state, although the
 * next layer's state was asked for ahead (a layer's worth at once, after the SSM). It is now
 * asked for a channel at a time from inside the SSM loop: motion, B=100 over 10000 rows (in
 * memory, not cache) 2.92 -> 2.02 us per row; the reference network at B=1024 ~19.6 -> ~16.5
 * ms; over rows that are in L3 it costs ~10% (1.53 -> 1.71 us).
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
 * A row's new state stands only when its inputs and outputs are all finite (a rejected frame
 * leaves its session as it was, as the graph steps do): written back from scratch then, or, when
 * written in place, its old values put back.
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
  float r = fmaf(-n, 1.428606765330187045e-6f, fmaf(-n, 0.693145751953125f, x));
  float p = 1.f / 720;
  p = fmaf(p, r, 1.f / 120);
  p = fmaf(p, r, 1.f / 24);
  p = fmaf(p, r, 1.f / 6);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

static inline float clamp87(float x) { return x > 87.f ? 87.f : (x < -87.f ? -87.f : x); }

/* erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7) */
static inline float erf_as(float x) {
  float a = fabsf(x);
  float t = 1.f / fmaf(0.3275911f, a, 1.f);
  float poly = fmaf(t, 1.061405429f, -1.453152027f);
  poly = fmaf(t, poly, 1.421413741f);
  poly = fmaf(t, poly, -0.284496736f);
  poly = fmaf(t, poly, 0.254829592f);
  float e = fmaf(-t * poly, exp_clamped(clamp87(-a * a)), 1.f);
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

/* Eight floats, four doubles; loads and stores through them need no alignment. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef double v4 __attribute__((vector_size(32), aligned(8)));

/* Fused multiply-adds are written out, and the library is built with -ffp-contract=off
 * (model/native_step.py) so that nothing else is fused: every path then computes an expression
 * the same way. Left to contract, GCC's Zen tuning fused a*b+c in one loop and not in another
 * ("FMA chains"): a row stepped in a tile and alone came out a bit apart. */
#if defined(__FMA__)
#include <immintrin.h>
static inline v8 fma8(v8 a, v8 b, v8 c) {
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
static inline v4 fma4(v4 a, v4 b, v4 c) {
  return (v4)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
}
#else /* exact everywhere, fast where fmaf is an instruction (aarch64); a libm call on x86 without
       * FMA (pre-2013 CPUs), which keeps the numbers and costs much of the speed */
static inline v8 fma8(v8 a, v8 b, v8 c) {
  v8 r;
  for (int i = 0; i < 8; i++) r[i] = fmaf(a[i], b[i], c[i]);
  return r;
}
static inline v4 fma4(v4 a, v4 b, v4 c) {
  v4 r;
  for (int i = 0; i < 4; i++) r[i] = fma(a[i], b[i], c[i]);
  return r;
}
#endif

/* out (m) = bias + in (k) @ w_t (k, m). Outputs in tiles of 64 (8 vectors) kept in registers
 * across the k inputs (an axpy over the whole of `out` would load and store it for every
 * input); then 8 at a time; then one at a time. Each output: bias, then + in_j w_j for j in
 * order, each a fused multiply-add (linear_rows gives the same numbers). */
static void linear(const float *in, int k, const float *w_t, const float *bias, int m,
                   float *out) {
  int c = 0;
  for (; c + 64 <= m; c += 64) {
    v8 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = *(const v8 *)(bias + c + 8 * v);
    for (int j = 0; j < k; j++) {
      const float *w = w_t + (long)j * m + c;
      const v8 x = (v8){0} + in[j];
      for (int v = 0; v < 8; v++) acc[v] = fma8(x, *(const v8 *)(w + 8 * v), acc[v]);
    }
    for (int v = 0; v < 8; v++) *(v8 *)(out + c + 8 * v) = acc[v];
  }
  for (; c + 8 <= m; c += 8) {
    v8 acc = *(const v8 *)(bias + c);
    for (int j = 0; j < k; j++)
      acc = fma8((v8){0} + in[j], *(const v8 *)(w_t + (long)j * m + c), acc);
    *(v8 *)(out + c) = acc;
  }
  for (; c < m; c++) {
    float acc = bias[c];
    for (int j = 0; j < k; j++) acc = fmaf(in[j], w_t[(long)j * m + c], acc);
    out[c] = acc;
  }
}

static inline float hsum8(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline double hsum4(v4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

/* One layer's SSM on one row: reads `old`, writes `new` (both the row's re/im halves; they may
 * be the same row: each value is read before it is written), in scalar type T with LANES-wide
 * vectors V over the tables named: y_h = Re Σ_n 2 C_n x_n' + D_h z_h. KEEP: the old values are
 * also stored into `keep` (a row laid out as the state), on their way through the registers.
 * ahead_re/ahead_im (or NULL): a float32 state laid out as this layer's, asked for into L2 a
 * channel at a time, so that its reads from memory overlap this arithmetic.
 * Explicit vectors: the output's sum over n stays in a register until the row ends (an
 * `omp simd` reduction spilled its lanes to the stack on every row). */
#define DEFINE_SSM(NAME, KEEP, T, V, LANES, HSUM, VFMA, FMA, A_RE, A_IM, B_RE, B_IM, C_RE,    \
                   C_NIM)                                                                        \
  static void NAME(const Layer *l, int hc, int h, int n2, const float *z, const T *old, T *new,  \
                   T *keep, float *y, const float *ahead_re, const float *ahead_im) {            \
    const T *xr = old + l->off_re, *xi = old + l->off_im;                                        \
    T *nr = new + l->off_re, *ni = new + l->off_im;                                              \
    T *kr = KEEP ? keep + l->off_re : NULL, *ki = KEEP ? keep + l->off_im : NULL;                \
    const int nv = n2 - n2 % LANES;                                                              \
    for (int row = 0; row < hc; row++) {                                                         \
      const long o = (long)row * n2;                                                             \
      const T u = z[row % h];                                                                    \
      const T *ar = l->A_RE + o, *ai = l->A_IM + o, *br = l->B_RE + o, *bi = l->B_IM + o;        \
      const T *cr = l->C_RE + o, *ci = l->C_NIM + o;                                             \
      const V uv = (V){0} + u;                                                                   \
      V acc = {0};                                                                               \
      if (ahead_re) /* the state that comes next, a channel's lines per channel */              \
        for (int n = 0; n < n2; n += 16) {                                                       \
          __builtin_prefetch(ahead_re + o + n, 0, 1);                                            \
          __builtin_prefetch(ahead_im + o + n, 0, 1);                                            \
        }                                                                                        \
      for (int n = 0; n < nv; n += LANES) {                                                      \
        const V r = *(const V *)(xr + o + n), i = *(const V *)(xi + o + n);                      \
        if (KEEP) {                                                                              \
          *(V *)(kr + o + n) = r;                                                                \
          *(V *)(ki + o + n) = i;                                                                \
        }                                                                                        \
        const V a_r = *(const V *)(ar + n), a_i = *(const V *)(ai + n);                          \
        const V vr = VFMA(uv, *(const V *)(br + n), VFMA(-i, a_i, r * a_r));                     \
        const V vi = VFMA(uv, *(const V *)(bi + n), VFMA(r, a_i, i * a_r));                      \
        *(V *)(nr + o + n) = vr;                                                                 \
        *(V *)(ni + o + n) = vi;                                                                 \
        acc = VFMA(vi, *(const V *)(ci + n), VFMA(vr, *(const V *)(cr + n), acc));               \
      }                                                                                          \
      T sum = HSUM(acc);                                                                         \
      for (int n = nv; n < n2; n++) {                                                            \
        const T r = xr[o + n], i = xi[o + n];                                                    \
        if (KEEP) {                                                                              \
          kr[o + n] = r;                                                                         \
          ki[o + n] = i;                                                                         \
        }                                                                                        \
        const T vr = FMA(u, br[n], FMA(-i, ai[n], r * ar[n]));                                   \
        const T vi = FMA(u, bi[n], FMA(r, ai[n], i * ar[n]));                                    \
        nr[o + n] = vr;                                                                          \
        ni[o + n] = vi;                                                                          \
        sum = FMA(vi, ci[n], FMA(vr, cr[n], sum));                                               \
      }                                                                                          \
      y[row] = (float)sum + l->skip[row] * (float)u;                                             \
    }                                                                                            \
  }

DEFINE_SSM(ssm, 0, float, v8, 8, hsum8, fma8, fmaf, da_re, da_im, db_re, db_im, c_re, c_nim)

/* `ssm` with the state and the tables in float64: within a block of samples the state is
 * rounded to float32 once, at the end, not at every sample. A slow mode (|Ā| near 1, as for
 * audio at 16 kHz) carries each sample's rounding for thousands of samples: rounded per sample,
 * a 16 kHz stream's outputs drift ~7e-5 from the float64 reference over 1 s; per 20 ms block,
 * as the FFT chunk did, ~2e-5. */
DEFINE_SSM(ssm_wide, 0, double, v4, 4, hsum4, fma4, fma, wa_re, wa_im, wb_re, wb_im, wc_re, wc_nim)

/* `ssm` in place, the old values kept (run_tiled: a row's state is written where it lies, and
 * put back from `keep` when the sample is refused). */
DEFINE_SSM(ssm_keep, 1, float, v8, 8, hsum8, fma8, fmaf, da_re, da_im, db_re, db_im, c_re, c_nim)

/* out (n, m) = bias + in (n, k) @ w_t (k, m): n rows of `linear`, four at a time sharing each
 * load of the weights (a tile's rows read them from L2 once per four rows instead of once per
 * row, the traffic that bound the row-at-a-time linear). Each output is accumulated as `linear`
 * accumulates it, in the same order: the same numbers bit for bit. */
static void linear_rows(const float *in, int n, int k, const float *w_t, const float *bias,
                        int m, float *out) {
  int r = 0;
  for (; m % 16 == 0 && r + 4 <= n; r += 4) {
    const float *i0 = in + (long)r * k, *i1 = i0 + k, *i2 = i1 + k, *i3 = i2 + k;
    float *o0 = out + (long)r * m, *o1 = o0 + m, *o2 = o1 + m, *o3 = o2 + m;
    for (int c = 0; c < m; c += 16) {
      const v8 b0 = *(const v8 *)(bias + c), b1 = *(const v8 *)(bias + c + 8);
      v8 a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
      for (int j = 0; j < k; j++) {
        const float *w = w_t + (long)j * m + c;
        const v8 w0 = *(const v8 *)w, w1 = *(const v8 *)(w + 8);
        const v8 x0 = (v8){0} + i0[j], x1 = (v8){0} + i1[j], x2 = (v8){0} + i2[j],
                 x3 = (v8){0} + i3[j];
        a00 = fma8(x0, w0, a00);
        a01 = fma8(x0, w1, a01);
        a10 = fma8(x1, w0, a10);
        a11 = fma8(x1, w1, a11);
        a20 = fma8(x2, w0, a20);
        a21 = fma8(x2, w1, a21);
        a30 = fma8(x3, w0, a30);
        a31 = fma8(x3, w1, a31);
      }
      *(v8 *)(o0 + c) = a00;
      *(v8 *)(o0 + c + 8) = a01;
      *(v8 *)(o1 + c) = a10;
      *(v8 *)(o1 + c + 8) = a11;
      *(v8 *)(o2 + c) = a20;
      *(v8 *)(o2 + c + 8) = a21;
      *(v8 *)(o3 + c) = a30;
      *(v8 *)(o3 + c + 8) = a31;
    }
  }
  for (; r < n; r++) linear(in + (long)r * k, k, w_t, bias, m, out + (long)r * m);
}

static void gelu(float *y, int n) {
#pragma omp simd
  for (int i = 0; i < n; i++) y[i] = 0.5f * y[i] * (1.f + erf_as(y[i] * 0.70710678118654752f));
}

/* v (h) = GLU(out (2h)) */
static void glu(const float *out, int h, float *v) {
#pragma omp simd
  for (int i = 0; i < h; i++) v[i] = out[i] / (1.f + exp_clamped(clamp87(-out[h + i])));
}

/* A layer's input z from the activation x (h): x, normed first when prenorm. */
static void layer_in(const Net *net, const Layer *l, const float *x, float *z) {
  memcpy(z, x, sizeof(float) * (size_t)net->d_model);
  if (net->prenorm && l->ln_w) layer_norm(z, net->d_model, l->ln_w, l->ln_b, net->ln_eps);
}

/* The activation x after the layer, from its GLU output v: x + v or v, normed after when
 * postnorm. */
static void layer_out(const Net *net, const Layer *l, float *x, const float *v) {
  const int h = net->d_model;
  if (net->residual) {
    for (int k = 0; k < h; k++) x[k] += v[k];
  } else {
    memcpy(x, v, sizeof(float) * (size_t)h);
  }
  if (!net->prenorm && l->ln_w) layer_norm(x, h, l->ln_w, l->ln_b, net->ln_eps);
}

static int finite_all(const float *x, int n) {
  int bad = 0;
  for (int i = 0; i < n; i++) bad |= !isfinite(x[i]);
  return !bad;
}

/* Scratch per thread: run_rows' two states (float64 and float32 parts), or run_tiled's kept
 * rows, and the activations. */
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
  layer_in(net, l, x, z);
  if (wide) ssm_wide(l, hc, h, net->n2, z, s32, n32, NULL, ys, NULL, NULL);
  else ssm(l, hc, h, net->n2, z, s32, n32, NULL, ys, NULL, NULL);
  gelu(ys, hc);
  linear(ys, hc, l->w_t, l->bias, 2 * h, out);
  glu(out, h, v);
  layer_out(net, l, x, v);
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

/* Whether a row's inputs u (nu floats) and outputs y (ny) are all finite, into *kept when
 * given: only then does its new state replace the old. */
static int row_fine(const float *u, long nu, const float *y, long ny, uint8_t *kept) {
  const int fine = finite_all(u, (int)nu) && finite_all(y, (int)ny);
  if (kept) *kept = (uint8_t)fine;
  return fine;
}

/* The end of a row's samples in run_rows: if row_fine, its new state (n32, as float64 when
 * `wide`, and n64; n32 NULL: nothing computed, the row is its own result) replaces the row's. */
static int commit_row(const Net *net, const float *u, long nu, const float *y, long ny,
                      float *row32, const void *n32, int wide, double *row64, const double *n64,
                      uint8_t *kept) {
  const long w32 = net->width32, w64 = net->width64;
  const int fine = row_fine(u, nu, y, ny, kept);
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

/* One layer for the n rows of a tile (activations xs, n x h): each row's state advanced where
 * it lies, its old values into `keep` (n rows laid out as the state); the output linear over the
 * tile's rows at once. Per row, the arithmetic of sample_layer in its order. While its SSM
 * runs, row r asks for the state that comes next: layer `ahead` of row r of the `ahead_n`
 * rows `ahead32` (this tile's next layer, or after the last the next tile's first). */
static void tile_layer(const Net *net, int i, int n, float *xs, float *const *row32, float *keep,
                       float *act, const Layer *ahead, int ahead_n, float *const *ahead32) {
  const int h = net->d_model, hc = net->channels * h;
  const Layer *l = net->layers + i;
  float *zs = act, *ys = zs + (long)n * h, *out = ys + (long)n * hc, *v = out + (long)n * 2 * h;
  for (int r = 0; r < n; r++) layer_in(net, l, xs + r * h, zs + r * h);
  for (int r = 0; r < n; r++) {
    const int pre = ahead && r < ahead_n;
    ssm_keep(l, hc, h, net->n2, zs + r * h, row32[r], row32[r], keep + r * net->width32,
             ys + r * hc, pre ? ahead32[r] + ahead->off_re : NULL,
             pre ? ahead32[r] + ahead->off_im : NULL);
  }
  gelu(ys, n * hc);
  linear_rows(ys, n, hc, l->w_t, l->bias, 2 * h, out);
  for (int r = 0; r < n; r++) {
    glu(out + r * 2 * h, h, v);
    layer_out(net, l, xs + r * h, v);
  }
}

/* Puts back the layers' states that ssm_keep kept (the parts of the row it wrote). */
static void restore_layers(const Net *net, float *row32, const float *keep) {
  const size_t bytes = sizeof(float) * (size_t)net->channels * net->d_model * net->n2;
  for (int i = 0; i < net->n_layers; i++) {
    const Layer *l = net->layers + i;
    memcpy(row32 + l->off_re, keep + l->off_re, bytes);
    memcpy(row32 + l->off_im, keep + l->off_im, bytes);
  }
}

/* Where batch member b's state lies: rows[b], or b itself without `rows`. */
static inline long row_of(const int64_t *rows, long b) { return rows ? (long)rows[b] : b; }

/* The float32 state rows of the tile starting at b0 (none past the batch); their number. */
static int tile_rows(long b0, long batch, const int64_t *rows, float *s32, long s32_stride,
                     float **row32) {
  const int n = batch - b0 < TILE_ROWS ? (int)(batch - b0) : TILE_ROWS;
  for (int r = 0; r < n; r++) row32[r] = s32 + row_of(rows, b0 + r) * s32_stride;
  return n > 0 ? n : 0;
}

/* One sample for each of `batch` rows, layer by layer over tiles of TILE_ROWS rows: a layer's
 * tables and output linear (224 KB for 128 x N=64) are read from L2 for every row of the tile
 * instead of from L3 (a whole network's weights do not fit in L2 beside a row's state), and the
 * linear's weights once per four rows. Each row's arithmetic is that of `sample`, in the same
 * order: the same numbers bit for bit. A row's state is updated where it lies (read once,
 * written once, as the roofline pass does) and its old values kept in scratch, copied back when
 * its inputs or outputs are not finite. Arguments as run_rows (steps 1); the rows must be
 * distinct, as there (not checked: a row given twice would be stepped twice). */
static long run_tiled(const Net *net, long batch, const float *u, long u_stride, float *s32,
                      long s32_stride, double *s64, long s64_stride, float *y, long y_stride,
                      const int64_t *rows, uint8_t *kept) {
  const int h = net->d_model, hc = net->channels * h;
  const long w32 = net->width32, w64 = net->width64;
  double *pool = scratch_for(sizeof(double) * (size_t)(TILE_ROWS * w64) +
                             sizeof(float) * ((size_t)TILE_ROWS * (w32 + 4 * h + hc) + h));
  if (!pool) return -1;
  double *new64 = pool;
  float *keep = (float *)(pool + TILE_ROWS * w64), *xs = keep + TILE_ROWS * w32;
  float *act = xs + TILE_ROWS * h;
  float *tiles[2][TILE_ROWS]; /* this tile's rows and the next's */
  int next_n = tile_rows(0, batch, rows, s32, s32_stride, tiles[0]);
  long written = 0;
  for (long b0 = 0, t = 0; b0 < batch; b0 += TILE_ROWS, t ^= 1) {
    const int n = next_n;
    float **row32 = tiles[t], **next32 = tiles[t ^ 1];
    next_n = tile_rows(b0 + TILE_ROWS, batch, rows, s32, s32_stride, next32);
    for (int r = 0; r < next_n; r++) { /* the next tile's float64 part, read at its end */
      const double *next64 = s64 + row_of(rows, b0 + TILE_ROWS + r) * s64_stride;
      for (long k = 0; k < w64; k += 8) __builtin_prefetch(next64 + k, 0, 1);
    }
    double *row64[TILE_ROWS];
    for (int r = 0; r < n; r++) {
      row64[r] = s64 + row_of(rows, b0 + r) * s64_stride;
      sample_begin(net, u + (b0 + r) * u_stride, xs + r * h);
    }
    for (int i = 0; i < net->n_layers; i++) {
      const int last = i + 1 == net->n_layers;
      tile_layer(net, i, n, xs, row32, keep, act, last ? net->layers : net->layers + i + 1,
                 last ? next_n : n, last ? next32 : row32);
    }
    for (int r = 0; r < n; r++) {
      const long b = b0 + r;
      float *yb = y + b * y_stride;
      if (w64) memcpy(new64 + r * w64, row64[r], sizeof(double) * (size_t)w64);
      sample_end(net, xs + r * h, row64[r], new64 + r * w64, yb);
      if (row_fine(u + b * u_stride, net->d_input, yb, net->d_output, kept ? kept + b : NULL)) {
        if (w64) memcpy(row64[r], new64 + r * w64, sizeof(double) * (size_t)w64);
        written++;
      } else {
        restore_layers(net, row32[r], keep + r * w32);
      }
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
    const long r = row_of(rows, b);
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
 * floats apart). With `keys` (2 per row, or NULL), the 8 bytes before row b's input must be
 * keys[2b], keys[2b + 1] (its record's header, e.g. the session it is for and its sample
 * count): a caller that prepared the call for a list of records checks that this message holds
 * that list, in the same pass. With `counts` (one per state row, or NULL; needs `rows` and
 * `kept`), counts[rows[b]] goes up by one for each row advanced: the samples a session has
 * advanced by, kept beside its state and moved with it (a per-row count in the caller's
 * language cost more than the step's arithmetic for small models).
 * Returns -3 when those inputs are not float-aligned, -5 when a key differs (nothing changed
 * then), else as that function. */
long s4d_network_run_at(const Net *net, long batch, const char *base, long offset, long stride,
                        const uint32_t *keys, int64_t *counts, float *s32, long s32_stride,
                        double *s64, long s64_stride, float *y, long y_stride,
                        const int64_t *rows, long n_rows, uint8_t *kept) {
  const char *u = base + offset;
  if ((uintptr_t)u % sizeof(float) || stride % (long)sizeof(float)) return -3;
  if (counts && !(rows && kept)) return -6;
  for (long b = 0; keys && b < batch; b++) {
    uint32_t key[2];
    memcpy(key, u + b * stride - sizeof key, sizeof key);
    if (key[0] != keys[2 * b] || key[1] != keys[2 * b + 1]) return -5;
  }
  const long done = s4d_network_run(net, batch, 1, (const float *)u, stride / (long)sizeof(float),
                                    s32, s32_stride, s64, s64_stride, y, y_stride, rows, n_rows,
                                    kept);
  for (long b = 0; counts && done >= 0 && b < batch; b++) counts[rows[b]] += kept[b];
  return done;
}
