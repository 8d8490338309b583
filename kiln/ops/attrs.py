"""Declared attributes: each op's attributes (name, kind, default, allowed values or range, opsets), once.

For ai.onnx ops the base declaration is the ONNX schema of the node's opset (kind, default, required),
read from `onnx.defs`; an OpDef refines it in its `attributes` table with what its implementation can
honour (ranges, allowed values) and declares its own attributes where ONNX has none (Kiln's fused ops,
plugins). Kiln's private marks (`PRIVATE`) are declared here once for every op.

`validate_attrs` is the one check: the ONNX importer runs it on every node, the plan loader on every
step (a plan is untrusted input), the Pointwise program parser on every instruction. After it, every
declared attribute a node carries has its declared Python type (ints are ints, floats are floats, lists
are lists of them), so passes and tactics read them without re-parsing; `read(node, name)` gives a
declared attribute with its declared default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import onnx
import onnx.defs
import torch

from kiln.errors import UnsupportedOpError

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
"""Default of an attribute a node must carry."""

KINDS = ("int", "float", "str", "ints", "floats", "strs", "tensor", "tensors", "graph", "graphs", "type", "types",
         "struct")
"""'struct': plain data (dicts with string keys, lists, strings, numbers, booleans, None) of bounded depth and
size, whose meaning the op's own `check` validates (a Pointwise program)."""
MAX_DEPTH = 16
_INT64 = (-(2**63), 2**63 - 1)
MAX_STR = 1 << 16
MAX_LIST = 1 << 20


@dataclass(frozen=True)
class Attr:
    """One declared attribute.

    kind:    one of KINDS ("int", "floats", "graph", ...)
    default: the value when absent (REQUIRED: the node must carry it; None: absence has its own meaning)
    choices: allowed values (per element for lists)
    min/max: allowed range (inclusive, per element for lists)
    length:  allowed list lengths
    opsets:  the opset versions (inclusive) in which the op has this attribute
    """

    kind: str
    default: Any = None
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    length: tuple[int, ...] | None = None
    opsets: tuple[int, int] = (1, 1000)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}")


PRIVATE: dict[str, Attr] = {
    "kiln_elide": Attr("int", 0, choices=(0, 1)),  # a Concat whose producers write into its output (passes/concat.py)
    "kiln_z_donate": Attr("int", 0, choices=(0, 1)),  # a FusedConv that may add into its residual in place
}
"""Marks Kiln's passes put on nodes of any op; a model may not carry them."""

_ONNX_KINDS = {
    onnx.defs.OpSchema.AttrType.FLOAT: "float", onnx.defs.OpSchema.AttrType.INT: "int",
    onnx.defs.OpSchema.AttrType.STRING: "str", onnx.defs.OpSchema.AttrType.TENSOR: "tensor",
    onnx.defs.OpSchema.AttrType.GRAPH: "graph", onnx.defs.OpSchema.AttrType.FLOATS: "floats",
    onnx.defs.OpSchema.AttrType.INTS: "ints", onnx.defs.OpSchema.AttrType.STRINGS: "strs",
    onnx.defs.OpSchema.AttrType.TENSORS: "tensors", onnx.defs.OpSchema.AttrType.GRAPHS: "graphs",
    onnx.defs.OpSchema.AttrType.SPARSE_TENSOR: "tensor", onnx.defs.OpSchema.AttrType.SPARSE_TENSORS: "tensors",
    onnx.defs.OpSchema.AttrType.TYPE_PROTO: "type", onnx.defs.OpSchema.AttrType.TYPE_PROTOS: "types",
}


