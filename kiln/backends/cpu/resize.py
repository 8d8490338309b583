"""Nearest-neighbour upsampling by integer (power-of-two) factors on the CPU, channels-last friendly.

For an integer factor s, ONNX nearest Resize with ``asymmetric``/``floor`` or with ``half_pixel`` /
``pytorch_half_pixel`` and a round-to-nearest mode reads source pixel ``floor(o / s)``, which is what
aten's ``upsample_nearest2d`` computes exactly when 1/s is exact in float32 (powers of two). The
factors are read once at kernel build; an inference is one aten call that keeps the input's
memory format, or, given a destination (a channel slice of a Concat's output), one strided copy of
the input broadcast over each s_h x s_w block straight into it. Everything else stays with the
reference tactic.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, static_shape
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor
_FLOOR_EXACT = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
                ("pytorch_half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil")}


def _const_list(node: Node, i: int) -> list[float] | None:
    v = node.input(i)
    if v is None or v.const is None or v.const.numel() == 0:
        return None
    return [float(a) for a in v.const.reshape(-1).tolist()]


def upsample_factors(node: Node) -> tuple[int, int] | None:
    """(s_h, s_w) of a 4-D nearest Resize that reads floor(o / s) with power-of-two s, else None."""
    if node.opset < 11 or node.attr("mode", "nearest") != "nearest" or node.attr("axes") is not None:
        return None
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    if (ctm, node.attr("nearest_mode", "round_prefer_floor")) not in _FLOOR_EXACT:
        return None
    scales, sizes = _const_list(node, 2), _const_list(node, 3)
    if sizes is not None:
        shape = static_shape(node.inputs[0])
        if shape is None or len(sizes) != 4:
            return None
        scales = [o / i for o, i in zip(sizes, shape)]
    if scales is None or len(scales) != 4 or scales[0] != 1.0 or scales[1] != 1.0:
        return None
    out: list[int] = []
    for s in scales[2:]:
        k = int(s)
        if k != s or k < 1 or k & (k - 1):
            return None
        out.append(k)
    return out[0], out[1]


class CpuResizeTactic(CpuTactic):
    """Nearest Resize by power-of-two integer factors through aten's upsample_nearest2d."""

    id = "cpu.resize_nearest"

    torch_dispatch = True
    priority = 10
    writes_out = 1
    ops = (("", "Resize"), ("ai.onnx", "Resize"))

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if x is None or x.type.dtype not in (DType.FLOAT32, DType.BFLOAT16) or len(node.outputs) != 1:
            return False  # aten's kernel copies float32 and bfloat16 values alike
        return x.type.rank == 4 and node.outputs[0].type.dtype == x.type.dtype and upsample_factors(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        sh, sw = upsample_factors(node)  # type: ignore[misc]
        up = getattr(torch.ops.aten.upsample_nearest2d.default, "_op", torch.ops.aten.upsample_nearest2d.default)
        fh, fw = float(sh), float(sw)

        def k_up(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            if out is None:
                return up(x, [x.shape[2] * sh, x.shape[3] * sw], fh, fw)
            n, c, h, w = x.shape
            if tuple(out.shape) != (n, c, h * sh, w * sw):
                raise KilnError(f"'{node.name}' takes a destination of shape {[n, c, h * sh, w * sw]}, "
                                f"got {list(out.shape)}")
            blocks = out.unflatten(2, (h, sh)).unflatten(4, (w, sw))  # [n, c, h, sh, w, sw], a view
            blocks.copy_(x[:, :, :, None, :, None].expand(n, c, h, sh, w, sw))
            return out
        return Kernel(k_up, prepacked=frozenset({1, 2, 3}))  # roi, scales, sizes baked in


register_tactic(CpuResizeTactic())
