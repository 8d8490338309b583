"""The Triton INT8 kernels of the QConv / QGemm layers (kiln.ops.qlayers): implicit-GEMM 2-D convolution over
NHWC int8/uint8 activations (the general kernel; LINEAR for 1x1 layers as GEMMs over pixel rows; TAPS for KxK
layers with their geometry compiled in) and a GEMM, with the fused float32 epilogue and a requantizing store.
Their launches, configs and the prepared epilogue are kiln.backends.cuda.triton_qconv's.

Integer core: int8 x int8 products accumulate exactly in int32 through ``tl.dot(out_dtype=tl.int32)``
(tensor cores; BLOCK_K is always a multiple of 32). The weight is prepacked K-major: a conv's as
[K_out, KH*KW*C] (tap-major, then input channel), a GEMM's [N, K] as given; Hopper's 8-bit wgmma reads
both operands K-major from shared memory (it cannot transpose 8-bit operands), and NHWC activations
already are. The conv's reduction walks (tap, channel block) pairs; the pointer blocks of tap (0, 0) are
built once and each step adds one scalar offset; EVEN_K (C % BLOCK_K == 0, every ResNet-style layer)
drops the channel-tail masks. Config FLAT walks the flattened (tap, channel) index (few channels); config
ROWS (few channels, undilated kernel rows of KW*C <= BLOCK_K values) reads one window row per step as
contiguous bytes of the NHWC input, against a weight packed [K_out, KH, BLOCK_K] with zero tails.

Zero points without leaving int8: a uint8 activation is shifted to int8 on load (x - 128) and its zero
point with it (zp_s8 = x_zero_point - 128; int8 input: zp_s8 = x_zero_point). Padded positions load the
zero point itself, so every tap contributes x_s8 * w with x_s8 = zp_s8 outside the image, and the
epilogue subtracts ``corr[k] = zp_s8 * colsum(W)[k]`` (int32, computed once at build): acc = sum over
the valid taps of (X - x_zero_point) * W, exactly. Other masked lanes (a channel or K tail, a row past M)
meet a zero weight or are never stored, so they load 0. PAD_ZERO (the raw zero point is 0, or the conv
has no padding) makes every masked load a zero fill: Triton's async copies then land in shared memory
and feed wgmma directly, where a non-zero fill value needs a pass through registers (a select) and a
second shared-memory store on every step.

Epilogue (float32, in the order of the spec): v = float32(acc) * m[k] + B[k] with m[k] = x_scale *
w_scales[k] rounded once to float32; the residual r = (float32(Z) - z_zero_point) * z_scale (a float Z:
zero point 0, scale 1); act(v + r) or act(v) + r with the activation codes of triton_act; with a_scale > 0
(has_a) the layer's own result (after act when act_before_add) is first requantized to (a_scale,
a_zero_point, a_dtype) and dequantized, by the output's rounding, before r is added. An integer
output is rounded half to even by adding and subtracting 1.5 * 2**23 to v * (1 / y_scale) clamped to
+-2**22 (exact in float32 arithmetic), offset by y_zero_point and saturated; a float output is cast.
Split-K adds int32 partial sums (exact: the result does not depend on the split). The GPU compiler may
contract a multiply and the add after it into one FMA (one rounding instead of two): the results are
bit-exact when the scales are powers of two, and within one quantization step otherwise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kiln.backends.cuda.triton_act import apply_act, conv_pixels, split_k_gather, tile_offsets, tile_schedule

ROUND_LIMIT = 4194304.0
"""2**22: |v| below it rounds exactly by adding and subtracting 1.5 * 2**23 (the kernels' _round_sat)."""

_RUNTIME = ["x_pad", "z_zp", "z_scale", "y_inv_scale", "y_zp", "q_lo", "q_hi", "alpha", "beta",
            "has_bias", "has_z", "act", "act_before_add", "a_inv_scale", "a_scale", "a_zp", "a_lo", "a_hi", "has_a",
            "has_y2"]


@triton.jit
def _to_s8(a, X_U8: tl.constexpr):
    """An activation block as int8: uint8 shifted by -128 (its zero point shifted likewise on the host)."""
    if X_U8:
        a = (a.to(tl.int16) - 128).to(tl.int8)
    return a


@triton.jit
def _round_sat(v, inv_scale, zp, lo, hi):
    """round_half_even(v * inv_scale) + zp saturated to [lo, hi], in float32."""
    q = tl.minimum(tl.maximum(v * inv_scale, -4194304.0), 4194304.0)  # +-2**22
    q = (q + 12582912.0) - 12582912.0  # + 1.5 * 2**23 rounds to an integer, half to even
    return tl.minimum(tl.maximum(q + zp, lo), hi)


@triton.jit
def _q_epilogue(acc, z, corr_ptr, m_ptr, b_ptr, offs_n, n_mask, y_inv_scale, y_zp, q_lo, q_hi,
                has_bias, act, act_before_add, alpha, beta, a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a,
                QUANT: tl.constexpr):
    """int32 accumulator -> the stored value in float32: zero-point correction, per-channel multiplier,
    bias, (has_a) the requantize/dequantize of the layer's own result, residual z (already dequantized)
    and activation in the fused order, then (QUANT) the requantization to integral values within
    [q_lo, q_hi]."""
    acc = acc - tl.load(corr_ptr + offs_n, mask=n_mask, other=0)[None, :]
    v = acc.to(tl.float32) * tl.load(m_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if has_bias != 0:
        v = v + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if act_before_add != 0:
        v = apply_act(v, act, alpha, beta)
    if has_a != 0:
        v = (_round_sat(v, a_inv_scale, a_zp, a_lo, a_hi) - a_zp) * a_scale
    v = v + z
    if act_before_add == 0:
        v = apply_act(v, act, alpha, beta)
    if QUANT:
        v = _round_sat(v, y_inv_scale, y_zp, q_lo, q_hi)
    return v


@triton.jit
def _finish(acc, y_mask, z_off, y_off, y2_off, offs_n, n_mask, z_ptr, y_ptr, y2_ptr, corr_ptr, m_ptr, b_ptr,
            z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, has_bias, act, act_before_add, alpha, beta,
            a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a, has_z, has_y2, QUANT: tl.constexpr):
    """Every int8 kernel's end: the residual (dequantized) read at its rows' offsets z_off, _q_epilogue, and the
    store at y_off (and at y2_off into a second destination: a value written into two elided Concats). The
    switches are run-time values in the general kernels and constants in the specialized ones."""
    z = tl.zeros(acc.shape, dtype=tl.float32)
    if has_z != 0:
        z = tl.load(z_ptr + z_off[:, None] + offs_n[None, :], mask=y_mask, other=0)
        z = (z.to(tl.float32) - z_zp) * z_scale
    v = _q_epilogue(acc, z, corr_ptr, m_ptr, b_ptr, offs_n, n_mask, y_inv_scale, y_zp, q_lo, q_hi,
                    has_bias, act, act_before_add, alpha, beta, a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a,
                    QUANT)
    tl.store(y_ptr + y_off[:, None] + offs_n[None, :], v.to(y_ptr.dtype.element_ty), mask=y_mask)
    if has_y2 != 0:
        tl.store(y2_ptr + y2_off[:, None] + offs_n[None, :], v.to(y2_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _tap_operands(it, a_rows, w_cols, ih0, iw0, m_mask, n_mask, offs_k, pad, H, W, sxh, sxw, C, KW, DH, DW, CB,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Reduction step `it` of the per-tap walk, (tap, channel block) = divmod(it, CB): the activation block (`pad`
    where the tap falls outside the image) and the weight block. Shared by the general kernel (geometry at run
    time) and config TAPS (the geometry's constants specialize this body, as they do the caller's).
    EVEN_K: C % BLOCK_K == 0, no channel tail to mask."""
    tap = it // CB
    c0 = (it - tap * CB) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    ih = ih0 + kh * DH
    iw = iw0 + kw * DW
    inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    a_ptrs = a_rows + (kh * DH * sxh + kw * DW * sxw + c0)
    b_ptrs = w_cols + (tap * C + c0)
    if EVEN_K:
        a = tl.load(a_ptrs, mask=inside[:, None], other=pad)
        b = tl.load(b_ptrs, mask=n_mask[None, :], other=0)
    else:
        c_ok = (c0 + offs_k) < C
        a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=pad)
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_mask[None, :], other=0)
    return a, b


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "CB", "ITS",
                               *_RUNTIME])
def qconv2d_nhwc_kernel(
    x_ptr, w_ptr, corr_ptr, m_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, ws_ptr, cnt_ptr,
    M, C, H, W, K, OH, OW, KRED,
    sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    KH, KW, SH, SW, PH, PW, DH, DW, CB, ITS,
    x_pad, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, alpha, beta,
    has_bias, has_z, act, act_before_add, a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a, has_y2,
    X_U8: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, FLAT: tl.constexpr, ROWS: tl.constexpr, EVEN_K: tl.constexpr,
    PAD_ZERO: tl.constexpr,
):
    tile, pid_m, pid_n, it_lo, it_hi = tile_schedule(M, K, ITS, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)

    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, K, BLOCK_M, BLOCK_N, BLOCK_K)
    nb, oh, ow, ih0, iw0 = conv_pixels(offs_m, OH, OW, SH, SW, PH, PW)
    x_row = nb * sxn
    a_rows = x_ptr + (x_row + ih0 * sxh + iw0 * sxw)[:, None] + offs_k[None, :]  # tap (0, 0), channels 0..BLOCK_K
    w_cols = w_ptr + (offs_n * KRED)[None, :] + offs_k[:, None]  # reduction index 0..BLOCK_K of each out channel
    if PAD_ZERO:  # a zero fill: the async copy feeds the tensor cores from shared memory directly
        pad = 0
    else:
        pad = x_pad
    if ROWS:  # a window row of KW*C <= BLOCK_K contiguous bytes per step; which lanes fall inside the image
        tap_j = offs_k // C
        iw_j = iw0[:, None] + tap_j[None, :]
        col_ok = (offs_k < KW * C)[None, :] & (iw_j >= 0) & (iw_j < W)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for it in range(it_lo, it_hi):
        if FLAT:  # few input channels: one reduction step spans several taps (k = tap * C + c)
            ks = it * BLOCK_K + offs_k
            k_ok = ks < KRED
            tap_k = ks // C
            c_k = ks - tap_k * C
            kh_k = tap_k // KW
            ih2 = ih0[:, None] + (kh_k * DH)[None, :]
            iw2 = iw0[:, None] + ((tap_k - kh_k * KW) * DW)[None, :]
            a = tl.load(x_ptr + x_row[:, None] + ih2 * sxh + iw2 * sxw + c_k[None, :],
                        mask=m_mask[:, None] & (ih2 >= 0) & (ih2 < H) & (iw2 >= 0) & (iw2 < W), other=pad)
            b = tl.load(w_cols + it * BLOCK_K, mask=k_ok[:, None] & n_mask[None, :], other=0)
        elif ROWS:  # reduction step `it` = kernel row kh; the packed weight row is zero past KW*C
            ih = ih0 + it * DH
            row_ok = m_mask & (ih >= 0) & (ih < H)
            a = tl.load(a_rows + it * DH * sxh, mask=row_ok[:, None] & col_ok, other=pad)
            b = tl.load(w_cols + it * BLOCK_K, mask=n_mask[None, :], other=0)
        else:
            a, b = _tap_operands(it, a_rows, w_cols, ih0, iw0, m_mask, n_mask, offs_k, pad, H, W, sxh, sxw, C, KW, DH,
                                 DW, CB, BLOCK_K, EVEN_K)
        acc = tl.dot(_to_s8(a, X_U8), b, acc, out_dtype=tl.int32)

    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, y_mask = split_k_gather(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, y_mask, K, SPLIT_K)
    _finish(acc, y_mask, nb * szn + oh * szh + ow * szw, nb * syn + oh * syh + ow * syw,
            nb * s2n + oh * s2h + ow * s2w, offs_n, n_mask, z_ptr, y_ptr, y2_ptr, corr_ptr, m_ptr, b_ptr, z_zp,
            z_scale, y_inv_scale, y_zp, q_lo, q_hi, has_bias, act, act_before_add, alpha, beta, a_inv_scale, a_scale,
            a_zp, a_lo, a_hi, has_a, has_z, has_y2, QUANT)


@triton.jit(do_not_specialize=["M", "OH", "OW"])
def qconv_rows_kernel(
    x_ptr, w_ptr, corr_ptr, m_ptr, b_ptr, z_ptr, y_ptr, y2_ptr,
    M, OH, OW, sxn, sxh, sxw, sz, sy, sy2,
    x_pad, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, alpha, beta,
    has_bias: tl.constexpr, has_z: tl.constexpr, act: tl.constexpr, act_before_add: tl.constexpr,
    a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a: tl.constexpr, has_y2: tl.constexpr,
    C: tl.constexpr, K: tl.constexpr, X_PIXELS: tl.constexpr,
    X_U8: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """An unpadded 1x1 QConv (config LINEAR) as a GEMM over M = N*OH*OW output pixels of C channels, the output
    and residual pixels evenly spaced rows (row strides sy, sy2, sz), the reduction unrolled at compile time (C
    constexpr) and every epilogue switch constexpr (one compiled variant per layer). The input pixel of output
    row p: at p * sxw when its pixels are evenly spaced rows too, else (X_PIXELS: a strided conv, or an input
    whose rows jump between images) at n * sxn + oh * sxh + ow * sxw with the conv's strides folded into those.
    Same arithmetic as qconv2d_nhwc_kernel, bit for bit."""
    tile, pid_m, pid_n, it_lo, it_hi = tile_schedule(M, K, 1, BLOCK_M, BLOCK_N, GROUP_M, 1)
    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, K, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = offs_m  # the wrapper keeps every tensor under 2**31 elements
    if X_PIXELS:
        nb, oh, ow, _, _ = conv_pixels(offs_m, OH, OW, 1, 1, 0, 0)
        x_rows = nb * sxn + oh * sxh + ow * sxw
    else:
        x_rows = rows * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in tl.static_range(0, C, BLOCK_K):
        if C % BLOCK_K == 0:
            a = tl.load(x_ptr + x_rows[:, None] + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0)
            b = tl.load(w_ptr + (offs_n * C)[None, :] + (k0 + offs_k)[:, None], mask=n_mask[None, :], other=0)
        else:
            k_ok = (k0 + offs_k) < C
            a = tl.load(x_ptr + x_rows[:, None] + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_ok[None, :],
                        other=0)
            b = tl.load(w_ptr + (offs_n * C)[None, :] + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_mask[None, :],
                        other=0)
        acc = tl.dot(_to_s8(a, X_U8), b, acc, out_dtype=tl.int32)
    y_mask = m_mask[:, None] & n_mask[None, :]
    _finish(acc, y_mask, rows * sz, rows * sy, rows * sy2, offs_n, n_mask, z_ptr, y_ptr, y2_ptr, corr_ptr, m_ptr,
            b_ptr, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, has_bias, act, act_before_add, alpha, beta,
            a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a, has_z, has_y2, QUANT)


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def qconv_taps_kernel(
    x_ptr, w_ptr, corr_ptr, m_ptr, b_ptr, z_ptr, y_ptr, y2_ptr,
    M, H, W, OH, OW, sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    x_pad, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, alpha, beta,
    has_bias: tl.constexpr, has_z: tl.constexpr, act: tl.constexpr, act_before_add: tl.constexpr,
    a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a: tl.constexpr, has_y2: tl.constexpr,
    C: tl.constexpr, K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    X_U8: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PAD_ZERO: tl.constexpr,
):
    """A KxK QConv (config TAPS) with the geometry, channel counts and epilogue switches compile-time constants
    (one compiled variant per layer shape, as qconv_rows_kernel is for 1x1): the reduction walks (tap, channel
    block) pairs in a loop of constant trip count that the compiler pipelines (fully unrolled taps were 1.2-1.9x
    slower on the H200). Same arithmetic as qconv2d_nhwc_kernel, bit for bit."""
    tile, pid_m, pid_n, _, _ = tile_schedule(M, K, 1, BLOCK_M, BLOCK_N, GROUP_M, 1)
    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, K, BLOCK_M, BLOCK_N, BLOCK_K)
    nb, oh, ow, ih0, iw0 = conv_pixels(offs_m, OH, OW, SH, SW, PH, PW)
    a_rows = x_ptr + (nb * sxn + ih0 * sxh + iw0 * sxw)[:, None] + offs_k[None, :]
    w_cols = w_ptr + (offs_n * (KH * KW * C))[None, :] + offs_k[:, None]
    if PAD_ZERO:
        pad = 0
    else:
        pad = x_pad
    CB: tl.constexpr = (C + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for it in range(KH * KW * CB):
        a, b = _tap_operands(it, a_rows, w_cols, ih0, iw0, m_mask, n_mask, offs_k, pad, H, W, sxh, sxw, C, KW, DH, DW,
                             CB, BLOCK_K, C % BLOCK_K == 0)
        acc = tl.dot(_to_s8(a, X_U8), b, acc, out_dtype=tl.int32)
    y_mask = m_mask[:, None] & n_mask[None, :]
    _finish(acc, y_mask, nb * szn + oh * szh + ow * szw, nb * syn + oh * syh + ow * syw,
            nb * s2n + oh * s2h + ow * s2w, offs_n, n_mask, z_ptr, y_ptr, y2_ptr, corr_ptr, m_ptr, b_ptr, z_zp,
            z_scale, y_inv_scale, y_zp, q_lo, q_hi, has_bias, act, act_before_add, alpha, beta, a_inv_scale, a_scale,
            a_zp, a_lo, a_hi, has_a, has_z, has_y2, QUANT)


@triton.jit(do_not_specialize=["M", *_RUNTIME])
def qgemm_kernel(
    a_ptr, w_ptr, corr_ptr, m_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, ws_ptr, cnt_ptr,
    M, N, K, sam, sak, szm, sym, sym2,
    x_pad, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, alpha, beta,
    has_bias, has_z, act, act_before_add, a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a, has_y2,
    X_U8: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    tile, pid_m, pid_n, it_lo, it_hi = tile_schedule(M, N, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)

    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # masked lanes load 0 (a zero fill, no select after the async copy): a K-tail lane meets a zero weight,
    # a row past M is never stored, so the zero point correction needs no padded value here
    for k0 in range(it_lo * BLOCK_K, it_hi * BLOCK_K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k0 * sak, mask=m_mask[:, None], other=0)
            b = tl.load(b_ptrs + k0, mask=n_mask[None, :], other=0)
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs + k0 * sak, mask=m_mask[:, None] & k_mask[None, :], other=0)
            b = tl.load(b_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(_to_s8(a, X_U8), b, acc, out_dtype=tl.int32)
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, y_mask = split_k_gather(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, y_mask, N, SPLIT_K)
    _finish(acc, y_mask, offs_m * szm, offs_m * sym, offs_m * sym2, offs_n, n_mask, z_ptr, y_ptr, y2_ptr, corr_ptr,
            m_ptr, b_ptr, z_zp, z_scale, y_inv_scale, y_zp, q_lo, q_hi, has_bias, act, act_before_add, alpha, beta,
            a_inv_scale, a_scale, a_zp, a_lo, a_hi, has_a, has_z, has_y2, QUANT)
