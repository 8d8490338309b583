"""QuantizeLinear / DequantizeLinear on CUDA (tactic ``cuda.triton_qdq``): int8, uint8 or float8 e4m3 (saturating),
per-tensor or per-channel (axis 1) constant scales and zero points, as one pass that also lays the data out for its
reader.

An INT8 plan's boundaries are these ops: the network input quantized for the first integer layer, a dequantize
before a float layer. Each is one memory-bound pass; the kernel tiles a 4-D tensor as (channels x pixels) of one
image through all of its strides, so an NCHW float input is read along its pixels and written as the NHWC int8
activations the integer layers read, in the same pass (no layout copy after it).

Arithmetic follows the reference (kiln.ops.quantize) exactly: QuantizeLinear divides in float32 with IEEE
rounding (div_rn, not the fast division), and where the reference works in float16/bfloat16 (input and scale both
of that type) the quotient is rounded to it — float32 division then rounding to a type of at most 11 bits is the
correctly rounded division in that type (24 >= 2 * 11 + 2); then round half to even, add the zero point and
saturate (float8: add the zero point, saturate to +-448 keeping NaN, round half to even onto e4m3's grid, so
that the float8 store is exact). DequantizeLinear subtracts the zero point in int32 (float8: in float32, exact),
multiplies by the scale in float32 and converts to the output type.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import FLOAT_DTYPES
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.qdq import ncp
from kiln.backends.qdq import qdq_spec as shared_spec
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor
_WORK = {torch.float16: 1, torch.bfloat16: 2}
_MAX_GRID = 65535


@triton.jit
def _round_e4m3(v):
    """v (finite within +-448, or NaN) rounded half to even to float8 e4m3's grid in float32: a step of
    2**(exponent - 3), 2**-9 below the normal range; multiplying by powers of two is exact, and the rounding is
    the 1.5 * 2**23 one. Done here rather than by the float8 conversion so that the Triton interpreter, whose
    conversion does not carry a rounding into the exponent, computes what the GPU does."""
    e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # biased exponent, at least 127 - 6
    step = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv = ((257 - e) << 23).to(tl.float32, bitcast=True)  # 1 / step: 2**(3 - (e - 127)) biased
    return ((v * inv + 12582912.0) - 12582912.0) * step


@triton.jit
def _qdq_kernel(x_ptr, s_ptr, z_ptr, y_ptr, C, P, sxn, sxc, sxp, syn, syc, syp, lo, hi,
                QUANT: tl.constexpr, PER_C: tl.constexpr, HAS_Z: tl.constexpr, WORK: tl.constexpr,
                FP8: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c_ok = cs < C
    mask = c_ok[:, None] & (ps < P)[None, :]
    x = tl.load(x_ptr + n * sxn + cs.to(tl.int64)[:, None] * sxc + ps[None, :] * sxp, mask=mask, other=0.0)
    if PER_C:
        s = tl.load(s_ptr + cs, mask=c_ok, other=1.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[:, None] if HAS_Z else 0.0
    else:
        s = tl.load(s_ptr).to(tl.float32)
        z = tl.load(z_ptr).to(tl.float32) if HAS_Z else 0.0
    if QUANT:
        v = tl.math.div_rn(x.to(tl.float32), s)
        if WORK == 1:
            v = v.to(tl.float16).to(tl.float32)
        elif WORK == 2:
            v = v.to(tl.bfloat16).to(tl.float32)
        if FP8:  # + zero point, saturated to +-448 with NaN kept, rounded to e4m3's grid here (the store is exact)
            v = v + z
            v = _round_e4m3(tl.where(v != v, v, tl.minimum(tl.maximum(v, lo), hi)))
        else:
            v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)  # +-2**22: saturates below either way
            v = (v + 12582912.0) - 12582912.0  # + 1.5 * 2**23: round half to even
            v = tl.minimum(tl.maximum(v + z, lo), hi)
    else:
        v = (x.to(tl.float32) - z) * s  # |x - z| <= 255: exact in float32, one rounding in the product
    tl.store(y_ptr + n * syn + cs.to(tl.int64)[:, None] * syc + ps[None, :] * syp, v.to(y_ptr.dtype.element_ty),
             mask=mask)


def qdq_spec(node: Node) -> dict[str, Any] | None:
    """kiln.backends.qdq.qdq_spec for this kernel: a float32, float16 or bfloat16 float side; int8, uint8 or
    float8 e4m3."""
    return shared_spec(node, FLOAT_DTYPES, fp8=True)


def _as_ncp(t: Tensor) -> tuple[Tensor, tuple[int, int, int]] | None:
    """(t, its (n, c, pixel) strides) when its trailing dims collapse into one stride (kiln.backends.qdq.ncp)."""
    r = ncp(t)
    return None if r is None else (t, r[3:])


def _pixels(t: Tensor) -> int:
    p = 1
    for d in t.shape[2:]:
        p *= int(d)
    return p


class TritonQDQ(Tactic):
    """QuantizeLinear / DequantizeLinear (8-bit, constant per-tensor or axis-1 parameters) in one strided pass."""

    id = "cuda.triton_qdq"
    devices = ("cuda",)
    priority = 30
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return qdq_spec(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        shape = node.inputs[0].type.shape  # type: ignore[union-attr]
        c = shape[1] if shape is not None and len(shape) >= 2 else 1
        if shape is not None and len(shape) == 2 and isinstance(c, int) and c > 1:  # [N, C]: one pixel per channel
            wide = min(4096, 1 << (c - 1).bit_length())  # tiles along C only (a pixel tile would be all mask)
            return [{"BLOCK_C": min(1024, wide), "BLOCK_P": 1, "num_warps": 4},
                    {"BLOCK_C": wide, "BLOCK_P": 1, "num_warps": 8}]
        bc = min(64, 1 << max(0, (int(c) - 1).bit_length())) if isinstance(c, int) and c > 0 else 32
        return [{"BLOCK_C": bc, "BLOCK_P": max(64, 4096 // bc), "num_warps": 4},
                {"BLOCK_C": bc, "BLOCK_P": max(64, 8192 // bc), "num_warps": 8}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        spec = qdq_spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        quant: bool = spec["quant"]
        s = spec["scale"].to(device)
        z = spec["zp"].to(device) if spec["zp"] is not None else s
        lo, hi = spec["range"]
        out_t = (spec["int"] if quant else spec["float"]).torch
        s_work = spec["scale"].dtype
        bc, bp, warps = int(config["BLOCK_C"]), int(config["BLOCK_P"]), int(config.get("num_warps", 4))
        consts = dict(QUANT=quant, PER_C=spec["per_c"], HAS_Z=spec["zp"] is not None, FP8=spec["fp8"], BLOCK_C=bc,
                      BLOCK_P=bp, num_warps=warps)

        def kernel(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            work = _WORK.get(x.dtype, 0) if quant and s_work == x.dtype else 0
            y = out
            if y is None or _as_ncp(y) is None or tuple(y.shape) != tuple(x.shape):
                y = torch.empty(x.shape, dtype=out_t, device=x.device,
                                memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
            xv = _as_ncp(x) or _as_ncp(x.contiguous())
            assert xv is not None
            xt, (sxn, sxc, sxp) = xv
            yt, (syn, syc, syp) = _as_ncp(y)  # type: ignore[misc]
            if x.dim() >= 2:
                n, c, p = int(x.shape[0]), int(x.shape[1]), _pixels(x)
            else:
                n, c, p = 1, 1, x.numel()
            for n0 in range(0, n if c and p else 0, _MAX_GRID):  # the grid's third dimension holds 65535 images
                k = min(_MAX_GRID, n - n0)
                xs, ys = (xt, yt) if k == n else (xt.narrow(0, n0, k), yt.narrow(0, n0, k))
                launch(_qdq_kernel, (triton.cdiv(p, bp), triton.cdiv(c, bc), k),
                       [xs, s, z, ys, c, p, sxn, sxc, sxp, syn, syc, syp, lo, hi], {**consts, "WORK": work})
            if out is not None and y is not out:
                out.copy_(y)
                return out
            return y
        return Kernel(kernel, writes_out=1)


register_tactic(TritonQDQ())
