"""Convolution through cuDNN (via torch): plain NCHW/NHWC, and cuDNN's fused conv+bias+(add)+ReLU.

Every conv tactic on CUDA returns its output in channels_last memory format (logical NCHW shape):
activations flow between layers as NHWC, which is what cuDNN's and Triton's fast paths want; the
`nchw` variant converts in and out, and its timing includes those conversions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.backends.cuda.common import (Epilogue, ConvGeometry, addmm_act, apply_epilogue_, channels_last, const_on,
                                       converting, conv_geometry, conv_static_ok, epilogue_of, float_io, lt_gelu_ok,
                                       prepacked)
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor


def _pad_args(geo: ConvGeometry) -> tuple[list[int] | None, list[int]]:
    """(F.pad argument or None, conv padding) for the geometry's pads."""
    if geo.symmetric:
        return None, [geo.pads[0], geo.pads[1]]
    t, l, b, r = geo.pads
    return [l, r, t, b], [0, 0]


def _triton_epilogue_helps(node: Node) -> bool:
    """Whether a one-pass Triton epilogue can replace torch's separate bias/activation/residual kernels after a
    library conv or GEMM: Triton present and something to do beyond what the library call fuses itself."""
    from kiln.backends.cuda import HAVE_TRITON
    if not HAVE_TRITON:
        return False
    ep = epilogue_of(node)
    return bool(ep.activation) or node.input(3) is not None


