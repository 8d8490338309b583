"""Shared pieces of the CPU tactics: the CPU tactic base, value checks and activation epilogues.

Tactics take float32 layers; the oneDNN ones (``cpu.conv_dnnl``, ``cpu.conv1d_dnnl``, ``cpu.linear_dnnl``,
``cpu.pool_dnnl``) also bfloat16 ones (``bf16_layer``, ``float_conv_weight(..., bf16=True)``), which a bf16
build makes where the CPU has BF16 instructions (kiln.backends.cpu.features).

oneDNN (through torch's ``torch.ops.mkldnn`` kernels) fuses a few activations into convolutions and
linear layers as post-ops; ``onednn_unary`` names them. Any other activation runs as an in-place torch
op on the kernel's own freshly computed output (``inplace_activation``), which never allocates.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from kiln.backends.tactic import Tactic, TacticContext
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.activations import TABLE as ACTIVATION_TABLE, Epilogue

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
    """Base of the CPU tactics: runs on the CPU only; `accepts` takes float32 layers (and, for the oneDNN and
    torch-based tactics, bfloat16 ones)."""

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


def const_float(v: Value | None, bf16: bool = False) -> Tensor | None:
    """The payload of a float32 constant value (or, with `bf16`, a bfloat16 one) as float32, else None."""
    if v is None or v.const is None:
        return None
    if v.const.dtype == torch.float32 or (bf16 and v.const.dtype == torch.bfloat16):
        return v.const.float()
    return None


def bf16_layer(node: Node, residual: int | None = None) -> bool:
    """A layer that oneDNN's bfloat16 primitives take (kiln.backends.cpu.dnnl_float.LAYER_DTYPES): a bfloat16 input
    (input 0) and one output, float32 or bfloat16, and the residual input `residual` (if present) float32 or
    bfloat16. A float32 layer is not one."""
    x = node.input(0)
    if x is None or x.type.dtype != DType.BFLOAT16 or len(node.outputs) != 1:
        return False
    z = None if residual is None else node.input(residual)
    return all(v.type.dtype in (DType.FLOAT32, DType.BFLOAT16) for v in (node.outputs[0], z) if v is not None)


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
    """(activation, alpha, beta) of a fused node (kiln.ops.activations.Epilogue)."""
    ep = Epilogue.of(node)
    return ep.activation, ep.alpha, ep.beta


def onednn_unary(act: str, alpha: float, beta: float) -> tuple[str, list[Any], str] | None:
    """oneDNN post-op (attr, scalars, algorithm) computing the activation, or None if there is none."""
    a = ACTIVATION_TABLE.get(act)
    return None if a is None or a.onednn is None else a.onednn.args(alpha, beta)


def inplace_activation(act: str, alpha: float, beta: float) -> InplaceFn | None:
    """fn(y) applying the activation to y in place (y must be owned by the caller); None for no activation."""
    a = ACTIVATION_TABLE.get(act)
    if a is None:
        raise ValueError(f"unknown fused activation {act!r}")
    if not act:
        return None
    fn, inplace = a.fn, a.inplace
    if inplace is None:  # no in-place torch op (Gelu): computed, then copied back
        return lambda y: y.copy_(fn(y, alpha, beta))
    return lambda y: inplace(y, alpha, beta)


def ints_at_least(v: Any, n: int, low: int) -> list[int] | None:
    """v as a list of n ints, each >= low; None for anything else (an attribute edited in a plan)."""
    try:
        out = [int(i) for i in v]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(i >= low for i in out) else None


def dims_agree(a: Value | None, b: Value | None) -> bool:
    """The ranks of a and b agree where both are known, and so does every dim known as an int in both."""
    sa, sb = (None if v is None else v.type.shape for v in (a, b))
    if sa is None or sb is None:
        return True
    return len(sa) == len(sb) and all(not (isinstance(p, int) and isinstance(q, int)) or p == q
                                      for p, q in zip(sa, sb))


def layer_dtypes(node: Node, residual: int | None = None) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(input, output, residual) torch dtypes of a float layer (`residual`: the residual's input index; a
    layer without one reports its output's dtype there)."""
    x, y = node.inputs[0], node.outputs[0]
    z = None if residual is None else node.input(residual)
    dt = [torch.float32 if v is None or v.type.dtype is None else v.type.dtype.torch for v in (x, y, y if z is None else z)]
    return dt[0], dt[1], dt[2]


def float_bias(v: Value | None, n: int, bf16: bool = False) -> bool:
    """No bias, or a constant 1-D float32 (with `bf16`: or bfloat16) bias of exactly n values (native kernels
    read n of them)."""
    if v is None:
        return True
    b = const_float(v, bf16)
    return b is not None and b.dim() == 1 and b.numel() == n


def float_conv_weight(node: Node, acts: Sequence[str], rank: int = 4, bf16: bool = False) -> Tensor | None:
    """The constant weight (as float32) of a Conv / FusedConv whose input (of `rank`: 4 for 2-D convolutions,
    3 for 1-D ones), weight, residual and only output have that rank, whose bias, residual and output are
    float32 and whose fused activation is one of `acts`; None for any other node. With `bf16`, also a
    bfloat16 layer (`bf16_layer`: bfloat16 input, float32 or bfloat16 output and residual) whose weight and
    bias are bfloat16 or float32 constants.

    Native kernels rely on everything checked here: the weight [K, C/group, kh, kw] ([K, C/group, k])
    non-empty and its input channels matching the input's (where the input's channel dim is static; the
    kernels check it per call otherwise), a bias of exactly K values, a residual of the output's shape
    where known, and positive strides, dilations and kernel sizes, non-negative pads and a known auto_pad
    mode.
    """
    low = bf16 and bf16_layer(node, 3 if node.op_type == "FusedConv" else None)
    x, wt, b = node.input(0), const_float(node.input(1), low), node.input(2)
    y = node.outputs[0] if node.outputs else None
    nd = rank - 2
    if not (low or is_f32(x)) or x.type.rank != rank or wt is None or wt.dim() != rank or wt.numel() == 0:  # type: ignore[union-attr]
        return None
    if len(node.outputs) != 1 or not (low or is_f32(y)) or y.type.rank not in (None, rank):  # type: ignore[union-attr]
        return None
    k, cg = int(wt.shape[0]), int(wt.shape[1])
    group = ints_at_least([node.attr("group", 1)], 1, 1)
    if group is None or k % group[0] or not float_bias(b, k, low):
        return None
    c_in = x.type.shape[1]  # type: ignore[union-attr,index]
    if isinstance(c_in, int) and c_in != cg * group[0]:
        return None
    k_out = y.type.shape[1] if y.type.shape is not None else None  # type: ignore[union-attr]
    if isinstance(k_out, int) and k_out != k:
        return None
    if (ints_at_least(node.attr("strides", None) or [1] * nd, nd, 1) is None
            or ints_at_least(node.attr("dilations", None) or [1] * nd, nd, 1) is None
            or ints_at_least(node.attr("pads", None) or [0] * (2 * nd), 2 * nd, 0) is None):
        return None
    ks = node.attr("kernel_shape", None)
    if ks is not None and ints_at_least(ks, nd, 1) != [int(s) for s in wt.shape[2:]]:
        return None
    if (node.attr("auto_pad", "NOTSET") or "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    if node.op_type == "FusedConv":
        z = node.input(3)
        if act_attrs(node)[0] not in acts or (z is not None and (not (low or is_f32(z)) or z.type.rank != rank
                                                                 or not dims_agree(z, y))):
            return None
    return wt
