"""Elementwise ops: arithmetic, math, logic, comparison, bitwise, Where, Clip, Identity, Dropout.

All binary ops use numpy-style broadcasting. torch lacks most kernels for uint16/32/64, so
those are computed in int64 and cast back: uint16/32 by value (exact), uint64 by
reinterpreting its bits, with unsigned ordering and division emulated on the int64 bits.
Float16/bfloat16 transcendental functions are evaluated in float32 and rounded back.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, norm_axis, register, simple_op

Tensor = torch.Tensor

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
SINTS = frozenset({torch.int8, torch.int16, torch.int32, torch.int64})
UINTS = frozenset({torch.uint8, torch.uint16, torch.uint32, torch.uint64})
INTS = SINTS | UINTS
NUMERIC = FLOATS | INTS
HALF = frozenset({torch.float16, torch.bfloat16})
WIDE_UINTS = frozenset({torch.uint16, torch.uint32, torch.uint64})
_SIGN_BIT = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1


def require(node: Node, x: Tensor, allowed: frozenset[torch.dtype], what: str = "") -> None:
    """Raise UnsupportedDTypeError unless x's dtype is in `allowed`."""
    if x.dtype not in allowed:
        kinds = what or ", ".join(sorted(str(d).replace("torch.", "") for d in allowed))
        raise UnsupportedDTypeError(f"{node.op_type} does not support element type "
                                    f"{str(x.dtype).replace('torch.', '')} (supported: {kinds})")


# ---- uint16/32/64 emulation ---------------------------------------------------------------------

def to_i64(x: Tensor) -> Tensor:
    """int64 carrier of an integer tensor: uint64 keeps its bits, others their values."""
    return x.view(torch.int64) if x.dtype == torch.uint64 else x.to(torch.int64)


