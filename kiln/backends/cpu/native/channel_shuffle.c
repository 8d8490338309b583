/* ChannelShuffle of 4-byte elements (kiln.backends.cpu.shuffle, kiln.ops.shuffle): y[:, i*g + j] = x[:, j*(C/g) + i]
 * for i < C/g, j < g, at every pixel.
 *
 * x and y are addressed through their four strides (in elements). With a channel stride of 1 on both sides
 * (channels-last) each pixel's channel vector is gathered from g contiguous runs into one contiguous run
 * (g = 2, 3, 4, 8 as compile-time constants, so the compiler vectorizes the interleave); any other channel
 * strides take the same gather through the strides (correct, slower, one thread). Rows of pixels (n, h) of
 * the dense case are shared among the caller's `threads` OpenMP threads.
 */
#include <stdint.h>

#define INTERLEAVE(G)                                                   \
    for (long i = 0; i < cg; i++)                                       \
        for (long j = 0; j < (G); j++) d[i * (G) + j] = s[j * cg + i];

static inline void pixel(const uint32_t *restrict s, uint32_t *restrict d, long cg, long g) {
    switch (g) {
    case 2: INTERLEAVE(2) return;
    case 3: INTERLEAVE(3) return;
    case 4: INTERLEAVE(4) return;
    case 8: INTERLEAVE(8) return;
    default: INTERLEAVE(g) return;
    }
}

void kiln_channel_shuffle_32(const uint32_t *x, long N, long C, long H, long W, long sn, long sc, long sh, long sw,
                             long g, uint32_t *y, long dn, long dc, long dh, long dw, int threads) {
    const long cg = C / g;
    const int dense = sc == 1 && dc == 1;
    if (threads < 1 || !dense) threads = 1;  /* the strided gather ran 2x slower on two threads than on one */
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
    for (long n = 0; n < N; n++)
        for (long h = 0; h < H; h++)
            for (long w = 0; w < W; w++) {
                const uint32_t *s = x + n * sn + h * sh + w * sw;
                uint32_t *d = y + n * dn + h * dh + w * dw;
                if (dense) {
                    pixel(s, d, cg, g);
                    continue;
                }
                for (long j = 0; j < g; j++)
                    for (long i = 0; i < cg; i++) d[(i * g + j) * dc] = s[(j * cg + i) * sc];
            }
}

/* The shuffle of two separate halves (ChannelShuffle(a, b), groups 2: their Concat never made): y[:, 2i] = a[:, i],
 * y[:, 2i + 1] = b[:, i] for i < cg, each side addressed through its own strides. Channels-last on all three
 * (channel stride 1) interleaves each pixel's two runs vectorized; other strides gather one element at a time. */
void kiln_channel_interleave2_32(const uint32_t *a, long sn, long sc, long sh, long sw, const uint32_t *b, long tn,
                                 long tc, long th, long tw, long N, long cg, long H, long W, uint32_t *y, long dn,
                                 long dc, long dh, long dw, int threads) {
    const int dense = sc == 1 && tc == 1 && dc == 1;
    if (threads < 1 || !dense) threads = 1;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
    for (long n = 0; n < N; n++)
        for (long h = 0; h < H; h++)
            for (long w = 0; w < W; w++) {
                const uint32_t *restrict p = a + n * sn + h * sh + w * sw;
                const uint32_t *restrict q = b + n * tn + h * th + w * tw;
                uint32_t *restrict d = y + n * dn + h * dh + w * dw;
                if (dense) {
                    for (long i = 0; i < cg; i++) {
                        d[2 * i] = p[i];
                        d[2 * i + 1] = q[i];
                    }
                    continue;
                }
                for (long i = 0; i < cg; i++) {
                    d[2 * i * dc] = p[i * sc];
                    d[(2 * i + 1) * dc] = q[i * tc];
                }
            }
}
