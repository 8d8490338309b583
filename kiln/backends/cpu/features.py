"""What the host CPU is and computes natively: the one place that reads /proc/cpuinfo.

`cpu_model` and `vector_isa` name the machine a CPU build was tuned on: the timing cache keys its entries on
them and a plan records them (a plan tuned on one x86 CPU runs on another, with a warning that its tactic
choices were timed elsewhere).

The builder asks `native_low_precision` before lowering a CPU build to float16/bfloat16
(kiln.passes.precision): oneDNN's bfloat16 convolutions, inner products and pools have jit kernels only
where the CPU has BF16 instructions (AVX512-BF16 or AMX-BF16); elsewhere it falls back to its reference
loops, far slower than float32. Kiln's CPU tactics have no float16 kernels, so a float16 CPU build is
never native.
"""
from __future__ import annotations

import functools
import platform

import torch

from kiln.ir.dtype import DType

BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of the instructions oneDNN's jit bfloat16 kernels run on."""


VECTOR_FLAGS: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                 "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd",
                                 "sve")
"""The vector extensions that decide which kernels oneDNN and the C compiler pick (x86 and Arm names)."""

VNNI_FLAGS: frozenset[str] = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""/proc/cpuinfo flags of x86 int8 dot-product instructions that sum u8 x s8 products into int32 exactly."""


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where it cannot be read)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if out:
                        break
                    continue
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags as /proc/cpuinfo lists them (x86 "flags", Arm "Features"; empty where it
    cannot be read)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_model() -> str:
    """The host CPU's model name ("AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C"), else the platform's word."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model name") or info.get("CPU part") or ""
    return " ".join(name.split())[:200] or platform.processor() or platform.machine() or "unknown"


def vector_isa() -> str:
    """The host CPU's vector extensions among VECTOR_FLAGS, space-separated in that order ("" where unknown)."""
    flags = cpu_flags()
    return " ".join(f for f in VECTOR_FLAGS if f in flags)


def native_low_precision(dtype: DType) -> bool:
    """Whether Kiln's CPU tactics compute `dtype` (FLOAT16 / BFLOAT16) with native instructions on this CPU."""
    if dtype == DType.BFLOAT16:
        return bool(cpu_flags() & BF16_FLAGS)
    return False


def exact_int8() -> bool:
    """Whether oneDNN's int8 convolutions and matmuls are exact on this CPU for every int8 layer. On x86 without
    VNNI they multiply u8 x s8 with vpmaddubsw, whose 16-bit pair sums saturate (255 * 127 * 2 > 32767), and an
    int8 (signed) input makes oneDNN halve the weights: results then differ from the integer math by whole
    quantization steps (`exact_int8_layer` says which layers are exact there). Other architectures: assumed exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return bool(cpu_flags() & VNNI_FLAGS)


NO_VNNI_WEIGHT_MAX = 64
"""Without VNNI, weights within +-64 keep oneDNN's u8 x s8 pair sums inside int16 (255 * 64 * 2 = 32640)."""


NO_VNNI_INT8 = (f"this x86 CPU has no VNNI: oneDNN's int8 kernels are exact here only for uint8 inputs and weights "
                f"within +-{NO_VNNI_WEIGHT_MAX}")
"""The rule `exact_int8_layer` applies, as warnings, refusals and test skips state it."""


def exact_int8_layer(x_dtype: DType | None, w: torch.Tensor) -> bool:
    """Whether oneDNN computes an int8 layer with this input type and int8 weight exactly here: always where
    `exact_int8`; on x86 without VNNI for a uint8 input and weights within +-NO_VNNI_WEIGHT_MAX (Kiln's own
    calibrated INT8 quantizes so there: `int8_activation_zero_point`, `int8_weight_max`)."""
    if exact_int8():
        return True
    return x_dtype == DType.UINT8 and int(w.to(torch.int16).abs().max()) <= NO_VNNI_WEIGHT_MAX


def int8_weight_max(device: str) -> int:
    """The largest int8 weight magnitude Kiln's calibrated INT8 uses on `device` (127, or NO_VNNI_WEIGHT_MAX on
    a CPU without VNNI: one bit of weight resolution for exact integer kernels)."""
    return NO_VNNI_WEIGHT_MAX if device == "cpu" and not exact_int8() else 127


def int8_activation_zero_point(device: str) -> int | None:
    """None: Kiln's calibrated INT8 quantizes activations symmetric int8 (zero point 0); 128: uint8 with zero point
    128 instead, on a CPU without VNNI (the same grid: values -128..127 steps, stored shifted by 128)."""
    return 128 if device == "cpu" and not exact_int8() else None
