"""What a plan must satisfy before Kiln acts on it: a plan file is untrusted input.

The sha256 trailer only detects accidents (anyone can recompute it), so every header field and every
weight is treated as hostile. The checks, in the order the loader runs them:

* `check_json_depth`: the header's JSON nesting, scanned before ``json.loads`` recurses into it;
* `validate_header`: the header's top-level keys and their types: target, input/output specs, profiles,
  memory plan, build options (the graph spec itself is checked by kiln.plan.serialize.GraphReader);
* `verify_graph` (after GraphReader rebuilt the graph): the I/O specs against the graph, types *proven* by
  Kiln's own inference (`prove_types`), allocation bounds at the profiles' max shapes (`check_allocations`)
  and the header's memory plan (`check_memory_plan`).

Every refusal is a PlanFormatError of one line naming the field (``plan header: inputs[0].shape[2]: ...``)
or the value.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

from kiln.errors import BuildError, PlanFormatError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.plan.formats import parse_record
from kiln.plan.header import MAX_HEADER_BYTES, MAX_JSON_DEPTH, check_json_depth  # noqa: F401 (re-exported)

# Bounds on what a plan may hold (far above any real model; they keep hostile headers cheap to refuse).
MAX_SUBGRAPH_DEPTH = 64         # graphs inside attributes inside graphs ...
MAX_ITEMS = 1_000_000           # values + steps of the whole plan; I/O specs, weights, list lengths
MAX_STR = 1 << 16               # any name, symbol, op type or attribute string
MAX_RANK = 64
MAX_DIM = (1 << 62) - 1
MAX_OPSET = 28                  # ai.onnx opsets Kiln knows (per step); graph opset imports may be other domains'
KINDS = ("tensor", "sequence", "optional")
DTYPES = frozenset(d.value for d in DType)

_HEADER_KEYS = {"target", "inputs", "outputs", "profiles", "graph", "memory", "build", "kiln_version", "format_version"}
_REQUIRED_KEYS = ("target", "inputs", "outputs", "profiles", "graph")
_SPEC_KEYS = {"name", "dtype", "shape", "kind"}
_BUILD_BOOLS = ("fp16", "bf16", "tf32", "int8", "flush_denormals")
_BUILD_INTS = ("optimization_level", "layers", "views", "elided")
_CAPABILITY = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")


def prefix(where: str) -> str:
    """'' for the default name, else 'path: ' (messages read 'x.kiln: plan header: ...')."""
    return "" if where == "plan" else f"{where}: "


def show(x: Any, limit: int = 60) -> str:
    """A short repr of a (hostile) value for a one-line message."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_:/-]{0,59}")


def key(k: Any) -> str:
    """A dict key in a field path: as is when it is a plain identifier, else its (short) repr."""
    return k if isinstance(k, str) and _PLAIN.fullmatch(k) else show(k)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_name(x: Any) -> bool:
    """A non-empty string of at most MAX_STR characters without control characters (messages stay one line)."""
    return isinstance(x, str) and 0 < len(x) <= MAX_STR and not _CONTROL.search(x)


def limit_bytes(name: str) -> int:
    """kiln.settings' limit (max_activation_bytes, max_plan_bytes); physical RAM where it cannot say."""
    try:
        from kiln.settings import settings
        return int(getattr(settings(), name))
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30


