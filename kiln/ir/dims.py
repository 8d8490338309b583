"""Derived dimensions: a dim that is an integer expression of input symbols, such as `seq - 1` or `2*batch`.

Type inference (kiln.ops.symbolic) runs ops on symbolic sizes; an output dim that comes out as an expression
of the input symbols (a Slice [1:] of a sequence, a Flatten of [batch, seq], a stride-2 convolution's
`(h - 1)//2 + 1`) is a `DimExpr`, proven for every value of its symbols. Arithmetic on it stays exact:
`Pad(Slice(x)[1:])` is `seq` again, `Reshape(2*batch) -> //2` is `batch`. At run time the bound symbols give
its value (`dim_size`), so the arena, the shape prologue and tactic shapes treat it like a symbol.

Plans store a derived dim as unknown (null): loading re-derives it by the same inference, so the plan format
carries no expressions to parse. The expressions are sympy trees of integer symbols with torch's FloorDiv /
Mod / Min / Max (torch.utils._sympy.functions), the forms torch's symbolic shapes produce.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Mapping

import sympy

from kiln.errors import KilnError

# each input symbol's (min, max) under the build's (or a loaded plan's) profiles, which the runtime enforces on
# every call; set by kiln.ops.symbolic.symbol_bounds, read by inference
SYMBOL_BOUNDS: contextvars.ContextVar[dict[str, tuple[int, int]]] = contextvars.ContextVar("kiln_symbol_bounds",
                                                                                           default={})
_ALLOWED = {"Add", "Mul", "Integer", "Symbol", "FloorDiv", "Mod", "PythonMod", "Min", "Max", "NegativeOne",
            "One", "Zero"}


class DimExpr:
    """An integer expression of named input dims (sympy, integer symbols); equal when the expressions are."""

    __slots__ = ("expr", "text", "symbols", "_order", "_memo")

    def __init__(self, expr: sympy.Expr) -> None:
        self.expr = expr
        self.text = str(expr)
        self.symbols = frozenset(str(s) for s in expr.free_symbols)
        self._order = tuple(sorted(expr.free_symbols, key=str))
        self._memo: dict[tuple[int, ...], int] = {}  # bound symbols -> value: sympy runs once per input shape

    @staticmethod
    def make(expr: Any) -> "int | str | DimExpr | None":
        """The dim for a sympy expression over symbols named as Kiln dims: an int, the symbol's name, a DimExpr,
        or None where the expression uses a function Kiln does not evaluate."""
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return str(expr)
        if not expr.free_symbols or any(type(a).__name__ not in _ALLOWED for a in sympy.preorder_traversal(expr)):
            return None
        one = _single_value(expr)
        return DimExpr(expr) if one is None else one

    def evaluate(self, dims: Mapping[str, int]) -> int:
        try:
            key = tuple(int(dims[str(s)]) for s in self._order)
        except KeyError as e:
            raise KilnError(f"dim {self.text}: symbol {e} is not bound") from None
        got = self._memo.get(key)
        if got is not None:
            return got
        v = self.expr.xreplace({s: sympy.Integer(k) for s, k in zip(self._order, key)})
        if not v.is_Integer:
            raise KilnError(f"dim {self.text} does not evaluate to an integer at {dict(dims)}")
        if len(self._memo) < 64:
            self._memo[key] = int(v)
        return int(v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DimExpr) and other.text == self.text

    def __hash__(self) -> int:
        return hash(("DimExpr", self.text))

    def __str__(self) -> str:
        return self.text.replace(" ", "")

    def __repr__(self) -> str:
        return f"DimExpr({self.text})"


def sym(name: str) -> sympy.Symbol:
    """The sympy symbol standing for a named input dim."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


def dim_size(d: Any, dims: Mapping[str, int]) -> int:
    """A dim's size once the input symbols are bound (`dims`)."""
    if isinstance(d, int):
        return d
    if isinstance(d, DimExpr):
        return d.evaluate(dims)
    return dims[d]


def dim_resolvable(d: Any, symbols: Iterable[str] | set[str]) -> bool:
    """Whether a dim's size is known once these symbols are bound."""
    if isinstance(d, int):
        return True
    if isinstance(d, DimExpr):
        return d.symbols <= set(symbols)
    return d is not None and d in symbols


def _single_value(expr: sympy.Expr) -> int | None:
    """The one value `expr` takes while every symbol stays in its profile range, where interval arithmetic proves
    there is only one (a frame count (L - 192)//512 + 1 with L in [576, 703] is 1 for every accepted input); else
    None. Outside a build or a plan load no symbol has a range and nothing collapses."""
    bounds = SYMBOL_BOUNDS.get()
    if not bounds or not {str(s) for s in expr.free_symbols} <= set(bounds):
        return None
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy
    try:
        r = bound_sympy(expr, {s: ValueRanges(int(bounds[str(s)][0]), int(bounds[str(s)][1]))
                               for s in expr.free_symbols})
    except Exception:  # an expression the interval arithmetic does not cover stays derived
        return None
    if r.lower == r.upper and getattr(r.lower, "is_Integer", False):
        return int(r.lower)
    return None


