/* One direction of an ONNX LSTM (default activations: Sigmoid, Tanh, Tanh; no clip, no peepholes) over a whole
 * sequence in one call, for the short sequences and small batches of streaming models (Silero VAD runs one step
 * per call), where torch's fused LSTM and the reference's per-step torch ops cost ~0.2-0.3 ms in dispatch alone.
 *
 * Gates per step and batch row, in ONNX's block order (i, o, f, c):
 *   g = bias + x_t W^T + h R^T     (W^T [I, 4H] and R^T [H, 4H] prepacked: the inner loop is an axpy over 4H
 *                                    contiguous floats, which the compiler vectorises without reassociation)
 *   c = sigmoid(f) * c + sigmoid(i) * tanh(c~);  h = sigmoid(o) * tanh(c)
 * y (if not NULL) gets h at each step t (forward) or T-1-t (reverse), rows `y_step` floats apart; hT and cT hold
 * the running state (initialised from h0 / c0, zeros where NULL) and end as the final state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

static float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }

int kiln_lstm(const float *x, long T, long B, long I, long H, const float *wt, const float *rt, const float *bias,
              const float *h0, const float *c0, float *y, long y_step, float *hT, float *cT, int reverse) {
    if (T < 0 || B < 0 || I <= 0 || H <= 0) return 1;
    const long G = 4 * H;
    float *g = (float *)malloc((size_t)(B * G > 0 ? B * G : 1) * sizeof(float));
    if (!g) return 2;
    if (h0) memcpy(hT, h0, (size_t)(B * H) * sizeof(float)); else memset(hT, 0, (size_t)(B * H) * sizeof(float));
    if (c0) memcpy(cT, c0, (size_t)(B * H) * sizeof(float)); else memset(cT, 0, (size_t)(B * H) * sizeof(float));
    for (long s = 0; s < T; s++) {
        const long t = reverse ? T - 1 - s : s;
        const float *xt = x + t * B * I;
        for (long b = 0; b < B; b++) {
            float *gb = g + b * G;
            const float *xb = xt + b * I, *hb = hT + b * H;
            if (bias) memcpy(gb, bias, (size_t)G * sizeof(float)); else memset(gb, 0, (size_t)G * sizeof(float));
            for (long k = 0; k < I; k++) {
                const float v = xb[k];
                const float *w = wt + k * G;
                for (long j = 0; j < G; j++) gb[j] += v * w[j];
            }
            for (long k = 0; k < H; k++) {
                const float v = hb[k];
                const float *r = rt + k * G;
                for (long j = 0; j < G; j++) gb[j] += v * r[j];
            }
        }
        for (long b = 0; b < B; b++) {
            const float *gb = g + b * G;
            float *hb = hT + b * H, *cb = cT + b * H;
            for (long k = 0; k < H; k++) {
                const float i = sigm(gb[k]), o = sigm(gb[H + k]), f = sigm(gb[2 * H + k]), cc = tanhf(gb[3 * H + k]);
                const float c = f * cb[k] + i * cc;
                cb[k] = c;
                hb[k] = o * tanhf(c);
            }
        }
        if (y) memcpy(y + t * y_step, hT, (size_t)(B * H) * sizeof(float));
    }
    free(g);
    return 0;
}
