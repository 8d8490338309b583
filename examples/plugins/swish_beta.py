"""SwishBeta, a Kiln plugin from scratch: y = x * sigmoid(beta * x), with a tactic beside the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.backends.tactic import Tactic
from kiln.errors import UnsupportedOpError
from kiln.ir.types import TensorType
from kiln.ops.attrs import Attr, read
from kiln.ops.registry import OpDef
from kiln.plugins import plugin


class SwishBetaSilu(Tactic):
    """x * sigmoid(beta * x) = silu(beta * x) / beta, through torch's SiLU kernel (CPU and CUDA)."""

    id = "example.swish_beta_silu"
    devices = ("cpu", "cuda")
    priority = 1  # above the reference tactic (-100): the choice when the build does not time candidates

    def supports(self, node, ctx):
        return read(node, "beta") > 0  # beta = 0 is the reference's (y = x / 2)

    def build(self, node, config, device):
        beta = read(node, "beta")
        return lambda x: F.silu(x * beta).div_(beta)


@plugin
class SwishBeta(OpDef):
    op_type = "SwishBeta"
    domain = "example.ops"
    version = 1
    attributes = {"beta": Attr("float", 1.0, min=0.0, max=1e4)}
    arity = out_arity = (1, 1)  # one input, one output
    tactics = (SwishBetaSilu,)

    def infer(self, node, types, consts):
        x = types[0]  # y has x's type; None (unknown) stays unknown
        return [x if x is not None else TensorType(None, None)]

    def compute(self, node, x):
        if not x.is_floating_point():
            raise UnsupportedOpError(f"node '{node.name}': SwishBeta takes a float tensor, got {x.dtype}")
        return x * torch.sigmoid(read(node, "beta") * x)
