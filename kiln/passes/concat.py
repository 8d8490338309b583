"""Concat elision marking: the backends / memory planner elide marked Concats (no copy at run time).

A Concat is marked with attribute ``kiln_elide = 1`` when each of its inputs is a runtime tensor
produced by a node of this graph (not a graph input, output or constant), appears once, and is read
by nothing but this Concat: its producer can then write straight into its slice of the Concat's
output buffer, and the input needs no buffer of its own.

``allow_shared_inputs=True`` relaxes the last condition: an input may have other readers as long as
it is in no other elided Concat (those readers then read the slice; the output buffer must then live
from the first producer to the last reader of the output or of any input). It is off by default
because it needs that aliasing support from the memory planner.
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, is_op


class MarkConcatElision(Pass):
    """Sets kiln_elide=1 on Concats whose inputs can be written in place (see module docstring)."""

    name = "concat elision marking"

    def __init__(self, allow_shared_inputs: bool = False) -> None:
        self.allow_shared_inputs = allow_shared_inputs

    def run(self, g: Graph, ctx: PassContext) -> bool:
        uses = Uses(g)
        claimed: set[int] = set()
        changed = False
        for n in g.nodes:
            if not is_op(n, "Concat"):
                continue
            ok = self._elidable(g, n, uses, claimed)
            if ok:
                claimed.update(id(v) for v in n.inputs)
            if ok and not n.attr("kiln_elide"):
                n.attrs["kiln_elide"] = 1
                ctx.logger.verbose(f"Marking {n.name} for concat elision")
                changed = True
            elif not ok and n.attr("kiln_elide"):
                del n.attrs["kiln_elide"]
                changed = True
        return changed

    def _elidable(self, g: Graph, n: Node, uses: Uses, claimed: set[int]) -> bool:
        ins = n.inputs
        if len(ins) < 2 or len({id(v) for v in ins}) != len(ins):
            return False
        for v in ins:
            if v is None or v.is_const or v.kind != "tensor" or uses.is_output(v) or id(v) in claimed:
                return False
            p = v.producer
            if p is None or id(p) not in uses.index:
                return False
            readers = uses.of(v)
            if readers.count(n) != 1 or (not self.allow_shared_inputs and len(readers) != 1):
                return False
        return True
