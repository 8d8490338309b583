"""Kernel: what a tactic's `build` returns — the callable plus the properties the runtime plans around.

A kernel is called as ``kernel(*inputs)`` or, when its tactic writes into given destinations
(``writes_out``), ``kernel(*inputs, out=dest)``. Everything the runtime, the memory planner and the
autotuner need to know about it is a typed field here; nothing is attached to functions ad hoc.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


class Fallback(Protocol):
    """A kernel's slow path for shapes its fast path cannot run (kiln.backends.cpu.fallback.ReferenceFallback)."""

    quiet: bool
    reason: str | None


OUT_FORMATS = frozenset({"channels_last", "contiguous", "like_input"})


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
    out_format:   layout of a 4-D output the runtime places for it (an arena slot): "channels_last" (an
                  image, NCHW dims with channels innermost: conv, pooling, resize), "contiguous" (row-major: a
                  GEMM's [N, H, W, C] or [B, heads, S, D] rows), or "like_input" (contiguous when its first
                  4-D input is, channels-last otherwise: pointwise and normalization)
    release:      frees native resources (oneDNN primitives, memory descriptors) held by the kernel
    bind:         ``bind(args, out)``, called by the CPU runtime right after a call whose tensors are the same
                  objects at every call on this thread for these input shapes (its activation arena's views and
                  constants): a zero-argument callable that repeats exactly that call and returns what it
                  returned, with the per-call work (shape-keyed lookups, layout and dtype checks, argument
                  packing) done once here, where the first call checked these very tensors; or None where the
                  call cannot be repeated so (a fallback ran, an input needed a copy first). The callable must
                  refuse to run once the kernel is released.
    """

    fn: Callable[..., Any]
    writes_out: int = 0
    strided_out: bool = True
    prepacked: frozenset[int] = field(default_factory=frozenset)
    fallback: Fallback | None = None
    elide_axis: int | None = None
    channels_last: bool = False
    out_format: str = "channels_last"
    release: Callable[[], None] | None = None
    bind: Callable[[Sequence[Any], Any], Callable[[], Any] | None] | None = None

    def __post_init__(self) -> None:
        if self.out_format not in OUT_FORMATS:
            raise ValueError(f"Kernel.out_format must be one of {sorted(OUT_FORMATS)}, not {self.out_format!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def close(self) -> None:
        """Free native resources now (idempotent); an Engine calls this for each kernel when it is dropped."""
        release, self.release = self.release, None
        if release is not None:
            release()
