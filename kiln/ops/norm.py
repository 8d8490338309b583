"""Normalizations: BatchNormalization (inference and training_mode), Instance/Layer/Group/RMS
normalization, LRN, LpNormalization, MeanVarianceNormalization.

float16/bfloat16 statistics are computed in float32 (or in the `stash_type` precision where the
op has one) and the result cast back to the input's type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dtype import onnx_to_torch
from kiln.ir.graph import Node
from kiln.ops.attrs import Attr, read
from kiln.ops.conv import require_float
from kiln.ops.registry import OpDef, norm_axis, register, require

Tensor = torch.Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _stash(node: Node) -> torch.dtype:
    """The stash_type attribute: type of the statistics (float32 by default)."""
    dt = onnx_to_torch(int(node.attr("stash_type", 1)))
    if not dt.is_floating_point:
        raise UnsupportedDTypeError(f"node '{node.name}': stash_type {dt} is not a floating-point type")
    return dt


def _stage_one(node: Node, x: Tensor) -> torch.dtype:
    """Precision of stage one: the stash type, or float64 for a float64 input."""
    return torch.promote_types(_stash(node), x.dtype) if x.dtype == torch.float64 else _stash(node)


def layer_norm(x: Tensor, scale: Tensor, b: Tensor | None, axes: list[int], eps: float,
               stat: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, mean, inv_std) of a LayerNorm over `axes` with statistics in `stat`: the normalized value rounded to x's
    type once, then scaled and shifted in x's type (LayerNormalization, AddLayerNormalization, FusedConvNorm)."""
    xf = x.to(stat)
    mean = xf.mean(axes, keepdim=True)
    d = xf - mean
    inv_std = torch.rsqrt((d * d).mean(axes, keepdim=True) + eps)
    y = (d * inv_std).to(x.dtype) * scale.to(x.dtype)
    return (y if b is None else y + b.to(x.dtype)), mean, inv_std


def _per_channel(p: Tensor, rank: int, dt: torch.dtype) -> Tensor:
    """A (C,) parameter (or (C, *spatial) for the old spatial=0 form) shaped to broadcast over (N, C, ...)."""
    p = p.to(dt)
    if p.dim() == 1:
        return p.reshape(-1, *([1] * (rank - 2)))
    return p.reshape(1, *p.shape)


# ---- BatchNormalization ---------------------------------------------------------------------------

@register
class BatchNormalization(OpDef):
    op_type = "BatchNormalization"

    def compute(self, node: Node, x: Tensor, scale: Tensor, b: Tensor, mean: Tensor,
                var: Tensor) -> Tensor | tuple[Tensor, ...]:
        require_float(node, x, scale, b, mean, var)
        if x.dim() < 2:
            raise UnsupportedOpError(f"node '{node.name}': BatchNormalization needs an input of rank 2 or more")
        eps = float(node.attr("epsilon", 1e-5))
        dt = _acc(x)
        r = x.dim()
        xf = x.to(dt)
        if node.opset >= 14:
            training = bool(node.attr("training_mode", 0))
        else:
            training = len(node.outputs) > 1
        if not training:
            inv = _per_channel(scale, r, dt) / torch.sqrt(_per_channel(var, r, dt) + eps)
            y = (xf - _per_channel(mean, r, dt)) * inv + _per_channel(b, r, dt)
            return y.to(x.dtype)
        momentum = float(node.attr("momentum", 0.9))
        axes = [0] + list(range(2, r))
        batch_mean = xf.mean(axes)
        batch_var = xf.var(axes, unbiased=False)
        inv = _per_channel(scale, r, dt) / torch.sqrt(_per_channel(batch_var, r, dt) + eps)
        y = ((xf - _per_channel(batch_mean, r, dt)) * inv + _per_channel(b, r, dt)).to(x.dtype)
        run_mean = (mean.to(dt) * momentum + batch_mean * (1 - momentum)).to(mean.dtype)
        run_var = (var.to(dt) * momentum + batch_var * (1 - momentum)).to(var.dtype)
        outs: tuple[Tensor, ...] = (y, run_mean, run_var)
        if node.opset < 14:
            outs += (batch_mean.to(mean.dtype), batch_var.to(var.dtype))
        return outs[:max(1, len(node.outputs))]


