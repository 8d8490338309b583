"""Integer layers made by the quantization passes (domain "kiln"): QConv, QGemm.

Both roads to INT8 end here (kiln.passes.quantize): a Q/DQ model's DequantizeLinear -> Conv/Gemm (+ bias,
activation, residual) -> QuantizeLinear, and a calibrated float model whose Q/DQ pairs the builder inserted.

* ``QConv(X, W, B?, Z?)``: X int8/uint8 (scale ``x_scale``, zero point ``x_zero_point``), W an int8 constant
  ``[K, C/group, KH, KW]`` with per-output-channel scales ``w_scales`` (one value: per tensor; zero point 0),
  B an optional float32 constant ``[K]``, Z an optional residual of the output's shape (float, or int8/uint8
  dequantized with ``z_scale`` / ``z_zero_point``). Window attributes as FusedConv's.
* ``QGemm(A, W, B?, Z?)``: the same for ``A [..., K] @ W^T`` with W ``[N, K]``.

Semantics (what every tactic computes)::

    acc = sum((X - x_zero_point) * W)                     exact integer (int32)
    v   = float32(acc) * float32(x_scale * w_scales[k]) + B[k]
    r   = (Z - z_zero_point) * z_scale   (integer Z)  or  Z
    v   = act(v + r)   or   act(v) + r   (act_before_add)
    y   = saturate(round_half_even(v * (1 / y_scale)) + y_zero_point)   (out_dtype INT8/UINT8), else v

With ``a_scale`` > 0 the layer's own result (after its activation when act_before_add) is requantized to
(a_scale, a_zero_point, a_dtype) and dequantized before the residual is added: the Q/DQ pair a Q/DQ model
places between a convolution and its residual Add, kept exactly when the Add is fused into the layer.

With power-of-two scales every step is exact in float32, so kernels are tested bit-exactly against this
reference; otherwise they agree within one quantization step (float32 rounding order).

FP8 is the same layer on float8 e4m3 elements (the element type is X's): X and W ``float8_e4m3fn``, zero points
0, a residual float or float8 (dequantized by ``z_scale``), ``out_dtype`` FLOAT8E4M3FN (17) for a quantized
output. The accumulator stays exact in float64 (products of two e4m3 values are multiples of 2**-18 below 2**18:
exact for reductions of fewer than 2**17 terms), and the output is quantized as ONNX's QuantizeLinear does for
float8: ``y = float8(v / y_scale)`` in float32, rounded to nearest even, saturated to +-448, NaN kept. (Not a
sibling op: that would repeat the shape rule, the epilogue and every pass's handling for one changed step.)
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Sequence
import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.activations import EPILOGUE, Epilogue, activate
from kiln.ops.attrs import Attr, read
from kiln.ops.conv import WINDOW, check_window_attrs, strides_dilations, torch_pad, window_ints
from kiln.ops.registry import OpDef, lookup, register

Tensor = torch.Tensor

INT8, UINT8, FLOAT, FLOAT16, FLOAT8E4M3FN = 3, 2, 1, 10, 17
QUANT_OUT = {INT8: torch.int8, UINT8: torch.uint8}
FLOAT_OUT = {FLOAT: torch.float32, FLOAT16: torch.float16}
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}

QUANT_ATTRS: dict[str, Attr] = {
    "x_scale": Attr("float", 1.0, min=0.0),
    "x_zero_point": Attr("int", 0, min=-128, max=255),
    "w_scales": Attr("floats", [1.0], min=0.0),
    "y_scale": Attr("float", 1.0, min=0.0),
    "y_zero_point": Attr("int", 0, min=-128, max=255),
    "z_scale": Attr("float", 1.0, min=0.0),
    "z_zero_point": Attr("int", 0, min=-128, max=255),
    "out_dtype": Attr("int", INT8, choices=(INT8, UINT8, FLOAT, FLOAT16, FLOAT8E4M3FN)),
    # the layer's own result requantized before the residual add (a Q/DQ pair the model puts there): 0 = none
    "a_scale": Attr("float", 0.0, min=0.0),
    "a_zero_point": Attr("int", 0, min=-128, max=255),
    "a_dtype": Attr("int", INT8, choices=(INT8, UINT8)),
}
"""Quantization attributes of an integer layer (see the module doc)."""


@dataclass(frozen=True)
class QuantSpec:
    """An integer layer's quantization attributes, read once (tactics and the reference share it)."""

    x_scale: float
    x_zero_point: int
    w_scales: tuple[float, ...]
    y_scale: float
    y_zero_point: int
    z_scale: float
    z_zero_point: int
    out_dtype: int
    a_scale: float = 0.0
    a_zero_point: int = 0
    a_dtype: int = INT8

    @classmethod
    def of(cls, node: Node) -> "QuantSpec":
        return cls(float(read(node, "x_scale")), int(read(node, "x_zero_point")),
                   tuple(float(s) for s in read(node, "w_scales")), float(read(node, "y_scale")),
                   int(read(node, "y_zero_point")), float(read(node, "z_scale")), int(read(node, "z_zero_point")),
                   int(read(node, "out_dtype")), float(read(node, "a_scale")), int(read(node, "a_zero_point")),
                   int(read(node, "a_dtype")))

    @property
    def quantized_out(self) -> bool:
        return self.out_dtype in QUANT_OUT

    @property
    def fp8_out(self) -> bool:
        return self.out_dtype == FLOAT8E4M3FN

    @property
    def out_torch(self) -> torch.dtype:
        return FP8 if self.fp8_out else (QUANT_OUT.get(self.out_dtype) or FLOAT_OUT[self.out_dtype])

    def multipliers(self, n: int) -> Tensor:
        """float32 x_scale * w_scales[k] for the n output channels (computed in float64, rounded once)."""
        w = torch.tensor(self.w_scales, dtype=torch.float64)
        if w.numel() == 1:
            w = w.expand(n)
        return (w * self.x_scale).to(torch.float32)


