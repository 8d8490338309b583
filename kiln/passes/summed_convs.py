"""Summed convolutions: Add(Conv_a(x), Conv_b(x)) -> one Conv(x) with W_a + W_b and b_a + b_b.

Over-parameterised training blocks (RepVGG, MobileOne, ACNet, DBB) compute several convolutions of one input
side by side and add them: a 3x3 and a 1x1 branch, or k parallel 3x3 branches, each with its folded
BatchNorm, and often a BatchNorm of the input itself (the identity branch: a 1x1 convolution mapping each
channel to itself, merged the same way). Convolution is linear in its weights, so the sum is one convolution whose kernel is the sum of
the branch kernels, each zero-padded to the largest kernel around its centre, and whose bias is the sum of
the biases: the "structural reparameterisation" those papers do by hand before deployment, done here on any
export of the training-time network. k branches become one kernel instead of k.

Merged only where the result is the same convolution output by construction: both plain ONNX Conv nodes
(after BatchNorm and scale folding, before epilogue fusion) with constant float weights and biases, the same
input value, group, strides and dilations, explicit pads (auto_pad NOTSET), and kernels that align: a smaller
kernel, grown by (K - k) / 2 taps on each side (an even difference), has exactly the other's pads. Each branch
output must be read by the Add alone. The merged weights are summed in float64 and rounded once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ops.conv import auto_pad_mode, kernel_shape, strides_dilations, window_ints
from kiln.passes.base import Pass, PassContext
from kiln.passes.batchnorm import bn_affine
from kiln.passes.rewrite import Uses, const, is_float_weight, is_op, per_channel, replace_nodes

Tensor = torch.Tensor


@dataclass
class Branch:
    """A summand as a convolution: weights, bias (None: zeros) and geometry (pads as [begin..., end...])."""

    node: Node
    x: Value
    w: Tensor
    b: Tensor | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: list[int]
    group: int
    inner: tuple[Node, ...] = ()  # nodes before `node` that only it reads (the Mul of a scale branch)


def _conv_branch(n: Node | None) -> Branch | None:
    if not is_op(n, "Conv") or len(n.outputs) != 1 or auto_pad_mode(n) != "NOTSET":  # type: ignore[arg-type]
        return None
    w, b = const(n.input(1)), const(n.input(2))  # type: ignore[union-attr]
    if w is None or not is_float_weight(w) or w.dim() < 3 or (n.input(2) is not None and b is None):  # type: ignore[union-attr]
        return None
    rank = w.dim() - 2
    try:  # the op's own attribute checks; a malformed conv is left for its validation to report
        kernel_shape(n, w)  # type: ignore[arg-type]
        strides, dilations = strides_dilations(n, rank)  # type: ignore[arg-type]
        pads = window_ints(n, "pads", rank, 0)  # type: ignore[arg-type]
    except KilnError:
        return None
    return Branch(n, n.inputs[0], w, b, tuple(strides), tuple(dilations), pads, int(n.attr("group", 1)))  # type: ignore[arg-type,union-attr]


def _affine_of(n: Node | None, channels: int, rank: int, uses: Uses) -> tuple[Value, Tensor, Tensor, tuple[Node, ...]] | None:
    """(x, scale, shift, inner nodes) where n computes x * scale + shift per channel: an inference
    BatchNormalization, or the Add(Mul(x, s), t) BatchNormToScale makes of one."""
    if is_op(n, "BatchNormalization") and len(n.outputs) == 1:  # type: ignore[union-attr]
        ab = bn_affine(n)  # type: ignore[arg-type]
        return None if ab is None or ab[0].numel() != channels else (n.inputs[0], ab[0], ab[1], ())  # type: ignore[union-attr]
    if not is_op(n, "Add") or len(n.inputs) != 2:  # type: ignore[union-attr]
        return None
    for m_v, t_v in (n.inputs, n.inputs[::-1]):  # type: ignore[union-attr]
        t, m = const(t_v), (m_v.producer if m_v is not None else None)
        if t is None or not is_op(m, "Mul") or len(m.inputs) != 2 or uses.only(m.outputs[0]) is not n:  # type: ignore[union-attr]
            continue
        for x, s_v in (m.inputs, m.inputs[::-1]):  # type: ignore[union-attr]
            s = const(s_v)
            if x is None or x.is_const or s is None or not s.dtype.is_floating_point or not t.dtype.is_floating_point:
                continue
            sc, sh = per_channel(s, rank + 2, channels), per_channel(t, rank + 2, channels)
            if sc is not None and sh is not None:
                return x, sc.double(), sh.double(), (m,)  # type: ignore[return-value]
    return None


def _identity_branch(n: Node | None, like: Branch, uses: Uses) -> Branch | None:
    """A per-channel affine of the convolutions' input (RepVGG / MobileOne's identity branch: a BatchNorm of the
    input) as the 1x1 convolution with `like`'s group that computes it: x[c] * scale[c] + shift[c]."""
    cout, cin_g = int(like.w.shape[0]), int(like.w.shape[1])
    rank = like.w.dim() - 2
    aff = _affine_of(n, cout, rank, uses)
    if aff is None or cout != cin_g * like.group:
        return None  # the identity maps channel c to channel c: as many input channels as output ones
    x, scale, shift, inner = aff
    w = torch.zeros((cout, cin_g, *([1] * rank)), dtype=torch.float64)
    w[(torch.arange(cout), torch.arange(cout) % cin_g, *([0] * rank))] = scale.reshape(-1)
    return Branch(n, x, w.to(like.w.dtype), shift.reshape(-1).to(like.w.dtype), (1,) * rank,  # type: ignore[arg-type]
                  like.dilations, [0] * (2 * rank), like.group, inner)


