"""Triton depthwise 2-D convolution over NHWC activations with the conv epilogue fused.

A depthwise conv (group == input channels == output channels: MobileNet, EfficientNet, ConvNeXt's 7x7)
does KH*KW multiply-adds per output element: no GEMM to feed tensor cores, only memory to move. Each
program takes a tile of output pixels (flattened N*OH*OW) x a block of channels; for each tap it loads the
matching input pixels' channel block (contiguous in NHWC) and the tap's weights, accumulating in float32.
The kernel size is a compile-time constant, so the tap loop unrolls and its loads overlap (a run-time tap
loop waits on one load at a time: 21 us for ConvNeXt's first 7x7 layer at batch 1 instead of a few).
The epilogue adds the bias, the residual Z (read in place, any NHWC-compatible strides) and the
activation in the fused order, and stores in the output's type into a new channels-last tensor or one or
two given destinations (slices of elided Concats). Any kernel size, stride, dilation and asymmetric
padding; X may be of another float type than the weight (converted on load). cuDNN has fast depthwise
kernels for some shapes and a generic fallback for others (ConvNeXt's 7x7 ran on torch's NCHW generic
kernel, with layout copies around it); the autotuner times this against them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kiln.backends.cuda.common import (ConvGeometry, Epilogue, check_out, conv_geometry, conv_static_ok, epilogue_of,
                                       float_io, nhwc_outs, prepacked, write_out, Out)
from kiln.backends.cuda.triton_act import conv_pixels, finish
from kiln.backends.cuda.triton_conv import _nhwc_ok, _torch_conv, nhwc_dests
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_norm import layernorm_rows
from kiln.backends.kernel import Kernel
from kiln.backends.tactic import Built, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_I32 = 2**31 - 1
_RUNTIME = ["alpha", "beta", "has_bias", "has_z", "act", "act_before_add", "has_y2", "has_nb", "eps"]
_MAX_NORM_C = 2048  # FusedConvNorm: one program holds all of a pixel's channels

TILES: list[tuple[int, int, int]] = [(32, 64, 4), (64, 32, 4), (16, 128, 4), (64, 64, 4), (128, 32, 4), (8, 128, 2),
                                     (16, 64, 2), (8, 32, 4), (16, 32, 4), (8, 64, 4), (4, 128, 4)]
"""(BLOCK_M pixels, BLOCK_C channels, num_warps) the autotuner times. The last four hold two to four elements per
thread, so that all of a 7x7 kernel's 49 tap loads can be in flight at once (a small late-stage layer at batch 1
has few programs, each waiting on its loads in turn when its tile is larger)."""
NORM_TILES: list[tuple[int, int]] = [(1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (2, 8)]
"""(BLOCK_M pixels, num_warps) for FusedConvNorm, whose channel block spans every channel."""
ROW_TILES: list[tuple[int, int, int, int]] = [(4, 8, 64, 4), (4, 16, 32, 4), (4, 8, 32, 2), (2, 16, 64, 4),
                                              (4, 16, 64, 4), (2, 8, 128, 4)]
"""(TH output rows, TW output columns, BLOCK_C channels, num_warps) of the row-reuse kernel (_dwconv_rows_kernel),
offered where the conv's row stride and dilation are 1."""
ROW_NORM_TILES: list[tuple[int, int, int]] = [(2, 2, 4), (4, 2, 4), (2, 4, 4), (4, 4, 8), (4, 1, 4)]
"""(TH, TW, num_warps) of the row-reuse kernel for FusedConvNorm's one launch (the channel block spans C)."""


