/* SEGate of float32 tensors (kiln.backends.cpu.se, kiln.ops.squeeze_excite): per image, the mean of X over
 * H, W, then h = act1(W1 @ mean + B1) and G = act2(W2 @ h + B2).
 *
 * Channel sums. X is read through its four strides. With a channel stride of 1 (channels-last) the channels
 * are cut into blocks of at most MAXV 16-float vectors whose sums stay in registers while the pixels stream
 * by (several pixels a step, each its own sums, when a block is narrow); channels past the last multiple of
 * 16 take one 8-float vector, then one sum each. Every CHUNK pixels the float sums are added into double
 * totals, so no float sum runs over more than CHUNK values. Any other channel stride sums each channel on
 * its own (vectorized along a row when W is contiguous).
 *
 * The weights come transposed and zero-padded (struct kiln_se_params): W1t [C, ld1], B1 [ld1], W2t [R, ld2],
 * B2 [ld2], ld1 >= R and ld2 >= O multiples of 16 with zeros past R and O, so both products run over whole
 * vectors of contiguous rows with their sums in registers.
 *
 * Threads. One image on `threads` > 1 threads: one OpenMP region splits its channel sums, by pixel ranges
 * with totals per thread (fewer than 128 channels a thread; the totals are added in thread order after it)
 * or else by channels, each thread then computing its channels' means and their rows of the first product
 * (partial hidden vectors, added in thread order after it); the rest runs on the calling thread. Several
 * images are shared out whole, each computed as on one thread. The output is deterministic for a thread
 * count. No barrier inside the region: on a shared machine a thread that misses one may sleep, and waking
 * it costs far more than the work here.
 * Returns 0, -1 when scratch memory cannot be allocated, -2 for padded lengths that are not multiples of 16
 * or too short.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct kiln_se_params {
    const float *w1t, *b1, *w2t, *b2;
    long C, R, ld1, O, ld2;
    int act1, act2;
    float alpha1, beta1, alpha2, beta2;
};

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

#ifdef __AVX512F__
#define MAXV 12 /* 16-float vectors per block of sums (32 vector registers) */
#define STEP(nv) ((nv) >= 8 ? 1 : (nv) >= 4 ? 2 : (nv) >= 2 ? 4 : 8)  /* rows a step: 8 or more sums */
#else
#define MAXV 4
#define STEP(nv) ((nv) >= 4 ? 1 : (nv) >= 2 ? 2 : 4)
#endif
#define CHUNK 64L   /* pixels per float partial sum */
#define STACK 4096  /* doubles of scratch on the stack; more is allocated */

#define ALWAYS static inline __attribute__((always_inline))

ALWAYS v16 ld16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
ALWAYS v8 ld8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
ALWAYS void st16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* The 16 lanes of a added pairwise (four dependent adds, not sixteen). */
ALWAYS float hsum16(v16 a) {
    v8 lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *)&a + sizeof lo, sizeof hi);
    lo += hi;
    return ((lo[0] + lo[4]) + (lo[1] + lo[5])) + ((lo[2] + lo[6]) + (lo[3] + lo[7]));
}

/* e^x, branch-free so that loops of it vectorize: x clamped to [-87, 88] (NaN stays NaN), x = n ln 2 + r with
 * |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 7 (truncation error below 2e-9), times 2^n built in
 * the exponent bits. */
