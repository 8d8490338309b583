/* The vector vocabulary of the CPU backend's C kernels, included by them (native/__init__.py expands the
 * include before compiling, so a kernel's cache key covers this file too).
 *
 * V is one register of floats, VLEN wide, for AVX-512, for AVX2 + FMA or plain C (one float), chosen by what the
 * compiler targets (-march=native), or 256 bits on an AVX-512 CPU where the includer defines KILN_VEC_256; M is a lane mask for the first k lanes (vmask(k), 0 <= k <= VLEN), used by
 * masked loads and stores at a row's channel tail.
 *
 * exp(x): x clamped to [-87, 88], n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r by its degree-7
 * Taylor polynomial (|r| <= 0.35: truncation below 1e-8 relative), times 2^n built in the exponent bits.
 * erfc(z), z >= 0: t exp(-z^2 + P(t)), t = 1 / (1 + z/2), P the degree-9 polynomial of the classic Chebyshev
 * fit (fractional error below 1.2e-7 everywhere); erfc(-z) = 2 - erfc(z). GELU(x) = x/2 erfc(-x / sqrt 2),
 * which keeps its relative accuracy for negative x, where 1 + erf(x / sqrt 2) would cancel.
 */
#ifndef KILN_VEC_H
#define KILN_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && !defined(KILN_VEC_256)  /* a kernel may ask for 8-float vectors */
#include <immintrin.h>
typedef __m512 V;
#define VLEN 16
#define vset(c) _mm512_set1_ps(c)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmin _mm512_min_ps
#define vmax _mm512_max_ps
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vabs(a) _mm512_abs_ps(a)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vpow2i(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), \
                                                                          _mm512_set1_epi32(127)), 23))
#define vselect_gt(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x)
#define vselect_lt(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x)
typedef __mmask16 M;
#define vmask(k) ((__mmask16)((1u << (k)) - 1u))
#define vloadm(p, m) _mm512_maskz_loadu_ps(m, p)
#define vstorem(p, v, m) _mm512_mask_storeu_ps(p, m, v)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 V;
#define VLEN 8
#define vset(c) _mm256_set1_ps(c)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmin _mm256_min_ps
#define vmax _mm256_max_ps
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vabs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vpow2i(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), \
                                                                          _mm256_set1_epi32(127)), 23))
#define vselect_gt(a, b, x, y) _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ))
#define vselect_lt(a, b, x, y) _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ))
typedef __m256i M;
#define vmask(k) _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#define vloadm(p, m) _mm256_maskload_ps(p, m)
#define vstorem(p, v, m) _mm256_maskstore_ps(p, m, v)
#else
#include <math.h>
typedef float V;
#define VLEN 1
#define vset(c) ((float)(c))
#define vload(p) (*(p))
#define vstore(p, v) (*(p) = (v))
#define vadd(a, b) ((a) + (b))
#define vsub(a, b) ((a) - (b))
#define vmul(a, b) ((a) * (b))
#define vdiv(a, b) ((a) / (b))
#define vmin(a, b) ((a) < (b) ? (a) : (b))
#define vmax(a, b) ((a) > (b) ? (a) : (b))
#define vfma(a, b, c) fmaf(a, b, c)
#define vabs(a) fabsf(a)
#define vround(a) nearbyintf(a)
static inline float vpow2i(float n) { int32_t b = ((int32_t)n + 127) << 23; float s; memcpy(&s, &b, 4); return s; }
#define vselect_gt(a, b, x, y) ((a) > (b) ? (x) : (y))
#define vselect_lt(a, b, x, y) ((a) < (b) ? (x) : (y))
typedef int M;
#define vmask(k) ((k) > 0)
#define vloadm(p, m) ((m) ? *(p) : 0.0f)
#define vstorem(p, v, m) do { if (m) *(p) = (v); } while (0)
#endif

static inline V vexp(V x) {
    x = vmin(vmax(x, vset(-87.0f)), vset(88.0f));
    V n = vround(vmul(x, vset(1.44269504088896341f)));
    V r = vfma(n, vset(-0.693145751953125f), x);
    r = vfma(n, vset(-1.428606765330187045e-06f), r);
    V p = vset(1.0f / 5040.0f);
    p = vfma(p, r, vset(1.0f / 720.0f));
    p = vfma(p, r, vset(1.0f / 120.0f));
    p = vfma(p, r, vset(1.0f / 24.0f));
    p = vfma(p, r, vset(1.0f / 6.0f));
    p = vfma(p, r, vset(0.5f));
    p = vfma(p, r, vset(1.0f));
    p = vfma(p, r, vset(1.0f));
    return vmul(p, vpow2i(n));
}

/* x / (1 + e^(-k x)): sigmoid(k x) times x, or sigmoid itself with x = 1 */
static inline V vsig_times(V num, V x, float k) {
    return vdiv(num, vadd(vset(1.0f), vexp(vmul(x, vset(-k)))));
}

static inline V vmish(V x) {
    V e = vexp(vmin(x, vset(20.0f)));
    V m = vmul(e, vadd(e, vset(2.0f)));  /* tanh(softplus x) = m / (m + 2) */
    return vselect_gt(x, vset(20.0f), x, vdiv(vmul(x, m), vadd(m, vset(2.0f))));
}

static inline V vgelu(V x) {
    V z = vmul(x, vset(-0.70710678118654752f));   /* GELU = x/2 erfc(z), z = -x / sqrt 2 */
    V a = vabs(z);
    V t = vdiv(vset(1.0f), vfma(a, vset(0.5f), vset(1.0f)));
    V p = vset(0.17087277f);
    p = vfma(p, t, vset(-0.82215223f));
    p = vfma(p, t, vset(1.48851587f));
    p = vfma(p, t, vset(-1.13520398f));
    p = vfma(p, t, vset(0.27886807f));
    p = vfma(p, t, vset(-0.18628806f));
    p = vfma(p, t, vset(0.09678418f));
    p = vfma(p, t, vset(0.37409196f));
    p = vfma(p, t, vset(1.00002368f));
    p = vfma(p, t, vset(-1.26551223f));
    /* erfc(|z|); the exponent held above -80 keeps every intermediate a normal float (erfc(|z|) < 1e-35 there,
     * far below what x/2 erfc(z) can show), where a denormal costs a microcode assist per element */
    V c = vmul(t, vexp(vmax(vsub(p, vmul(a, a)), vset(-80.0f))));
    c = vselect_lt(z, vset(0.0f), vsub(vset(2.0f), c), c);    /* erfc(z) */
    return vmul(vmul(x, vset(0.5f)), c);
}

#endif
