"""Quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, ConvInteger, QLinearConv,
QLinearMatMul.

Integer products of 8-bit operands are accumulated exactly: they are computed in float64, where
every partial sum of products bounded by 255 * 255 is an integer below 2**53 (so the same code
is exact on CPU and CUDA, which has no integer convolution). Requantization follows onnxruntime:
the real multiplier and the product with the int32 accumulator are float32, rounded to nearest
even, offset by the zero point and saturated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.attrs import Attr
from kiln.ops.conv import WINDOW, WindowOp, kernel_shape, spatial_rank, strides_dilations, torch_pad, window_pads
from kiln.ops.creation import FLOAT8, onnx_dtype, to_float8
from kiln.ops.registry import OpDef, norm_axis, register

Tensor = torch.Tensor

INT_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767),
    torch.int32: (-(1 << 31), (1 << 31) - 1),
}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _quant_param(p: Tensor, x: Tensor, axis: int, block_size: int, node: Node) -> Tensor:
    """Scale or zero point reshaped (and, when blocked, repeated) to broadcast against `x`."""
    if p.dim() == 0 or (p.dim() == 1 and p.numel() == 1):
        return p.reshape(())
    rank = x.dim()
    if not -rank <= axis < rank:
        raise UnsupportedOpError(f"node '{node.name}': axis {axis} is out of range for rank {rank}")
    axis = norm_axis(axis, rank)
    if block_size > 0:
        if p.dim() != rank:
            raise UnsupportedOpError(f"node '{node.name}': blocked quantization needs a rank-{rank} scale, "
                                     f"got shape {tuple(p.shape)}")
        p = torch.repeat_interleave(p, block_size, dim=axis).narrow(axis, 0, x.shape[axis])
        if tuple(p.shape) != tuple(x.shape):
            raise UnsupportedOpError(f"node '{node.name}': scale shape does not match input shape "
                                     f"{tuple(x.shape)} for block_size {block_size}")
        return p
    if p.dim() != 1 or p.shape[0] != x.shape[axis]:
        raise UnsupportedOpError(f"node '{node.name}': per-axis scale of shape {tuple(p.shape)} does not match "
                                 f"axis {axis} of input shape {tuple(x.shape)}")
    shape = [1] * rank
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def saturate_int(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Clamp a float tensor of integral values to the range of `dtype` and convert."""
    lo, hi = INT_RANGES[dtype]
    return v.clamp(lo, hi).to(dtype)


def quantize(q: Tensor, zp: Tensor | None, dtype: torch.dtype, saturate: bool = True) -> Tensor:
    """round(q) + zp, saturated to `dtype` (integer), or q converted to float 8 (q already scaled)."""
    if dtype in FLOAT8:
        if zp is not None:
            q = q.float() + zp.float()
        return to_float8(q, dtype, saturate)
    r = torch.round(q)
    if r.dtype != torch.float32 or (dtype not in (torch.int8, torch.uint8)):
        r = r.double()  # float32 holds every rounded value that does not saturate an 8-bit type, plus its zero point
    if zp is not None:
        r = r + zp.to(r.dtype)
    return saturate_int(r, dtype)


def _axis_block(node: Node) -> tuple[int, int]:
    return int(node.attr("axis", 1)), int(node.attr("block_size", 0)) if node.opset >= 21 else 0


@register
class QuantizeLinear(OpDef):
    op_type = "QuantizeLinear"
    opsets = (10, 28)

    def compute(self, node: Node, x: Tensor, scale: Tensor, zp: Tensor | None = None) -> Tensor:
        out_code = int(node.attr("output_dtype", 0) or 0)
        if zp is not None:
            dtype = zp.dtype
        elif out_code:
            dtype = onnx_dtype(out_code, node, "output_dtype")
        else:
            dtype = torch.uint8
        if dtype == torch.int32 or (dtype not in INT_RANGES and dtype not in FLOAT8):
            raise UnsupportedDTypeError(f"node '{node.name}': QuantizeLinear to {dtype} is not supported")
        axis, block = _axis_block(node)
        s = _quant_param(scale, x, axis, block, node)
        z = None if zp is None else _quant_param(zp, x, axis, block, node)
        prec = node.attr("precision")
        if prec:
            work = onnx_dtype(prec, node, "precision")
        elif x.is_floating_point():
            work = torch.promote_types(x.dtype, s.dtype)
        else:
            work = s.dtype
        q = x.to(work) / s.to(work)
        return quantize(q, z, dtype, bool(node.attr("saturate", 1)))


