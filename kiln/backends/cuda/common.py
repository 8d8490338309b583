"""Helpers shared by the CUDA tactics: conv geometry, epilogue attributes, weight prepacking, layouts."""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.kernel import Kernel
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.layout import canonical
from kiln.ops.activations import TABLE as ACTIVATION_TABLE, Epilogue
from kiln.ops.conv import ConvGeometry

Tensor = torch.Tensor

ACT_CODES: dict[str, int] = {a.name: a.code for a in ACTIVATION_TABLE.values()}
"""Activation name (FusedConv/FusedGemm `activation`) -> the code the Triton epilogue switches on
(from the one table, kiln.ops.activations)."""

FLOAT_DTYPES = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)
CONV_OPS = ("Conv", "FusedConv")


def epilogue_of(node: Node) -> Epilogue:
    """The fused epilogue of a FusedConv/FusedGemm (plain Conv/MatMul: none)."""
    return Epilogue.of(node)


def lt_gelu_ok(node: Node) -> bool:
    """Whether cuBLASLt's bias + GELU epilogue (torch._addmm_activation, tanh form) computes this FusedGemm's or
    FusedConv's epilogue: GELU, a constant bias, no residual. The erf form is accepted in FP16/BF16 only, where
    the two differ by at most 4.7e-4 (at x = 2.70, GELU = 2.69), under half of the FP16 rounding step there
    (1.95e-3): the trade reduced-precision builds already make for speed."""
    if node.op_type not in ("FusedGemm", "FusedConv") or node.input(3) is not None or node.input(2) is None:
        return False
    act = epilogue_of(node).activation
    w = node.input(1)
    half = w is not None and w.type.dtype in (DType.FLOAT16, DType.BFLOAT16)
    return act == "GeluTanh" or (act == "Gelu" and half)


def addmm_act(b: Tensor, a: Tensor, w: Tensor, gelu: bool) -> Tensor:
    """b + a @ w, then ReLU or GELU (tanh form), the activation fused into the GEMM by cuBLASLt on the GPU
    (torch._addmm_activation; torch's CPU version of it uses the erf GELU, so elsewhere the same math is
    spelled out)."""
    if a.is_cuda or not gelu:
        return torch._addmm_activation(b, a, w, use_gelu=gelu)
    return torch.nn.functional.gelu(torch.addmm(b, a, w), approximate="tanh")


def is_conv(node: Node) -> bool:
    return node.op_type in CONV_OPS and node.domain in ("", "ai.onnx", "kiln")


def input_dtype(node: Node, i: int) -> DType | None:
    v = node.input(i)
    return None if v is None else v.type.dtype


def float_io(node: Node, cast_ok: bool = False) -> bool:
    """All present tensor inputs and the first output are float32/16/bf16 and agree with the weight
    (input 1; X when it has none). With `cast_ok` X and the output may have any float type (a kernel
    that casts on load and store: folded Casts, see kiln.passes.cast)."""
    w = input_dtype(node, 1) or input_dtype(node, 0)
    if w not in FLOAT_DTYPES:
        return False
    for k, v in enumerate([node.outputs[0], *node.inputs]):
        if v is None:
            continue
        dt = v.type.dtype
        if dt != w and not (cast_ok and k in (0, 1) and dt in FLOAT_DTYPES):
            return False
    return True


Out = Tensor | tuple[Tensor, ...] | None
"""A kernel's `out=`: nothing, one destination, or several (see Tactic.writes_out)."""


def out_list(out: Out) -> tuple[Tensor, ...]:
    return () if out is None else out if isinstance(out, tuple) else (out,)


def nhwc_outs(out: Out) -> bool:
    """Every destination has channel stride 1 (what the NHWC kernels store through)."""
    return all(o.stride(1) == 1 or o.shape[1] == 1 for o in out_list(out))


