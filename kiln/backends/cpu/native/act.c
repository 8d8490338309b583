/* Transcendental kernels over dense float32 arrays, in place: the activations y = act(y) (or act(y) + z), and the
 * masked row softmax of attention scores.
 *
 * For layers whose library primitive (oneDNN) computes the bare product: its own exp-based post-ops (swish,
 * logistic, gelu, mish) cost 25-30 cycles per 16 values on a 2-core AVX-512 EPYC, more than the convolution
 * itself for a depthwise layer; here they are one polynomial exp and one division, ~12 cycles.
 *
 * The math is written once over a small vector vocabulary (V, vadd, vfma, ...) defined for AVX-512, for
 * AVX2 + FMA and for plain C (one float per "vector"), chosen by what the compiler targets (-march=native).
 * The vector vocabulary and the exp / erfc polynomials are in vec.h.
 */
#include "vec.h"

enum { ACT_SIGMOID = 1, ACT_SILU = 2, ACT_MISH = 3, ACT_GELU = 4, ACT_GELU_TANH = 5 };

static inline V vact(V x, int act) {
    switch (act) {
    case ACT_SIGMOID: return vsig_times(vset(1.0f), x, 1.0f);
    case ACT_SILU: return vsig_times(x, x, 1.0f);
    case ACT_MISH: return vmish(x);
    case ACT_GELU: return vgelu(x);
    default: {  /* ACT_GELU_TANH: x/2 (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) */
        V u = vmul(x, vfma(vmul(x, x), vset(0.044715f), vset(1.0f)));
        return vsig_times(x, u, 2.0f * 0.79788456080286536f);
    }
    }
}

/* one activation's loop: four independent vectors per step, so that their long dependency chains (a division,
 * a degree-9 polynomial, exp) overlap instead of one vector's latency setting the pace */
#define ACT_LOOP(F)                                                                      \
    for (; i + 4 * VLEN <= hi; i += 4 * VLEN) {                                          \
        V a0 = F(vload(y + i)), a1 = F(vload(y + i + VLEN));                             \
        V a2 = F(vload(y + i + 2 * VLEN)), a3 = F(vload(y + i + 3 * VLEN));              \
        if (z) {                                                                         \
            a0 = vadd(a0, vload(z + i)); a1 = vadd(a1, vload(z + i + VLEN));             \
            a2 = vadd(a2, vload(z + i + 2 * VLEN)); a3 = vadd(a3, vload(z + i + 3 * VLEN)); \
        }                                                                                \
        vstore(y + i, a0); vstore(y + i + VLEN, a1);                                     \
        vstore(y + i + 2 * VLEN, a2); vstore(y + i + 3 * VLEN, a3);                      \
    }

static inline V vsigmoid1(V x) { return vsig_times(vset(1.0f), x, 1.0f); }
static inline V vsilu1(V x) { return vsig_times(x, x, 1.0f); }
static inline V vgelu_tanh1(V x) { return vact(x, ACT_GELU_TANH); }

static void run_range(float *y, const float *z, long lo, long hi, int act) {
    long i = lo;
    switch (act) {
    case ACT_SIGMOID: ACT_LOOP(vsigmoid1) break;
    case ACT_SILU: ACT_LOOP(vsilu1) break;
    case ACT_MISH: ACT_LOOP(vmish) break;
    case ACT_GELU: ACT_LOOP(vgelu) break;
    default: ACT_LOOP(vgelu_tanh1) break;
    }
    for (; i + VLEN <= hi; i += VLEN) {
        V v = vact(vload(y + i), act);
        if (z) v = vadd(v, vload(z + i));
        vstore(y + i, v);
    }
    if (i < hi) {  /* the tail, through a full vector of scratch */
        float buf[VLEN], zb[VLEN];
        long k = hi - i;
        memset(buf, 0, sizeof buf);
        memcpy(buf, y + i, (size_t)k * sizeof(float));
        V v = vact(vload(buf), act);
        if (z) {
            memset(zb, 0, sizeof zb);
            memcpy(zb, z + i, (size_t)k * sizeof(float));
            v = vadd(v, vload(zb));
        }
        vstore(buf, v);
        memcpy(y + i, buf, (size_t)k * sizeof(float));
    }
}

/* y[0..n) = act(y) (+ z when z is not NULL), on `threads` OpenMP threads (contiguous chunks, vector-aligned) */
int kiln_act(float *y, const float *z, long n, int act, int threads) {
    if (act < ACT_SIGMOID || act > ACT_GELU_TANH || n < 0) return 1;
    if (threads <= 1) {
        run_range(y, z, 0, n, act);
        return 0;
    }
    long chunk = ((n + threads - 1) / threads + VLEN - 1) / VLEN * VLEN;
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        long lo = (long)t * chunk, hi = lo + chunk < n ? lo + chunk : n;
        if (lo < hi) run_range(y, z, lo, hi, act);
    }
    return 0;
}

/* Attention's softmax over the rows of s [R = B * H * Sq, Skv] (dense), in place: each score gets the mask's
 * value added (mask_kind 1: float32, additive) or is dropped where the mask is 0 (mask_kind 2: one byte per
 * value, nonzero attends); the mask is addressed by element strides (mb, mh, mi, mj; 0 along broadcast dims).
 * causal: key j > query i is dropped. A row with every key dropped becomes zeros. */