ALWAYS float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float k = x * 1.44269504f + 12582912.0f;  /* 1.5 * 2^23: round(x / ln 2) lands in the low bits */
    const float n = k - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  /* ln 2 = 0.693359375 - 2.12194440e-4 */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    unsigned bits;
    memcpy(&bits, &k, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* y[i] = act(y[i]) for i < n, one loop per activation (each vectorizes). */
static void activate(float *restrict y, long n, int code, float alpha, float beta) {
    switch (code) {
    case 1: /* Relu */
        for (long i = 0; i < n; i++) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
        break;
    case 4: /* Sigmoid */
        for (long i = 0; i < n; i++) y[i] = 1.0f / (1.0f + exp_f(-y[i]));
        break;
    case 6: /* SiLU */
        for (long i = 0; i < n; i++) y[i] = y[i] / (1.0f + exp_f(-y[i]));
        break;
    case 7: /* HardSwish */
        for (long i = 0; i < n; i++) {
            float t = y[i] * (1.0f / 6.0f) + 0.5f;
            t = t < 0.0f ? 0.0f : t;
            y[i] *= t > 1.0f ? 1.0f : t;
        }
        break;
    case 8: /* HardSigmoid */
        for (long i = 0; i < n; i++) {
            const float t = alpha * y[i] + beta;
            y[i] = t < 0.0f ? 0.0f : t > 1.0f ? 1.0f : t;
        }
        break;
    default: /* none */
        break;
    }
}

/* ---- channel sums, channels-last ---- */

/* tot[0 .. 16 nv) += the sums of the 16 nv channels at p over the n pixels p, p + sw, ... */
ALWAYS void run16(const float *p, long n, long sw, const int nv, double *restrict tot) {
    const int u = STEP(nv);
    for (long i0 = 0; i0 < n; i0 += CHUNK) {
        const long m = n - i0 < CHUNK ? n - i0 : CHUNK;
        const float *q = p + i0 * sw;
        v16 a[8][MAXV];
        for (int s = 0; s < u; s++)
            for (int j = 0; j < nv; j++) a[s][j] = (v16){0};
        long i = 0;
        for (; i + u <= m; i += u, q += u * sw)
            for (int s = 0; s < u; s++)
                for (int j = 0; j < nv; j++) a[s][j] += ld16(q + s * sw + 16 * j);
        for (; i < m; i++, q += sw)
            for (int j = 0; j < nv; j++) a[0][j] += ld16(q + 16 * j);
        for (int s = 1; s < u; s++)
            for (int j = 0; j < nv; j++) a[0][j] += a[s][j];
        for (int j = 0; j < nv; j++)
            for (int k = 0; k < 16; k++) tot[16 * j + k] += (double)a[0][j][k];
    }
}

static void run_block(const float *p, long n, long sw, long nv, double *restrict tot) {
    switch (nv) {
#define CASE(k) case k: run16(p, n, sw, k, tot); break;
    CASE(1) CASE(2) CASE(3) CASE(4)
#if MAXV > 4
    CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
#undef CASE
    default: break;
    }
}

/* The same for 8 channels. */
static void run8(const float *p, long n, long sw, double *restrict tot) {
    for (long i0 = 0; i0 < n; i0 += CHUNK) {
        const long m = n - i0 < CHUNK ? n - i0 : CHUNK;
        const float *q = p + i0 * sw;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        long i = 0;
        for (; i + 4 <= m; i += 4, q += 4 * sw) {
            a0 += ld8(q); a1 += ld8(q + sw); a2 += ld8(q + 2 * sw); a3 += ld8(q + 3 * sw);
        }
        for (; i < m; i++, q += sw) a0 += ld8(q);
        a0 = (a0 + a1) + (a2 + a3);
        for (int k = 0; k < 8; k++) tot[k] += (double)a0[k];
    }
}

/* And for nc < 8 channels, one sum each. */
static void run1(const float *p, long n, long sw, long nc, double *restrict tot) {
    for (long c = 0; c < nc; c++)
        for (long i0 = 0; i0 < n; i0 += CHUNK) {
            const long m = n - i0 < CHUNK ? n - i0 : CHUNK;
            const float *q = p + c + i0 * sw;
            float s0 = 0.0f, s1 = 0.0f;
            long i = 0;
            for (; i + 2 <= m; i += 2) { s0 += q[i * sw]; s1 += q[(i + 1) * sw]; }
            if (i < m) s0 += q[i * sw];
            tot[c] += (double)(s0 + s1);
        }
}

/* One block of channels [c0, c0 + nc) (kind 16: nc / 16 vectors; 8; 1: nc single channels) over the
 * pixels k0 <= k < k1 (k = h W + w). */
static void cl_block(const float *x, long W, long sh, long sw, long c0, long nc, int kind, long k0, long k1,
                     double *restrict tot) {
    const int flat = sh == W * sw;
    for (long h = k0 / W; h * W < k1; h++) {
        long a = k0 > h * W ? k0 - h * W : 0, b = k1 < (h + 1) * W ? k1 - h * W : W;
        if (flat) { a = k0 - h * W; b = k1 - h * W; }  /* the rows follow on: one run */
        const float *p = x + h * sh + a * sw + c0;
        if (kind == 16) run_block(p, b - a, sw, nc / 16, tot + c0);
        else if (kind == 8) run8(p, b - a, sw, tot + c0);
        else run1(p, b - a, sw, nc, tot + c0);
        if (flat) break;
    }
}

/* tot[c] = the sum over the pixels k0 <= k < k1 of channel c, for the channels of the vectors v0 <= v < v1
 * (16 each) and, with tail, the channels past the last whole vector. */
static void cl_sums(const float *x, long C, long W, long sh, long sw, long v0, long v1, int tail, long k0,
                    long k1, double *restrict tot) {
    const long c_end = tail ? C : 16 * v1;
    memset(tot + 16 * v0, 0, (size_t)(c_end - 16 * v0) * sizeof(double));
    if (k1 <= k0) return;
    const long nvec = v1 - v0, nblk = (nvec + MAXV - 1) / MAXV;
    for (long b = 0; b < nblk; b++) {  /* blocks of nearly equal width */
        const long a = v0 + nvec * b / nblk, e = v0 + nvec * (b + 1) / nblk;
        cl_block(x, W, sh, sw, 16 * a, 16 * (e - a), 16, k0, k1, tot);
    }
    long c = 16 * v1;
    if (tail && C - c >= 8) { cl_block(x, W, sh, sw, c, 8, 8, k0, k1, tot); c += 8; }
    if (tail && C > c) cl_block(x, W, sh, sw, c, C - c, 1, k0, k1, tot);
}

/* ---- channel sums, any other layout ---- */

/* The sum of the n contiguous floats at p: 32 lanes of at most 32 values, or 64 of 16, per float sum. */
ALWAYS double contiguous_sum(const float *p, long n) {
    double total = 0.0;
    long i = 0;
    for (; i + 1024 <= n; i += 1024) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (long k = i; k < i + 1024; k += 64) {
            a0 += ld16(p + k); a1 += ld16(p + k + 16); a2 += ld16(p + k + 32); a3 += ld16(p + k + 48);
        }
        total += (double)hsum16((a0 + a1) + (a2 + a3));
    }
    v16 a0 = {0}, a1 = {0};
    for (; i + 32 <= n; i += 32) { a0 += ld16(p + i); a1 += ld16(p + i + 16); }
    if (i + 16 <= n) { a0 += ld16(p + i); i += 16; }
    float t = hsum16(a0 + a1);
    for (; i < n; i++) t += p[i];
    return total + (double)t;
}