class _Fail:
    """Raises PlanFormatError('<where>: plan header: <path>: <msg>')."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, path: str, msg: str) -> PlanFormatError:
        return PlanFormatError(f"{prefix(self.where)}plan header: {path}: {msg}")


# ---- the raw JSON ---------------------------------------------------------------------------------

# check_json_depth: kiln.plan.header's (one copy; that module reads plans without torch)


# ---- the header -------------------------------------------------------------------------------------

def validate_header(h: Any, where: str = "plan") -> None:
    """Every top-level field of a plan header (a dict, as parsed from JSON or taken from a Plan)."""
    fail = _Fail(where)
    if not isinstance(h, dict):
        raise fail("(top level)", f"expected a JSON object, got {type(h).__name__}")
    for k in h:
        if k not in _HEADER_KEYS:
            raise fail(key(k), "unknown header field")
    for k in _REQUIRED_KEYS:
        if k not in h:
            raise fail(k, "missing")
    if not isinstance(h.get("kiln_version", ""), str) or len(h.get("kiln_version", "")) > MAX_STR:
        raise fail("kiln_version", f"expected a string, got {show(h.get('kiln_version'))}")
    if "format_version" in h and not is_int(h["format_version"]):
        raise fail("format_version", f"expected an int, got {show(h['format_version'])}")
    _target(h["target"], fail)
    graph = h["graph"]
    if not isinstance(graph, dict):
        raise fail("graph", f"expected a JSON object, got {type(graph).__name__}")
    inputs = _specs(h["inputs"], "inputs", graph.get("inputs"), fail)
    _specs(h["outputs"], "outputs", graph.get("outputs"), fail)
    _profiles(h["profiles"], inputs, fail)
    _memory(h.get("memory", {}), fail)
    _build(h.get("build", {}), fail)


def _target(t: Any, fail: _Fail) -> None:
    if not isinstance(t, dict):
        raise fail("target", f"expected a JSON object, got {type(t).__name__}")
    dev = t.get("device")
    if dev not in ("cpu", "cuda"):
        raise fail("target.device", f"expected 'cpu' or 'cuda', got {show(dev)}")
    if dev == "cuda" and not (isinstance(t.get("capability"), str) and _CAPABILITY.fullmatch(t["capability"])):
        raise fail("target.capability", f"expected a compute capability 'N.M', got {show(t.get('capability'))}")
    known = {"device"} | ({"capability", "name", "cuda"} if dev == "cuda" else {"name", "isa"})
    for k, v in t.items():
        if k not in known:
            raise fail(f"target.{key(k)}", f"unknown field for device '{dev}'")
        if not isinstance(v, str) or len(v) > 256:
            raise fail(f"target.{k}", f"expected a short string, got {show(v)}")


def _dtype(x: Any, path: str, fail: _Fail) -> None:
    if x is not None and (not isinstance(x, str) or x not in DTYPES):
        raise fail(path, f"expected an element type ({', '.join(sorted(DTYPES))}) or null, got {show(x)}")


def _shape(x: Any, path: str, fail: _Fail) -> None:
    """null (unknown rank) or dims: ints >= 0, symbol names, or null (an unknown dim: a NetworkDefinition
    input may have one; the runtime checks nothing there and no allocation is sized from it)."""
    if x is None:
        return
    if not isinstance(x, list):
        raise fail(path, f"expected a list of dims or null, got {show(x)}")
    if len(x) > MAX_RANK:
        raise fail(path, f"rank {len(x)} is above the limit of {MAX_RANK}")
    for k, d in enumerate(x):
        if (is_int(d) and 0 <= d <= MAX_DIM) or is_name(d) or d is None:
            continue
        raise fail(f"{path}[{k}]", f"expected an int >= 0 or a symbol name, got {show(d)}")


def _specs(specs: Any, field: str, graph_names: Any, fail: _Fail) -> dict[str, dict[str, Any]]:
    if not isinstance(specs, list):
        raise fail(field, f"expected a list, got {type(specs).__name__}")
    if len(specs) > MAX_ITEMS:
        raise fail(field, f"{len(specs)} entries, above the limit of {MAX_ITEMS}")
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(specs):
        path = f"{field}[{i}]"
        if not isinstance(s, dict):
            raise fail(path, f"expected a JSON object, got {type(s).__name__}")
        for k in s:
            if k not in _SPEC_KEYS:
                raise fail(f"{path}.{key(k)}", "unknown field")
        name = s.get("name")
        if not is_name(name):
            raise fail(f"{path}.name", f"expected a non-empty string, got {show(name)}")
        if name in out:
            raise fail(f"{path}.name", f"duplicate {field[:-1]} name {show(name)}")
        _dtype(s.get("dtype"), f"{path}.dtype", fail)
        _shape(s.get("shape"), f"{path}.shape", fail)
        if s.get("kind", "tensor") not in KINDS:
            raise fail(f"{path}.kind", f"expected one of {', '.join(KINDS)}, got {show(s.get('kind'))}")
        out[name] = s
    if isinstance(graph_names, list) and all(isinstance(n, str) for n in graph_names) and list(out) != graph_names:
        missing = [n for n in out if n not in graph_names] + [n for n in graph_names if n not in out]
        what = f"{show(missing[0])} is not a graph {field[:-1]}" if missing else "not in the graph's order"
        raise fail(field, f"the names do not match the graph's {field} ({what})")
    return out


def _profiles(profiles: Any, inputs: Mapping[str, dict[str, Any]], fail: _Fail) -> None:
    if not isinstance(profiles, list):
        raise fail("profiles", f"expected a list, got {type(profiles).__name__}")
    if len(profiles) > 4096:
        raise fail("profiles", f"{len(profiles)} profiles, above the limit of 4096")
    for i, p in enumerate(profiles):
        if not isinstance(p, dict):
            raise fail(f"profiles[{i}]", f"expected a JSON object, got {type(p).__name__}")
        for name, r in p.items():
            path = f"profiles[{i}].{key(name)}"
            spec = inputs.get(name)
            if spec is None:
                raise fail(path, "names no input of the plan")
            if spec.get("kind", "tensor") != "tensor":
                raise fail(path, f"input is a {spec.get('kind')}, profiles only bound tensors")
            if not isinstance(r, dict) or set(r) != {"min", "opt", "max"}:
                raise fail(path, f"expected {{min, opt, max}}, got {show(r)}")
            shape = spec.get("shape")
            for which in ("min", "opt", "max"):
                dims = r[which]
                if not isinstance(dims, list) or not all(is_int(d) and 0 <= d <= MAX_DIM for d in dims):
                    raise fail(f"{path}.{which}", f"expected a list of ints >= 0, got {show(dims)}")
                if shape is not None and len(dims) != len(shape):
                    raise fail(f"{path}.{which}", f"rank {len(dims)}, but the input has rank {len(shape)}")
                if len(dims) > MAX_RANK:
                    raise fail(f"{path}.{which}", f"rank {len(dims)} is above the limit of {MAX_RANK}")
                for k, (d, s) in enumerate(zip(dims, shape or ())):
                    if is_int(s) and d != s:
                        raise fail(f"{path}.{which}[{k}]", f"{d}, but the input's dim {k} is static {s}")
            if not len(r["min"]) == len(r["opt"]) == len(r["max"]):
                raise fail(path, "min, opt and max have different ranks")
            for k, (a, b, c) in enumerate(zip(r["min"], r["opt"], r["max"])):
                if not a <= b <= c:
                    raise fail(f"{path}", f"needs min <= opt <= max, got {a}, {b}, {c} at dim {k}")


def _memory(m: Any, fail: _Fail) -> None:
    if not isinstance(m, dict):
        raise fail("memory", f"expected a JSON object, got {type(m).__name__}")
    if not m:
        return
    for k in m:
        if k not in ("arena_bytes", "naive_bytes", "offsets", "sizes"):
            raise fail(f"memory.{key(k)}", "unknown field")
    for k in ("arena_bytes", "naive_bytes"):
        if not is_int(m.get(k)) or m[k] < 0:
            raise fail(f"memory.{k}", f"expected an int >= 0, got {show(m.get(k))}")
    offsets, sizes = m.get("offsets", {}), m.get("sizes", {})
    for k, d in (("offsets", offsets), ("sizes", sizes)):
        if not isinstance(d, dict) or len(d) > MAX_ITEMS:
            raise fail(f"memory.{k}", f"expected a JSON object of at most {MAX_ITEMS} entries")
        for name, v in d.items():
            if not is_int(v) or v < 0:
                raise fail(f"memory.{k}.{key(name)}", f"expected an int >= 0, got {show(v)}")
    if set(offsets) != set(sizes):
        odd = next(iter(set(offsets) ^ set(sizes)))
        raise fail(f"memory.{key(odd)}", "has an offset but no size (or a size but no offset)")
    arena = m["arena_bytes"]
    for name, off in offsets.items():
        if off + sizes[name] > arena:
            raise fail(f"memory.offsets.{key(name)}", f"buffer [{off}, {off + sizes[name]}) lies past the "
                                                       f"arena's {arena} bytes")


def _build(b: Any, fail: _Fail) -> None:
    if not isinstance(b, dict):
        raise fail("build", f"expected a JSON object, got {type(b).__name__}")
    for k, v in b.items():
        path = f"build.{key(k)}"
        if k in _BUILD_BOOLS:
            if not isinstance(v, bool):
                raise fail(path, f"expected true or false, got {show(v)}")
        elif k in _BUILD_INTS:
            if not is_int(v) or v < 0:
                raise fail(path, f"expected an int >= 0, got {show(v)}")
        elif not _flat_json(v):
            raise fail(path, f"expected a JSON scalar or a flat object of scalars, got {show(v)}")
        elif k == "formats":  # kiln.plan.formats: each layer's "<input formats> -> <output formats>"
            if not isinstance(v, dict):
                raise fail(path, f"expected a JSON object of layer formats, got {show(v)}")
            for layer, text in v.items():
                try:
                    parse_record(text)
                except ValueError as e:
                    raise fail(f"{path}.{key(layer)}", str(e)) from None


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_STR)


def _flat_json(v: Any) -> bool:
    if isinstance(v, dict):
        return len(v) <= 4096 and all(isinstance(k, str) and _scalar(x) for k, x in v.items())
    return _scalar(v)


def json_config(c: Any, depth: int = 0) -> bool:
    """A tactic config value: a JSON scalar or (nested) list of them."""
    if isinstance(c, (list, tuple)):  # tuples: a plan built in memory, not yet through JSON
        return depth < 8 and len(c) <= 4096 and all(json_config(x, depth + 1) for x in c)
    return _scalar(c)


# ---- the rebuilt graph ------------------------------------------------------------------------------

def verify_graph(header: Mapping[str, Any], g: Graph, tactics: Mapping[int, tuple[str, dict[str, Any]]],
                 where: str = "plan") -> set[str]:
    """I/O specs against the graph, proven types, allocation bounds, the header's memory plan.

    Returns the names of values whose type still holds header information that inference could not
    confirm (see `prove_types`)."""
    check_io(header, g, where)
    from kiln.ops.symbolic import profile_bounds, symbol_bounds as bounded
    ranges = profile_bounds([(tuple(s.get("shape") or ()), [(p[s["name"]]["min"], p[s["name"]]["max"])
                                                              if s["name"] in p else None for p in header["profiles"]])
                             for s in header["inputs"]])
    with bounded(ranges):  # as the builder inferred: the runtime refuses inputs outside the profiles
        weak = prove_types(g, where)
    check_allocations(header, g, where)
    check_memory_plan(header.get("memory") or {}, g, tactics, where)
    return weak


def spec_type(spec: Mapping[str, Any]) -> TensorType:
    shape = spec.get("shape")
    return TensorType(DType(spec["dtype"]) if spec.get("dtype") else None, None if shape is None else tuple(shape))


def check_io(header: Mapping[str, Any], g: Graph, where: str) -> None:
    """Graph inputs are typed by the header's input specs (the types the runtime checks feeds against);
    an output spec must be its value's type."""
    for field, values in (("inputs", g.inputs), ("outputs", g.outputs)):
        specs = header[field]
        if [s["name"] for s in specs] != [v.name for v in values]:
            raise PlanFormatError(f"{prefix(where)}plan header: {field}: the names do not match the graph's {field}")
        for i, (s, v) in enumerate(zip(specs, values)):
            t, kind = spec_type(s), s.get("kind", "tensor")
            if v.is_const and field == "outputs":
                continue  # a constant output: its type is its tensor's
            if t != v.type or kind != v.kind:
                raise PlanFormatError(f"{prefix(where)}plan header: {field}[{i}]: {kind} {t} differs from the graph's "
                                      f"value '{v.name}' ({v.kind} {v.type})")


