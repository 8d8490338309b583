"""No-op elimination: Identity, inference Dropout, Cast to the same type, reshapes to the same shape, ...

Each eliminated node's readers read its input instead (a graph output keeps its name: see
kiln.passes.rewrite.bypass). An Expand read by broadcasting elementwise ops that broadcast as far anyway (the
exporters' ``x / norm.clamp_min(eps).expand_as(x)`` of F.normalize) is no-op for those readers: they read its
input, and the copy the Expand made is gone.
"""
from __future__ import annotations

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, bypass, const, is_op, same_shape

_SAME_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")


def _dropout_is_identity(n: Node, uses: Uses) -> bool:
    """Dropout in inference mode whose mask output (if any) nobody reads."""
    if len(n.outputs) > 1 and (uses.of(n.outputs[1]) or uses.is_output(n.outputs[1])):
        return False
    if n.opset >= 12 and n.input(2) is not None:
        training = const(n.input(2))
        return training is not None and training.numel() > 0 and not bool(training.reshape(-1)[0].item())
    return True


def _cast_is_identity(n: Node) -> bool:
    x = n.inputs[0]
    if x is None or x.type.dtype is None:
        return False
    if n.op_type == "CastLike":
        target = n.input(1)
        return target is not None and target.type.dtype == x.type.dtype
    to = n.attr("to")
    try:
        return isinstance(to, int) and DType.from_onnx(to) == x.type.dtype
    except Exception:
        return False


def _no_op_source(n: Node, uses: Uses) -> Value | None:
    """The input that n's first output equals, or None when n does real work."""
    x = n.input(0)
    if x is None or len(n.outputs) < 1:
        return None
    if is_op(n, "Identity") and x.kind == "tensor":
        return x
    if is_op(n, "Dropout"):
        return x if _dropout_is_identity(n, uses) else None
    if is_op(n, "Cast", "CastLike"):
        return x if _cast_is_identity(n) else None
    if is_op(n, *_SAME_SHAPE_OPS) and same_shape(x.type, n.outputs[0].type):
        return x
    if is_op(n, "Transpose") and x.type.rank is not None:
        perm = n.attr("perm")
        return x if perm is not None and list(perm) == list(range(x.type.rank)) else None
    if is_op(n, "Concat", "Sum", "Max", "Min", "Mean") and len(n.inputs) == 1 \
            and same_shape(x.type, n.outputs[0].type):
        return x
    return None


_BROADCASTING = {"Add": 7, "Sub": 7, "Mul": 7, "Div": 7, "Pow": 7, "Mod": 10, "And": 7, "Or": 7, "Xor": 7,
                 "Equal": 7, "Greater": 7, "Less": 7, "GreaterOrEqual": 12, "LessOrEqual": 12, "Max": 8, "Min": 8,
                 "Sum": 8, "Mean": 8, "Where": 9, "BitShift": 11}
"""Elementwise ops with multidirectional (numpy) broadcasting, from the opset where they have it."""


def _expand_is_broadcast(e: Node, reader: Node, k: int) -> bool:
    """Whether `reader`, reading Expand `e`'s output as its input `k`, computes the same if it reads e's input: it
    broadcasts multidirectionally and another of its inputs already has e's output shape, so broadcasting e's
    input (which broadcasts to that shape: Expand's own rule) reaches the same shape and the same values.
    Proven from the types alone (shapes fully known, symbols equal by name)."""
    if not is_op(reader, *_BROADCASTING) or reader.opset < _BROADCASTING[reader.op_type] or reader.subgraphs():
        return False
    out = e.outputs[0]
    return any(j != k and v is not None and v is not out and same_shape(v.type, out.type)
               for j, v in enumerate(reader.inputs))


def _absorb_expand(g: Graph, e: Node, uses: Uses) -> bool:
    """Readers of Expand `e` that broadcast as far anyway read its input instead; True if any did."""
    x, out = e.input(0), e.outputs[0]
    if x is None or x.kind != "tensor" or len(e.outputs) != 1:
        return False
    changed = False
    for r in list(dict.fromkeys(uses.of(out))):
        ks = [k for k, v in enumerate(r.inputs) if v is out]
        if len(ks) == 1 and _expand_is_broadcast(e, r, ks[0]):
            r.inputs = [x if v is out else v for v in r.inputs]
            changed = True
    return changed


class EliminateNoOps(Pass):
    """Removes Identity, inference Dropout, no-op Cast/CastLike, same-shape reshapes, identity transposes."""

    name = "no-op elimination"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if is_op(n, "Expand") and _absorb_expand(g, n, uses):
                ctx.logger.verbose(f"Expand {n.name}: its broadcasting readers read its input")
                changed = True
                uses.refresh()
            src = _no_op_source(n, uses)
            if src is None or len([o for o in n.outputs[1:] if uses.of(o) or uses.is_output(o)]):
                continue
            if bypass(g, n, src, n.outputs[0]):
                ctx.logger.verbose(f"Eliminating identity {n.name} ({n.op_type})")
                changed = True
                uses.refresh()
        return changed
