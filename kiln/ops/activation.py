"""Activation functions and the softmax family (Softmax, LogSoftmax, Hardmax).

Float16/bfloat16 inputs are evaluated in float32 and rounded back. Before opset 13 the
softmax family coerces its input to 2D ([prod(shape[:axis]), prod(shape[axis:])]) and
normalizes over the second dimension; from opset 13 it works along `axis` (default -1).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.elementwise import FLOATS, HALF, INTS, SINTS, UINTS, float_fn, from_i64, require, to_i64
from kiln.ops.registry import OpDef, norm_axis, register, simple_op

Tensor = torch.Tensor


def _float_act(name: str, fn: Callable[[Node, Tensor], Tensor], opsets: tuple[int, int] = (1, 28)) -> None:
    def compute(node: Node, x: Tensor) -> Tensor:
        require(node, x, FLOATS, "float types")
        return float_fn(lambda t: fn(node, t))(x)
    simple_op(name, compute, opsets=opsets)


def _relu(node: Node, x: Tensor) -> Tensor:
    require(node, x, FLOATS | SINTS)
    return torch.relu(x)


simple_op("Relu", _relu)

_float_act("LeakyRelu", lambda n, x: F.leaky_relu(x, n.attr("alpha", 0.01)))
_float_act("Elu", lambda n, x: F.elu(x, n.attr("alpha", 1.0)))
_float_act("Selu", lambda n, x: n.attr("gamma", 1.05070102214813232421875)
           * F.elu(x, n.attr("alpha", 1.67326319217681884765625)))
_float_act("Celu", lambda n, x: torch.celu(x, n.attr("alpha", 1.0)), (12, 28))
_float_act("HardSigmoid", lambda n, x: torch.clamp(n.attr("alpha", 0.2) * x + n.attr("beta", 0.5), 0.0, 1.0))
_float_act("HardSwish", lambda n, x: F.hardswish(x), (14, 28))
_float_act("Mish", lambda n, x: F.mish(x), (18, 28))
_float_act("Softplus", lambda n, x: F.softplus(x))
_float_act("Softsign", lambda n, x: F.softsign(x))
_float_act("ThresholdedRelu", lambda n, x: torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x)), (10, 28))
_float_act("Sigmoid", lambda n, x: torch.sigmoid(x))
_float_act("Tanh", lambda n, x: torch.tanh(x))
_float_act("Swish", lambda n, x: x * torch.sigmoid(n.attr("alpha", 1.0) * x), (24, 28))


class Gelu(OpDef):
    op_type = "Gelu"
    opsets = (20, 28)

    def check(self, node: Node) -> None:
        if node.attr("approximate", "none") not in ("none", "tanh"):
            raise UnsupportedOpError(f"node '{node.name}': Gelu approximate must be 'none' or 'tanh', "
                                     f"got {node.attr('approximate')!r}")

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require(node, x, FLOATS, "float types")
        self.check(node)
        return float_fn(lambda t: F.gelu(t, approximate=node.attr("approximate", "none")))(x)


register(Gelu)


def _prelu(node: Node, x: Tensor, slope: Tensor) -> Tensor:
    """A 1-D slope that does not broadcast is aligned with the only dim of x of its length."""
    require(node, x, FLOATS | SINTS | UINTS)
    if x.dtype in UINTS:
        return x.clone()
    n = slope.numel()
    if slope.dim() == 1 and x.dim() > 1 and n not in (1, x.shape[-1]) and list(x.shape).count(n) == 1:
        slope = slope.reshape([n if d == n else 1 for d in x.shape])
    return torch.where(x < 0, x * slope, x)


simple_op("PRelu", _prelu)


def _shrink(node: Node, x: Tensor) -> Tensor:
    require(node, x, FLOATS | INTS)
    bias, lambd = float(node.attr("bias", 0.0)), float(node.attr("lambd", 0.5))
    if x.is_floating_point():
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
    xf = x.to(torch.float64)
    lo, hi = xf < -lambd, xf > lambd
    if bias.is_integer():
        x64, b = to_i64(x), int(bias)
        y = torch.where(lo, x64 + b, torch.where(hi, x64 - b, torch.zeros_like(x64)))
    else:
        y = torch.where(lo, xf + bias, torch.where(hi, xf - bias, torch.zeros_like(xf))).to(torch.int64)
    return from_i64(y, x.dtype)


simple_op("Shrink", _shrink, opsets=(9, 28))


def _swiglu(node: Node, a: Tensor, b: Tensor) -> Tensor:
    require(node, a, FLOATS, "float types")
    alpha = node.attr("alpha", 1.0)
    return float_fn(lambda t: t * torch.sigmoid(alpha * t))(a) * b


simple_op("SwiGLU", _swiglu, opsets=(28, 28))


# ---- softmax family -----------------------------------------------------------------------------

def _softmax_like(name: str, fn: Callable[[Tensor, int], Tensor]) -> None:
    def compute(node: Node, x: Tensor) -> Tensor:
        require(node, x, FLOATS, "float types")
        if node.opset >= 13:
            return fn(x, norm_axis(node.attr("axis", -1), x.dim())) if x.dim() else fn(x.reshape(1), 0).reshape(())
        axis = norm_axis(node.attr("axis", 1), x.dim())
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, math.prod(x.shape[axis:])), 1).reshape(x.shape)
    simple_op(name, compute)


def _softmax(x: Tensor, dim: int) -> Tensor:
    return torch.softmax(x, dim, dtype=torch.float32 if x.dtype in HALF else None).to(x.dtype)


def _log_softmax(x: Tensor, dim: int) -> Tensor:
    return torch.log_softmax(x, dim, dtype=torch.float32 if x.dtype in HALF else None).to(x.dtype)


def _hardmax(x: Tensor, dim: int) -> Tensor:
    if x.numel() == 0:
        return x.clone()
    idx = torch.argmax(x, dim, keepdim=True)
    return torch.zeros_like(x).scatter_(dim, idx, 1.0)


_softmax_like("Softmax", _softmax)
_softmax_like("LogSoftmax", _log_softmax)
_softmax_like("Hardmax", _hardmax)
