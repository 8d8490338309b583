"""Residual donation: a FusedConv that is the last reader of its residual Z may add into Z in place."""
from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.base import Pass, PassContext


class DonateResidual(Pass):
    """Sets kiln_z_donate=1 on FusedConv nodes whose residual input dies at that node.

    Z must be an activation (not a weight, graph input or output, nor read by a subgraph, nor a buffer
    shared with an elided Concat) whose last reader in execution order is the conv; the backend then
    accumulates into Z's buffer.
    """

    name = "residual donation"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        last: dict[int, int] = {}
        for i, n in enumerate(g.nodes):
            for v in n.all_inputs:
                if v is not None:
                    last[id(v)] = i
        pinned = {id(v) for v in g.inputs} | {id(v) for v in g.outputs}
        for n in g.nodes:
            pinned.update(id(v) for v in n.captures)
            if n.op_type == "Concat" and n.attr("kiln_elide", 0):  # aliased buffers: other readers may follow
                pinned.update(id(v) for v in n.inputs + n.outputs if v is not None)
        changed = False
        for i, n in enumerate(g.nodes):
            if n.op_type != "FusedConv" or n.domain != "kiln" or len(n.inputs) < 4 or n.inputs[3] is None:
                continue
            z = n.inputs[3]
            donate = int(not z.is_const and id(z) not in pinned and last.get(id(z)) == i
                         and sum(v is z for v in n.inputs) == 1)
            if n.attrs.get("kiln_z_donate", 0) != donate:
                n.attrs["kiln_z_donate"] = donate
                changed = True
                if donate:
                    ctx.logger.verbose(f"{n.name}: residual '{z.name}' donated (in-place add)")
        return changed
