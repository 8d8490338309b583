"""Triton global average pooling: GlobalAveragePool and ReduceMean over H, W of a 4-D tensor (keepdims).

The squeeze-and-excite pattern: an [N, C, H, W] activation, usually channels_last straight from a
convolution, averaged to [N, C, 1, 1]. A program owns one image and a block of channels and sums a
tile of (pixels x channels) per step, channels innermost, so with a channel stride of 1
(channels_last, or a channel slice of a channels_last buffer) every load is contiguous; with any
other channel stride (NCHW) the tile is turned (many pixels x few channels) so the loads run along
the pixels. All four input strides and the output's N/C strides are used, so any layout is read
without a copy and the result may land in a strided ``out=`` (a slice of an elided Concat's buffer).
H and W are addressed as one pixel index where they collapse (``stride_h == W * stride_w``).

Sums are float32 whatever the type (fp32 / fp16 / bf16); the mean is rounded once to the input type.
When there are too few (image, channel block) programs to fill the GPU (batch 1, a few hundred
channels), the "split" configurations also divide the pixels among up to MAX_SPLIT programs that write
float32 partial sums into a workspace of N x split x C, which a second small kernel adds up in a fixed
order (deterministic, no atomics). Nothing is synced; the workspace is the only allocation besides the
output: CUDA-graph capturable. Past 2**31 pixels per image the op's reference runs instead.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import check_out
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_pool import _float_4d, _p2, _strides
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_I32 = 2**31 - 1

TARGET_PROGRAMS = 256
"""Split the pixels while N x channel blocks is below this many programs (about two per SM)."""
MAX_SPLIT = 64
"""Most programs sharing one image's pixels (bounds the workspace to N x 64 x C float32)."""


