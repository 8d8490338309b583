"""Pointwise fusion: chains and small DAGs of elementwise ops -> one kiln Pointwise node.

A group grows backwards from its last node (the root) over producers that are elementwise ops and
whose outputs are read only inside the group (so every intermediate lives in registers, never in
memory). The fused node takes the root's place and output. Only float/bool tensors of opset >= 7
(numpy broadcasting) are fused; Clip bounds become scalar constants of the program.
"""
from __future__ import annotations

from typing import Any

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Graph, Node, Value
from kiln.ops.activations import FLT_MAX
from kiln.ops.pointwise_program import OPS, PointwiseProgram
from kiln.passes.base import Pass, PassContext
from kiln.passes.cast import int_cast
from kiln.passes.rewrite import Uses, is_op, replace_nodes, scalar

MAX_GROUP = 48
_TYPES = ("float32", "float16", "bfloat16", "float64", "bool")


def _typed(v: Value | None) -> bool:
    return v is not None and v.type.dtype is not None and v.type.dtype.value in _TYPES


def _quantized(n: Node) -> bool:
    """n reads a DequantizeLinear's output: a Q/DQ model's quantized op, left to kiln.passes.quantize (which
    fuses a quantized residual Add into the integer layer before it)."""
    return any(is_op(v.producer, "DequantizeLinear") for v in n.inputs if v is not None)


def fusible(n: Node, int_casts: bool = False) -> bool:
    """An elementwise ONNX node Pointwise can evaluate with opset-21 semantics (with `int_casts`, the CUDA target:
    also a Cast of integers to bool / float32, kiln.passes.cast.int_cast)."""
    if not is_op(n, *OPS) or len(n.outputs) != 1 or n.opset < 7 or _quantized(n):
        return False
    if int_casts and int_cast(n):
        return n.inputs[0].kind == "tensor"  # type: ignore[union-attr]
    if n.subgraphs() or n.captures or not _typed(n.outputs[0]):
        return False
    if n.op_type == "Clip":
        if n.opset >= 11 and any(v is not None and scalar(v) is None for v in n.inputs[1:]):
            return False
        return _typed(n.input(0))
    return bool(n.inputs) and all(v is not None and v.kind == "tensor" and _typed(v) for v in n.inputs)


def _lone_binary(n: Node) -> bool:
    """A single elementwise op on two activations (squeeze-and-excite's channel scale x * s[N, C, 1, 1]): as a
    Pointwise program it gets the generated kernels (one pass, in-register broadcasting) instead of `ref`."""
    acts = [v for v in n.inputs if v is not None and v.const is None]
    return len(acts) == 2 and n.outputs[0].type.dtype is not None and n.outputs[0].type.dtype.value != "bool"


def _grow(root: Node, uses: Uses, taken: set[int], int_casts: bool = False) -> list[Node]:
    """The group rooted at `root`: producers whose every output reader is already in the group."""
    group = [root]
    ids = {id(root)}
    grew = True
    while grew and len(group) < MAX_GROUP:
        grew = False
        for m in list(group):
            for v in m.inputs:
                p = v.producer if v is not None else None
                if v is None or p is None or id(p) in ids or id(p) in taken or id(p) not in uses.index:
                    continue
                if uses.is_output(v) or not fusible(p, int_casts) or not all(id(u) in ids for u in uses.of(v)):
                    continue
                group.append(p)
                ids.add(id(p))
                grew = True
    return sorted(group, key=uses.pos)


def _program(group: list[Node]) -> tuple[list[Value], dict[str, Any]]:
    """(inputs, attrs) of the Pointwise node computing `group` (in topological order)."""
    inputs: list[Value] = []
    in_ref: dict[int, str] = {}
    temp_ref = {id(m.outputs[0]): f"t{j}" for j, m in enumerate(group)}
    consts: list[float] = []
    program = []

    def ref(v: Value) -> str:
        if id(v) in temp_ref:
            return temp_ref[id(v)]
        if id(v) not in in_ref:
            in_ref[id(v)] = f"i{len(inputs)}"
            inputs.append(v)
        return in_ref[id(v)]

    def cref(x: float) -> str:
        consts.append(x)
        return f"c{len(consts) - 1}"

    for m in group:
        attrs = {k: a for k, a in m.attrs.items()}
        if m.op_type == "Clip":
            if m.opset < 11:
                lo, hi = attrs.pop("min", None), attrs.pop("max", None)
            else:
                lo, hi = scalar(m.input(1)), scalar(m.input(2))
            args = [ref(m.inputs[0]), cref(-FLT_MAX if lo is None else float(lo)),
                    cref(FLT_MAX if hi is None else float(hi))]
        else:
            attrs.pop("consumed_inputs", None)
            args = [ref(v) for v in m.inputs]  # type: ignore[arg-type]
        program.append({"op": m.op_type, "args": args, "attrs": attrs})
    return inputs, {"program": program, "consts": consts, "outputs": [f"t{len(group) - 1}"]}


class FusePointwise(Pass):
    """Fuses groups of two or more elementwise nodes into one Pointwise node."""

    name = "pointwise fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        uses = Uses(g)
        taken: set[int] = set()
        groups: list[list[Node]] = []
        int_casts = ctx.device == "cuda"
        for root in reversed(g.nodes):
            if id(root) in taken or not fusible(root):
                continue
            group = _grow(root, uses, taken, int_casts)
            taken.update(id(m) for m in group)
            if len(group) >= 2 or _lone_binary(group[0]):
                groups.append(group)
        fused_any = False
        for group in groups:
            inputs, attrs = _program(group)
            name = f"PWN({', '.join(m.name for m in group)})"
            fused = Node("Pointwise", inputs, [group[-1].outputs[0]], attrs, name=name, domain="kiln", opset=1)
            try:  # the pass emits only what the program parser accepts (e.g. no attribute of a later opset)
                PointwiseProgram.parse(fused)
            except UnsupportedOpError as e:
                ctx.logger.verbose(f"Not fusing {name}: {e}")
                continue
            fused_any = True
            replace_nodes(g, group, [fused])
            for a, b in zip(group, group[1:]):
                ctx.logger.verbose(f"Fusing {a.name} with {b.name}")
            if len(group) == 1:
                ctx.logger.verbose(f"Lowering {group[0].name} ({group[0].op_type} of two activations) to a Pointwise program")
        return fused_any
