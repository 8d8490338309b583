"""Symbolic type inference: sound output shapes for inputs with dynamic dims.

An op's reference `compute` runs on fake tensors (torch's FakeTensorMode) whose dynamic dims are
symbolic integers *without values* (unbacked SymInts of a fresh ShapeEnv, each in [0, 2**40]). torch's shape
functions then compute every output dim as a sympy expression of the input dims and cannot branch on
a symbol's value: code that would need one (`int(n)`, `if n > 7`) raises instead of guessing. So:

* an output dim whose expression is a constant is static for every value of the symbols (proven);
* one that is exactly an input symbol keeps its name ("N" stays "N");
* a derived expression of named input dims only (`seq - 1`, `2*batch`, `(L - 256)//128 + 1`) is a
  `DimExpr` (kiln.ir.dims), evaluated from the bound symbols at run time, and fed back in as the same
  arithmetic on symbolic ints where a later op reads it (so `Pad(x[:, 1:])` is `seq` again);
* anything involving a fresh unknown dim is None.

Where torch assumes two dims equal to run the op (broadcasting two unknown dims, a Concat of [N, 16, H, W]
and [N, 16, ?, ?]) it records a run-time assertion instead of a decision; dims involving such symbols
become unknown, because broadcasting against a 1 would give the other dim. When the op cannot run
symbolically at all, its outputs keep element type and rank but no dims (from one placeholder run):
a dim is never made static because sample sizes happened to agree.

Results are memoised by everything inference reads (op, attributes, input types, value inputs): the
passes re-infer the whole graph many times.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from kiln.ir.dims import GUARDS_OUT, SYMBOL_BOUNDS, DimExpr, DimGuard, sym
from kiln.ir.dtype import DType
from kiln.ir.types import TensorType
from kiln.ops.infer import _run, element_type

if TYPE_CHECKING:
    from kiln.ir.graph import Node
    from kiln.ops.registry import OpDef

_CACHE: "OrderedDict[Any, list[TensorType]]" = OrderedDict()  # everything inference reads -> output types
_CACHE_SIZE = 4096
FALLBACKS: Counter[str] = Counter()  # op types whose symbolic run failed (for diagnostics)
LAST_ERROR: dict[str, str] = {}  # op type -> why its last symbolic run failed
_QUIET = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
          "torch.fx.experimental.recording")
_MAX_DIM = 1 << 40  # the importer refuses larger dims
_PLACEHOLDER = 1009  # the size of every dynamic dim in the fallback's one placeholder run


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch logs a traceback at ERROR level for every meta function that needs a value; here that is
    an expected outcome (the op falls back), not an error."""
    loggers = [logging.getLogger(n) for n in _QUIET]
    old = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, o in zip(loggers, old):
            lg.disabled = o


_BOUNDS = SYMBOL_BOUNDS  # the symbols' profile ranges (kiln.ir.dims: derived dims collapse under them too)


def current_bounds() -> dict[str, tuple[int, int]]:
    """The (min, max) of each input symbol under the build's profiles (empty outside a build's passes)."""
    return _BOUNDS.get()


@contextlib.contextmanager
def symbol_bounds(bounds: dict[str, tuple[int, int]]) -> Iterator[None]:
    """Inside: each named input symbol lies in [lo, hi] (the builder passes the optimization profiles'
    ranges, which the runtime enforces on every call), so inference may use them (a dim >= 1 is never 0)."""
    token = _BOUNDS.set(dict(bounds))
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def profile_bounds(inputs: Sequence[tuple[tuple[Any, ...] | None,
                                          list[tuple[Sequence[int], Sequence[int]] | None]]]) -> dict[str, tuple[int, int]]:
    """Symbol ranges from (declared shape, [(min, max) or None per profile]) of each input: within one profile a
    symbol lies in the intersection of its dims' ranges, over profiles in the union. Inputs without a
    range in some profile leave their symbols unbounded."""
    per_profile: list[dict[str, tuple[int, int]]] = []
    unbounded: set[str] = set()
    count = max((len(r) for _, r in inputs), default=0)
    for k in range(count):
        cur: dict[str, tuple[int, int]] = {}
        for shape, ranges in inputs:
            for j, d in enumerate(shape or ()):
                if not isinstance(d, str):
                    continue
                if k >= len(ranges) or ranges[k] is None or j >= len(ranges[k][0]):  # type: ignore[index]
                    unbounded.add(d)
                    continue
                lo, hi = int(ranges[k][0][j]), int(ranges[k][1][j])  # type: ignore[index]
                old = cur.get(d, (lo, hi))
                cur[d] = (max(old[0], lo), min(old[1], hi))
        per_profile.append(cur)
    out: dict[str, tuple[int, int]] = {}
    for cur in per_profile:
        for d, (lo, hi) in cur.items():
            old = out.get(d, (lo, hi))
            out[d] = (min(old[0], lo), max(old[1], hi))
    return {d: r for d, r in out.items() if d not in unbounded and r[0] <= r[1]}


