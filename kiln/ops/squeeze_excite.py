"""SEGate (domain "kiln"): the gate of a squeeze-and-excite block as one layer (made by
kiln.passes.squeeze_excite).

``SEGate(X, W1, B1, W2, B2) -> G``::

    m = mean of X over H, W                      X: [N, C, H, W]  (H = W = 1: X is already pooled)
    h = reduce_activation(W1 @ m + B1)           W1: [R, C], B1: [R]
    G = gate_activation(W2 @ h + B2)             W2: [O, R], B2: [O];  G: [N, O, 1, 1]

The two matrix-vector products are an SE block's two 1x1 convolutions on the pooled [N, C, 1, 1] tensor
(conv_reduce, conv_expand); the mean is its global average pool where the pass absorbed one. The mean,
both products and the activations are computed in float32 (float64 for float64 inputs) and G is rounded
once to X's type, as the CPU and CUDA kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.activations import activate
from kiln.ops.attrs import REQUIRED, Attr, read
from kiln.ops.conv import require_float
from kiln.ops.registry import OpDef, register, require

Tensor = torch.Tensor

REDUCE_ACTIVATIONS = ("", "Relu", "SiLU", "HardSwish")
"""Activations of conv_reduce that SEGate takes ("": none)."""
GATE_ACTIVATIONS = ("Sigmoid", "HardSigmoid")
"""Activations of conv_expand that SEGate takes (the gate)."""


def accumulation_type(dtype: torch.dtype) -> torch.dtype:
    """The type SEGate computes in for inputs of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@register
class SEGate(OpDef):
    """Global mean over H, W, then act1(W1 @ m + B1), then act2(W2 @ h + B2): a squeeze-excite gate."""

    op_type = "SEGate"
    domain = "kiln"
    arity = (5, 5)  # X, W1, B1, W2, B2
    out_arity = (1, 1)
    attributes = {
        "reduce_activation": Attr("str", "", choices=REDUCE_ACTIVATIONS),
        "reduce_alpha": Attr("float", 0.0),
        "reduce_beta": Attr("float", 0.0),
        "gate_activation": Attr("str", REQUIRED, choices=GATE_ACTIVATIONS),
        "gate_alpha": Attr("float", 0.0),
        "gate_beta": Attr("float", 0.0),
    }

    def check(self, node: Node) -> None:
        if str(read(node, "gate_activation")) not in GATE_ACTIVATIONS:
            raise UnsupportedOpError(f"node '{node.name}': SEGate gate_activation must be one of {GATE_ACTIVATIONS}")

    def compute(self, node: Node, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        require_float(node, x, w1, b1, w2, b2)
        if x.dim() != 4 or w1.dim() != 2 or w2.dim() != 2 or b1.dim() != 1 or b2.dim() != 1:
            raise UnsupportedOpError(f"node '{node.name}': SEGate takes X [N, C, H, W], W1 [R, C], B1 [R], "
                                     f"W2 [O, R], B2 [O]")
        r, o = w1.shape[0], w2.shape[0]
        require(x.shape[1] == w1.shape[1], lambda: f"node '{node.name}': SEGate X has {x.shape[1]} channels, "
                                                    f"W1 takes {w1.shape[1]}")
        require(b1.shape[0] == r and w2.shape[1] == r and b2.shape[0] == o,
                lambda: f"node '{node.name}': SEGate weights of shapes {list(w1.shape)}, {list(b1.shape)}, "
                        f"{list(w2.shape)}, {list(b2.shape)} do not chain")
        acc = accumulation_type(x.dtype)
        m = x.to(acc).mean((2, 3))
        h = activate(F.linear(m, w1.to(acc), b1.to(acc)), str(read(node, "reduce_activation")),
                     float(read(node, "reduce_alpha")), float(read(node, "reduce_beta")))
        g = activate(F.linear(h, w2.to(acc), b2.to(acc)), str(read(node, "gate_activation")),
                     float(read(node, "gate_alpha")), float(read(node, "gate_beta")))
        return g.to(x.dtype).reshape(x.shape[0], o, 1, 1)