def _check_fp8(node: Node, q: QuantSpec, w: Tensor, z: Tensor | None) -> None:
    """An FP8 layer (float8 X): float8 weights, every zero point 0, a float8 residual only as such."""
    if w.dtype != FP8:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} with a float8 input needs float8_e4m3fn "
                                    f"weights, got {w.dtype}")
    for name in ("x_zero_point", "y_zero_point", "z_zero_point"):
        if getattr(q, name) != 0:
            raise UnsupportedOpError(f"node '{node.name}': {name} must be 0 in an FP8 layer, got {getattr(q, name)}")
    if z is not None and z.dtype in _RANGE:
        raise UnsupportedDTypeError(f"node '{node.name}': an FP8 layer takes a float or float8 residual, got {z.dtype}")


def _check_quant(node: Node, x: Tensor, w: Tensor, b: Tensor | None, z: Tensor | None, n_out: int) -> QuantSpec:
    q = QuantSpec.of(node)
    if x.dtype == FP8:
        _check_fp8(node, q, w, z)
    elif x.dtype not in _RANGE:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} needs an int8/uint8/float8_e4m3fn input, "
                                    f"got {x.dtype}")
    elif not _RANGE[x.dtype][0] <= q.x_zero_point <= _RANGE[x.dtype][1]:
        raise UnsupportedOpError(f"node '{node.name}': x_zero_point {q.x_zero_point} is outside {x.dtype}'s range")
    elif w.dtype != torch.int8:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} needs int8 weights, got {w.dtype}")
    if len(q.w_scales) not in (1, n_out):
        raise UnsupportedOpError(f"node '{node.name}': {len(q.w_scales)} weight scales for {n_out} output channels")
    if b is not None and (b.dtype != torch.float32 or b.numel() != n_out):
        raise UnsupportedOpError(f"node '{node.name}': the bias must hold {n_out} float32 values")
    if z is not None and z.dtype not in _RANGE and not z.is_floating_point():
        raise UnsupportedDTypeError(f"node '{node.name}': residual of type {z.dtype}")
    if z is not None and z.is_floating_point() and z.dtype.itemsize == 1 and z.dtype != FP8:
        raise UnsupportedDTypeError(f"node '{node.name}': residual of type {z.dtype} (float8 means e4m3fn here)")
    if q.quantized_out:
        lo, hi = _RANGE[q.out_torch]
        if not lo <= q.y_zero_point <= hi:
            raise UnsupportedOpError(f"node '{node.name}': y_zero_point {q.y_zero_point} is outside the output range")
    return q


def requantize(node: Node, acc: Tensor, q: QuantSpec, b: Tensor | None, z: Tensor | None, channel_dim: int) -> Tensor:
    """The epilogue of the module doc on an exact integer accumulator (float64 holding integers)."""
    n = acc.shape[channel_dim]
    shape = [1] * acc.dim()
    shape[channel_dim] = n
    v = acc.to(torch.float32) * _multipliers_on(q, n, acc.device).reshape(shape)
    if b is not None:
        v = v + b.to(acc.device).reshape(shape)
    r = None
    if z is not None:
        r = (z.to(torch.float32) - q.z_zero_point) * q.z_scale if z.dtype in _RANGE or z.dtype == FP8 \
            else z.to(torch.float32)
    ep = Epilogue.of(node)
    if ep.act_before_add:
        v = activate(v, ep.activation, ep.alpha, ep.beta)
    if q.a_scale > 0:  # the model's Q/DQ pair between the layer and its residual add
        lo, hi = _RANGE[QUANT_OUT[q.a_dtype]]
        v = (_round_to(v, q.a_scale, q.a_zero_point, lo, hi) - q.a_zero_point) * q.a_scale
    if r is not None:
        v = v + r
    if not ep.act_before_add:
        v = activate(v, ep.activation, ep.alpha, ep.beta)
    if q.fp8_out:
        return quantize_fp8(v, q.y_scale)
    if not q.quantized_out:
        return v.to(q.out_torch)
    lo, hi = _RANGE[q.out_torch]
    return _round_to(v, q.y_scale, q.y_zero_point, lo, hi).to(q.out_torch)


