"""BatchNormalization folding.

* FoldBatchNorm: an inference BN right after a Conv / ConvTranspose / Gemm / MatMul with constant
  weights (whose output nothing else reads) is folded into that layer's weights and bias.
* BatchNormToScale: any other inference BN with constant parameters becomes a per-channel Mul + Add
  (which pointwise fusion then absorbs into its neighbours).

Folding is computed in float64 and stored back in the weights' original dtype.
"""
from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import (Uses, cast_like, const, is_float_weight, is_op, onnx_opset, remove_node,
                                 replace_nodes, take_output)

Tensor = torch.Tensor


def bn_affine(bn: Node) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) in float64 with BN(x) = x * scale + shift per channel, for an inference BN."""
    if not is_op(bn, "BatchNormalization") or len(bn.inputs) < 5:
        return None
    training = bool(bn.attr("training_mode", 0)) if bn.opset >= 14 else len(bn.outputs) > 1
    if training or (bn.opset < 9 and bn.attr("spatial", 1) == 0):
        return None
    params = [const(v) for v in bn.inputs[1:5]]
    if any(p is None or p.dim() != 1 or not is_float_weight(p) for p in params):
        return None
    gamma, beta, mean, var = (p.double() for p in params)  # type: ignore[union-attr]
    if len({gamma.numel(), beta.numel(), mean.numel(), var.numel()}) != 1:
        return None
    scale = gamma / torch.sqrt(var + float(bn.attr("epsilon", 1e-5)))
    return scale, beta - mean * scale


def scaled_conv(p: Node, w: Tensor, b: Tensor | None, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor] | None:
    """Conv / FusedConv / ConvTranspose weights and bias with a per-output-channel affine folded in.

    scale and shift are float64 [Cout]; the results keep the dtypes of w and b.
    """
    k = w.dim() - 2
    if p.op_type != "ConvTranspose":
        cout = w.shape[0]
        if scale.numel() != cout:
            return None
        w2 = w.double() * scale.reshape(-1, *([1] * (k + 1)))
    else:
        g = int(p.attr("group", 1))
        cout = w.shape[1] * g
        if scale.numel() != cout or w.shape[0] % g:
            return None
        wg = w.double().reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        w2 = (wg * scale.reshape(g, 1, w.shape[1], *([1] * k))).reshape(w.shape)
    b0 = torch.zeros(cout, dtype=torch.float64) if b is None else b.double()
    return cast_like(w2, w), cast_like(b0 * scale + shift, w if b is None else b)


class FoldBatchNorm(Pass):
    """Folds inference BatchNormalization into the preceding layer's constant weights."""

    name = "batchnorm folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for bn in list(g.nodes):
            aff = bn_affine(bn)
            x = bn.input(0)
            if aff is None or x is None or x.producer is None or uses.only(x) is not bn:
                continue
            p = x.producer
            if p not in g.nodes or len(p.outputs) != 1:
                continue
            if self._fold(g, p, bn, *aff):
                take_output(p, x, bn.outputs[0])
                remove_node(g, bn)
                ctx.logger.verbose(f"Fusing {p.name} with {bn.name}")
                changed = True
                uses.refresh()
        return changed

    def _fold(self, g: Graph, p: Node, bn: Node, scale: Tensor, shift: Tensor) -> bool:
        if is_op(p, "Conv", "ConvTranspose"):
            w, b = const(p.input(1)), const(p.input(2))
            if not is_float_weight(w) or (p.input(2) is not None and b is None):
                return False
            res = scaled_conv(p, w, b, scale, shift)  # type: ignore[arg-type]
            if res is None:
                return False
            p.inputs = [p.inputs[0], g.constant(f"{p.name}_w_bn", res[0]), g.constant(f"{p.name}_b_bn", res[1])]
            return True
        if bn.inputs[0].type.rank != 2:
            return False
        if is_op(p, "Gemm"):
            return self._fold_gemm(g, p, scale, shift)
        if is_op(p, "MatMul"):
            return self._fold_matmul(g, p, scale, shift)
        return False

    @staticmethod
    def _fold_gemm(g: Graph, p: Node, scale: Tensor, shift: Tensor) -> bool:
        b, c = const(p.input(1)), const(p.input(2))
        if not is_float_weight(b) or b.dim() != 2 or (p.input(2) is not None and c is None):  # type: ignore[union-attr]
            return False
        trans_b = bool(p.attr("transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]  # type: ignore[union-attr]
        if scale.numel() != n:
            return False
        alpha, beta = float(p.attr("alpha", 1.0)), float(p.attr("beta", 1.0))
        per_col = scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1)
        w2 = b.double() * alpha * per_col  # type: ignore[union-attr]
        bias = shift if c is None else c.double() * beta * scale + shift
        p.inputs = [p.inputs[0], g.constant(f"{p.name}_w_bn", cast_like(w2, b)),  # type: ignore[arg-type]
                    g.constant(f"{p.name}_b_bn", cast_like(bias, b if c is None else c))]  # type: ignore[arg-type]
        p.attrs["alpha"], p.attrs["beta"] = 1.0, 1.0
        return True

    @staticmethod
    def _fold_matmul(g: Graph, p: Node, scale: Tensor, shift: Tensor) -> bool:
        b = const(p.input(1))
        a = p.input(0)
        if not is_float_weight(b) or b.dim() != 2 or b.shape[1] != scale.numel() \
                or a is None or a.type.rank != 2:  # type: ignore[union-attr]
            return False
        w2 = b.double() * scale.reshape(1, -1)  # type: ignore[union-attr]
        p.op_type, p.opset = "Gemm", onnx_opset(p)
        p.attrs = {}
        p.inputs = [a, g.constant(f"{p.name}_w_bn", cast_like(w2, b)),  # type: ignore[arg-type]
                    g.constant(f"{p.name}_b_bn", cast_like(shift, b))]  # type: ignore[arg-type]
        return True


class BatchNormToScale(Pass):
    """Rewrites a standalone inference BatchNormalization as x * scale + shift (per channel)."""

    name = "batchnorm to scale"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        for bn in list(g.nodes):
            aff = bn_affine(bn)
            x = bn.input(0)
            if aff is None or x is None or x.type.rank is None or x.type.rank < 2:
                continue
            dtype = x.type.dtype.torch if x.type.dtype is not None and x.type.dtype.is_float else None
            like = dtype or const(bn.inputs[1]).dtype  # type: ignore[union-attr]
            shape = (-1,) + (1,) * (x.type.rank - 2)
            scale = g.constant(f"{bn.name}_scale", aff[0].reshape(shape).to(like).contiguous())
            shift = g.constant(f"{bn.name}_shift", aff[1].reshape(shape).to(like).contiguous())
            mid = g.new_value(f"{bn.name}_scaled", bn.outputs[0].type)
            opset = onnx_opset(bn)
            mul = Node("Mul", [x, scale], [mid], name=f"{bn.name}_mul", opset=opset)
            add = Node("Add", [mid, shift], [bn.outputs[0]], name=f"{bn.name}_add", opset=opset)
            replace_nodes(g, [bn], [mul, add])
            ctx.logger.verbose(f"Converting {bn.name} to a per-channel scale ({mul.name} + {add.name})")
            changed = True
        return changed