@triton.jit
def pixel_sum(x_base, p_lo, p_hi, W, sxh, sxw, c_mask, FLAT: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """float32 sum over pixels [p_lo, p_hi) of a block of channels: x_base points at the image's channels
    (a [1, BLOCK_C] row of pointers); pixel p is at (p // W) * sxh + (p % W) * sxw, or p * sxw when FLAT."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        if FLAT:
            off = ps.to(tl.int64) * sxw
        else:
            off = (ps // W).to(tl.int64) * sxh + (ps % W).to(tl.int64) * sxw
        v = tl.load(x_base + off[:, None], mask=(ps < p_hi)[:, None] & c_mask[None, :], other=0.0)
        acc += v.to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["P", "W", "PCHUNK"])
def _spatial_sum_kernel(
    x_ptr, y_ptr, C, P, W, CB, PCHUNK,
    sxn, sxc, sxh, sxw, syn, sy_split, syc,
    FLAT: tl.constexpr, FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (image x channel block, split): the sum of pixels [split * PCHUNK, + PCHUNK) of its
    channels; FINAL: their mean, stored in y's type; else the float32 sum at y + split * sy_split."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nb = (pid // CB).to(tl.int64)
    cs = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    x_base = x_ptr + nb * sxn + cs.to(tl.int64)[None, :] * sxc
    total = pixel_sum(x_base, split * PCHUNK, tl.minimum(P, split * PCHUNK + PCHUNK), W, sxh, sxw, c_mask,
                      FLAT, BLOCK_P, BLOCK_C)
    y_off = nb * syn + split.to(tl.int64) * sy_split + cs.to(tl.int64) * syc
    if FINAL:
        tl.store(y_ptr + y_off, (total / P).to(y_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(y_ptr + y_off, total, mask=c_mask)


@triton.jit(do_not_specialize=["P", "SPLIT"])
def _split_mean_kernel(ws_ptr, y_ptr, C, P, SPLIT, syn, syc, BLOCK_C: tl.constexpr):
    """Program (image, channel block): the mean from the SPLIT float32 partial sums, added in order."""
    nb = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    base = ws_ptr + nb * SPLIT * C + cs
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(base + s * C, mask=c_mask, other=0.0)
    tl.store(y_ptr + nb * syn + cs.to(tl.int64) * syc, (acc / P).to(y_ptr.dtype.element_ty), mask=c_mask)


# ---- host side ----------------------------------------------------------------------------------

def spatial_axes_ok(node: Node) -> bool:
    """GlobalAveragePool, or ReduceMean with keepdims=1 and axes exactly {2, 3} (as 2, 3, -2 or -1), given
    as the attribute (opset < 18) or as a constant input (opset 18+); a rank-4 float input of the
    output's type. Empty or absent axes (all axes, or noop_with_empty_axes) are declined."""
    if not _float_4d(node):
        return False
    if node.op_type == "GlobalAveragePool":
        return len(node.inputs) == 1
    if node.op_type != "ReduceMean" or int(node.attr("keepdims", 1)) != 1:
        return False
    if node.opset >= 18:
        v = node.input(1)
        if v is None or v.const is None or v.const.dtype not in (torch.int64, torch.int32):
            return False
        axes = [int(a) for a in v.const.reshape(-1).tolist()]
    else:
        if len(node.inputs) > 1:
            return False
        axes = [int(a) for a in node.attr("axes", None) or []]
    return len(axes) == 2 and all(a in (2, 3, -2, -1) for a in axes) and {a % 4 for a in axes} == {2, 3}


def _tile(x: Tensor, tile: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of `tile` elements: channels innermost when they are contiguous, else pixels."""
    c, p = int(x.shape[1]), int(x.shape[2]) * int(x.shape[3])
    if x.stride(1) == 1 or c == 1:
        bc = min(128, _p2(c))
        return max(1, min(tile // bc, _p2(p))), bc
    bp = min(256, _p2(p))
    return bp, max(1, min(tile // bp, _p2(c), 64))


def split_of(n: int, c: int, p: int, bp: int, bc: int) -> int:
    """How many programs share one image's pixels: enough for about TARGET_PROGRAMS in all, at most
    MAX_SPLIT, and at least one pixel block each."""
    programs = n * triton.cdiv(c, bc)
    if programs >= TARGET_PROGRAMS or p <= bp:
        return 1
    return max(1, min(MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, programs), triton.cdiv(p, bp)))


def pixel_chunks(n: int, c: int, p: int, bp: int, bc: int) -> tuple[int, int]:
    """(chunks, pixels per chunk) of one image's p pixels for split_of's program count, each chunk a whole
    number of BLOCK_P tiles (so the chunk count can come out below split_of's)."""
    split = split_of(n, c, p, bp, bc)
    if split <= 1:
        return 1, max(p, 1)
    chunk = triton.cdiv(triton.cdiv(p, split), bp) * bp
    return triton.cdiv(p, chunk), chunk


class TritonGlobalAvgPool(Tactic):
    """GlobalAveragePool / spatial ReduceMean (keepdims) over any input strides, optionally split over pixels."""

    id = "cuda.triton_global_avgpool"
    devices = ("cuda",)
    priority = 20
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return node.op_type in ("GlobalAveragePool", "ReduceMean") and spatial_axes_ok(node)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{"TILE": 2048, "split": 1, "num_warps": 4},
                {"TILE": 2048, "split": 0, "num_warps": 4},
                {"TILE": 4096, "split": 0, "num_warps": 8}]

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        """The split configuration's float32 partial sums: at most N x MAX_SPLIT x C (less when N alone
        gives enough programs)."""
        if not config.get("split") or not out_shape or len(out_shape) != 4:
            return 0
        n, c = int(out_shape[0]), int(out_shape[1])
        return 0 if n >= TARGET_PROGRAMS else 4 * n * c * min(MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, max(n, 1)))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        cfg = dict(config)
        tile, split_ok, warps = int(cfg["TILE"]), bool(cfg.get("split")), int(cfg.get("num_warps", 4))
        axes = node.input(1)

        def k_global_avg(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            n, c, h, w = (int(d) for d in x.shape)
            if out is not None:
                check_out(out, (n, c, 1, 1), node)
            p = h * w
            bp, bc = _tile(x, tile)
            if p + bp > _I32:
                ref = lookup(node.op_type, node.domain).compute(node, x, *([] if axes is None else [axes.const]))
                return ref if out is None else out.copy_(ref)
            y = out if out is not None else torch.empty((n, c, 1, 1), dtype=x.dtype, device=x.device)
            if not (n and c):
                return y
            cb = triton.cdiv(c, bc)
            split, chunk = pixel_chunks(n, c, p, bp, bc) if split_ok else (1, max(p, 1))
            flat = h == 1 or x.stride(2) == w * x.stride(3)
            consts = dict(FLAT=flat, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
            if split == 1:
                launch(_spatial_sum_kernel, (n * cb, 1),
                       [x, y, c, p, w, cb, chunk, *_strides(x), y.stride(0), 0, y.stride(1)],
                       dict(FINAL=True, **consts))
                return y
            ws = torch.empty((n, split, c), dtype=torch.float32, device=x.device)
            launch(_spatial_sum_kernel, (n * cb, split),
                   [x, ws, c, p, w, cb, chunk, *_strides(x), split * c, c, 1], dict(FINAL=False, **consts))
            bc2 = min(256, _p2(c))
            launch(_split_mean_kernel, (n, triton.cdiv(c, bc2)), [ws, y, c, p, split, y.stride(0), y.stride(1)],
                   dict(BLOCK_C=bc2, num_warps=4))
            return y
        return Kernel(k_global_avg, prepacked=frozenset({1}) if axes is not None else frozenset())


register_tactic(TritonGlobalAvgPool())
