"""QuantizeLinear / DequantizeLinear on the CPU in C (tactic ``cpu.qdq_c``, ``native/qdq.c``): 8-bit, per-tensor or
per-channel (axis 1) constant scales and zero points, in one strided pass that writes the layout its reader wants.

An INT8 plan's boundaries are these ops: the network input quantized for the first integer layer, a dequantize
before a float layer. The reference writes an NCHW int8 tensor that the first integer convolution reorders to NHWC;
here one pass reads the input through its strides (NCHW, NHWC, a channel slice) and writes the destination's layout,
channels-last for 4-D tensors (the int8 layers read it as is). The CPU twin of ``cuda.triton_qdq``.

Arithmetic is the reference's (kiln.ops.quantize) bit for bit: float32 (or bfloat16) input divided by the scale in
IEEE float32 division (rounded to bfloat16 where the reference works in bfloat16: input and scale both bfloat16),
rounded half to even, plus the zero point, saturated; DequantizeLinear (x - z) * s in float32, converted to float32
or bfloat16. Anything else (float16 or float64 work, other integer types, float 8, blocked quantization, a
`precision` attribute, non-constant or non-positive scales) stays on the reference. Calls the kernel was not made
for (another dtype or device, a channel count that does not match) run the reference. Declines everything where
no C compiler works.
"""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.registry import lookup, norm_axis

Tensor = torch.Tensor
_P, _L, _I = C.c_void_p, C.c_long, C.c_int
_INTS = (DType.INT8, DType.UINT8)
_FLOATS = (DType.FLOAT32, DType.BFLOAT16)
PARALLEL_MIN = 1 << 17
"""Tensors with fewer elements run on one thread, larger ones on torch's intra-op thread count (a pass over
[1, 3, 224, 224], 150k elements, is some 100-200 us on one core; an OpenMP fork costs a few us, a sleeping
worker tens)."""


def _library() -> Any:
    lib = native.load("qdq")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_quantize.argtypes = [_P, _I, _L, _L, _L, _L, _L, _L, _P, _P, _L, _I, _P, _I, _L, _L, _L, _I]
        lib.kiln_quantize.restype = None
        lib.kiln_dequantize.argtypes = [_P, _I, _L, _L, _L, _L, _L, _L, _P, _P, _L, _P, _I, _L, _L, _L, _I]
        lib.kiln_dequantize.restype = None
        lib._kiln_typed = True
    return lib


def _param(v: Value | None) -> Tensor | None:
    """A constant scale / zero point as the reference accepts it: a scalar or a 1-D tensor."""
    if v is None or v.const is None or v.const.dim() > 1 or v.const.numel() < 1:
        return None
    return v.const.reshape(-1)


