/* Training-mode BatchNorm over a channels_last float32 map, with the ReLU after it fused in (act = 1) or not
 * (act = 0), and optionally a residual r added before the ReLU. x, r, y, g, dx, dr: [M, C] rows (M = N * H * W),
 * channels contiguous. See epsanet/optimize/fused_bn_act.py.
 *
 * Forward:  mean, biased var over the M rows; y = act(x * scale + shift [+ r]), scale = w / sqrt(var + eps),
 *           shift = b - mean * scale (in float, as the backward pass computes them). One pass for the statistics
 *           (shifted by the first row, float partial sums over 64 rows, double totals), one pass for y.
 * Backward: with m = [x * scale + shift > 0] (or [y > 0] when a residual was added; 1 without act), gm = g * m:
 *           db = sum(gm), dw = sum(gm * xhat), dx = w * invstd * (gm - db / M - xhat * dw / M), dr = gm;
 *           one pass for the two sums, one for dx (and dr). Without a residual, x is read again instead of
 *           keeping the ReLU mask.
 * Every thread reduces its own rows into its own partial sums; the partials are added in thread order, so the
 * result does not depend on timing. Threads: torch's OpenMP runtime (libgomp.so.1, already loaded by torch).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define FLUSH_ROWS 64

/* Per-thread sums of two per-channel quantities: thread t accumulates rows in float (block + t * 2C) and flushes
 * them every FLUSH_ROWS rows into double (sums + t * 2C); the first C of each are the first quantity. */
typedef struct { double *sums; float *block; int threads; } partials_t;

static int partials_alloc(partials_t *p, int64_t C, int threads) {
    p->threads = threads;
    p->sums = (double *)calloc((size_t)threads * 2 * (size_t)C, sizeof(double));
    p->block = (float *)calloc((size_t)threads * 2 * (size_t)C, sizeof(float));
    return p->sums != NULL && p->block != NULL;
}

static void partials_free(partials_t *p) { free(p->sums); free(p->block); }

/* The rows [*m0, *m1) of the calling thread of the current parallel region. */
static inline void thread_rows(int64_t M, int64_t *m0, int64_t *m1) {
    int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    *m0 = M * t / nt;
    *m1 = M * (t + 1) / nt;
}

/* After row m of [m0, m1): move the calling thread's float partials into its double ones when due. */
static inline void partials_flush(partials_t *p, int64_t C, int64_t m, int64_t m0, int64_t m1) {
    if ((m - m0 + 1) % FLUSH_ROWS != 0 && m != m1 - 1) return;
    size_t t = (size_t)omp_get_thread_num();
    float *f = p->block + t * 2 * C;
    double *d = p->sums + t * 2 * C;
    for (int64_t i = 0; i < 2 * C; ++i) { d[i] += f[i]; f[i] = 0.f; }
}

/* a[c] and b[c]: the totals of the two quantities, threads added in order (the same result every time). */
static void partials_total(const partials_t *p, int64_t C, double *a, double *b) {
    for (int64_t c = 0; c < C; ++c) { a[c] = 0.0; b[c] = 0.0; }
    for (int t = 0; t < p->threads; ++t) {
        const double *s = p->sums + (size_t)t * 2 * C;
        for (int64_t c = 0; c < C; ++c) { a[c] += s[c]; b[c] += s[C + c]; }
    }
}

/* Returns 0 on success, 1 when memory could not be allocated. */
/* r may be NULL (no residual). */
int batchnorm_act_forward(const float *x, const float *r, float *y, int64_t M, int64_t C, const float *w,
                          const float *b, double eps, int act, float *mean_out, float *invstd_out, double *var_out,
                          int threads) {
    if (threads < 1) threads = 1;
    partials_t part = {NULL, NULL, 0};
    double *sum = (double *)malloc(2 * (size_t)C * sizeof(double));
    float *coef = (float *)malloc(3 * (size_t)C * sizeof(float));
    if (!sum || !coef || !partials_alloc(&part, C, threads)) { free(sum); free(coef); partials_free(&part); return 1; }
    double *sumsq = sum + C;
    float *first = coef, *scale = coef + C, *shift = coef + 2 * C;
    memcpy(first, x, (size_t)C * sizeof(float));

    #pragma omp parallel num_threads(threads)
    {
        int64_t m0, m1;
        thread_rows(M, &m0, &m1);
        float *fs = part.block + (size_t)omp_get_thread_num() * 2 * C, *fq = fs + C;
        for (int64_t m = m0; m < m1; ++m) {
            const float *row = x + m * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { float v = row[c] - first[c]; fs[c] += v; fq[c] += v * v; }
            partials_flush(&part, C, m, m0, m1);
        }
    }
    partials_total(&part, C, sum, sumsq);
    for (int64_t c = 0; c < C; ++c) {
        double shifted_mean = sum[c] / (double)M;
        double var = sumsq[c] / (double)M - shifted_mean * shifted_mean;
        if (var < 0.0) var = 0.0;
        double mean = shifted_mean + (double)first[c];
        double invstd = 1.0 / sqrt(var + eps);
        mean_out[c] = (float)mean;
        invstd_out[c] = (float)invstd;
        var_out[c] = var;
        /* the same float arithmetic as the backward pass, so both see the same ReLU mask */
        scale[c] = w[c] * invstd_out[c];
        shift[c] = b[c] - mean_out[c] * scale[c];
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * C;
        float *yr = y + m * C;
        if (r) {
            const float *rr = r + m * C;
            if (act) {
                #pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    float z = xr[c] * scale[c] + shift[c] + rr[c];
                    yr[c] = z > 0.f ? z : 0.f;
                }
            } else {
                #pragma omp simd
                for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * scale[c] + shift[c] + rr[c];
            }
        } else if (act) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { float z = xr[c] * scale[c] + shift[c]; yr[c] = z > 0.f ? z : 0.f; }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * scale[c] + shift[c];
        }
    }
    free(sum); free(coef); partials_free(&part);
    return 0;
}

