"""YOLO head decoding and class-wise NMS in plain torch (no torchvision).

A head [N, A*(5+C), H, W] holds, per anchor a and cell (y, x), the raw values
(tx, ty, tw, th, tobj, tcls_0..tcls_C-1).  Decoding gives, in input pixels,
cx = (sigmoid(tx) + x) * stride_x, cy = (sigmoid(ty) + y) * stride_y,
w = exp(tw) * anchor_w, h = exp(th) * anchor_h, obj = sigmoid(tobj), cls = sigmoid(tcls).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Anchors (w, h) in 416-input pixels, per head, in the head's channel order (anchor 0 first).
ANCHORS_13: tuple[tuple[int, int], ...] = ((81, 82), (135, 169), (344, 319))  # darknet mask 3,4,5
ANCHORS_26: tuple[tuple[int, int], ...] = ((10, 14), (23, 27), (37, 58))  # mask 0,1,2
INPUT_SIZE = 416


def decode(head: torch.Tensor | np.ndarray, anchors: Sequence[tuple[float, float]],
           input_size: int | tuple[int, int] = INPUT_SIZE, num_classes: int = 80,
           scale_xy: float = 1.0) -> torch.Tensor:
    """Decode one YOLO head [N, A*(5+C), H, W] into [N, A*H*W, 5+C] rows (cx, cy, w, h, obj, cls...).

    Rows run anchor-major, then y, then x.  ``scale_xy`` > 1 applies darknet's
    ``scale_x_y`` (sigmoid * s - (s - 1) / 2); the default 1.0 is the plain YOLOv3 form.
    """
    t = torch.as_tensor(head)
    n, ch, h, w = t.shape
    a = len(anchors)
    if ch != a * (5 + num_classes):
        raise ValueError(f"head has {ch} channels, expected {a} x (5 + {num_classes}) = {a * (5 + num_classes)}")
    in_h, in_w = (input_size, input_size) if isinstance(input_size, int) else input_size
    t = t.reshape(n, a, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)  # N, A, H, W, 5+C
    gy, gx = torch.meshgrid(torch.arange(h, dtype=t.dtype, device=t.device),
                            torch.arange(w, dtype=t.dtype, device=t.device), indexing="ij")
    xy = torch.sigmoid(t[..., 0:2]) * scale_xy - 0.5 * (scale_xy - 1.0)
    cx = (xy[..., 0] + gx) * (in_w / w)
    cy = (xy[..., 1] + gy) * (in_h / h)
    anc = torch.tensor(anchors, dtype=t.dtype, device=t.device).reshape(1, a, 1, 1, 2)
    wh = torch.exp(t[..., 2:4]) * anc
    rest = torch.sigmoid(t[..., 4:])
    out = torch.cat([cx.unsqueeze(-1), cy.unsqueeze(-1), wh, rest], dim=-1)
    return out.reshape(n, a * h * w, 5 + num_classes)


def decode_outputs(head13: torch.Tensor | np.ndarray, head26: torch.Tensor | np.ndarray,
                   input_size: int = INPUT_SIZE, num_classes: int = 80) -> torch.Tensor:
    """Decode both YOLOv4-tiny heads and concatenate them: [N, 3*(13*13 + 26*26), 5+C]."""
    return torch.cat([decode(head13, ANCHORS_13, input_size, num_classes),
                      decode(head26, ANCHORS_26, input_size, num_classes)], dim=1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: [M,4] x [K,4] -> [M,K]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=torch.finfo(a.dtype).tiny)


def nms(dets: torch.Tensor, conf_thresh: float = 0.25, iou_thresh: float = 0.45, max_candidates: int = 3000,
        max_det: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-wise greedy NMS on one image's decoded rows [M, 5+C].

    Score = obj * best class score, class = its argmax; rows below ``conf_thresh`` are dropped,
    at most ``max_candidates`` of the best go into NMS, and a box is suppressed by a higher-scoring
    box of the same class with IoU > ``iou_thresh``.  Returns (boxes [K,4] xyxy in input pixels,
    scores [K], classes [K] int64), by descending score.
    """
    dets = torch.as_tensor(dets)
    cls_score, cls = dets[:, 5:].max(dim=1)
    score = dets[:, 4] * cls_score
    idx = torch.nonzero(score > conf_thresh).flatten()
    idx = idx[torch.argsort(score[idx], descending=True, stable=True)][:max_candidates]
    cx, cy, w, h = dets[idx, 0], dets[idx, 1], dets[idx, 2], dets[idx, 3]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    scores, classes = score[idx], cls[idx]
    kill = ((box_iou(boxes, boxes) > iou_thresh) & (classes[:, None] == classes[None, :])).cpu().numpy()
    suppressed = np.zeros(len(idx), dtype=bool)
    keep: list[int] = []
    for i in range(len(idx)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == max_det:
            break
        suppressed |= kill[i]
    k = torch.tensor(keep, dtype=torch.long, device=dets.device)
    return boxes[k], scores[k], classes[k]