def qdq_spec(node: Node) -> dict[str, Any] | None:
    """What the kernel needs of a QuantizeLinear / DequantizeLinear it takes, else None: int8/uint8 integer side,
    float32/bfloat16 other side with float32 work (or bfloat16 for a bfloat16 input and scale), a constant
    positive finite scale and a zero point of the integer type, per tensor or per channel of axis 1."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return None
    if len(node.outputs) != 1 or int(node.attr("block_size", 0) or 0) or node.attr("precision"):
        return None
    x, y = node.input(0), node.outputs[0]
    if x is None or x.const is not None or x.type.rank is None:
        return None
    quant = node.op_type == "QuantizeLinear"
    int_t, float_t = (y.type.dtype, x.type.dtype) if quant else (x.type.dtype, y.type.dtype)
    if int_t not in _INTS or float_t not in _FLOATS:
        return None
    s = _param(node.input(1))
    if s is None or s.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        return None
    z = _param(node.input(2)) if node.input(2) is not None else None
    if node.input(2) is not None and (z is None or z.dtype != int_t.torch or z.numel() != s.numel()):
        return None
    try:
        out_code = int(node.attr("output_dtype", 0) or 0)
        out_attr = DType.from_onnx(out_code) if out_code else None
    except Exception:
        return None
    if quant:  # the reference's output type: the zero point's, else output_dtype, else uint8
        work = torch.promote_types(float_t.torch, s.dtype)
        if work not in (torch.float32, torch.bfloat16) or (z is None and (out_attr or DType.UINT8) != int_t):
            return None
    else:  # the reference's output type: output_dtype, else the scale's
        work = torch.float32
        if (out_attr or DType.from_torch(s.dtype)) != float_t:
            return None
    rank = x.type.rank
    per_c = s.numel() > 1
    if per_c:
        try:
            axis = norm_axis(int(node.attr("axis", 1)), rank) if rank >= 2 else -1
        except Exception:
            return None
        c = x.type.shape[1] if rank >= 2 else None  # type: ignore[index]
        if axis != 1 or not isinstance(c, int) or c != s.numel():
            return None
    return {"quant": quant, "scale": s, "zp": z, "per_c": per_c, "int": int_t, "float": float_t,
            "work_bf16": work == torch.bfloat16}


def _as_ncp(t: Tensor) -> tuple[int, int, int, int, int, int] | None:
    """(N, C, P, stride N, stride C, stride P) viewing t [N, C, ...] as N x C x P, when its trailing dims
    collapse into one stride (NCHW and NHWC both do); None otherwise."""
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


class CpuQDQTactic(CpuTactic):
    """QuantizeLinear / DequantizeLinear (8-bit, constant per-tensor or axis-1 parameters) in one strided C pass."""

    id = "cpu.qdq_c"
    priority = 10
    writes_out = 1
    ops = (("", "QuantizeLinear"), ("", "DequantizeLinear"), ("ai.onnx", "QuantizeLinear"),
           ("ai.onnx", "DequantizeLinear"))

    def accepts(self, node: Node) -> bool:
        return qdq_spec(node) is not None and _library() is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.qdq_c: no C compiler builds its kernel here ({native.error('qdq')})")
        spec = qdq_spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        quant: bool = spec["quant"]
        s_const, z_const = spec["scale"], spec["zp"]
        s = s_const.float().contiguous()
        z = (z_const.float() if z_const is not None else torch.zeros(s.numel())).contiguous()
        per_c = spec["per_c"]
        ps = 1 if per_c else 0
        in_t = (spec["float"] if quant else spec["int"]).torch
        out_t = (spec["int"] if quant else spec["float"]).torch
        float_bf16 = int(spec["float"] == DType.BFLOAT16)
        int_signed = int(spec["int"] == DType.INT8)
        work_bf16 = int(spec["work_bf16"])
        params = [v.const for v in node.inputs[1:3] if v is not None]  # the reference's scale, zero point
        reference = lookup(node.op_type, "").compute
        call = lib.kiln_quantize if quant else lib.kiln_dequantize
        n_param = s.numel()
        state = (s, z)  # the closure keeps what the pointers point to

        def k_qdq(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            if x.dtype != in_t or not x.is_cpu or (per_c and (x.dim() < 2 or x.shape[1] != n_param)):
                y = reference(node, x, *params)  # its checks
                return out.copy_(y) if out is not None else y
            if out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != out_t or not out.is_cpu):
                raise KilnError(f"node '{node.name}': {node.op_type} of a {list(x.shape)} tensor into a "
                                f"{list(out.shape)} {out.dtype} destination on {out.device}")
            y = out
            if y is None or _as_ncp(y) is None or any(st == 0 and sz > 1 for st, sz in zip(y.stride(), y.shape)):
                y = torch.empty(x.shape, dtype=out_t,
                                memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
            if x.numel():
                xv = x if _as_ncp(x) is not None else x.contiguous()
                nn, cc, pp, sxn, sxc, sxp = _as_ncp(xv)  # type: ignore[misc]
                _, _, _, syn, syc, syp = _as_ncp(y)  # type: ignore[misc]
                threads = torch.get_num_threads() if x.numel() >= PARALLEL_MIN else 1
                if quant:
                    call(xv.data_ptr(), float_bf16, nn, cc, pp, sxn, sxc, sxp, state[0].data_ptr(),
                         state[1].data_ptr(), ps, work_bf16, y.data_ptr(), int_signed, syn, syc, syp, threads)
                else:
                    call(xv.data_ptr(), int_signed, nn, cc, pp, sxn, sxc, sxp, state[0].data_ptr(),
                         state[1].data_ptr(), ps, y.data_ptr(), float_bf16, syn, syc, syp, threads)
            if out is not None and y is not out:
                return out.copy_(y)
            return y
        prepacked = frozenset(i for i in (1, 2) if node.input(i) is not None)
        return Kernel(k_qdq, prepacked=prepacked, out_format="channels_last")


register_tactic(CpuQDQTactic())
