"""Pooling and linear layers on oneDNN's own primitives (kiln.backends.cpu.dnnl), one per input shape.

``cpu.pool_dnnl``: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool and spatial ReduceMean as a
oneDNN pooling primitive on the channels-last tensors the convolutions produce. ``cpu.linear_dnnl``:
FusedGemm / Gemm / MatMul with a constant weight as a oneDNN inner product (weights reordered once,
bias, residual add and activation as post-ops). Both take float32 layers and bfloat16 ones (a bf16 build:
bfloat16 input and weights, float32 bias, bfloat16 or float32 output and residual; pools read and write
one type); where the CPU has no BF16 instructions oneDNN offers only its reference loops, which
kiln.backends.cpu.dnnl_primitive refuses, and the layer runs its reference implementation with a warning. Both
write into the run-time arena and compete under the autotuner with the torch-based tactics; inside a
network they avoid torch's dispatcher, whose cold code paths cost more than the small kernels themselves
(see docs/ARCHITECTURE.md). Both decline every layer when the oneDNN library is not installed.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.activation_c import ActivatedPrimitive, c_activation_configs, split_epilogue
from kiln.backends.cpu.common import (CpuTactic, act_attrs, bf16_layer, ints_at_least, is_f32, layer_dtypes,
                                      shape_hint)
from kiln.backends.cpu.dnnl import (POOLING_AVG_EXCLUDE_PAD, POOLING_AVG_INCLUDE_PAD, POOLING_MAX, library,
                                    require_library)
from kiln.backends.cpu.dnnl_epilogue import ELTWISE
from kiln.backends.cpu.dnnl_float import InnerProduct, MatMul, Pooling
from kiln.backends.cpu.dnnl_kernels import rows_kernel, shape_cached
from kiln.backends.cpu.dnnl_primitive import ChannelsLast
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cpu.gemm import linear_weights
from kiln.backends.cpu.pool import spatial_mean
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value, is_op
from kiln.ops.pool import Window

Tensor = torch.Tensor
_GLOBAL = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean")
_POOL_DTYPES = (DType.FLOAT32, DType.BFLOAT16)
_MAX_8BIT = (DType.INT8, DType.UINT8)  # an INT8 plan's activations: the maximum commutes with quantization
_MAX_OPS = ("MaxPool", "GlobalMaxPool")


def _pool_geometry(node: Node, x_shape: tuple[int, ...]) -> tuple[int, list[int], list[int], list[int],
                                                                  list[int], list[int], tuple[int, ...]] | None:
    """(algorithm, kernel, strides, dilations, pads before, pads after, output shape) at an input shape,
    or None where oneDNN's pads cannot express the window (a ceil-mode crop)."""
    n, c, h, w = x_shape
    op = node.op_type
    if op in _GLOBAL:
        alg = POOLING_MAX if op == "GlobalMaxPool" else POOLING_AVG_EXCLUDE_PAD
        keep = op != "ReduceMean" or spatial_mean(node)[1]  # type: ignore[index]
        return alg, [h, w], [1, 1], [1, 1], [0, 0], [0, 0], (n, c, 1, 1) if keep else (n, c)
    win = Window(node, torch.empty(x_shape, device="meta"), ranks=(2,))
    if min(win.begin) < 0 or win.dilations != [1, 1]:  # dilated pooling: oneDNN's reference loops only
        return None
    end = [max(n, 0) for n in win.need]  # a negative need: the last rows are never read (floor division)
    if op == "MaxPool":
        alg = POOLING_MAX
    else:
        if any(n > e for n, e in zip(win.need, win.end)):  # a ceil-mode extension: ONNX never counts it
            return None
        alg = POOLING_AVG_INCLUDE_PAD if int(node.attr("count_include_pad", 0)) else POOLING_AVG_EXCLUDE_PAD
    return alg, win.kernel, win.strides, win.dilations, win.begin, end, (n, c, *win.out)


