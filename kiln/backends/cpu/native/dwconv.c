/* Depthwise 2-D convolution of float32 images with channels innermost: y[n, oh, ow, c] = b[c] + sum over the
 * taps (kh, kw) of x[n, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw, c] * w[kh, kw, c], then the layer's
 * epilogue (an activation and a residual add, in either order).
 *
 * x, y and the residual z are addressed by their batch, row and pixel strides in floats, channel stride 1: a
 * channel slice of a wider buffer (a Concat's part, read or written in place) is as good as a dense image.
 * Vectors run along the channels (a masked load and store at a row's channel tail never touch a neighbour's
 * channels); each step holds OWB output pixels of one channel vector in registers, so a tap's weights load
 * once for OWB outputs. Blocks whose windows leave the image (the row's first one holds just the pixels that
 * start left of it) take per-tap bounds checks; the others none.
 * Rows (n, oh) are shared among `threads` OpenMP threads.
 *
 * Activations by Kiln's codes (kiln.ops.activations: never renumbered); code 5 (Tanh) is not offered.
 */
#include "vec.h"

enum { A_NONE = 0, A_RELU = 1, A_LEAKY = 2, A_CLIP = 3, A_SIGMOID = 4, A_SILU = 6, A_HARDSWISH = 7,
       A_HARDSIGMOID = 8, A_MISH = 9, A_GELU = 10, A_GELU_TANH = 11 };

struct kiln_dw {  /* one layer's constants: made once at build */
    const float *w;  /* [KH * KW][Cp]: each tap's channel weights, zero-padded to Cp (a multiple of VLEN) */
    const float *b;  /* [Cp] */
    long C, Cp, KH, KW, sh, sw, dh, dw, ph, pw;
    int act, act_first;
    float alpha, beta;
};

#define OWB 4
#define ALWAYS static inline __attribute__((always_inline))

ALWAYS V activate(V x, int act, float a, float b) {
    switch (act) {
    case A_RELU: return vmax(x, vset(0.0f));
    case A_LEAKY: return vselect_lt(x, vset(0.0f), vmul(x, vset(a)), x);
    case A_CLIP: return vmin(vmax(x, vset(a)), vset(b));
    case A_SIGMOID: return vsig_times(vset(1.0f), x, 1.0f);
    case A_SILU: return vsig_times(x, x, 1.0f);
    case A_HARDSWISH: return vmul(x, vmul(vmin(vmax(vadd(x, vset(3.0f)), vset(0.0f)), vset(6.0f)), vset(1.0f / 6.0f)));
    case A_HARDSIGMOID: return vmin(vmax(vfma(x, vset(a), vset(b)), vset(0.0f)), vset(1.0f));
    case A_MISH: return vmish(x);
    case A_GELU: return vgelu(x);
    case A_GELU_TANH: {
        V u = vmul(x, vfma(vmul(x, x), vset(0.044715f), vset(1.0f)));
        return vsig_times(x, u, 2.0f * 0.79788456080286536f);
    }
    default: return x;
    }
}

/* the sum, its epilogue, stored: `full` lanes or the first `m` ones */
ALWAYS void finish(const struct kiln_dw *p, V acc, float *y, const float *z, int full, M m) {
    if (z && !p->act_first) acc = vadd(acc, full ? vload(z) : vloadm(z, m));
    acc = activate(acc, p->act, p->alpha, p->beta);
    if (z && p->act_first) acc = vadd(acc, full ? vload(z) : vloadm(z, m));
    if (full) vstore(y, acc); else vstorem(y, acc, m);
}