def merged_weights(a: Branch, b: Branch) -> tuple[Tensor, Tensor, list[int]] | None:
    """(W, B, pads) of the one convolution equal to a + b (both read the same input), or None."""
    wa, wb = a.w, b.w
    if wa.dtype != wb.dtype or wa.dim() != wb.dim() or wa.shape[:2] != wb.shape[:2] or a.group != b.group:
        return None
    if a.strides != b.strides or a.dilations != b.dilations or len(a.pads) != len(b.pads):
        return None
    rank, d = wa.dim() - 2, a.dilations
    size = [max(x, y) for x, y in zip(wa.shape[2:], wb.shape[2:])]
    out = torch.zeros((*wa.shape[:2], *size), dtype=torch.float64)
    pads: list[int] | None = None
    for w, p in ((wa, a.pads), (wb, b.pads)):
        grow = [k - int(s) for k, s in zip(size, w.shape[2:])]
        if any(gr % 2 for gr in grow):
            return None
        mine = [p[i] + grow[i] // 2 * d[i] for i in range(rank)] + [p[rank + i] + grow[i] // 2 * d[i] for i in range(rank)]
        if pads is None:
            pads = mine
        elif mine != pads:
            return None
        index = (slice(None), slice(None), *(slice(gr // 2, gr // 2 + int(s)) for gr, s in zip(grow, w.shape[2:])))
        out[index] += w.double()
    bias = torch.zeros(int(wa.shape[0]), dtype=torch.float64)
    for c in (a.b, b.b):
        if c is not None:
            if c.numel() != bias.numel():
                return None
            bias += c.double().reshape(-1)
    return out.to(wa.dtype), bias.to(wa.dtype), pads  # type: ignore[return-value]


class MergeSummedConvs(Pass):
    """Add of two convolutions of the same input -> one convolution (see module doc); repeated, so a chain
    of k summed branches becomes one."""

    name = "summed conv merging"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for add in list(g.nodes):
            if not is_op(add, "Add") or add not in g.nodes or len(add.inputs) != 2 or None in add.inputs:
                continue
            pa, pb = (v.producer for v in add.inputs)  # type: ignore[union-attr]
            a, b = _conv_branch(pa), _conv_branch(pb)
            if a is None and b is not None:
                a, b = b, a
            if a is not None and b is None:
                b = _identity_branch(pb if a.node is pa else pa, a, uses)
            if a is None or b is None or a.node is b.node or b.x is not a.x:
                continue
            if any(uses.only(br.node.outputs[0]) is not add for br in (a, b)):
                continue
            if a.node.outputs[0].type.shape != add.outputs[0].type.shape:
                continue  # not proven the same shape: the Add might broadcast
            m = merged_weights(a, b)
            if m is None:
                continue
            w, bias, pads = m
            name = g.unique_name(a.node.name.split("+")[0] + "+summed")
            attrs = {k: v for k, v in a.node.attrs.items() if k not in ("pads", "kernel_shape")}
            attrs["pads"] = pads
            attrs["kernel_shape"] = [int(k) for k in w.shape[2:]]
            conv = Node("Conv", [a.x, g.constant(f"{name}_W", w), g.constant(f"{name}_B", bias)],
                        [add.outputs[0]], attrs, name=name, opset=a.node.opset)
            replace_nodes(g, [a.node, *b.inner, b.node, add], [conv])
            ctx.logger.verbose(f"Merging summed {b.node.op_type} {b.node.name} into convolution {a.node.name} "
                               f"(Add {add.name}): one {'x'.join(map(str, attrs['kernel_shape']))} convolution")
            changed = True
            uses.refresh()
        return changed