def from_i64(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of to_i64, wrapping modulo 2**bits for narrower types."""
    return y.view(torch.uint64) if dtype == torch.uint64 else y.to(dtype)


def order_key(x: Tensor) -> Tensor:
    """A tensor torch can compare that orders like x (unsigned 64-bit order for uint64)."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ _SIGN_BIT
    if x.dtype in WIDE_UINTS:
        return x.to(torch.int64)
    return x


def _from_key(k: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint64:
        return (k ^ _SIGN_BIT).view(torch.uint64)
    return k.to(dtype) if k.dtype != dtype else k


def wrapping(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Lift an integer op whose result is correct modulo 2**64 to uint16/32/64 inputs."""
    def run(*xs: Tensor) -> Tensor:
        dt = xs[0].dtype
        if dt not in WIDE_UINTS:
            return fn(*xs)
        return from_i64(fn(*(to_i64(x) for x in xs)), dt)
    return run


def _lsr(a: Tensor, s: Tensor | int) -> Tensor:
    """Logical right shift of int64 bits by s in [1, 63]."""
    return ((a >> 1) & _INT64_MAX) >> (s - 1)


def _u64_divmod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Unsigned 64-bit quotient and remainder on int64 bit patterns (b != 0)."""
    big = b < 0
    bs = torch.where(big, 1, b)
    q = torch.div(_lsr(a, 1), bs, rounding_mode="floor") << 1
    r = a - q * bs
    fix = (r ^ _SIGN_BIT) >= (bs ^ _SIGN_BIT)
    q = torch.where(fix, q + 1, q)
    r = torch.where(fix, r - bs, r)
    ge = (a ^ _SIGN_BIT) >= (b ^ _SIGN_BIT)
    q = torch.where(big, ge.to(torch.int64), q)
    r = torch.where(big, torch.where(ge, a - b, a), r)
    return q, r


def int_divmod(a: Tensor, b: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Integer quotient/remainder rounding toward zero ("trunc") or -inf ("floor").

    A zero divisor yields quotient a and remainder 0 (ONNX leaves it undefined); INT_MIN / -1 wraps.
    """
    dt = a.dtype
    if dt == torch.uint64:
        a64, b64 = torch.broadcast_tensors(a.view(torch.int64), b.view(torch.int64))
        q, r = _u64_divmod(a64, torch.where(b64 == 0, 1, b64))
        return q.view(torch.uint64), r.view(torch.uint64)
    if dt in WIDE_UINTS:
        q, r = int_divmod(a.to(torch.int64), b.to(torch.int64), mode)
        return q.to(dt), r.to(dt)
    one = torch.ones_like(b)
    bz = torch.where(b == 0, one, b)
    if dt in SINTS:
        q = torch.where(b == -1, -a, torch.div(a, torch.where(b == -1, one, bz), rounding_mode=mode))
    else:
        q = torch.div(a, bz, rounding_mode=mode)
    return q, a - q * bz


# ---- helpers for op definitions ----------------------------------------------------------------

def float_fn(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Apply fn in float32 for float16/bfloat16 inputs and round the result back."""
    def run(x: Tensor) -> Tensor:
        if x.dtype in HALF:
            return fn(x.float()).to(x.dtype)
        return fn(x)
    return run


def legacy_broadcast(node: Node, a: Tensor, b: Tensor) -> Tensor:
    """Opset < 7 `broadcast`/`axis` attributes: b's dims align with a's starting at `axis`."""
    if node.opset < 7 and node.attr("broadcast", 0) and "axis" in node.attrs and 0 < b.dim() < a.dim():
        axis = norm_axis(node.attr("axis"), a.dim())
        b = b.reshape(tuple(b.shape) + (1,) * (a.dim() - axis - b.dim()))
    return b


def _unary_float(name: str, fn: Callable[[Tensor], Tensor], opsets: tuple[int, int] = (1, 28)) -> None:
    wrapped = float_fn(fn)

    def compute(node: Node, x: Tensor) -> Tensor:
        require(node, x, FLOATS, "float types")
        return wrapped(x)
    simple_op(name, compute, opsets=opsets)


def _binary(name: str, fn: Callable[[Node, Tensor, Tensor], Tensor], allowed: frozenset[torch.dtype],
            opsets: tuple[int, int] = (1, 28)) -> None:
    def compute(node: Node, a: Tensor, b: Tensor) -> Tensor:
        require(node, a, allowed)
        return fn(node, a, legacy_broadcast(node, a, b))
    simple_op(name, compute, opsets=opsets)


# ---- arithmetic ---------------------------------------------------------------------------------

_binary("Add", lambda n, a, b: wrapping(torch.add)(a, b), NUMERIC)
_binary("Sub", lambda n, a, b: wrapping(torch.sub)(a, b), NUMERIC)
_binary("Mul", lambda n, a, b: wrapping(torch.mul)(a, b), NUMERIC)


def _div(node: Node, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return int_divmod(a, b, "trunc")[0]


_binary("Div", _div, NUMERIC)


def _mod(node: Node, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        if node.attr("fmod", 0):
            return torch.fmod(a, b)
        r = torch.remainder(a, b)
        return torch.where(r == 0, torch.copysign(r, b), r)
    return int_divmod(a, b, "trunc" if node.attr("fmod", 0) else "floor")[1]


class Mod(OpDef):
    op_type = "Mod"
    opsets = (10, 28)

    def check(self, node: Node) -> None:
        if node.attr("fmod", 0) not in (0, 1):
            raise UnsupportedOpError(f"node '{node.name}': Mod fmod must be 0 or 1, got {node.attr('fmod')}")

    def compute(self, node: Node, a: Tensor, b: Tensor) -> Tensor:
        require(node, a, NUMERIC)
        self.check(node)
        return _mod(node, a, b)


register(Mod)


def _pow(node: Node, a: Tensor, b: Tensor) -> Tensor:
    require(node, b, NUMERIC)
    if a.is_floating_point():
        wide = torch.promote_types(a.dtype, b.dtype) if b.is_floating_point() else a.dtype
        if wide in HALF:
            wide = torch.float32
        return torch.pow(a.to(wide), b.to(wide)).to(a.dtype)
    if b.is_floating_point():
        return torch.pow(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)
    a64, e = to_i64(a), to_i64(b)
    r = torch.pow(a64, e.clamp(min=0))
    neg_pow = torch.where(a64 == 1, 1, torch.where(a64 == -1, 1 - 2 * (e & 1), 0))
    return from_i64(torch.where(e < 0, neg_pow, r), a.dtype)


_binary("Pow", _pow, NUMERIC)


def _neg(node: Node, x: Tensor) -> Tensor:
    require(node, x, FLOATS | SINTS)
    return -x


def _abs(node: Node, x: Tensor) -> Tensor:
    require(node, x, NUMERIC)
    return x.clone() if x.dtype in UINTS else torch.abs(x)


def _sign(node: Node, x: Tensor) -> Tensor:
    require(node, x, NUMERIC)
    if x.dtype in UINTS:
        return from_i64((to_i64(x) != 0).to(torch.int64), x.dtype)
    if x.is_floating_point():
        return torch.where(torch.isnan(x), x, torch.sign(x))
    return torch.sign(x)


simple_op("Neg", _neg)
simple_op("Abs", _abs)
simple_op("Sign", _sign, opsets=(9, 28))

for _name, _fn, _lo in [
    ("Sqrt", torch.sqrt, 1), ("Exp", torch.exp, 1), ("Log", torch.log, 1),
    ("Reciprocal", torch.reciprocal, 1), ("Floor", torch.floor, 1), ("Ceil", torch.ceil, 1),
    ("Round", torch.round, 11), ("Erf", torch.erf, 9),
    ("Sin", torch.sin, 7), ("Cos", torch.cos, 7), ("Tan", torch.tan, 7),
    ("Asin", torch.asin, 7), ("Acos", torch.acos, 7), ("Atan", torch.atan, 7),
    ("Sinh", torch.sinh, 9), ("Cosh", torch.cosh, 9), ("Asinh", torch.asinh, 9),
    ("Acosh", torch.acosh, 9), ("Atanh", torch.atanh, 9),
]:
    _unary_float(_name, _fn, (_lo, 28))


# ---- variadic -----------------------------------------------------------------------------------

def _variadic(name: str, pair: Callable[[Tensor, Tensor], Tensor], allowed: frozenset[torch.dtype],
              finish: Callable[[Tensor, int], Tensor] | None = None) -> None:
    def compute(node: Node, *xs: Tensor) -> Tensor:
        if not xs:
            raise UnsupportedOpError(f"node '{node.name}': {name} needs at least one input")
        for x in xs:
            require(node, x, allowed)
        out = functools.reduce(pair, xs) if len(xs) > 1 else xs[0]
        if len(xs) == 1 and finish is None:
            return out.clone()
        return finish(out, len(xs)) if finish else out
    simple_op(name, compute)


def _ordered_pair(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def run(a: Tensor, b: Tensor) -> Tensor:
        if a.dtype in WIDE_UINTS:
            return _from_key(fn(order_key(a), order_key(b)), a.dtype)
        return fn(a, b)
    return run


_variadic("Max", _ordered_pair(torch.maximum), NUMERIC)
_variadic("Min", _ordered_pair(torch.minimum), NUMERIC)
_variadic("Sum", wrapping(torch.add), NUMERIC)
_variadic("Mean", torch.add, FLOATS, lambda s, n: s / n)


# ---- logic and comparison -----------------------------------------------------------------------

_BOOL = frozenset({torch.bool})
_binary("And", lambda n, a, b: torch.logical_and(a, b), _BOOL)
_binary("Or", lambda n, a, b: torch.logical_or(a, b), _BOOL)
_binary("Xor", lambda n, a, b: torch.logical_xor(a, b), _BOOL)


def _not(node: Node, x: Tensor) -> Tensor:
    require(node, x, _BOOL)
    return torch.logical_not(x)


simple_op("Not", _not)


def _compare(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, Tensor, Tensor], Tensor]:
    return lambda node, a, b: fn(order_key(a), order_key(b))


_binary("Equal", _compare(torch.eq), NUMERIC | _BOOL)
_binary("Less", _compare(torch.lt), NUMERIC)
_binary("Greater", _compare(torch.gt), NUMERIC)
_binary("LessOrEqual", _compare(torch.le), NUMERIC, (12, 28))
_binary("GreaterOrEqual", _compare(torch.ge), NUMERIC, (12, 28))


# ---- bitwise ------------------------------------------------------------------------------------

def _bitwise(name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    _binary(name, lambda n, a, b: wrapping(fn)(a, b), INTS, (18, 28))


_bitwise("BitwiseAnd", torch.bitwise_and)
_bitwise("BitwiseOr", torch.bitwise_or)
_bitwise("BitwiseXor", torch.bitwise_xor)


def _bitwise_not(node: Node, x: Tensor) -> Tensor:
    require(node, x, INTS)
    return wrapping(torch.bitwise_not)(x)


simple_op("BitwiseNot", _bitwise_not, opsets=(18, 28))


class BitShift(OpDef):
    """Shifts by a negative amount or by >= the bit width give the sign fill (0 or -1)."""

    op_type = "BitShift"
    opsets = (11, 28)

    def check(self, node: Node) -> None:
        if node.attr("direction") not in ("LEFT", "RIGHT"):
            raise UnsupportedOpError(f"node '{node.name}': BitShift direction must be LEFT or RIGHT, "
                                     f"got {node.attr('direction')!r}")

    def compute(self, node: Node, x: Tensor, y: Tensor) -> Tensor:
        require(node, x, INTS)
        self.check(node)
        dt = x.dtype
        bits = dt.itemsize * 8
        x64, s = to_i64(x), to_i64(y)
        out = (s < 0) | (s >= bits)
        if node.attr("direction") == "LEFT":
            r = torch.where(out, 0, x64 << torch.where(out, 0, s))
        elif dt == torch.uint64:
            r = torch.where(out, 0, torch.where(s == 0, x64, _lsr(x64, torch.where(out | (s == 0), 1, s))))
        else:
            r = x64 >> torch.where(out, 63, s)
        return from_i64(r, dt)


register(BitShift)


# ---- predicates, selection, clipping ------------------------------------------------------------

_FLOAT8 = frozenset({torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz})


def _isnan(node: Node, x: Tensor) -> Tensor:
    require(node, x, FLOATS | _FLOAT8, "float types")
    return torch.isnan(x.float() if x.dtype in _FLOAT8 else x)


def _isinf(node: Node, x: Tensor) -> Tensor:
    require(node, x, FLOATS | _FLOAT8, "float types")
    x = x.float() if x.dtype in _FLOAT8 else x
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if neg:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


simple_op("IsNaN", _isnan, opsets=(9, 28))
simple_op("IsInf", _isinf, opsets=(10, 28))


def _where(node: Node, cond: Tensor, x: Tensor, y: Tensor) -> Tensor:
    require(node, cond, _BOOL, "bool condition")
    if x.dtype in WIDE_UINTS:
        return from_i64(torch.where(cond, to_i64(x), to_i64(y)), x.dtype)
    return torch.where(cond, x, y)


simple_op("Where", _where, opsets=(9, 28))


class Clip(OpDef):
    """Opset < 11: `min`/`max` float attributes; from 11: optional scalar inputs. min > max gives max."""

    op_type = "Clip"

    def compute(self, node: Node, x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
        require(node, x, NUMERIC)
        if node.opset < 11:
            lo_v, hi_v = node.attr("min"), node.attr("max")
            return torch.clamp(x, min=lo_v, max=hi_v) if lo_v is not None or hi_v is not None else x.clone()
        if lo is None and hi is None:
            return x.clone()
        if x.dtype in WIDE_UINTS:
            k = order_key(x)
            if lo is not None:
                k = torch.maximum(k, order_key(lo))
            if hi is not None:
                k = torch.minimum(k, order_key(hi))
            return _from_key(k, x.dtype)
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x


register(Clip)


# ---- identity and dropout -----------------------------------------------------------------------

simple_op("Identity", lambda node, x: x)


class Dropout(OpDef):
    """Inference: identity with an all-true mask. From opset 12 a true `training_mode` input
    drops elements with probability `ratio` (torch RNG) and scales the rest by 1/(1-ratio)."""

    op_type = "Dropout"
    value_inputs = (1, 2)
    deterministic = False

    def compute(self, node: Node, x: Tensor, ratio: Tensor | None = None,
                training: Tensor | None = None) -> Any:
        train = node.opset >= 12 and training is not None and bool(training.reshape(-1)[0].item())
        p = float(ratio.reshape(-1)[0].item()) if node.opset >= 12 and ratio is not None else \
            float(node.attr("ratio", 0.5))
        if not train or p == 0.0:
            y, mask = x.clone(), torch.ones_like(x, dtype=torch.bool)
        elif p >= 1.0:
            y, mask = torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
        else:
            mask = torch.rand(x.shape, device=x.device) >= p
            y = x * mask.to(x.dtype) * (1.0 / (1.0 - p))
        if len(node.outputs) < 2:
            return y
        return y, (mask if node.opset >= 10 else mask.to(x.dtype))

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        t = types[0] or TensorType(None, None)
        out = [t]
        if len(node.outputs) > 1:
            mask_dt = t.dtype if node.opset < 10 else DType.BOOL
            out.append(TensorType(mask_dt, t.shape))
        return out


register(Dropout)
