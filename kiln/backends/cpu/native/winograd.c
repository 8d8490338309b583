/* Winograd F(4x4, 3x3) transforms for channels-last float32 tensors (Kiln CPU tactic cpu.conv_winograd).
 *
 * A stride-1 3x3 convolution becomes, per 4x4 output tile, 36 independent products: the input
 * transform V = B^T d B of each 6x6 input tile (per channel), a batched GEMM M[p] = V[p] U[p] over the
 * 36 positions p (done by oneDNN), and the output transform Y = A^T M A (per output channel) with
 * bias, residual add and activation applied on the way out. The interpolation points are 0, 1, -1, 1/2,
 * -2 and infinity rather than the usual 0, +-1, +-2: every transform entry stays exact in binary and the
 * float32 error is about 2.5x lower (measured on random 64-channel layers). Tensors are addressed by element strides
 * (batch, row, pixel) with channels contiguous, so inputs may be channel slices of a larger tensor and
 * outputs may be channel slices of a Concat's buffer.
 */
#include <string.h>
#include <math.h>

#define CB 64

enum { ACT_NONE = 0, ACT_RELU, ACT_LEAKY, ACT_CLIP, ACT_SIGMOID, ACT_SILU, ACT_HARDSWISH };

static inline int imin(int a, int b) { return a < b ? a : b; }

/* d[i][j][0:cb] = x at input pixel (r0 + i, c0 + j), channels ch0.., or zeros outside the image; p x p tile */
static void load_tile(float *d, int p, const float *x, int n, int H, int W, long sn, long sh, long sw,
                      int r0, int q0, int ch0, int cb) {
    for (int i = 0; i < p; i++) {
        const int ih = r0 + i;
        for (int j = 0; j < p; j++) {
            const int iw = q0 + j;
            float *dst = d + (i * p + j) * CB;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                memcpy(dst, x + n * sn + ih * sh + iw * sw + ch0, sizeof(float) * cb);
            else
                memset(dst, 0, sizeof(float) * cb);
        }
    }
}

/* x: element (n, h, w, c) at n*sn + h*sh + w*sw + c. V: [36][T][C], T = N*TH*TW tiles in (n, th, tw) order. */
void wino_input(const float *x, float *V, int N, int H, int W, int C, long sn, long sh, long sw,
                int pt, int pl, int TH, int TW) {
    const long T = (long)N * TH * TW;
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const int n = (int)(t / ((long)TH * TW)), th = (int)(t / TW % TH), tw = (int)(t % TW);
        float d[6][6][CB], u[6][6][CB];
        for (int c0 = 0; c0 < C; c0 += CB) {
            const int cb = imin(CB, C - c0);
            load_tile(&d[0][0][0], 6, x, n, H, W, sn, sh, sw, th * 4 - pt, tw * 4 - pl, c0, cb);
            for (int j = 0; j < 6; j++) {
                for (int c = 0; c < cb; c++) {
                    const float d0 = d[0][j][c], d1 = d[1][j][c], d2 = d[2][j][c], d3 = d[3][j][c],
                                d4 = d[4][j][c], d5 = d[5][j][c];
                    u[0][j][c] = d0 - 1.5f * d1 - 2.f * d2 + 1.5f * d3 + d4;
                    u[1][j][c] = -d1 + 0.5f * d2 + 2.5f * d3 + d4;
                    u[2][j][c] = d1 - 2.5f * d2 + 0.5f * d3 + d4;
                    u[3][j][c] = -2.f * d1 - d2 + 2.f * d3 + d4;
                    u[4][j][c] = 0.5f * d1 - d2 - 0.5f * d3 + d4;
                    u[5][j][c] = d1 - 1.5f * d2 - 2.f * d3 + 1.5f * d4 + d5;
                }
            }
            for (int i = 0; i < 6; i++) {
                float r[6][CB];
                for (int c = 0; c < cb; c++) {
                    const float t0 = u[i][0][c], t1 = u[i][1][c], t2 = u[i][2][c], t3 = u[i][3][c],
                                t4 = u[i][4][c], t5 = u[i][5][c];
                    r[0][c] = t0 - 1.5f * t1 - 2.f * t2 + 1.5f * t3 + t4;
                    r[1][c] = -t1 + 0.5f * t2 + 2.5f * t3 + t4;
                    r[2][c] = t1 - 2.5f * t2 + 0.5f * t3 + t4;
                    r[3][c] = -2.f * t1 - t2 + 2.f * t3 + t4;
                    r[4][c] = 0.5f * t1 - t2 - 0.5f * t3 + t4;
                    r[5][c] = t1 - 1.5f * t2 - 2.f * t3 + 1.5f * t4 + t5;
                }
                for (int j = 0; j < 6; j++)
                    memcpy(V + ((long)(i * 6 + j) * T + t) * C + c0, r[j], sizeof(float) * cb);
            }
        }
    }
}

