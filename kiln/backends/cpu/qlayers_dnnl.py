"""QConv / QGemm (kiln.ops.qlayers) on oneDNN's own int8 primitives (kiln.backends.cpu.dnnl), one per input shape.

``cpu.qconv_dnnl``: a 2-D integer convolution (``QConvolution``) reading and writing channels-last tensors,
so int8 activations flow NHWC from one integer layer to the next. ``cpu.qgemm_dnnl``: an integer matrix
product (``QMatMul``) over the input's rows (leading dims flattened). Both keep per input shape a primitive
with the int8 weights already in its layout, the multipliers ``x_scale * w_scales[k]``, the zero points,
the bias, and the residual add, activation and requantization as post-ops, so an inference is one
``dnnl_primitive_execute`` on its int8 kernels (VNNI, AMX, or AVX2's vpmaddubsw). Where oneDNN offers only its
reference loops for a shape the layer runs its op's reference compute (ReferenceFallback); float16 outputs and
residuals have no int8 kernel in oneDNN 3.2 on these CPUs, so the tactics decline those layers; so do they, on x86
CPUs without VNNI, the layers oneDNN would not compute exactly there: an int8 input or a weight beyond +-64
(kiln.backends.cpu.features.exact_int8_layer). Both decline every layer when the oneDNN library is not
installed; `release` (Engine.close) destroys the primitives and reorders.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, dims_agree
from kiln.backends.cpu.dnnl import library, require_library
from kiln.backends.cpu.dnnl_epilogue import ELTWISE
from kiln.backends.cpu.dnnl_int8 import QConvolution, QMatMul, Requant
from kiln.backends.cpu.dnnl_kernels import channels_last_kernel, rows_kernel
from kiln.backends.cpu.features import NO_VNNI_INT8, exact_int8_layer
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.conv import strides_dilations, window_ints
from kiln.ops.qlayers import FLOAT, INT8, UINT8, QuantSpec

Tensor = torch.Tensor
_RANGE = {DType.INT8: (-128, 127), DType.UINT8: (0, 255)}
_OUT = {INT8: DType.INT8, UINT8: DType.UINT8, FLOAT: DType.FLOAT32}
"""out_dtype -> the output type these tactics write (FLOAT16: oneDNN 3.2 has no int8 kernel writing it here)."""
_Z = (DType.INT8, DType.UINT8, DType.FLOAT32)
"""Residual types with int8 kernels (a float16 residual gets oneDNN's reference loops only)."""


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0.0


def _epilogue_ok(node: Node, w: Tensor) -> bool:
    """The node's input, output, bias, residual, quantization and activation are what the int8 primitives
    take, and oneDNN computes them exactly on this CPU (see the module doc); w: the int8 weight."""
    x, b, z = node.input(0), node.input(2), node.input(3)
    n_out = int(w.shape[0])
    if library() is None or x is None or x.type.dtype not in _RANGE or len(node.outputs) != 1:
        return False
    if not exact_int8_layer(x.type.dtype, w):
        return False
    try:
        q = QuantSpec.of(node)
        act = act_attrs(node)[0]
    except (KilnError, TypeError, ValueError):
        return False
    y = node.outputs[0]
    out = _OUT.get(q.out_dtype)
    if out is None or y.type.dtype != out or act not in ("", *ELTWISE):
        return False
    lo, hi = _RANGE[x.type.dtype]
    if not lo <= q.x_zero_point <= hi or len(q.w_scales) not in (1, n_out):
        return False
    if out in _RANGE and (not _positive(q.y_scale) or not _RANGE[out][0] <= q.y_zero_point <= _RANGE[out][1]):
        return False
    if not all(math.isfinite(s) for s in (q.x_scale, *q.w_scales)):
        return False
    if b is not None and (b.const is None or b.const.dtype != torch.float32 or b.const.dim() != 1
                          or b.const.numel() != n_out):
        return False
    if z is not None:
        if z.type.dtype not in _Z or not dims_agree(z, y):
            return False
        if z.type.dtype in _RANGE and (not _positive(q.z_scale) or not _RANGE[z.type.dtype][0] <= q.z_zero_point
                                       <= _RANGE[z.type.dtype][1]):
            return False
    return True


def _int8_weight(v: Value | None, rank: int) -> Tensor | None:
    """The constant non-empty int8 weight of this rank, else None."""
    w = None if v is None else v.const
    return w if w is not None and w.dtype == torch.int8 and w.dim() == rank and w.numel() > 0 else None


def _requant(q: QuantSpec, n_out: int) -> Requant:
    mid = None
    if q.a_scale > 0:
        lo, hi = (-128, 127) if q.a_dtype == INT8 else (0, 255)
        mid = (q.a_scale, q.a_zero_point, lo, hi)
    return Requant(q.multipliers(n_out), q.x_zero_point, q.y_scale if q.quantized_out else None, q.y_zero_point,
                   q.z_scale, q.z_zero_point, mid)


def _layer(node: Node) -> tuple[Tensor, Tensor | None, Requant, str, float, float, bool, torch.dtype,
                                torch.dtype, torch.dtype | None]:
    """(weight, bias, requantization, act, alpha, beta, act_before_add, x / out / z torch dtypes)."""
    w = node.inputs[1].const.contiguous()  # type: ignore[union-attr]
    b_v, z_v = node.input(2), node.input(3)
    b = None if b_v is None else b_v.const.contiguous()  # type: ignore[union-attr]
    q = QuantSpec.of(node)
    act, alpha, beta = act_attrs(node)
    act_first = bool(int(node.attr("act_before_add", 0) or 0))
    z_t = None if z_v is None else z_v.type.dtype.torch  # type: ignore[union-attr]
    x_t = node.inputs[0].type.dtype.torch  # type: ignore[union-attr]
    return w, b, _requant(q, int(w.shape[0])), act, alpha, beta, act_first, x_t, q.out_torch, z_t


def _why_inexact(node: Node) -> str | None:
    """The reason a layer the int8 primitives take elsewhere is declined on this CPU (no VNNI), else None."""
    x, w = node.input(0), node.input(1)
    if x is None or w is None or w.const is None or w.const.dtype != torch.int8 or library() is None:
        return None
    if exact_int8_layer(x.type.dtype, w.const):
        return None
    return NO_VNNI_INT8


class DnnlQConvTactic(CpuTactic):
    """2-D QConv as a cached oneDNN int8 convolution on channels-last tensors (see module doc)."""

    id = "cpu.qconv_dnnl"
    priority = 12
    writes_out = 1  # into an arena slot of its own (channels-last) layout
    strided_out = False
    ops = (("kiln", "QConv"),)

    def accepts(self, node: Node) -> bool:
        x, w = node.input(0), _int8_weight(node.input(1), 4)
        if w is None or x is None or x.type.rank != 4 or node.outputs[0].type.rank not in (None, 4):
            return False
        k, cg = int(w.shape[0]), int(w.shape[1])
        group = int(node.attr("group", 1) or 1)
        c = x.type.shape[1] if x.type.shape is not None else None  # type: ignore[index]
        if group < 1 or k % group or (isinstance(c, int) and c != cg * group):
            return False
        try:
            strides, dilations = strides_dilations(node, 2)
            window_ints(node, "pads", 2, 0)
            ks = window_ints(node, "kernel_shape", 2, 0)
        except KilnError:
            return False
        if min(strides + dilations) < 1 or (ks != [0, 0] and ks != [int(s) for s in w.shape[2:]]):
            return False
        return _epilogue_ok(node, w)

    def why_not(self, node: Node, ctx: Any) -> str | None:
        return _why_inexact(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w, b, req, act, alpha, beta, act_first, x_t, out_t, z_t = _layer(node)
        strides, dilations = strides_dilations(node, 2)
        pads = window_ints(node, "pads", 2, 0)
        group = int(node.attr("group", 1) or 1)
        k_out, kernel = int(w.shape[0]), [int(s) for s in w.shape[2:]]

        def make(x: Tensor, z: Tensor | None) -> tuple[QConvolution, tuple[int, ...]]:
            oh, ow = ((n + lo + hi - d * (kk - 1) - 1) // s + 1 for n, lo, hi, d, kk, s in
                      zip(x.shape[2:], pads[:2], pads[2:], dilations, kernel, strides))
            if oh < 1 or ow < 1:
                raise ValueError(f"the window does not fit the input of shape {list(x.shape)}")
            shape = (int(x.shape[0]), k_out, oh, ow)
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            y0 = torch.empty(shape, dtype=out_t, memory_format=torch.channels_last)
            return QConvolution(lib, x, w, b, y0, z, strides, dilations, pads[:2], pads[2:], group, req, act, alpha,
                                beta, act_first), shape
        return channels_last_kernel(node, lib, make, (x_t,), () if z_t is None else (z_t,), out_t)


class DnnlQGemmTactic(CpuTactic):
    """QGemm as a cached oneDNN int8 matmul over the input's rows (leading dims flattened)."""

    id = "cpu.qgemm_dnnl"
    priority = 12
    writes_out = 1
    strided_out = False
    ops = (("kiln", "QGemm"),)

    def accepts(self, node: Node) -> bool:
        a, w = node.input(0), _int8_weight(node.input(1), 2)
        rank = None if a is None else a.type.rank
        if w is None or rank is None or rank < 2 or node.outputs[0].type.rank not in (None, rank):
            return False
        k_in = a.type.shape[-1]  # type: ignore[union-attr,index]
        if isinstance(k_in, int) and k_in != int(w.shape[1]):
            return False
        return _epilogue_ok(node, w)

    def why_not(self, node: Node, ctx: Any) -> str | None:
        return _why_inexact(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w, b, req, act, alpha, beta, act_first, x_t, out_t, z_t = _layer(node)
        n_out = int(w.shape[0])

        def make(x: Tensor, z: Tensor | None) -> tuple[QMatMul, tuple[int, ...]]:
            shape = (int(x.shape[0]), n_out)
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            return QMatMul(lib, x, w, b, torch.empty(shape, dtype=out_t), z, req, act, alpha, beta, act_first), shape
        return rows_kernel(node, make, n_out, (x_t,), () if z_t is None else (z_t,), out_t)


register_tactic(DnnlQConvTactic())
register_tactic(DnnlQGemmTactic())
