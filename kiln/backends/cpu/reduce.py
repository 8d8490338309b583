"""Reductions over one short axis on the CPU: the slices combined elementwise, in whatever layout they come.

A spectrogram's power is `ReduceSumSquare(stft, axis=real/imag)`, a reduction over 2 values; torch's reduction
kernels walk such an axis element by element through the tensor's strides (2.7 ms for [1, 2, 201, 3000] read from
a channels-last convolution's output, 0.6 ms even contiguous), where two squares and an add of the two slices take
0.12 ms. Here ReduceSum / ReduceSumSquare / ReduceMean / ReduceMax / ReduceMin over exactly one axis of static
extent 2 to MAX_EXTENT (float32) are that: one elementwise op per slice, the first into a fresh output. The values
are the reference's up to float32 summation order.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, is_f32
from kiln.backends.tactic import Built, register_tactic
from kiln.ir.graph import Node
from kiln.ops.reduce import reduce_axes

Tensor = torch.Tensor
MAX_EXTENT = 16
"""Longest axis reduced slice by slice: beyond it the elementwise passes cost more than a reduction kernel."""
_OPS = ("ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceMax", "ReduceMin")


def _axis(node: Node) -> tuple[int, int] | None:
    """(the one reduced axis, its static extent) of a float32 reduction this tactic takes, else None."""
    x = node.input(0)
    if not is_f32(x) or x.type.shape is None or len(node.outputs) != 1 or not is_f32(node.outputs[0]):  # type: ignore[union-attr]
        return None
    axes_v = node.input(1)
    if axes_v is not None and axes_v.const is None:
        return None
    try:
        dims = reduce_axes(node, torch.empty([1] * len(x.type.shape), device="meta"),  # type: ignore[union-attr]
                           None if axes_v is None else axes_v.const)
    except Exception:
        return None
    if len(dims) != 1:
        return None
    n = x.type.shape[dims[0]]  # type: ignore[union-attr,index]
    return (dims[0], n) if isinstance(n, int) and 2 <= n <= MAX_EXTENT else None


class CpuShortReduceTactic(CpuTactic):
    """A reduction over one short static axis as elementwise ops over its slices (see module doc)."""

    id = "cpu.reduce_short"
    priority = 10
    ops = tuple(("", op) for op in _OPS)

    def accepts(self, node: Node) -> bool:
        return node.op_type in _OPS and _axis(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        got = _axis(node)
        assert got is not None, f"{self.id} does not support node {node.name}"
        axis, n = got
        op, keep = node.op_type, bool(node.attr("keepdims", 1))
        pick = {"ReduceMax": torch.maximum, "ReduceMin": torch.minimum}.get(op)

        def k_reduce(x: Tensor, *_: Any) -> Tensor:
            s = x.unbind(axis)
            if pick is not None:  # NaN propagates as in the reference (torch.maximum / minimum keep NaN)
                y = pick(s[0], s[1])
                for t in s[2:]:
                    pick(y, t, out=y)
            elif op == "ReduceSumSquare":
                y = torch.square(s[0])
                for t in s[1:]:
                    y.addcmul_(t, t)
            else:
                y = torch.add(s[0], s[1])
                for t in s[2:]:
                    y.add_(t)
                if op == "ReduceMean":
                    y.div_(n)
            return y.unsqueeze(axis) if keep else y
        return k_reduce


register_tactic(CpuShortReduceTactic())
