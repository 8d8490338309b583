"""Launching the Triton INT8 kernels of kiln.backends.cuda.triton_qkernels (the QConv / QGemm layers,
kiln.ops.qlayers): the prepared epilogue (QuantEpilogue), the weight packings, the launch paths of the conv
(general, LINEAR for unpadded 1x1 convs, TAPS with the geometry compiled in; S2D in triton_qstem) and of the GEMM
(Triton, or torch._int_mm with the epilogue in torch), and each path's tile configs for the autotuner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from kiln.backends.cuda.common import ConvGeometry, Epilogue, Out, activate_
from kiln.backends.cuda.triton_conv import _nhwc_ok, _p2, nhwc_dests, split_configs, split_k_workspace
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_qkernels import (ROUND_LIMIT, qconv2d_nhwc_kernel, qconv_rows_kernel,
                                                qconv_taps_kernel, qgemm_kernel)
from kiln.ops.qlayers import QUANT_OUT, QuantSpec

Tensor = torch.Tensor

QUANT_RANGES: dict[torch.dtype, tuple[int, int]] = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
"""The integer output types and their saturation ranges."""


def _f32(v: float) -> float:
    """v rounded to the nearest float32 (what the kernels compute with)."""
    return float(torch.tensor(v, dtype=torch.float64).to(torch.float32).item())


@dataclass(frozen=True)
class QuantEpilogue:
    """Everything after the integer product, prepared once at build: device vectors and float32 scalars.

    corr:  int32 [K_out], zp_s8 * colsum(W) (subtracted from the accumulator; see the module doc)
    m:     float32 [K_out], x_scale * w_scales[k] rounded once to float32 (QuantSpec.multipliers)
    bias:  float32 [K_out] or None
    x_pad: the raw input zero point (what padded positions load, before the uint8 shift)
    a_*:   the requantization before the residual (a_scale 0: none), float32 1 / a_scale and a_scale,
           a_zero_point and a_dtype's range
    """

    corr: Tensor
    m: Tensor
    bias: Tensor | None
    x_pad: int
    x_u8: bool
    z_scale: float
    z_zp: float
    y_inv_scale: float
    y_zp: float
    out_dtype: torch.dtype
    ep: Epilogue
    a_inv_scale: float = 0.0
    a_scale: float = 0.0
    a_zp: float = 0.0
    a_lo: float = 0.0
    a_hi: float = 0.0

    @classmethod
    def make(cls, wk: Tensor, x_u8: bool, q: QuantSpec, bias: Tensor | None, ep: Epilogue) -> "QuantEpilogue":
        """From the K-major int8 weight wk [K_out, R] (on the kernel's device), whether the input is uint8,
        the layer's quantization attributes and epilogue."""
        zp_s8 = q.x_zero_point - (128 if x_u8 else 0)
        corr = (wk.to(torch.int64).sum(1) * zp_s8).to(torch.int32)
        quant = q.quantized_out
        a: tuple[float, ...] = ()
        if q.a_scale > 0:
            a_lo, a_hi = QUANT_RANGES[QUANT_OUT[q.a_dtype]]
            a = (_f32(1.0 / q.a_scale), _f32(q.a_scale), float(q.a_zero_point), float(a_lo), float(a_hi))
        return cls(corr, q.multipliers(wk.shape[0]).to(wk.device).contiguous(),
                   None if bias is None else bias.to(device=wk.device, dtype=torch.float32).contiguous(),
                   q.x_zero_point, x_u8, _f32(q.z_scale), float(q.z_zero_point),
                   _f32(1.0 / q.y_scale) if quant else 1.0, float(q.y_zero_point) if quant else 0.0, q.out_torch, ep,
                   *a)

    @property
    def has_a(self) -> bool:
        """Whether the layer's own result is requantized before the residual add."""
        return self.a_scale > 0

    @property
    def quant(self) -> bool:
        return self.out_dtype in QUANT_RANGES

    def residual(self, z: Tensor | None) -> tuple[float, float]:
        """(zero point, scale) dequantizing the residual: the layer's for an integer Z, identity for a float one."""
        if z is None or z.is_floating_point():
            return 0.0, 1.0
        return self.z_zp, self.z_scale

    def scalars(self, z: Tensor | None) -> list[Any]:
        """The kernels' run-time epilogue arguments, from x_pad through has_a."""
        lo, hi = QUANT_RANGES.get(self.out_dtype, (0, 0))
        z_zp, z_scale = self.residual(z)
        return [self.x_pad, z_zp, z_scale, self.y_inv_scale, self.y_zp, float(lo), float(hi), self.ep.alpha,
                self.ep.beta, int(self.bias is not None), int(z is not None), self.ep.code,
                int(self.ep.act_before_add), self.a_inv_scale, self.a_scale, self.a_zp, self.a_lo, self.a_hi,
                int(self.has_a)]

    def torch_epilogue(self, acc: Tensor, z: Tensor | None) -> Tensor:
        """The same epilogue in torch on an int32 accumulator [..., K_out] (the cuBLASLt int8 path)."""
        v = (acc - self.corr).to(torch.float32) * self.m
        if self.bias is not None:
            v = v + self.bias
        r = None
        if z is not None:
            z_zp, z_scale = self.residual(z)
            r = (z.to(torch.float32) - z_zp) * z_scale
        if self.ep.act_before_add:
            v = activate_(v, self.ep.activation, self.ep.alpha, self.ep.beta)
        if self.has_a:
            v = (_round_sat_torch(v, self.a_inv_scale, self.a_zp, self.a_lo, self.a_hi) - self.a_zp) * self.a_scale
        if r is not None:
            v = v + r
        if not self.ep.act_before_add:
            v = activate_(v, self.ep.activation, self.ep.alpha, self.ep.beta)
        if not self.quant:
            return v.to(self.out_dtype)
        lo, hi = QUANT_RANGES[self.out_dtype]
        return _round_sat_torch(v, self.y_inv_scale, self.y_zp, lo, hi).to(self.out_dtype)


def _round_sat_torch(v: Tensor, inv_scale: float, zp: float, lo: float, hi: float) -> Tensor:
    """The kernels' _round_sat in torch: round_half_even(v * inv_scale) + zp saturated to [lo, hi]."""
    return (torch.round((v * inv_scale).clamp(-ROUND_LIMIT, ROUND_LIMIT)) + zp).clamp(lo, hi)


def _kwargs(qe: QuantEpilogue, cfg: dict[str, Any], split: int) -> dict[str, Any]:
    return dict(X_U8=qe.x_u8, QUANT=qe.quant, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                GROUP_M=cfg.get("GROUP_M", 8), SPLIT_K=split, num_warps=cfg.get("num_warps", 4),
                num_stages=cfg.get("num_stages", 3))


def _workspace(m: int, n: int, cfg: dict[str, Any], like: Tensor) -> tuple[int, int, Tensor, Tensor]:
    """(tiles, split, int32 partial sums [M, N], tile counters) of a launch (dummies without split-K)."""
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = int(cfg.get("SPLIT_K", 1))
    ws, cnt = split_k_workspace(m, n, tiles, split, like)
    return tiles, split, (ws.view(torch.int32) if split > 1 else ws), cnt


def rows_ok(c: int, kernel: tuple[int, ...], dilations: tuple[int, ...], block_k: int) -> bool:
    """Whether config ROWS fits a conv: a window row (KW taps of C channels, undilated) within BLOCK_K."""
    return dilations[1] == 1 and kernel[1] * c <= block_k


def pack_qconv_weight(w: Tensor, cfg: dict[str, Any]) -> Tensor:
    """int8 [K_out, C, KH, KW] -> the K-major weight a config reads: [K_out, KH*KW*C] (tap-major, then channel),
    or for ROWS [K_out, KH*BLOCK_K], each kernel row's KW*C values zero-padded to BLOCK_K."""
    k_out, c, kh, kw = w.shape
    wk = w.permute(0, 2, 3, 1).reshape(k_out, kh, kw * c)
    if cfg.get("ROWS"):
        wk = torch.nn.functional.pad(wk, (0, int(cfg["BLOCK_K"]) - kw * c))
    return wk.reshape(k_out, -1).contiguous()


def _qconv_mode(x: Tensor, geo: ConvGeometry, qe: QuantEpilogue, cfg: dict[str, Any]) -> dict[str, Any]:
    """The kernel's walk (FLAT / ROWS / per-tap channel blocks) and its specializations for this launch."""
    c = x.shape[1]
    rows = bool(cfg.get("ROWS", False))
    flat = bool(cfg.get("FLAT", False)) and not rows
    # a zero fill is exact where the padded value is 0 or no window reaches outside the image
    pad_zero = qe.x_pad == 0 or not any(geo.pads)
    return {"FLAT": flat, "ROWS": rows, "EVEN_K": not (flat or rows) and c % cfg["BLOCK_K"] == 0,
            "PAD_ZERO": pad_zero}


def qconv2d_nhwc(x: Tensor, wk: Tensor, qe: QuantEpilogue, z: Tensor | None, geo: ConvGeometry,
                 cfg: dict[str, Any], out: Out = None) -> Tensor:
    """Launch the int8 implicit-GEMM conv: x [N,C,H,W] int8/uint8 (any NHWC-like strides), wk the K-major
    weight of `pack_qconv_weight(w, cfg)` -> y [N,K_out,OH,OW] channels_last in qe.out_dtype, or stored into
    the one or two `out` tensors (channel stride 1). Config ROWS needs `rows_ok` and reads x densely packed
    (a channel-sliced view is copied first)."""
    x = _nhwc_ok(x)
    n, c, h, w = x.shape
    if cfg.get("LINEAR") and linear_geometry(geo) and int(cfg.get("SPLIT_K", 1)) == 1:
        y = _qconv_rows(x, wk, qe, z, geo, cfg, out)
        if y is not None:
            return y
    if cfg.get("TAPS") and int(cfg.get("SPLIT_K", 1)) == 1:
        return qconv_taps(x, wk, qe, z, geo, cfg, out)
    mode = _qconv_mode(x, geo, qe, cfg)
    if mode["ROWS"] and x.stride(3) != c:
        x = x.contiguous(memory_format=torch.channels_last)
    k = wk.shape[0]
    oh, ow = geo.out_hw(h, w)
    y, y2 = nhwc_dests(out, (n, k, oh, ow), x, qe.out_dtype)
    if z is not None:
        z = _nhwc_ok(z)
    m = n * oh * ow
    tiles, split, ws, cnt = _workspace(m, k, cfg, y)
    zs = (z.stride(0), z.stride(2), z.stride(3)) if z is not None else (0, 0, 0)
    bk = cfg["BLOCK_K"]
    taps = geo.kernel[0] * geo.kernel[1]
    if mode["ROWS"]:
        its = geo.kernel[0]
    elif mode["FLAT"]:
        its = triton.cdiv(taps * c, bk)
    else:
        its = taps * triton.cdiv(c, bk)
    launch(qconv2d_nhwc_kernel, (tiles * split,), [
        x, wk, qe.corr, qe.m, qe.bias if qe.bias is not None else qe.m, z if z is not None else y, y, y2, ws, cnt,
        m, c, h, w, k, oh, ow, wk.shape[1],
        x.stride(0), x.stride(2), x.stride(3), zs[0], zs[1], zs[2], y.stride(0), y.stride(2), y.stride(3),
        y2.stride(0), y2.stride(2), y2.stride(3),
        geo.kernel[0], geo.kernel[1], geo.strides[0], geo.strides[1], geo.pads[0], geo.pads[1],
        geo.dilations[0], geo.dilations[1], triton.cdiv(c, bk), its,
        *qe.scalars(z), int(y2 is not y)],
        {**_kwargs(qe, cfg, split), **mode})
    return y


def linear_geometry(geo: ConvGeometry) -> bool:
    """A 1x1 conv without padding (any stride): each output pixel a product of one input pixel's channels."""
    return tuple(geo.kernel) == (1, 1) and not any(geo.pads)


def row_stride(t: Tensor) -> int | None:
    """The distance r between consecutive pixels of an NCHW-shaped tensor whose pixel p = (n*H + h)*W + w
    starts at p * r with unit channel stride (dense NHWC, or a channel slice of it), else None."""
    n, c, h, w = t.shape
    if c > 1 and t.stride(1) != 1:
        return None
    sizes, strides, span = (w, h, n), (t.stride(3), t.stride(2), t.stride(0)), (1, w, w * h)
    r = next((st // sp for sz, st, sp in zip(sizes, strides, span) if sz > 1), c)
    if any(sz > 1 and st != sp * r for sz, st, sp in zip(sizes, strides, span)):
        return None
    return r if r >= c else None


def _qconv_rows(x: Tensor, wk: Tensor, qe: QuantEpilogue, z: Tensor | None, geo: ConvGeometry, cfg: dict[str, Any],
                out: Out) -> Tensor | None:
    """Config LINEAR of an unpadded 1x1 conv (any stride) through qconv_rows_kernel, or None when the output's or
    the residual's pixels are not evenly spaced rows (the caller then runs the general kernel with the same tile).
    The input is addressed as rows where it can be, else by its (n, h, w) strides times the conv's."""
    n, c, h, w = x.shape
    k = wk.shape[0]
    oh, ow = geo.out_hw(h, w)
    y, y2 = nhwc_dests(out, (n, k, oh, ow), x, qe.out_dtype)
    strides = [row_stride(t) for t in (y, y2, *([z] if z is not None else []))]
    if any(r is None for r in strides):
        return None
    sy, sy2 = strides[:2]
    sz = strides[2] if z is not None else 0
    (sh, sw), rx = geo.strides, row_stride(x)
    pixels = rx is None or (sh, sw) != (1, 1)
    sxn, sxh, sxw = (x.stride(0), x.stride(2) * sh, x.stride(3) * sw) if pixels else (0, 0, rx)
    m = n * oh * ow
    sc = qe.scalars(z)
    launch(qconv_rows_kernel, (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]),), [
        x, wk, qe.corr, qe.m, qe.bias if qe.bias is not None else qe.m, z if z is not None else y, y, y2,
        m, oh, ow, sxn, sxh, sxw, sz, sy, sy2, *sc[:9]],
        _const_kwargs(qe, sc, cfg, y2 is not y, C=c, K=k, X_PIXELS=int(pixels)))
    return y


def _const_kwargs(qe: QuantEpilogue, sc: list[Any], cfg: dict[str, Any], has_y2: bool, **shape: int) -> dict[str, Any]:
    """The compile-time arguments of the specialized kernels (LINEAR, TAPS): the epilogue's switches from
    `qe.scalars` (sc), the tile, and the layer's shape constants."""
    return dict(has_bias=sc[9], has_z=sc[10], act=sc[11], act_before_add=sc[12], a_inv_scale=sc[13],
                a_scale=sc[14], a_zp=sc[15], a_lo=sc[16], a_hi=sc[17], has_a=sc[18], has_y2=int(has_y2), **shape,
                X_U8=qe.x_u8, QUANT=qe.quant, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4),
                num_stages=cfg.get("num_stages", 3))


