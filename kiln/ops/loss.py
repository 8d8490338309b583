"""Loss ops usable at inference: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

Both gather -input[n, target[n, d...], d...] with optional per-class weights and ignore_index,
then reduce with 'none', 'sum' or 'mean' (weighted mean: sum(w·loss) / sum(w) over kept
elements). Half-precision inputs are reduced in float32 and cast back.
"""
from __future__ import annotations

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "sum", "mean")


def _check(node: Node) -> None:
    reduction = node.attr("reduction", "mean")
    if reduction not in _REDUCTIONS:
        raise UnsupportedOpError(f"node '{node.name}': unknown reduction '{reduction}'")


def _nll(node: Node, logp: Tensor, target: Tensor, weight: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Negative log-likelihood of `logp` (N, C, d...) at `target` (N, d...), in logp's dtype."""
    _check(node)
    if logp.dim() < 2:
        raise UnsupportedOpError(f"node '{node.name}': input must have rank >= 2, got {logp.dim()}")
    if target.dtype not in (torch.int32, torch.int64):
        raise UnsupportedDTypeError(f"node '{node.name}': target must be int32 or int64, not {target.dtype}")
    classes = logp.shape[1]
    t = target.to(torch.int64)
    ignore = node.attr("ignore_index")
    keep = t != ignore if ignore is not None else torch.ones_like(t, dtype=torch.bool)
    safe = torch.where(keep, t, torch.zeros_like(t)).clamp(0, max(classes - 1, 0))
    picked = -torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)
    w = weight.to(logp.dtype)[safe] if weight is not None else torch.ones_like(picked)
    w = torch.where(keep, w, torch.zeros_like(w))
    loss = picked * w
    reduction = node.attr("reduction", "mean")
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / w.sum()
    return loss.to(out_dtype)


def _work_dtype(node: Node, x: Tensor) -> torch.dtype:
    if x.dtype not in _FLOATS:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support dtype {x.dtype}")
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@register
class NegativeLogLikelihoodLoss(OpDef):
    """loss = -input[n, target, d...] · weight[target], reduced."""

    op_type = "NegativeLogLikelihoodLoss"
    opsets = (12, 28)

    def check(self, node: Node) -> None:
        _check(node)

    def compute(self, node: Node, x: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        wdt = _work_dtype(node, x)
        return _nll(node, x.to(wdt), target, weight, x.dtype)


@register
class SoftmaxCrossEntropyLoss(OpDef):
    """NLL of log_softmax(scores, axis=1); the optional second output is the log-probabilities."""

    op_type = "SoftmaxCrossEntropyLoss"
    opsets = (12, 28)

    def check(self, node: Node) -> None:
        _check(node)

    def compute(self, node: Node, scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> object:
        wdt = _work_dtype(node, scores)
        if scores.dim() < 2:
            raise UnsupportedOpError(f"node '{node.name}': scores must have rank >= 2, got {scores.dim()}")
        logp = torch.log_softmax(scores.to(wdt), dim=1)
        loss = _nll(node, logp, labels, weights, scores.dtype)
        if len(node.outputs) > 1:
            return loss, logp.to(scores.dtype)
        return loss