class DnnlPoolTactic(CpuTactic):
    """2-D max / average / global pooling and spatial ReduceMean (float32 or bfloat16; max pooling also over
    int8/uint8 activations) as a cached oneDNN pooling primitive."""

    id = "cpu.pool_dnnl"
    priority = 11
    writes_out = 1
    strided_out = False
    ops = (("", "MaxPool"), ("", "AveragePool"), ("", "GlobalAveragePool"), ("", "GlobalMaxPool"),
           ("", "ReduceMean"))

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if library() is None or x is None or x.type.rank != 4 or len(node.outputs) != 1:
            return False
        if node.outputs[0].type.dtype != x.type.dtype:  # one type in and out
            return False
        if x.type.dtype not in _POOL_DTYPES and not (x.type.dtype in _MAX_8BIT and node.op_type in _MAX_OPS):
            return False
        if node.op_type == "ReduceMean" and spatial_mean(node) is None:
            return False
        if node.op_type in _GLOBAL:
            return True
        if (ints_at_least(node.attr("kernel_shape", None) or [], 2, 1) is None
                or ints_at_least(node.attr("strides", None) or [1, 1], 2, 1) is None
                or ints_at_least(node.attr("dilations", None) or [1, 1], 2, 1) is None
                or ints_at_least(node.attr("pads", None) or [0, 0, 0, 0], 4, 0) is None):
            return False
        hint = shape_hint(x)  # type: ignore[arg-type]
        if hint is None:  # dynamic spatial sizes: a geometry oneDNN expresses at every size
            return (all(int(d) == 1 for d in node.attr("dilations", None) or [1, 1])
                    and (node.op_type == "MaxPool" or not int(node.attr("ceil_mode", 0) or 0)))
        try:
            return _pool_geometry(node, tuple(hint)) is not None
        except Exception:
            return False

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)

        def make(x: Tensor, _z: Tensor | None) -> tuple[Pooling, tuple[int, ...]]:
            geo = _pool_geometry(node, tuple(int(s) for s in x.shape))
            if geo is None:
                raise ValueError(f"this pooling window needs a crop at input shape {list(x.shape)}")
            alg, kernel, strides, dilations, begin, end, shape = geo
            y0 = torch.empty((*shape, 1, 1)[:4], dtype=dt, memory_format=torch.channels_last)  # [N, C] as [N, C, 1, 1]
            return Pooling(lib, x, y0, alg, kernel, strides, dilations, begin, end), shape
        fb = ReferenceFallback(node)
        dt = layer_dtypes(node)[0]
        run = shape_cached(node.name, make, fb, x_dtypes=(dt,), out_dtype=dt)
        x_cl = ChannelsLast(lib, (dt,))

        def k_pool(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            return run(x_cl(x), None, out)

        def bind(args: Any, out: Any) -> Any:
            x = args[0]
            if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
                return None  # the call copied it to channels-last first
            return run.bind(x, None, out)  # type: ignore[attr-defined]

        def release() -> None:
            run.close()  # type: ignore[attr-defined]
            x_cl.close()
        baked = frozenset({1}) if node.op_type == "ReduceMean" else frozenset()  # the axes input is baked in
        return Kernel(k_pool, prepacked=baked, fallback=fb, release=release, bind=bind)


def _same_dims(a: Value, b: Value) -> bool:
    """Both shapes known and equal dim by dim (symbols by name): equal at every run; the kernel still checks."""
    sa, sb = a.type.shape, b.type.shape
    return sa is not None and sb is not None and len(sa) == len(sb) and all(
        x is not None and x == y for x, y in zip(sa, sb))


class DnnlLinearTactic(CpuTactic):
    """FusedGemm / Gemm / MatMul with a constant weight as a cached oneDNN inner product (2-D input, or an
    N-D MatMul input whose leading dims flatten into rows), float32 or bfloat16 (see module doc)."""

    id = "cpu.linear_dnnl"
    priority = 11
    writes_out = 1
    strided_out = False
    ops = (("kiln", "FusedGemm"), ("", "Gemm"), ("ai.onnx", "Gemm"), ("", "MatMul"), ("ai.onnx", "MatMul"))

    def accepts(self, node: Node) -> bool:
        a = node.input(0)
        rank = a.type.rank if a is not None else None
        low = bf16_layer(node, 3 if node.domain == "kiln" else None)
        if library() is None or not (low or is_f32(a)) or rank is None or rank < 2 or len(node.outputs) != 1:
            return False
        if rank > 2 and not is_op(node, "MatMul") and node.op_type != "FusedGemm":
            return False  # only MatMul (and the FusedGemm made from it) reads N-D rows; Gemm is 2-D
        y = node.outputs[0]
        if not (low or is_f32(y)) or y.type.rank not in (None, rank):
            return False
        if node.domain == "kiln":
            z = node.input(3)
            if act_attrs(node)[0] not in ("", *ELTWISE):
                return False
            if z is not None and (not (low or is_f32(z)) or not _same_dims(z, node.outputs[0])):
                return False
        wb = linear_weights(node, low)  # W [N, K] non-empty, a bias of exactly N values
        if wb is None:
            return False
        n, k = (int(s) for s in wb[0].shape)
        k_in = a.type.shape[-1]  # type: ignore[union-attr,index]
        n_out = y.type.shape[-1] if y.type.shape is not None else None  # type: ignore[index]
        return not (isinstance(k_in, int) and k_in != k) and not (isinstance(n_out, int) and n_out != n)

    def configs(self, node: Node, ctx: Any) -> list[dict[str, Any]]:
        """oneDNN's inner product ({}), and for float32 layers its matmul primitive too ({"prim": "matmul"}: a
        brgemm kernel of its own, 1.2-1.8x faster on transformer shapes such as 128 x 768 -> 3072 on a 2-core
        AVX-512 EPYC, slower on others), each with the C activation pass where it applies."""
        acts = c_activation_configs(node)
        if not (is_f32(node.inputs[0]) and is_f32(node.outputs[0])):
            return acts
        return acts + [{"prim": "matmul", **c} for c in acts]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        fused = node.domain == "kiln"
        x_dt, y_dt, z_dt = layer_dtypes(node, 3 if fused else None)
        w, b = linear_weights(node, x_dt is torch.bfloat16)  # type: ignore[misc]
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        w_kn = w.t().contiguous() if config.get("prim") == "matmul" else None

        def make(x: Tensor, z: Tensor | None) -> tuple[Any, tuple[int, ...]]:
            shape = (int(x.shape[0]), int(w.shape[0]))
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            p_act, p_z, c_act, z_after = split_epilogue(config, act, z, act_first)
            y0 = torch.empty(shape, dtype=y_dt)
            if config.get("prim") == "matmul":  # float32 only (configs)
                prim: Any = MatMul(lib, x, w_kn, y0, b, p_z, p_act, alpha, beta, act_first)
            else:
                prim = InnerProduct(lib, x, w, b, y0, p_z, p_act, alpha, beta, act_first)
            return (prim if c_act is None else ActivatedPrimitive(prim, c_act, z_after)), shape
        return rows_kernel(node, make, int(w.shape[0]), (x_dt,), (z_dt,), y_dt)


register_tactic(DnnlPoolTactic())
register_tactic(DnnlLinearTactic())