def qconv_taps(x: Tensor, wk: Tensor, qe: QuantEpilogue, z: Tensor | None, geo: ConvGeometry,
                cfg: dict[str, Any], out: Out) -> Tensor:
    """Config TAPS (any ungrouped 2-D conv, the tap-major weight of pack_qconv_weight) through
    qconv_taps_kernel: geometry, channels and epilogue switches compiled in."""
    n, c, h, w = x.shape
    k = wk.shape[0]
    oh, ow = geo.out_hw(h, w)
    y, y2 = nhwc_dests(out, (n, k, oh, ow), x, qe.out_dtype)
    if z is not None:
        z = _nhwc_ok(z)
    zs = (z.stride(0), z.stride(2), z.stride(3)) if z is not None else (0, 0, 0)
    m = n * oh * ow
    sc = qe.scalars(z)
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    launch(qconv_taps_kernel, (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]),), [
        x, wk, qe.corr, qe.m, qe.bias if qe.bias is not None else qe.m, z if z is not None else y, y, y2,
        m, h, w, oh, ow, x.stride(0), x.stride(2), x.stride(3), *zs, y.stride(0), y.stride(2), y.stride(3),
        y2.stride(0), y2.stride(2), y2.stride(3), *sc[:9]],
        _const_kwargs(qe, sc, cfg, y2 is not y, C=c, K=k, KH=kh, KW=kw, SH=sh, SW=sw, PH=geo.pads[0],
                      PW=geo.pads[1], DH=dh, DW=dw, PAD_ZERO=qe.x_pad == 0 or not any(geo.pads)))
    return y


