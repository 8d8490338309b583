"""Activation memory planning: value lifetimes -> offsets in one arena, with a verifier."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kiln.errors import BuildError
from kiln.ir.graph import Graph, Node

ALIGN = 256


@dataclass(frozen=True)
class Buffer:
    """One activation: alive from the step producing it to the last step reading it (inclusive)."""

    name: str
    size: int
    first: int
    last: int


@dataclass
class MemoryPlan:
    """Offsets of each buffer in an arena of `arena_bytes`; `naive_bytes` is the sum of all sizes."""

    offsets: dict[str, int]
    sizes: dict[str, int]
    arena_bytes: int
    naive_bytes: int

    def to_json(self) -> dict[str, object]:
        return {"arena_bytes": self.arena_bytes, "naive_bytes": self.naive_bytes,
                "offsets": self.offsets, "sizes": self.sizes}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def aliases(g: Graph, tactics: Mapping[int, tuple[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """value -> the values whose memory it lives in, from the tactic chosen per node (id(node) -> (tactic,
    config)): a view's output lives in its input; an input of a Concat laid out in place (kiln.plan.elision)
    that its producer writes there, or that is a Concat nested in it, lives in its output."""
    from kiln.backends.tactic import get_tactic
    from kiln.backends.views import concat_axis
    from kiln.plan.elision import Caps, place_all
    out: dict[str, list[str]] = {}
    chosen = {id(n): get_tactic(tactics.get(id(n), ("ref", {}))[0]) for n in g.nodes}
    concats = []
    symbols = g.input_symbols()  # and those of captured values, as the runtime binds them (a body's)
    symbols.update(d for v in g.captures if v.kind == "tensor" and not v.is_const
                   for d in (v.type.shape or ()) if isinstance(d, str))
    for n in g.nodes:
        t = chosen[id(n)]
        if t is not None and t.is_view and n.inputs and n.inputs[0] is not None:
            out.setdefault(n.outputs[0].name, []).append(n.inputs[0].name)
        elif (t is not None and (t.elides or t.elides_partly) and len(n.outputs) == 1 and concat_axis(n) is not None
              and n.outputs[0].type.shape is not None
              and all(isinstance(d, int) or d in symbols for d in n.outputs[0].type.shape)):
            concats.append((n, concat_axis(n)))

    def caps(p: Node) -> Caps:
        t = chosen.get(id(p))
        return Caps() if t is None else Caps(t.writes_out, t.strided_out)
    for name, homes in place_all(g, concats, caps).lives_in().items():
        out.setdefault(name, []).extend(homes)
    return out


def lifetimes(g: Graph, sizes: dict[str, int], aliases: dict[str, list[str]] | None = None) -> list[Buffer]:
    """Buffers for node outputs that are neither graph inputs, outputs nor constants.

    `aliases` maps a value to the values whose memory it lives in (a view of its input; a producer
    writing into one or two elided Concat outputs): such a value has no buffer of its own, and each
    buffer it lives in stays alive from the first step writing any of its aliases to the last step
    reading one.
    """
    aliases = aliases or {}

    def roots(name: str, depth: int = 0) -> list[str]:
        if name not in aliases or depth > len(aliases):
            return [name]
        return [r for a in aliases[name] for r in roots(a, depth + 1)]

    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.all_inputs:
            if v is not None:
                for r in roots(v.name):
                    last[r] = i
        for v in n.outputs:
            for r in roots(v.name):
                first[r] = min(first.get(r, i), i)
    outs = {r for v in g.outputs for r in roots(v.name)} | {v.name for v in g.inputs}
    return [Buffer(name, max(_align(sizes[name]), ALIGN), f, max(f, last.get(name, f)))
            for name, f in first.items() if name not in outs and name in sizes]


def plan_memory(buffers: list[Buffer]) -> MemoryPlan:
    """Greedy by size (largest first): each buffer takes the lowest offset free during its lifetime."""
    placed: list[tuple[Buffer, int]] = []
    offsets: dict[str, int] = {}
    for b in sorted(buffers, key=lambda b: (-b.size, b.first)):
        busy = sorted((off, off + p.size) for p, off in placed if p.first <= b.last and b.first <= p.last)
        off = 0
        for lo, hi in busy:
            if off + b.size <= lo:
                break
            off = max(off, hi)
        placed.append((b, off))
        offsets[b.name] = off
    arena = max((off + b.size for b, off in placed), default=0)
    mp = MemoryPlan(offsets, {b.name: b.size for b in buffers}, arena, sum(b.size for b in buffers))
    verify(buffers, mp)
    return mp


def verify(buffers: list[Buffer], mp: MemoryPlan) -> None:
    """Raise if two buffers alive at the same time overlap in the arena."""
    bs = sorted(buffers, key=lambda b: mp.offsets[b.name])
    for i, a in enumerate(bs):
        ao = mp.offsets[a.name]
        for b in bs[i + 1:]:
            bo = mp.offsets[b.name]
            if bo >= ao + a.size:
                break
            if a.first <= b.last and b.first <= a.last:
                raise BuildError(f"memory plan overlaps '{a.name}' and '{b.name}'")
        if ao + a.size > mp.arena_bytes:
            raise BuildError(f"memory plan places '{a.name}' past the arena end")
