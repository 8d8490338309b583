"""Sequence and optional ops. A sequence value is a python list of tensors; an empty optional is None."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, ints, norm_axis, register

Tensor = torch.Tensor


def _position(node: Node, seq: list[Tensor], pos: Tensor | None, default: int, insert: bool = False) -> int:
    n = len(seq)
    p = default if pos is None else ints(pos)[0]
    hi = n if insert else n - 1
    if not -n <= p <= hi:
        raise KilnError(f"node '{node.name}': {node.op_type} position {p} is out of range for a sequence "
                        f"of length {n}")
    return p + n if p < 0 else p


def _device(*values: Any) -> torch.device | None:
    """Device of the first tensor found among values (tensors or lists of tensors)."""
    for v in values:
        if isinstance(v, Tensor):
            return v.device
        if isinstance(v, list) and v:
            return v[0].device
    return None


@register
class SequenceConstruct(OpDef):
    op_type = "SequenceConstruct"
    opsets = (11, 28)

    def compute(self, node: Node, *xs: Tensor) -> list[Tensor]:
        return list(xs)


@register
class SequenceEmpty(OpDef):
    op_type = "SequenceEmpty"
    opsets = (11, 28)

    def compute(self, node: Node) -> list[Tensor]:
        return []


@register
class SequenceAt(OpDef):
    op_type = "SequenceAt"
    opsets = (11, 28)

    def compute(self, node: Node, seq: list[Tensor], pos: Tensor) -> Tensor:
        return seq[_position(node, seq, pos, 0)]


@register
class SequenceInsert(OpDef):
    op_type = "SequenceInsert"
    opsets = (11, 28)

    def compute(self, node: Node, seq: list[Tensor], x: Tensor, pos: Tensor | None = None) -> list[Tensor]:
        out = list(seq)
        out.insert(_position(node, seq, pos, len(seq), insert=True), x)
        return out


@register
class SequenceErase(OpDef):
    op_type = "SequenceErase"
    opsets = (11, 28)

    def compute(self, node: Node, seq: list[Tensor], pos: Tensor | None = None) -> list[Tensor]:
        out = list(seq)
        del out[_position(node, seq, pos, -1)]
        return out


@register
class SequenceLength(OpDef):
    op_type = "SequenceLength"
    opsets = (11, 28)

    def compute(self, node: Node, seq: list[Tensor]) -> Tensor:
        return torch.tensor(len(seq), dtype=torch.int64, device=_device(seq))

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return [TensorType(DType.INT64, ())]


@register
class SplitToSequence(OpDef):
    op_type = "SplitToSequence"
    opsets = (11, 28)
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, split: Tensor | None = None) -> list[Tensor]:
        axis = norm_axis(node.attr("axis", 0), x.dim())
        if split is None:
            parts = list(torch.split(x, 1, dim=axis))
            return [p.squeeze(axis) for p in parts] if not node.attr("keepdims", 1) else parts
        sizes = ints(split)
        if split.dim() == 0:
            return list(torch.split(x, sizes[0], dim=axis))
        return list(torch.split(x, sizes, dim=axis))


@register
class ConcatFromSequence(OpDef):
    op_type = "ConcatFromSequence"
    opsets = (11, 28)

    def compute(self, node: Node, seq: list[Tensor]) -> Tensor:
        axis = node.attr("axis")
        if node.attr("new_axis", 0):
            return torch.stack(seq, dim=norm_axis(axis, seq[0].dim() + 1))
        return torch.cat(seq, dim=norm_axis(axis, seq[0].dim()))


@register
class Optional(OpDef):
    op_type = "Optional"
    opsets = (15, 28)

    def compute(self, node: Node, x: Any = None) -> Any:
        return x


@register
class OptionalHasElement(OpDef):
    op_type = "OptionalHasElement"
    opsets = (15, 28)

    def compute(self, node: Node, x: Any = None) -> Tensor:
        return torch.tensor(x is not None, dtype=torch.bool, device=_device(x))

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return [TensorType(DType.BOOL, ())]


@register
class OptionalGetElement(OpDef):
    op_type = "OptionalGetElement"
    opsets = (15, 28)

    def compute(self, node: Node, x: Any = None) -> Any:
        if x is None:
            raise KilnError(f"node '{node.name}': OptionalGetElement on an empty optional")
        return x
