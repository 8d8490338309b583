"""OpDef and the op registry: one op = one place (attributes, opsets, inference, reference kernel).

An OpDef subclass names the ONNX op(s) it implements and provides `compute`, the reference
implementation in torch ops (runs on CPU and CUDA; it is also the constant folder, the
fallback tactic, and a test oracle). Shape/type inference defaults to running `compute` on
meta tensors (see kiln.ops.infer); ops whose output shape depends on data override `infer`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.attrs import Attr

Tensor = torch.Tensor
Computed = Any  # a Tensor, a list of Tensors (sequence value), None (empty optional), or a tuple of these


class OpDef:
    """Definition of one ONNX operator (or a family sharing one implementation).

    op_type:       the ONNX name, or a tuple of names sharing this definition
    domain:        ONNX domain ("" is ai.onnx)
    opsets:        inclusive range of opset versions this definition implements
    value_inputs:  inputs read as host values (shapes, axes, pads): constant at build time
                   for static inference; read with .tolist() at run time
    deterministic: False for random ops, which are never constant-folded
    attributes:    declared attributes (kiln.ops.attrs.Attr) refining the ONNX schema's (ranges, allowed
                   values) or, for ops ONNX does not define, declaring them; see kiln.ops.attrs
    arity:         (min, max) number of inputs (omitted optional ones counted in their positions), for ops
                   ONNX does not define; None: the ONNX schema's (kiln.ops.attrs.check_arity)
    out_arity:     the same for outputs
    """

    op_type: ClassVar[str | tuple[str, ...]] = ""
    domain: ClassVar[str] = ""
    opsets: ClassVar[tuple[int, int]] = (1, 28)
    value_inputs: ClassVar[tuple[int, ...]] = ()
    deterministic: ClassVar[bool] = True
    attributes: ClassVar[dict[str, Attr]] = {}
    arity: ClassVar[tuple[int, int] | None] = None
    out_arity: ClassVar[tuple[int, int] | None] = None

    def compute(self, node: Node, *inputs: Any) -> Computed:
        """Reference implementation: one output returns its value; several return a tuple."""
        raise NotImplementedError

    def bind(self, node: Node) -> Callable[..., Computed]:
        """`compute` for one node as fn(*inputs): the reference tactic's kernel. Ops whose node needs
        decoding (a program, a table) override it to decode once, at build, instead of on every run."""
        compute = self.compute
        return lambda *xs: compute(node, *xs)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """Output types from input types (and constant inputs, where known)."""
        from kiln.ops.infer import infer_by_meta
        return infer_by_meta(self, node, types, consts)

    def check(self, node: Node) -> None:
        """Raise UnsupportedOpError for attribute values this definition cannot honour."""


def require(cond: Any, message: Callable[[], str]) -> None:
    """A shape precondition of an op: ValueError(message()) when it fails on real sizes; while types are
    inferred on symbolic sizes (kiln.ops.symbolic) it is recorded as an assumption instead of decided."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, message)
    elif not cond:
        raise ValueError(message())


_REGISTRY: dict[tuple[str, str], OpDef] = {}


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator adding an OpDef to the registry under each of its op names."""
    names = cls.op_type if isinstance(cls.op_type, tuple) else (cls.op_type,)
    inst = cls()
    for name in names:
        key = (_norm_domain(cls.domain), name)
        if key in _REGISTRY:
            raise RuntimeError(f"op {key} defined twice: {type(_REGISTRY[key]).__name__} and {cls.__name__}")
        _REGISTRY[key] = inst
    return cls


def simple_op(name: str | tuple[str, ...], fn: Callable[..., Computed], *, value_inputs: tuple[int, ...] = (),
              opsets: tuple[int, int] = (1, 28), domain: str = "") -> type[OpDef]:
    """Register an op whose reference implementation is `fn(node, *inputs)`."""
    cls = type(f"Op_{name if isinstance(name, str) else name[0]}", (OpDef,), {
        "op_type": name, "value_inputs": value_inputs, "opsets": opsets, "domain": domain,
        "compute": lambda self, node, *xs: fn(node, *xs),
    })
    return register(cls)


def lookup(op_type: str, domain: str = "", opset: int | None = None, where: str = "") -> OpDef:
    """The OpDef for (domain, op_type) at an opset version; a clear error naming the node otherwise."""
    _ensure_loaded()
    d = _norm_domain(domain)
    opdef = _REGISTRY.get((d, op_type))
    if opdef is None:
        from kiln.plugins.registry import find_plugin
        opdef = find_plugin(op_type, d)
    dom = d or "ai.onnx"
    at = f"node '{where}': " if where else ""
    if opdef is None:
        version = "" if opset is None else f", opset {opset}"
        hint = "" if not d else ("; register a plugin for it (@kiln.plugins.plugin, a 'kiln.plugins' entry point or "
                                 "kiln.plugins.load(path); docs/PLUGINS.md)")
        raise UnsupportedOpError(f"{at}unsupported op {op_type} (domain {dom}{version}): no built-in op or registered "
                                 f"plugin implements it{hint}")
    lo, hi = opdef.opsets
    if opset is not None and not lo <= opset <= hi:
        raise UnsupportedOpError(f"{at}op {op_type} (domain {dom}) is supported for opsets {lo}-{hi}, "
                                 f"not opset {opset}")
    return opdef


def is_registered(op_type: str, domain: str = "") -> bool:
    _ensure_loaded()
    return (_norm_domain(domain), op_type) in _REGISTRY


def all_ops() -> dict[tuple[str, str], OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


_loaded = False


def _ensure_loaded() -> None:
    """Import every module of kiln.ops so that each family registers its definitions."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    import kiln.ops as pkg
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if mod not in ("registry", "infer", "util", "attrs"):
            importlib.import_module(f"kiln.ops.{mod}")


# ---- small helpers shared by op modules ---------------------------------------------------------

def ints(t: Tensor | Sequence[int] | None) -> list[int]:
    """Host list of ints from a shape-like tensor or sequence."""
    if t is None:
        return []
    if isinstance(t, Tensor):  # tolist, not reshape: no torch op runs (kiln.ops.symbolic reads constants so)
        vals = t.tolist()
        vals = vals if isinstance(vals, list) else [vals]
        while vals and isinstance(vals[0], list):
            vals = [x for row in vals for x in row]
        return [int(x) for x in vals]
    # symbolic ints (kiln.ops.symbolic: dims a shape chain holds) stay symbolic; int() would specialise them
    return [x if isinstance(x, torch.SymInt) else int(x) for x in t]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
