"""Epilogue matching shared by conv and gemm fusion: activations (incl. x*f(x) patterns) and residual adds.

An epilogue is what FusedConv / FusedGemm apply after the bias: `activation(alpha, beta)` and a
residual input Z, with `act_before_add` saying which comes first (see kiln.ops.fused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.rewrite import Uses, is_op, replace_nodes, runtime, same_shape, scalar

if TYPE_CHECKING:
    from kiln.passes.base import PassContext

FLT_MAX = 3.4028234663852886e38  # Clip bounds that are absent


@dataclass
class Epilogue:
    """The epilogue accumulated so far, the nodes it absorbed, and the value it now produces."""

    out: Value
    activation: str = ""
    alpha: float = 0.0
    beta: float = 0.0
    z: Value | None = None
    act_before_add: int = 0
    nodes: list[Node] = field(default_factory=list)

    @staticmethod
    def of(n: Node) -> "Epilogue":
        """The epilogue a FusedConv / FusedGemm node already has."""
        return Epilogue(n.outputs[0], str(n.attr("activation", "") or ""), float(n.attr("alpha", 0.0)),
                        float(n.attr("beta", 0.0)), n.input(3), int(n.attr("act_before_add", 0)))

    def attrs(self) -> dict[str, object]:
        return {"activation": self.activation, "alpha": self.alpha, "beta": self.beta,
                "act_before_add": self.act_before_add}


def _clip_bounds(n: Node) -> tuple[float, float] | None:
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        for v in n.inputs[1:3]:
            if v is not None and (not v.is_const or v.const.numel() != 1):  # type: ignore[union-attr]
                return None
        lo, hi = scalar(n.input(1)), scalar(n.input(2))
    return (-FLT_MAX if lo is None else float(lo)), (FLT_MAX if hi is None else float(hi))


def _unary_activation(n: Node) -> tuple[str, float, float] | None:
    """The fused activation a single ONNX activation node computes, if it is one FusedConv supports."""
    if len(n.outputs) != 1 or n.domain not in ("", "ai.onnx"):
        return None
    op = n.op_type
    if op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "Mish"):
        return op, 0.0, 0.0
    if op == "LeakyRelu":
        return op, float(n.attr("alpha", 0.01)), 0.0
    if op == "HardSigmoid":
        return op, float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    if op == "Gelu":
        approx = n.attr("approximate", "none")
        return ({"none": ("Gelu", 0.0, 0.0), "tanh": ("GeluTanh", 0.0, 0.0)}.get(approx))
    if op == "Swish" and float(n.attr("alpha", 1.0)) == 1.0:
        return "SiLU", 0.0, 0.0
    if op == "Clip":
        b = _clip_bounds(n)
        if b is None:
            return None
        if b[0] == 0.0 and b[1] >= FLT_MAX:
            return "Relu", 0.0, 0.0
        return "Clip", b[0], b[1]
    return None


def _gate(x: Value, uses: Uses) -> tuple[str, list[Node], Value] | None:
    """x * f(x) with f = Sigmoid (SiLU), HardSigmoid(1/6, 1/2) (HardSwish) or Tanh(Softplus) (Mish)."""
    users = uses.of(x)
    if len(users) != 2 or uses.is_output(x):
        return None
    mul = next((u for u in users if is_op(u, "Mul") and len(u.inputs) == 2), None)
    first = next((u for u in users if u is not mul), None)
    if mul is None or first is None or len(first.outputs) != 1 or first.input(0) is not x:
        return None
    chain = [first]
    if is_op(first, "Softplus"):
        t = uses.only(first.outputs[0])
        if not is_op(t, "Tanh"):
            return None
        chain.append(t)  # type: ignore[arg-type]
        name = "Mish"
    elif is_op(first, "Sigmoid"):
        name = "SiLU"
    elif is_op(first, "HardSigmoid") and abs(float(first.attr("alpha", 0.2)) - 1 / 6) < 1e-6 \
            and abs(float(first.attr("beta", 0.5)) - 0.5) < 1e-6:
        name = "HardSwish"
    else:
        return None
    gate = chain[-1].outputs[0]
    if uses.only(gate) is not mul or {id(v) for v in mul.inputs} != {id(x), id(gate)}:
        return None
    return name, chain + [mul], mul.outputs[0]


def match_activation(x: Value, uses: Uses) -> tuple[str, float, float, list[Node], Value] | None:
    """(activation, alpha, beta, nodes, output) of an activation applied to x and nothing else reading x."""
    n = uses.only(x)
    if n is not None and n.input(0) is x:
        act = _unary_activation(n)
        if act is not None:
            return act[0], act[1], act[2], [n], n.outputs[0]
    g = _gate(x, uses)
    if g is not None:
        return g[0], 0.0, 0.0, g[1], g[2]
    return None


def residual_operand(x: Value, uses: Uses) -> tuple[Node, Value] | None:
    """(add node, other operand) when x's only reader adds a runtime tensor of x's exact shape and type."""
    n = uses.only(x)
    if n is None or not is_op(n, "Add", "Sum") or len(n.inputs) != 2:
        return None
    a, b = n.inputs
    other = b if a is x else a
    if other is x or not runtime(other) or other.kind != "tensor":
        return None
    if not same_shape(other.type, x.type) or other.type.dtype != x.type.dtype or other.type.dtype is None:
        return None
    return n, other


def absorb(ep: Epilogue, uses: Uses) -> Epilogue:
    """Extends `ep` with the activation and residual add that follow it (at most one of each)."""
    while True:
        if not ep.activation:
            m = match_activation(ep.out, uses)
            if m is not None:
                ep.activation, ep.alpha, ep.beta = m[0], m[1], m[2]
                ep.nodes += m[3]
                ep.out = m[4]
                if ep.z is not None:
                    ep.act_before_add = 0
                continue
        if ep.z is None:
            r = residual_operand(ep.out, uses)
            if r is not None:
                ep.z = r[1]
                ep.act_before_add = 1 if ep.activation else 0
                ep.nodes.append(r[0])
                ep.out = r[0].outputs[0]
                continue
        return ep


def fused_inputs(x: Value, w: Value, bias: Value | None, z: Value | None) -> list[Value | None]:
    """Inputs of a FusedConv/FusedGemm: X, W, then B and Z only as far as they are present."""
    inputs = [x, w, bias, z]
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def extend_fused(g: Graph, fused: Node, uses: Uses, ctx: "PassContext") -> bool:
    """Absorb further epilogue ops (activation, residual add) into an existing fused conv/gemm node."""
    ep = absorb(Epilogue.of(fused), uses)
    if not ep.nodes:
        return False
    fused.inputs = fused_inputs(fused.inputs[0], fused.inputs[1], fused.input(2), ep.z)
    fused.attrs.update(ep.attrs())
    replace_nodes(g, [fused] + ep.nodes, [fused])
    fused.outputs = [ep.out]
    ep.out.producer = fused
    for n in ep.nodes:
        ctx.logger.verbose(f"Fusing {fused.name} with {n.name}")
    return True
