"""Concat rewrites and elision marking: the runtime lays marked Concats out in place (kiln.plan.elision).

``JoinSplitRuns``: a Concat that reads every output of one Split, in order, on the Split's axis reads the Split's
input instead (the pieces are its consecutive slices, so their concatenation is that input). YOLOv8's C2f and
YOLO11's C3k2 blocks split a 1x1 convolution's output in two and concatenate both halves again with the
bottlenecks' outputs; read whole, the convolution's output is one part that the convolution can write into the
Concat's buffer (as with any producer), and the halves the bottlenecks read are views of it.

``NestConcats``: a Concat whose inputs contain, as one contiguous run, all the inputs of an earlier Concat on the
same axis reads that Concat's output instead of the run (the longest such run). DenseNet concatenates every
earlier feature map of a block again at each layer, Concat(x0..x5) after Concat(x0..x4); nested,
Concat(Concat(x0..x4), x5), the inner Concat's buffer can be a slice of the outer one, so each block keeps one
buffer and every feature map is stored into it once. The value is the same either way; without elision the
copies are the same too (the inner Concat's result is copied instead of its inputs).

``MarkConcatElision``: a Concat is marked with attribute ``kiln_elide = 1`` when each of its inputs is a runtime
tensor produced by a node of this graph (not a graph input, output or constant), appears once, is in at
most one other marked Concat (a producer may store into two places) and has a static extent along
the axis, and when the output's shape can be resolved at run time from the graph inputs' shapes
(every dim an int or a symbol of an input dim).
The autotuner then lays it out in place where some producer runs a tactic that writes into a given output, or
an input is a marked Concat laid out in place itself (kiln.backends.views, kiln.plan.elision): the runtime
allocates the output before the first write into it, each such producer writes its slice, inputs with other
readers are read as views of that buffer, and the Concat's own step (if any) copies the other inputs.

``allow_shared_inputs=False`` additionally requires that the Concat is each input's only reader.
"""
from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, is_op


MAX_HOMES = 2
"""Elided Concats one value may be written into (the widest ``Tactic.writes_out``)."""


class JoinSplitRuns(Pass):
    """Concat(.., Split(y)[0], .., Split(y)[n-1], ..) on the Split's axis -> Concat(.., y, ..) (module doc)."""

    name = "split-concat joining"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in g.nodes:
            axis = _axis(n)
            if axis is None:
                continue
            k = 0
            while k < len(n.inputs):
                s = n.inputs[k].producer  # type: ignore[union-attr]
                outs = s.outputs if s is not None and is_op(s, "Split") else []
                y = s.input(0) if outs else None
                if (y is not None and len(outs) >= 2 and n.inputs[k:k + len(outs)] == outs and _split_axis(s) == axis
                        and y.type.dtype == n.outputs[0].type.dtype):
                    n.inputs = [*n.inputs[:k], y, *n.inputs[k + len(outs):]]
                    ctx.logger.verbose(f"Joining {s.name}'s {len(outs)} outputs in {n.name}: it reads "
                                       f"'{y.name}' whole")
                    changed = True
                k += 1
        return changed


def _split_axis(n: Node) -> int | None:
    """A Split's axis in [0, rank) (None where the input's rank is unknown)."""
    x = n.input(0)
    rank = x.type.rank if x is not None else None
    axis = int(n.attr("axis", 0))
    return axis % rank if rank and -rank <= axis < rank else None


class NestConcats(Pass):
    """Rewrites Concat(.., x0..xk, ..) after Concat(x0..xk) on the same axis to read the earlier one's output
    (see module docstring)."""

    name = "concat nesting"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        earlier: list[tuple[Node, tuple[int, ...], int]] = []  # (Concat, ids of its inputs before nesting, axis)
        changed = False
        for n in g.nodes:
            axis = _axis(n)
            if axis is None:
                continue
            ids = tuple(id(v) for v in n.inputs)
            best: tuple[Node, int, int] | None = None  # (inner Concat, start, length) in n's inputs
            for inner, run, inner_axis in earlier:
                if (inner_axis != axis or not 2 <= len(run) < len(ids) or (best is not None and len(run) <= best[2])
                        or inner.outputs[0].type.dtype != n.outputs[0].type.dtype):
                    continue
                at = _find(ids, run)
                if at >= 0:
                    best = (inner, at, len(run))
            earlier.append((n, ids, axis))
            if best is not None:
                inner, at, length = best
                n.inputs = [*n.inputs[:at], inner.outputs[0], *n.inputs[at + length:]]
                ctx.logger.verbose(f"Nesting {inner.name} in {n.name}: {length} of its inputs read as one")
                changed = True
        return changed


def _axis(n: Node) -> int | None:
    """A one-output Concat's axis in [0, rank), or None (not such a Concat, or its rank unknown)."""
    if not is_op(n, "Concat") or len(n.outputs) != 1 or not n.inputs or any(v is None for v in n.inputs):
        return None
    rank = n.outputs[0].type.rank
    axis = int(n.attr("axis", 1))
    return axis % rank if rank and -rank <= axis < rank else None


def _find(seq: tuple[int, ...], run: tuple[int, ...]) -> int:
    """The first index where `run` occurs in `seq` as a contiguous run, or -1."""
    for i in range(len(seq) - len(run) + 1):
        if seq[i:i + len(run)] == run:
            return i
    return -1


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
