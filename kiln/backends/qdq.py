"""What the Q/DQ kernels of both backends (cpu.qdq_c, cuda.triton_qdq) take of a QuantizeLinear /
DequantizeLinear, and how they walk a tensor: as N x C x P (images, channels, pixels) through three strides."""
from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.registry import norm_axis

INT_RANGES = {DType.INT8: (-128.0, 127.0), DType.UINT8: (0.0, 255.0)}
"""The 8-bit integer sides the kernels take, with their saturation ranges."""

FP8_RANGES = {DType.FLOAT8E4M3FN: (-448.0, 448.0)}
"""The float8 sides a kernel may take (qdq_spec(fp8=True)), with their saturation ranges."""

_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param(v: Value | None) -> torch.Tensor | None:
    """A constant scale / zero point as the reference accepts it: a scalar or a 1-D tensor."""
    if v is None or v.const is None or v.const.dim() > 1 or v.const.numel() < 1:
        return None
    return v.const.reshape(-1)


def qdq_spec(node: Node, floats: tuple[DType, ...], fp8: bool = False) -> dict[str, Any] | None:
    """What a kernel needs of a QuantizeLinear / DequantizeLinear it can take, else None: an 8-bit integer side
    (or, with `fp8`, a float8 e4m3 side, saturating), a float side among `floats`, a constant positive finite
    scale (float32/float16/bfloat16) and a zero point of the 8-bit type, per tensor or per channel of axis 1 (C
    known). Keys: quant, scale, zp (or None), per_c, int, float (DTypes), work (the reference's work type for a
    quantize: promote(float side, scale)), range (the 8-bit side's saturation limits), fp8."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return None
    if len(node.outputs) != 1 or int(node.attr("block_size", 0) or 0) or node.attr("precision"):
        return None
    x, y = node.input(0), node.outputs[0]
    if x is None or x.const is not None or x.type.rank is None:
        return None
    quant = node.op_type == "QuantizeLinear"
    int_t, float_t = (y.type.dtype, x.type.dtype) if quant else (x.type.dtype, y.type.dtype)
    ranges = {**INT_RANGES, **FP8_RANGES} if fp8 else INT_RANGES
    if int_t not in ranges or float_t not in floats:
        return None
    if int_t in FP8_RANGES and quant and not int(node.attr("saturate", 1)):
        return None  # overflow to NaN instead of +-448
    s = _param(node.input(1))
    if s is None or s.dtype not in _SCALE_DTYPES or not bool(torch.isfinite(s).all() and (s > 0).all()):
        return None
    z = _param(node.input(2)) if node.input(2) is not None else None
    if node.input(2) is not None and (z is None or z.dtype != int_t.torch or z.numel() != s.numel()):
        return None
    per_c = s.numel() > 1
    if per_c:
        rank = x.type.rank
        try:
            axis = norm_axis(int(node.attr("axis", 1)), rank) if rank >= 2 else -1
        except Exception:
            return None
        c = x.type.shape[1] if rank >= 2 else None  # type: ignore[index]
        if axis != 1 or not isinstance(c, int) or c != s.numel():
            return None
    return {"quant": quant, "scale": s, "zp": z, "per_c": per_c, "int": int_t, "float": float_t,
            "work": torch.promote_types(float_t.torch, s.dtype) if quant else torch.float32,
            "range": ranges[int_t], "fp8": int_t in FP8_RANGES}


def ncp(t: torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """(N, C, P, stride N, stride C, stride P) viewing t [N, C, ...] as N x C x P, when its trailing dims
    collapse into one stride (NCHW and NHWC both do); None otherwise. A tensor of rank <= 1 is 1 x 1 x numel."""
    if t.dim() <= 1:
        return 1, 1, t.numel(), 0, 0, (t.stride(0) if t.dim() == 1 else 1)
    sizes, strides = list(t.shape[2:]), list(t.stride()[2:])
    for i in range(len(sizes) - 1):
        if sizes[i] > 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            return None
    p = 1
    for d in sizes:
        p *= int(d)
    return int(t.shape[0]), int(t.shape[1]), p, t.stride(0), t.stride(1), strides[-1] if sizes else 1