def _schema_attrs(op_type: str, domain: str, opset: int) -> dict[str, Attr] | None:
    """The ONNX schema's declaration at this opset, or None where onnx has no schema for the op."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # onnx raises SchemaError for unknown ops / versions
        return None
    out: dict[str, Attr] = {}
    for name, a in schema.attributes.items():
        kind = _ONNX_KINDS.get(a.type)
        if kind is None:
            continue
        default: Any = REQUIRED if a.required else None
        if a.default_value is not None and a.default_value.type != 0:
            try:
                default = onnx.helper.get_attribute_value(a.default_value)
                if isinstance(default, bytes):
                    default = default.decode("utf-8", errors="replace")
                elif isinstance(default, list) and default and isinstance(default[0], bytes):
                    default = [s.decode("utf-8", errors="replace") for s in default]
            except Exception:
                default = None
        out[name] = Attr(kind, default)
    return out


@lru_cache(maxsize=4096)
def declared(op_type: str, domain: str, opset: int) -> tuple[dict[str, Attr], bool]:
    """(declarations of the op's attributes at this opset, whether the list is closed).

    Closed: the op has an ONNX schema or declares its attributes itself, so an attribute outside the
    list is an error. An op with neither (a plugin that declares nothing) only gets kind checks."""
    from kiln.ops.registry import lookup
    opdef = lookup(op_type, domain)
    base = _schema_attrs(op_type, domain, opset) if domain in ("", "ai.onnx") else None
    own = {k: a for k, a in getattr(type(opdef), "attributes", {}).items() if a.opsets[0] <= opset <= a.opsets[1]}
    closed = base is not None or bool(getattr(type(opdef), "attributes", {})) or domain == "kiln"
    merged = dict(base or {})
    for name, a in own.items():
        if name in merged and a.kind != merged[name].kind:
            raise RuntimeError(f"{op_type}.{name}: declared {a.kind}, ONNX says {merged[name].kind}")
        merged[name] = a
    return {**merged, **PRIVATE}, closed


def _bad(where: str, op_type: str, name: str, what: str) -> UnsupportedOpError:
    at = f"node '{where}': " if where else ""
    return UnsupportedOpError(f"{at}{op_type} attribute '{name}' {what}")


def _scalar(kind: str, v: Any) -> Any:
    """v converted to the element kind, or raise TypeError/ValueError."""
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError("an int")
        if not _INT64[0] <= v <= _INT64[1]:
            raise ValueError("an int64")
        return v
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError("a number")
        return float(v)
    if kind == "str":
        if not isinstance(v, str):
            raise TypeError("a string")
        if len(v) > MAX_STR:
            raise ValueError(f"a string of at most {MAX_STR} characters")
        return v
    if kind == "tensor":
        if not isinstance(v, torch.Tensor):
            raise TypeError("a tensor")
        return v
    if kind == "graph":
        from kiln.ir.graph import Graph
        if not isinstance(v, Graph):
            raise TypeError("a graph")
        return v
    if kind == "type":
        if not isinstance(v, onnx.TypeProto):
            raise TypeError("a type")
        return v
    if kind == "struct":
        _plain(v, 0, [0])
        return v
    raise TypeError(kind)


def _plain(v: Any, depth: int, count: list[int]) -> None:
    """Raise unless v is plain data within MAX_DEPTH levels and MAX_LIST items in all."""
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_LIST:
        raise ValueError(f"plain data of at most {MAX_DEPTH} levels and {MAX_LIST} items")
    if v is None or isinstance(v, (bool, int, float)):
        return
    if isinstance(v, str):
        if len(v) > MAX_STR:
            raise ValueError(f"strings of at most {MAX_STR} characters")
        return
    if isinstance(v, (list, tuple)):
        for x in v:
            _plain(x, depth + 1, count)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError("plain data with string keys")
            _plain(x, depth + 1, count)
        return
    raise TypeError("plain data")


def check_value(op_type: str, name: str, a: Attr, v: Any, where: str = "") -> Any:
    """v checked against its declaration and converted to the declared Python type."""
    many = a.kind in ("ints", "floats", "strs", "tensors", "graphs", "types")
    elem = {"ints": "int", "floats": "float", "strs": "str", "tensors": "tensor", "graphs": "graph",
            "types": "type"}.get(a.kind, a.kind)
    try:
        if many:
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"a list of {elem}s")
            if len(v) > MAX_LIST:
                raise ValueError(f"a list of at most {MAX_LIST} values")
            out: Any = [_scalar(elem, x) for x in v]
            items = out
        else:
            out = _scalar(elem, v)
            items = [out]
    except (TypeError, ValueError) as e:
        raise _bad(where, op_type, name, f"must be {e}, got {_show(v)}") from None
    if many and a.length is not None and len(out) not in a.length:
        raise _bad(where, op_type, name, f"must have {' or '.join(map(str, a.length))} values, got {len(out)}")
    for x in items:
        if a.choices is not None and x not in a.choices:
            raise _bad(where, op_type, name, f"must be one of {', '.join(map(repr, a.choices))}, got {_show(x)}")
        if a.min is not None and not (x >= a.min):
            raise _bad(where, op_type, name, f"must be >= {a.min}, got {_show(x)}")
        if a.max is not None and not (x <= a.max):
            raise _bad(where, op_type, name, f"must be <= {a.max}, got {_show(x)}")
    return out


def _show(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def validate_attrs(op_type: str, domain: str, opset: int, attrs: Mapping[str, Any], where: str = "",
                   private: bool = True) -> dict[str, Any]:
    """`attrs` checked against the op's declaration at `opset`, with declared types; raises
    UnsupportedOpError naming the node and attribute. `private=False` refuses Kiln's own marks (a model
    may not carry them)."""
    decl, closed = declared(op_type, "" if domain == "ai.onnx" else domain, opset)
    out: dict[str, Any] = {}
    for name, v in attrs.items():
        if not isinstance(name, str):
            raise _bad(where, op_type, repr(name), "has a name that is not a string")
        a = decl.get(name)
        if a is None or (not private and name in PRIVATE):
            if closed or name in PRIVATE:
                raise _bad(where, op_type, name, f"is not an attribute of {op_type} (opset {opset})")
            out[name] = _any(op_type, name, v, where)
            continue
        out[name] = check_value(op_type, name, a, v, where)
    for name, a in decl.items():
        if a.default is REQUIRED and name not in out:
            raise _bad(where, op_type, name, "is required")
    return out


def _any(op_type: str, name: str, v: Any, where: str) -> Any:
    """An undeclared attribute of an op that declares none: one of the attribute kinds."""
    for kind in KINDS:
        try:
            return check_value(op_type, name, Attr(kind), v, where)
        except UnsupportedOpError:
            continue
    raise _bad(where, op_type, name, f"has a value of no attribute kind: {_show(v)}")


def validate_node(node: Any, private: bool = True) -> None:
    """Validate a Node's attributes in place (see validate_attrs)."""
    node.attrs = validate_attrs(node.op_type, node.domain, node.opset, node.attrs, node.name, private)


