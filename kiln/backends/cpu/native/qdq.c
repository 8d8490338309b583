/* QuantizeLinear / DequantizeLinear of 8-bit tensors (kiln.backends.cpu.qdq, kiln.ops.quantize), with the
 * reference's arithmetic bit for bit.
 *
 * Tensors are addressed as N x C x P (images, channels, pixels) through three strides in elements each side, so
 * one pass reads NCHW or NHWC (or a channel slice) and writes the layout of the destination (channels-last for
 * the int8 layers). Scales and zero points are float32 arrays indexed by c * ps (ps = 0: per tensor, 1: per
 * channel); the zero points are the integers exactly.
 *
 * Quantize: v = x / s in IEEE float32 division (where the reference works in bfloat16, the quotient rounded to
 * bfloat16: float32 division then rounding to a type of at most 11 bits is that type's correctly rounded
 * division), rounded half to even (rintf under the default rounding mode), plus the zero point, saturated;
 * NaN gives 0, as the reference's float to integer conversion does on x86.
 * Dequantize: (x - z) * s in float32 (x - z is exact), converted to the output type.
 *
 * Work is split over (image, block of pixels) among the caller's `threads` OpenMP threads; inside a block the
 * inner loop runs along whichever of the input's channel or pixel axes is contiguous, into a contiguous run of
 * the destination (or a buffer scattered through its strides, e.g. NCHW read, NHWC written).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PBLOCK 256L

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float quant(float v, float s, float z, float lo, float hi) {
    v = rintf(v / s) + z;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return v == v ? v : 0.0f;
}

static inline float quant_bf16(float v, float s, float z, float lo, float hi) {
    v = rintf(round_bf16(v / s)) + z;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return v == v ? v : 0.0f;
}

#define IDENT(v) (v)

/* Row kernels: n elements x[i * sx] into a contiguous y[i], with one (s, z) pair (_1) or one per element (_n).
 * Contiguous destinations keep the loops vectorized; strided ones go through a small buffer (see BLOCK). */
#define QUANT_ROWS(NAME, TX, LOAD, TY)                                                                        \
    static void NAME##_1(const TX *restrict x, long sx, TY *restrict y, long n, const float *s,             \
                         const float *z, float lo, float hi, int wb) {                                        \
        const float sc = *s, zc = *z;                                                                         \
        if (wb) for (long i = 0; i < n; i++) y[i] = (TY)(int)quant_bf16(LOAD(x[i * sx]), sc, zc, lo, hi);    \
        else if (sx == 1) for (long i = 0; i < n; i++) y[i] = (TY)(int)quant(LOAD(x[i]), sc, zc, lo, hi);     \
        else for (long i = 0; i < n; i++) y[i] = (TY)(int)quant(LOAD(x[i * sx]), sc, zc, lo, hi);             \
    }                                                                                                         \
    static void NAME##_n(const TX *restrict x, long sx, TY *restrict y, long n, const float *restrict s,     \
                         const float *restrict z, float lo, float hi, int wb) {                               \
        if (wb) for (long i = 0; i < n; i++) y[i] = (TY)(int)quant_bf16(LOAD(x[i * sx]), s[i], z[i], lo, hi); \
        else for (long i = 0; i < n; i++) y[i] = (TY)(int)quant(LOAD(x[i * sx]), s[i], z[i], lo, hi);         \
    }

#define DEQUANT_ROWS(NAME, TX, TY, STORE)                                                                     \
    static void NAME##_1(const TX *restrict x, long sx, TY *restrict y, long n, const float *s,             \
                         const float *z, float lo, float hi, int wb) {                                        \
        const float sc = *s, zc = *z;                                                                         \
        (void)lo, (void)hi, (void)wb;                                                                         \
        if (sx == 1) for (long i = 0; i < n; i++) y[i] = STORE(((float)x[i] - zc) * sc);                      \
        else for (long i = 0; i < n; i++) y[i] = STORE(((float)x[i * sx] - zc) * sc);                         \
    }                                                                                                         \
    static void NAME##_n(const TX *restrict x, long sx, TY *restrict y, long n, const float *restrict s,     \
                         const float *restrict z, float lo, float hi, int wb) {                               \
        (void)lo, (void)hi, (void)wb;                                                                         \
        for (long i = 0; i < n; i++) y[i] = STORE(((float)x[i * sx] - z[i]) * s[i]);                          \
    }

QUANT_ROWS(q_f32_s8, float, IDENT, int8_t)
QUANT_ROWS(q_f32_u8, float, IDENT, uint8_t)
QUANT_ROWS(q_bf16_s8, uint16_t, bf16_to_f32, int8_t)
QUANT_ROWS(q_bf16_u8, uint16_t, bf16_to_f32, uint8_t)
DEQUANT_ROWS(d_s8_f32, int8_t, float, IDENT)
DEQUANT_ROWS(d_u8_f32, uint8_t, float, IDENT)
DEQUANT_ROWS(d_s8_bf16, int8_t, uint16_t, f32_to_bf16)
DEQUANT_ROWS(d_u8_bf16, uint8_t, uint16_t, f32_to_bf16)