def _key(node: "Node", types: Sequence[TensorType | None], consts: Sequence[torch.Tensor | None],
         value_inputs: tuple[int, ...], values: dict[int, list[int | str]]) -> Any:
    """A hashable key of everything inference reads, or None when a tensor is too large to key by value."""
    tensors = [(k, v) for k, v in node.attrs.items() if isinstance(v, torch.Tensor)]
    tensors += [(i, c) for i, c in enumerate(consts) if c is not None and i in value_inputs]
    if any(t.numel() > 4096 for _, t in tensors):
        return None
    vals = tuple((k, str(t.dtype), tuple(t.shape), t.cpu().numpy().tobytes()) for k, t in tensors)
    attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items() if not isinstance(v, torch.Tensor)))
    dims = [d for t in types if t is not None and t.shape is not None for d in t.shape]
    entries = tuple((i, tuple(e)) for i, e in values.items())
    dims += [d for _, e in entries for d in e]
    named = {d for d in dims if isinstance(d, str)} | {s for d in dims if isinstance(d, DimExpr) for s in d.symbols}
    bounds = tuple(sorted((d, r) for d, r in _BOUNDS.get().items() if d in named))
    return (node.op_type, node.domain, node.opset, attrs, tuple(types), vals, bounds, entries,
            GUARDS_OUT.get() is not None)


def _value_entries(node: "Node", consts: Sequence[torch.Tensor | None],
                   value_inputs: tuple[int, ...]) -> dict[int, list[int | str]]:
    """Run-time value inputs (a Slice's ends, an Expand's shape) that a shape chain computes from dims: input
    index -> the dims it holds (ints and input symbols), where every entry is known (kiln.ops.shape_values).
    Inference then runs the op on those symbols: Slice(pos_ids, 0, Shape(x)[1]) has x's sequence dim."""
    from kiln.ops.shape_values import shape_entries  # it imports kiln.ops.registry, which imports this module
    out: dict[int, list[int | str]] = {}
    for i in value_inputs:
        v = node.input(i)
        if v is None or i >= len(consts) or consts[i] is not None or v.is_const:
            continue
        e = shape_entries(v)
        if e is not None and not e[1] and all(isinstance(d, (int, str, DimExpr)) for d in e[0]):
            out[i] = list(e[0])  # type: ignore[arg-type]
    return out