def qgemm(a: Tensor, w: Tensor, qe: QuantEpilogue, z: Tensor | None, y: Tensor, cfg: dict[str, Any],
          y2: Tensor | None = None) -> Tensor:
    """y[M, N] = epilogue(a[M, K] @ w[N, K]^T) in int32, also stored into y2 if given; z, y, y2 need unit
    column stride, w is contiguous."""
    m, k = a.shape
    n = w.shape[0]
    tiles, split, ws, cnt = _workspace(m, n, cfg, y)
    launch(qgemm_kernel, (tiles * split,), [
        a, w, qe.corr, qe.m, qe.bias if qe.bias is not None else qe.m, z if z is not None else y, y,
        y2 if y2 is not None else y, ws, cnt,
        m, n, k, a.stride(0), a.stride(1), z.stride(0) if z is not None else 0, y.stride(0),
        y2.stride(0) if y2 is not None else 0,
        *qe.scalars(z), int(y2 is not None)],
        {**_kwargs(qe, cfg, split), "EVEN_K": k % cfg["BLOCK_K"] == 0})
    return y


def qgemm_int_mm(a: Tensor, w: Tensor, qe: QuantEpilogue, z: Tensor | None) -> Tensor:
    """The same product through torch._int_mm (cuBLASLt int8; M > 16, K and N multiples of 8) and the
    epilogue in torch: a config the autotuner weighs against the Triton kernel on large shapes."""
    a8 = (a.to(torch.int16) - 128).to(torch.int8) if qe.x_u8 else a
    acc = torch._int_mm(a8.contiguous(), w.t())
    return qe.torch_epilogue(acc, z)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for int8 on sm_90, most generally useful first: the large
