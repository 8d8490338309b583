"""Tactics of the integer layers (kiln.ops.qlayers): ``cuda.triton_qconv`` (QConv) and ``cuda.triton_qgemm``
(QGemm), on the Triton INT8 kernels of kiln.backends.cuda.triton_qkernels (launched by triton_qconv).

Both take int8 or uint8 activations (the input's declared type; a run-time tensor of the other type is an
error), an int8 constant weight with per-tensor or per-output-channel scales, an optional float bias and an
optional residual (float, or int8/uint8 dequantized by ``z_scale``/``z_zero_point``; ``a_scale`` > 0
requantizes the layer's own result before it is added), and store int8/uint8
(requantized by ``y_scale``/``y_zero_point``) or float16/float32 (``out_dtype``). Grouped convolutions
(depthwise included) are declined: they stay on the reference path. QGemm has a second config family,
``int_mm``: torch._int_mm (cuBLASLt int8) and the epilogue in torch, offered on CUDA for M > 16 with K and N
multiples of 8 (level >= 2), for the autotuner to weigh on large shapes. Unpadded 1x1 convs (any stride) lead
with config LINEAR, KxK convs of >= 32 channels with TAPS; convs with few input channels (a network's stem)
with S2D where strided (a stride-1 conv over the space-to-depth image, triton_qstem), then ROWS (contiguous
window rows; its own weight packing) and FLAT; then the general kernel's tiles, except at optimization levels
<= 2 for a large layer (>= _LARGE_M output pixels), offered its specialized configs alone. Every config is an integer layer the autotuner
times like any other. Tensors past int32 indexing run the op's reference implementation (the kernel's fallback).
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cuda.common import check_out, conv_geometry, nhwc_outs, out_list, write_out, Out
from kiln.backends.cuda.triton_conv import split_k_bytes
from kiln.backends.cuda.triton_gemm import _out_rows, _rows
from kiln.backends.cuda.triton_qconv import (QUANT_RANGES, QuantEpilogue, linear_geometry, linear_configs,
                                             pack_qconv_weight, qconv2d_nhwc, qgemm, qgemm_int_mm, qtile_configs,
                                             rows_ok, taps_configs)
from kiln.backends.cuda.triton_qstem import S2DPlan, qconv_s2d, s2d_configs
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.activations import Epilogue
from kiln.ops.conv import ConvGeometry
from kiln.ops.qlayers import QuantSpec

Tensor = torch.Tensor
_I32 = 2**31 - 1
_LARGE_M = 16384
"""Output pixels from which a conv's specialized configs (LINEAR, TAPS, S2D) fill the GPU with their tiles (128-row
tiles on 132 multiprocessors); below it, at small batches, the general kernel's narrower and split-K tiles compete."""

_X_TYPES = (DType.INT8, DType.UINT8)
_Z_TYPES = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.INT8, DType.UINT8)


def q_layer_ok(node: Node, op_type: str, w_rank: int) -> bool:
    """A QConv/QGemm the Triton kernels take: int8/uint8 X, constant int8 weight of rank `w_rank` with one or
    K_out scales, constant bias of K_out values, a float or 8-bit residual, zero points in their types' ranges."""
    if node.domain != "kiln" or node.op_type != op_type:
        return False
    x, w, b, z = (node.input(i) for i in range(4))
    if x is None or x.type.dtype not in _X_TYPES or w is None or not w.is_const:
        return False
    wt = w.const
    if wt is None or wt.dtype != torch.int8 or wt.dim() != w_rank:
        return False
    k_out = int(wt.shape[0])
    if b is not None and (not b.is_const or b.const.numel() != k_out):  # type: ignore[union-attr]
        return False
    if z is not None and z.type.dtype not in _Z_TYPES:
        return False
    q = QuantSpec.of(node)
    x_lo, x_hi = QUANT_RANGES[x.type.dtype.torch]  # type: ignore[union-attr]
    y_lo, y_hi = QUANT_RANGES.get(q.out_torch, (0, 0))
    return len(q.w_scales) in (1, k_out) and x_lo <= q.x_zero_point <= x_hi and y_lo <= q.y_zero_point <= y_hi


