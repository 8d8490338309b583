"""Type and shape propagation through a Graph using each op's `infer`."""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.passes.base import Pass, PassContext
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
        if out and out[0].shape is None and n.op_type == "Reshape" and n.domain in ("", "ai.onnx"):
            out = [_reshape_to_shape_of(n) or out[0]] + list(out[1:])
        for v, t in zip(n.outputs, out):
            v.type = _merge(t, v.type)
        for sg in n.subgraphs():
            infer_types(sg, logger)


def _reshape_to_shape_of(n: Node) -> TensorType | None:
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


class InferTypes(Pass):
    """Re-runs type inference once folding has turned shape inputs into constants (the types set at
    load time could not read them); only types change, so it never counts as a rewrite."""

    name = "type inference"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        infer_types(g, ctx.logger)
        return False