def prove_types(g: Graph, where: str = "plan", _depth: int = 0) -> set[str]:
    """Re-run Kiln's type inference over a loaded graph and hold each value's header type against it.

    Graph inputs carry the header's input specs (checked against every feed at run time) and constants
    their tensors' types, so what inference derives from them is proven. A header dtype, rank or static
    dim that contradicts the inferred one is a PlanFormatError naming the value. Where inference cannot
    tell (an unknown dtype, rank or dim) the header's information is kept - inference is legitimately
    weaker than what the builder recorded in places: declared ONNX value_info shapes, data-dependent ops
    (NonZero, ...), passes that set types themselves. The result is `merge_types(inferred, header)`,
    the rule the builder applied, so a genuine plan gets back exactly the types it was built with.

    Returns the names of values that kept header information inference could not confirm.
    """
    from kiln.ir.dims import body_inference
    from kiln.ops.infer import infer_node_guarded, merge_types
    weak: set[str] = set()
    for n in g.nodes:
        inferred, n.guards = infer_node_guarded(n)
        for v, t in zip(n.outputs, inferred):
            _compare(v, t, n, where)
            merged = merge_types(t, v.type)
            if merged != t:
                weak.add(v.name)
            v.type = merged
        for sg in n.subgraphs():
            with body_inference():
                weak |= prove_types(sg, where, _depth + 1)
    return weak