@lru_cache(maxsize=4096)
def _schema_arity(op_type: str, domain: str, opset: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((min, max) inputs, (min, max) outputs) of the ONNX schema at this opset; None where onnx has none."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # onnx raises SchemaError for unknown ops / versions
        return None
    return (schema.min_input, schema.max_input), (schema.min_output, schema.max_output)


def declared_arity(op_type: str, domain: str, opset: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """((min, max) inputs, (min, max) outputs) a node of the op may have, counting omitted optional inputs
    and outputs in their positions; None where nothing says. The OpDef's own `arity` / `out_arity` where it
    declares them (Kiln's fused ops, plugins), else, for ai.onnx ops, the ONNX schema's at the opset."""
    from kiln.ops.registry import lookup
    domain = "" if domain == "ai.onnx" else domain
    opdef = lookup(op_type, domain)
    base = _schema_arity(op_type, domain, opset) if domain == "" else None
    ins = getattr(type(opdef), "arity", None) or (base[0] if base else None)
    outs = getattr(type(opdef), "out_arity", None) or (base[1] if base else None)
    return ins, outs


def check_arity(node: Any) -> None:
    """Raise UnsupportedOpError naming the node when its number of inputs or outputs (captures excluded) is
    outside what its op accepts (`declared_arity`): a plan step or a model node with an extra input would
    otherwise reach the kernel as an extra positional argument."""
    ins, outs = declared_arity(node.op_type, node.domain, node.opset)
    for what, n, bounds in (("inputs", len(node.inputs), ins), ("outputs", len(node.outputs), outs)):
        if bounds is None:
            continue
        lo, hi = bounds
        if not lo <= n <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi < 1 << 30 else f"at least {lo}"
            noun = what[:-1] if want == "1" else what
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} (opset {node.opset}) takes {want} "
                                     f"{noun}, got {n}")


def read(node: Any, name: str) -> Any:
    """A declared attribute of a node, or its declared default (None when absence has its own meaning)."""
    if name in node.attrs:
        return node.attrs[name]
    decl, _ = declared(node.op_type, "" if node.domain == "ai.onnx" else node.domain, node.opset)
    a = decl.get(name)
    if a is None:
        raise KeyError(f"{node.op_type} declares no attribute '{name}'")
    return None if a.default is REQUIRED else a.default