class CudnnConv(Tactic):
    """torch conv2d (cuDNN) with bias, then the epilogue as in-place torch ops. Any group, any float type."""

    id = "cuda.cudnn_conv"
    devices = ("cuda",)
    priority = 50

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return conv_static_ok(node) and float_io(node, cast_ok=True)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        out = [{"layout": "nhwc"}, {"layout": "nchw"}]
        if _triton_epilogue_helps(node):
            out.insert(0, {"layout": "nhwc", "epilogue": "triton"})
        return out

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        geo = conv_geometry(node)
        ep = epilogue_of(node)
        nhwc = config.get("layout", "nhwc") == "nhwc"
        mf = torch.channels_last if nhwc else torch.contiguous_format
        w = const_on(node, 1, device).contiguous(memory_format=mf)  # type: ignore[union-attr]
        b = const_on(node, 2, device)
        pad, padding = _pad_args(geo)
        stride, dil, groups = list(geo.strides), list(geo.dilations), geo.group
        if config.get("epilogue") == "triton":
            if not nhwc:
                raise ValueError("the Triton epilogue needs the nhwc layout")
            from kiln.backends.cuda.triton_epilogue import OnePassEpilogue
            epi = OnePassEpilogue(ep)

            def kernel_epi(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
                x = x.contiguous(memory_format=mf)
                if pad is not None:
                    x = F.pad(x, pad)
                y = F.conv2d(x, w, None, stride, padding, dil, groups).contiguous(memory_format=mf)
                return epi(y, b, z)
            return prepacked(converting(kernel_epi, node), (1, 2))

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
            x = x.contiguous(memory_format=mf)
            if pad is not None:
                x = F.pad(x, pad)
            y = F.conv2d(x, w, b, stride, padding, dil, groups)
            y = apply_epilogue_(y, z, ep)
            return y if nhwc else y.contiguous(memory_format=torch.channels_last)
        return prepacked(converting(kernel, node), (1, 2))


class CudnnFusedConv(Tactic):
    """cuDNN's fused conv + bias (+ residual) + ReLU: torch.cudnn_convolution_relu / _add_relu.

    Covers FusedConv with activation Relu, and with a residual Z added before the ReLU.
    """

    id = "cuda.cudnn_fused_conv"
    devices = ("cuda",)
    priority = 60

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if node.op_type != "FusedConv" or not conv_static_ok(node) or not float_io(node, cast_ok=True):
            return False
        ep = epilogue_of(node)
        if ep.activation != "Relu":
            return False
        if node.input(3) is not None and ep.act_before_add:
            return False
        return conv_geometry(node).symmetric

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{"layout": "nhwc"}, {"layout": "nchw"}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        geo = conv_geometry(node)
        nhwc = config.get("layout", "nhwc") == "nhwc"
        mf = torch.channels_last if nhwc else torch.contiguous_format
        w = const_on(node, 1, device).contiguous(memory_format=mf)  # type: ignore[union-attr]
        b = const_on(node, 2, device)
        stride, padding, dil, groups = list(geo.strides), [geo.pads[0], geo.pads[1]], list(geo.dilations), geo.group

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
            x = x.contiguous(memory_format=mf)
            if z is None:
                y = torch.cudnn_convolution_relu(x, w, b, stride, padding, dil, groups)
            else:
                y = torch.cudnn_convolution_add_relu(x, w, z.contiguous(memory_format=mf), 1.0, b,
                                                     stride, padding, dil, groups)
            return y if nhwc else y.contiguous(memory_format=torch.channels_last)
        return prepacked(converting(kernel, node), (1, 2))


class Conv1x1Gemm(Tactic):
    """A conv over non-overlapping patches as one cuBLAS GEMM: 1x1 stride 1 over the NHWC view (no copy), or a
    kernel equal to its stride (a ViT's patch embedding, 16x16 stride 16) over the patches gathered by one copy.

    [N*Ho*Wo, C*kh*kw] @ [C*kh*kw, K] with the bias (and ReLU or GELU when it is the only epilogue) fused by
    cuBLASLt; the result is the NHWC output, returned as its NCHW view. Unpadded, undilated, ungrouped only.
    """

    id = "cuda.conv1x1_gemm"
    devices = ("cuda",)
    priority = 40

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if not conv_static_ok(node) or not float_io(node, cast_ok=True):
            return False
        geo = conv_geometry(node)
        return (geo.strides == geo.kernel and geo.pads == (0, 0, 0, 0) and geo.dilations == (1, 1)
                and geo.group == 1)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        ep = epilogue_of(node)
        cfgs: list[dict[str, Any]] = []
        if lt_gelu_ok(node):
            cfgs.append({"epilogue": "lt_gelu"})
        if _triton_epilogue_helps(node) and not (ep.activation == "Relu" and node.input(3) is None):
            cfgs.append({"epilogue": "triton"})
        return cfgs + [{}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        ep = epilogue_of(node)
        kh, kw = conv_geometry(node).kernel
        w = const_on(node, 1, device)
        k_out = int(w.shape[0])  # type: ignore[union-attr]
        wt = w.reshape(k_out, -1).t().contiguous()  # type: ignore[union-attr]  [C*kh*kw, K], (c, i, j) order
        b = const_on(node, 2, device)
        fused_act = b is not None and node.input(3) is None and (
            ep.activation == "Relu" or (ep.activation in ("Gelu", "GeluTanh") and config.get("epilogue") == "lt_gelu"))

        def rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
            """The patches of x as GEMM rows [N*Ho*Wo, C*kh*kw] (a view for 1x1) and (N, Ho, Wo)."""
            if kh == kw == 1:
                x = channels_last(x)
                n, c, h, wd = x.shape
                return x.permute(0, 2, 3, 1).reshape(n * h * wd, c), (n, h, wd)
            n, c, h, wd = x.shape
            ho, wo = h // kh, wd // kw
            p = x[:, :, :ho * kh, :wo * kw].unflatten(3, (wo, kw)).unflatten(2, (ho, kh))  # N C Ho kh Wo kw
            return p.permute(0, 2, 4, 1, 3, 5).reshape(n * ho * wo, c * kh * kw), (n, ho, wo)

        if config.get("epilogue") == "triton":
            from kiln.backends.cuda.triton_epilogue import OnePassEpilogue
            epi = OnePassEpilogue(ep)

            def kernel_epi(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
                a, (n, h, wd) = rows(x)
                return epi(torch.mm(a, wt).view(n, h, wd, k_out).permute(0, 3, 1, 2), b, z)
            return prepacked(converting(kernel_epi, node), (1, 2))

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
            a, (n, h, wd) = rows(x)
            if fused_act:
                y2 = addmm_act(b, a, wt, gelu=ep.activation != "Relu")
            elif b is not None:
                y2 = torch.addmm(b, a, wt)
            else:
                y2 = torch.mm(a, wt)
            y = y2.view(n, h, wd, k_out).permute(0, 3, 1, 2)
            if not fused_act:
                y = apply_epilogue_(y, z, ep)
            return y
        return prepacked(converting(kernel, node), (1, 2))


register_tactic(CudnnConv())
register_tactic(CudnnFusedConv())
register_tactic(Conv1x1Gemm())

__all__ = ["CudnnConv", "CudnnFusedConv", "Conv1x1Gemm", "Epilogue"]