/* The sum of n floats at p with stride s (float sums of at most 16 values). */
static double strided_sum(const float *p, long n, long s) {
    double total = 0.0;
    for (long i = 0; i < n; i += 16) {
        const long m = n - i < 16 ? n - i : 16;
        float a0 = 0.0f, a1 = 0.0f;
        long k = 0;
        for (; k + 2 <= m; k += 2) { a0 += p[(i + k) * s]; a1 += p[(i + k + 1) * s]; }
        if (k < m) a0 += p[(i + k) * s];
        total += (double)(a0 + a1);
    }
    return total;
}

/* tot[c] = the sum of channel c over all pixels, for c0 <= c < c1. */
static void channel_sums(const float *x, long H, long W, long sc, long sh, long sw, long c0, long c1, double *tot) {
    if (sw == 1 && sh == W) {  /* NCHW-contiguous maps */
        for (long c = c0; c < c1; c++) tot[c] = contiguous_sum(x + c * sc, H * W);
        return;
    }
    for (long c = c0; c < c1; c++) {
        double total = 0.0;
        for (long h = 0; h < H; h++)
            total += sw == 1 ? contiguous_sum(x + c * sc + h * sh, W) : strided_sum(x + c * sc + h * sh, W, sw);
        tot[c] = total;
    }
}

/* ---- the products ---- */

/* One block of nv vectors of y = [b +] sum_{i < I} a[i] M[i, :] (rows of M ld floats apart). */
ALWAYS void mv16(const float *restrict a, long I, const float *restrict M, long ld, const float *b,
                 float *restrict y, const int nv) {
    const int u = STEP(nv);
    v16 s[8][MAXV];
    for (int r = 0; r < u; r++)
        for (int j = 0; j < nv; j++) s[r][j] = (v16){0};
    long i = 0;
    for (; i + u <= I; i += u)
        for (int r = 0; r < u; r++) {
            const v16 ai = (v16){0} + a[i + r];
            for (int j = 0; j < nv; j++) s[r][j] += ai * ld16(M + (i + r) * ld + 16 * j);
        }
    for (; i < I; i++) {
        const v16 ai = (v16){0} + a[i];
        for (int j = 0; j < nv; j++) s[0][j] += ai * ld16(M + i * ld + 16 * j);
    }
    for (int r = 1; r < u; r++)
        for (int j = 0; j < nv; j++) s[0][j] += s[r][j];
    for (int j = 0; j < nv; j++) st16(y + 16 * j, b ? s[0][j] + ld16(b + 16 * j) : s[0][j]);
}

/* y[j] = [b[j] +] sum_{i < I} a[i] M[i, j] for the vectors v0 <= v < v1 of columns (j = 16 v + lane); b may be
 * NULL. */
