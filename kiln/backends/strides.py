"""Loop-nest geometry shared by the generated elementwise kernels (CPU C loops, Triton programs)."""
from __future__ import annotations


def merge_dims(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours that every operand walks contiguously (outermost first)."""
    keep = [d for d, s in enumerate(sizes) if s != 1]
    sizes = [sizes[d] for d in keep]
    strides = [[st[d] for d in keep] for st in strides]
    if not sizes:
        return [1], [[0] for _ in strides]
    out_sizes, out_strides = [sizes[0]], [[st[0]] for st in strides]
    for d in range(1, len(sizes)):
        if all(o[-1] == st[d] * sizes[d] for o, st in zip(out_strides, strides)):
            out_sizes[-1] *= sizes[d]
            for o, st in zip(out_strides, strides):
                o[-1] = st[d]
        else:
            out_sizes.append(sizes[d])
            for o, st in zip(out_strides, strides):
                o.append(st[d])
    return out_sizes, out_strides
