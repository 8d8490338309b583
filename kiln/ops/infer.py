"""Type inference: each op's default (its reference implementation run on meta tensors when every input
dim is static, symbolically otherwise: kiln.ops.symbolic), and the graph-level driver `infer_types`
(shared by the builder's passes and the plan loader). Constant inputs are passed as real tensors so
that shape-like inputs (Reshape's shape, Slice's starts, ...) are read as values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from kiln.ir.dims import GUARDS_ALLOWED, GUARDS_OUT, DimGuard, body_inference
from kiln.ir.dtype import DType
from kiln.ir.types import TensorType

if TYPE_CHECKING:
    from kiln.ir.graph import Graph, Node
    from kiln.logger import Logger
    from kiln.ops.registry import OpDef

def _unknown(node: "Node") -> list[TensorType]:
    return [TensorType(None, None) for _ in node.outputs]


def _materialize(t: TensorType, sizes: dict[Any, int], real: torch.Tensor | None, as_value: bool) -> Any:
    if real is not None and as_value:
        return real
    dims = [d if isinstance(d, int) else sizes[d] for d in t.shape]  # type: ignore[union-attr]
    return torch.empty(dims, dtype=t.dtype.torch, device="meta")  # type: ignore[union-attr]


def _run(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None], consts: Sequence[torch.Tensor | None],
         sizes: dict[Any, int]) -> list[Any] | None:
    args: list[Any] = []
    for i, (t, c) in enumerate(zip(types, consts)):
        if t is None and c is None:
            args.append(None)
            continue
        if c is None and i in opdef.value_inputs:
            return None  # a shape-like input only known at run time
        if c is None and (t is None or t.dtype is None or t.shape is None):
            return None
        args.append(_materialize(t, sizes, c, i in opdef.value_inputs))  # type: ignore[arg-type]
    try:
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            out = opdef.compute(node, *args)
        else:  # only real (constant) inputs: the op computes on real data, which a plan or model may make huge
            with _MetaAboveBudget():
                out = opdef.compute(node, *args)
    except Exception:
        return None
    outs = list(out) if isinstance(out, tuple) else [out]
    return outs


REAL_OP_BYTES = 1 << 26  # the largest output one torch op may really allocate while a type is inferred

try:
    from torch.utils import _pytree as _tree
    from torch.utils._python_dispatch import TorchDispatchMode as _DispatchMode
except ImportError:  # pragma: no cover - a torch without Python dispatch modes: no budget
    _DispatchMode = None  # type: ignore[assignment,misc]


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


if _DispatchMode is not None:
    class _MetaAboveBudget(_DispatchMode):  # type: ignore[valid-type,misc]
        """While a type is inferred from real (constant) inputs (ConstantOfShape or Range of a constant, a
        random op's shape attribute), each torch op first runs on meta tensors; one whose output would pass
        REAL_OP_BYTES returns that meta result instead of allocating: inference needs only its type. Ops
        without a meta kernel (reading a value: .item(), nonzero) run as they are."""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            try:
                m_args, m_kwargs = _tree.tree_map(_to_meta, (args, kwargs))
                if "device" in m_kwargs:
                    m_kwargs["device"] = torch.device("meta")
                meta = func(*m_args, **m_kwargs)
                size = sum(t.nelement() * t.element_size() for t in _tree.tree_leaves(meta)
                           if isinstance(t, torch.Tensor))
            except Exception:
                return func(*args, **kwargs)
            return meta if size > REAL_OP_BYTES else func(*args, **kwargs)
else:  # pragma: no cover
    import contextlib

    def _MetaAboveBudget() -> Any:  # type: ignore[no-redef]
        return contextlib.nullcontext()


def infer_by_meta(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                  consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
    """Output types of `node`: one meta run when every input dim is static, else a symbolic run."""
    runtime_values = any(c is None and i < len(types) and types[i] is not None and node.input(i) is not None
                         for i, c in enumerate(consts) if i in opdef.value_inputs)
    if not runtime_values and all(t is None or t.shape is None or all(isinstance(d, int) for d in t.shape)
                                  for t in types):
        outs = _run(opdef, node, types, consts, {})
        if outs is None:
            return _unknown(node)
        return [_static_type(o) for o in outs[:len(node.outputs)]] + _unknown(node)[len(outs):]
    from kiln.ops.symbolic import infer_symbolic  # symbolic imports this module
    return infer_symbolic(opdef, node, types, consts)


def element_type(o: Any) -> DType | None:
    """Kiln's element type of a computed tensor (None for a type Kiln has no name for)."""
    try:
        return DType.from_torch(o.dtype)
    except Exception:
        return None


def _static_type(o: Any) -> TensorType:
    if not isinstance(o, torch.Tensor):
        return TensorType(None, None)
    return TensorType(element_type(o), tuple(int(d) for d in o.shape))


# ---- the graph-level driver (used by the builder's passes and by the plan loader) --------------------

def merge_types(inferred: TensorType, declared: TensorType) -> TensorType:
    """`inferred`, with the declared dtype and rank filling in what inference could not tell (and a declared
    static dim kept where inference only has a symbol)."""
    dtype = inferred.dtype or declared.dtype
    if inferred.shape is None:
        return TensorType(dtype, None if declared.shape is None else
                          tuple(d if isinstance(d, int) else None for d in declared.shape))
    if declared.shape is None or len(declared.shape) != len(inferred.shape):
        return TensorType(dtype, inferred.shape)
    # a declared dim never stands in for one inference could not prove (a declared symbol is only a label,
    # an exporter's name bound by no input; a declared size is only the exporter's word); a declared size
    # is kept where inference has a symbol
    dims = tuple(d if isinstance(d, int) and isinstance(i, str) else i for i, d in zip(inferred.shape, declared.shape))
    return TensorType(dtype, dims)


def infer_node(n: "Node", logger: "Logger | None" = None) -> list[TensorType]:
    """Output types of one node from its inputs' current types (unknown types where inference fails)."""
    return infer_node_guarded(n, logger)[0]


def infer_node_guarded(n: "Node", logger: "Logger | None" = None
                       ) -> tuple[list[TensorType], tuple[DimGuard, ...]]:
    """infer_node's types and the dim equalities they rest on (kiln.ir.dims.DimGuard), which whoever sets the
    types as the graph's (infer_types, the plan loader's prove_types) records as `n.guards`."""
    from kiln.ops.registry import lookup
    types = [None if v is None else v.type for v in n.inputs]
    consts = [None if v is None else v.const for v in n.inputs]
    guards: list[DimGuard] | None = [] if GUARDS_ALLOWED.get() else None
    token = GUARDS_OUT.set(guards)
    try:
        out = lookup(n.op_type, n.domain).infer(n, types, consts)
    except Exception as e:  # inference must never be fatal; execution reports real errors
        if logger:
            logger.verbose(f"shape inference skipped for {n.name} ({n.op_type}): {e}")
        out = [TensorType(None, None)] * len(n.outputs)
        guards = None
    finally:
        GUARDS_OUT.reset(token)
    if out and out[0].shape is None and n.op_type == "Reshape" and n.domain in ("", "ai.onnx"):
        out = [_reshape_to_shape_of(n) or out[0]] + list(out[1:])
    out = list(out)[:len(n.outputs)]
    return (out + [TensorType(None, None)] * (len(n.outputs) - len(out)),
            tuple(dict.fromkeys(g.with_node(n.name) for g in guards or ())))


def infer_types(g: "Graph", logger: "Logger | None" = None) -> None:
    """Set every node output's type from its inputs' types, keeping declared info where inference is blind."""
    for n in g.nodes:
        for sg in n.subgraphs():  # first: an If's output types are what its branches' outputs have now
            with body_inference():
                infer_types(sg, logger)
        types, n.guards = infer_node_guarded(n, logger)
        for v, t in zip(n.outputs, types):
            v.type = merge_types(t, v.type)


def _reshape_to_shape_of(n: "Node") -> TensorType | None:
    """Reshape(x, Shape(y)) (exported GroupNorm and the like): the output has y's dims, which the
    per-op inference cannot see because the shape is a run-time value."""
    x, shape = n.input(0), n.input(1)
    src = shape.producer if shape is not None else None
    if (x is None or src is None or src.op_type != "Shape" or src.attr("start") is not None
            or src.attr("end") is not None or n.opset < 5):
        return None
    y = src.input(0)
    if y is None or y.type.shape is None:
        return None
    return TensorType(x.type.dtype, tuple(y.type.shape))
