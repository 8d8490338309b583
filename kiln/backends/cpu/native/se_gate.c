/* SEGate of float32 tensors (kiln.backends.cpu.se, kiln.ops.squeeze_excite): per image, the mean of X over
 * H, W, then h = act1(W1 @ mean + B1) and G = act2(W2 @ h + B2).
 *
 * X is read through its four strides. With a channel stride of 1 (channels-last) a row of W pixels is
 * summed in float into a C-vector (vectorized over the channels), each row's sum then added into a double
 * total; rows are shared among the caller's `threads` OpenMP threads (static schedule, each thread its own
 * totals, added in thread order: deterministic for a thread count). Any other channel stride sums each
 * channel on its own (parallel over channels). The weights come transposed, W1t [C, R] and
 * W2t [R, O], so both products run over contiguous rows without a reduction chain.
 * Returns 0, or -1 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float act(int code, float v, float alpha, float beta) {
    switch (code) {
    case 1: return v > 0.0f ? v : 0.0f;                                             /* Relu */
    case 4: return 1.0f / (1.0f + expf(-v));                                        /* Sigmoid */
    case 6: return v / (1.0f + expf(-v));                                           /* SiLU */
    case 7: return v * fminf(fmaxf(v * (1.0f / 6.0f) + 0.5f, 0.0f), 1.0f);          /* HardSwish */
    case 8: return fminf(fmaxf(alpha * v + beta, 0.0f), 1.0f);                      /* HardSigmoid */
    default: return v;                                                              /* none */
    }
}

/* mean[c] of image x (C channels, H x W pixels, strides sc, sh, sw); 0 or -1 (no memory). */
static int image_mean(const float *x, long C, long H, long W, long sc, long sh, long sw, float *mean, int threads) {
    const double inv = 1.0 / (double)(H * W);
    if (threads < 1) threads = 1;
    if (sc != 1 && C > 1) {
        #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (long c = 0; c < C; c++) {
            double total = 0.0;
            for (long h = 0; h < H; h++) {
                const float *restrict p = x + c * sc + h * sh;
                float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                long w = 0;
                if (sw == 1)  /* eight running sums: a vector of them, no reduction chain */
                    for (; w + 8 <= W; w += 8)
                        for (int k = 0; k < 8; k++) lanes[k] += p[w + k];
                for (; w < W; w++) lanes[0] += p[w * sw];
                double row = 0.0;
                for (int k = 0; k < 8; k++) row += lanes[k];
                total += row;
            }
            mean[c] = (float)(total * inv);
        }
        return 0;
    }
    double *totals = calloc((size_t)threads * (size_t)C, sizeof(double));
    float *rows = malloc((size_t)threads * (size_t)C * sizeof(float));
    if (!totals || !rows) { free(totals); free(rows); return -1; }
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        double *restrict tot = totals + (size_t)t * C;
        float *restrict row = rows + (size_t)t * C;
        #pragma omp for schedule(static)
        for (long h = 0; h < H; h++) {
            memset(row, 0, (size_t)C * sizeof(float));
            for (long w = 0; w < W; w++) {
                const float *restrict p = x + h * sh + w * sw;
                for (long c = 0; c < C; c++) row[c] += p[c];
            }
            for (long c = 0; c < C; c++) tot[c] += row[c];
        }
    }
    for (long c = 0; c < C; c++) {
        double s = 0.0;
        for (int t = 0; t < threads; t++) s += totals[(size_t)t * C + c];
        mean[c] = (float)(s * inv);
    }
    free(totals);
    free(rows);
    return 0;
}

int kiln_se_gate_f32(const float *x, long N, long C, long H, long W, long sn, long sc, long sh, long sw,
                     const float *restrict w1t, const float *b1, long R, const float *restrict w2t, const float *b2,
                     long O,
                     int act1, float alpha1, float beta1, int act2, float alpha2, float beta2,
                     float *y, long syn, long syc, long threads) {
    float *mean = malloc((size_t)(C + R + O) * sizeof(float));
    if (!mean) return -1;
    float *restrict hid = mean + C, *restrict g = hid + R;
    for (long n = 0; n < N; n++) {
        if (image_mean(x + n * sn, C, H, W, sc, sh, sw, mean, (int)threads) != 0) { free(mean); return -1; }
        memcpy(hid, b1, (size_t)R * sizeof(float));
        for (long c = 0; c < C; c++) {
            const float m = mean[c], *restrict wr = w1t + c * R;
            for (long r = 0; r < R; r++) hid[r] += wr[r] * m;
        }
        for (long r = 0; r < R; r++) hid[r] = act(act1, hid[r], alpha1, beta1);
        memcpy(g, b2, (size_t)O * sizeof(float));
        for (long r = 0; r < R; r++) {
            const float v = hid[r], *restrict wr = w2t + r * O;
            for (long o = 0; o < O; o++) g[o] += wr[o] * v;
        }
        for (long o = 0; o < O; o++) y[n * syn + o * syc] = act(act2, g[o], alpha2, beta2);
    }
    free(mean);
    return 0;
}
