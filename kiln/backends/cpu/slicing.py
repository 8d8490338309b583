"""Slice with constant starts/ends/axes/steps as one prebuilt indexing key (a view, no copy); Concat
with its axis resolved at build time.

For positive steps ONNX Slice clamps starts and ends exactly like Python slices do (negative values
count from the end, out-of-range values clamp), so the whole node becomes ``x[key]`` with ``key`` a
tuple of ``slice`` objects built once at kernel build. Negative steps stay with the reference tactic.
Any element type: nothing is computed.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.tactic import Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor


def _ints(node: Node, i: int) -> list[int] | None:
    v = node.input(i)
    if v is None:
        return None
    if v.const is None:
        raise ValueError("runtime slice parameter")
    return [int(a) for a in v.const.reshape(-1).tolist()]


def slice_key(node: Node) -> tuple[slice, ...] | None:
    """The indexing key realising the node, or None when it is not a constant, positive-step Slice."""
    rank = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else None
    if rank is None:
        return None
    try:
        if node.opset < 10:
            starts, ends = [int(a) for a in node.attr("starts")], [int(a) for a in node.attr("ends")]
            axes, steps = node.attr("axes"), None
        else:
            starts, ends, axes, steps = _ints(node, 1), _ints(node, 2), _ints(node, 3), _ints(node, 4)
    except (ValueError, TypeError):
        return None
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = [int(a) for a in axes] if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts) or any(s <= 0 for s in steps):
        return None
    norm = [a + rank if a < 0 else a for a in axes]
    if any(not 0 <= a < rank for a in norm) or len(set(norm)) != len(norm):
        return None
    key = [slice(None)] * rank
    for a, s, e, st in zip(norm, starts, ends, steps):
        key[a] = slice(s, e, st)
    while key and key[-1] == slice(None):
        key.pop()
    return tuple(key)


class CpuSliceTactic(Tactic):
    """Constant-parameter Slice as a prebuilt view."""

    id = "cpu.slice_view"
    devices = ("cpu",)
    priority = 10

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (ctx.device.type == "cpu" and node.op_type == "Slice" and node.domain in ("", "ai.onnx")
                and len(node.outputs) == 1 and slice_key(node) is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Kernel:
        key = slice_key(node)

        def k_slice(x: Tensor, *_: Any) -> Tensor:
            return x[key]
        k_slice.prepacked = frozenset({1, 2, 3, 4})  # type: ignore[attr-defined]  # parameters baked in
        return k_slice


class CpuConcatTactic(Tactic):
    """Concat as one torch.cat with the axis normalized once (keeps channels-last inputs channels-last)."""

    id = "cpu.concat"
    devices = ("cpu",)
    priority = 10

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if ctx.device.type != "cpu" or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            return False
        rank = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else None
        axis = int(node.attr("axis", 1))
        return (rank is not None and -rank <= axis < rank and len(node.outputs) == 1
                and all(v is not None and v.kind == "tensor" for v in node.inputs))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Kernel:
        rank = int(node.inputs[0].type.rank)  # type: ignore[union-attr,arg-type]
        axis = int(node.attr("axis", 1)) % rank
        cat = torch.cat

        def k_cat(*xs: Tensor) -> Tensor:
            return cat(xs, axis)
        return k_cat


register_tactic(CpuSliceTactic())
register_tactic(CpuConcatTactic())
