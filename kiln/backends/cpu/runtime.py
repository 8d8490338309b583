"""CPU runtime settings: intra-op threads and heap retention. Process-wide; call once before inference.

``configure(threads=N)`` sets torch's intra-op thread count (use the number of physical cores the
process should occupy). ``retain_heap=True`` (off by default) asks glibc to serve large blocks from the
heap and to keep freed memory there instead of returning it to the OS: activations are freed and
re-allocated every inference, and an ``mmap``-served block faults its pages in again on every touch.
glibc's dynamic mmap threshold already does this after warm-up for blocks up to 32 MiB (measured: no
page faults per inference on ResNet-50 / YOLOv4-tiny at batch 1 either way), so it matters for larger
activations (big batches). A no-op where glibc's ``mallopt`` is unavailable.

OpenMP's spin-wait (``GOMP_SPINCOUNT``) is read by libgomp when torch is loaded, so it cannot be set
here: entry points set it before importing torch (see benchmarks/cpu_bench.py for why it matters on a
shared machine). Nothing here reads environment variables: callers pass what they want.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLDS = (1 << 30, 1 << 25)  # some glibc builds refuse thresholds above 32 MiB (HEAP_MAX / 2)
_TRIM_THRESHOLD = 1 << 31


@dataclass
class CpuRuntimeOptions:
    """What `configure` applies. threads None leaves torch's current setting."""

    threads: int | None = None
    retain_heap: bool = False


def physical_cores() -> int:
    """Physical cores of this machine (distinct (package, core id) pairs in /proc/cpuinfo), else os.cpu_count()."""
    try:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "physical id":
                    phys = val
                elif key == "core id":
                    core = val
                elif not key and core:
                    cores.add((phys, core))
                    phys = core = ""
        if core:
            cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def retain_heap() -> bool:
    """Keep freed large blocks in the process heap (glibc); True when the setting was applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = any(mallopt(_M_MMAP_THRESHOLD, t) == 1 for t in _MMAP_THRESHOLDS)
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok


def configure(options: CpuRuntimeOptions | None = None, *, threads: int | None = None) -> CpuRuntimeOptions:
    """Apply CPU runtime options (process-wide) and return what was applied."""
    opts = options or CpuRuntimeOptions(threads=threads)
    if options is not None and threads is not None:
        opts = CpuRuntimeOptions(threads=threads, retain_heap=options.retain_heap)
    if opts.threads is not None:
        if opts.threads < 1:
            raise ValueError(f"threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(opts.threads)
    if opts.retain_heap:
        retain_heap()
    return opts
