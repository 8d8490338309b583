"""Epilogue matching shared by conv and gemm fusion: activations (incl. x*f(x) patterns) and residual adds.

An epilogue is what FusedConv / FusedGemm apply after the bias: `activation(alpha, beta)` and a
residual input Z, with `act_before_add` saying which comes first (kiln.ops.activations.Epilogue; the
ONNX ops an activation is absorbed from are in that table too). Matching adds the x*f(x) gate patterns.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from typing import TYPE_CHECKING

from kiln.ir.graph import Graph, Node, Value
from kiln.ops.activations import Epilogue, from_onnx
from kiln.passes.rewrite import Uses, is_op, replace_nodes, runtime, same_shape

if TYPE_CHECKING:
    from kiln.passes.base import PassContext


@dataclass
class Match:
    """An epilogue being matched: what it computes so far (`ep`), its residual Z, the nodes it absorbed, and
    the value it now produces."""

    out: Value
    z: Value | None = None
    ep: Epilogue = Epilogue()
    nodes: list[Node] = field(default_factory=list)

    @staticmethod
    def of(n: Node) -> "Match":
        """The epilogue a FusedConv / FusedGemm node already has."""
        return Match(n.outputs[0], n.input(3), Epilogue.of(n))

    def attrs(self) -> dict[str, object]:
        """The fused node's epilogue attributes."""
        return self.ep.attrs()


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
        act = from_onnx(n)  # a single ONNX activation node (the table's ONNX ops)
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


def absorb(m: Match, uses: Uses) -> Match:
    """Extends `m` with the activation and residual add that follow it (at most one of each)."""
    while True:
        if not m.ep.activation:
            a = match_activation(m.out, uses)
            if a is not None:
                m.ep = replace(m.ep, activation=a[0], alpha=a[1], beta=a[2],
                               act_before_add=False if m.z is not None else m.ep.act_before_add)
                m.nodes += a[3]
                m.out = a[4]
                continue
        if m.z is None:
            r = residual_operand(m.out, uses)
            if r is not None:
                m.z = r[1]
                m.ep = replace(m.ep, act_before_add=bool(m.ep.activation))
                m.nodes.append(r[0])
                m.out = r[0].outputs[0]
                continue
        return m


def fused_inputs(x: Value, w: Value, bias: Value | None, z: Value | None) -> list[Value | None]:
    """Inputs of a FusedConv/FusedGemm: X, W, then B and Z only as far as they are present."""
    inputs = [x, w, bias, z]
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def extend_fused(g: Graph, fused: Node, uses: Uses, ctx: "PassContext") -> bool:
    """Absorb further epilogue ops (activation, residual add) into an existing fused conv/gemm node."""
    ep = absorb(Match.of(fused), uses)
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
