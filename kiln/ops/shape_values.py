"""Symbolic values of shape tensors: what Shape(x) and the Gather / Slice / Unsqueeze / Concat chains
built on it hold, as a list of dims (an int, a dim symbol such as "N", or None when unknown).

Exporters compute reshape targets at run time (`x.view(x.shape[0], 3, 7, h, w)` becomes Shape,
Gather, Unsqueeze and Concat layers feeding a Reshape). Reading these chains at build time lets the
folder turn the entries that are static into constants and lets a Reshape copy a dynamic dim from its
own input (ONNX's 0 entry) instead of computing it each inference, and lets symbolic type inference run
an op whose shape-like input a chain computes (kiln.ops.symbolic). It reads the IR only (no pass machinery),
so the plan loader's type re-inference can use it.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch

from kiln.ir.dims import DimExpr
from kiln.ir.graph import Node, Value, is_op

Dim = int | str | DimExpr | None


def _ints(v: Value | None) -> list[int] | None:
    if v is None or v.const is None or v.const.dtype not in (torch.int64, torch.int32) or v.const.dim() > 1:
        return None
    return [int(i) for i in v.const.reshape(-1).tolist()]


def _fits_int32(d: Dim) -> bool:
    """Whether a dim's value provably fits int32 (Paddle's exports cast Shape outputs to int32 and back): a
    static dim, or a symbol / derived dim whose largest value over the profiles' ranges does (the runtime
    refuses inputs outside them)."""
    from kiln.ir.dims import dim_upper_bound
    from kiln.ops.symbolic import current_bounds
    top = dim_upper_bound(d, current_bounds())
    return top is not None and -(1 << 31) <= top < (1 << 31)


def shape_entries(v: Value | None, depth: int = 0) -> tuple[list[Dim], bool] | None:
    """(the dims v holds, whether v is a scalar) for an integer shape value, or None when unknown."""
    if v is None or depth > 16:
        return None
    if v.const is not None:
        ints = _ints(v)
        return None if ints is None else (list(ints), v.const.dim() == 0)
    p = v.producer
    if p is None or p.domain not in ("", "ai.onnx") or len(p.outputs) != 1:
        return None
    if is_op(p, "Shape"):
        x = p.input(0)
        if x is None or x.type.shape is None:
            return None
        dims: list[Dim] = list(x.type.shape)
        start, end = p.attr("start", 0), p.attr("end", None)
        return dims[int(start or 0):(None if end is None else int(end))], False
    if is_op(p, "Where"):
        return _where_entries(p, depth)
    if is_op(p, "Cast") and int(p.attr("to", 0) or 0) == 7:  # to int64: dims keep their values
        return shape_entries(p.input(0), depth + 1)
    if is_op(p, "Cast") and int(p.attr("to", 0) or 0) == 6:  # to int32: where every dim provably fits
        src = shape_entries(p.input(0), depth + 1)
        return src if src is not None and all(_fits_int32(d) for d in src[0]) else None
    if is_op(p, "Reshape"):  # a shape vector reshaped to [-1] or to its own length
        src, tgt = shape_entries(p.input(0), depth + 1), _ints(p.input(1))
        if src is None or src[1] or tgt not in ([-1], [len(src[0])]):
            return None
        return src[0], False
    if is_op(p, "ConstantOfShape"):
        n, fill = shape_entries(p.input(0), depth + 1), p.attr("value")
        value = 0 if fill is None else fill
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype not in (torch.int64, torch.int32):
                return None
            value = int(value.reshape(()))
        if n is None or n[1] or len(n[0]) != 1 or not isinstance(n[0][0], int) or not isinstance(value, int):
            return None
        return [value] * n[0][0], False
    if is_op(p, "Mul", "Add", "Sub", "Div"):
        return _arith_entries(p, depth)
    if is_op(p, "Gather", "Slice", "Unsqueeze", "Concat", "Squeeze"):
        src = shape_entries(p.input(0), depth + 1)
        if src is None:
            return None
        dims, is_scalar = src
        if is_op(p, "Gather"):
            idx = p.input(1)
            if int(p.attr("axis", 0) or 0) != 0 or is_scalar or idx is None or idx.const is None:
                return None
            pos = [int(i) for i in idx.const.reshape(-1).tolist()]
            if any(not -len(dims) <= i < len(dims) for i in pos):
                return None
            return [dims[i] for i in pos], idx.const.dim() == 0
        if is_op(p, "Slice"):
            if is_scalar or any(v_ is not None and v_.const is None for v_ in p.inputs[1:]):
                return None
            from kiln.ops.registry import lookup
            try:
                pos = lookup("Slice", "").compute(p, torch.arange(len(dims)),
                                                  *[None if v_ is None else v_.const for v_ in p.inputs[1:]])
            except Exception:
                return None
            return [dims[int(i)] for i in pos.tolist()], False
        if is_op(p, "Unsqueeze", "Squeeze"):
            axes = _ints(p.input(1)) if len(p.inputs) > 1 else list(p.attr("axes", None) or [])
            if is_op(p, "Unsqueeze") and is_scalar and axes in ([0], [-1]):
                return dims, False
            if is_op(p, "Squeeze") and not is_scalar and len(dims) == 1 and axes in ([], [0], [-1], None):
                return dims, True
            return None
        out: list[Dim] = []  # Concat
        if int(p.attr("axis", 0) or 0) not in (0, -1):
            return None
        for piece in p.inputs:
            e = shape_entries(piece, depth + 1)
            if e is None or e[1]:
                return None
            out += e[0]
        return out, False
    return None


def _broadcast(e: list[Dim], n: int) -> list[Dim] | None:
    return e * n if len(e) == 1 else e if len(e) == n else None


def _arith_entries(p: Node, depth: int) -> tuple[list[Dim], bool] | None:
    """Elementwise Mul / Add / Sub / Div of two shape vectors: ints compute, a symbol or a derived dim gives a
    derived dim (kiln.ir.dims: `Shape(x)[0] * 64` is `64*batch`); Div only by a positive constant (dims are
    never negative, so ONNX's truncating division is the floor); a result that could be negative is unknown."""
    a, b = shape_entries(p.input(0), depth + 1), shape_entries(p.input(1), depth + 1)
    if a is None or b is None:
        return None
    n = max(len(a[0]), len(b[0]))
    ea, eb = _broadcast(a[0], n), _broadcast(b[0], n)
    if ea is None or eb is None:
        return None
    out: list[Dim] = []
    for x, y in zip(ea, eb):
        if x is None or y is None:
            return None
        if isinstance(x, int) and isinstance(y, int):
            if is_op(p, "Div") and y == 0:
                return None
            out.append(x * y if is_op(p, "Mul") else x + y if is_op(p, "Add") else x - y if is_op(p, "Sub")
                       else int(x / y))  # ONNX integer Div truncates
            continue
        d = _derived(p, x, y)
        if d is None:
            return None
        out.append(d)
    return out, a[1] and b[1]


def _derived(p: Node, x: Dim, y: Dim) -> Dim:
    """x op y with a symbolic side, as a dim (int, symbol, DimExpr) or None."""
    from torch.utils._sympy.functions import FloorDiv

    from kiln.ir.dims import DimExpr, sym

    def expr(d: Dim) -> Any:
        return sympy.Integer(d) if isinstance(d, int) else d.expr if isinstance(d, DimExpr) else sym(d)  # type: ignore
    ex, ey = expr(x), expr(y)
    if is_op(p, "Mul"):
        if (isinstance(x, int) and x < 0) or (isinstance(y, int) and y < 0):
            return None
        e = ex * ey
    elif is_op(p, "Add"):
        if (isinstance(x, int) and x < 0) or (isinstance(y, int) and y < 0):
            return None
        e = ex + ey
    elif is_op(p, "Sub"):
        if isinstance(y, int) and y <= 0:
            return DimExpr.make(ex - ey)  # x - 0 or x + k
        e = ex - ey  # a dim only where the profile proves it never negative: `480000 - N` for N <= 64000
        return DimExpr.make(e) if _least(e) >= 0 else None
    else:
        if not isinstance(y, int) or y <= 0 or (isinstance(x, int) and x < 0):
            return None
        e = FloorDiv(ex, ey)
    return DimExpr.make(e)


def _least(e: Any) -> Any:
    """The smallest value of an integer expression over the symbols' profile ranges (kiln.ir.dims.SYMBOL_BOUNDS),
    or -1 where a symbol has no range or interval arithmetic cannot bound it."""
    from kiln.ir.dims import SYMBOL_BOUNDS
    bounds = SYMBOL_BOUNDS.get()
    if not all(str(s) in bounds for s in e.free_symbols):
        return -1
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy
    try:
        r = bound_sympy(e, {s: ValueRanges(*bounds[str(s)]) for s in e.free_symbols})
    except Exception:
        return -1
    return r.lower if getattr(r.lower, "is_Integer", False) else -1


def _where_entries(p: Node, depth: int) -> tuple[list[Dim], bool] | None:
    """Where(Equal(c, k), a, b) over shape vectors, decided per entry where the comparison is: an int entry
    of c against the constant k, or a dim symbol against a negative k (dims are never negative) -- the
    exporters' `shape.where(shape == -1, 1, shape)` guard before an Expand."""
    cond, a, b = (p.input(i) for i in range(3))
    eq = None if cond is None else cond.producer
    if eq is None or not is_op(eq, "Equal") or len(eq.inputs) != 2:
        return None
    c, ek, ea, eb = (shape_entries(v, depth + 1) for v in (eq.input(0), eq.input(1), a, b))
    if c is None or ek is None or ea is None or eb is None or c[1]:
        return None
    n = len(c[0])
    ks, pick_a, pick_b = _broadcast(ek[0], n), _broadcast(ea[0], n), _broadcast(eb[0], n)
    if ks is None or pick_a is None or pick_b is None:
        return None
    out: list[Dim] = []
    for d, k, x, y in zip(c[0], ks, pick_a, pick_b):
        if not isinstance(k, int):
            return None
        if isinstance(d, int):
            out.append(x if d == k else y)
        elif (isinstance(d, str) or isinstance(d, DimExpr)) and k < 0:  # dims are never negative
            out.append(y)
        else:
            return None
    return out, False


def static_value(v: Value) -> torch.Tensor | None:
    """v as a constant int64 tensor when every entry it holds is static."""
    e = shape_entries(v)
    if e is None or not all(isinstance(d, int) for d in e[0]):
        return None
    t = torch.tensor(e[0], dtype=torch.int64)
    return t.reshape(()) if e[1] and t.numel() == 1 else t
