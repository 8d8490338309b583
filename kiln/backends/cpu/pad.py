"""Pad with constant amounts on the CPU: one aten call per padded axis, its gather indices made once per input shape.

The op's reference (kiln.ops.shape.pad_tensor) builds the reflect / edge / wrap indices of every padded axis with a
handful of torch ops at every call (an audio front end's reflect pad of 576 samples: 27 us, several times the
copy). Here the crop of negative amounts is a view, each padded axis one ``index_select`` over indices made when a
shape is first seen, and constant mode one ``constant_pad_nd``; the result lands in the layer's destination when
it is given. The reference still defines the values: the indices are its own (`pad_index`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.backends.cpu.common import CpuTactic
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.shape import pad_amounts, pad_index

Tensor = torch.Tensor
_MODES = ("constant", "reflect", "edge", "wrap")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _amounts(node: Node) -> tuple[list[int], list[int], Any] | None:
    """(begins, ends, fill) of a Pad whose amounts (and fill and axes) are constants, else None."""
    x = node.input(0)
    if x is None or x.type.rank is None or len(node.outputs) != 1:
        return None
    consts = [None if v is None else v.const for v in node.inputs[1:4]]
    if node.opset >= 11 and any(v is not None and c is None for v, c in zip(node.inputs[1:4], consts)):
        return None
    consts += [None] * (3 - len(consts))
    try:
        return pad_amounts(node, x.type.rank, consts[0], consts[1], consts[2])
    except (ValueError, TypeError, IndexError):
        return None


class CpuPadTactic(CpuTactic):
    """Pad with constant amounts: cropping views, cached gather indices, aten's constant pad (see module doc)."""

    id = "cpu.pad"
    priority = 10
    writes_out = 1
    ops = (("", "Pad"), ("ai.onnx", "Pad"))

    def accepts(self, node: Node) -> bool:
        mode = node.attr("mode", "constant")
        got = _amounts(node)
        if mode not in _MODES or got is None:
            return False
        fill = got[2]
        # constant mode through constant_pad_nd, which takes a Python number: floats only, a fill that is one
        return mode != "constant" or (node.inputs[0].type.dtype is not None and node.inputs[0].type.dtype.is_float
                                      and (fill is None or isinstance(fill, (int, float))
                                           or (isinstance(fill, Tensor) and fill.numel() == 1)))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        got = _amounts(node)
        assert got is not None, f"{self.id} does not support node {node.name}"
        begins, ends, fill = got
        mode = node.attr("mode", "constant")
        value = 0.0 if fill is None else float(fill.reshape(()).item()) if isinstance(fill, Tensor) else float(fill)
        crop = tuple(slice(max(-b, 0), None if e >= 0 else e) for b, e in zip(begins, ends))
        grow = [(a, max(b, 0), max(e, 0)) for a, (b, e) in enumerate(zip(begins, ends)) if b > 0 or e > 0]
        flat = [v for b, e in reversed(list(zip(begins, ends))) for v in (b, e)]  # F.pad's order: last axis first
        made: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}

        def indices(shape: tuple[int, ...]) -> list[tuple[int, Tensor]]:
            got_ = made.get(shape)
            if got_ is None:
                got_ = []
                for a, b, e in grow:
                    if shape[a] == 0:
                        raise KilnError(f"'{node.name}': {mode} padding of an empty axis {a}")
                    got_.append((a, pad_index(shape[a], b, e, mode, torch.device("cpu"))))
                made[shape] = got_
            return got_

        def gather_into(x: Tensor, out: Tensor | None) -> tuple[Tensor, int, Tensor] | None:
            """(x's cropped view, the padded axis, its indices) where one gather writes straight into `out`
            (one padded axis, a contiguous destination of the result's shape and dtype), else None."""
            if mode == "constant" or out is None or not out.is_contiguous() or out.dtype != x.dtype:
                return None
            view = x[crop]
            steps = indices(tuple(view.shape))
            if len(steps) != 1:
                return None
            a, idx = steps[0]
            want = list(view.shape)
            want[a] = idx.numel()
            return (view, a, idx) if list(out.shape) == want else None

        def k_pad(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            if x.dim() != len(begins):
                raise KilnError(f"'{node.name}': Pad of a rank-{len(begins)} input got rank {x.dim()}")
            direct = gather_into(x, out)
            if direct is not None:
                view, a, idx = direct
                return torch.index_select(view, a, idx, out=out)  # straight into the destination
            if mode == "constant":
                if x.dtype not in _FLOATS:
                    raise KilnError(f"'{node.name}': constant Pad of {x.dtype} on cpu.pad")
                y = F.pad(x, flat, value=value)
            else:
                y = x[crop]
                for a, idx in indices(tuple(y.shape)):
                    y = torch.index_select(y, a, idx)
            if out is None:
                return y
            if out.shape != y.shape or out.dtype != y.dtype:
                raise KilnError(f"'{node.name}': Pad writes {y.dtype} {list(y.shape)}, got a destination "
                                f"{out.dtype} {list(out.shape)}")
            out.copy_(y)
            return out

        def bind(args: Any, out: Any) -> Any:
            """The runtime's repeated call on the same tensors: the view and indices fixed, one aten call left."""
            x = args[0]
            if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() != len(begins):
                return None
            direct = gather_into(x, out)
            if direct is None:
                return None
            view, a, idx = direct
            select = torch.index_select
            return lambda: select(view, a, idx, out=out)
        return Kernel(k_pad, writes_out=1, prepacked=frozenset({1, 2, 3}), out_format="like_input", bind=bind)


register_tactic(CpuPadTactic())