def _compare(v: Value, t: TensorType, n: Node, where: str) -> None:
    h = v.type
    at = f"{prefix(where)}value '{v.name}' (output of layer '{n.name}', {n.op_type})"
    if t.dtype is not None and h.dtype is not None and t.dtype != h.dtype:
        raise PlanFormatError(f"{at}: the plan says {h.dtype.value}, but its inputs make it {t.dtype.value}")
    if t.shape is None or h.shape is None:
        return
    if len(t.shape) != len(h.shape):
        raise PlanFormatError(f"{at}: the plan says rank {len(h.shape)} {h}, but its inputs make it rank "
                              f"{len(t.shape)} {t}")
    for k, (i, d) in enumerate(zip(t.shape, h.shape)):
        if is_int(i) and is_int(d) and i != d:
            raise PlanFormatError(f"{at}: the plan says dim {k} is {d} ({h}), but its inputs make it {i} ({t})")


def _graphs(g: Graph, depth: int = 0) -> list[Graph]:
    out = [g]
    if depth < MAX_SUBGRAPH_DEPTH:
        for n in g.nodes:
            for sg in n.subgraphs():
                out.extend(_graphs(sg, depth + 1))
    return out


def symbol_bounds(header: Mapping[str, Any]) -> dict[str, int]:
    """Largest value each input symbol can take: the max over the profiles bounding that input dim.
    Symbols of inputs no profile names are unbounded (absent; `check_allocations` sizes them at 1, a
    lower bound, and the runtime arena checks the actual sizes)."""
    bound: dict[str, int] = {}
    unbounded: set[str] = set()
    for s in header["inputs"]:
        ranges = [p[s["name"]]["max"] for p in header["profiles"] if s["name"] in p]
        for k, d in enumerate(s.get("shape") or ()):
            if isinstance(d, str):
                if not ranges:
                    unbounded.add(d)
                else:
                    bound[d] = max([bound.get(d, 0)] + [int(mx[k]) for mx in ranges])
    return {d: b for d, b in bound.items() if d not in unbounded}


