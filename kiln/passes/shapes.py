"""Shape-op simplification: reshape chains, transpose pairs, global pool + flatten.

* Reshape/Flatten/Squeeze/Unsqueeze reading another of these: one Reshape of the first one's input
  to the (known) final shape, or nothing at all when that is the original shape.
* Transpose of a Transpose: one Transpose with the composed permutation, or nothing if it is the identity.
* A global pool (GlobalAveragePool/GlobalMaxPool, or Average/MaxPool whose unpadded window covers the
  whole input) followed by a flatten to [N, C]: one ReduceMean/ReduceMax over the spatial axes
  without keepdims (the [N, C, 1, 1] intermediate is never written).
"""
from __future__ import annotations

import torch

from kiln.ir.dims import DimExpr
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import Pass, PassContext
from kiln.ops.shape_values import shape_entries
from kiln.passes.rewrite import Uses, bypass, is_op, onnx_opset, remove_node, replace_nodes, same_shape

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _reshape_target(v: Value) -> list[int] | None:
    """v's shape as a Reshape argument: static dims, at most one unknown dim as -1, no zeros."""
    shape = v.type.shape
    if shape is None or any(d == 0 for d in shape):
        return None
    unknown = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    if len(unknown) > 1:
        return None
    return [d if isinstance(d, int) else -1 for d in shape]


def _perm(n: Node, rank: int | None) -> list[int] | None:
    perm = n.attr("perm")
    if perm is None:
        return None if rank is None else list(range(rank - 1, -1, -1))
    return [int(p) + len(perm) if p < 0 else int(p) for p in perm]


def _global_pool(p: Node | None) -> str | None:
    """'ReduceMean' / 'ReduceMax' when p pools each whole spatial plane into one value."""
    if p is None or len(p.outputs) != 1:
        return None
    if is_op(p, "GlobalAveragePool"):
        return "ReduceMean"
    if is_op(p, "GlobalMaxPool"):
        return "ReduceMax"
    if not is_op(p, "AveragePool", "MaxPool"):
        return None
    x = p.input(0)
    if x is None or x.type.shape is None or not all(isinstance(d, int) for d in x.type.shape[2:]):
        return None
    nd = len(x.type.shape) - 2
    if list(p.attr("kernel_shape", None) or []) != list(x.type.shape[2:]) \
            or (p.attr("auto_pad", "NOTSET") or "NOTSET") not in ("NOTSET", "VALID") \
            or any(p.attr("pads", None) or []) or any(d != 1 for d in p.attr("dilations", None) or [1] * nd):
        return None
    return "ReduceMean" if p.op_type == "AveragePool" else "ReduceMax"


