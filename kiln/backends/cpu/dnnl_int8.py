"""oneDNN's integer (INT8) convolution and matmul primitives for QConv / QGemm (kiln.ops.qlayers' semantics).

The int8 side of kiln.backends.cpu.dnnl (resources, threads and the dtype check of `run` are
kiln.backends.cpu.dnnl_primitive's): int8/uint8 source, int8 weights reordered once, the multipliers
x_scale * w_scales[k] as oneDNN's weights scales, source and destination zero points, and the epilogue (bias,
int8 or float residual, activation, the a_scale requantization, * 1 / y_scale) as post-ops.

``QConvolution``, ``QMatMul`` (kiln.ops.qlayers' QConv / QGemm): int8/uint8 sources, int8 weights reordered once
(with the compensation oneDNN's int8 kernels need), the combined multiplier ``x_scale * w_scales[k]`` as oneDNN
3.x's weights scales and the zero points as attributes, their values fixed memory arguments
(``DNNL_ARG_ATTR_SCALES | arg``, ``DNNL_ARG_ATTR_ZERO_POINTS | arg``); the requantization ``v * (1 / y_scale)`` is
the last post-op (an eltwise linear, so it rounds as the reference does) and oneDNN adds the output zero point,
rounds half to even and saturates (it rounds v + zp, so an odd zero point gets an eltwise round first: the
reference rounds v).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kiln.backends.cpu.dnnl import (ARG_ATTR_SCALES, ARG_ATTR_ZERO_POINTS, ARG_BIAS, ARG_DST, ARG_SRC, ARG_WEIGHTS,
                                    CONVOLUTION_DIRECT, F32, FLOAT32, FORWARD_INFERENCE, S8, S32, Dims, Library, Owned,
                                    P, data_type)
from kiln.backends.cpu.dnnl_epilogue import bias_md, post_ops
from kiln.backends.cpu.dnnl_float import conv_weight_shape
from kiln.backends.cpu.dnnl_primitive import Primitive
from kiln.errors import KilnError


@dataclass(frozen=True)
class Requant:
    """An integer layer's quantization (kiln.ops.qlayers' semantics) in the terms oneDNN applies it."""

    multipliers: torch.Tensor
    """float32 x_scale * w_scales[k], one per output channel (oneDNN's weights scales)."""
    x_zero_point: int = 0
    y_scale: float | None = None
    """The output scale of an int8/uint8 output; None for a float output (v itself)."""
    y_zero_point: int = 0
    z_scale: float = 1.0
    """An int8/uint8 residual's scale and zero point (ignored for a float residual)."""
    z_zero_point: int = 0
    mid: tuple[float, int, int, int] | None = None
    """(scale, zero point, lo, hi) of a requantization of the layer's own result before the residual (a_scale)."""


_INT8 = (torch.int8, torch.uint8)


class _QLayer(Primitive):
    """What QConvolution and QMatMul share: the checks, the quantization attributes, the int8 weights."""

    def _check(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, q: Requant,
               n: int) -> None:
        if x.dtype not in _INT8 or w.dtype is not torch.int8:
            raise KilnError(f"an integer layer takes an int8/uint8 input and int8 weights, got {x.dtype} and "
                            f"{w.dtype}")
        if (y.dtype in _INT8) != (q.y_scale is not None) or y.dtype not in (*_INT8, FLOAT32, torch.float16):
            raise KilnError(f"an integer layer writes int8/uint8 (with an output scale) or float32/float16, got "
                            f"{y.dtype}{'' if q.y_scale is None else ' with an output scale'}")
        if z is not None and z.dtype not in (*_INT8, FLOAT32, torch.float16):
            raise KilnError(f"an integer layer adds an int8/uint8/float32/float16 residual, got {z.dtype}")
        m = q.multipliers
        if m.dtype is not FLOAT32 or m.dim() != 1 or m.numel() not in (1, n):
            raise KilnError(f"an integer layer of {n} output channels takes 1 or {n} float32 multipliers, got "
                            f"{list(m.shape)} {m.dtype}")

    def _attr(self, tmp: Owned, q: Requant, w_mask: int, z: torch.Tensor | None, act: str, alpha: float,
              beta: float, act_first: bool) -> tuple[P, int, Any, list[tuple[int, Any, int]]]:
        """(attributes, z's execute argument, z's descriptor, the fixed scale / zero point arguments): the
        multipliers as weights scales, the zero points, the epilogue's post-ops ending in * (1 / y_scale)."""
        lib, d = self.lib, self.dll
        out_scale = 1.0 if q.y_scale is None else 1.0 / q.y_scale  # rounded to float32 by ctypes, as the reference
        odd_zp = q.y_scale is not None and q.y_zero_point % 2 != 0  # only an odd zero point moves a tie's rounding
        attr, z_arg, z_md = post_ops(lib, tmp, act, alpha, beta, z, act_first, q.z_scale, q.z_zero_point,
                                     out_scale, odd_zp, q.mid)
        m = q.multipliers.detach().contiguous()
        if bool((m == m[0]).all()):
            m, w_mask = m[:1].clone(), 0  # one scale for all channels
        self.scales = m
        lib.ok(d.dnnl_primitive_attr_set_scales_mask(attr, ARG_WEIGHTS, w_mask), "weights scales")
        fixed = [(ARG_ATTR_SCALES | ARG_WEIGHTS, lib.md(tmp, [m.numel()], [1], F32), m.data_ptr())]
        self.zero_points = []
        for arg, zp in ((ARG_SRC, q.x_zero_point), (ARG_DST, 0 if q.y_scale is None else q.y_zero_point)):
            if zp:
                t = torch.tensor([zp], dtype=torch.int32)
                self.zero_points.append(t)
                lib.ok(d.dnnl_primitive_attr_set_zero_points_mask(attr, arg, 0), "zero points")
                fixed.append((ARG_ATTR_ZERO_POINTS | arg, lib.md(tmp, [1], [1], S32), t.data_ptr()))
        return attr, z_arg, z_md, fixed

    def _finish_q(self, tmp: Owned, pd: P, w: torch.Tensor, b: torch.Tensor | None, b_md: Any,
                  fixed: list[tuple[int, Any, int]], src: tuple[Any, torch.dtype], dst: tuple[Any, torch.dtype],
                  z: tuple[int, Any, torch.dtype] | None) -> None:
        """`_finish` with the int8 weights (logical shape, any strides) reordered once and the bias kept."""
        w_md = self._weights_from(tmp, pd, w)
        self.bias = None if b is None else b.detach().contiguous()
        fixed = [(ARG_WEIGHTS, w_md, self.weights.data_ptr()), *fixed]
        if self.bias is not None:
            fixed.append((ARG_BIAS, b_md, self.bias.data_ptr()))
        dynamic = [(ARG_SRC, *src), (ARG_DST, *dst)] + ([z] if z is not None else [])
        self._finish(pd, fixed, dynamic)


class QConvolution(_QLayer):
    """One oneDNN integer 2-D convolution (QConv) for fixed input/residual/output shapes, strides and dtypes.

    x int8/uint8, w int8 [K, C/groups, KH, KW] (reordered once), b float32 [K] or None, y int8/uint8 (with
    q.y_scale) or float32/float16, z an int8/uint8 (dequantized with q.z_scale / q.z_zero_point) or float
    residual of y's shape or None; padding reads as x's zero point. `run(x, y[, z])` is safe to call from
    several threads.
    """

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int], groups: int, q: Requant, act: str, alpha: float, beta: float,
                 act_first: bool) -> None:
        tmp = self._begin(lib)
        try:
            k, w_shape = conv_weight_shape(x, w, groups)
            self._check(x, w, y, z, q, k)
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
            b_md = bias_md(lib, tmp, b, k, [k], [1])
            attr, z_arg, z_md, fixed = self._attr(tmp, q, 1 if groups == 1 else 3, z, act, alpha, beta, act_first)
            pd = lib.pd(tmp, "convolution descriptor", lib.dll.dnnl_convolution_forward_primitive_desc_create,
                        lib.engine, FORWARD_INFERENCE, CONVOLUTION_DIRECT, src_md, lib.md(tmp, w_shape, None, S8),
                        b_md, dst_md, Dims(*strides), Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l),
                        Dims(*pad_r), attr)
            self._finish_q(tmp, pd, w.detach().contiguous().reshape(w_shape), b, b_md, fixed, (src_md, x.dtype),
                           (dst_md, y.dtype), None if z is None else (z_arg, z_md, z.dtype))
        finally:
            tmp.close()