def tensor_bytes(t: TensorType, bound: Mapping[str, int]) -> int | None:
    """Bytes of a tensor of type t with each symbol at its bound; None when the shape is not resolvable."""
    if t.shape is None:
        return None
    n = t.dtype.itemsize if t.dtype is not None else 1
    for d in t.shape:
        if is_int(d):
            n *= d
        elif isinstance(d, str) and d in bound:
            n *= bound[d]
        else:
            return None
    return n


def check_allocations(header: Mapping[str, Any], g: Graph, where: str = "plan") -> None:
    """Refuse, before anything is allocated, a plan whose activations could not fit: any value whose size
    is static or resolvable at the profiles' max shapes, or the header's arena, above
    kiln.settings' max_activation_bytes (KILN_MAX_ACTIVATION_BYTES; default physical RAM)."""
    limit = limit_bytes("max_activation_bytes")
    arena = (header.get("memory") or {}).get("arena_bytes", 0)
    if is_int(arena) and arena > limit:
        raise PlanFormatError(f"{prefix(where)}plan header: memory.arena_bytes: the activation arena needs {arena} "
                              f"bytes, above the limit of {limit} (KILN_MAX_ACTIVATION_BYTES)")
    bound = symbol_bounds(header)
    symbols = {d for s in header["inputs"] for d in (s.get("shape") or ()) if isinstance(d, str)}
    floor = {d: 1 for d in symbols if d not in bound}
    for sub in _graphs(g):
        for v in sub.values():
            if v.is_const:
                continue
            n = tensor_bytes(v.type, {**floor, **bound})
            if n is not None and n > limit:
                syms = {d for d in v.type.shape or () if isinstance(d, str)}
                least = "at least " if syms & set(floor) else ""
                at = " at the profiles' max shapes" if syms & set(bound) else ""
                raise PlanFormatError(f"{prefix(where)}value '{v.name}' ({v.type}) needs {least}{n} bytes{at}, "
                                      f"above the limit of {limit} (KILN_MAX_ACTIVATION_BYTES)")


