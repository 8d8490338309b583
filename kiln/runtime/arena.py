"""One activation arena per input shape: the outputs of destination-passing kernels at planned offsets.

Kernels whose tactic writes into a given ``out=`` (``Tactic.writes_out``) get their output as a view
of one arena tensor, placed by the liveness planner of kiln.plan.memory; so do the buffers of Concats
laid out in place (which their producers write into; a nested one is a slice of the outer buffer).
Everything else allocates as before (the caching allocator, or the CUDA graph's pool during capture).

Lifetimes are alias-aware and conservative: a step not handed a destination may return a view of an
input (a reshape, a slice, a split), so its outputs count as living in every buffer its inputs live in; an arena buffer stays alive until the last step reading any of its aliases, and
to the end of the run when a graph output aliases it. The placement is computed once per input shape
(symbols bound from the graph inputs) and cached.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from kiln.errors import KilnError
from kiln.ir.dims import dim_resolvable, dim_size
from kiln.ir.types import TensorType
from kiln.plan.memory import ALIGN, Buffer, plan_memory

Shape = tuple[int | str, ...]
KEPT_PER_THREAD = 4  # CPU arenas a thread keeps (distinct input shapes in a row reuse them)
_Place = tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...], "tuple[int, ...] | None", int]


class ActivationArena:
    """Placement of arena buffers for one step list (see module doc)."""

    def __init__(self, steps: Sequence[Any], out_types: dict[int, TensorType], output_slots: Sequence[int],
                 symbols: set[str]) -> None:
        self.specs: dict[int, tuple[Shape, torch.dtype, str, int]] = {}  # slot -> (shape, dtype, out_format, first)
        self.slices: list[tuple[int, int, int, int, int]] = []  # (slot, parent slot, axis, start, length), outer first
        roots: dict[int, set[int]] = {}
        last: dict[int, int] = {}
        outputs = set(output_slots)
        for i, st in enumerate(steps):
            for a in st.allocs:  # in-place Concat buffers: written from their first producer on
                if a.parent is not None:  # a slice of an outer Concat's buffer (made before it in this list)
                    roots[a.slot] = set(roots.get(a.parent[0], ()))
                    self.slices.append((a.slot, *a.parent))
                    continue
                self.specs[a.slot] = (a.shape, a.dtype, "channels_last" if a.channels_last else "contiguous", i)
                roots[a.slot] = {a.slot}
            for s in st.ins:
                for r in roots.get(s, ()):
                    last[r] = i
            writes = st.kernel.writes_out
            for s in st.outs:
                if st.out:  # writes into in-place Concat buffers
                    roots[s] = {r for buf, *_ in st.out for r in roots.get(buf, ())}
                elif writes and len(st.outs) == 1 and s not in outputs and resolvable(out_types.get(s), symbols):
                    t = out_types[s]
                    fmt = st.kernel.out_format if t.rank == 4 else "contiguous"
                    self.specs[s] = (tuple(t.shape), t.dtype.torch, fmt, i)  # type: ignore[arg-type,union-attr]
                    roots[s] = {s}
                else:  # not handed a destination: the result may be a view of an input
                    roots[s] = set().union(*(roots.get(x, set()) for x in st.ins if x >= 0))
                last.update({r: i for r in roots.get(s, ())})
        end = len(steps)
        for s in outputs:
            last.update({r: end for r in roots.get(s, ())})
        self.last = {r: last.get(r, self.specs[r][3]) for r in self.specs}
        self.placed = frozenset(self.specs) | {c[0] for c in self.slices}
        # per bound dims: (arena bytes, [(slot, dtype, shape, strides, contiguous strides for a like_input slot,
        # element offset)]); a like_input slot's default strides are channels-last
        self._cache: dict[tuple[tuple[str, int], ...], tuple[int, list[_Place]]] = {}
        self._local = threading.local()  # CPU: this thread's arenas by bound dims (views)
        self.arena_bytes = 0

    def views(self, dims: dict[str, int], device: torch.device
              ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """The arena for these bound dims: (slot -> its tensor view in its kernel's out_format, slot -> the
        contiguous view of each like_input slot, whose kernel takes it when its input is contiguous, the
        arena's byte tensor). On the CPU a thread reuses its arena and views for the same dims from one call
        to the next (making the views cost as much as a small layer); the caller must not hand out a value
        living in it (GraphFunction copies such outputs). On CUDA each call gets a fresh one from the caching
        allocator (a CUDA graph captures it in its own pool)."""
        key = tuple(sorted(dims.items()))
        reuse = device.type == "cpu"
        if reuse:
            mine = getattr(self._local, "arenas", None)
            if mine is None:
                mine = self._local.arenas = {}
            hit = mine.get(key)
            if hit is not None:
                return hit
        made = self._make(key, dims, device)
        if reuse:
            if len(mine) >= KEPT_PER_THREAD:
                mine.pop(next(iter(mine)))
            mine[key] = made
        return made

    def _make(self, key: tuple[tuple[str, int], ...], dims: dict[str, int], device: torch.device
              ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        layout = self._cache.get(key)
        if layout is None:
            layout = self._cache[key] = self._layout(dims)
        total, places = layout
        self.arena_bytes = total
        arena = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        typed: dict[torch.dtype, torch.Tensor] = {}
        out: dict[int, torch.Tensor] = {}
        alt: dict[int, torch.Tensor] = {}
        for s, dtype, shape, strides, rows, offset in places:
            flat = typed.get(dtype)
            if flat is None:
                flat = typed[dtype] = arena.view(dtype)  # offsets and the size are ALIGN multiples
            out[s] = flat.as_strided(shape, strides, offset)
            if rows is not None:
                alt[s] = flat.as_strided(shape, rows, offset)
        for s, parent, axis, start, length in self.slices:  # nested Concat buffers: views made once, like the rest
            out[s] = out[parent].narrow(axis, start, length)
        return out, alt, arena

    def _layout(self, dims: dict[str, int]) -> tuple[int, list[_Place]]:
        shapes = {s: tuple(dim_size(d, dims) for d in spec[0]) for s, spec in self.specs.items()}
        bufs = []
        for s, (_, dtype, _, first) in self.specs.items():
            n = dtype.itemsize
            for d in shapes[s]:
                n *= d
            bufs.append(Buffer(str(s), max(ALIGN, -(-n // ALIGN) * ALIGN), first, max(first, self.last[s])))
        mp = plan_memory(bufs)
        limit = _limit()
        if mp.arena_bytes > limit:
            raise KilnError(f"the activations at input dims {dict(sorted(dims.items()))} need a {mp.arena_bytes}-byte "
                            f"arena, above the limit of {limit} (KILN_MAX_ACTIVATION_BYTES)")
        places = []
        for name, off in mp.offsets.items():
            s = int(name)
            shape, (_, dtype, fmt, _) = shapes[s], self.specs[s]
            rows = torch.empty(shape, device="meta", dtype=dtype).stride()
            cl = fmt != "contiguous" and len(shape) == 4
            strides = torch.empty(shape, device="meta", dtype=dtype, memory_format=torch.channels_last).stride() \
                if cl else rows
            places.append((s, dtype, shape, strides, rows if cl and fmt == "like_input" else None,
                           off // dtype.itemsize))
        return mp.arena_bytes, places


def _limit() -> int:
    from kiln.plan.schema import limit_bytes
    return limit_bytes("max_activation_bytes")


def resolvable(t: TensorType | None, symbols: set[str]) -> bool:
    """A type whose shape is known at run time once the graph inputs' symbols are bound."""
    return (t is not None and t.dtype is not None and t.shape is not None
            and all(dim_resolvable(d, symbols) for d in t.shape))