def converting(kernel: Any, node: Node) -> Any:
    """`kernel` wrapped to take X of another float type than the weight and to return the node's output
    type (folded Casts, kiln.passes.cast) with separate conversions: for library calls (cuDNN, cuBLAS)
    that take one element type; the Triton kernels convert on load and store instead."""
    w = input_dtype(node, 1)
    x_t, out_t = input_dtype(node, 0), node.outputs[0].type.dtype
    if w is None or (x_t == w and out_t == w):
        return kernel
    wt, ot = w.torch, out_t.torch  # type: ignore[union-attr]

    def k_convert(x: Tensor, *rest: Any) -> Tensor:
        return kernel(x.to(wt), *rest).to(ot)
    return k_convert


def check_out(out: Out, shape: tuple[int, ...], node: Node | str) -> None:
    """Raise unless every destination has the output's shape (a plan whose types disagree with the run)."""
    for o in out_list(out):
        if tuple(o.shape) != tuple(shape):
            name = node if isinstance(node, str) else node.name
            raise KilnError(f"'{name}' would write an output of shape {list(shape)} into a destination of shape "
                            f"{list(o.shape)} (the plan's shapes disagree with this run)")


def write_out(y: Tensor, out: Out) -> Tensor:
    """y, or y copied into the caller's destinations (for kernel paths that cannot write there directly)."""
    outs = out_list(out)
    for o in outs:
        o.copy_(y)
    return outs[0] if outs else y


def conv_static_ok(node: Node) -> bool:
    """A 2-D Conv/FusedConv whose weight is a build-time constant and whose pads do not need input sizes."""
    if not is_conv(node):
        return False
    w = node.input(1)
    if w is None or not w.is_const or w.const.dim() != 4:  # type: ignore[union-attr]
        return False
    b = node.input(2)
    if b is not None and not b.is_const:
        return False
    if node.op_type == "Conv" and (node.attr("auto_pad", "NOTSET") or "NOTSET") not in ("NOTSET", "VALID"):
        return False
    x = node.input(0)
    return x is not None and (x.type.rank in (None, 4)) and ConvGeometry.of(node) is not None


def conv_geometry(node: Node) -> ConvGeometry:
    """Geometry of a 2-D Conv/FusedConv accepted by `conv_static_ok` (kiln.ops.conv.ConvGeometry)."""
    geo = ConvGeometry.of(node)
    if geo is None:
        raise KilnError(f"'{node.name}': the convolution's geometry cannot be resolved")
    return geo


def const_on(node: Node, i: int, device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
    """Input i (a build-time constant) on `device`, optionally converted; None when absent."""
    v = node.input(i)
    if v is None:
        return None
    assert v.const is not None, f"input {i} of {node.name} is not a constant"
    t = v.const
    return t.to(device=device, dtype=dtype or t.dtype)


def channels_last(x: Tensor) -> Tensor:
    """x in channels_last memory format with canonical strides (no copy when it already is channels-last: a
    view with the strides cuDNN and cuBLAS take their fast paths for, kiln.ir.layout)."""
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return canonical(x, channels_last=True) if x.dim() == 4 else x


def apply_epilogue_(y: Tensor, z: Tensor | None, ep: Epilogue) -> Tensor:
    """Residual add and activation on y (owned by the caller, modified in place where torch allows)."""
    if z is not None and not ep.act_before_add:
        y.add_(z)
    y = activate_(y, ep.activation, ep.alpha, ep.beta)
    if z is not None and ep.act_before_add:
        y.add_(z)
    return y


def activate_(y: Tensor, name: str, alpha: float, beta: float) -> Tensor:
    """In-place activation by FusedConv/FusedGemm name (half types use torch's float32 op math); where torch
    has no in-place form (Gelu), a new tensor."""
    act = ACTIVATION_TABLE.get(name)
    if act is None:
        raise ValueError(f"unknown fused activation {name!r}")
    return act.fn(y, alpha, beta) if act.inplace is None else act.inplace(y, alpha, beta)


def prepacked(kernel: Any, indices: tuple[int, ...]) -> Kernel:
    """A kernel holding its own copies of the given constant inputs (the runtime skips them)."""
    return Kernel(kernel, prepacked=frozenset(indices))


def tf32_precision(allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 else "ieee"