/* rows[c][p] -> yb[p * G + c] for a compile-time channel count G (vectorized interleave) */
#define INTERLEAVE(G)                                                                                         \
    for (long p = 0; p < np; p++)                                                                             \
        for (long c = 0; c < (G); c++) yb[p * (G) + c] = rows[c][p];

/* The whole N x C x P pass over (image, block of PBLOCK pixels) tasks with the row kernels NAME##_1 / NAME##_n:
 * along the channels (per pixel) when the input's channel stride is 1, else along the pixels (per channel). */
#define PASS(NAME, TX, TY)                                                                                    \
    do {                                                                                                      \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)")        \
        for (long n = 0; n < N; n++)                                                                          \
            for (long b = 0; b < nb; b++) {                                                                   \
                TY buf[PBLOCK];                                                                               \
                const long p0 = b * PBLOCK, np = P - p0 < PBLOCK ? P - p0 : PBLOCK;                           \
                const TX *xb = (const TX *)x + n * sxn + p0 * sxp;                                            \
                TY *yb = (TY *)y + n * syn + p0 * syp;                                                        \
                if (!ps && sxc == 1 && syc == 1 && sxp == C && syp == C) {  /* dense channels-last: one run */ \
                    NAME##_1(xb, 1, yb, np * C, s, z, lo, hi, wb);                                            \
                } else if (sxc == 1 && C > 1) {                                                               \
                    for (long p = 0; p < np; p++)                                                             \
                        for (long c0 = 0; c0 < C; c0 += PBLOCK) {                                             \
                            const long nc = C - c0 < PBLOCK ? C - c0 : PBLOCK;                                \
                            TY *d = syc == 1 ? yb + p * syp + c0 : buf;                                       \
                            if (ps) NAME##_n(xb + p * sxp + c0, 1, d, nc, s + c0, z + c0, lo, hi, wb);        \
                            else NAME##_1(xb + p * sxp + c0, 1, d, nc, s, z, lo, hi, wb);                     \
                            if (syc != 1)                                                                     \
                                for (long c = 0; c < nc; c++) yb[p * syp + (c0 + c) * syc] = buf[c];          \
                        }                                                                                     \
                } else if (syc == 1 && syp == C && C <= 4) {  /* few channels, NHWC out: rows, interleaved */ \
                    TY rows[4][PBLOCK];                                                                       \
                    for (long c = 0; c < C; c++)                                                              \
                        NAME##_1(xb + c * sxc, sxp, rows[c], np, s + c * ps, z + c * ps, lo, hi, wb);         \
                    switch (C) {                                                                              \
                    case 2: INTERLEAVE(2) break;                                                              \
                    case 3: INTERLEAVE(3) break;                                                              \
                    case 4: INTERLEAVE(4) break;                                                              \
                    default: INTERLEAVE(1) break;                                                             \
                    }                                                                                         \
                } else {                                                                                      \
                    for (long c = 0; c < C; c++) {                                                            \
                        TY *d = syp == 1 ? yb + c * syc : buf;                                                \
                        NAME##_1(xb + c * sxc, sxp, d, np, s + c * ps, z + c * ps, lo, hi, wb);               \
                        if (syp != 1)                                                                         \
                            for (long p = 0; p < np; p++) yb[c * syc + p * syp] = buf[p];                     \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
    } while (0)

void kiln_quantize(const void *x, int x_bf16, long N, long C, long P, long sxn, long sxc, long sxp,
                   const float *s, const float *z, long ps, int wb, void *y, int y_signed,
                   long syn, long syc, long syp, int threads) {
    const float lo = y_signed ? -128.0f : 0.0f, hi = y_signed ? 127.0f : 255.0f;
    const long nb = (P + PBLOCK - 1) / PBLOCK;
    if (threads < 1) threads = 1;
    if (!x_bf16 && y_signed) PASS(q_f32_s8, float, int8_t);
    else if (!x_bf16) PASS(q_f32_u8, float, uint8_t);
    else if (y_signed) PASS(q_bf16_s8, uint16_t, int8_t);
    else PASS(q_bf16_u8, uint16_t, uint8_t);
}

void kiln_dequantize(const void *x, int x_signed, long N, long C, long P, long sxn, long sxc, long sxp,
                     const float *s, const float *z, long ps, void *y, int y_bf16, long syn, long syc, long syp,
                     int threads) {
    const float lo = 0.0f, hi = 0.0f;
    const int wb = 0;
    const long nb = (P + PBLOCK - 1) / PBLOCK;
    if (threads < 1) threads = 1;
    if (x_signed && !y_bf16) PASS(d_s8_f32, int8_t, float);
    else if (!y_bf16) PASS(d_u8_f32, uint8_t, float);
    else if (x_signed) PASS(d_s8_bf16, int8_t, uint16_t);
    else PASS(d_u8_bf16, uint8_t, uint16_t);
}
