"""Horizontal fusion: sibling 1x1 FusedConvs reading the same tensor -> one FusedConv + Split; sibling
FusedGemms (a transformer's Q, K and V projections) -> one FusedGemm whose column slices are views.

Siblings must agree on strides, dilations and epilogue (activation, alpha, beta; no residual), have
no padding, group 1 and constant weights. Their weights (and biases, zeros where absent) are
concatenated along the output channels; a Split on axis 1 gives each sibling's output back.

When it pays: k siblings become 2 kernels (conv + split), so k >= 3 always gains. Two siblings only
gain when the Split disappears too, i.e. when their outputs are read only by one channel Concat, side
by side in sibling order: the Concat then reads the fused conv's output directly.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, columns_slice, const, is_float_weight, is_op, replace_nodes, runtime
from kiln.passes.weight_quant import stacked

Tensor = torch.Tensor


def sibling_key(n: Node) -> tuple[Any, ...] | None:
    """What must match for two FusedConvs to be merged (None: n is not a mergeable 1x1 conv)."""
    if n.domain != "kiln" or n.op_type != "FusedConv" or n.input(3) is not None or len(n.outputs) != 1:
        return None
    w = const(n.input(1))
    if w is None or not is_float_weight(w) or any(k != 1 for k in w.shape[2:]):
        return None
    if int(n.attr("group", 1)) != 1 or any(n.attr("pads", None) or []):
        return None
    if n.input(2) is not None and const(n.input(2)) is None:
        return None
    return (tuple(n.attr("strides") or ()), tuple(n.attr("dilations") or ()), n.attr("activation", ""),
            float(n.attr("alpha", 0.0)), float(n.attr("beta", 0.0)), w.dtype, tuple(w.shape[1:]))


def _concat_run(sibs: list[Node], uses: Uses) -> tuple[Node, int, list[Node]] | None:
    """(concat, start, siblings in concat order) when the sibling outputs are read only by one channel
    Concat, side by side."""
    readers = [uses.only(s.outputs[0]) for s in sibs]
    c = readers[0]
    if c is None or not is_op(c, "Concat") or any(r is not c for r in readers):
        return None
    rank = sibs[0].outputs[0].type.rank
    axis = int(c.attr("axis", 1))
    if rank is None or (axis + rank if axis < 0 else axis) != 1:
        return None
    pos = {id(v): i for i, v in enumerate(c.inputs)}
    idx = sorted(pos[id(s.outputs[0])] for s in sibs)
    if idx != list(range(idx[0], idx[0] + len(sibs))):
        return None
    order = sorted(sibs, key=lambda s: pos[id(s.outputs[0])])
    return c, idx[0], order


def _fused_type(sibs: list[Node], channels: int) -> TensorType:
    t = sibs[0].outputs[0].type
    if t.shape is None or len(t.shape) < 2:
        return TensorType(t.dtype, None)
    return TensorType(t.dtype, (t.shape[0], channels, *t.shape[2:]))


def sibling_groups(g: Graph, uses: Uses, key: Callable[[Node], tuple[Any, ...] | None]) \
        -> Iterator[tuple[Value, list[Node]]]:
    """(x, siblings in graph order) for each group of two or more nodes that read runtime value x as their first
    input and agree on `key` (None: not mergeable). The caller refreshes `uses` after each rewrite."""
    for x in [v for v in g.values() if not v.is_const]:
        groups: dict[tuple[Any, ...], list[Node]] = {}
        for n in uses.of(x):
            k = key(n)
            if k is not None and n.inputs[0] is x and n not in groups.get(k, []):
                groups.setdefault(k, []).append(n)
        for sibs in groups.values():
            if len(sibs) >= 2:
                yield x, sorted(sibs, key=uses.pos)


class FuseSiblingConvs(Pass):
    """Merges sibling 1x1 convs that read the same input (see the module docstring for when)."""

    name = "horizontal fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for x, sibs in sibling_groups(g, uses, sibling_key):
            if self._fuse(g, x, sibs, uses, ctx):
                changed = True
                uses.refresh()
        return changed

    def _fuse(self, g: Graph, x: Value, sibs: list[Node], uses: Uses, ctx: PassContext) -> bool:
        run = _concat_run(sibs, uses)
        if run is None and len(sibs) < 3:
            return False
        order = run[2] if run else sibs
        ws: list[Tensor] = []
        bs: list[Tensor] = []
        for s in order:
            w, b = const(s.input(1)), const(s.input(2))
            assert w is not None  # sibling_key checked it
            ws.append(w)
            bs.append(torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.to(w.dtype))
        sizes = [int(w.shape[0]) for w in ws]
        name = "+".join(s.name for s in order)
        out = g.new_value(f"{order[0].outputs[0].name}_h", _fused_type(order, sum(sizes)))
        weights = g.constant(f"{name}_w", torch.cat(ws).contiguous())
        weights.quant = stacked([s.inputs[1] for s in order])  # the siblings' quantized weights' scales
        bias = g.constant(f"{name}_b", torch.cat(bs).contiguous())
        fused = Node("FusedConv", [x, weights, bias], [out], dict(order[0].attrs), name=name, domain="kiln", opset=1)
        for a, b in zip(order, order[1:]):
            ctx.logger.verbose(f"Fusing {a.name} with {b.name} (horizontal)")
        if run is not None:
            concat, start = run[0], run[1]
            concat.inputs[start:start + len(order)] = [out]
            replace_nodes(g, order, [fused], first=True)
            ctx.logger.verbose(f"Concat {concat.name} now reads {name} directly (no split)")
            return True
        split = Node("Split", [out, g.constant(f"{name}_split", torch.tensor(sizes, dtype=torch.int64))],
                     [s.outputs[0] for s in order], {"axis": 1}, name=f"{name}_split", opset=13)
        replace_nodes(g, order, [fused, split], first=True)
        return True



def gemm_key(n: Node) -> tuple[Any, ...] | None:
    """What must match for two FusedGemms to be merged (None: n is not a mergeable gemm): the epilogue, no
    residual, constant weights [N, K] of one dtype and K, a constant bias or none."""
    if n.domain != "kiln" or n.op_type != "FusedGemm" or n.input(3) is not None or len(n.outputs) != 1:
        return None
    w = const(n.input(1))
    if w is None or not is_float_weight(w) or w.dim() != 2 or (n.input(2) is not None and const(n.input(2)) is None):
        return None
    t = n.outputs[0].type
    if t.shape is None or t.shape[-1] != w.shape[0] or not runtime(n.inputs[0]):
        return None
    return (n.attr("activation", ""), float(n.attr("alpha", 0.0)), float(n.attr("beta", 0.0)),
            int(n.attr("act_before_add", 0) or 0), w.dtype, int(w.shape[1]), t.dtype, t.shape[:-1])


class FuseSiblingGemms(Pass):
    """FusedGemms reading the same input with the same epilogue -> one FusedGemm with their weights stacked;
    each sibling's output is a constant Slice of the last axis (a view: kiln.backends.views), so k launches
    become one (a transformer's Q, K and V projections: one GEMM of three times the width)."""

    name = "horizontal gemm fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for x, sibs in sibling_groups(g, uses, gemm_key):
            self._fuse(g, x, sibs, ctx)
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _fuse(g: Graph, x: Value, sibs: list[Node], ctx: PassContext) -> None:
        ws = [const(s.input(1)) for s in sibs]
        bs = [const(s.input(2)) for s in sibs]
        sizes = [int(w.shape[0]) for w in ws]  # type: ignore[union-attr]
        name = "+".join(s.name for s in sibs)
        t = sibs[0].outputs[0].type
        out = g.new_value(f"{sibs[0].outputs[0].name}_h", TensorType(t.dtype, (*t.shape[:-1], sum(sizes))))  # type: ignore[misc]
        inputs = [x, g.constant(f"{name}_w", torch.cat(ws).contiguous())]  # type: ignore[arg-type]
        inputs[1].quant = stacked([s.inputs[1] for s in sibs])  # the siblings' quantized weights' scales
        if any(b is not None for b in bs):
            inputs.append(g.constant(f"{name}_b", torch.cat([
                torch.zeros(n, dtype=w.dtype) if b is None else b.to(w.dtype)  # type: ignore[union-attr]
                for b, w, n in zip(bs, ws, sizes)]).contiguous()))
        new = [Node("FusedGemm", inputs, [out], dict(sibs[0].attrs), name=name, domain="kiln", opset=1)]
        start = 0
        for s, n in zip(sibs, sizes):
            new.append(columns_slice(g, out, start, start + n, s.outputs[0], f"{s.name}_cols"))
            start += n
        replace_nodes(g, sibs, new, first=True)
        ctx.logger.verbose(f"Fusing {' with '.join(s.name for s in sibs)} (horizontal gemm: one GEMM of width "
                           f"{sum(sizes)}, outputs as column views)")


class SplitColumnsToViews(Pass):
    """A Split of the last axis into constant sizes -> one constant Slice per part (views, no copy): a packed
    projection's parts (GPT-2's c_attn output split into Q, K and V) read in place by their consumers."""

    name = "column split views"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(g.nodes):
            parts = self._parts(n)
            if parts is None:
                continue
            new, start = [], 0
            for o, size in zip(n.outputs, parts):
                new.append(columns_slice(g, n.inputs[0], start, start + size, o, f"{n.name}_{len(new)}"))
                start += size
            replace_nodes(g, [n], new)
            ctx.logger.verbose(f"Split {n.name} of the last axis -> {len(new)} column views")
            changed = True
        return changed

    @staticmethod
    def _parts(n: Node) -> list[int] | None:
        if not is_op(n, "Split") or n.domain not in ("", "ai.onnx") or not n.outputs:
            return None
        t = n.inputs[0].type
        axis = int(n.attr("axis", 0))
        if t.shape is None or not t.shape or not isinstance(t.shape[-1], int) or axis not in (-1, len(t.shape) - 1):
            return None
        width = int(t.shape[-1])
        sizes = const(n.input(1)) if n.opset >= 13 else None
        if n.opset < 13 and n.attr("split") is not None:
            parts = [int(a) for a in n.attr("split")]
        elif sizes is not None:
            parts = [int(a) for a in sizes.reshape(-1).tolist()]
        elif n.input(1) is None and n.attr("num_outputs") is None and width % len(n.outputs) == 0:
            parts = [width // len(n.outputs)] * len(n.outputs)
        else:
            return None
        if len(parts) != len(n.outputs) or sum(parts) != width or min(parts) < 0:
            return None
        return parts