/* v[0:n] = act(v[0:n]), one branch-free loop per activation (vectorized; SiLU/Sigmoid through expf) */
static void activate(float *restrict v, int n, int act, float alpha, float beta) {
    switch (act) {
    case ACT_RELU: for (int c = 0; c < n; c++) v[c] = v[c] > 0.f ? v[c] : 0.f; break;
    case ACT_LEAKY: for (int c = 0; c < n; c++) v[c] = v[c] >= 0.f ? v[c] : alpha * v[c]; break;
    case ACT_CLIP: for (int c = 0; c < n; c++) v[c] = fminf(fmaxf(v[c], alpha), beta); break;
    case ACT_SIGMOID: for (int c = 0; c < n; c++) v[c] = 1.f / (1.f + expf(-v[c])); break;
    case ACT_SILU: for (int c = 0; c < n; c++) v[c] = v[c] / (1.f + expf(-v[c])); break;
    case ACT_HARDSWISH:
        for (int c = 0; c < n; c++) v[c] = v[c] * fminf(fmaxf(v[c] / 6.f + 0.5f, 0.f), 1.f);
        break;
    default: break;
    }
}

/* dst[0:kb] = the output pixel o with bias, residual and activation in the node's order */
static void store_pixel(float *dst, const float *o, const float *bias, const float *res, int kb,
                        int act, float alpha, float beta, int act_first) {
    float v[CB];
    if (bias) for (int c = 0; c < kb; c++) v[c] = o[c] + bias[c];
    else memcpy(v, o, sizeof(float) * kb);
    if (res && !act_first) for (int c = 0; c < kb; c++) v[c] += res[c];
    activate(v, kb, act, alpha, beta);
    if (res && act_first) for (int c = 0; c < kb; c++) v[c] += res[c];
    memcpy(dst, v, sizeof(float) * kb);
}

/* the m x m output tile o[r][q][0:kb] of tile (n, th, tw) into y (and z's pixels), cropped at OH x OW */
static void store_tile(const float *o, int m, float *y, const float *bias, const float *z, int n, int th, int tw,
                       int OH, int OW, long yn, long yh, long yw, long zn, long zh, long zw, int k0, int kb,
                       int act, float alpha, float beta, int act_first) {
    for (int r = 0; r < m; r++) {
        const int oh = th * m + r;
        if (oh >= OH) break;
        for (int q = 0; q < m; q++) {
            const int ow = tw * m + q;
            if (ow >= OW) break;
            store_pixel(y + n * yn + oh * yh + ow * yw + k0, o + (r * m + q) * CB, bias ? bias + k0 : NULL,
                        z ? z + n * zn + oh * zh + ow * zw + k0 : NULL, kb, act, alpha, beta, act_first);
        }
    }
}

/* M: [36][T][K]. y / z: element (n, h, w, k) at n*yn + h*yh + w*yw + k (z may be NULL). */
void wino_output(const float *M, float *y, const float *bias, const float *z, int N, int OH, int OW, int K,
                 long yn, long yh, long yw, long zn, long zh, long zw, int TH, int TW,
                 int act, float alpha, float beta, int act_first) {
    const long T = (long)N * TH * TW;
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const int n = (int)(t / ((long)TH * TW)), th = (int)(t / TW % TH), tw = (int)(t % TW);
        float s[4][6][CB], o[4][4][CB];
        for (int k0 = 0; k0 < K; k0 += CB) {
            const int kb = imin(CB, K - k0);
            const long ps = T * K;
            for (int j = 0; j < 6; j++) {
                const float *m = M + ((long)j * T + t) * K + k0;  /* position (i, j) at m + i * 6 * ps */
                for (int c = 0; c < kb; c++) {
                    const float m0 = m[c], m1 = m[6 * ps + c], m2 = m[12 * ps + c], m3 = m[18 * ps + c],
                                m4 = m[24 * ps + c], m5 = m[30 * ps + c];
                    s[0][j][c] = m0 + m1 + m2 + m3 + m4;
                    s[1][j][c] = m1 - m2 + 0.5f * m3 - 2.f * m4;
                    s[2][j][c] = m1 + m2 + 0.25f * m3 + 4.f * m4;
                    s[3][j][c] = m1 - m2 + 0.125f * m3 - 8.f * m4 + m5;
                }
            }
            for (int r = 0; r < 4; r++) {
                for (int c = 0; c < kb; c++) {
                    const float a0 = s[r][0][c], a1 = s[r][1][c], a2 = s[r][2][c], a3 = s[r][3][c],
                                a4 = s[r][4][c], a5 = s[r][5][c];
                    o[r][0][c] = a0 + a1 + a2 + a3 + a4;
                    o[r][1][c] = a1 - a2 + 0.5f * a3 - 2.f * a4;
                    o[r][2][c] = a1 + a2 + 0.25f * a3 + 4.f * a4;
                    o[r][3][c] = a1 - a2 + 0.125f * a3 - 8.f * a4 + a5;
                }
            }
            store_tile(&o[0][0][0], 4, y, bias, z, n, th, tw, OH, OW, yn, yh, yw, zn, zh, zw, k0, kb,
                       act, alpha, beta, act_first);
        }
    }
}

