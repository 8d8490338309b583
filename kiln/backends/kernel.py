"""Kernel: what a tactic's `build` returns — the callable plus the properties the runtime plans around.

A kernel is called as ``kernel(*inputs)`` or, when its tactic writes into given destinations
(``writes_out``), ``kernel(*inputs, out=dest)``. Everything the runtime, the memory planner and the
autotuner need to know about it is a typed field here; nothing is attached to functions ad hoc.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class Fallback(Protocol):
    """A kernel's slow path for shapes its fast path cannot run (kiln.backends.cpu.dnnl.ReferenceFallback)."""

    quiet: bool
    reason: str | None


@dataclass(eq=False)
class Kernel:
    """One built layer implementation.

    fn:           the callable run at every inference
    writes_out:   how many destinations it can store into (``out=`` one tensor or a tuple); 0 = it allocates
    strided_out:  its destinations may be any strided view (a channel slice of a Concat's output)
    prepacked:    indices of constant inputs the kernel holds its own copy of (the runtime does not keep them)
    fallback:     its slow path for shapes the fast path declines (the autotuner never credits a tactic with it)
    elide_axis:   for an elided Concat: the axis its producers write slices of (the layer itself does not run)
    channels_last: an elided Concat's buffer is allocated channels-last
    release:      frees native resources (oneDNN primitives, memory descriptors) held by the kernel
    """

    fn: Callable[..., Any]
    writes_out: int = 0
    strided_out: bool = True
    prepacked: frozenset[int] = field(default_factory=frozenset)
    fallback: Fallback | None = None
    elide_axis: int | None = None
    channels_last: bool = False
    release: Callable[[], None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def close(self) -> None:
        """Free native resources now (idempotent); an Engine calls this for each kernel when it is dropped."""
        release, self.release = self.release, None
        if release is not None:
            release()
