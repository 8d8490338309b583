"""Loop-invariant code motion: work in a Loop / Scan body that reads only outer values moves out of the loop.

A body node is invariant when it has no subgraph, its op is deterministic (not RandomNormal, ...), and each of
its inputs is a constant, an outer value the body captures, or the output of another invariant node. Such
nodes move, in body order, into the graph holding the loop, right before the loop node (where every outer
value they read is already defined); the body then captures their outputs instead of computing them on every
iteration, and the loop node's captures are brought up to date (kiln.passes.base.sync_captures). Nested
loops are treated innermost first, so work invariant in two enclosing loops moves out of both.

If branches run once per call: nothing to hoist there. A hoisted node runs even when the loop runs zero
iterations (its result is then unused).
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.ops.registry import lookup
from kiln.passes.base import Pass, PassContext, share_names, sync_captures

LOOPS = ("Loop", "Scan")


class HoistLoopInvariants(Pass):
    """Moves loop-invariant nodes of Loop / Scan bodies out of the loop (see module doc)."""

    name = "loop-invariant hoisting"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        share_names(g)  # hoisted values keep their names: names are taken in all graphs at once
        return self._walk(g, ctx)

    def _walk(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(g.nodes):
            inner = False
            for sub in n.subgraphs():
                inner |= self._walk(sub, ctx)  # inner loops first: what they hoist into `sub` may move on
            if inner:
                sync_captures(n)
            changed |= inner
            if n.op_type in LOOPS and n.domain in ("", "ai.onnx"):
                changed |= self._hoist(g, n, ctx)
        return changed

    @staticmethod
    def _hoist(g: Graph, loop: Node, ctx: PassContext) -> bool:
        body = loop.attr("body")
        if not isinstance(body, Graph):
            return False
        invariant = {id(v) for v in body.captures}
        moved: list[Node] = []
        for m in body.nodes:
            if _movable(m, invariant):
                moved.append(m)
                invariant.update(id(o) for o in m.outputs)
        if not moved:
            return False
        gone = {id(m) for m in moved}
        body.nodes = [m for m in body.nodes if id(m) not in gone]
        at = next(i for i, x in enumerate(g.nodes) if x is loop)
        g.nodes[at:at] = moved
        sync_captures(loop)
        ctx.logger.verbose(f"Hoisted {len(moved)} loop-invariant layers out of {loop.name} ({loop.op_type}): "
                           + ", ".join(f"{m.name} ({m.op_type})" for m in moved[:8])
                           + (", ..." if len(moved) > 8 else ""))
        return True


def _movable(n: Node, invariant: set[int]) -> bool:
    if n.subgraphs() or n.captures:
        return False
    try:
        if not lookup(n.op_type, n.domain).deterministic:
            return False
    except Exception:
        return False
    return all(v is None or v.is_const or id(v) in invariant for v in n.inputs)