def check_memory_plan(memory: Mapping[str, Any], g: Graph, tactics: Mapping[int, tuple[str, dict[str, Any]]],
                      where: str = "plan") -> None:
    """The header's memory plan (informational: the runtime plans its arena itself) names values of the
    graph, and no two buffers alive at the same time overlap (kiln.plan.memory.verify)."""
    if not memory or not memory.get("offsets"):
        return
    from kiln.plan.memory import MemoryPlan, aliases, lifetimes, verify
    offsets, sizes = memory["offsets"], memory["sizes"]
    names = {v.name for v in g.values()}
    for name in offsets:
        if name not in names:
            raise PlanFormatError(f"{prefix(where)}plan header: memory.offsets.{key(name)}: no such value in the graph")
    bufs = [b for b in lifetimes(g, dict(sizes), aliases(g, tactics)) if b.name in offsets]
    try:
        verify(bufs, MemoryPlan(dict(offsets), dict(sizes), memory["arena_bytes"], memory["naive_bytes"]))
    except BuildError as e:
        raise PlanFormatError(f"{prefix(where)}plan header: memory: {e}") from None


def check_weights(weights: Any, where: str = "plan") -> None:
    """The weight table: names -> CPU tensors of element types Kiln holds."""
    import torch
    if not isinstance(weights, dict) or len(weights) > MAX_ITEMS:
        raise PlanFormatError(f"{prefix(where)}plan weights: expected a table of at most {MAX_ITEMS} tensors")
    for k, t in weights.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise PlanFormatError(f"{prefix(where)}plan weights: entry {show(k)} is not a named tensor")
        try:
            DType.from_torch(t.dtype)
        except Exception:
            raise PlanFormatError(f"{prefix(where)}plan weights: {show(k)} has element type {t.dtype}, "
                                  f"which Kiln does not support") from None
        if t.layout != torch.strided or t.is_quantized:
            raise PlanFormatError(f"{prefix(where)}plan weights: {show(k)} is not a dense tensor")