int kiln_softmax(float *s, long B, long H, long Sq, long Skv, const void *mask, int mask_kind, long mb, long mh,
                 long mi, long mj, int causal, int threads) {
    if (B < 0 || H < 0 || Sq < 0 || Skv <= 0 || mask_kind < 0 || mask_kind > 2) return 1;
    long rows = B * H * Sq;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (long r = 0; r < rows; r++) {
        long i = r % Sq, h = (r / Sq) % H, b = r / (Sq * H);
        float *row = s + r * Skv;
        long end = causal ? (i + 1 < Skv ? i + 1 : Skv) : Skv;  /* keys past `end` are dropped */
        if (mask_kind == 1) {
            const float *m = (const float *)mask + b * mb + h * mh + i * mi;
            for (long j = 0; j < end; j++) row[j] += m[j * mj];
        } else if (mask_kind == 2) {
            const unsigned char *m = (const unsigned char *)mask + b * mb + h * mh + i * mi;
            for (long j = 0; j < end; j++) if (!m[j * mj]) row[j] = -INFINITY;
        }
        float mx = -INFINITY, buf[VLEN];
        long j = 0;
        if (end >= VLEN) {
            V vmx = vload(row);
            for (j = VLEN; j + VLEN <= end; j += VLEN) vmx = vmax(vmx, vload(row + j));
            vstore(buf, vmx);
            for (int k = 0; k < VLEN; k++) mx = buf[k] > mx ? buf[k] : mx;
        }
        for (; j < end; j++) mx = row[j] > mx ? row[j] : mx;
        if (mx == -INFINITY) {  /* nothing attends (or a NaN-free row of -inf): zeros, as the reference */
            memset(row, 0, (size_t)Skv * sizeof(float));
            continue;
        }
        V vm = vset(mx), acc = vset(0.0f);
        for (j = 0; j + VLEN <= end; j += VLEN) {
            V e = vexp(vsub(vload(row + j), vm));
            vstore(row + j, e);
            acc = vadd(acc, e);
        }
        float sum = 0.0f;
        vstore(buf, acc);
        for (int k = 0; k < VLEN; k++) sum += buf[k];
        for (; j < end; j++) {
            float t[VLEN];
            for (int k = 0; k < VLEN; k++) t[k] = row[j] - mx;
            vstore(t, vexp(vload(t)));
            row[j] = t[0];
            sum += t[0];
        }
        V inv = vset(1.0f / sum);
        for (j = 0; j + VLEN <= end; j += VLEN) vstore(row + j, vmul(vload(row + j), inv));
        for (; j < end; j++) row[j] *= 1.0f / sum;
        for (; j < Skv; j++) row[j] = 0.0f;
    }
    return 0;
}

/* The lanes of a float vector summed in double, lane 0 first. */
static double lanes_sum(V acc) {
    float buf[VLEN];
    vstore(buf, acc);
    double s = 0.0;
    for (int k = 0; k < VLEN; k++) s += buf[k];
    return s;
}

/* LayerNormalization over the last axis: rows of n floats at row strides ldx / ldy (elements), y = (x - mean) *
 * rstd * w + b (b may be NULL), the mean and the biased variance in two passes over the row with float vector
 * partial sums, rstd = 1 / sqrt(var + eps), as aten's layer_norm computes them. */
int kiln_layernorm(const float *x, float *y, const float *w, const float *b, long rows, long n, long ldx, long ldy,
                   float eps, int threads) {
    if (rows < 0 || n <= 0 || ldx < n || ldy < n) return 1;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        V acc = vset(0.0f);
        long j = 0;
        for (; j + VLEN <= n; j += VLEN) acc = vadd(acc, vload(xr + j));
        double s = lanes_sum(acc);
        for (; j < n; j++) s += xr[j];
        float mean = (float)(s / (double)n);
        V vm = vset(mean);
        acc = vset(0.0f);
        for (j = 0; j + VLEN <= n; j += VLEN) {
            V d = vsub(vload(xr + j), vm);
            acc = vfma(d, d, acc);
        }
        double q = lanes_sum(acc);
        for (; j < n; j++) q += (double)(xr[j] - mean) * (double)(xr[j] - mean);
        float rstd = (float)(1.0 / sqrt(q / (double)n + (double)eps));
        V vr = vset(rstd);
        for (j = 0; j + VLEN <= n; j += VLEN) {
            V t = vmul(vmul(vsub(vload(xr + j), vm), vr), vload(w + j));
            if (b) t = vadd(t, vload(b + j));
            vstore(yr + j, t);
        }
        for (; j < n; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + (b ? b[j] : 0.0f);
    }
    return 0;
}

/* RMSNorm over rows of n floats: y = x / sqrt(mean(x^2) + eps) * w; the sum of squares in float vector lanes,
   reduced in double (as kiln_layernorm). */
int kiln_rmsnorm(const float *x, float *y, const float *w, long rows, long n, long ldx, long ldy, float eps,
                 int threads) {
    if (rows < 0 || n <= 0 || ldx < n || ldy < n) return 1;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        V acc = vset(0.0f);
        long j = 0;
        for (; j + VLEN <= n; j += VLEN) {
            V v = vload(xr + j);
            acc = vfma(v, v, acc);
        }
        double q = lanes_sum(acc);
        for (; j < n; j++) q += (double)xr[j] * (double)xr[j];
        float rstd = (float)(1.0 / sqrt(q / (double)n + (double)eps));
        V vr = vset(rstd);
        for (j = 0; j + VLEN <= n; j += VLEN) vstore(yr + j, vmul(vmul(vload(xr + j), vr), vload(w + j)));
        for (; j < n; j++) yr[j] = xr[j] * rstd * w[j];
    }
    return 0;
}