def dim_upper_bound(d: Any, bounds: Mapping[str, tuple[int, int]]) -> int | None:
    """The largest value a dim takes while each symbol stays in its (min, max) range, or None where that is not
    proven: a symbol without a range, or an expression not provably non-decreasing in its symbols (built from
    sums, positive multiples, products of factors non-negative at the ranges' minima, and floor divisions by a
    positive constant), whose largest value is then the one at every symbol's max."""
    if isinstance(d, int):
        return d
    if isinstance(d, str):
        r = bounds.get(d)
        return None if r is None else int(r[1])
    if not isinstance(d, DimExpr) or not d.symbols <= set(bounds):
        return None
    lo = {s: int(bounds[s][0]) for s in d.symbols}
    hi = {s: int(bounds[s][1]) for s in d.symbols}

    def at(e: sympy.Expr, point: Mapping[str, int]) -> int | None:
        v = e.xreplace({s: sympy.Integer(point[str(s)]) for s in e.free_symbols})
        return int(v) if v.is_Integer else None

    def nonnegative_rising(f: sympy.Expr) -> bool:
        low = at(f, lo)
        return low is not None and low >= 0 and rising(f)

    def rising(e: sympy.Expr) -> bool:
        if e.is_Integer or e.is_Symbol:
            return True
        if isinstance(e, sympy.Add):
            return all(rising(a) for a in e.args)
        if isinstance(e, sympy.Mul):
            coeff = [a for a in e.args if a.is_Number]
            factors = [a for a in e.args if not a.is_Number]
            if any(c <= 0 for c in coeff):
                return False
            if len(factors) == 1:
                return rising(factors[0])
            return all(nonnegative_rising(f) for f in factors)
        if type(e).__name__ == "FloorDiv":
            return e.args[1].is_Integer and int(e.args[1]) > 0 and rising(e.args[0])
        return False
    return at(d.expr, hi) if rising(d.expr) else None


class DimGuard:
    """An equality of two dims that an op needs and inference could not prove: torch's shape functions assert
    it to run a Concat of [N, 256, 2*((h - 1)//32) + 2, ...] and [N, 128, (h - 1)//16 + 1, ...] (equal when h is
    a multiple of 32, not for every h in the profile). The output types rest on it; the runtime checks it once
    per input shape (kiln.runtime.interpreter) and refuses a shape where it fails, as the op itself would."""

    __slots__ = ("lhs", "rhs", "node")

    def __init__(self, lhs: Any, rhs: Any, node: str = "") -> None:
        self.lhs, self.rhs, self.node = lhs, rhs, node

    def holds(self, dims: Mapping[str, int]) -> bool:
        return dim_size(self.lhs, dims) == dim_size(self.rhs, dims)

    def failure(self, dims: Mapping[str, int]) -> str:
        """One line naming the layer, the equality and the two sizes at `dims`."""
        used = sorted(self.lhs_symbols | self.rhs_symbols)
        at = ", ".join(f"{s}={dims[s]}" for s in used if s in dims)
        return (f"layer '{self.node}' needs {self.lhs} == {self.rhs}, which is "
                f"{dim_size(self.lhs, dims)} vs {dim_size(self.rhs, dims)} at {at}")

    @property
    def lhs_symbols(self) -> frozenset[str]:
        return _symbols_of(self.lhs)

    @property
    def rhs_symbols(self) -> frozenset[str]:
        return _symbols_of(self.rhs)

    def with_node(self, node: str) -> "DimGuard":
        return DimGuard(self.lhs, self.rhs, node)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DimGuard) and (self.lhs, self.rhs) == (other.lhs, other.rhs)

    def __hash__(self) -> int:
        return hash(("DimGuard", self.lhs, self.rhs))

    def __repr__(self) -> str:
        return f"DimGuard({self.lhs} == {self.rhs})"


def _symbols_of(d: Any) -> frozenset[str]:
    if isinstance(d, DimExpr):
        return d.symbols
    return frozenset([d]) if isinstance(d, str) else frozenset()


# the guards the type inference of one node rests on, collected by kiln.ops.infer.infer_node; None: inference may
# rest on none (a dim it cannot prove is unknown)
GUARDS_OUT: contextvars.ContextVar[list[DimGuard] | None] = contextvars.ContextVar("kiln_dim_guards", default=None)
# False while a subgraph body is inferred: a body's types start from its declared input types, the exporter's
# word (a loop-carried [2, 8] fed [3, 8]), so an equality resting on them is no fact about the model's inputs
GUARDS_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("kiln_guards_allowed", default=True)


@contextlib.contextmanager
def body_inference() -> Iterator[None]:
    """Inside: types are inferred without dim guards (a subgraph body's; see GUARDS_ALLOWED)."""
    token = GUARDS_ALLOWED.set(False)
    try:
        yield
    finally:
        GUARDS_ALLOWED.reset(token)
