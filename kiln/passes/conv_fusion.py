"""Conv fusion: Conv (+ bias) + activation + residual Add -> one FusedConv; ConvTranspose likewise -> one
FusedConvTranspose (only where it absorbs something: a bare ConvTranspose stays the ONNX op).

Every Conv with constant float weights becomes a FusedConv (auto_pad resolved into explicit pads),
absorbing the activation that follows it (Relu, LeakyRelu, Clip, Sigmoid, Tanh, HardSigmoid,
HardSwish, Mish, Gelu, and the x*sigmoid(x) / x*hardsigmoid(x) / x*tanh(softplus(x)) patterns)
and a residual Add of a runtime tensor with the output's shape (before or after the activation).
The fused node takes the place of the last node it absorbs, so Z is always computed before it.
Convs are visited last to first so that, when both operands of an Add are convs, the later conv
absorbs the Add and the earlier one's output becomes Z.
"""
from __future__ import annotations

from typing import Any

from kiln.ir.graph import Graph, Node
from kiln.ops.conv import ConvGeometry
from kiln.passes.base import Pass, PassContext
from kiln.passes.epilogue import Match, absorb, extend_fused, fused_inputs
from kiln.passes.rewrite import Uses, const, is_float_weight, is_op, replace_nodes


def conv_geometry(conv: Node) -> dict[str, Any] | None:
    """strides/pads/dilations/group of a Conv with auto_pad resolved (FusedConv's attributes); None if the
    input shape is needed but unknown, or the geometry is not one FusedConv takes (kiln.ops.conv.ConvGeometry)."""
    geo = ConvGeometry.of(conv)
    return None if geo is None else geo.attrs()


class FuseConv(Pass):
    """Turns Conv (+ activation) (+ residual Add) into FusedConv; extends existing FusedConvs likewise."""

    name = "conv fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for conv in reversed(list(g.nodes)):
            if is_op(conv, "Conv"):
                changed |= self._convert(g, conv, uses, ctx)
            elif is_op(conv, "ConvTranspose"):
                changed |= self._convert_transposed(g, conv, uses, ctx)
            elif conv.domain == "kiln" and conv.op_type in ("FusedConv", "FusedConvTranspose"):
                changed |= self._extend(g, conv, uses, ctx)
            else:
                continue
            uses.refresh()
        return changed

    def _convert(self, g: Graph, conv: Node, uses: Uses, ctx: PassContext) -> bool:
        w, b = const(conv.input(1)), const(conv.input(2))
        if not is_float_weight(w) or (conv.input(2) is not None and b is None) or len(conv.outputs) != 1:
            return False
        geo = conv_geometry(conv)
        if geo is None:
            return False
        ep = absorb(Match(conv.outputs[0]), uses)
        inputs = fused_inputs(conv.inputs[0], conv.inputs[1], conv.input(2), ep.z)
        fused = Node("FusedConv", inputs, [ep.out], {**geo, **ep.attrs()}, name=conv.name, domain="kiln", opset=1)
        replace_nodes(g, [conv] + ep.nodes, [fused])
        for n in ep.nodes:
            ctx.logger.verbose(f"Fusing {conv.name} with {n.name}")
        if not ep.nodes:
            ctx.logger.verbose(f"Converting {conv.name} to FusedConv")
        return True

    def _convert_transposed(self, g: Graph, conv: Node, uses: Uses, ctx: PassContext) -> bool:
        w, b = const(conv.input(1)), const(conv.input(2))
        if not is_float_weight(w) or (conv.input(2) is not None and b is None) or len(conv.outputs) != 1:
            return False
        ep = absorb(Match(conv.outputs[0]), uses)
        if not ep.nodes:
            return False
        inputs = fused_inputs(conv.inputs[0], conv.inputs[1], conv.input(2), ep.z)
        fused = Node("FusedConvTranspose", inputs, [ep.out], {**conv.attrs, **ep.attrs()}, name=conv.name,
                     domain="kiln", opset=1)
        replace_nodes(g, [conv] + ep.nodes, [fused])
        for n in ep.nodes:
            ctx.logger.verbose(f"Fusing {conv.name} with {n.name}")
        return True

    def _extend(self, g: Graph, fc: Node, uses: Uses, ctx: PassContext) -> bool:
        if fc.attr("activation") and fc.input(3) is not None:
            return False
        return extend_fused(g, fc, uses, ctx)