# tiles of fast int8/fp8 GEMMs (128x128 / 128x256 / 256x128, 8 warps = two warpgroups of wgmma, K 128 bytes deep,
# 3-4 stages within the 228 KB of shared memory), then BLOCK_K 64 twins for 64-channel layers (a channel block
# deeper than C would be mostly padding), then narrow and small tiles. wgmma needs BLOCK_M % 64 == 0 and warps
# % 4 == 0; the 32-row / 2-warp tiles run Ampere-style mma for tiny problems.
QTILES: list[tuple[int, int, int, int, int]] = [
    (128, 128, 128, 8, 4),
    (128, 256, 128, 8, 3),
    (128, 64, 128, 4, 4),
    (128, 128, 64, 8, 4),
    (256, 128, 128, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 64, 128, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (256, 128, 64, 8, 4),
    (256, 64, 64, 8, 4),
    (64, 64, 128, 4, 4),
    (64, 64, 64, 4, 5),
    (128, 128, 128, 8, 3),
    (32, 64, 128, 4, 4),
    (64, 32, 64, 4, 4),
    (32, 32, 64, 2, 4),
    (32, 32, 32, 2, 4),
]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of config LINEAR (1x1 convs as GEMMs over pixel rows), the
# fastest on the H200 for ResNet-50's 1x1 layers at batch 256 (benchmarks/int8_ceiling.py): narrow N tiles with
# 4 warps for 64/128 input channels, 128x128 with 8 warps and a 128-byte reduction step for wider layers. (A
# persistent form, programs walking tiles so that the next tile's loads overlap this one's epilogue, was measured
# on 2026-12-04: 0.8x-1.1x of these, and out of shared memory past 256 channels. Not kept.)
LINEAR_TILES: list[tuple[int, int, int, int, int]] = [
    (128, 64, 64, 4, 4),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 3),
]