class SimplifyShapes(Pass):
    """Merges reshape chains and transpose pairs; turns global pool + flatten into one reduction."""

    name = "shape simplification"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = any([self._static_target(g, n, ctx) for n in g.nodes if is_op(n, "Reshape")])
        uses = Uses(g)
        for n in list(g.nodes):
            if n not in g.nodes:
                continue
            x = n.input(0)
            p = x.producer if x is not None else None
            if p is None or p not in g.nodes or n.domain not in ("", "ai.onnx"):
                continue
            if is_op(n, *RESHAPES) and is_op(p, *RESHAPES):
                done = self._merge_reshapes(g, p, n, ctx)
            elif is_op(n, "Transpose") and is_op(p, "Transpose"):
                done = self._merge_transposes(g, p, n, ctx)
            elif is_op(n, "Flatten", "Reshape", "Squeeze") and uses.only(x) is n:  # type: ignore[arg-type]
                done = self._pool_flatten(g, p, n, ctx)
            else:
                continue
            if done:
                changed = True
                uses.refresh()
                if not uses.of(p.outputs[0]) and not uses.is_output(p.outputs[0]) and p in g.nodes:
                    remove_node(g, p)
                    uses.refresh()
        return changed

    @staticmethod
    def _static_target(g: Graph, n: Node, ctx: PassContext) -> bool:
        """A Reshape whose target is computed at run time from shapes (Shape, Gather, Concat, ...)
        but whose dynamic entries are the input's own dims at the same positions: a constant target
        with 0 ("copy this dim") there, so the shape chain leaves the plan."""
        x, shape = n.input(0), n.input(1)
        if (x is None or shape is None or shape.is_const or x.type.shape is None or onnx_opset(n) < 5
                or n.attr("allowzero", 0)):
            return False
        e = shape_entries(shape)
        if e is None or e[1]:
            return False
        target: list[int] = []
        bound = g.input_symbols()  # the symbols bound from the inputs at run time (not names an exporter declared)
        for j, d in enumerate(e[0]):
            if isinstance(d, int):
                target.append(d)
            elif (d in bound or isinstance(d, DimExpr) and d.symbols <= bound) and j < len(x.type.shape) \
                    and x.type.shape[j] == d:
                target.append(0)
            else:
                return False
        n.inputs[1] = Value(g.unique_name(shape.name + "_static"), const=torch.tensor(target, dtype=torch.int64))
        ctx.logger.verbose(f"Reshape {n.name}: run-time target {['?' if not isinstance(d, int) else d for d in e[0]]}"
                           f" is {target} (0 copies the input's dim)")
        return True

    @staticmethod
    def _merge_reshapes(g: Graph, r1: Node, r2: Node, ctx: PassContext) -> bool:
        src, out = r1.inputs[0], r2.outputs[0]
        if src is None or len(r1.outputs) != 1:
            return False
        if same_shape(src.type, out.type):
            if bypass(g, r2, src, out):
                ctx.logger.verbose(f"Eliminating {r1.name} with {r2.name} (reshape back to the original shape)")
                return True
            return False
        target = _reshape_target(out)
        if target is None:
            return False
        shape = g.constant(f"{r2.name}_shape", torch.tensor(target, dtype=torch.int64))
        merged = Node("Reshape", [src, shape], [out], name=r2.name, opset=max(onnx_opset(r2), 14))
        replace_nodes(g, [r2], [merged])
        ctx.logger.verbose(f"Merging {r1.name} with {r2.name}")
        return True

    @staticmethod
    def _merge_transposes(g: Graph, t1: Node, t2: Node, ctx: PassContext) -> bool:
        src, out = t1.inputs[0], t2.outputs[0]
        rank = src.type.rank if src is not None else None
        p1, p2 = _perm(t1, rank), _perm(t2, rank)
        if src is None or p1 is None or p2 is None or len(p1) != len(p2):
            return False
        perm = [p1[i] for i in p2]
        if perm == list(range(len(perm))):
            if bypass(g, t2, src, out):
                ctx.logger.verbose(f"Eliminating {t1.name} with {t2.name} (transposes cancel)")
                return True
            return False
        merged = Node("Transpose", [src], [out], {"perm": perm}, name=t2.name, opset=onnx_opset(t2))
        replace_nodes(g, [t2], [merged])
        ctx.logger.verbose(f"Merging {t1.name} with {t2.name}")
        return True

    @staticmethod
    def _pool_flatten(g: Graph, pool: Node, flat: Node, ctx: PassContext) -> bool:
        op = _global_pool(pool)
        if op is None:
            return False
        x, out = pool.input(0), flat.outputs[0]
        if x is None or x.type.shape is None or out.type.shape is None:
            return False
        if tuple(out.type.shape) != tuple(x.type.shape[:2]):
            return False
        axes = list(range(2, len(x.type.shape)))
        red = Node(op, [x], [out], {"axes": axes, "keepdims": 0}, name=f"{pool.name}+{flat.name}", opset=13)
        replace_nodes(g, [flat], [red])
        ctx.logger.verbose(f"Fusing {pool.name} with {flat.name} ({op} over the spatial axes)")
        return True
