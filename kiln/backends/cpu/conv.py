"""oneDNN convolution tactic for Conv and FusedConv (2-D, float32) on the CPU.

At kernel build time the weights are reordered once into oneDNN's blocked layout for the layer's
input size (``torch.ops.mkldnn._reorder_convolution_weight``), pads/strides/epilogue are resolved,
and one of a few closures is picked, so an inference is a single ``_convolution_pointwise`` call:

* no residual: the activation is a fused oneDNN post-op when oneDNN has it, else applied in place;
* residual Z with ``act(conv + B + Z)``: the ``binary`` variant fuses the add (and a ReLU);
* residual with ``act(conv + B) + Z``: fused activation, then an in-place add.

Config keys: ``layout`` "nhwc" (channels-last activations: the output is channels-last, so the next conv
of a chain receives it as is and reformatting happens only at the chain's boundaries) or "nchw" (the
decision is per model: ``configs`` offers nhwc only); ``algo`` "gemm" runs a 1x1 convolution without
residual as one oneDNN matmul over the pixels (cheaper per call); ``inplace_z`` accumulates into Z's
buffer (oneDNN sum post-op) instead of allocating the output, which is only valid when this layer is
Z's last reader: set by whoever knows that (the builder through the config, or a graph pass through
the node attribute ``kiln_z_donate=1``). A Z that is a view or not channels-last is copied first, so a
donated Z never writes through into another tensor.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.backends.cpu.common import (CpuTactic, act_attrs, float_conv_weight, inplace_activation, onednn_unary,
                                      shape_hint, static_shape)
from kiln.backends.tactic import Built, Kernel, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.activations import TABLE as ACTIVATION_TABLE
from kiln.ops.conv import ConvGeometry

Tensor = torch.Tensor
_FMT = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}


def _is_conv(node: Node) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx")


class OneDnnConvTactic(CpuTactic):
    """Conv / FusedConv through oneDNN with prepacked weights and fused epilogues (see module doc)."""

    id = "cpu.conv_onednn"

    torch_dispatch = True
    priority = 10
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))
    needs_onednn = True

    def accepts(self, node: Node) -> bool:
        return float_conv_weight(node, _ACTS) is not None and ConvGeometry.of(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        # One layout per model, not per layer: a per-layer choice timed in isolation cannot see the
        # reformat it causes at its neighbours ("nchw" stays buildable for plans that ask for it).
        # 1x1 convolutions without residual may also run as a matmul over pixels ("algo": "gemm").
        if self._gemm_able(node):
            return [{"layout": "nhwc", "algo": "gemm"}, {"layout": "nhwc"}]
        return [{"layout": "nhwc"}]

    @staticmethod
    def _gemm_able(node: Node) -> bool:
        w = node.inputs[1].const  # type: ignore[union-attr]
        if w is None or (not _is_conv(node) and node.input(3) is not None):
            return False
        act = "" if _is_conv(node) else act_attrs(node)[0]
        geo = ConvGeometry.of(node)
        return geo is not None and geo.pointwise and onednn_unary(act, *act_attrs(node)[1:]) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        w = node.inputs[1].const.contiguous()  # type: ignore[union-attr]
        b_v = node.input(2)
        b = None if b_v is None else b_v.const.contiguous()  # type: ignore[union-attr]
        geo = conv_geometry(node, list(w.shape[2:]), None)
        fmt = _FMT[str(config.get("layout", "nhwc"))]
        if _is_conv(node):
            act, alpha, beta, z_v, before_add = "", 0.0, 0.0, None, False
        else:
            act, alpha, beta = act_attrs(node)
            z_v, before_add = node.input(3), bool(int(node.attr("act_before_add", 0)))
        kernel: Kernel | None = None
        if config.get("algo") == "gemm" and fmt == torch.channels_last and self._gemm_able(node):
            kernel = gemm_kernel(w, b, act, alpha, beta)
        if kernel is None:
            hint = geo.padded_shape(shape_hint(node.inputs[0]))  # type: ignore[arg-type]
            packed = pack_conv_weight(w, geo, hint)
            out_shape = static_shape(node.outputs[0])
            same_z = z_v is not None and out_shape is not None and static_shape(z_v) == out_shape
            donate = bool(config.get("inplace_z", False)) or bool(int(node.attr("kiln_z_donate", 0) or 0))
            kernel = conv_kernel(packed, b, geo, fmt, act, alpha, beta, z_v is not None, before_add, same_z, donate)
        return Kernel(kernel, prepacked=frozenset({1, 2}))  # W, B live inside the kernel


def conv_geometry(node: Node, kernel: list[int], sizes: list[int] | None) -> ConvGeometry:
    """The node's geometry (kiln.ops.conv.ConvGeometry) for these kernel and input spatial sizes (None: the
    input's static ones); ValueError where it cannot be resolved (auto_pad SAME without sizes)."""
    geo = ConvGeometry.of(node, sizes, kernel)
    if geo is None:
        raise ValueError(f"'{node.name}': the convolution's geometry cannot be resolved")
    return geo


_ACTS = tuple(ACTIVATION_TABLE)


