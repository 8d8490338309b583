"""What the host CPU computes natively in reduced precision: the one place that reads its feature flags.

The builder asks `native_low_precision` before lowering a CPU build to float16/bfloat16
(kiln.passes.precision): oneDNN's bfloat16 convolutions, inner products and pools have jit kernels only
where the CPU has BF16 instructions (AVX512-BF16 or AMX-BF16); elsewhere it falls back to its reference
loops, far slower than float32. Kiln's CPU tactics have no float16 kernels, so a float16 CPU build is
never native.
"""
from __future__ import annotations

import functools

from kiln.ir.dtype import DType

BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of the instructions oneDNN's jit bfloat16 kernels run on."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_low_precision(dtype: DType) -> bool:
    """Whether Kiln's CPU tactics compute `dtype` (FLOAT16 / BFLOAT16) with native instructions on this CPU."""
    if dtype == DType.BFLOAT16:
        return bool(cpu_flags() & BF16_FLAGS)
    return False