static void matvec(const float *restrict a, long I, const float *restrict M, long ld, const float *b,
                   float *restrict y, long v0, long v1) {
    const long nvec = v1 - v0, nblk = (nvec + MAXV - 1) / MAXV;
    for (long k = 0; k < nblk; k++) {
        const long j0 = 16 * (v0 + nvec * k / nblk), nv = v0 + nvec * (k + 1) / nblk - j0 / 16;
        switch (nv) {
#define CASE(q) case q: mv16(a, I, M + j0, ld, b ? b + j0 : NULL, y + j0, q); break;
        CASE(1) CASE(2) CASE(3) CASE(4)
#if MAXV > 4
        CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
#undef CASE
        default: break;
        }
    }
}

/* ---- per image ---- */

struct scratch {
    double *tot;   /* rows x ldt double totals */
    float *mean;   /* C */
    float *hid;    /* ld1 */
    float *g;      /* ld2 */
};

/* Thread t of nt: its share of the channel sums of image x. Returns 1 when it summed all channels over its
 * pixels (fewer than 128 channels a thread, channels-last) into row t of tot (ldt apart), else 0 when it
 * summed the channels [*c0, *c1) over all pixels into tot. */
static int sums_share(const struct kiln_se_params *p, const float *x, long H, long W, long sc, long sh, long sw,
                      double *tot, long ldt, int t, int nt, long *c0, long *c1) {
    const long C = p->C, P = H * W, nvec = C / 16;
    if (sc != 1 && C > 1) {
        *c0 = C * t / nt;
        *c1 = C * (t + 1) / nt;
        channel_sums(x, H, W, sc, sh, sw, *c0, *c1, tot);
        return 0;
    }
    if (nt > 1 && nvec < 8L * nt) {
        cl_sums(x, C, W, sh, sw, 0, nvec, 1, P * t / nt, P * (t + 1) / nt, tot + (size_t)t * ldt);
        return 1;
    }
    *c0 = 16 * (nvec * t / nt);
    *c1 = t == nt - 1 ? C : 16 * (nvec * (t + 1) / nt);
    cl_sums(x, C, W, sh, sw, nvec * t / nt, nvec * (t + 1) / nt, t == nt - 1, 0, P, tot);
    return 0;
}

/* mean[c] for c0 <= c < c1 from ntot rows of totals (added in row order), then y = [b1 +] the rows c0 .. c1
 * of the first product. */
static void first_product(const struct kiln_se_params *p, long P, const double *tot, long ldt, int ntot,
                          long c0, long c1, float *mean, const float *b1, float *y) {
    const double inv = 1.0 / (double)P;
    for (long c = c0; c < c1; c++) {
        double v = tot[c];
        for (int k = 1; k < ntot; k++) v += tot[(size_t)k * ldt + c];
        mean[c] = (float)(v * inv);
    }
    matvec(mean + c0, c1 - c0, p->w1t + c0 * p->ld1, p->ld1, b1, y, 0, p->ld1 / 16);
}

/* From the hidden pre-activations s->hid: the gate of the image into y. */
static void second_product(const struct kiln_se_params *p, const struct scratch *s, float *y) {
    activate(s->hid, p->R, p->act1, p->alpha1, p->beta1);
    matvec(s->hid, p->R, p->w2t, p->ld2, p->b2, s->g, 0, p->ld2 / 16);
    activate(s->g, p->O, p->act2, p->alpha2, p->beta2);
    memcpy(y, s->g, (size_t)p->O * sizeof(float));
}

/* The gate of image x into y, on the calling thread. */
static void image(const struct kiln_se_params *p, const float *x, long H, long W, long sc, long sh, long sw,
                  long ldt, const struct scratch *s, float *y) {
    long c0 = 0, c1 = 0;
    sums_share(p, x, H, W, sc, sh, sw, s->tot, ldt, 0, 1, &c0, &c1);
    first_product(p, H * W, s->tot, ldt, 1, 0, p->C, s->mean, p->b1, s->hid);
    second_product(p, s, y);
}

/* G [N, O] (contiguous) of the images x (N x C x H x W, strides sn, sc, sh, sw) on `threads` threads. One
 * image: the threads split its channel sums (and, when split by channels, the first product's rows: partial
 * hidden vectors added in thread order); the second product runs on the calling thread. Several images are
 * shared out whole, each computed as on one thread. */
