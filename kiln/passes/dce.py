"""Dead-code elimination: drop nodes none of whose outputs reach a graph output."""
from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.ops.registry import lookup
from kiln.passes.base import Pass, PassContext


class DeadCodeElimination(Pass):
    """Removes unused nodes (random ops too: their results are unobservable when unused)."""

    name = "dead code elimination"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        live = {id(v) for v in g.outputs}
        kept = []
        for n in reversed(g.nodes):
            if any(id(v) in live for v in n.outputs):
                kept.append(n)
                live.update(id(v) for v in n.all_inputs if v is not None)
            else:
                lookup(n.op_type, n.domain)
        removed = len(g.nodes) - len(kept)
        g.nodes = kept[::-1]
        for n in g.nodes:
            for sub in n.subgraphs():
                self.run(sub, ctx)
        if removed:
            ctx.logger.verbose(f"Removed {removed} dead layers")
        return removed > 0
