"""Gemm fusion: Gemm / MatMul with a constant weight (+ bias Add) (+ activation) (+ residual) -> FusedGemm.

FusedGemm stores W as [N, K] (transposed like nn.Linear) with alpha folded in; Gemm's C becomes the
bias (times beta) when it is a constant per-column vector, or Z when it is a runtime tensor of the
output's shape with beta 1; anything else (transA, other C shapes) leaves the Gemm alone.
"""
from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext
from kiln.passes.epilogue import Match, absorb, extend_fused, fused_inputs, match_activation
from kiln.passes.rewrite import (Uses, bypass, cast_like, const, is_float_weight, is_op, onnx_opset, per_channel,
                                 replace_nodes, restore_order, same_shape)
from kiln.passes.weight_quant import transposed

Tensor = torch.Tensor


def _gemm_parts(g: Graph, n: Node) -> tuple[Value, Tensor, Tensor | None, Value | None] | None:
    """(A, W [N, K], bias [N] or None, Z or None) of a Gemm / MatMul that FusedGemm can compute."""
    a, wv = n.input(0), n.input(1)
    w = const(wv)
    if a is None or w is None or not is_float_weight(w) or w.dim() != 2 or a.is_const or len(n.outputs) != 1:
        return None
    if is_op(n, "MatMul"):
        if a.type.rank is None or a.type.rank < 2:
            return None
        return a, w.t().contiguous(), None, None
    if n.attr("transA", 0) or a.type.rank != 2:
        return None
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    wt = w if n.attr("transB", 0) else w.t()
    wt = cast_like(wt.double() * alpha, w) if alpha != 1.0 else wt.contiguous()
    cv = n.input(2)
    if cv is None or beta == 0.0:
        return a, wt, None, None
    c = const(cv)
    if c is None:
        if beta != 1.0 or not same_shape(cv.type, n.outputs[0].type) or cv.type.dtype != a.type.dtype:
            return None
        return a, wt, None, cv
    bias = per_channel(c, 2, wt.shape[0], axis=1)
    if bias is None or not is_float_weight(bias):
        return None
    return a, wt, cast_like(bias.double() * beta, c), None


def _bias_add(out: Value, n_out: int, uses: Uses) -> tuple[Node, Tensor] | None:
    """An Add of a constant [N]-broadcast bias reading `out` (and nothing else reading it)."""
    add = uses.only(out)
    rank = out.type.rank
    if not is_op(add, "Add") or len(add.inputs) != 2 or rank is None or add.opset < 7:  # type: ignore[union-attr]
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]  # type: ignore[union-attr]
    c = const(other)
    if c is None or not is_float_weight(c):
        return None
    bias = per_channel(c, rank, n_out, axis=rank - 1)
    return None if bias is None else (add, bias)  # type: ignore[return-value]


class FuseGemm(Pass):
    """Turns Gemm / MatMul-with-constant-weight (+ bias) (+ activation) (+ residual) into FusedGemm."""

    name = "gemm fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in reversed(list(g.nodes)):
            if is_op(n, "Gemm", "MatMul"):
                changed |= self._convert(g, n, uses, ctx)
            elif n.domain == "kiln" and n.op_type == "FusedGemm" and not (n.attr("activation") and n.input(3)):
                changed |= extend_fused(g, n, uses, ctx)
            else:
                continue
            uses.refresh()
        return changed

    def _convert(self, g: Graph, n: Node, uses: Uses, ctx: PassContext) -> bool:
        parts = _gemm_parts(g, n)
        if parts is None:
            return False
        a, w, bias, z = parts
        absorbed: list[Node] = []
        out = n.outputs[0]
        if z is None:
            ba = _bias_add(out, w.shape[0], uses)
            if ba is not None:
                extra = ba[1].double() if bias is None else bias.double() + ba[1].double()
                bias = cast_like(extra, w)
                absorbed.append(ba[0])
                out = ba[0].outputs[0]
        ep = absorb(Match(out, z=z), uses)
        wc = g.constant(f"{n.name}_w", w)
        wq = n.inputs[1].quant  # a quantized weight's scales, kept where W is only transposed
        if wq is not None and float(n.attr("alpha", 1.0)) == 1.0:
            wc.quant = wq if n.attr("transB", 0) else transposed(wq)
        inputs = fused_inputs(a, wc, None if bias is None else g.constant(f"{n.name}_b", bias), ep.z)
        fused = Node("FusedGemm", inputs, [ep.out], ep.attrs(), name=n.name, domain="kiln", opset=1)
        replace_nodes(g, [n] + absorbed + ep.nodes, [fused])
        for m in absorbed + ep.nodes:
            ctx.logger.verbose(f"Fusing {n.name} with {m.name}")
        if not absorbed and not ep.nodes:
            ctx.logger.verbose(f"Converting {n.name} to FusedGemm")
        return True