/* F(2x2, 3x3): 4x4 input tiles, 16 positions, exact-in-float transforms (+-1 only). Same layouts as above
 * with 16 in place of 36: V [16][T][C], M [16][T][K], tiles of 2x2 outputs. */
void wino2_input(const float *x, float *V, int N, int H, int W, int C, long sn, long sh, long sw,
                 int pt, int pl, int TH, int TW) {
    const long T = (long)N * TH * TW;
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const int n = (int)(t / ((long)TH * TW)), th = (int)(t / TW % TH), tw = (int)(t % TW);
        float d[4][4][CB], u[4][4][CB];
        for (int c0 = 0; c0 < C; c0 += CB) {
            const int cb = imin(CB, C - c0);
            load_tile(&d[0][0][0], 4, x, n, H, W, sn, sh, sw, th * 2 - pt, tw * 2 - pl, c0, cb);
            for (int j = 0; j < 4; j++) {
                for (int c = 0; c < cb; c++) {
                    const float d0 = d[0][j][c], d1 = d[1][j][c], d2 = d[2][j][c], d3 = d[3][j][c];
                    u[0][j][c] = d0 - d2;
                    u[1][j][c] = d1 + d2;
                    u[2][j][c] = d2 - d1;
                    u[3][j][c] = d1 - d3;
                }
            }
            for (int i = 0; i < 4; i++) {
                float r[4][CB];
                for (int c = 0; c < cb; c++) {
                    const float t0 = u[i][0][c], t1 = u[i][1][c], t2 = u[i][2][c], t3 = u[i][3][c];
                    r[0][c] = t0 - t2;
                    r[1][c] = t1 + t2;
                    r[2][c] = t2 - t1;
                    r[3][c] = t1 - t3;
                }
                for (int j = 0; j < 4; j++)
                    memcpy(V + ((long)(i * 4 + j) * T + t) * C + c0, r[j], sizeof(float) * cb);
            }
        }
    }
}

void wino2_output(const float *M, float *y, const float *bias, const float *z, int N, int OH, int OW, int K,
                  long yn, long yh, long yw, long zn, long zh, long zw, int TH, int TW,
                  int act, float alpha, float beta, int act_first) {
    const long T = (long)N * TH * TW;
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const int n = (int)(t / ((long)TH * TW)), th = (int)(t / TW % TH), tw = (int)(t % TW);
        float s[2][4][CB], o[2][2][CB];
        for (int k0 = 0; k0 < K; k0 += CB) {
            const int kb = imin(CB, K - k0);
            const long ps = T * K;
            for (int j = 0; j < 4; j++) {
                const float *m = M + ((long)j * T + t) * K + k0;  /* position (i, j) at m + i * 4 * ps */
                for (int c = 0; c < kb; c++) {
                    const float m0 = m[c], m1 = m[4 * ps + c], m2 = m[8 * ps + c], m3 = m[12 * ps + c];
                    s[0][j][c] = m0 + m1 + m2;
                    s[1][j][c] = m1 - m2 - m3;
                }
            }
            for (int r = 0; r < 2; r++) {
                for (int c = 0; c < kb; c++) {
                    const float a0 = s[r][0][c], a1 = s[r][1][c], a2 = s[r][2][c], a3 = s[r][3][c];
                    o[r][0][c] = a0 + a1 + a2;
                    o[r][1][c] = a1 - a2 - a3;
                }
            }
            store_tile(&o[0][0][0], 2, y, bias, z, n, th, tw, OH, OW, yn, yh, yw, zn, zh, zw, k0, kb,
                       act, alpha, beta, act_first);
        }
    }
}