@register
class DequantizeLinear(OpDef):
    op_type = "DequantizeLinear"
    opsets = (10, 28)

    def compute(self, node: Node, x: Tensor, scale: Tensor, zp: Tensor | None = None) -> Tensor:
        if x.dtype not in INT_RANGES and x.dtype not in FLOAT8:
            raise UnsupportedDTypeError(f"node '{node.name}': DequantizeLinear from {x.dtype} is not supported")
        out_code = int(node.attr("output_dtype", 0) or 0)
        out = onnx_dtype(out_code, node, "output_dtype") if out_code else scale.dtype
        axis, block = _axis_block(node)
        s = _quant_param(scale, x, axis, block, node)
        work = torch.promote_types(torch.float32, s.dtype)
        if x.dtype in FLOAT8:
            dx = x.to(torch.float32)
            if zp is not None:
                dx = dx - _quant_param(zp, x, axis, block, node).to(torch.float32)
        else:
            di = x.to(torch.int64)
            if zp is not None:
                di = di - _quant_param(zp, x, axis, block, node).to(torch.int64)
            dx = di.to(work)
        return (dx.to(work) * s.to(work)).to(out)


@register
class DynamicQuantizeLinear(OpDef):
    op_type = "DynamicQuantizeLinear"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dtype != torch.float32:
            raise UnsupportedDTypeError(f"node '{node.name}': DynamicQuantizeLinear needs float32 input, got {x.dtype}")
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        hi = torch.maximum(x.max(), zero) if x.numel() else zero
        lo = torch.minimum(x.min(), zero) if x.numel() else zero
        scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
        zp = torch.round((0.0 - lo / scale).clamp(0, 255))
        y = (torch.round(x / scale) + zp).clamp(0, 255).to(torch.uint8)
        return y, scale, zp.to(torch.uint8)


# ---- integer convolution and matmul ---------------------------------------------------------------

def _require_8bit(node: Node, *xs: Tensor | None) -> None:
    for t in xs:
        if t is not None and t.dtype not in (torch.int8, torch.uint8):
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} needs int8/uint8 operands, got {t.dtype}")


def _centered(t: Tensor, zp: Tensor | None, per_channel_dim: int | None = None) -> Tensor:
    """(t - zp) as float64; a 1-D zero point indexes dimension `per_channel_dim` of `t`."""
    v = t.to(torch.float64)
    if zp is None:
        return v
    z = zp.to(torch.float64)
    if z.numel() > 1 and per_channel_dim is not None:
        shape = [1] * t.dim()
        shape[per_channel_dim] = z.numel()
        z = z.reshape(shape)
    elif z.numel() == 1:
        z = z.reshape(())
    return v - z


def _conv_acc(node: Node, x: Tensor, w: Tensor, x_zp: Tensor | None, w_zp: Tensor | None,
              bias: Tensor | None = None) -> Tensor:
    """Exact integer convolution accumulator (float64 holding integers)."""
    nd = spatial_rank(node, x)
    kernel = kernel_shape(node, w)
    strides, dilations = strides_dilations(node, nd)
    pads = window_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    if x_zp is not None and x_zp.numel() != 1:
        raise UnsupportedOpError(f"node '{node.name}': x_zero_point must be a scalar")
    xc = F.pad(_centered(x, x_zp), torch_pad(pads[:nd], pads[nd:]))
    wc = _centered(w, w_zp, 0)
    b = None if bias is None else bias.to(torch.float64)
    return _CONV[nd](xc, wc, b, strides, [0] * nd, dilations, int(node.attr("group", 1)))


def requantize(acc: Tensor, multiplier: Tensor, zp: Tensor | None, dtype: torch.dtype) -> Tensor:
    """round(acc * multiplier) + zp saturated to `dtype`, in float32 like onnxruntime."""
    q = acc.to(torch.float32) * multiplier.to(torch.float32)
    return quantize(q, zp, dtype)


