"""Concat elision marking: the runtime elides marked Concats (no copy at run time).

A Concat is marked with attribute ``kiln_elide = 1`` when each of its inputs is a runtime tensor
produced by a node of this graph (not a graph input, output or constant), appears once, is in at
most one other marked Concat (a producer may store into two places) and has a static extent along
the axis, and when the output's shape can be resolved at run time from the graph inputs' shapes
(every dim an int or a symbol of an input dim).
The autotuner then elides it where every producer runs a tactic that writes into a given output
(kiln.backends.views): the runtime allocates the output before the first producer runs, each producer
writes its slice, and inputs with other readers are read as views of that buffer.

``allow_shared_inputs=False`` additionally requires that the Concat is each input's only reader.
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, is_op


MAX_HOMES = 2
"""Elided Concats one value may be written into (the widest ``Tactic.writes_out``)."""


class MarkConcatElision(Pass):
    """Sets kiln_elide=1 on Concats whose inputs can be written in place (see module docstring)."""

    name = "concat elision marking"

    def __init__(self, allow_shared_inputs: bool = True) -> None:
        self.allow_shared_inputs = allow_shared_inputs

    def run(self, g: Graph, ctx: PassContext) -> bool:
        uses = Uses(g)
        claimed: dict[int, int] = {}
        changed = False
        for n in g.nodes:
            if not is_op(n, "Concat"):
                continue
            ok = self._elidable(g, n, uses, claimed)
            if ok:
                for v in n.inputs:
                    claimed[id(v)] = claimed.get(id(v), 0) + 1
            if ok and not n.attr("kiln_elide"):
                n.attrs["kiln_elide"] = 1
                ctx.logger.verbose(f"Marking {n.name} for concat elision")
                changed = True
            elif not ok and n.attr("kiln_elide"):
                del n.attrs["kiln_elide"]
                changed = True
        return changed

    def _elidable(self, g: Graph, n: Node, uses: Uses, claimed: dict[int, int]) -> bool:
        ins = n.inputs
        if len(ins) < 2 or len({id(v) for v in ins}) != len(ins) or len(n.outputs) != 1:
            return False
        shape, rank = n.outputs[0].type.shape, n.outputs[0].type.rank
        if shape is None or not rank or not -rank <= int(n.attr("axis", 1)) < rank:
            return False
        symbols = g.input_symbols()
        if not all(isinstance(d, int) or d in symbols for d in shape):
            return False
        axis = int(n.attr("axis", 1)) % rank
        for v in ins:
            if (v is None or v.is_const or v.kind != "tensor" or uses.is_output(v)
                    or claimed.get(id(v), 0) >= MAX_HOMES):
                return False
            if v.type.shape is None or len(v.type.shape) != rank or not isinstance(v.type.shape[axis], int):
                return False
            p = v.producer
            if p is None or id(p) not in uses.index:
                return False
            readers = uses.of(v)
            if readers.count(n) != 1 or (not self.allow_shared_inputs and len(readers) != 1):
                return False
        return True
