"""Switches a plan runs under (TF32, cuDNN autotuning on CUDA; denormal flushing on the CPU), set around execution
and restored."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def cuda_flags(tf32: bool, benchmark: bool = True) -> Iterator[None]:
    """TF32 for float32 matmul/conv as the plan was built with; cuDNN picks its fastest algorithm per shape."""
    m, c, b = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
               torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c
        torch.backends.cudnn.benchmark = b


def cpu_flags(flush_denormals: bool) -> contextlib.AbstractContextManager[None]:
    """Denormals flushed to zero in this thread and its OpenMP team as the plan was built with
    (kiln.backends.cpu.fpmode)."""
    if not flush_denormals:
        return contextlib.nullcontext()
    from kiln.backends.cpu.fpmode import flushed_denormals
    return flushed_denormals()