/* y: the forward output when a residual was added before the ReLU (the mask is read from it), else NULL. dr, the
 * residual's gradient, is written only with y (without a ReLU it is g itself). dx and dr may be NULL when not
 * wanted. Returns 0 on success, 1 when memory could not be allocated. */
int batchnorm_act_backward(const float *g, const float *x, const float *y, float *dx, float *dr, int64_t M, int64_t C,
                           const float *w, const float *b, const float *mean, const float *invstd, int act, float *dw,
                           float *db, int threads) {
    if (threads < 1) threads = 1;
    partials_t part = {NULL, NULL, 0};
    double *sum = (double *)malloc(2 * (size_t)C * sizeof(double));
    float *coef = (float *)malloc(5 * (size_t)C * sizeof(float));
    if (!sum || !coef || !partials_alloc(&part, C, threads)) { free(sum); free(coef); partials_free(&part); return 1; }
    double *sum_gx = sum + C;  /* sum(gm) and sum(gm * (x - mean)) */
    float *scale = coef, *shift = coef + C, *a = coef + 2 * C, *k1 = coef + 3 * C, *k0 = coef + 4 * C;
    for (int64_t c = 0; c < C; ++c) { scale[c] = w[c] * invstd[c]; shift[c] = b[c] - mean[c] * scale[c]; }

    #pragma omp parallel num_threads(threads)
    {
        int64_t m0, m1;
        thread_rows(M, &m0, &m1);
        float *fs = part.block + (size_t)omp_get_thread_num() * 2 * C, *fx = fs + C;
        for (int64_t m = m0; m < m1; ++m) {
            const float *gr = g + m * C, *xr = x + m * C;
            if (act && y) {
                const float *yr = y + m * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    float gm = yr[c] > 0.f ? gr[c] : 0.f;
                    fs[c] += gm; fx[c] += gm * (xr[c] - mean[c]);
                }
            } else if (act) {
                #pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    float gm = xr[c] * scale[c] + shift[c] > 0.f ? gr[c] : 0.f;
                    fs[c] += gm; fx[c] += gm * (xr[c] - mean[c]);
                }
            } else {
                #pragma omp simd
                for (int64_t c = 0; c < C; ++c) { fs[c] += gr[c]; fx[c] += gr[c] * (xr[c] - mean[c]); }
            }
            partials_flush(&part, C, m, m0, m1);
        }
    }
    partials_total(&part, C, sum, sum_gx);
    for (int64_t c = 0; c < C; ++c) {
        double is = invstd[c];
        double sum_gxhat = sum_gx[c] * is;
        db[c] = (float)sum[c];
        dw[c] = (float)sum_gxhat;
        double wi = (double)w[c] * is;
        double coef_x = -wi * is * sum_gxhat / (double)M;
        a[c] = (float)wi;
        k1[c] = (float)coef_x;
        k0[c] = (float)(-wi * sum[c] / (double)M - coef_x * (double)mean[c]);
    }
    if (!(act && y)) dr = NULL;
    if (dx || dr) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const float *gr = g + m * C, *xr = x + m * C;
            float *dxr = dx ? dx + m * C : NULL, *drr = dr ? dr + m * C : NULL;
            if (act && y) {
                const float *yr = y + m * C;
                if (dxr && drr) {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                        float gm = yr[c] > 0.f ? gr[c] : 0.f;
                        dxr[c] = gm * a[c] + xr[c] * k1[c] + k0[c];
                        drr[c] = gm;
                    }
                } else if (dxr) {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                        float gm = yr[c] > 0.f ? gr[c] : 0.f;
                        dxr[c] = gm * a[c] + xr[c] * k1[c] + k0[c];
                    }
                } else {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) drr[c] = yr[c] > 0.f ? gr[c] : 0.f;
                }
            } else if (dxr) {
                if (act) {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                        float gm = xr[c] * scale[c] + shift[c] > 0.f ? gr[c] : 0.f;
                        dxr[c] = gm * a[c] + xr[c] * k1[c] + k0[c];
                    }
                } else {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) dxr[c] = gr[c] * a[c] + xr[c] * k1[c] + k0[c];
                }
            }
        }
    }
    free(sum); free(coef); partials_free(&part);
    return 0;
}
