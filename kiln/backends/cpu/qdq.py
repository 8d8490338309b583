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
from kiln.backends.qdq import ncp
from kiln.backends.qdq import qdq_spec as shared_spec
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_P, _L, _I = C.c_void_p, C.c_long, C.c_int
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


def qdq_spec(node: Node) -> dict[str, Any] | None:
    """kiln.backends.qdq.qdq_spec for this kernel: a float32/bfloat16 float side, float32 work (bfloat16 for a
    bfloat16 input and scale), and the output type the reference produces (a quantize: the zero point's, else
    output_dtype, else uint8; a dequantize: output_dtype, else the scale's). Adds work_bf16."""
    spec = shared_spec(node, _FLOATS)
    if spec is None:
        return None
    try:
        out_code = int(node.attr("output_dtype", 0) or 0)
        out_attr = DType.from_onnx(out_code) if out_code else None
    except Exception:
        return None
    if spec["quant"]:
        if spec["work"] not in (torch.float32, torch.bfloat16) or \
                (spec["zp"] is None and (out_attr or DType.UINT8) != spec["int"]):
            return None
    elif (out_attr or DType.from_torch(spec["scale"].dtype)) != spec["float"]:
        return None
    return {**spec, "work_bf16": spec["work"] == torch.bfloat16}


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
            if y is None or ncp(y) is None or any(st == 0 and sz > 1 for st, sz in zip(y.stride(), y.shape)):
                y = torch.empty(x.shape, dtype=out_t,
                                memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
            if x.numel():
                xv = x if ncp(x) is not None else x.contiguous()
                nn, cc, pp, sxn, sxc, sxp = ncp(xv)  # type: ignore[misc]
                _, _, _, syn, syc, syp = ncp(y)  # type: ignore[misc]
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
