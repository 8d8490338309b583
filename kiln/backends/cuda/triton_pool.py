"""Triton 2-D MaxPool and nearest Resize/Upsample over NHWC activations, writing into a given ``out=``.

Both kernels tile the output as (block of output pixels) x (block of channels), channels innermost,
so with a channel stride of 1 (channels_last, or a channel slice of a channels_last buffer) every
load and store is contiguous. Input and output are addressed through all four of their strides:
any layout is read without a copy, and the output may be a strided view (a slice of an elided
Concat's buffer). Pixel indices are int32 (a host check falls back to the reference past 2**31
output pixels); memory offsets are int64.

Nothing about the spatial size is baked into a kernel: MaxPool's window geometry (auto_pad, pads,
ceil_mode, via ``kiln.ops.pool.Window``) is resolved on the host per input size and cached. Resize's
source index of each output row/column is computed in the kernel in float64 with exactly the
operations of the reference (``kiln.ops.resize._source_coords`` / ``_nearest_index``), IEEE-rounded
like torch's, from per-axis scalars the host derives from the input size; no index tables, no
allocation besides the output, no host sync: CUDA-graph capturable.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import FLOAT_DTYPES, check_out
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.conv import MAX_WINDOW
from kiln.ops.pool import Window
from kiln.ops.registry import lookup, norm_axis
from kiln.ops.resize import _resize_params

Tensor = torch.Tensor
_I32 = 2**31 - 1
_GEOM = ["P", "H", "W", "OH", "OW"]


@triton.jit
def _pixels(P, OH, OW, BLOCK_P: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ow = offs % OW
    t = offs // OW
    oh = t % OH
    return offs < P, (t // OH).to(tl.int64), oh, ow


@triton.jit(do_not_specialize=[*_GEOM, "SH", "SW", "PH", "PW", "DH", "DW"])
def _maxpool2d_kernel(
    x_ptr, y_ptr, P, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LOW: tl.constexpr,
):
    p_mask, nb, oh, ow = _pixels(P, OH, OW, BLOCK_P)
    cs = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cs < C
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_row = nb * sxn
    x_col = cs[None, :] * sxc
    acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DH
        row_ok = p_mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + (x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + x_col,
                        mask=ok[:, None] & c_mask[None, :], other=LOW)
            acc = tl.maximum(acc, v.to(tl.float32))
    y_off = nb * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(y_ptr + y_off[:, None] + cs[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _source_index(o, n_in, s, aux, special, ident, CTM: tl.constexpr, NEAREST: tl.constexpr):
    """Source index along one axis, as the reference computes it (same float64 operations in order)."""
    y = o.to(tl.float64)
    if CTM == 0:  # asymmetric
        x = y / s
    elif CTM == 1:  # half_pixel
        x = (y + 0.5) / s - 0.5
    elif CTM == 2:  # pytorch_half_pixel (special: a single output sample)
        x = tl.where(special != 0, -0.5, (y + 0.5) / s - 0.5)
    elif CTM == 3:  # align_corners: s = out_f - 1, aux = in - 1
        x = tl.where(special != 0, 0.0, y * aux / s)
    else:  # tf_half_pixel_for_nn
        x = (y + 0.5) / s
    fl = tl.floor(x)
    if NEAREST == 0:  # round_prefer_floor
        idx = fl + tl.where(x - fl > 0.5, 1.0, 0.0)
    elif NEAREST == 1:  # round_prefer_ceil
        idx = fl + tl.where(x - fl >= 0.5, 1.0, 0.0)
    elif NEAREST == 2:
        idx = fl
    else:
        idx = tl.ceil(x)
    idx = tl.minimum(tl.maximum(idx, 0.0), (n_in - 1).to(tl.float64)).to(tl.int32)
    return tl.where(ident != 0, o, idx)


@triton.jit(do_not_specialize=[*_GEOM, "sp_h", "id_h", "sp_w", "id_w"])
def _resize_nearest2d_kernel(
    x_ptr, y_ptr, P, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    s_h: tl.float64, a_h: tl.float64, sp_h, id_h, s_w: tl.float64, a_w: tl.float64, sp_w, id_w,
    CTM: tl.constexpr, NEAREST_H: tl.constexpr, NEAREST_W: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p_mask, nb, oh, ow = _pixels(P, OH, OW, BLOCK_P)
    cs = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = p_mask[:, None] & (cs < C)[None, :]
    ih = _source_index(oh, H, s_h, a_h, sp_h, id_h, CTM, NEAREST_H).to(tl.int64)
    iw = _source_index(ow, W, s_w, a_w, sp_w, id_w, CTM, NEAREST_W).to(tl.int64)
    v = tl.load(x_ptr + (nb * sxn + ih * sxh + iw * sxw)[:, None] + cs[None, :] * sxc, mask=mask)
    y_off = nb * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(y_ptr + y_off[:, None] + cs[None, :] * syc, v, mask=mask)


# ---- shared host side ---------------------------------------------------------------------------

def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_LOWEST = {DType.INT8: -128.0, DType.UINT8: 0.0}
"""What a window's padded positions read in an 8-bit MaxPool (float types read -inf): the type's lowest value,
never above an element of the window (every window holds one), so the maximum is exact."""


def _float_4d(node: Node) -> bool:
    """Domain "" / ai.onnx, one output, a rank-4 float or 8-bit integer input (an INT8 plan's activations: max
    and nearest selection commute with quantization) and an output of the same type."""
    x = node.input(0)
    return (node.domain in ("", "ai.onnx") and len(node.outputs) == 1 and x is not None and x.type.rank == 4
            and (x.type.dtype in FLOAT_DTYPES or x.type.dtype in _LOWEST)
            and node.outputs[0].type.dtype == x.type.dtype)


def _tile_configs(node: Node) -> list[dict[str, Any]]:
    """(pixels x channels) tiles of 2048 and 4096 elements; the channel block fits C when C is known."""
    c = node.inputs[0].type.shape[1]  # type: ignore[union-attr, index]
    bc = min(128, _p2(c)) if isinstance(c, int) and c > 0 else 64
    return [{"BLOCK_P": max(1, 2048 // bc), "BLOCK_C": bc, "num_warps": 4},
            {"BLOCK_P": max(1, 4096 // bc), "BLOCK_C": bc, "num_warps": 8}]


def _strides(t: Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2), t.stride(3)]


def _run(node: Node, x: Tensor, out: Tensor | None, oh: int, ow: int, cfg: dict[str, Any],
         body: Callable[[Tensor, int, tuple[int, int]], None]) -> Tensor:
    """Allocate (or take) the output and launch `body(y, pixels, grid)`; the reference past int32 pixels."""
    n, c = int(x.shape[0]), int(x.shape[1])
    if out is not None:
        check_out(out, (n, c, oh, ow), node)
    pixels = n * oh * ow
    if pixels + cfg["BLOCK_P"] > _I32:
        ref = lookup(node.op_type, node.domain).compute(node, x, *[None if v is None else v.const
                                                                  for v in node.inputs[1:]])
        return ref.contiguous(memory_format=torch.channels_last) if out is None else out.copy_(ref)
    y = out if out is not None else torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device,
                                                 memory_format=torch.channels_last)
    if pixels and c:
        body(y, pixels, (triton.cdiv(pixels, cfg["BLOCK_P"]), triton.cdiv(c, cfg["BLOCK_C"])))
    return y


# ---- MaxPool ------------------------------------------------------------------------------------

MAX_UNROLLED_TAPS = 1024
"""Largest KH * KW the MaxPool kernel takes: its window loops are unrolled at compile time (static_range),
so a larger window (up to 32 x 32 fits) would make Triton compile for minutes; those stay with the reference."""


def _pool_attrs_ok(node: Node) -> bool:
    """kernel_shape of 2 sizes, strides / dilations of 2 and pads of 4 values (when given), each within
    [low, MAX_WINDOW]; a window of at most MAX_UNROLLED_TAPS taps; a known auto_pad; and where the input's
    spatial size is static, a window the reference accepts there (not larger than the padded input)."""
    ks = node.attr("kernel_shape", None)
    if not isinstance(ks, (list, tuple)) or len(ks) != 2:
        return False
    for name, v, n, low in (("kernel_shape", ks, 2, 1), ("strides", node.attr("strides", None), 2, 1),
                            ("dilations", node.attr("dilations", None), 2, 1), ("pads", node.attr("pads", None), 4, 0)):
        if v is None:
            continue
        try:
            vals = [operator.index(a) for a in v]
        except TypeError:
            return False
        if len(vals) != n or not all(low <= a <= MAX_WINDOW for a in vals):
            return False
    if int(ks[0]) * int(ks[1]) > MAX_UNROLLED_TAPS:
        return False
    if (node.attr("auto_pad", "NOTSET") or "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return False
    shape = node.inputs[0].type.shape  # type: ignore[union-attr]
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        try:
            Window(node, torch.empty((1, 1, *shape[2:]), device="meta"), ranks=(2,))
        except Exception:
            return False
    return True


class TritonMaxPool(Tactic):
    """2-D MaxPool (no Indices output) over any strides; geometry resolved per input size."""

    id = "cuda.triton_maxpool"
    devices = ("cuda",)
    priority = 20
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return node.op_type == "MaxPool" and _float_4d(node) and _pool_attrs_ok(node)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return _tile_configs(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        kh, kw = (int(k) for k in node.attr("kernel_shape"))
        geometry: dict[tuple[int, int], tuple[int, int, list[int]]] = {}
        cfg = dict(config)
        bp, bc, warps = cfg["BLOCK_P"], cfg["BLOCK_C"], cfg.get("num_warps", 4)
        low = _LOWEST.get(node.inputs[0].type.dtype, float("-inf"))  # type: ignore[union-attr]

        def kernel(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            h, w = int(x.shape[2]), int(x.shape[3])
            g = geometry.get((h, w))
            if g is None:
                win = Window(node, x, ranks=(2,))
                g = geometry[(h, w)] = (win.out[0], win.out[1],
                                        [*win.strides, *win.begin, *win.dilations])

            def body(y: Tensor, pixels: int, grid: tuple[int, int]) -> None:
                launch(_maxpool2d_kernel, grid, [x, y, pixels, x.shape[1], h, w, g[0], g[1],
                                                 *_strides(x), *_strides(y), *g[2]],
                       dict(KH=kh, KW=kw, BLOCK_P=bp, BLOCK_C=bc, LOW=low, num_warps=warps))
            return _run(node, x, out, g[0], g[1], cfg, body)
        return kernel


# ---- Resize / Upsample (nearest) ----------------------------------------------------------------

_CTM_CODES = {"asymmetric": 0, "half_pixel": 1, "pytorch_half_pixel": 2, "align_corners": 3,
              "tf_half_pixel_for_nn": 5}
"""half_pixel_symmetric stays with the reference: on an H100 one rounding-boundary case picked another
source pixel than the float64 reference (the interpreter agreed), so it is not claimed."""
_NEAREST_CODES = {"round_prefer_floor": 0, "round_prefer_ceil": 1, "floor": 2, "ceil": 3}


def _const(v: Value | None) -> list[float] | None:
    """Values of an optional constant input (None when absent or empty); raises when not a constant."""
    if v is None:
        return None
    if v.const is None:
        raise ValueError("runtime scales/sizes")
    return [float(a) for a in v.const.reshape(-1).tolist()] or None


def _resize_spec(node: Node) -> tuple[str, list[float] | None, list[int] | None, dict[str, Any]] | None:
    """(ctm, H/W scales or None, H/W sizes or None, params) of a supported nearest resize, else None."""
    if not _float_4d(node):
        return None
    if node.op_type == "Upsample" and 7 <= node.opset <= 9:
        try:
            scales = _const(node.input(1)) if node.opset >= 9 else [float(s) for s in node.attr("scales")]
        except (ValueError, TypeError):
            return None
        sizes, axes = None, [0, 1, 2, 3]
    elif node.op_type == "Resize" and node.opset >= 10:
        try:
            scales = _const(node.input(1 if node.opset < 11 else 2))
            sizes = _const(node.input(3)) if node.opset >= 11 else None
            axes = [norm_axis(int(a), 4) for a in node.attr("axes") or range(4)]
        except (ValueError, TypeError):
            return None
    else:
        return None
    p = _resize_params(node)
    if (p["mode"] != "nearest" or p["antialias"] or p["ctm"] not in _CTM_CODES
            or p["nearest_mode"] not in (*_NEAREST_CODES, "simple")):
        return None
    vals = sizes if sizes is not None else scales
    if vals is None or len(vals) != len(axes) or sorted(axes) != sorted(set(axes)) or not all(0 <= a < 4 for a in axes):
        return None
    full: dict[int, float] = dict(zip(axes, vals))
    if sizes is not None:
        if (node.attr("keep_aspect_ratio_policy", "stretch") or "stretch") != "stretch":
            return None
        shape = node.inputs[0].type.shape  # type: ignore[union-attr]
        if any(a in full and full[a] != shape[a] for a in (0, 1)):  # type: ignore[index]
            return None  # N or C resized, or not known to be kept
        return p["ctm"], None, [int(full.get(a, -1)) for a in (2, 3)], p
    if full.get(0, 1.0) != 1.0 or full.get(1, 1.0) != 1.0 or any(full.get(a, 1.0) <= 0 for a in (2, 3)):
        return None
    return p["ctm"], [full.get(2, 1.0), full.get(3, 1.0)], None, p


def _axis_args(ctm: str, n_in: int, n_out: int, scale: float) -> tuple[float, float, int, int]:
    """(s, aux, special, identity) of one axis for `_source_index`, computed as the reference does."""
    out_f = scale * n_in
    ident = int(math.isclose(scale, 1.0) and n_out == n_in)
    if ctm == "align_corners":
        return (1.0 if out_f == 1 else out_f - 1), float(n_in - 1), int(out_f == 1), ident
    return scale, 0.0, int(ctm == "pytorch_half_pixel" and out_f == 1), ident


class TritonResizeNearest(Tactic):
    """Nearest Resize / Upsample over H and W with constant scales or sizes; any input size at run time."""

    id = "cuda.triton_resize"
    devices = ("cuda",)
    priority = 20
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return node.op_type in ("Resize", "Upsample") and _resize_spec(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return _tile_configs(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        spec = _resize_spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        ctm, scales, sizes, p = spec
        simple = p["nearest_mode"] == "simple"  # legacy ops: ceil when downsampling, else floor (scales only)
        modes = [("ceil" if scales[i] < 1 else "floor") if simple else p["nearest_mode"]  # type: ignore[index]
                 for i in range(2)]
        cfg = dict(config)
        consts = dict(CTM=_CTM_CODES[ctm], NEAREST_H=_NEAREST_CODES[modes[0]], NEAREST_W=_NEAREST_CODES[modes[1]],
                      BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg.get("num_warps", 4))

        def kernel(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            h, w = int(x.shape[2]), int(x.shape[3])
            if sizes is not None:
                oh, ow = (h if sizes[0] < 0 else sizes[0]), (w if sizes[1] < 0 else sizes[1])
                sh, sw = oh / h, ow / w
            else:
                sh, sw = scales  # type: ignore[misc]
                oh, ow = int(sh * h), int(sw * w)

            def body(y: Tensor, pixels: int, grid: tuple[int, int]) -> None:
                launch(_resize_nearest2d_kernel, grid, [x, y, pixels, x.shape[1], h, w, oh, ow,
                                                        *_strides(x), *_strides(y),
                                                        *_axis_args(ctm, h, oh, sh), *_axis_args(ctm, w, ow, sw)],
                       consts)
            return _run(node, x, out, oh, ow, cfg, body)
        return Kernel(kernel, prepacked=frozenset({1, 2, 3}))  # roi, scales, sizes resolved at build


register_tactic(TritonMaxPool())
register_tactic(TritonResizeNearest())
