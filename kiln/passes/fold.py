"""Constant folding: nodes whose inputs are all build-time constants become constants; an If whose condition
is a constant becomes the branch it always takes."""
from __future__ import annotations

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ops.registry import lookup
from kiln.passes.base import Pass, PassContext
from kiln.ops.shape_values import static_value

MAX_FOLD_BYTES = 1 << 28
_SHAPE_OPS = ("Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat")


class FoldConstants(Pass):
    """Evaluates constant subgraphs with the reference implementation; Shape of static tensors and the
    static entries of shape chains over dynamic ones (kiln.ops.shape_values) count as constants."""

    name = "constant folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        kept = []
        folded = 0
        for n in g.nodes:
            taken = _taken_branch(n)
            if taken is not None:
                kept.extend(_inline(n, taken))
                folded += 1
                continue
            values = self._fold(n, ctx)
            if values is None:
                kept.append(n)
                continue
            for old, t in zip(n.outputs, values):
                new = Value(g.unique_name(old.name + "_const"), const=t)
                g.replace_uses(old, new)
            folded += 1
        for sub in (s for n in kept for s in n.subgraphs()):
            self.run(sub, ctx)
        g.nodes = kept
        if folded:
            ctx.logger.verbose(f"Folded {folded} constant layers")
        return folded > 0

    @staticmethod
    def _fold(n, ctx: PassContext) -> list[torch.Tensor] | None:
        if n.subgraphs() or n.captures:
            return None
        opdef = lookup(n.op_type, n.domain)
        if not opdef.deterministic:
            return None
        if n.op_type in ("Shape", "Size") and n.domain == "" and n.inputs and n.inputs[0] is not None \
                and n.inputs[0].type.is_static:
            x = n.inputs[0]
            # a CPU tensor of x's shape holding no data (stride 0): the op reads its shape only, and its
            # result is a real tensor (a meta input made a meta result, which never folded)
            args = [torch.zeros((), dtype=(x.type.dtype or DType.FLOAT32).torch).expand(x.type.shape)]
        elif all(v is None or v.is_const for v in n.inputs):
            args = [None if v is None else v.const for v in n.inputs]
        elif n.op_type in _SHAPE_OPS and n.domain == "" and len(n.outputs) == 1 \
                and n.outputs[0].type.dtype in (None, DType.INT64):
            t = static_value(n.outputs[0])  # e.g. Gather(Shape(x), 2) where x's dim 2 is static
            return None if t is None else [t]
        else:
            return None
        try:
            r = opdef.compute(n, *args)
        except Exception as e:
            ctx.logger.verbose(f"not folding {n.name} ({n.op_type}): {e}")
            return None
        outs = list(r) if isinstance(r, tuple) else [r]
        if len(n.outputs) == 1 and isinstance(r, tuple):
            outs = [r[0]]
        if len(outs) < len(n.outputs) or not all(isinstance(t, torch.Tensor) for t in outs[:len(n.outputs)]):
            return None
        outs = outs[:len(n.outputs)]
        if any(t.is_meta or t.numel() * t.element_size() > MAX_FOLD_BYTES for t in outs):
            return None
        return [t.detach().contiguous() for t in outs]


def _taken_branch(n: Node) -> Graph | None:
    """The branch an If with a constant one-element condition always takes (None for anything else)."""
    if n.op_type != "If" or n.domain not in ("", "ai.onnx") or not n.inputs or n.inputs[0] is None:
        return None
    c = n.inputs[0].const
    if c is None or c.numel() != 1:
        return None
    branch = n.attr("then_branch" if bool(c.reshape(-1)[0]) else "else_branch")
    if not isinstance(branch, Graph) or branch.inputs or len(branch.outputs) != len(n.outputs):
        return None
    return branch


def _inline(n: Node, branch: Graph) -> list[Node]:
    """The nodes replacing If `n` by `branch`: the branch's own nodes (they read the outer values it captures
    directly), then one Identity per output, which keeps the If's output names (no-op elimination later
    bypasses them where it can)."""
    tail = [Node("Identity", [b], [o], name=f"{n.name}/{o.name}", opset=max(n.opset, 14))
            for b, o in zip(branch.outputs, n.outputs)]
    for b, o in zip(branch.outputs, n.outputs):
        if o.type.shape is None or o.type.dtype is None:
            o.type = b.type
    return list(branch.nodes) + tail
