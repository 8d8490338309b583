"""Detection post-processing: NonMaxSuppression.

Greedy NMS runs for every (batch, class) row at once: candidates are sorted by score (ties keep
the lower box index first), and one sweep over candidate ranks drops those that overlap a kept,
higher-ranked box by more than iou_threshold. The output row count depends on the data.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.conv import require_float
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_ROWS_PER_CHUNK_ELEMS = 1 << 24  # bound on rows * candidates^2 of one IoU block


def _corners(boxes: Tensor, center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_min, y_min, x_max, y_max) of boxes (..., 4)."""
    if center:
        xc, yc, w, h = boxes.unbind(-1)
        return xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)


def _overlaps(boxes: Tensor, center: bool, threshold: float) -> Tensor:
    """(R, M, M) bool: IoU of candidate pairs (R, M, 4) above threshold, as the ONNX reference decides it."""
    x0, y0, x1, y1 = _corners(boxes, center)
    ix0 = torch.maximum(x0[:, :, None], x0[:, None, :])
    ix1 = torch.minimum(x1[:, :, None], x1[:, None, :])
    iy0 = torch.maximum(y0[:, :, None], y0[:, None, :])
    iy1 = torch.minimum(y1[:, :, None], y1[:, None, :])
    inter = (ix1 - ix0) * (iy1 - iy0)
    area = (x1 - x0) * (y1 - y0)
    union = area[:, :, None] + area[:, None, :] - inter
    ok = (ix1 > ix0) & (iy1 > iy0) & (inter > 0) & (area[:, :, None] > 0) & (area[:, None, :] > 0) & (union > 0)
    iou = inter / torch.where(ok, union, torch.ones_like(union))
    return ok & (iou > threshold)


def _scalar(t: Tensor | None) -> float | None:
    if t is None or t.numel() == 0:
        return None
    return float(t.reshape(-1)[0].item())


@register
class NonMaxSuppression(OpDef):
    op_type = "NonMaxSuppression"
    opsets = (10, 28)
    value_inputs = (2, 3, 4)

    def compute(self, node: Node, boxes: Tensor, scores: Tensor, max_output: Tensor | None = None,
                iou_threshold: Tensor | None = None, score_threshold: Tensor | None = None) -> Tensor:
        require_float(node, boxes, scores)
        if boxes.dim() != 3 or int(boxes.shape[-1]) != 4 or scores.dim() != 3:
            raise UnsupportedOpError(f"node '{node.name}': NonMaxSuppression needs boxes (B, N, 4) and "
                                     f"scores (B, C, N), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
        nb, nc, n = (int(d) for d in scores.shape)
        empty = torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
        limit = _scalar(max_output)
        if limit is None or limit <= 0 or nb * nc * n == 0:
            return empty
        iou_thr = _scalar(iou_threshold) or 0.0
        score_thr = _scalar(score_threshold)
        center = bool(node.attr("center_point_box", 0))
        dt = torch.float32 if boxes.dtype in (torch.float16, torch.bfloat16) else boxes.dtype

        flat_scores = scores.to(dt).reshape(nb * nc, n)
        candidate = torch.ones_like(flat_scores, dtype=torch.bool) if score_thr is None else flat_scores > score_thr
        ranked = torch.where(candidate, flat_scores, torch.full_like(flat_scores, float("-inf")))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        counts = candidate.sum(1)
        m = int(counts.max().item())
        if m == 0:
            return empty
        order = order[:, :m]
        valid = torch.arange(m, device=boxes.device)[None, :] < counts[:, None]
        batch_of_row = torch.arange(nb * nc, device=boxes.device) // nc
        cand_boxes = boxes.to(dt)[batch_of_row[:, None], order]  # (R, m, 4)

        keep = valid.clone()
        later = torch.triu(torch.ones((m, m), dtype=torch.bool, device=boxes.device), 1)
        rows = max(1, _ROWS_PER_CHUNK_ELEMS // (m * m))
        for lo in range(0, nb * nc, rows):
            over = _overlaps(cand_boxes[lo:lo + rows], center, iou_thr) & later
            k = keep[lo:lo + rows]
            for i in range(m - 1):
                k = k & ~(over[:, i, :] & k[:, i:i + 1])
            keep[lo:lo + rows] = k
        keep = keep & (torch.cumsum(keep.to(torch.int64), 1) <= limit)
        r, j = keep.nonzero(as_tuple=True)
        return torch.stack([r // nc, r % nc, order[r, j]], 1).to(torch.int64)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return [TensorType(DType.INT64, (None, 3))]