def quant_epilogue(node: Node, wk: Tensor, device: torch.device) -> QuantEpilogue:
    """The prepared epilogue of a QConv/QGemm whose K-major weight [K_out, R] is `wk` (on `device`)."""
    b_in = node.input(2)
    x_u8 = node.inputs[0].type.dtype == DType.UINT8  # type: ignore[union-attr]
    bias = None if b_in is None else b_in.const.to(device)  # type: ignore[union-attr]
    return QuantEpilogue.make(wk, x_u8, QuantSpec.of(node), bias, Epilogue.of(node))


def _check_x(x: Tensor, qe: QuantEpilogue, node: Node) -> None:
    want = torch.uint8 if qe.x_u8 else torch.int8
    if x.dtype != want:
        raise KilnError(f"'{node.name}' ({node.op_type}) was built for {want} input, got {x.dtype}")


def _static_rows(node: Node, n: int) -> int | None:
    """Output rows M (elements / n) at the declared static shape, None when not static."""
    t = node.outputs[0].type
    if not t.is_static or not t.shape:
        return None
    total = 1
    for d in t.shape:
        total *= int(d)  # type: ignore[arg-type]
    return total // max(n, 1)


def _stem_configs(node: Node, k_out: int, c: int, kw: int) -> list[dict[str, Any]]:
    """Configs for convs with few input channels: ROWS (one contiguous window row of KW*C bytes per reduction
    step, where it fits BLOCK_K 32 or 64) first, then FLAT (the flattened (tap, channel) index)."""
    geo = ConvGeometry.of(node)
    bn = 32 if k_out <= 32 else 64
    cfgs: list[dict[str, Any]] = []
    bk = max(32, 1 << (kw * c - 1).bit_length())
    if geo is not None and bk <= 64 and rows_ok(c, geo.kernel, geo.dilations, bk):
        cfgs += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "ROWS": True, "num_warps": warps,
                  "num_stages": 4} for bm, warps in ((128, 4), (256, 8), (64, 4))]
    return cfgs + [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8, "FLAT": True, "num_warps": 4,
                    "num_stages": 3} for bm in (128, 64)]


class TritonQConv(Tactic):
    """QConv as an int8 implicit-GEMM Triton conv with the requantizing epilogue fused; ungrouped only."""

    id = "cuda.triton_qconv"
    devices = ("cuda",)
    priority = 30
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if not q_layer_ok(node, "QConv", 4) or node.inputs[0].type.rank not in (None, 4):  # type: ignore[union-attr]
            return False
        geo = ConvGeometry.of(node)
        return geo is not None and len(geo.kernel) == 2 and geo.group == 1

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        k_out, c, kh, kw = (int(d) for d in node.inputs[1].const.shape)  # type: ignore[union-attr]
        m = _static_rows(node, k_out)
        level = int(ctx.extra.get("opt_level", 3))
        general = qtile_configs(m, k_out, c, level, c * kh * kw)
        geo = ConvGeometry.of(node)
        special: list[dict[str, Any]] = []
        if geo is not None and linear_geometry(geo):  # a GEMM over pixel rows: the LINEAR kernel's tiles
            special = linear_configs(k_out, c)
        elif c >= 32:  # the geometry compiled in: the TAPS kernel's tiles (fewer at lower levels)
            special = taps_configs(k_out, c)[:{0: 2, 1: 2, 2: 3}.get(level, None)]
        elif kh * kw > 1:  # a stem conv: most of each per-tap channel block would be padding
            plan = S2DPlan.of(c, geo) if geo is not None else None
            special = s2d_configs(k_out, plan) if plan is not None else []  # strided: over the space-to-depth image
            general = _stem_configs(node, k_out, c, kw) + general
        if special and level <= 2 and m is not None and m >= _LARGE_M:
            return special  # faster than the general kernel on every large layer measured: fewer kernels to compile
        return special + general

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        if out_shape is None or len(out_shape) != 4:
            return 0
        return split_k_bytes(out_shape[0] * out_shape[2] * out_shape[3], out_shape[1], config)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        geo = conv_geometry(node)
        w = node.inputs[1].const.to(device)  # type: ignore[union-attr]
        k_out = int(w.shape[0])
        if config.get("ROWS") and not rows_ok(int(w.shape[1]), geo.kernel, geo.dilations, int(config["BLOCK_K"])):
            raise KilnError(f"'{node.name}' (QConv): config ROWS needs an undilated kernel row within BLOCK_K")
        plan = S2DPlan.of(int(w.shape[1]), geo) if config.get("S2D") else None
        if plan is None and config.get("S2D"):
            raise KilnError(f"'{node.name}' (QConv): config S2D needs equal strides >= 2, no dilation and few "
                            "input channels")
        wk = plan.pack_weight(w) if plan is not None else pack_qconv_weight(w, config)  # K-major
        del w
        qe = quant_epilogue(node, wk, device)
        fb = ReferenceFallback(node)

        def run(x: Tensor, z: Tensor | None, out: Out) -> Tensor:
            if plan is not None:
                return qconv_s2d(x, wk, qe, z, geo, plan, config, out)
            return qconv2d_nhwc(x, wk, qe, z, geo, config, out)

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None, out: Out = None) -> Tensor:
            _check_x(x, qe, node)
            oh, ow = geo.out_hw(x.shape[2], x.shape[3])
            if out is not None:
                check_out(out, (x.shape[0], k_out, oh, ow), node)
            staged = plan.numel(x.shape[0], oh, ow) if plan is not None else 0
            if max(x.numel(), x.shape[0] * k_out * oh * ow, staged) >= _I32:
                key = (tuple(x.shape), x.dtype)
                fb.declined.setdefault(key, "tensors past int32 indexing")
                return fb(key, [x, None, None, z], out)
            if not nhwc_outs(out):
                return write_out(run(x, z, None), out)
            return run(x, z, out)
        return Kernel(kernel, prepacked=frozenset({1, 2}), fallback=fb)