def pack_conv_weight(w: Tensor, geo: ConvGeometry, input_size: list[int] | None) -> Tensor:
    """w reordered once into oneDNN's preferred blocked layout for this geometry (w itself if that fails)."""
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_convolution_weight(w, geo.symmetric_pads, list(geo.strides),
                                                                list(geo.dilations), geo.group, input_size)
    except RuntimeError:
        return w


def _inplace_binary() -> Any:
    """mkldnn::_convolution_pointwise_.binary (accumulates into its first argument), None if torch lacks it."""
    try:
        return raw_op(torch.ops.mkldnn._convolution_pointwise_.binary)
    except (AttributeError, RuntimeError):
        return None


def raw_op(overload: Any) -> Any:
    """The C++ callable behind a torch OpOverload (skips one Python frame per call); the overload if absent."""
    return getattr(overload, "_op", overload)


def conv_kernel(w: Tensor, b: Tensor | None, geo: ConvGeometry, fmt: torch.memory_format, act: str, alpha: float,
                beta: float, has_z: bool, act_before_add: bool, same_z: bool, inplace_z: bool = False) -> Built:
    """The per-inference closure: everything but the input tensors is bound here.

    inplace_z: write the result into Z's buffer (oneDNN sum post-op); only valid when Z dies at this layer.
    """
    conv = raw_op(torch.ops.mkldnn._convolution_pointwise.default)
    binary = raw_op(torch.ops.mkldnn._convolution_pointwise.binary)
    binary_ = _inplace_binary() if inplace_z else None
    inplace_z = binary_ is not None
    pad, stride, dil, groups, extra = (geo.symmetric_pads, list(geo.strides), list(geo.dilations), geo.group,
                                       geo.extra_pad)
    unary = onednn_unary(act, alpha, beta)
    post = inplace_activation(act, alpha, beta) if unary is None else None
    u_attr, u_scalars, u_alg = unary if unary is not None else ("none", [], "")
    if extra is not None:
        padded = conv_kernel(w, b, geo.without_extra(), fmt, act, alpha, beta, has_z, act_before_add, same_z,
                             inplace_z)

        def k_pad(x: Tensor, *rest: Any) -> Tensor:
            return padded(F.pad(x, extra), *rest)
        return k_pad

    if not has_z:
        if post is None:
            def k_plain(x: Tensor, *_: Any) -> Tensor:
                return conv(x.contiguous(memory_format=fmt), w, b, pad, stride, dil, groups, u_attr, u_scalars, u_alg)
            return k_plain

        def k_post(x: Tensor, *_: Any) -> Tensor:
            return post(conv(x.contiguous(memory_format=fmt), w, b, pad, stride, dil, groups, "none", [], ""))
        return k_post

    if not act_before_add and same_z:
        bin_unary = "relu" if act == "Relu" else None
        tail = None if act in ("", "Relu") else inplace_activation(act, alpha, beta)
        if inplace_z:
            def k_sum(x: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
                if z._base is not None or not z.is_contiguous(memory_format=fmt):
                    z = z.contiguous(memory_format=fmt) if z._base is None else z.clone(memory_format=fmt)
                y = binary_(z, x.contiguous(memory_format=fmt), w, b, pad, stride, dil, groups, "add", None,
                            bin_unary, [], None)
                return y if tail is None else tail(y)
            return k_sum

        def k_binary(x: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
            y = binary(x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt), w, b, pad, stride, dil,
                       groups, "add", None, bin_unary, [], None)
            return y if tail is None else tail(y)
        return k_binary

    if act_before_add:
        def k_act_add(x: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
            y = conv(x.contiguous(memory_format=fmt), w, b, pad, stride, dil, groups, u_attr, u_scalars, u_alg)
            if post is not None:
                post(y)
            return y.add_(z)
        return k_act_add

    full = inplace_activation(act, alpha, beta)

    def k_add_act(x: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
        y = conv(x.contiguous(memory_format=fmt), w, b, pad, stride, dil, groups, "none", [], "").add_(z)
        return y if full is None else full(y)
    return k_add_act


def gemm_kernel(w: Tensor, b: Tensor | None, act: str, alpha: float, beta: float) -> Kernel | None:
    """A 1x1 / stride 1 / unpadded conv without residual as one oneDNN matmul over the NHWC pixels.

    [N*H*W, C] x [C, K] on the channels-last buffer, viewed back as a channels-last [N, K, H, W] tensor:
    the same math as the convolution, with a cheaper per-call setup. None when the activation has no
    oneDNN post-op.
    """
    unary = onednn_unary(act, alpha, beta)
    if unary is None:
        return None
    attr, scalars, alg = unary
    k_out, c_in = int(w.shape[0]), int(w.shape[1])
    w2 = w.reshape(k_out, c_in).contiguous()
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w2, None)
    except RuntimeError:
        packed = w2
    lin = raw_op(torch.ops.mkldnn._linear_pointwise.default)
    cl = torch.channels_last

    def k_gemm(x: Tensor, *_: Any) -> Tensor:
        n, _, h, wd = x.shape
        rows = x.contiguous(memory_format=cl).permute(0, 2, 3, 1).reshape(-1, c_in)
        return lin(rows, packed, b, attr, scalars, alg).view(n, h, wd, k_out).permute(0, 3, 1, 2)
    return k_gemm


register_tactic(OneDnnConvTactic())