int kiln_se_gate_f32(const struct kiln_se_params *p, const float *x, long N, long H, long W, long sn, long sc,
                     long sh, long sw, float *y, long threads) {
    if (p->ld1 < p->R || p->ld2 < p->O || p->ld1 % 16 || p->ld2 % 16) return -2;
    if (N <= 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (N > 1 && threads > N) threads = N;
    const long C = p->C, ldt = (C + 7) / 8 * 8, P = H * W;
    /* scratch sets: one per thread for a batch, else one with a row of totals and a partial hidden vector
     * per thread */
    const int sets = N > 1 ? (int)threads : 1, rows = N > 1 ? 1 : (int)threads;
    const size_t per = (size_t)rows * ldt + ((size_t)ldt + (size_t)rows * p->ld1 + p->ld2 + 1) / 2;  /* doubles */
    double stack[STACK] __attribute__((aligned(64))), *heap = NULL, *mem = stack;
    if ((size_t)sets * per > STACK) {
        heap = malloc((size_t)sets * per * sizeof(double));
        if (!heap) return -1;
        mem = heap;
    }
    struct scratch s[64];
    for (int k = 0; k < sets; k++) {
        s[k].tot = mem + (size_t)k * per;
        s[k].hid = (float *)(s[k].tot + (size_t)rows * ldt);  /* rows x ld1: 64-byte rows */
        s[k].g = s[k].hid + (size_t)rows * p->ld1;
        s[k].mean = s[k].g + p->ld2;
    }
    if (N == 1 && threads > 1) {
        int used = 1, by_pixels = 0;
        #pragma omp parallel num_threads(threads)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            long c0 = 0, c1 = 0;
            const int px = sums_share(p, x, H, W, sc, sh, sw, s[0].tot, ldt, t, nt, &c0, &c1);
            if (t == 0) { used = nt; by_pixels = px; }
            if (!px)
                first_product(p, P, s[0].tot, ldt, 1, c0, c1, s[0].mean, t == 0 ? p->b1 : NULL,
                              s[0].hid + (size_t)t * p->ld1);
        }
        if (by_pixels) {
            first_product(p, P, s[0].tot, ldt, used, 0, C, s[0].mean, p->b1, s[0].hid);
        } else {
            for (int k = 1; k < used; k++)
                for (long r = 0; r < p->R; r++) s[0].hid[r] += s[0].hid[(size_t)k * p->ld1 + r];
        }
        second_product(p, &s[0], y);
    } else if (threads == 1) {
        for (long n = 0; n < N; n++) image(p, x + n * sn, H, W, sc, sh, sw, ldt, &s[0], y + n * p->O);
    } else {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (long n = 0; n < N; n++) {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            image(p, x + n * sn, H, W, sc, sh, sw, ldt, &s[t], y + n * p->O);
        }
    }
    free(heap);
    return 0;
}

/* Channel means of a bfloat16 map, for SEGate in CPU BF16 builds (kiln.backends.cpu.se, cpu.se_gate_bf16):
 * means[n * C + c] = the mean over H x W of x[n, c] (bfloat16, read through its strides, in elements), in float
 * partial sums added into double totals every MEAN_CHUNK pixels as above. Images x blocks of 64 channels are
 * shared out on `threads` threads; within a block the pixels stream by with the block's sums in a float array
 * (a contiguous run of channels when sc == 1, the channels-last layout). The gate's products then run on these
 * means by kiln_se_gate_f32 over an N x C x 1 x 1 map. */
#define MEAN_CHUNK 256
static inline float bf16_value(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

void kiln_channel_means_bf16(const uint16_t *x, long N, long C, long H, long W, long sn, long sc, long sh, long sw,
                             float *means, long threads) {
    const long blocks = (C + 63) / 64, P = H * W;
    if (threads < 1) threads = 1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * blocks > 1)
    for (long job = 0; job < N * blocks; job++) {
        const long n = job / blocks, c0 = (job % blocks) * 64, nc = C - c0 < 64 ? C - c0 : 64;
        float acc[64];
        double tot[64];
        for (long k = 0; k < nc; k++) { acc[k] = 0.0f; tot[k] = 0.0; }
        long run = 0;
        for (long h = 0; h < H; h++) {
            for (long w = 0; w < W; w++) {
                const uint16_t *px = x + n * sn + h * sh + w * sw + c0 * sc;
                if (sc == 1) {
                    for (long k = 0; k < nc; k++) acc[k] += bf16_value(px[k]);
                } else {
                    for (long k = 0; k < nc; k++) acc[k] += bf16_value(px[k * sc]);
                }
                if (++run == MEAN_CHUNK) {
                    for (long k = 0; k < nc; k++) { tot[k] += acc[k]; acc[k] = 0.0f; }
                    run = 0;
                }
            }
        }
        for (long k = 0; k < nc; k++) means[n * C + c0 + k] = (float)((tot[k] + acc[k]) / (double)P);
    }
}