def infer_symbolic(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                   consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
    """Output types of `node` whose inputs have dynamic dims (see the module docstring). The dim equalities they
    rest on go to the collector kiln.ops.infer.infer_node sets (GUARDS_OUT)."""
    values = _value_entries(node, consts, opdef.value_inputs)
    key = None if any(node.subgraphs()) else _key(node, types, consts, opdef.value_inputs, values)
    if key is None:
        out, guards = _run_or_fallback(opdef, node, types, consts, values)
    else:
        if key in _CACHE:
            _CACHE.move_to_end(key)
        else:
            _CACHE[key] = _run_or_fallback(opdef, node, types, consts, values)
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        out, guards = _CACHE[key]
    sink = GUARDS_OUT.get()
    if guards and sink is not None:
        sink.extend(guards)
    return list(out)


def _run_or_fallback(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                     consts: Sequence[torch.Tensor | None], values: dict[int, list[int | str]]
                     ) -> tuple[list[TensorType], list[DimGuard]]:
    guards: list[DimGuard] = []
    with _quiet():
        got = _symbolic(opdef, node, types, consts, values)
        if got is None:
            out = _ranks_only(opdef, node, types, consts)
        else:
            out, guards = got
    out = out[:len(node.outputs)]
    return out + [TensorType(None, None)] * (len(node.outputs) - len(out)), guards


def _symbolic(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
              consts: Sequence[torch.Tensor | None], values: dict[int, list[int | str]]
              ) -> tuple[list[TensorType], list[DimGuard]] | None:
    """One run on fake tensors: the output types and the guards they rest on (`_guards`); `values`: the run-time
    value inputs a shape chain holds (`_value_entries`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    names: dict[Any, str | None] = {}  # sympy symbol -> the input symbol it stands for (None: an unknown dim)
    named: dict[str, Any] = {}

    bounds = _BOUNDS.get()
    in_dims: list[Any] = []  # the sympy expressions of the tensor inputs' symbolic dims

    def fresh(name: str | None) -> Any:
        s = env.create_unbacked_symint()
        lo, hi = bounds.get(name, (0, _MAX_DIM)) if name is not None else (0, _MAX_DIM)
        torch._check(s >= lo)
        torch._check(s <= hi)
        names[s.node.expr] = name
        return s

    def symint(d: Any) -> Any:
        """An int, or the symbolic int of a named dim or of a derived one (built from its symbols' ints)."""
        if isinstance(d, int):
            return d
        if isinstance(d, DimExpr):
            return _to_symint(d.expr, symint)
        if d not in named:
            named[d] = fresh(d)
        return named[d]

    try:
        fake = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
        with fake:
            args: list[Any] = []
            for i, (t, c) in enumerate(zip(types, consts)):
                if c is not None and i in opdef.value_inputs:
                    args.append(c)
                    continue
                if i in values:  # dims from a shape chain: a list of ints and symbolic ints (registry.ints)
                    args.append([symint(d) for d in values[i]])
                    continue
                if c is None and i in opdef.value_inputs and t is not None:
                    return None  # a shape-like input only known at run time
                if t is None or t.shape is None or t.dtype is None:
                    if c is None:
                        if t is None:
                            args.append(None)
                            continue
                        return None
                    t = TensorType(DType.from_torch(c.dtype), tuple(c.shape))
                dims = [fresh(None) if d is None else symint(d) for d in t.shape]
                in_dims.extend(d.node.expr for d in dims if isinstance(d, torch.SymInt))
                args.append(torch.empty(dims, dtype=t.dtype.torch))  # type: ignore[union-attr]
        try:
            # outside the mode first: ops on fake inputs still run fake, while reading a value input (a
            # real constant: Reshape's target, Slice's starts) stays real
            out = opdef.compute(node, *args)
        except Exception:
            # inside it, tensors the op creates from sizes (arange(n), zeros(shape)) are fake too
            with fake:
                out = opdef.compute(node, *args)
    except Exception as e:
        FALLBACKS[node.op_type] += 1
        LAST_ERROR[node.op_type] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        return None
    outs = list(out) if isinstance(out, tuple) else [out]
    guards, exact = _guards(env, names, in_dims) if GUARDS_OUT.get() is not None else ([], set())
    tainted = _assumed_equal(env, skip=exact)
    return [_type_of(o, names, tainted, env, _assumed_equal(env, 1, skip=exact)) for o in outs], guards


def _guards(env: Any, names: dict[Any, str | None], in_dims: list[Any]) -> tuple[list[DimGuard], set[Any]]:
    """The equalities torch asserted to run the op that can stand as run-time guards (DimGuard), and those
    assertions. One qualifies when its symbols are all named input dims and every input dim built on them is at
    least 2 over the profile: then no dim it equates can broadcast as a 1, so the op really needs the equality
    (torch assumes it for a broadcast of unknown sizes, which is exact only there)."""
    import sympy
    guards: list[DimGuard] = []
    exact: set[Any] = set()
    for asserts in getattr(env, "deferred_runtime_asserts", {}).values():
        for ra in asserts:
            e = ra.expr
            if not isinstance(e, sympy.Eq) or ra in exact or not e.free_symbols:
                continue
            if any(names.get(s) is None for s in e.free_symbols):
                continue
            if any(d.free_symbols & e.free_symbols and _lower(d, env) < 2 for d in in_dims):
                continue
            kiln_syms = {s: sym(names[s]) for s in e.free_symbols}  # type: ignore[arg-type]
            lhs, rhs = (DimExpr.make(_tighten(x, env).xreplace(kiln_syms)) for x in (e.lhs, e.rhs))
            if lhs is None or rhs is None or (isinstance(lhs, int) and isinstance(rhs, int)):
                continue  # an expression Kiln does not evaluate; or two sizes, unequal: the op cannot run
            guards.append(DimGuard(lhs, rhs))
            exact.add(ra)
    return guards, exact


def _lower(d: Any, env: Any) -> Any:
    try:
        return env.bound_sympy(d).lower
    except Exception:
        return 0


def _tighten(e: Any, env: Any) -> Any:
    """e with each Min/Max whose winner the symbols' ranges decide replaced by that argument (a Slice's
    end clamp Min(2**63 - 1, L) is L: every dim is at most 2**40), bottom-up."""
    def decide(m: Any) -> Any:
        args, want = list(m.args), -1 if type(m).__name__ == "Min" else 1
        for a in args:
            if all(a == b or _sign(a - b, env) == want for b in args):
                return a
        return m

    # torch's own Min/Max classes (torch.utils._sympy.functions), sympy's in older versions: by name
    return e.replace(lambda x: type(x).__name__ in ("Min", "Max"), decide)


def _sign(d: Any, env: Any) -> int:
    """-1 when d <= 0 for every value of its symbols, 1 when d >= 0, else 0."""
    try:
        r = env.bound_sympy(d)
    except Exception:
        return 0
    if r.upper <= 0:
        return -1
    if r.lower >= 0:
        return 1
    return 0


def _assumed_equal(env: Any, least: int = 2, skip: set[Any] = frozenset()) -> set[Any]:  # type: ignore[assignment]
    """Symbols of the run-time assertions torch made to equate two dims (instead of deciding), those with at least
    `least` symbols; with 1, also `Eq(seq - 1 + 1, seq)`-like ones, which a derived dim must not rest on. The
    assertions in `skip` are run-time guards (`_guards`): nothing resting on them is tainted."""
    import sympy
    out: set[Any] = set()
    for asserts in getattr(env, "deferred_runtime_asserts", {}).values():
        for ra in asserts:
            if ra in skip:
                continue
            e = ra.expr
            if isinstance(e, sympy.Eq) and len(e.free_symbols) >= least:
                out |= e.free_symbols
    for s, r in getattr(env, "replacements", {}).items():  # a symbol torch learned equals an expression
        out |= {s} | set(getattr(r, "free_symbols", ()))
    return out


def _type_of(o: Any, names: dict[Any, str | None], tainted: set[Any], env: Any, asserted: set[Any]) -> TensorType:
    if not isinstance(o, torch.Tensor):
        return TensorType(None, None)
    dt = element_type(o)
    dims: list[int | str | None] = []
    for d in o.shape:
        if isinstance(d, int):
            dims.append(d)
            continue
        e = _tighten(d.node.expr, env)
        if e.is_Integer:
            dims.append(int(e))
        elif e.free_symbols & tainted:
            dims.append(None)
        elif e in names:
            dims.append(names[e])
        elif not e.free_symbols & asserted and all(names.get(s) is not None for s in e.free_symbols):
            # derived from named dims only, resting on no assumption
            dims.append(DimExpr.make(e.xreplace({s: sym(names[s]) for s in e.free_symbols})))  # type: ignore[arg-type]
        else:
            dims.append(None)
    return TensorType(dt, tuple(dims))


def _to_symint(e: Any, leaf: Any) -> Any:
    """A DimExpr's sympy tree as torch symbolic-int arithmetic; `leaf(name)` gives a named dim's symbolic int."""
    kind = type(e).__name__
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        return leaf(str(e))
    args = [_to_symint(a, leaf) for a in e.args]
    if kind == "Add":
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if kind == "Mul":
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if kind == "FloorDiv":
        return args[0] // args[1]
    if kind in ("Mod", "PythonMod"):
        return args[0] % args[1]
    if kind == "Min":
        return functools.reduce(torch.sym_min, args)
    if kind == "Max":
        return functools.reduce(torch.sym_max, args)
    raise ValueError(f"dim expression {e}: no symbolic form for {kind}")


def _ranks_only(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
    """Element types and ranks from one run with every dynamic dim at a placeholder size; no dims."""
    placeholder = [None if t is None or t.shape is None else
                   TensorType(t.dtype, tuple(d if isinstance(d, int) else _PLACEHOLDER for d in t.shape))
                   for t in types]
    outs = _run(opdef, node, placeholder, consts, {})
    if outs is None:
        return [TensorType(None, None) for _ in node.outputs]
    return [TensorType(element_type(o), (None,) * o.dim()) if isinstance(o, torch.Tensor) else TensorType(None, None)
            for o in outs]