# ---- Instance / Layer / Group / RMS normalization ---------------------------------------------------

@register
class InstanceNormalization(OpDef):
    op_type = "InstanceNormalization"

    def compute(self, node: Node, x: Tensor, scale: Tensor, b: Tensor) -> Tensor:
        require_float(node, x, scale, b)
        if x.dim() < 3:
            raise UnsupportedOpError(f"node '{node.name}': InstanceNormalization needs an input of rank 3 or more")
        eps = float(node.attr("epsilon", 1e-5))
        dt = _acc(x)
        xf = x.to(dt)
        axes = list(range(2, x.dim()))
        mean = xf.mean(axes, keepdim=True)
        var = xf.var(axes, unbiased=False, keepdim=True)
        y = (xf - mean) / torch.sqrt(var + eps) * _per_channel(scale, x.dim(), dt) + _per_channel(b, x.dim(), dt)
        return y.to(x.dtype)


@register
class LayerNormalization(OpDef):
    op_type = "LayerNormalization"
    opsets = (17, 28)

    def compute(self, node: Node, x: Tensor, scale: Tensor, b: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        require_float(node, x, scale, b)
        axis = norm_axis(int(node.attr("axis", -1)), x.dim())
        eps = float(node.attr("epsilon", 1e-5))
        y, mean, inv_std = layer_norm(x, scale, b, list(range(axis, x.dim())), eps, _stage_one(node, x))
        if len(node.outputs) <= 1:
            return y
        st = _stash(node)
        return (y, mean.to(st), inv_std.to(st))[:len(node.outputs)]


@register
class GroupNormalization(OpDef):
    op_type = "GroupNormalization"
    opsets = (18, 28)

    def compute(self, node: Node, x: Tensor, scale: Tensor, b: Tensor) -> Tensor:
        require_float(node, x, scale, b)
        groups = int(node.attr("num_groups"))
        n, c = x.shape[0], int(x.shape[1])  # n stays symbolic in type inference (a dynamic batch)
        if groups <= 0 or c % groups:
            raise UnsupportedOpError(f"node '{node.name}': {c} channels do not split into {groups} groups")
        eps = float(node.attr("epsilon", 1e-5))
        xg = x.to(_stage_one(node, x)).reshape(n, groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, unbiased=False, keepdim=True)
        y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape).to(x.dtype)
        if scale.numel() == groups and groups != c:
            scale, b = scale.repeat_interleave(c // groups), b.repeat_interleave(c // groups)
        return y * _per_channel(scale, x.dim(), x.dtype) + _per_channel(b, x.dim(), x.dtype)


@register
class RMSNormalization(OpDef):
    op_type = "RMSNormalization"
    opsets = (23, 28)

    def compute(self, node: Node, x: Tensor, scale: Tensor) -> Tensor:
        require_float(node, x, scale)
        axis = norm_axis(int(node.attr("axis", -1)), x.dim())
        eps = float(node.attr("epsilon", 1e-5))
        xf = x.to(_stage_one(node, x))
        ms = (xf * xf).mean(list(range(axis, x.dim())), keepdim=True)
        return (xf / torch.sqrt(ms + eps)).to(x.dtype) * scale.to(x.dtype)


@register
class AddLayerNormalization(OpDef):
    """A residual add and the normalization after it as one layer (domain "kiln", made by
    kiln.passes.residual_norm)::

        S = X + R                                   (in X's type, as the Add it replaces)
        Y = LayerNormalization(S, Scale, B)         rms = 0, over the dims [axis, rank)
        Y = RMSNormalization(S, Scale)              rms = 1 (no B)

    Outputs Y and, when the sum is read elsewhere too (a pre-norm transformer's residual stream), S.
    R has X's rank and, in each dim, X's size or 1 (ViT's position embedding [1, S, D] added to every image);
    Scale and B broadcast over the normalized dims. Optional ``out_dtype`` (float32 / float16 / bfloat16): Y is
    stored in that type (a folded Cast: a float16 network's last norm writing its float32 graph output).
    """

    op_type = "AddLayerNormalization"
    domain = "kiln"
    arity = (3, 4)
    out_arity = (1, 2)
    attributes = {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5), "rms": Attr("int", 0, choices=(0, 1)),
                  "out_dtype": Attr("int", None, choices=(1, 10, 16))}

    def compute(self, node: Node, x: Tensor, r: Tensor, scale: Tensor,
                b: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        require_float(node, x, r, scale, b)

        def bad() -> str:
            return (f"node '{node.name}': AddLayerNormalization adds R of shape {list(r.shape)} to X of shape "
                    f"{list(x.shape)}")
        require(x.dim() == r.dim(), bad)
        for dx, dr in zip(x.shape, r.shape):
            if not (isinstance(dr, int) and dr == 1):
                require(dx == dr, bad)
        s = x + r.to(x.dtype)
        axis = norm_axis(int(read(node, "axis")), s.dim())
        eps = float(read(node, "epsilon"))
        axes = list(range(axis, s.dim()))
        if int(read(node, "rms")):
            sf = s.to(_acc(s))
            y = (sf * torch.rsqrt((sf * sf).mean(axes, keepdim=True) + eps)).to(s.dtype) * scale.to(s.dtype)
            if b is not None:
                y = y + b.to(s.dtype)
        else:
            y = layer_norm(s, scale, b, axes, eps, _acc(s))[0]
        out = read(node, "out_dtype")
        if out is not None:
            y = y.to(onnx_to_torch(int(out)))
        return (y, s) if len(node.outputs) > 1 else y


# ---- LRN / LpNormalization / MeanVarianceNormalization ----------------------------------------------

@register
class LRN(OpDef):
    op_type = "LRN"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        size = int(node.attr("size"))
        alpha = float(node.attr("alpha", 1e-4))
        beta = float(node.attr("beta", 0.75))
        bias = float(node.attr("bias", 1.0))
        dt = _acc(x)
        xf = x.to(dt)
        n, c = int(x.shape[0]), int(x.shape[1])
        sq = (xf * xf).reshape(n, c, -1).transpose(1, 2)  # (N, S, C)
        sq = F.pad(sq, [(size - 1) // 2, size // 2])
        total = sq.unfold(2, size, 1).sum(-1).transpose(1, 2).reshape(x.shape)
        return (xf / (bias + (alpha / size) * total).pow(beta)).to(x.dtype)


@register
class LpNormalization(OpDef):
    op_type = "LpNormalization"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        axis = norm_axis(int(node.attr("axis", -1)), x.dim())
        p = int(node.attr("p", 2))
        if p not in (1, 2):
            raise UnsupportedOpError(f"node '{node.name}': LpNormalization supports p = 1 or 2, not {p}")
        xf = x.to(_acc(x))
        norm = xf.abs().sum(axis, keepdim=True) if p == 1 else (xf * xf).sum(axis, keepdim=True).sqrt()
        y = torch.where(norm == 0, torch.zeros_like(xf), xf / norm)
        return y.to(x.dtype)


@register
class MeanVarianceNormalization(OpDef):
    op_type = "MeanVarianceNormalization"
    opsets = (9, 28)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        axes = sorted({norm_axis(int(a), x.dim()) for a in node.attr("axes", [0, 2, 3])})
        xf = x.to(_acc(x))
        mean = xf.mean(axes, keepdim=True)
        var = ((xf * xf).mean(axes, keepdim=True) - mean * mean).clamp_min(0)
        return ((xf - mean) / (var.sqrt() + 1e-9)).to(x.dtype)
