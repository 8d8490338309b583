"""One-pass Triton epilogue for convolutions and GEMMs computed by a library call (cuDNN, cuBLAS).

cuDNN fuses only bias + ReLU (+ residual) into a convolution. For every other activation (LeakyRelu,
Mish, SiLU, HardSwish, ...) torch would add the bias, apply the activation and add the residual as
separate elementwise kernels over the output: three to four memory passes, and on channels_last
outputs torch's broadcast bias add takes its slow non-vectorized path. Here the library computes the
bare product and one kernel reads it once, adds bias[c] (and the residual), applies the activation in
float32, and writes it back in place.

The output is addressed as a flat [M, C] array with the channel innermost (NHWC / channels_last, or a
GEMM's [rows, C]); the residual must have that same layout. Where C is a multiple of 16 (every row starts
16-element aligned, so the row loads stay vectorized), a program takes a tile of rows x a block of channels and
loads the bias block once; otherwise the array is walked flat and each element's channel is its offset modulo
C (an integer division per element, which on the large maps of a detector costs as much as the memory traffic).
Activation, bias/residual presence and the order of add and activation are compile-time constants (one small
variant per layer kind).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import ACT_CODES, Epilogue
from kiln.backends.cuda.triton_act import apply_act
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_pool import _p2

Tensor = torch.Tensor

BLOCK = 2048
_INT32_LIMIT = 2**31 - BLOCK


@triton.jit
def _act_residual(x, z_ptr, offs, mask, alpha, beta, HAS_Z: tl.constexpr, ACT: tl.constexpr,
                  ACT_BEFORE_ADD: tl.constexpr):
    """The activation and the residual z (at offs), in the fused order, on a float32 block."""
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT_BEFORE_ADD:
            x = apply_act(x, ACT, alpha, beta) + z
        else:
            x = apply_act(x + z, ACT, alpha, beta)
    else:
        x = apply_act(x, ACT, alpha, beta)
    return x


@triton.jit
def _epilogue_kernel(y_ptr, b_ptr, z_ptr, total, C, alpha, beta, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
                     ACT: tl.constexpr, ACT_BEFORE_ADD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    x = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(b_ptr + offs % C, mask=mask, other=0.0).to(tl.float32)
    x = _act_residual(x, z_ptr, offs, mask, alpha, beta, HAS_Z, ACT, ACT_BEFORE_ADD)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_rows_kernel(y_ptr, b_ptr, z_ptr, M, C, alpha, beta, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
                          ACT: tl.constexpr, ACT_BEFORE_ADD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    mask = (rows < M)[:, None] & c_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    x = _act_residual(x, z_ptr, offs, mask, alpha, beta, HAS_Z, ACT, ACT_BEFORE_ADD)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


def channels_innermost(t: Tensor) -> bool:
    """True when t's elements are dense with the channel (dim 1 of a 4-D NCHW-shaped tensor, the last dim of a
    2-D one) varying fastest: the flat [M, C] view this module's kernel addresses."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 2 and t.is_contiguous()


class OnePassEpilogue:
    """The epilogue of one layer, its compile-time switches fixed once (at kernel build): call it as
    `epi(y, bias, z)` on each output (see epilogue_)."""

    def __init__(self, ep: Epilogue) -> None:
        self.alpha, self.beta = float(ep.alpha), float(ep.beta)
        self.meta = {"ACT": ACT_CODES[ep.activation], "ACT_BEFORE_ADD": bool(ep.act_before_add)}

    def __call__(self, y: Tensor, bias: Tensor | None, z: Tensor | None) -> Tensor:
        if not channels_innermost(y):
            raise ValueError("epilogue_: the output must be channels_last (4-D) or a contiguous matrix (2-D)")
        c = int(y.shape[1]) if y.dim() == 4 else int(y.shape[-1])
        if z is not None and not (z.shape == y.shape and channels_innermost(z)):
            z = z.expand(y.shape).contiguous(memory_format=torch.channels_last if y.dim() == 4 else
                                             torch.contiguous_format)
        total = y.numel()
        if total == 0:
            return y
        ptrs = [y, bias if bias is not None else y, z if z is not None else y]
        flags = {**self.meta, "HAS_BIAS": bias is not None, "HAS_Z": z is not None, "num_warps": 8}
        if c % 16 == 0:
            bc = min(256, _p2(c))
            bm = BLOCK // bc
            rows = total // c
            launch(_epilogue_rows_kernel, (triton.cdiv(rows, bm), triton.cdiv(c, bc)),
                   [*ptrs, rows, c, self.alpha, self.beta], {**flags, "BLOCK_M": bm, "BLOCK_C": bc})
        else:
            launch(_epilogue_kernel, (triton.cdiv(total, BLOCK),), [*ptrs, total, c, self.alpha, self.beta],
                   {**flags, "BLOCK": BLOCK, "WIDE": total > _INT32_LIMIT})
        return y


def epilogue_(y: Tensor, bias: Tensor | None, z: Tensor | None, ep: Epilogue) -> Tensor:
    """y = act(y + bias[c] (+ z)) (or act(y + bias) + z) in one pass, in place; y channels-innermost (see
    channels_innermost), z (if any) of y's shape, made to y's layout when it is not already."""
    return OnePassEpilogue(ep)(y, bias, z)


__all__ = ["OnePassEpilogue", "epilogue_", "channels_innermost"]
