"""Type conversion and tensor creation: Cast, CastLike, BitCast, Constant, ConstantOfShape, EyeLike,
Range, and the random generators (RandomNormal/Uniform[Like], Bernoulli, Multinomial).

`cast_tensor` is the one conversion routine (also used by the quantization ops): it follows the
ONNX rules for float 8 targets (saturate or NaN/Inf on overflow) and goes through float32 where
torch has no direct conversion.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dims import SYMBOL_BOUNDS, DimExpr, dim_upper_bound
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, ints, register

Tensor = torch.Tensor

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)

# Smallest magnitude that overflows each float 8 type after round-to-nearest-even (the midpoint
# between the largest finite value and the next power of the format), and whether that midpoint
# itself rounds up (the largest finite value has an odd mantissa).
_F8_OVERFLOW = {
    torch.float8_e4m3fn: (464.0, False),
    torch.float8_e4m3fnuz: (248.0, True),
    torch.float8_e5m2: (61440.0, True),
    torch.float8_e5m2fnuz: (61440.0, True),
}


def onnx_dtype(code: int, node: Node, what: str = "to") -> torch.dtype:
    """torch dtype of an ONNX element type code read from attribute `what` of `node`."""
    try:
        return DType.from_onnx(int(code)).torch
    except UnsupportedDTypeError as e:
        raise UnsupportedDTypeError(f"node '{node.name}' ({node.op_type}): attribute '{what}': {e}") from None


def to_float8(x: Tensor, dtype: torch.dtype, saturate: bool = True) -> Tensor:
    """Convert to a float 8 type with ONNX overflow semantics (round to nearest even)."""
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.float64 if x.itemsize >= 4 else torch.float32)
    elif x.dtype in FLOAT8:
        x = x.float()
    fmax = torch.finfo(dtype).max
    y = x.float().clamp(-fmax, fmax)
    if not saturate:
        thr, tie_up = _F8_OVERFLOW[dtype]
        mag = x.abs()
        over = (mag >= thr) if tie_up else (mag > thr)
        special = math.nan if dtype != torch.float8_e5m2 else torch.where(x > 0, math.inf, -math.inf).float()
        y = torch.where(over, special, y)
    return y.to(dtype)


def cast_tensor(x: Tensor, dtype: torch.dtype, saturate: bool = True) -> Tensor:
    """ONNX Cast of tensor `x` to torch dtype `dtype`."""
    if x.dtype == dtype:
        return x
    if dtype in FLOAT8:
        return to_float8(x, dtype, saturate)
    if x.dtype in FLOAT8:
        x = x.float()
    if dtype == torch.bool:
        return x != 0
    return x.to(dtype)


_OPSET1_TYPE_NAMES = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "UINT16": 4, "INT16": 5, "INT32": 6, "INT64": 7,
                      "BOOL": 9, "FLOAT16": 10, "DOUBLE": 11, "UINT32": 12, "UINT64": 13}


def _cast_target(node: Node) -> torch.dtype:
    to = node.attr("to")
    if to is None:
        raise UnsupportedOpError(f"node '{node.name}': Cast needs the 'to' attribute")
    if isinstance(to, str):  # opsets 1-5 named the type
        if to.upper() not in _OPSET1_TYPE_NAMES:
            raise UnsupportedDTypeError(f"node '{node.name}' (Cast): unsupported target type {to}")
        to = _OPSET1_TYPE_NAMES[to.upper()]
    return onnx_dtype(to, node)


@register
class Cast(OpDef):
    op_type = "Cast"

    def check(self, node: Node) -> None:
        _cast_target(node)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        return cast_tensor(x, _cast_target(node), bool(node.attr("saturate", 1)))


@register
class CastLike(OpDef):
    op_type = "CastLike"
    opsets = (15, 28)

    def compute(self, node: Node, x: Tensor, like: Tensor) -> Tensor:
        return cast_tensor(x, like.dtype, bool(node.attr("saturate", 1)))


@register
class BitCast(OpDef):
    op_type = "BitCast"
    opsets = (26, 28)

    def check(self, node: Node) -> None:
        onnx_dtype(node.attr("to"), node)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        dtype = onnx_dtype(node.attr("to"), node)
        if dtype.itemsize != x.dtype.itemsize:
            raise UnsupportedOpError(f"node '{node.name}': BitCast from {x.dtype} to {dtype} changes the bit width")
        if x.dim() == 0:
            return x.reshape(1).view(dtype).reshape(())
        return x.contiguous().view(dtype)


@register
class Constant(OpDef):
    op_type = "Constant"

    def check(self, node: Node) -> None:
        if "value_string" in node.attrs or "value_strings" in node.attrs:
            raise UnsupportedDTypeError(f"node '{node.name}': string constants are not supported")
        if not any(k in node.attrs for k in ("value", "sparse_value", "value_float", "value_floats",
                                             "value_int", "value_ints")):
            raise UnsupportedOpError(f"node '{node.name}': Constant has no value attribute")

    def compute(self, node: Node) -> Tensor:
        self.check(node)
        a = node.attrs
        for key in ("value", "sparse_value"):
            if key in a:
                return a[key]
        if "value_float" in a:
            return torch.tensor(a["value_float"], dtype=torch.float32)
        if "value_floats" in a:
            return torch.tensor(a["value_floats"], dtype=torch.float32).reshape(-1)
        if "value_int" in a:
            return torch.tensor(a["value_int"], dtype=torch.int64)
        return torch.tensor(a["value_ints"], dtype=torch.int64).reshape(-1)


@register
class ConstantOfShape(OpDef):
    op_type = "ConstantOfShape"
    opsets = (9, 28)
    value_inputs = (0,)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        if consts[0] is not None:
            return super().infer(node, types, consts)
        value = node.attr("value")
        dtype = DType.from_torch(value.dtype) if value is not None else DType.FLOAT32
        t = types[0]
        rank = t.shape[0] if t is not None and t.shape is not None and len(t.shape) == 1 else None
        from kiln.ops.shape_values import shape_entries
        e = shape_entries(node.input(0))
        if e is not None and not e[1] and (rank is None or len(e[0]) == rank) \
                and not any(isinstance(d, int) and d < 0 for d in e[0]):  # a shape chain's dims
            return [TensorType(dtype, tuple(e[0]))]
        return [TensorType(dtype, (None,) * rank if isinstance(rank, int) else None)]

    def compute(self, node: Node, shape: Tensor) -> Tensor:
        value = node.attr("value")
        if value is None:
            value = torch.zeros(1, dtype=torch.float32)
        dims = ints(shape)
        if any(d < 0 for d in dims):
            raise UnsupportedOpError(f"node '{node.name}': ConstantOfShape got negative dims {dims}")
        return value.reshape(()).to(shape.device).expand(dims).clone()


@register
class EyeLike(OpDef):
    op_type = "EyeLike"
    opsets = (9, 28)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        dt = node.attr("dtype")
        dtype = x.dtype if dt is None else onnx_dtype(dt, node, "dtype")
        if x.dim() != 2:
            raise UnsupportedOpError(f"node '{node.name}': EyeLike needs a 2-D input, got rank {x.dim()}")
        rows, cols = x.shape
        r = torch.arange(rows, device=x.device).unsqueeze(1)
        c = torch.arange(cols, device=x.device).unsqueeze(0)
        return cast_tensor(c - r == int(node.attr("k", 0)), dtype)


@register
class Range(OpDef):
    op_type = "Range"
    opsets = (11, 28)
    value_inputs = (0, 1, 2)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        if all(c is not None for c in consts[:3]):
            return super().infer(node, types, consts)
        t = types[0]
        return [TensorType(t.dtype if t is not None else None, (self._length(node, consts),))]

    @staticmethod
    def _length(node: Node, consts: Sequence[Tensor | None]) -> int | str | DimExpr | None:
        """Range(0, n, 1) over an integer n that a shape chain holds has exactly n elements: n's dim. So has the
        float form exporters write for coordinate grids, Range(0.0, Cast(n), 1.0), where every n the profile
        allows is exact in that float type (n <= 2**24 in float32)."""
        from kiln.ops.shape_values import shape_entries
        start, delta, limit = consts[0], consts[2], node.input(1)
        if start is None or delta is None or limit is None or start.numel() != 1 or delta.numel() != 1 \
                or float(start.reshape(())) != 0 or float(delta.reshape(())) != 1:
            return None
        exact = None
        if start.dtype.is_floating_point:
            cast = limit.producer
            exact = {torch.float32: 1 << 24, torch.float64: 1 << 53}.get(start.dtype)
            if exact is None or cast is None or cast.op_type != "Cast" or cast.input(0) is None:
                return None
            limit = cast.input(0)
        e = shape_entries(limit)
        if e is None or not e[1] or len(e[0]) != 1 or not isinstance(e[0][0], (str, DimExpr)):
            return None
        n = e[0][0]
        if exact is not None:
            top = dim_upper_bound(n, SYMBOL_BOUNDS.get())
            if top is None or top > exact:
                return None
        return n

    def compute(self, node: Node, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
        dtype, dev = start.dtype, start.device
        s, l, d = start.item(), limit.item(), delta.item()
        if d == 0:
            raise UnsupportedOpError(f"node '{node.name}': Range delta is zero")
        if not dtype.is_floating_point:
            n = max(-((s - l) // d), 0)
            return (s + torch.arange(n, dtype=torch.int64, device=dev) * d).to(dtype)
        n = max(math.ceil((l - s) / d), 0)
        work = torch.float64
        if dtype in (torch.float16, torch.bfloat16) and int(node.attr("stash_type", 1)) == 1:
            work = torch.float32
        s_w = torch.tensor(s, dtype=work, device=dev)
        d_w = torch.tensor(d, dtype=work, device=dev)
        return (s_w + torch.arange(n, dtype=work, device=dev) * d_w).to(dtype)


def _generator(node: Node, device: torch.device | str | None = None) -> torch.Generator | None:
    seed = node.attr("seed")
    if seed is None or torch.device(device or "cpu").type == "meta":
        return None
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(int(seed) if float(seed) == int(seed) else hash(float(seed)) & 0x7FFFFFFF)
    return g


def _random_dtype(node: Node, like: Tensor | None) -> torch.dtype:
    dt = node.attr("dtype")
    if dt is None:
        return like.dtype if like is not None else torch.float32
    dtype = onnx_dtype(dt, node, "dtype")
    if not dtype.is_floating_point or dtype in FLOAT8:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} output dtype {dtype} is not a float type")
    return dtype


def _sample(node: Node, shape: list[int], dtype: torch.dtype, device: Any) -> Tensor:
    gen = _generator(node, device)
    kw: dict[str, Any] = {"dtype": torch.float32, "generator": gen}
    if device is not None:
        kw["device"] = device
    if "Normal" in node.op_type:
        out = torch.randn(shape, **kw) * float(node.attr("scale", 1.0)) + float(node.attr("mean", 0.0))
    else:
        lo, hi = float(node.attr("low", 0.0)), float(node.attr("high", 1.0))
        out = torch.rand(shape, **kw) * (hi - lo) + lo
    return out.to(dtype)


@register
class RandomFromShape(OpDef):
    op_type = ("RandomNormal", "RandomUniform")
    deterministic = False

    def compute(self, node: Node) -> Tensor:
        shape = node.attr("shape")
        if shape is None:
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} needs the 'shape' attribute")
        return _sample(node, ints(shape), _random_dtype(node, None), None)


@register
class RandomLike(OpDef):
    op_type = ("RandomNormalLike", "RandomUniformLike")
    deterministic = False

    def compute(self, node: Node, x: Tensor) -> Tensor:
        dtype = _random_dtype(node, x if x.is_floating_point() else None)
        return _sample(node, list(x.shape), dtype, x.device)


@register
class Bernoulli(OpDef):
    op_type = "Bernoulli"
    opsets = (15, 28)
    deterministic = False

    def compute(self, node: Node, p: Tensor) -> Tensor:
        dt = node.attr("dtype")
        dtype = p.dtype if dt is None else onnx_dtype(dt, node, "dtype")
        u = torch.rand(p.shape, dtype=torch.float32, device=p.device, generator=_generator(node, p.device))
        return cast_tensor(u < p.float(), dtype)


@register
class Multinomial(OpDef):
    op_type = "Multinomial"
    opsets = (7, 28)
    deterministic = False

    def compute(self, node: Node, logits: Tensor) -> Tensor:
        dtype = onnx_dtype(node.attr("dtype", 6), node, "dtype")
        if dtype not in (torch.int32, torch.int64):
            raise UnsupportedDTypeError(f"node '{node.name}': Multinomial output dtype must be int32 or int64")
        probs = torch.softmax(logits.double(), dim=-1)
        out = torch.multinomial(probs, int(node.attr("sample_size", 1)), replacement=True,
                                generator=_generator(node, logits.device))
        return out.to(dtype)
