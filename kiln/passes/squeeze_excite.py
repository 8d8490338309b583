"""Squeeze-and-excite gates: global average pool -> 1x1 FusedConv (+ act) -> 1x1 FusedConv + gate act -> one SEGate.

An SE block (EfficientNet, MobileNetV3, RegNetY, SSDlite's and PP-OCR's backbones) computes its gate from a
pooled [N, C, 1, 1] tensor with two tiny 1x1 convolutions; each of the three is a kernel launch on the GPU
at a few microseconds of work. After conv fusion they look like

    p = ReduceMean(x, axes=[2, 3], keepdims=1)  |  GlobalAveragePool(x)        (optional, see below)
    h = FusedConv(p, W1 [R, C, 1, 1], B1?, activation in {"", Relu, SiLU, HardSwish})
    g = FusedConv(h, W2 [O, R, 1, 1], B2?, activation in {Sigmoid, HardSigmoid})

and become ``g = SEGate(x, W1 [R, C], B1, W2 [O, R], B2)`` (kiln.ops.squeeze_excite; an absent bias becomes
zeros). The pool is absorbed when the conv_reduce is its only reader; otherwise the SEGate reads the pooled
tensor itself (the mean over a 1x1 map is the identity). The convs must be plain 1x1 convolutions of the
pooled map (stride 1, no pads, one group, no residual, no folded Cast), h must have no other reader and not
be a graph output, and every float type involved (input, weights, biases, output) must be the same.
"""
from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ops.activations import Epilogue
from kiln.ops.squeeze_excite import GATE_ACTIVATIONS, REDUCE_ACTIVATIONS
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import FLOAT_DTYPES, Uses, const, is_op, replace_nodes

Tensor = torch.Tensor


def _global_mean(n: Node | None) -> bool:
    """GlobalAveragePool, or ReduceMean over exactly axes 2 and 3 of a rank-4 input with keepdims=1 (axes as the
    attribute, or from opset 18 as a constant input)."""
    if n is None or len(n.outputs) != 1 or not n.inputs or n.inputs[0] is None or n.inputs[0].type.rank != 4:
        return False
    if is_op(n, "GlobalAveragePool"):
        return len(n.inputs) == 1
    if not is_op(n, "ReduceMean") or int(n.attr("keepdims", 1)) != 1:
        return False
    if n.opset >= 18:
        c = const(n.input(1))
        if c is None or c.dtype not in (torch.int64, torch.int32) or len(n.inputs) != 2:
            return False
        axes = [int(a) for a in c.reshape(-1).tolist()]
    else:
        if len(n.inputs) != 1:
            return False
        axes = [int(a) for a in n.attr("axes", None) or []]
    return len(axes) == 2 and all(-4 <= a < 4 for a in axes) and {a % 4 for a in axes} == {2, 3}


def _pooled(v: Value) -> bool:
    """v is known to be a rank-4 [N, C, 1, 1] tensor."""
    s = v.type.shape
    return s is not None and len(s) == 4 and s[2] == 1 and s[3] == 1


def _conv1x1(n: Node | None, acts: tuple[str, ...]) -> tuple[Tensor, Tensor | None, Epilogue] | None:
    """(W [O, I], B [O] or None, epilogue) of a FusedConv that is a plain 1x1 convolution (stride 1, no pads,
    one group, constant weight and bias, no residual, no out_dtype) with an activation from `acts`."""
    if n is None or n.domain != "kiln" or n.op_type != "FusedConv" or len(n.inputs) > 3 or len(n.outputs) != 1:
        return None
    w, b = const(n.input(1)), const(n.input(2))
    if w is None or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or (n.input(2) is not None and b is None):
        return None
    if int(n.attr("group", 1)) != 1 or any(int(s) != 1 for s in n.attr("strides", None) or [1, 1]) \
            or any(int(p) != 0 for p in n.attr("pads", None) or [0] * 4):
        return None
    ep = Epilogue.of(n)
    if ep.activation not in acts or ep.out_dtype is not None:
        return None
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
        return None
    return w.reshape(w.shape[0], w.shape[1]), b, ep


class FuseSqueezeExcite(Pass):
    """(global average pool ->) 1x1 FusedConv -> 1x1 FusedConv with a sigmoid gate -> one SEGate."""

    name = "squeeze-excite fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        gone: set[int] = set()  # ids of nodes an earlier rewrite replaced
        for expand in list(g.nodes):
            if id(expand) in gone:
                continue
            se = self._match(g, expand, uses)
            if se is None:
                continue
            node, old = se
            replace_nodes(g, old, [node])
            gone |= {id(n) for n in old}
            uses.refresh()
            changed = True
            ctx.logger.verbose(f"Fusing squeeze-excite {', '.join(n.name for n in old)} into SEGate {node.name}")
        return changed

    def _match(self, g: Graph, expand: Node, uses: Uses) -> tuple[Node, list[Node]] | None:
        c2 = _conv1x1(expand, GATE_ACTIVATIONS)
        if c2 is None:
            return None
        h = expand.inputs[0]
        reduce = h.producer
        c1 = _conv1x1(reduce, REDUCE_ACTIVATIONS)
        if c1 is None or reduce is None or uses.only(h) is not expand:
            return None
        (w1, b1, ep1), (w2, b2, ep2) = c1, c2
        if w2.shape[1] != w1.shape[0]:
            return None
        p = reduce.inputs[0]
        pool = p.producer
        absorb = _global_mean(pool) and uses.only(p) is reduce and pool in g.nodes
        x = pool.inputs[0] if absorb else p  # type: ignore[union-attr]
        if not absorb and not _pooled(p):
            return None
        if x.type.rank != 4 or x.type.shape is None:
            return None
        dt = w1.dtype
        y = expand.outputs[0]
        if dt not in FLOAT_DTYPES or x.type.dtype is None or x.type.dtype.torch != dt or y.type.dtype != x.type.dtype \
                or any(t is not None and t.dtype != dt for t in (w2, b1, b2)):
            return None
        if isinstance(x.type.shape[1], int) and x.type.shape[1] != w1.shape[1]:
            return None
        b1 = torch.zeros(w1.shape[0], dtype=dt) if b1 is None else b1
        b2 = torch.zeros(w2.shape[0], dtype=dt) if b2 is None else b2
        name = g.unique_name(f"{expand.name}_se")
        inputs = [x, g.constant(f"{name}_w1", w1.contiguous().clone()), g.constant(f"{name}_b1", b1.clone()),
                  g.constant(f"{name}_w2", w2.contiguous().clone()), g.constant(f"{name}_b2", b2.clone())]
        attrs = {"reduce_activation": ep1.activation, "reduce_alpha": ep1.alpha, "reduce_beta": ep1.beta,
                 "gate_activation": ep2.activation, "gate_alpha": ep2.alpha, "gate_beta": ep2.beta}
        node = Node("SEGate", inputs, [y], attrs, name=name, domain="kiln", opset=1)
        old = ([pool] if absorb else []) + [reduce, expand]  # type: ignore[list-item]
        return node, old
