"""Inputs shared by the Q/DQ kernel tests of both backends (tests/backends/test_cpu_qdq.py, test_triton_qdq.py)."""
from __future__ import annotations

import torch

CL = torch.channels_last


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as NHWC ("nhwc"), as a channel slice of a wider NHWC tensor ("slice": strides of neither layout), or NCHW."""
    if kind == "nhwc":
        return x.contiguous(memory_format=CL)
    if kind == "slice":
        big = torch.zeros((x.shape[0], x.shape[1] + 3, *x.shape[2:]), dtype=x.dtype).contiguous(memory_format=CL)
        big[:, 1:1 + x.shape[1]] = x
        return big[:, 1:1 + x.shape[1]]
    return x.contiguous()


def near_ties(shape: tuple, scale: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values k * s, exact ties (k + 0.5) * s, a hair either side of the ties, and far past saturation."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-300, 300, shape, generator=g).double()
    frac = torch.tensor([0.0, 0.5, 0.5 - 1e-4, 0.5 + 1e-4, 0.25])[torch.randint(0, 5, shape, generator=g)].double()
    s = scale.double().reshape(-1, *([1] * (len(shape) - 2))) if scale.numel() > 1 else scale.double()
    return ((k + frac) * s).to(dtype)
