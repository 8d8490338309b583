"""Denormal flushing (FTZ/DAZ) around CPU plan execution and CPU tactic timing.

A float32 below 2^-126 costs x86 cores a microcode assist per operation (on Intel Xeons a hundred cycles and
more): a trained network whose weights or activations hold such values runs several times slower (PP-OCRv6's
detector: 228 -> 48 ms on a 2-core Xeon with AMX; ONNX Runtime 209 ms there, OpenVINO 76 ms). A plan built
with ``BuilderConfig.flush_denormals`` (the default) runs with them flushed to zero; results move by no more
than ~1e-38 times the magnitudes summed. The mode is set in the calling thread and its OpenMP team for the
duration of the call and restored after it, so code around Kiln keeps IEEE gradual underflow
(``native/fpmode.c`` says how the team is reached).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any, Iterator

import torch

from kiln.backends.cpu import native


@functools.cache
def _library() -> Any:
    """native/fpmode.c with its signatures, loaded once (None where no C compiler works); every CPU execute
    enters flushed_denormals, so no lock or lookup on that path."""
    lib = native.load("fpmode")
    if lib is not None:
        lib.kiln_denormals.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.kiln_denormals.restype = ctypes.c_int
        lib.kiln_denormals_mode.argtypes = []
        lib.kiln_denormals_mode.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether Kiln's CPU plans can run with denormals flushed here (a C compiler, an x86-64 or Arm CPU)."""
    lib = _library()
    return lib is not None and lib.kiln_denormals_mode() >= 0


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Run the body with denormals flushed to zero in this thread and its OpenMP team (a no-op where they
    already are, or where the mode cannot be set: no C compiler, another architecture)."""
    lib = _library()
    if lib is None:
        yield
        return
    threads = torch.get_num_threads()
    before = lib.kiln_denormals(1, threads)
    try:
        yield
    finally:
        if before == 0:
            lib.kiln_denormals(0, threads)
