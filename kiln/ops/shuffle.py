"""ChannelShuffle (domain "kiln"): ShuffleNet's channel shuffle as one layer (made by
kiln.passes.recognise.RecogniseChannelShuffle).

``ChannelShuffle(X) -> Y`` with attribute ``groups`` = g::

    Y = X.reshape(N, g, C/g, H, W).transpose(1, 2).reshape(N, C, H, W)     X, Y: [N, C, H, W], C divisible by g

that is Y[:, i*g + j] = X[:, j*(C/g) + i] for i < C/g, j < g: exact data movement, any element type.
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
    arity = (1, 1)
    out_arity = (1, 1)
    attributes = {"groups": Attr("int", REQUIRED, min=1)}

    def compute(self, node: Node, x: Tensor) -> Tensor:
        g = int(read(node, "groups"))
        if x.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': ChannelShuffle takes X [N, C, H, W], not rank {x.dim()}")
        n, c, h, w = x.shape
        require(c % g == 0, lambda: f"node '{node.name}': ChannelShuffle of {c} channels in {g} groups")
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """Y has X's type; a static C must be divisible by groups."""
        x = types[0] if types else None
        if x is None:
            return [TensorType(None, None)]
        if x.shape is not None:
            if len(x.shape) != 4:
                raise ValueError(f"ChannelShuffle takes a rank-4 X, not rank {len(x.shape)}")
            c, g = x.shape[1], int(read(node, "groups"))
            if isinstance(c, int) and c % g:
                raise ValueError(f"ChannelShuffle of {c} channels in {g} groups")
        return [TensorType(x.dtype, x.shape)]
