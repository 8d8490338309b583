"""Dense layouts with canonical strides.

A dense tensor's size-1 dims may carry any stride (a transformer's [1, HW, C] tokens transposed and unflattened to
[1, C, H, W] are channels-last with a batch stride of C). The data is the same, but libraries choose their code
path by the strides: aten's CPU upsampling took a per-element path (72 ms instead of 1.9) and oneDNN offered only
its reference convolution for such a layout. `canonical` gives the same memory the strides a freshly allocated
tensor of that order would have.
"""
from __future__ import annotations

import torch

_CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    """The strides torch gives a fresh tensor of `shape` in the plain or the channels-last order."""
    order = [0, *range(2, len(shape)), 1] if channels_last else list(range(len(shape)))
    out = [0] * len(shape)
    step = 1
    for d in reversed(order):
        out[d] = step
        step *= max(int(shape[d]), 1)
    return tuple(out)


def _recanonical(x: torch.Tensor, channels_last: bool) -> torch.Tensor | None:
    """x, or a view of it with canonical strides, when x is dense in the plain or channels-last order; else None."""
    cl = _CL.get(x.dim())
    formats = (True, False) if channels_last and cl is not None else (False, True) if cl is not None else (False,)
    shape, have = tuple(x.shape), x.stride()
    for is_cl in formats:
        want = _strides(shape, is_cl)
        if have == want:
            return x
        if x.is_contiguous(memory_format=cl if is_cl else torch.contiguous_format):
            return x.as_strided(shape, want)
    return None


def canonical(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """x viewed with the canonical strides of the dense order it is in (plain, or channels-last for 4-D / 5-D);
    x itself when its strides already are, or when it is dense in neither order. A tensor dense in both orders
    (size-1 spatial dims: [N, C, 1, 1]) gets the plain strides, or with `channels_last` the channels-last ones.
    Cheap when x already has them (it runs on every call of a layer): one stride comparison."""
    y = _recanonical(x, channels_last)
    return x if y is None else y


def dense(x: torch.Tensor) -> torch.Tensor:
    """`canonical(x)`, or for a tensor dense in neither order a copy into the one its channel stride suggests."""
    y = _recanonical(x, False)
    if y is not None:
        return y
    cl = _CL.get(x.dim())
    return x.contiguous(memory_format=cl) if cl is not None and x.stride(1) == 1 else x.contiguous()