@register
class ConvInteger(WindowOp):
    op_type = "ConvInteger"
    opsets = (10, 28)
    attributes = {**WINDOW, "group": Attr("int", 1, min=1)}

    def compute(self, node: Node, x: Tensor, w: Tensor, x_zp: Tensor | None = None,
                w_zp: Tensor | None = None) -> Tensor:
        _require_8bit(node, x, w, x_zp, w_zp)
        return _conv_acc(node, x, w, x_zp, w_zp).to(torch.int64).to(torch.int32)


@register
class QLinearConv(WindowOp):
    op_type = "QLinearConv"
    opsets = (10, 28)
    attributes = {**WINDOW, "group": Attr("int", 1, min=1)}

    def compute(self, node: Node, x: Tensor, x_scale: Tensor, x_zp: Tensor, w: Tensor, w_scale: Tensor,
                w_zp: Tensor, y_scale: Tensor, y_zp: Tensor, bias: Tensor | None = None) -> Tensor:
        _require_8bit(node, x, w, x_zp, w_zp, y_zp)
        if bias is not None and bias.dtype != torch.int32:
            raise UnsupportedDTypeError(f"node '{node.name}': QLinearConv bias must be int32, got {bias.dtype}")
        acc = _conv_acc(node, x, w, x_zp, w_zp, bias)
        ws = w_scale.to(torch.float32).reshape(-1)
        ws = ws.reshape(()) if ws.numel() == 1 else ws.reshape(1, -1, *([1] * (x.dim() - 2)))
        m = x_scale.to(torch.float32).reshape(()) * ws / y_scale.to(torch.float32).reshape(())
        out = y_zp.dtype if y_zp is not None else x.dtype
        return requantize(acc, m, None if y_zp is None else y_zp.reshape(()), out)


def _row(p: Tensor | None) -> Tensor | None:
    """Per-tensor or per-row (last-but-one axis) parameter of the left operand."""
    if p is None or p.numel() == 1:
        return None if p is None else p.reshape(())
    return p.unsqueeze(-1)


def _col(p: Tensor | None) -> Tensor | None:
    """Per-tensor or per-column (last axis) parameter of the right operand."""
    if p is None or p.numel() == 1:
        return None if p is None else p.reshape(())
    return p.unsqueeze(-2) if p.dim() > 1 else p


def _operand(t: Tensor, zp: Tensor | None) -> Tensor:
    work = torch.float32 if t.dtype in FLOAT8 else torch.float64
    v = t.to(work)
    return v if zp is None else v - zp.to(work)


@register
class QLinearMatMul(OpDef):
    op_type = "QLinearMatMul"
    opsets = (10, 28)

    def compute(self, node: Node, a: Tensor, a_scale: Tensor, a_zp: Tensor | None, b: Tensor, b_scale: Tensor,
                b_zp: Tensor | None, y_scale: Tensor, y_zp: Tensor | None) -> Tensor:
        for t in (a, b, a_zp, b_zp, y_zp):
            if t is not None and t.dtype not in (torch.int8, torch.uint8) + FLOAT8:
                raise UnsupportedDTypeError(f"node '{node.name}': QLinearMatMul does not support {t.dtype}")
        squeeze_a, squeeze_b = a.dim() == 1, b.dim() == 1
        a2 = a.unsqueeze(0) if squeeze_a else a
        b2 = b.unsqueeze(-1) if squeeze_b else b
        acc = torch.matmul(_operand(a2, _row(a_zp)), _operand(b2, _col(b_zp)))
        sa = _row(a_scale.to(torch.float32))
        sb = _col(b_scale.to(torch.float32))
        m = sa * sb / y_scale.to(torch.float32).reshape(())  # type: ignore[operator]
        out = y_zp.dtype if y_zp is not None else a.dtype
        y = requantize(acc, m, None if y_zp is None else y_zp.reshape(()), out)
        if squeeze_b:
            y = y.squeeze(-1)
        if squeeze_a:
            y = y.squeeze(-1 if squeeze_b else -2)
        return y
