"""oneDNN's float primitives: ``Convolution``, ``Deconvolution`` (ONNX ConvTranspose), ``InnerProduct``, ``MatMul``
and ``Pooling``, one per fixed shape.

bfloat16 layers (a bf16 build on a CPU with BF16 instructions): ``Convolution`` and ``InnerProduct`` take a
bfloat16 source with bfloat16 weights (reordered once from the float32 values of the constant into the
primitive's bfloat16 layout), a float32 bias and a bfloat16 or float32 destination and residual; ``Pooling``
reads and writes bfloat16. oneDNN accumulates in float32 and applies the post-ops before the one rounding on
store. Without BF16 instructions it has only reference loops for these, which `_finish` refuses.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kiln.backends.cpu.dnnl import (ARG_DST, ARG_SRC, BF16, CONVOLUTION_DIRECT, DECONVOLUTION_DIRECT, F32, FLOAT32,
                                    FORWARD_INFERENCE, POOLING_MAX, Dims, Library, data_type)
from kiln.backends.cpu.dnnl_epilogue import bias_md, post_ops
from kiln.backends.cpu.dnnl_primitive import Primitive
from kiln.errors import KilnError

LAYER_DTYPES = (FLOAT32, torch.bfloat16)
"""Activation dtypes of the float layers here (Convolution, InnerProduct, Pooling)."""


def _layer_dtypes(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None
                  ) -> tuple[tuple[torch.dtype, torch.dtype, torch.dtype], int]:
    """(source, destination, residual dtypes; the weights' oneDNN data type) of a float layer: all float32, or a
    bfloat16 source and weights with a float32 or bfloat16 destination and residual (KilnError otherwise)."""
    zt = y.dtype if z is None else z.dtype
    if x.dtype is FLOAT32 and y.dtype is FLOAT32 and zt is FLOAT32:
        return (FLOAT32, FLOAT32, FLOAT32), F32
    if x.dtype is torch.bfloat16 and y.dtype in LAYER_DTYPES and zt in LAYER_DTYPES:
        return (x.dtype, y.dtype, zt), BF16
    raise KilnError(f"a float layer reads float32 or bfloat16 tensors (float32 or bfloat16 output and residual "
                    f"of a bfloat16 one), got {x.dtype} -> {y.dtype}{'' if z is None else f' + {z.dtype}'}")


def conv_weight_shape(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[int, list[int]]:
    """(output channels, oneDNN's weight dims: [K, C/g, kh, kw], or [g, K/g, C/g, kh, kw] when grouped) of a 2-D
    convolution of `groups` groups reading x; KilnError where the weight cannot read x."""
    k, cg, kh, kw = (int(s) for s in w.shape)
    if groups < 1 or k % groups or x.dim() != 4 or int(x.shape[1]) != cg * groups:
        raise KilnError(f"a convolution of {groups} group(s) with weights {list(w.shape)} cannot read an "
                        f"input of shape {list(x.shape)}")
    return k, [k, cg, kh, kw] if groups == 1 else [groups, k // groups, cg, kh, kw]


class Convolution(Primitive):
    """One oneDNN convolution primitive for fixed input/residual/output shapes, strides and dtypes (all float32,
    or a bfloat16 input with a bfloat16 or float32 output and residual: see the module doc).

    Weights are reordered once into the primitive's chosen layout; bias and residual add and the
    activation are post-ops in the node's order. `run(x, y[, z])` is safe to call from several threads.
    """

    _KIND = ("convolution descriptor", "dnnl_convolution_forward_primitive_desc_create", CONVOLUTION_DIRECT)

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int], groups: int, act: str, alpha: float, beta: float, act_first: bool) -> None:
        tmp = self._begin(lib)
        try:
            k, w_shape = self._weight_shape(x, w, y, groups)
            dtypes, w_dt = _layer_dtypes(x, y, z)
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
            b_md = bias_md(lib, tmp, b, k, [k], [1])
            attr, z_arg, z_md = post_ops(lib, tmp, act, alpha, beta, z, act_first)
            what, create, algorithm = self._KIND
            pd = lib.pd(tmp, what, getattr(lib.dll, create), lib.engine, FORWARD_INFERENCE, algorithm, src_md,
                        lib.md(tmp, w_shape, None, w_dt), b_md, dst_md, Dims(*strides),
                        Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l), Dims(*pad_r), attr)
            self._finish_layer(tmp, pd, w, w_shape, b, b_md, src_md, dst_md, z_arg, z_md, dtypes)
        finally:
            tmp.close()

    @staticmethod
    def _weight_shape(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, groups: int) -> tuple[int, list[int]]:
        return conv_weight_shape(x, w, groups)


def deconv_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """An ONNX ConvTranspose weight [C, K/g, kh, kw] as oneDNN's deconvolution weight: [K, C, kh, kw], or
    [g, K/g, C/g, kh, kw] when grouped (the same taps, output channels first; no flip)."""
    c, kg, kh, kw = (int(s) for s in w.shape)
    if groups < 1 or c % groups:
        raise KilnError(f"a transposed convolution of {groups} group(s) cannot take weights {list(w.shape)}")
    g = w.reshape(groups, c // groups, kg, kh, kw).transpose(1, 2)
    return (g.reshape(kg, c, kh, kw) if groups == 1 else g).contiguous()


class Deconvolution(Convolution):
    """One oneDNN deconvolution (ONNX ConvTranspose) for fixed shapes: `w` already in oneDNN's order
    (`deconv_weight`); pads crop the full output (`pad_r` negative where output_padding grows it); the bias, the
    residual and the activation as in Convolution. `run(x, y[, z])`."""

    _KIND = ("deconvolution descriptor", "dnnl_deconvolution_forward_primitive_desc_create", DECONVOLUTION_DIRECT)

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int], pad_r: Sequence[int],
                 groups: int, act: str = "", alpha: float = 0.0, beta: float = 0.0, z: torch.Tensor | None = None,
                 act_first: bool = False) -> None:
        super().__init__(lib, x, w, b, y, z, strides, dilations, pad_l, pad_r, groups, act, alpha, beta, act_first)

    @staticmethod
    def _weight_shape(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, groups: int) -> tuple[int, list[int]]:
        k = int(w.shape[0] if groups == 1 else w.shape[0] * w.shape[1])
        c = int(w.shape[1] if groups == 1 else w.shape[0] * w.shape[2])
        if x.dim() != 4 or int(x.shape[1]) != c or y.dim() != 4 or int(y.shape[1]) != k:
            raise KilnError(f"a transposed convolution with weights {list(w.shape)} ({groups} group(s)) cannot "
                            f"read {list(x.shape)} into {list(y.shape)}")
        return k, list(w.shape)


class Pooling(Primitive):
    """One oneDNN pooling primitive (max, or average with/without pads) for fixed input/output shapes and
    strides: `run(x, y)`."""

    def __init__(self, lib: Library, x: torch.Tensor, y: torch.Tensor, algorithm: int, kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int]) -> None:
        tmp = self._begin(lib)
        try:
            eight_bit = x.dtype in (torch.int8, torch.uint8) and algorithm == POOLING_MAX
            if (x.dtype not in LAYER_DTYPES and not eight_bit) or y.dtype is not x.dtype:
                raise KilnError(f"a pooling reads and writes float32 or bfloat16 tensors (a max pooling also "
                                f"int8/uint8), got {x.dtype} -> {y.dtype}")
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
            pd = lib.pd(tmp, "pooling descriptor", lib.dll.dnnl_pooling_forward_primitive_desc_create, lib.engine,
                        FORWARD_INFERENCE, algorithm, src_md, dst_md, Dims(*strides), Dims(*kernel),
                        Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l), Dims(*pad_r), lib.attr(tmp))
            self._finish(pd, [], [(ARG_SRC, src_md, x.dtype), (ARG_DST, dst_md, y.dtype)])
        finally:
            tmp.close()


class InnerProduct(Primitive):
    """One oneDNN inner product y = x W^T (+ b) for a fixed [N, K] input: weights [O, K] reordered once into
    the primitive's layout; residual add and activation as post-ops. `run(x, y[, z])`."""

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, act: str, alpha: float, beta: float, act_first: bool) -> None:
        tmp = self._begin(lib)
        try:
            if x.dim() != 2 or w.dim() != 2 or int(x.shape[1]) != int(w.shape[1]):
                raise KilnError(f"an inner product with weights {list(w.shape)} cannot read an input of shape "
                                f"{list(x.shape)}")
            dtypes, w_dt = _layer_dtypes(x, y, z)
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
            n = int(w.shape[0])
            b_md = bias_md(lib, tmp, b, n, [n], [1])
            attr, z_arg, z_md = post_ops(lib, tmp, act, alpha, beta, z, act_first)
            pd = lib.pd(tmp, "inner product descriptor", lib.dll.dnnl_inner_product_forward_primitive_desc_create,
                        lib.engine, FORWARD_INFERENCE, src_md, lib.md(tmp, w.shape, None, w_dt), b_md, dst_md, attr)
            self._finish_layer(tmp, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md, dtypes)
        finally:
            tmp.close()


class MatMul(Primitive):
    """One oneDNN (batched) matmul dst = src @ weights (+ bias) for fixed shapes and strides, with constant
    weights reordered once into the primitive's layout; residual add and activation as post-ops.
    `run(src, dst[, z])`."""

    def __init__(self, lib: Library, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, act: str = "", alpha: float = 0.0, beta: float = 0.0,
                 act_first: bool = False) -> None:
        tmp = self._begin(lib)
        try:
            if x.dim() != w.dim() or int(x.shape[-1]) != int(w.shape[-2]):
                raise KilnError(f"a matmul with weights {list(w.shape)} cannot read an input of shape {list(x.shape)}")
            src_md, dst_md = lib.md(tmp, x.shape, x.stride()), lib.md(tmp, y.shape, y.stride())
            n = int(y.shape[-1])
            b_md = bias_md(lib, tmp, b, n, [1] * (y.dim() - 1) + [n], [n] * (y.dim() - 1) + [1])
            attr, z_arg, z_md = post_ops(lib, tmp, act, alpha, beta, z, act_first)
            pd = lib.pd(tmp, "matmul descriptor", lib.dll.dnnl_matmul_primitive_desc_create, lib.engine, src_md,
                        lib.md(tmp, w.shape, None), b_md, dst_md, attr)
            self._finish_layer(tmp, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md)
        finally:
            tmp.close()


