"""1x1 stride-1 convolutions as one oneDNN matmul over the pixels, storing into any channel slice.

A channels-last [N, C, H, W] tensor whose pixels are evenly spaced is a [N*H*W, C] matrix with row
stride = its pixel stride; so is a channel slice of a Concat's output. The layer is that matrix times
the [C, K] weights (reordered once), with bias, residual add and activation as post-ops, written into
the destination matrix, whatever its row stride (oneDNN's GEMM kernel takes leading dimensions). With
``strided_out`` it is the 1x1 producer through which a Concat is elided on the CPU; with two
destinations (a value feeding two Concats) the second receives a copy of the first.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, const_f32, is_f32
from kiln.backends.cpu.dnnl import ELTWISE, ChannelsLast, MatMul, library, require_library
from kiln.backends.tactic import Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor


def pixel_rows(t: Tensor) -> int | None:
    """The row stride of `t` [N, C, H, W] seen as a [N*H*W, C] matrix (contiguous channels, evenly spaced
    pixels), or None."""
    sn, sc, sh, sw = t.stride()
    n, _, h, w = t.shape
    if sc != 1 or (h > 1 and sh != w * sw) or (n > 1 and sn != h * w * sw):
        return None
    return sw


class MatMulConvTactic(CpuTactic):
    """Conv / FusedConv with a 1x1 kernel, stride 1, no pads or groups, float32, as one oneDNN matmul."""

    id = "cpu.conv_matmul"
    priority = 8  # below the direct oneDNN convolution: chosen by timing or to elide a Concat
    writes_out = 2
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        x, wt = node.input(0), const_f32(node.input(1))
        if library() is None or not is_f32(x) or x.type.rank != 4 or wt is None:  # type: ignore[union-attr]
            return False
        if wt.dim() != 4 or tuple(wt.shape[2:]) != (1, 1) or int(node.attr("group", 1)) != 1:
            return False
        if any(int(s) != 1 for s in node.attr("strides", None) or [1, 1]) or any(
                int(p) for p in node.attr("pads", None) or [0] * 4):
            return False
        if (node.attr("auto_pad", "NOTSET") or "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            return False
        b = node.input(2)
        if (b is not None and const_f32(b) is None) or len(node.outputs) != 1 or not is_f32(node.outputs[0]):
            return False
        if node.op_type == "FusedConv":
            z = node.input(3)
            if act_attrs(node)[0] not in ("", *ELTWISE) or (z is not None and not is_f32(z)):
                return False
        return True

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Kernel:
        lib = require_library(node, self.id)
        w = node.inputs[1].const.float()  # type: ignore[union-attr]
        k_out = int(w.shape[0])
        wm = w.reshape(k_out, -1).t().contiguous()  # [C, K]
        b_v = node.input(2)
        bias = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        prims: dict[tuple[int, ...], MatMul] = {}
        x_cl, z_cl = ChannelsLast(lib), ChannelsLast(lib)
        c_in = int(w.shape[1])

        def matrix(t: Tensor, rows: int, cols: int, ld: int) -> Tensor:
            return t.as_strided((rows, cols), (ld, 1))

        def k_mm(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                 out: Tensor | tuple[Tensor, ...] | None = None) -> Tensor:
            ldx = pixel_rows(x)
            if ldx is None:
                x = x_cl(x)
                ldx = c_in
            n, _, h, wd = (int(s) for s in x.shape)
            shape, pixels = (n, k_out, h, wd), n * h * wd
            outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
            y = outs[0] if outs else torch.empty(shape, memory_format=torch.channels_last)
            ldy = pixel_rows(y)
            if tuple(y.shape) != shape or ldy is None:
                raise KilnError(f"'{node.name}' takes a destination of shape {list(shape)} with contiguous channels "
                                f"and evenly spaced pixels, got {list(y.shape)} with strides {list(y.stride())}")
            ldz = 0
            if z is not None:
                ldz = pixel_rows(z) or 0
                if not ldz:
                    z = z_cl(z)
                    ldz = k_out
            key = (pixels, ldx, ldy, ldz)
            prim = prims.get(key)
            xm, ym = matrix(x, pixels, c_in, ldx), matrix(y, pixels, k_out, ldy)
            zm = None if z is None else matrix(z, pixels, k_out, ldz)
            if prim is None:
                prim = prims[key] = MatMul(lib, xm, wm, ym, bias, zm, act, alpha, beta, act_first)
            prim.run(xm, ym) if zm is None else prim.run(xm, ym, zm)
            for extra in outs[1:]:
                extra.copy_(y)
            return y
        k_mm.prepacked = frozenset({1, 2})  # type: ignore[attr-defined]  # W, B live inside the kernel
        return k_mm


register_tactic(MatMulConvTactic())