def linear_configs(k_out: int, c: int) -> list[dict[str, Any]]:
    """Config LINEAR tiles for a 1x1 conv of c -> k_out channels (`_narrowed`)."""
    return _narrowed(LINEAR_TILES, k_out, c, "LINEAR")


def _narrowed(tiles: list[tuple[int, int, int, int, int]], k_out: int, c: int, flag: str) -> list[dict[str, Any]]:
    """A specialized config (`flag`) per tile, narrowed to the problem (N and the reduction step no wider than the
    next power of two of k_out and c, at least 32), duplicates dropped."""
    out: list[dict[str, Any]] = []
    for bm, bn, bk, warps, stages in tiles:
        cfg = {"BLOCK_M": bm, "BLOCK_N": min(bn, max(32, _p2(k_out))), "BLOCK_K": min(bk, max(32, _p2(c))),
               "GROUP_M": 8, "num_warps": warps, "num_stages": stages, flag: True}
        if cfg not in out:
            out.append(cfg)
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of config TAPS (KxK convs with the geometry compiled in), in
# the order of their wins on ResNet-50's 3x3 layers at batch 256 on the H200 (benchmarks/qconv_sweep.py, 2026-12-04:
# 1.3-1.6x faster than the general kernel's best tile on every shape): 64x128 for 128-512 channels, 128x64 for 64,
# 128x256 with two warpgroups for 256.
TAPS_TILES: list[tuple[int, int, int, int, int]] = [
    (64, 128, 128, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 256, 128, 8, 3),
    (128, 128, 128, 8, 4),
]


def taps_configs(k_out: int, c: int) -> list[dict[str, Any]]:
    """Config TAPS tiles for a KxK conv of c -> k_out channels (`_narrowed`: the channel block no wider than c)."""
    return _narrowed(TAPS_TILES, k_out, c, "TAPS")


def qtile_configs(m: int | None, n: int, k: int | None, level: int, k_red: int | None = None) -> list[dict[str, Any]]:
    """Tile configs for an int8 problem of M x N (reduction chunk k, whole reduction k_red): tiles no larger
    than the problem, the first few by optimization level, plus split-K configs (level >= 2) when there are
    too few tiles to fill the GPU."""
    out = []
    for bm, bn, bk, warps, stages in QTILES:
        if (m is not None and bm > max(32, _p2(m))) or bn > max(32, _p2(n)) or (k is not None and bk > max(32, _p2(k))):
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps,
                    "num_stages": stages})
    limit = {0: 1, 1: 2, 2: 3, 3: 5}.get(level, len(out))  # level 4+: every tile (more Triton compiles)
    out = out[:limit]
    if level >= 2 and k_red is not None:
        out += split_configs(m, n, k_red)
    return out