/* cnt <= OWB pixels of output row (n, oh) from ow on, for the channel vector at c0 */
ALWAYS void block(const struct kiln_dw *p, const float *x, long H, long W, long sxh, long sxw,
                  float *y, long syw, const float *z, long szw, long oh, long ow, long cnt, long c0, int full, M m,
                  const long KH, const long KW) {
    const long sw = p->sw, dw = p->dw, Cp = p->Cp;
    const float *wc = p->w + c0;
    const V bias = vload(p->b + c0);
    {
        V a0 = bias, a1 = bias, a2 = bias, a3 = bias;
        const long iw0 = ow * sw - p->pw;
        const int inside = cnt == OWB && iw0 >= 0 && (ow + OWB - 1) * sw - p->pw + (KW - 1) * dw < W;
        for (long kh = 0; kh < KH; kh++) {
            const long ih = oh * p->sh - p->ph + kh * p->dh;
            if (ih < 0 || ih >= H) continue;
            const float *xr = x + ih * sxh + c0;
            const float *wr = wc + kh * KW * Cp;
            if (inside) {
                for (long kw = 0; kw < KW; kw++) {
                    const V wv = vload(wr + kw * Cp);
                    const float *xp = xr + (iw0 + kw * dw) * sxw;
                    if (full) {
                        a0 = vfma(vload(xp), wv, a0);
                        a1 = vfma(vload(xp + sw * sxw), wv, a1);
                        a2 = vfma(vload(xp + 2 * sw * sxw), wv, a2);
                        a3 = vfma(vload(xp + 3 * sw * sxw), wv, a3);
                    } else {
                        a0 = vfma(vloadm(xp, m), wv, a0);
                        a1 = vfma(vloadm(xp + sw * sxw, m), wv, a1);
                        a2 = vfma(vloadm(xp + 2 * sw * sxw, m), wv, a2);
                        a3 = vfma(vloadm(xp + 3 * sw * sxw, m), wv, a3);
                    }
                }
            } else {  /* each pixel over the taps inside the image: kw in [lo, hi) */
#define EDGE(j, a)                                                                         \
                if ((j) < cnt) {                                                           \
                    const long b = iw0 + (j) * sw;                                         \
                    const long lo = b < 0 ? (-b + dw - 1) / dw : 0;                        \
                    long hi = (W - b + dw - 1) / dw;                                       \
                    if (hi > KW) hi = KW;                                                  \
                    for (long kw = lo; kw < hi; kw++) {                                    \
                        const float *xp = xr + (b + kw * dw) * sxw;                        \
                        a = vfma(full ? vload(xp) : vloadm(xp, m), vload(wr + kw * Cp), a); \
                    }                                                                      \
                }
                EDGE(0, a0) EDGE(1, a1) EDGE(2, a2) EDGE(3, a3)
#undef EDGE
            }
        }
        float *yp = y + ow * syw + c0;
        const float *zp = z ? z + ow * szw + c0 : 0;
        finish(p, a0, yp, zp, full, m);
        if (cnt > 1) finish(p, a1, yp + syw, zp ? zp + szw : 0, full, m);
        if (cnt > 2) finish(p, a2, yp + 2 * syw, zp ? zp + 2 * szw : 0, full, m);
        if (cnt > 3) finish(p, a3, yp + 3 * syw, zp ? zp + 3 * szw : 0, full, m);
    }
}

/* y = epilogue(depthwise conv(x)); every stride in floats. Returns 0, or 1 on arguments it cannot run. */
int kiln_dwconv_f32(const struct kiln_dw *p, const float *x, long N, long H, long W, long sxn, long sxh, long sxw,
                    float *y, long OH, long OW, long syn, long syh, long syw,
                    const float *z, long szn, long szh, long szw, int threads) {
    if (N < 0 || H <= 0 || W <= 0 || OH < 0 || OW < 0 || p->C <= 0 || p->Cp < p->C || p->Cp % VLEN) return 1;
    const long C = p->C, rows = N * OH;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (long r = 0; r < rows; r++) {
        const long n = r / OH, oh = r % OH;
        const float *xn = x + n * sxn;
        float *yr = y + n * syn + oh * syh;
        const float *zr = z ? z + n * szn + oh * szh : 0;
        /* pixel blocks outside, channel vectors inside: consecutive vectors read consecutive cache lines of the
         * same pixels. The pixels whose window starts left of the image form the first block on their own, so
         * the blocks after it are inside the image (no checks) up to the right border; the last may be shorter.
         * The common window sizes are constants here, so the compiler unrolls their tap loops. */
        const long lead = (p->pw + p->sw - 1) / p->sw;
#define ROW(KH_, KW_)                                                                                  \
        for (long ow = 0, cnt; ow < OW; ow += cnt) {                                                   \
            cnt = ow < lead ? lead - ow : OWB;                                                         \
            if (cnt > OWB) cnt = OWB;                                                                  \
            if (cnt > OW - ow) cnt = OW - ow;                                                          \
            long c0 = 0;                                                                               \
            for (; c0 + VLEN <= C; c0 += VLEN)                                                         \
                block(p, xn, H, W, sxh, sxw, yr, syw, zr, szw, oh, ow, cnt, c0, 1, vmask(VLEN), KH_, KW_); \
            if (c0 < C)                                                                                \
                block(p, xn, H, W, sxh, sxw, yr, syw, zr, szw, oh, ow, cnt, c0, 0, vmask(C - c0), KH_, KW_); \
        }
        if (p->KH == 3 && p->KW == 3) ROW(3, 3)
        else if (p->KH == 5 && p->KW == 5) ROW(5, 5)
        else if (p->KH == 7 && p->KW == 7) ROW(7, 7)
        else ROW(p->KH, p->KW)
#undef ROW
    }
    return 0;
}

struct kiln_dw_call {  /* one call's arguments in one struct (a bound call packs them once): one ctypes argument */
    const struct kiln_dw *p;
    const float *x;
    long N, H, W, sxn, sxh, sxw;
    float *y;
    long OH, OW, syn, syh, syw;
    const float *z;
    long szn, szh, szw;
    int threads;
};

int kiln_dwconv_f32_call(const struct kiln_dw_call *a) {
    return kiln_dwconv_f32(a->p, a->x, a->N, a->H, a->W, a->sxn, a->sxh, a->sxw, a->y, a->OH, a->OW, a->syn,
                           a->syh, a->syw, a->z, a->szn, a->szh, a->szw, a->threads);
}