# Device constants made once and shared read-only: a copy from the host cannot run while a CUDA graph is
# captured, and the runtime's warm-up runs before the capture make them first.
@functools.lru_cache(maxsize=1024)
def _multipliers_on(q: QuantSpec, n: int, device: torch.device) -> Tensor:
    """q.multipliers(n) on `device`."""
    return q.multipliers(n).to(device)


@functools.lru_cache(maxsize=1024)
def _on_device(value: float, device: torch.device) -> Tensor:
    """A float32 scalar on `device`."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def quantize_fp8(v: Tensor, scale: float) -> Tensor:
    """float8_e4m3fn(v / scale) as ONNX's QuantizeLinear computes it in float32: round to nearest even, saturated
    to +-448 (saturate=1, the default), NaN kept."""
    return (v.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _round_to(v: Tensor, scale: float, zero_point: int, lo: int, hi: int) -> Tensor:
    """round_half_even(v * float32(1 / scale)) + zero_point, saturated (float32 holding integers)."""
    inv = _on_device(1.0 / scale, v.device)
    return (torch.round(v * inv) + zero_point).clamp(lo, hi)


class _QBase(OpDef):
    domain = "kiln"
    arity = (2, 4)
    out_arity = (1, 1)
    float_op = ""

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """The float layer's shape rule (FusedConv / FusedGemm on float32 stand-ins), with the output type."""
        def as_float(t: TensorType | None) -> TensorType | None:
            return None if t is None else TensorType(DType.FLOAT32, t.shape)
        shadow = Node(self.float_op, list(node.inputs), [Value(o.name) for o in node.outputs],
                      {k: v for k, v in node.attrs.items() if k in lookup(self.float_op, "kiln").attributes},
                      name=node.name, domain="kiln", opset=1)
        fconsts = [None if c is None else c.float() for c in consts]
        outs = lookup(self.float_op, "kiln").infer(shadow, [as_float(t) for t in types], fconsts)
        dtype = DType.from_torch(QuantSpec.of(node).out_torch)
        return [TensorType(dtype, o.shape) for o in outs]


@register
class QConv(_QBase):
    """Integer convolution (int8 x int8 -> int32) with a dequantize + bias + residual + activation + requantize
    epilogue."""

    op_type = "QConv"
    float_op = "FusedConv"
    attributes = {**{k: v for k, v in EPILOGUE.items() if k != "out_dtype"}, **QUANT_ATTRS,
                  **{k: WINDOW[k] for k in ("strides", "dilations", "pads", "kernel_shape")},
                  "group": Attr("int", 1, min=1)}

    def check(self, node: Node) -> None:
        check_window_attrs(node)

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        q = _check_quant(node, x, w, b, z, int(w.shape[0]))
        if x.dim() != 4 or w.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': QConv takes 2-D convolutions (rank-4 X and W)")
        strides, dilations = strides_dilations(node, 2)
        pads = window_ints(node, "pads", 2, 0)
        xf = x.to(torch.float64) - q.x_zero_point  # exact: every partial sum stays an integer below 2**53
        xf = F.pad(xf, torch_pad(pads[:2], pads[2:]))
        acc = F.conv2d(xf, w.to(torch.float64), None, strides, 0, dilations, int(node.attr("group", 1)))
        return requantize(node, acc, q, b, z, 1)


@register
class QGemm(_QBase):
    """Integer matrix product A @ W^T (int8 x int8 -> int32) with the QConv epilogue."""

    op_type = "QGemm"
    float_op = "FusedGemm"
    attributes = {**{k: v for k, v in EPILOGUE.items() if k != "out_dtype"}, **QUANT_ATTRS}

    def compute(self, node: Node, a: Tensor, w: Tensor, b: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        q = _check_quant(node, a, w, b, z, int(w.shape[0]))
        if a.dim() < 2 or w.dim() != 2 or a.shape[-1] != w.shape[1]:
            raise UnsupportedOpError(f"node '{node.name}': QGemm cannot multiply {list(a.shape)} by "
                                     f"{list(w.shape)}^T")
        acc = (a.to(torch.float64) - q.x_zero_point) @ w.to(torch.float64).t()
        return requantize(node, acc, q, b, z, acc.dim() - 1)


def quant_layer(node: Node | None) -> bool:
    """Whether `node` is one of the integer (or FP8) layers above."""
    return node is not None and node.domain == "kiln" and node.op_type in ("QConv", "QGemm")


def fp8_layer(node: Node | None) -> bool:
    """Whether `node` is a QConv/QGemm on float8 elements (its weight is float8_e4m3fn)."""
    w = node.input(1) if quant_layer(node) else None  # type: ignore[union-attr]
    return w is not None and w.type.dtype == DType.FLOAT8E4M3FN

