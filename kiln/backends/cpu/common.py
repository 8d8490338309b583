"""Shared pieces of the CPU tactics: the CPU tactic base, value checks and activation epilogues.

oneDNN (through torch's ``torch.ops.mkldnn`` kernels) fuses a few activations into convolutions and
linear layers as post-ops; ``onednn_unary`` names them. Any other activation runs as an in-place torch
op on the kernel's own freshly computed output (``inplace_activation``), which never allocates.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from kiln.backends.tactic import Tactic, TacticContext
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value

Tensor = torch.Tensor
InplaceFn = Callable[[Tensor], Tensor]


def onednn_available() -> bool:
    """True when torch was built with oneDNN and exposes the fused CPU kernels used here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018
        torch.ops.mkldnn._reorder_convolution_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_ONEDNN = onednn_available()


class CpuTactic(Tactic):
    """Base of the CPU tactics: runs on the CPU only and declines anything but float32 tensors."""

    devices = ("cpu",)
    ops: tuple[tuple[str, str], ...] = ()  # (domain, op_type) pairs the tactic implements
    needs_onednn = False

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if ctx.device.type != "cpu" or (node.domain, node.op_type) not in self.ops:
            return False
        if self.needs_onednn and not _ONEDNN:
            return False
        return self.accepts(node)

    def accepts(self, node: Node) -> bool:
        """Op-specific support check (the device and op type are already known to match)."""
        raise NotImplementedError


def is_f32(v: Value | None) -> bool:
    """A value whose element type is known to be float32."""
    return v is not None and v.type.dtype == DType.FLOAT32


def const_f32(v: Value | None) -> Tensor | None:
    """The payload of a float32 constant value, else None."""
    if v is None or v.const is None or v.const.dtype != torch.float32:
        return None
    return v.const


def static_shape(v: Value | None) -> tuple[int, ...] | None:
    """The shape of v when every dim is a known int."""
    if v is None or not v.type.is_static:
        return None
    return tuple(int(d) for d in v.type.shape)  # type: ignore[union-attr,arg-type]


def shape_hint(v: Value, batch: int = 1) -> list[int] | None:
    """v's shape with a symbolic leading (batch) dim replaced by `batch`; None if other dims are unknown."""
    shape = v.type.shape
    if shape is None:
        return None
    dims = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def act_attrs(node: Node) -> tuple[str, float, float]:
    """(activation, alpha, beta) of a fused node."""
    return str(node.attr("activation", "") or ""), float(node.attr("alpha", 0.0)), float(node.attr("beta", 0.0))


def onednn_unary(act: str, alpha: float, beta: float) -> tuple[str, list[Any], str] | None:
    """oneDNN post-op (attr, scalars, algorithm) computing the activation, or None if there is none."""
    if act == "":
        return "none", [], ""
    if act == "Relu":
        return "relu", [], ""
    if act == "LeakyRelu":
        return "leaky_relu", [alpha], ""
    if act == "Clip":
        return "hardtanh", [alpha, beta], ""
    if act == "Sigmoid":
        return "sigmoid", [], ""
    if act == "Tanh":
        return "tanh", [], ""
    if act == "SiLU":
        return "swish", [], ""
    if act == "HardSwish":
        return "hardswish", [], ""
    if act == "Gelu":
        return "gelu", [], "none"
    if act == "GeluTanh":
        return "gelu", [], "tanh"
    if act == "HardSigmoid" and abs(alpha - 1.0 / 6.0) < 1e-7 and beta == 0.5:
        return "hardsigmoid", [], ""
    return None


def inplace_activation(act: str, alpha: float, beta: float) -> InplaceFn | None:
    """fn(y) applying the activation to y in place (y must be owned by the caller); None for no activation."""
    if act == "":
        return None
    if act == "Relu":
        return torch.relu_
    if act == "LeakyRelu":
        return lambda y: F.leaky_relu_(y, alpha)
    if act == "Clip":
        return lambda y: y.clamp_(alpha, beta)
    if act == "Sigmoid":
        return torch.sigmoid_
    if act == "Tanh":
        return torch.tanh_
    if act == "SiLU":
        return lambda y: F.silu(y, inplace=True)
    if act == "HardSwish":
        return lambda y: F.hardswish(y, inplace=True)
    if act == "HardSigmoid":
        return lambda y: y.mul_(alpha).add_(beta).clamp_(0.0, 1.0)
    if act == "Mish":
        return lambda y: F.mish(y, inplace=True)
    if act == "Gelu":
        return lambda y: y.copy_(F.gelu(y))
    if act == "GeluTanh":
        return lambda y: y.copy_(F.gelu(y, approximate="tanh"))
    raise ValueError(f"unknown fused activation {act!r}")


def float_conv_weight(node: Node, acts: Sequence[str]) -> Tensor | None:
    """The constant 4-D float32 weight of a Conv / FusedConv whose input (rank 4), bias, residual and only
    output are float32 and whose fused activation is one of `acts`; None for any other node."""
    x, wt, b = node.input(0), const_f32(node.input(1)), node.input(2)
    if not is_f32(x) or x.type.rank != 4 or wt is None or wt.dim() != 4:  # type: ignore[union-attr]
        return None
    if (b is not None and const_f32(b) is None) or len(node.outputs) != 1 or not is_f32(node.outputs[0]):
        return None
    if node.op_type == "FusedConv":
        z = node.input(3)
        if act_attrs(node)[0] not in acts or (z is not None and not is_f32(z)):
            return None
    return wt
