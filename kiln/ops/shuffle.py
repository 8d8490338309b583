"""ChannelShuffle (domain "kiln"): ShuffleNet's channel shuffle as one layer (made by
kiln.passes.recognise.RecogniseChannelShuffle).

``ChannelShuffle(X) -> Y`` with attribute ``groups`` = g::

    Y = X.reshape(N, g, C/g, H, W).transpose(1, 2).reshape(N, C, H, W)     X, Y: [N, C, H, W], C divisible by g

that is Y[:, i*g + j] = X[:, j*(C/g) + i] for i < C/g, j < g: exact data movement, any element type.
``ChannelShuffle(X_0, ..., X_{g-1})`` (g inputs of C/g channels each, same N, H, W) shuffles their channel
concatenation: Y[:, i*g + j] = X_j[:, i] (ShuffleNet's Concat of its two branches, read only by the shuffle,
becomes this form on the CPU: the Concat's copy is gone).
Exporters write it as Reshape -> Transpose(perm [0, 2, 1, 3, 4]) -> Reshape; the last Reshape cannot merge the
permuted dims of a view and copies, and on channels-last activations a second copy follows. As one op it
is one copy into the layout the next layer wants (`shuffle_into`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.attrs import REQUIRED, Attr, read
from kiln.ops.registry import OpDef, register, require

Tensor = torch.Tensor


def shuffle_into(x: Tensor, groups: int, out: Tensor) -> Tensor:
    """The channel shuffle of x [N, C, H, W] stored into out (any strides, x's shape and dtype) as one copy;
    returns out. Splitting one dim is always a view, so neither side is copied on its own."""
    c = x.shape[1]
    out.unflatten(1, (c // groups, groups)).copy_(x.unflatten(1, (groups, c // groups)).transpose(1, 2))
    return out


@register
class ChannelShuffle(OpDef):
    """Y[:, i*g + j] = X[:, j*(C/g) + i]: the channels of g groups interleaved (ShuffleNet)."""

    op_type = "ChannelShuffle"
    domain = "kiln"
    arity = (1, 64)
    out_arity = (1, 1)
    attributes = {"groups": Attr("int", REQUIRED, min=1)}

    def check(self, node: Node) -> None:
        n, g = len(node.inputs), int(read(node, "groups"))
        require(n in (1, g), lambda: f"node '{node.name}': ChannelShuffle of {g} groups takes 1 or {g} inputs, "
                                     f"not {n}")

    def compute(self, node: Node, *xs: Tensor) -> Tensor:
        g = int(read(node, "groups"))
        if len(xs) > 1:
            require(len(xs) == g and all(t.dim() == 4 and t.shape == xs[0].shape for t in xs),
                    lambda: f"node '{node.name}': ChannelShuffle of {g} groups takes {g} inputs of one shape, got "
                            f"{[list(t.shape) for t in xs]}")
            return torch.stack(list(xs), dim=2).flatten(1, 2)
        x = xs[0]
        if x.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': ChannelShuffle takes X [N, C, H, W], not rank {x.dim()}")
        n, c, h, w = x.shape
        require(c % g == 0, lambda: f"node '{node.name}': ChannelShuffle of {c} channels in {g} groups")
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """Y has X's type (with g inputs: their dims, g times the channels); a static C must be divisible by
        groups."""
        x = types[0] if types else None
        if x is None:
            return [TensorType(None, None)]
        if len(types) > 1:
            if any(t is None or t.shape != x.shape for t in types) or x.shape is None or len(x.shape) != 4:
                return [TensorType(x.dtype, None)]
            c = x.shape[1]
            return [TensorType(x.dtype, (x.shape[0], c * len(types) if isinstance(c, int) else None, *x.shape[2:]))]
        if x.shape is not None:
            if len(x.shape) != 4:
                raise ValueError(f"ChannelShuffle takes a rank-4 X, not rank {len(x.shape)}")
            c, g = x.shape[1], int(read(node, "groups"))
            if isinstance(c, int) and c % g:
                raise ValueError(f"ChannelShuffle of {c} channels in {g} groups")
        return [TensorType(x.dtype, x.shape)]
