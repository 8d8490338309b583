"""Where the inputs of Concats laid out in place are stored: one decision, shared by the autotuner, the runtime
and the memory planner.

A Concat whose tactic lays it out in place (``concat.elide``, ``concat.partial``; kernels with ``elide_axis``)
owns a buffer of its output's shape. Going through its inputs in order, each slice of that buffer is filled one
of three ways:

* ``nest``: the input is the output of an earlier Concat laid out in place that is not yet inside another one:
  that Concat's whole buffer becomes this slice (a view), so its own inputs land here too. DenseNet's chains
  (``Concat(Concat(x0..x4), x5)``, kiln.passes.concat.NestConcats) become one buffer per dense block, each
  feature map stored once;
* ``write``: the producer's kernel stores into a given strided destination (``writes_out`` destinations,
  ``strided_out``) and has a destination left: it writes its output straight into the slice;
* ``copy``: anything else (a kernel that writes only dense tensors, a graph input, a constant, a layer run on
  the host): the Concat's own step copies it into its slice.

A Concat is placed (a member) when at least one input is nested or written; it is elided (no step at all)
when none is copied. Anything the rules above cannot prove (an input's extent along the axis not static) leaves
the Concat an ordinary layer. The buffer of a Concat nested in another is a view of the outer one; a root's is
allocated before the first step that writes into its tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from kiln.ir.graph import Graph, Node, Value

How = Literal["nest", "write", "copy"]


@dataclass(frozen=True)
class Caps:
    """What placement needs to know of the kernel (or tactic) a producer runs."""

    writes_out: int = 0
    strided_out: bool = False


@dataclass(frozen=True)
class Part:
    """One input of a Concat: how its slice [start, start + length) along the Concat's axis is filled, and by
    which producer (for ``nest`` and ``write``)."""

    how: How
    start: int
    length: int
    producer: Node | None = None


@dataclass
class Member:
    """A Concat laid out in place: its axis, its parts, and the Concat it is nested in, as (node, start, length)
    along that Concat's axis."""

    node: Node
    axis: int
    parts: list[Part]
    parent: tuple[Node, int, int] | None = None

    @property
    def copies(self) -> list[int]:
        """Positions of the inputs its own step copies (empty: the layer is elided)."""
        return [k for k, p in enumerate(self.parts) if p.how == "copy"]


@dataclass
class ConcatPlacer:
    """Places Concats one at a time, in graph order (see the module doc). `members` by id(node); `writes`: per
    id(producer), the (Concat, start, length) slices it stores into, in order."""

    graph: Graph
    members: dict[int, Member] = field(default_factory=dict)
    writes: dict[int, list[tuple[Node, int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._nested: set[int] = set()  # members already inside another Concat

    def parts(self, n: Node, axis: int, caps: Callable[[Node], Caps]) -> list[Part] | None:
        """How each input of Concat `n` would be stored along `axis`, given each producer's `caps`; None when
        `n` cannot be laid out in place (an extent along the axis that is not static, several outputs)."""
        if len(n.outputs) != 1 or id(n) not in self._index:
            return None
        out: list[Part] = []
        taken: dict[int, int] = {}  # producer -> destinations this Concat would take
        start = 0
        for v in n.inputs:
            ext = _extent(v, axis)
            if ext is None:
                return None
            p = v.producer  # type: ignore[union-attr]
            part = Part("copy", start, ext)
            if p is not None and id(p) in self._index and len(p.outputs) == 1 and not v.is_const:  # type: ignore
                if id(p) in self.members and id(p) not in self._nested and id(p) not in taken:
                    part = Part("nest", start, ext, p)
                    taken[id(p)] = 1
                else:
                    c = caps(p)
                    used = len(self.writes.get(id(p), ())) + taken.get(id(p), 0)
                    if c.strided_out and c.writes_out > used and id(p) not in self.members:
                        part = Part("write", start, ext, p)
                        taken[id(p)] = taken.get(id(p), 0) + 1
            out.append(part)
            start += ext
        return out

    def commit(self, n: Node, axis: int, parts: list[Part]) -> Member | None:
        """Record `n` as placed with these parts (from `parts`); None (nothing recorded) when no input is stored
        in place, so that the Concat stays an ordinary layer."""
        if all(p.how == "copy" for p in parts):
            return None
        m = Member(n, axis, parts)
        self.members[id(n)] = m
        for p in parts:
            if p.how == "nest":
                self.members[id(p.producer)].parent = (n, p.start, p.length)
                self._nested.add(id(p.producer))
            elif p.how == "write":
                self.writes.setdefault(id(p.producer), []).append((n, p.start, p.length))
        return m

    def place(self, n: Node, axis: int, caps: Callable[[Node], Caps]) -> Member | None:
        """`parts` then `commit`."""
        parts = self.parts(n, axis, caps)
        return None if parts is None else self.commit(n, axis, parts)

    def root(self, m: Member) -> Member:
        """The outermost Concat whose buffer holds m's."""
        while m.parent is not None:
            m = self.members[id(m.parent[0])]
        return m

    def depth(self, m: Member) -> int:
        """How many Concats m's buffer is nested in."""
        d = 0
        while m.parent is not None:
            m, d = self.members[id(m.parent[0])], d + 1
        return d

    def lives_in(self) -> dict[str, list[str]]:
        """value name -> the Concat outputs whose buffers it is stored in (for kiln.plan.memory.lifetimes)."""
        out: dict[str, list[str]] = {}
        for m in self.members.values():
            for p, v in zip(m.parts, m.node.inputs):
                if p.how != "copy" and v is not None:
                    out.setdefault(v.name, []).append(m.node.outputs[0].name)
        return out


def _extent(v: Value | None, axis: int) -> int | None:
    if v is None or v.kind != "tensor" or v.type.shape is None or not 0 <= axis < len(v.type.shape):
        return None
    d = v.type.shape[axis]
    return d if isinstance(d, int) else None


def place_all(g: Graph, concats: Iterable[tuple[Node, int]], caps: Callable[[Node], Caps]) -> ConcatPlacer:
    """Place every (Concat, axis) of `concats` (in graph order), producers' capabilities from `caps`."""
    placer = ConcatPlacer(g)
    for n, axis in concats:
        placer.place(n, axis, caps)
    return placer