class QMatMul(_QLayer):
    """One oneDNN integer matmul (QGemm) y = x @ w^T for fixed shapes, strides and dtypes: x int8/uint8
    [M, K] or [..., M, K], w an int8 constant [N, K] (like nn.Linear; reordered once, shared by every batch),
    b float32 [N] or None, y / z as QConvolution's of shape [..., M, N]. `run(x, y[, z])`."""

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, q: Requant, act: str = "", alpha: float = 0.0, beta: float = 0.0,
                 act_first: bool = False) -> None:
        tmp = self._begin(lib)
        try:
            nd = x.dim()
            if w.dim() != 2 or nd < 2 or int(x.shape[-1]) != int(w.shape[1]) or y.dim() != nd:
                raise KilnError(f"a matmul with weights {list(w.shape)}^T cannot read an input of shape "
                                f"{list(x.shape)}")
            n, kk = (int(s) for s in w.shape)
            self._check(x, w, y, z, q, n)
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
            b_md = bias_md(lib, tmp, b, n, [1] * (nd - 1) + [n], [n] * (nd - 1) + [1])
            attr, z_arg, z_md, fixed = self._attr(tmp, q, 1 << (nd - 1), z, act, alpha, beta, act_first)
            w_kn = w.detach().t().contiguous().reshape([1] * (nd - 2) + [kk, n])  # [..., K, N]
            pd = lib.pd(tmp, "matmul descriptor", lib.dll.dnnl_matmul_primitive_desc_create, lib.engine, src_md,
                        lib.md(tmp, w_kn.shape, None, S8), b_md, dst_md, attr)
            self._finish_q(tmp, pd, w_kn, b, b_md, fixed, (src_md, x.dtype), (dst_md, y.dtype),
                           None if z is None else (z_arg, z_md, z.dtype))
        finally:
            tmp.close()
