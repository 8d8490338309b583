"""Conv / FusedConv, and ConvTranspose, on oneDNN's own primitives (kiln.backends.cpu.dnnl): one primitive per input
shape.

Competes with ``cpu.conv_onednn`` (torch's oneDNN ops) under the autotuner. The kernel keeps, per input
shape and strides, a convolution primitive with the weights already in its layout, the bias, and the
residual add and activation as post-ops in the node's order; an inference allocates the channels-last
output and executes the primitive. Asymmetric pads, groups and dilations are oneDNN's own.
Declines every layer when the oneDNN library is not installed. The input's channels are checked against
the weights when a primitive is made (a static channel dim already in `accepts`); `Primitive.run`
refuses tensors of other dtypes than the node's. `release` (Engine.close) destroys the primitives and reorders.

bfloat16 layers (a bf16 build, kiln.passes.precision): a bfloat16 input, weights reordered once into the
primitive's bfloat16 layout, a float32 bias, a bfloat16 or float32 output and residual; oneDNN accumulates in
float32 and applies the post-ops in float32 before the one rounding on store. Where the CPU has no BF16
instructions oneDNN offers only its reference loops, which `_finish` refuses: the layer then runs its reference
implementation, with a warning.

``cpu.deconv_dnnl``: 2-D float32 ConvTranspose as oneDNN's deconvolution (weights reordered once from ONNX's
[C, K/g, kh, kw]; any stride, dilation, groups, pads and output_padding, output_shape or SAME resolved per input
shape by the reference's geometry, kiln.ops.conv.conv_transpose_geometry). A geometry oneDNN cannot express
runs the reference for that shape.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.activation_c import ActivatedPrimitive, c_activation_configs, split_epilogue
from kiln.backends.cpu.common import (CpuTactic, act_attrs, const_float, float_bias, float_conv_weight, is_f32,
                                      layer_dtypes)
from kiln.backends.cpu.conv import conv_geometry
from kiln.backends.cpu.dnnl import library, require_library
from kiln.backends.cpu.dnnl_epilogue import ELTWISE
from kiln.backends.cpu.dnnl_float import Convolution, Deconvolution, deconv_weight
from kiln.backends.cpu.dnnl_kernels import channels_last_kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.conv import conv_transpose_geometry, strides_dilations

Tensor = torch.Tensor


class DnnlConvTactic(CpuTactic):
    """2-D float32 or bfloat16 Conv / FusedConv as a cached oneDNN primitive (see module doc)."""

    id = "cpu.conv_dnnl"
    priority = 12
    writes_out = 1  # into an arena slot of its own layout (a strided Concat slice gets oneDNN's slow paths)
    strided_out = False
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        # the geometry (SAME pads too) is resolved per input shape
        return library() is not None and float_conv_weight(node, ("", *ELTWISE), bf16=True) is not None

    def configs(self, node: Node, ctx: Any) -> list[dict[str, Any]]:
        return c_activation_configs(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w = node.inputs[1].const.float().contiguous()  # type: ignore[union-attr]
        b_v = node.input(2)
        b = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        if b is not None and (b.dim() != 1 or b.numel() != int(w.shape[0])):
            raise KilnError(f"'{node.name}': the bias has shape {list(b.shape)}, expected [{int(w.shape[0])}]")
        kernel = [int(k) for k in w.shape[2:]]
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        k_out = int(w.shape[0])
        x_dt, y_dt, z_dt = layer_dtypes(node, 3)

        def make(x: Tensor, z: Tensor | None) -> tuple[Any, tuple[int, ...]]:
            geo = conv_geometry(node, kernel, [int(x.shape[2]), int(x.shape[3])])
            oh, ow = ((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, lo, hi, d, k, s in
                      zip(x.shape[2:], geo.begin, geo.end, geo.dilations, kernel, geo.strides))
            shape = (int(x.shape[0]), k_out, oh, ow)
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            y0 = torch.empty(shape, dtype=y_dt, memory_format=torch.channels_last)
            p_act, p_z, c_act, z_after = split_epilogue(config, act, z, act_first)
            prim = Convolution(lib, x, w, b, y0, p_z, geo.strides, geo.dilations, geo.begin, geo.end, geo.group,
                               p_act, alpha, beta, act_first)
            return (prim if c_act is None else ActivatedPrimitive(prim, c_act, z_after)), shape
        return channels_last_kernel(node, lib, make, (x_dt,), (z_dt,), y_dt)


class DnnlDeconvTactic(CpuTactic):
    """2-D float32 ConvTranspose / FusedConvTranspose with a constant weight (and bias) as a cached oneDNN
    deconvolution, the residual add and an activation oneDNN computes as post-ops (module doc)."""

    id = "cpu.deconv_dnnl"
    priority = 12
    ops = (("", "ConvTranspose"), ("ai.onnx", "ConvTranspose"), ("kiln", "FusedConvTranspose"))

    def accepts(self, node: Node) -> bool:
        x, y = node.input(0), node.outputs[0] if len(node.outputs) == 1 else None
        w = const_float(node.input(1), False)
        if library() is None or y is None or not is_f32(x) or not is_f32(y) or x.type.rank != 4:  # type: ignore[union-attr]
            return False
        if w is None or w.dim() != 4 or w.numel() == 0:
            return False
        if node.domain == "kiln":
            z = node.input(3)
            if act_attrs(node)[0] not in ("", *ELTWISE) or node.attr("out_dtype") is not None \
                    or (z is not None and (not is_f32(z) or z.type.rank != 4)):
                return False
        group = int(node.attr("group", 1) or 1)
        c = x.type.shape[1]  # type: ignore[union-attr,index]
        return (group >= 1 and int(w.shape[0]) % group == 0 and (not isinstance(c, int) or c == int(w.shape[0]))
                and float_bias(node.input(2), int(w.shape[1]) * group))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w = node.inputs[1].const.float()  # type: ignore[union-attr]
        b_v = node.input(2)
        b = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        group = int(node.attr("group", 1) or 1)
        kernel = [int(k) for k in w.shape[2:]]
        strides, dilations = strides_dilations(node, 2)
        w_dnnl = deconv_weight(w, group)
        k_out = int(w.shape[1]) * group
        fused = node.domain == "kiln"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))

        def make(x: Tensor, z: Tensor | None) -> tuple[Any, tuple[int, ...]]:
            sizes = [int(n) for n in x.shape[2:]]
            begin, out = conv_transpose_geometry(node, sizes, kernel, strides, dilations)
            full = [s * (n - 1) + (k - 1) * d + 1 for n, k, s, d in zip(sizes, kernel, strides, dilations)]
            end = [f - bg - o for f, bg, o in zip(full, begin, out)]  # negative: output_padding's extra rows
            if min(begin) < 0 or min(out) < 1:
                raise ValueError(f"no oneDNN deconvolution for this geometry at input shape {list(x.shape)}")
            shape = (int(x.shape[0]), k_out, *out)
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            y0 = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
            return Deconvolution(lib, x, w_dnnl, b, y0, strides, dilations, begin, end, group, act, alpha, beta,
                                 z, act_first), shape
        return channels_last_kernel(node, lib, make, (torch.float32,), (torch.float32,), torch.float32)


register_tactic(DnnlConvTactic())
register_tactic(DnnlDeconvTactic())
