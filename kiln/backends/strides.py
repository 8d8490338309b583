"""Loop-nest geometry shared by the generated elementwise kernels (CPU C loops, Triton programs)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def channels_innermost(t: "torch.Tensor") -> bool:
    """Whether a 4-D tensor is laid out channels-last (dim 1 walks memory with stride 1) rather than in rows (dim 3
    innermost). A `like_input` kernel's output slot takes its input's form by this test, not by
    `is_contiguous()`: a column slice of a row-major tensor (a Split of the last axis: [N, H, W, C] rows of a
    gated block) is not contiguous, yet it is rows, and a channels-last destination for it makes every row a
    scatter (4x slower) and the GEMM after it copy its input back to rows."""
    if t.dim() != 4:
        return False
    n, c, h, w = t.shape
    if w > 1 and t.stride(3) == 1:
        return False
    return c > 1 and t.stride(1) == 1
