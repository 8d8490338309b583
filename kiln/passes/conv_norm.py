"""Depthwise conv + channels-last LayerNorm -> one FusedConvNorm layer (kiln.ops.fused), on the CUDA target.

ConvNeXt's block (and its descendants: ConvNeXt-V2, the hybrid nets that borrow its block) opens with a 7x7
depthwise conv whose output is permuted to channels-last and normalized over the channels:

    FusedConv(X, W [C, 1, KH, KW], B) [group C, no residual] -> y -> Transpose(perm [0, 2, 3, 1]) -> t
        -> LayerNormalization(t, Scale [C], NB [C], axis -1) -> out
    => FusedConvNorm(X, W, B, Scale, NB) -> out

On the GPU the conv already computes in NHWC, so a program holding every channel of its pixels can normalize
them before storing: one launch, and the conv's output is never written nor read back (cuda.triton_dwconv).
The CPU target keeps the two layers (oneDNN's depthwise conv and cpu.layernorm have no such fused form).
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, PassContext
from kiln.passes.residual_norm import _norm
from kiln.passes.rewrite import Uses, const, replace_nodes

_CONV_ATTRS = ("strides", "pads", "dilations", "group", "kernel_shape", "activation", "alpha", "beta")


def _depthwise(p: Node | None) -> bool:
    """A 2-D FusedConv with a constant [C, 1, KH, KW] weight, C groups, no residual and no stored-type change."""
    if p is None or p.domain != "kiln" or p.op_type != "FusedConv" or p.input(3) is not None or len(p.outputs) != 1:
        return False
    w = const(p.input(1))
    return (w is not None and w.dim() == 4 and int(w.shape[1]) == 1 and int(p.attr("group", 1)) == int(w.shape[0]) > 1
            and p.attr("out_dtype") is None and (p.input(2) is None or const(p.input(2)) is not None))


def _channel_norm(n: Node, channels: int) -> bool:
    """A LayerNormalization over the last axis of a rank-4 tensor with [C] scale (and bias)."""
    if n.op_type != "LayerNormalization" or not _norm(n):
        return False
    shape = n.inputs[0].type.shape
    if shape is None or len(shape) != 4 or int(n.attr("axis", -1)) not in (-1, 3):
        return False
    return all(v is None or tuple(const(v).shape) == (channels,) for v in n.inputs[1:])  # type: ignore[union-attr]


class FuseConvNorm(Pass):
    """Depthwise FusedConv -> Transpose to NHWC -> LayerNorm over C => FusedConvNorm (see the module docstring)."""

    name = "conv norm fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        if ctx.device != "cuda":
            return False
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if n.op_type != "LayerNormalization":
                continue
            t = n.inputs[0].producer
            if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or \
                    [int(p) for p in (t.attr("perm") or [])] != [0, 2, 3, 1] or uses.only(t.outputs[0]) is not n:
                continue
            conv = t.inputs[0].producer
            if not _depthwise(conv) or uses.only(conv.outputs[0]) is not t:  # type: ignore[union-attr]
                continue
            assert conv is not None
            c = int(conv.inputs[1].const.shape[0])  # type: ignore[union-attr]
            y, out = conv.outputs[0], n.outputs[0]
            if not _channel_norm(n, c) or y.type.dtype != out.type.dtype:
                continue
            attrs = {k: conv.attrs[k] for k in _CONV_ATTRS if k in conv.attrs}
            attrs["epsilon"] = float(n.attr("epsilon", 1e-5))
            scale = n.inputs[1]
            nb = n.input(2)
            fused = Node("FusedConvNorm", [conv.inputs[0], conv.inputs[1], conv.input(2), scale]
                         + ([nb] if nb is not None else []), [out], attrs, name=f"{conv.name}+{n.name}",
                         domain="kiln", opset=1)
            replace_nodes(g, [conv, t, n], [fused])
            ctx.logger.verbose(f"Fusing {n.name} (LayerNormalization over {c} channels) into the depthwise conv "
                               f"{conv.name}: one kernel convolves, normalizes each pixel's channels and stores NHWC")
            uses.refresh()
            changed = True
        return changed