@triton.jit
def _finish_store(acc, m_mask, cs, c_mask, z_ptr, z_off, y_ptr, y_off, y2_ptr, y2_off, b_ptr, g_ptr, nb_ptr, C,
                  alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM: tl.constexpr):
    """The epilogue of a (pixels x channels) accumulator tile: bias, residual Z and activation in the fused order,
    with NORM the per-pixel LayerNorm over C (the tile holds every channel), then the store (and the second one)."""
    y_mask = m_mask[:, None] & c_mask[None, :]
    z = tl.zeros_like(acc)
    if has_z != 0:
        z = tl.load(z_ptr + z_off[:, None] + cs[None, :], mask=y_mask, other=0.0).to(tl.float32)
    acc = finish(acc, b_ptr, cs, c_mask, z, has_bias, act, act_before_add, alpha, beta)
    if NORM:
        mean = tl.sum(tl.where(c_mask[None, :], acc, 0.0), axis=1) / C
        d = tl.where(c_mask[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        acc = d * rstd[:, None] * tl.load(g_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        if has_nb != 0:
            acc = acc + tl.load(nb_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + y_off[:, None] + cs[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    if has_y2 != 0:
        tl.store(y2_ptr + y2_off[:, None] + cs[None, :], acc.to(y2_ptr.dtype.element_ty), mask=y_mask)


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "SH", "SW", "PH", "PW", "DH", "DW", *_RUNTIME])
def _dwconv_nhwc_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, g_ptr, nb_ptr,
    M, C, H, W, OH, OW,
    sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    SH, SW, PH, PW, DH, DW,
    alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NORM: tl.constexpr,
):
    """Program (pixel tile, channel block): y = epilogue(sum over taps of x[pixel + tap] * w[tap]); with NORM
    (one block holds every channel) each pixel's channels are then layer-normalized: (y - mean) * rstd * g + nb."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = cs < C
    nb, oh, ow, ih0, iw0 = conv_pixels(offs_m, OH, OW, SH, SW, PH, PW)
    x_row = nb * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):  # unrolled: every tap's loads can be in flight at once
        ih = ih0 + kh * DH
        row_ok = m_mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + cs[None, :],
                         mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * KW + kw) * C + cs, mask=c_mask, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    _finish_store(acc, m_mask, cs, c_mask, z_ptr, nb * szn + oh * szh + ow * szw, y_ptr, nb * syn + oh * syh + ow * syw,
                  y2_ptr, nb * s2n + oh * s2h + ow * s2w, b_ptr, g_ptr, nb_ptr, C,
                  alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)


@triton.jit
def _tap(acc, xv, w_ptr, tap, C, cs, c_mask):
    return acc + xv * tl.load(w_ptr + tap * C + cs, mask=c_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _row_out(acc, t, nb, oh0, ow, w_ok, cs, c_mask, z_ptr, y_ptr, y2_ptr, b_ptr, g_ptr, nb_ptr, C, OH,
             szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
             alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM: tl.constexpr):
    oh = oh0 + t + tl.zeros_like(ow)
    _finish_store(acc, w_ok & (oh < OH), cs, c_mask, z_ptr, nb * szn + oh * szh + ow * szw,
                  y_ptr, nb * syn + oh * syh + ow * syw, y2_ptr, nb * s2n + oh * s2h + ow * s2w,
                  b_ptr, g_ptr, nb_ptr, C, alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "SW", "PH", "PW", "DW", *_RUNTIME])
def _dwconv_rows_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, g_ptr, nb_ptr,
    C, H, W, OH, OW,
    sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    SW, PH, PW, DW,
    alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps,
    KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr,
    NORM: tl.constexpr,
):
    """Row stride and dilation 1: program (image, TH output rows x TW output columns, channel block). Each of the
    TH + KH - 1 input rows it reads is loaded once per column tap and added into every output row it feeds (up to
    four accumulators, tap kh = input row - output row, resolved at compile time), so the loads per output fall
    from KH * KW to about (TH + KH - 1) * KW / TH."""
    pid = tl.program_id(0)
    n_w = tl.cdiv(OW, TW)
    n_h = tl.cdiv(OH, TH)
    owb = pid % n_w
    rest = pid // n_w
    oh0 = (rest % n_h) * TH
    nb = rest // n_h
    ow = owb * TW + tl.arange(0, TW)
    w_ok = ow < OW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    iw0 = ow * SW - PW
    x_img = nb * sxn
    # Triton has no array of tensors: four named accumulators, those past TH compiled out by the constexpr guards
    acc0 = tl.zeros((TW, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((TW, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((TW, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((TW, BLOCK_C), dtype=tl.float32)
    for r in tl.static_range(TH + KH - 1):
        ih = oh0 - PH + r + tl.zeros_like(ow)  # a vector: the interpreter cannot mask by scalar & vector bools
        row_ok = w_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (x_img + ih * sxh + iw * sxw)[:, None] + cs[None, :],
                         mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            if r < KH:
                acc0 = _tap(acc0, xv, w_ptr, r * KW + kw, C, cs, c_mask)
            if TH > 1:
                if r >= 1:
                    if r - 1 < KH:
                        acc1 = _tap(acc1, xv, w_ptr, (r - 1) * KW + kw, C, cs, c_mask)
            if TH > 2:
                if r >= 2:
                    if r - 2 < KH:
                        acc2 = _tap(acc2, xv, w_ptr, (r - 2) * KW + kw, C, cs, c_mask)
            if TH > 3:
                if r >= 3:
                    if r - 3 < KH:
                        acc3 = _tap(acc3, xv, w_ptr, (r - 3) * KW + kw, C, cs, c_mask)
    _row_out(acc0, 0, nb, oh0, ow, w_ok, cs, c_mask, z_ptr, y_ptr, y2_ptr, b_ptr, g_ptr, nb_ptr, C, OH,
             szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
             alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)
    if TH > 1:
        _row_out(acc1, 1, nb, oh0, ow, w_ok, cs, c_mask, z_ptr, y_ptr, y2_ptr, b_ptr, g_ptr, nb_ptr, C, OH,
                 szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
                 alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)
    if TH > 2:
        _row_out(acc2, 2, nb, oh0, ow, w_ok, cs, c_mask, z_ptr, y_ptr, y2_ptr, b_ptr, g_ptr, nb_ptr, C, OH,
                 szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
                 alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)
    if TH > 3:
        _row_out(acc3, 3, nb, oh0, ow, w_ok, cs, c_mask, z_ptr, y_ptr, y2_ptr, b_ptr, g_ptr, nb_ptr, C, OH,
                 szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
                 alpha, beta, has_bias, has_z, act, act_before_add, has_y2, has_nb, eps, NORM)


def dwconv2d_nhwc(x: Tensor, wp: Tensor, bias: Tensor | None, z: Tensor | None, geo: ConvGeometry, ep: Epilogue,
                  cfg: dict[str, Any], out: Out = None, out_dtype: torch.dtype | None = None,
                  norm: tuple[Tensor, Tensor | None, float] | None = None) -> Tensor:
    """x [N,C,H,W] (channel stride 1 after _nhwc_ok), wp [KH*KW, C] -> y [N,C,OH,OW] channels_last in
    `out_dtype` (default x's), or stored into the one or two `out` tensors (channel stride 1). With `norm`
    (scale [C], bias [C] or None, epsilon) the result is the per-pixel LayerNorm over C, as [N,OH,OW,C]
    (contiguous, or stored into `out` of that shape with element stride 1 in C)."""
    x = _nhwc_ok(x)
    n, c, h, w = (int(d) for d in x.shape)
    oh, ow = geo.out_hw(h, w)
    if norm is None:
        y, y2 = nhwc_dests(out, (n, c, oh, ow), x, out_dtype)
        ys, y2s = (y.stride(0), y.stride(2), y.stride(3)), (y2.stride(0), y2.stride(2), y2.stride(3))
    else:
        y = out if isinstance(out, Tensor) else torch.empty((n, oh, ow, c), dtype=out_dtype or x.dtype,
                                                             device=x.device)
        y2, ys = y, (y.stride(0), y.stride(1), y.stride(2))
        y2s = ys
    if z is not None:
        z = _nhwc_ok(z)
    m = n * oh * ow
    if not m or not c:
        return y
    bc = int(cfg["BLOCK_C"])
    zs = (z.stride(0), z.stride(2), z.stride(3)) if z is not None else (0, 0, 0)
    g, nb, eps = norm if norm is not None else (y, None, 0.0)
    ptrs = [x, wp, bias if bias is not None else y, z if z is not None else y, y, y2, g, nb if nb is not None else y]
    strides = [x.stride(0), x.stride(2), x.stride(3), zs[0], zs[1], zs[2], *ys, *y2s]
    tail = [ep.alpha, ep.beta, int(bias is not None), int(z is not None), ep.code, int(ep.act_before_add),
            int(y2 is not y), int(nb is not None), float(eps)]
    common = dict(KH=geo.kernel[0], KW=geo.kernel[1], BLOCK_C=bc, NORM=norm is not None,
                  num_warps=int(cfg.get("num_warps", 4)))
    if "TH" in cfg and rows_ok(geo):
        th, tw = int(cfg["TH"]), int(cfg["TW"])
        launch(_dwconv_rows_kernel, (n * triton.cdiv(oh, th) * triton.cdiv(ow, tw), triton.cdiv(c, bc)),
               [*ptrs, c, h, w, oh, ow, *strides, geo.strides[1], geo.pads[0], geo.pads[1], geo.dilations[1], *tail],
               dict(common, TH=th, TW=tw))
        return y
    bm = int(cfg["BLOCK_M"]) if "BLOCK_M" in cfg else int(cfg["TH"]) * int(cfg["TW"])
    launch(_dwconv_nhwc_kernel, (triton.cdiv(m, bm), triton.cdiv(c, bc)),
           [*ptrs, m, c, h, w, oh, ow, *strides,
            geo.strides[0], geo.strides[1], geo.pads[0], geo.pads[1], geo.dilations[0], geo.dilations[1], *tail],
           dict(common, BLOCK_M=bm))
    return y


def rows_ok(geo: ConvGeometry) -> bool:
    """The row-reuse kernel's geometry: row stride and row dilation 1, at most four output rows per program."""
    return geo.strides[0] == 1 and geo.dilations[0] == 1


def _cudnn_dwconv(x: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor:
    """torch's (cuDNN's) depthwise conv without bias, channels-last in and out, in the weight's type."""
    x = x.to(w.dtype).contiguous(memory_format=torch.channels_last)
    padding: Any = [geo.pads[0], geo.pads[1]]
    if not geo.symmetric:
        t, l, bo, r = geo.pads
        x, padding = F.pad(x, [l, r, t, bo]), [0, 0]
    return F.conv2d(x, w, None, list(geo.strides), padding, list(geo.dilations), geo.group)


def _is_conv_norm(node: Node) -> bool:
    return node.domain == "kiln" and node.op_type == "FusedConvNorm"


def _depthwise(node: Node) -> bool:
    """A 2-D conv with a constant [C, 1, KH, KW] weight and C groups (one filter per channel); or a FusedConvNorm
    of such a conv with constant [C] norm parameters and at most _MAX_NORM_C channels."""
    if _is_conv_norm(node):
        w = node.input(1)
        if w is None or w.const is None or w.const.dim() != 4 or not float_io(node) or len(node.outputs) != 1:
            return False
        c = int(w.const.shape[0])
        params = [node.input(i) for i in (2, 3, 4)]
        if c > _MAX_NORM_C or node.input(3) is None or any(
                v is not None and (v.const is None or tuple(v.const.shape) != (c,)) for v in params):
            return False
        x = node.input(0)
        geo = ConvGeometry.of(node)
        return (x is not None and x.type.rank in (None, 4) and geo is not None and len(geo.kernel) == 2
                and int(w.const.shape[1]) == 1 and geo.group == c > 1)
    if not conv_static_ok(node) or not float_io(node, cast_ok=True):
        return False
    w = node.inputs[1].const  # type: ignore[union-attr]
    geo = conv_geometry(node)
    return len(geo.kernel) == 2 and int(w.shape[1]) == 1 and geo.group == int(w.shape[0]) > 1


class TritonDepthwiseConv(Tactic):
    """Depthwise conv in Triton, NHWC, bias/residual/activation/cast fused; several tiles. Also FusedConvNorm:
    one channel block spans every channel and the program normalizes its pixels before storing them NHWC."""

    id = "cuda.triton_dwconv"
    devices = ("cuda",)
    priority = 25
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return _depthwise(node)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        c = int(node.inputs[1].const.shape[0])  # type: ignore[union-attr]
        rows = rows_ok(ConvGeometry.of(node) if _is_conv_norm(node) else conv_geometry(node))
        if _is_conv_norm(node):
            bc = max(16, triton.next_power_of_2(c))
            one = [{"BLOCK_M": bm, "BLOCK_C": bc, "num_warps": warps} for bm, warps in NORM_TILES
                   if bm * bc <= 32 * warps * 16]  # at most 16 accumulators per thread
            norm_r = max(1, min(16, 2048 // bc))
            if rows:
                one += [{"TH": th, "TW": tw, "BLOCK_C": bc, "num_warps": warps} for th, tw, warps in ROW_NORM_TILES
                        if th * tw * bc <= 32 * warps * 16]
            two: list[dict[str, Any]] = []
            if not epilogue_of(node).activation:  # cuDNN's depthwise conv, the bias added by the norm kernel
                two.append({"split": 1, "cudnn": 1, "NORM_R": norm_r, "NORM_WARPS": 4 if bc <= 256 else 8})
            for cfg in self._plain(c, rows):
                cfg = {"split": 1, **cfg, "NORM_R": norm_r, "NORM_WARPS": 4 if bc <= 256 else 8}
                if cfg not in two:
                    two.append(cfg)
            return one + two
        return self._plain(c, rows)

    @staticmethod
    def _plain(c: int, rows: bool) -> list[dict[str, Any]]:
        """The plain depthwise conv's tiles for C channels (the row-reuse ones where the geometry allows); also the
        first half of FusedConvNorm's two-launch form, timed against the one-launch tiles: a program holding every
        channel takes few pixels, and at large batches wider pixel tiles win back more than the extra write and read
        cost (ConvNeXt-T at batch 32 takes two launches in every block)."""
        cap = max(16, triton.next_power_of_2(c))
        out: list[dict[str, Any]] = []
        for bm, bc, warps in TILES:
            cfg = {"BLOCK_M": bm, "BLOCK_C": min(bc, cap), "num_warps": warps}
            if cfg not in out:
                out.append(cfg)
        for th, tw, bc, warps in ROW_TILES if rows else ():
            cfg = {"TH": th, "TW": tw, "BLOCK_C": min(bc, cap), "num_warps": warps}
            if cfg not in out:
                out.append(cfg)
        return out

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        geo = conv_geometry(node)
        ep = epilogue_of(node)
        w = node.inputs[1].const.to(device)  # type: ignore[union-attr]
        c, kh, kw = int(w.shape[0]), int(w.shape[2]), int(w.shape[3])
        wp = w.reshape(c, kh * kw).t().contiguous()  # [taps, C]: a tap's weights are contiguous over channels
        b_in = node.input(2)
        bias = None if b_in is None else b_in.const.to(device)  # type: ignore[union-attr]
        out_dtype = node.outputs[0].type.dtype.torch  # type: ignore[union-attr]
        del w
        if _is_conv_norm(node):
            return self._build_norm(node, config, device, geo, ep, wp, bias, out_dtype)

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None, out: Out = None) -> Tensor:
            oh, ow = geo.out_hw(x.shape[2], x.shape[3])
            shape = (int(x.shape[0]), c, oh, ow)
            if out is not None:
                check_out(out, shape, node.name)
            if int(x.shape[1]) != c or max(x.numel(), shape[0] * c * oh * ow) >= _I32:
                w_nchw = wp.t().reshape(c, 1, kh, kw)  # torch's checks and messages; cuDNN past int32 indexing
                return write_out(_torch_conv(x.to(wp.dtype), w_nchw, bias, z, geo, ep).to(out_dtype), out)
            if not nhwc_outs(out):
                return write_out(dwconv2d_nhwc(x, wp, bias, z, geo, ep, config, None, out_dtype), out)
            return dwconv2d_nhwc(x, wp, bias, z, geo, ep, config, out, out_dtype)
        return prepacked(kernel, (1, 2))

    @staticmethod
    def _build_norm(node: Node, config: dict[str, Any], device: torch.device, geo: ConvGeometry, ep: Epilogue,
                    wp: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Built:
        c = int(wp.shape[1])
        scale = node.inputs[3].const.to(device)  # type: ignore[union-attr]
        nb_in = node.input(4)
        nb = None if nb_in is None else nb_in.const.to(device)  # type: ignore[union-attr]
        eps = float(node.attr("epsilon", 1e-5))
        fallback = lookup("FusedConvNorm", "kiln").bind(node)
        split = bool(config.get("split"))
        norm_r, norm_warps = int(config.get("NORM_R", 1)), int(config.get("NORM_WARPS", 4))
        norm_d = max(16, triton.next_power_of_2(c))
        w_nchw = wp.t().reshape(c, 1, *geo.kernel)  # the reference's weight layout, for its fallback
        cudnn = bool(config.get("cudnn"))
        w_cl = w_nchw.contiguous(memory_format=torch.channels_last) if cudnn else None

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, _s: Any = None, _nb: Any = None,
                   out: Out = None) -> Tensor:
            oh, ow = geo.out_hw(x.shape[2], x.shape[3])
            shape = (int(x.shape[0]), oh, ow, c)
            if out is not None:
                check_out(out, shape, node.name)
            if x.dim() != 4 or int(x.shape[1]) != c or max(x.numel(), shape[0] * c * oh * ow) >= _I32:
                return write_out(fallback(x, w_nchw, bias, scale, nb).to(out_dtype), out)  # its checks, messages
            if split:
                if cudnn:
                    t = _cudnn_dwconv(x, w_cl, geo)
                else:
                    t = dwconv2d_nhwc(x, wp, bias, None, geo, ep, config, None, out_dtype)  # [N, C, OH, OW] NHWC
                direct = isinstance(out, Tensor) and out.is_contiguous()
                y = out if direct else torch.empty(shape, dtype=out_dtype, device=x.device)
                layernorm_rows(t.permute(0, 2, 3, 1).reshape(-1, c), scale, nb, y.view(-1, c), eps, norm_r, norm_d,
                               norm_warps, add=bias if cudnn else None)
            else:
                direct = isinstance(out, Tensor) and out.stride(3) == 1
                y = dwconv2d_nhwc(x, wp, bias, None, geo, ep, config, out if direct else None, out_dtype,
                                  norm=(scale, nb, eps))
            return y if direct or out is None else write_out(y, out)
        return Kernel(kernel, prepacked=frozenset({1, 2, 3, 4}), out_format="contiguous")  # [N, OH, OW, C] rows


register_tactic(TritonDepthwiseConv())
