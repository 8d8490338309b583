"""Scale folding: y = conv(x) (*|/|+|-) c with a uniform or per-output-channel constant c (and, before it, a
scalar affine after a ReLU moved in front of the ReLU: CommuteAffineThroughRelu).

The constant is folded into the convolution's weights and bias (Conv, ConvTranspose, or a FusedConv
that has no activation and no residual yet), when nothing else reads the convolution's output:
    conv * s  -> W*s, B*s        conv / s -> W/s, B/s
    conv + t  -> B+t             conv - t -> B-t         t - conv -> -W, t-B
"""
from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import Pass, PassContext
from kiln.passes.batchnorm import scaled_conv
from kiln.passes.rewrite import (Uses, const, is_float_weight, is_op, per_channel, remove_node, replace_nodes,
                                 take_output)

Tensor = torch.Tensor


def _foldable_conv(p: Node | None) -> bool:
    if p is None:
        return False
    w, b = const(p.input(1)), const(p.input(2))
    if not is_float_weight(w) or (p.input(2) is not None and b is None) or len(p.outputs) != 1:
        return False
    if is_op(p, "Conv", "ConvTranspose"):
        return True
    return p.domain == "kiln" and p.op_type == "FusedConv" and not p.attr("activation") and p.input(3) is None


def _out_channels(p: Node, w: Tensor) -> int:
    return w.shape[1] * int(p.attr("group", 1)) if p.op_type == "ConvTranspose" else w.shape[0]


def _affine(n: Node, x: Value, c: Tensor) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) in float64 with n(x, c) = x * scale + shift."""
    first = n.inputs[0] is x
    c = c.double()
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if n.op_type == "Mul":
        return c, zero
    if n.op_type == "Div":
        return (1.0 / c, zero) if first and bool((c != 0).all()) else None
    if n.op_type == "Add":
        return one, c
    if n.op_type == "Sub":
        return (one, -c) if first else (-one, c)
    return None


class FoldScale(Pass):
    """Folds per-channel / uniform Mul, Div, Add, Sub by constants into the preceding convolution."""

    name = "scale folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if not is_op(n, "Mul", "Div", "Add", "Sub") or len(n.inputs) != 2 or n.opset < 7:
                continue
            for x, cv in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
                c = const(cv)
                if x is None or c is None or x.is_const or not is_float_weight(c) or uses.only(x) is not n:
                    continue
                p = x.producer
                if p not in g.nodes or not _foldable_conv(p) or x.type.dtype is None \
                        or x.type.dtype.torch != c.dtype:
                    continue
                if self._fold(g, n, p, x, c):  # type: ignore[arg-type]
                    take_output(p, x, n.outputs[0])  # type: ignore[arg-type]
                    remove_node(g, n)
                    ctx.logger.verbose(f"Fusing {p.name} with {n.name}")  # type: ignore[union-attr]
                    changed = True
                    uses.refresh()
                    break
        return changed

    @staticmethod
    def _fold(g: Graph, n: Node, p: Node, x: Value, c: Tensor) -> bool:
        w, b = const(p.input(1)), const(p.input(2))
        cout = _out_channels(p, w)  # type: ignore[arg-type]
        vec = per_channel(c, w.dim(), cout)  # type: ignore[union-attr]
        if vec is None:
            return False
        aff = _affine(n, x, vec)
        if aff is None:
            return False
        res = scaled_conv(p, w, b, *aff)  # type: ignore[arg-type]
        if res is None:
            return False
        p.inputs = [p.inputs[0], g.constant(f"{p.name}_w_s", res[0]), g.constant(f"{p.name}_b_s", res[1]),
                    *p.inputs[3:]]
        return True


class CommuteAffineThroughRelu(Pass):
    """A scalar affine after a ReLU, moved in front of it so that scale folding can take it into the conv:

        Relu(y) * s  ->  Relu(y * s)                (s > 0: ReLU commutes with a positive scale, exactly)
        Relu(y) + t  ->  Clip(y + t, min=t)         (max(y, 0) + t = max(y + t, t), exactly)

    HGNetV2's learnable affine block (conv, BN, ReLU, then a learned scalar scale and bias) is this pattern: the
    two elementwise passes after each conv become a conv with scaled weights and bias and a Clip epilogue. Only
    where the ReLU's (or the product's) output is read by the next node alone and is not a graph output."""

    name = "affine through relu"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if n not in g.nodes or not is_op(n, "Mul", "Add") or len(n.inputs) != 2 or n.opset < 7:
                continue
            for r, cv in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
                c = const(cv)
                p = None if r is None else r.producer
                if (c is None or c.numel() != 1 or not is_float_weight(c) or p is None or p not in g.nodes
                        or not is_op(p, "Relu") or uses.only(r) is not n or r.type.dtype is None
                        or r.type.dtype.torch != c.dtype or not torch.isfinite(c).all()):
                    continue
                if n.op_type == "Mul" and not bool((c > 0).all()):
                    continue
                y = p.inputs[0]
                moved = g.new_value(f"{n.name}_pre", r.type)
                first = Node(n.op_type, [y, cv], [moved], {}, name=f"{n.name}_pre", opset=max(n.opset, 13))
                if n.op_type == "Mul":
                    last = Node("Relu", [moved], [n.outputs[0]], {}, name=p.name, opset=p.opset)
                else:
                    lo = g.constant(f"{n.name}_min", c.reshape(()).clone())
                    last = Node("Clip", [moved, lo], [n.outputs[0]], {}, name=f"{p.name}+{n.name}", opset=13)
                replace_nodes(g, [p, n], [first, last])
                ctx.logger.verbose(f"{n.name}: the constant {n.op_type} moved in front of {p.name} "
                                   f"({'Relu(y * s)' if n.op_type == 'Mul' else 'Clip(y + t, min=t)'})")
                changed = True
                uses.refresh()
                break
        return changed
