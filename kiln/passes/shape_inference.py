"""Type and shape propagation through a Graph using each op's `infer`."""
from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.registry import lookup


def _merge(inferred: TensorType, declared: TensorType) -> TensorType:
    dtype = inferred.dtype or declared.dtype
    if inferred.shape is None:
        return TensorType(dtype, declared.shape)
    if declared.shape is None or len(declared.shape) != len(inferred.shape):
        return TensorType(dtype, inferred.shape)
    dims = tuple(d if isinstance(d, int) and not isinstance(i, int) else (d if i is None else i)
                 for i, d in zip(inferred.shape, declared.shape))
    return TensorType(dtype, dims)


def infer_types(g: Graph, logger: Logger | None = None) -> None:
    """Set every node output's type from its inputs' types, keeping declared info where inference is blind."""
    for n in g.nodes:
        opdef = lookup(n.op_type, n.domain)
        types = [None if v is None else v.type for v in n.inputs]
        consts = [None if v is None else v.const for v in n.inputs]
        try:
            out = opdef.infer(n, types, consts)
        except Exception as e:  # inference must never be fatal; execution reports real errors
            if logger:
                logger.verbose(f"shape inference skipped for {n.name} ({n.op_type}): {e}")
            out = [TensorType(None, None)] * len(n.outputs)
        for v, t in zip(n.outputs, out):
            v.type = _merge(t, v.type)
        for sg in n.subgraphs():
            infer_types(sg, logger)