class TritonQGemm(Tactic):
    """QGemm as an int8 Triton GEMM with the requantizing epilogue fused (or torch._int_mm: config int_mm)."""

    id = "cuda.triton_qgemm"
    devices = ("cuda",)
    priority = 30
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        a = node.input(0)
        return q_layer_ok(node, "QGemm", 2) and a is not None and (a.type.rank is None or a.type.rank >= 2)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        n, k = (int(d) for d in node.inputs[1].const.shape)  # type: ignore[union-attr]
        m = _static_rows(node, n)
        level = int(ctx.extra.get("opt_level", 3))
        cfgs = qtile_configs(m, n, k, level, k)
        if level >= 2 and ctx.device.type == "cuda" and m is not None and m > 16 and k % 8 == 0 and n % 8 == 0:
            cfgs.append({"int_mm": True})
        return cfgs

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        if not out_shape or config.get("int_mm"):
            return 0
        total = 1
        for d in out_shape:
            total *= d
        return split_k_bytes(total // max(out_shape[-1], 1), out_shape[-1], config)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        w = node.inputs[1].const.to(device).contiguous()  # type: ignore[union-attr]  # [N, K]: K-major already
        n_out, k_in = int(w.shape[0]), int(w.shape[1])
        qe = quant_epilogue(node, w, device)
        fb = ReferenceFallback(node)
        int_mm = bool(config.get("int_mm", False))

        def kernel(a: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None, out: Out = None) -> Tensor:
            _check_x(a, qe, node)
            lead = a.shape[:-1]
            if out is not None:
                check_out(out, (*lead, n_out), node)
            if max(a.numel(), a.numel() // max(k_in, 1) * n_out) >= _I32:
                key = (tuple(a.shape), a.dtype)
                fb.declined.setdefault(key, "tensors past int32 indexing")
                return fb(key, [a, None, None, z], out)
            a2 = _rows(a, k_in)
            z2 = None if z is None else _rows(z, n_out)
            if int_mm:
                return write_out(qgemm_int_mm(a2, w, qe, z2).view(*lead, n_out), out)
            rows = [_out_rows(o, n_out) for o in out_list(out)]
            direct = bool(rows) and all(r is not None for r in rows)
            y = rows[0] if direct else torch.empty((a2.shape[0], n_out), device=a.device, dtype=qe.out_dtype)
            qgemm(a2, w, qe, z2, y, config, rows[1] if direct and len(rows) > 1 else None)  # type: ignore[arg-type]
            return out_list(out)[0] if direct else write_out(y.view(*lead, n_out), out)
        return Kernel(kernel, prepacked=frozenset({1, 2}), fallback=fb, out_format="contiguous")


register_tactic(TritonQConv())
register_tactic(TritonQGemm())
