"""Residual add + normalization -> one AddLayerNormalization layer (kiln.ops.norm), on the CUDA target.

A transformer block ends each sublayer with ``LayerNorm(x + sublayer(x))`` (post-norm: BERT) or keeps the sum as
its residual stream and normalizes it for the next sublayer (pre-norm: ViT, GPT-2, Llama with RMSNorm). Unfused,
the sum is one pass over the activations (the projection GEMM's residual epilogue, or an Add) and the norm
another that reads it back. Fused, the GEMM keeps only its bias (cuBLASLt adds it in the GEMM) and the norm
kernel adds the residual as it loads the row, storing the sum as a second output only where something else
reads it: one launch and one write and read of the activations fewer per sublayer.

    FusedGemm(A, W, B, Z) [no activation] -> h -> LayerNormalization / RMSNormalization(h)
    Add(x, r) [two run-time tensors of one shape]            -> h -> LayerNormalization / RMSNormalization(h)
    Add(x, C) [C a constant broadcasting to x's shape]       -> h -> ...   (ViT's position embedding)
        => (FusedGemm(A, W, B) -> g,) AddLayerNormalization(g | x, Z | r) -> y (, h where h is read elsewhere)

The norm must be one the Triton kernel runs (cuda.triton_layernorm: Y only, stash_type float32, constant scale
and bias over the normalized dims). The CPU target keeps the unfused form: there oneDNN adds the residual as a
post-op of the GEMM itself and cpu.layernorm_c reads the sum once, so fusing would gain nothing.
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, const, is_op, replace_nodes, runtime, same_shape

NORMS = {"LayerNormalization": 17, "RMSNormalization": 23}
"""Norm op -> the first ai.onnx opset that defines it."""


def _norm(n: Node) -> bool:
    """A LayerNormalization / RMSNormalization with Y only, stash_type float32 and constant parameters."""
    if n.domain not in ("", "ai.onnx") or n.op_type not in NORMS or n.opset < NORMS[n.op_type]:
        return False
    if len(n.outputs) != 1 or int(n.attr("stash_type", 1)) != 1 or len(n.inputs) > 3:
        return False
    return all(v is None or const(v) is not None for v in n.inputs[1:])


def _sum_of(h: Value, uses: Uses) -> tuple[Node, Value, Value] | None:
    """(producer, X, R) when h is a residual sum the norm can take over: a FusedGemm's residual with no
    activation (X then its output without the residual), or an Add of two run-time tensors of h's shape."""
    p = h.producer
    if p is None or len(p.outputs) != 1:
        return None
    if p.domain == "kiln" and p.op_type == "FusedGemm":
        z = p.input(3)
        if (z is None or not runtime(z) or p.attr("activation", "") or p.attr("out_dtype") is not None
                or z.type.dtype != h.type.dtype or not same_shape(z.type, h.type)):
            return None
        return p, h, z
    if is_op(p, "Add") and p.domain in ("", "ai.onnx") and len(p.inputs) == 2:
        a, b = p.inputs
        if runtime(a) and runtime(b) and a is not b and all(
                v.type.dtype == h.type.dtype and same_shape(v.type, h.type) for v in (a, b)):
            return p, a, b
        for x, r in ((a, b), (b, a)):
            if runtime(x) and x.type.dtype == h.type.dtype and same_shape(x.type, h.type):
                c = _outer_broadcast(r, h)
                if c is not None:
                    return p, x, c
    return None


def _outer_broadcast(r: Value | None, h: Value) -> Value | None:
    """A constant R of h's type that broadcasts to h's shape (ViT's position embedding [1, S, D] added to every
    image), as a constant of h's rank (leading 1s added); None otherwise."""
    c = const(r)
    if r is None or c is None or r.type.dtype != h.type.dtype or h.type.shape is None or c.dim() > len(h.type.shape):
        return None
    shape = [1] * (len(h.type.shape) - c.dim()) + list(c.shape)
    if any(n != 1 and n != d for n, d in zip(shape, h.type.shape)):
        return None
    return r if c.dim() == len(shape) else Value(f"{r.name}_r{len(shape)}", const=c.reshape(shape))


class FuseResidualNorm(Pass):
    """Residual sums feeding a LayerNorm / RMSNorm -> AddLayerNormalization (see the module docstring)."""

    name = "residual norm fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        if ctx.device != "cuda":
            return False
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if not _norm(n):
                continue
            h = n.inputs[0]
            found = _sum_of(h, uses)
            if found is None:
                continue
            p, x, r = found
            new: list[Node] = []
            if p.op_type == "FusedGemm":
                x = g.new_value(f"{h.name}_gemm", h.type)
                new.append(Node("FusedGemm", p.inputs[:3], [x], dict(p.attrs), name=p.name, domain="kiln", opset=1))
            keep_sum = uses.is_output(h) or len(uses.of(h)) > 1
            if any(uses.pos(u) < uses.pos(n) for u in uses.of(h) if u is not n):
                continue  # the sum is read before the norm: it cannot move to the norm's place
            attrs = {"axis": int(n.attr("axis", -1)), "epsilon": float(n.attr("epsilon", 1e-5)),
                     "rms": int(n.op_type == "RMSNormalization")}
            new.append(Node("AddLayerNormalization", [x, r, *n.inputs[1:]], [n.outputs[0]] + ([h] if keep_sum else []),
                            attrs, name=f"{n.name}+add", domain="kiln", opset=1))
            replace_nodes(g, [p, n], new)
            ctx.logger.verbose(f"Fusing the residual add of {p.name} into {n.name} ({n.op_type}: one kernel adds, "
                               f"normalizes{' and stores the sum' if keep_sum else ''})")
            uses.refresh()
            changed = True
        return changed