class FoldRowAffineIntoGemm(Pass):
    """MatMul (constant W) -> Reshape / Flatten keeping the last dim -> Mul / Add by a constant over that dim
    =>  the Mul folded into W's columns, the Add moved above the Reshape (FuseGemm then takes it as the bias).

    A per-column affine commutes with any reshape that keeps the columns. LeViT's Linear + BatchNorm1d normalizes
    x.flatten(0, 1) and reshapes back: after BatchNormToScale a Mul and an Add per column behind a Flatten, where
    neither the scale folding nor the bias fusion could see them (45 Pointwise layers of LeViT-128S)."""

    name = "row affine folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for r in list(g.nodes):
            while r in g.nodes and self._fold_one(g, r, uses, ctx):
                changed = True
                uses.refresh()
        if changed:
            restore_order(g)
        return changed

    @staticmethod
    def _fold_one(g: Graph, r: Node, uses: Uses, ctx: PassContext) -> bool:
        if not is_op(r, "Reshape", "Flatten") or len(r.outputs) != 1 or not r.inputs or r.inputs[0] is None:
            return False
        x, out = r.inputs[0], r.outputs[0]
        p = x.producer
        # other readers of the product may only read its shape, as its values change when the Mul folds into W
        if p is None or not is_op(p, "MatMul") or uses.is_output(x) or not _only_shape_read(x, r, uses) \
                or _gemm_parts(g, p) is None or x.type.shape is None or out.type.shape is None:
            return False
        cols = x.type.shape[-1]
        if not isinstance(cols, int) or out.type.shape[-1] != cols or uses.is_output(out):
            return False
        n = uses.only(out)
        if n is None or not is_op(n, "Mul", "Add") or len(n.inputs) != 2 or n.opset < 7 \
                or n.outputs[0].kind != out.kind:  # (then the bypass below cannot fail: out is no graph output)
            return False
        other = n.inputs[1] if n.inputs[0] is out else n.inputs[0]
        c, w = const(other), const(p.input(1))
        if c is None or w is None or c.dtype != w.dtype or not is_float_weight(c) \
                or (n.inputs[0] is not out and n.inputs[1] is not out):
            return False
        vec = per_channel(c, len(out.type.shape), cols, axis=len(out.type.shape) - 1)
        if vec is None:
            return False
        if is_op(n, "Mul"):  # W [K, N]: column j times vec[j]
            p.inputs[1] = g.constant(f"{p.name}_w_scaled", cast_like(w.double() * vec.double(), w))
        else:
            biased = g.new_value(f"{x.name}_biased", x.type)
            add = Node("Add", [x, g.constant(f"{n.name}_cols", vec)], [biased], {}, name=g.unique_name(n.name),
                       opset=onnx_opset(n))
            g.nodes.insert(g.nodes.index(r), add)
            for u in uses.of(x):  # the shape readers too, so that the product has one reader, the bias Add
                u.inputs = [biased if v is x else v for v in u.inputs]
        bypass(g, n, out, n.outputs[0])
        ctx.logger.verbose(f"Folding {n.name} ({n.op_type} by a column constant) above {r.name} into {p.name}")
        return True


def _only_shape_read(x: Value, reader: Node, uses: Uses) -> bool:
    """Every reader of x but `reader` reads only its shape (LeViT's reshape_as(x): Shape(x))."""
    return all(u is reader or is_op(u, "Shape", "Size") for u in uses.of(x))


def _gemm_output(x: Value) -> bool:
    """x is a Gemm / MatMul's output, or a constant bias added to one (FuseGemm takes both, as FoldRowAffineIntoGemm
    leaves them)."""
    p = x.producer
    if is_op(p, "Gemm", "MatMul"):
        return True
    if not is_op(p, "Add") or len(p.inputs) != 2:  # type: ignore[union-attr]
        return False
    a, b = p.inputs  # type: ignore[union-attr]
    return any(v is not None and is_op(v.producer, "MatMul") and o is not None and o.is_const
               for v, o in ((a, b), (b, a)))


class HoistActivationAboveReshape(Pass):
    """Gemm / MatMul (+ a constant bias Add) -> Reshape(s) -> activation  =>  ... -> activation -> Reshape(s).

    An elementwise activation commutes with a Reshape; exporters that flatten rows for a 2-D Gemm (GPT-2's
    Conv1D: view, addmm, view) put the reshape between the GEMM and its activation, where the epilogue fusion
    cannot see it. Moved above the Reshape, the activation becomes the FusedGemm's epilogue."""

    name = "activation hoisting"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for r in list(g.nodes):
            if not is_op(r, "Reshape") or len(r.outputs) != 1:
                continue
            out = r.outputs[0]
            first, x = r, r.inputs[0]  # back through a chain of reshapes to the product (LeViT: Flatten, Reshape)
            while x is not None and not _gemm_output(x) and is_op(x.producer, "Reshape", "Flatten") \
                    and uses.only(x) is first and not uses.is_output(x):
                first, x = x.producer, x.producer.inputs[0]  # type: ignore[union-attr]
            if x is None:
                continue
            if not _gemm_output(x) or uses.is_output(x) or x.type.shape is None or not _only_shape_read(x, first, uses):
                continue
            shape_readers = [u for u in uses.of(x) if u is not first]
            m = match_activation(out, uses)
            if m is None or any(uses.is_output(o) for n in m[3] for o in n.outputs if o is not m[4]):
                continue
            nodes, y = m[3], m[4]
            y_type = y.type  # y stays the Reshape's output
            for n in nodes:  # the activation reads the GEMM's rows; its values keep their element types
                n.inputs = [x if v is out else v for v in n.inputs]
                for o in n.outputs:
                    o.type = TensorType(o.type.dtype, x.type.shape)
            flat = g.new_value(f"{y.name}_rows", TensorType(y.type.dtype, x.type.shape))
            last = y.producer
            last.outputs = [flat if v is y else v for v in last.outputs]  # type: ignore[union-attr]
            flat.producer = last
            first.inputs[0] = flat
            y.producer, r.outputs, y.type = r, [y], y_type
            for u in shape_readers:  # the activation's output has x's shape: the product keeps one reader
                u.inputs = [flat if v is x else v for v in u.inputs]
            ctx.logger.verbose(f"Moved {m[0]} {last.name} above {r.name} (into the GEMM's epilogue)")  # type: ignore[union-attr]
            changed = True
            uses.refresh()
        if changed:
            restore_order(g)  # each moved Reshape now reads an activation that stood after it
        return changed
