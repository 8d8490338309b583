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
import triton
import triton.language as tl

from kiln.backends.cuda.common import (ConvGeometry, Epilogue, check_out, conv_geometry, conv_static_ok, epilogue_of,
                                       float_io, nhwc_outs, prepacked, write_out, Out)
from kiln.backends.cuda.triton_act import conv_pixels, finish
from kiln.backends.cuda.triton_conv import _nhwc_ok, _torch_conv, nhwc_dests
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor
_I32 = 2**31 - 1
_RUNTIME = ["alpha", "beta", "has_bias", "has_z", "act", "act_before_add", "has_y2"]

TILES: list[tuple[int, int, int]] = [(32, 64, 4), (64, 32, 4), (16, 128, 4), (64, 64, 4), (128, 32, 4), (8, 128, 2),
                                     (16, 64, 2)]
"""(BLOCK_M pixels, BLOCK_C channels, num_warps) the autotuner times."""


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "SH", "SW", "PH", "PW", "DH", "DW", *_RUNTIME])
def _dwconv_nhwc_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, y2_ptr,
    M, C, H, W, OH, OW,
    sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    SH, SW, PH, PW, DH, DW,
    alpha, beta, has_bias, has_z, act, act_before_add, has_y2,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (pixel tile, channel block): y = epilogue(sum over taps of x[pixel + tap] * w[tap])."""
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
    y_mask = m_mask[:, None] & c_mask[None, :]
    z = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if has_z != 0:
        z = tl.load(z_ptr + (nb * szn + oh * szh + ow * szw)[:, None] + cs[None, :], mask=y_mask,
                    other=0.0).to(tl.float32)
    acc = finish(acc, b_ptr, cs, c_mask, z, has_bias, act, act_before_add, alpha, beta)
    tl.store(y_ptr + (nb * syn + oh * syh + ow * syw)[:, None] + cs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=y_mask)
    if has_y2 != 0:
        tl.store(y2_ptr + (nb * s2n + oh * s2h + ow * s2w)[:, None] + cs[None, :], acc.to(y2_ptr.dtype.element_ty),
                 mask=y_mask)


def dwconv2d_nhwc(x: Tensor, wp: Tensor, bias: Tensor | None, z: Tensor | None, geo: ConvGeometry, ep: Epilogue,
                  cfg: dict[str, Any], out: Out = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """x [N,C,H,W] (channel stride 1 after _nhwc_ok), wp [KH*KW, C] -> y [N,C,OH,OW] channels_last in
    `out_dtype` (default x's), or stored into the one or two `out` tensors (channel stride 1)."""
    x = _nhwc_ok(x)
    n, c, h, w = (int(d) for d in x.shape)
    oh, ow = geo.out_hw(h, w)
    y, y2 = nhwc_dests(out, (n, c, oh, ow), x, out_dtype)
    if z is not None:
        z = _nhwc_ok(z)
    m = n * oh * ow
    if not m or not c:
        return y
    bm, bc = int(cfg["BLOCK_M"]), int(cfg["BLOCK_C"])
    zs = (z.stride(0), z.stride(2), z.stride(3)) if z is not None else (0, 0, 0)
    launch(_dwconv_nhwc_kernel, (triton.cdiv(m, bm), triton.cdiv(c, bc)), [
        x, wp, bias if bias is not None else y, z if z is not None else y, y, y2,
        m, c, h, w, oh, ow,
        x.stride(0), x.stride(2), x.stride(3), zs[0], zs[1], zs[2], y.stride(0), y.stride(2), y.stride(3),
        y2.stride(0), y2.stride(2), y2.stride(3),
        geo.strides[0], geo.strides[1], geo.pads[0], geo.pads[1], geo.dilations[0], geo.dilations[1],
        ep.alpha, ep.beta, int(bias is not None), int(z is not None), ep.code, int(ep.act_before_add),
        int(y2 is not y)],
        dict(KH=geo.kernel[0], KW=geo.kernel[1], BLOCK_M=bm, BLOCK_C=bc, num_warps=int(cfg.get("num_warps", 4))))
    return y


def _depthwise(node: Node) -> bool:
    """A 2-D conv with a constant [C, 1, KH, KW] weight and C groups (one filter per channel)."""
    if not conv_static_ok(node) or not float_io(node, cast_ok=True):
        return False
    w = node.inputs[1].const  # type: ignore[union-attr]
    geo = conv_geometry(node)
    return len(geo.kernel) == 2 and int(w.shape[1]) == 1 and geo.group == int(w.shape[0]) > 1


class TritonDepthwiseConv(Tactic):
    """Depthwise conv in Triton, NHWC, bias/residual/activation/cast fused; several tiles."""

    id = "cuda.triton_dwconv"
    devices = ("cuda",)
    priority = 25
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return _depthwise(node)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        c = int(node.inputs[1].const.shape[0])  # type: ignore[union-attr]
        seen, out = set(), []
        for bm, bc, warps in TILES:
            bc = min(bc, max(16, triton.next_power_of_2(c)))
            if (bm, bc) not in seen:
                seen.add((bm, bc))
                out.append({"BLOCK_M": bm, "BLOCK_C": bc, "num_warps": warps})
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


register_tactic(TritonDepthwiseConv())
